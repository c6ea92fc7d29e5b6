"""
etcd-aware health checks: rise/fall, cluster identity, the /readyz fallback,
and the HTTP client's timeout, on MemoryReactorClock.
"""

import json

from zope.interface import implementer

from twisted.internet import defer, error
from twisted.internet.address import IPv4Address
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import LogLevel
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IPolicyForHTTPS

from etcdgw import etcdhealth
from etcdgw.srv import DiscoveredEndpoint
from etcdgw.endpoint import Endpoint, parseEndpoints
from etcdgw.etcdhealth import (
    CheckResult,
    EtcdClient,
    EtcdHealthService,
    EtcdHTTPError,
    EtcdProber,
)
from etcdgw.monitor import Monitor, majorityClusterID
from etcdgw.pool import DOWN, HEALTHY, UNHEALTHY, UNKNOWN, UP, UpstreamPool

A, B, C = Endpoint("a", 1), Endpoint("b", 1), Endpoint("c", 1)


class FakeProbe:
    """
    Answers from a table: endpoint host -> CheckResult, or a Deferred to
    hold the answer.
    """

    def __init__(self):
        self.answers = {}
        self.calls = []

    def __call__(self, endpoint):
        self.calls.append(endpoint.host)
        answer = self.answers.get(endpoint.host, CheckResult(True, "ok", "7", True))
        if isinstance(answer, defer.Deferred):
            return answer
        return defer.succeed(answer)


GOOD = CheckResult(True, "ok", "7", answered=True)
BAD = CheckResult(False, "/health answered HTTP 503", "7", answered=True)
SILENT = CheckResult(False, "no answer in time")


class CheckerTests(SynchronousTestCase):
    def setUp(self):
        self.clock = MemoryReactorClock()
        self.pool = UpstreamPool(parseEndpoints("a:1,b:1,c:1"), self.clock)
        self.probe = FakeProbe()
        self.monitor = Monitor(self.pool, self.clock, rise=2, fall=3)
        self.service = EtcdHealthService(
            self.pool, self.clock, 1.0, self.probe, monitor=self.monitor
        )
        self.events = EventLoggingObserver.createWithCleanup(self, self.pool.log.observer)
        self.service.startService()
        self.addCleanup(self.stop)

    def stop(self):
        if self.service.running:
            self.service.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def health(self, endpoint):
        return self.pool.stateOf(endpoint).health

    def test_firstAnswerDecides(self):
        """The first check decides at once; every endpoint is asked, every interval."""
        self.assertEqual(self.probe.calls, ["a", "b", "c"])
        self.assertEqual({self.health(e) for e in (A, B, C)}, {HEALTHY})
        self.clock.advance(1)
        self.assertEqual(len(self.probe.calls), 6)

    def test_fall(self):
        """Unhealthy only after `fall` bad answers in a row; then no new connections."""
        self.probe.answers["b"] = SILENT
        for _ in range(2):
            self.clock.advance(1)
            self.assertEqual(self.health(B), HEALTHY)
        self.clock.advance(1)
        self.assertEqual(self.health(B), UNHEALTHY)
        self.assertNotIn("b", {self.pool.pick().endpoint.host for _ in range(6)})
        self.assertEqual(self.pool.stateOf(B).state, UP)  # TCP dimension untouched

    def test_oneBadAnswerDoesNotFlap(self):
        """A bad answer between good ones changes nothing."""
        self.probe.answers["b"] = SILENT
        self.clock.advance(1)
        self.clock.advance(1)
        self.probe.answers["b"] = GOOD
        self.clock.advance(1)
        self.probe.answers["b"] = SILENT
        self.clock.advance(1)
        self.clock.advance(1)
        self.assertEqual(self.health(B), HEALTHY)

    def test_frozenLeader(self):
        """
        The leader is frozen: it stops answering and the others answer 503
        (no leader). All turn unhealthy; new connections go to those that
        answer, never to the silent one.
        """
        self.probe.answers.update(a=SILENT, b=BAD, c=BAD)
        for _ in range(3):
            self.clock.advance(1)
        self.assertEqual({self.health(e) for e in (A, B, C)}, {UNHEALTHY})
        self.assertEqual({self.pool.pick().endpoint.host for _ in range(6)}, {"b", "c"})
        # It answers again (still unhealthy, rise 2): after rise answers it
        # is no longer silent, and back in the fallback.
        self.probe.answers["a"] = BAD
        self.clock.advance(1)
        self.assertEqual({self.pool.pick().endpoint.host for _ in range(6)}, {"b", "c"})
        self.clock.advance(1)
        self.assertEqual({self.pool.pick().endpoint.host for _ in range(6)}, {"a", "b", "c"})

    def test_rise(self):
        """Healthy again only after `rise` good answers in a row."""
        self.probe.answers["b"] = BAD
        for _ in range(3):
            self.clock.advance(1)
        self.assertEqual(self.health(B), UNHEALTHY)
        self.probe.answers["b"] = GOOD
        self.clock.advance(1)
        self.assertEqual(self.health(B), UNHEALTHY)
        self.clock.advance(1)
        self.assertEqual(self.health(B), HEALTHY)

    def test_unknownStartsFromFirstAnswer(self):
        """A member silent from the start is unhealthy after its first check."""
        pool = UpstreamPool([A, B], self.clock)
        service = EtcdHealthService(
            pool, self.clock, 1.0, self.probe, monitor=Monitor(pool, self.clock, 2, 3)
        )
        self.assertEqual(service.pool.stateOf(B).health, UNKNOWN)
        self.probe.answers["b"] = SILENT
        service.startService()
        self.assertEqual(service.pool.stateOf(B).health, UNHEALTHY)
        service.stopService()

    def test_refusedMarksDown(self):
        """A refused connection marks the endpoint down (TCP); an answer marks it up."""
        self.probe.answers["c"] = CheckResult(False, "connection refused", refused=True)
        self.clock.advance(1)
        self.assertEqual(self.pool.stateOf(C).state, DOWN)
        self.probe.answers["c"] = BAD  # answers HTTP: TCP works, etcd is not healthy
        self.clock.advance(1)
        self.assertEqual(self.pool.stateOf(C).state, UP)

    def test_slowAnswerNotDoubled(self):
        """While an endpoint's check is pending, no second one starts."""
        held = defer.Deferred()
        self.probe.answers["a"] = held
        self.clock.advance(1)
        self.clock.advance(1)
        self.assertEqual(self.probe.calls.count("a"), 2)  # start, then the held one
        self.probe.answers["a"] = GOOD
        held.callback(GOOD)
        self.clock.advance(1)
        self.assertEqual(self.probe.calls.count("a"), 3)

    def test_stopCancelsPending(self):
        """Stopping cancels the checks in flight and leaves no timer."""
        cancelled = []
        self.probe.answers["a"] = defer.Deferred(lambda d: cancelled.append(True))
        self.clock.advance(1)
        self.service.stopService()
        self.assertEqual(cancelled, [True])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_removedEndpointForgotten(self):
        """An endpoint removed from the pool is no longer checked."""
        self.pool.replaceEndpoints([A, B])
        self.clock.advance(1)
        self.assertEqual(self.probe.calls[3:], ["a", "b"])
        self.assertNotIn(C.key, self.service._tracks)

    def test_foreignMember(self):
        """A member whose cluster ID differs from the majority's is never used; logged loudly."""
        self.probe.answers["c"] = CheckResult(True, "ok", "99", answered=True)
        self.clock.advance(1)
        state = self.pool.stateOf(C)
        self.assertTrue(state.foreign)
        self.assertEqual(state.clusterID, "99")
        self.assertEqual(self.service.clusterID(), "7")
        self.assertEqual({self.pool.pick().endpoint.host for _ in range(6)}, {"a", "b"})
        loud = [e for e in self.events if e["log_level"] == LogLevel.error]
        self.assertEqual(len(loud), 1)
        self.assertEqual(loud[0]["endpoint"], "c:1")
        # It rejoins when it reports the majority's ID again.
        self.probe.answers["c"] = GOOD
        self.clock.advance(1)
        self.assertFalse(state.foreign)

    def test_noMajority(self):
        """With two members disagreeing and no majority, none is excluded."""
        pool = UpstreamPool([A, B], self.clock)
        self.probe.answers["b"] = CheckResult(True, "ok", "99", answered=True)
        service = EtcdHealthService(
            pool, self.clock, 1.0, self.probe, monitor=Monitor(pool, self.clock)
        )
        events = EventLoggingObserver.createWithCleanup(self, service.log.observer)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertFalse(any(s.foreign for s in pool.states()))

        def warnings():
            return [e for e in events if "no majority" in e.get("log_format", "")]

        self.assertEqual(len(warnings()), 1)
        self.assertEqual(warnings()[0]["ids"], {"a:1": "7", "b:1": "99"})
        self.assertEqual(warnings()[0]["log_level"], LogLevel.error)
        self.clock.advance(1)
        self.assertEqual(len(warnings()), 1)  # once, not every round
        self.assertFalse(any(s.foreign for s in pool.states()))


class MajorityTests(SynchronousTestCase):
    def test_majority(self):
        """More than half must agree."""
        self.assertEqual(majorityClusterID(["1", "1", "2"]), "1")
        self.assertIsNone(majorityClusterID(["1", "2"]))
        self.assertIsNone(majorityClusterID([]))


class FakeClient:
    """
    An EtcdClient stand-in: (method, path) -> (code, body) or an exception.
    """

    timeout = 1.0

    def __init__(self, answers):
        self.answers = answers
        self.asked = []
        self.reactor = MemoryReactorClock()

    def request(self, endpoint, method, path, body=None, timeout=None):
        self.asked.append(path)
        answer = self.answers[(method, path)]
        if isinstance(answer, defer.Deferred):
            return answer
        if isinstance(answer, Exception):
            return defer.fail(answer)
        return defer.succeed(answer)

    def requestJSON(self, endpoint, method, path, body=None):
        def decode(answer):
            return json.loads(answer[1])

        return self.request(endpoint, method, path, body).addCallback(decode)


STATUS = (200, b'{"header":{"cluster_id":"1513","member_id":"6"},"version":"3.4.23"}')


class ProberTests(SynchronousTestCase):
    def test_readyzFallsBackToHealth(self):
        """A 404 on /readyz (etcd 3.4) switches that endpoint to /health for good."""
        client = FakeClient(
            {
                (b"GET", "/readyz"): (404, b"404 page not found\n"),
                (b"GET", "/health"): (200, b'{"health":"true"}'),
                (b"POST", "/v3/maintenance/status"): STATUS,
            }
        )
        prober = EtcdProber(client)
        result = self.successResultOf(prober(A))
        self.assertEqual((result.healthy, result.clusterID, result.answered), (True, "1513", True))
        self.successResultOf(prober(A))
        self.assertEqual(
            client.asked,
            ["/readyz", "/health", "/v3/maintenance/status", "/health", "/v3/maintenance/status"],
        )

    def test_readyzServed(self):
        """Where /readyz is served, its 200 means healthy."""
        client = FakeClient(
            {(b"GET", "/readyz"): (200, b"ok"), (b"POST", "/v3/maintenance/status"): STATUS}
        )
        self.assertTrue(self.successResultOf(EtcdProber(client)(A)).healthy)

    def test_healthFalse(self):
        """/health answering 503 {"health":"false"} is unhealthy, but answered."""
        client = FakeClient(
            {
                (b"GET", "/readyz"): (404, b""),
                (b"GET", "/health"): (503, b'{"health":"false"}'),
                (b"POST", "/v3/maintenance/status"): STATUS,
            }
        )
        result = self.successResultOf(EtcdProber(client)(A))
        self.assertEqual((result.healthy, result.answered), (False, True))
        self.assertIn("503", result.detail)

    def test_healthTrueButNotJSON(self):
        """A 200 from /health whose body is not {"health":"true"} is unhealthy."""
        client = FakeClient(
            {
                (b"GET", "/readyz"): (404, b""),
                (b"GET", "/health"): (200, b"<html>"),
                (b"POST", "/v3/maintenance/status"): STATUS,
            }
        )
        self.assertFalse(self.successResultOf(EtcdProber(client)(A)).healthy)

    def test_refused(self):
        """A refused connection is reported as such (the pool marks it down)."""
        client = FakeClient({(b"GET", "/readyz"): error.ConnectionRefusedError()})
        result = self.successResultOf(EtcdProber(client)(A))
        self.assertEqual((result.healthy, result.refused), (False, True))
        self.assertEqual(result.detail, "connection refused")

    def test_timeoutButAlive(self):
        """
        A member whose health question times out but whose /version answers
        (a live follower during an election: etcd 3.4's /health waits up to
        1s for a quorum read) is unhealthy but answered: the fallback
        prefers it to a frozen member, which answers neither.
        """
        client = FakeClient(
            {
                (b"GET", "/readyz"): defer.TimeoutError(),
                (b"GET", "/version"): (200, b'{"etcdserver":"3.4.23"}'),
            }
        )
        result = self.successResultOf(EtcdProber(client)(A))
        self.assertEqual((result.healthy, result.answered), (False, True))
        self.assertEqual(result.detail, "no answer in time; /version answered HTTP 200")

    def test_timeoutAndSilent(self):
        """A member that answers neither question has not answered."""
        client = FakeClient(
            {
                (b"GET", "/readyz"): defer.TimeoutError(),
                (b"GET", "/version"): defer.TimeoutError(),
            }
        )
        result = self.successResultOf(EtcdProber(client)(A))
        self.assertEqual((result.healthy, result.answered), (False, False))
        self.assertEqual(result.detail, "no answer in time")

    def test_versionAskedAtHalfTime(self):
        """
        The /version question is asked once the health question has gone
        unanswered for half the timeout, and gets the other half: the check
        ends when the health question times out, not a timeout later (a
        frozen member is found within fall x max(interval, timeout) +
        timeout, as the README says).
        """
        health = defer.Deferred()
        version = defer.Deferred()
        client = FakeClient({(b"GET", "/readyz"): health, (b"GET", "/version"): version})
        d = EtcdProber(client)(A)
        client.reactor.advance(0.49)
        self.assertEqual(client.asked, ["/readyz"])
        client.reactor.advance(0.01)
        self.assertEqual(client.asked, ["/readyz", "/version"])
        version.callback((200, b"{}"))
        self.assertNoResult(d)
        health.errback(defer.TimeoutError())  # at 1.0 s, in the real client
        result = self.successResultOf(d)
        self.assertEqual((result.healthy, result.answered), (False, True))
        self.assertEqual(client.reactor.getDelayedCalls(), [])

    def test_answeredInTimeAsksNothingMore(self):
        """A health answer before half the timeout: no /version, no timer left."""
        health = defer.Deferred()
        client = FakeClient(
            {(b"GET", "/readyz"): health, (b"POST", "/v3/maintenance/status"): STATUS}
        )
        d = EtcdProber(client)(A)
        client.reactor.advance(0.3)
        health.callback((200, b"ok"))
        self.assertTrue(self.successResultOf(d).healthy)
        self.assertEqual(client.asked, ["/readyz", "/v3/maintenance/status"])
        self.assertEqual(client.reactor.getDelayedCalls(), [])

    def test_lateAnswerCancelsVersion(self):
        """A health answer after /version was asked cancels that question."""
        health = defer.Deferred()
        cancelled = []
        version = defer.Deferred(cancelled.append)
        client = FakeClient(
            {
                (b"GET", "/readyz"): health,
                (b"GET", "/version"): version,
                (b"POST", "/v3/maintenance/status"): STATUS,
            }
        )
        d = EtcdProber(client)(A)
        client.reactor.advance(0.7)
        health.callback((503, b"no leader"))
        result = self.successResultOf(d)
        self.assertEqual((result.healthy, result.answered), (False, True))
        self.assertEqual(cancelled, [version])

    def test_refusedAsksNothingMore(self):
        """Only a timeout leads to the /version question."""
        client = FakeClient({(b"GET", "/readyz"): error.ConnectionRefusedError()})
        self.successResultOf(EtcdProber(client)(A))
        self.assertEqual(client.asked, ["/readyz"])

    def test_noStatus(self):
        """Health still counts when the status call fails; the cluster ID is unknown."""
        client = FakeClient(
            {
                (b"GET", "/readyz"): (200, b"ok"),
                (b"POST", "/v3/maintenance/status"): defer.TimeoutError(),
            }
        )
        result = self.successResultOf(EtcdProber(client)(A))
        self.assertEqual((result.healthy, result.clusterID), (True, None))
        self.assertIn("no cluster ID: no answer in time", result.detail)


class ClientTests(SynchronousTestCase):
    def test_timeout(self):
        """A member that never answers fails the request after the timeout, leaving no timer."""
        reactor = MemoryReactorClock()
        client = EtcdClient(reactor, timeout=2.0)
        d = client.request(Endpoint("127.0.0.1", 2379), b"GET", "/health")
        self.assertEqual(reactor.tcpClients[0][:2], ("127.0.0.1", 2379))
        self.assertNoResult(d)
        reactor.advance(2.0)
        self.failureResultOf(d, defer.TimeoutError)
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_urls(self):
        """https endpoints are asked over TLS; IPv6 hosts get brackets."""
        self.assertEqual(
            EtcdClient.url(Endpoint("::1", 2379, tls=True), "/health"),
            "https://[::1]:2379/health",
        )
        self.assertEqual(
            EtcdClient.url(Endpoint("h", 1), "/v3/cluster/member/list"),
            "http://h:1/v3/cluster/member/list",
        )


def chunked(body, size=1000):
    return b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size])
        for i in range(0, len(body), size)
    ) + b"0\r\n\r\n"


class AnswerTests(SynchronousTestCase):
    """
    Every answer body goes through one capped reader, with or without an
    announced length.
    """

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.client = EtcdClient(self.reactor, timeout=2.0)
        self.patch(etcdhealth, "MAX_BODY", 4096)

    def answer(self, head, body=b""):
        """
        Send a request; answer it with the raw C{head} and C{body}.
        """
        d = self.client.request(Endpoint("127.0.0.1", 2379), b"POST", "/v3/x", {})
        host, port, factory = self.reactor.tcpClients[-1][:3]
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        # Lenient: a real transport may be resumed after it was closed.
        self.transport = StringTransport(lenient=True)
        protocol.makeConnection(self.transport)
        protocol.dataReceived(head + b"\r\n" + body)
        self.protocol = protocol
        self.addCleanup(lambda: self.assertEqual(self.reactor.getDelayedCalls(), []))
        return d

    def test_chunkedAnswerRead(self):
        """A chunked answer (no length: etcd's member list past ~2 KB) is read whole."""
        body = b"m" * 3000
        d = self.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n", chunked(body))
        self.assertEqual(self.successResultOf(d), (200, body))

    def test_chunkedAnswerTooLong(self):
        """A chunked answer is cut at the limit: a one-line failure, the connection closed."""
        d = self.answer(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n", chunked(b"m" * 5000)
        )
        failure = self.failureResultOf(d, EtcdHTTPError)
        self.assertEqual(str(failure.value), "answer is longer than 4096 bytes")
        self.assertTrue(self.transport.disconnecting)

    def test_announcedLengthTooLong(self):
        """An announced length over the limit is refused without reading the body."""
        d = self.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n", b"m" * 100)
        failure = self.failureResultOf(d, EtcdHTTPError)
        self.assertEqual(str(failure.value), "answer of 5000 bytes is longer than 4096 bytes")
        self.assertTrue(self.transport.disconnecting)

    def test_closeDelimited(self):
        """An HTTP/1.0 answer ended by the close is read, within the limit."""
        d = self.answer(b"HTTP/1.0 200 OK\r\n", b"ok")
        self.assertNoResult(d)
        self.protocol.connectionLost(Failure(error.ConnectionDone()))  # the body ends
        self.assertEqual(self.successResultOf(d), (200, b"ok"))

    def test_slowBodyTimesOut(self):
        """A body that stops coming fails after the timeout; the connection is closed."""
        d = self.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n", b"5\r\nhello\r\n")
        self.assertNoResult(d)
        self.reactor.advance(2.0)
        self.failureResultOf(d, defer.TimeoutError)
        self.assertTrue(self.transport.disconnecting)

    def test_jsonAnswerTooLong(self):
        """requestJSON fails with the same one line (what sync and the checks log)."""
        d = self.client.requestJSON(Endpoint("127.0.0.1", 2379), b"POST", "/v3/x", {})
        host, port, factory = self.reactor.tcpClients[-1][:3]
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        protocol.makeConnection(StringTransport(lenient=True))
        protocol.dataReceived(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(b"m" * 5000)
        )
        self.assertEqual(
            etcdhealth.describeCheckFailure(self.failureResultOf(d)),
            "answer is longer than 4096 bytes",
        )


@implementer(IPolicyForHTTPS)
class _RecordingPolicy:
    def __init__(self):
        self.names = []

    def creatorForNetloc(self, hostname, port):
        self.names.append((hostname, port))
        return optionsForClientTLS(hostname.decode("ascii"))


class ServerNameTests(SynchronousTestCase):
    """
    Requests go to the endpoint's address; TLS (SNI, certificate check) is
    for its server name: the SRV target of a discovered endpoint.
    """

    def request(self, endpoint):
        reactor = MemoryReactorClock()
        policy = _RecordingPolicy()
        client = EtcdClient(reactor, timeout=2.0, tlsPolicy=policy)
        d = client.request(endpoint, b"GET", "/health")
        d.addErrback(lambda f: None)
        host, port = reactor.tcpClients[0][:2]
        reactor.advance(2.0)
        return (host, port), policy.names

    def test_discoveredEndpoint(self):
        """A discovered TLS endpoint: dialled at its address, verified for its SRV target."""
        endpoint = DiscoveredEndpoint("127.0.0.1", 2379, tls=True, name="m1.etcd.test")
        self.assertEqual(endpoint.serverName, "m1.etcd.test")
        self.assertEqual(
            self.request(endpoint), (("127.0.0.1", 2379), [(b"m1.etcd.test", 2379)])
        )
        self.assertEqual(
            EtcdClient.url(endpoint, "/health"), "https://m1.etcd.test:2379/health"
        )

    def test_configuredEndpoint(self):
        """A configured TLS endpoint is verified for its host."""
        self.assertEqual(
            self.request(Endpoint("127.0.0.1", 2379, tls=True)),
            (("127.0.0.1", 2379), [(b"127.0.0.1", 2379)]),
        )

    def test_plain(self):
        """A plain endpoint gets no TLS."""
        self.assertEqual(self.request(Endpoint("127.0.0.1", 2379)), (("127.0.0.1", 2379), []))


class IdentityTests(SynchronousTestCase):
    """
    One rule for cluster IDs: the configured endpoints pin it; learned ones
    never vote and get no client before they report it.
    """

    def setUp(self):
        self.pool = UpstreamPool(parseEndpoints("a:1,b:1"), MemoryReactorClock())
        self.identity = Monitor(self.pool, self.pool.clock).identity
        self.events = EventLoggingObserver.createWithCleanup(self, self.pool.log.observer)

    def learn(self, *names):
        endpoints = [Endpoint(name, 1) for name in names]
        self.pool.replaceEndpoints(self.pool.endpoints + endpoints, learned=True)
        return endpoints

    def usable(self):
        return {s.endpoint.host for s in self.pool.usable()}

    def test_learnedNeverVote(self):
        """Four learned endpoints of another cluster do not out-vote two configured ones."""
        self.identity.report(A, "7")
        self.identity.report(B, "7")
        for x in self.learn("w", "x", "y", "z"):
            self.identity.report(x, "99")
        self.assertEqual(self.identity.pinned, "7")
        self.assertEqual(self.usable(), {"a", "b"})
        self.assertEqual({s.endpoint.host for s in self.pool.states() if s.foreign},
                         {"w", "x", "y", "z"})
        loud = [e for e in self.events if e["log_level"] == LogLevel.error]
        self.assertEqual(sorted(e["endpoint"] for e in loud), ["w:1", "x:1", "y:1", "z:1"])
        for x in self.pool.endpoints[2:]:
            self.identity.report(x, "99")  # again: logged once
        self.assertEqual(len([e for e in self.events if e["log_level"] == LogLevel.error]), 4)

    def test_learnedWaitForProof(self):
        """A learned endpoint gets clients once it reported the pinned ID, not before."""
        (x,) = self.learn("x")
        self.assertEqual(self.usable(), {"a", "b"})
        self.identity.report(x, "7")  # nothing pinned yet: still no proof
        self.assertEqual(self.usable(), {"a", "b"})
        self.identity.report(A, "7")
        self.assertEqual(self.usable(), {"a", "b", "x"})
        self.assertTrue(self.identity.accepts(x))

    def test_pinKeptWithoutConfigured(self):
        """With every configured endpoint gone from the pool, the pin stays."""
        self.identity.report(A, "7")
        x, y = self.learn("x", "y")
        self.identity.report(x, "7")
        self.pool.replaceEndpoints([x, y])
        self.identity.report(y, "99")
        self.assertEqual(self.identity.pinned, "7")
        self.assertEqual(self.usable(), {"x"})

    def test_configuredMoveThePin(self):
        """A majority of the configured endpoints moves the pin (a restored cluster)."""
        self.identity.report(A, "7")
        self.identity.report(B, "7")
        (x,) = self.learn("x")
        self.identity.report(x, "7")
        self.identity.report(A, "8")
        self.assertEqual(self.identity.pinned, "7")  # 1 of 2: no majority
        self.assertEqual(self.usable(), {"a", "b", "x"})
        self.identity.report(B, "8")
        self.assertEqual(self.identity.pinned, "8")
        self.assertEqual(self.usable(), {"a", "b"})
        self.assertTrue(self.pool.stateOf(x).foreign)


class FlagTests(SynchronousTestCase):
    def parse(self, *argv):
        from etcdgw.tap import Options

        options = Options()
        options.parseOptions(["--endpoints=127.0.0.1:2379,127.0.0.1:22379", *argv])
        return options

    def test_defaults(self):
        """
        Defaults: answer probes, 1s/500ms, rise 2, fall 2; with etcd checks
        5s/2s, fall 3; sync off, round-robin.
        """
        health = self.parse().config.health
        self.assertEqual(
            (health.check, health.interval, health.timeout, health.rise, health.fall),
            ("answer", 1.0, 0.5, 2, 2),
        )
        health = self.parse("--health-check=etcd").config.health
        self.assertEqual(
            (health.check, health.interval, health.timeout, health.rise, health.fall),
            ("etcd", 5.0, 2.0, 2, 3),
        )
        o = self.parse()
        self.assertEqual((o["sync-interval"], o["policy"]), (0, "round-robin"))

    def test_badValues(self):
        """Bad values are refused with a one-line error naming the flag."""
        from twisted.python.usage import UsageError

        for argv, text in [
            (["--policy=fastest"], '--policy: "fastest"'),
            (["--health-check=http"], '--health-check: "http"'),
            (["--health-fall=0"], "--health-fall: 0"),
            (["--health-rise=x"], '--health-rise: "x"'),
            (["--health-interval=5"], "--health-interval"),
            (["--health-key-file=/etc/hostname"], "--health-key-file needs --health-cert-file"),
        ]:
            e = self.assertRaises(UsageError, self.parse, *argv)
            self.assertIn(text, str(e))

    def test_wiring(self):
        """--health-check=etcd and --sync-interval add named children; --policy reaches the pool."""
        from etcdgw.gateway import buildGateway

        reactor = MemoryReactorClock()
        o = self.parse(
            "--health-check=etcd", "--sync-interval=30s", "--policy=least-connections",
            "--health-interval=1s", "--health-fall=4",
        )
        gateway = buildGateway(o.config, reactor)
        root = gateway.service
        names = {s.name for s in root}
        self.assertTrue({"etcd-health", "membership"} <= names, names)
        self.assertEqual(gateway.pool.policyName, "least-connections")
        checker = root.getServiceNamed("etcd-health")
        self.assertIs(checker, gateway.etcdHealth)
        self.assertEqual((checker.interval, checker.fall), (1.0, 4))
        self.assertEqual(root.getServiceNamed("membership").interval, 30.0)
        self.assertIs(root.getServiceNamed("membership"), gateway.membership)

    def test_syncWithDiscoveryRefused(self):
        """--sync-interval with --discovery-srv: one line, before any DNS look-up."""
        from twisted.python.usage import UsageError

        from etcdgw import discovery

        self.patch(discovery, "discoverAtStart", lambda *a: self.fail("DNS asked"))
        e = self.assertRaises(
            UsageError, self.parse, "--discovery-srv=example.com", "--sync-interval=30s"
        )
        self.assertEqual(
            str(e),
            "--sync-interval and --discovery-srv both set the endpoints: use one or the other",
        )

    def test_sharedIdentity(self):
        """The etcd checks and sync report cluster IDs to one ClusterIdentity."""
        from etcdgw.gateway import buildGateway

        gateway = buildGateway(
            self.parse("--health-check=etcd", "--sync-interval=30s").config,
            MemoryReactorClock(),
        )
        checker = gateway.etcdHealth
        sync = gateway.membership
        self.assertIs(checker.identity, sync.identity)
        self.assertIs(checker.identity.pool, gateway.pool)

    def test_offByDefault(self):
        """Without the flags, neither child exists."""
        from etcdgw.tap import makeService

        names = {s.name for s in makeService(self.parse(), reactor=MemoryReactorClock())}
        self.assertFalse({"etcd-health", "membership"} & names)
