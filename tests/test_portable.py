"""
L{etcdgw.portable}: live pairs exported by one gateway and adopted by
another, here both in this process on one reactor, over real loopback
sockets (clients and members are real connections; the descriptors go
through a real C{SCM_RIGHTS} message), on the fast path (with and without
splice) and on Twisted's own transports.
"""

import hashlib
import json
import os
import random
import socket

from zope.interface import implementer

from twisted.internet import defer, protocol, reactor, task, tcp
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.trial.unittest import SkipTest, TestCase

from etcdgw import portable
from etcdgw.endpoint import Endpoint
from etcdgw.fast import gate, transport
from etcdgw.listen import GatewayTCPEndpoint
from etcdgw.pool import UpstreamPool
from etcdgw.proxy import GatewayFactory

#: A random block the streams are cut from (at random offsets and sizes).
_BLOCK = random.Random(14).randbytes(1 << 20)


def waitFor(condition, timeout=15.0, interval=0.005):
    """
    Poll C{condition} on the reactor until it is true; fail after
    C{timeout} seconds, naming it.
    """
    deadline = reactor.seconds() + timeout
    d = defer.Deferred()

    def check():
        try:
            done = condition()
        except BaseException:
            d.errback()
            return
        if done:
            d.callback(None)
        elif reactor.seconds() > deadline:
            where = f"{condition.__qualname__} (line {condition.__code__.co_firstlineno})"
            d.errback(AssertionError(f"timed out waiting for {where}"))
        else:
            reactor.callLater(interval, check)

    reactor.callLater(0, check)
    return d


def within(d, timeout=20.0):
    """
    C{d}, failed with a timeout after C{timeout} seconds.
    """
    return d.addTimeout(timeout, reactor)


def sleep(seconds):
    return task.deferLater(reactor, seconds, lambda: None)


def openDescriptors():
    return len(os.listdir("/proc/self/fd"))


def describeDescriptors():
    found = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            found[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return found


def handOver(batch):
    """
    What the takeover's wire does with an export: each record as JSON and
    its descriptors through a unix socket (C{SCM_RIGHTS}), received as new
    descriptors; the batch keeps (and closes) its own.

    @return: C{[(record, data, fds)]} for L{portable.adoptPairs}.
    """
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        received = []
        for pair in batch.pairs:
            message = json.dumps(pair.record).encode()
            socket.send_fds(a, [message], pair.fds)
            data, fds, _, _ = socket.recv_fds(b, 65536, 4)
            self_record = json.loads(data)
            received.append((self_record, pair.data, fds))
        return received
    finally:
        a.close()
        b.close()


@implementer(IHalfCloseableProtocol)
class Echo(protocol.Protocol):
    """
    A member that sends back what it reads, with backpressure (it stops
    reading while its write buffer is full, or while held); on the
    client's half-close, it half-closes too.
    """

    def connectionMade(self):
        self.paused = self.held = self.eof = False
        self.count = 0
        self.lost = defer.Deferred()
        self.transport.registerProducer(self, True)
        self.factory.connections.append(self)

    def pauseProducing(self):
        self.paused = True
        self._update()

    def resumeProducing(self):
        self.paused = False
        self._update()

    def stopProducing(self):
        pass

    def hold(self, held):
        self.held = held
        self._update()

    def _update(self):
        if self.eof or not self.transport.connected:
            return
        if self.paused or self.held:
            self.transport.stopReading()
        else:
            self.transport.startReading()

    def dataReceived(self, data):
        self.count += len(data)
        self.transport.write(data)

    def readConnectionLost(self):
        self.eof = True
        self.transport.loseWriteConnection()

    def writeConnectionLost(self):
        self.transport.loseConnection()

    def connectionLost(self, reason):
        self.reason = reason
        self.lost.callback(None)


@implementer(IHalfCloseableProtocol)
class Digest(protocol.Protocol):
    """
    A member that collects what it reads while not held; on the client's
    half-close it answers (at once, or when told to with C{answerLater})
    with C{reply} then the length and digest of what it read, and closes.
    """

    reply = b""
    held = False
    answerLater = False

    def connectionMade(self):
        self.received = []
        self.eof = False
        self.lost = defer.Deferred()
        self.factory.connections.append(self)
        if self.held:
            self.transport.stopReading()

    def hold(self, held):
        self.held = held
        if held:
            self.transport.stopReading()
        elif not self.eof:
            self.transport.startReading()

    def dataReceived(self, data):
        self.received.append(data)

    def readConnectionLost(self):
        self.eof = True
        if not self.answerLater:
            self.answer()

    def answer(self):
        data = b"".join(self.received)
        self.transport.write(self.reply)
        self.transport.write(b"%d:" % len(data) + hashlib.sha256(data).hexdigest().encode())
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass

    def connectionLost(self, reason):
        self.reason = reason
        self.lost.callback(None)


@implementer(IHalfCloseableProtocol)
class Streamer(protocol.Protocol):
    """
    A client that sends C{total} bytes in random chunk sizes (as fast as
    its transport takes them: a producer), then half-closes; it reads
    slowly (random pauses), and not at all while held. Hashes both ways.
    """

    def __init__(self, total, seed):
        self.total = total
        self.random = random.Random(seed)
        self.sent = self.received = 0
        self.sentHash = hashlib.sha256()
        self.receivedHash = hashlib.sha256()
        self.paused = self.held = self.readPaused = False
        self.eof = False
        self.lost = defer.Deferred()
        self.made = defer.Deferred()
        self._sending = None

    #: Whether it starts sending once connected (else on L{go}).
    autostart = True

    def connectionMade(self):
        self.transport.registerProducer(self, True)
        self.made.callback(self)
        if self.autostart:
            self._schedule()

    def go(self):
        self._schedule()

    # Sending

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False
        self._schedule()

    def stopProducing(self):
        pass

    def _schedule(self):
        if self._sending is None and not self.finished:
            self._sending = reactor.callLater(0, self._send)

    finished = False

    def _send(self):
        self._sending = None
        while not self.paused and self.sent < self.total:
            n = min(self.random.randint(1, 256 * 1024), self.total - self.sent)
            at = self.random.randrange(0, len(_BLOCK) - n + 1)
            chunk = _BLOCK[at : at + n]
            self.sentHash.update(chunk)
            self.sent += n
            self.transport.write(chunk)
        if self.sent >= self.total and not self.paused and not self.finished:
            self.finished = True
            self.transport.unregisterProducer()
            self.transport.loseWriteConnection()

    # Reading, slowly

    def hold(self, held):
        self.held = held
        self._updateReading()

    def _updateReading(self):
        if self.eof or not self.transport.connected:
            return
        if self.held or self.readPaused:
            self.transport.stopReading()
        else:
            self.transport.startReading()

    def _unpause(self):
        self.readPaused = False
        self._updateReading()

    def dataReceived(self, data):
        self.received += len(data)
        self.receivedHash.update(data)
        if self.random.random() < 0.05:
            self.readPaused = True
            self._updateReading()
            reactor.callLater(self.random.uniform(0.0005, 0.003), self._unpause)

    def readConnectionLost(self):
        self.eof = True
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass

    def connectionLost(self, reason):
        self.reason = reason
        self.lost.callback(None)


def queuedInGateway(sideFrom, sideTo):
    """
    Bytes the gateway holds from C{sideFrom}'s transport toward
    C{sideTo}'s: its splice pipe and Twisted's write buffer.
    """
    piped = getattr(sideFrom, "_pipeBytes", 0) if getattr(sideFrom, "_pipe", None) else 0
    buffered = len(sideTo.dataBuffer) - sideTo.offset + sideTo._tempDataLen
    return piped, buffered


class _Base(TestCase):
    #: Whether the gateway runs on the fast path's transports here.
    fast = True
    #: The member protocol.
    member = Echo

    def setUp(self):
        self.assertEqual(gate.enabled(), self.fast, "the gate's decision")
        self.memberFactory = protocol.Factory.forProtocol(self.member)
        self.memberFactory.connections = []
        self.memberPort = reactor.listenTCP(0, self.memberFactory, interface="127.0.0.1")
        self.addCleanup(self.memberPort.stopListening)
        self.endpoint = Endpoint("127.0.0.1", self.memberPort.getHost().port)
        self.old = self.gateway([self.endpoint])
        self.new = self.gateway([self.endpoint])
        self.addCleanup(self.settled)
        return self.listen(self.old)

    def gateway(self, endpoints):
        pool = UpstreamPool(endpoints, reactor)
        factory = GatewayFactory(pool, reactor, dialTimeout=5)
        return factory

    @defer.inlineCallbacks
    def listen(self, factory):
        port = yield GatewayTCPEndpoint(reactor, "127.0.0.1", 0).listen(factory)
        self.addCleanup(port.stopListening)
        factory.port = port
        yield sleep(0)  # the reactor runs (its waker is open)
        self.descriptors = openDescriptors()
        self.descriptorsSeen = describeDescriptors()

    def settled(self):
        """
        Wait until both gateways have closed every connection.
        """
        return waitFor(
            lambda: not self.old.clients
            and not self.new.clients
            and all(s.active == 0 for g in (self.old, self.new) for s in g.pool.states())
            and all(not c.transport.connected for c in self.memberFactory.connections)
        )

    def connect(self, client):
        factory = protocol.ClientFactory()
        factory.buildProtocol = lambda addr: client
        client.factory = factory
        reactor.connectTCP("127.0.0.1", self.old.port.getHost().port, factory)
        return client.made

    def pairOf(self, factory):
        [client] = factory.connections.pairs()
        return client.transport, client.peer.transport

    @defer.inlineCallbacks
    def takeOver(self, check=None):
        """
        Export every pair of the old gateway, hand them over, release them
        there and start them in the new one.
        """
        batch = portable.exportPairs(self.old)
        if check is not None:
            check(batch)
        pairs = handOver(batch)
        adopted = portable.adoptPairs(self.new, pairs)
        batch.release()
        adopted.start()
        yield sleep(0)
        return batch, adopted

    @defer.inlineCallbacks
    def assertNoDescriptorLeak(self):
        try:
            yield waitFor(lambda: openDescriptors() <= self.descriptors, timeout=5)
        except AssertionError:
            now = describeDescriptors()
            more = {fd: what for fd, what in now.items() if self.descriptorsSeen.get(fd) != what}
            self.fail(f"descriptors left open: {more}")


class TransferTests(_Base):
    """
    A transfer both ways, taken over in the middle with bytes queued in
    the old gateway each way.
    """

    size = 64 * 1024 * 1024

    @defer.inlineCallbacks
    def test_byteExactAcrossTakeover(self):
        """A transfer with a slow reader is byte-exact across a takeover mid-way."""
        client = Streamer(self.size, seed=1)
        yield self.connect(client)
        yield waitFor(lambda: client.received >= self.size // 4)
        # Stop reading: the gateway's queues fill both ways (the member's
        # echo is held back by the client's full direction).
        client.hold(True)
        ct, mt = self.pairOf(self.old)
        seen = {}

        def filled():
            toMember = queuedInGateway(ct, mt)
            toClient = queuedInGateway(mt, ct)
            seen["toMember"], seen["toClient"] = toMember, toClient
            return sum(toMember) and sum(toClient) and (client.paused or client.finished)

        # Exported in the same turn as the check that saw both ways queued.
        yield waitFor(filled)
        if self.fast and transport.SPLICE:
            self.assertTrue(seen["toMember"][0] or seen["toClient"][0], f"a pipe holds: {seen}")
        else:
            self.assertTrue(seen["toMember"][1] and seen["toClient"][1], seen)

        def check(batch):
            [pair] = batch.pairs
            self.assertEqual(pair.record["toMember"], sum(seen["toMember"]))
            self.assertEqual(pair.record["toClient"], sum(seen["toClient"]))
            self.assertEqual(len(pair.data), sum(seen["toMember"]) + sum(seen["toClient"]))

        yield self.takeOver(check)
        self.assertEqual(self.old.connections.pairs(), [])
        self.assertEqual(len(self.new.connections.pairs()), 1)
        client.hold(False)
        yield within(client.lost)
        self.assertTrue(client.eof)
        self.assertEqual(client.sent, self.size)
        self.assertEqual(client.received, self.size)
        self.assertEqual(client.receivedHash.hexdigest(), client.sentHash.hexdigest())
        self.assertEqual(len(self.memberFactory.connections), 1, "one member connection")
        yield self.settled()
        yield self.assertNoDescriptorLeak()

    @defer.inlineCallbacks
    def test_thawResumesHere(self):
        """A thawed export goes on here, byte-exact; the new gateway's copies are closed."""
        size = 16 * 1024 * 1024
        client = Streamer(size, seed=2)
        yield self.connect(client)
        yield waitFor(lambda: client.received >= size // 4)
        client.hold(True)
        ct, mt = self.pairOf(self.old)
        yield waitFor(lambda: sum(queuedInGateway(mt, ct)) and (client.paused or client.finished))
        batch = portable.exportPairs(self.old)
        self.assertEqual(len(batch.pairs), 1)
        self.assertGreater(batch.queued, 0)
        adopted = portable.adoptPairs(self.new, handOver(batch))
        adopted.abort()
        batch.thaw()
        client.hold(False)
        yield within(client.lost)
        self.assertEqual(client.received, size)
        self.assertEqual(client.receivedHash.hexdigest(), client.sentHash.hexdigest())
        self.assertEqual(self.new.clients, set())
        yield self.settled()
        yield self.assertNoDescriptorLeak()


class HalfCloseTests(_Base):
    member = Digest

    def setUp(self):
        Digest.reply = _BLOCK[:300000]
        self.addCleanup(setattr, Digest, "reply", b"")
        return super().setUp()

    def expected(self, client):
        digest = b"%d:" % client.total + client.sentHash.hexdigest().encode()
        return hashlib.sha256(Digest.reply + digest).hexdigest()

    @defer.inlineCallbacks
    def test_pendingHalfCloseStaysBehindQueuedBytes(self):
        """
        A client's half-close still queued behind its bytes in the old
        gateway reaches the member after them, once; the reply still flows.
        """
        # Small kernel buffers toward the member, which does not read: the
        # gateway reads the whole request and its end, and holds part of it.
        self.memberPort.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        Digest.held = True
        self.addCleanup(setattr, Digest, "held", False)
        client = Streamer(60000, seed=3)
        client.autostart = False
        yield self.connect(client)
        yield waitFor(lambda: len(self.old.connections) == 1)
        ct, mt = self.pairOf(self.old)
        mt.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        client.go()
        yield waitFor(lambda: mt._writeDisconnecting)
        [member] = self.memberFactory.connections
        records = []
        yield self.takeOver(lambda batch: records.extend(p.record for p in batch.pairs))
        [record] = records
        self.assertTrue(record["client"]["readDone"])
        self.assertTrue(record["member"]["writePending"], record)
        self.assertFalse(record["member"]["writeDone"])
        self.assertGreater(record["toMember"], 0)
        member.hold(False)
        yield within(client.lost)
        self.assertEqual(client.receivedHash.hexdigest(), self.expected(client))
        self.assertTrue(client.eof)
        yield self.settled()
        yield self.assertNoDescriptorLeak()

    @defer.inlineCallbacks
    def test_halfClosedStaysHalfClosed(self):
        """
        A pair whose client half-closed (the member's side shut down) is
        handed over half-closed; the member's reply flows through the new
        gateway.
        """
        Digest.answerLater = True
        self.addCleanup(setattr, Digest, "answerLater", False)
        client = Streamer(100000, seed=4)
        yield self.connect(client)
        yield waitFor(lambda: self.memberFactory.connections)
        [member] = self.memberFactory.connections
        yield waitFor(lambda: member.eof)
        ct, mt = self.pairOf(self.old)
        self.assertTrue(mt._writeDisconnected)
        records = []
        yield self.takeOver(lambda batch: records.extend(p.record for p in batch.pairs))
        [record] = records
        self.assertEqual(
            record["member"],
            {"readDone": False, "writeDone": True, "writePending": False, "closing": False},
        )
        self.assertTrue(record["client"]["readDone"])
        [client2] = self.new.connections.pairs()
        self.assertTrue(client2._readDone)
        self.assertTrue(client2.peer.transport._writeDisconnected)
        member.answer()
        yield within(client.lost)
        self.assertEqual(client.receivedHash.hexdigest(), self.expected(client))
        yield self.settled()
        yield self.assertNoDescriptorLeak()


@implementer(IHalfCloseableProtocol)
class Greeter(Digest):
    """
    A member that greets and half-closes at once, then collects what it
    reads.
    """

    def connectionMade(self):
        super().connectionMade()
        self.transport.write(b"hello")
        self.transport.loseWriteConnection()

    def readConnectionLost(self):
        self.eof = True
        self.transport.loseConnection()


class MemberHalfCloseTests(_Base):
    member = Greeter

    @defer.inlineCallbacks
    def test_memberHalfClosedStaysHalfClosed(self):
        """
        A member that half-closed first: handed over, the client still
        sends through the new gateway, and its end reaches the member.
        """
        s = socket.create_connection(("127.0.0.1", self.old.port.getHost().port))
        s.setblocking(False)
        self.addCleanup(s.close)
        got = []

        def greeted():
            try:
                chunk = s.recv(100)
            except BlockingIOError:
                return False
            got.append(chunk)
            return chunk == b""

        yield waitFor(greeted)
        self.assertEqual(b"".join(got), b"hello")
        records = []
        yield self.takeOver(lambda batch: records.extend(p.record for p in batch.pairs))
        [record] = records
        self.assertTrue(record["member"]["readDone"])
        self.assertTrue(record["client"]["writeDone"])
        self.assertFalse(record["client"]["readDone"])
        [member] = self.memberFactory.connections
        s.sendall(b"after the takeover")
        yield waitFor(lambda: b"".join(member.received) == b"after the takeover")
        s.shutdown(socket.SHUT_WR)
        yield within(member.lost)
        self.assertTrue(member.eof)
        yield self.settled()
        s.close()
        yield self.assertNoDescriptorLeak()


class OrderTests(_Base):
    """
    Bytes queued in both places of one direction at export: the splice
    pipe's go first, then Twisted's write buffer.
    """

    member = Digest

    @defer.inlineCallbacks
    def test_pipeBeforeWriteBuffer(self):
        """The successor sends what the pipe held before what Twisted queued behind it."""
        if not (self.fast and transport.SPLICE):
            raise SkipTest("no splice pipe here")
        Digest.held = True
        self.addCleanup(setattr, Digest, "held", False)
        client = Streamer(8 * 1024 * 1024, seed=8)
        yield self.connect(client)
        yield waitFor(lambda: len(self.old.connections) == 1)
        ct, mt = self.pairOf(self.old)
        yield waitFor(lambda: ct._pipeBytes and (client.paused or client.finished))
        yield sleep(0.05)
        self.assertTrue(ct._pipeBytes)
        # What a read through Python (_copyRead) queues behind the pipe.
        before = self.old.pool.states()[0].toUpstream.n
        extra = b"<queued behind the pipe>" * 100
        tcp.Connection.write(mt, extra)
        piped = ct._pipeBytes
        records = []
        yield self.takeOver(lambda batch: records.extend(p.record for p in batch.pairs))
        self.assertEqual(records[0]["toMember"], piped + len(extra))
        [member] = self.memberFactory.connections
        member.hold(False)
        yield within(client.lost)
        received = b"".join(member.received)
        self.assertEqual(received[before : before + len(extra)], extra)
        rest = received[:before] + received[before + len(extra) :]
        self.assertEqual(hashlib.sha256(rest).hexdigest(), client.sentHash.hexdigest())
        yield self.settled()
        yield self.assertNoDescriptorLeak()


class ReleaseTests(_Base):
    """
    What the peers see of an export: nothing.
    """

    @defer.inlineCallbacks
    def rawClient(self):
        s = socket.create_connection(("127.0.0.1", self.old.port.getHost().port))
        s.setblocking(False)
        self.addCleanup(s.close)
        yield waitFor(lambda: len(self.old.connections) == 1)
        return s

    def assertSilent(self, s):
        """Nothing (no byte, no FIN, no reset) is waiting on raw socket C{s}."""
        try:
            data = s.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return
        self.fail(f"the client got {data!r} (b'' is a FIN)")

    @defer.inlineCallbacks
    def roundTrip(self, s, payload):
        if payload:
            s.sendall(payload)
        got = []
        total = [0]

        def read():
            try:
                chunk = s.recv(65536)
            except BlockingIOError:
                return False
            got.append(chunk)
            total[0] += len(chunk)
            return not chunk or total[0] >= len(payload)

        yield waitFor(read)
        return b"".join(got)

    @defer.inlineCallbacks
    def test_releaseSendsNothing(self):
        """Released, the old gateway sends neither peer anything; the new one serves."""
        s = yield self.rawClient()
        self.assertEqual((yield self.roundTrip(s, b"before")), b"before")
        [member] = self.memberFactory.connections
        batch = portable.exportPairs(self.old)
        pairs = handOver(batch)
        batch.release()
        yield sleep(0.05)
        self.assertSilent(s)
        self.assertFalse(member.eof)
        self.assertFalse(member.lost.called)
        self.assertEqual(self.old.clients, set())
        self.assertEqual(len(self.old.connections), 0)
        self.assertEqual(self.old.pool.states()[0].active, 0)
        baseline = self.descriptors
        yield self.listen(self.new)
        self.descriptors = baseline + 1  # the new listener
        adopted = portable.adoptPairs(self.new, pairs, listener=self.new.port)
        self.assertEqual(adopted.start(), (1, 0))
        self.assertEqual(self.new.port.openConnections, 1)  # its cap counts it
        self.assertEqual(self.new.pool.states()[0].active, 1)
        self.assertEqual(self.new.connections.held(), {self.endpoint.key: 1})
        self.assertEqual((yield self.roundTrip(s, b"after")), b"after")
        self.assertEqual(self.memberFactory.connections, [member])
        s.shutdown(socket.SHUT_WR)
        self.assertEqual((yield self.roundTrip(s, b"")), b"")
        yield self.settled()
        self.assertEqual(self.new.port.openConnections, 0)
        s.close()
        yield self.assertNoDescriptorLeak()

    @defer.inlineCallbacks
    def test_abortSendsNothingAndThaws(self):
        """Aborted adoption closes its descriptors silently; thawed, the pair serves on."""
        s = yield self.rawClient()
        [member] = self.memberFactory.connections
        batch = portable.exportPairs(self.old)
        before = openDescriptors()
        adopted = portable.adoptPairs(self.new, handOver(batch))
        self.assertEqual(openDescriptors(), before + 2)
        adopted.abort()
        self.assertEqual(openDescriptors(), before)
        yield sleep(0.05)
        self.assertSilent(s)
        self.assertFalse(member.lost.called)
        batch.thaw()
        self.assertEqual(openDescriptors(), before - 2)
        self.assertEqual((yield self.roundTrip(s, b"still here")), b"still here")
        self.assertEqual(self.new.clients, set())
        s.shutdown(socket.SHUT_WR)
        self.assertEqual((yield self.roundTrip(s, b"")), b"")
        yield self.settled()
        s.close()
        yield self.assertNoDescriptorLeak()

    @defer.inlineCallbacks
    def test_frozenPairIsNotClosedByTheRegistry(self):
        """While frozen, a pair is out of the registry: its member going bad closes nothing."""
        otherPort = reactor.listenTCP(0, self.memberFactory, interface="127.0.0.1")
        self.addCleanup(otherPort.stopListening)
        other = Endpoint("127.0.0.1", otherPort.getHost().port)
        self.old.pool.replaceEndpoints([self.endpoint, other])
        self.old.connections.startService()
        self.addCleanup(self.old.connections.stopService)
        s = yield self.rawClient()
        [client] = self.old.connections.pairs()
        self.assertEqual(client.state.endpoint, self.endpoint)
        batch = portable.exportPairs(self.old)
        self.old.pool.markDown(self.endpoint, "under test")
        yield sleep(0.5)  # the registry closes at most a tick (0.1 s) later
        self.assertEqual(self.old.connections.closedBy["down"], 0)
        self.assertSilent(s)
        adopted = portable.adoptPairs(self.new, handOver(batch))
        batch.release()
        adopted.start()
        self.assertEqual((yield self.roundTrip(s, b"still held")), b"still held")
        s.close()

    @defer.inlineCallbacks
    def test_frozenPairIsNotServed(self):
        """Exported and not yet released or thawed, a pair forwards nothing."""
        s = yield self.rawClient()
        [member] = self.memberFactory.connections
        batch = portable.exportPairs(self.old)
        s.sendall(b"waits")
        yield sleep(0.05)
        self.assertEqual(member.count, 0)
        batch.thaw()
        yield waitFor(lambda: member.count == 5)
        self.assertEqual((yield self.roundTrip(s, b"")), b"waits")
        s.close()

    @defer.inlineCallbacks
    def stillDialling(self):
        """
        A raw client of the old gateway whose member is still being dialled
        (the only member's accept queue is full: the dial hangs).
        """
        hung = socket.socket()
        hung.bind(("127.0.0.1", 0))
        hung.listen(0)
        self.addCleanup(hung.close)
        for _ in range(3):
            f = socket.socket()
            f.setblocking(False)
            f.connect_ex(hung.getsockname())
            self.addCleanup(f.close)
        self.old.pool.replaceEndpoints([Endpoint(*hung.getsockname())])
        s = socket.create_connection(("127.0.0.1", self.old.port.getHost().port))
        s.setblocking(False)
        self.addCleanup(s.close)
        yield waitFor(lambda: any(c._dialing for c in self.old.clients))
        return s

    @defer.inlineCallbacks
    def test_stillDiallingGoesClientOnly(self):
        """A client whose member is still being dialled is handed over to dial there."""
        s = yield self.stillDialling()
        s.sendall(b"early")
        batch = portable.exportPairs(self.old)
        [pair] = batch.pairs
        self.assertTrue(pair.record["clientOnly"])
        self.assertEqual(len(pair.fds), 1)
        adopted = portable.adoptPairs(self.new, handOver(batch))
        batch.release()
        adopted.start()
        self.assertEqual(self.old.clients, set())
        yield waitFor(lambda: len(self.new.connections) == 1)
        [member] = self.memberFactory.connections
        yield waitFor(lambda: member.count == 5)
        self.assertEqual((yield self.roundTrip(s, b"")), b"early")
        s.close()

    @defer.inlineCallbacks
    def test_stillDiallingThawedDialsAgain(self):
        """A client-only pair thawed is dialled again here."""
        s = yield self.stillDialling()
        batch = portable.exportPairs(self.old)
        self.assertEqual([p.record["clientOnly"] for p in batch.pairs], [True])
        self.assertFalse(any(c._dialing for c in self.old.clients))
        self.old.pool.replaceEndpoints([self.endpoint])
        batch.thaw()
        yield waitFor(lambda: len(self.old.connections) == 1)
        self.assertEqual((yield self.roundTrip(s, b"redialled")), b"redialled")
        s.close()

    @defer.inlineCallbacks
    def test_threeTakeoversInARow(self):
        """A pair taken over three times in a row (adopted transports exported again) serves."""
        s = yield self.rawClient()
        [member] = self.memberFactory.connections
        more = [self.gateway([self.endpoint]) for _ in range(2)]
        gateways = [self.old, self.new] + more
        for i, (old, new) in enumerate(zip(gateways, gateways[1:])):
            batch = portable.exportPairs(old)
            self.assertEqual(len(batch.pairs), 1)
            adopted = portable.adoptPairs(new, handOver(batch))
            batch.release()
            self.assertEqual(adopted.start(), (1, 0))
            self.assertEqual((yield self.roundTrip(s, b"takeover %d" % i)), b"takeover %d" % i)
        self.assertEqual(self.memberFactory.connections, [member])
        s.shutdown(socket.SHUT_WR)
        self.assertEqual((yield self.roundTrip(s, b"")), b"")
        yield waitFor(lambda: not gateways[-1].clients)
        s.close()
        yield self.assertNoDescriptorLeak()


    @defer.inlineCallbacks
    def test_unixClient(self):
        """A client of a unix listener is handed over too."""
        from etcdgw.listen import GatewayUNIXEndpoint

        path = os.path.join(self.mktemp())
        os.makedirs(os.path.dirname(path), exist_ok=True)
        port = yield GatewayUNIXEndpoint(reactor, path).listen(self.old)
        self.addCleanup(port.stopListening)
        yield sleep(0)
        self.descriptors = openDescriptors()
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        s.setblocking(False)
        self.addCleanup(s.close)
        yield waitFor(lambda: len(self.old.connections) == 1)
        self.assertEqual((yield self.roundTrip(s, b"before")), b"before")
        yield self.takeOver()
        self.assertEqual(len(self.new.connections), 1)
        self.assertEqual((yield self.roundTrip(s, b"after")), b"after")
        s.shutdown(socket.SHUT_WR)
        self.assertEqual((yield self.roundTrip(s, b"")), b"")
        yield self.settled()
        s.close()
        yield self.assertNoDescriptorLeak()


class RecordTests(_Base):
    @defer.inlineCallbacks
    def test_recordIsJSON(self):
        """Records survive JSON as they are; a version not known is refused, descriptors closed."""
        client = Streamer(0, seed=5)
        client.autostart = False
        yield self.connect(client)
        yield waitFor(lambda: len(self.old.connections) == 1)
        batch = portable.exportPairs(self.old)
        [pair] = batch.pairs
        self.assertEqual(json.loads(json.dumps(pair.record)), pair.record)
        self.assertEqual(pair.record["endpoint"]["port"], self.endpoint.port)
        [(record, data, fds)] = handOver(batch)
        record["v"] = 99
        before = openDescriptors()
        self.assertRaises(
            portable.NotPortable, portable.adoptPairs, self.new, [(record, data, fds)]
        )
        self.assertEqual(openDescriptors(), before - 2)
        batch.thaw()
        client.transport.loseConnection()

    @defer.inlineCallbacks
    def test_onePairFailingToStartFailsAlone(self):
        """A pair the successor cannot start is closed; the others are adopted."""
        clients = [Streamer(0, seed=9), Streamer(0, seed=10)]
        for client in clients:
            client.autostart = False
            yield self.connect(client)
        yield waitFor(lambda: len(self.old.connections) == 2)
        batch = portable.exportPairs(self.old)
        pairs = handOver(batch)
        pairs[1][0]["endpoint"] = None  # a record it cannot read
        adopted = portable.adoptPairs(self.new, pairs)
        batch.release()
        self.assertEqual(adopted.start(), (1, 1))
        self.assertEqual(len(self.new.connections), 1)
        self.assertEqual(self.new.pool.states()[0].active, 1)
        for client in clients:
            client.transport.loseConnection()
        yield self.settled()
        yield self.assertNoDescriptorLeak()

    @defer.inlineCallbacks
    def test_oneLogLinePerStep(self):
        """Export, release and start log one line each, whatever the number of pairs."""
        from twisted.logger import globalLogPublisher
        from twisted.internet.testing import EventLoggingObserver

        clients = []
        for seed in range(5):
            client = Streamer(0, seed=20 + seed)
            client.autostart = False
            clients.append(client)
            yield self.connect(client)
        yield waitFor(lambda: len(self.old.connections) == 5)
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        yield self.takeOver()
        formats = [e.get("log_format") for e in events]
        self.assertEqual(len(formats), 3, formats)
        [started] = [e for e in events if e.get("adopted") is not None]
        self.assertEqual((started["adopted"], started["failed"]), (5, 0))
        for client in clients:
            client.transport.loseConnection()
        yield self.settled()

    @defer.inlineCallbacks
    def test_refusedWhereTwistedMoved(self):
        """With Twisted's write buffer or close not as expected, nothing is exported or frozen."""
        client = Streamer(0, seed=11)
        client.autostart = False
        yield self.connect(client)
        yield waitFor(lambda: len(self.old.connections) == 1)
        ct, mt = self.pairOf(self.old)
        self.patch(portable, "_writeBufferProblem", lambda: "bytes given to write() are elsewhere")
        self.assertRaises(portable.NotPortable, portable.exportPairs, self.old)

        class Closer:
            pass  # no _shouldShutdown

        class FakeTCP:
            _SocketCloser = Closer

        self.patch(portable, "_writeBufferProblem", lambda: None)
        self.patch(portable, "tcp", FakeTCP)
        self.assertRaises(portable.NotPortable, portable.exportPairs, self.old)
        self.assertIn(ct, reactor.getReaders())
        self.assertEqual(len(self.old.connections), 1)
        client.transport.loseConnection()

    @defer.inlineCallbacks
    def test_originatedTLSIsSkipped(self):
        """A pair whose member side is TLS originated here stays here, untouched."""
        client = Streamer(0, seed=6)
        client.autostart = False
        yield self.connect(client)
        yield waitFor(lambda: len(self.old.connections) == 1)
        ct, mt = self.pairOf(self.old)
        mt.portable = False  # as etcdgw.originate's member transports say
        batch = portable.exportPairs(self.old)
        self.assertEqual(batch.pairs, [])
        self.assertEqual(len(batch.skipped), 1)
        self.assertIn("TLS", batch.skipped[0]["why"])
        self.assertEqual(len(self.old.connections), 1)
        batch.release()
        self.assertTrue(ct.connected and mt.connected)
        client.transport.loseConnection()

    @defer.inlineCallbacks
    def test_removedMemberIsHeld(self):
        """A pair whose member left the new gateway's pool is held as a removed member's."""
        other = Endpoint("127.0.0.1", 1)
        self.new.pool.replaceEndpoints([other])
        client = Streamer(0, seed=7)
        client.autostart = False
        yield self.connect(client)
        yield waitFor(lambda: len(self.old.connections) == 1)
        yield self.takeOver()
        self.assertEqual(self.new.connections.held(), {self.endpoint.key: 1})
        self.assertEqual(self.new.pool.heldState(self.endpoint).active, 1)
        client.transport.loseConnection()


class CopyOnlyTransferTests(TransferTests):
    """Without splice: the bytes queued are in Twisted's write buffers."""

    def setUp(self):
        self.patch(transport, "SPLICE", False)
        return super().setUp()


class _Stock:
    fast = False

    def setUp(self):
        self.patch(gate, "_decision", gate.Verdict("under test", ("the stock path under test",)))
        return super().setUp()


class StockTransferTests(_Stock, TransferTests):
    """On Twisted's own transports."""

    size = 32 * 1024 * 1024


class StockHalfCloseTests(_Stock, HalfCloseTests):
    """On Twisted's own transports."""


class StockReleaseTests(_Stock, ReleaseTests):
    """On Twisted's own transports."""


class LeanDispatchTransferTests(TransferTests):
    """With the gateway's lean dispatch on epoll (its C batch step where built)."""

    ring = False

    def setUp(self):
        from etcdgw.fast import dispatch, ring
        from tests.test_proxy_loopback import _twistedDispatch

        if not dispatch.leanDispatch(reactor, useRing=self.ring):
            raise SkipTest("not the epoll reactor")
        self.addCleanup(_twistedDispatch)
        if self.ring and ring.open(reactor) is None:
            # (Opened before the descriptors are counted: the ring's own
            # descriptor is no leak.)
            if os.environ.get("CI"):
                self.fail(f"io_uring is not usable under CI: {ring.unavailable}")
            raise SkipTest(f"io_uring is not usable here: {ring.unavailable}")
        return super().setUp()


class RingTransferTests(LeanDispatchTransferTests):
    """
    As the gateway runs by default: joined pairs in io_uring, taken out
    (with what they had in flight) before they are exported.
    """

    ring = True


class StockOrderTests(_Stock, OrderTests):
    """On Twisted's own transports (no pipe: skipped)."""


class StockMemberHalfCloseTests(_Stock, MemberHalfCloseTests):
    """On Twisted's own transports."""
