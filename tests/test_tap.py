import os
import tempfile

from twisted.application.service import IServiceCollection
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from etcdgw.endpoint import Endpoint
from etcdgw.gateway import buildGateway
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
        self.assertEqual(list(o.config.source.endpoints), [Endpoint("127.0.0.1", 2379)])
        self.assertEqual((o["listen-addr"].host, o["listen-addr"].port), ("127.0.0.1", 23790))
        self.assertEqual(o["retry-delay"], 60.0)
        self.assertEqual(o["dial-timeout"], 1.0)
        self.assertFalse(o["insecure-discovery"])
        self.assertNotIn("endpoints", o.explicit)
        self.assertFalse(o.config.source.explicit)

    def test_values(self):
        """Given flags are parsed."""
        o = parse("--endpoints=a:1,https://b:2", "--listen-addr=:9", "--retry-delay=300ms", "--dial-timeout=2.5s")
        self.assertEqual(
            list(o.config.source.endpoints), [Endpoint("a", 1), Endpoint("b", 2, tls=True)]
        )
        self.assertTrue(o["listen-addr"].wildcard)
        self.assertEqual((o["retry-delay"], o["dial-timeout"]), (0.3, 2.5))
        self.assertIn("endpoints", o.explicit)
        self.assertTrue(o.config.source.explicit)

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
        pem = selfSignedPEM()
        os.write(fd, pem)
        os.close(fd)
        tls = parse(f"--trusted-ca-file={path}").config.tls
        self.assertEqual(len(tls.caCertificates), 1)
        self.assertEqual((tls.trustedCA.path, tls.trustedCA.data), (path, pem))

    def test_caFileWithoutCertificate(self):
        """A CA file with no PEM certificate is refused."""
        fd, path = tempfile.mkstemp()
        self.addCleanup(os.remove, path)
        os.write(fd, b"not a certificate\n")
        os.close(fd)
        e = self.assertRaises(usage.UsageError, parse, f"--trusted-ca-file={path}")
        self.assertIn("holds no PEM certificate", str(e))


class PureParseTests(SynchronousTestCase):
    """
    Parsing makes a value and does nothing else: no name resolved, no
    socket opened, no DNS asked (the start does those).
    """

    def setUp(self):
        import socket

        import etcdgw.discovery
        import etcdgw.srvround

        self.calls = []

        def tripwire(what):
            def called(*args, **kwargs):
                self.calls.append((what, args))
                raise AssertionError(f"{what} called while parsing")

            return called

        self.patch(socket, "getaddrinfo", tripwire("getaddrinfo"))
        self.patch(socket, "gethostbyname", tripwire("gethostbyname"))
        self.patch(socket, "socket", tripwire("socket"))
        self.patch(etcdgw.discovery, "discoverAtStart", tripwire("discoverAtStart"))
        self.patch(etcdgw.srvround, "Resolver", tripwire("Resolver"))

    def test_noIO(self):
        """
        Command lines with host names in every address, SRV discovery, and
        self-loops given as names parse without any look-up or socket.
        """
        for argv in [
            ["--listen-addr=gw.example.test:23790", "--endpoints=gw.example.test:23790"],
            ["--listen-addr=gw.example.test:0", "--metrics-addr=ops.example.test:9",
             "--endpoints=https://m1.example.test,m2.example.test:2379"],
            ["--discovery-srv=etcd.example.test", "--discovery-dns=127.0.0.1:53",
             "--endpoints=fallback.example.test:1", "--insecure-discovery"],
            ["--sync-interval=1s", "--endpoints=m.example.test", "--listen-addr=:23790"],
            ["--listen-addr=[fe80::1%lo]:1"],
            ["--listen-addr=tcp:23790:interface=gw.example.test", "--workers=2"],
        ]:
            options = parse(*argv)
            self.assertIsNotNone(options.config, argv)
        self.assertRaises(usage.UsageError, parse, "--listen-addr=:2379")  # literal loop
        self.assertEqual(self.calls, [])

    def test_namesKept(self):
        """A listen host name is kept as given, to be resolved at start."""
        config = parse("--listen-addr=gw.example.test:23790",
                       "--metrics-addr=ops.example.test:9").config
        self.assertEqual(
            (config.listen.address.host, config.listen.address.port), ("gw.example.test", 23790)
        )
        self.assertEqual(config.metrics.host, "ops.example.test")
        self.assertEqual(self.calls, [])


class ConfigTests(SynchronousTestCase):
    def test_oneFrozenValue(self):
        """
        The flags make one frozen configuration value; nothing derived is
        stored back into the options.
        """
        import attr

        o = parse("--health-check=etcd", "--metrics-addr=127.0.0.1:0")
        self.assertRaises(attr.exceptions.FrozenInstanceError, setattr, o.config,
                          "dialTimeout", 2.0)
        self.assertRaises(attr.exceptions.FrozenInstanceError, setattr, o.config.health,
                          "check", "tcp")
        self.assertFalse(
            {"discovery", "discovery-first", "trusted-ca-certificates"} & set(o), set(o)
        )
        self.assertEqual(
            (o.config.health.check, o.config.dialTimeout, o.config.health.retryDelay,
             o.config.metrics.port, o.config.source.syncInterval, o.config.shutdownGrace),
            ("etcd", 1.0, 60.0, 0, 0.0, 5.0),
        )

    def test_defaultsConvertedOnce(self):
        """
        Each duration default is converted once, by its flag's converter,
        and the options hold typed values whether the flag is given or not.
        """
        import etcdgw.tap

        converted = []
        real = etcdgw.tap.parseDuration

        def counting(text):
            converted.append(text)
            return real(text)

        self.patch(etcdgw.tap, "parseDuration", counting)
        o = parse("--dial-timeout=3s")
        # --health-interval and --health-timeout default by --health-check
        # (answer: 1s, 500ms), converted once the check is known.
        self.assertEqual(
            sorted(converted), sorted(["1m0s", "1s", "250ms", "0s", "5s", "3s", "1s", "500ms"])
        )
        self.assertEqual((o["health-rise"], o["health-interval"], o["sync-interval"]), (2, None, 0))
        self.assertEqual((o.config.health.interval, o.config.health.timeout), (1.0, 0.5))


class VersionTests(SynchronousTestCase):
    def test_versionSaysHowItForwards(self):
        """
        --version names the release and whether forwarding runs in C or in
        pure Python (the C step was not built).
        """
        import io
        import sys

        from etcdgw import __version__
        from etcdgw.fast import RELAY_IN_C

        out = io.StringIO()
        self.patch(sys, "stdout", out)
        with self.assertRaises(SystemExit):
            Options().parseOptions(["--version"])
        from etcdgw.fast import ring

        how = "forwarding step in C" if RELAY_IN_C else "forwarding in pure Python"
        uring = ring.available() or "io_uring step built"
        self.assertEqual(out.getvalue(), f"etcd-gateway {__version__} ({how}; {uring})\n")


class MakeServiceTests(SynchronousTestCase):
    def test_tree(self):
        """makeService builds the listener and health services around one pool."""
        reactor = MemoryReactorClock()
        gateway = buildGateway(
            parse("--endpoints=a:1,b:2", "--listen-addr=127.0.0.1:0").config, reactor
        )
        service = gateway.service
        self.assertTrue(IServiceCollection.providedBy(service))
        self.assertTrue({"listener", "health"} <= {s.name for s in service})
        self.assertEqual([str(e) for e in gateway.pool.endpoints], ["a:1", "b:2"])
        self.assertIs(gateway.factory.pool, gateway.pool)
        self.assertIs(gateway.health.pool, gateway.pool)
        self.assertIs(service.getServiceNamed("health"), gateway.health)

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


def durationFlags():
    """
    Every flag of L{Options} whose converter is a duration's (so a new
    duration flag is covered by itself).
    """
    from etcdgw.tap import _duration

    kind = type(_duration("x"))
    return [
        spec[0] for spec in Options.optParameters
        if len(spec) > 4 and isinstance(spec[4], kind) and "duration" in spec[4].__qualname__
    ]


class NoDiscovery:
    """
    Stands in for L{etcdgw.discovery.discoverAtStart}: records the
    configuration it is given and fails as discovery finding nothing does.
    """

    def __init__(self):
        self.configs = []

    def __call__(self, config, fallback=None):
        from etcdgw.discovery import DiscoveryError

        self.configs.append(config)
        raise DiscoveryError(f"--discovery-srv={config.domain}: test: no discovery here")


class DurationFlagTests(SynchronousTestCase):
    def test_everyDurationFlagBounded(self):
        """
        Every duration flag refuses a value longer than Go's longest duration
        (a 400-digit one was infinite: an OverflowError at start, or, as
        --shutdown-grace, a drain silently skipped), in one line naming the
        flag, the value (shortened) and the bound.
        """
        flags = durationFlags()
        self.assertEqual(
            set(flags),
            {"retry-delay", "dial-timeout", "health-interval", "health-timeout",
             "health-fastinter", "sync-interval", "shutdown-grace", "discovery-refresh"},
        )
        for name in flags:
            for value in ["9" * 400 + "h", "2562048h", "1" + "0" * 4000 + "ns"]:
                e = self.assertRaises(usage.UsageError, parse, f"--{name}={value}")
                message = str(e)
                self.assertTrue(message.startswith(f"--{name}: duration "), message)
                self.assertIn("out of range: at most 2562047h47m16.854775807s", message)
                self.assertLess(len(message), 300)

    def test_longestDurationsStart(self):
        """
        Go's longest duration in every duration flag builds and starts the
        gateway on a memory reactor, every timer finite.
        """
        import math

        longest = "2562047h47m16s"
        options = parse(
            "--listen-addr=127.0.0.1:0", "--health-check=etcd", "--endpoints=127.0.0.1:2",
            *[f"--{name}={longest}" for name in durationFlags() if name != "discovery-refresh"],
        )
        reactor = MemoryReactorClock()
        service = makeService(options, reactor=reactor)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertTrue(reactor.getDelayedCalls())
        for call in reactor.getDelayedCalls():
            self.assertTrue(math.isfinite(call.getTime()), call)
        self.assertEqual(service.getServiceNamed("shutdown").grace, 2562047 * 3600 + 47 * 60 + 16)


class TLSFileFlagTests(SynchronousTestCase):
    """
    The PEM files the flags name: read by etcdgw.tlsfiles (regular files,
    bounded), a certificate checked with its key.
    """

    def setUp(self):
        import etcdgw.discovery
        import etcdgw.srvround
        from tests.certs import CertificateAuthority

        self.discovery = NoDiscovery()
        self.patch(etcdgw.discovery, "discoverAtStart", self.discovery)
        self.directory = tempfile.mkdtemp()
        self.addCleanup(self._cleanUp)
        self.ca = CertificateAuthority()
        self.caFile = self.ca.write(self.directory)
        self.cert, self.key = self.ca.issue(self.directory, "client", client=True)
        self.otherCert, self.otherKey = self.ca.issue(self.directory, "other", client=True)
        with open(self.cert, "rb") as c, open(self.key, "rb") as k:
            self.both = os.path.join(self.directory, "both.pem")
            with open(self.both, "wb") as f:
                f.write(c.read() + k.read())
        self.fifo = os.path.join(self.directory, "fifo")
        os.mkfifo(self.fifo)
        self.garbage = os.path.join(self.directory, "garbage.pem")
        with open(self.garbage, "wb") as f:
            f.write(b"-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n"
                    b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")

    def _cleanUp(self):
        for name in os.listdir(self.directory):
            os.remove(os.path.join(self.directory, name))
        os.rmdir(self.directory)

    def flagLines(self, path):
        """
        Command lines that give C{path} to each PEM flag: C{(flag, argv)}.
        """
        srv = "--discovery-srv=etcd.test"
        return [
            ("trusted-ca-file", [f"--trusted-ca-file={path}"]),
            ("health-cert-file", [f"--health-cert-file={path}"]),
            ("health-key-file", [f"--health-cert-file={self.cert}", f"--health-key-file={path}"]),
            ("discovery-cert-file", [srv, f"--discovery-cert-file={path}"]),
            ("discovery-key-file",
             [srv, f"--discovery-cert-file={self.cert}", f"--discovery-key-file={path}"]),
        ]

    def assertRefused(self, argv, *parts):
        e = self.assertRaises(usage.UsageError, parse, *argv)
        message = str(e)
        self.assertNotIn("\n", message)
        for part in parts:
            self.assertIn(part, message, argv)
        self.assertEqual(self.discovery.configs, [], "discovery ran before the files were checked")
        return message

    def test_specialFilesRefused(self):
        """
        /dev/zero (read without limit, it hung the start), a FIFO and a
        directory, named by any PEM flag, are refused unread, naming the flag
        and the file.
        """
        for path, kind in [("/dev/zero", "a character device"), (self.fifo, "a FIFO"),
                           (self.directory, "a directory")]:
            for flag, argv in self.flagLines(path):
                self.assertRefused(
                    argv, f'--{flag}: cannot read "{path}": not a regular file ({kind})'
                )

    def test_badContentRefused(self):
        """
        A garbage certificate or key, a file without the key, and a key that
        is not the certificate's are refused at start, in one line naming the
        flag and the file (they were an OpenSSL traceback, or nothing until
        the first health check).
        """
        srv = "--discovery-srv=etcd.test"
        for prefix in ["health", "discovery"]:
            base = [srv] if prefix == "discovery" else []
            cert, key = f"--{prefix}-cert-file", f"--{prefix}-key-file"
            self.assertRefused(base + [f"{cert}={self.garbage}"], f'{cert}: "{self.garbage}"',
                               "holds no PEM certificate")
            self.assertRefused(base + [f"{cert}={self.cert}", f"{key}={self.garbage}"],
                               f'{key}: "{self.garbage}"', "cannot be read")
            self.assertRefused(base + [f"{cert}={self.cert}"], f'{cert}: "{self.cert}"',
                               f"holds no PEM private key (give it with {key})")
            self.assertRefused(base + [f"{cert}={self.cert}", f"{key}={self.otherKey}"],
                               f'{key}: "{self.otherKey}"', "not the one of the certificate")

    def test_healthKeyFromCertificateFile(self):
        """
        --health-cert-file without --health-key-file reads the key from the
        certificate file, as documented (it crashed with open(None)).
        """
        calls = self.recordClientTLS()
        options = parse("--health-check=etcd", f"--health-cert-file={self.both}",
                        f"--trusted-ca-file={self.caFile}", "--listen-addr=127.0.0.1:0")
        makeService(options, reactor=MemoryReactorClock())
        both = self.read(self.both)
        self.assertEqual([args[1:] for args in calls], [(both, both)])

    def test_discoveryKeyFromCertificateFile(self):
        """
        --discovery-cert-file without --discovery-key-file: discovery's
        handshakes and the etcd client both get the certificate file as the
        key's.
        """
        from etcdgw.gateway import _etcdClient

        calls = self.recordClientTLS()
        options = parse("--discovery-srv=etcd.test", f"--discovery-cert-file={self.both}")
        options.config.source.discovery.trust.context()  # OpenSSL loads the pair
        _etcdClient(options.config, MemoryReactorClock())
        both = self.read(self.both)
        self.assertEqual([args[1:] for args in calls], [(both, both), (both, both)])

    def recordClientTLS(self):
        """
        Record the PEM bytes every L{etcdgw.tls.ClientTLS} is built with:
        C{[(ca, certificate, key)]}.
        """
        import etcdgw.tls

        calls = []
        real = etcdgw.tls.ClientTLS

        def recording(*args):
            calls.append(args)
            return real(*args)

        self.patch(etcdgw.tls, "ClientTLS", recording)
        return calls

    @staticmethod
    def read(path):
        with open(path, "rb") as f:
            return f.read()

    def test_goodPairs(self):
        """Separate files, and one file holding both, are accepted."""
        parse(f"--health-cert-file={self.cert}", f"--health-key-file={self.key}")
        parse(f"--health-cert-file={self.both}")


class OtherValueTests(SynchronousTestCase):
    """
    Values of the other flags that gave a traceback, or a message of
    thousands of characters.
    """

    def setUp(self):
        import etcdgw.discovery
        import etcdgw.srvround

        self.discovery = NoDiscovery()
        self.patch(etcdgw.discovery, "discoverAtStart", self.discovery)

    def assertRefused(self, argv, *parts):
        e = self.assertRaises(usage.UsageError, parse, *argv)
        message = str(e)
        for part in parts:
            self.assertIn(part, message, argv)
        self.assertLess(len(message), 400, message)
        return message

    def test_hugeNumbers(self):
        """
        5000-digit numbers (past Python's int() limit) in every number and
        port are one short line naming the flag.
        """
        big = "9" * 5000
        srv = "--discovery-srv=etcd.test"
        for argv, flag in [
            ([f"--worker-of={big}"], "--worker-of"),
            ([f"--workers={big}"], "--workers"),
            ([f"--health-rise={big}"], "--health-rise"),
            ([f"--health-fall={big}"], "--health-fall"),
            ([f"--listen-addr=127.0.0.1:{big}"], "--listen-addr"),
            ([f"--listen-addr=tcp:{big}"], "--listen-addr"),
            ([f"--metrics-addr=127.0.0.1:{big}"], "--metrics-addr"),
            ([f"--metrics-addr=[::1]:{big}"], "--metrics-addr"),
            ([srv, f"--discovery-dns=127.0.0.1:{big}"], "--discovery-dns"),
            ([f"--endpoints=127.0.0.1:{big}"], "--endpoints"),
        ]:
            self.assertRefused(argv, flag)

    def test_numbersAreDecimal(self):
        """Numbers are ASCII digits in range: not "1_0", " 2", Arabic digits, 0."""
        for value in ["1_0", " 2", "\u0663", "0", "-1", "1001", "2.0"]:
            self.assertRefused([f"--health-rise={value}"], "--health-rise:",
                               "is not a number from 1 to 1000")
        for value in ["0", "-1", "\u0663", "99999999999", "2147483648"]:
            self.assertRefused([f"--worker-of={value}"], "--worker-of:", "is not a process id")
        for value in ["0", "257", "1_0", " 2", "\u0663", "2.0", ""]:
            self.assertRefused([f"--workers={value}"], "--workers:",
                               "is not a number from 1 to 256")
        self.assertEqual(parse("--health-rise=1000")["health-rise"], 1000)
        self.assertEqual(parse("--workers=256", "--listen-addr=127.0.0.1:1")["workers"], 256)
        self.assertEqual(parse("--workers=1", "--listen-addr=127.0.0.1:0")["workers"], 1)
        self.assertEqual(parse("--worker-of=2147483647")["worker-of"], 2147483647)

    def test_tcpPortRange(self):
        """
        A tcp: endpoint string with a port outside 0-65535 is refused when
        parsed (it was an OverflowError from bind() at start).
        """
        for flag in ["listen-addr", "metrics-addr"]:
            for value in ["tcp:70000", "tcp:-1", "tcp:port=65536:interface=127.0.0.1"]:
                message = self.assertRefused([f"--{flag}={value}"], f"--{flag}:",
                                             f'"{value}"', "port")
                self.assertTrue(
                    "is not in 0-65535" in message or "is not a number" in message, message
                )

    def test_longHostName(self):
        """
        A listen host name that cannot be a DNS name (a 300-byte label) is a
        usage error naming the flag (it was idna's UnicodeError).
        """
        for flag in ["listen-addr", "metrics-addr"]:
            self.assertRefused([f"--{flag}={'a' * 300}:1"], f"--{flag}:")

    def test_discoveryDomain(self):
        """
        A --discovery-srv or --discovery-srv-name that makes no DNS name is
        refused before any look-up.
        """
        for argv, flag in [
            (["--discovery-srv="], "--discovery-srv"),
            (["--discovery-srv=."], "--discovery-srv"),
            (["--discovery-srv=a b"], "--discovery-srv"),
            (["--discovery-srv=a\x00b"], "--discovery-srv"),
            (["--discovery-srv=a\nb"], "--discovery-srv"),
            ([f"--discovery-srv={'a' * 64}.test"], "--discovery-srv"),
            ([f"--discovery-srv={'a.' * 200}test"], "--discovery-srv"),
            (["--discovery-srv=etcd.test", "--discovery-srv-name=a b"], "--discovery-srv-name"),
            (["--discovery-srv=etcd.test", f"--discovery-srv-name={'x' * 60}"],
             "--discovery-srv"),
        ]:
            self.assertRefused(argv, flag)
        self.assertEqual(self.discovery.configs, [])

    def test_strayArgument(self):
        """An argument that is no flag is named (it was "Wrong number of arguments")."""
        self.assertRefused(["extra"], 'unexpected argument "extra"')
        self.assertRefused(["--", "--retry-delay=1s"], 'unexpected argument "--retry-delay=1s"')

    def test_discoveryKeyNeedsSRV(self):
        """--discovery-key-file without --discovery-srv is refused, as its certificate is."""
        self.assertRefused(["--discovery-key-file=/etc/hostname"],
                           "--discovery-key-file needs --discovery-srv")

    def test_hostWithNewline(self):
        """
        A host name ending in a newline is refused (the host name check's "$"
        matched before it).
        """
        self.assertRefused(["--endpoints=etcd\n:2379"], "--endpoints:", "is not a valid host name")

    def test_selfLoopNamesFlags(self):
        """The self-loop refusal names the two flags."""
        self.assertRefused(["--listen-addr=127.0.0.1:2379"], "--endpoints and --listen-addr:")


class OneLineTests(SynchronousTestCase):
    def test_errorIsOneLine(self):
        """
        Run by twistd, an error is one printable line: newlines and escape
        sequences in a value are escaped, not written to the terminal, and a
        long message keeps its start and its end.
        """
        import io
        import sys

        for value, shown in [
            ("a\nb:1", "a\\nb"),
            ("a\x1b[31mb:1", "a\\x1b[31mb"),
            ("a\udcffb:1", "a\\udcffb"),
            ("a\n" * 10000 + ":1", " ... "),
        ]:
            err = io.StringIO()
            self.patch(sys, "stderr", err)
            options = Options()
            options.parent = object()  # as a twistd subcommand
            e = self.assertRaises(SystemExit, options.parseOptions, [f"--endpoints={value}"])
            self.assertEqual(e.code, 1)
            written = err.getvalue()
            self.assertEqual(written.count("\n"), 1, written[:200])
            self.assertTrue(written[:-1].isprintable(), written[:200])
            self.assertIn(shown, written)
            self.assertTrue(written.startswith("etcd-gateway: error: --endpoints: "))
            self.assertTrue(written.endswith("(see: twistd etcd-gateway --help)\n"))
            self.assertLess(len(written), 2200)

    def test_parserBugIsOneLine(self):
        """
        Run by twistd, even an exception the parser did not expect (a bug)
        is one line and exit status 1, saying it is a bug, not a traceback.
        """
        import io
        import sys

        import etcdgw.tap

        def broken(text):
            raise TypeError("a bug\nover two lines")

        self.patch(etcdgw.tap, "parseEndpoints", broken)
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        options = Options()
        options.parent = object()
        e = self.assertRaises(SystemExit, options.parseOptions, ["--endpoints=a:1"])
        self.assertEqual(e.code, 1)
        self.assertEqual(err.getvalue().count("\n"), 1, err.getvalue())
        self.assertIn("(a bug: please report it", err.getvalue())
        self.assertIn("TypeError", err.getvalue())
        self.assertRaises(TypeError, Options().parseOptions, ["--endpoints=a:1"])


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

        gateway = buildGateway(parse("--listen-addr=127.0.0.1:0").config, MemoryReactorClock())
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.assertEqual(gateway.listener.endpoint.maxConnections, descriptorBudget(limit)[0])
        gateway = buildGateway(
            parse("--listen-addr=127.0.0.1:0", "--max-connections=7").config,
            MemoryReactorClock(),
        )
        self.assertEqual(gateway.listener.endpoint.maxConnections, 7)
        self.assertIn("[default: from ulimit -n", " ".join(str(Options()).split()))

    def test_metricsCapped(self):
        """The metrics address gets its small cap; the factory knows both listeners."""
        gateway = buildGateway(
            parse("--listen-addr=127.0.0.1:0", "--metrics-addr=127.0.0.1:0").config,
            MemoryReactorClock(),
        )
        web = gateway.service.getServiceNamed("metrics")
        self.assertIs(web, gateway.web)
        self.assertLessEqual(web.endpoint.maxConnections, 64)
        self.assertEqual(gateway.guard.listeners, [gateway.listener, web])
        self.assertEqual(web.flag, "--metrics-addr")

    def test_listenMode(self):
        """--listen-mode sets a unix listener's mode; it needs a unix listener."""
        o = parse("--listen-addr=unix:/tmp/gw.sock", "--listen-mode=0600")
        self.assertEqual(o["listen-mode"], 0o600)
        self.assertEqual(o.config.listen.mode, 0o600)
        gateway = buildGateway(o.config, MemoryReactorClock())
        self.assertEqual(gateway.listener.endpoint.mode, 0o600)
        gateway = buildGateway(
            parse("--listen-addr=unix:/tmp/gw.sock").config, MemoryReactorClock()
        )
        self.assertEqual(gateway.listener.endpoint.mode, 0o660)
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
