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
    @ivar bytesToUpstream: bytes forwarded from clients to it.
    @ivar bytesFromUpstream: bytes forwarded from it to clients.
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
        "bytesToUpstream",
        "bytesFromUpstream",
    )

    def __init__(self, endpoint, since):
        self.endpoint = endpoint
        self.state = UP
        self.since = since
        self.reason = "configured"
        self.active = 0
        self.connections = 0
        self.dialAttempts = 0
        self.dialFailures = 0
        self.bytesToUpstream = 0
        self.bytesFromUpstream = 0

    @property
    def up(self):
        return self.state == UP


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


def _leastConnections(pool, tier):
    """
    The endpoint with the fewest active connections; ties are broken in
    round-robin order, so an idle pool still rotates.
    """
    fewest = min(state.active for state in tier)
    return _roundRobin(pool, [state for state in tier if state.active == fewest])


#: Pick policies by C{--policy} name. Every policy first keeps only the up
#: endpoints of the lowest priority (RFC 2782), then chooses inside that tier.
POLICIES = {
    "round-robin": _weighted,
    "weighted": _weighted,
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
        self._policy = POLICIES[policy]
        self.policyName = policy
        self._random = random if random is not None else _systemRandom
        self._states = {}
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

    def pick(self, exclude=()):
        """
        Choose the endpoint for a new connection: among up endpoints not in
        C{exclude}, the lowest priority tier, then the policy.

        @param exclude: endpoints (or their keys) already tried for this client.
        @return: an L{EndpointState}, or L{None} when no endpoint is up.
        """
        excluded = {getattr(e, "key", e) for e in exclude}
        best = None
        tier = []
        for key in self._order:
            state = self._states[key]
            if state.state != UP or key in excluded:
                continue
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
        self._notify()

    def replaceEndpoints(self, endpoints, reason="replaced"):
        """
        Make C{endpoints} the pool's endpoint list. Endpoints already in the
        pool keep their state and counters (and take the new priority and
        weight); new ones join up; removed ones get no new connections (their
        open connections are not touched). Logs the change as one line.

        @return: C{(added, removed)} lists of endpoints.
        """
        old = dict(self._states)
        newStates = {}
        order = []
        added = []
        for endpoint in endpoints:
            if endpoint.key in newStates:
                continue
            state = old.get(endpoint.key)
            if state is None:
                state = EndpointState(endpoint, self.clock.seconds())
                state.reason = reason
                added.append(endpoint)
            else:
                state.endpoint = endpoint
            newStates[endpoint.key] = state
            order.append(endpoint.key)
        removed = [s.endpoint for key, s in old.items() if key not in newStates]
        self._states = newStates
        self._order = order
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
            self._notify()
        return added, removed

    # Connection accounting (by the proxy)

    def connectionOpened(self, state):
        state.active += 1
        state.connections += 1

    def connectionClosed(self, state):
        state.active -= 1

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
