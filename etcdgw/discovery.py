"""
DNS SRV discovery of the endpoints, as etcd names its records, while the
gateway runs: L{DiscoveryService}, the endpoint source of C{--discovery-srv}
(an L{etcdgw.sources.IEndpointSource}). It schedules rounds, merges what
each proved into the endpoint list it proposes to the pool, and logs; it
owns that list (C{_found}) and nothing else of the pool's.

A round is blocking code (L{etcdgw.srvround.discover}: DNS look-ups and TLS
handshakes, each bounded by a timeout) run in the one bounded pool of
daemon threads (L{etcdgw.srvround.BlockingPool}), so the reactor never
blocks; the first round runs before the reactor does (L{discoverAtStart}),
since a gateway that cannot find its cluster must not start. The values and
rules are pure code in L{etcdgw.srv}.
"""

import functools

import attr
from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from etcdgw import srvround
from etcdgw.duration import formatDuration
from etcdgw.sources import IEndpointSource
from etcdgw.srv import (
    MAX_REFRESH,
    DiscoveryError,
    DiscoveryResult,
    describeFailure,
    nextInterval,
    stillGood,
)
from etcdgw.verify import validateTLS


def discoverAtStart(config, fallback=None, resolver=None, validate=validateTLS, pool=None):
    """
    The first round, before the gateway starts (blocking).

    @param fallback: the explicit C{--endpoints}, used (logged at error level)
        when discovery found nothing usable; L{None} when not given.
    @param pool: the L{etcdgw.srvround.BlockingPool} (the shared one by
        default).
    @return: C{(endpoints, result)}; C{result.fallback} holds C{fallback}.
    @raise DiscoveryError: when every look-up failed, or nothing is usable
        and there is no fallback; the message says why each record was
        refused (e.g. plain records without --insecure-discovery) and which
        look-up failed.
    """
    return startingPoint(
        config, srvround.discover(config, resolver, validate, pool=pool), fallback
    )


def startingPoint(config, result, fallback=None):
    """
    What the gateway starts with after the first round's C{result}: see
    L{discoverAtStart}.
    """
    result = attr.evolve(result, fallback=tuple(fallback or ()))
    where = f"--discovery-srv={config.domain}"
    if result.allFailed:
        raise DiscoveryError(
            f"{where}: DNS look-up failed: {'; '.join(e for _, e in result.errors)}"
        )
    if not result.endpoints:
        if fallback:
            DiscoveryService.log.error(
                "SRV discovery found no usable endpoint ({found}); falling back to "
                "--endpoints {endpoints}",
                found=result.describe(),
                endpoints=[str(e) for e in fallback],
            )
            return list(fallback), result
        raise DiscoveryError(f"{where}: no usable endpoint found: {result.describe()}")
    return list(result.endpoints), result


def _unique(endpoints):
    """
    C{endpoints} without a second one of the same key (the first is kept, as
    the pool keeps it).
    """
    seen, unique = set(), []
    for endpoint in endpoints:
        if endpoint.key not in seen:
            seen.add(endpoint.key)
            unique.append(endpoint)
    return unique


@implementer(IEndpointSource)
class DiscoveryService(Service):
    """
    Re-resolves the SRV records at their TTL (clamped) or every
    C{--discovery-refresh}, and proposes to the pool what was proven: the
    endpoint source of C{--discovery-srv}. Its proposals are configured
    data (they pin the cluster ID), not learned.

    What a round means for the pool:
      - it saw no SRV record (every look-up failed, or every name is
        empty): nothing changes (logged);
      - one name's look-up failed and the other answered: the failed name's
        endpoints are kept as last found, the other's answer is used (as
        etcd); likewise an endpoint whose target's address look-up failed
        is kept;
      - records answered: the pool becomes what was proven. An endpoint
        whose new proof failed is removed (new connections only), even when
        that leaves nothing: fail closed, so a member whose certificate was
        replaced by a rogue one gets no new client. With nothing left the
        pool falls back to the explicit C{--endpoints} if given, or is
        empty and new clients are closed (logged at error level, once),
        and the next look-up comes at the lower bound.

    Endpoints already proven are kept without a new handshake until they
    were proven L{reverifyAfter} ago; refused ones are tried again at each
    round.
    """

    log = Logger()

    #: A proven endpoint is proven again (a new TLS handshake, in the next
    #: round) once it was last proven this many seconds ago: a member whose
    #: certificate is replaced by one that does not chain to the trust or
    #: does not name its SRV target stops getting new connections within
    #: this time plus one round's interval. Its open connections are left.
    reverifyAfter = MAX_REFRESH

    kind = "srv"

    def __init__(
        self, pool, reactor, config, first=None, discover=None, runInThread=None,
        fallback=(), threads=None,
    ):
        """
        @param pool: the L{etcdgw.pool.UpstreamPool} proposals go to.
        @param first: the L{DiscoveryResult} of the round at start (its
            C{fallback} is used while nothing is proven), the pool holding
            what it found; or L{None}: the service runs that round itself
            when it starts (blocking, before the reactor runs: see
            L{privilegedStartService}) and proposes what it found.
        @param discover: C{discover(config, known=...)}, blocking (default:
            L{etcdgw.srvround.discover} in C{threads}).
        @param runInThread: C{runInThread(f, *args, **kwargs)} -> Deferred
            (default: C{threads}).
        @param fallback: the explicit C{--endpoints} when C{first} is
            L{None}.
        @param threads: the L{etcdgw.srvround.BlockingPool} that runs the
            rounds (default: the process's shared one).
        """
        threads = threads if threads is not None else srvround.sharedPool()
        self.pool = pool
        self.reactor = reactor
        self.config = config
        self._discover = (
            discover if discover is not None
            else functools.partial(srvround.discover, pool=threads)
        )
        self._run = (
            runInThread if runInThread is not None
            else functools.partial(threads.deferToThread, reactor)
        )
        self._call = None
        self._round = None
        self._waiters = []
        self._first = None
        self._fallback = list(fallback)
        #: The endpoints this source last proposed from what it found (not
        #: the --endpoints fallback): what it owns of the pool's list.
        self._found = []
        self._refused = {}
        self._lookupErrors = {}
        self._failuresLogged = frozenset()
        self._nothingProven = False
        self.interval = None
        self.rounds = 0
        self.failures = 0
        self.lastResult = "no look-up since start"
        self._provenAt = {}
        self._roundKnown = frozenset()
        if first is not None:
            self._started(first, _unique(pool.endpoints) if first.endpoints else [])

    def _started(self, first, found):
        """
        Take C{first}, the round at start, whose C{found} endpoints (none
        when it fell back) the pool holds.
        """
        self._first = first
        self._fallback = list(first.fallback)
        self._found = list(found)
        # Started on the --endpoints fallback: nothing was proven.
        self._nothingProven = not first.endpoints
        self.interval = nextInterval(self.config, first)
        now = self.reactor.seconds()
        self._provenAt = {e.identity: now for e in self._found if e.verified}

    def privilegedStartService(self):
        """
        Without a first round given, run it now: blocking, before the
        reactor runs (twistd calls this first), and propose what it found
        (or the fallback).

        @raise DiscoveryError: as L{discoverAtStart}: the gateway must not
            start.
        """
        super().privilegedStartService()
        self._startingRound()

    def _startingRound(self):
        if self._first is not None:
            return
        result = self._discover(self.config, known=frozenset())
        endpoints, first = startingPoint(self.config, result, self._fallback or None)
        self._propose(endpoints, "SRV discovery at start", found=bool(first.endpoints))
        self._started(first, self._found)

    def startService(self):
        self._startingRound()
        super().startService()
        self.log.info(
            "discovered cluster from SRV {domain}: {endpoints}; {refresh}",
            domain=self.config.domain,
            endpoints=[str(e) for e in self.pool.endpoints],
            refresh=self._describeInterval(),
        )
        self._logRefusals(self._first)
        self._logFailures(self._first)
        self._lookupErrors = dict(self._first.errors)
        for service, error in self._first.errors:
            self.log.warn(
                "SRV look-up of {service} failed at start ({error}); using the other "
                "name's answer",
                service=service,
                error=error,
            )
        for endpoint in self._found:
            if not endpoint.verified:
                self.log.warn(
                    "endpoint {endpoint} accepted unverified (--insecure-discovery)",
                    endpoint=str(endpoint),
                )
        self._schedule(self.interval)

    def stopService(self):
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        return defer.succeed(None)

    def _describeInterval(self):
        if self.interval is None:
            return "re-resolution is off (--discovery-refresh=0)"
        return f"next look-up in {formatDuration(self.interval)}"

    def _schedule(self, interval):
        if interval is None or not self.running:
            return
        self._call = self.reactor.callLater(interval, self.refresh)

    def refresh(self):
        """
        Run one round now (also what each timer does); while a round runs,
        wait for that one.

        @return: a new Deferred for this caller, firing with L{None} when
            the round has been merged (never the round's own Deferred: a
            caller's callbacks cannot change what the round or another
            caller sees).
        """
        waiter = defer.Deferred()
        self._waiters.append(waiter)
        if self._round is None:
            self._startRound()
        return waiter

    def _startRound(self):
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        now = self.reactor.seconds()
        known = self._roundKnown = frozenset(
            e.identity
            for e in self._found
            if now - self._provenAt.get(e.identity, float("-inf")) < self.reverifyAfter
        )
        # maybeDeferred: a runner that raises (no thread to be had) fails
        # this round, which is logged and rescheduled like any other.
        d = self._round = defer.maybeDeferred(
            self._run, self._discover, self.config, known=known
        )
        d.addCallback(self._merge)
        d.addErrback(self._failed)
        d.addBoth(self._done)

    def refreshNow(self):
        """
        Run one round now (SIGHUP).

        @return: a Deferred firing with a one-line summary of the round.
        """
        return self.refresh().addCallback(lambda _: f"SRV discovery: {self.lastResult}")

    def describe(self):
        """
        One line for the status page: the domain, what the last round found,
        and when the next look-up comes.
        """
        if self._round is not None:
            when = "a look-up is running"
        elif self._call is not None and self._call.active():
            remaining = max(0, round(self._call.getTime() - self.reactor.seconds()))
            when = f"next look-up in {formatDuration(remaining)}"
        elif self.interval is None:
            when = "re-resolution is off (--discovery-refresh=0)"
        else:
            when = "no look-up scheduled"
        return f"SRV discovery of {self.config.domain}: {self.lastResult}; {when}"

    def _failed(self, reason):
        self.failures += 1
        self.lastResult = f"round failed ({reason.getErrorMessage()}); endpoints kept"
        self.log.failure("SRV discovery round failed; keeping the endpoints", reason)
        self.interval = nextInterval(self.config, DiscoveryResult(errors=(("", ""),)))
        return None

    def _done(self, result):
        self._round = None
        self.rounds += 1
        if self.running and self._call is None:
            self._schedule(self.interval)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)
        return None

    def _merge(self, result):
        if not self.running:
            return
        self.interval = nextInterval(self.config, result)
        self._logRefusals(result)
        self._logFailures(result)
        keeping = len(self.pool.endpoints)
        if not result.records:
            self._lookupErrors = dict(result.errors)
            self.failures += 1
            if result.dnsFailed:
                self.lastResult = (
                    f"look-up failed ({'; '.join(e for _, e in result.errors)}); "
                    f"kept {keeping} endpoints"
                )
                self.log.warn(
                    "SRV look-up failed ({errors}); keeping the last good set of {count} "
                    "endpoints; next look-up in {interval}",
                    errors="; ".join(e for _, e in result.errors),
                    count=keeping,
                    interval=formatDuration(self.interval or 0),
                )
            else:
                self.lastResult = f"no SRV record found; kept {keeping} endpoints"
                self.log.warn(
                    "SRV discovery found no usable endpoint (no SRV record: {found}); "
                    "keeping the last good set of {count} endpoints",
                    found=result.describe(),
                    count=keeping,
                )
            return
        endpoints = _unique(list(result.endpoints) + stillGood(self._found, result, self.config))
        self._logLookupErrors(result, endpoints)
        if not endpoints:
            self._nothing(result)
            return
        before = {e.key: e for e in self.pool.endpoints}
        now = self.reactor.seconds()
        for endpoint in result.endpoints:
            if endpoint.verified and endpoint.identity not in self._roundKnown:
                self._provenAt[endpoint.identity] = now  # a handshake proved it this round
        added, removed = self._propose(endpoints, reason="SRV discovery")
        kept = {e.identity for e in self._found}
        self._provenAt = {i: t for i, t in self._provenAt.items() if i in kept}
        self.lastResult = (
            f"{len(self.pool.endpoints)} endpoints, {len(added)} added, {len(removed)} removed"
        )
        if result.errors:
            self.lastResult += (
                f"; look-up failed for {', '.join(s for s, _ in result.errors)}, "
                f"its last good endpoints kept"
            )
        if self._nothingProven:
            self._nothingProven = False
            self.log.info(
                "SRV discovery proved endpoints again: {endpoints}",
                endpoints=[str(e) for e in self.pool.endpoints],
            )
        changed = [
            f"{e} priority {before[e.key].priority}->{e.priority} "
            f"weight {before[e.key].weight}->{e.weight}"
            for e in self.pool.endpoints
            if e.key in before
            and (before[e.key].priority, before[e.key].weight) != (e.priority, e.weight)
        ]
        if changed:
            self.log.info("SRV records changed: {changed}", changed=changed)
        for endpoint in added:
            if not endpoint.verified:
                self.log.warn(
                    "endpoint {endpoint} accepted unverified (--insecure-discovery)",
                    endpoint=str(endpoint),
                )

    def _propose(self, endpoints, reason, found=True):
        """
        The one way this source changes the pool: propose a whole list.

        @param found: C{endpoints} are what rounds found, which this source
            then owns (C{_found}); not the --endpoints fallback.
        @return: C{(added, removed)}, as the pool says.
        """
        endpoints = _unique(endpoints)
        self._found = endpoints if found else []
        return self.pool.replaceEndpoints(endpoints, reason=reason)

    def _nothing(self, result):
        """
        Records answered and none was proven: fail closed. The pool becomes
        the explicit --endpoints, or empty (new clients are closed).
        """
        self.failures += 1
        # Look again soon: a member may be proven again in a moment.
        self.interval = nextInterval(self.config, DiscoveryResult())
        removed = [str(e) for e in self._found]
        self._propose(self._fallback, "SRV discovery proved nothing", found=False)
        self._provenAt = {}
        if self._fallback:
            self.lastResult = "nothing proven; using the --endpoints fallback"
        else:
            self.lastResult = "nothing proven; no endpoint left, new clients are closed"
        if self._nothingProven:
            return
        self._nothingProven = True
        if self._fallback:
            self.log.error(
                "SRV discovery proved no endpoint ({found}); removed {removed}; new "
                "clients go to --endpoints {endpoints} until a look-up proves one; next "
                "look-up in {interval}",
                found=result.describe(),
                removed=removed,
                endpoints=[str(e) for e in self._fallback],
                interval=formatDuration(self.interval or 0),
            )
        else:
            self.log.error(
                "SRV discovery proved no endpoint ({found}); removed {removed}; no "
                "endpoint is left: new clients are closed until a look-up proves one "
                "(open connections are left); next look-up in {interval}",
                found=result.describe(),
                removed=removed,
                interval=formatDuration(self.interval or 0),
            )

    def _logLookupErrors(self, result, endpoints):
        """
        When one name's look-up fails while the other answers: a warning
        when it starts failing (or fails differently), not at every round,
        and a line when it answers again.
        """
        errors = dict(result.errors)
        for service, error in errors.items():
            if self._lookupErrors.get(service) != error:
                self.log.warn(
                    "SRV look-up of {service} failed ({error}); keeping its last good "
                    "endpoints and using the other name's answer; now {endpoints}",
                    service=service,
                    error=error,
                    endpoints=[str(e) for e in endpoints],
                )
        for service in self._lookupErrors:
            if service not in errors:
                self.log.info("SRV look-up of {service} answers again", service=service)
        self._lookupErrors = errors

    def _logFailures(self, result):
        """
        Log each unexpected exception with its traceback, once: not again
        while the same record keeps failing the same way.
        """
        logged = frozenset((what, describeFailure(f)) for what, f in result.failures)
        for what, reason in result.failures:
            if (what, describeFailure(reason)) not in self._failuresLogged:
                self.log.failure(
                    "SRV discovery: unexpected error for {what}; refused", reason, what=what
                )
        self._failuresLogged = logged

    def _logRefusals(self, result):
        refused = dict(result.refused)
        for what, reason in refused.items():
            if self._refused.get(what) != reason:
                self.log.warn(
                    "discovered endpoint {endpoint} refused: {reason} (tried again at "
                    "each look-up)",
                    endpoint=what,
                    reason=reason,
                )
        self._refused = refused
