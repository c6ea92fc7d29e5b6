"""
SRV discovery end to end: a real DNS server on 127.0.0.1 (L{tests.integration.dns}),
real etcd members with TLS certificates naming the SRV targets, the real
gateway process, and etcdctl through it.
"""

import json
import os

from twisted.trial import unittest

from etcdgw.srv import PLAIN_REFUSED
from tests.certs import CertificateAuthority, TLSServer
from tests.integration.dns import DNSServer, a, refused, srv
from tests.integration.etcd import ClusterTestMixin, TLSConfig, etcdctl
from tests.integration.gateway import REPOSITORY, GatewayProcess, GatewayStartError
from tests.integration.reliability_helpers import report, waitUntil


SSL = "_etcd-client-ssl._tcp.etcd.test"
PLAIN = "_etcd-client._tcp.etcd.test"


def _tls(directory):
    """
    A CA and one certificate per member naming mN.etcd.test (and 127.0.0.1,
    for the harness's health checks and etcdctl through the gateway).
    """
    ca = CertificateAuthority("etcdgw discovery test CA")
    certs = tuple(ca.issue(directory, f"m{i + 1}", [f"m{i + 1}.etcd.test"]) for i in range(3))
    path = ca.write(directory)
    _CAs[path] = ca
    # etcd 3.4 asks for client certificates as soon as --trusted-ca-file is set.
    clientCert, clientKey = ca.issue(directory, "client", [], ips=(), client=True)
    return TLSConfig(ca=path, certs=certs, clientCert=clientCert, clientKey=clientKey)


#: The CAs made by L{_tls}, by certificate path, to issue more certificates.
_CAs = {}


class _GatewayMixin:
    def dnsServer(self, records):
        server = DNSServer()
        self.addCleanup(server.cleanup)
        server.setRecords(records)
        server.start()
        return server

    def gateway(self, dns, *args):
        gw = GatewayProcess(
            ["--discovery-srv=etcd.test", "--discovery-dns=" + dns.address, "--retry-delay=1s"]
            + list(args),
            cwd=REPOSITORY,
            env={"PYTHONPATH": REPOSITORY},
        )
        self.addCleanup(gw.cleanup)
        return gw

    def failedStart(self, gw):
        self.assertRaises(GatewayStartError, gw.start)
        self.assertNotEqual(gw.returncode, 0)
        return gw.log()


class TLSDiscoveryTests(ClusterTestMixin, _GatewayMixin, unittest.TestCase):
    """
    C{_etcd-client-ssl._tcp} records verified against --trusted-ca-file.
    """

    clusterSize = 3
    clusterTLS = staticmethod(_tls)

    def setUp(self):
        super().setUp()
        self.ports = [self.cluster.members[i].clientPort for i in range(3)]
        self.ids = {int(self.cluster.memberID(i), 16): i for i in range(3)}

    def records(self, members, priorities=None, service=SSL, ttl=1):
        priorities = priorities or {}
        result = []
        for i in members:
            result.append(
                srv(service, f"m{i + 1}.etcd.test.", self.ports[i], priorities.get(i, 10), 0, ttl)
            )
        return result + [a(f"m{i + 1}.etcd.test") for i in range(3)]

    def answering(self, gw, count=6):
        """
        The member that answered each of C{count} etcdctl calls through the gateway.
        """
        seen = []
        for _ in range(count):
            rc, out, err = etcdctl(
                "https://" + gw.address, "endpoint", "status", "-w", "json", tls=self.cluster.tls
            )
            self.assertEqual(rc, 0, err + gw.log()[-3000:])
            seen.append(self.ids[json.loads(out)[0]["Status"]["header"]["member_id"]])
        return seen

    def test_verifiedAndFollowsDNS(self):
        """
        Verified members carry etcdctl through the gateway; a rogue-CA member and
        a wrong-name member (both preferred by priority) never get a client;
        members added, removed and re-prioritised in DNS are followed within a
        refresh; with the DNS server stopped the last good set keeps serving.
        """
        tmp = os.path.abspath(self.mktemp())
        os.makedirs(tmp)
        rogue = TLSServer.withCertificate(
            CertificateAuthority("rogue CA").issue(tmp, "rogue", ["rogue.etcd.test"])
        )
        self.addCleanup(rogue.close)
        # Issued by the trusted CA, but for another name than its SRV target.
        trustedCA = _CAs[self.cluster.tls.ca]
        wrong = TLSServer.withCertificate(trustedCA.issue(tmp, "wrong", ["other.etcd.test"]))
        self.addCleanup(wrong.close)
        traps = [
            srv(SSL, "rogue.etcd.test.", rogue.port, 0, 0, 1),
            srv(SSL, "wrong.etcd.test.", wrong.port, 0, 0, 1),
            a("rogue.etcd.test"),
            a("wrong.etcd.test"),
        ]
        dns = self.dnsServer(self.records([0, 1], {0: 10, 1: 20}) + traps)
        gw = self.gateway(
            dns,
            "--trusted-ca-file=" + self.cluster.tls.ca,
            "--discovery-refresh=1s",
            "--discovery-cert-file=" + self.cluster.tls.clientCert,
            "--discovery-key-file=" + self.cluster.tls.clientKey,
        )
        gw.start()
        log = gw.waitForLog("discovered cluster from SRV")
        self.assertIn("rogue.etcd.test:", log)
        self.assertIn("certificate verify failed: unable to get local issuer certificate", log)
        self.assertIn("certificate does not name wrong.etcd.test", log)

        # Priority 10 (m1) beats 20 (m2); the traps at 0 would win if accepted.
        self.assertEqual(set(self.answering(gw)), {0})

        # Priorities swapped.
        dns.setRecords(self.records([0, 1], {0: 20, 1: 10}) + traps)
        gw.waitForLog("SRV records changed")
        self.assertEqual(set(self.answering(gw)), {1})

        # m3 added at m2's priority, m2 removed.
        dns.setRecords(self.records([0, 2], {0: 20, 2: 10}) + traps)
        log = gw.waitForLog("added ['m3.etcd.test:")
        self.assertIn(
            f"removed ['m2.etcd.test:{self.ports[1]} (127.0.0.1)']",
            log[log.index("added ['m3.etcd.test:"):].splitlines()[0],
        )
        self.assertEqual(set(self.answering(gw)), {2})

        # DNS gone: the last good set keeps serving.
        dns.stop()
        gw.waitForLog("keeping the last good set of 2", timeout=20)
        self.assertEqual(set(self.answering(gw, 3)), {2})

        # The traps saw only validation handshakes, each naming its target.
        self.assertGreater(rogue.accepted, 1)  # retried at each refresh
        self.assertEqual(set(rogue.names), {"rogue.etcd.test"})
        self.assertEqual(set(wrong.names), {"wrong.etcd.test"})
        self.assertEqual(len(rogue.names), rogue.accepted)
        self.assertEqual(len(wrong.names), wrong.accepted)

    def test_srvNameAndTTL(self):
        """
        --discovery-srv-name selects _etcd-client-ssl-NAME._tcp; without
        --discovery-refresh the next look-up follows the TTL, clamped to 5s:
        the DNS server sees the second SRV query about 5s after the first.
        """
        name = "_etcd-client-ssl-prod._tcp.etcd.test"
        dns = self.dnsServer(self.records([1], service=name, ttl=1))
        gw = self.gateway(dns, "--trusted-ca-file=" + self.cluster.tls.ca, "--discovery-srv-name=prod")
        gw.start()
        log = gw.waitForLog("discovered cluster from SRV")
        self.assertIn("next look-up in 5s", log)
        self.assertEqual(set(self.answering(gw, 2)), {1})

        def rounds():
            # The SRV queries of that name, one per look-up round (a round's
            # retries come within a second of its first query).
            times = [when for when, qname, kind in dns.queries() if qname == name and kind == "SRV"]
            starts = []
            for when in times:
                if not starts or when - starts[-1] > 1.0:
                    starts.append(when)
            return starts if len(starts) >= 2 else None

        first, second = waitUntil(rounds, 10, message="a second SRV look-up")[:2]
        report("srv-ttl-refresh", ttl=1, clampedTo=5, secondQueryAfterS=round(second - first, 2))
        # Measured: 5.0s after the first round's query.
        self.assertGreater(second - first, 4.5)
        self.assertLess(second - first, 6.5)

    def test_nothingVerifiable(self):
        """
        Only members whose certificates do not chain to the CA: the gateway
        exits non-zero saying what it found and why each was refused.
        """
        tmp = os.path.abspath(self.mktemp())
        os.makedirs(tmp)
        otherCA = CertificateAuthority("another CA").write(tmp)
        dns = self.dnsServer(self.records([0]))
        log = self.failedStart(self.gateway(dns, "--trusted-ca-file=" + otherCA))
        self.assertIn("no usable endpoint found", log)
        self.assertIn(f"{SSL}: 1 record", log)
        self.assertIn(f"{SSL} m1.etcd.test:{self.ports[0]} refused: certificate verify failed", log)


class PlainDiscoveryTests(ClusterTestMixin, _GatewayMixin, unittest.TestCase):
    """
    C{_etcd-client._tcp} records: accepted with --insecure-discovery only.
    """

    clusterSize = 1

    def zone(self):
        port = self.cluster.members[0].clientPort
        return [srv(PLAIN, "m1.etcd.test.", port, 0, 0, 60), a("m1.etcd.test")]

    def test_insecure(self):
        """
        With --insecure-discovery, etcdctl works through the gateway, and the
        endpoint is logged as unverified.
        """
        dns = self.dnsServer(self.zone())
        gw = self.gateway(dns, "--insecure-discovery")
        gw.start()
        rc, out, err = etcdctl(gw.address, "put", "k", "plain")
        self.assertEqual(rc, 0, err)
        rc, out, err = etcdctl(gw.address, "get", "k", "--print-value-only")
        self.assertEqual((rc, out.strip()), (0, "plain"), err)
        self.assertIn("accepted unverified (--insecure-discovery)", gw.waitForLog("unverified"))

    def test_refused(self):
        """
        Without --insecure-discovery the plain record is refused at start with
        the documented reason, and the gateway exits non-zero.
        """
        log = self.failedStart(self.gateway(self.dnsServer(self.zone())))
        self.assertIn(f"{PLAIN} m1.etcd.test:{self.cluster.members[0].clientPort} refused: "
                      f"{PLAIN_REFUSED}", log)

    def test_fallback(self):
        """
        Nothing usable with an explicit --endpoints: the gateway falls back to
        them, logged at error level.
        """
        gw = self.gateway(self.dnsServer(self.zone()), "--endpoints=" + self.cluster.endpoints)
        gw.start()
        self.assertIn("falling back to --endpoints", gw.waitForLog("falling back"))
        rc, out, err = etcdctl(gw.address, "endpoint", "health")
        self.assertEqual(rc, 0, err)

    def test_dnsDownAtStart(self):
        """
        DNS failure at start: exit non-zero with the DNS error, even with --endpoints.
        """
        dns = self.dnsServer([])
        dns.stop()
        gw = self.gateway(dns, "--endpoints=" + self.cluster.endpoints, "--insecure-discovery")
        log = self.failedStart(gw)
        self.assertIn("DNS look-up failed", log)
        self.assertIn("timed out", log)


class HostileRecordTests(_GatewayMixin, unittest.TestCase):
    """
    Records that once crashed discovery or froze it (issue 11 items 5, 17),
    against the real gateway process; members are small TLS servers (or
    plain listening sockets), no etcd needed.
    """

    def setUp(self):
        self.tmp = os.path.abspath(self.mktemp())
        os.makedirs(self.tmp)
        self.ca = CertificateAuthority("etcdgw hostile records CA")
        self.caFile = self.ca.write(self.tmp)

    def server(self, basename, dnsNames, ips=("127.0.0.1",)):
        server = TLSServer.withCertificate(self.ca.issue(self.tmp, basename, dnsNames, ips=ips))
        self.addCleanup(server.close)
        return server

    def test_badRecordsRefusedOnly(self):
        """
        Records whose certificate has no SAN or only a "*" SAN, an IP-literal
        target whose certificate has no IP SAN, and a target at 0.0.0.0 are
        each refused with a reason; the gateway starts on the good member, an
        IP-literal target whose certificate names that IP is accepted, and a
        member added later joins (the rounds do not fail).
        """
        good = self.server("m1", ["m1.etcd.test"], ips=())
        byIP = self.server("ip", [], ips=("127.0.0.1",))
        nosan = self.server("nosan", [], ips=())
        star = self.server("star", ["*"], ips=())
        records = [
            srv(SSL, "m1.etcd.test.", good.port, 10, 0, 1),
            srv(SSL, "127.0.0.1.", byIP.port, 10, 0, 1),
            srv(SSL, "nosan.etcd.test.", nosan.port, 0, 0, 1),
            srv(SSL, "star.etcd.test.", star.port, 0, 0, 1),
            srv(SSL, "127.0.0.1.", nosan.port, 0, 0, 1),
            srv(SSL, "zero.etcd.test.", good.port, 0, 0, 1),
            a("m1.etcd.test"), a("nosan.etcd.test"), a("star.etcd.test"),
            a("zero.etcd.test", "0.0.0.0"),
        ]
        dns = self.dnsServer(records)
        gw = self.gateway(dns, "--trusted-ca-file=" + self.caFile, "--discovery-refresh=1s")
        gw.start()
        log = gw.waitForLog("discovered cluster from SRV")
        started = [line for line in log.splitlines() if "discovered cluster from SRV" in line][0]
        self.assertIn(f"m1.etcd.test:{good.port} (127.0.0.1)", started)
        self.assertIn(f"'127.0.0.1:{byIP.port}'", started)
        for trap in ("nosan", "star", "zero"):
            self.assertNotIn(trap, started)
        self.assertIn(f"{SSL} nosan.etcd.test:{nosan.port} refused: certificate of", log)
        self.assertIn("does not contain any `subjectAltName`s", log)
        self.assertIn(f"{SSL} star.etcd.test:{star.port} refused: certificate of", log)
        self.assertIn("too few host components", log)
        self.assertIn(f"{SSL} 127.0.0.1:{nosan.port} refused: certificate of", log)
        self.assertIn(f"{SSL} zero.etcd.test:{good.port} refused: 0.0.0.0 is an unspecified", log)
        self.assertNotIn("Traceback", log)

        m2 = self.server("m2", ["m2.etcd.test"], ips=())
        dns.setRecords(records + [srv(SSL, "m2.etcd.test.", m2.port, 10, 0, 1), a("m2.etcd.test")])
        log = gw.waitForLog("added ['m2.etcd.test:")
        self.assertNotIn("Traceback", log)
        self.assertNotIn("round failed", log)
        # The IP-literal member got no SNI; the named ones got theirs.
        self.assertEqual(set(byIP.names), {None})
        self.assertEqual(set(good.names), {"m1.etcd.test"})

    def plainMember(self):
        server = TLSServer(None)  # a listening socket is all --insecure-discovery needs
        self.addCleanup(server.close)
        return server.port

    def test_oneNameRefused(self):
        """
        DNS answers REFUSED for _etcd-client-ssl (dnsmasq without a local
        zone): the plain records are used, and a member added to them joins
        at the next look-up; the REFUSED is logged once, not every round.
        """
        p1, p2 = self.plainMember(), self.plainMember()
        records = [refused(SSL), srv(PLAIN, "m1.etcd.test.", p1, 0, 0, 1), a("m1.etcd.test")]
        dns = self.dnsServer(records)
        gw = self.gateway(dns, "--insecure-discovery", "--discovery-refresh=1s")
        gw.start()
        gw.waitForLog("discovered cluster from SRV")
        dns.setRecords(records + [srv(PLAIN, "m2.etcd.test.", p2, 0, 0, 1), a("m2.etcd.test")])
        log = gw.waitForLog("added ['m2.etcd.test:")
        self.assertNotIn("keeping the last good set", log)
        self.assertEqual(
            len([line for line in gw.log().splitlines() if "answered REFUSED" in line]), 1
        )

    def test_oneNameRefusedAtStart(self):
        """
        REFUSED for _etcd-client-ssl and plain records without
        --insecure-discovery: the gateway exits non-zero naming the real
        reason (the plain records were refused), not only DNS.
        """
        records = [refused(SSL), srv(PLAIN, "m1.etcd.test.", 2379, 0, 0, 1), a("m1.etcd.test")]
        log = self.failedStart(self.gateway(self.dnsServer(records)))
        self.assertIn(f"{PLAIN} m1.etcd.test:2379 refused: {PLAIN_REFUSED}", log)
        self.assertIn("answered REFUSED", log)
        self.assertNotIn("Traceback", log)
