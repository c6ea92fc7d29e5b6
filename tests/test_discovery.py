"""
Tests for L{etcdgw.discovery}: the round at start, and the service that
schedules rounds and merges them into the pool, on a MemoryReactorClock
with rounds answered by the test.
"""

from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.python import failure, usage
from twisted.trial.unittest import SynchronousTestCase

from etcdgw.discovery import DiscoveryService, discoverAtStart
from etcdgw.endpoint import Endpoint
from etcdgw.pool import UpstreamPool
from etcdgw.srv import (
    MIN_REFRESH,
    PLAIN_REFUSED,
    DiscoveredEndpoint,
    DiscoveryConfig,
    DiscoveryError,
    DiscoveryResult,
    SRVRecord,
)
from etcdgw.srvround import LookupFailed, discover
from tests.srvzone import PLAIN, SSL, FakeResolver, FakeValidator, zone


class StartTests(SynchronousTestCase):
    def test_nothingUsable(self):
        """
        Nothing usable and no explicit --endpoints: an error saying what was
        found and why it was refused.
        """
        e = self.assertRaises(
            DiscoveryError,
            discoverAtStart,
            DiscoveryConfig("etcd.test"),
            None,
            FakeResolver(zone(plain=[(0, 0, 2379, "m1.etcd.test.")])),
            FakeValidator(),
        )
        message = str(e)
        self.assertIn("--discovery-srv=etcd.test: no usable endpoint found", message)
        self.assertIn(f"{SSL}: no records", message)
        self.assertIn(f"{PLAIN}: 1 record", message)
        self.assertIn(f"m1.etcd.test:2379 refused: {PLAIN_REFUSED}", message)
        self.assertNotIn("\n", message)

    def test_fallback(self):
        """
        Nothing usable with an explicit --endpoints: those, logged at error level.
        """
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        fallback = [Endpoint("10.0.0.1", 2379)]
        endpoints, result = discoverAtStart(
            DiscoveryConfig("etcd.test"), fallback, FakeResolver({}), FakeValidator()
        )
        self.assertEqual(endpoints, fallback)
        errors = [e for e in events if e["log_level"].name == "error"]
        self.assertEqual(len(errors), 1)
        self.assertEqual(errors[0]["endpoints"], ["10.0.0.1:2379"])

    def test_dnsFailure(self):
        """
        DNS failure at start is an error with the DNS error, even with a fallback.
        """
        resolver = FakeResolver({
            (SSL, "SRV"): LookupFailed("SRV look-up of A failed: timed out"),
            (PLAIN, "SRV"): LookupFailed("SRV look-up of B failed: timed out"),
        })
        e = self.assertRaises(
            DiscoveryError, discoverAtStart, DiscoveryConfig("etcd.test"),
            [Endpoint("10.0.0.1", 2379)], resolver, FakeValidator(),
        )
        self.assertIn("DNS look-up failed: SRV look-up of A failed: timed out", str(e))

    def test_badRecordDoesNotStopStart(self):
        """
        A record whose proof raises does not stop the start: the good one is used.
        """
        endpoints, result = discoverAtStart(
            DiscoveryConfig("etcd.test"), None,
            FakeResolver(zone(ssl=[(0, 0, 2379, "bad.etcd.test."), (0, 0, 2379, "m1.etcd.test.")])),
            FakeValidator(raises={"bad.etcd.test": ValueError("Invalid DNS-ID.")}),
        )
        self.assertEqual([e.name for e in endpoints], ["m1.etcd.test"])
        self.assertIn("Invalid DNS-ID.", result.describe())

    def test_oneNameRefusedNamesRealReason(self):
        """
        One name REFUSED and the other's plain records refused without
        --insecure-discovery: the error says so, not only that DNS failed.
        """
        records = zone(plain=[(0, 0, 2379, "m1.etcd.test.")])
        records[(SSL, "SRV")] = LookupFailed(f"SRV look-up of {SSL} failed: no server answered: REFUSED")
        e = self.assertRaises(
            DiscoveryError, discoverAtStart, DiscoveryConfig("etcd.test"), None,
            FakeResolver(records), FakeValidator(),
        )
        message = str(e)
        self.assertIn("no usable endpoint found", message)
        self.assertIn(f"m1.etcd.test:2379 refused: {PLAIN_REFUSED}", message)
        self.assertIn("REFUSED", message)
        self.assertNotIn("\n", message)

    def test_oneNameRefusedOtherUsed(self):
        """
        One name REFUSED: the other's records start the gateway.
        """
        records = zone(plain=[(0, 0, 2379, "m1.etcd.test.")])
        records[(SSL, "SRV")] = LookupFailed(f"SRV look-up of {SSL} failed: REFUSED")
        endpoints, result = discoverAtStart(
            DiscoveryConfig("etcd.test", insecure=True), None, FakeResolver(records), FakeValidator()
        )
        self.assertEqual([e.name for e in endpoints], ["m1.etcd.test"])

    def test_fallbackKept(self):
        """
        The start result carries the explicit --endpoints, for the service.
        """
        fallback = [Endpoint("10.0.0.1", 2379)]
        _, result = discoverAtStart(
            DiscoveryConfig("etcd.test"), fallback,
            FakeResolver(zone(ssl=[(0, 0, 2379, "m1.etcd.test.")])), FakeValidator(),
        )
        self.assertEqual(result.fallback, tuple(fallback))


def ep(n, priority=0, weight=0):
    return DiscoveredEndpoint(f"127.0.0.{n}", 2379, priority, weight, True,
                              name=f"m{n}.etcd.test", verified=True)


def plain(n, priority=0, weight=0):
    return DiscoveredEndpoint(f"127.0.0.{n}", 2379, priority, weight, False,
                              name=f"p{n}.etcd.test", verified=False)


def record(n, priority=0, weight=0, tls=True):
    return SRVRecord(SSL if tls else PLAIN, tls, f"m{n}.etcd.test", 2379, priority, weight, 60)


class _Rounds:
    """
    A service on a MemoryReactorClock whose rounds the test answers.
    """

    def setUp(self):
        self.clock = MemoryReactorClock()
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.rounds = []

    def runRound(self, f, *args, **kwargs):
        d = defer.Deferred()
        self.rounds.append((kwargs.get("known"), d))
        return d

    def makeService(self, first, config=None):
        self.pool = UpstreamPool(list(first.endpoints), self.clock)
        service = DiscoveryService(
            self.pool, self.clock, config or DiscoveryConfig("etcd.test"), first,
            discover=lambda *a, **k: None, runInThread=self.runRound,
        )
        service.startService()
        self.addCleanup(self.assertEqual, self.clock.getDelayedCalls(), [])
        self.addCleanup(service.stopService)
        return service

    def answer(self, result):
        _, d = self.rounds[-1]
        d.callback(result)

    def messages(self, text):
        from twisted.logger import formatEvent
        return [formatEvent(e) for e in self.events if text in formatEvent(e)]


class ServiceTests(_Rounds, SynchronousTestCase):
    """
    The refresh loop and the merge, on a MemoryReactorClock, with rounds
    answered by the test.
    """

    def test_refreshAtTTL(self):
        """
        The next round starts after the clamped TTL, not before.
        """
        self.makeService(DiscoveryResult(endpoints=(ep(1),), records=("r",), ttl=1))
        self.clock.advance(MIN_REFRESH - 0.1)
        self.assertEqual(self.rounds, [])
        self.clock.advance(0.1)
        self.assertEqual(len(self.rounds), 1)
        self.assertEqual(self.rounds[0][0], frozenset({ep(1).identity}))
        self.answer(DiscoveryResult(endpoints=(ep(1),), records=("r",), ttl=60))
        self.clock.advance(59)
        self.assertEqual(len(self.rounds), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.rounds), 2)
        self.answer(DiscoveryResult(endpoints=(ep(1),), records=("r",), ttl=60))

    def test_merge(self):
        """
        Added and removed endpoints reach the pool as one log line; an
        endpoint that left keeps its open connections' state object.
        """
        service = self.makeService(DiscoveryResult(endpoints=(ep(1), ep(2)), records=("r",), ttl=10))
        state1 = self.pool.stateOf(ep(1))
        state1.active = 3
        service.refresh()
        self.answer(DiscoveryResult(endpoints=(ep(2), ep(3)), records=("r",), ttl=10))
        self.assertEqual(self.pool.endpoints, [ep(2), ep(3)])
        self.assertEqual(state1.active, 3)
        lines = self.messages("endpoints changed")
        self.assertEqual(len(lines), 1)
        self.assertIn("added ['m3.etcd.test:2379 (127.0.0.3)']", lines[0])
        self.assertIn("removed ['m1.etcd.test:2379 (127.0.0.1)']", lines[0])

    def test_prioritiesSwapped(self):
        """
        Changed priorities are taken by the pool and logged.
        """
        service = self.makeService(
            DiscoveryResult(endpoints=(ep(1, priority=0), ep(2, priority=1)), records=("r",), ttl=10)
        )
        service.refresh()
        self.answer(DiscoveryResult(endpoints=(ep(1, priority=1), ep(2, priority=0)), records=("r",), ttl=10))
        self.assertEqual([e.priority for e in self.pool.endpoints], [1, 0])
        self.assertEqual(self.pool.pick().endpoint.name, "m2.etcd.test")
        self.assertEqual(len(self.messages("SRV records changed")), 1)

    def test_reverifiedPeriodically(self):
        """
        A proven endpoint is accepted without a handshake until it was proven
        reverifyAfter ago; then the next round proves it again, and a
        successful proof counts from then.
        """
        service = self.makeService(
            DiscoveryResult(endpoints=(ep(1), ep(2)), records=("r",), ttl=60)
        )
        both = frozenset({ep(1).identity, ep(2).identity})
        for _ in range(4):  # rounds at 60, 120, 180 and 240 s
            self.clock.advance(60)
            self.assertEqual(self.rounds[-1][0], both)
            self.answer(DiscoveryResult(endpoints=(ep(1), ep(2)), records=("r",), ttl=60))
        self.clock.advance(60)  # 300 s: both are due
        self.assertEqual(self.rounds[-1][0], frozenset())
        self.answer(DiscoveryResult(endpoints=(ep(1), ep(2)), records=("r",), ttl=60))
        self.clock.advance(60)
        self.assertEqual(self.rounds[-1][0], both)
        self.answer(DiscoveryResult(endpoints=(ep(1), ep(2)), records=("r",), ttl=60))
        self.assertEqual(service.reverifyAfter, 300)

    def test_failedReverificationRemoves(self):
        """
        An endpoint whose new proof fails (its certificate changed) is taken
        out of the pool, with the refusal and the change logged.
        """
        service = self.makeService(
            DiscoveryResult(endpoints=(ep(1), ep(2)), records=("r",), ttl=60)
        )
        self.clock.advance(service.reverifyAfter)  # the first round runs at 300 s
        self.assertEqual(self.rounds[-1][0], frozenset())
        refused = ((f"{SSL} m2.etcd.test:2379", "certificate verify failed: rogue"),)
        self.answer(
            DiscoveryResult(endpoints=(ep(1),), records=("r",), refused=refused, ttl=60)
        )
        self.assertEqual(self.pool.endpoints, [ep(1)])
        self.assertEqual(len(self.messages("certificate verify failed: rogue")), 1)
        self.assertEqual(len(self.messages("removed ['m2.etcd.test:2379 (127.0.0.2)']")), 1)
        # The survivor was proven again in that round.
        self.clock.advance(60)
        self.assertEqual(self.rounds[-1][0], frozenset({ep(1).identity}))
        self.answer(DiscoveryResult(endpoints=(ep(1),), records=("r",), ttl=60))

    def test_dnsFailureKeeps(self):
        """
        A failed round keeps the last good set, logged, and retries at 5s.
        """
        service = self.makeService(DiscoveryResult(endpoints=(ep(1),), records=("r",), ttl=60))
        service.refresh()
        self.answer(DiscoveryResult(errors=((SSL, "SRV look-up failed: timed out"),)))
        self.assertEqual(self.pool.endpoints, [ep(1)])
        self.assertEqual(len(self.messages("keeping the last good set of 1")), 1)
        self.clock.advance(MIN_REFRESH)
        self.assertEqual(len(self.rounds), 2)
        self.answer(DiscoveryResult(endpoints=(ep(1),), records=("r",), ttl=60))

    def test_emptyKeeps(self):
        """
        An empty answer keeps the last good set.
        """
        service = self.makeService(DiscoveryResult(endpoints=(ep(1),), records=("r",), ttl=60))
        service.refresh()
        self.answer(DiscoveryResult(lookups=((SSL, "no records"),)))
        self.assertEqual(self.pool.endpoints, [ep(1)])
        self.assertEqual(len(self.messages("found no usable endpoint")), 1)

    def test_refusalLoggedOnce(self):
        """
        A refused endpoint is logged when first refused (or for a new reason),
        not at every round, and is retried at every round.
        """
        refused = ((f"{SSL} rogue:2379", "certificate verify failed: x"),)
        service = self.makeService(
            DiscoveryResult(endpoints=(ep(1),), records=("r",), refused=refused, ttl=60)
        )
        for _ in range(3):
            service.refresh()
            self.answer(DiscoveryResult(endpoints=(ep(1),), records=("r",), refused=refused, ttl=60))
        self.assertEqual(len(self.messages("rogue:2379 refused")), 1)
        self.assertEqual(len(self.rounds), 3)

    def test_failedRoundSurvives(self):
        """
        An exception in a round is logged and the loop goes on.
        """
        service = self.makeService(DiscoveryResult(endpoints=(ep(1),), records=("r",), ttl=60))
        service.refresh()
        self.rounds[-1][1].errback(RuntimeError("boom"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.clock.advance(MIN_REFRESH)
        self.assertEqual(len(self.rounds), 2)
        self.answer(DiscoveryResult(endpoints=(ep(1),), records=("r",), ttl=60))

    def test_refreshNowSummary(self):
        """
        refreshNow (SIGHUP) fires with a one-line summary; failures are counted.
        """
        service = self.makeService(DiscoveryResult(endpoints=(ep(1),), records=("r",), ttl=60))
        d = service.refreshNow()
        self.answer(DiscoveryResult(endpoints=(ep(1), ep(2)), records=("r",), ttl=60))
        self.assertEqual(
            self.successResultOf(d), "SRV discovery: 2 endpoints, 1 added, 0 removed"
        )
        d = service.refreshNow()
        self.answer(DiscoveryResult(errors=((SSL, "SRV look-up failed: timed out"),)))
        self.assertEqual(
            self.successResultOf(d),
            "SRV discovery: look-up failed (SRV look-up failed: timed out); kept 2 endpoints",
        )
        self.assertEqual((service.rounds, service.failures), (2, 1))
        self.clock.advance(MIN_REFRESH)
        self.answer(DiscoveryResult(endpoints=(ep(1),), records=("r",), ttl=60))

    def test_refreshOff(self):
        """
        --discovery-refresh=0: no round is ever scheduled.
        """
        self.makeService(
            DiscoveryResult(endpoints=(ep(1),), records=("r",), ttl=1),
            DiscoveryConfig("etcd.test", refresh=0),
        )
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stopDuringRound(self):
        """
        A round that ends after stopService changes nothing and schedules nothing.
        """
        service = self.makeService(DiscoveryResult(endpoints=(ep(1),), records=("r",), ttl=60))
        service.refresh()
        service.stopService()
        self.answer(DiscoveryResult(endpoints=(ep(2),), records=("r",), ttl=60))
        self.assertEqual(self.pool.endpoints, [ep(1)])

    def test_fallbackReplaced(self):
        """
        Static fallback endpoints are replaced once discovery finds some.
        """
        self.pool = None
        first = DiscoveryResult(lookups=((SSL, "no records"),))
        pool = UpstreamPool([Endpoint("10.0.0.1", 2379)], self.clock)
        service = DiscoveryService(pool, self.clock, DiscoveryConfig("etcd.test"), first,
                                   discover=None, runInThread=self.runRound)
        service.startService()
        self.addCleanup(service.stopService)
        self.clock.advance(MIN_REFRESH)
        self.answer(DiscoveryResult(endpoints=(ep(1),), records=("r",), ttl=60))
        self.assertEqual(pool.endpoints, [ep(1)])
        self.assertEqual(len(self.messages("proved endpoints again")), 1)
        service.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])


    def test_allReverificationsFailRemoves(self):
        """
        Issue 11 item 16: when every endpoint fails its new proof, they are
        removed (fail closed), logged once at error level saying new clients
        are closed; the next look-up comes at the lower bound, and a proof
        brings the endpoint back.
        """
        service = self.makeService(DiscoveryResult(endpoints=(ep(1),), records=("r",), ttl=60))
        self.clock.advance(service.reverifyAfter)
        self.assertEqual(self.rounds[-1][0], frozenset())
        refused = ((f"{SSL} m1.etcd.test:2379", "certificate verify failed: rogue"),)
        self.answer(DiscoveryResult(records=("r",), refused=refused, lookups=((SSL, "1 record"),), ttl=60))
        self.assertEqual(self.pool.endpoints, [])
        self.assertIsNone(self.pool.pick())
        errors = [e for e in self.events if e["log_level"].name == "error"
                  and "proved no endpoint" in e["log_format"]]
        self.assertEqual(len(errors), 1)
        self.assertEqual(errors[0]["removed"], ["m1.etcd.test:2379 (127.0.0.1)"])
        self.assertIn("new clients are closed", errors[0]["log_format"])
        self.assertEqual(service.failures, 1)
        # Again refused at the next look-up, 5 s later: no second error line.
        self.clock.advance(MIN_REFRESH)
        self.assertEqual(len(self.rounds), 2)
        self.answer(DiscoveryResult(records=("r",), refused=refused, lookups=((SSL, "1 record"),), ttl=60))
        self.assertEqual(len(self.messages("proved no endpoint")), 1)
        # Fixed: proven again and back in the pool.
        self.clock.advance(MIN_REFRESH)
        self.answer(DiscoveryResult(endpoints=(ep(1),), records=("r",), ttl=60))
        self.assertEqual(self.pool.endpoints, [ep(1)])
        self.assertEqual(len(self.messages("proved endpoints again")), 1)

    def test_rogueCertificateEndToEnd(self):
        """
        Through the real discover(): the only member's certificate is replaced
        by a rogue one; its re-proof fails and it gets no new client.
        """
        validator = FakeValidator()
        resolver = FakeResolver(zone(ssl=[(0, 0, 2379, "m1.etcd.test.")], ttl=60))
        config = DiscoveryConfig("etcd.test")
        first = discover(config, resolver, validator)
        self.pool = UpstreamPool(list(first.endpoints), self.clock)
        service = DiscoveryService(
            self.pool, self.clock, config, first,
            discover=lambda config, known: discover(config, resolver, validator, known),
            runInThread=lambda f, *a, **k: defer.maybeDeferred(f, *a, **k),
        )
        service.startService()
        self.addCleanup(service.stopService)
        validator.refuse["m1.etcd.test"] = "certificate verify failed: rogue"
        self.clock.advance(service.reverifyAfter - 60)
        self.assertEqual(self.pool.endpoints, [ep(1)])  # accepted as known, no handshake
        self.clock.advance(60)
        self.assertEqual(self.pool.endpoints, [])
        self.assertIsNone(self.pool.pick())
        self.assertEqual(len(validator.calls), 2)
        service.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_nothingProvenUsesFallback(self):
        """
        Nothing proven with an explicit --endpoints: the pool becomes those,
        logged at error level.
        """
        fallback = (Endpoint("10.0.0.1", 2379),)
        first = DiscoveryResult(endpoints=(ep(1),), records=("r",), ttl=60, fallback=fallback)
        service = self.makeService(first)
        service.refresh()
        self.answer(DiscoveryResult(records=("r",), refused=((f"{SSL} m1.etcd.test:2379", "rogue"),), ttl=60))
        self.assertEqual(self.pool.endpoints, list(fallback))
        self.assertIn("new clients go to --endpoints ['10.0.0.1:2379']",
                      self.messages("proved no endpoint")[0])
        self.clock.advance(MIN_REFRESH)
        self.answer(DiscoveryResult(endpoints=(ep(2),), records=("r",), ttl=60))
        self.assertEqual(self.pool.endpoints, [ep(2)])

    def test_unresolvedTargetKept(self):
        """
        An endpoint whose target's address look-up failed is kept as last
        found (with the record's new priority); one whose proof failed is not.
        """
        self.makeService(DiscoveryResult(endpoints=(ep(1), ep(2), ep(3)), records=("r",), ttl=60))
        self.clock.advance(60)
        self.answer(DiscoveryResult(
            endpoints=(ep(1),), records=(record(1), record(2, priority=5), record(3)),
            unresolved=(record(2, priority=5),),
            refused=((f"{SSL} m2.etcd.test:2379", "A look-up failed: timed out"),
                     (f"{SSL} m3.etcd.test:2379", "certificate verify failed: rogue")),
            ttl=60,
        ))
        self.assertEqual(self.pool.endpoints, [ep(1), ep(2, priority=5)])

    def test_oneNameFailsOtherUsed(self):
        """
        Issue 11 item 17: one name's look-up fails (REFUSED) and the other
        answers: the failed name's endpoints are kept, the other's answer is
        used, the round follows the TTL, and the failure is logged once (and
        its end once).
        """
        self.makeService(DiscoveryResult(endpoints=(ep(1), plain(2)), records=("r",), ttl=60))
        refusedSSL = ((SSL, f"SRV look-up of {SSL} failed: no server answered: REFUSED"),)
        for n in (3, 4):
            self.clock.advance(60)
            self.answer(DiscoveryResult(
                endpoints=(plain(n),), records=(record(n, tls=False),),
                lookups=((PLAIN, "1 record"),), errors=refusedSSL, ttl=60,
            ))
            self.assertEqual(self.pool.endpoints, [plain(n), ep(1)])
        self.assertEqual(len(self.messages("keeping its last good endpoints")), 1)
        self.clock.advance(60)  # the TTL, not the 5 s of a failed round
        self.assertEqual(len(self.rounds), 3)
        self.answer(DiscoveryResult(
            endpoints=(ep(1), plain(4)), records=(record(1), record(4, tls=False)),
            lookups=((SSL, "1 record"), (PLAIN, "1 record")), ttl=60,
        ))
        self.assertEqual(len(self.messages("answers again")), 1)

    def test_refreshGivesEachCallerItsOwnDeferred(self):
        """
        Issue 11 item 19: two callers during one round get two Deferreds; what
        one caller's callbacks do is not seen by the other or the round.
        """
        service = self.makeService(DiscoveryResult(endpoints=(ep(1),), records=("r",), ttl=60))
        first = service.refresh()
        first.addCallback(lambda _: 1 / 0)
        second = service.refresh()
        self.assertIsNot(first, second)
        self.assertEqual(len(self.rounds), 1)
        self.answer(DiscoveryResult(endpoints=(ep(1), ep(2)), records=("r",), ttl=60))
        self.assertIsNone(self.successResultOf(second))
        self.failureResultOf(first, ZeroDivisionError)
        self.assertEqual(self.pool.endpoints, [ep(1), ep(2)])
        self.assertEqual(service.rounds, 1)
        self.clock.advance(60)
        self.answer(DiscoveryResult(endpoints=(ep(1),), records=("r",), ttl=60))

    def test_runnerRaises(self):
        """
        A round that cannot even start (no thread) is a failed round: logged,
        retried at the lower bound, and the caller's Deferred fires.
        """

        def noThread(f, *args, **kwargs):
            raise RuntimeError("can't start new thread")

        self.pool = UpstreamPool([ep(1)], self.clock)
        service = DiscoveryService(self.pool, self.clock, DiscoveryConfig("etcd.test"),
                                   DiscoveryResult(endpoints=(ep(1),), records=("r",), ttl=60),
                                   discover=None, runInThread=noThread)
        service.startService()
        self.addCleanup(service.stopService)
        d = service.refresh()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual([c.getTime() for c in self.clock.getDelayedCalls()], [MIN_REFRESH])
        service.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_unexpectedErrorsLogged(self):
        """
        The unexpected exceptions of a round are logged with their traceback,
        in the reactor thread, once while they repeat.
        """
        self.makeService(DiscoveryResult(endpoints=(ep(1),), records=("r",), ttl=60))
        try:
            raise ValueError("Invalid DNS-ID.")
        except ValueError:
            reason = failure.Failure()
        for _ in range(2):
            self.clock.advance(60)
            self.answer(DiscoveryResult(endpoints=(ep(1),), records=("r",), ttl=60,
                                        failures=((f"{SSL} bad:2379", reason),)))
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)


class SourceTests(_Rounds, SynchronousTestCase):
    """
    The service as the gateway's endpoint source: the interface the wiring,
    SIGHUP, metrics and the status page use; the round at start run by the
    service itself; the list it owns.
    """

    def test_interface(self):
        """DiscoveryService provides IEndpointSource, kind "srv"."""
        from zope.interface.verify import verifyObject

        from etcdgw.sources import IEndpointSource

        service = self.makeService(DiscoveryResult(endpoints=(ep(1),), records=("r",), ttl=60))
        self.assertTrue(verifyObject(IEndpointSource, service))
        self.assertEqual((service.kind, service.rounds, service.failures), ("srv", 0, 0))

    def test_describe(self):
        """
        One line for the status page: the domain, the last round, when the
        next look-up comes.
        """
        service = self.makeService(DiscoveryResult(endpoints=(ep(1),), records=("r",), ttl=60))
        self.assertEqual(
            service.describe(),
            "SRV discovery of etcd.test: no look-up since start; next look-up in 1m0s",
        )
        self.clock.advance(45)
        self.assertTrue(service.describe().endswith("; next look-up in 15s"))
        self.clock.advance(15)
        self.assertTrue(service.describe().endswith("; a look-up is running"))
        self.answer(DiscoveryResult(endpoints=(ep(1), ep(2)), records=("r",), ttl=30))
        self.assertEqual(
            service.describe(),
            "SRV discovery of etcd.test: 2 endpoints, 1 added, 0 removed; next look-up in 30s",
        )

    def test_describeRefreshOff(self):
        """With --discovery-refresh=0 the line says re-resolution is off."""
        service = self.makeService(
            DiscoveryResult(endpoints=(ep(1),), records=("r",), ttl=60),
            DiscoveryConfig("etcd.test", refresh=0),
        )
        self.assertTrue(service.describe().endswith("re-resolution is off (--discovery-refresh=0)"))

    def startedBySelf(self, result, fallback=()):
        """
        A service given no first round: it runs C{result} as that round
        when it starts, into an empty pool.
        """
        self.pool = UpstreamPool([], self.clock)
        asked = []

        def discover(config, known):
            asked.append(known)
            return result

        service = DiscoveryService(
            self.pool, self.clock, DiscoveryConfig("etcd.test"), discover=discover,
            runInThread=self.runRound, fallback=fallback,
        )
        self.addCleanup(self.assertEqual, self.clock.getDelayedCalls(), [])
        self.addCleanup(service.stopService)
        return service, asked

    def test_firstRoundAtStart(self):
        """
        Without a first round given, the service runs it in
        privilegedStartService (before the reactor runs) and proposes what
        it proved; startService logs it as when given, and runs no second one.
        """
        service, asked = self.startedBySelf(
            DiscoveryResult(endpoints=(ep(1), ep(2)), records=("r",), ttl=60)
        )
        service.privilegedStartService()
        self.assertEqual(asked, [frozenset()])
        self.assertEqual(self.pool.endpoints, [ep(1), ep(2)])
        service.startService()
        self.assertEqual(asked, [frozenset()])
        self.assertEqual(len(self.messages("discovered cluster from SRV etcd.test")), 1)
        self.clock.advance(60)
        self.assertEqual(self.rounds[0][0], frozenset({ep(1).identity, ep(2).identity}))
        self.answer(DiscoveryResult(endpoints=(ep(1),), records=("r",), ttl=60))

    def test_firstRoundFails(self):
        """
        Nothing usable and no --endpoints: the round at start raises
        DiscoveryError (the gateway must not start); the pool is untouched.
        """
        service, _ = self.startedBySelf(
            DiscoveryResult(lookups=((SSL, "no records"),), records=())
        )
        e = self.assertRaises(DiscoveryError, service.privilegedStartService)
        self.assertIn("--discovery-srv=etcd.test: no usable endpoint found", str(e))
        self.assertEqual(self.pool.endpoints, [])

    def test_firstRoundFallsBack(self):
        """
        Nothing usable with --endpoints: the pool gets those (logged at
        error level), and they are not discovery's: a later round where one
        name fails does not keep them as that name's last good endpoints.
        """
        fallback = (Endpoint("10.0.0.1", 2379, tls=True), Endpoint("10.0.0.2", 2379))
        service, _ = self.startedBySelf(
            DiscoveryResult(lookups=((SSL, "no records"),), records=()), fallback
        )
        service.startService()
        self.assertEqual(self.pool.endpoints, list(fallback))
        self.assertEqual(len(self.messages("falling back to --endpoints")), 1)
        self.clock.advance(MIN_REFRESH)
        self.answer(DiscoveryResult(
            endpoints=(plain(3),), records=("r",), lookups=((PLAIN, "1 record"),),
            errors=((SSL, f"SRV look-up of {SSL} failed: timed out"),), ttl=60,
        ))
        self.assertEqual(self.pool.endpoints, [plain(3)])

    def test_oneWriter(self):
        """
        Every change the service makes to the pool goes through one
        method, with a whole list.
        """
        service = self.makeService(
            DiscoveryResult(endpoints=(ep(1),), records=("r",), ttl=60,
                            fallback=(Endpoint("10.0.0.1", 2379),))
        )
        proposed = []
        real = self.pool.replaceEndpoints
        self.pool.replaceEndpoints = lambda endpoints, **kw: (
            proposed.append([str(e) for e in endpoints]) or real(endpoints, **kw)
        )
        for result in [
            DiscoveryResult(endpoints=(ep(2),), records=("r",), ttl=60),
            DiscoveryResult(records=("r",), refused=(("x", "rogue"),), ttl=60),
        ]:
            service.refresh()
            self.answer(result)
        self.assertEqual(proposed, [["m2.etcd.test:2379 (127.0.0.2)"], ["10.0.0.1:2379"]])


class StaticTests(SynchronousTestCase):
    """
    The static --endpoints source.
    """

    def test_interface(self):
        """
        StaticEndpoints provides IEndpointSource: nothing to refresh, no
        rounds, its list described.
        """
        from zope.interface.verify import verifyObject

        from etcdgw.sources import IEndpointSource, StaticEndpoints

        source = StaticEndpoints([Endpoint("10.0.0.1", 2379), Endpoint("::1", 2379)])
        self.assertTrue(verifyObject(IEndpointSource, source))
        self.assertEqual((source.kind, source.rounds, source.failures), ("static", 0, 0))
        self.assertEqual(
            self.successResultOf(source.refreshNow()), "no discovery (static --endpoints)"
        )
        self.assertEqual(source.describe(), "static --endpoints: 10.0.0.1:2379, [::1]:2379")


class OptionsTests(SynchronousTestCase):
    def test_flagsNeedSRV(self):
        """
        Discovery flags without --discovery-srv are refused.
        """
        from etcdgw.tap import Options

        e = self.assertRaises(usage.UsageError, Options().parseOptions,
                              ["--discovery-dns=127.0.0.1:53"])
        self.assertEqual(str(e), "--discovery-dns needs --discovery-srv")
