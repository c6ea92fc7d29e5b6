"""
Membership sync: merging a member list into the endpoints, and the periodic
service, on MemoryReactorClock.
"""

from twisted.internet import defer
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import LogLevel
from twisted.trial.unittest import SynchronousTestCase

from etcdgw.endpoint import Endpoint, parseEndpoints
from etcdgw.etcdhealth import CheckResult, EtcdHealthService, EtcdHTTPError
from etcdgw.listenaddr import parseListenAddress
from etcdgw.membership import MembershipSync, mergeMembers
from etcdgw.monitor import Monitor
from etcdgw.pool import UNHEALTHY, UpstreamPool
from etcdgw.selfloop import SelfLoopGuard, ownAddressCheck


def member(name, *urls, learner=False):
    return {"ID": "1", "name": name, "clientURLs": list(urls), "isLearner": learner}


def names(endpoints):
    return [str(e) for e in endpoints]


class MergeTests(SynchronousTestCase):
    current = parseEndpoints("10.0.0.1:2379,10.0.0.2:2379")

    def test_addAndRemove(self):
        """Kept endpoints stay in order, new ones follow, absent ones go."""
        merge = mergeMembers(
            [
                member("m3", "http://10.0.0.3:2379"),
                member("m2", "http://10.0.0.2:2379"),
            ],
            self.current,
        )
        self.assertEqual(names(merge.endpoints), ["10.0.0.2:2379", "10.0.0.3:2379"])

    def test_httpsIsTLS(self):
        """Schemes are stripped; https means tls=True."""
        merge = mergeMembers(
            [member("m1", "https://10.0.0.1:2379"), member("m9", "https://h9:2379/")],
            self.current,
        )
        self.assertEqual(
            list(merge.endpoints),
            [Endpoint("10.0.0.1", 2379, tls=True), Endpoint("h9", 2379, tls=True)],
        )

    def test_keepsWeightAndPriority(self):
        """An endpoint kept keeps its SRV priority and weight."""
        current = [Endpoint("10.0.0.1", 2379, priority=5, weight=7)]
        merge = mergeMembers([member("m1", "http://10.0.0.1:2379")], current)
        self.assertEqual((merge.endpoints[0].priority, merge.endpoints[0].weight), (5, 7))

    def test_knownURLPreferred(self):
        """A member with several client URLs gives one endpoint, the one already known."""
        merge = mergeMembers(
            [member("m2", "http://192.168.0.2:2379", "http://10.0.0.2:2379")], self.current
        )
        self.assertEqual(names(merge.endpoints), ["10.0.0.2:2379"])

    def test_unstartedAndLearnersSkipped(self):
        """Members with no client URL yet, and learners, are skipped and said why."""
        merge = mergeMembers(
            [
                member("m1", "http://10.0.0.1:2379"),
                member("new"),
                member("l", "http://10.0.0.4:2379", learner=True),
            ],
            self.current,
        )
        self.assertEqual(names(merge.endpoints), ["10.0.0.1:2379"])
        self.assertEqual([name for name, why in merge.skipped], ["new", "l"])

    def test_removingEverythingRefused(self):
        """A list sharing no endpoint with the current ones is refused."""
        merge = mergeMembers([member("x", "http://172.16.0.1:2379")], self.current)
        self.assertIsNone(merge.endpoints)
        self.assertIn("remove every current endpoint", merge.refusal)

    def test_emptyRefused(self):
        """A list with no usable client URL is refused."""
        merge = mergeMembers([member("new"), member("bad", "http://nope")], self.current)
        self.assertIsNone(merge.endpoints)
        self.assertIn('"http://nope"', merge.skipped[1][1])


class LearnedDataTests(SynchronousTestCase):
    """
    What a member list may not do: downgrade TLS, add refused addresses,
    add more than the bound.
    """

    def test_tlsNeverDowngraded(self):
        """An https endpoint stays https when the list names it http."""
        current = [Endpoint("10.0.0.1", 2379, tls=True)]
        merge = mergeMembers([member("m1", "http://10.0.0.1:2379")], current)
        self.assertEqual(list(merge.endpoints), current)

    def test_noHTTPInTLSCluster(self):
        """In a cluster configured with https, http client URLs are skipped, saying why."""
        current = [Endpoint("10.0.0.1", 2379, tls=True)]
        merge = mergeMembers(
            [
                member("m1", "https://10.0.0.1:2379"),
                member("m2", "http://10.0.0.2:2379"),
                member("m3", "http://10.0.0.3:2379", "https://10.0.0.3:2379"),
            ],
            current,
            tlsRequired=True,
        )
        self.assertEqual(
            list(merge.endpoints),
            [Endpoint("10.0.0.1", 2379, tls=True), Endpoint("10.0.0.3", 2379, tls=True)],
        )
        self.assertEqual([name for name, why in merge.skipped], ["m2", "m3"])
        self.assertIn("TLS is never downgraded", merge.skipped[0][1])

    def test_refusedAddress(self):
        """A client URL that the refuse check refuses is skipped, saying why."""
        merge = mergeMembers(
            [member("m1", "http://10.0.0.1:2379"), member("me", "http://127.0.0.1:23790")],
            parseEndpoints("10.0.0.1:2379"),
            refuse=ownAddressCheck(parseListenAddress("127.0.0.1:23790")),
        )
        self.assertEqual(names(merge.endpoints), ["10.0.0.1:2379"])
        self.assertEqual(merge.skipped[0][0], "me")
        self.assertIn("the gateway's own listen address", merge.skipped[0][1])

    def test_badAddressesSkipped(self):
        """Learned URLs pass the checks of --endpoints (scope, unspecified, port)."""
        merge = mergeMembers(
            [
                member("m1", "http://10.0.0.1:2379"),
                member("a", "http://[fe80::1%nosuchif0]:2379"),
                member("b", "http://0.0.0.0:2379"),
                member("c", "http://10.0.0.4"),
                member("d", "http://10.0.0.5:0"),
            ],
            parseEndpoints("10.0.0.1:2379"),
        )
        self.assertEqual(names(merge.endpoints), ["10.0.0.1:2379"])
        self.assertEqual([name for name, why in merge.skipped], ["a", "b", "c", "d"])

    def test_bound(self):
        """New endpoints, with the unproven ones kept, are at most the bound; the rest wait."""
        merge = mergeMembers(
            [member(f"m{i}", f"http://10.0.0.{i}:2379") for i in range(1, 7)],
            parseEndpoints("10.0.0.1:2379,10.0.0.2:2379"),
            unproven={("10.0.0.2", 2379)},
            maxUnproven=3,
        )
        self.assertEqual(
            names(merge.endpoints),
            ["10.0.0.1:2379", "10.0.0.2:2379", "10.0.0.3:2379", "10.0.0.4:2379"],
        )
        self.assertEqual(names(merge.heldBack), ["10.0.0.5:2379", "10.0.0.6:2379"])


class OwnAddressTests(SynchronousTestCase):
    def test_listenAddress(self):
        """The listen address itself, IPv4-mapped too; another port or address is fine."""
        check = ownAddressCheck(parseListenAddress("127.0.0.1:23790"))
        self.assertIsNotNone(check(Endpoint("127.0.0.1", 23790)))
        self.assertIsNotNone(check(Endpoint("::ffff:127.0.0.1", 23790)))
        self.assertIsNone(check(Endpoint("127.0.0.1", 2379)))
        self.assertIsNone(check(Endpoint("127.0.0.2", 23790)))

    def test_wildcard(self):
        """Listening on every interface: any local address on the port."""
        local = {"10.1.2.3"}
        check = ownAddressCheck(parseListenAddress(":23790"), isLocal=local.__contains__)
        self.assertIsNotNone(check(Endpoint("10.1.2.3", 23790)))
        self.assertIsNotNone(check(Endpoint("127.0.0.5", 23790)))
        self.assertIsNone(check(Endpoint("10.9.9.9", 23790)))

    def test_namesNotResolved(self):
        """Host names are not judged (no look-up on the reactor thread)."""
        check = ownAddressCheck(parseListenAddress(":23790"), isLocal=lambda a: self.fail(a))
        self.assertIsNone(check(Endpoint("localhost", 23790)))

    def test_unixListener(self):
        """A unix listener has no address to loop to."""
        check = ownAddressCheck(parseListenAddress("unix:/tmp/x.sock"))
        self.assertIsNone(check(Endpoint("127.0.0.1", 23790)))


class FakeClient:
    def __init__(self):
        self.answers = {}
        self.asked = []

    def requestJSON(self, endpoint, method, path, body=None):
        self.asked.append((str(endpoint), method, path, body))
        answer = self.answers.get(endpoint.host, EtcdHTTPError("no answer"))
        if isinstance(answer, Exception):
            return defer.fail(answer)
        if isinstance(answer, defer.Deferred):
            return answer
        return defer.succeed(answer)


def memberList(*members, clusterID="7"):
    return {"header": {"cluster_id": clusterID}, "members": list(members)}


class SyncServiceTests(SynchronousTestCase):
    def setUp(self):
        self.clock = MemoryReactorClock()
        self.pool = UpstreamPool(parseEndpoints("a:1,b:1"), self.clock)
        self.client = FakeClient()
        self.monitor = Monitor(self.pool, self.clock)
        self.identity = self.monitor.identity
        self.service = MembershipSync(
            self.pool, self.clock, 10.0, self.client, monitor=self.monitor
        )
        self.events = EventLoggingObserver.createWithCleanup(self, self.service.log.observer)
        self.addCleanup(self.stop)

    def stop(self):
        if self.service.running:
            self.service.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_followsMembers(self):
        """At start and every interval, the pool is made to match the member list."""
        self.client.answers["a"] = memberList(member("a", "http://a:1"), member("c", "http://c:1"))
        self.service.startService()
        self.assertEqual(names(self.pool.endpoints), ["a:1", "c:1"])
        self.assertEqual(self.client.asked[0], ("a:1", b"POST", "/v3/cluster/member/list", {}))
        self.client.answers["a"] = memberList(
            member("a", "http://a:1"), member("c", "http://c:1"), member("d", "http://d:1")
        )
        self.clock.advance(9)
        self.assertEqual(len(self.pool.endpoints), 2)
        self.clock.advance(1)
        self.assertEqual(names(self.pool.endpoints), ["a:1", "c:1", "d:1"])

    def test_asksUsableMembersOnly(self):
        """An unhealthy member is not asked; the next usable one is."""
        self.pool.setHealth(Endpoint("a", 1), UNHEALTHY, "503")
        self.client.answers["b"] = memberList(member("b", "http://b:1"))
        self.service.startService()
        self.assertEqual([a[0] for a in self.client.asked], ["b:1"])
        self.assertEqual(names(self.pool.endpoints), ["b:1"])

    def test_triesNext(self):
        """When a member does not answer, the next one is asked."""
        self.client.answers["b"] = memberList(member("b", "http://b:1"), member("a", "http://a:1"))
        self.service.startService()
        self.assertEqual([a[0] for a in self.client.asked], ["a:1", "b:1"])
        self.assertEqual(names(self.pool.endpoints), ["a:1", "b:1"])

    def test_refusalLogged(self):
        """A list that would remove every endpoint is ignored and logged at error level."""
        self.client.answers["a"] = memberList(member("x", "http://x:1"))
        self.service.startService()
        self.assertEqual(names(self.pool.endpoints), ["a:1", "b:1"])
        errors = [e for e in self.events if e["log_level"] == LogLevel.error]
        self.assertEqual(len(errors), 1)
        self.assertIn("remove every current endpoint", errors[0]["why"])

    def test_foreignClusterIgnored(self):
        """A member list from another cluster than the majority's is ignored."""
        self.identity.report(Endpoint("b", 1), "7")
        self.client.answers["a"] = memberList(member("a", "http://a:1"), clusterID="99")
        self.service.startService()
        self.assertEqual(names(self.pool.endpoints), ["a:1", "b:1"])
        # (The two configured endpoints disagreeing is logged too, by the identity.)
        errors = [
            e for e in self.events
            if e["log_level"] == LogLevel.error and e["log_namespace"] == self.service.log.namespace
        ]
        self.assertEqual((errors[0]["clusterID"], errors[0]["expected"]), ("99", "7"))

    def test_learnedProvenBySync(self):
        """
        Without etcd health checks, sync asks each learned endpoint for its
        cluster ID: no client before it answers the pinned one.
        """
        self.client.answers["a"] = memberList(member("a", "http://a:1"), member("c", "http://c:1"))
        self.client.answers["c"] = EtcdHTTPError("no answer yet")
        self.service.startService()
        self.assertEqual(names(self.pool.endpoints), ["a:1", "c:1"])
        self.assertEqual(self.client.asked[-1], ("c:1", b"POST", "/v3/maintenance/status", {}))
        self.assertEqual(names(s.endpoint for s in self.pool.usable()), ["a:1"])
        self.assertNotIn("c", {self.pool.pick().endpoint.host for _ in range(6)})
        self.client.answers["c"] = {"header": {"cluster_id": "7"}}
        self.clock.advance(10)
        self.assertEqual(names(s.endpoint for s in self.pool.usable()), ["a:1", "c:1"])

    def test_stopCancelsIdentityChecks(self):
        """Stopping cancels the identity checks of learned endpoints in flight, quietly."""
        cancelled = []
        self.client.answers["a"] = memberList(member("a", "http://a:1"), member("c", "http://c:1"))
        self.client.answers["c"] = defer.Deferred(lambda d: cancelled.append(True))
        self.service.startService()
        self.service.stopService()
        self.assertEqual(cancelled, [True])
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertFalse(
            [e for e in self.events if e["log_level"] in (LogLevel.error, LogLevel.critical)]
        )

    def test_listWithoutClusterIDIgnored(self):
        """A list that names no cluster ID is not used; the next member is asked."""
        self.identity.report(Endpoint("a", 1), "7")
        self.identity.report(Endpoint("b", 1), "7")
        self.client.answers["a"] = memberList(member("a", "http://a:1"), clusterID=None)
        self.client.answers["b"] = memberList(
            member("b", "http://b:1"), member("a", "http://a:1"), member("c", "http://c:1")
        )
        self.service.startService()
        self.assertEqual([a[0] for a in self.client.asked[:2]], ["a:1", "b:1"])
        self.assertEqual(names(self.pool.endpoints), ["a:1", "b:1", "c:1"])

    def test_tlsClusterGetsNoHTTP(self):
        """Seeded with https, a list's http client URLs are never added."""
        pool = UpstreamPool([Endpoint("a", 1, tls=True)], self.clock)
        client = FakeClient()
        client.answers["a"] = memberList(member("a", "https://a:1"), member("c", "http://c:1"))
        service = MembershipSync(pool, self.clock, 10.0, client, monitor=Monitor(pool, self.clock))
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(pool.endpoints, [Endpoint("a", 1, tls=True)])

    def test_ownAddressRefused(self):
        """A member advertising the gateway's own listen address is not added."""
        pool = UpstreamPool([Endpoint("127.0.0.1", 2379)], self.clock)
        client = FakeClient()
        client.answers["127.0.0.1"] = memberList(
            member("a", "http://127.0.0.1:2379"), member("me", "http://127.0.0.1:23790")
        )
        service = MembershipSync(
            pool, self.clock, 10.0, client, monitor=Monitor(pool, self.clock),
            refuse=SelfLoopGuard(parseListenAddress("127.0.0.1:23790")).refuseLearned,
        )
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(names(pool.endpoints), ["127.0.0.1:2379"])

    def test_boundLoggedOnce(self):
        """Additions past the bound wait for a later round; logged once while the same."""
        self.client.answers["a"] = memberList(
            *[member(f"m{i}", f"http://m{i}:1") for i in range(5)], member("a", "http://a:1")
        )
        self.service.startService()
        self.clock.advance(10)
        self.assertEqual(names(self.pool.endpoints), ["a:1", "m0:1", "m1:1", "m2:1"])
        held = [e for e in self.events if "held back" in e.get("log_format", "")]
        self.assertEqual(len(held), 1)
        self.assertEqual(held[0]["endpoints"], ["m3:1", "m4:1"])
        self.assertEqual(held[0]["log_level"], LogLevel.warn)
        # m0 proves itself: one more may come.
        self.client.answers["m0"] = {"header": {"cluster_id": "7"}}
        self.clock.advance(10)
        self.clock.advance(10)
        self.assertEqual(names(self.pool.endpoints), ["a:1", "m0:1", "m1:1", "m2:1", "m3:1"])

    def test_nobodyAnswers(self):
        """With no answer, nothing changes, a warning names the errors, the loop goes on."""
        self.service.startService()
        self.assertEqual(len(self.pool.endpoints), 2)
        warnings = [e for e in self.events if e["log_level"] == LogLevel.warn]
        self.assertIn("a:1: no answer", warnings[0]["errors"])
        self.clock.advance(10)
        self.assertEqual(len(self.client.asked), 4)

    def test_stopCancels(self):
        """Stopping cancels a sync in flight and leaves no timer."""
        cancelled = []
        self.client.answers["a"] = defer.Deferred(lambda d: cancelled.append(True))
        self.service.startService()
        self.service.stopService()
        self.assertEqual(cancelled, [True])
        self.assertEqual(self.flushLoggedErrors(), [])


class HostileListTests(SynchronousTestCase):
    """
    The attack of issue 11 item 2: a member's list names four hosts of
    another cluster. With or without etcd health checks, within a few
    rounds the pool still serves the configured members only.
    """

    def setUp(self):
        self.clock = MemoryReactorClock()
        self.pool = UpstreamPool(parseEndpoints("g0:1,g1:1"), self.clock)
        self.monitor = Monitor(self.pool, self.clock)
        self.identity = self.monitor.identity
        self.client = FakeClient()
        attackers = [member(f"x{i}", f"http://x{i}:1") for i in range(4)]
        genuine = [member("g0", "http://g0:1"), member("g1", "http://g1:1")]
        self.client.answers["g0"] = memberList(*genuine, *attackers)
        self.client.answers["g1"] = memberList(*genuine)
        for i in range(4):
            self.client.answers[f"x{i}"] = memberList(*attackers, clusterID="99")
        self.sync = MembershipSync(self.pool, self.clock, 1.0, self.client, monitor=self.monitor)
        self.events = EventLoggingObserver.createWithCleanup(self, self.pool.log.observer)

    def attack(self, *services):
        for service in services:
            service.startService()
        for _ in range(10):
            self.clock.advance(1)
            self.assertEqual(
                {self.pool.pick().endpoint.host for _ in range(8)}, {"g0", "g1"}
            )
        for service in services:
            service.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.identity.pinned, "7")
        self.assertEqual({s.endpoint.host for s in self.pool.usable()}, {"g0", "g1"})
        foreign = [e["endpoint"] for e in self.events if e["log_level"] == LogLevel.error]
        self.assertEqual(sorted(foreign), ["x0:1", "x1:1", "x2:1"])  # once each; x3 held back
        asked = {(a[0], a[2]) for a in self.client.asked}
        self.assertNotIn(("x0:1", "/v3/cluster/member/list"), asked)

    def test_syncAlone(self):
        """Sync alone: the attacker hosts are checked, found foreign, never picked."""
        self.attack(self.sync)

    def test_withEtcdHealth(self):
        """With etcd health checks sharing the identity: no out-voting."""
        probe = lambda endpoint: defer.succeed(
            CheckResult(True, "ok", "99" if endpoint.host.startswith("x") else "7", True)
        )
        health = EtcdHealthService(self.pool, self.clock, 1.0, probe, monitor=self.monitor)
        self.attack(health, self.sync)


class SourceTests(SynchronousTestCase):
    """
    MembershipSync as the gateway's endpoint source: the interface SIGHUP,
    metrics and the status page use.
    """

    def setUp(self):
        self.clock = MemoryReactorClock()
        self.pool = UpstreamPool(parseEndpoints("a:1,b:1"), self.clock)
        self.client = FakeClient()
        self.service = MembershipSync(self.pool, self.clock, 10.0, self.client)
        self.addCleanup(lambda: self.service.running and self.service.stopService())

    def test_interface(self):
        """It provides IEndpointSource, kind "member-list"."""
        from zope.interface.verify import verifyObject

        from etcdgw.sources import IEndpointSource

        self.assertTrue(verifyObject(IEndpointSource, self.service))
        self.assertEqual(self.service.kind, "member-list")
        self.assertEqual(
            self.service.describe(), "member list read every 10s: no read since start"
        )

    def test_refreshNow(self):
        """
        SIGHUP reads the list now and says what it did, in one line; the
        rounds and failures are counted.
        """
        self.client.answers["a"] = memberList(member("a", "http://a:1"), member("c", "http://c:1"))
        self.service.startService()
        self.assertEqual((self.service.rounds, self.service.failures), (1, 0))
        self.client.answers["a"] = memberList(
            member("a", "http://a:1"), member("c", "http://c:1"), member("d", "http://d:1")
        )
        summary = self.successResultOf(self.service.refreshNow())
        self.assertEqual(
            summary, "membership sync: member list from a:1: 3 endpoints, 1 added, 0 removed"
        )
        self.assertEqual(
            self.service.describe(),
            "member list read every 10s: member list from a:1: 3 endpoints, 1 added, 0 removed",
        )
        self.assertEqual((self.service.rounds, self.service.failures), (2, 0))

    def test_failuresCounted(self):
        """
        A round that can use no member list is a failure, and says why.
        """
        self.service.startService()  # neither a nor b answers
        self.assertEqual((self.service.rounds, self.service.failures), (1, 1))
        self.assertEqual(
            self.service.lastResult,
            "no member list could be used: a:1: no answer; b:1: no answer",
        )
        self.client.answers["a"] = memberList(member("x", "http://x:1"))
        summary = self.successResultOf(self.service.refreshNow())
        self.assertEqual(
            summary,
            "membership sync: member list from a:1 ignored: it would remove every current "
            "endpoint (a:1, b:1)",
        )
        self.assertEqual((self.service.rounds, self.service.failures), (2, 2))

    def test_refreshNowJoinsRunningRound(self):
        """
        SIGHUP while a read runs waits for that read; its result is not
        changed for the loop that waits on it.
        """
        answer = defer.Deferred()
        self.client.answers["a"] = answer
        self.service.startService()
        running = self.service.runNow()
        summary = self.service.refreshNow()
        self.assertNoResult(summary)
        answer.callback(memberList(member("a", "http://a:1"), member("b", "http://b:1")))
        self.assertIn("member list from a:1: 2 endpoints", self.successResultOf(summary))
        self.assertIsNone(self.successResultOf(running))
        self.assertEqual(self.service.rounds, 1)

    def test_roundErrorCounted(self):
        """A round that fails unexpectedly is counted, logged, and the loop goes on."""
        self.service._sync = lambda: defer.fail(RuntimeError("bug"))
        self.service.startService()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual((self.service.rounds, self.service.failures), (1, 1))
        self.assertEqual(self.service.lastResult, "round failed (bug)")
        self.clock.advance(10)
        self.assertEqual(self.service.rounds, 2)
        self.flushLoggedErrors(RuntimeError)
