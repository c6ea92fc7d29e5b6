"""
etcd-aware health checks (C{--health-check=etcd}): every C{--health-interval},
each endpoint, up or down, is asked for its own health over HTTP(S), and for
its cluster ID. Each answer (a L{CheckResult}) is evidence for the monitor
(L{etcdgw.monitor.Monitor.checked}), which owns the rise/fall counts, the
up/down and healthy/unhealthy decisions, and the cluster identity rule
(L{etcdgw.monitor.ClusterIdentity}); this module only asks.

The member's answer is C{/readyz} where it serves it (etcd 3.5.11+), else
C{/health} (etcd 3.4: C{{"health":"true"}}, HTTP 503 without a leader or
with an alarm); a 404 on C{/readyz} switches that endpoint to C{/health} for
good. The cluster ID comes from C{POST /v3/maintenance/status} (etcd's JSON
gateway), C{header.cluster_id}.
"""

import json
import attr
from zope.interface import implementer

from twisted.internet import defer, error
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.client import (  # what a failed request's reasons are wrapped in
    RequestGenerationFailed,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer

from etcdgw.dial import describeFailure
from etcdgw.endpoint import formatHostPort
from etcdgw.monitor import legacyMonitor
from etcdgw.periodic import PeriodicService
from etcdgw.tls import ClientTLS, TLSClientEndpoint, describeTLSError

#: Largest answer body read from a member (a member list of hundreds of
#: members fits easily): past it the answer is refused, whether or not its
#: length was announced.
MAX_BODY = 1 << 20


class EtcdHTTPError(Exception):
    """
    A member's answer could not be used; the message says why, in one line.
    """


@implementer(IStreamClientEndpoint)
@attr.s(frozen=True)
class _Quiet:
    """
    An endpoint that connects its factories quietly: no "Starting factory"
    line for every health check (C{noisy} is every factory's public switch;
    the HTTP pool's factory class itself is private to Twisted).
    """

    endpoint = attr.ib()

    def connect(self, factory):
        factory.noisy = False
        return self.endpoint.connect(factory)


@implementer(IAgentEndpointFactory)
class _MemberEndpoints:
    """
    Where a request to one member goes: a TCP connection to its address
    (C{endpoint.host}, the address an SRV endpoint was proven at), with TLS
    for https endpoints whose server name (SNI) and certificate check are
    for C{endpoint.serverName} (the SRV target of a discovered endpoint).
    The request's URL names the server name, so it is also the Host header.
    """

    def __init__(self, reactor, endpoint, tlsPolicy, timeout):
        self.reactor = reactor
        self.endpoint = endpoint
        self.tlsPolicy = tlsPolicy
        self.timeout = timeout

    def endpointForURI(self, uri):
        endpoint = self.endpoint
        connect = HostnameEndpoint(
            self.reactor, endpoint.host, endpoint.port, timeout=self.timeout
        )
        if not endpoint.tls:
            return _Quiet(connect)
        creator = self.tlsPolicy.creatorForNetloc(
            endpoint.serverName.encode("ascii"), endpoint.port
        )
        return _Quiet(TLSClientEndpoint(self.reactor, connect, creator))


class EtcdClient:
    """
    A tiny HTTP/1.1 client for etcd members' HTTP API, on the injected
    reactor: one short-lived connection per request, each request (connect,
    TLS, answer, body) bounded by C{timeout} seconds, each answer body by
    L{MAX_BODY} bytes.

    @param tlsPolicy: the L{IPolicyForHTTPS} of https endpoints, asked for
        each endpoint's server name: an L{etcdgw.tls.ClientTLS} (by
        default one that trusts the platform's CAs and presents no
        certificate).
    """

    def __init__(self, reactor, timeout, tlsPolicy=None, allTLS=False):
        """
        @param allTLS: speak TLS to every endpoint, https or not
            (C{--upstream-tls=originate}: an endpoint SRV discovery found
            as plain is still spoken to over TLS, as clients' connections
            are).
        """
        self.allTLS = allTLS
        self.reactor = reactor
        self.timeout = timeout
        self.tlsPolicy = tlsPolicy if tlsPolicy is not None else ClientTLS()
        self._pool = HTTPConnectionPool(reactor, persistent=False)

    @staticmethod
    def url(endpoint, path):
        scheme = "https" if endpoint.tls else "http"
        return f"{scheme}://{formatHostPort(endpoint.serverName, endpoint.port)}{path}"

    def request(self, endpoint, method, path, body=None, timeout=None):
        """
        Send one request to C{endpoint}: connect to its address, speak TLS
        for its server name when it is https.

        @param body: a JSON-able value to POST, or L{None}.
        @param timeout: seconds, when this request gets less than
            C{self.timeout}.
        @return: a Deferred firing with C{(code, bytes)}; failing on a
            connection error, with L{EtcdHTTPError} for an answer longer than
            L{MAX_BODY}, or with L{defer.TimeoutError} after C{timeout}.
        """
        if timeout is None:
            timeout = self.timeout
        if self.allTLS and not endpoint.tls:
            endpoint = attr.evolve(endpoint, tls=True)
        headers = Headers({b"user-agent": [b"etcd-gateway"]})
        producer = None
        if body is not None:
            headers.addRawHeader(b"content-type", b"application/json")
            producer = _BytesProducer(json.dumps(body).encode("utf-8"))
        agent = Agent.usingEndpointFactory(
            self.reactor,
            _MemberEndpoints(self.reactor, endpoint, self.tlsPolicy, timeout),
            pool=self._pool,
        )
        d = agent.request(method, self.url(endpoint, path).encode("ascii"), headers, producer)
        d.addCallback(
            lambda response: readCapped(response, MAX_BODY).addCallback(
                lambda data: (response.code, data)
            )
        )
        d.addTimeout(timeout, self.reactor, onTimeoutCancel=_timedOut)
        return d

    def requestJSON(self, endpoint, method, path, body=None):
        """
        Like L{request}, but the answer must be HTTP 200 with a JSON object.

        @return: a Deferred firing with the decoded object, or failing with
            L{EtcdHTTPError} naming the problem.
        """

        def decode(result):
            code, data = result
            if code != 200:
                raise EtcdHTTPError(f"{path} answered HTTP {code}: {_snippet(data)}")
            try:
                value = json.loads(data)
            except ValueError:
                raise EtcdHTTPError(f"{path} answered non-JSON: {_snippet(data)}") from None
            if not isinstance(value, dict):
                raise EtcdHTTPError(f"{path} answered {_snippet(data)}, not an object")
            return value

        return self.request(endpoint, method, path, body).addCallback(decode)


def readCapped(response, limit):
    """
    Read the body of C{response} (an L{IResponse}), at most C{limit} bytes:
    the one reader of every answer from a member. An announced length over
    the limit is refused without reading; a body without one (chunked, or
    ended by the connection's close) is read until it passes the limit.
    Either way the connection is closed then.

    @return: a Deferred firing with the body; failing with L{EtcdHTTPError}
        past C{limit}, or with the reason the body was cut short. Cancelling
        it closes the connection.
    """
    reader = _CappedBody(limit, response.length)
    reader.deferred = defer.Deferred(lambda d: reader.close())
    response.deliverBody(reader)
    return reader.deferred


class _CappedBody(Protocol):
    """
    Collects a body until it ends, or until it is known to pass C{limit}
    bytes.
    """

    def __init__(self, limit, announced):
        self.limit = limit
        self.announced = announced
        self.size = 0
        self.parts = []
        self.deferred = None

    def close(self):
        transport = self.transport
        if transport is not None:
            close = getattr(transport, "abortConnection", None) or transport.loseConnection
            close()

    def _tooLong(self, message):
        self.parts = []
        self.deferred.errback(EtcdHTTPError(message))
        self.close()

    def connectionMade(self):
        # The length is a number only when the answer announced one.
        if isinstance(self.announced, int) and self.announced > self.limit:
            self._tooLong(f"answer of {self.announced} bytes is longer than {self.limit} bytes")

    def dataReceived(self, data):
        if self.deferred.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self._tooLong(f"answer is longer than {self.limit} bytes")
            return
        self.parts.append(data)

    def connectionLost(self, reason):
        if self.deferred.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            # PotentialDataLoss: an HTTP/1.0 body ended by the close, whole.
            self.deferred.callback(b"".join(self.parts))
        else:
            self.deferred.errback(reason)


def _timedOut(result, timeout):
    """
    What a request cut short by its timeout fails with: L{defer.TimeoutError},
    whatever the cancelled step said (a connect fails with
    L{error.ConnectingCancelledError}, a request in flight with
    C{ResponseNeverReceived}).
    """
    if isinstance(result, Failure):
        raise defer.TimeoutError(f"no answer in {timeout}s")
    return result


@implementer(IBodyProducer)
class _BytesProducer:
    """
    A request body that is already in memory.
    """

    def __init__(self, data):
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer):
        consumer.write(self._data)
        return defer.succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


def _snippet(data, size=120):
    text = data.decode("utf-8", "replace").strip()
    text = " ".join(text.split())
    return text if len(text) <= size else text[:size] + "..."


@attr.s(frozen=True, slots=True, auto_attribs=True)
class CheckResult:
    """
    One answer (or its absence) from one member.

    @ivar healthy: whether the member called itself healthy.
    @ivar detail: a one-line why, for logs.
    @ivar clusterID: the cluster ID it reported (a decimal string), if any.
    @ivar answered: an HTTP answer came, so the member accepts connections.
    @ivar refused: the TCP connect was refused: nothing listens there.
    """

    healthy: bool
    detail: str
    clusterID: str = None
    answered: bool = False
    refused: bool = False


class EtcdProber:
    """
    Asks one member for its health and its cluster ID, through an
    L{EtcdClient}. Remembers, per endpoint, whether C{/readyz} is served.
    """

    log = Logger()

    def __init__(self, client):
        self.client = client
        self._noReadyz = set()

    def forget(self, key):
        self._noReadyz.discard(key)

    def __call__(self, endpoint):
        """
        @return: a Deferred firing with a L{CheckResult}; never failing.
        """
        alive = _AliveQuestion(self.client, endpoint)
        d = self._health(endpoint)
        d.addBoth(alive.healthAnswered)
        d.addCallback(self._withIdentity, endpoint)
        d.addErrback(self._failed, alive)
        return d

    def _health(self, endpoint):
        if endpoint.key in self._noReadyz:
            return self._ask(endpoint, "/health")

        def readyz(result):
            code, data = result
            if code == 404:
                self._noReadyz.add(endpoint.key)
                self.log.debug(
                    "endpoint {endpoint} serves no /readyz: asking /health",
                    endpoint=str(endpoint),
                )
                return self._ask(endpoint, "/health")
            return ("/readyz", code, data)

        return self.client.request(endpoint, b"GET", "/readyz").addCallback(readyz)

    def _ask(self, endpoint, path):
        return self.client.request(endpoint, b"GET", path).addCallback(
            lambda result: (path,) + tuple(result)
        )

    def _withIdentity(self, answer, endpoint):
        path, code, data = answer
        healthy = code == 200
        if healthy and path == "/health":
            try:
                healthy = json.loads(data).get("health") in ("true", True)
            except (ValueError, AttributeError):
                healthy = False
        detail = f"{path} answered HTTP {code}: {_snippet(data)}"

        def status(value):
            header = value.get("header")
            clusterID = header.get("cluster_id") if isinstance(header, dict) else None
            return CheckResult(
                healthy,
                detail,
                None if clusterID is None else str(clusterID),
                answered=True,
            )

        def noStatus(reason):
            return CheckResult(
                healthy, f"{detail}; no cluster ID: {describeCheckFailure(reason)}", answered=True
            )

        d = self.client.requestJSON(endpoint, b"POST", "/v3/maintenance/status", {})
        d.addCallbacks(status, noStatus)
        return d

    def _failed(self, reason, alive):
        result = CheckResult(
            False,
            describeCheckFailure(reason),
            refused=bool(reason.check(error.ConnectionRefusedError)),
        )
        if not reason.check(defer.TimeoutError, error.TimeoutError):
            return result

        def answered(answer):
            if answer is None:
                return result
            return attr.evolve(
                result, detail=f"{result.detail}; /version answered HTTP {answer[0]}",
                answered=True,
            )

        return alive.answer().addCallback(answered)


class _AliveQuestion:
    """
    Is a member whose health question goes unanswered alive all the same?
    etcd 3.4's C{/health} waits up to a second for a quorum read, so during
    an election a live follower does not answer it within a shorter
    C{--health-timeout}, exactly like a frozen member. C{GET /version},
    which etcd serves from memory, tells them apart: any HTTP answer in
    time means the member answers (slowly), so when no member is healthy
    the pool's fallback (L{etcdgw.pool.UpstreamPool.pick}) prefers it to a
    member that answers nothing at all.

    It is asked once the health question has gone unanswered for half the
    timeout, and gets the other half: a check still ends within
    C{--health-timeout}, so a frozen member is found as fast as the README
    promises (the question is not asked of a member that answers in time).
    """

    def __init__(self, client, endpoint):
        self.client = client
        self.endpoint = endpoint
        self.budget = client.timeout / 2
        self._answer = None
        self._call = client.reactor.callLater(self.budget, self._ask)

    def _ask(self):
        self._call = None
        d = self._answer = self.client.request(
            self.endpoint, b"GET", "/version", timeout=self.budget
        )
        d.addErrback(lambda reason: None)

    def healthAnswered(self, result):
        """
        The health question ended with C{result}: the /version question is
        no longer needed, unless the health question timed out.
        """
        if self._call is not None:
            self._call.cancel()
            self._call = None
        timedOut = isinstance(result, Failure) and result.check(
            defer.TimeoutError, error.TimeoutError
        )
        if self._answer is not None and not timedOut:
            self._answer.cancel()
        return result

    def answer(self):
        """
        @return: a Deferred firing with C{(code, bytes)} of C{/version}, or
            with L{None} when it got no answer.
        """
        if self._answer is None:
            self._ask()
        return self._answer


#: What the HTTP client wraps the reasons of a failed request in (each
#: holds a list of Failures in C{reasons}).
_WRAPPED = (
    ResponseNeverReceived,
    ResponseFailed,
    RequestTransmissionFailed,
    RequestGenerationFailed,
)


def describeCheckFailure(reason):
    """
    One line saying why a request to a member (an L{EtcdClient} request:
    a health check, a member list, a cluster ID) failed: the one place
    that describes them. The reasons the HTTP client wraps in a list are
    each described (a TLS failure as C{"TLS handshake failed: ..."}), not
    printed as a list of Failure objects.
    """
    if reason.check(defer.TimeoutError, error.TimeoutError):
        return "no answer in time"
    if reason.check(EtcdHTTPError):
        return str(reason.value)
    if reason.check(*_WRAPPED):
        parts = []
        for inner in reason.value.reasons:
            text = describeCheckFailure(inner)
            if text not in parts:
                parts.append(text)
        return "; ".join(parts) or reason.type.__name__
    tls = describeTLSError(reason.value)
    if tls is not None:
        return tls
    return describeFailure(reason)


@attr.s(slots=True)
class _Check:
    """
    The check of one endpoint in flight, if any.
    """

    pending = attr.ib(default=None)


def ClusterIdentity(pool):
    """
    The old wiring's shared cluster identity (C{tap.py} before issue 12
    item 1): the one of the pool's monitor (L{etcdgw.monitor.legacyMonitor}).
    The rule itself is L{etcdgw.monitor.ClusterIdentity}.
    """
    return legacyMonitor(pool).identity


class EtcdHealthService(PeriodicService):
    """
    Checks every endpoint of the pool every C{interval} seconds with
    C{probe} (an L{EtcdProber}) and gives each answer to the monitor
    (L{etcdgw.monitor.Monitor.checked}), which decides.

    Each endpoint's check runs on its own: a member that answers slowly
    delays only its own next check, never the others'.

    @param monitor: the gateway's L{etcdgw.monitor.Monitor}, which has the
        rise/fall counts. Without one (the old wiring), the pool's monitor
        (L{etcdgw.monitor.legacyMonitor}) is used and given C{rise} and
        C{fall}; C{identity}, if given, must be that monitor's.
    """

    log = Logger()
    runAtStart = True
    roundName = "etcd health round"

    def __init__(
        self, pool, reactor, interval, probe, rise=None, fall=None, identity=None, monitor=None
    ):
        super().__init__(reactor, interval)
        if monitor is None:
            monitor = legacyMonitor(pool, reactor)
            if rise is not None:
                monitor.rise = rise
            if fall is not None:
                monitor.fall = fall
        elif rise is not None or fall is not None:
            raise TypeError("rise and fall are the monitor's: Monitor(pool, clock, rise, fall)")
        if identity is not None and identity is not monitor.identity:
            raise ValueError("the cluster identity is the monitor's: one judge of cluster IDs")
        self.pool = pool
        self.reactor = reactor
        self.monitor = monitor
        self._probe = probe
        self._tracks = {}

    @property
    def identity(self):
        """
        The L{etcdgw.monitor.ClusterIdentity} the reported cluster IDs go to.
        """
        return self.monitor.identity

    @property
    def rise(self):
        return self.monitor.rise

    @property
    def fall(self):
        return self.monitor.fall

    def runRound(self):
        self.checkNow()  # not waited for: see the class docstring

    def stopService(self):
        result = super().stopService()
        for track in list(self._tracks.values()):
            if track.pending is not None:
                track.pending.cancel()
        return result

    def clusterID(self):
        """
        The cluster ID the gateway serves (its identity's C{pinned}), or
        L{None} before the configured endpoints reported one.
        """
        return self.identity.pinned

    def checkNow(self):
        """
        Check every endpoint whose last check has ended.

        @return: a Deferred firing when those checks have ended.
        """
        keys = set()
        checks = []
        for state in self.pool.states():
            endpoint = state.endpoint
            keys.add(endpoint.key)
            track = self._tracks.setdefault(endpoint.key, _Check())
            if track.pending is not None:
                continue
            d = track.pending = defer.maybeDeferred(self._probe, endpoint)
            d.addCallback(self._answered, endpoint, track)
            d.addErrback(self._broken, endpoint, track)
            checks.append(d)
        for key in [k for k in self._tracks if k not in keys]:
            del self._tracks[key]
            forget = getattr(self._probe, "forget", None)
            if forget is not None:
                forget(key)
        return defer.DeferredList(checks, consumeErrors=True)

    def _broken(self, reason, endpoint, track):
        track.pending = None
        if not reason.check(defer.CancelledError):
            self.log.failure("health check of {endpoint} failed", reason, endpoint=str(endpoint))

    def _answered(self, result, endpoint, track):
        track.pending = None
        if (
            not self.running
            or self.pool.stateOf(endpoint) is None
            or self._tracks.get(endpoint.key) is not track
        ):
            return  # removed from the pool meanwhile
        self.monitor.checked(endpoint, result)
