"""
The answer probe: its HTTP reader, the prober's kept connection (plain and
TLS, in memory), and the service's timing: every member each interval, a
miss probed again after fastinter, a hung member silent within about 3 s
with the defaults, and the cascade guard with two slow members.
"""

import shutil
import tempfile

from OpenSSL import SSL
from twisted.internet import defer, error
from twisted.internet.address import IPv4Address
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from etcdgw.answer import (
    ANSWERED,
    FAILED,
    SILENT,
    UNTRIED,
    AnswerProber,
    AnswerService,
    Outcome,
    ResponseReader,
    probeContext,
    versionRequest,
)
from etcdgw.endpoint import Endpoint
from etcdgw.monitor import Monitor
from etcdgw.pool import DOWN, SILENT as SILENT_CHANGE, SLOW, UP, UpstreamPool
from etcdgw.selfloop import SelfLoopError, SelfLoopGuard
from tests.certs import CertificateAuthority
from tests.test_selfloop import FakeListener

VERSION = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 45\r\n\r\n"
    b'{"etcdserver":"3.4.23","etcdcluster":"3.4.0"}'
)
A = Endpoint("10.0.0.1", 2379)
B = Endpoint("10.0.0.2", 2379)
C = Endpoint("10.0.0.3", 2379)
#: The memory clock's step in the service tests: a binary fraction, so that
#: sums of steps are exact.
STEP = 1 / 64


class ResponseReaderTests(SynchronousTestCase):
    def test_contentLength(self):
        """A response framed by Content-Length ends with its body; the connection is kept."""
        reader = ResponseReader()
        self.assertTrue(reader.feed(VERSION))
        self.assertEqual((reader.status, reader.reusable), ("HTTP/1.1 200 OK", True))

    def test_byteByByte(self):
        """The answer may come a byte at a time."""
        reader = ResponseReader()
        done = [reader.feed(VERSION[i : i + 1]) for i in range(len(VERSION))]
        self.assertEqual(done, [False] * (len(VERSION) - 1) + [True])
        self.assertTrue(reader.reusable)

    def test_unframed(self):
        """
        A response it cannot frame ends at once (it is an answer), and the
        connection is not kept: chunked, ended by the close, too long, not
        HTTP, HTTP/1.0, Connection: close, two lengths.
        """
        for data in [
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 999999999\r\n\r\n",
            b"SSH-2.0-OpenSSH\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx",
        ]:
            reader = ResponseReader()
            self.assertTrue(reader.feed(data), data)
            self.assertFalse(reader.reusable, data)

    def test_headBounded(self):
        """A head that never ends is cut at 16 KiB: an answer, the connection not kept."""
        reader = ResponseReader()
        self.assertFalse(reader.feed(b"HTTP/1.1 200 OK\r\n"))
        self.assertTrue(reader.feed(b"X: " + b"y" * 20000))
        self.assertFalse(reader.reusable)

    def test_noBody(self):
        """204 and 304 have no body."""
        reader = ResponseReader()
        self.assertTrue(reader.feed(b"HTTP/1.1 204 No Content\r\n\r\n"))
        self.assertTrue(reader.reusable)

    def test_request(self):
        """The request: GET /version, HTTP/1.1, with the member's host."""
        self.assertEqual(
            versionRequest(Endpoint("::1", 2379)),
            b"GET /version HTTP/1.1\r\nHost: [::1]:2379\r\nUser-Agent: etcd-gateway\r\n\r\n",
        )


class ProberCase(SynchronousTestCase):
    timeout = 0.5

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.guard = SelfLoopGuard(listeners=[FakeListener("127.0.0.1", 23790)])
        self.prober = AnswerProber(self.reactor, self.timeout, guard=self.guard)

    def tearDown(self):
        self.prober.close()
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def connect(self, peer=None):
        """
        Complete the last dial; return C{(protocol, transport)}.
        """
        host, port, factory, timeout, _ = self.reactor.tcpClients[-1]
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = StringTransport(peerAddress=IPv4Address("TCP", *(peer or (host, port))))
        protocol.makeConnection(transport)
        return protocol, transport

    def refuse(self):
        host, port, factory, timeout, _ = self.reactor.tcpClients[-1]
        factory.clientConnectionFailed(None, Failure(error.ConnectionRefusedError()))


class PlainProberTests(ProberCase):
    def test_keptAlive(self):
        """
        The first probe connects and asks GET /version; an answer counts;
        the next probe asks on the same connection.
        """
        d = self.prober.probe(A)
        protocol, transport = self.connect()
        self.assertEqual(transport.value(), versionRequest(A))
        protocol.dataReceived(VERSION)
        self.assertEqual(self.successResultOf(d), Outcome(ANSWERED, "HTTP/1.1 200 OK"))
        transport.clear()
        d = self.prober.probe(A)
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.assertEqual(transport.value(), versionRequest(A))
        protocol.dataReceived(memoryview(VERSION))  # as the gateway's transports give it
        self.assertEqual(self.successResultOf(d).kind, ANSWERED)
        self.assertFalse(transport.disconnecting)

    def test_noAnswer(self):
        """
        Connected, no answer in the timeout: silent; that connection is
        closed (a late answer is not this probe's) and the next probe
        connects anew.
        """
        d = self.prober.probe(A)
        protocol, transport = self.connect()
        self.reactor.advance(0.499)
        self.assertNoResult(d)
        self.reactor.advance(0.001)
        self.assertEqual(self.successResultOf(d), Outcome(SILENT, "no answer in 500ms"))
        self.assertTrue(transport.disconnecting)
        protocol.dataReceived(VERSION)  # too late: ignored
        self.prober.probe(A)
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.reactor.advance(0.5)

    def test_noConnection(self):
        """A connect still pending at the timeout is silence (not a refusal): the dial ends."""
        d = self.prober.probe(A)
        self.reactor.advance(0.5)
        self.assertEqual(self.successResultOf(d), Outcome(SILENT, "no connection in 500ms"))
        # The dial was given up: a connection that completes now is closed.
        protocol, transport = self.connect()
        self.assertEqual(transport.value(), b"")

    def test_refused(self):
        """A refused connect is a failure (the monitor marks the member down)."""
        d = self.prober.probe(A)
        self.refuse()
        outcome = self.successResultOf(d)
        self.assertEqual((outcome.kind, outcome.detail), (FAILED, "connection refused"))
        self.assertTrue(outcome.failure.check(error.ConnectionRefusedError))

    def test_outOfDescriptors(self):
        """
        A connect the gateway could not make for want of descriptors is no
        evidence about the member (as the proxy's dials judge it).
        """
        import errno

        d = self.prober.probe(A)
        host, port, factory, timeout, _ = self.reactor.tcpClients[-1]
        factory.clientConnectionFailed(
            None, Failure(error.ConnectError(osError=errno.EMFILE, string="Too many open files"))
        )
        self.assertEqual(self.successResultOf(d).kind, UNTRIED)

    def test_partialAnswer(self):
        """Some bytes of an answer in time count: the member answered."""
        d = self.prober.probe(A)
        protocol, transport = self.connect()
        protocol.dataReceived(b"HTTP/1.1 2")
        self.reactor.advance(0.5)
        self.assertEqual(self.successResultOf(d), Outcome(ANSWERED, "answered in part within 500ms"))
        self.assertTrue(transport.disconnecting)

    def test_closedKeptConnectionRetried(self):
        """
        The kept connection closed under a probe, nothing answered: asked
        once more on a new connection, within the same timeout.
        """
        d = self.prober.probe(A)
        protocol, transport = self.connect()
        protocol.dataReceived(VERSION)
        self.successResultOf(d)
        d = self.prober.probe(A)
        protocol.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(len(self.reactor.tcpClients), 2)
        protocol2, transport2 = self.connect()
        self.assertEqual(transport2.value(), versionRequest(A))
        protocol2.dataReceived(VERSION)
        self.assertEqual(self.successResultOf(d).kind, ANSWERED)

    def test_newConnectionClosedIsSilence(self):
        """A new connection closed without an answer: silence, not tried again."""
        d = self.prober.probe(A)
        protocol, transport = self.connect()
        protocol.connectionLost(Failure(error.ConnectionLost()))
        outcome = self.successResultOf(d)
        self.assertEqual(outcome.kind, SILENT)
        self.assertIn("connection closed without an answer", outcome.detail)
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_unframedAnswerClosesConnection(self):
        """An answer that cannot be framed counts, and the next probe connects anew."""
        d = self.prober.probe(A)
        protocol, transport = self.connect()
        protocol.dataReceived(b"HTTP/1.1 503 Service Unavailable\r\n\r\n")
        self.assertEqual(self.successResultOf(d).kind, ANSWERED)
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(Failure(error.ConnectionDone()))
        self.prober.probe(A)
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.reactor.advance(0.5)

    def test_selfLoop(self):
        """A probe that reaches the gateway itself fails, self-loop, before asking anything."""
        d = self.prober.probe(Endpoint("127.0.0.1", 23790))
        protocol, transport = self.connect(("127.0.0.1", 23790))
        outcome = self.successResultOf(d)
        self.assertEqual(outcome.kind, FAILED)
        self.assertTrue(outcome.failure.check(SelfLoopError))
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)

    def test_cancel(self):
        """A cancelled probe ends its connection and its timer."""
        d = self.prober.probe(A)
        protocol, transport = self.connect()
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertTrue(transport.disconnecting)

    def test_forget(self):
        """A member forgotten (removed) has its kept connection closed."""
        d = self.prober.probe(A)
        protocol, transport = self.connect()
        protocol.dataReceived(VERSION)
        self.successResultOf(d)
        self.prober.forget(A.key)
        self.assertTrue(transport.disconnecting)


class _MemoryTLSServer:
    """
    The member's side of a TLS connection, on a memory BIO: what the probe
    writes goes in, what it answers goes back to the probe's protocol.
    """

    def __init__(self, context):
        self.tls = SSL.Connection(context, None)
        self.tls.set_accept_state()
        self.plain = b""
        self.error = None

    def pump(self, protocol, transport):
        """
        Move bytes both ways until neither side has more.
        """
        for _ in range(20):
            sent = transport.value()
            transport.clear()
            if sent:
                self.tls.bio_write(sent)
            try:
                self.tls.do_handshake()
                while True:
                    self.plain += self.tls.recv(65536)
            except SSL.WantReadError:
                pass
            except SSL.Error as e:
                self.error = e
            back = b""
            while True:
                try:
                    back += self.tls.bio_read(65536)
                except SSL.WantReadError:
                    break
            if back:
                protocol.dataReceived(back)
            if not sent and not back:
                return

    def answer(self, data):
        self.tls.send(data)


class TLSProberTests(ProberCase):
    endpoint = Endpoint("10.0.0.1", 2379, tls=True)

    def setUp(self):
        super().setUp()
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        ca = CertificateAuthority()
        self.caFile = ca.write(directory)
        self.certFile, self.keyFile = ca.issue(directory, "member", ips=("10.0.0.1",))
        self.clientCert, self.clientKey = ca.issue(directory, "client", client=True)

    def serverContext(self, requireClient=False):
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        context.use_certificate_file(self.certFile)
        context.use_privatekey_file(self.keyFile)
        if requireClient:
            context.load_verify_locations(self.caFile)
            context.set_verify(
                SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, lambda *a: a[-1]
            )
        return context

    def test_keptAliveOverTLS(self):
        """
        An https member: a TLS handshake (no verification), then GET
        /version inside it; the next probe asks on the same TLS connection.
        """
        server = _MemoryTLSServer(self.serverContext())
        d = self.prober.probe(self.endpoint)
        protocol, transport = self.connect()
        server.pump(protocol, transport)
        self.assertEqual(server.plain, versionRequest(self.endpoint))
        server.answer(VERSION)
        server.pump(protocol, transport)
        self.assertEqual(self.successResultOf(d), Outcome(ANSWERED, "HTTP/1.1 200 OK"))
        server.plain = b""
        d = self.prober.probe(self.endpoint)
        server.pump(protocol, transport)
        self.assertEqual(server.plain, versionRequest(self.endpoint))
        server.answer(VERSION)
        server.pump(protocol, transport)
        self.assertEqual(self.successResultOf(d).kind, ANSWERED)
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_refusedHandshakeIsAnAnswer(self):
        """
        A member that requires a client certificate the gateway does not
        have refuses the handshake: its alert is an answer; logged once,
        naming --health-cert-file.
        """
        events = EventLoggingObserver.createWithCleanup(self, self.prober.log.observer)
        for n in range(2):
            server = _MemoryTLSServer(self.serverContext(requireClient=True))
            d = self.prober.probe(self.endpoint)
            protocol, transport = self.connect()
            server.pump(protocol, transport)
            outcome = self.successResultOf(d)
            self.assertEqual(outcome.kind, ANSWERED)
            self.assertTrue(outcome.detail.startswith("TLS handshake answered: "), outcome.detail)
            self.assertTrue(transport.disconnecting)
            protocol.connectionLost(Failure(error.ConnectionDone()))
        warnings = [e for e in events if "--health-cert-file" in e["log_format"]]
        self.assertEqual(len(warnings), 1)

    def test_clientCertificatePresented(self):
        """With the etcd client's certificate, the handshake completes and is kept."""
        with open(self.clientCert, "rb") as f:
            certificate = f.read()
        with open(self.clientKey, "rb") as f:
            key = f.read()
        self.prober = AnswerProber(
            self.reactor, self.timeout, context=probeContext(certificate, key)
        )
        server = _MemoryTLSServer(self.serverContext(requireClient=True))
        d = self.prober.probe(self.endpoint)
        protocol, transport = self.connect()
        server.pump(protocol, transport)
        self.assertIsNone(server.error)
        server.answer(VERSION)
        server.pump(protocol, transport)
        self.assertEqual(self.successResultOf(d).kind, ANSWERED)
        self.assertFalse(transport.disconnecting)

    def test_helloUnanswered(self):
        """A member that takes the hello and answers nothing is silent."""
        d = self.prober.probe(self.endpoint)
        protocol, transport = self.connect()
        self.assertTrue(transport.value().startswith(b"\x16\x03"))  # a ClientHello
        self.reactor.advance(0.5)
        self.assertEqual(self.successResultOf(d), Outcome(SILENT, "no answer in 500ms"))

    def test_anyByteBackCounts(self):
        """Any byte back from a TLS member in time (here not even TLS) is an answer."""
        d = self.prober.probe(self.endpoint)
        protocol, transport = self.connect()
        protocol.dataReceived(b"\x15\x03\x03\x00\x02\x02\x28")  # an alert: handshake failure
        self.assertEqual(self.successResultOf(d).kind, ANSWERED)


class FakeMember:
    """
    How one member answers the simulated probes: C{delay} seconds after a
    probe starts, or never (L{None}: the probe times out), or refused.
    """

    def __init__(self):
        self.delay = 0.001
        self.refused = False
        self.probes = []


class SimulatedProber:
    """
    An L{AnswerProber} stand-in on the memory clock: each member answers as
    its L{FakeMember} says; a probe ends at C{timeout} at the latest.
    """

    def __init__(self, clock, timeout, members):
        self.clock = clock
        self.timeout = timeout
        self.members = members
        self.forgotten = []
        self.closed = False

    def probe(self, endpoint, onConnected=None):
        member = self.members[endpoint.host]
        member.probes.append(self.clock.seconds())
        if member.refused:
            return defer.succeed(
                Outcome(FAILED, "connection refused", Failure(error.ConnectionRefusedError()))
            )
        if onConnected is not None:
            onConnected()
        calls = []

        def cancel(d):
            for call in calls:
                if call.active():
                    call.cancel()

        d = defer.Deferred(cancel)

        def fire(outcome):
            for call in calls:
                if call.active():
                    call.cancel()
            if not d.called:
                d.callback(outcome)

        if member.delay is not None and member.delay < self.timeout:
            calls.append(
                self.clock.callLater(member.delay, fire, Outcome(ANSWERED, "HTTP/1.1 200 OK"))
            )
        calls.append(self.clock.callLater(self.timeout, fire, Outcome(SILENT, "no answer")))
        return d

    def forget(self, key):
        self.forgotten.append(key)

    def close(self):
        self.closed = True


class ServiceCase(SynchronousTestCase):
    #: The defaults of --health-check=answer.
    interval, timeout, fastinter, rise, fall, share = 1.0, 0.5, 0.25, 2, 2, 50

    def setUp(self):
        self.clock = MemoryReactorClock()
        self.members = {e.host: FakeMember() for e in (A, B, C)}
        self.pool = UpstreamPool([A, B, C], self.clock)
        self.monitor = Monitor(
            self.pool, self.clock, rise=self.rise, fall=self.fall, maxSilentShare=self.share
        )
        self.changes = []
        self.monitor.subscribe(self.changes.append)
        self.prober = SimulatedProber(self.clock, self.timeout, self.members)
        self.service = AnswerService(
            self.pool, self.clock, self.monitor, self.prober, self.interval, self.fastinter
        )
        self.service.startService()
        self.clock.advance(0)  # the first probes, at once

    def tearDown(self):
        if self.service.running:
            self.successResultOf(self.service.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def state(self, endpoint):
        return self.pool.stateOf(endpoint)

    def elapse(self, seconds, step=STEP):
        for _ in range(int(round(seconds / step))):
            self.clock.advance(step)


class ServiceTests(ServiceCase):
    def test_everyMemberEachInterval(self):
        """Every member, up or down, is probed at start and then every interval."""
        self.members["10.0.0.2"].refused = True
        self.elapse(3.0)
        for host, member in self.members.items():
            self.assertEqual(member.probes, [0.0, 1.0, 2.0, 3.0], host)
        self.assertEqual(self.state(B).state, DOWN)
        self.assertEqual(self.state(B).reason, "answer probe: connection refused")
        self.assertFalse(self.state(B).silent)

    def test_untriedDecidesNothing(self):
        """A probe the gateway could not make (no descriptor) decides nothing; the next comes as usual."""
        original = self.prober.probe
        untried = []

        def probe(endpoint, onConnected=None):
            if endpoint != A:
                return original(endpoint, onConnected)
            untried.append(self.clock.seconds())
            return defer.succeed(Outcome(UNTRIED, "Too many open files"))

        self.prober.probe = probe
        self.elapse(3.0)
        self.assertEqual((self.state(A).state, self.state(A).silent), (UP, False))
        self.assertEqual(untried, [1.0, 2.0, 3.0])

    def test_downMemberBack(self):
        """
        A member that is down and accepts a probe's connection again is up,
        silent until it has answered rise probes (fastinter apart): no
        client goes to a member still starting.
        """
        self.elapse(0.125)
        self.pool.markDown(A, "refused")
        self.elapse(0.75)
        self.assertEqual(self.state(A).state, DOWN)
        self.elapse(0.25)  # the probe at 1.0 connects, and is answered at once
        self.assertEqual(self.state(A).state, UP)
        self.assertEqual(
            self.state(A).reason, "accepts connections again (the answer probe connected)"
        )
        self.assertTrue(self.state(A).silent)
        self.elapse(0.25)  # the second answer, fastinter later
        self.assertFalse(self.state(A).silent)
        seen = [(c.what, c.new) for c in self.changes if c.endpoint == A]
        self.assertEqual(seen, [("state", UP), (SILENT_CHANGE, True), (SILENT_CHANGE, False)])

    def test_loneMemberWithoutQuorum(self):
        """
        Every other member down, one accepts connections and answers nothing
        (a lone member without a quorum serves nothing): up and silent, and
        new clients still go there (fail open), not refused.
        """
        self.members["10.0.0.2"].refused = self.members["10.0.0.3"].refused = True
        self.members["10.0.0.1"].refused = True
        self.elapse(1.0)
        self.assertIsNone(self.pool.pick())
        self.members["10.0.0.1"].refused = False
        self.members["10.0.0.1"].delay = None
        self.elapse(1.0)
        self.assertEqual((self.state(A).state, self.state(A).silent), (UP, True))
        self.assertEqual(self.pool.pick().endpoint, A)

    def test_downProbedEveryRetryDelay(self):
        """A member that is down is probed every --retry-delay where that is shorter."""
        self.successResultOf(self.service.stopService())
        self.members["10.0.0.2"].refused = True
        self.service = AnswerService(
            self.pool, self.clock, self.monitor, self.prober, 1.0, 0.25, retryDelay=0.5
        )
        for member in self.members.values():
            member.probes = []
        self.service.startService()
        self.clock.advance(0)
        self.elapse(2.0)
        self.assertEqual(self.members["10.0.0.2"].probes, [0.0, 0.5, 1.0, 1.5, 2.0])
        self.assertEqual(self.members["10.0.0.1"].probes, [0.0, 1.0, 2.0])
        self.assertEqual(AnswerService(self.pool, self.clock, self.monitor, self.prober, 1.0,
                                       0.25, retryDelay=60.0).retryDelay, 1.0)

    def test_fastinterAfterMiss(self):
        """After a miss, the next probe comes fastinter later; after the verdict, every interval."""
        self.elapse(0.5)
        self.members["10.0.0.1"].delay = None
        self.elapse(5.0)
        probes = [round(t, 2) for t in self.members["10.0.0.1"].probes]
        # 1.0 misses at 1.5, next at 1.75 misses at 2.25: silent; then every interval.
        self.assertEqual(probes, [0.0, 1.0, 1.75, 2.75, 3.75, 4.75])
        self.assertTrue(self.state(A).silent)

    def test_hungMemberSilentWithin3s(self):
        """
        With the defaults, a member that stops answering (at any moment of
        its probe cycle) is silent within interval + timeout + fastinter +
        timeout = 2.25 s, and gets no new connection from then on.
        """
        worst = 0.0
        for phase in range(64):
            self.setUp()
            self.elapse(1.0 + phase * STEP)
            frozenAt = self.clock.seconds()
            self.members["10.0.0.1"].delay = None
            silentAt = None
            for _ in range(400):
                self.clock.advance(STEP)
                if self.state(A).silent:
                    silentAt = self.clock.seconds()
                    break
            self.assertIsNotNone(silentAt, phase)
            worst = max(worst, silentAt - frozenAt)
            self.assertNotIn(A, [self.pool.pick().endpoint for _ in range(6)])
            self.tearDown()
        self.assertLessEqual(worst, 2.25)
        self.assertGreater(worst, 2.2)  # the bound is reached by some phase

    def test_thawedAnswersAgain(self):
        """A silent member that answers again is answering after rise answers (fastinter apart)."""
        self.members["10.0.0.1"].delay = None
        self.elapse(3.0)
        self.assertTrue(self.state(A).silent)
        self.members["10.0.0.1"].delay = 0.001
        self.elapse(2.0)
        self.assertFalse(self.state(A).silent)
        seen = [(c.what, c.new) for c in self.changes if c.endpoint == A]
        self.assertEqual(seen, [(SILENT_CHANGE, True), (SILENT_CHANGE, False)])

    def test_hint(self):
        """
        A hint probes the member now; not again within fastinter, nor while
        a probe of it runs.
        """
        self.elapse(0.25)
        self.monitor.hint(A)
        self.assertEqual(self.members["10.0.0.1"].probes, [0.0, 0.25])
        self.elapse(0.125)
        self.monitor.hint(A)  # 0.125 s after the last: too soon
        self.members["10.0.0.1"].delay = None
        self.elapse(0.25)
        self.monitor.hint(A)  # probe at 0.625 runs until 1.125
        self.assertEqual(self.members["10.0.0.1"].probes, [0.0, 0.25, 0.625])
        self.monitor.hint(A)
        self.assertEqual(len(self.members["10.0.0.1"].probes), 3)
        # A hint decides nothing by itself.
        self.assertFalse(self.state(A).silent)

    def test_followsThePool(self):
        """A member added is probed at once; one removed is no more, and forgotten."""
        D = Endpoint("10.0.0.4", 2379)
        self.members["10.0.0.4"] = FakeMember()
        self.elapse(0.5)
        self.pool.replaceEndpoints([A, B, D])
        self.assertEqual(self.prober.forgotten, [C.key])
        self.clock.advance(0)
        self.assertEqual(self.members["10.0.0.4"].probes, [0.5])  # at once
        self.elapse(1.0)
        self.assertEqual(len(self.members["10.0.0.3"].probes), 1)

    def test_stop(self):
        """Stopping cancels every timer and probe, and closes the kept connections."""
        self.members["10.0.0.1"].delay = None
        self.clock.advance(STEP)
        self.successResultOf(self.service.stopService())
        self.assertTrue(self.prober.closed)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.monitor.hint(A)  # ignored once stopped
        self.assertEqual(self.clock.getDelayedCalls(), [])


class CascadeGuardTests(ServiceCase):
    def test_twoSlowMembers(self):
        """
        Two of three members made slow at once, answering about at the
        probe timeout (some answers just in time, most just late): at most
        one of them is silent; the other is "answering slowly", still gets
        new connections, and is never announced as silent.
        """
        answers = iter([0.52, 0.49, 0.53, 0.55, 0.51] * 100)
        for host in ("10.0.0.1", "10.0.0.2"):
            self.members[host].delay = None
        original = self.prober.probe

        def slowProbe(endpoint, onConnected=None):
            member = self.members[endpoint.host]
            if endpoint.host in ("10.0.0.1", "10.0.0.2"):
                member.delay = next(answers)
            return original(endpoint, onConnected)

        self.prober.probe = slowProbe
        silentAtOnce = 0
        for _ in range(2000):
            self.clock.advance(STEP)
            states = self.pool.states()
            silentAtOnce = max(silentAtOnce, sum(s.silent for s in states))
            self.assertTrue(any(s.usable for s in states if s.endpoint != C))
        self.assertEqual(silentAtOnce, 1)
        silent = [c for c in self.changes if c.what == SILENT_CHANGE and c.new]
        slow = [c for c in self.changes if c.what == SLOW and c.new]
        self.assertTrue(silent)
        self.assertTrue(slow)
        # One of them silent now, the other answering slowly: picked still.
        states = self.pool.states()
        self.assertEqual([s.silent for s in states].count(True), 1, [s.silenceReason for s in states])
        self.assertEqual([s.slow for s in states].count(True), 1)
        picked = {self.pool.pick().endpoint for _ in range(30)}
        self.assertEqual(picked, {s.endpoint for s in states if not s.silent})

    def test_downDoesNotCount(self):
        """A member refused (down) is not subject to the share: another one may be silent."""
        self.members["10.0.0.1"].refused = True
        self.members["10.0.0.2"].delay = None
        self.elapse(3.0)
        self.assertEqual(self.state(A).state, DOWN)
        self.assertTrue(self.state(B).silent)

    def test_slowBecomesSilentWhenRoomIsMade(self):
        """
        The first to turn quiet is silent, the second answering slowly; once
        the first answers again, the second is silent.
        """
        self.members["10.0.0.1"].delay = None
        self.elapse(3.0)
        self.members["10.0.0.2"].delay = None
        self.elapse(3.0)
        self.assertEqual((self.state(A).silent, self.state(B).silent), (True, False))
        self.assertTrue(self.state(B).slow)
        self.assertTrue(self.state(B).usable)
        self.assertIn("--max-silent-share=50%", self.state(B).silenceReason)
        self.members["10.0.0.1"].delay = 0.001
        self.elapse(3.0)
        self.assertEqual((self.state(A).silent, self.state(B).silent), (False, True))
        self.assertFalse(self.state(B).slow)

    def test_allFrozenFailOpen(self):
        """
        Every member frozen: one is silent (the cap), the others answer
        slowly; new connections are never refused.
        """
        for member in self.members.values():
            member.delay = None
        self.elapse(5.0)
        self.assertEqual(sum(s.silent for s in self.pool.states()), 1)
        self.assertEqual(sum(s.slow for s in self.pool.states()), 2)
        self.assertIsNotNone(self.pool.pick())


class WholeShareTests(ServiceCase):
    """--max-silent-share=100%: every member may be silent; new connections still go (fail open)."""

    share = 100

    def test_allSilentStillPicked(self):
        """Every member silent: pick still dials them, and it is said once."""
        events = EventLoggingObserver.createWithCleanup(self, self.pool.log.observer)
        for member in self.members.values():
            member.delay = None
        self.elapse(5.0)
        self.assertTrue(all(s.silent for s in self.pool.states()))
        self.assertIsNotNone(self.pool.pick())
        said = [e for e in events if "every endpoint that accepts TCP is silent" in e["log_format"]]
        self.assertEqual(len(said), 1)
        for member in self.members.values():
            member.delay = 0.001
        self.elapse(3.0)
        self.assertFalse(any(s.silent for s in self.pool.states()))
        said = [e for e in events if "an endpoint answers again" in e["log_format"]]
        self.assertEqual(len(said), 1)


class WiringTests(SynchronousTestCase):
    def build(self, *argv):
        from etcdgw.gateway import buildGateway
        from etcdgw.tap import Options

        options = Options()
        options.parseOptions(["--listen-addr=127.0.0.1:0", *argv])
        return buildGateway(options.config, MemoryReactorClock())

    def test_defaultIsAnswer(self):
        """
        By default every member is asked for an answer: the "health" child
        is the answer service, with 1s, 500ms, 250ms, fall 2, rise 2, 50%,
        through the gateway's monitor and self-loop guard.
        """
        gateway = self.build("--endpoints=10.0.0.1:2379,https://10.0.0.2:2379")
        service = gateway.health
        self.assertIsInstance(service, AnswerService)
        self.assertIs(gateway.service.getServiceNamed("health"), service)
        self.assertEqual(
            (service.interval, service.timeout, service.fastinter), (1.0, 0.5, 0.25)
        )
        monitor = gateway.monitor
        self.assertIs(service.monitor, monitor)
        self.assertIs(service.prober.guard, gateway.guard)
        self.assertEqual((monitor.rise, monitor.fall, monitor.maxSilentShare), (2, 2, 50))
        self.assertIsNotNone(service.prober._context)  # an https member

    def test_tcpAndEtcdKeepTheirProbes(self):
        """--health-check=tcp and etcd keep the TCP probes of down members every --retry-delay."""
        from etcdgw.health import HealthService

        for check, fall in (("tcp", 2), ("etcd", 3)):
            gateway = self.build(f"--health-check={check}", "--max-silent-share=100%")
            self.assertIsInstance(gateway.health, HealthService)
            self.assertEqual(gateway.health.interval, 60.0)
            self.assertEqual((gateway.monitor.fall, gateway.monitor.maxSilentShare), (fall, 100))

    def test_flags(self):
        """The new flags: refused values name the flag in one line."""
        from twisted.python.usage import UsageError

        from etcdgw.tap import Options

        for argv, text in [
            (["--max-silent-share=101"], "--max-silent-share: "),
            (["--max-silent-share=-1%"], "--max-silent-share: "),
            (["--max-silent-share=half"], 'not a percentage from 0 to 100'),
            (["--health-fastinter=0s"], "--health-fastinter: "),
            (["--health-check=http"], '--health-check: "http" is not answer, tcp or etcd'),
        ]:
            e = self.assertRaises(UsageError, Options().parseOptions, argv)
            self.assertIn(text, str(e))
        options = Options()
        options.parseOptions(["--max-silent-share=34", "--health-fall=5"])
        self.assertEqual((options.config.health.maxSilentShare, options.config.health.fall), (34, 5))
        self.assertIn("keep its quorum", str(Options()))

    def test_startStop(self):
        """Started on a memory reactor, every member is dialled at once; stopped, nothing is left."""
        gateway = self.build("--endpoints=10.0.0.1:2379,10.0.0.2:2379")
        reactor = gateway.reactor
        gateway.health.startService()
        reactor.advance(0)
        self.assertEqual(
            sorted((host, port) for host, port, *_ in reactor.tcpClients),
            [("10.0.0.1", 2379), ("10.0.0.2", 2379)],
        )
        self.successResultOf(gateway.health.stopService())
        self.assertEqual(reactor.getDelayedCalls(), [])
