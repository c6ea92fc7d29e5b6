"""
SRV discovery's values and rules, as etcd names its records: pure code (no
DNS, no sockets, no threads, no clock), so each rule is tested alone.

What the records are (L{SRVRecord}), what a round found
(L{DiscoveryResult}), the endpoint it proves (L{DiscoveredEndpoint}), how to
discover (L{DiscoveryConfig}), and the rules: which names are asked
(L{serviceNames}), how answers become records (L{parseSRV}, RFC 2782's
C{.} target), when to ask again (L{clampTTL}, L{nextInterval}), and which
endpoints a round that could not judge them keeps (L{stillGood}).

The blocking round is L{etcdgw.srvround}; the service that schedules rounds
and proposes what they prove to the pool is L{etcdgw.discovery}.
"""

import attr
from twisted.internet.abstract import isIPAddress, isIPv6Address

from etcdgw.endpoint import Endpoint, formatHostPort, splitHostPort

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

    @ivar verified: a TLS handshake proved it (not accepted under
        C{--insecure-discovery}).
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
    @ivar trust: what proves TLS records: an L{etcdgw.tls.ClientTLS} (its
        C{context()} makes the validation handshakes' context).
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
    @ivar fallback: the explicit C{--endpoints} that the round at start was
        given: what the gateway uses while discovery proves nothing.
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


def stillGood(found, result, config):
    """
    The endpoints of C{found} (what discovery last proposed) that the round
    C{result} could not judge, kept as last found: those of a name whose
    look-up failed, and those of a record whose target's address look-up
    failed (with the record's new priority and weight). Not those proven
    again, nor those the round refused.

    @param config: the L{DiscoveryConfig} (which names were asked).
    @return: a list of L{DiscoveredEndpoint}s, in C{found}'s order.
    """
    errors = dict(result.errors)
    failedTLS = {
        tls for service, tls in serviceNames(config.domain, config.serviceName)
        if service in errors
    }
    unresolved = {(r.target, r.port, r.tls): r for r in result.unresolved}
    seen = {e.key for e in result.endpoints}
    kept = []
    for endpoint in found:
        if endpoint.key in seen:
            continue
        record = unresolved.get((endpoint.name, endpoint.port, endpoint.tls))
        if record is not None:
            endpoint = attr.evolve(endpoint, priority=record.priority, weight=record.weight)
        elif endpoint.tls not in failedTLS:
            continue
        seen.add(endpoint.key)
        kept.append(endpoint)
    return kept


def oneLine(error):
    """
    C{error}'s message as one line (its type's name when it has none).
    """
    return " ".join(str(error).split()) or type(error).__name__


def describeFailure(reason):
    """
    One line for an unexpected exception (a L{Failure}): its type and message.
    """
    return f"{reason.type.__name__}: {oneLine(reason.value)}"
