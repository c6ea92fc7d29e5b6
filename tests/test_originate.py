"""
TLS origination (L{etcdgw.originate}): the ALPN choice, the flags, the
settings and their reload, and the proxy over real loopback sockets to a
TLS member that requires a client certificate, on the fast path (the
stdlib ssl member transport) and on Twisted's own transports (startTLS).
"""

import os
import shutil

import tempfile

from twisted.internet import defer, protocol, reactor
from twisted.internet.ssl import Certificate, CertificateOptions, PrivateCertificate
from twisted.logger import globalLogPublisher
from twisted.python import usage
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from etcdgw.config import ClientCertificate, PEMFile
from etcdgw.endpoint import Endpoint
from etcdgw.fast import gate
from etcdgw.listen import GatewayTCPEndpoint
from etcdgw.originate import (
    ALPN_H2,
    ALPN_HTTP11,
    OriginatingClient,
    UpstreamTLS,
    chooseALPN,
    memberReactor,
)
from etcdgw.pool import UpstreamPool
from etcdgw.proxy import GatewayFactory
from etcdgw.tap import Options
from tests.certs import CertificateAuthority
from tests.test_proxy_loopback import waitFor

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class _Certificates:
    """
    A CA, a member certificate for 127.0.0.1 and localhost, one naming
    another host, one of another CA, and a client certificate.
    """

    def __init__(self):
        self.directory = tempfile.mkdtemp(prefix="etcdgw-originate-unit-")
        ca = CertificateAuthority("originate unit CA")
        self.ca = ca.write(self.directory)
        self.member = ca.issue(self.directory, "member", ("localhost",), ips=("127.0.0.1",))
        self.other = ca.issue(self.directory, "other", ("other.example",), ips=())
        self.rogue = CertificateAuthority("rogue").issue(self.directory, "rogue", ("localhost",))
        self.client = ca.issue(self.directory, "client", (), ips=(), client=True)
        self.otherCA = CertificateAuthority("another").write(self.directory, "otherca")

    def pem(self, path, flag):
        with open(path, "rb") as f:
            return PEMFile(flag, path, f.read())

    def upstreamTLS(self, **kwargs):
        ca = self.pem(self.ca, "--cacert")
        client = ClientCertificate(
            self.pem(self.client[0], "--cert"), self.pem(self.client[1], "--key")
        )
        return UpstreamTLS(ca, client, **kwargs)

    def cleanup(self):
        shutil.rmtree(self.directory, ignore_errors=True)


class ChooseALPNTests(SynchronousTestCase):
    def test_preface(self):
        """The HTTP/2 preface (its first three bytes are enough) means h2."""
        self.assertEqual(chooseALPN(PREFACE), ALPN_H2)
        self.assertEqual(chooseALPN(b"PRI"), ALPN_H2)

    def test_other(self):
        """Anything else means http/1.1, as soon as it differs from the preface."""
        self.assertEqual(chooseALPN(b"GET / HTTP/1.1\r\n"), ALPN_HTTP11)
        self.assertEqual(chooseALPN(b"G"), ALPN_HTTP11)
        self.assertEqual(chooseALPN(b"PO"), ALPN_HTTP11)

    def test_undecided(self):
        """A prefix of the preface decides nothing yet."""
        self.assertIsNone(chooseALPN(b""))
        self.assertIsNone(chooseALPN(b"P"))
        self.assertIsNone(chooseALPN(memoryview(b"PR")))


class FlagTests(SynchronousTestCase):
    def setUp(self):
        self.certs = _Certificates()
        self.addCleanup(self.certs.cleanup)

    def parse(self, *args):
        options = Options()
        options.parseOptions(list(args))
        return options.config

    def refused(self, *args):
        with self.assertRaises(usage.UsageError) as e:
            self.parse(*args)
        message = str(e.exception)
        self.assertNotIn("\n", message)
        return message

    def test_default(self):
        """Passthrough is the default: nothing changes."""
        config = self.parse()
        self.assertEqual(config.upstreamTLS.mode, "passthrough")
        self.assertFalse(config.upstreamTLS.originate)
        self.assertFalse(config.source.endpoints[0].tls)

    def test_originate(self):
        """
        Originate keeps the PEM bytes, and marks every endpoint TLS (health
        checks speak TLS to them too).
        """
        c = self.certs
        config = self.parse(
            "--upstream-tls=originate",
            "--endpoints=localhost:2379,127.0.0.1:2380",
            "--cacert=" + c.ca,
            "--cert=" + c.client[0],
            "--key=" + c.client[1],
        )
        tls = config.upstreamTLS
        self.assertTrue(tls.originate)
        self.assertEqual(tls.ca.path, c.ca)
        self.assertEqual(tls.client.certificate.path, c.client[0])
        self.assertTrue(all(e.tls for e in config.source.endpoints))

    def test_badMode(self):
        """An unknown mode is refused, naming the flag."""
        self.assertIn("--upstream-tls", self.refused("--upstream-tls=terminate"))

    def test_needsOriginate(self):
        """The origination flags need --upstream-tls=originate."""
        for flag in (
            "--cacert=" + self.certs.ca,
            "--cert=" + self.certs.client[0],
            "--insecure-skip-tls-verify",
            "--originate-remote-clients",
        ):
            self.assertIn("needs --upstream-tls=originate", self.refused(flag))

    def test_nonLoopbackListen(self):
        """
        A listen address anyone may reach is refused in originate mode,
        unless --originate-remote-clients says so.
        """
        for listen in ("0.0.0.0:23790", ":23790", "10.1.2.3:23790", "gw.example:23790"):
            message = self.refused("--upstream-tls=originate", "--listen-addr=" + listen)
            self.assertIn("--originate-remote-clients", message)
        config = self.parse(
            "--upstream-tls=originate", "--listen-addr=0.0.0.0:23790", "--originate-remote-clients"
        )
        self.assertTrue(config.upstreamTLS.remoteClients)
        for listen in ("127.0.0.1:23790", "[::1]:23790", "localhost:23790", "unix:/tmp/gw.sock"):
            self.parse("--upstream-tls=originate", "--listen-addr=" + listen)

    def test_badFiles(self):
        """
        A missing CA, a key that is not the certificate's, a CA file with no
        certificate: one line naming the flag.
        """
        c = self.certs
        self.assertIn(
            "--cacert", self.refused("--upstream-tls=originate", "--cacert=/nonexistent/ca.pem")
        )
        message = self.refused(
            "--upstream-tls=originate", "--cert=" + c.client[0], "--key=" + c.member[1]
        )
        self.assertIn("--key", message)
        self.assertIn("not the one of the certificate", message)
        self.assertIn(
            "--cacert", self.refused("--upstream-tls=originate", "--cacert=" + c.client[1])
        )
        self.assertIn("--key needs --cert", self.refused("--upstream-tls=originate", "--key=" + c.client[1]))

    def test_passthroughTLSFlags(self):
        """
        In originate mode the passthrough TLS flags are refused: --cacert,
        --cert and --key are the one set of settings.
        """
        message = self.refused(
            "--upstream-tls=originate", "--trusted-ca-file=" + self.certs.ca
        )
        self.assertIn("--trusted-ca-file", message)
        self.assertIn("--cacert", message)


class ReloadTests(SynchronousTestCase):
    def setUp(self):
        self.certs = _Certificates()
        self.addCleanup(self.certs.cleanup)
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def test_reloadTakesNewFiles(self):
        """SIGHUP's reload reads the files again and uses what they hold now."""
        tls = self.certs.upstreamTLS()
        before = tls.sslContext(ALPN_H2)
        shutil.copy(self.certs.otherCA, self.certs.ca)
        self.assertTrue(tls.reload())
        self.assertIsNot(tls.sslContext(ALPN_H2), before)
        with open(self.certs.otherCA, "rb") as f:
            self.assertEqual(tls.ca.data, f.read())
        self.assertEqual(tls.reloads, 1)

    def test_badFileKeepsOld(self):
        """
        A new file that cannot be used is refused with one error line, and
        the settings in use stay.
        """
        tls = self.certs.upstreamTLS()
        before = tls.sslContext(ALPN_HTTP11)
        with open(self.certs.client[1], "w") as f:
            f.write("not a key\n")
        self.assertFalse(tls.reload())
        self.assertIs(tls.sslContext(ALPN_HTTP11), before)
        errors = [e for e in self.events if e.get("log_level").name == "error"]
        self.assertEqual(len(errors), 1)
        self.assertIn("--key", errors[0]["reason"])
        self.assertEqual(tls.refusedReloads, 1)
        os.remove(self.certs.ca)
        self.assertFalse(tls.reload())
        self.assertIs(tls.sslContext(ALPN_HTTP11), before)


class _Echo(protocol.Protocol):
    """
    The member: says the ALPN protocol it negotiated, then echoes.
    """

    def connectionMade(self):
        self.factory.connections.append(self)
        self.said = False

    def dataReceived(self, data):
        self.factory.received.append(data)
        if not self.said:
            self.said = True
            alpn = getattr(self.transport, "negotiatedProtocol", None)
            if alpn is None:  # TLS started on a TCP transport: its TLS protocol knows
                alpn = getattr(self.transport.protocol, "negotiatedProtocol", None)
            self.transport.write((alpn or b"none") + b":")
        self.transport.write(data)


class _Client(protocol.Protocol):
    def connectionMade(self):
        self.received = []
        self.lost = defer.Deferred()
        self.factory.made.callback(self)

    def dataReceived(self, data):
        self.received.append(data)

    def connectionLost(self, reason):
        self.lost.callback(None)

    @property
    def data(self):
        return b"".join(self.received)


def _serverOptions(certs, pair):
    with open(pair[0], "rb") as f:
        cert = f.read()
    with open(pair[1], "rb") as f:
        key = f.read()
    with open(certs.ca, "rb") as f:
        ca = Certificate.loadPEM(f.read())
    private = PrivateCertificate.loadPEM(cert + key)
    return CertificateOptions(
        privateKey=private.privateKey.original,
        certificate=private.original,
        verify=True,
        caCerts=[ca.original],
        requireCertificate=True,
        acceptableProtocols=[b"h2", b"http/1.1"],
        enableSessionTickets=True,
    )


class OriginateLoopbackTests(TestCase):
    """
    The proxy in originate mode over real loopback sockets, on the fast
    path's member transport.
    """

    fast = True

    def setUp(self):
        self.assertEqual(gate.enabled(), self.fast, "the gate's decision")
        self.certs = _Certificates()
        self.addCleanup(self.certs.cleanup)
        self.members = {}
        for name, pair in (("good", self.certs.member), ("other", self.certs.other)):
            factory = protocol.Factory.forProtocol(_Echo)
            factory.connections = []
            factory.received = []
            port = reactor.listenSSL(
                0, factory, _serverOptions(self.certs, pair), interface="127.0.0.1"
            )
            self.addCleanup(port.stopListening)
            self.members[name] = (factory, port.getHost().port)

    def gateway(self, *names, **tlsOptions):
        endpoints = [Endpoint("127.0.0.1", self.members[n][1]) for n in names]
        self.pool = UpstreamPool(endpoints, reactor)
        factory = self.factory = GatewayFactory(self.pool, reactor, dialTimeout=5)
        factory.protocol = OriginatingClient
        factory.upstreamTLS = self.certs.upstreamTLS(**tlsOptions)
        d = GatewayTCPEndpoint(reactor, "127.0.0.1", 0).listen(factory)

        def listening(port):
            self.addCleanup(port.stopListening)
            self.addCleanup(self.settled)
            return port.getHost().port

        return d.addCallback(listening)

    def settled(self):
        return waitFor(lambda: not self.factory.clients)

    def connect(self, port):
        factory = protocol.ClientFactory.forProtocol(_Client)
        factory.made = defer.Deferred()
        reactor.connectTCP("127.0.0.1", port, factory)
        return factory.made

    def memberTransport(self):
        (client,) = self.factory.clients
        return client.peer.transport if client.peer is not None else None

    @defer.inlineCallbacks
    def exchange(self, first, alpn):
        port = yield self.gateway("good")
        client = yield self.connect(port)
        client.transport.write(first)
        expected = alpn + b":" + first
        yield waitFor(lambda: client.data == expected)
        member = self.memberTransport()
        self.assertEqual(getattr(member, "originated", False), self.fast)
        self.assertIs(member.portable, False)  # issue 14's takeover leaves it here
        client.transport.loseConnection()
        yield client.lost

    def test_h2(self):
        """The HTTP/2 preface makes the member connection offer h2 alone."""
        return self.exchange(PREFACE, b"h2")

    def test_http11(self):
        """Anything else makes it offer http/1.1 alone."""
        return self.exchange(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n", b"http/1.1")

    @defer.inlineCallbacks
    def test_bulkBothWays(self):
        """
        Megabytes through the TLS member side arrive unchanged and in order,
        and are counted.
        """
        port = yield self.gateway("good")
        client = yield self.connect(port)
        payload = os.urandom(3 * 1024 * 1024 + 11)
        client.transport.write(b"G" + payload)
        expected = b"http/1.1:G" + payload
        yield waitFor(lambda: len(client.data) >= len(expected), timeout=30)
        self.assertEqual(client.data, expected)
        (state,) = self.pool.states()
        self.assertEqual(state.toUpstream.n, len(payload) + 1)
        self.assertEqual(state.fromUpstream.n, len(expected))
        client.transport.loseConnection()
        yield client.lost

    @defer.inlineCallbacks
    def test_refusedCertificateNextMember(self):
        """
        A member whose certificate names another host fails the dial: it is
        marked down with the reason, and the client is served by the next;
        nothing reaches the refused member in plaintext.
        """
        port = yield self.gateway("other", "good")
        for i in range(2):
            client = yield self.connect(port)
            client.transport.write(b"GET / HTTP/1.1\r\n\r\n")
            yield waitFor(lambda: client.data.endswith(b"\r\n\r\n"))
            self.assertTrue(client.data.startswith(b"http/1.1:"))
            client.transport.loseConnection()
            yield client.lost
        bad = [s for s in self.pool.states() if s.endpoint.port == self.members["other"][1]][0]
        self.assertEqual(bad.state, "down")
        self.assertIn("TLS handshake failed", bad.reason)
        self.assertIn("127.0.0.1", bad.reason)  # the name it was asked to have
        self.assertEqual(self.members["other"][0].received, [])

    @defer.inlineCallbacks
    def test_insecureSkipsVerification(self):
        """
        --insecure-skip-tls-verify: a member whose certificate names another
        host carries the client (and nothing else is skipped: still TLS).
        """
        port = yield self.gateway("other", insecure=True)
        client = yield self.connect(port)
        client.transport.write(PREFACE)
        yield waitFor(lambda: client.data == b"h2:" + PREFACE)
        (state,) = self.pool.states()
        self.assertEqual(state.state, "up")
        client.transport.loseConnection()
        yield client.lost

    @defer.inlineCallbacks
    def test_clientLeavesBeforeSpeaking(self):
        """
        A client that closes before its first byte ends its member
        connection too (no handshake was started).
        """
        port = yield self.gateway("good")
        client = yield self.connect(port)
        yield waitFor(lambda: self.factory.clients)
        client.transport.loseConnection()
        yield client.lost
        yield self.settled()


    @defer.inlineCallbacks
    def test_tlsProbe(self):
        """
        The probe of down members (tcp and etcd checks, SIGHUP) makes the
        handshake: a member with a good certificate passes, one naming
        another host fails with the reason.
        """
        from etcdgw.dial import describeFailure
        from etcdgw.originate import tlsProbe

        probe = tlsProbe(self.certs.upstreamTLS())
        good = Endpoint("127.0.0.1", self.members["good"][1], tls=True)
        other = Endpoint("127.0.0.1", self.members["other"][1], tls=True)
        self.assertIsNone((yield probe(reactor, good, 5)))
        failure = yield self.assertFailure(probe(reactor, other, 5), Exception)
        from twisted.python.failure import Failure

        reason = describeFailure(Failure(failure))
        self.assertIn("TLS handshake failed", reason)
        self.assertIn("127.0.0.1", reason)
        self.assertEqual(self.members["other"][0].received, [])

    @defer.inlineCallbacks
    def test_handshakeFailuresCounted(self):
        """A refused handshake of a forwarded connection is counted."""
        port = yield self.gateway("other", "good")
        client = yield self.connect(port)
        client.transport.write(b"GET / HTTP/1.1\r\n\r\n")
        yield waitFor(lambda: client.data.endswith(b"\r\n\r\n"))
        self.assertEqual(self.factory.upstreamTLS.handshakeFailures, 1)
        client.transport.loseConnection()
        yield client.lost


    @defer.inlineCallbacks
    def test_sessionResumed(self):
        """
        On the fast path, a new connection to a member resumes the TLS
        session of an earlier one (as HAProxy does): a cheaper handshake.
        """
        if not self.fast:
            raise SkipTest("Twisted's own TLS makes a full handshake each time")
        port = yield self.gateway("good")
        reused = []
        for i in range(2):
            client = yield self.connect(port)
            client.transport.write(b"GET / HTTP/1.1\r\n\r\n")
            yield waitFor(lambda: client.data.endswith(b"\r\n\r\n"))
            reused.append(self.memberTransport()._tls.session_reused)
            client.transport.loseConnection()
            yield client.lost
        self.assertEqual(reused, [False, True])

    @defer.inlineCallbacks
    def test_memberClosesIdleConnection(self):
        """
        A member that closes the connection dialled for a client that has
        not spoken yet (an idle timeout of its own) is dialled again once
        the client speaks: not a failed dial, the member stays up.
        """
        options = _serverOptions(self.certs, self.certs.member)
        factory = protocol.Factory.forProtocol(_ClosesFirst)
        factory.connections = []
        factory.received = []
        factory.options = options
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        self.members["closes"] = (factory, listening.getHost().port)
        port = yield self.gateway("closes")
        client = yield self.connect(port)
        yield waitFor(lambda: len(factory.connections) == 1 and factory.connections[0].closed)
        yield waitFor(lambda: self.memberTransport() is None)
        client.transport.write(b"GET / HTTP/1.1\r\n\r\n")
        yield waitFor(lambda: client.data.endswith(b"\r\n\r\n"))
        self.assertEqual(client.data, b"http/1.1:GET / HTTP/1.1\r\n\r\n")
        (state,) = self.pool.states()
        self.assertEqual(state.state, "up")
        self.assertEqual(state.dialFailures, 0)
        self.assertEqual(len(factory.connections), 2)
        client.transport.loseConnection()
        yield client.lost


    @defer.inlineCallbacks
    def test_notExportedByATakeover(self):
        """
        A takeover (issue 14, L{etcdgw.portable}) leaves a pair with TLS
        originated here in this process, untouched and serving.
        """
        from etcdgw import portable

        port = yield self.gateway("good")
        client = yield self.connect(port)
        client.transport.write(b"GET / HTTP/1.1\r\n")
        yield waitFor(lambda: client.data.endswith(b"GET / HTTP/1.1\r\n"))
        batch = portable.exportPairs(self.factory)
        self.assertEqual(batch.pairs, [])
        self.assertEqual(len(batch.skipped), 1)
        self.assertIn("TLS", batch.skipped[0]["why"])
        batch.release()
        client.transport.write(b"after")
        yield waitFor(lambda: client.data.endswith(b"after"))
        client.transport.loseConnection()
        yield client.lost


class _ClosesFirst(_Echo):
    """
    A member that closes its first connection at once, before any
    handshake, and speaks TLS on the others.
    """

    closed = False

    def connectionMade(self):
        super().connectionMade()
        if len(self.factory.connections) == 1:
            self.closed = True
            self.transport.loseConnection()
        else:
            self.transport.startTLS(self.factory.options)


class StockOriginateLoopbackTests(OriginateLoopbackTests):
    """
    The same on Twisted's own transports (TLS by startTLS): what the
    gateway runs on when the gate refuses the fast path.
    """

    fast = False

    def setUp(self):
        self.patch(gate, "_decision", gate.Verdict("under test", ("the stock path under test",)))
        return super().setUp()


class MemberReactorTests(SynchronousTestCase):
    def test_testReactor(self):
        """A test reactor is dialled as it is (no fast transports)."""
        from twisted.internet.testing import MemoryReactorClock

        clock = MemoryReactorClock()
        self.assertIs(memberReactor(clock), clock)





class ReloadHookTests(SynchronousTestCase):
    def test_sighupReloadsUpstreamTLS(self):
        """SIGHUP's reload reads the origination files again (signals' hook)."""
        from twisted.internet.testing import MemoryReactorClock

        from etcdgw.gateway import buildGateway

        certs = _Certificates()
        self.addCleanup(certs.cleanup)
        options = Options()
        options.parseOptions(
            [
                "--upstream-tls=originate",
                "--endpoints=127.0.0.1:1",
                "--cacert=" + certs.ca,
                "--cert=" + certs.client[0],
                "--key=" + certs.client[1],
            ]
        )
        gateway = buildGateway(options.config, MemoryReactorClock())
        self.assertIsInstance(gateway.factory.buildProtocol(None), OriginatingClient)
        gateway.reload.reload()
        self.assertEqual(gateway.upstreamTLS.reloads, 1)


class MetricsTests(SynchronousTestCase):
    def test_originateMetrics(self):
        """
        /metrics says which endpoints are down for a refused TLS handshake,
        and counts handshake failures and SIGHUP reloads.
        """
        from prometheus_client import generate_latest
        from twisted.internet.testing import MemoryReactorClock

        from etcdgw.gateway import buildGateway
        from etcdgw.metrics import gatewayRegistry

        certs = _Certificates()
        self.addCleanup(certs.cleanup)
        options = Options()
        options.parseOptions(
            ["--upstream-tls=originate", "--endpoints=127.0.0.1:1,127.0.0.1:2", "--cacert=" + certs.ca]
        )
        gateway = buildGateway(options.config, MemoryReactorClock())
        endpoint = gateway.pool.endpoints[0]
        gateway.pool.markDown(endpoint, "TLS handshake failed: certificate has expired")
        gateway.upstreamTLS.handshakeFailures = 3
        gateway.upstreamTLS.reload()
        text = generate_latest(gatewayRegistry(gateway, process=False)).decode()
        self.assertIn(f'etcd_gateway_endpoint_tls_refused{{endpoint="{endpoint}"}} 1.0', text)
        self.assertIn('etcd_gateway_endpoint_tls_refused{endpoint="127.0.0.1:2"} 0.0', text)
        self.assertIn("etcd_gateway_upstream_tls_handshake_failures_total 3.0", text)
        self.assertIn('etcd_gateway_upstream_tls_reloads_total{result="taken"} 1.0', text)
