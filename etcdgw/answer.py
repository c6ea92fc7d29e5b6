"""
The answer probe (C{--health-check=answer}, the default): every
C{--health-interval}, every member, up or down, is asked something it must
ANSWER, at no cost to the cluster: C{GET /version}, which etcd serves from
memory (no raft, no quorum read, no disk), over a kept-alive HTTP/1.1
connection (a new one only when the kept one is gone). A member that
accepts TCP but answers nothing (frozen by SIGSTOP, a disk stall that
stops its process, a stuck VM: its kernel still completes handshakes) is
found this way; a TCP connect alone calls it alive.

https members are asked the same over TLS, on a kept-alive TLS connection
that verifies nothing (it carries no secret and no client's data: identity
is the etcd check's business), presenting C{--health-cert-file} (or
C{--discovery-cert-file}) where given. Where the handshake cannot complete
(a member requiring a client certificate the gateway does not have), its
own answer counts: any byte back (a ServerHello, an alert) is an answer,
and each probe is then a new handshake, which costs the member far more
(measured: see the README), so that is logged once, naming the flag that
avoids it.

With C{--upstream-tls=originate} the probe's TLS is the forwarded
connections' (L{etcdgw.originate.UpstreamTLS}: C{--cacert}, C{--cert},
C{--key}) and it verifies the member as they do: a member whose certificate
is refused (another CA, another name, expired) has FAILED, with the reason,
and is down, for clients could not use it.

Each probe's outcome (an L{Outcome}) is evidence for the monitor
(L{etcdgw.monitor.Monitor}): an answer (L{Monitor.answered}), none in
C{--health-timeout} (L{Monitor.unanswered}), or a connect that failed at
once, refused or unreachable (L{Monitor.probeFailed}: down, not silent). A
probe that reaches the gateway itself fails, "self-loop", before it asks
anything.

L{AnswerService} runs the probes: each member on its own timer, every
C{interval} from the start of the last probe (a member that is down:
every C{--retry-delay} where that is shorter); while a member's probes are
between two verdicts (a miss while it answers, an answer while it is
silent: L{Monitor.changing}), C{fastinter} after the last one (HAProxy's
C{fastinter}). A member that is down and accepts a probe's connection
again is up, and silent until it has answered (L{Monitor.reachable}): no
client is sent to a member that is still starting, unless no other is
usable. A passive hint (L{Monitor.hint}) probes a member now, at most once
per C{fastinter}.
"""

import attr
from OpenSSL import SSL
from twisted.application.service import Service
from twisted.internet import defer, error
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from etcdgw.dial import connected, describeFailure, dial, isLocalResourceError
from etcdgw.duration import formatDuration
from etcdgw.endpoint import formatHostPort
from etcdgw.selfloop import SelfLoopError
from etcdgw.verify import CertificateRefused, peerVerifier, sslErrorText

__all__ = [
    "ANSWERED",
    "FAILED",
    "SILENT",
    "UNTRIED",
    "AnswerProber",
    "AnswerService",
    "Outcome",
    "ResponseReader",
    "probeContext",
    "versionRequest",
]

#: The kinds of L{Outcome}.
ANSWERED = "answered"
SILENT = "silent"
FAILED = "failed"
#: The probe could not be made: the gateway itself is out of descriptors
#: or buffers. Evidence of nothing about the member.
UNTRIED = "untried"

#: The largest response head (status line and headers) read; past it the
#: answer still counts, and the connection is closed.
MAX_HEAD = 16 * 1024
#: The largest response body read to keep the connection (etcd's
#: C{/version} is about 45 bytes); past it, the same.
MAX_BODY = 64 * 1024
#: What one read of the TLS layer takes at most.
_TLS_CHUNK = 64 * 1024


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Outcome:
    """
    What one probe found.

    @ivar kind: L{ANSWERED} (any answer came), L{SILENT} (connected, or
        still connecting, and nothing came in time), L{FAILED} (the connect
        failed: refused, unreachable, no such name, a self-loop), or
        L{UNTRIED} (the gateway had no descriptor for it).
    @ivar detail: one line, for the log.
    @ivar failure: the L{Failure} of a L{FAILED} outcome.
    """

    kind: str
    detail: str
    failure: object = attr.ib(default=None, repr=False)


def versionRequest(endpoint):
    """
    The probe's request to C{endpoint}: C{GET /version}, HTTP/1.1, the
    connection kept.
    """
    host = formatHostPort(endpoint.serverName, endpoint.port)
    return (
        f"GET /version HTTP/1.1\r\nHost: {host}\r\nUser-Agent: etcd-gateway\r\n\r\n"
    ).encode("ascii")


def probeContext(certificate=None, key=None):
    """
    The TLS context of the answer probes of https members: TLS 1.2 at
    least, HTTP/1.1 offered (ALPN), no verification (see the module
    docstring), and the client certificate C{certificate} (PEM bytes,
    followed by its chain) with its C{key}, when given.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from OpenSSL import crypto

    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_verify(SSL.VERIFY_NONE)
    context.set_alpn_protos([b"http/1.1"])
    if certificate is not None:
        chain = x509.load_pem_x509_certificates(certificate)
        context.use_certificate(crypto.X509.from_cryptography(chain[0]))
        for extra in chain[1:]:
            context.add_extra_chain_cert(crypto.X509.from_cryptography(extra))
        context.use_privatekey(
            crypto.PKey.from_cryptography_key(load_pem_private_key(key, password=None))
        )
    return context


class ResponseReader:
    """
    Reads one HTTP/1.1 response, bounded: the status line and headers (at
    most L{MAX_HEAD} bytes), then a body framed by C{Content-Length} (at
    most L{MAX_BODY}). A response it cannot frame (chunked, ended by the
    close, too long, not HTTP) ends at once, the connection not reusable.

    @ivar status: the status line, once read (or what came instead).
    @ivar reusable: whether the connection may carry the next request.
    @ivar done: whether the response has ended.
    """

    def __init__(self):
        self.status = None
        self.reusable = True
        self.done = False
        self._head = b""
        self._remaining = None

    def feed(self, data):
        """
        Take the next bytes of the answer.

        @return: whether the response has ended.
        """
        if self.done:
            self.reusable = False  # bytes past the end: not an answer to us
            return True
        if self._remaining is None:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0 or end > MAX_HEAD:
                if len(self._head) > MAX_HEAD:
                    return self._end(f"a response head longer than {MAX_HEAD} bytes")
                return False
            head, data = self._head[:end], self._head[end + 4 :]
            self._head = b""
            self._readHead(head)
            if self.done:
                return True
        self._remaining -= len(data)
        if self._remaining <= 0:
            if self._remaining < 0:
                self.reusable = False
            self.done = True
        return self.done

    def _end(self, status=None):
        if status is not None and self.status is None:
            self.status = status
        self.reusable = False
        self.done = True
        return True

    def _readHead(self, head):
        lines = head.split(b"\r\n")
        status = lines[0].decode("latin-1")
        self.status = " ".join(status.split())[:120]
        parts = status.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            self._end()
            return
        code = int(parts[1])
        if parts[0] != "HTTP/1.1":
            self.reusable = False
        length = None
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            value = value.strip()
            if name == b"content-length":
                if not value.isdigit() or (length is not None and int(value) != length):
                    self._end()
                    return
                length = int(value)
            elif name == b"transfer-encoding":
                self._end()
                return
            elif name == b"connection" and value.lower() == b"close":
                self.reusable = False
        if code in (204, 304):
            length = 0
        if length is None or length > MAX_BODY or 100 <= code < 200:
            self._end()
            return
        self._remaining = length


class _AnswerClient(Protocol):
    """
    One connection of the probes to one member (kept between probes), in
    plain HTTP or over TLS (a pyOpenSSL connection on a memory BIO: the
    probe sees every byte the member sends, the handshake's included).

    @ivar loop: what the self-loop guard found (the connection reached the
        gateway itself), or L{None}.
    @ivar attempt: the L{_Attempt} waiting for an answer, or L{None}.
    @ivar handshaken: the TLS handshake completed (always, for plain).
    """

    def __init__(self, guard, request, context=None, serverName=None, verify=False):
        self._guard = guard
        self._request = request
        self._context = context
        self._serverName = serverName
        self.verifying = verify and context is not None
        #: Called (no argument) once a verifying handshake is done.
        self.onHandshake = None
        #: Why the member's certificate was refused (with C{verify}).
        self.certificateRefused = None
        self._tls = None
        self._queued = None
        self._reader = None
        self.loop = None
        self.broken = None
        self.attempt = None
        self.handshaken = context is None
        self.closed = False

    @property
    def idle(self):
        """
        Connected, and no probe waits on it: the next probe may use it.
        """
        return not self.closed and self.attempt is None and self.transport is not None

    def connectionMade(self):
        if self._guard is not None:
            self.loop = self._guard.reachedItself(self.transport)
        if self.loop is None and self._context is not None:
            try:
                tls = self._tls = SSL.Connection(self._context, None)
                tls.set_connect_state()
                name = self._serverName
                if name and not (isIPAddress(name) or isIPv6Address(name)):
                    tls.set_tlsext_host_name(name.encode("idna"))
                if self.verifying:
                    tls.set_verify(
                        SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
                        peerVerifier(name, name, self._refuseCertificate),
                    )
                self._handshake()
            except SSL.Error as e:  # not expected: the context was checked at start
                self.broken = f"TLS set-up failed: {sslErrorText(e)}"
        connected(self)

    def _refuseCertificate(self, reason):
        self.certificateRefused = reason

    def ask(self, attempt):
        """
        Send the request; C{attempt} hears of the answer.
        """
        self.attempt = attempt
        self._reader = ResponseReader()
        if self._tls is None:
            self.transport.write(self._request)
        elif self.handshaken:
            self._tlsSend(self._request)
        else:
            self._queued = self._request

    def abort(self):
        self.attempt = None
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.abortConnection()

    def dataReceived(self, data):
        # The gateway's transports hand over a view of a reused buffer.
        data = bytes(data)
        attempt = self.attempt
        if attempt is not None:
            attempt.heard = True
        if self._tls is None:
            self._plain(data)
        else:
            self._tlsReceived(data)

    def connectionLost(self, reason):
        self.closed = True
        attempt, self.attempt = self.attempt, None
        self._tls = None
        if attempt is not None:
            attempt.lost(self, reason)

    # The answer

    def _plain(self, data):
        attempt = self.attempt
        if attempt is None:
            self.abort()  # nobody asked: the connection is out of step
            return
        reader = self._reader
        if reader.feed(data):
            self.attempt = None
            if not reader.reusable:
                self.abort()
            attempt.answered(reader.status)

    # TLS on a memory BIO

    def _flush(self):
        tls = self._tls
        while tls is not None:
            try:
                data = tls.bio_read(_TLS_CHUNK)
            except SSL.WantReadError:
                return
            if not data:
                return
            self.transport.write(data)

    def _handshake(self):
        try:
            self._tls.do_handshake()
        except SSL.WantReadError:
            self._flush()
            return
        self.handshaken = True
        self._flush()
        if self.onHandshake is not None:
            onHandshake, self.onHandshake = self.onHandshake, None
            onHandshake()
        if self._queued is not None:
            request, self._queued = self._queued, None
            self._tlsSend(request)

    def _tlsSend(self, data):
        self._tls.send(data)
        self._flush()

    def _tlsReceived(self, data):
        try:
            self._tls.bio_write(data)
            if not self.handshaken:
                self._handshake()
            while self._tls is not None and self.handshaken:
                try:
                    plain = self._tls.recv(_TLS_CHUNK)
                except SSL.WantReadError:
                    break
                self._plain(plain)
            if self._tls is not None:
                self._flush()
        except SSL.ZeroReturnError:
            # The member closed TLS (close_notify): it answered that much.
            self._closedTLS(None)
        except SSL.Error as e:
            # An alert (no client certificate, no common version; with TLS
            # 1.3 a refused certificate is told after the handshake): it
            # answered, and the connection is done.
            self._closedTLS(e)

    def _closedTLS(self, e):
        attempt, self.attempt = self.attempt, None
        self._flush()
        self.abort()
        if attempt is not None:
            if self.certificateRefused is not None:
                attempt.refusedCertificate(self.certificateRefused)
            elif e is None:
                attempt.answered("closed TLS (close_notify)")
            else:
                attempt.refusedTLS(e)


class _Attempt:
    """
    One probe of one member: on the kept connection, or a new one; bounded
    by the prober's timeout from its start, a connect included.

    @ivar heard: some byte came back from the member for it.
    """

    def __init__(self, prober, endpoint, onConnected=None):
        self.prober = prober
        self.endpoint = endpoint
        self.onConnected = onConnected
        self.deferred = defer.Deferred(self._cancel)
        self.heard = False
        self._dialing = None
        self._protocol = None
        self._reused = False
        self._retried = False
        self._timer = prober.reactor.callLater(prober.timeout, self._timedOut)

    def start(self):
        kept = self.prober._kept.get(self.endpoint.key)
        if kept is not None and kept.idle:
            self._ask(kept, reused=True)
        else:
            self._connect()

    def _connect(self):
        prober = self.prober
        prober._drop(self.endpoint.key)
        # Originate mode: every member is spoken to over TLS, as clients' are.
        tls = self.endpoint.tls or prober.upstreamTLS is not None
        context = prober.context if tls else None
        request = versionRequest(self.endpoint)
        # Our own timer ends the probe first; the dial's is a backstop.
        d = self._dialing = dial(
            prober.reactor,
            self.endpoint,
            lambda addr: _AnswerClient(
                prober.guard,
                request,
                context,
                self.endpoint.serverName,
                verify=prober.verifies and tls,
            ),
            prober.timeout + 1,
        )
        d.addCallbacks(self._connected, self._dialFailed)

    def _connected(self, protocol):
        self._dialing = None
        if self.deferred.called:
            protocol.abort()
            return
        if protocol.loop is not None:
            protocol.abort()
            failure = Failure(SelfLoopError(f"self-loop: {protocol.loop}"))
            self._finish(Outcome(FAILED, describeFailure(failure), failure))
            return
        if protocol.broken is not None:
            # The gateway's own fault, not the member's: evidence of
            # nothing but silence (which the cap bounds).
            protocol.abort()
            self._finish(Outcome(SILENT, protocol.broken))
            return
        self.prober._kept[self.endpoint.key] = protocol
        if protocol.verifying and not protocol.handshaken:
            # A member verified as clients' connections verify it is
            # reachable once its handshake passed, not at its TCP connect.
            protocol.onHandshake = self._reachable
        else:
            self._reachable()
        self._ask(protocol, reused=False)

    def _reachable(self):
        if self.onConnected is not None and not self.deferred.called:
            try:
                self.onConnected()
            except Exception:
                self.prober.log.failure(
                    "answer probe of {endpoint}: connected callback failed",
                    endpoint=str(self.endpoint),
                )

    def _dialFailed(self, reason):
        self._dialing = None
        if self.deferred.called or reason.check(defer.CancelledError):
            return
        if reason.check(error.TimeoutError, defer.TimeoutError):
            self._finish(Outcome(SILENT, f"no connection in {self._limit}"))
            return
        if isLocalResourceError(reason):
            # The gateway's shortage, not the member's fault (as the proxy's
            # dials judge it).
            self._finish(Outcome(UNTRIED, describeFailure(reason), reason))
            return
        self._finish(Outcome(FAILED, describeFailure(reason), reason))

    def _ask(self, protocol, reused):
        self._protocol = protocol
        self._reused = reused
        self.heard = False
        protocol.ask(self)

    @property
    def _limit(self):
        return formatDuration(self.prober.timeout)

    # What the connection says

    def answered(self, status):
        self._finish(Outcome(ANSWERED, status or "answered"))

    def refusedCertificate(self, reason):
        self._finish(
            Outcome(
                FAILED, f"TLS handshake failed: {reason}", Failure(CertificateRefused(reason))
            )
        )

    def refusedTLS(self, e):
        self.prober._tlsRefused(self.endpoint, e)
        self._finish(Outcome(ANSWERED, f"TLS handshake answered: {sslErrorText(e)}"))

    def lost(self, protocol, reason):
        if self.deferred.called:
            return
        if self.heard:
            self._finish(Outcome(ANSWERED, "answered, then closed the connection"))
        elif self._reused and not self._retried:
            # The kept connection was closed under us (an idle timeout, a
            # restart): once more on a new one, within the same time.
            self._retried = True
            self._connect()
        else:
            self._finish(
                Outcome(SILENT, f"connection closed without an answer: {describeFailure(reason)}")
            )

    def _timedOut(self):
        self._timer = None
        if self._dialing is not None:
            dialing, self._dialing = self._dialing, None
            dialing.cancel()
            self._finish(Outcome(SILENT, f"no connection in {self._limit}"))
            return
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            protocol.abort()  # an answer that comes later is not ours
        if self.heard:
            self._finish(Outcome(ANSWERED, f"answered in part within {self._limit}"))
        else:
            self._finish(Outcome(SILENT, f"no answer in {self._limit}"))

    def _finish(self, outcome):
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        protocol = self._protocol
        if protocol is not None and protocol.attempt is self:
            protocol.attempt = None
        if outcome.kind == ANSWERED and protocol is not None and not protocol.closed:
            self.prober._tlsAccepted(self.endpoint, protocol)
        if not self.deferred.called:
            self.deferred.callback(outcome)

    def _cancel(self, deferred):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._dialing is not None:
            dialing, self._dialing = self._dialing, None
            dialing.cancel()
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            protocol.abort()


class AnswerProber:
    """
    Probes members for an answer, keeping one connection per member.

    @ivar reactor: the reactor probes connect and time out with.
    @ivar timeout: seconds one probe may take, its connect included
        (C{--health-timeout}).
    @ivar guard: the L{etcdgw.selfloop.SelfLoopGuard}, or L{None}.
    @ivar context: the TLS context of https members (L{probeContext}).
    """

    log = Logger()

    def __init__(self, reactor, timeout, guard=None, context=None, upstreamTLS=None):
        """
        @param upstreamTLS: the L{etcdgw.originate.UpstreamTLS} of
            C{--upstream-tls=originate}: each new TLS connection takes its
            context (current settings) and verifies the member with it.
        """
        self.upstreamTLS = upstreamTLS
        self.verifies = upstreamTLS is not None and not upstreamTLS.insecure
        self.reactor = reactor
        self.timeout = timeout
        self.guard = guard
        self._context = context
        #: The connection kept for each member, by key.
        self._kept = {}
        #: Members whose TLS handshake was refused, logged once.
        self._refused = set()

    @property
    def context(self):
        if self.upstreamTLS is not None:
            context = self.upstreamTLS.context()
            context.set_alpn_protos([b"http/1.1"])
            return context
        if self._context is None:
            self._context = probeContext()
        return self._context

    def probe(self, endpoint, onConnected=None):
        """
        Ask C{endpoint} for an answer.

        @param onConnected: called (with no argument) when a new connection
            to it is made, past the self-loop guard, before any answer.
        @return: a Deferred firing with an L{Outcome} (never failing) within
            C{timeout}; cancelling it ends the probe and its connection.
        """
        attempt = _Attempt(self, endpoint, onConnected)
        attempt.start()
        return attempt.deferred

    def forget(self, key):
        """
        Close the connection kept for the member C{key} (removed).
        """
        self._drop(key)
        self._refused.discard(key)

    def close(self):
        """
        Close every kept connection.
        """
        for key in list(self._kept):
            self._drop(key)

    def _drop(self, key):
        protocol = self._kept.pop(key, None)
        if protocol is not None:
            protocol.abort()

    def _tlsRefused(self, endpoint, e):
        if endpoint.key in self._refused:
            return
        self._refused.add(endpoint.key)
        self.log.warn(
            "endpoint {endpoint} answers the probe's TLS handshake with a refusal "
            "({reason}): it counts as an answer, but each probe is then a new "
            "handshake, which costs the member about a millisecond of CPU and a "
            "'rejected connection' line in its log; if it requires client "
            "certificates, give --health-cert-file",
            endpoint=str(endpoint),
            reason=sslErrorText(e),
        )

    def _tlsAccepted(self, endpoint, protocol):
        if endpoint.key in self._refused and protocol.handshaken and endpoint.tls:
            self._refused.discard(endpoint.key)
            self.log.info(
                "endpoint {endpoint} completes the probe's TLS handshake now: the "
                "connection is kept between probes",
                endpoint=str(endpoint),
            )


@attr.s(slots=True)
class _Schedule:
    """
    One member's probes: the next one's timer, the one running, when the
    last one started.
    """

    endpoint = attr.ib()
    call = attr.ib(default=None)
    pending = attr.ib(default=None)
    started = attr.ib(default=None)


class AnswerService(Service):
    """
    Probes every member of the pool for an answer (L{AnswerProber}), each on
    its own timer, and gives the outcomes to the monitor.

    @ivar pool: the L{etcdgw.pool.UpstreamPool} whose members are probed
        (its endpoint list is followed as it changes).
    @ivar monitor: the L{etcdgw.monitor.Monitor} told each outcome.
    @ivar interval: seconds between the starts of two probes of a member
        (C{--health-interval}).
    @ivar fastinter: seconds from a probe's end to the next one while the
        member's verdict is changing (C{--health-fastinter}); also the
        least time between two probes a hint asks for.
    @ivar retryDelay: a member that is down is probed at least this often
        (C{--retry-delay}, when shorter than C{interval}).
    """

    log = Logger()

    def __init__(self, pool, reactor, monitor, prober, interval, fastinter, retryDelay=None):
        self.pool = pool
        self.reactor = reactor
        self.monitor = monitor
        self.prober = prober
        self.interval = interval
        self.fastinter = fastinter
        self.retryDelay = interval if retryDelay is None else min(interval, retryDelay)
        self._schedules = {}
        monitor.onHint(self.hinted)

    @property
    def timeout(self):
        return self.prober.timeout

    def startService(self):
        super().startService()
        self.pool.addObserver(self._poolChanged)
        self._poolChanged(self.pool)

    def stopService(self):
        super().stopService()
        self.pool.removeObserver(self._poolChanged)
        schedules, self._schedules = self._schedules, {}
        for schedule in schedules.values():
            self._stop(schedule)
        self.prober.close()
        return defer.succeed(None)

    def _stop(self, schedule):
        if schedule.call is not None and schedule.call.active():
            schedule.call.cancel()
        schedule.call = None
        if schedule.pending is not None:
            pending, schedule.pending = schedule.pending, None
            pending.cancel()

    def _poolChanged(self, pool):
        """
        Follow the pool's endpoint list: a new member is probed at once, a
        removed one no more (its kept connection closed).
        """
        states = pool.states()
        schedules = self._schedules
        if len(states) == len(schedules) and all(
            s.endpoint.key in schedules for s in states
        ):
            return
        keys = set()
        for state in states:
            key = state.endpoint.key
            keys.add(key)
            if key not in schedules:
                schedule = schedules[key] = _Schedule(state.endpoint)
                schedule.call = self.reactor.callLater(0, self._due, schedule)
        for key in [key for key in schedules if key not in keys]:
            self._stop(schedules.pop(key))
            self.prober.forget(key)

    def hinted(self, endpoint):
        """
        A passive hint about C{endpoint} (L{etcdgw.monitor.Monitor.hint}):
        probe it now, unless a probe of it runs or started less than
        C{fastinter} ago.
        """
        schedule = self._schedules.get(endpoint.key)
        if not self.running or schedule is None or schedule.pending is not None:
            return
        if (
            schedule.started is not None
            and self.reactor.seconds() - schedule.started < self.fastinter
        ):
            return
        if schedule.call is not None and schedule.call.active():
            schedule.call.cancel()
        self._due(schedule)

    def _due(self, schedule):
        schedule.call = None
        state = self.pool.stateOf(schedule.endpoint)
        if state is None or self._schedules.get(state.endpoint.key) is not schedule:
            return
        schedule.endpoint = state.endpoint  # its priority or weight may be new
        schedule.started = self.reactor.seconds()
        d = schedule.pending = defer.maybeDeferred(
            self.prober.probe, state.endpoint, lambda: self._connected(schedule)
        )
        d.addCallback(self._outcome, schedule)
        d.addErrback(self._broken, schedule)

    def _connected(self, schedule):
        """
        A probe connected to its member: one that was down accepts
        connections again (L{etcdgw.monitor.Monitor.reachable}).
        """
        if self._schedules.get(schedule.endpoint.key) is not schedule:
            return
        state = self.pool.stateOf(schedule.endpoint)
        if state is not None and not state.up:
            self.monitor.reachable(schedule.endpoint, "the answer probe connected")

    def _outcome(self, outcome, schedule):
        schedule.pending = None
        if self._schedules.get(schedule.endpoint.key) is not schedule:
            return  # removed meanwhile
        endpoint = schedule.endpoint
        monitor = self.monitor
        if outcome.kind == ANSWERED:
            monitor.answered(endpoint, outcome.detail)
        elif outcome.kind == SILENT:
            monitor.unanswered(endpoint, outcome.detail)
        elif outcome.kind == FAILED:
            monitor.probeFailed(endpoint, outcome.failure, f"answer probe: {outcome.detail}")
        self._next(schedule, outcome.kind in (ANSWERED, SILENT) and monitor.changing(endpoint))

    def _broken(self, reason, schedule):
        if reason.check(defer.CancelledError):
            return
        schedule.pending = None
        self.log.failure(
            "answer probe of {endpoint} failed", reason, endpoint=str(schedule.endpoint)
        )
        if self._schedules.get(schedule.endpoint.key) is schedule:
            self._next(schedule, False)

    def _next(self, schedule, fast):
        if not self.running:
            return
        if fast:
            delay = self.fastinter
        else:
            state = self.pool.stateOf(schedule.endpoint)
            every = self.retryDelay if state is not None and not state.up else self.interval
            delay = max(0.0, schedule.started + every - self.reactor.seconds())
        schedule.call = self.reactor.callLater(delay, self._due, schedule)
