"""
DNS SRV discovery of the endpoints, as etcd names its records, with every
endpoint proven before it gets traffic, and re-resolution while running.

One round (L{discover}) is blocking code: dnspython look-ups and TLS
handshakes on plain sockets, each bounded by a timeout. The first round runs
before the reactor starts (from C{Options.postOptions}: a gateway that cannot
find its cluster must not start); later rounds run in a daemon thread
(L{DiscoveryService}), so the reactor never blocks. One code path for
both, and dnspython's resolver (nameserver and port choice, TCP fallback on
truncation, A/AAAA) is simpler and better tested than re-building the same
on twisted.names.

Endpoints are keyed by the address they are dialled at: a target name is
resolved (A, then AAAA) through the same resolver as the SRV records, and the
endpoint carries both the resolved address (C{host}, what the proxy dials and
what the pool keys on) and the target name (C{name}, what the certificate was
verified against and what logs show). A target that is an IP literal is
that address, as etcd dials it; its certificate must name the IP.

One bad record refuses that record only: whatever goes wrong while resolving
or proving it (a look-up, an address that can never be a member's, a
certificate service_identity cannot check, an unexpected exception) becomes
its one-line reason, and the round goes on with the others.
"""

import threading

import attr
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.logger import Logger
from twisted.python import failure

from etcdgw.duration import formatDuration
from etcdgw.endpoint import Endpoint, addressProblem, formatHostPort, splitHostPort
from etcdgw.verify import ValidationError, validateTLS

#: Re-resolution follows the records' TTL, clamped to these bounds (seconds).
MIN_REFRESH = 5.0
MAX_REFRESH = 300.0

#: At most this many look-ups or handshakes of one round run at once.
MAX_PARALLEL = 16

#: The documented reason a plain record is refused without --insecure-discovery.
PLAIN_REFUSED = (
    "plain (non-TLS) endpoint cannot be verified; --insecure-discovery accepts it"
)


class DiscoveryError(Exception):
    """
    Discovery at start found nothing usable, or DNS failed; the message says
    what was found and why each was refused.
    """


@attr.s(frozen=True, slots=True, auto_attribs=True)
class DiscoveredEndpoint(Endpoint):
    """
    An endpoint found through SRV: C{host} is the resolved address that is
    dialled (so C{key} is C{(address, port)}), C{name} the SRV target that the
    certificate names.
    """

    name: str = ""
    verified: bool = False

    def __str__(self):
        if not self.name or self.name == self.host:
            return formatHostPort(self.host, self.port)
        return f"{formatHostPort(self.name, self.port)} ({self.host})"

    @property
    def serverName(self):
        """
        The SRV target: what the certificate names (C{host} is the address).
        """
        return self.name or self.host

    @property
    def identity(self):
        """
        What must not change for an endpoint to stay proven: the target, the
        address it was proven at, the port and the record kind.
        """
        return (self.name, self.host, self.port, self.tls)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class SRVRecord:
    """
    One SRV answer.

    @ivar service: the queried name, e.g. C{_etcd-client-ssl._tcp.example.com}.
    @ivar tls: whether it came from an C{-ssl} name.
    @ivar target: the target name, lower case, without the trailing dot.
    """

    service: str
    tls: bool
    target: str
    port: int
    priority: int
    weight: int
    ttl: int

    def __str__(self):
        return (
            f"{formatHostPort(self.target, self.port)} "
            f"(priority {self.priority}, weight {self.weight})"
        )


@attr.s(frozen=True, slots=True, auto_attribs=True)
class DiscoveryConfig:
    """
    How to discover.

    @ivar domain: C{--discovery-srv}.
    @ivar serviceName: C{--discovery-srv-name} or L{None}.
    @ivar insecure: C{--insecure-discovery}.
    @ivar trust: an L{etcdgw.verify.TLSTrust}.
    @ivar nameserver: C{(ip, port)} from C{--discovery-dns}, or L{None} for
        the system resolver.
    @ivar timeout: seconds for one DNS look-up and for one validation handshake.
    @ivar refresh: C{--discovery-refresh} in seconds: L{None} follows the
        TTL, C{0} turns re-resolution off.
    """

    domain: str
    serviceName: object = None
    insecure: bool = False
    trust: object = None
    nameserver: object = None
    timeout: float = 5.0
    refresh: object = None


@attr.s(frozen=True, slots=True, auto_attribs=True)
class DiscoveryResult:
    """
    What one round found.

    @ivar endpoints: the accepted endpoints, in record order.
    @ivar records: every SRV record seen.
    @ivar refused: C{(description, reason)} for each record not accepted.
    @ivar lookups: C{(srvName, summary)} for each look-up ("2 records",
        "no records").
    @ivar errors: C{(srvName, error)} for each look-up that failed.
    @ivar ttl: the smallest TTL among the answers, or L{None}.
    @ivar unresolved: the L{SRVRecord}s whose target's address look-up
        failed (a DNS failure, not "no address"): they are also in
        C{refused}, but say nothing against the endpoint last found for
        them.
    @ivar failures: C{(description, Failure)} for each unexpected exception
        (each also refused a record or failed a look-up), to be logged.
    @ivar fallback: the explicit C{--endpoints} that L{discoverAtStart}
        was given: what the gateway uses while discovery proves nothing.
    """

    endpoints: tuple = ()
    records: tuple = ()
    refused: tuple = ()
    lookups: tuple = ()
    errors: tuple = ()
    ttl: object = None
    unresolved: tuple = ()
    failures: tuple = ()
    fallback: tuple = ()

    @property
    def dnsFailed(self):
        """
        A look-up failed (not "no such name").
        """
        return bool(self.errors)

    @property
    def allFailed(self):
        """
        Every look-up failed: this round says nothing about the cluster.
        """
        return bool(self.errors) and not self.lookups

    def describe(self):
        """
        One line: what each look-up found and why each record was refused.
        """
        parts = []
        for name, summary in self.lookups:
            parts.append(f"{name}: {summary}")
        for _, error in self.errors:
            parts.append(error)
        for what, reason in self.refused:
            parts.append(f"{what} refused: {reason}")
        return "; ".join(parts) or "nothing looked up"


def serviceNames(domain, serviceName=None):
    """
    The SRV names etcd looks up, TLS first: C{[(name, tls), ...]}.
    """
    domain = domain.rstrip(".")
    suffix = f"-{serviceName}" if serviceName else ""
    return [
        (f"_etcd-client-ssl{suffix}._tcp.{domain}", True),
        (f"_etcd-client{suffix}._tcp.{domain}", False),
    ]


def clampTTL(ttl, low=MIN_REFRESH, high=MAX_REFRESH):
    """
    The re-resolution interval for a TTL: C{ttl} within C{[low, high]};
    C{low} when there is no TTL.
    """
    if ttl is None:
        return low
    return float(min(max(ttl, low), high))


def nextInterval(config, result):
    """
    Seconds to the next round after C{result}, or L{None} for never.
    """
    if config.refresh is not None:
        return config.refresh or None
    if result.allFailed or not result.records:
        return MIN_REFRESH
    return clampTTL(result.ttl)


def parseSRV(service, tls, rdatas, ttl):
    """
    Turn dnspython SRV rdatas into L{SRVRecord}s, in answer order. A target of
    C{.} ("no service here", RFC 2782) is skipped.

    @return: C{(records, refused)}, C{refused} as C{(description, reason)}.
    """
    records, refused = [], []
    for rdata in rdatas:
        target = rdata.target.to_text(omit_final_dot=True).lower()
        if target in ("", "."):
            continue
        description = f"{service} {formatHostPort(target, rdata.port)}"
        if not 1 <= rdata.port <= 65535:
            refused.append((description, f"port {rdata.port} is not in 1-65535"))
            continue
        records.append(
            SRVRecord(service, tls, target, rdata.port, rdata.priority, rdata.weight, ttl)
        )
    return records, refused


def parseNameserver(text):
    """
    Parse C{--discovery-dns}: C{IP:PORT}, C{[IPv6]:PORT}, or an IP alone (port 53).

    @raise ValueError: naming C{text}.
    """
    if isIPAddress(text) or isIPv6Address(text):
        return text, 53
    host, port = splitHostPort(text, what="--discovery-dns")
    if not (isIPAddress(host) or isIPv6Address(host)):
        raise ValueError(
            f'--discovery-dns "{text}": "{host}" must be an IP address (the DNS '
            f"server is asked before any name can be resolved)"
        )
    return host, port


class Resolver:
    """
    dnspython look-ups (blocking), through C{--discovery-dns} or the system
    resolver, with no cache (each round asks again).
    """

    def __init__(self, nameserver=None, timeout=5.0):
        import dns.resolver

        if nameserver is None:
            self._resolver = dns.resolver.Resolver()
        else:
            self._resolver = dns.resolver.Resolver(configure=False)
            self._resolver.nameservers = [nameserver[0]]
            self._resolver.port = nameserver[1]
        self._resolver.timeout = timeout
        self._resolver.lifetime = timeout
        self._resolver.cache = None

    def lookup(self, name, rdtype):
        """
        @return: C{(rdatas, ttl)}; C{([], None)} for "no such name" or no answer.
        @raise LookupFailed: for any other failure, with a one-line reason.
        """
        import dns.exception
        import dns.resolver

        try:
            answer = self._resolver.resolve(name.rstrip(".") + ".", rdtype, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return [], None
        except dns.exception.Timeout:
            return self._failed(name, rdtype, "timed out")
        except dns.resolver.NoNameservers as e:
            return self._failed(name, rdtype, f"no server answered: {_oneLine(e)}")
        except dns.exception.DNSException as e:
            return self._failed(name, rdtype, _oneLine(e))
        return list(answer), answer.rrset.ttl

    def _failed(self, name, rdtype, reason):
        raise LookupFailed(f"{rdtype} look-up of {name} failed: {reason}")


class LookupFailed(Exception):
    """
    A DNS look-up failed (not "no such name").
    """


def _oneLine(error):
    return " ".join(str(error).split()) or type(error).__name__


def resolveTarget(resolver, target):
    """
    The addresses of a target, A before AAAA; an IP-literal target is its
    own address.

    @return: a list, empty when the target has no address.
    @raise LookupFailed: if no look-up answered (a DNS failure).
    """
    if isIPAddress(target) or isIPv6Address(target):
        return [target]
    addresses, errors = [], []
    for rdtype in ("A", "AAAA"):
        try:
            rdatas, _ = resolver.lookup(target, rdtype)
        except LookupFailed as e:
            errors.append(str(e))
            continue
        addresses.extend(r.address for r in rdatas)
    if not addresses and errors:
        raise LookupFailed("; ".join(errors))
    return addresses


def discover(config, resolver=None, validate=validateTLS, known=frozenset()):
    """
    One blocking discovery round. Nothing one record or one look-up does
    escapes: each failure is that record's or that look-up's.

    @param known: identities (L{DiscoveredEndpoint.identity}) already proven;
        they are accepted again without a new handshake.
    @rtype: L{DiscoveryResult}
    """
    names = serviceNames(config.domain, config.serviceName)
    if resolver is None:
        try:
            resolver = Resolver(config.nameserver, config.timeout)
        except Exception as e:  # e.g. no /etc/resolv.conf
            return DiscoveryResult(
                errors=tuple((service, f"cannot set up the resolver: {_oneLine(e)}")
                             for service, _ in names)
            )
    records, refused, lookups, errors, ttls, failures = [], [], [], [], [], []

    def lookup(service):
        return resolver.lookup(service, "SRV")

    answers = _parallel(lookup, [service for service, _ in names])
    for (service, tls), answer in zip(names, answers):
        if isinstance(answer, failure.Failure):
            if answer.check(LookupFailed):
                errors.append((service, answer.getErrorMessage()))
            else:
                errors.append(
                    (service, f"SRV look-up of {service} failed: {_describeFailure(answer)}")
                )
                failures.append((f"SRV look-up of {service}", answer))
            continue
        rdatas, ttl = answer
        found, bad = parseSRV(service, tls, rdatas, ttl)
        records.extend(found)
        refused.extend(bad)
        if ttl is not None:
            ttls.append(ttl)
        lookups.append(
            (service, f"{len(rdatas)} record{'s' if len(rdatas) != 1 else ''}"
             if rdatas else "no records")
        )
    endpoints, unresolved = [], []
    for record, outcome in zip(records, _check(config, resolver, validate, known, records)):
        what = f"{record.service} {formatHostPort(record.target, record.port)}"
        if isinstance(outcome, failure.Failure):
            if outcome.check(LookupFailed):
                unresolved.append(record)
                refused.append((what, outcome.getErrorMessage()))
            else:
                refused.append((what, f"unexpected error: {_describeFailure(outcome)}"))
                if all(outcome is not f for _, f in failures):  # one per exception
                    failures.append((what, outcome))
            continue
        endpoint, reason = outcome
        if endpoint is not None:
            endpoints.append(endpoint)
        else:
            refused.append((what, reason))
    return DiscoveryResult(
        endpoints=tuple(endpoints),
        records=tuple(records),
        refused=tuple(refused),
        lookups=tuple(lookups),
        errors=tuple(errors),
        ttl=min(ttls) if ttls else None,
        unresolved=tuple(unresolved),
        failures=tuple(failures),
    )


def _describeFailure(reason):
    """
    One line for an unexpected exception: its type and message.
    """
    return f"{reason.type.__name__}: {_oneLine(reason.value)}"


def _check(config, resolver, validate, known, records):
    """
    Resolve and prove each record, in parallel: for each, in record order,
    C{(endpoint, None)}, C{(None, reason)} or a L{Failure} (L{LookupFailed}
    when the target's address look-up failed).
    """
    if not records:
        return []
    context = None
    if config.trust is not None and not config.insecure and any(r.tls for r in records):
        try:
            context = config.trust.context()
        except ValidationError as e:
            return [(None, str(e))] * len(records)
        except Exception:
            return [failure.Failure()] * len(records)

    def one(record):
        return _checkOne(config, resolver, validate, known, context, record)

    return _parallel(one, records)


_MISSING = object()


def _parallel(f, items, limit=MAX_PARALLEL):
    """
    C{[f(item) for item in items]}, run by at most C{limit} daemon worker
    threads (every call is bounded by a timeout): a round takes about as
    long as its slowest look-up or handshake, not their sum, the number of
    threads stays bounded however many records DNS returns, and a process
    that exits never waits for a worker.

    Not the reactor's thread pool nor a C{concurrent.futures} executor: both
    are joined at exit, so SIGTERM during a round would wait for its DNS
    timeouts.

    A call that raises gives a L{Failure} in its item's place: no exception
    is lost, and the other items go on.
    """
    items = list(items)
    results = [_MISSING] * len(items)
    indexes = iter(range(len(items)))
    lock = threading.Lock()

    def work():
        while True:
            with lock:
                index = next(indexes, None)
            if index is None:
                return
            try:
                results[index] = f(items[index])
            except BaseException:
                results[index] = failure.Failure()

    workers = []
    for _ in range(min(limit, len(items))):
        worker = threading.Thread(target=work, daemon=True, name="etcdgw-discovery")
        try:
            worker.start()
        except RuntimeError:  # no thread to be had: fewer workers do it
            break
        workers.append(worker)
    if not workers:
        work()  # not even one: this thread does it all
    for worker in workers:
        worker.join()
    return [
        failure.Failure(RuntimeError("discovery worker ended without a result"))
        if result is _MISSING else result
        for result in results
    ]


def _checkOne(config, resolver, validate, known, context, record):
    """
    Resolve and prove one record.

    @return: C{(endpoint, None)} or C{(None, reason)}.
    @raise LookupFailed: when the target's address look-up failed.
    """
    if not record.tls and not config.insecure:
        return None, PLAIN_REFUSED
    found = resolveTarget(resolver, record.target)
    if not found:
        return None, f"target {record.target} has no A or AAAA record"
    addresses, reasons = [], []
    for address in found:
        problem = addressProblem(address)
        if problem is None:
            addresses.append(address)
        else:
            reasons.append(problem)
    if not addresses:
        return None, "; ".join(reasons)

    def endpoint(address, verified):
        return DiscoveredEndpoint(
            address, record.port, record.priority, record.weight, record.tls,
            name=record.target, verified=verified,
        )

    if config.insecure:
        return endpoint(addresses[0], False), None
    for address in addresses:
        candidate = endpoint(address, True)
        if candidate.identity in known:
            return candidate, None
        try:
            validate(address, record.port, record.target, config.trust, config.timeout,
                     context=context)
        except ValidationError as e:
            reasons.append(str(e))
            continue
        return candidate, None
    return None, "; ".join(reasons)


def discoverAtStart(config, fallback=None, resolver=None, validate=validateTLS):
    """
    The first round, before the gateway starts.

    @param fallback: the explicit C{--endpoints}, used (logged at error level)
        when discovery found nothing usable; L{None} when not given.
    @return: C{(endpoints, result)}; C{result.fallback} holds C{fallback}.
    @raise DiscoveryError: when every look-up failed, or nothing is usable
        and there is no fallback; the message says why each record was
        refused (e.g. plain records without --insecure-discovery) and which
        look-up failed.
    """
    result = attr.evolve(
        discover(config, resolver, validate), fallback=tuple(fallback or ())
    )
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


def _runInThread(reactor):
    """
    Run a round in a daemon thread and fire a Deferred in the reactor thread.
    Not the reactor's thread pool: it is joined at shutdown, and a round can
    be in a DNS timeout then, which would hold SIGTERM up for seconds. One
    round runs at a time (L{DiscoveryService.refresh}), so this is one
    thread, plus the round's bounded workers (L{_parallel}).
    """

    def run(f, *args, **kwargs):
        d = defer.Deferred()

        def work():
            try:
                result = f(*args, **kwargs)
            except BaseException:
                reactor.callFromThread(d.errback, failure.Failure())
            else:
                reactor.callFromThread(d.callback, result)

        threading.Thread(target=work, daemon=True, name="etcdgw-discovery").start()
        return d

    return run


class DiscoveryService(Service):
    """
    Re-resolves the SRV records at their TTL (clamped) or every
    C{--discovery-refresh}, and feeds the pool what was proven.

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

    def __init__(self, pool, reactor, config, first, discover=discover, runInThread=None):
        """
        @param first: the L{DiscoveryResult} of the round at start (its
            C{fallback} is used while nothing is proven).
        @param discover: C{discover(config, known=...)}, blocking.
        @param runInThread: C{runInThread(f, *args, **kwargs)} -> Deferred;
            default: a daemon thread (L{_runInThread}).
        """
        self.pool = pool
        self.reactor = reactor
        self.config = config
        self._discover = discover
        self._run = runInThread if runInThread is not None else _runInThread(reactor)
        self._call = None
        self._round = None
        self._waiters = []
        self._first = first
        self._fallback = list(first.fallback)
        self._refused = {}
        self._lookupErrors = {}
        self._failuresLogged = frozenset()
        # Started on the --endpoints fallback: nothing was proven.
        self._nothingProven = not first.endpoints
        self.interval = nextInterval(config, first)
        self.rounds = 0
        self.failures = 0
        self.lastResult = "no look-up since start"
        now = reactor.seconds()
        self._provenAt = {
            e.identity: now for e in first.endpoints if getattr(e, "verified", False)
        }
        self._roundKnown = frozenset()

    def startService(self):
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
        for endpoint in self.pool.endpoints:
            if not getattr(endpoint, "verified", True):
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
            for e in self.pool.endpoints
            if isinstance(e, DiscoveredEndpoint)
            and now - self._provenAt.get(e.identity, float("-inf")) < self.reverifyAfter
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
        endpoints = list(result.endpoints) + self._stillGood(result)
        self._logLookupErrors(result, endpoints)
        if not endpoints:
            self._nothing(result)
            return
        before = {e.key: e for e in self.pool.endpoints}
        now = self.reactor.seconds()
        for endpoint in result.endpoints:
            if getattr(endpoint, "verified", False) and endpoint.identity not in self._roundKnown:
                self._provenAt[endpoint.identity] = now  # a handshake proved it this round
        added, removed = self.pool.replaceEndpoints(endpoints, reason="SRV discovery")
        kept = {e.identity for e in self.pool.endpoints if isinstance(e, DiscoveredEndpoint)}
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
            if not getattr(endpoint, "verified", True):
                self.log.warn(
                    "endpoint {endpoint} accepted unverified (--insecure-discovery)",
                    endpoint=str(endpoint),
                )

    def _stillGood(self, result):
        """
        The pool's endpoints that this round could not judge, kept as last
        found: those of a name whose look-up failed, and those of a record
        whose target's address look-up failed (with the record's new
        priority and weight). Not those proven again.
        """
        failedTLS = {
            tls for service, tls in serviceNames(self.config.domain, self.config.serviceName)
            if service in dict(result.errors)
        }
        unresolved = {(r.target, r.port, r.tls): r for r in result.unresolved}
        seen = {e.key for e in result.endpoints}
        kept = []
        for endpoint in self.pool.endpoints:
            if not isinstance(endpoint, DiscoveredEndpoint) or endpoint.key in seen:
                continue
            record = unresolved.get((endpoint.name, endpoint.port, endpoint.tls))
            if record is not None:
                endpoint = attr.evolve(endpoint, priority=record.priority, weight=record.weight)
            elif endpoint.tls not in failedTLS:
                continue
            seen.add(endpoint.key)
            kept.append(endpoint)
        return kept

    def _nothing(self, result):
        """
        Records answered and none was proven: fail closed. The pool becomes
        the explicit --endpoints, or empty (new clients are closed).
        """
        self.failures += 1
        # Look again soon: a member may be proven again in a moment.
        self.interval = nextInterval(self.config, DiscoveryResult())
        removed = [str(e) for e in self.pool.endpoints if isinstance(e, DiscoveredEndpoint)]
        self.pool.replaceEndpoints(self._fallback, reason="SRV discovery proved nothing")
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
        logged = frozenset((what, _describeFailure(f)) for what, f in result.failures)
        for what, reason in result.failures:
            if (what, _describeFailure(reason)) not in self._failuresLogged:
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
