"""
Tests for L{etcdgw.tls}: the contexts and creators built from PEM bytes, the
etcd HTTP client's TLS against a TLS server in memory (L{twisted.test.iosim},
real OpenSSL handshakes, no sockets), and one line for each TLS failure.
"""

import shutil
import tempfile

from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, CertificateOptions, PrivateCertificate
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseNeverReceived

from etcdgw.srv import DiscoveredEndpoint
from etcdgw.endpoint import Endpoint
from etcdgw.etcdhealth import EtcdClient, EtcdProber, describeCheckFailure
from etcdgw.tls import ClientTLS, TLSSettingsError, describeTLSError
from etcdgw.tlsfiles import readCertificates, readKeyPair
from etcdgw.verify import CertificateRefused
from tests.certs import CertificateAuthority


class _Answer(Protocol):
    """
    Answers every request with HTTP 200 C{{"health":"true"}} and closes.
    """

    received = b""

    def dataReceived(self, data):
        self.received += data
        if b"\r\n\r\n" in self.received:
            body = b'{"health":"true"}'
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                % (len(body), body)
            )
            self.transport.loseConnection()


class Certificates:
    """
    A CA, a member certificate naming m1.etcd.test and 127.0.0.1, and a
    client certificate, as files and as the bytes the configuration holds.
    """

    def __init__(self):
        self.directory = tempfile.mkdtemp(prefix="etcdgw-tls-")
        self.ca = CertificateAuthority("tls test CA")
        self.caFile = self.ca.write(self.directory)
        self.caPEM = readCertificates(self.caFile, "--trusted-ca-file")
        self.member = self.ca.issue(self.directory, "m1", ["m1.etcd.test"])
        self.client = readKeyPair(
            *self.ca.issue(self.directory, "client", client=True), "--c", "--k"
        )

    def cleanup(self):
        shutil.rmtree(self.directory, ignore_errors=True)

    def serverOptions(self, requireClient=False, alpn=None):
        """
        Twisted server options presenting the member certificate; asking
        for a client certificate from the CA when C{requireClient};
        accepting the protocols C{alpn}.
        """
        with open(self.member[0], "rb") as c, open(self.member[1], "rb") as k:
            member = PrivateCertificate.loadPEM(c.read() + k.read())
        extra = {}
        if requireClient:
            extra = dict(verify=True, caCerts=[Certificate.loadPEM(self.caPEM).original])
        return CertificateOptions(
            privateKey=member.privateKey.original, certificate=member.original,
            acceptableProtocols=alpn, **extra,
        )


class ContextTests(SynchronousTestCase):
    """
    The settings, from bytes, and the validation handshake's context.
    """

    def setUp(self):
        self.certs = Certificates()
        self.addCleanup(self.certs.cleanup)

    def test_clientCertificatePresented(self):
        """A context built with a client certificate presents it."""
        from cryptography import x509

        tls = ClientTLS(self.certs.caPEM, self.certs.client.certificate, self.certs.client.key)
        local = SSL.Connection(tls.context(), None).get_certificate()
        expected = x509.load_pem_x509_certificate(self.certs.client.certificate)
        self.assertEqual(local.to_cryptography(), expected)

    def test_noClientCertificate(self):
        """Without one, the context presents none and verifies the peer."""
        context = ClientTLS(self.certs.caPEM).context()
        self.assertIsNone(SSL.Connection(context, None).get_certificate())
        self.assertTrue(context.get_verify_mode() & SSL.VERIFY_PEER)

    def test_badBytes(self):
        """Bytes that are not PEM, or half a pair, are one line of TLSSettingsError."""
        for args in [(b"garbage",), (None, self.certs.client.certificate, None),
                     (None, b"garbage", self.certs.client.key),
                     (None, self.certs.client.certificate, b"garbage")]:
            e = self.assertRaises(TLSSettingsError, ClientTLS, *args)
            self.assertNotIn("\n", str(e))

    def test_fromFiles(self):
        """Files are read through etcdgw.tlsfiles: a FIFO or device is refused, unread."""
        from etcdgw.tlsfiles import TLSFileError

        self.assertIsInstance(ClientTLS.fromFiles(self.certs.caFile), ClientTLS)
        e = self.assertRaises(TLSFileError, ClientTLS.fromFiles, "/dev/zero")
        self.assertIn("not a regular file", str(e))


class HTTPClientTLSTests(SynchronousTestCase):
    """
    The etcd HTTP client over TLS to a server in memory: verification by
    the endpoint's server name, and what a refusal reads like.
    """

    def setUp(self):
        self.certs = Certificates()
        self.addCleanup(self.certs.cleanup)

    def request(self, endpoint, tls, requireClient=False):
        """
        Send C{GET /health} to C{endpoint} through an L{EtcdClient} with
        C{tls}, answered by an in-memory TLS server presenting the member
        certificate.
        """
        reactor = MemoryReactorClock()
        client = EtcdClient(reactor, timeout=2.0, tlsPolicy=tls)
        d = client.request(endpoint, b"GET", "/health")
        host, port, factory = reactor.tcpClients[0][:3]
        address = IPv4Address("TCP", host, port)
        clientProtocol = factory.buildProtocol(address)
        server = TLSMemoryBIOFactory(
            self.certs.serverOptions(requireClient), False, Factory.forProtocol(_Answer)
        )
        serverProtocol = server.buildProtocol(address)
        pump = iosim.connect(
            serverProtocol, iosim.makeFakeServer(serverProtocol),
            clientProtocol, iosim.makeFakeClient(clientProtocol),
            greet=False,
        )
        for _ in range(20):  # the TLS transport flushes in a later turn
            pump.pump()
            reactor.advance(0)
        self.addCleanup(lambda: self.assertEqual(reactor.getDelayedCalls(), []))
        return d

    def test_verifiedForServerName(self):
        """
        A discovered endpoint is verified for its SRV target: the member's
        certificate naming it passes, the request is answered.
        """
        endpoint = DiscoveredEndpoint("127.0.0.1", 2379, tls=True, name="m1.etcd.test")
        d = self.request(endpoint, ClientTLS(self.certs.caPEM))
        self.assertEqual(self.successResultOf(d), (200, b'{"health":"true"}'))

    def test_untrustedCA(self):
        """
        A certificate that does not chain to the trust: one line saying so,
        with OpenSSL's reason, not a list of Failure objects.
        """
        d = self.request(Endpoint("127.0.0.1", 2379, tls=True), ClientTLS())
        text = describeCheckFailure(self.failureResultOf(d))
        self.assertEqual(
            text,
            "TLS handshake failed: certificate verify failed: unable to get local "
            "issuer certificate (depth 0, subject CN=m1.etcd.test)",
        )

    def test_wrongName(self):
        """
        A trusted certificate naming another host: one line naming both.
        """
        endpoint = DiscoveredEndpoint("127.0.0.1", 2379, tls=True, name="m2.etcd.test")
        d = self.request(endpoint, ClientTLS(self.certs.caPEM))
        failure = self.failureResultOf(d, ResponseNeverReceived)
        self.assertTrue(failure.value.reasons[0].check(CertificateRefused))
        text = describeCheckFailure(failure)
        self.assertTrue(
            text.startswith(
                "TLS handshake failed: certificate does not name m2.etcd.test (it names "
                "m1.etcd.test, 127.0.0.1)"
            ),
            text,
        )
        self.assertNotIn("\n", text)

    def test_clientCertificate(self):
        """
        A member that requires a client certificate gets the configured one
        (the request is answered); without one, the failure is one line.
        """
        endpoint = Endpoint("127.0.0.1", 2379, tls=True)
        pair = self.certs.client
        d = self.request(
            endpoint, ClientTLS(self.certs.caPEM, pair.certificate, pair.key), requireClient=True
        )
        self.assertEqual(self.successResultOf(d)[0], 200)
        d = self.request(endpoint, ClientTLS(self.certs.caPEM), requireClient=True)
        text = describeCheckFailure(self.failureResultOf(d))
        self.assertTrue(text.startswith("TLS handshake failed: "), text)  # e.g. "tlsv13 alert
        self.assertNotIn("Failure", text)  # certificate required"
        self.assertNotIn("\n", text)

    def test_unhealthyReason(self):
        """
        The reason an etcd health check gives for a TLS refusal (what the
        "etcd health unknown -> unhealthy" line shows) is that one line.
        """
        prober = EtcdProber(None)
        calls = []

        class Client:
            reactor = MemoryReactorClock()
            timeout = 1.0

            def request(client, endpoint, method, path, body=None):
                calls.append(path)
                return self.request(endpoint, ClientTLS())

        prober.client = Client()
        result = self.successResultOf(prober(Endpoint("127.0.0.1", 2379, tls=True)))
        self.assertFalse(result.healthy)
        self.assertTrue(
            result.detail.startswith("TLS handshake failed: certificate verify failed: "),
            result.detail,
        )


class CreatorTests(SynchronousTestCase):
    """
    L{ClientTLS.creator}: one call for a TLS client connection to a server
    name, with an ALPN list (what TLS origination will use).
    """

    def test_alpn(self):
        """The protocols offered are negotiated; the name is verified."""
        certs = Certificates()
        self.addCleanup(certs.cleanup)
        clock = MemoryReactorClock()
        client = TLSMemoryBIOFactory(
            ClientTLS(certs.caPEM).creator("m1.etcd.test", [b"h2", b"http/1.1"]),
            True, Factory.forProtocol(Protocol), clock=clock,
        ).buildProtocol(None)
        server = TLSMemoryBIOFactory(
            certs.serverOptions(alpn=[b"h2"]), False, Factory.forProtocol(Protocol),
            clock=clock,
        ).buildProtocol(None)
        pump = iosim.connect(
            server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client),
            greet=False,
        )
        for _ in range(10):
            pump.pump()
            clock.advance(0)
        self.assertEqual(client.negotiatedProtocol, b"h2")
        self.assertFalse(client.disconnecting)


class DescribeTests(SynchronousTestCase):
    """
    L{describeCheckFailure} and L{describeTLSError}: one line per failure.
    """

    def test_wrappedSSLError(self):
        """
        The HTTP client's list of Failures (the bug: the line printed
        "[<twisted.python.failure.Failure OpenSSL.SSL.Error: ...>]") is
        described, each reason once.
        """
        error = SSL.Error([("SSL routines", "", "certificate verify failed")])
        reason = Failure(ResponseNeverReceived([Failure(error), Failure(error)]))
        self.assertEqual(
            describeCheckFailure(reason), "TLS handshake failed: certificate verify failed"
        )

    def test_refusedCertificate(self):
        """A certificate refused by the verifier: its reason."""
        self.assertEqual(
            describeTLSError(CertificateRefused("certificate verify failed: x")),
            "TLS handshake failed: certificate verify failed: x",
        )

    def test_notTLS(self):
        """Anything else is not a TLS failure, and reads as before."""
        self.assertIsNone(describeTLSError(ValueError("x")))
        reason = Failure(ResponseNeverReceived([Failure(defer.TimeoutError())]))
        self.assertEqual(describeCheckFailure(reason), "no answer in time")
