import random
from collections import Counter

from twisted.internet.task import Clock
from twisted.logger import LogLevel
from twisted.trial.unittest import SynchronousTestCase

from twisted.internet.testing import EventLoggingObserver

from etcdgw.endpoint import Endpoint, parseEndpoints
from etcdgw.pool import DOWN, UNHEALTHY, UNKNOWN, UP, ZERO_WEIGHT_SHARE, Change, UpstreamPool


def picks(pool, n):
    return [str(pool.pick().endpoint) for _ in range(n)]


class RoundRobinTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.pool = UpstreamPool(parseEndpoints("a:1,b:1,c:1"), self.clock)

    def test_order(self):
        """Static endpoints are picked in order, round-robin."""
        self.assertEqual(picks(self.pool, 7), ["a:1", "b:1", "c:1"] * 2 + ["a:1"])

    def test_skipsDown(self):
        """A down endpoint is skipped, the others keep their order."""
        self.pool.markDown(Endpoint("b", 1), "refused")
        self.assertEqual(picks(self.pool, 4), ["a:1", "c:1", "a:1", "c:1"])

    def test_backUp(self):
        """An endpoint marked up again rejoins the rotation."""
        self.pool.markDown(Endpoint("b", 1), "refused")
        self.pool.markUp(Endpoint("b", 1), "probe connected")
        self.assertEqual(sorted(picks(self.pool, 3)), ["a:1", "b:1", "c:1"])

    def test_noneUp(self):
        """With every endpoint down, pick returns None."""
        for e in self.pool.endpoints:
            self.pool.markDown(e, "refused")
        self.assertIsNone(self.pool.pick())
        self.assertEqual(self.pool.upCount(), 0)

    def test_exclude(self):
        """Excluded endpoints (already tried for a client) are not picked."""
        self.assertEqual(
            str(self.pool.pick(exclude=[Endpoint("a", 1), Endpoint("b", 1)]).endpoint),
            "c:1",
        )
        self.assertIsNone(self.pool.pick(exclude=self.pool.endpoints))


class RFC2782Tests(SynchronousTestCase):
    def pool(self, *records, seed=1):
        endpoints = [Endpoint(f"h{i}", 1, p, w) for i, (p, w) in enumerate(records)]
        return UpstreamPool(endpoints, Clock(), random=random.Random(seed))

    def test_lowestPriority(self):
        """Only the lowest priority tier among up endpoints is used."""
        pool = self.pool((10, 0), (5, 0), (5, 0), (20, 0))
        self.assertEqual(set(picks(pool, 10)), {"h1:1", "h2:1"})

    def test_fallToNextTier(self):
        """When the best tier is down, the next priority takes over."""
        pool = self.pool((10, 0), (5, 0), (20, 0))
        pool.markDown(Endpoint("h1", 1), "x")
        self.assertEqual(set(picks(pool, 5)), {"h0:1"})

    def test_twoWeightOne(self):
        """Two weight-1 records share picks evenly (etcd gives the first every pick)."""
        counts = Counter(picks(self.pool((0, 1), (0, 1)), 10000))
        self.assertEqual(set(counts), {"h0:1", "h1:1"})
        self.assertTrue(4700 < counts["h0:1"] < 5300, counts)

    def test_weights(self):
        """Picks follow the weights' proportions."""
        counts = Counter(picks(self.pool((0, 10), (0, 30), (0, 60)), 20000))
        for name, share in [("h0:1", 0.1), ("h1:1", 0.3), ("h2:1", 0.6)]:
            self.assertTrue(abs(counts[name] / 20000 - share) < 0.02, (name, counts))

    def test_zeroWeightRare(self):
        """Weight-0 records get a small share when others have weight."""
        counts = Counter(picks(self.pool((0, 1), (0, 0), (0, 1)), 20000))
        self.assertTrue(abs(counts["h1:1"] / 20000 - ZERO_WEIGHT_SHARE) < 0.004, counts)
        self.assertGreater(counts["h1:1"], 0)

    def test_zeroWeightPriority(self):
        """Priority also rules weight-0 records (etcd ignores it for them)."""
        pool = self.pool((1, 0), (0, 0), (0, 0))
        self.assertEqual(set(picks(pool, 20)), {"h1:1", "h2:1"})

    def test_allZeroRoundRobin(self):
        """A tier whose weights are all 0 is picked round-robin."""
        self.assertEqual(picks(self.pool((0, 0), (0, 0)), 4), ["h0:1", "h1:1"] * 2)


class StateTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.pool = UpstreamPool(parseEndpoints("a:1,b:1"), self.clock)
        self.events = EventLoggingObserver.createWithCleanup(self, self.pool.log.observer)

    def test_markDownLogsOnce(self):
        """A state change is one structured log line; a repeat logs nothing."""
        self.clock.advance(5)
        self.pool.markDown(Endpoint("a", 1), "connection refused")
        self.pool.markDown(Endpoint("a", 1), "connection refused")
        changes = [e for e in self.events if "old" in e]
        self.assertEqual(len(changes), 1)
        event = changes[0]
        self.assertEqual(
            (event["endpoint"], event["old"], event["new"], event["reason"]),
            ("a:1", UP, DOWN, "connection refused"),
        )
        self.assertEqual(event["log_level"], LogLevel.warn)
        state = self.pool.stateOf(Endpoint("a", 1))
        self.assertEqual((state.state, state.since, state.reason), (DOWN, 5, "connection refused"))

    def test_allDownLogsError(self):
        """When the last endpoint goes down, an error is logged."""
        self.pool.markDown(Endpoint("a", 1), "x")
        self.pool.markDown(Endpoint("b", 1), "x")
        errors = [e for e in self.events if e["log_level"] == LogLevel.error]
        self.assertEqual(len(errors), 1)
        self.assertIn("every endpoint is down", errors[0]["log_format"])

    def test_unknownIgnored(self):
        """Marking an endpoint that is not in the pool changes nothing."""
        self.pool.markDown(Endpoint("z", 9), "x")
        self.assertEqual(self.pool.upCount(), 2)
        self.assertEqual(list(self.events), [])

    def test_settersReturnChanges(self):
        """Each setter returns the changes it made (for the monitor to announce); a repeat none."""
        a = Endpoint("a", 1)
        self.assertEqual(self.pool.markDown(a, "refused"), (Change(a, "state", UP, DOWN, "refused"),))
        self.assertEqual(self.pool.markDown(a, "refused"), ())
        self.assertEqual(
            self.pool.setHealth(a, UNHEALTHY, "503"), (Change(a, "health", UNKNOWN, UNHEALTHY, "503"),)
        )
        self.assertEqual(
            self.pool.setAnswering(a, False, "silent"), (Change(a, "answering", True, False, "silent"),)
        )
        self.assertEqual(
            [(c.what, c.old, c.new) for c in self.pool.setIdentity(a, "9", True, "7")],
            [("foreign", False, True)],
        )
        self.assertEqual(self.pool.markUp(Endpoint("z", 9), "x"), ())

    def test_observers(self):
        """Observers hear about every change; one that raises does not stop the others."""
        seen = []
        self.pool.addObserver(lambda pool: 1 / 0)
        self.pool.addObserver(lambda pool: seen.append(pool.upCount()))
        self.pool.markDown(Endpoint("a", 1), "x")
        self.pool.markUp(Endpoint("a", 1), "y")
        self.assertEqual(seen, [1, 2])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 2)


class ReplaceTests(SynchronousTestCase):
    def test_keepsState(self):
        """Endpoints kept across a replace keep state and counters; new ones join up."""
        clock = Clock()
        pool = UpstreamPool(parseEndpoints("a:1,b:1"), clock)
        pool.markDown(Endpoint("a", 1), "refused")
        state = pool.stateOf(Endpoint("b", 1))
        pool.connectionOpened(state)
        added, removed = pool.replaceEndpoints(
            [Endpoint("b", 1, priority=3), Endpoint("a", 1), Endpoint("c", 1)], reason="dns"
        )
        self.assertEqual((added, removed), ([Endpoint("c", 1)], []))
        self.assertFalse(pool.isUp(Endpoint("a", 1)))
        self.assertIs(pool.stateOf(Endpoint("b", 1)), state)
        self.assertEqual((state.active, state.endpoint.priority), (1, 3))
        self.assertTrue(pool.isUp(Endpoint("c", 1)))
        self.assertEqual([str(e) for e in pool.endpoints], ["b:1", "a:1", "c:1"])

    def test_removedDuringDial(self):
        """
        A connection whose dial began before its endpoint was removed (and
        added again, afresh) counts on the state the pool holds for it now.
        """
        pool = UpstreamPool(parseEndpoints("a:1,b:1"), Clock())
        picked = pool.stateOf(Endpoint("a", 1))
        pool.replaceEndpoints([Endpoint("b", 1)])
        pool.replaceEndpoints([Endpoint("a", 1), Endpoint("b", 1)])
        current = pool.stateOf(Endpoint("a", 1))
        pool.connectionOpened(picked)
        self.assertEqual((current.active, current.connections), (1, 1))
        pool.replaceEndpoints([Endpoint("b", 1)])
        pool.replaceEndpoints([Endpoint("a", 1), Endpoint("b", 1)])
        self.assertIs(pool.stateOf(Endpoint("a", 1)), current)
        pool.connectionClosed(picked)
        self.assertEqual(current.active, 0)
        self.assertEqual(pool._retired, {})

    def test_removed(self):
        """A removed endpoint is no longer picked and is reported."""
        pool = UpstreamPool(parseEndpoints("a:1,b:1"), Clock())
        events = EventLoggingObserver.createWithCleanup(self, pool.log.observer)
        added, removed = pool.replaceEndpoints([Endpoint("b", 1)], reason="dns")
        self.assertEqual(removed, [Endpoint("a", 1)])
        self.assertEqual(set(picks(pool, 4)), {"b:1"})
        self.assertEqual(events[0]["removed"], ["a:1"])
        self.assertEqual(events[0]["added"], [])


class SilenceTests(SynchronousTestCase):
    """
    What the monitor decides of an endpoint's answers, as the pool holds it:
    silent ones get no new connection while another is usable; answering
    slowly ones do; when every eligible one is silent, they still do.
    """

    def setUp(self):
        self.clock = Clock()
        self.pool = UpstreamPool(parseEndpoints("a:1,b:1,c:1"), self.clock)
        self.events = EventLoggingObserver.createWithCleanup(self, self.pool.log.observer)

    def test_silentSkipped(self):
        """A silent endpoint is not usable, and not picked; one answering slowly is."""
        self.pool.setSilence(Endpoint("a", 1), True, False, "no answer")
        self.pool.setSilence(Endpoint("b", 1), False, True, "no answer; cap")
        self.assertEqual(picks(self.pool, 4), ["b:1", "c:1", "b:1", "c:1"])
        self.assertEqual([s.usable for s in self.pool.states()], [False, True, True])

    def test_setSilenceChangesLogged(self):
        """Each change is returned and logged once: silent, answering slowly, answering."""
        a = Endpoint("a", 1)
        self.assertEqual(
            self.pool.setSilence(a, False, True, "cap"), (Change(a, "slow", False, True, "cap"),)
        )
        self.assertEqual(
            self.pool.setSilence(a, True, False, "room"),
            (Change(a, "silent", False, True, "room"), Change(a, "slow", True, False, "room")),
        )
        self.assertEqual(self.pool.setSilence(a, True, False, "room"), ())
        self.pool.setSilence(a, False, False, "answers again")
        lines = [(e["old"], e["new"], e["log_level"]) for e in self.events if "old" in e]
        self.assertEqual(
            lines,
            [
                ("answering", "answering slowly", LogLevel.warn),
                ("answering slowly", "silent", LogLevel.warn),
                ("silent", "answering", LogLevel.info),
            ],
        )

    def test_allSilentFailOpen(self):
        """
        Every eligible endpoint silent: pick still chooses among them (a
        client sent to a member that may answer later beats a client
        refused), said in one error line for the episode, one when it ends.
        """
        self.pool.markDown(Endpoint("c", 1), "refused")
        for name in "ab":
            self.pool.setSilence(Endpoint(name, 1), True, False, "no answer")
        self.assertEqual(sorted(picks(self.pool, 4)), ["a:1", "a:1", "b:1", "b:1"])
        errors = [e for e in self.events if "is silent (" in e["log_format"]]
        self.assertEqual(len(errors), 1)
        self.assertEqual(errors[0]["log_level"], LogLevel.error)
        self.assertEqual(errors[0]["endpoints"], ["a:1", "b:1"])
        self.pool.setSilence(Endpoint("a", 1), False, False, "answers again")
        ended = [e for e in self.events if "answers again:" in e["log_format"]]
        self.assertEqual(len(ended), 1)
        self.assertEqual(picks(self.pool, 2), ["a:1", "a:1"])

    def test_fallbackPrefersNotSilent(self):
        """No usable endpoint: an unhealthy one that is not silent comes before a silent one."""
        self.pool.setHealth(Endpoint("a", 1), UNHEALTHY, "503")
        self.pool.setSilence(Endpoint("b", 1), True, False, "no answer")
        self.pool.setHealth(Endpoint("c", 1), UNHEALTHY, "503")
        self.pool.setAnswering(Endpoint("c", 1), False, "no answer in time")
        self.assertEqual(picks(self.pool, 3), ["a:1"] * 3)
        self.pool.markDown(Endpoint("a", 1), "refused")
        self.assertEqual(picks(self.pool, 2), ["c:1"] * 2)
        degraded = [e for e in self.events if "no endpoint is healthy" in e["log_format"]]
        self.assertEqual(len(degraded), 1)

    def test_rejoinAnswering(self):
        """An endpoint removed and added again starts answering."""
        self.pool.setSilence(Endpoint("a", 1), True, False, "no answer")
        self.pool.replaceEndpoints(parseEndpoints("b:1,c:1"))
        self.pool.replaceEndpoints(parseEndpoints("a:1,b:1,c:1"))
        state = self.pool.stateOf(Endpoint("a", 1))
        self.assertEqual((state.silent, state.slow, state.usable), (False, False, True))
