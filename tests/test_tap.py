import os
import tempfile

from twisted.application.service import IServiceCollection
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from etcdgw.endpoint import Endpoint
from etcdgw.tap import Options, makeService

def selfSignedPEM():
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "etcd-gateway test CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def parse(*args):
    options = Options()
    options.parseOptions(list(args))
    return options


class OptionsTests(SynchronousTestCase):
    def test_defaults(self):
        """With no flags, etcd's defaults apply."""
        o = parse()
        self.assertEqual(o["endpoints"], [Endpoint("127.0.0.1", 2379)])
        self.assertEqual((o["listen-addr"].host, o["listen-addr"].port), ("127.0.0.1", 23790))
        self.assertEqual(o["retry-delay"], 60.0)
        self.assertEqual(o["dial-timeout"], 1.0)
        self.assertFalse(o["insecure-discovery"])
        self.assertNotIn("endpoints", o.explicit)

    def test_values(self):
        """Given flags are parsed."""
        o = parse("--endpoints=a:1,https://b:2", "--listen-addr=:9", "--retry-delay=300ms", "--dial-timeout=2.5s")
        self.assertEqual(o["endpoints"], [Endpoint("a", 1), Endpoint("b", 2, tls=True)])
        self.assertTrue(o["listen-addr"].wildcard)
        self.assertEqual((o["retry-delay"], o["dial-timeout"]), (0.3, 2.5))
        self.assertIn("endpoints", o.explicit)

    def test_zeroRetryDelay(self):
        """A retry delay of 0 means five minutes, as in etcd."""
        self.assertEqual(parse("--retry-delay=0")["retry-delay"], 300.0)

    def test_badInput(self):
        """Each bad flag value is a usage error naming the flag and the value."""
        cases = [
            (["--retry-delay=123"], "expects a time unit"),
            (["--retry-delay=-1s"], '--retry-delay: "-1s" must be zero or positive'),
            (["--dial-timeout=0"], '--dial-timeout: "0" must be positive'),
            (["--dial-timeout=abc"], '--dial-timeout: invalid duration "abc"'),
            (["--endpoints=h:abc"], '--endpoints: endpoint "h:abc": port "abc" is not a number'),
            (["--endpoints="], "--endpoints: empty endpoint"),
            (["--listen-addr=nope"], "--listen-addr:"),
            (["--trusted-ca-file=/nonexistent/ca.pem"], '--trusted-ca-file: cannot read "/nonexistent/ca.pem"'),
            (["--discovery-srv-name=x"], "--discovery-srv-name needs --discovery-srv"),
            (["--endpoints=127.0.0.1:23790"], "own listen address"),
            (["--bogus"], "bogus"),
        ]
        for args, message in cases:
            e = self.assertRaises(usage.UsageError, parse, *args)
            self.assertIn(message, str(e), args)

    def test_caFile(self):
        """A CA file holding a PEM certificate is accepted and loaded."""
        fd, path = tempfile.mkstemp()
        self.addCleanup(os.remove, path)
        os.write(fd, selfSignedPEM())
        os.close(fd)
        self.assertEqual(len(parse(f"--trusted-ca-file={path}")["trusted-ca-certificates"]), 1)

    def test_caFileWithoutCertificate(self):
        """A CA file with no PEM certificate is refused."""
        fd, path = tempfile.mkstemp()
        self.addCleanup(os.remove, path)
        os.write(fd, b"not a certificate\n")
        os.close(fd)
        e = self.assertRaises(usage.UsageError, parse, f"--trusted-ca-file={path}")
        self.assertIn("holds no PEM certificate", str(e))


class VersionTests(SynchronousTestCase):
    def test_versionSaysHowItForwards(self):
        """
        --version names the release and whether forwarding runs in C or in
        pure Python (the C step was not built).
        """
        import io
        import sys

        from etcdgw import __version__
        from etcdgw.transport import RELAY_IN_C

        out = io.StringIO()
        self.patch(sys, "stdout", out)
        with self.assertRaises(SystemExit):
            Options().parseOptions(["--version"])
        how = "forwarding step in C" if RELAY_IN_C else "forwarding in pure Python"
        self.assertEqual(out.getvalue(), f"etcd-gateway {__version__} ({how})\n")


class MakeServiceTests(SynchronousTestCase):
    def test_tree(self):
        """makeService builds the listener and health services around one pool."""
        reactor = MemoryReactorClock()
        service = makeService(parse("--endpoints=a:1,b:2", "--listen-addr=127.0.0.1:0"), reactor=reactor)
        self.assertTrue(IServiceCollection.providedBy(service))
        self.assertTrue({"listener", "health"} <= {s.name for s in service})
        self.assertEqual([str(e) for e in service.pool.endpoints], ["a:1", "b:2"])
        self.assertIs(service.factory.pool, service.pool)
        self.assertIs(service.getServiceNamed("health").pool, service.pool)

    def test_defaultPortSaidOnce(self):
        """
        Members given without a port are named, once, in one start-up line
        saying they use etcd's client port 2379; --help says it too.
        """
        from twisted.logger import globalLogPublisher

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        makeService(
            parse("--endpoints=infra0.example.com,10.0.1.11:2379,https://infra2.example.com",
                  "--listen-addr=127.0.0.1:0"),
            reactor=MemoryReactorClock(),
        )
        said = [e for e in events if "2379" in e.get("log_format", "")]
        self.assertEqual(len(said), 1)
        self.assertEqual(
            said[0]["endpoints"], ["infra0.example.com:2379", "infra2.example.com:2379"]
        )
        self.assertIn("2379", str(Options()))


class ListenerFlagsTests(SynchronousTestCase):
    def test_maxConnections(self):
        """--max-connections takes a positive number; bad values name the flag."""
        self.assertEqual(parse("--max-connections=500")["max-connections"], 500)
        self.assertIsNone(parse()["max-connections"])
        for value, message in [("0", "at least 1"), ("-1", "not a number"), ("x", "not a number"),
                               ("9" * 5000, "not a number")]:
            e = self.assertRaises(usage.UsageError, parse, f"--max-connections={value}")
            self.assertIn("--max-connections", str(e))
            self.assertIn(message, str(e))

    def test_maxConnectionsDefaultFromLimit(self):
        """Without the flag, the client cap comes from the open-files limit; --help says how."""
        import resource

        from etcdgw.listen import descriptorBudget

        service = makeService(parse("--listen-addr=127.0.0.1:0"), reactor=MemoryReactorClock())
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.assertEqual(service.listener.endpoint.maxConnections, descriptorBudget(limit)[0])
        service = makeService(
            parse("--listen-addr=127.0.0.1:0", "--max-connections=7"), reactor=MemoryReactorClock()
        )
        self.assertEqual(service.listener.endpoint.maxConnections, 7)
        self.assertIn("[default: from ulimit -n", " ".join(str(Options()).split()))

    def test_metricsCapped(self):
        """The metrics address gets its small cap; the factory knows both listeners."""
        service = makeService(
            parse("--listen-addr=127.0.0.1:0", "--metrics-addr=127.0.0.1:0"),
            reactor=MemoryReactorClock(),
        )
        web = service.getServiceNamed("metrics")
        self.assertLessEqual(web.endpoint.maxConnections, 64)
        self.assertEqual(service.factory.listeners, [service.listener, web])
        self.assertEqual(web.flag, "--metrics-addr")

    def test_listenMode(self):
        """--listen-mode sets a unix listener's mode; it needs a unix listener."""
        o = parse("--listen-addr=unix:/tmp/gw.sock", "--listen-mode=0600")
        self.assertEqual(o["listen-mode"], 0o600)
        service = makeService(o, reactor=MemoryReactorClock())
        self.assertEqual(service.listener.endpoint.mode, 0o600)
        service = makeService(parse("--listen-addr=unix:/tmp/gw.sock"), reactor=MemoryReactorClock())
        self.assertEqual(service.listener.endpoint.mode, 0o660)
        for args, message in [
            (["--listen-mode=0600"], "needs a unix: --listen-addr"),
            (["--listen-addr=unix:/x", "--listen-mode=rw"], "--listen-mode: \"rw\" is not an octal"),
            (["--listen-addr=unix:/x:mode=600", "--listen-mode=600"], "give it once"),
        ]:
            e = self.assertRaises(usage.UsageError, parse, *args)
            self.assertIn(message, str(e), args)

    def test_tcp6IsTCP(self):
        """A tcp6: listener is TCP: --workers works and the self-loop check applies."""
        o = parse("--listen-addr=tcp6:23799:interface=\\:\\:1", "--workers=2")
        self.assertEqual((o["listen-addr"].host, o["listen-addr"].port), ("::1", 23799))
        e = self.assertRaises(
            usage.UsageError, parse, "--listen-addr=tcp6:23799", "--endpoints=[::1]:23799"
        )
        self.assertIn("own listen address", str(e))
