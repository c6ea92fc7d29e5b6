"""
Membership sync: merging a member list into the endpoints, and the periodic
service, on MemoryReactorClock.
"""

from twisted.internet import defer
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import LogLevel
from twisted.trial.unittest import SynchronousTestCase

from etcdgw.endpoint import Endpoint, parseEndpoints
from etcdgw.etcdhealth import EtcdHTTPError
from etcdgw.membership import MembershipSync, mergeMembers
from etcdgw.pool import UNHEALTHY, UpstreamPool


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
        self.clusterID = None
        self.service = MembershipSync(
            self.pool, self.clock, 10.0, self.client, clusterID=lambda: self.clusterID
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
        self.clusterID = "7"
        self.client.answers["a"] = memberList(member("a", "http://a:1"), clusterID="99")
        self.service.startService()
        self.assertEqual(names(self.pool.endpoints), ["a:1", "b:1"])
        errors = [e for e in self.events if e["log_level"] == LogLevel.error]
        self.assertEqual((errors[0]["clusterID"], errors[0]["expected"]), ("99", "7"))

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
