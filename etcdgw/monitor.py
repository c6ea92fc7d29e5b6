"""
The monitor: the one place that turns evidence about endpoints into
decisions, writes them into the pool, and announces them.

Evidence, and where it comes from:

  - dial results, from the proxy: L{Monitor.dialFailed} (with the reason),
    L{Monitor.dialSucceeded};
  - TCP probe results, from the retry probes (L{etcdgw.health}):
    L{Monitor.probeSucceeded}, L{Monitor.probeFailed}, and SIGHUP's
    re-probes (L{etcdgw.signals}) the same way;
  - answer probe results (L{etcdgw.answer}, C{--health-check=answer}, the
    default): L{Monitor.answered}, L{Monitor.unanswered}, and
    L{Monitor.probeFailed} when the connect itself failed;
  - etcd check results (L{etcdgw.etcdhealth}: healthy or not, answered,
    refused, cluster ID): L{Monitor.checked};
  - identity reports, the cluster IDs members report to the etcd checks and
    to membership sync: L{Monitor.reportClusterID}, judged by the monitor's
    L{ClusterIdentity};
  - passive hints from live connections (L{Monitor.hint}: a connection that
    sent its member bytes and got none back for a while): they ask for a
    probe of that member now (L{Monitor.onHint}), and decide nothing.

Decisions, each made here only:

  - up/down: a failed dial or probe marks an endpoint down, a probe that
    connects (or answers) marks it up (an answer probe's connection alone:
    up and silent until it answers, L{Monitor.reachable}); an etcd check
    refused at connect
    marks it down, one that got an answer marks it up, unless the endpoint
    was found to reach the gateway itself (a self-loop: then only a probe
    that connects elsewhere, through the self-loop guard, brings it back);
  - healthy/unhealthy: the first etcd answer decides, then C{rise} good
    answers in a row make an endpoint healthy, C{fall} bad ones unhealthy;
  - answering (the last etcd check got an answer);
  - silent/answering (L{Monitor.answered}, L{Monitor.unanswered}, and the
    etcd checks' answers): C{fall} probes in a row without an answer make
    an endpoint that is up silent, C{rise} answers in a row answering
    again; the cascade guard (Envoy's C{max_ejection_percent}) keeps the
    silent ones to at most C{maxSilentShare} percent of the endpoints (at
    least one): the others are "answering slowly" (still used, never
    announced as silent). An endpoint that is down is neither (the share
    counts silence alone);
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

__all__ = ["Change", "ClusterIdentity", "Monitor", "majorityClusterID", "silentCap"]


@attr.s(slots=True)
class _Track:
    """
    Rise/fall counters of one endpoint's etcd checks.
    """

    ok = attr.ib(default=0)
    bad = attr.ib(default=0)


@attr.s(slots=True)
class _Silence:
    """
    What the answers of one endpoint's probes say: C{quiet} once C{fall}
    probes in a row got none, until C{rise} in a row got one.

    @ivar order: when it turned quiet (a counter): the first to turn quiet
        are the first to be silent, within the cap.
    @ivar detail: the last probe's outcome, for the log.
    """

    answers = attr.ib(default=0)
    misses = attr.ib(default=0)
    quiet = attr.ib(default=False)
    order = attr.ib(default=0)
    detail = attr.ib(default="")


def silentCap(share, members):
    """
    How many of C{members} endpoints may be silent at once: C{share}
    percent of them, rounded down, and at least one (as Envoy's
    C{max_ejection_percent}, which ejects at least one host whatever the
    share).
    """
    return max(1, share * members // 100)


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
    @ivar fall: bad etcd answers in a row that make an endpoint unhealthy;
        probes in a row without an answer that make it silent.
    @ivar maxSilentShare: the percentage of the endpoints that may be
        silent at once (L{silentCap}).
    @ivar identity: its L{ClusterIdentity}.
    """

    log = Logger()

    def __init__(self, pool, clock, rise=2, fall=3, maxSilentShare=50):
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
        self.maxSilentShare = maxSilentShare
        self.identity = ClusterIdentity(pool, self._announce)
        self._subscribers = []
        self._hintHandlers = []
        self._tracks = {}
        #: What each endpoint's probe answers say, by key (L{_Silence}).
        self._silence = {}
        self._quietOrder = 0
        self._judging = False
        #: Keys of endpoints found to reach the gateway itself.
        self._looping = set()
        #: The keys of the pool's endpoints when last seen (a change of the
        #: endpoint list changes the cap on silent ones).
        self._keys = frozenset(state.endpoint.key for state in pool.states())
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
        The pool changed: when its endpoint list did, forget what is kept
        about endpoints no longer in it, and judge silence again (the cap
        follows the number of endpoints).
        """
        keys = frozenset(state.endpoint.key for state in pool.states())
        if keys == self._keys:
            return
        self._keys = keys
        for kept in (self._tracks, self._silence):
            for key in [key for key in kept if key not in keys]:
                del kept[key]
        self._looping &= keys
        self._judgeSilence()

    # Takeover (etcdgw.takeover)

    def exportState(self):
        """
        What a successor process needs to start warm, JSON-able: the pool's
        decided state of each endpoint, the rise/fall counters of its etcd
        checks and of its answer probes.
        """
        return {
            "pool": self.pool.exportState(),
            "tracks": [[list(key), t.ok, t.bad] for key, t in self._tracks.items()],
            "silence": [
                [list(key), s.answers, s.misses, s.quiet, s.order, s.detail]
                for key, s in self._silence.items()
            ],
        }

    def adoptState(self, exported):
        """
        Start from what the monitor of the process taken over from decided
        (L{exportState}), for the endpoints this pool has too.
        """
        restored = self.pool.restoreState(exported.get("pool") or [])
        keys = {state.endpoint.key for state in self.pool.states()}
        for key, ok, bad in exported.get("tracks") or []:
            key = tuple(key)
            if key in keys:
                self._tracks[key] = _Track(ok, bad)
        for key, answers, misses, quiet, order, detail in exported.get("silence") or []:
            key = tuple(key)
            if key in keys:
                self._silence[key] = _Silence(answers, misses, quiet, order, detail)
                self._quietOrder = max(self._quietOrder, order)
        self.log.info(
            "member state taken over for {restored} endpoint(s): {up}/{total} up",
            restored=restored,
            up=self.pool.upCount(),
            total=len(self.pool.endpoints),
        )
        return restored

    # Passive hints

    def onHint(self, handler):
        """
        Call C{handler(endpoint)} for each hint (L{hint}): the answer
        probes probe that endpoint now.
        """
        self._hintHandlers.append(handler)

    def hint(self, endpoint):
        """
        A live connection to C{endpoint} sent it bytes and got none back
        for a while. Not evidence of anything by itself (a slow range read
        is not a dead member): it asks for a probe of C{endpoint} now, whose
        outcome is the evidence. Cheap and safe to call often: the probes
        bound how often they follow hints.
        """
        for handler in list(self._hintHandlers):
            try:
                handler(endpoint)
            except Exception:
                self.log.failure("hint handler {handler} failed", handler=handler)

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
        self._judgeSilence()

    def probeFailed(self, endpoint, failure, reason):
        """
        A TCP probe (or the connect of an answer probe) of C{endpoint}
        failed: it is down.

        @param failure: the L{Failure}; a L{SelfLoopError} when the probe
            reached the gateway itself.
        @param reason: what to record.
        """
        if failure.check(SelfLoopError):
            self._looping.add(endpoint.key)
        self._announce(self.pool.markDown(endpoint, reason))
        self._judgeSilence()

    # Evidence: answer probes (etcdgw.answer), and the etcd checks' answers

    def answered(self, endpoint, detail):
        """
        A probe of C{endpoint} that passed the self-loop guard got an answer
        (any: an HTTP status line, a TLS alert): it is up, and one answer
        nearer to answering (C{rise} in a row end its silence).

        @param detail: what answered, for the log.
        """
        state = self.pool.stateOf(endpoint)
        if state is None:
            return
        self._looping.discard(endpoint.key)
        self._announce(self.pool.markUp(endpoint, f"answered: {detail}"))
        self._heard(endpoint, True, detail)

    def reachable(self, endpoint, detail):
        """
        A probe connected to C{endpoint}, which is down, and has no answer
        yet: it is up (it accepts connections, as a TCP probe would say),
        and silent until it has answered C{rise} probes in a row (a member
        still starting, or one without a quorum, accepts connections and
        answers nothing), within the cap on silent ones.
        """
        state = self.pool.stateOf(endpoint)
        if state is None or state.up or endpoint.key in self._looping:
            return
        track = self._silence.get(endpoint.key)
        if track is None:
            track = self._silence[endpoint.key] = _Silence()
        track.answers = 0
        track.misses = max(track.misses, self.fall)
        track.detail = "not answered since it accepts connections again"
        if not track.quiet:
            track.quiet = True
            self._quietOrder += 1
            track.order = self._quietOrder
        self._announce(self.pool.markUp(endpoint, f"accepts connections again ({detail})"))
        self._judgeSilence()

    def unanswered(self, endpoint, detail):
        """
        A probe of C{endpoint} connected (or is still connecting) but got no
        answer in time: one miss nearer to silent (C{fall} in a row).

        @param detail: why, for the log (e.g. C{"no answer in 500ms"}).
        """
        if self.pool.stateOf(endpoint) is None:
            return
        self._heard(endpoint, False, detail)

    def changing(self, endpoint):
        """
        Whether the probes of C{endpoint} are between two verdicts (a miss
        while it answers, an answer while it is quiet): the answer probes
        then probe it again sooner (HAProxy's C{fastinter}).
        """
        track = self._silence.get(endpoint.key)
        if track is None:
            return False
        return track.answers > 0 if track.quiet else track.misses > 0

    def _heard(self, endpoint, answered, detail):
        key = endpoint.key
        track = self._silence.get(key)
        if track is None:
            track = self._silence[key] = _Silence()
        track.detail = detail
        if answered:
            track.answers += 1
            track.misses = 0
            if track.quiet and track.answers >= self.rise:
                track.quiet = False
        else:
            track.misses += 1
            track.answers = 0
            if not track.quiet and track.misses >= self.fall:
                track.quiet = True
                self._quietOrder += 1
                track.order = self._quietOrder
        self._judgeSilence()

    def _judgeSilence(self):
        """
        Decide, for every endpoint, silent, answering slowly or answering,
        from what its probes say and the cap (L{silentCap}): the endpoints
        that are up and quiet are silent, those silent already first, then
        in the order they turned quiet, up to the cap; the rest of them are
        answering slowly. Writes and announces the changes.
        """
        if self._judging:
            return
        self._judging = True
        try:
            states = self.pool.states()
            cap = silentCap(self.maxSilentShare, len(states))
            quiet = []
            for state in states:
                track = self._silence.get(state.endpoint.key)
                if state.up and track is not None and track.quiet:
                    quiet.append((not state.silent, track.order, state, track))
                elif state.silent or state.slow:
                    reason = (
                        "down" if not state.up else f"answers again ({track.detail})"
                    )
                    self._announce(self.pool.setSilence(state.endpoint, False, False, reason))
            quiet.sort(key=lambda item: item[:2])
            for n, (_, _, state, track) in enumerate(quiet):
                missed = f"no answer to {self.fall} probes in a row ({track.detail})"
                if n < cap:
                    change = self.pool.setSilence(state.endpoint, True, False, missed)
                else:
                    change = self.pool.setSilence(
                        state.endpoint,
                        False,
                        True,
                        f"{missed}; still used: {cap} of the {len(states)} endpoints "
                        f"are silent already, the most --max-silent-share="
                        f"{self.maxSilentShare}% allows",
                    )
                self._announce(change)
        finally:
            self._judging = False

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
        if result.refused:
            self._judgeSilence()
        else:
            # An etcd check is an answer probe too (a deep one).
            self._heard(endpoint, result.answered, f"etcd health check: {result.detail}")

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
