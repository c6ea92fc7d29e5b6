"""
Tests for L{etcdgw.verify}: real TLS handshakes against a small TLS server
on 127.0.0.1 (L{tests.certs.TLSServer}, a thread with the standard
library's ssl), with certificates from L{tests.certs}.
"""

import os
import shutil
import socket
import tempfile

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from etcdgw.tls import ClientTLS
from etcdgw.tlsfiles import readCertificates
from etcdgw.verify import ValidationError, validateTLS
from tests.certs import CertificateAuthority, TLSServer


class ValidateTests(SynchronousTestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="etcdgw-verify-")
        self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)
        self.ca = CertificateAuthority("good CA")
        self.caFile = self.ca.write(self.dir)
        self.trust = ClientTLS(readCertificates(self.caFile, "--trusted-ca-file"))
        self.rogue = CertificateAuthority("rogue CA")
        self.good = self.ca.issue(self.dir, "m1", ["m1.etcd.test"])
        self.rogueCert = self.rogue.issue(self.dir, "rogue", ["m1.etcd.test"])

    def serve(self, certAndKey):
        server = TLSServer(None) if certAndKey is None else TLSServer.withCertificate(certAndKey)
        self.addCleanup(server.close)
        return server

    def test_proven(self):
        """
        A certificate from the trusted CA naming the target passes.
        """
        server = self.serve(self.good)
        self.assertIsNone(
            validateTLS("127.0.0.1", server.port, "m1.etcd.test", self.trust, 5)
        )

    def test_rogueCA(self):
        """
        A certificate from another CA is refused, saying why.
        """
        server = self.serve(self.rogueCert)
        e = self.assertRaises(
            ValidationError, validateTLS, "127.0.0.1", server.port, "m1.etcd.test",
            self.trust, 5,
        )
        self.assertIn("certificate verify failed", str(e))
        self.assertIn("CN=m1.etcd.test", str(e))

    def test_wrongName(self):
        """
        A trusted certificate that names another host is refused, naming both.
        """
        server = self.serve(self.good)
        e = self.assertRaises(
            ValidationError, validateTLS, "127.0.0.1", server.port, "m2.etcd.test",
            self.trust, 5,
        )
        self.assertIn("certificate does not name m2.etcd.test", str(e))
        self.assertIn("m1.etcd.test", str(e))

    def test_systemTrust(self):
        """
        Without --trusted-ca-file the system store is used: a test CA is not in it.
        """
        server = self.serve(self.good)
        e = self.assertRaises(
            ValidationError, validateTLS, "127.0.0.1", server.port, "m1.etcd.test", ClientTLS(), 5
        )
        self.assertIn("certificate verify failed", str(e))

    def test_refused(self):
        """
        Nothing listening: refused, naming the address.
        """
        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))
            port = unused.getsockname()[1]
        e = self.assertRaises(
            ValidationError, validateTLS, "127.0.0.1", port, "m1.etcd.test",
            self.trust, 5,
        )
        self.assertIn(f"connect to 127.0.0.1:{port}", str(e))

    def test_timeout(self):
        """
        A server that never speaks TLS: the handshake times out within the bound.
        """
        server = self.serve(None)
        e = self.assertRaises(
            ValidationError, validateTLS, "127.0.0.1", server.port, "m1.etcd.test",
            self.trust, 0.3,
        )
        self.assertIn("timed out", str(e))

    def test_noSubjectAltName(self):
        """
        A trusted certificate without subject alternative names is refused
        with a one-line reason, not an exception of service_identity's.
        """
        server = self.serve(self.ca.issue(self.dir, "nosan", [], ips=()))
        e = self.assertRaises(
            ValidationError, validateTLS, "127.0.0.1", server.port, "m1.etcd.test",
            self.trust, 5,
        )
        self.assertIn("m1.etcd.test", str(e))
        self.assertIn("subjectAltName", str(e))
        self.assertNotIn("\n", str(e))

    def test_starSubjectAltName(self):
        """
        A trusted certificate whose only DNS name is C{*} is refused with a
        one-line reason.
        """
        server = self.serve(self.ca.issue(self.dir, "star", ["*"], ips=()))
        e = self.assertRaises(
            ValidationError, validateTLS, "127.0.0.1", server.port, "m1.etcd.test",
            self.trust, 5,
        )
        self.assertIn("m1.etcd.test", str(e))
        self.assertNotIn("\n", str(e))

    def test_ipLiteralName(self):
        """
        An IP literal as the name is checked against the certificate's IP
        addresses: proven when it names that IP, refused when not.
        """
        server = self.serve(self.good)  # names m1.etcd.test and IP 127.0.0.1
        self.assertIsNone(
            validateTLS("127.0.0.1", server.port, "127.0.0.1", self.trust, 5)
        )
        e = self.assertRaises(
            ValidationError, validateTLS, "127.0.0.1", server.port, "127.0.0.2",
            self.trust, 5,
        )
        self.assertIn("certificate does not name 127.0.0.2", str(e))
        self.assertIn("127.0.0.1", str(e))

    def test_invalidName(self):
        """
        A name no certificate can name is refused before any connection.
        """
        server = self.serve(self.good)
        e = self.assertRaises(
            ValidationError, validateTLS, "127.0.0.1", server.port, "bad name!.etcd.test",
            self.trust, 5,
        )
        self.assertIn("bad name!.etcd.test", str(e))
        self.assertEqual(server.accepted, 0)

    def test_highDescriptor(self):
        """
        A handshake on a descriptor >= 1024 (a gateway with ~500 clients)
        works: the wait does not use select().
        """
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = 1200
        if hard != resource.RLIM_INFINITY and hard < wanted:
            raise SkipTest(f"hard RLIMIT_NOFILE {hard} is below {wanted}")
        if soft != resource.RLIM_INFINITY and soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        server = self.serve(self.good)
        dummies = []
        self.addCleanup(lambda: [os.close(fd) for fd in dummies])
        while True:  # fill every free descriptor below 1024
            fd = os.open(os.devnull, os.O_RDONLY)
            if fd >= 1024:
                os.close(fd)
                break
            dummies.append(fd)
        probe = socket.socket()
        self.assertGreaterEqual(probe.fileno(), 1024)
        probe.close()
        self.assertIsNone(
            validateTLS("127.0.0.1", server.port, "m1.etcd.test", self.trust, 5)
        )


class _Broken:
    """A certificate whose every use raises."""

    def to_cryptography(self):
        raise RuntimeError("bug")


class PeerVerifierTests(SynchronousTestCase):
    """
    The one check of a peer certificate, as an OpenSSL callback: nothing
    escapes it (an exception there would be lost), and it refuses once.
    """

    def test_errorRefuses(self):
        """Any error while checking refuses, once, saying what it was."""
        from etcdgw.verify import peerVerifier

        refused = []
        verify = peerVerifier("m1.etcd.test", "127.0.0.1:2379", refused.append)
        self.assertFalse(verify(None, _Broken(), 0, 0, True))
        self.assertFalse(verify(None, _Broken(), 0, 0, True))
        self.assertEqual(
            refused,
            ["certificate of 127.0.0.1:2379 cannot be checked against m1.etcd.test: "
             "RuntimeError: bug"],
        )
        self.assertFalse(verify.leafChecked)

    def test_refuseRaises(self):
        """A refusal whose report raises is logged; the certificate is refused."""
        from etcdgw.verify import peerVerifier

        def refuse(reason):
            raise ValueError("report failed")

        verify = peerVerifier("m1.etcd.test", "127.0.0.1:2379", refuse)
        self.assertFalse(verify(None, _Broken(), 0, 0, True))
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
