"""
Tests for L{etcdgw.discovery}: record names, parsing, TTL clamping, one round
against a fake resolver, and the merge into the pool on a MemoryReactorClock.
"""

import threading

import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.python import failure, usage
from twisted.trial.unittest import SynchronousTestCase

from etcdgw.discovery import (
    MAX_REFRESH,
    MIN_REFRESH,
    PLAIN_REFUSED,
    DiscoveredEndpoint,
    DiscoveryConfig,
    DiscoveryError,
    DiscoveryResult,
    DiscoveryService,
    LookupFailed,
    SRVRecord,
    _parallel,
    clampTTL,
    discover,
    discoverAtStart,
    nextInterval,
    parseNameserver,
    parseSRV,
    serviceNames,
)
from etcdgw.endpoint import Endpoint
from etcdgw.pool import UpstreamPool
from etcdgw.verify import ValidationError

SSL = "_etcd-client-ssl._tcp.etcd.test"
PLAIN = "_etcd-client._tcp.etcd.test"


def srvRdata(priority, weight, port, target):
    return dns.rdata.from_text(
        dns.rdataclass.IN, dns.rdatatype.SRV, f"{priority} {weight} {port} {target}"
    )


class _A:
    def __init__(self, address):
        self.address = address


class FakeResolver:
    """
    A zone in a dict: C{{(name, rdtype): (rdatas, ttl) or LookupFailed}}.
    """

    def __init__(self, zone):
        self.zone = zone
        self.asked = []

    def lookup(self, name, rdtype):
        self.asked.append((name, rdtype))
        answer = self.zone.get((name, rdtype), ([], None))
        if isinstance(answer, Exception):
            raise answer
        return answer


def zone(ssl=(), plain=(), ttl=30, hosts=None):
    """
    SRV records as C{(priority, weight, port, target)}; every target resolves
    to the address in C{hosts} (default 127.0.0.N in order of appearance).
    """
    result = {}
    if ssl:
        result[(SSL, "SRV")] = ([srvRdata(*r) for r in ssl], ttl)
    if plain:
        result[(PLAIN, "SRV")] = ([srvRdata(*r) for r in plain], ttl)
    hosts = dict(hosts or {})
    for index, record in enumerate(list(ssl) + list(plain)):
        target = record[3].rstrip(".")
        address = hosts.setdefault(target, f"127.0.0.{index + 1}")
        if address is not None:
            result[(target, "A")] = ([_A(address)], ttl)
    return result


class FakeValidator:
    """
    Records each validation; refuses targets listed in C{refuse}.
    """

    def __init__(self, refuse=(), raises=None):
        self.refuse = dict.fromkeys(refuse, "certificate verify failed: rogue")
        self.raises = dict(raises or {})
        self.calls = []

    def __call__(self, address, port, name, trust, timeout, context=None):
        self.calls.append((address, port, name))
        if name in self.refuse:
            raise ValidationError(self.refuse[name])
        if name in self.raises:
            raise self.raises[name]


class NamesTests(SynchronousTestCase):
    def test_names(self):
        """
        The TLS name first, then the plain one, as etcd.
        """
        self.assertEqual(
            serviceNames("example.com."),
            [("_etcd-client-ssl._tcp.example.com", True), ("_etcd-client._tcp.example.com", False)],
        )

    def test_serviceName(self):
        """
        --discovery-srv-name adds -NAME to both service labels.
        """
        self.assertEqual(
            [n for n, _ in serviceNames("example.com", "prod")],
            ["_etcd-client-ssl-prod._tcp.example.com", "_etcd-client-prod._tcp.example.com"],
        )

    def test_nameserver(self):
        """
        --discovery-dns takes IP:PORT, [v6]:PORT or an IP alone; a name is refused.
        """
        self.assertEqual(parseNameserver("127.0.0.1:8600"), ("127.0.0.1", 8600))
        self.assertEqual(parseNameserver("[::1]:53"), ("::1", 53))
        self.assertEqual(parseNameserver("10.0.0.2"), ("10.0.0.2", 53))
        e = self.assertRaises(ValueError, parseNameserver, "dns.example:53")
        self.assertIn('"dns.example" must be an IP address', str(e))


class ParseTests(SynchronousTestCase):
    def test_records(self):
        """
        Priority, weight, port and target (lower case, no trailing dot) are kept.
        """
        records, refused = parseSRV(
            SSL, True, [srvRdata(10, 5, 2379, "M1.Etcd.Test."), srvRdata(20, 0, 2380, "m2.etcd.test.")], 42
        )
        self.assertEqual(refused, [])
        self.assertEqual(
            [(r.target, r.port, r.priority, r.weight, r.ttl, r.tls) for r in records],
            [("m1.etcd.test", 2379, 10, 5, 42, True), ("m2.etcd.test", 2380, 20, 0, 42, True)],
        )

    def test_dotTarget(self):
        """
        A target of "." (no service, RFC 2782) is skipped.
        """
        records, refused = parseSRV(SSL, True, [srvRdata(0, 0, 2379, ".")], 5)
        self.assertEqual((records, refused), ([], []))

    def test_portZero(self):
        """
        Port 0 is refused, naming the record.
        """
        records, refused = parseSRV(PLAIN, False, [srvRdata(0, 0, 0, "m1.etcd.test.")], 5)
        self.assertEqual(records, [])
        self.assertEqual(refused, [(f"{PLAIN} m1.etcd.test:0", "port 0 is not in 1-65535")])


class TTLTests(SynchronousTestCase):
    def test_clamp(self):
        """
        The TTL is clamped to [5s, 5m]; no TTL means the lower bound.
        """
        self.assertEqual(clampTTL(1), MIN_REFRESH)
        self.assertEqual(clampTTL(0), MIN_REFRESH)
        self.assertEqual(clampTTL(42), 42.0)
        self.assertEqual(clampTTL(86400), MAX_REFRESH)
        self.assertEqual(clampTTL(None), MIN_REFRESH)

    def test_nextInterval(self):
        """
        --discovery-refresh wins over the TTL; 0 turns re-resolution off; a
        failed round retries at the lower bound.
        """
        found = DiscoveryResult(records=("r",), ttl=3600)
        self.assertEqual(nextInterval(DiscoveryConfig("d"), found), MAX_REFRESH)
        self.assertEqual(nextInterval(DiscoveryConfig("d", refresh=2.0), found), 2.0)
        self.assertIsNone(nextInterval(DiscoveryConfig("d", refresh=0), found))
        failed = DiscoveryResult(errors=(("x", "timed out"),))
        self.assertEqual(nextInterval(DiscoveryConfig("d"), failed), MIN_REFRESH)


class DiscoverTests(SynchronousTestCase):
    def test_tlsVerified(self):
        """
        TLS records become endpoints at the target's address, carrying the
        name, priority and weight, after validation against the target name.
        """
        validator = FakeValidator()
        result = discover(
            DiscoveryConfig("etcd.test"),
            FakeResolver(zone(ssl=[(0, 1, 2379, "m1.etcd.test."), (1, 2, 2380, "m2.etcd.test.")], ttl=17)),
            validator,
        )
        self.assertEqual(
            list(result.endpoints),
            [
                DiscoveredEndpoint("127.0.0.1", 2379, 0, 1, True, name="m1.etcd.test", verified=True),
                DiscoveredEndpoint("127.0.0.2", 2380, 1, 2, True, name="m2.etcd.test", verified=True),
            ],
        )
        self.assertEqual(
            sorted(validator.calls),
            [("127.0.0.1", 2379, "m1.etcd.test"), ("127.0.0.2", 2380, "m2.etcd.test")],
        )
        self.assertEqual(result.ttl, 17)
        self.assertEqual(str(result.endpoints[0]), "m1.etcd.test:2379 (127.0.0.1)")
        self.assertEqual(result.endpoints[0].key, ("127.0.0.1", 2379))

    def test_plainRefused(self):
        """
        Without --insecure-discovery a plain record is refused with the
        documented reason and never validated.
        """
        validator = FakeValidator()
        result = discover(
            DiscoveryConfig("etcd.test"), FakeResolver(zone(plain=[(0, 0, 2379, "m1.etcd.test.")])), validator
        )
        self.assertEqual(result.endpoints, ())
        self.assertEqual(result.refused, ((f"{PLAIN} m1.etcd.test:2379", PLAIN_REFUSED),))
        self.assertEqual(validator.calls, [])
        self.assertIn("--insecure-discovery accepts it", result.describe())

    def test_insecure(self):
        """
        With --insecure-discovery every record is accepted, unverified, without
        a handshake.
        """
        validator = FakeValidator()
        result = discover(
            DiscoveryConfig("etcd.test", insecure=True),
            FakeResolver(zone(ssl=[(0, 0, 2379, "m1.etcd.test.")], plain=[(0, 0, 2380, "m2.etcd.test.")])),
            validator,
        )
        self.assertEqual([(e.port, e.tls, e.verified) for e in result.endpoints],
                         [(2379, True, False), (2380, False, False)])
        self.assertEqual(validator.calls, [])

    def test_validationRefused(self):
        """
        A TLS endpoint that fails validation is refused with the reason; the
        others are kept.
        """
        result = discover(
            DiscoveryConfig("etcd.test"),
            FakeResolver(zone(ssl=[(0, 0, 2379, "rogue.etcd.test."), (0, 0, 2380, "m1.etcd.test.")])),
            FakeValidator(refuse=["rogue.etcd.test"]),
        )
        self.assertEqual([e.name for e in result.endpoints], ["m1.etcd.test"])
        self.assertEqual(
            result.refused,
            ((f"{SSL} rogue.etcd.test:2379", "certificate verify failed: rogue"),),
        )

    def test_unresolvedTarget(self):
        """
        A target without an address is refused, saying so.
        """
        result = discover(
            DiscoveryConfig("etcd.test"),
            FakeResolver(zone(ssl=[(0, 0, 2379, "gone.etcd.test.")], hosts={"gone.etcd.test": None})),
            FakeValidator(),
        )
        self.assertEqual(result.endpoints, ())
        self.assertIn("target gone.etcd.test has no A or AAAA record", result.describe())

    def test_knownNotValidatedAgain(self):
        """
        An endpoint already proven (same name, address, port) is accepted
        without a new handshake.
        """
        validator = FakeValidator()
        known = {("m1.etcd.test", "127.0.0.1", 2379, True)}
        result = discover(
            DiscoveryConfig("etcd.test"),
            FakeResolver(zone(ssl=[(0, 0, 2379, "m1.etcd.test.")])),
            validator,
            known=frozenset(known),
        )
        self.assertEqual(len(result.endpoints), 1)
        self.assertEqual(validator.calls, [])

    def test_dnsFailure(self):
        """
        A failed look-up (not NXDOMAIN) marks the round failed.
        """
        resolver = FakeResolver({(SSL, "SRV"): LookupFailed("SRV look-up of x failed: timed out")})
        result = discover(DiscoveryConfig("etcd.test"), resolver, FakeValidator())
        self.assertTrue(result.dnsFailed)
        self.assertIn("timed out", result.describe())


class BadRecordTests(SynchronousTestCase):
    """
    Issue 11 item 5: one bad record refuses that record only, whatever it
    raises; one look-up that raises fails that look-up only.
    """

    def test_anyExceptionRefusesThatRecord(self):
        """
        Exceptions other than ValidationError from a proof (service_identity's
        CertificateError, a ValueError, anything) refuse that record with a
        one-line reason and are kept for logging; the good record is accepted.
        """
        from service_identity import CertificateError

        validator = FakeValidator(raises={
            "nosan.etcd.test": CertificateError("Certificate does not contain any `subjectAltName`s."),
            "ip.etcd.test": ValueError("Invalid DNS-ID."),
            "boom.etcd.test": RuntimeError("boom\nwith a second line"),
        })
        result = discover(
            DiscoveryConfig("etcd.test"),
            FakeResolver(zone(ssl=[
                (0, 0, 2379, "nosan.etcd.test."), (0, 0, 2379, "ip.etcd.test."),
                (0, 0, 2379, "boom.etcd.test."), (1, 0, 2379, "m1.etcd.test."),
            ])),
            validator,
        )
        self.assertEqual([e.name for e in result.endpoints], ["m1.etcd.test"])
        reasons = dict(result.refused)
        self.assertEqual(
            reasons[f"{SSL} nosan.etcd.test:2379"],
            "unexpected error: CertificateError: Certificate does not contain any `subjectAltName`s.",
        )
        self.assertEqual(reasons[f"{SSL} ip.etcd.test:2379"], "unexpected error: ValueError: Invalid DNS-ID.")
        self.assertEqual(
            reasons[f"{SSL} boom.etcd.test:2379"], "unexpected error: RuntimeError: boom with a second line"
        )
        self.assertEqual(
            sorted(type(f.value).__name__ for _, f in result.failures),
            ["CertificateError", "RuntimeError", "ValueError"],
        )

    def test_singleRecordException(self):
        """
        A round with one record whose proof raises is a refusal, not an
        exception out of discover().
        """
        result = discover(
            DiscoveryConfig("etcd.test"),
            FakeResolver(zone(ssl=[(0, 0, 2379, "m1.etcd.test.")])),
            FakeValidator(raises={"m1.etcd.test": KeyError("x")}),
        )
        self.assertEqual(result.endpoints, ())
        self.assertEqual(result.refused, ((f"{SSL} m1.etcd.test:2379", "unexpected error: KeyError: 'x'"),))

    def test_lookupException(self):
        """
        A look-up that raises something unexpected fails that name only: the
        other name's records are used.
        """
        records = zone(plain=[(0, 0, 2379, "m1.etcd.test.")])
        records[(SSL, "SRV")] = AttributeError("resolver bug")
        result = discover(DiscoveryConfig("etcd.test", insecure=True), FakeResolver(records), FakeValidator())
        self.assertEqual([e.name for e in result.endpoints], ["m1.etcd.test"])
        self.assertEqual(result.errors, ((SSL, f"SRV look-up of {SSL} failed: AttributeError: resolver bug"),))
        self.assertEqual(len(result.failures), 1)
        self.assertFalse(result.allFailed)

    def test_unusableAddressRefused(self):
        """
        An address from an A/AAAA answer passes the same check as flags: a
        target at 0.0.0.0 or a multicast address is refused, with the reason,
        and never dialled; a target with also a good address uses that one.
        """
        records = zone(ssl=[(0, 0, 2379, "zero.etcd.test."), (0, 0, 2379, "multi.etcd.test."),
                            (0, 0, 2379, "mixed.etcd.test.")],
                       hosts={"zero.etcd.test": "0.0.0.0", "multi.etcd.test": "224.0.0.1",
                              "mixed.etcd.test": None})
        records[("mixed.etcd.test", "A")] = ([_A("0.0.0.0"), _A("127.0.0.5")], 30)
        validator = FakeValidator()
        result = discover(DiscoveryConfig("etcd.test"), FakeResolver(records), validator)
        self.assertEqual([(e.name, e.host) for e in result.endpoints], [("mixed.etcd.test", "127.0.0.5")])
        reasons = dict(result.refused)
        self.assertIn("0.0.0.0 is an unspecified address", reasons[f"{SSL} zero.etcd.test:2379"])
        self.assertIn("224.0.0.1 is a multicast", reasons[f"{SSL} multi.etcd.test:2379"])
        self.assertEqual(validator.calls, [("127.0.0.5", 2379, "mixed.etcd.test")])

    def test_unusableAddressRefusedInsecure(self):
        """
        With --insecure-discovery too, an unusable address is refused.
        """
        result = discover(
            DiscoveryConfig("etcd.test", insecure=True),
            FakeResolver(zone(plain=[(0, 0, 2379, "zero.etcd.test.")], hosts={"zero.etcd.test": "0.0.0.0"})),
            FakeValidator(),
        )
        self.assertEqual(result.endpoints, ())
        self.assertIn("unspecified address", result.describe())

    def test_ipLiteralTarget(self):
        """
        An IP-literal target is that address (no A look-up), proven against
        the IP; an unusable one (0.0.0.0) is refused.
        """
        resolver = FakeResolver({(SSL, "SRV"): ([srvRdata(0, 0, 2379, "127.0.0.9."),
                                                 srvRdata(0, 0, 2380, "0.0.0.0.")], 30)})
        validator = FakeValidator()
        result = discover(DiscoveryConfig("etcd.test"), resolver, validator)
        self.assertEqual(
            list(result.endpoints),
            [DiscoveredEndpoint("127.0.0.9", 2379, 0, 0, True, name="127.0.0.9", verified=True)],
        )
        self.assertEqual(validator.calls, [("127.0.0.9", 2379, "127.0.0.9")])
        self.assertEqual(resolver.asked, [(SSL, "SRV"), (PLAIN, "SRV")])
        self.assertIn("0.0.0.0 is an unspecified address", dict(result.refused)[f"{SSL} 0.0.0.0:2380"])

    def test_targetLookupFailed(self):
        """
        A target whose address look-up failed (not "no address") is refused
        and marked unresolved, so the service can keep its last endpoint.
        """
        records = zone(ssl=[(0, 0, 2379, "m1.etcd.test."), (0, 0, 2379, "m2.etcd.test.")])
        records[("m2.etcd.test", "A")] = LookupFailed("A look-up of m2.etcd.test failed: timed out")
        result = discover(DiscoveryConfig("etcd.test"), FakeResolver(records), FakeValidator())
        self.assertEqual([e.name for e in result.endpoints], ["m1.etcd.test"])
        self.assertEqual([r.target for r in result.unresolved], ["m2.etcd.test"])
        self.assertIn("timed out", dict(result.refused)[f"{SSL} m2.etcd.test:2379"])


class ParallelTests(SynchronousTestCase):
    """
    The worker helper of a round: bounded, and it never loses an exception.
    """

    def test_exceptionIsFailure(self):
        """
        An item whose call raises gets a Failure in its place; the others
        get their results, in order.
        """

        def f(item):
            if item == 2:
                raise ValueError("two")
            return item * 10

        results = _parallel(f, [1, 2, 3])
        self.assertEqual((results[0], results[2]), (10, 30))
        self.assertIsInstance(results[1], failure.Failure)
        self.assertEqual(results[1].getErrorMessage(), "two")

    def test_bounded(self):
        """
        No more than the limit run at once, however many items there are.
        """
        lock = threading.Lock()
        running = [0, 0]  # now, most
        barrier = threading.Barrier(3)

        def f(item):
            with lock:
                running[0] += 1
                running[1] = max(running[1], running[0])
            try:
                barrier.wait(timeout=10)  # three at a time, all the way
            finally:
                with lock:
                    running[0] -= 1
            return item

        self.assertEqual(_parallel(f, list(range(12)), limit=3), list(range(12)))
        self.assertEqual(running[1], 3)


class StartTests(SynchronousTestCase):
    def test_nothingUsable(self):
        """
        Nothing usable and no explicit --endpoints: an error saying what was
        found and why it was refused.
        """
        e = self.assertRaises(
            DiscoveryError,
            discoverAtStart,
            DiscoveryConfig("etcd.test"),
            None,
            FakeResolver(zone(plain=[(0, 0, 2379, "m1.etcd.test.")])),
            FakeValidator(),
        )
        message = str(e)
        self.assertIn("--discovery-srv=etcd.test: no usable endpoint found", message)
        self.assertIn(f"{SSL}: no records", message)
        self.assertIn(f"{PLAIN}: 1 record", message)
        self.assertIn(f"m1.etcd.test:2379 refused: {PLAIN_REFUSED}", message)
        self.assertNotIn("\n", message)

    def test_fallback(self):
        """
        Nothing usable with an explicit --endpoints: those, logged at error level.
        """
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        fallback = [Endpoint("10.0.0.1", 2379)]
        endpoints, result = discoverAtStart(
            DiscoveryConfig("etcd.test"), fallback, FakeResolver({}), FakeValidator()
        )
        self.assertEqual(endpoints, fallback)
        errors = [e for e in events if e["log_level"].name == "error"]
        self.assertEqual(len(errors), 1)
        self.assertEqual(errors[0]["endpoints"], ["10.0.0.1:2379"])

    def test_dnsFailure(self):
        """
        DNS failure at start is an error with the DNS error, even with a fallback.
        """
        resolver = FakeResolver({
            (SSL, "SRV"): LookupFailed("SRV look-up of A failed: timed out"),
            (PLAIN, "SRV"): LookupFailed("SRV look-up of B failed: timed out"),
        })
        e = self.assertRaises(
            DiscoveryError, discoverAtStart, DiscoveryConfig("etcd.test"),
            [Endpoint("10.0.0.1", 2379)], resolver, FakeValidator(),
        )
        self.assertIn("DNS look-up failed: SRV look-up of A failed: timed out", str(e))

    def test_badRecordDoesNotStopStart(self):
        """
        A record whose proof raises does not stop the start: the good one is used.
        """
        endpoints, result = discoverAtStart(
            DiscoveryConfig("etcd.test"), None,
            FakeResolver(zone(ssl=[(0, 0, 2379, "bad.etcd.test."), (0, 0, 2379, "m1.etcd.test.")])),
            FakeValidator(raises={"bad.etcd.test": ValueError("Invalid DNS-ID.")}),
        )
        self.assertEqual([e.name for e in endpoints], ["m1.etcd.test"])
        self.assertIn("Invalid DNS-ID.", result.describe())

    def test_oneNameRefusedNamesRealReason(self):
        """
        One name REFUSED and the other's plain records refused without
        --insecure-discovery: the error says so, not only that DNS failed.
        """
        records = zone(plain=[(0, 0, 2379, "m1.etcd.test.")])
        records[(SSL, "SRV")] = LookupFailed(f"SRV look-up of {SSL} failed: no server answered: REFUSED")
        e = self.assertRaises(
            DiscoveryError, discoverAtStart, DiscoveryConfig("etcd.test"), None,
            FakeResolver(records), FakeValidator(),
        )
        message = str(e)
        self.assertIn("no usable endpoint found", message)
        self.assertIn(f"m1.etcd.test:2379 refused: {PLAIN_REFUSED}", message)
        self.assertIn("REFUSED", message)
        self.assertNotIn("\n", message)

    def test_oneNameRefusedOtherUsed(self):
        """
        One name REFUSED: the other's records start the gateway.
        """
        records = zone(plain=[(0, 0, 2379, "m1.etcd.test.")])
        records[(SSL, "SRV")] = LookupFailed(f"SRV look-up of {SSL} failed: REFUSED")
        endpoints, result = discoverAtStart(
            DiscoveryConfig("etcd.test", insecure=True), None, FakeResolver(records), FakeValidator()
        )
        self.assertEqual([e.name for e in endpoints], ["m1.etcd.test"])

    def test_fallbackKept(self):
        """
        The start result carries the explicit --endpoints, for the service.
        """
        fallback = [Endpoint("10.0.0.1", 2379)]
        _, result = discoverAtStart(
            DiscoveryConfig("etcd.test"), fallback,
            FakeResolver(zone(ssl=[(0, 0, 2379, "m1.etcd.test.")])), FakeValidator(),
        )
        self.assertEqual(result.fallback, tuple(fallback))


def ep(n, priority=0, weight=0):
    return DiscoveredEndpoint(f"127.0.0.{n}", 2379, priority, weight, True,
                              name=f"m{n}.etcd.test", verified=True)


def plain(n, priority=0, weight=0):
    return DiscoveredEndpoint(f"127.0.0.{n}", 2379, priority, weight, False,
                              name=f"p{n}.etcd.test", verified=False)


def record(n, priority=0, weight=0, tls=True):
    return SRVRecord(SSL if tls else PLAIN, tls, f"m{n}.etcd.test", 2379, priority, weight, 60)


class ServiceTests(SynchronousTestCase):
    """
    The refresh loop and the merge, on a MemoryReactorClock, with rounds
    answered by the test.
    """

    def setUp(self):
        self.clock = MemoryReactorClock()
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.rounds = []

    def runRound(self, f, *args, **kwargs):
        d = defer.Deferred()
        self.rounds.append((kwargs.get("known"), d))
        return d

    def makeService(self, first, config=None):
        self.pool = UpstreamPool(list(first.endpoints), self.clock)
        service = DiscoveryService(
            self.pool, self.clock, config or DiscoveryConfig("etcd.test"), first,
            discover=lambda *a, **k: None, runInThread=self.runRound,
        )
        service.startService()
        self.addCleanup(self.assertEqual, self.clock.getDelayedCalls(), [])
        self.addCleanup(service.stopService)
        return service

    def answer(self, result):
        _, d = self.rounds[-1]
        d.callback(result)

    def messages(self, text):
        from twisted.logger import formatEvent
        return [formatEvent(e) for e in self.events if text in formatEvent(e)]

    def test_refreshAtTTL(self):
        """
        The next round starts after the clamped TTL, not before.
        """
        self.makeService(DiscoveryResult(endpoints=(ep(1),), records=("r",), ttl=1))
        self.clock.advance(MIN_REFRESH - 0.1)
        self.assertEqual(self.rounds, [])
        self.clock.advance(0.1)
        self.assertEqual(len(self.rounds), 1)
        self.assertEqual(self.rounds[0][0], frozenset({ep(1).identity}))
        self.answer(DiscoveryResult(endpoints=(ep(1),), records=("r",), ttl=60))
        self.clock.advance(59)
        self.assertEqual(len(self.rounds), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.rounds), 2)
        self.answer(DiscoveryResult(endpoints=(ep(1),), records=("r",), ttl=60))

    def test_merge(self):
        """
        Added and removed endpoints reach the pool as one log line; an
        endpoint that left keeps its open connections' state object.
        """
        service = self.makeService(DiscoveryResult(endpoints=(ep(1), ep(2)), records=("r",), ttl=10))
        state1 = self.pool.stateOf(ep(1))
        state1.active = 3
        service.refresh()
        self.answer(DiscoveryResult(endpoints=(ep(2), ep(3)), records=("r",), ttl=10))
        self.assertEqual(self.pool.endpoints, [ep(2), ep(3)])
        self.assertEqual(state1.active, 3)
        lines = self.messages("endpoints changed")
        self.assertEqual(len(lines), 1)
        self.assertIn("added ['m3.etcd.test:2379 (127.0.0.3)']", lines[0])
        self.assertIn("removed ['m1.etcd.test:2379 (127.0.0.1)']", lines[0])

    def test_prioritiesSwapped(self):
        """
        Changed priorities are taken by the pool and logged.
        """
        service = self.makeService(
            DiscoveryResult(endpoints=(ep(1, priority=0), ep(2, priority=1)), records=("r",), ttl=10)
        )
        service.refresh()
        self.answer(DiscoveryResult(endpoints=(ep(1, priority=1), ep(2, priority=0)), records=("r",), ttl=10))
        self.assertEqual([e.priority for e in self.pool.endpoints], [1, 0])
        self.assertEqual(self.pool.pick().endpoint.name, "m2.etcd.test")
        self.assertEqual(len(self.messages("SRV records changed")), 1)

    def test_reverifiedPeriodically(self):
        """
        A proven endpoint is accepted without a handshake until it was proven
        reverifyAfter ago; then the next round proves it again, and a
        successful proof counts from then.
        """
        service = self.makeService(
            DiscoveryResult(endpoints=(ep(1), ep(2)), records=("r",), ttl=60)
        )
        both = frozenset({ep(1).identity, ep(2).identity})
        for _ in range(4):  # rounds at 60, 120, 180 and 240 s
            self.clock.advance(60)
            self.assertEqual(self.rounds[-1][0], both)
            self.answer(DiscoveryResult(endpoints=(ep(1), ep(2)), records=("r",), ttl=60))
        self.clock.advance(60)  # 300 s: both are due
        self.assertEqual(self.rounds[-1][0], frozenset())
        self.answer(DiscoveryResult(endpoints=(ep(1), ep(2)), records=("r",), ttl=60))
        self.clock.advance(60)
        self.assertEqual(self.rounds[-1][0], both)
        self.answer(DiscoveryResult(endpoints=(ep(1), ep(2)), records=("r",), ttl=60))
        self.assertEqual(service.reverifyAfter, 300)

    def test_failedReverificationRemoves(self):
        """
        An endpoint whose new proof fails (its certificate changed) is taken
        out of the pool, with the refusal and the change logged.
        """
        service = self.makeService(
            DiscoveryResult(endpoints=(ep(1), ep(2)), records=("r",), ttl=60)
        )
        self.clock.advance(service.reverifyAfter)  # the first round runs at 300 s
        self.assertEqual(self.rounds[-1][0], frozenset())
        refused = ((f"{SSL} m2.etcd.test:2379", "certificate verify failed: rogue"),)
        self.answer(
            DiscoveryResult(endpoints=(ep(1),), records=("r",), refused=refused, ttl=60)
        )
        self.assertEqual(self.pool.endpoints, [ep(1)])
        self.assertEqual(len(self.messages("certificate verify failed: rogue")), 1)
        self.assertEqual(len(self.messages("removed ['m2.etcd.test:2379 (127.0.0.2)']")), 1)
        # The survivor was proven again in that round.
        self.clock.advance(60)
        self.assertEqual(self.rounds[-1][0], frozenset({ep(1).identity}))
        self.answer(DiscoveryResult(endpoints=(ep(1),), records=("r",), ttl=60))

    def test_dnsFailureKeeps(self):
        """
        A failed round keeps the last good set, logged, and retries at 5s.
        """
        service = self.makeService(DiscoveryResult(endpoints=(ep(1),), records=("r",), ttl=60))
        service.refresh()
        self.answer(DiscoveryResult(errors=((SSL, "SRV look-up failed: timed out"),)))
        self.assertEqual(self.pool.endpoints, [ep(1)])
        self.assertEqual(len(self.messages("keeping the last good set of 1")), 1)
        self.clock.advance(MIN_REFRESH)
        self.assertEqual(len(self.rounds), 2)
        self.answer(DiscoveryResult(endpoints=(ep(1),), records=("r",), ttl=60))

    def test_emptyKeeps(self):
        """
        An empty answer keeps the last good set.
        """
        service = self.makeService(DiscoveryResult(endpoints=(ep(1),), records=("r",), ttl=60))
        service.refresh()
        self.answer(DiscoveryResult(lookups=((SSL, "no records"),)))
        self.assertEqual(self.pool.endpoints, [ep(1)])
        self.assertEqual(len(self.messages("found no usable endpoint")), 1)

    def test_refusalLoggedOnce(self):
        """
        A refused endpoint is logged when first refused (or for a new reason),
        not at every round, and is retried at every round.
        """
        refused = ((f"{SSL} rogue:2379", "certificate verify failed: x"),)
        service = self.makeService(
            DiscoveryResult(endpoints=(ep(1),), records=("r",), refused=refused, ttl=60)
        )
        for _ in range(3):
            service.refresh()
            self.answer(DiscoveryResult(endpoints=(ep(1),), records=("r",), refused=refused, ttl=60))
        self.assertEqual(len(self.messages("rogue:2379 refused")), 1)
        self.assertEqual(len(self.rounds), 3)

    def test_failedRoundSurvives(self):
        """
        An exception in a round is logged and the loop goes on.
        """
        service = self.makeService(DiscoveryResult(endpoints=(ep(1),), records=("r",), ttl=60))
        service.refresh()
        self.rounds[-1][1].errback(RuntimeError("boom"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.clock.advance(MIN_REFRESH)
        self.assertEqual(len(self.rounds), 2)
        self.answer(DiscoveryResult(endpoints=(ep(1),), records=("r",), ttl=60))

    def test_refreshNowSummary(self):
        """
        refreshNow (SIGHUP) fires with a one-line summary; failures are counted.
        """
        service = self.makeService(DiscoveryResult(endpoints=(ep(1),), records=("r",), ttl=60))
        d = service.refreshNow()
        self.answer(DiscoveryResult(endpoints=(ep(1), ep(2)), records=("r",), ttl=60))
        self.assertEqual(
            self.successResultOf(d), "SRV discovery: 2 endpoints, 1 added, 0 removed"
        )
        d = service.refreshNow()
        self.answer(DiscoveryResult(errors=((SSL, "SRV look-up failed: timed out"),)))
        self.assertEqual(
            self.successResultOf(d),
            "SRV discovery: look-up failed (SRV look-up failed: timed out); kept 2 endpoints",
        )
        self.assertEqual((service.rounds, service.failures), (2, 1))
        self.clock.advance(MIN_REFRESH)
        self.answer(DiscoveryResult(endpoints=(ep(1),), records=("r",), ttl=60))

    def test_refreshOff(self):
        """
        --discovery-refresh=0: no round is ever scheduled.
        """
        self.makeService(
            DiscoveryResult(endpoints=(ep(1),), records=("r",), ttl=1),
            DiscoveryConfig("etcd.test", refresh=0),
        )
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stopDuringRound(self):
        """
        A round that ends after stopService changes nothing and schedules nothing.
        """
        service = self.makeService(DiscoveryResult(endpoints=(ep(1),), records=("r",), ttl=60))
        service.refresh()
        service.stopService()
        self.answer(DiscoveryResult(endpoints=(ep(2),), records=("r",), ttl=60))
        self.assertEqual(self.pool.endpoints, [ep(1)])

    def test_fallbackReplaced(self):
        """
        Static fallback endpoints are replaced once discovery finds some.
        """
        self.pool = None
        first = DiscoveryResult(lookups=((SSL, "no records"),))
        pool = UpstreamPool([Endpoint("10.0.0.1", 2379)], self.clock)
        service = DiscoveryService(pool, self.clock, DiscoveryConfig("etcd.test"), first,
                                   discover=None, runInThread=self.runRound)
        service.startService()
        self.addCleanup(service.stopService)
        self.clock.advance(MIN_REFRESH)
        self.answer(DiscoveryResult(endpoints=(ep(1),), records=("r",), ttl=60))
        self.assertEqual(pool.endpoints, [ep(1)])
        self.assertEqual(len(self.messages("proved endpoints again")), 1)
        service.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])


    def test_allReverificationsFailRemoves(self):
        """
        Issue 11 item 16: when every endpoint fails its new proof, they are
        removed (fail closed), logged once at error level saying new clients
        are closed; the next look-up comes at the lower bound, and a proof
        brings the endpoint back.
        """
        service = self.makeService(DiscoveryResult(endpoints=(ep(1),), records=("r",), ttl=60))
        self.clock.advance(service.reverifyAfter)
        self.assertEqual(self.rounds[-1][0], frozenset())
        refused = ((f"{SSL} m1.etcd.test:2379", "certificate verify failed: rogue"),)
        self.answer(DiscoveryResult(records=("r",), refused=refused, lookups=((SSL, "1 record"),), ttl=60))
        self.assertEqual(self.pool.endpoints, [])
        self.assertIsNone(self.pool.pick())
        errors = [e for e in self.events if e["log_level"].name == "error"
                  and "proved no endpoint" in e["log_format"]]
        self.assertEqual(len(errors), 1)
        self.assertEqual(errors[0]["removed"], ["m1.etcd.test:2379 (127.0.0.1)"])
        self.assertIn("new clients are closed", errors[0]["log_format"])
        self.assertEqual(service.failures, 1)
        # Again refused at the next look-up, 5 s later: no second error line.
        self.clock.advance(MIN_REFRESH)
        self.assertEqual(len(self.rounds), 2)
        self.answer(DiscoveryResult(records=("r",), refused=refused, lookups=((SSL, "1 record"),), ttl=60))
        self.assertEqual(len(self.messages("proved no endpoint")), 1)
        # Fixed: proven again and back in the pool.
        self.clock.advance(MIN_REFRESH)
        self.answer(DiscoveryResult(endpoints=(ep(1),), records=("r",), ttl=60))
        self.assertEqual(self.pool.endpoints, [ep(1)])
        self.assertEqual(len(self.messages("proved endpoints again")), 1)

    def test_rogueCertificateEndToEnd(self):
        """
        Through the real discover(): the only member's certificate is replaced
        by a rogue one; its re-proof fails and it gets no new client.
        """
        validator = FakeValidator()
        resolver = FakeResolver(zone(ssl=[(0, 0, 2379, "m1.etcd.test.")], ttl=60))
        config = DiscoveryConfig("etcd.test")
        first = discover(config, resolver, validator)
        self.pool = UpstreamPool(list(first.endpoints), self.clock)
        service = DiscoveryService(
            self.pool, self.clock, config, first,
            discover=lambda config, known: discover(config, resolver, validator, known),
            runInThread=lambda f, *a, **k: defer.maybeDeferred(f, *a, **k),
        )
        service.startService()
        self.addCleanup(service.stopService)
        validator.refuse["m1.etcd.test"] = "certificate verify failed: rogue"
        self.clock.advance(service.reverifyAfter - 60)
        self.assertEqual(self.pool.endpoints, [ep(1)])  # accepted as known, no handshake
        self.clock.advance(60)
        self.assertEqual(self.pool.endpoints, [])
        self.assertIsNone(self.pool.pick())
        self.assertEqual(len(validator.calls), 2)
        service.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_nothingProvenUsesFallback(self):
        """
        Nothing proven with an explicit --endpoints: the pool becomes those,
        logged at error level.
        """
        fallback = (Endpoint("10.0.0.1", 2379),)
        first = DiscoveryResult(endpoints=(ep(1),), records=("r",), ttl=60, fallback=fallback)
        service = self.makeService(first)
        service.refresh()
        self.answer(DiscoveryResult(records=("r",), refused=((f"{SSL} m1.etcd.test:2379", "rogue"),), ttl=60))
        self.assertEqual(self.pool.endpoints, list(fallback))
        self.assertIn("new clients go to --endpoints ['10.0.0.1:2379']",
                      self.messages("proved no endpoint")[0])
        self.clock.advance(MIN_REFRESH)
        self.answer(DiscoveryResult(endpoints=(ep(2),), records=("r",), ttl=60))
        self.assertEqual(self.pool.endpoints, [ep(2)])

    def test_unresolvedTargetKept(self):
        """
        An endpoint whose target's address look-up failed is kept as last
        found (with the record's new priority); one whose proof failed is not.
        """
        self.makeService(DiscoveryResult(endpoints=(ep(1), ep(2), ep(3)), records=("r",), ttl=60))
        self.clock.advance(60)
        self.answer(DiscoveryResult(
            endpoints=(ep(1),), records=(record(1), record(2, priority=5), record(3)),
            unresolved=(record(2, priority=5),),
            refused=((f"{SSL} m2.etcd.test:2379", "A look-up failed: timed out"),
                     (f"{SSL} m3.etcd.test:2379", "certificate verify failed: rogue")),
            ttl=60,
        ))
        self.assertEqual(self.pool.endpoints, [ep(1), ep(2, priority=5)])

    def test_oneNameFailsOtherUsed(self):
        """
        Issue 11 item 17: one name's look-up fails (REFUSED) and the other
        answers: the failed name's endpoints are kept, the other's answer is
        used, the round follows the TTL, and the failure is logged once (and
        its end once).
        """
        self.makeService(DiscoveryResult(endpoints=(ep(1), plain(2)), records=("r",), ttl=60))
        refusedSSL = ((SSL, f"SRV look-up of {SSL} failed: no server answered: REFUSED"),)
        for n in (3, 4):
            self.clock.advance(60)
            self.answer(DiscoveryResult(
                endpoints=(plain(n),), records=(record(n, tls=False),),
                lookups=((PLAIN, "1 record"),), errors=refusedSSL, ttl=60,
            ))
            self.assertEqual(self.pool.endpoints, [plain(n), ep(1)])
        self.assertEqual(len(self.messages("keeping its last good endpoints")), 1)
        self.clock.advance(60)  # the TTL, not the 5 s of a failed round
        self.assertEqual(len(self.rounds), 3)
        self.answer(DiscoveryResult(
            endpoints=(ep(1), plain(4)), records=(record(1), record(4, tls=False)),
            lookups=((SSL, "1 record"), (PLAIN, "1 record")), ttl=60,
        ))
        self.assertEqual(len(self.messages("answers again")), 1)

    def test_refreshGivesEachCallerItsOwnDeferred(self):
        """
        Issue 11 item 19: two callers during one round get two Deferreds; what
        one caller's callbacks do is not seen by the other or the round.
        """
        service = self.makeService(DiscoveryResult(endpoints=(ep(1),), records=("r",), ttl=60))
        first = service.refresh()
        first.addCallback(lambda _: 1 / 0)
        second = service.refresh()
        self.assertIsNot(first, second)
        self.assertEqual(len(self.rounds), 1)
        self.answer(DiscoveryResult(endpoints=(ep(1), ep(2)), records=("r",), ttl=60))
        self.assertIsNone(self.successResultOf(second))
        self.failureResultOf(first, ZeroDivisionError)
        self.assertEqual(self.pool.endpoints, [ep(1), ep(2)])
        self.assertEqual(service.rounds, 1)
        self.clock.advance(60)
        self.answer(DiscoveryResult(endpoints=(ep(1),), records=("r",), ttl=60))

    def test_runnerRaises(self):
        """
        A round that cannot even start (no thread) is a failed round: logged,
        retried at the lower bound, and the caller's Deferred fires.
        """

        def noThread(f, *args, **kwargs):
            raise RuntimeError("can't start new thread")

        self.pool = UpstreamPool([ep(1)], self.clock)
        service = DiscoveryService(self.pool, self.clock, DiscoveryConfig("etcd.test"),
                                   DiscoveryResult(endpoints=(ep(1),), records=("r",), ttl=60),
                                   discover=None, runInThread=noThread)
        service.startService()
        self.addCleanup(service.stopService)
        d = service.refresh()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual([c.getTime() for c in self.clock.getDelayedCalls()], [MIN_REFRESH])
        service.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_unexpectedErrorsLogged(self):
        """
        The unexpected exceptions of a round are logged with their traceback,
        in the reactor thread, once while they repeat.
        """
        self.makeService(DiscoveryResult(endpoints=(ep(1),), records=("r",), ttl=60))
        try:
            raise ValueError("Invalid DNS-ID.")
        except ValueError:
            reason = failure.Failure()
        for _ in range(2):
            self.clock.advance(60)
            self.answer(DiscoveryResult(endpoints=(ep(1),), records=("r",), ttl=60,
                                        failures=((f"{SSL} bad:2379", reason),)))
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)


class OptionsTests(SynchronousTestCase):
    def test_flagsNeedSRV(self):
        """
        Discovery flags without --discovery-srv are refused.
        """
        from etcdgw.tap import Options

        e = self.assertRaises(usage.UsageError, Options().parseOptions,
                              ["--discovery-dns=127.0.0.1:53"])
        self.assertEqual(str(e), "--discovery-dns needs --discovery-srv")
