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
verified against and what logs show).
"""

import threading

import attr
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.logger import Logger
from twisted.python import failure

from etcdgw.duration import formatDuration
from etcdgw.endpoint import Endpoint, formatHostPort, splitHostPort
from etcdgw.verify import ValidationError, validateTLS

#: Re-resolution follows the records' TTL, clamped to these bounds (seconds).
MIN_REFRESH = 5.0
MAX_REFRESH = 300.0

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
    """

    endpoints: tuple = ()
    records: tuple = ()
    refused: tuple = ()
    lookups: tuple = ()
    errors: tuple = ()
    ttl: object = None

    @property
    def dnsFailed(self):
        """
        A look-up failed (not "no such name"): this round says nothing
        reliable about the cluster.
        """
        return bool(self.errors)

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
    if result.dnsFailed or not result.records:
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
    The addresses of a target, A before AAAA.

    @raise LookupFailed: if a look-up failed or there is no address.
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
    if addresses:
        return addresses
    if errors:
        raise LookupFailed("; ".join(errors))
    raise LookupFailed(f"target {target} has no A or AAAA record")


def discover(config, resolver=None, validate=validateTLS, known=frozenset()):
    """
    One blocking discovery round.

    @param known: identities (L{DiscoveredEndpoint.identity}) already proven;
        they are accepted again without a new handshake.
    @rtype: L{DiscoveryResult}
    """
    if resolver is None:
        resolver = Resolver(config.nameserver, config.timeout)
    records, refused, lookups, errors, ttls = [], [], [], [], []
    names = serviceNames(config.domain, config.serviceName)

    def lookup(service):
        try:
            return resolver.lookup(service, "SRV")
        except LookupFailed as e:
            return e

    answers = _parallel(lookup, [service for service, _ in names])
    for (service, tls), answer in zip(names, answers):
        if isinstance(answer, LookupFailed):
            errors.append((service, str(answer)))
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
    outcomes = _check(config, resolver, validate, known, records)
    endpoints = []
    for record, (endpoint, reason) in zip(records, outcomes):
        if endpoint is not None:
            endpoints.append(endpoint)
        else:
            refused.append((f"{record.service} {formatHostPort(record.target, record.port)}",
                            reason))
    return DiscoveryResult(
        endpoints=tuple(endpoints),
        records=tuple(records),
        refused=tuple(refused),
        lookups=tuple(lookups),
        errors=tuple(errors),
        ttl=min(ttls) if ttls else None,
    )


def _check(config, resolver, validate, known, records):
    """
    Resolve and prove each record, in parallel; C{[(endpoint, None) or
    (None, reason)]} in record order.
    """
    if not records:
        return []
    context = None
    if config.trust is not None and not config.insecure:
        try:
            context = config.trust.context()
        except ValidationError as e:
            return [(None, str(e))] * len(records)

    def one(record):
        return _checkOne(config, resolver, validate, known, context, record)

    return _parallel(one, records)


def _parallel(f, items):
    """
    C{[f(item) for item in items]}, each in its own daemon thread (every call
    is bounded by a timeout): a round takes as long as its slowest look-up or
    handshake, not their sum, and a process that exits never waits for one.
    """
    if len(items) <= 1:
        return [f(item) for item in items]
    results = [None] * len(items)

    def run(index, item):
        results[index] = f(item)

    workers = [
        threading.Thread(target=run, args=(i, item), daemon=True, name="etcdgw-discovery")
        for i, item in enumerate(items)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return results


def _checkOne(config, resolver, validate, known, context, record):
    if not record.tls and not config.insecure:
        return None, PLAIN_REFUSED
    try:
        addresses = resolveTarget(resolver, record.target)
    except LookupFailed as e:
        return None, str(e)

    def endpoint(address, verified):
        return DiscoveredEndpoint(
            address, record.port, record.priority, record.weight, record.tls,
            name=record.target, verified=verified,
        )

    if config.insecure:
        return endpoint(addresses[0], False), None
    reasons = []
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
        except OSError as e:  # pragma: no cover - validateTLS wraps these
            reasons.append(f"{address}: {e}")
            continue
        return candidate, None
    return None, "; ".join(reasons)


def discoverAtStart(config, fallback=None, resolver=None, validate=validateTLS):
    """
    The first round, before the gateway starts.

    @param fallback: the explicit C{--endpoints}, used (logged at error level)
        when discovery found nothing usable; L{None} when not given.
    @return: C{(endpoints, result)}.
    @raise DiscoveryError: when DNS failed, or nothing is usable and there is
        no fallback.
    """
    result = discover(config, resolver, validate)
    where = f"--discovery-srv={config.domain}"
    if result.dnsFailed and not result.endpoints:
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
    be in a DNS timeout then, which would hold SIGTERM up for seconds.
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

    A failed DNS round, or one with nothing usable, keeps the pool as it is
    (logged). Endpoints already proven are kept without a new handshake
    until they were proven L{reverifyAfter} ago; refused ones are tried
    again at each round.
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
        @param first: the L{DiscoveryResult} of the round at start.
        @param discover: C{discover(config, known=...)}, blocking.
        @param runInThread: C{runInThread(f, *args, **kwargs)} -> Deferred;
            default: the reactor's thread pool.
        """
        self.pool = pool
        self.reactor = reactor
        self.config = config
        self._discover = discover
        self._run = runInThread if runInThread is not None else _runInThread(reactor)
        self._call = None
        self._round = None
        self._first = first
        self._refused = {}
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
        Run one round now (also what each timer does).

        @return: a Deferred firing when the round has been merged.
        """
        if self._round is not None:
            return self._round
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
        d = self._round = self._run(self._discover, self.config, known=known)
        d.addCallback(self._merge)
        d.addErrback(self._failed)
        d.addBoth(self._done)
        return d

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
        return None

    def _merge(self, result):
        if not self.running:
            return
        self.interval = nextInterval(self.config, result)
        self._logRefusals(result)
        keeping = len(self.pool.endpoints)
        if result.dnsFailed:
            self.failures += 1
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
            return
        if not result.endpoints:
            self.failures += 1
            self.lastResult = f"nothing usable found; kept {keeping} endpoints"
            self.log.warn(
                "SRV discovery found no usable endpoint ({found}); keeping the last "
                "good set of {count} endpoints",
                found=result.describe(),
                count=keeping,
            )
            return
        before = {e.key: e for e in self.pool.endpoints}
        now = self.reactor.seconds()
        for endpoint in result.endpoints:
            if getattr(endpoint, "verified", False) and endpoint.identity not in self._roundKnown:
                self._provenAt[endpoint.identity] = now  # a handshake proved it this round
        added, removed = self.pool.replaceEndpoints(result.endpoints, reason="SRV discovery")
        kept = {e.identity for e in self.pool.endpoints if isinstance(e, DiscoveredEndpoint)}
        self._provenAt = {i: t for i, t in self._provenAt.items() if i in kept}
        self.lastResult = (
            f"{len(self.pool.endpoints)} endpoints, {len(added)} added, {len(removed)} removed"
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
