"""
The upstream pool: the one owner of endpoint state and the pick policy.

Health checks and discovery only tell it things (L{UpstreamPool.markDown},
L{UpstreamPool.markUp}, L{UpstreamPool.replaceEndpoints}); the proxy only asks
it (L{UpstreamPool.pick}) and reports on the connections it opens.
"""

import random

from twisted.logger import Logger

UP = "up"
DOWN = "down"

#: etcd health (a second dimension next to TCP up/down, set by
#: L{etcdgw.etcdhealth}): not checked (yet), or what the member said.
UNKNOWN = "unknown"
HEALTHY = "healthy"
UNHEALTHY = "unhealthy"


class ByteCount:
    """
    A byte counter that the forwarding path adds to directly (see
    L{etcdgw.transport.join}): one per endpoint and direction.
    """

    __slots__ = ("n",)

    def __init__(self):
        self.n = 0


class EndpointState:
    """
    What the pool knows about one endpoint. Mutable, owned by the pool; other
    modules read it (metrics, the status page) but never write it.

    @ivar endpoint: the L{etcdgw.endpoint.Endpoint}.
    @ivar state: L{UP} or L{DOWN}.
    @ivar since: the clock's time of the last state change (or of joining).
    @ivar reason: why it is in that state.
    @ivar active: connections open to it now.
    @ivar connections: connections ever opened to it.
    @ivar dialAttempts: dials started to it (by the proxy).
    @ivar dialFailures: dials to it that failed.
    @ivar toUpstream: L{ByteCount} of bytes forwarded from clients to it
        (also read and set as C{bytesToUpstream}).
    @ivar fromUpstream: L{ByteCount} of bytes forwarded from it to clients
        (also read and set as C{bytesFromUpstream}).
    @ivar health: L{UNKNOWN}, L{HEALTHY} or L{UNHEALTHY}: what etcd-aware
        checks say (L{UNKNOWN} when they are off or have not answered yet).
    @ivar healthReason: why it has that health.
    @ivar clusterID: the etcd cluster ID the member reported, or L{None}.
    @ivar foreign: the member reported another cluster ID than the one the
        gateway serves (L{etcdgw.etcdhealth.ClusterIdentity}): it is never
        picked.
    @ivar learned: the endpoint came from a member list, not from the
        configuration (C{--endpoints}, SRV): it never votes on the cluster ID
        and gets no client until it is L{proven}.
    @ivar proven: it reported the cluster ID the gateway serves.
    @ivar answering: the last etcd health check got an HTTP answer (L{True}
        until a check says otherwise): among unhealthy members, those that
        answer are picked before those that do not.
    """

    __slots__ = (
        "endpoint",
        "state",
        "since",
        "reason",
        "active",
        "connections",
        "dialAttempts",
        "dialFailures",
        "toUpstream",
        "fromUpstream",
        "health",
        "healthReason",
        "clusterID",
        "foreign",
        "learned",
        "proven",
        "answering",
    )

    def __init__(self, endpoint, since):
        self.endpoint = endpoint
        self.active = 0
        self.connections = 0
        self.dialAttempts = 0
        self.dialFailures = 0
        self.toUpstream = ByteCount()
        self.fromUpstream = ByteCount()
        self._rejoin(since, "configured")

    def _rejoin(self, since, reason, learned=False):
        """
        Start over as a new endpoint of the pool (up, health and identity
        unknown), keeping the counters: an endpoint removed while it still
        had connections and added again counts them on, and its totals never
        go back.
        """
        self.state = UP
        self.since = since
        self.reason = reason
        self.health = UNKNOWN
        self.healthReason = "not checked"
        self.clusterID = None
        self.foreign = False
        self.learned = learned
        self.proven = False
        self.answering = True

    @property
    def bytesToUpstream(self):
        return self.toUpstream.n

    @bytesToUpstream.setter
    def bytesToUpstream(self, n):
        self.toUpstream.n = n

    @property
    def bytesFromUpstream(self):
        return self.fromUpstream.n

    @bytesFromUpstream.setter
    def bytesFromUpstream(self, n):
        self.fromUpstream.n = n

    @property
    def up(self):
        return self.state == UP

    @property
    def trusted(self):
        """
        Not of another cluster, and, when learned from a member list, proven
        of the gateway's: only trusted endpoints are ever picked.
        """
        return not self.foreign and (self.proven or not self.learned)

    @property
    def usable(self):
        """
        Up, not known unhealthy, and trusted: preferred by pick.
        """
        return self.state == UP and self.health != UNHEALTHY and self.trusted


def _roundRobin(pool, tier):
    """
    Round-robin in configured order: a shared cursor over the pool's endpoints
    moves past each pick, so a, b, c, a, b, c with every endpoint up and a, c,
    a, c with b down.
    """
    order = pool._order
    count = len(order)
    members = {state.endpoint.key for state in tier}
    for step in range(count):
        index = (pool._cursor + step) % count
        key = order[index]
        if key in members:
            pool._cursor = (index + 1) % count
            return pool._states[key]
    return tier[0]  # unreachable while tier is drawn from the pool


#: The share of picks that weight-0 records get, together, when records of
#: the same priority have weights (RFC 2782: "a very small chance").
ZERO_WEIGHT_SHARE = 0.01


def _weighted(pool, tier):
    """
    RFC 2782 weighted random choice: each endpoint with weight w > 0 is chosen
    with probability w / sum(w); weight-0 endpoints share L{ZERO_WEIGHT_SHARE}
    of the picks. When no weight is set, round-robin.
    """
    weighted = [state for state in tier if state.endpoint.weight > 0]
    if not weighted:
        return _roundRobin(pool, tier)
    zero = [state for state in tier if state.endpoint.weight <= 0]
    if zero and pool._random.random() < ZERO_WEIGHT_SHARE:
        return zero[pool._random.randrange(len(zero))]
    total = sum(state.endpoint.weight for state in weighted)
    # A uniform choice in [0, total): the first record whose running sum
    # exceeds it wins, so each is chosen in proportion to its weight (etcd's
    # gateway is off by one here and always picks the first of two
    # weight-1 records).
    choice = pool._random.random() * total
    running = 0
    for state in weighted:
        running += state.endpoint.weight
        if choice < running:
            return state
    return weighted[-1]


def _smoothWeighted(pool, tier):
    """
    Smooth weighted round-robin (nginx's): deterministic, in proportion to
    the weights, and interleaved (weights 5, 1, 1 give a a b a c a a, not
    a a a a a b c). Each pick adds every endpoint's weight to its running
    credit, takes the endpoint with the most credit (the first in configured
    order on a tie) and takes the tier's total weight from it. A weight of 0
    counts as 1, so endpoints without weights rotate evenly.
    """
    credit = pool._credit
    total = 0
    best = None
    for state in tier:
        weight = max(state.endpoint.weight, 1)
        total += weight
        key = state.endpoint.key
        credit[key] = credit.get(key, 0) + weight
        if best is None or credit[key] > credit[best.endpoint.key]:
            best = state
    credit[best.endpoint.key] -= total
    return best


def _leastConnections(pool, tier):
    """
    The endpoint with the fewest active connections; ties are broken in
    round-robin order, so an idle pool still rotates.
    """
    fewest = min(state.active for state in tier)
    return _roundRobin(pool, [state for state in tier if state.active == fewest])


#: Pick policies by C{--policy} name. Every policy first keeps only the
#: usable endpoints of the lowest priority (RFC 2782), then chooses inside
#: that tier:
#:
#:  - C{round-robin} (the default, as etcd's gateway): the RFC 2782 rule,
#:    a weighted random choice when SRV records carry weights, a strict
#:    rotation in configured order when none does (static endpoints).
#:  - C{weighted}: smooth weighted round-robin, deterministic; weights from
#:    SRV records (static endpoints have none: 0, which counts as 1).
#:  - C{least-connections}: the fewest open connections, rotating on ties;
#:    rebalances long-lived etcd client connections after a member returns.
POLICIES = {
    "round-robin": _weighted,
    "weighted": _smoothWeighted,
    "least-connections": _leastConnections,
}


class UpstreamPool:
    """
    The endpoints, which of them are up, and how the next one is picked.

    @ivar clock: an L{IReactorTime} for state-change times.
    """

    log = Logger()

    def __init__(self, endpoints, clock, policy="round-robin", random=None):
        self.clock = clock
        if policy not in POLICIES:
            raise ValueError(
                f'unknown policy "{policy}" (expected one of {", ".join(POLICIES)})'
            )
        self._policy = POLICIES[policy]
        self._credit = {}
        self._degraded = False
        self.policyName = policy
        self._random = random if random is not None else _systemRandom
        self._states = {}
        #: Removed endpoints' states while they still have connections, by
        #: key: see L{replaceEndpoints} and L{connectionClosed}.
        self._retired = {}
        self._order = []
        self._cursor = 0
        self._observers = []
        self.replaceEndpoints(endpoints, reason="configured")

    # Reading

    @property
    def endpoints(self):
        """
        The endpoints, in configured order.
        """
        return [self._states[key].endpoint for key in self._order]

    def states(self):
        """
        The L{EndpointState} of every endpoint, in configured order.
        """
        return [self._states[key] for key in self._order]

    def stateOf(self, endpoint):
        """
        The L{EndpointState} of C{endpoint}, or L{None} if it is not in the pool.
        """
        return self._states.get(endpoint.key)

    def isUp(self, endpoint):
        state = self._states.get(endpoint.key)
        return state is not None and state.up

    def upCount(self):
        return sum(1 for key in self._order if self._states[key].up)

    def down(self):
        """
        The endpoints that are down, in configured order.
        """
        return [s.endpoint for s in self.states() if not s.up]

    # Picking

    def usable(self):
        """
        The states of the endpoints that are up, not known unhealthy and
        trusted (L{EndpointState.trusted}), in configured order: where new
        connections go.
        """
        return [s for s in self.states() if s.usable]

    def pick(self, exclude=()):
        """
        Choose the endpoint for a new connection: among up endpoints not in
        C{exclude} and trusted (never one of another cluster, never one
        learned from a member list before it proved its cluster ID), the
        healthy ones (or, when none is, the unhealthy ones that still accept
        TCP, those whose health checks get an answer first), the lowest
        priority tier, then the policy.

        @param exclude: endpoints (or their keys) already tried for this client.
        @return: an L{EndpointState}, or L{None} when no endpoint is up.
        """
        excluded = {getattr(e, "key", e) for e in exclude}
        candidates = []
        fallback = []
        for key in self._order:
            state = self._states[key]
            if state.state != UP or not state.trusted or key in excluded:
                continue
            (fallback if state.health == UNHEALTHY else candidates).append(state)
        best = None
        tier = []
        if not candidates:
            # Without a leader the members answer 503; a frozen one does
            # not answer at all, and a client sent there would hang.
            candidates = [s for s in fallback if s.answering] or fallback
        for state in candidates:
            priority = state.endpoint.priority
            if best is None or priority < best:
                best = priority
                tier = [state]
            elif priority == best:
                tier.append(state)
        if not tier:
            return None
        if len(tier) == 1:
            self._cursor = (self._order.index(tier[0].endpoint.key) + 1) % len(
                self._order
            )
            return tier[0]
        return self._policy(self, tier)

    # Being told

    def markDown(self, endpoint, reason):
        """
        C{endpoint} failed (a dial, a probe): no new connections go to it until
        it is marked up. Logs the change once; a repeat is ignored.
        """
        self._setState(endpoint, DOWN, reason)

    def markUp(self, endpoint, reason):
        """
        C{endpoint} answered: new connections may go to it again.
        """
        self._setState(endpoint, UP, reason)

    def _setState(self, endpoint, new, reason):
        state = self._states.get(endpoint.key)
        if state is None or state.state == new:
            return
        old = state.state
        state.state = new
        state.since = self.clock.seconds()
        state.reason = reason
        emit = self.log.warn if new == DOWN else self.log.info
        emit(
            "endpoint {endpoint} {old} -> {new}: {reason} ({upCount}/{total} up)",
            endpoint=str(endpoint),
            old=old,
            new=new,
            reason=reason,
            upCount=self.upCount(),
            total=len(self._order),
        )
        if new == DOWN and self.upCount() == 0:
            self.log.error(
                "every endpoint is down: new clients are refused until one answers"
            )
        self._checkDegraded()
        self._notify()

    def setHealth(self, endpoint, health, reason):
        """
        C{endpoint}'s etcd health is now C{health} (L{HEALTHY}, L{UNHEALTHY}
        or L{UNKNOWN}). An unhealthy endpoint gets no new connections while
        another one is healthy. Logs the change; a repeat is ignored.
        """
        state = self._states.get(endpoint.key)
        if state is None or state.health == health:
            return
        old = state.health
        state.health = health
        state.healthReason = reason
        emit = self.log.warn if health == UNHEALTHY else self.log.info
        emit(
            "endpoint {endpoint} etcd health {old} -> {new}: {reason} "
            "({usable}/{total} usable)",
            endpoint=str(endpoint),
            old=old,
            new=health,
            reason=reason,
            usable=len(self.usable()),
            total=len(self._order),
        )
        self._checkDegraded()
        self._notify()

    def setAnswering(self, endpoint, answering):
        """
        Whether C{endpoint}'s last etcd health check got an HTTP answer (see
        L{pick}). Not logged: a change of health is.
        """
        state = self._states.get(endpoint.key)
        if state is not None:
            state.answering = answering

    def setIdentity(self, endpoint, clusterID, foreign, majority=None, proven=None):
        """
        Record the cluster ID C{endpoint} reported, and the verdict of
        L{etcdgw.etcdhealth.ClusterIdentity}: C{foreign} (of another cluster
        than the gateway's, C{majority}: never picked; logged at error level,
        once) and C{proven} (it reported C{majority}; by default, whether
        C{clusterID == majority}): a learned endpoint gets clients only once
        proven.
        """
        state = self._states.get(endpoint.key)
        if state is None:
            return
        state.clusterID = clusterID
        if proven is None:
            proven = not foreign and majority is not None and clusterID == majority
        wasTrusted = state.trusted
        changed = (state.foreign, state.proven) != (foreign, proven)
        state.foreign, state.proven = foreign, proven
        if not changed:
            return
        origin = "a member list" if state.learned else "the configuration"
        if foreign:
            self.log.error(
                "endpoint {endpoint} belongs to ANOTHER etcd cluster (cluster ID "
                "{clusterID}, the gateway's is {majority}): it is never used; a stale "
                "member or a foreign cluster on a reused address? (from {origin})",
                endpoint=str(endpoint),
                clusterID=clusterID,
                majority=majority,
                origin=origin,
                learned=state.learned,
            )
        elif state.trusted and not wasTrusted:
            self.log.info(
                "endpoint {endpoint} is of the cluster (cluster ID {clusterID}): it "
                "gets clients (from {origin})",
                endpoint=str(endpoint),
                clusterID=clusterID,
                origin=origin,
            )
        self._checkDegraded()
        self._notify()

    def _checkDegraded(self):
        """
        Log, once per episode, when no endpoint is usable but some unhealthy
        ones accept TCP (they get the new connections then), and when that
        ends.
        """
        alive = [s for s in self.states() if s.up and s.trusted]
        degraded = bool(alive) and not any(s.usable for s in alive)
        if degraded == self._degraded:
            return
        self._degraded = degraded
        if degraded:
            self.log.error(
                "no endpoint is healthy: new connections go to the {count} that "
                "accept TCP ({endpoints}) rather than being refused",
                count=len(alive),
                endpoints=[str(s.endpoint) for s in alive],
            )
        else:
            self.log.info("an endpoint is healthy again: unhealthy ones get no new connections")

    def replaceEndpoints(self, endpoints, reason="replaced", learned=False):
        """
        Make C{endpoints} the pool's endpoint list. Endpoints already in the
        pool keep their state and counters (and take the new priority and
        weight); new ones join up; removed ones get no new connections (their
        open connections are not touched). Logs the change as one line.

        An endpoint removed while connections to it are open, and added
        again, gets its old counters back (they go on counting those
        connections), with a fresh state as any new endpoint.

        @param learned: the new endpoints come from a member list: they get
            no client until they prove their cluster ID (L{setIdentity}).
        @return: C{(added, removed)} lists of endpoints.
        """
        old = dict(self._states)
        newStates = {}
        order = []
        added = []
        now = self.clock.seconds()
        for endpoint in endpoints:
            if endpoint.key in newStates:
                continue
            state = old.get(endpoint.key)
            if state is None:
                state = self._retired.pop(endpoint.key, None)
                if state is None:
                    state = EndpointState(endpoint, now)
                else:
                    state.endpoint = endpoint
                state._rejoin(now, reason, learned)
                added.append(endpoint)
            else:
                state.endpoint = endpoint
            newStates[endpoint.key] = state
            order.append(endpoint.key)
        removed = []
        for key, state in old.items():
            if key not in newStates:
                removed.append(state.endpoint)
                if state.active > 0:
                    self._retired[key] = state
        self._states = newStates
        self._order = order
        for key in [key for key in self._credit if key not in newStates]:
            del self._credit[key]
        self._cursor = 0 if not order else self._cursor % len(order)
        if old and (added or removed):
            self.log.info(
                "endpoints changed ({reason}): added {added}, removed {removed}; "
                "now {endpoints}",
                reason=reason,
                added=[str(e) for e in added],
                removed=[str(e) for e in removed],
                endpoints=[str(e) for e in self.endpoints],
            )
        if added or removed:
            self._checkDegraded()
            self._notify()
        return added, removed

    # Connection accounting (by the proxy)

    def _accountable(self, state):
        """
        The state that counts a connection to C{state}'s endpoint: the one
        the pool holds for that endpoint now (in the pool or retired), so an
        endpoint removed and added again while a dial or a connection was
        open counts it on one state.
        """
        key = state.endpoint.key
        return self._states.get(key) or self._retired.get(key) or state

    def connectionOpened(self, state):
        state = self._accountable(state)
        state.active += 1
        state.connections += 1
        key = state.endpoint.key
        if self._states.get(key) is not state:
            # Removed while the dial was in progress.
            self._retired[key] = state

    def connectionClosed(self, state):
        state = self._accountable(state)
        state.active -= 1
        key = state.endpoint.key
        if state.active <= 0 and self._retired.get(key) is state:
            del self._retired[key]

    # Observers

    def addObserver(self, observer):
        """
        Call C{observer(pool)} after every state or membership change.
        """
        self._observers.append(observer)

    def removeObserver(self, observer):
        self._observers.remove(observer)

    def _notify(self):
        for observer in list(self._observers):
            try:
                observer(self)
            except Exception:
                self.log.failure("pool observer {observer} failed", observer=observer)


_systemRandom = random.SystemRandom()
