"""
The connection registry: every live forwarded pair, per member, and what
happens to the pairs a member holds when it goes bad.

etcd clients hold their connection for hours (a grpc channel carries the
watches and the lease keep-alives). Steering new connections away from a
bad member leaves those where they are; the registry moves them:

  - B{Closing held connections} (C{--held-close}, on by default): when the
    monitor announces a change that leaves a member not usable (down,
    unhealthy, silent, of another cluster) or the member leaves the
    endpoint list (member list, SRV set), the client connections it carries
    are closed with a reset, both sides (C{abortConnection}): the client
    notices at once and reconnects through the gateway, to a usable member.
    Paced: at most C{--held-close-rate} a second, in small jittered batches,
    so ten thousand watchers do not reconnect in the same millisecond.
    Never while no other member is usable and answering normally (fail
    open: a client cut with nowhere to go is worse off; a member the
    cascade guard keeps in use although it answers no probe, "answering
    slowly", is no place to go); the closing resumes when one is. A member that becomes usable again mid-way keeps what it still
    holds. Connections on usable members are never touched.
  - B{Rebalancing} (C{--rebalance}, opt-in): when the usable members of the
    preferred tier hold uneven shares of the held connections (after a
    restart, all sit on the others), the oldest connections of the most
    loaded member are closed, at most C{--rebalance-rate} a second, until
    every member is within 20% of its share. Closing held connections comes
    first: no rebalancing while a bad member's connections are being closed.

Each episode (one member's connections closed, one rebalancing) is one log
line when it starts and one when it ends, with counts; never a line per
connection. L{ConnectionRegistry.closedBy} counts the connections closed
per reason (L{REASONS}) for metrics, the status page and C{/health}.

Cost: registration is per connection (a dict insertion when a pair is
joined, a removal when it closes); nothing is done per forwarded chunk.
Connections are closed oldest first: the registry keeps arrival order and
no per-connection byte counters (those would cost per chunk).

TCP keep-alive and C{TCP_USER_TIMEOUT} on member sockets
(L{setMemberSocketOptions}) cover what no probe sees: a member that
vanished from the network under an established connection. The kernel
ends such a connection within about L{MEMBER_USER_TIMEOUT} seconds, idle
or busy, and the proxy passes the error on to the client as a reset.
"""

import random as _random
import socket
from collections import deque

import attr

from twisted.application.service import Service
from twisted.logger import Logger

from etcdgw.duration import formatDuration
from etcdgw.pool import UNHEALTHY

__all__ = [
    "MEMBER_KEEPALIVE_IDLE",
    "MEMBER_KEEPALIVE_INTERVAL",
    "MEMBER_KEEPALIVE_COUNT",
    "MEMBER_USER_TIMEOUT",
    "REASONS",
    "ConnectionRegistry",
    "setMemberSocketOptions",
]

#: Why held connections are closed: the label values of
#: C{etcd_gateway_held_closed_total}.
REASONS = ("down", "unhealthy", "silent", "removed", "foreign", "rebalanced")

#: TCP keep-alive on member sockets: the first probe after this many
#: seconds without traffic, then one every L{MEMBER_KEEPALIVE_INTERVAL}.
MEMBER_KEEPALIVE_IDLE = 5
MEMBER_KEEPALIVE_INTERVAL = 2
#: Unanswered keep-alive probes that end a connection (where
#: C{TCP_USER_TIMEOUT} is missing; Linux bounds the probes by it instead).
MEMBER_KEEPALIVE_COUNT = 3
#: C{TCP_USER_TIMEOUT}, seconds: a member socket whose data (or keep-alive
#: probes) the member has not acknowledged for this long is ended by the
#: kernel. A member that is merely slow still acknowledges (its kernel
#: does): only one that vanished from the network is ended.
MEMBER_USER_TIMEOUT = 15

#: What L{setMemberSocketOptions} sets: C{(level, option, value)}, the ones
#: this platform has.
MEMBER_SOCKET_OPTIONS = tuple(
    (level, getattr(socket, name), value)
    for level, name, value in (
        (socket.SOL_SOCKET, "SO_KEEPALIVE", 1),
        (socket.IPPROTO_TCP, "TCP_KEEPIDLE", MEMBER_KEEPALIVE_IDLE),
        (socket.IPPROTO_TCP, "TCP_KEEPINTVL", MEMBER_KEEPALIVE_INTERVAL),
        (socket.IPPROTO_TCP, "TCP_KEEPCNT", MEMBER_KEEPALIVE_COUNT),
        (socket.IPPROTO_TCP, "TCP_USER_TIMEOUT", MEMBER_USER_TIMEOUT * 1000),
    )
    if hasattr(socket, name)
)


def setMemberSocketOptions(sock):
    """
    Keep-alive and C{TCP_USER_TIMEOUT} on C{sock}, a socket to an etcd
    member (see the module docstring). Once per connection, where the
    socket is made (the fast path) or connected (Twisted's transports).
    An option the socket refuses is skipped.
    """
    for level, option, value in MEMBER_SOCKET_OPTIONS:
        try:
            sock.setsockopt(level, option, value)
        except OSError:
            pass


#: The period of the closing loop, seconds, at rates of 10 a second and
#: more (below, one connection per period of 1/rate). Each wait is drawn
#: from half to one and a half periods; the budget follows the time really
#: elapsed, so the rate holds on average, and no second (counted back from
#: any moment) sees more than the rate.
TICK = 0.1
#: After a moment when no member was usable (the closing was held back),
#: how long the closing waits once one is, seconds: a blip that every
#: member's check saw (a leader election, the gateway's own network) ends
#: member by member, and the first one back should not get every client of
#: the others, which are about to be back too.
SETTLE = 5.0
#: While the closing is held back and some member is usable but not
#: answering normally (see L{ConnectionRegistry._answering}), how often it
#: looks again, seconds.
RECHECK = 0.5
#: How often the spread of held connections is looked at, with
#: C{--rebalance}.
REBALANCE_CHECK = 5.0
#: A member is balanced when its held connections are within this share of
#: its even share (or within one connection of it).
BALANCE_TOLERANCE = 0.2


def _reasonFor(state):
    """
    Why the member of C{state} (an L{etcdgw.pool.EndpointState}, or
    L{None} once it left the endpoint list) may not keep its held
    connections: one of L{REASONS}, or L{None} while it is usable.
    """
    if state is None:
        return "removed"
    if state.usable:
        return None
    if not state.trusted:
        return "foreign"  # of another cluster, or no longer proven of ours
    if not state.up:
        return "down"
    if state.silent:
        return "silent"
    return "unhealthy"


def _detailFor(state, reason):
    """
    The one-line why of C{reason} for the log.
    """
    if state is None:
        return "no longer in the endpoint list"
    if reason == "foreign":
        return f"cluster ID {state.clusterID}"
    if reason == "down":
        return state.reason
    if reason == "silent":
        return state.silenceReason
    if state.health == UNHEALTHY:
        return state.healthReason
    return "not usable"


@attr.s(slots=True)
class _Episode:
    """
    One member's held connections being closed.

    @ivar queue: the pairs to close, oldest first (taken when the episode
        starts, and again when it runs out, for pairs that joined since).
    """

    endpoint = attr.ib()
    reason = attr.ib()
    detail = attr.ib()
    started = attr.ib()
    held = attr.ib()
    queue = attr.ib()
    closed = attr.ib(default=0)
    waited = attr.ib(default=False)


@attr.s(slots=True)
class _Rebalance:
    """
    One rebalancing: its start, and how many connections it moved.
    """

    started = attr.ib()
    before = attr.ib()
    moved = attr.ib(default=0)


class ConnectionRegistry(Service):
    """
    The live forwarded pairs, by member; closes a bad member's pairs and,
    with C{rebalance}, evens out the spread (see the module docstring).

    A pair is what the proxy registers (L{etcdgw.proxy.ClientProtocol}):
    it has C{state} (the L{etcdgw.pool.EndpointState} of its member) and
    C{reset()} (abort both connections). The registry acts only while it
    runs as a service; stopped (or never started) it only keeps count.

    @ivar closedBy: connections closed by the registry, by reason
        (L{REASONS}).
    @ivar closeHeld: whether a bad member's connections are closed
        (C{--held-close}).
    @ivar closeRate: at most this many closed a second
        (C{--held-close-rate}).
    @ivar rebalance: whether the spread is evened out (C{--rebalance}).
    @ivar rebalanceRate: at most this many moved a second
        (C{--rebalance-rate}).
    """

    log = Logger()

    def __init__(
        self,
        pool,
        monitor,
        clock,
        closeHeld=True,
        closeRate=100,
        rebalance=False,
        rebalanceRate=5,
        random=None,
    ):
        """
        @param monitor: the L{etcdgw.monitor.Monitor} whose changes are
            followed once running.
        @param clock: an L{IReactorTime}: every timer goes through it.
        @param random: the jitter's random source (tests give a seeded one).
        """
        self.pool = pool
        self.monitor = monitor
        self.clock = clock
        self.closeHeld = closeHeld
        self.closeRate = closeRate
        self.rebalance = rebalance
        self.rebalanceRate = rebalanceRate
        self.closedBy = dict.fromkeys(REASONS, 0)
        self._random = random if random is not None else _random.Random()
        #: Endpoint key -> {pair: None}, in arrival order.
        self._pairs = {}
        #: Endpoint key -> its _Episode, in start order.
        self._episodes = {}
        self._rebalancing = None
        self._timer = None
        self._checkTimer = None
        self._recheckTimer = None
        self._budget = 0.0
        self._last = None
        #: (time, connections closed) of the loop's turns of the last second.
        self._recent = deque()
        self._closedThisTurn = 0
        #: The loop stopped because no member was usable: it settles first
        #: when it starts again (L{SETTLE}).
        self._heldBack = False

    # Registration (the proxy): once per connection.

    def register(self, pair):
        """
        C{pair} is joined to its member (C{pair.state}).
        """
        key = pair.state.endpoint.key
        pairs = self._pairs.get(key)
        if pairs is None:
            pairs = self._pairs[key] = {}
        pairs[pair] = None
        if self.running and key not in self._episodes:
            state = self.pool.stateOf(pair.state.endpoint)
            if state is None or not state.usable:
                # A dial that raced its member's change (or a client sent
                # there because no member is usable: then nothing happens).
                self._reconsider()

    def unregister(self, pair):
        """
        C{pair} is closed (or closing). Called again for the same pair, or
        for one the registry closed itself, it does nothing.
        """
        key = pair.state.endpoint.key
        pairs = self._pairs.get(key)
        if pairs is not None and pairs.pop(pair, _GONE) is not _GONE and not pairs:
            del self._pairs[key]

    def pairs(self):
        """
        Every live pair, a list (each member's in arrival order).
        """
        return [pair for pairs in self._pairs.values() for pair in pairs]

    def held(self):
        """
        The number of live pairs by endpoint key (only keys with some).
        """
        return {key: len(pairs) for key, pairs in self._pairs.items()}

    def __len__(self):
        return sum(len(pairs) for pairs in self._pairs.values())

    # The service: follow the monitor and the endpoint list while running.

    def startService(self):
        super().startService()
        self.monitor.subscribe(self._changed)
        self.pool.addObserver(self._poolChanged)
        if self.rebalance:
            self._checkTimer = self.clock.callLater(REBALANCE_CHECK, self._checkSpread)
        self._reconsider()

    def stopService(self):
        super().stopService()
        self.monitor.unsubscribe(self._changed)
        self.pool.removeObserver(self._poolChanged)
        for timer in (self._timer, self._checkTimer, self._recheckTimer):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = self._checkTimer = self._recheckTimer = None
        for key in list(self._episodes):
            self._endEpisode(key, "the gateway is stopping")
        if self._rebalancing is not None:
            self._endRebalance("the gateway is stopping")

    def _changed(self, change):
        # A decision of the monitor (a Change): the pool holds it already.
        self._reconsider()

    def _poolChanged(self, pool):
        # A state change or a new endpoint list (which the monitor does not
        # announce: removed members are found here).
        self._reconsider()

    # Closing a bad member's connections.

    def _reconsider(self):
        """
        Start an episode for each member that holds connections and may
        not keep them; end the episodes of members usable again; (re)start
        the closing loop when there is work and somewhere to go.
        """
        if not self.running:
            return
        states = {state.endpoint.key: state for state in self.pool.states()}
        for key, episode in list(self._episodes.items()):
            state = states.get(key)
            reason = _reasonFor(state)
            if reason is None:
                self._endEpisode(key, "it is usable again: what it still holds stays")
            elif reason != episode.reason:
                episode.reason = reason
                episode.detail = _detailFor(state, reason)
        if self.closeHeld:
            for key, pairs in self._pairs.items():
                if key in self._episodes:
                    continue
                state = states.get(key)
                reason = _reasonFor(state)
                if reason is not None:
                    self._startEpisode(key, state, reason, pairs)
        if self._episodes and self._rebalancing is not None:
            self._endRebalance("held connections of a member that went bad come first")
        self._schedule()

    def _otherUsable(self):
        """
        Whether some member is usable and answering normally (every member
        with an episode is not usable): closing sends clients there. One the
        cascade guard keeps in use while it answers no probe ("answering
        slowly") does not count: with every member quiet (all frozen, or
        all slow) the guard keeps all but a few usable, and moving the
        silent ones' clients onto those would cut clients for nothing
        (fail open).
        """
        return any(self._answering(state) for state in self.pool.states())

    def _answering(self, state):
        """
        Whether C{state}'s member is usable and answering normally: not
        kept in use by the cascade guard ("answering slowly"), and not
        between two verdicts after a missed probe (members frozen together
        miss their probes a few hundred milliseconds apart: the first one
        silent must not send its clients to the others meanwhile).
        """
        return state.usable and not state.slow and not self.monitor.changing(state.endpoint)

    def _waitingForAnswers(self):
        """
        Whether some member is usable but not answering normally: its
        verdict may change without any announcement (one missed probe, then
        an answer), so the held-back closing looks again every L{RECHECK}.
        """
        return any(state.usable for state in self.pool.states())

    def _startEpisode(self, key, state, reason, pairs):
        endpoint = state.endpoint if state is not None else next(iter(pairs)).state.endpoint
        episode = self._episodes[key] = _Episode(
            endpoint=endpoint,
            reason=reason,
            detail=_detailFor(state, reason),
            started=self.clock.seconds(),
            held=len(pairs),
            queue=list(reversed(pairs)),  # popped from the end: oldest first
        )
        if self._otherUsable():
            self.log.warn(
                "member {endpoint} is {reason} ({detail}): closing the {held} client "
                "connections it holds, with a reset, at most {rate} a second; they "
                "reconnect to usable members",
                endpoint=str(endpoint),
                reason=reason,
                detail=episode.detail,
                held=episode.held,
                rate=self.closeRate,
            )
        else:
            episode.waited = True
            self.log.warn(
                "member {endpoint} is {reason} ({detail}): the {held} client connections "
                "it holds stay open while no other member is usable (fail open); they are "
                "closed, at most {rate} a second, once one is",
                endpoint=str(endpoint),
                reason=reason,
                detail=episode.detail,
                held=episode.held,
                rate=self.closeRate,
            )

    def _endEpisode(self, key, outcome):
        episode = self._episodes.pop(key)
        left = len(self._pairs.get(key, ()))
        if episode.waited:
            outcome += " (held back while no other member was usable)"
        self.log.info(
            "member {endpoint} ({reason}): closed {closed} of the {held} client "
            "connections it held in {elapsed:.1f}s; {outcome}; {left} still open",
            endpoint=str(episode.endpoint),
            reason=episode.reason,
            detail=episode.detail,
            closed=episode.closed,
            held=episode.held,
            elapsed=self.clock.seconds() - episode.started,
            outcome=outcome,
            left=left,
            waited=episode.waited,
        )

    # The pacing loop, shared by closing and rebalancing.

    def _rate(self):
        return self.closeRate if self._episodes else self.rebalanceRate

    def _period(self):
        return max(TICK, 1.0 / self._rate())

    def _schedule(self):
        """
        Run the loop while there is work and a usable member to send
        clients to; stop it otherwise.
        """
        work = bool(self._episodes) or self._rebalancing is not None
        if not (self.running and work and self._otherUsable()):
            if self.running and self._episodes:
                self._heldBack = True
                for episode in self._episodes.values():
                    episode.waited = True
                if self._recheckTimer is None and self._waitingForAnswers():
                    self._recheckTimer = self.clock.callLater(RECHECK, self._recheck)
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = None
            self._last = None
            return
        if self._recheckTimer is not None:
            if self._recheckTimer.active():
                self._recheckTimer.cancel()
            self._recheckTimer = None
        if self._timer is None:
            settle = SETTLE if self._heldBack else 0.0
            jitter = self._random.uniform(0, self._period())
            self._timer = self.clock.callLater(settle + jitter, self._tick)
            self._last = self.clock.seconds() + settle
            self._budget = 0.0

    def _recheck(self):
        self._recheckTimer = None
        self._schedule()

    def _tick(self):
        self._timer = None
        if not self._otherUsable():
            self._schedule()  # stops until a member is usable again
            return
        self._heldBack = False
        now = self.clock.seconds()
        rate = self._rate()
        period = self._period()
        # What the time elapsed allows, never more than two periods' worth
        # (a loop that waited does not burst), nor more than the rate less
        # what the last second closed.
        recent = self._recent
        while recent and recent[0][0] <= now - 1.0:
            recent.popleft()
        allowed = rate - sum(n for _, n in recent)
        self._budget = min(
            self._budget + (now - self._last) * rate, 2 * period * rate, max(allowed, 0)
        )
        self._last = now
        self._closedThisTurn = 0
        if self._episodes:
            self._closeSome()
        elif self._rebalancing is not None:
            self._moveSome()
        if self._closedThisTurn:
            recent.append((now, self._closedThisTurn))
        work = bool(self._episodes) or self._rebalancing is not None
        if work and self.running and self._otherUsable():
            self._timer = self.clock.callLater(
                self._random.uniform(0.5, 1.5) * period, self._tick
            )
        else:
            self._schedule()  # stops: nothing to do, or nowhere to send clients

    def _closeSome(self):
        """
        Close what the budget allows, taking the members in turn, each's
        oldest first; end the episodes of members that hold nothing more.
        """
        while self._budget >= 1 and self._episodes:
            progressed = False
            for key, episode in list(self._episodes.items()):
                if self._budget < 1:
                    break
                pair = self._nextOf(key, episode)
                if pair is None:
                    self._endEpisode(key, "none left")
                    continue
                self._close(key, pair, episode.reason)
                episode.closed += 1
                self._budget -= 1
                progressed = True
            if not progressed:
                break
        for key in list(self._episodes):
            if not self._pairs.get(key):
                self._endEpisode(key, "none left")

    def _nextOf(self, key, episode):
        """
        The next live pair of C{episode}'s member, oldest first, or
        L{None}.
        """
        pairs = self._pairs.get(key)
        if not pairs:
            episode.queue = []
            return None
        for attempt in range(2):
            queue = episode.queue
            while queue:
                pair = queue.pop()
                if pair in pairs:
                    return pair
            # Pairs that joined during the episode (a dial that raced the
            # change): they go too.
            episode.queue = list(reversed(pairs))
        return None

    def _close(self, key, pair, reason):
        """
        Unregister C{pair} and reset both its connections; count it.
        """
        pairs = self._pairs[key]
        del pairs[pair]
        if not pairs:
            del self._pairs[key]
        self.closedBy[reason] += 1
        self._closedThisTurn += 1
        try:
            pair.reset()
        except Exception:
            self.log.failure(
                "closing a held connection of {endpoint} failed", endpoint=key
            )

    # Rebalancing.

    def _tier(self):
        """
        The usable members where new connections go (the pool's preferred
        tier), with their target shares (by SRV weight where weights
        differ, else even): C{[(state, share)]}.
        """
        usable = [state for state in self.pool.states() if state.usable]
        if not usable:
            return []
        best = min(state.endpoint.priority for state in usable)
        tier = [state for state in usable if state.endpoint.priority == best]
        weights = [max(state.endpoint.weight, 1) for state in tier]
        if len(set(weights)) == 1:
            weights = [1] * len(tier)
        total = sum(weights)
        return [(state, weight / total) for state, weight in zip(tier, weights)]

    def spread(self):
        """
        The held connections of the preferred tier's usable members:
        C{(counts, excess)}, C{counts} by endpoint (as text), C{excess} the
        member most above its share (its state) or L{None} when every
        member is within L{BALANCE_TOLERANCE} of its share (or one
        connection of it).
        """
        tier = self._tier()
        pairs = self._pairs
        counts = {state.endpoint.key: len(pairs.get(state.endpoint.key, ())) for state, _ in tier}
        total = sum(counts.values())
        shown = {str(state.endpoint): counts[state.endpoint.key] for state, _ in tier}
        if len(tier) < 2 or total == 0:
            return shown, None
        worst = None
        uneven = False
        for state, share in tier:
            target = total * share
            count = counts[state.endpoint.key]
            if abs(count - target) > max(BALANCE_TOLERANCE * target, 1):
                uneven = True
            ratio = count / target
            if worst is None or ratio > worst[0]:
                worst = (ratio, state)
        return shown, (worst[1] if uneven else None)

    def _checkSpread(self):
        self._checkTimer = self.clock.callLater(REBALANCE_CHECK, self._checkSpread)
        if self._episodes or self._rebalancing is not None:
            return
        counts, loaded = self.spread()
        if loaded is None:
            return
        self._rebalancing = _Rebalance(self.clock.seconds(), counts)
        self.log.info(
            "held connections are uneven ({counts}): moving the oldest from the most "
            "loaded members, at most {rate} a second (each move closes a client "
            "connection; the client reconnects), until each is within {tolerance:.0%} "
            "of its share",
            counts=counts,
            rate=self.rebalanceRate,
            tolerance=BALANCE_TOLERANCE,
        )
        self._schedule()

    def _moveSome(self):
        while self._budget >= 1:
            counts, loaded = self.spread()
            if loaded is None:
                self._endRebalance("even")
                return
            key = loaded.endpoint.key
            pair = next(iter(self._pairs[key]))
            self._close(key, pair, "rebalanced")
            self._rebalancing.moved += 1
            self._budget -= 1

    def _endRebalance(self, outcome):
        rebalancing, self._rebalancing = self._rebalancing, None
        counts, _ = self.spread()
        self.log.info(
            "rebalancing ended ({outcome}): moved {moved} client connections in "
            "{elapsed:.1f}s; held connections {before} before, {counts} now",
            outcome=outcome,
            moved=rebalancing.moved,
            elapsed=self.clock.seconds() - rebalancing.started,
            before=rebalancing.before,
            counts=counts,
        )

    def describe(self):
        """
        One line for the start-up log: what is done with held connections.
        """
        close = (
            f"closed, at most {self.closeRate} a second, when their member goes bad"
            if self.closeHeld
            else "left open when their member goes bad (--held-close=off)"
        )
        rebalance = ""
        if self.rebalance:
            rebalance = (
                f"; rebalanced, at most {self.rebalanceRate} a second, when uneven "
                f"(looked at every {formatDuration(REBALANCE_CHECK)})"
            )
            if self.pool.policyName != "least-connections":
                rebalance += (
                    f" (with --policy={self.pool.policyName} a moved client reconnects "
                    "to any member: about as many moves as there are members for each "
                    "connection evened out; --policy=least-connections sends it to the "
                    "least loaded)"
                )
        return f"held client connections are {close}{rebalance}"


_GONE = object()
