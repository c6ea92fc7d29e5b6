"""
The monitor: evidence in, decisions into the pool, changes announced; one
monitor per pool; "usable" as status and metrics show it.
"""

import attr

from twisted.internet import defer, error
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from etcdgw.endpoint import Endpoint, parseEndpoints
from etcdgw.etcdhealth import CheckResult, ClusterIdentity, EtcdHealthService
from etcdgw.gateway import Gateway
from etcdgw.health import HealthService
from etcdgw.membership import MembershipSync
from etcdgw.metrics import GatewayCollector
from etcdgw.monitor import Change, Monitor, legacyMonitor
from etcdgw.pool import DOWN, HEALTHY, UNHEALTHY, UNKNOWN, UP, UpstreamPool
from etcdgw.proxy import GatewayFactory
from etcdgw.selfloop import SelfLoopError
from etcdgw.status import gatewayStatus
from tests.test_etcdhealth import BAD, GOOD, SILENT

A, B, C = Endpoint("a", 1), Endpoint("b", 1), Endpoint("c", 1)


class MonitorCase(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.pool = UpstreamPool([A, B, C], self.clock)
        self.monitor = Monitor(self.pool, self.clock, rise=2, fall=3)
        self.changes = []
        self.monitor.subscribe(self.changes.append)

    def state(self, endpoint):
        return self.pool.stateOf(endpoint)

    def seen(self):
        return [(str(c.endpoint), c.what, c.old, c.new) for c in self.changes]


class AnnounceTests(MonitorCase):
    def test_dialFailure(self):
        """A failed dial: the endpoint is down, the failure counted, the change announced."""
        self.monitor.dialFailed(self.state(A), Failure(error.ConnectionRefusedError()))
        self.assertEqual(self.state(A).state, DOWN)
        self.assertEqual(self.state(A).dialFailures, 1)
        self.assertEqual(self.changes, [Change(A, "state", UP, DOWN, "connection refused")])
        # A repeat decides nothing new and announces nothing.
        self.monitor.dialFailed(self.state(A), Failure(error.ConnectionRefusedError()))
        self.assertEqual(len(self.changes), 1)
        self.assertEqual(self.state(A).dialFailures, 2)

    def test_changeIsFrozen(self):
        """A change is a small immutable value."""
        self.monitor.probeFailed(A, Failure(error.ConnectionRefusedError()), "refused")
        self.assertRaises(attr.exceptions.FrozenInstanceError, setattr, self.changes[0], "new", UP)

    def test_probes(self):
        """A probe that connects marks up; one that fails marks down; each announced."""
        self.monitor.probeFailed(A, Failure(error.ConnectionRefusedError()), "SIGHUP probe: refused")
        self.monitor.probeSucceeded(A, "probe connected")
        self.assertEqual(
            self.changes,
            [
                Change(A, "state", UP, DOWN, "SIGHUP probe: refused"),
                Change(A, "state", DOWN, UP, "probe connected"),
            ],
        )

    def test_etcdChecks(self):
        """
        etcd check results: the first decides the health, then fall bad
        answers in a row; silence is announced as answering false; each
        change once.
        """
        self.monitor.checked(A, GOOD)
        self.monitor.checked(A, SILENT)
        self.monitor.checked(A, SILENT)
        self.assertEqual(self.state(A).health, HEALTHY)
        self.monitor.checked(A, SILENT)
        self.assertEqual(self.state(A).health, UNHEALTHY)
        self.assertEqual(
            self.seen(),
            [
                ("a:1", "health", UNKNOWN, HEALTHY),
                ("a:1", "proven", False, True),  # it reported the cluster ID it pinned
                ("a:1", "answering", True, False),
                ("a:1", "health", HEALTHY, UNHEALTHY),
                ("a:1", "silent", False, True),  # fall (3) checks in a row got no answer
            ],
        )
        self.assertEqual(self.changes[-2].reason, "no answer in time (3 in a row)")

    def test_refusedCheck(self):
        """An etcd check refused at connect marks down; one that gets an answer marks up."""
        self.monitor.checked(A, CheckResult(False, "connection refused", refused=True))
        self.assertEqual(self.state(A).state, DOWN)
        self.monitor.checked(A, BAD)
        self.assertEqual(self.state(A).state, UP)
        self.assertEqual(self.state(A).reason, "etcd health check answered")

    def test_identity(self):
        """A learned endpoint proving the pinned cluster ID is announced; so is a foreign one."""
        self.pool.replaceEndpoints([A, B, C, Endpoint("x", 1)], learned=True)
        for endpoint in (A, B):
            self.monitor.reportClusterID(endpoint, "7")
        self.monitor.reportClusterID(Endpoint("x", 1), "7")
        self.monitor.reportClusterID(C, "99")
        self.assertIn(("x:1", "proven", False, True), self.seen())
        self.assertIn(("c:1", "foreign", False, True), self.seen())
        self.assertTrue(self.monitor.accepts(Endpoint("x", 1)))
        self.assertFalse(self.monitor.accepts(C))

    def test_raisingSubscriber(self):
        """A subscriber that raises is logged; the others still hear of the change."""
        heard = []
        self.monitor.subscribe(lambda change: 1 / 0)
        self.monitor.subscribe(heard.append)
        self.monitor.probeFailed(A, Failure(error.ConnectionRefusedError()), "refused")
        self.assertEqual(len(heard), 1)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_unsubscribe(self):
        """An unsubscribed callback hears nothing more."""
        self.monitor.unsubscribe(self.changes.append)
        self.monitor.probeFailed(A, Failure(error.ConnectionRefusedError()), "refused")
        self.assertEqual(self.changes, [])

    def test_subscriberSeesThePoolDecided(self):
        """When a subscriber hears of a change, the pool already holds it."""
        held = []
        self.monitor.subscribe(lambda change: held.append(self.pool.isUp(change.endpoint)))
        self.monitor.probeFailed(B, Failure(error.ConnectionRefusedError()), "refused")
        self.assertEqual(held, [False])


class SelfLoopTests(MonitorCase):
    def loop(self):
        return Failure(SelfLoopError("self-loop: 127.0.0.1:23790 is the gateway's own"))

    def test_etcdAnswerDoesNotBringBackALoop(self):
        """
        An endpoint found to reach the gateway itself is not marked up by an
        etcd check that got an answer (through the gateway, from another
        member); a probe that connects elsewhere brings it back.
        """
        self.monitor.dialFailed(self.state(A), self.loop())
        self.assertTrue(self.state(A).reason.startswith("self-loop: "))
        self.monitor.checked(A, GOOD)
        self.assertEqual(self.state(A).state, DOWN)
        self.monitor.probeSucceeded(A, "probe connected")
        self.assertEqual(self.state(A).state, UP)
        self.monitor.probeFailed(A, Failure(error.ConnectionRefusedError()), "refused")
        self.monitor.checked(A, GOOD)
        self.assertEqual(self.state(A).state, UP)

    def test_probeLoop(self):
        """A probe that reached the gateway itself keeps etcd answers from marking it up too."""
        self.monitor.probeFailed(A, self.loop(), "self-loop: ...")
        self.monitor.checked(A, GOOD)
        self.assertEqual(self.state(A).state, DOWN)

    def test_dialSuccessEndsTheLoop(self):
        """A dial that connected past the guard ends the self-loop mark (not the down state)."""
        self.monitor.dialFailed(self.state(A), self.loop())
        self.monitor.dialSucceeded(self.state(A))
        self.assertEqual(self.state(A).state, DOWN)
        self.monitor.checked(A, GOOD)
        self.assertEqual(self.state(A).state, UP)

    def test_removedForgotten(self):
        """An endpoint removed from the pool is forgotten: its counts and its loop mark."""
        self.monitor.dialFailed(self.state(A), self.loop())
        self.monitor.checked(B, GOOD)
        self.pool.replaceEndpoints([C])
        self.assertEqual((self.monitor._tracks, self.monitor._looping), ({}, set()))
        self.pool.replaceEndpoints([A, C])
        self.monitor.checked(A, GOOD)
        self.assertEqual(self.state(A).state, UP)


class OneMonitorTests(SynchronousTestCase):
    def test_oneMonitorPerPool(self):
        """A pool has one monitor: a second one is refused."""
        pool = UpstreamPool([A], Clock())
        Monitor(pool, pool.clock)
        self.assertRaises(ValueError, Monitor, pool, pool.clock)

    def test_oldWiringSharesOneMonitor(self):
        """
        The old wiring's constructors (no monitor given) all use the pool's
        one monitor, which takes the etcd checks' rise and fall.
        """
        reactor = MemoryReactorClock()
        pool = UpstreamPool([A, B], reactor)
        identity = ClusterIdentity(pool)
        factory = GatewayFactory(pool, reactor, 1.0)
        health = HealthService(pool, reactor, 60, 1)
        checks = EtcdHealthService(
            pool, reactor, 5, lambda e: defer.succeed(GOOD), rise=4, fall=5, identity=identity
        )
        sync = MembershipSync(pool, reactor, 30, client=None, identity=identity)
        monitor = legacyMonitor(pool)
        for user in (factory, health, checks, sync):
            self.assertIs(user.monitor, monitor)
        self.assertIs(identity, monitor.identity)
        self.assertEqual((monitor.rise, monitor.fall, checks.fall), (4, 5, 5))

    def test_legacyFindsTheGivenMonitor(self):
        """A constructor given no monitor finds the pool's, when one was made."""
        pool = UpstreamPool([A], Clock())
        monitor = Monitor(pool, pool.clock)
        self.assertIs(GatewayFactory(pool, pool.clock, 1.0).monitor, monitor)

    def test_riseFallAreTheMonitors(self):
        """Given a monitor, the etcd checks take no rise/fall, nor another identity."""
        pool = UpstreamPool([A], Clock())
        monitor = Monitor(pool, pool.clock)
        other = Monitor(UpstreamPool([A], Clock()), Clock())
        probe = lambda e: defer.succeed(GOOD)
        self.assertRaises(
            TypeError, EtcdHealthService, pool, pool.clock, 5, probe, rise=2, monitor=monitor
        )
        self.assertRaises(
            ValueError, EtcdHealthService, pool, pool.clock, 5, probe,
            identity=other.identity, monitor=monitor,
        )
        self.assertRaises(
            ValueError, MembershipSync, pool, pool.clock, 5, None,
            identity=other.identity, monitor=monitor,
        )


class UsableTests(SynchronousTestCase):
    """
    "usable" is defined once (EndpointState) and read as such by the status
    page and metrics.
    """

    def setUp(self):
        self.clock = Clock()
        self.pool = UpstreamPool(parseEndpoints("a:1,b:1"), self.clock)
        self.monitor = Monitor(self.pool, self.clock)
        self.factory = GatewayFactory(self.pool, self.clock, 1.0, monitor=self.monitor)
        self.x = Endpoint("x", 1)
        self.pool.replaceEndpoints(self.pool.endpoints + [self.x], learned=True)

    def shown(self):
        status = {e["endpoint"]: e["usable"] for e in gatewayStatus(self.pool, self.factory, self.clock)["endpoints"]}
        metrics = {}
        gateway = Gateway(reactor=self.clock, pool=self.pool, factory=self.factory)
        for family in GatewayCollector(gateway).collect():
            if family.name == "etcd_gateway_endpoint_usable":
                metrics = {s.labels["endpoint"]: s.value for s in family.samples}
        return status, metrics

    def test_learnedNotProvenIsNotUsable(self):
        """A learned endpoint not yet proven shows as not usable, in status and metrics."""
        status, metrics = self.shown()
        self.assertEqual(status, {"a:1": True, "b:1": True, "x:1": False})
        self.assertEqual(metrics, {"a:1": 1, "b:1": 1, "x:1": 0})
        self.assertEqual([s.endpoint for s in self.pool.usable()], [A, B])

    def test_provenIsUsable(self):
        """Once it reported the pinned cluster ID, it is usable everywhere."""
        self.monitor.reportClusterID(A, "7")
        self.monitor.reportClusterID(self.x, "7")
        status, metrics = self.shown()
        self.assertEqual(status["x:1"], True)
        self.assertEqual(metrics["x:1"], 1)
        self.assertIn(self.x, [s.endpoint for s in self.pool.usable()])

    def test_eligibleAndUsable(self):
        """Eligible: up and trusted; usable: eligible and not unhealthy."""
        state = self.pool.stateOf(A)
        self.assertEqual((state.eligible, state.usable), (True, True))
        self.monitor.checked(A, SILENT)
        self.assertEqual((state.eligible, state.usable), (True, False))
        self.monitor.checked(A, CheckResult(False, "refused", refused=True))
        self.assertEqual((state.eligible, state.usable), (False, False))
        unproven = self.pool.stateOf(self.x)
        self.assertEqual((unproven.up, unproven.eligible, unproven.usable), (True, False, False))


    def test_silentShown(self):
        """A silent endpoint shows as not usable and silent, in status and metrics; a slow one as slow."""
        for _ in range(self.monitor.fall):
            self.monitor.unanswered(A, "no answer in 500ms")
            self.monitor.unanswered(B, "no answer in 500ms")
        status, metrics = self.shown()
        self.assertEqual((status["a:1"], metrics["a:1"]), (False, 0))
        self.assertEqual((status["b:1"], metrics["b:1"]), (True, 1))
        gateway = Gateway(reactor=self.clock, pool=self.pool, factory=self.factory)
        families = {
            f.name: {s.labels["endpoint"]: s.value for s in f.samples}
            for f in GatewayCollector(gateway).collect()
            if f.samples and "endpoint" in f.samples[0].labels
        }
        self.assertEqual(families["etcd_gateway_endpoint_silent"], {"a:1": 1, "b:1": 0, "x:1": 0})
        self.assertEqual(
            families["etcd_gateway_endpoint_answering_slowly"], {"a:1": 0, "b:1": 1, "x:1": 0}
        )


class SilenceTests(MonitorCase):
    """
    Answer evidence: fall misses in a row make an endpoint that is up
    silent, rise answers answering again; the cap on silent ones.
    """

    def miss(self, endpoint, times=1):
        for _ in range(times):
            self.monitor.unanswered(endpoint, "no answer in 500ms")

    def test_fallMakesSilent(self):
        """
        fall (3) misses in a row: silent, announced once, no longer usable;
        an answer between misses starts the count over.
        """
        self.miss(A, 2)
        self.monitor.answered(A, "HTTP/1.1 200 OK")
        self.miss(A, 2)
        self.assertFalse(self.state(A).silent)
        self.assertTrue(self.monitor.changing(A))
        self.miss(A)
        self.assertTrue(self.state(A).silent)
        self.assertFalse(self.monitor.changing(A))
        self.assertFalse(self.state(A).usable)
        self.assertEqual(
            self.changes,
            [
                Change(
                    A, "silent", False, True,
                    "no answer to 3 probes in a row (no answer in 500ms)",
                )
            ],
        )
        self.miss(A, 5)
        self.assertEqual(len(self.changes), 1)

    def test_riseEndsSilence(self):
        """rise (2) answers in a row end it; one answer alone does not."""
        self.miss(A, 3)
        self.monitor.answered(A, "HTTP/1.1 200 OK")
        self.assertTrue(self.state(A).silent)
        self.assertTrue(self.monitor.changing(A))
        self.monitor.answered(A, "HTTP/1.1 200 OK")
        self.assertFalse(self.state(A).silent)
        self.assertEqual(self.seen()[-1], ("a:1", "silent", True, False))
        self.assertEqual(self.changes[-1].reason, "answers again (HTTP/1.1 200 OK)")

    def test_answerMarksUp(self):
        """An answer from an endpoint that is down marks it up (it answered, not just connected)."""
        self.monitor.probeFailed(A, Failure(error.ConnectionRefusedError()), "refused")
        self.monitor.answered(A, "HTTP/1.1 200 OK")
        self.assertEqual(self.state(A).state, UP)
        self.assertEqual(self.state(A).reason, "answered: HTTP/1.1 200 OK")

    def test_reachableAgain(self):
        """
        A down endpoint that accepts a probe's connection again is up and
        silent until rise answers; a self-loop is not brought back so.
        """
        self.monitor.probeFailed(A, Failure(error.ConnectionRefusedError()), "refused")
        self.monitor.reachable(A, "the answer probe connected")
        self.assertEqual((self.state(A).state, self.state(A).silent), (UP, True))
        self.monitor.answered(A, "ok")
        self.assertTrue(self.state(A).silent)
        self.monitor.answered(A, "ok")
        self.assertFalse(self.state(A).silent)
        loop = Failure(SelfLoopError("self-loop: 127.0.0.1:23790 is the gateway's own"))
        self.monitor.probeFailed(B, loop, "self-loop")
        self.monitor.reachable(B, "the answer probe connected")
        self.assertEqual(self.state(B).state, DOWN)

    def test_downIsNotSilent(self):
        """A silent endpoint that goes down is down, not silent; misses of a down one decide nothing."""
        self.miss(A, 3)
        self.monitor.probeFailed(A, Failure(error.ConnectionRefusedError()), "refused")
        self.assertEqual((self.state(A).state, self.state(A).silent), (DOWN, False))
        self.miss(A, 3)
        self.assertFalse(self.state(A).silent)

    def test_capOfThree(self):
        """
        Of three endpoints, one may be silent (50%, rounded down, at least
        one): the second to turn quiet answers slowly, usable, announced as
        slow and never as silent; it is silent once the first answers again.
        """
        self.miss(A, 3)
        self.miss(B, 3)
        self.assertEqual((self.state(A).silent, self.state(B).silent), (True, False))
        self.assertEqual((self.state(B).slow, self.state(B).usable), (True, True))
        self.assertNotIn(("b:1", "silent", False, True), self.seen())
        self.assertIn(("b:1", "slow", False, True), self.seen())
        self.monitor.answered(A, "ok")
        self.monitor.answered(A, "ok")
        self.assertEqual((self.state(A).silent, self.state(B).silent), (False, True))
        self.assertEqual(
            self.seen()[-3:],
            [("a:1", "silent", True, False), ("b:1", "silent", False, True),
             ("b:1", "slow", True, False)],
        )

    def test_downDoesNotCount(self):
        """Endpoints that are down do not count against the cap."""
        self.monitor.probeFailed(A, Failure(error.ConnectionRefusedError()), "refused")
        self.miss(B, 3)
        self.assertTrue(self.state(B).silent)

    def test_capFollowsTheEndpoints(self):
        """The cap follows the number of endpoints: 2 of 5, 1 of 2; a percentage flag."""
        from etcdgw.monitor import silentCap

        self.assertEqual(
            [silentCap(50, n) for n in (1, 2, 3, 4, 5, 7)], [1, 1, 1, 2, 2, 3]
        )
        self.assertEqual([silentCap(0, 5), silentCap(100, 5), silentCap(34, 3)], [1, 5, 1])
        D, E = Endpoint("d", 1), Endpoint("e", 1)
        self.pool.replaceEndpoints([A, B, C, D, E])
        for endpoint in (A, B, C):
            self.miss(endpoint, 3)
        self.assertEqual([s.silent for s in self.pool.states()], [True, True, False, False, False])
        self.assertTrue(self.state(C).slow)
        self.pool.replaceEndpoints([A, B, C])
        self.assertEqual([s.silent for s in self.pool.states()], [True, False, False])
        self.assertEqual([s.slow for s in self.pool.states()], [False, True, True])

    def test_etcdChecksAreEvidence(self):
        """
        An etcd check without an answer is a miss, one with any answer (503
        included) an answer; one refused at connect is neither (down).
        """
        for _ in range(3):
            self.monitor.checked(A, SILENT)
        self.assertTrue(self.state(A).silent)
        self.monitor.checked(A, BAD)
        self.monitor.checked(A, BAD)
        self.assertFalse(self.state(A).silent)
        self.monitor.checked(B, CheckResult(False, "connection refused", refused=True))
        self.assertEqual(self.monitor.changing(B), False)

    def test_removedForgotten(self):
        """An endpoint removed and added again starts over."""
        self.miss(A, 2)
        self.pool.replaceEndpoints([B, C])
        self.pool.replaceEndpoints([A, B, C])
        self.miss(A)
        self.assertFalse(self.state(A).silent)


class HintTests(MonitorCase):
    def test_hintAsksForAProbe(self):
        """A hint is handed to the hint handlers (the answer probes); it decides nothing."""
        hinted = []
        self.monitor.onHint(hinted.append)
        self.monitor.hint(A)
        self.assertEqual(hinted, [A])
        self.assertEqual(self.changes, [])

    def test_raisingHandler(self):
        """A hint handler that raises is logged; the others are still called."""
        hinted = []
        self.monitor.onHint(lambda endpoint: 1 / 0)
        self.monitor.onHint(hinted.append)
        self.monitor.hint(A)
        self.assertEqual(hinted, [A])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
