"""
The monitor: the one place that turns evidence about endpoints into
decisions, writes them into the pool, and announces them.

Evidence, and where it comes from:

  - dial results, from the proxy: L{Monitor.dialFailed} (with the reason),
    L{Monitor.dialSucceeded};
  - TCP probe results, from the retry probes (L{etcdgw.health}):
    L{Monitor.probeSucceeded}, L{Monitor.probeFailed}, and SIGHUP's
    re-probes (L{etcdgw.signals}) the same way;
  - etcd check results (L{etcdgw.etcdhealth}: healthy or not, answered,
    refused, cluster ID): L{Monitor.checked};
  - identity reports, the cluster IDs members report to the etcd checks and
    to membership sync: L{Monitor.reportClusterID}, judged by the monitor's
    L{ClusterIdentity};
  - (to come) passive hints from live connections.

Decisions, each made here only:

  - up/down: a failed dial or probe marks an endpoint down, a probe that
    connects marks it up; an etcd check refused at connect marks it down,
    one that got an answer marks it up, unless the endpoint was found to
    reach the gateway itself (a self-loop: then only a probe that connects
    elsewhere, through the self-loop guard, brings it back);
  - healthy/unhealthy: the first etcd answer decides, then C{rise} good
    answers in a row make an endpoint healthy, C{fall} bad ones unhealthy;
  - answering (silent members are the last resort of pick);
  - foreign/proven: the pinned-cluster-ID rule (L{ClusterIdentity}).

The pool (L{etcdgw.pool.UpstreamPool}) holds what is decided: the monitor
is the only caller of its setters. Each change is announced to the
subscribers (L{Monitor.subscribe}) as an L{etcdgw.pool.Change}. The monitor
learns of endpoint list changes (from the endpoint sources) through the
pool's observers, and forgets what it kept about removed endpoints.
"""

import weakref
from collections import Counter

import attr

from twisted.logger import Logger

from etcdgw.dial import describeFailure
from etcdgw.pool import HEALTHY, UNHEALTHY, UNKNOWN, Change
from etcdgw.selfloop import SelfLoopError

__all__ = ["Change", "ClusterIdentity", "Monitor", "majorityClusterID"]


@attr.s(slots=True)
class _Track:
    """
    Rise/fall counters of one endpoint's etcd checks.
    """

    ok = attr.ib(default=0)
    bad = attr.ib(default=0)


def majorityClusterID(clusterIDs):
    """
    The cluster ID that more than half of C{clusterIDs} (one per member that
    reported one) share, or L{None} when none does.
    """
    if not clusterIDs:
        return None
    value, count = Counter(clusterIDs).most_common(1)[0]
    return value if count * 2 > len(clusterIDs) else None


class ClusterIdentity:
    """
    The monitor's rule for which etcd cluster the gateway serves, and which
    endpoints are of it. Part of a L{Monitor} (C{monitor.identity}), which
    makes it: whoever reads a member's cluster ID (the etcd health checks,
    membership sync) reports it to the monitor; the verdicts are written
    into the pool (L{UpstreamPool.setIdentity}), which holds them and
    honours them in every pick, and announced by the monitor.

    The rule: learned data never outranks configured data. The cluster ID is
    pinned by the configured endpoints (C{--endpoints}, or SRV records): the
    ID that more than half of those that reported one share. It stays
    pinned when they no longer agree or no longer report (removed from the
    cluster), and moves only when more than half of them report another
    (a cluster restored from a snapshot has a new ID). Endpoints learned
    from a member list never vote: one gets no client until it has itself
    reported the pinned ID, and one that reports another is never used (the
    pool logs it at error level, once).

    Without a majority among the configured endpoints (two disagreeing), no
    configured endpoint is excluded (logged once, at error level); learned
    ones are still held to the pinned ID, if there is one.

    @ivar pinned: the cluster ID the gateway serves, or L{None} before the
        configured endpoints reported one.
    """

    log = Logger()

    def __init__(self, pool, announce):
        """
        @param announce: called with the changes of each write (the
            monitor's announcer).
        """
        self.pool = pool
        self.pinned = None
        self._announce = announce
        self._warnedNoMajority = False

    def report(self, endpoint, clusterID):
        """
        C{endpoint} said it belongs to cluster C{clusterID} (a decimal
        string; L{None} says nothing). Judges every endpoint again.
        """
        state = self.pool.stateOf(endpoint)
        if clusterID is None or state is None:
            return
        self._announce(
            self.pool.setIdentity(endpoint, str(clusterID), state.foreign, self.pinned, state.proven)
        )
        self._judge()

    def accepts(self, endpoint):
        """
        Whether C{endpoint} reported the pinned cluster ID (so what it says
        about the cluster, such as its member list, may be used).
        """
        state = self.pool.stateOf(endpoint)
        return (
            state is not None
            and self.pinned is not None
            and state.clusterID == self.pinned
            and state.trusted
        )

    def _judge(self):
        states = [s for s in self.pool.states() if s.clusterID is not None]
        configured = [s for s in states if not s.learned]
        majority = majorityClusterID([s.clusterID for s in configured])
        if majority is not None:
            self._warnedNoMajority = False
            if majority != self.pinned:
                count = sum(1 for s in configured if s.clusterID == majority)
                if self.pinned is None:
                    self.log.info(
                        "the gateway serves etcd cluster {clusterID} (reported by "
                        "{count} of the {total} configured endpoints that answered)",
                        clusterID=majority,
                        count=count,
                        total=len(configured),
                    )
                else:
                    self.log.error(
                        "the configured endpoints now report etcd cluster {clusterID} "
                        "({count} of {total}), not {previous}: the gateway serves "
                        "{clusterID} (a cluster restored from a snapshot?)",
                        clusterID=majority,
                        previous=self.pinned,
                        count=count,
                        total=len(configured),
                    )
                self.pinned = majority
        elif len({s.clusterID for s in configured}) > 1 and not self._warnedNoMajority:
            self._warnedNoMajority = True
            self.log.error(
                "endpoints report different etcd cluster IDs with no majority: "
                "{ids}; none is excluded until a majority agrees",
                ids={str(s.endpoint): s.clusterID for s in configured},
            )
        pinned = self.pinned
        for state in states:
            matches = pinned is not None and state.clusterID == pinned
            if state.learned or majority is not None:
                foreign = pinned is not None and not matches
            else:
                foreign = False  # no majority: no configured endpoint is excluded
            self._announce(
                self.pool.setIdentity(state.endpoint, state.clusterID, foreign, pinned, matches)
            )


#: The monitor of each pool, by C{id(pool)}: a pool has one monitor (see
#: L{Monitor}), and the old wiring finds it here (L{legacyMonitor}).
_monitors = weakref.WeakValueDictionary()


class Monitor:
    """
    Receives the evidence about the pool's endpoints, decides, writes the
    decisions into the pool and announces them (see the module docstring).
    One per pool.

    @ivar pool: the L{etcdgw.pool.UpstreamPool} it writes.
    @ivar clock: an L{IReactorTime}, for evidence that needs time.
    @ivar rise: good etcd answers in a row that make an endpoint healthy.
    @ivar fall: bad etcd answers in a row that make an endpoint unhealthy.
    @ivar identity: its L{ClusterIdentity}.
    """

    log = Logger()

    def __init__(self, pool, clock, rise=2, fall=3):
        """
        @raise ValueError: when C{pool} has a monitor already.
        """
        existing = _monitors.get(id(pool))
        if existing is not None and existing.pool is pool:
            raise ValueError("the pool has a monitor already: one decides for it")
        _monitors[id(pool)] = self
        self.pool = pool
        self.clock = clock
        self.rise = rise
        self.fall = fall
        self.identity = ClusterIdentity(pool, self._announce)
        self._subscribers = []
        self._tracks = {}
        #: Keys of endpoints found to reach the gateway itself.
        self._looping = set()
        pool.addObserver(self._poolChanged)

    # Announcing

    def subscribe(self, callback):
        """
        Call C{callback(change)} with each L{etcdgw.pool.Change} decided from
        now on, after the pool holds it. A callback that raises is logged;
        the others are still called.
        """
        self._subscribers.append(callback)

    def unsubscribe(self, callback):
        self._subscribers.remove(callback)

    def _announce(self, changes):
        for change in changes:
            for callback in list(self._subscribers):
                try:
                    callback(change)
                except Exception:
                    self.log.failure(
                        "monitor subscriber {subscriber} failed on {change}",
                        subscriber=callback,
                        change=change,
                    )

    def _poolChanged(self, pool):
        """
        The pool changed: forget what is kept about endpoints no longer in
        it.
        """
        if not self._tracks and not self._looping:
            return
        keys = {state.endpoint.key for state in pool.states()}
        for key in [key for key in self._tracks if key not in keys]:
            del self._tracks[key]
        self._looping &= keys

    # Evidence: dials (the proxy)

    def dialFailed(self, state, reason):
        """
        A dial for a client to C{state}'s endpoint failed (not for want of
        the gateway's own descriptors: that is not the member's fault).

        @param state: the L{etcdgw.pool.EndpointState} the dial was for.
        @param reason: the L{Failure}; a L{SelfLoopError} when the dial
            reached the gateway itself.
        """
        self.pool.countDialFailure(state)
        if reason.check(SelfLoopError):
            self._looping.add(state.endpoint.key)
        self._announce(self.pool.markDown(state.endpoint, describeFailure(reason)))

    def dialSucceeded(self, state):
        """
        A dial for a client to C{state}'s endpoint connected, and not to the
        gateway itself. No decision of up/down: a member marked down is
        brought back by a probe, not by one dial that raced its marking.
        """
        if self._looping:
            self._looping.discard(state.endpoint.key)

    # Evidence: TCP probes (the retry probes, SIGHUP)

    def probeSucceeded(self, endpoint, reason):
        """
        A TCP probe of C{endpoint} connected (and not to the gateway itself):
        it is up.

        @param reason: what to record, e.g. C{"probe connected"}.
        """
        self._looping.discard(endpoint.key)
        self._announce(self.pool.markUp(endpoint, reason))

    def probeFailed(self, endpoint, failure, reason):
        """
        A TCP probe of C{endpoint} failed: it is down.

        @param failure: the L{Failure}; a L{SelfLoopError} when the probe
            reached the gateway itself.
        @param reason: what to record.
        """
        if failure.check(SelfLoopError):
            self._looping.add(endpoint.key)
        self._announce(self.pool.markDown(endpoint, reason))

    # Evidence: etcd checks and identity reports

    def checked(self, endpoint, result):
        """
        An etcd check of C{endpoint} ended with C{result} (an
        L{etcdgw.etcdhealth.CheckResult}): its answering, TCP state, health
        (by rise/fall) and cluster ID follow.
        """
        pool = self.pool
        state = pool.stateOf(endpoint)
        if state is None:
            return
        key = endpoint.key
        announce = self._announce
        announce(pool.setAnswering(endpoint, result.answered, result.detail))
        if result.refused:
            announce(pool.markDown(endpoint, "etcd health check: connection refused"))
        elif result.answered and not state.up and key not in self._looping:
            announce(pool.markUp(endpoint, "etcd health check answered"))
        track = self._tracks.get(key)
        if track is None:
            track = self._tracks[key] = _Track()
        if result.healthy:
            track.ok += 1
            track.bad = 0
            if state.health != HEALTHY and (state.health == UNKNOWN or track.ok >= self.rise):
                announce(
                    pool.setHealth(endpoint, HEALTHY, f"{result.detail} ({track.ok} in a row)")
                )
        else:
            track.bad += 1
            track.ok = 0
            if state.health != UNHEALTHY and (state.health == UNKNOWN or track.bad >= self.fall):
                announce(
                    pool.setHealth(
                        endpoint, UNHEALTHY, f"{result.detail} ({track.bad} in a row)"
                    )
                )
        if result.clusterID is not None:
            self.identity.report(endpoint, result.clusterID)

    def reportClusterID(self, endpoint, clusterID):
        """
        C{endpoint} reported cluster C{clusterID} (membership sync, etcd
        checks): see L{ClusterIdentity}.
        """
        self.identity.report(endpoint, clusterID)

    def accepts(self, endpoint):
        """
        Whether what C{endpoint} says about the cluster may be used (it
        reported the pinned cluster ID): L{ClusterIdentity.accepts}.
        """
        return self.identity.accepts(endpoint)


def legacyMonitor(pool, clock=None):
    """
    The monitor of C{pool}, made on first use: for the old wiring (C{tap.py}
    before issue 12 item 1), whose constructors pass no monitor. Every one
    of them finds the same monitor, so the gateway still has one. Once the
    wiring passes its monitor, this and the C{monitor=None} defaults go.
    """
    monitor = _monitors.get(id(pool))
    if monitor is None or monitor.pool is not pool:
        monitor = Monitor(pool, clock if clock is not None else pool.clock)
    return monitor
