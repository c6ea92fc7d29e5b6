"""
The listening side: C{--listen-addr} parsing, and a TCP port whose accept loop
survives running out of file descriptors.
"""

import errno
import os
import socket

import attr
from zope.interface import implementer

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer, endpoints, tcp
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger

from etcdgw.endpoint import EndpointError, formatHostPort, splitHostPort
from etcdgw.transport import GatewayServer

#: Twisted endpoint-string types accepted as C{--listen-addr} as they are.
ENDPOINT_TYPES = ("tcp", "tcp6", "unix", "systemd")


class ListenError(ValueError):
    """
    C{--listen-addr} is malformed; the message names it.
    """


@attr.s(frozen=True, auto_attribs=True)
class ListenAddress:
    """
    A parsed C{--listen-addr}.

    @ivar text: what the user gave.
    @ivar host: the interface for TCP (C{""} for all interfaces), else L{None}.
    @ivar port: the TCP port (0 means any free port), else L{None}.
    @ivar description: a Twisted endpoint string for non-TCP listeners.
    """

    text: str
    host: str = None
    port: int = None
    description: str = None

    @property
    def isTCP(self):
        return self.port is not None

    @property
    def wildcard(self):
        return self.isTCP and self.host in ("", "0.0.0.0", "::")

    def __str__(self):
        if self.isTCP:
            return formatHostPort(self.host or "*", self.port)
        return self.description


def parseListenAddress(text):
    """
    Parse C{--listen-addr}: C{host:port}, C{[v6]:port}, C{:port} (all
    interfaces), or a Twisted endpoint string (C{tcp:...}, C{tcp6:...},
    C{unix:/path}, C{systemd:domain=INET:index=0}).

    @rtype: L{ListenAddress}
    @raise ListenError: naming C{text}.
    """
    text = text.strip()
    kind = text.split(":", 1)[0]
    if kind in ("unix", "systemd"):
        if not text[len(kind) + 1 :]:
            raise ListenError(f'listen address "{text}": missing {kind} parameters')
        return ListenAddress(text, description=text)
    if kind in ENDPOINT_TYPES:
        from twisted.internet import reactor

        try:
            endpoint = endpoints.serverFromString(reactor, text)
        except (ValueError, TypeError, KeyError) as e:
            raise ListenError(f'listen address "{text}": {e}') from None
        if isinstance(endpoint, endpoints.TCP4ServerEndpoint):  # also TCP6
            return ListenAddress(text, endpoint._interface, endpoint._port)
        return ListenAddress(text, description=text)
    try:
        host, port = splitHostPort(
            text.replace("*:", ":", 1) if text.startswith("*:") else text,
            what="listen address",
            allowEmptyHost=True,
            allowPortZero=True,
        )
    except EndpointError as e:
        raise ListenError(
            f"{e} (or give a Twisted endpoint: tcp:PORT:interface=ADDR, unix:/PATH, "
            "systemd:domain=INET:index=0)"
        ) from None
    if host and not _isIP(host):
        try:
            host = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4][0]
        except OSError as e:
            raise ListenError(f'listen address "{text}": cannot resolve host: {e}')
    return ListenAddress(text, host, port)


def _isIP(host):
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return True
        except OSError:
            pass
    return False


def listenEndpoint(reactor, address, reusePort=False):
    """
    The server endpoint for a parsed C{--listen-addr}. TCP listeners (and
    systemd-passed sockets) use L{GatewayPort}; others come from
    L{endpoints.serverFromString}.
    """
    if address.isTCP:
        return GatewayTCPEndpoint(reactor, address.host, address.port, reusePort)
    try:
        endpoint = endpoints.serverFromString(reactor, address.description)
    except (ValueError, TypeError, KeyError, IndexError) as e:
        raise ListenError(f'listen address "{address.description}": {e!r}') from None
    if isinstance(endpoint, endpoints.AdoptedStreamServerEndpoint):
        return GatewayAdoptedEndpoint(reactor, endpoint.fileno, endpoint.addressFamily)
    return endpoint


#: How long accepting pauses after the first accept failure for lack of
#: descriptors or memory; doubled at each failure in a row, up to the maximum.
ACCEPT_BACKOFF_MIN = 0.05
ACCEPT_BACKOFF_MAX = 1.0
#: Shortages that follow one another this closely are logged as one.
ACCEPT_LOG_INTERVAL = 10.0
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class GatewayPort(tcp.Port):
    """
    A TCP port whose accept loop, out of file descriptors (C{EMFILE},
    C{ENFILE}) or memory, logs once, stops accepting for a short, growing
    while and then tries again: the pending clients wait in the kernel's
    accept queue instead of being closed, the gateway keeps serving the
    connections it has, and the loop does not spin (the listening socket
    stays readable, so retrying at once would burn a core).

    etcd's gateway exits with status 0 on the first such error.
    """

    log = Logger()
    transport = GatewayServer
    #: SO_REUSEPORT, for --workers: several processes listen on one port.
    reusePort = False
    numberAccepts = 100
    _backoff = 0.0
    _lastEpisodeEnd = float("-inf")
    _resume = None
    acceptFailures = 0

    def doRead(self):
        if getattr(self.factory, "starved", None):
            # Accepted clients wait for descriptors: new ones must not take
            # them first.
            self._pauseAccepting(None)
            return
        accepted = 0
        limit = self.numberAccepts
        while accepted < limit:
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
                self.log.failure("accept failed")
                return
            accepted += 1
            if self._backoff:
                if self.reactor.seconds() - self._lastEpisodeEnd > ACCEPT_LOG_INTERVAL:
                    self.log.info(
                        "accepting again on {address} ({failures} failed accepts so far)",
                        address=str(self._realPortNumber),
                        failures=self.acceptFailures,
                    )
                self._lastEpisodeEnd = self.reactor.seconds()
                self._backoff = 0.0
            if len(addr) == 4:
                addr = (
                    socket.getnameinfo(addr, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)[0],
                ) + addr[1:]
            if skt.family != socket.AF_UNIX:
                skt.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            protocol = self.factory.buildProtocol(self._buildAddr(addr))
            if protocol is None:
                skt.close()
                continue
            s = self.sessionno
            self.sessionno = s + 1
            transport = self.transport(skt, protocol, addr, self, s, self.reactor)
            protocol.makeConnection(transport)
        if accepted == self.numberAccepts:
            self.numberAccepts += 20
        else:
            self.numberAccepts = max(1, accepted)

    def createInternetSocket(self):
        s = super().createInternetSocket()
        if self.reusePort:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        return s

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
        self._resume = self.reactor.callLater(self._backoff, self._resumeAccepting)

    def _resumeAccepting(self):
        self._resume = None
        if self.connected:
            self.startReading()

    def connectionLost(self, reason):
        if self._resume is not None and self._resume.active():
            self._resume.cancel()
        self._resume = None
        return super().connectionLost(reason)


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
    backlog: int = 1024

    def listen(self, factory):
        host = self.host or "::"  # dual-stack: IPv4 clients too
        port = GatewayPort(self.port, factory, self.backlog, host, self.reactor)
        port.reusePort = self.reusePort
        return defer.execute(port.startListening).addCallback(lambda _: port)


@implementer(IStreamServerEndpoint)
@attr.s(auto_attribs=True)
class GatewayAdoptedEndpoint:
    """
    Serve a listening socket passed by systemd with L{GatewayPort}.
    """

    reactor: object
    fileno: int
    addressFamily: int

    def listen(self, factory):
        def adopt():
            if self.addressFamily == socket.AF_UNIX:
                return self.reactor.adoptStreamPort(self.fileno, self.addressFamily, factory)
            os.set_blocking(self.fileno, False)
            port = GatewayPort._fromListeningDescriptor(
                self.reactor, self.fileno, self.addressFamily, factory
            )
            port.startListening()
            os.close(self.fileno)
            return port

        return defer.execute(adopt)


class ListeningService(StreamServerEndpointService):
    """
    Listens on a parsed address (L{parseListenAddress}): fails the start
    when it cannot listen, and knows, once listening, where it listens.

    @ivar port: the listening port, once listening.
    """

    def __init__(self, endpoint, factory, address):
        super().__init__(endpoint, factory)
        self._raiseSynchronously = True  # a port in use fails the start
        self.address = address
        self.port = None

    def privilegedStartService(self):
        super().privilegedStartService()
        self._waitingForPort.addCallback(self._listened)

    def _listened(self, port):
        self.port = port
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

    def describe(self):
        """
        Where it listens, with the real port when 0 was asked.
        """
        if self.port is not None and self.address.isTCP:
            return formatHostPort(self.address.host or "*", self.port.getHost().port)
        return str(self.address)
