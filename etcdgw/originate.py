"""
TLS origination (C{--upstream-tls=originate}): clients speak plaintext to
the gateway, and the gateway speaks TLS to the member, verifying it by its
name and presenting the gateway's client certificate.

  - L{UpstreamTLS}: the one place that holds the TLS settings of origination
    (C{--cacert}, C{--cert}, C{--key}, C{--insecure-skip-tls-verify}) and
    makes every context from them: the stdlib contexts of forwarded
    connections (one per ALPN protocol), and the L{etcdgw.tls.ClientTLS}
    of health checks, etcd checks, member sync and discovery validation.
    SIGHUP re-reads the files (L{UpstreamTLS.reload}); a bad new file is
    refused with one line and the old settings stay.
  - L{OriginatingClient}: a client connection of the proxy that reads the
    client's first bytes (the HTTP/2 preface means ALPN C{h2}, anything
    else C{http/1.1}) while its member connection is dialled, then makes the
    TLS handshake and joins the two. A refused handshake (bad chain, wrong
    name, expired, an alert) is a failed dial: the member is marked down
    with the reason and the client goes to the next member; never plaintext.
  - L{TLSMemberClient}: the fast member transport: the stdlib's
    non-blocking C{ssl.SSLSocket} on the dialled socket (one C call per
    chunk each way: C{send} encrypts and sends, C{recv_into} reads and
    decrypts), delivering what it reads straight to the client's transport.
    With the fast path off (the gate refused it), Twisted's own TLS
    (C{startTLS}, memory BIOs) does the same, slower.

A pair whose member side is TLS is not portable (its TLS session lives in
this process): the member transport says so (C{portable = False}), so a
takeover by a successor process leaves such pairs with the old one.
"""

import os
import socket
import ssl
import tempfile

from OpenSSL import SSL
from twisted.internet import defer, error, main
from twisted.internet.interfaces import (
    IHandshakeListener,
    IReactorPluggableNameResolver,
    IReactorTCP,
    IReactorTime,
)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from etcdgw.dial import connected, dial
from etcdgw.proxy import ClientProtocol, UpstreamProtocol
from etcdgw.selfloop import SelfLoopError
from etcdgw.tls import ClientTLS, TLSHandshakeError, TLSSettingsError
from etcdgw.verify import CertificateRefused

#: The HTTP/2 client connection preface starts so (HAProxy's
#: C{req.payload(0,3) -m str PRI}).
H2_PREFACE = b"PRI"
#: The ALPN protocols offered: one, chosen per connection.
ALPN_H2 = "h2"
ALPN_HTTP11 = "http/1.1"
#: What a client may send before its member's handshake is done; past
#: that it is paused (memory stays bounded).
MAX_EARLY = 64 * 1024


def chooseALPN(data):
    """
    The ALPN protocol for a client whose first bytes are C{data}: C{"h2"}
    for the HTTP/2 connection preface, C{"http/1.1"} for anything else, or
    L{None} while C{data} is too short to tell.
    """
    head = bytes(data[: len(H2_PREFACE)])
    if head == H2_PREFACE:
        return ALPN_H2
    if H2_PREFACE.startswith(head):
        return None
    return ALPN_HTTP11


def _sslContext(ca, certificate, key, insecure, alpn):
    """
    A stdlib client context: TLS 1.2 at least, the peer verified against
    C{ca} (PEM bytes; the system store when L{None}) with its name checked
    (unless C{insecure}), C{certificate}/C{key} (PEM bytes) presented, and
    the one ALPN protocol C{alpn} offered.

    @raise TLSSettingsError: if OpenSSL refuses the bytes.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        elif ca is None:
            context.load_default_certs()
        else:
            context.load_verify_locations(cadata=ca.decode("ascii", "replace"))
        if certificate is not None:
            _loadCertChain(context, certificate, key)
    except (ssl.SSLError, ValueError, OSError) as e:
        raise TLSSettingsError(f"the TLS settings cannot be used: {e}") from None
    context.set_alpn_protocols([alpn])
    return context


def _loadCertChain(context, certificate, key):
    # load_cert_chain reads files only: hand it the bytes through an
    # anonymous memory file (Linux), else a private temporary file.
    if hasattr(os, "memfd_create"):
        fds = []
        try:
            for data in (certificate, key):
                fd = os.memfd_create("etcdgw-tls", os.MFD_CLOEXEC)
                fds.append(fd)
                os.write(fd, data)
            context.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}")
        finally:
            for fd in fds:
                os.close(fd)
        return
    with tempfile.TemporaryDirectory() as directory:
        paths = []
        for name, data in (("cert.pem", certificate), ("key.pem", key)):
            path = os.path.join(directory, name)
            with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
                f.write(data)
            paths.append(path)
        context.load_cert_chain(*paths)


class _Settings:
    """
    One generation of origination's TLS settings, made from PEM bytes.
    """

    def __init__(self, ca, certificate, key, insecure):
        self.clientTLS = ClientTLS(ca, certificate, key, insecure=insecure)
        self.contexts = {
            alpn: _sslContext(ca, certificate, key, insecure, alpn)
            for alpn in (ALPN_H2, ALPN_HTTP11)
        }
        #: The latest resumable session per (ALPN, server name, port), made
        #: with these settings (a reload starts afresh: a session resumed
        #: skips the certificate check its first handshake made).
        self.sessions = {}


class UpstreamTLS:
    """
    The TLS settings of origination, from C{--cacert}, C{--cert}, C{--key}
    and C{--insecure-skip-tls-verify}: the one place every TLS connection
    to a member gets them from (forwarded connections, health checks, etcd
    checks, member sync, discovery validation).

    As an L{twisted.web.iweb.IPolicyForHTTPS} and through L{creator} and
    L{context} it stands for the current L{ClientTLS}, so a reload reaches
    every user.

    @param ca: the C{--cacert} L{etcdgw.config.PEMFile}, or L{None} (the
        system store).
    @param client: the L{etcdgw.config.ClientCertificate} of C{--cert} and
        C{--key}, or L{None}.
    @param insecure: C{--insecure-skip-tls-verify}.
    @param read: C{read(path, flag)} -> bytes, how L{reload} reads a file
        (L{etcdgw.tlsfiles.readPEMFile}).
    @raise TLSSettingsError: if the bytes cannot be used.
    """

    log = Logger()

    def __init__(self, ca=None, client=None, insecure=False, read=None):
        self.ca = ca
        self.client = client
        self.insecure = insecure
        self._read = read
        #: SIGHUP reloads taken, and refused (a bad file).
        self.reloads = 0
        self.refusedReloads = 0
        #: Forwarded connections' handshakes that failed (refused
        #: certificates, alerts, timeouts): each a failed dial.
        self.handshakeFailures = 0
        self._current = _Settings(*self._bytes(ca, client), insecure)

    @staticmethod
    def _bytes(ca, client):
        return (
            ca.data if ca is not None else None,
            client.certificate.data if client is not None else None,
            client.key.data if client is not None else None,
        )

    def sslContext(self, alpn):
        """
        The stdlib context of a forwarded connection offering C{alpn}.
        """
        return self._current.contexts[alpn]

    def resumption(self, alpn, endpoint):
        """
        What a forwarded connection to C{endpoint} offering C{alpn} needs to
        resume a TLS session (as HAProxy does): C{(context, session, keep)},
        the session to offer (or L{None}) and C{keep(session)}, which
        remembers the session the connection gets, for the next one.
        Sessions are kept per settings: one made before a reload is never
        offered after it.
        """
        settings = self._current
        key = (alpn, endpoint.serverName, endpoint.port)

        def keep(session):
            settings.sessions[key] = session

        return settings.contexts[alpn], settings.sessions.get(key), keep

    @property
    def clientTLS(self):
        """
        The current L{ClientTLS}.
        """
        return self._current.clientTLS

    def creator(self, serverName, alpn=()):
        return self._current.clientTLS.creator(serverName, alpn)

    def context(self):
        return self._current.clientTLS.context()

    def creatorForNetloc(self, hostname, port):
        return self._current.clientTLS.creatorForNetloc(hostname, port)

    def reload(self):
        """
        Read C{--cacert}, C{--cert} and C{--key} again (SIGHUP): connections
        made from now on use the new settings; those open keep theirs. A
        file that cannot be used (missing, unreadable, not PEM, a key that
        is not the certificate's) is refused with one log line naming it,
        and the settings in use stay.

        @return: whether the new settings were taken.
        """
        from etcdgw.config import ClientCertificate, PEMFile
        from etcdgw.tlsfiles import TLSFileError, checkKeyPair, loadCertificates, readPEMFile

        read = self._read if self._read is not None else readPEMFile
        try:
            ca = client = None
            if self.ca is not None:
                loadCertificates(self.ca.path, self.ca.flag)
                ca = PEMFile(self.ca.flag, self.ca.path, read(self.ca.path, self.ca.flag))
            if self.client is not None:
                old = self.client
                keyPath = None if old.key is old.certificate else old.key.path
                checkKeyPair(old.certificate.path, keyPath, old.certificate.flag, old.key.flag)
                certificate = PEMFile(
                    old.certificate.flag,
                    old.certificate.path,
                    read(old.certificate.path, old.certificate.flag),
                )
                key = (
                    certificate
                    if keyPath is None
                    else PEMFile(old.key.flag, keyPath, read(keyPath, old.key.flag))
                )
                client = ClientCertificate(certificate, key)
            settings = _Settings(*self._bytes(ca, client), self.insecure)
        except (TLSFileError, TLSSettingsError) as e:
            self.refusedReloads += 1
            self.log.error(
                "SIGHUP: the upstream TLS files are refused ({reason}); the ones read "
                "before stay in use",
                reason=str(e),
            )
            return False
        self.ca, self.client, self._current = ca, client, settings
        self.reloads += 1
        self.log.info(
            "SIGHUP: upstream TLS files read again ({files}): new member connections use them",
            files=", ".join(f.path for f in self._files()) or "none",
        )
        return True

    def _files(self):
        files = []
        if self.ca is not None:
            files.append(self.ca)
        if self.client is not None:
            files.append(self.client.certificate)
            if self.client.key is not self.client.certificate:
                files.append(self.client.key)
        return files


# The member side: the fast transport (stdlib ssl on the dialled socket).


def _memberTransportClasses():
    """
    The fast member transport and its connector, made on first use (they
    subclass the fast path's, which only the gate lets the gateway use).
    """
    global _classes
    if _classes is not None:
        return _classes
    from twisted.internet import tcp

    from etcdgw.fast.relay import _NO_ROOM
    from etcdgw.fast.relay import buffer as _buffer
    from etcdgw.fast.relay import view as _view
    from etcdgw.fast.transport import _maySendNow
    from etcdgw.fast.transport import FastTransport, GatewayClient, GatewayConnector

    #: A TLS record holds at most this much (2**14 bytes).
    record = 16384
    limit = len(_view) - record  # a read always has room for a whole record

    class TLSMemberClient(GatewayClient):
        """
        A member connection that becomes TLS (L{startClientTLS}) once its
        client's first bytes chose the ALPN protocol. Never joined socket to
        socket (the bytes differ on each side): what it reads and decrypts
        goes to L{sinkTo}'s write (the client transport's), what the client
        sends comes through L{write}.

        Once the handshake is done, reads and writes call the stdlib
        socket's SSL object (C{SSLSocket._sslobj}, CPython's C object: one
        call each way, no Python wrapper), as C{SSLSocket.recv_into} and
        C{send} do after their checks; where a Python has no such object,
        the socket's own methods.
        """

        __slots__ = ("_tls", "_ssl", "_handshake", "_sink", "_sinkFast", "_keep")
        portable = False
        originated = True

        def __init__(self, *args, **kwargs):
            self._tls = self._ssl = self._handshake = self._sink = self._keep = None
            self._sinkFast = False
            super().__init__(*args, **kwargs)

        # The handshake

        def startClientTLS(self, context, serverName, session=None, keep=None):
            """
            Make the TLS handshake on this connection.

            @param session: an C{ssl.SSLSession} of C{context} to resume, or
                L{None}.
            @param keep: called with the session this connection gets (once
                the member has sent it, with its first data), or L{None}.
            @return: a Deferred firing (with L{None}) once it is done, or
                failing with L{CertificateRefused} or L{TLSHandshakeError};
                the connection is lost with it.
            """
            d = self._handshake = defer.Deferred()
            self._keep = keep
            try:
                self.socket = self._tls = context.wrap_socket(
                    self.socket,
                    server_hostname=serverName,
                    do_handshake_on_connect=False,
                    session=session,
                )
            except (ssl.SSLError, ValueError, OSError) as e:
                self._handshake = None
                self.abortConnection()
                return defer.fail(TLSHandshakeError(str(e)))
            self._handshakeStep()
            return d

        def _handshakeStep(self):
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                self.startReading()
                if not self.dataBuffer and not self._tempDataLen:
                    self.stopWriting()
                return
            except ssl.SSLWantWriteError:
                self.startWriting()
                return
            except ssl.SSLCertVerificationError as e:
                self._handshakeFailed(CertificateRefused(_verifyText(e)))
                return
            except ssl.SSLError as e:
                self._handshakeFailed(TLSHandshakeError(_sslText(e)))
                return
            except OSError as e:
                self._handshakeFailed(TLSHandshakeError(e.strerror or str(e)))
                return
            d, self._handshake = self._handshake, None
            self._ssl = getattr(self._tls, "_sslobj", None) or self._tls
            self.startReading()
            if self.dataBuffer or self._tempDataLen:
                self.startWriting()
            else:
                self.stopWriting()
            d.callback(None)

        def _handshakeFailed(self, exception):
            d, self._handshake = self._handshake, None
            d.errback(Failure(exception))
            self.abortConnection()

        def sinkTo(self, client, count):
            """
            Hand what this connection reads (decrypted) to the transport
            C{client}, adding its size to C{count}.
            """
            self._sink = client
            self._sinkFast = getattr(client, "fast", False)
            self._count = count

        # Reading

        def doRead(self):
            tls = self._ssl
            if tls is None:
                if self._handshake is not None:
                    self._handshakeStep()
                    return None
                return super().doRead()  # before TLS: nothing is expected
            # One record per read (at most 2**14 bytes): a short one means
            # nothing more was there a moment ago (epoll says when more
            # comes); full ones are read on, into the same buffer, so bulk
            # data goes to the client in large writes.
            read = 0
            done = None
            try:
                read = n = tls.read(record, _buffer)
                while n == record and read <= limit:
                    n = tls.read(record, _view[read:])
                    read += n
                if not n:
                    self._eof = True
                    done = main.CONNECTION_DONE
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                self._eof = True
                done = main.CONNECTION_DONE
            except OSError:
                done = main.CONNECTION_LOST
            if not read:
                return done
            if self._keep is not None:
                # The member's session ticket came before its first data.
                session = self._tls.session
                if session is not None and session.has_ticket:
                    keep, self._keep = self._keep, None
                    keep(session)
            client = self._sink
            if client is None:
                self.protocol.dataReceived(_view[:read])
                return done
            self._count.n += read
            if self._sinkFast and _maySendNow(client):
                # FastTransport.write, inlined: send at once, queue the rest.
                try:
                    sent = client.socket.send(_view[:read])
                except OSError as e:
                    if e.errno not in _NO_ROOM:
                        client._sendFailed()
                        return done
                    sent = 0
                if sent < read:
                    tcp.Connection.write(client, bytes(_view[sent:read]))
            else:
                client.write(bytes(_view[:read]))
            return done

        # Writing

        def write(self, data):
            tls = self._ssl
            if (
                tls is None
                or self._tempDataLen
                or self.dataBuffer
                or self.disconnecting
                or self._writeDisconnecting
                or not self.connected
            ):
                tcp.Connection.write(self, bytes(data))
                return
            try:
                sent = tls.write(data)
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                sent = 0
            except OSError:
                self._sendFailed()
                return
            if sent < len(data):
                # OpenSSL keeps what it began to send: the rest, and a retry
                # of the same bytes, go through Twisted's write buffer.
                tcp.Connection.write(self, bytes(data[sent:]))

        def writeSomeData(self, data):
            # Never cut to SEND_LIMIT: a write OpenSSL asked to retry must
            # be retried with the same bytes, or more.
            try:
                return self._ssl.write(data)
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                return 0
            except OSError:
                return main.CONNECTION_LOST

        def doWrite(self):
            if self._handshake is not None:
                self._handshakeStep()
                return None
            if self._ssl is None:
                return super().doWrite()
            return tcp.Connection.doWrite(self)

        def _closeWriteConnection(self):
            # ssl.SSLSocket.shutdown drops the TLS layer: shut the TCP
            # socket's sending side under it instead (no close_notify, which
            # the stdlib cannot send without ending reading too).
            if self._tls is not None:
                try:
                    socket.socket.shutdown(self._tls, socket.SHUT_WR)
                except (OSError, ValueError):
                    pass
                from twisted.internet.interfaces import IHalfCloseableProtocol

                p = IHalfCloseableProtocol(self.protocol, None)
                if p is not None:
                    p.writeConnectionLost()
                return
            super()._closeWriteConnection()

        def joinTo(self, target, count):
            raise RuntimeError("a TLS member connection cannot be joined socket to socket")

        def connectionLost(self, reason):
            self._sink = self._ssl = None
            d, self._handshake = self._handshake, None
            if d is not None:
                d.errback(
                    Failure(TLSHandshakeError("the member closed the connection in the handshake"))
                )
            return super().connectionLost(reason)

    class TLSClientSide:
        """
        Mixin for a client connection (a L{GatewayServer}, or a subclass of
        it: the listener's counted one) whose member side is TLS: what
        it reads goes to the member transport's C{write} (which encrypts and
        sends it), without the protocols: C{FastTransport._copyRead}, never
        the relay step, which cannot encrypt. A client transport becomes one
        when it is joined (its class is swapped: the same slots, no state of
        its own); its protocol still hears of half-closes and closes.
        """

        __slots__ = ()

        # What it reads goes through the target's write (TLSMemberClient.write:
        # encrypt and send, or queue behind what is queued): the copy path,
        # never the relay step, which cannot encrypt.
        doRead = FastTransport._copyRead

    class TLSMemberConnector(GatewayConnector):
        def _makeTransport(self):
            return TLSMemberClient(self.host, self.port, self.bindAddress, self, self.reactor)

    _classes = (TLSMemberClient, TLSMemberConnector, TLSClientSide)
    return _classes


_classes = None
_clientSides = {}


def _clientSide(cls):
    """
    The class a client transport of class C{cls} becomes once joined to a
    TLS member transport (see C{TLSClientSide}), made once per class; or
    L{None} when C{cls} is not one of the fast path's (it then reads
    through its protocol, as Twisted's own transports do).
    """
    made = _clientSides.get(cls)
    if made is None and cls not in _clientSides:
        from etcdgw.fast.transport import GatewayServer

        mixin = _memberTransportClasses()[2]
        made = None
        if issubclass(cls, GatewayServer):
            made = type("TLSJoined" + cls.__name__, (mixin, cls), {"__slots__": ()})
        _clientSides[cls] = made
    return made


def _sslText(e):
    text = getattr(e, "reason", None) or str(e)
    return " ".join(str(text).split())


def _verifyText(e):
    message = getattr(e, "verify_message", None) or _sslText(e)
    return f"certificate verify failed: {message}"


@implementer(IReactorTCP, IReactorTime, IReactorPluggableNameResolver)
class _MemberReactor:
    """
    The reactor as a dial sees it, with C{connectTCP} making the fast TLS
    member transports (host names are dialled through Twisted's
    C{HostnameEndpoint}, which calls C{connectTCP} for each address).
    """

    def __init__(self, reactor):
        self._reactor = reactor

    def __getattr__(self, name):
        return getattr(self._reactor, name)

    def connectTCP(self, host, port, factory, timeout=30, bindAddress=None):
        connector = _memberTransportClasses()[1](
            host, port, factory, timeout, bindAddress, self._reactor
        )
        connector.connect()
        return connector


def memberReactor(reactor):
    """
    C{reactor}, or what dials fast TLS member transports on it: only on
    Twisted's POSIX reactors with the fast path on.
    """
    from twisted.internet.posixbase import PosixReactorBase

    from etcdgw import fast

    if fast.enabled() and isinstance(reactor, PosixReactorBase):
        return _MemberReactor(reactor)
    return reactor


# The client side


@implementer(IHandshakeListener)
class _TLSUpstream(UpstreamProtocol):
    """
    The member side of an originated pair: hears of the end of Twisted's
    TLS handshake (the stock path) and of a connection lost before it.
    """

    __slots__ = ("handshake", "memberClosed")

    def __init__(self, client):
        super().__init__(client)
        self.handshake = None
        #: The member closed the connection before the pair was joined.
        self.memberClosed = False

    def readConnectionLost(self):
        if self.peer is None:
            # Before the handshake (or in it): the member gave up on this
            # connection; there is nothing to pass on.
            self.memberClosed = True
            self.transport.abortConnection()
            return
        super().readConnectionLost()

    def handshakeCompleted(self):
        d, self.handshake = self.handshake, None
        if d is not None:
            d.callback(None)

    def connectionLost(self, reason):
        d, self.handshake = self.handshake, None
        if d is not None:
            d.errback(reason)
        super().connectionLost(reason)


class _Handshake:
    """
    What one originated dial holds while it runs: the step it waits on (the
    dial, then the client's first bytes), the member connection once made,
    and the handshake's timer.
    """

    def __init__(self, reactor, timeout):
        self.reactor = reactor
        self.timeout = timeout
        self.step = self.upstream = self.timer = None
        self.timedOut = False

    def startTimer(self, upstream):
        self.timer = self.reactor.callLater(self.timeout, self._expire, upstream)

    def stopTimer(self):
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def _expire(self, upstream):
        self.timer = None
        self.timedOut = True
        if upstream.transport is not None:
            upstream.transport.abortConnection()

    def cancel(self):
        self.stopTimer()
        step, self.step = self.step, None
        upstream, self.upstream = self.upstream, None
        if step is not None:
            step.cancel()
        if upstream is not None and upstream.transport is not None:
            upstream.transport.abortConnection()


class OriginatingClient(ClientProtocol):
    """
    A client of C{--upstream-tls=originate}: read while the member is
    dialled, until the first bytes choose the ALPN protocol; then the TLS
    handshake (bounded by C{--dial-timeout}); then the pair is joined, the
    bytes read first sent ahead of the rest.
    """

    __slots__ = ("_early", "_earlySize", "_alpn", "_alpnWaiters", "_earlyEOF")

    #: While dialled it reads the client's first bytes (they choose the
    #: ALPN protocol): not handed to a successor (L{etcdgw.portable}).
    portable = False

    def __init__(self):
        super().__init__()
        self._early = []
        self._earlySize = 0
        self._alpn = None
        self._alpnWaiters = []
        self._earlyEOF = False

    def connectionMade(self):
        super().connectionMade()  # pauses, then dials
        if self._dialing is not None:
            self.transport.resumeProducing()  # the first bytes choose the ALPN

    def dataReceived(self, data):
        if self.peer is not None:
            super().dataReceived(data)
            return
        self._early.append(bytes(data))
        self._earlySize += len(data)
        if self._earlySize >= MAX_EARLY:
            self.transport.pauseProducing()
        if self._alpn is None:
            self._decide(chooseALPN(b"".join(self._early)))

    def readConnectionLost(self):
        if self.peer is not None:
            super().readConnectionLost()
            return
        self._earlyEOF = True
        self._readDone = True
        self._decide(ALPN_HTTP11)

    def _decide(self, alpn):
        if alpn is None or self._alpn is not None:
            return
        self._alpn = alpn
        waiters, self._alpnWaiters = self._alpnWaiters, []
        for d in waiters:
            d.callback(alpn)

    def _whenALPN(self):
        if self._alpn is not None:
            return defer.succeed(self._alpn)
        d = defer.Deferred(lambda d: self._alpnWaiters.remove(d))
        self._alpnWaiters.append(d)
        return d

    def _dialMember(self, endpoint):
        """
        Dial C{endpoint} now; once connected and the ALPN protocol chosen,
        make the TLS handshake, within C{--dial-timeout} from its start.

        @return: a cancellable Deferred firing with the L{_TLSUpstream}
            once the handshake is done, or failing as a failed dial
            (L{CertificateRefused}, L{TLSHandshakeError}, or the dial's
            own failure).
        """
        factory = self.factory
        tls = factory.upstreamTLS
        reactor = factory.reactor
        timeout = factory.dialTimeout
        run = _Handshake(reactor, timeout)
        result = defer.Deferred(lambda d: run.cancel())

        def connected(upstream):
            run.upstream = upstream
            waiting = run.step = self._whenALPN()
            waiting.addCallback(handshake, upstream)
            return waiting

        def handshake(alpn, upstream, redialled=False):
            run.step = None
            transport = upstream.transport
            if transport is None or not transport.connected or upstream.memberClosed:
                if redialled:
                    raise TLSHandshakeError(
                        "the member closed the connection before the handshake"
                    )
                # The member closed the connection while the client was still
                # silent (an idle timeout of its own): not its fault; dial
                # again, once, now that the protocol is known.
                run.upstream = None
                again = run.step = dial(
                    memberReactor(reactor), endpoint, lambda addr: _TLSUpstream(self), timeout
                )
                again.addCallback(lambda fresh: setattr(run, "upstream", fresh) or fresh)
                again.addCallback(lambda fresh: handshake(alpn, fresh, redialled=True))
                return again
            run.startTimer(upstream)
            if getattr(transport, "originated", False):
                context, session, keep = tls.resumption(alpn, endpoint)
                done = transport.startClientTLS(context, endpoint.serverName, session, keep)
            else:
                done = upstream.handshake = defer.Deferred()
                transport.startTLS(tls.creator(endpoint.serverName, [alpn.encode("ascii")]))
                transport.portable = False  # its TLS session lives in this process
            done.addCallback(lambda _: upstream)
            return done

        def finished(outcome):
            run.stopTimer()
            run.step = run.upstream = None
            if isinstance(outcome, Failure):
                if run.timedOut:
                    outcome = Failure(TLSHandshakeError(f"no TLS handshake within {timeout}s"))
                elif outcome.check(
                    error.ConnectionAborted, error.ConnectionLost, error.ConnectionDone
                ):
                    outcome = Failure(
                        TLSHandshakeError("the member closed the connection in the handshake")
                    )
                if outcome.check(CertificateRefused, TLSHandshakeError, SSL.Error):
                    tls.handshakeFailures += 1
                if not result.called:
                    result.errback(outcome)
                return None
            if not result.called:
                result.callback(outcome)
            elif outcome.transport is not None:
                outcome.transport.abortConnection()
            return None

        run.step = dial(
            memberReactor(reactor), endpoint, lambda addr: _TLSUpstream(self), timeout
        )
        run.step.addCallback(connected)
        run.step.addBoth(finished)
        return result

    def _joinTransports(self, upstream, state):
        member = upstream.transport
        if getattr(member, "originated", False):
            self._write = member.write
            upstream._write = None
            member.sinkTo(self.transport, state.fromUpstream)
            client = self.transport
            clientSide = _clientSide(type(client))
            if clientSide is not None and client._target is None:
                client.__class__ = clientSide
                client._target, client._count = member, state.toUpstream
        else:
            from etcdgw.fast import writerFor

            self._write = writerFor(member)
            upstream._write = writerFor(self.transport)
        self.transport.registerProducer(member, True)
        member.registerProducer(self.transport, True)
        early, self._early = b"".join(self._early), None
        if early:
            state.toUpstream.n += len(early)
            member.write(early)
        if self._earlyEOF:
            member.loseWriteConnection()
        else:
            self.transport.resumeProducing()



# Probes: a TLS handshake, as the forwarded connections make it.


@implementer(IHandshakeListener)
class _TLSProbe(Protocol):
    """
    One probe connection: past the self-loop guard, a TLS handshake with
    the forwarded connections' settings; then closed.
    """

    def __init__(self, guard):
        self._guard = guard
        self.loop = None
        self.handshake = None

    def connectionMade(self):
        if self._guard is not None:
            self.loop = self._guard.reachedItself(self.transport)
        connected(self)

    def dataReceived(self, data):
        pass

    def handshakeCompleted(self):
        d, self.handshake = self.handshake, None
        if d is not None:
            d.callback(None)

    def connectionLost(self, reason):
        d, self.handshake = self.handshake, None
        if d is not None:
            d.errback(reason)


def tlsProbe(upstreamTLS, guard=None):
    """
    The probe of C{--health-check=tcp} and C{etcd} (members that are down)
    and SIGHUP in originate mode, as a C{probe(reactor, endpoint, timeout)}:
    connect and make the TLS handshake the forwarded connections make
    (ALPN http/1.1), within C{timeout}; a member whose certificate is
    refused stays down, with the reason, instead of being brought up by a
    TCP connect only to fail every client's dial.
    """

    def probe(reactor, endpoint, timeout):
        run = _Handshake(reactor, timeout)
        result = defer.Deferred(lambda d: run.cancel())

        def connectedProbe(probe):
            run.upstream = probe
            if probe.loop is not None:
                raise SelfLoopError(f"self-loop: {probe.loop}")
            transport = probe.transport
            run.startTimer(probe)
            if getattr(transport, "originated", False):
                return transport.startClientTLS(
                    upstreamTLS.sslContext(ALPN_HTTP11), endpoint.serverName
                )
            done = probe.handshake = defer.Deferred()
            transport.startTLS(upstreamTLS.creator(endpoint.serverName, [b"http/1.1"]))
            return done

        def finished(outcome):
            run.stopTimer()
            probe, run.upstream = run.upstream, None
            if probe is not None and probe.transport is not None:
                probe.transport.abortConnection()
            if isinstance(outcome, Failure):
                if run.timedOut:
                    outcome = Failure(TLSHandshakeError(f"no TLS handshake within {timeout}s"))
                if not result.called:
                    result.errback(outcome)
            elif not result.called:
                result.callback(None)

        run.step = dial(memberReactor(reactor), endpoint, lambda addr: _TLSProbe(guard), timeout)
        run.step.addCallback(connectedProbe)
        run.step.addBoth(finished)
        return result

    return probe
