"""
The listening side: the ports that serve C{--listen-addr} and
C{--metrics-addr} (parsed by L{etcdgw.listenaddr}), whose accept loop survives running out of file descriptors, survives
an error in one client's start, and stops accepting at a connection cap.

Every listener, TCP or unix, given as C{host:port}, C{tcp:}, C{tcp6:},
C{unix:} or C{systemd:}, is served by the gateway's own ports
(L{GatewayPort}, L{GatewayUNIXPort}); a listen-time failure (address in use,
no such interface or directory, no socket from systemd) ends the start with
one line naming the flag (L{ListeningService}).

The accept loop is there for behaviour, not speed, so it is not part of the
fast path (L{etcdgw.fast}): it serves the fast path's transports or
Twisted's own (L{etcdgw.fast.serverTransport}), as the gate decided or (the
metrics address) as asked.
"""

import errno
import os
import socket
import stat

import attr
from zope.interface import implementer

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import address, defer, endpoints, error, tcp, unix
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python import failure
from twisted.python.systemd import ListenFDs

from etcdgw.endpoint import formatHostPort
from etcdgw.fast import serverTransport
from etcdgw.listenaddr import DEFAULT_UNIX_MODE, ListenError, splitEndpointString

#: The listen backlog: clients wait there, not refused, while accepting pauses.
DEFAULT_BACKLOG = 1024


#: Descriptors kept for the gateway itself: standard streams, epoll, the
#: listening sockets, log files, health probes and etcd checks.
RESERVED_DESCRIPTORS = 32
#: The metrics address's cap on open connections (less under a low
#: open-files limit: an eighth of it).
METRICS_MAX_CONNECTIONS = 64
#: The open-files limit assumed when there is none.
UNLIMITED_DESCRIPTORS = 1 << 20


def descriptorBudget(limit):
    """
    The caps on open connections that the open-files limit C{limit}
    (C{RLIMIT_NOFILE}'s soft limit) allows: C{(clients, metrics)}. The
    metrics address gets at most L{METRICS_MAX_CONNECTIONS} (an eighth of
    the limit when that is less); the gateway keeps
    L{RESERVED_DESCRIPTORS}; each client takes two descriptors (its own and
    its member connection's).
    """
    if limit is None or limit < 0 or limit > UNLIMITED_DESCRIPTORS:
        limit = UNLIMITED_DESCRIPTORS
    metrics = max(1, min(METRICS_MAX_CONNECTIONS, limit // 8))
    clients = max(1, (limit - RESERVED_DESCRIPTORS - metrics) // 2)
    return clients, metrics


def listenEndpoint(reactor, address, reusePort=False, maxConnections=None, mode=None, fast=None):
    """
    The server endpoint for a parsed C{--listen-addr}: every kind is served
    by the gateway's own ports. Never raises: what cannot be listened on
    fails C{listen()}.

    @param maxConnections: the cap on connections open at once, or L{None}.
    @param mode: a unix socket file's permissions when its string gave none
        (default L{DEFAULT_UNIX_MODE}).
    @param fast: L{None}: accepted TCP connections get the fast path's
        transports when the gate allows them; C{False}: Twisted's own (the
        metrics address). See L{etcdgw.fast.serverTransport}.
    """
    if address.isTCP:
        return GatewayTCPEndpoint(
            reactor,
            address.host,
            address.port,
            reusePort,
            address.backlog or DEFAULT_BACKLOG,
            maxConnections,
            fast,
        )
    if address.isUNIX:
        return GatewayUNIXEndpoint(
            reactor,
            address.path,
            address.mode if address.mode is not None else (
                DEFAULT_UNIX_MODE if mode is None else mode
            ),
            address.backlog or DEFAULT_BACKLOG,
            address.lockfile,
            maxConnections,
        )
    return GatewaySystemdEndpoint(reactor, address.description, maxConnections, fast=fast)


#: How long accepting pauses after the first accept failure for lack of
#: descriptors or memory; doubled at each failure in a row, up to the maximum.
ACCEPT_BACKOFF_MIN = 0.05
ACCEPT_BACKOFF_MAX = 1.0
#: Shortages (and cap episodes, and client start errors) that follow one
#: another this closely are logged as one.
ACCEPT_LOG_INTERVAL = 10.0
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class _Accepting:
    """
    The accept loop of the gateway's ports (mixed into L{tcp.Port} and
    L{unix.Port}).

    It is a copy of C{twisted.internet.tcp.Port.doRead} (Twisted 25.5-26.x)
    and must stay in step with it: Twisted's loop catches everything (an
    error never escapes to the reactor, which would close the listening
    port); ours keeps that, and closes only the client whose start failed.
    It uses no private name of Twisted's but C{_realPortNumber} (in log
    lines; L{etcdgw.fast.gate} checks it is there): client addresses are
    made with the public address classes (L{_clientAddress}), session
    numbers counted here. Ours adds:

     - Out of file descriptors (C{EMFILE}, C{ENFILE}) or memory, it logs
       once, stops accepting for a short, growing while and then tries
       again: the pending clients wait in the kernel's accept queue instead
       of being closed, the gateway keeps serving the connections it has,
       and the loop does not spin (the listening socket stays readable, so
       retrying at once would burn a core). etcd's gateway exits with
       status 0 on the first such error.
     - At C{maxConnections} open connections it stops accepting until one
       closes (logged once per episode, counted in C{capPauses}).
     - While the factory's accepted clients wait for descriptors
       (C{factory.starved}), it accepts nothing new.

    @ivar openConnections: connections accepted and not yet closed.
    @ivar maxConnections: the cap, or L{None}.
    @ivar acceptFailures: accepts that failed for lack of resources.
    @ivar capPauses: times accepting paused at the cap.
    @ivar clientErrors: clients closed because starting them raised.
    """

    log = Logger()
    numberAccepts = 100
    #: The next accepted connection's number (tcp.Server's sessionno).
    sessionno = 0
    maxConnections = None
    openConnections = 0
    acceptFailures = 0
    capPauses = 0
    clientErrors = 0
    _backoff = 0.0
    _lastEpisodeEnd = float("-inf")
    _lastCapLog = float("-inf")
    _lastClientErrorLog = float("-inf")
    _unloggedClientErrors = 0
    _resume = None
    _atCap = False
    #: Accepting is held for a takeover (L{pauseForTakeover}).
    _takeoverHold = False

    def describeListener(self):
        """
        Where this port listens, for log lines.
        """
        return str(self._realPortNumber)

    def doRead(self):
        try:
            self._acceptSome()
        except BaseException:
            # Twisted's own catch-all (tcp.Port.doRead): whatever went wrong,
            # the port keeps listening.
            self.log.failure(
                "error in the accept loop of {listener}; still listening",
                listener=self.describeListener(),
            )

    def _acceptSome(self):
        if getattr(self.factory, "starved", None):
            # Accepted clients wait for descriptors: new ones must not take
            # them first.
            self._pauseAccepting(None)
            return
        accepted = 0
        limit = self.numberAccepts
        while accepted < limit:
            if self.maxConnections is not None and self.openConnections >= self.maxConnections:
                self._pauseAtCap()
                return
            try:
                skt, addr = self.socket.accept()
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno in (errno.ECONNABORTED, errno.EPERM, errno.EPROTO):
                    continue
                if e.errno in _RESOURCE_ERRORS:
                    self._pauseAccepting(e)
                    return
                self.log.failure("accept failed on {listener}", listener=self.describeListener())
                return
            accepted += 1
            if self._backoff:
                if self.reactor.seconds() - self._lastEpisodeEnd > ACCEPT_LOG_INTERVAL:
                    self.log.info(
                        "accepting again on {address} ({failures} failed accepts so far)",
                        address=self.describeListener(),
                        failures=self.acceptFailures,
                    )
                self._lastEpisodeEnd = self.reactor.seconds()
                self._backoff = 0.0
            self._startClient(skt, addr)
        if accepted == self.numberAccepts:
            self.numberAccepts += 20
        else:
            self.numberAccepts = max(1, accepted)

    def _startClient(self, skt, addr):
        """
        Build and start the protocol of one accepted client. Whatever it
        raises closes that client only, and is logged.
        """
        transport = None
        try:
            if skt.family == socket.AF_INET6:
                # IPv6: keep the scope ID, as Twisted does.
                addr = (
                    socket.getnameinfo(addr, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)[0],
                ) + tuple(addr[1:])
            if skt.family != socket.AF_UNIX:
                skt.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            protocol = self.factory.buildProtocol(self._clientAddress(addr))
            if protocol is None:
                skt.close()
                return
            s = self.sessionno
            self.sessionno = s + 1
            transport = self.transport(skt, protocol, addr, self, s, self.reactor)
            protocol.makeConnection(transport)
        except Exception:
            self.clientErrors += 1
            self._logClientError(addr)
            if transport is not None:
                transport.abortConnection()  # its connectionLost closes the socket
            else:
                skt.close()

    def _logClientError(self, addr):
        now = self.reactor.seconds()
        if now - self._lastClientErrorLog < ACCEPT_LOG_INTERVAL:
            self._unloggedClientErrors += 1
            return
        self.log.failure(
            "error starting client {client} on {listener}: that client is closed, "
            "the port keeps accepting ({more} more such errors since the last line)",
            client=str(addr),
            listener=self.describeListener(),
            more=self._unloggedClientErrors,
        )
        self._lastClientErrorLog = now
        self._unloggedClientErrors = 0

    def _canAccept(self):
        return (
            self.connected
            and not self.disconnecting
            and self._resume is None
            and not self._atCap
            and not self._takeoverHold
        )

    def pauseForTakeover(self):
        """
        Accept nothing while a takeover runs (L{etcdgw.takeover}): new
        clients wait in the kernel's listen queue, none is refused.
        """
        self._takeoverHold = True
        self.stopReading()

    def resumeAfterTakeover(self):
        """
        Accept again (the takeover failed here, or committed in the
        successor that adopted this socket).
        """
        self._takeoverHold = False
        if self._canAccept():
            self.startReading()

    def handOver(self):
        """
        The successor holds this listening socket now: stop this port
        without touching the socket's queue (its descriptor is shared) or,
        for a unix socket, removing its file.
        """
        self._takeoverHold = True
        self.stopReading()
        if hasattr(self, "ownsFile"):
            self.ownsFile = False
        # Twisted shuts a socket down before closing it (tcp._SocketCloser):
        # on a listening socket that would stop the successor's listening too.
        self._shouldShutdown = False
        self.disconnecting = True
        if self.connected:
            # At once, not in a later turn: the listener's own stop then
            # finds the port closed.
            self.connectionLost(failure.Failure(error.ConnectionDone()))

    def dropForTakeover(self):
        """
        A failed takeover in the successor: close this adopted socket (the
        running gateway still has it) without removing a unix socket's file.
        """
        self.handOver()

    def _pauseAtCap(self):
        self._atCap = True
        self.capPauses += 1
        self.stopReading()
        now = self.reactor.seconds()
        if now - self._lastCapLog > ACCEPT_LOG_INTERVAL:
            self.log.warn(
                "{listener}: {open} connections open, the cap ({cap}): accepting "
                "paused until one closes; new clients wait in the listen queue "
                "(logged at most every {interval:g}s)",
                listener=self.describeListener(),
                open=self.openConnections,
                cap=self.maxConnections,
                interval=ACCEPT_LOG_INTERVAL,
            )
        self._lastCapLog = now

    def connectionClosed(self):
        """
        One of this port's connections closed (called by its transport).
        """
        self.openConnections -= 1
        if self._atCap and (
            self.maxConnections is None or self.openConnections < self.maxConnections
        ):
            self._atCap = False
            if self._canAccept():
                self.startReading()

    def _pauseAccepting(self, e):
        """
        Stop accepting for a while: for lack of resources (C{e}, the error),
        or (C{e} is None) while accepted clients wait for descriptors.
        """
        if e is not None:
            self.acceptFailures += 1
        first = not self._backoff
        self._backoff = min(
            ACCEPT_BACKOFF_MAX, max(ACCEPT_BACKOFF_MIN, self._backoff * 2)
        )
        now = self.reactor.seconds()
        if e is not None and first and now - self._lastEpisodeEnd > ACCEPT_LOG_INTERVAL:
            self.log.error(
                "cannot accept new connections: {error}; open connections keep "
                "working, accepting paused for {backoff}s (retried with back-off up to "
                "{maximum}s)",
                error=f"{errno.errorcode.get(e.errno, e.errno)} ({os.strerror(e.errno)})",
                backoff=self._backoff,
                maximum=ACCEPT_BACKOFF_MAX,
            )
        self.stopReading()
        if self._resume is not None and self._resume.active():
            self._resume.cancel()
        self._resume = self.reactor.callLater(self._backoff, self._resumeAccepting)

    def _resumeAccepting(self):
        self._resume = None
        if self._canAccept():
            self.startReading()

    def isListening(self):
        """
        Whether the port is open: listening, or paused only for a while
        (back-off, cap), and not closed.
        """
        return bool(self.connected) and not self.disconnecting

    def _cancelResume(self):
        if self._resume is not None and self._resume.active():
            self._resume.cancel()
        self._resume = None

    def connectionLost(self, reason):
        self._cancelResume()
        return super().connectionLost(reason)


class _Counted:
    """
    Mixin for an accepted client's transport (a C{tcp.Server} or
    C{unix.Server}): tells its port when it closes (the cap).
    """

    __slots__ = ()

    def __init__(self, skt, protocol, client, server, sessionno, reactor):
        super().__init__(skt, protocol, client, server, sessionno, reactor)
        server.openConnections += 1

    def connectionLost(self, reason):
        server = self.server
        try:
            return super().connectionLost(reason)
        finally:
            server.connectionClosed()


_countedClasses = {}


def _counted(transport):
    """
    The counted (L{_Counted}) subclass of transport class C{transport}, made
    once per class.
    """
    counted = _countedClasses.get(transport)
    if counted is None:
        counted = _countedClasses[transport] = type(
            "Counted" + transport.__name__, (_Counted, transport), {"__slots__": ()}
        )
    return counted


class _CountedUNIXServer(_Counted, unix.Server):
    """
    An accepted unix-socket client; tells its port when it closes (the cap).
    """


class GatewayPort(_Accepting, tcp.Port):
    """
    A TCP port with the gateway's accept loop (see L{_Accepting}); its
    accepted connections get the fast path's transports or Twisted's own
    (L{fast}).
    """

    #: SO_REUSEPORT, for --workers: several processes listen on one port.
    reusePort = False
    #: L{None}: the fast path's transports when the gate allows them;
    #: C{False}: Twisted's own. See L{etcdgw.fast.serverTransport}.
    fast = None

    @property
    def transport(self):
        """
        The transport class of the next accepted connection.
        """
        return _counted(serverTransport(self.fast))

    @staticmethod
    def _clientAddress(addr):
        """
        An accepted client's address (what C{tcp.Port._buildAddr} makes).
        """
        if len(addr) == 4:
            return address.IPv6Address("TCP", *addr)
        return address.IPv4Address("TCP", *addr)

    def createInternetSocket(self):
        s = super().createInternetSocket()
        if self.reusePort:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        return s


class GatewayUNIXPort(_Accepting, unix.Port):
    """
    A unix-socket port with the gateway's accept loop (see L{_Accepting}).
    """

    transport = _CountedUNIXServer
    #: Whether the socket file is this port's to remove when it closes (not
    #: when systemd made it).
    ownsFile = True

    def __init__(self, fileName, *args, **kwargs):
        super().__init__(fileName, *args, **kwargs)
        #: The socket file's path, as bytes (as Twisted keeps it, in a
        #: private attribute whose name changed in 26.4).
        self.socketPath = address.UNIXAddress(fileName).name

    @staticmethod
    def _clientAddress(addr):
        """
        An accepted client's address (what C{unix.Port._buildAddr} makes).
        """
        return address.UNIXAddress(addr)

    def describeListener(self):
        path = self.socketPath or b""
        return "unix:" + path.decode(errors="replace")

    def adopted(self):
        """
        The socket was passed by systemd: its unit owns the socket file. Keep
        the file's permissions as they are (C{SocketMode=} decides, where
        Twisted would set its default C{0666}) and leave the file in place
        when the port closes (Twisted would remove it, and clients could no
        longer reach the socket systemd still holds).
        """
        self.ownsFile = False
        path = self.socketPath
        if not path or path[:1] == b"\0":
            return
        try:
            self.mode = stat.S_IMODE(os.stat(path).st_mode)
        except OSError:
            pass

    def connectionLost(self, reason):
        if self.ownsFile:
            return super().connectionLost(reason)
        # unix.Port.connectionLost removes the socket file, releases its
        # lock file (an adopted socket has none), then runs
        # tcp.Port.connectionLost: the file is systemd's, so only the last
        # step runs. Must stay in step with unix.Port.connectionLost.
        self._cancelResume()
        return tcp.Port.connectionLost(self, reason)


@implementer(IStreamServerEndpoint)
@attr.s(auto_attribs=True)
class GatewayTCPEndpoint:
    """
    Listen on TCP with L{GatewayPort}. An empty host listens on every
    interface, IPv6 and IPv4 alike.
    """

    reactor: object
    host: str
    port: int
    reusePort: bool = False
    backlog: int = DEFAULT_BACKLOG
    maxConnections: int = None
    fast: bool = None

    def listen(self, factory):
        host = self.host or "::"  # dual-stack: IPv4 clients too
        port = GatewayPort(self.port, factory, self.backlog, host, self.reactor)
        port.reusePort = self.reusePort
        port.maxConnections = self.maxConnections
        port.fast = self.fast
        return defer.execute(port.startListening).addCallback(lambda _: port)


@implementer(IStreamServerEndpoint)
@attr.s(auto_attribs=True)
class GatewayUNIXEndpoint:
    """
    Listen on a unix socket with L{GatewayUNIXPort}, the socket file made
    with permissions C{mode}. A socket file left by a process that is gone
    (nobody accepts on it) is removed, with a log line; one a live process
    listens on, or a path that is not a socket, is refused.
    """

    reactor: object
    path: str
    mode: int = DEFAULT_UNIX_MODE
    backlog: int = DEFAULT_BACKLOG
    lockfile: bool = False
    maxConnections: int = None
    log = Logger()

    def listen(self, factory):
        def start():
            self._removeStale()
            port = GatewayUNIXPort(
                self.path, factory, self.backlog, self.mode, self.reactor, int(self.lockfile)
            )
            port.maxConnections = self.maxConnections
            port.startListening()
            return port

        return defer.execute(start)

    def _removeStale(self):
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return
        except OSError as e:
            raise ListenError(f'"{self.path}": {e.strerror}') from None
        if not stat.S_ISSOCK(info.st_mode):
            raise ListenError(f'"{self.path}" exists and is not a socket; not replacing it')
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.setblocking(False)
            result = probe.connect_ex(self.path)
        finally:
            probe.close()
        if result == errno.ECONNREFUSED:
            os.unlink(self.path)
            self.log.info(
                "removed the stale socket file {path} (nobody was listening on it)",
                path=self.path,
            )
            return
        if result in (0, errno.EAGAIN, errno.EINPROGRESS):
            raise ListenError(
                f'"{self.path}" is in use: another process listens on it'
            )
        raise ListenError(f'"{self.path}": {os.strerror(result)}')


@implementer(IStreamServerEndpoint)
@attr.s(auto_attribs=True)
class GatewaySystemdEndpoint:
    """
    Serve a listening socket passed by systemd (socket activation) with the
    gateway's ports; the socket is looked up when listening.
    """

    reactor: object
    description: str
    maxConnections: int = None
    environ: object = None
    fast: bool = None

    def listen(self, factory):
        return defer.execute(self._adopt, factory)

    def _descriptor(self):
        """
        The descriptor systemd passed for this listener, and its domain.
        """
        _, _, keywords = splitEndpointString(self.description)
        where = (
            f'named "{keywords["name"]}"' if "name" in keywords else f"at index={keywords['index']}"
        )
        try:
            if self.environ is None:
                # Twisted reads (and removes) LISTEN_FDS when its endpoints
                # module is imported: ask it through its public parser.
                fd = endpoints.serverFromString(self.reactor, self.description).fileno
            else:
                fds = ListenFDs.fromEnvironment(dict(self.environ))
                if "name" in keywords:
                    fd = fds.inheritedNamedDescriptors()[keywords["name"]]
                else:
                    fd = fds.inheritedDescriptors()[int(keywords["index"])]
        except (IndexError, KeyError):
            raise ListenError(
                f"systemd passed no socket {where} to this process (LISTEN_FDS is not "
                "set, or counts fewer sockets): start the gateway from its .socket "
                "unit, or give host:port"
            ) from None
        except (ValueError, TypeError, AttributeError) as e:
            raise ListenError(f"cannot read the sockets systemd passed: {e}") from None
        return fd, getattr(socket, "AF_" + keywords["domain"])

    def _adopt(self, factory):
        fd, family = self._descriptor()
        try:
            # The socket's own family wins over domain= (INET for an INET6
            # socket would misread its addresses).
            probe = socket.socket(fileno=os.dup(fd))
            family = probe.family
            probe.close()
        except OSError as e:
            raise ListenError(f"systemd's socket {fd}: {e.strerror}") from None
        os.set_blocking(fd, False)
        if family == socket.AF_UNIX:
            port = GatewayUNIXPort._fromListeningDescriptor(self.reactor, fd, factory)
            port.adopted()
        else:
            port = GatewayPort._fromListeningDescriptor(self.reactor, fd, family, factory)
            port.fast = self.fast
        port.maxConnections = self.maxConnections
        port.startListening()
        os.close(fd)
        return port


def adoptListeningSocket(reactor, fd, family, factory, maxConnections=None, fast=None,
                         systemd=False, **ignored):
    """
    A port of ours serving the listening socket C{fd} (a duplicate is
    taken; C{fd} stays the caller's) that another gateway process handed
    over (L{etcdgw.takeover}). It listens, reading nothing until told.

    @param systemd: the socket came from systemd (C{systemd:}): its unit
        owns a unix socket's file.
    """
    os.set_blocking(fd, False)
    if family == socket.AF_UNIX:
        port = GatewayUNIXPort._fromListeningDescriptor(reactor, fd, factory)
        if systemd:
            port.adopted()
    else:
        port = GatewayPort._fromListeningDescriptor(reactor, fd, family, factory)
        port.fast = fast
    port.maxConnections = maxConnections
    port.startListening()
    return port


def _stderrLine(text):
    """
    Write one line to the process's real standard error (twistd sends
    C{sys.stderr} to its log once logging starts).
    """
    try:
        os.write(2, (text + "\n").encode("utf-8", "replace"))
    except OSError:
        pass


class ListeningService(StreamServerEndpointService):
    """
    Listens on a parsed address (L{parseListenAddress}): when it cannot
    listen, the start ends with one line naming the flag and the problem
    (on standard error, and logged) and exit status 1; once listening, it
    knows where it listens.

    @ivar port: the listening port, once listening.
    @ivar flag: the flag the address came from, for messages.
    """

    log = Logger()

    def __init__(self, endpoint, factory, address, flag="--listen-addr"):
        super().__init__(endpoint, factory)
        self._raiseSynchronously = True  # a port in use fails the start
        self.address = address
        self.flag = flag
        self.port = None
        self.boundAddress = None

    def privilegedStartService(self):
        try:
            super().privilegedStartService()
        except Exception as e:
            self.cannotListen(e)
        self._waitingForPort.addCallback(self._listened)

    def cannotListen(self, e):
        """
        End the start: one line naming the flag, address and problem.
        """
        message = f"{self.flag}: cannot listen on {self.address}: {describeListenError(e)}"
        self.log.critical("{message}", message=message)
        _stderrLine(f"etcd-gateway: error: {message}")
        raise SystemExit(1)

    def _listened(self, port):
        self.port = port
        try:
            host = port.getHost()
        except Exception:
            host = None
        if getattr(host, "port", None) is not None:
            self.boundAddress = (host.host, host.port)
        self.listening(port)
        return port

    def listening(self, port):
        """
        Called once listening: for subclasses.
        """

    def whenListening(self):
        """
        A Deferred firing with the port once it listens.
        """
        d = defer.Deferred()

        def fire(port):
            d.callback(port)
            return port

        self._waitingForPort.addCallback(fire)
        return d

    def problem(self):
        """
        L{None} while listening; else why not, naming the flag and address.
        """
        port = self.port
        if port is None:
            return f"{self.flag} {self.address}: not listening (yet)"
        listening = getattr(port, "isListening", None)
        if listening is not None and not listening():
            return f"{self.flag} {self.describe()}: the listening port is closed"
        return None

    def describe(self):
        """
        Where it listens, with the real port when 0 was asked.
        """
        if self.boundAddress is not None and self.address.isTCP:
            return formatHostPort(self.address.host or "*", self.boundAddress[1])
        if self.boundAddress is not None:  # a TCP socket from systemd
            return f"{self.address} ({formatHostPort(*self.boundAddress)})"
        return str(self.address)


def describeListenError(e):
    """
    The problem of a failed listen, short: C{address already in use}.
    """
    if isinstance(e, error.CannotListenError):
        inner = e.socketError
        if isinstance(inner, OSError) and inner.strerror:
            text = inner.strerror
            if inner.errno == errno.EADDRINUSE:
                text += " (another process listens there)"
            elif inner.errno == errno.EADDRNOTAVAIL:
                text += " (not an address of this machine)"
            elif isinstance(inner, socket.gaierror):
                text = f"no such interface or host name ({text})"
            return text[0].lower() + text[1:]
        return str(inner)
    if isinstance(e, OSError) and e.strerror:
        return e.strerror[0].lower() + e.strerror[1:]
    return str(e) or type(e).__name__

