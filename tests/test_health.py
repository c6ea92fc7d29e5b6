from twisted.internet import defer, error
from twisted.internet.address import IPv4Address
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from etcdgw.dial import describeFailure
from etcdgw.endpoint import Endpoint, parseEndpoints
from etcdgw.etcdhealth import CheckResult
from etcdgw.health import HealthService, guardedProbe, probeTCP
from etcdgw.monitor import Monitor
from etcdgw.pool import UpstreamPool
from etcdgw.selfloop import SelfLoopError, SelfLoopGuard
from tests.test_selfloop import FakeListener


class HealthServiceTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.pool = UpstreamPool(parseEndpoints("10.0.0.1:1,10.0.0.2:1"), self.reactor)
        self.probes = []
        self.service = HealthService(
            self.pool, self.reactor, 60, 1, probe=self.probe, monitor=Monitor(self.pool, self.reactor)
        )

    def probe(self, reactor, endpoint, timeout):
        d = defer.Deferred()
        self.probes.append((endpoint, timeout, d))
        return d

    def tearDown(self):
        if self.service.running:
            self.successResultOf(self.service.stopService())
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_probesOnlyDown(self):
        """Each retry delay, only endpoints that are down are probed, with the dial timeout."""
        self.service.startService()
        self.pool.markDown(Endpoint("10.0.0.2", 1), "refused")
        self.reactor.advance(59)
        self.assertEqual(self.probes, [])
        self.reactor.advance(1)
        self.assertEqual([(str(e), t) for e, t, d in self.probes], [("10.0.0.2:1", 1)])

    def test_successMarksUp(self):
        """A probe that connects brings the endpoint back."""
        self.service.startService()
        self.pool.markDown(Endpoint("10.0.0.1", 1), "refused")
        self.reactor.advance(60)
        self.probes[0][2].callback(None)
        self.assertTrue(self.pool.isUp(Endpoint("10.0.0.1", 1)))
        self.assertEqual(self.pool.stateOf(Endpoint("10.0.0.1", 1)).reason, "probe connected")

    def test_failureStaysDown(self):
        """A probe that fails leaves the endpoint down and the loop running."""
        self.service.startService()
        self.pool.markDown(Endpoint("10.0.0.1", 1), "refused")
        self.reactor.advance(60)
        self.probes[0][2].errback(error.ConnectionRefusedError())
        self.assertFalse(self.pool.isUp(Endpoint("10.0.0.1", 1)))
        self.reactor.advance(60)
        self.assertEqual(len(self.probes), 2)

    def test_slowRoundNotDoubled(self):
        """A round still running when the next tick comes is not started twice."""
        self.service.startService()
        self.pool.markDown(Endpoint("10.0.0.1", 1), "refused")
        self.reactor.advance(60)
        self.reactor.advance(60)
        self.assertEqual(len(self.probes), 1)

    def test_probeNow(self):
        """probeNow probes at once and its Deferred fires when the round ends."""
        self.pool.markDown(Endpoint("10.0.0.1", 1), "refused")
        d = self.service.probeNow()
        self.assertNoResult(d)
        self.probes[0][2].callback(None)
        self.successResultOf(d)
        self.assertEqual(self.pool.upCount(), 2)

    def test_brokenProbeSurvives(self):
        """A probe function that raises is logged and the loop keeps running."""

        calls = []

        def broken(reactor, endpoint, timeout):
            calls.append(endpoint)
            raise RuntimeError("boom")

        self.service._probe = broken
        self.service.startService()
        self.pool.markDown(Endpoint("10.0.0.1", 1), "refused")
        self.reactor.advance(60)
        self.reactor.advance(60)
        self.assertEqual(len(calls), 2)
        self.assertTrue(self.service._loop.running)
        self.assertFalse(self.pool.isUp(Endpoint("10.0.0.1", 1)))


class ProbeTCPTests(SynchronousTestCase):
    def test_connectAndClose(self):
        """probeTCP connects with the timeout and closes the connection at once."""
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import StringTransport

        reactor = MemoryReactorClock()
        d = probeTCP(reactor, Endpoint("10.0.0.1", 2379), 2)
        host, port, factory, timeout, _ = reactor.tcpClients[0]
        self.assertEqual((host, port, timeout), ("10.0.0.1", 2379, 2))
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertIsNone(self.successResultOf(d))
        self.assertTrue(transport.disconnecting)


class SelfLoopProbeTests(SynchronousTestCase):
    """
    A probe that reaches the gateway itself is a failure, "self-loop": the
    endpoint is not marked up again every --retry-delay.
    """

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.guard = SelfLoopGuard(listeners=[FakeListener("127.0.0.1", 23790)])

    def connect(self, peer):
        """
        Complete the last dial, its peer at C{peer}; return the transport.
        """
        host, port, factory, timeout, _ = self.reactor.tcpClients[-1]
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = StringTransport(peerAddress=IPv4Address("TCP", *peer))
        protocol.makeConnection(transport)
        return transport

    def test_probeReachingTheGatewayFails(self):
        """probeTCP through the guard fails with SelfLoopError when its peer is a listener."""
        d = probeTCP(self.reactor, Endpoint("127.0.0.1", 23790), 2, self.guard)
        transport = self.connect(("127.0.0.1", 23790))
        reason = self.failureResultOf(d, SelfLoopError)
        self.assertTrue(
            describeFailure(reason).startswith("self-loop: 127.0.0.1:23790 is the gateway's own "),
            describeFailure(reason),
        )
        self.assertTrue(transport.disconnecting)

    def test_probeElsewhereSucceeds(self):
        """Through the guard, a probe whose peer is not a listener succeeds."""
        d = probeTCP(self.reactor, Endpoint("127.0.0.1", 2379), 2, self.guard)
        self.connect(("127.0.0.1", 2379))
        self.assertIsNone(self.successResultOf(d))

    def test_loopStaysDown(self):
        """
        The health service's probe of a down endpoint that reaches the
        gateway itself keeps it down, logs "self-loop", and etcd answers
        (which come through the gateway from another member) do not bring it
        back either.
        """
        loop = Endpoint("gw.example", 23790)
        pool = UpstreamPool([loop, Endpoint("10.0.0.2", 2379)], self.reactor)
        monitor = Monitor(pool, self.reactor)
        service = HealthService(
            pool, self.reactor, 60, 1, probe=guardedProbe(self.guard), monitor=monitor
        )
        events = EventLoggingObserver.createWithCleanup(self, service.log.observer)
        monitor.probeFailed(loop, Failure(error.ConnectionRefusedError()), "refused")
        d = service.probeNow()
        self.connect(("127.0.0.1", 23790))  # the name resolves to the gateway
        self.successResultOf(d)
        self.assertFalse(pool.isUp(loop))
        stillDown = [e for e in events if "still down" in e.get("log_format", "")]
        self.assertTrue(stillDown[0]["reason"].startswith("self-loop: "), stillDown[0]["reason"])
        monitor.checked(loop, CheckResult(True, "ok", "7", answered=True))
        self.assertFalse(pool.isUp(loop))
        self.assertEqual(self.reactor.getDelayedCalls(), [])
