"""
The connection registry: held connections follow their member's state
(closed with a reset, paced, fail-open), rebalancing, one log line per
episode, and the member sockets' keep-alive options.
"""

import json
import random
import socket

from prometheus_client import generate_latest

from twisted.internet import defer, error, protocol, reactor
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from etcdgw import connections
from etcdgw.config import HeldConfig
from etcdgw.connections import (
    MEMBER_USER_TIMEOUT,
    REASONS,
    REBALANCE_CHECK,
    SETTLE,
    ConnectionRegistry,
    _reasonFor,
    setMemberSocketOptions,
)
from etcdgw.endpoint import Endpoint
from etcdgw.etcdhealth import CheckResult
from etcdgw.fast import gate
from etcdgw.gateway import Gateway, buildGateway
from etcdgw.metrics import gatewayRegistry
from etcdgw.monitor import Monitor
from etcdgw.pool import UpstreamPool
from etcdgw.proxy import GatewayFactory
from etcdgw.status import Health, gatewayStatus, renderFragment
from etcdgw.tap import Options
from tests.test_metrics import samples
from tests import test_proxy_loopback as loopback

A, B, C = Endpoint("10.0.0.1", 2379), Endpoint("10.0.0.2", 2379), Endpoint("10.0.0.3", 2379)

GOOD = CheckResult(healthy=True, answered=True, detail="ok")
BAD = CheckResult(healthy=False, answered=True, detail="no leader")


class FakePair:
    """
    What the proxy registers: a member's state, and reset(), which here
    records when it was called (and, like a client that reconnects,
    optionally registers a new pair where the pool picks).
    """

    def __init__(self, registry, state, clock, reconnect=False):
        self.registry = registry
        self.state = state
        self.clock = clock
        self.reconnect = reconnect
        self.resetAt = None

    def reset(self):
        assert self.resetAt is None, "reset twice"
        self.resetAt = self.clock.seconds()
        self.registry.pool.connectionClosed(self.state)
        if self.reconnect:
            picked = self.registry.pool.pick()
            pair = FakePair(self.registry, picked, self.clock, reconnect=True)
            self.registry.pool.connectionOpened(picked)
            self.registry.register(pair)


class RegistryCase(SynchronousTestCase):
    endpoints = (A, B, C)

    def setUp(self):
        self.clock = Clock()
        self.pool = UpstreamPool(list(self.endpoints), self.clock)
        self.monitor = Monitor(self.pool, self.clock, rise=1, fall=1)
        self.observed = EventLoggingObserver.createWithCleanup(
            self, ConnectionRegistry.log.observer
        )
        # Runs last: every registry stopped, no timer is left.
        self.addCleanup(lambda: self.assertEqual(self.clock.getDelayedCalls(), []))

    @property
    def events(self):
        """
        What the registry logged.
        """
        return [e for e in self.observed if e["log_namespace"].startswith("etcdgw.connections")]

    def registry(self, **kwargs):
        kwargs.setdefault("random", random.Random(4))
        registry = ConnectionRegistry(self.pool, self.monitor, self.clock, **kwargs)
        registry.startService()
        self.addCleanup(self.stopped, registry)
        return registry

    def stopped(self, registry):
        if registry.running:
            registry.stopService()

    def hold(self, registry, endpoint, count, reconnect=False):
        state = self.pool.stateOf(endpoint)
        pairs = []
        for _ in range(count):
            pair = FakePair(registry, state, self.clock, reconnect)
            self.pool.connectionOpened(state)
            registry.register(pair)
            pairs.append(pair)
        return pairs

    def down(self, endpoint):
        self.monitor.dialFailed(
            self.pool.stateOf(endpoint), Failure(error.ConnectionRefusedError())
        )

    def wait(self, seconds, step=0.01):
        for _ in range(int(round(seconds / step))):
            self.clock.advance(step)

    def lines(self):
        return [e["log_format"] for e in self.events]


class CloseTests(RegistryCase):
    def test_downMemberHeldClosed(self):
        """A member marked down: every connection it holds is reset, none elsewhere."""
        registry = self.registry()
        onA = self.hold(registry, A, 5)
        onB = self.hold(registry, B, 3)
        self.down(A)
        self.wait(1)
        self.assertTrue(all(p.resetAt is not None for p in onA))
        self.assertTrue(all(p.resetAt is None for p in onB))
        self.assertEqual(registry.closedBy["down"], 5)
        self.assertEqual(registry.held(), {B.key: 3})

    def test_oldestFirst(self):
        """Within a member, the oldest connections are closed first."""
        registry = self.registry(closeRate=1)
        onA = self.hold(registry, A, 4)
        self.down(A)
        self.wait(10, step=0.1)
        times = [p.resetAt for p in onA]
        self.assertEqual(times, sorted(times))
        self.assertEqual(len(set(times)), 4)

    def test_paced(self):
        """At most about the configured rate a second, jittered, until none is left."""
        registry = self.registry(closeRate=50)
        onA = self.hold(registry, A, 200)
        self.down(A)
        self.wait(1)
        first = sum(1 for p in onA if p.resetAt is not None)
        self.assertTrue(35 <= first <= 60, first)
        self.wait(4)
        times = sorted(p.resetAt for p in onA)
        self.assertNotIn(None, times)
        rate = len(times) / (times[-1] - times[0])
        self.assertTrue(40 <= rate <= 55, rate)
        # No second, counted back from any close, holds more than the rate.
        for i, t in enumerate(times):
            self.assertLessEqual(sum(1 for u in times[i:] if u < t + 1.0), 50)
        # Not in one instant: spread over many distinct times.
        self.assertGreater(len(set(times)), 30)

    def test_failOpen(self):
        """No close while no other member is usable; they start once one is."""
        registry = self.registry()
        onA = self.hold(registry, A, 3)
        self.down(B)
        self.down(C)
        self.down(A)
        self.wait(5)
        self.assertEqual([p.resetAt for p in onA], [None] * 3)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.monitor.probeSucceeded(C, "probe connected")
        resumed = self.clock.seconds()
        self.wait(SETTLE + 1)
        self.assertTrue(all(p.resetAt is not None for p in onA))
        # It waited for the others to be back too, then closed.
        self.assertGreaterEqual(min(p.resetAt for p in onA), resumed + SETTLE)
        self.assertIn("held back", self.events[-1]["outcome"])

    def test_blipEndingMemberByMember(self):
        """
        Every member unhealthy for a moment, then back one by one: the first
        one back does not get the others' clients.
        """
        registry = self.registry()
        for endpoint in (A, B, C):
            self.monitor.checked(endpoint, GOOD)
        held = [self.hold(registry, endpoint, 20) for endpoint in (A, B, C)]
        for endpoint in (A, B, C):
            self.monitor.checked(endpoint, BAD)
        self.wait(2)
        self.monitor.checked(B, GOOD)
        self.wait(1)
        self.monitor.checked(A, GOOD)
        self.monitor.checked(C, GOOD)
        self.wait(SETTLE * 2)
        self.assertEqual(registry.closedBy["unhealthy"], 0)
        self.assertEqual(sum(1 for pairs in held for p in pairs if p.resetAt), 0)
        # Logged as held back, and as ended by the members' return.
        self.assertTrue(all("usable again" in e["outcome"] for e in self.events if "outcome" in e))

    def test_recoveredMemberKeepsTheRest(self):
        """A member usable again mid-way: the closing stops, the rest stay."""
        registry = self.registry(closeRate=10)
        onA = self.hold(registry, A, 30)
        self.down(A)
        self.wait(1)
        self.monitor.probeSucceeded(A, "probe connected")
        closed = sum(1 for p in onA if p.resetAt is not None)
        self.wait(5)
        self.assertEqual(sum(1 for p in onA if p.resetAt is not None), closed)
        self.assertTrue(5 <= closed <= 15, closed)
        self.assertEqual(registry.held(), {A.key: 30 - closed})
        end = self.events[-1]
        self.assertEqual((end["closed"], end["held"], end["left"]), (closed, 30, 30 - closed))
        self.assertIn("usable again", end["outcome"])

    def test_oneLinePerEpisode(self):
        """An episode is one line at its start and one at its end, with the counts."""
        registry = self.registry()
        self.hold(registry, A, 150)
        self.down(A)
        self.wait(3)
        self.assertEqual(len(self.events), 2)
        start, end = self.events
        self.assertEqual((start["endpoint"], start["reason"], start["held"]), (str(A), "down", 150))
        self.assertEqual(start["detail"], "connection refused")
        self.assertEqual((end["closed"], end["held"], end["left"]), (150, 150, 0))

    def test_unhealthy(self):
        """A member the etcd checks find unhealthy: its connections are closed as such."""
        registry = self.registry()
        for endpoint in (A, B, C):
            self.monitor.checked(endpoint, GOOD)
        onA = self.hold(registry, A, 2)
        self.monitor.checked(A, BAD)
        self.wait(1)
        self.assertEqual(registry.closedBy["unhealthy"], 2)
        self.assertTrue(all(p.resetAt is not None for p in onA))

    def test_allUnhealthyFailsOpen(self):
        """Every member unhealthy (no leader anywhere): nothing is closed."""
        registry = self.registry()
        onA = self.hold(registry, A, 2)
        for endpoint in (A, B, C):
            self.monitor.checked(endpoint, BAD)
        self.wait(2)
        self.assertEqual(registry.closedBy["unhealthy"], 0)
        self.assertEqual([p.resetAt for p in onA], [None, None])

    def quiet(self, *endpoints):
        """
        Every probe of C{endpoints} unanswered (they answered before):
        silent or, over the cap, answering slowly.
        """
        for endpoint in (A, B, C):
            self.monitor.answered(endpoint, "HTTP/1.1 200")
        for endpoint in endpoints:
            self.monitor.unanswered(endpoint, "no answer in 500ms")

    def test_allQuietFailsOpen(self):
        """
        Every member quiet (all frozen): the cascade guard keeps all but one
        "answering slowly", hence usable; the silent one's connections stay
        (answering slowly, the others are no place to move clients to).
        """
        registry = self.registry()
        held = [self.hold(registry, endpoint, 4) for endpoint in (A, B, C)]
        self.quiet(A, B, C)
        states = self.pool.states()
        self.assertEqual(sorted((s.silent, s.slow) for s in states),
                         [(False, True), (False, True), (True, False)])
        self.wait(SETTLE * 2)
        self.assertEqual(sum(registry.closedBy.values()), 0)
        self.assertEqual(sum(1 for pairs in held for p in pairs if p.resetAt), 0)
        self.assertEqual(self.events[0]["reason"], "silent")
        # They answer again: the episode ends, nothing was closed.
        for endpoint in (A, B, C):
            self.monitor.answered(endpoint, "HTTP/1.1 200")
        self.wait(1)
        self.assertEqual(sum(1 for pairs in held for p in pairs if p.resetAt), 0)
        self.assertEqual(sum(registry.closedBy.values()), 0)
        ends = [e for e in self.events if "outcome" in e]
        self.assertTrue(ends)
        for end in ends:
            self.assertIn("usable again", end["outcome"])
            self.assertEqual(end["closed"], 0)
        self.assertIn("held back", ends[0]["outcome"])

    def test_frozenTogetherMissApart(self):
        """
        Members frozen together miss their probes a moment apart: the first
        one silent does not send its clients to the others, which have
        missed a probe already, before they turn slow too.
        """
        self.monitor.fall = 2
        registry = self.registry()
        onA = self.hold(registry, A, 4)
        for endpoint in (A, B, C):
            self.monitor.answered(endpoint, "HTTP/1.1 200")
        for endpoint in (A, B, C):
            self.monitor.unanswered(endpoint, "no answer in 500ms")
        self.monitor.unanswered(A, "no answer in 500ms")
        self.assertTrue(self.pool.stateOf(A).silent)
        self.wait(2)
        self.assertEqual([p.resetAt for p in onA], [None] * 4)
        self.monitor.unanswered(B, "no answer in 500ms")
        self.monitor.unanswered(C, "no answer in 500ms")
        self.wait(SETTLE * 2)
        self.assertEqual([p.resetAt for p in onA], [None] * 4)
        self.assertEqual(sum(registry.closedBy.values()), 0)
        for endpoint in (A, B, C):
            self.monitor.answered(endpoint, "HTTP/1.1 200")
            self.monitor.answered(endpoint, "HTTP/1.1 200")

    def test_missedOneThenAnswers(self):
        """
        The only other member missed one probe, then answers: no decision
        is announced, and the held-back closing resumes by itself.
        """
        self.monitor.fall = 2
        registry = self.registry()
        onA = self.hold(registry, A, 2)
        self.down(C)
        for endpoint in (A, B):
            self.monitor.answered(endpoint, "HTTP/1.1 200")
            self.monitor.unanswered(endpoint, "no answer in 500ms")
        self.monitor.unanswered(A, "no answer in 500ms")
        self.wait(2)
        self.assertEqual([p.resetAt for p in onA], [None] * 2)
        self.monitor.answered(B, "HTTP/1.1 200")
        answered = self.clock.seconds()
        self.wait(SETTLE + 2)
        self.assertTrue(all(p.resetAt is not None for p in onA))
        self.assertGreaterEqual(min(p.resetAt for p in onA), answered + SETTLE)

    def test_silentMovedToAnsweringMember(self):
        """
        One member silent, one answering slowly, one answering: the silent
        one's connections are closed (the answering one takes them); the
        slow one keeps its own.
        """
        registry = self.registry()
        onA = self.hold(registry, A, 3)
        onB = self.hold(registry, B, 3)
        self.quiet(A, B)
        self.assertEqual(
            [(s.silent, s.slow) for s in self.pool.states()],
            [(True, False), (False, True), (False, False)],
        )
        self.wait(1)
        self.assertTrue(all(p.resetAt is not None for p in onA))
        self.assertTrue(all(p.resetAt is None for p in onB))
        self.assertEqual(registry.closedBy["silent"], 3)

    def test_slowOthersThenOneAnswers(self):
        """
        Held back while the others answer only slowly; closed (after
        settling) once one answers normally again.
        """
        registry = self.registry()
        onA = self.hold(registry, A, 3)
        self.quiet(A, B, C)
        self.wait(SETTLE + 1)
        self.assertEqual([p.resetAt for p in onA], [None] * 3)
        self.monitor.answered(C, "HTTP/1.1 200")
        back = self.clock.seconds()
        self.wait(SETTLE + 1)
        self.assertTrue(all(p.resetAt is not None for p in onA))
        self.assertGreaterEqual(min(p.resetAt for p in onA), back + SETTLE)

    def test_removed(self):
        """A member that left the endpoint list: its connections are closed."""
        registry = self.registry()
        self.hold(registry, A, 2)
        self.hold(registry, B, 1)
        self.pool.replaceEndpoints([B, C], reason="member list")
        self.wait(1)
        self.assertEqual(registry.closedBy["removed"], 2)
        self.assertEqual(registry.held(), {B.key: 1})
        self.assertEqual(self.events[0]["detail"], "no longer in the endpoint list")

    def test_foreign(self):
        """A member of another cluster: its connections are closed."""
        registry = self.registry()
        self.hold(registry, C, 2)
        self.monitor.reportClusterID(A, "1")
        self.monitor.reportClusterID(B, "1")
        self.monitor.reportClusterID(C, "2")
        self.wait(1)
        self.assertEqual(registry.closedBy["foreign"], 2)

    def test_reasons(self):
        """Each way of not being usable has its reason; a usable member has none."""
        state = self.pool.stateOf(A)
        self.assertIsNone(_reasonFor(state))
        self.assertEqual(_reasonFor(None), "removed")

        class Silent:
            usable = False
            trusted = True
            up = True
            silent = True

        self.assertEqual(_reasonFor(Silent()), "silent")
        self.assertEqual(
            REASONS, ("down", "unhealthy", "silent", "removed", "foreign", "rebalanced")
        )

    def test_joinedDuringEpisode(self):
        """A pair joined to the member during its episode (a racing dial) is closed too."""
        registry = self.registry(closeRate=10)
        self.hold(registry, A, 5)
        self.down(A)
        self.wait(0.2)
        late = self.hold(registry, A, 1)
        self.wait(3)
        self.assertIsNotNone(late[0].resetAt)
        self.assertEqual(registry.closedBy["down"], 6)

    def test_joinedAfterEpisode(self):
        """A pair joined to a bad member after its episode ended (a racing dial) is closed."""
        registry = self.registry()
        self.hold(registry, A, 2)
        self.down(A)
        self.wait(1)
        self.assertEqual(len(self.events), 2)
        late = self.hold(registry, A, 1)
        self.wait(1)
        self.assertIsNotNone(late[0].resetAt)
        self.assertEqual(registry.closedBy["down"], 3)

    def test_joinedWhileNoneUsable(self):
        """A client sent to a bad member because none is usable stays (fail open)."""
        registry = self.registry()
        for endpoint in (A, B, C):
            self.down(endpoint)
        late = self.hold(registry, A, 1)
        self.wait(2)
        self.assertIsNone(late[0].resetAt)

    def test_closedMeanwhile(self):
        """A pair that closed by itself is not closed again, nor counted."""
        registry = self.registry(closeRate=1)
        onA = self.hold(registry, A, 3)
        self.down(A)
        registry.unregister(onA[1])
        registry.unregister(onA[1])
        self.wait(5, step=0.1)
        self.assertIsNone(onA[1].resetAt)
        self.assertEqual(registry.closedBy["down"], 2)

    def test_off(self):
        """--held-close=off: connections stay whatever their member does."""
        registry = self.registry(closeHeld=False)
        onA = self.hold(registry, A, 3)
        self.down(A)
        self.wait(2)
        self.assertEqual([p.resetAt for p in onA], [None] * 3)
        self.assertEqual(self.events, [])

    def test_notStarted(self):
        """A registry that is not running (the proxy's default) only keeps count."""
        registry = ConnectionRegistry(self.pool, self.monitor, self.clock)
        onA = self.hold(registry, A, 2)
        self.down(A)
        self.wait(2)
        self.assertEqual([p.resetAt for p in onA], [None, None])
        self.assertEqual(len(registry), 2)

    def test_stopEndsEpisodes(self):
        """Stopping the gateway stops the closing, with the episode's end line, and every timer."""
        registry = self.registry(closeRate=1)
        self.hold(registry, A, 5)
        self.down(A)
        self.wait(1.5, step=0.1)
        registry.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertIn("stopping", self.events[-1]["outcome"])
        self.wait(5, step=0.1)
        self.assertLess(registry.closedBy["down"], 5)

    def test_raisingReset(self):
        """A pair whose reset raises is logged; the others are still closed."""
        registry = self.registry()
        onA = self.hold(registry, A, 3)

        def broken():
            raise RuntimeError("boom")

        onA[0].reset = broken
        self.down(A)
        self.wait(1)
        self.assertEqual([p.resetAt is not None for p in onA[1:]], [True, True])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(registry.held(), {})


class RebalanceTests(RegistryCase):
    def test_unevenIsEvenedOut(self):
        """After a member returns, the oldest of the most loaded move until within 20%."""
        registry = self.registry(rebalance=True, rebalanceRate=5)
        self.hold(registry, B, 30, reconnect=True)
        self.hold(registry, C, 30, reconnect=True)
        self.wait(REBALANCE_CHECK + 0.01, step=0.1)
        start = self.clock.seconds()
        self.wait(30, step=0.1)
        held = registry.held()
        self.assertEqual(sum(held.values()), 60)
        for key in (A.key, B.key, C.key):
            self.assertTrue(16 <= held[key] <= 24, held)
        moved = registry.closedBy["rebalanced"]
        start, end = [e for e in self.events if "moved" in e or "counts" in e][:2]
        self.assertEqual(end["moved"], moved)
        # Paced: no faster than the rate (a little slack for the jitter).
        self.assertLessEqual(moved / end["elapsed"], 5 * 1.1)
        self.assertGreaterEqual(moved, 20)
        self.assertEqual(end["outcome"], "even")

    def test_evenIsLeftAlone(self):
        """Within 20% of even (or one connection of it), nothing moves."""
        registry = self.registry(rebalance=True)
        self.hold(registry, A, 10)
        self.hold(registry, B, 11)
        self.hold(registry, C, 9)
        self.wait(3 * REBALANCE_CHECK, step=0.5)
        self.assertEqual(registry.closedBy["rebalanced"], 0)
        registry2 = self.registry(rebalance=True)
        self.hold(registry2, A, 1)
        self.hold(registry2, B, 0)
        self.wait(2 * REBALANCE_CHECK, step=0.5)
        self.assertEqual(registry2.closedBy["rebalanced"], 0)

    def test_offByDefault(self):
        """Without --rebalance, an uneven spread stays."""
        registry = self.registry()
        self.hold(registry, B, 30)
        self.wait(3 * REBALANCE_CHECK, step=0.5)
        self.assertEqual(registry.closedBy["rebalanced"], 0)

    def test_closingComesFirst(self):
        """While a bad member's connections are being closed, nothing is rebalanced."""
        registry = self.registry(rebalance=True, closeRate=1)
        self.hold(registry, A, 30)
        self.hold(registry, B, 2)
        self.hold(registry, C, 2)
        self.down(A)
        self.wait(REBALANCE_CHECK + 1, step=0.1)
        self.assertEqual(registry.closedBy["rebalanced"], 0)
        self.assertGreater(registry.closedBy["down"], 0)


class TierTests(RegistryCase):
    endpoints = (
        Endpoint("10.0.0.1", 2379, priority=0),
        Endpoint("10.0.0.2", 2379, priority=0),
        Endpoint("10.0.0.3", 2379, priority=10),
    )

    def test_preferredTierOnly(self):
        """Members of a less preferred SRV tier get no share: nothing moves to them."""
        a, b, c = self.endpoints
        registry = self.registry(rebalance=True)
        self.hold(registry, a, 10)
        self.hold(registry, b, 10)
        self.wait(3 * REBALANCE_CHECK, step=0.5)
        self.assertEqual(registry.closedBy["rebalanced"], 0)
        self.assertEqual(registry.spread()[0], {str(a): 10, str(b): 10})


class SocketOptionTests(SynchronousTestCase):
    def test_memberSocketOptions(self):
        """Keep-alive (5 s idle, every 2 s) and TCP_USER_TIMEOUT (15 s) on a member socket."""
        sock = socket.socket()
        self.addCleanup(sock.close)
        setMemberSocketOptions(sock)
        self.assertEqual(sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE), 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE), 5)
            self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL), 2)
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            self.assertEqual(
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
                MEMBER_USER_TIMEOUT * 1000,
            )

    def test_refusedOptionSkipped(self):
        """A socket that refuses an option (not TCP) still gets the others."""

        class Refusing:
            set = []

            def setsockopt(self, level, option, value):
                if option == socket.SO_KEEPALIVE:
                    raise OSError("no")
                self.set.append(option)

        sock = Refusing()
        setMemberSocketOptions(sock)
        self.assertEqual(len(sock.set), len(connections.MEMBER_SOCKET_OPTIONS) - 1)


class HeldLoopbackTests(TestCase):
    """
    Over real loopback sockets, in this process (the fixture of
    L{tests.test_proxy_loopback}): the member socket's options, and a reset
    from the registry reaching both ends as a reset.
    """

    fast = True
    setUp = loopback.LoopbackTests.setUp
    _listening = loopback.LoopbackTests._listening
    settled = loopback.LoopbackTests.settled
    connect = loopback.LoopbackTests.connect
    upstream = loopback.LoopbackTests.upstream

    @defer.inlineCallbacks
    def test_memberSocketOptions(self):
        """The member socket has keep-alive and TCP_USER_TIMEOUT; the client's has not."""
        client = yield self.connect()
        yield self.upstream()
        (gatewayClient,) = self.gateway.clients
        member = gatewayClient.peer.transport.getHandle()
        self.assertEqual(member.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE), 1)
        self.assertEqual(
            member.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
            MEMBER_USER_TIMEOUT * 1000,
        )
        own = gatewayClient.transport.getHandle()
        self.assertEqual(own.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE), 0)
        client.transport.loseConnection()
        yield client.lost

    @defer.inlineCallbacks
    def test_memberDownResetsBothEnds(self):
        """A member marked down (another one usable): its held pair is reset at both ends."""
        other = reactor.listenTCP(
            0, protocol.Factory.forProtocol(protocol.Protocol), interface="127.0.0.1"
        )
        self.addCleanup(other.stopListening)
        (state,) = self.pool.states()
        self.pool.replaceEndpoints(
            [state.endpoint, Endpoint("127.0.0.1", other.getHost().port)]
        )
        registry = self.gateway.connections
        registry.startService()
        self.addCleanup(registry.stopService)
        client = yield self.connect()
        client.transport.write(b"x")
        upstream = yield self.upstream()
        self.assertEqual(registry.held(), {state.endpoint.key: 1})
        self.gateway.monitor.dialFailed(state, Failure(error.ConnectionRefusedError()))
        yield client.lost
        yield upstream.lost
        self.assertIsInstance(client.reason.value, error.ConnectionLost)
        self.assertIsInstance(upstream.reason.value, error.ConnectionLost)
        self.assertEqual(registry.closedBy["down"], 1)
        self.assertEqual(registry.held(), {})


class StockHeldLoopbackTests(HeldLoopbackTests):
    """
    The same on Twisted's own transports (the gate refused the fast path).
    """

    fast = False

    def setUp(self):
        self.patch(gate, "_decision", gate.Verdict("under test", ("the stock path under test",)))
        return super().setUp()


class FlagTests(SynchronousTestCase):
    """
    --held-close, --held-close-rate, --rebalance, --rebalance-rate: parsed
    into the configuration and wired into the gateway.
    """

    def config(self, *argv):
        options = Options()
        options.parseOptions(list(argv))
        return options.config

    def test_defaults(self):
        """By default: held connections closed at most 100 a second; no rebalancing."""
        self.assertEqual(
            self.config().held,
            HeldConfig(close=True, closeRate=100, rebalance=False, rebalanceRate=5),
        )

    def test_given(self):
        """Each flag reaches the configuration."""
        self.assertEqual(
            self.config("--held-close=off", "--rebalance", "--rebalance-rate=2").held,
            HeldConfig(close=False, closeRate=100, rebalance=True, rebalanceRate=2),
        )
        self.assertEqual(self.config("--held-close-rate=7").held.closeRate, 7)

    def test_errors(self):
        """A bad value, or a rate without its switch, is one line naming the flag."""
        for argv, message in [
            (["--held-close=no"], '--held-close: "no" is not on or off'),
            (["--held-close-rate=0"], "--held-close-rate: 0 is not a number from 1 to 1000000"),
            (
                ["--held-close=off", "--held-close-rate=3"],
                "--held-close-rate needs --held-close=on",
            ),
            (["--rebalance-rate=3"], "--rebalance-rate needs --rebalance"),
        ]:
            e = self.assertRaises(usage.UsageError, self.config, *argv)
            self.assertEqual(str(e), message)

    def test_wired(self):
        """The gateway's registry is the proxy's, a child service, built from the flags."""
        gateway = buildGateway(
            self.config(
                "--endpoints=127.0.0.1:1",
                "--listen-addr=127.0.0.1:0",
                "--held-close-rate=9",
                "--rebalance",
            ),
            MemoryReactorClock(),
        )
        registry = gateway.connections
        self.assertIs(gateway.factory.connections, registry)
        self.assertIs(gateway.service.getServiceNamed("connections"), registry)
        self.assertEqual(
            (registry.closeHeld, registry.closeRate, registry.rebalance, registry.rebalanceRate),
            (True, 9, True, 5),
        )
        self.assertIs(registry.monitor, gateway.monitor)


class CountsShownTests(SynchronousTestCase):
    """
    The held connections closed, by reason: in metrics, /status.json, the
    status page's summary and /health.
    """

    def setUp(self):
        self.clock = Clock()
        self.pool = UpstreamPool([A, B], self.clock)
        self.factory = GatewayFactory(self.pool, self.clock, 1.0)
        self.registry = self.factory.connections
        self.registry.closedBy.update(down=3, rebalanced=7)
        self.gateway = Gateway(
            reactor=self.clock,
            pool=self.pool,
            factory=self.factory,
            connections=self.registry,
        )

    def test_metrics(self):
        """etcd_gateway_held_closed_total has one sample per reason, 0 included."""
        registry = gatewayRegistry(self.gateway, process=False)
        found = samples(generate_latest(registry).decode())
        for reason in REASONS:
            expected = {"down": 3, "rebalanced": 7}.get(reason, 0)
            self.assertEqual(
                found[("etcd_gateway_held_closed_total", frozenset({("reason", reason)}))],
                expected,
            )

    def test_status(self):
        """/status.json and the page's summary give the counts."""
        status = gatewayStatus(self.pool, self.factory, self.clock, connections=self.registry)
        self.assertEqual(
            status["heldClosed"], dict.fromkeys(REASONS, 0) | {"down": 3, "rebalanced": 7}
        )
        self.assertIn("held connections closed: 3 down, 7 rebalanced", renderFragment(status))
        self.assertIsNone(gatewayStatus(self.pool, self.factory, self.clock)["heldClosed"])

    def test_health(self):
        """/health's JSON gives the counts."""
        from twisted.web.test.requesthelper import DummyRequest

        body = json.loads(Health(self.pool, self.registry).render_GET(DummyRequest([b"health"])))
        self.assertEqual(body["heldClosed"]["down"], 3)
        self.assertEqual(body["status"], "ok")
