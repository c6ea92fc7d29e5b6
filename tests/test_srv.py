"""
Tests for L{etcdgw.srv}: SRV discovery's values and rules, pure (no DNS, no
threads, no clock).
"""

from twisted.trial.unittest import SynchronousTestCase

from etcdgw.srv import (
    MAX_REFRESH,
    MIN_REFRESH,
    DiscoveredEndpoint,
    DiscoveryConfig,
    DiscoveryResult,
    SRVRecord,
    clampTTL,
    nextInterval,
    parseNameserver,
    parseSRV,
    serviceNames,
    stillGood,
)
from tests.srvzone import PLAIN, SSL, srvRdata


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


def _found(n, tls=True):
    return DiscoveredEndpoint(f"127.0.0.{n}", 2379, 0, 0, tls, name=f"m{n}.etcd.test", verified=tls)


class StillGoodTests(SynchronousTestCase):
    """
    Which of the endpoints discovery last proposed a round that could not
    judge them keeps.
    """

    config = DiscoveryConfig("etcd.test")

    def test_failedName(self):
        """
        The endpoints of a name whose look-up failed are kept; those of the
        name that answered are not (the answer decides), nor those proven
        again.
        """
        found = [_found(1), _found(2, tls=False), _found(3)]
        result = DiscoveryResult(
            endpoints=(_found(3),), records=("r",), errors=((SSL, "timed out"),)
        )
        self.assertEqual(stillGood(found, result, self.config), [_found(1)])

    def test_unresolvedTarget(self):
        """
        An endpoint whose record's target could not be resolved is kept,
        with the record's new priority and weight.
        """
        record = SRVRecord(SSL, True, "m1.etcd.test", 2379, 7, 3, 60)
        result = DiscoveryResult(records=(record,), unresolved=(record,))
        [kept] = stillGood([_found(1), _found(2)], result, self.config)
        self.assertEqual((kept.key, kept.priority, kept.weight), (("127.0.0.1", 2379), 7, 3))

    def test_judged(self):
        """A round that judged every name keeps nothing it did not prove."""
        result = DiscoveryResult(endpoints=(_found(2),), records=("r",))
        self.assertEqual(stillGood([_found(1), _found(2)], result, self.config), [])
