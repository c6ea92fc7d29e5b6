"""
Tests for L{etcdgw.verify}: real TLS handshakes against a small TLS server
on 127.0.0.1 (a thread with the standard library's ssl), with certificates
from L{tests.certs}.
"""

import shutil
import socket
import ssl
import tempfile
import threading

from twisted.trial.unittest import SynchronousTestCase

from etcdgw.verify import TLSTrust, ValidationError, validateTLS
from tests.certs import CertificateAuthority


class _TLSServer:
    """
    Accepts connections on 127.0.0.1 and makes a TLS handshake on each (or
    none, when C{context} is None: a silent TCP server).
    """

    def __init__(self, context):
        self.context = context
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            if self.context is None:
                threading.Timer(2, conn.close).start()
                continue
            try:
                conn.settimeout(2)
                with self.context.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except (OSError, ssl.SSLError):
                pass
            finally:
                conn.close()

    def close(self):
        self.sock.close()


class ValidateTests(SynchronousTestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="etcdgw-verify-")
        self.addCleanup(shutil.rmtree, self.dir, ignore_errors=True)
        self.ca = CertificateAuthority("good CA")
        self.caFile = self.ca.write(self.dir)
        self.rogue = CertificateAuthority("rogue CA")
        self.good = self.ca.issue(self.dir, "m1", ["m1.etcd.test"])
        self.rogueCert = self.rogue.issue(self.dir, "rogue", ["m1.etcd.test"])

    def serve(self, certAndKey):
        if certAndKey is None:
            context = None
        else:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*certAndKey)
        server = _TLSServer(context)
        self.addCleanup(server.close)
        return server

    def test_proven(self):
        """
        A certificate from the trusted CA naming the target passes.
        """
        server = self.serve(self.good)
        self.assertIsNone(
            validateTLS("127.0.0.1", server.port, "m1.etcd.test", TLSTrust(self.caFile), 5)
        )

    def test_rogueCA(self):
        """
        A certificate from another CA is refused, saying why.
        """
        server = self.serve(self.rogueCert)
        e = self.assertRaises(
            ValidationError, validateTLS, "127.0.0.1", server.port, "m1.etcd.test",
            TLSTrust(self.caFile), 5,
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
            TLSTrust(self.caFile), 5,
        )
        self.assertIn("certificate does not name m2.etcd.test", str(e))
        self.assertIn("m1.etcd.test", str(e))

    def test_systemTrust(self):
        """
        Without --trusted-ca-file the system store is used: a test CA is not in it.
        """
        server = self.serve(self.good)
        e = self.assertRaises(
            ValidationError, validateTLS, "127.0.0.1", server.port, "m1.etcd.test", TLSTrust(), 5
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
            TLSTrust(self.caFile), 5,
        )
        self.assertIn(f"connect to 127.0.0.1:{port}", str(e))

    def test_timeout(self):
        """
        A server that never speaks TLS: the handshake times out within the bound.
        """
        server = self.serve(None)
        e = self.assertRaises(
            ValidationError, validateTLS, "127.0.0.1", server.port, "m1.etcd.test",
            TLSTrust(self.caFile), 0.3,
        )
        self.assertIn("timed out", str(e))

    def test_badCAFile(self):
        """
        A CA file that cannot be loaded is an error naming the problem.
        """
        e = self.assertRaises(ValidationError, TLSTrust(self.good[1] + ".missing").context)
        self.assertIn("cannot load TLS files", str(e))
