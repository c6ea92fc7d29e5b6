"""
Tests for L{etcdgw.shutdown} (the drain on SIGTERM/SIGINT) and
L{etcdgw.signals} (SIGHUP), on a memory reactor.
"""

import signal

from twisted.application.service import MultiService, Service
from twisted.internet import defer, error
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from etcdgw.endpoint import Endpoint
from etcdgw.gateway import Gateway
from etcdgw.pool import UpstreamPool
from etcdgw.proxy import GatewayFactory
from etcdgw.shutdown import DrainService
from etcdgw.signals import ReloadService
from etcdgw.tap import Options, makeService


class FakeTransport:
    def __init__(self, client):
        self.client = client
        self.aborted = False

    def abortConnection(self):
        self.aborted = True
        # As a TCP transport does: connectionLost on a later turn.
        self.client.factory.reactor.callLater(0, self.client.close)


class FakeClient:
    def __init__(self, factory):
        self.factory = factory
        self.transport = FakeTransport(self)
        factory.clientConnected(self)

    def close(self):
        self.factory.clientDisconnected(self)


class DrainServiceTests(SynchronousTestCase):
    def setUp(self):
        self.clock = MemoryReactorClock()
        self.pool = UpstreamPool([Endpoint("10.0.0.1", 2379)], self.clock)
        self.factory = GatewayFactory(self.pool, self.clock, 1.0)
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def drain(self, grace):
        service = DrainService(self.factory, self.clock, grace)
        service.startService()
        return service

    def test_nothingOpen(self):
        """
        With no connection open, stopping is immediate.
        """
        service = self.drain(5)
        self.successResultOf(service.stopService())
        self.assertEqual((service.drained, service.cut), (0, 0))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_drainedWithinGrace(self):
        """
        Connections that close within the grace period are counted as
        drained and the stop completes as soon as the last one closes.
        """
        clients = [FakeClient(self.factory) for _ in range(2)]
        service = self.drain(5)
        d = service.stopService()
        self.clock.advance(1)
        clients[0].close()
        self.assertNoResult(d)
        self.clock.advance(1)
        clients[1].close()
        self.successResultOf(d)
        self.assertEqual((service.drained, service.cut), (2, 0))
        self.assertFalse(any(c.transport.aborted for c in clients))
        [summary] = [e for e in self.events if "drained" in e]
        self.assertEqual((summary["drained"], summary["cut"]), (2, 0))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cutAfterGrace(self):
        """
        Connections still open when the grace period ends are aborted; the
        stop completes once they have closed.
        """
        lingering = FakeClient(self.factory)
        polite = FakeClient(self.factory)
        service = self.drain(5)
        d = service.stopService()
        self.clock.advance(2)
        polite.close()
        self.clock.advance(2.9)
        self.assertFalse(lingering.transport.aborted)
        self.clock.advance(0.1)
        self.assertTrue(lingering.transport.aborted)
        self.successResultOf(d)
        self.assertEqual((service.drained, service.cut), (1, 1))
        self.assertFalse(polite.transport.aborted)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_zeroGraceCutsAtOnce(self):
        """
        --shutdown-grace=0 aborts every open connection at once.
        """
        clients = [FakeClient(self.factory) for _ in range(3)]
        service = self.drain(0)
        d = service.stopService()
        self.assertTrue(all(c.transport.aborted for c in clients))
        self.clock.advance(0)
        self.successResultOf(d)
        self.assertEqual((service.drained, service.cut), (0, 3))

    def test_stuckAbortDoesNotHang(self):
        """
        A connection that never reports closed after its abort delays the
        stop by at most a second.
        """
        client = FakeClient(self.factory)
        client.transport.abortConnection = lambda: None
        service = self.drain(1)
        d = service.stopService()
        self.clock.advance(1)
        self.assertNoResult(d)
        self.clock.advance(1)
        self.successResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class StopSignalTests(SynchronousTestCase):
    def setUp(self):
        self.clock = MemoryReactorClock()
        self.clock.callFromThread = lambda f, *a: f(*a)
        pool = UpstreamPool([Endpoint("10.0.0.1", 2379)], self.clock)
        self.factory = GatewayFactory(pool, self.clock, 1.0)
        self.handlers = {}
        self.service = DrainService(self.factory, self.clock, 5, self.installSignal)

    def installSignal(self, signum, handler):
        previous = self.handlers.get(signum, "reactor's")
        self.handlers[signum] = handler
        return previous

    def test_takenOnceRunning(self):
        """
        SIGTERM and SIGINT are taken over only once the reactor runs (after
        it installs its own), and handed back once the drain is over.
        """
        self.service.startService()
        self.assertEqual(self.handlers, {})
        self.clock.run()
        self.assertEqual(
            self.handlers,
            {signal.SIGTERM: self.service._onSignal, signal.SIGINT: self.service._onSignal},
        )
        self.successResultOf(self.service.stopService())
        self.assertEqual(
            self.handlers, {signal.SIGTERM: "reactor's", signal.SIGINT: "reactor's"}
        )

    def test_signalStopsReactor(self):
        """
        The first SIGTERM stops the reactor (without recording an exit signal,
        so twistd exits 0).
        """
        self.service.startService()
        self.clock.run()
        self.handlers[signal.SIGTERM](signal.SIGTERM, None)
        self.assertTrue(self.clock.hasStopped)
        self.assertIsNone(getattr(self.clock, "_exitSignal", None))

    def test_secondSignalCutsAtOnce(self):
        """
        A second signal during the grace period cuts the open connections now.
        """
        client = FakeClient(self.factory)
        self.service.startService()
        self.clock.run()
        self.service.signalled(signal.SIGTERM)
        d = self.service.stopService()
        self.clock.advance(1)
        self.assertFalse(client.transport.aborted)
        self.service.signalled(signal.SIGINT)
        self.assertTrue(client.transport.aborted)
        self.clock.advance(0)
        self.successResultOf(d)
        self.assertEqual((self.service.drained, self.service.cut), (0, 1))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class RecordingListener(Service):
    """
    Records when it is stopped, relative to the drain.
    """

    def __init__(self, record):
        self.record = record

    def stopService(self):
        super().stopService()
        self.record.append("listener stopped")


class ShutdownOrderTests(SynchronousTestCase):
    def test_listenerStopsBeforeDrainEnds(self):
        """
        In the gateway's tree the drain is attached after the listener, so
        the listener stops in the same call that begins the drain, while
        connections are still open.
        """
        options = Options()
        options.parseOptions(["--endpoints=10.0.0.1:2379", "--listen-addr=127.0.0.1:0"])
        root = makeService(options, reactor=MemoryReactorClock())
        names = [service.name for service in root]
        self.assertLess(names.index("listener"), names.index("shutdown"))

        clock = MemoryReactorClock()
        record = []
        pool = UpstreamPool([Endpoint("10.0.0.1", 2379)], clock)
        factory = GatewayFactory(pool, clock, 1.0)
        tree = MultiService()
        RecordingListener(record).setServiceParent(tree)
        DrainService(factory, clock, 5).setServiceParent(tree)
        tree.startService()
        client = FakeClient(factory)
        d = tree.stopService()
        self.assertEqual(record, ["listener stopped"])
        self.assertNoResult(d)
        client.close()
        self.successResultOf(d)


class FakeDiscovery(Service):
    def __init__(self, result):
        self.result = result
        self.calls = 0

    def refreshNow(self):
        self.calls += 1
        return self.result


class ReloadServiceTests(SynchronousTestCase):
    def setUp(self):
        self.clock = MemoryReactorClock()
        self.a = Endpoint("10.0.0.1", 2379)
        self.b = Endpoint("10.0.0.2", 2379)
        self.pool = UpstreamPool([self.a, self.b], self.clock)
        self.pool.markDown(self.b, "refused")
        self.probes = {}
        self.gateway = Gateway(reactor=self.clock, pool=self.pool, factory=None)
        self.handlers = {}

    def probe(self, reactor, endpoint, timeout):
        d = self.probes[endpoint] = defer.Deferred()
        return d

    def installSignal(self, signum, handler):
        previous = self.handlers.get(signum, signal.SIG_DFL)
        self.handlers[signum] = handler
        return previous

    def service(self):
        return ReloadService(self.gateway, 1.0, self.probe, self.installSignal)

    def test_handlerInstalledAndRestored(self):
        """
        SIGHUP is handled while the service runs, and handed back on stop.
        """
        service = self.service()
        service.startService()
        self.assertEqual(self.handlers[signal.SIGHUP], service._onSignal)
        service.stopService()
        self.assertEqual(self.handlers[signal.SIGHUP], signal.SIG_DFL)

    def test_injectedReactorTakesNoSignal(self):
        """
        Built with an injected reactor (tests), the gateway leaves the
        process's SIGHUP handling alone, as it does SIGTERM's.
        """
        before = signal.getsignal(signal.SIGHUP)
        options = Options()
        options.parseOptions(["--endpoints=10.0.0.1:2379", "--listen-addr=127.0.0.1:0"])
        root = makeService(options, reactor=MemoryReactorClock())
        root.startService()
        self.addCleanup(root.stopService)
        self.assertIs(signal.getsignal(signal.SIGHUP), before)
        service = ReloadService(self.gateway, 1.0, self.probe)
        service.startService()
        self.assertIs(signal.getsignal(signal.SIGHUP), before)
        service.stopService()

    def test_passedOnToWorkers(self):
        """
        With --workers, each reload (even one not doubled) passes SIGHUP on
        to the workers first.
        """
        told = []

        class Workers:
            def reload(self):
                told.append(len(probes))

        probes = self.probes
        self.gateway.workers = Workers()
        service = ReloadService(self.gateway, 1.0, self.probe)
        first = service.reload()
        self.assertEqual(told, [0])
        self.assertIs(service.reload(), first)
        self.assertEqual(told, [0, 2])
        for probe in list(self.probes.values()):
            probe.callback(None)
        self.successResultOf(first)

    def test_signalReloadsInReactor(self):
        """
        The signal handler only schedules the reload in the reactor thread.
        """
        service = self.service()
        calls = []
        self.clock.callFromThread = lambda f, *a: calls.append(f)
        service._onSignal(signal.SIGHUP, None)
        self.assertEqual(calls, [service.reload])
        self.assertEqual(self.probes, {})

    def test_probesEveryEndpoint(self):
        """
        Every endpoint is probed, up or down: answers mark up, failures mark down.
        """
        service = self.service()
        d = service.reload()
        self.assertEqual(set(self.probes), {self.a, self.b})
        self.probes[self.a].errback(Failure(error.ConnectionRefusedError()))
        self.probes[self.b].callback(None)
        summary = self.successResultOf(d)
        self.assertFalse(self.pool.isUp(self.a))
        self.assertTrue(self.pool.isUp(self.b))
        self.assertEqual(
            summary, "1/2 endpoints answered; 1/2 up; no discovery (static --endpoints)"
        )

    def test_discoveryRefreshedFirst(self):
        """
        The gateway's discovery is refreshed before the probes start.
        """
        refreshing = defer.Deferred()
        discovery = self.gateway.source = FakeDiscovery(refreshing)
        d = self.service().reload()
        self.assertEqual(discovery.calls, 1)
        self.assertEqual(self.probes, {})
        refreshing.callback(None)
        for probe in list(self.probes.values()):
            probe.callback(None)
        self.assertIn("discovery refreshed", self.successResultOf(d))

    def test_discoverySummaryQuoted(self):
        """
        A discovery whose refresh describes its round has that text logged.
        """
        self.gateway.source = FakeDiscovery(defer.succeed("SRV: 3 endpoints, 1 added"))
        d = self.service().reload()
        for probe in list(self.probes.values()):
            probe.callback(None)
        self.assertTrue(self.successResultOf(d).endswith("; SRV: 3 endpoints, 1 added"))

    def test_discoveryFailureReported(self):
        """
        A failed discovery refresh is reported and the probes still run.
        """
        self.gateway.source = FakeDiscovery(defer.fail(RuntimeError("SERVFAIL")))
        d = self.service().reload()
        for probe in list(self.probes.values()):
            probe.callback(None)
        self.assertIn("discovery refresh failed: SERVFAIL", self.successResultOf(d))

    def test_notDoubled(self):
        """
        A second SIGHUP while a reload runs does not start another.
        """
        service = self.service()
        first = service.reload()
        second = service.reload()
        self.assertIs(first, second)
        self.assertEqual(len(self.probes), 2)
        for probe in list(self.probes.values()):
            probe.callback(None)
        self.successResultOf(first)
