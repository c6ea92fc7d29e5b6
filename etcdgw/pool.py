"""
The upstream pool: the endpoints, their decided state, and the pick.

The pool holds state; it decides nothing about health. Its setters
(L{UpstreamPool.markDown}, L{UpstreamPool.markUp}, L{UpstreamPool.setHealth},
L{UpstreamPool.setAnswering}, L{UpstreamPool.setSilence},
L{UpstreamPool.setIdentity}) are called by one
writer, the L{etcdgw.monitor.Monitor}, which turns evidence into decisions;
each setter logs the change and returns it (L{Change} values) for the
monitor to announce. (One exception remains until the wiring gives SIGHUP
the monitor: L{etcdgw.signals.ReloadService} marks endpoints up and down
itself.) Endpoint sources (static, SRV discovery, member lists)
propose the endpoint list (L{UpstreamPool.replaceEndpoints}); the proxy asks
for an endpoint (L{UpstreamPool.pick}) and accounts for the connections it
opens. Metrics, the status page and signals only read it.

Which endpoints may get a client is defined once, by
L{EndpointState.eligible} and L{EndpointState.usable}; how one is chosen
among them is the pick policy's (L{etcdgw.policies}), which owns its own
cursor, credit and random source.
"""

import attr

from twisted.logger import Logger

from etcdgw.policies import POLICIES, ZERO_WEIGHT_SHARE, makePolicy

__all__ = [
    "POLICIES",
    "ZERO_WEIGHT_SHARE",
    "Change",
    "EndpointState",
    "UpstreamPool",
]

UP = "up"
DOWN = "down"

#: etcd health (a second dimension next to TCP up/down, set by
#: L{etcdgw.etcdhealth}): not checked (yet), or what the member said.
UNKNOWN = "unknown"
HEALTHY = "healthy"
UNHEALTHY = "unhealthy"

#: What a L{Change} is about: the TCP state (L{UP}/L{DOWN}), the etcd health,
#: whether etcd checks get an answer, whether the member is of another
#: cluster, whether a learned member proved it is of the gateway's, whether
#: it is silent (up, but answers no probe: it gets no new connection, and
#: the connections it holds may be moved), whether it is "answering slowly"
#: (it answers no probe either, but more members than C{--max-silent-share}
#: allows would be silent: it stays in use, and is not silent).
STATE = "state"
HEALTH = "health"
ANSWERING = "answering"
FOREIGN = "foreign"
PROVEN = "proven"
SILENT = "silent"
SLOW = "slow"


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Change:
    """
    One decided change of one endpoint's state (what the monitor announces
    to its subscribers).

    @ivar endpoint: the L{etcdgw.endpoint.Endpoint}.
    @ivar what: L{STATE}, L{HEALTH}, L{ANSWERING}, L{FOREIGN}, L{PROVEN},
        L{SILENT} or L{SLOW} (the last five: C{old} and C{new} are booleans).
    @ivar old: the value before.
    @ivar new: the value now.
    @ivar reason: why, in one line.
    """

    endpoint: object
    what: str
    old: object
    new: object
    reason: str


class ByteCount:
    """
    A byte counter that the forwarding path adds to directly (see
    L{etcdgw.fast.join}): one per endpoint and direction.
    """

    __slots__ = ("n",)

    def __init__(self):
        self.n = 0


class EndpointState:
    """
    What the pool knows about one endpoint. Mutable, held by the pool and
    written through its setters (by the monitor) and its connection
    accounting (for the proxy); other modules read it (metrics, the status
    page) but never write it.

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
        gateway serves (L{etcdgw.monitor.ClusterIdentity}): it is never
        picked.
    @ivar learned: the endpoint came from a member list, not from the
        configuration (C{--endpoints}, SRV): it never votes on the cluster ID
        and gets no client until it is L{proven}.
    @ivar proven: it reported the cluster ID the gateway serves.
    @ivar answering: the last etcd health check got an HTTP answer (L{True}
        until a check says otherwise): among unhealthy members, those that
        answer are picked before those that do not.
    @ivar silent: the monitor decided it is silent: up (it accepts TCP) but
        it answered none of the last probes (C{--health-fall} in a row):
        it gets no new connection while another member is usable, and
        subscribers of the monitor may move the connections it holds.
        Never set on a member that is down.
    @ivar slow: it answered none of the last probes either, but more
        members than C{--max-silent-share} allows would then be silent: it
        stays usable ("answering slowly") and is not announced as silent.
    @ivar silenceReason: why it is silent or slow (or why no longer).
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
        "silent",
        "slow",
        "silenceReason",
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
        self.silent = False
        self.slow = False
        self.silenceReason = "not probed"

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
    def eligible(self):
        """
        Up and trusted: it may get a client at all (L{usable} ones first;
        when none is, these, unhealthy as they are).
        """
        return self.state == UP and self.trusted

    @property
    def usable(self):
        """
        Eligible (up and trusted), not known unhealthy and not silent: where
        new connections go. The one definition, used by pick, the status
        page and metrics. (Spelled out rather than through L{eligible}: pick
        asks it of every endpoint for every client.)
        """
        return (
            self.state == UP and self.health != UNHEALTHY and self.trusted and not self.silent
        )


def _silenceName(silent, slow):
    """
    How a member's answers read in the log: C{"silent"}, C{"answering
    slowly"} or C{"answering"}.
    """
    if silent:
        return "silent"
    return "answering slowly" if slow else "answering"


class UpstreamPool:
    """
    The endpoints, their states, and the pick.

    @ivar clock: an L{IReactorTime} for state-change times.
    @ivar policy: the L{etcdgw.policies.Policy} that chooses within a tier.
    @ivar policyName: its C{--policy} name.
    """

    log = Logger()

    def __init__(self, endpoints, clock, policy="round-robin", random=None):
        """
        @param policy: a C{--policy} name (L{POLICIES}).
        @param random: the policy's random source (tests give a seeded one).
        @raise ValueError: for an unknown policy name.
        """
        self.clock = clock
        self.policy = makePolicy(policy, random)
        self.policyName = policy
        #: The episode of no usable endpoint now logged: L{None}, or
        #: C{"unhealthy"}, C{"silent"} (see L{_checkDegraded}).
        self._degraded = None
        self._states = {}
        #: Removed endpoints' states while they still have connections, by
        #: key: see L{replaceEndpoints} and L{connectionClosed}.
        self._retired = {}
        self._order = []
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

    def heldState(self, endpoint):
        """
        The L{EndpointState} that counts connections to C{endpoint}: the
        pool's; for an endpoint no longer in the pool, the retired state
        that still counts its open connections, or a new one (which
        L{connectionOpened} retires). For connections opened elsewhere and
        adopted here (L{etcdgw.portable}).
        """
        key = endpoint.key
        state = self._states.get(key) or self._retired.get(key)
        if state is None:
            state = EndpointState(endpoint, self.clock.seconds())
        return state

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
        The states of the usable endpoints (L{EndpointState.usable}), in
        configured order: where new connections go.
        """
        return [s for s in self.states() if s.usable]

    def pick(self, exclude=()):
        """
        Choose the endpoint for a new connection: among endpoints not in
        C{exclude}, the usable ones (L{EndpointState.usable}), or, when none
        is, the eligible ones (up and trusted: never one of another cluster,
        never one learned from a member list before it proved its cluster
        ID) that are unhealthy or silent: those not silent whose health
        checks get an answer first, then those not silent, then the silent
        ones (fail open: a client sent to a member that may answer later
        beats a client refused); then the lowest priority tier; then the
        policy.

        @param exclude: endpoints (or their keys) already tried for this client.
        @return: an L{EndpointState}, or L{None} when no endpoint is eligible.
        """
        excluded = {getattr(e, "key", e) for e in exclude}
        candidates = []
        fallback = []
        states = self._states
        for key in self._order:
            if key in excluded:
                continue
            state = states[key]
            if state.usable:
                candidates.append(state)
            elif not candidates and state.eligible:
                fallback.append(state)
        if not candidates and fallback:
            # Without a leader the members answer 503; a frozen one does
            # not answer at all, and a client sent there would hang.
            candidates = (
                [s for s in fallback if s.answering and not s.silent]
                or [s for s in fallback if not s.silent]
                or fallback
            )
        best = None
        tier = []
        for state in candidates:
            priority = state.endpoint.priority
            if best is None or priority < best:
                best = priority
                tier = [state]
            elif priority == best:
                tier.append(state)
        if not tier:
            return None
        return self.policy.choose(tier, self._order)

    # Being told (by the monitor: see the module docstring). Each setter
    # returns the changes it made, a tuple of Change values (empty for a
    # repeat or an endpoint not in the pool).

    def markDown(self, endpoint, reason):
        """
        C{endpoint} is down: no new connections go to it until it is marked
        up. Logs the change once; a repeat is ignored.
        """
        return self._setState(endpoint, DOWN, reason)

    def markUp(self, endpoint, reason):
        """
        C{endpoint} is up: new connections may go to it again.
        """
        return self._setState(endpoint, UP, reason)

    def _setState(self, endpoint, new, reason):
        state = self._states.get(endpoint.key)
        if state is None or state.state == new:
            return ()
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
        return (Change(state.endpoint, STATE, old, new, reason),)

    def setHealth(self, endpoint, health, reason):
        """
        C{endpoint}'s etcd health is now C{health} (L{HEALTHY}, L{UNHEALTHY}
        or L{UNKNOWN}). An unhealthy endpoint gets no new connections while
        another one is healthy. Logs the change; a repeat is ignored.
        """
        state = self._states.get(endpoint.key)
        if state is None or state.health == health:
            return ()
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
        return (Change(state.endpoint, HEALTH, old, health, reason),)

    def setAnswering(self, endpoint, answering, reason=""):
        """
        Whether C{endpoint}'s last etcd health check got an HTTP answer (see
        L{pick}). Not logged: a change of health is.
        """
        state = self._states.get(endpoint.key)
        if state is None or state.answering == answering:
            return ()
        state.answering = answering
        return (Change(state.endpoint, ANSWERING, not answering, answering, reason),)

    def setSilence(self, endpoint, silent, slow, reason):
        """
        The monitor's decision about C{endpoint}'s answers: C{silent} (it
        gets no new connection while another member is usable), C{slow}
        (it does not answer either, but stays in use: the share of silent
        members is at its cap), or neither (it answers). Each change is
        logged, once.
        """
        state = self._states.get(endpoint.key)
        if state is None or (state.silent, state.slow) == (silent, slow):
            return ()
        old = _silenceName(state.silent, state.slow)
        new = _silenceName(silent, slow)
        changes = tuple(
            Change(state.endpoint, what, was, now, reason)
            for what, was, now in ((SILENT, state.silent, silent), (SLOW, state.slow, slow))
            if was != now
        )
        state.silent, state.slow = silent, slow
        state.silenceReason = reason
        emit = self.log.info if new == "answering" else self.log.warn
        emit(
            "endpoint {endpoint} {old} -> {new}: {reason} ({usable}/{total} usable)",
            endpoint=str(endpoint),
            old=old,
            new=new,
            reason=reason,
            usable=len(self.usable()),
            total=len(self._order),
        )
        self._checkDegraded()
        self._notify()
        return changes

    def setIdentity(self, endpoint, clusterID, foreign, majority=None, proven=None):
        """
        Record the cluster ID C{endpoint} reported, and the verdict of
        L{etcdgw.monitor.ClusterIdentity}: C{foreign} (of another cluster
        than the gateway's, C{majority}: never picked; logged at error level,
        once) and C{proven} (it reported C{majority}; by default, whether
        C{clusterID == majority}): a learned endpoint gets clients only once
        proven.
        """
        state = self._states.get(endpoint.key)
        if state is None:
            return ()
        state.clusterID = clusterID
        if proven is None:
            proven = not foreign and majority is not None and clusterID == majority
        wasTrusted = state.trusted
        reason = f"cluster ID {clusterID} (the gateway's: {majority})"
        changes = tuple(
            Change(state.endpoint, what, old, new, reason)
            for what, old, new in (
                (FOREIGN, state.foreign, foreign),
                (PROVEN, state.proven, proven),
            )
            if old != new
        )
        state.foreign, state.proven = foreign, proven
        if not changes:
            return ()
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
        return changes

    def _checkDegraded(self):
        """
        Log, once per episode, when no endpoint is usable but some accept
        TCP (they get the new connections then, fail open): some of them
        unhealthy (C{"unhealthy"}), or every one of them silent
        (C{"silent"}); and when that ends.
        """
        alive = [s for s in self.states() if s.eligible]
        degraded = None
        if alive and not any(s.usable for s in alive):
            degraded = "silent" if all(s.silent for s in alive) else "unhealthy"
        if degraded == self._degraded:
            return
        previous, self._degraded = self._degraded, degraded
        endpoints = [str(s.endpoint) for s in alive]
        if degraded == "unhealthy":
            self.log.error(
                "no endpoint is healthy: new connections go to the {count} that "
                "accept TCP ({endpoints}) rather than being refused",
                count=len(alive),
                endpoints=endpoints,
            )
        elif degraded == "silent":
            self.log.error(
                "every endpoint that accepts TCP is silent ({endpoints}): new "
                "connections still go to them (fail open: they may answer later, a "
                "refused client has nowhere to go)",
                count=len(alive),
                endpoints=endpoints,
            )
        elif not alive:
            pass  # every endpoint is down: _setState says so
        elif previous == "unhealthy":
            self.log.info("an endpoint is healthy again: unhealthy ones get no new connections")
        else:
            self.log.info("an endpoint answers again: silent ones get no new connections")

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
        self.policy.endpointsChanged(order)
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

    # Dial and connection accounting (by the proxy; dial failures by the
    # monitor, which hears of them as evidence)

    def countDialAttempt(self, state):
        state.dialAttempts += 1

    def countDialFailure(self, state):
        state.dialFailures += 1

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

    # Takeover (etcdgw.takeover): a successor process starts warm.

    #: The decided fields of an endpoint's state a successor carries over.
    CARRIED = (
        "state",
        "reason",
        "health",
        "healthReason",
        "clusterID",
        "foreign",
        "proven",
        "answering",
        "silent",
        "slow",
        "silenceReason",
        "dialAttempts",
        "dialFailures",
    )

    def exportState(self):
        """
        The decided state of every endpoint, JSON-able: C{[{"host", "port",
        field: value...}]} (L{CARRIED}).
        """
        return [
            dict(
                {name: getattr(state, name) for name in self.CARRIED},
                host=state.endpoint.host,
                port=state.endpoint.port,
            )
            for state in self.states()
        ]

    def restoreState(self, records):
        """
        Take over what another process decided (L{exportState}) for the
        endpoints this pool has too; the others are left as they are.
        Written by the monitor only (L{etcdgw.monitor.Monitor.adoptState}).

        @return: how many endpoints were restored.
        """
        restored = 0
        now = self.clock.seconds()
        for record in records:
            try:
                state = self._states.get((record["host"], record["port"]))
            except (KeyError, TypeError):
                continue
            if state is None:
                continue
            for name in self.CARRIED:
                if name in record:
                    setattr(state, name, record[name])
            state.since = now
            restored += 1
        if restored:
            self._checkDegraded()
            self._notify()
        return restored

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

