"""
One SRV discovery round, blocking: dnspython look-ups and TLS handshakes on
plain sockets, each bounded by a timeout, run by the one bounded pool of
daemon threads (L{BlockingPool}). The round at start runs before the
reactor does (a gateway that cannot find its cluster must not start); later
rounds run in the pool, so the reactor never blocks. One code path for
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

import functools
import os
import threading

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.threads import deferToThreadPool
from twisted.python import failure
from twisted.python.threadpool import ThreadPool

from etcdgw.endpoint import addressProblem, formatHostPort
from etcdgw.srv import (
    PLAIN_REFUSED,
    DiscoveredEndpoint,
    DiscoveryResult,
    describeFailure,
    oneLine,
    parseSRV,
    serviceNames,
)
from etcdgw.verify import ValidationError, validateTLS

#: At most this many threads run discovery's blocking work at once: a
#: round and its look-ups and handshakes.
MAX_PARALLEL = 16


class _DaemonThreadPool(ThreadPool):
    """
    Twisted's thread pool, with daemon threads: it is never stopped (so
    never joined), and a process that exits does not wait for a thread in
    a DNS time-out.
    """

    threadFactory = staticmethod(functools.partial(threading.Thread, daemon=True))


class BlockingPool:
    """
    The one executor of discovery's blocking work: at most C{limit} daemon
    threads (Twisted's thread pool; not the reactor's, which is joined at
    shutdown: SIGTERM during a round would wait for its DNS time-outs; nor
    a C{concurrent.futures} executor, which is joined at exit). Threads are
    started as work needs them and kept for the next round. A process
    forked after the pool was used (twistd daemonizing after the round at
    start) gets threads of its own: a fork keeps only the forking thread.

    A call that raises gives a L{Failure}: no exception is lost.
    """

    _MISSING = object()

    def __init__(self, limit=MAX_PARALLEL, name="etcdgw-discovery"):
        self.limit = limit
        self.name = name
        self._pid = None
        self._pool = None

    def _threads(self):
        """
        This process's thread pool.
        """
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._pool = _DaemonThreadPool(0, self.limit, self.name)
            self._pool.start()
        return self._pool

    def deferToThread(self, reactor, f, *args, **kwargs):
        """
        Run C{f(*args, **kwargs)} in the pool.

        @return: a Deferred that fires in the reactor thread with its result
            or its failure.
        """
        return deferToThreadPool(reactor, self._threads(), f, *args, **kwargs)

    def map(self, f, items):
        """
        C{[f(item) for item in items]}, blocking, by the calling thread and
        up to C{limit - 1} of the pool's: a round takes about as long as its
        slowest look-up or handshake, not their sum, and the threads stay
        bounded however many records DNS returns. The caller works too, so
        a round running in the pool never waits for a thread it holds.

        @return: the results in item order; a L{Failure} in the place of a
            call that raised, the others go on.
        """
        items = list(items)
        results = [self._MISSING] * len(items)
        indexes = iter(range(len(items)))
        done = threading.Condition()
        finished = [0]

        def work():
            while True:
                with done:
                    index = next(indexes, None)
                if index is None:
                    return
                try:
                    result = f(items[index])
                except BaseException:
                    result = failure.Failure()
                with done:
                    results[index] = result
                    finished[0] += 1
                    done.notify_all()

        threads = self._threads()
        for _ in range(min(self.limit, len(items)) - 1):
            try:
                threads.callInThread(work)
            except Exception:  # no thread to be had: fewer do it
                break
        work()
        with done:
            while finished[0] < len(items):
                done.wait()
        return results


_shared = []


def sharedPool():
    """
    The process's L{BlockingPool} for discovery (made on first use).
    """
    if not _shared:
        _shared.append(BlockingPool())
    return _shared[0]


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
            return self._failed(name, rdtype, f"no server answered: {oneLine(e)}")
        except dns.exception.DNSException as e:
            return self._failed(name, rdtype, oneLine(e))
        return list(answer), answer.rrset.ttl

    def _failed(self, name, rdtype, reason):
        raise LookupFailed(f"{rdtype} look-up of {name} failed: {reason}")


class LookupFailed(Exception):
    """
    A DNS look-up failed (not "no such name").
    """


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


def discover(config, resolver=None, validate=validateTLS, known=frozenset(), pool=None):
    """
    One blocking discovery round. Nothing one record or one look-up does
    escapes: each failure is that record's or that look-up's.

    @param known: identities (L{DiscoveredEndpoint.identity}) already proven;
        they are accepted again without a new handshake.
    @param pool: the L{BlockingPool} that runs the look-ups and handshakes
        (L{sharedPool} by default).
    @rtype: L{DiscoveryResult}
    """
    pool = pool if pool is not None else sharedPool()
    names = serviceNames(config.domain, config.serviceName)
    if resolver is None:
        try:
            resolver = Resolver(config.nameserver, config.timeout)
        except Exception as e:  # e.g. no /etc/resolv.conf
            return DiscoveryResult(
                errors=tuple((service, f"cannot set up the resolver: {oneLine(e)}")
                             for service, _ in names)
            )
    records, refused, lookups, errors, ttls, failures = [], [], [], [], [], []

    def lookup(service):
        return resolver.lookup(service, "SRV")

    answers = pool.map(lookup, [service for service, _ in names])
    for (service, tls), answer in zip(names, answers):
        if isinstance(answer, failure.Failure):
            if answer.check(LookupFailed):
                errors.append((service, answer.getErrorMessage()))
            else:
                errors.append(
                    (service, f"SRV look-up of {service} failed: {describeFailure(answer)}")
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
    outcomes = _check(config, resolver, validate, known, records, pool)
    for record, outcome in zip(records, outcomes):
        what = f"{record.service} {formatHostPort(record.target, record.port)}"
        if isinstance(outcome, failure.Failure):
            if outcome.check(LookupFailed):
                unresolved.append(record)
                refused.append((what, outcome.getErrorMessage()))
            else:
                refused.append((what, f"unexpected error: {describeFailure(outcome)}"))
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


def _check(config, resolver, validate, known, records, pool):
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

    return pool.map(one, records)


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
