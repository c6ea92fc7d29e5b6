"""
The pool's pick policies and its etcd-health and cluster-identity dimensions.
"""

import random
from collections import Counter

from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel
from twisted.trial.unittest import SynchronousTestCase

from etcdgw.endpoint import Endpoint, parseEndpoints
from etcdgw.pool import HEALTHY, POLICIES, UNHEALTHY, UNKNOWN, UpstreamPool


def picks(pool, n):
    return [str(pool.pick().endpoint) for _ in range(n)]


def weighted(*weights, policy):
    endpoints = [Endpoint(f"h{i}", 1, 0, w) for i, w in enumerate(weights)]
    return UpstreamPool(endpoints, Clock(), policy=policy, random=random.Random(3))


class PolicyNameTests(SynchronousTestCase):
    def test_names(self):
        """The three --policy names exist and are three different rules."""
        self.assertEqual(set(POLICIES), {"round-robin", "weighted", "least-connections"})
        self.assertEqual(len({id(f) for f in POLICIES.values()}), 3)

    def test_unknown(self):
        """An unknown policy is refused with a message naming it."""
        e = self.assertRaises(ValueError, UpstreamPool, [], Clock(), policy="fastest")
        self.assertIn('"fastest"', str(e))


class RoundRobinPolicyTests(SynchronousTestCase):
    def test_weightsAreRandomProportional(self):
        """round-robin follows SRV weights as RFC 2782 (random, proportional)."""
        counts = Counter(picks(weighted(1, 3, policy="round-robin"), 8000))
        self.assertTrue(0.72 < counts["h1:1"] / 8000 < 0.78, counts)
        # Random, not a fixed interleaving: some run of four h1 picks appears.
        sequence = picks(weighted(1, 3, policy="round-robin"), 200)
        self.assertIn("h1:1,h1:1,h1:1,h1:1", ",".join(sequence))


class WeightedPolicyTests(SynchronousTestCase):
    def test_smoothInterleaving(self):
        """weighted is smooth weighted round-robin: 5, 1, 1 gives a a b a c a a."""
        pool = weighted(5, 1, 1, policy="weighted")
        self.assertEqual(
            picks(pool, 7), ["h0:1", "h0:1", "h1:1", "h0:1", "h2:1", "h0:1", "h0:1"]
        )

    def test_exactProportions(self):
        """Over one cycle of sum(weights) picks, each gets exactly its weight."""
        pool = weighted(2, 3, 5, policy="weighted")
        counts = Counter(picks(pool, 100))
        self.assertEqual(counts, {"h0:1": 20, "h1:1": 30, "h2:1": 50})

    def test_zeroWeightCountsAsOne(self):
        """Static endpoints (weight 0) rotate evenly under weighted."""
        pool = UpstreamPool(parseEndpoints("a:1,b:1,c:1"), Clock(), policy="weighted")
        self.assertEqual(picks(pool, 6), ["a:1", "b:1", "c:1"] * 2)

    def test_downSkipped(self):
        """A down endpoint gets nothing; the others keep their proportions."""
        pool = weighted(1, 1, 2, policy="weighted")
        pool.markDown(Endpoint("h2", 1), "x")
        self.assertEqual(Counter(picks(pool, 10)), {"h0:1": 5, "h1:1": 5})

    def test_removedForgotten(self):
        """Credits of removed endpoints are dropped."""
        pool = weighted(1, 1, policy="weighted")
        picks(pool, 3)
        pool.replaceEndpoints([Endpoint("h0", 1, 0, 1)])
        self.assertEqual(set(pool.policy.credit) - {("h0", 1)}, set())


class LeastConnectionsTests(SynchronousTestCase):
    def test_leastLoaded(self):
        """New connections go to the endpoint with the fewest open ones."""
        pool = UpstreamPool(parseEndpoints("a:1,b:1,c:1"), Clock(), policy="least-connections")
        for name, count in (("a", 5), ("b", 2), ("c", 0)):
            state = pool.stateOf(Endpoint(name, 1))
            for _ in range(count):
                pool.connectionOpened(state)
        chosen = []
        for _ in range(6):
            state = pool.pick()
            pool.connectionOpened(state)
            chosen.append(state.endpoint.host)
        # c catches up with b, then b and c share until they reach a.
        self.assertEqual(chosen[:2], ["c", "c"])
        self.assertEqual(Counter(chosen), {"c": 4, "b": 2})

    def test_tiesRotate(self):
        """With equal loads (idle), least-connections rotates."""
        pool = UpstreamPool(parseEndpoints("a:1,b:1"), Clock(), policy="least-connections")
        self.assertEqual(picks(pool, 4), ["a:1", "b:1"] * 2)

    def test_reAddedEndpointKeepsItsConnections(self):
        """
        An endpoint removed with connections open and added again counts
        them on: least-connections does not see it idle, and their closing
        brings it back to 0.
        """
        a, b = Endpoint("a", 1), Endpoint("b", 1)
        pool = UpstreamPool([a, b], Clock(), policy="least-connections")
        old = pool.stateOf(a)
        for _ in range(2):
            pool.connectionOpened(old)
        pool.replaceEndpoints([b], reason="member list")
        pool.replaceEndpoints([a, b], reason="member list")
        self.assertEqual(pool.stateOf(a).active, 2)
        chosen = []
        for _ in range(2):
            state = pool.pick()
            pool.connectionOpened(state)
            chosen.append(state.endpoint)
        self.assertEqual(chosen, [b, b])
        for _ in range(2):
            pool.connectionClosed(old)
        self.assertEqual((pool.stateOf(a).active, pool.stateOf(b).active), (0, 2))
        self.assertEqual(pool.pick().endpoint, a)


class HealthDimensionTests(SynchronousTestCase):
    def setUp(self):
        self.pool = UpstreamPool(parseEndpoints("a:1,b:1,c:1"), Clock())
        self.events = EventLoggingObserver.createWithCleanup(self, self.pool.log.observer)

    def test_unhealthyGetsNothing(self):
        """An unhealthy endpoint gets no new connections while others are healthy."""
        self.pool.setHealth(Endpoint("b", 1), UNHEALTHY, "503")
        self.assertEqual(set(picks(self.pool, 6)), {"a:1", "c:1"})
        self.assertEqual([s.endpoint.host for s in self.pool.usable()], ["a", "c"])

    def test_fallbackToTCPAlive(self):
        """With none healthy, TCP-up unhealthy ones are used, and it is logged once."""
        for name in "abc":
            self.pool.setHealth(Endpoint(name, 1), UNHEALTHY, "503")
        self.pool.markDown(Endpoint("a", 1), "refused")
        self.assertEqual(set(picks(self.pool, 4)), {"b:1", "c:1"})
        errors = [e for e in self.events if e["log_level"] == LogLevel.error]
        self.assertEqual(len(errors), 1)
        self.assertIn("no endpoint is healthy", errors[0]["log_format"])
        self.assertEqual(errors[0]["endpoints"], ["a:1", "b:1", "c:1"])
        self.pool.setHealth(Endpoint("c", 1), HEALTHY, "ok")
        self.assertEqual(set(picks(self.pool, 3)), {"c:1"})
        self.assertIn(
            "healthy again", [e for e in self.events if "log_format" in e][-1]["log_format"]
        )

    def test_fallbackPrefersAnswering(self):
        """
        With none healthy, members whose checks get an answer are used before
        ones that do not answer at all (a frozen leader), which are used only
        when no member answers.
        """
        for name in "abc":
            self.pool.setHealth(Endpoint(name, 1), UNHEALTHY, "503")
        self.pool.setAnswering(Endpoint("b", 1), False)
        self.assertEqual(set(picks(self.pool, 6)), {"a:1", "c:1"})
        self.pool.setAnswering(Endpoint("a", 1), False)
        self.pool.setAnswering(Endpoint("c", 1), False)
        self.assertEqual(set(picks(self.pool, 6)), {"a:1", "b:1", "c:1"})
        # A healthy member is preferred whatever the others do.
        self.pool.setHealth(Endpoint("b", 1), HEALTHY, "ok")
        self.assertEqual(set(picks(self.pool, 3)), {"b:1"})

    def test_unknownIsUsable(self):
        """Before any etcd check answered, endpoints are used (health unknown)."""
        self.assertEqual(self.pool.stateOf(Endpoint("a", 1)).health, UNKNOWN)
        self.assertEqual(len(self.pool.usable()), 3)

    def test_learnedNeedsProof(self):
        """
        An endpoint learned from a member list gets no client, not even as a
        fallback, until it proves its cluster ID; then it is used.
        """
        x = Endpoint("x", 1)
        self.pool.replaceEndpoints(self.pool.endpoints + [x], learned=True)
        for e in self.pool.endpoints[:-1]:
            self.pool.setHealth(e, UNHEALTHY, "503")
        self.assertNotIn("x:1", picks(self.pool, 8))
        self.assertNotIn(x, [s.endpoint for s in self.pool.usable()])
        self.pool.setIdentity(x, "7", False, "7")
        self.assertEqual(set(picks(self.pool, 4)), {"x:1"})

    def test_foreignNeverUsed(self):
        """A foreign endpoint is never picked, not even as a fallback, and it is loud."""
        self.pool.setIdentity(Endpoint("c", 1), "99", True, "7")
        self.assertEqual(set(picks(self.pool, 6)), {"a:1", "b:1"})
        for name in "ab":
            self.pool.setHealth(Endpoint(name, 1), UNHEALTHY, "503")
        self.assertEqual(set(picks(self.pool, 4)), {"a:1", "b:1"})
        self.pool.markDown(Endpoint("a", 1), "x")
        self.pool.markDown(Endpoint("b", 1), "x")
        self.assertIsNone(self.pool.pick())
        loud = [e for e in self.events if "ANOTHER" in e.get("log_format", "")]
        self.assertEqual(len(loud), 1)
        self.assertEqual((loud[0]["clusterID"], loud[0]["majority"]), ("99", "7"))
        self.assertEqual(loud[0]["log_level"], LogLevel.error)
