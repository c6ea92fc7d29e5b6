"""
The proxy over real loopback sockets, in this process: what only the kernel
shows (backpressure, half-close, resets, TCP_NODELAY, no descriptor left open),
on the fast path (C and Python forwarding steps, with and without splice)
and on Twisted's own transports (what the gate falls back to).
"""

import errno
import hashlib
import os
import select
import socket
import stat
import struct

from zope.interface import implementer

from twisted.internet import defer, error, protocol, reactor, task
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.trial.unittest import SkipTest, TestCase

from etcdgw.endpoint import Endpoint
from etcdgw.fast import gate, relay, ring, transport
from etcdgw.listen import GatewayTCPEndpoint
from etcdgw.pool import UpstreamPool
from etcdgw.proxy import ClientProtocol, GatewayFactory


def waitFor(condition, timeout=10.0, interval=0.01):
    """
    Poll C{condition} on the reactor until it is true (bounded by C{timeout}).
    """

    def check():
        if condition():
            return None
        return task.deferLater(reactor, interval, check)

    d = task.deferLater(reactor, 0, check)
    d.addTimeout(timeout, reactor)
    return d


@implementer(IHalfCloseableProtocol)
class Collect(protocol.Protocol):
    """
    Collects what it reads; on the peer's half-close, replies with the digest
    of everything it read and closes.
    """

    def connectionMade(self):
        self.received = []
        self.readClosed = False
        self.lost = defer.Deferred()
        self.factory.connections.append(self)

    def dataReceived(self, data):
        self.received.append(data)

    def readConnectionLost(self):
        self.readClosed = True
        data = b"".join(self.received)
        self.transport.write(b"%d:" % len(data) + hashlib.sha256(data).hexdigest().encode())
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass

    def connectionLost(self, reason):
        self.reason = reason
        self.lost.callback(None)


class Client(Collect):
    def readConnectionLost(self):
        self.eof = True
        self.transport.loseConnection()


class LoopbackTests(TestCase):
    #: Whether the gateway runs on the fast path's transports here.
    fast = True

    def setUp(self):
        self.assertEqual(gate.enabled(), self.fast, "the gate's decision")
        self.upstreamFactory = protocol.Factory.forProtocol(Collect)
        self.upstreamFactory.connections = []
        self.upstreamPort = reactor.listenTCP(0, self.upstreamFactory, interface="127.0.0.1")
        self.addCleanup(self.upstreamPort.stopListening)
        endpoint = Endpoint("127.0.0.1", self.upstreamPort.getHost().port)
        self.pool = UpstreamPool([endpoint], reactor)
        self.gateway = GatewayFactory(self.pool, reactor, dialTimeout=5)
        d = GatewayTCPEndpoint(reactor, "127.0.0.1", 0).listen(self.gateway)
        d.addCallback(self._listening)
        return d

    def _listening(self, port):
        self.gatewayPort = port
        self.addCleanup(port.stopListening)
        self.addCleanup(self.settled)

    def settled(self):
        """
        Wait until the gateway has closed both sides of every connection.
        """
        return waitFor(
            lambda: not self.gateway.clients
            and all(s.active == 0 for s in self.pool.states())
            and all(not c.transport.connected for c in self.upstreamFactory.connections)
        )

    def connect(self):
        factory = protocol.ClientFactory.forProtocol(Client)
        factory.connections = []
        connected = defer.Deferred()
        factory.buildProtocol = lambda addr, f=factory: _build(f, connected)
        reactor.connectTCP("127.0.0.1", self.gatewayPort.getHost().port, factory)
        return connected

    @defer.inlineCallbacks
    def upstream(self):
        yield waitFor(lambda: self.upstreamFactory.connections)
        return self.upstreamFactory.connections[-1]

    @defer.inlineCallbacks
    def test_halfCloseGetsWholeReply(self):
        """A client that shuts down its write side still gets the whole reply."""
        client = yield self.connect()
        payload = os.urandom(3 * 1024 * 1024 + 17)
        client.transport.write(payload)
        client.transport.loseWriteConnection()
        yield client.lost
        expected = b"%d:" % len(payload) + hashlib.sha256(payload).hexdigest().encode()
        self.assertEqual(b"".join(client.received), expected)
        self.assertTrue(client.eof)

    @defer.inlineCallbacks
    def test_joinedTransportsForwardAndCount(self):
        """
        Once the member is dialled, the two transports are joined (data goes
        socket to socket without the protocols), bytes are counted both ways,
        and the join ends with the connection.
        """
        client = yield self.connect()
        client.transport.write(b"x" * 100)
        upstream = yield self.upstream()
        yield waitFor(lambda: sum(map(len, upstream.received)) == 100)
        (gatewayClient,) = self.gateway.clients
        clientSide, memberSide = gatewayClient.transport, gatewayClient.peer.transport
        if self.fast:
            self.assertIs(clientSide._target, memberSide)
            self.assertIs(memberSide._target, clientSide)
        else:  # Twisted's own transports: the protocols forward
            for side in (clientSide, memberSide):
                self.assertNotIsInstance(side, transport.FastTransport)
        (state,) = self.pool.states()
        self.assertEqual(state.bytesToUpstream, 100)
        client.transport.loseWriteConnection()
        yield client.lost
        self.assertEqual(b"".join(client.received)[:4], b"100:")
        self.assertEqual(state.bytesFromUpstream, len(b"".join(client.received)))
        yield self.settled()
        if self.fast:
            self.assertEqual((clientSide._target, memberSide._target), (None, None))

    @defer.inlineCallbacks
    def test_bulk(self):
        """
        A bulk transfer arrives exactly and is counted; where splice is on,
        most of it moves through a pipe by splice, and where it is off, no
        pipe is made and nothing is spliced.
        """
        client = yield self.connect()
        payload = os.urandom(16 * 1024 * 1024)
        client.transport.write(payload)
        upstream = yield self.upstream()
        yield waitFor(lambda: sum(map(len, upstream.received)) >= 4 * 1024 * 1024)
        (gatewayClient,) = self.gateway.clients
        if self.fast and transport.SPLICE:
            yield waitFor(lambda: gatewayClient.transport._pipe is not None)
        elif self.fast:
            self.assertIsNone(gatewayClient.transport._pipe)
        client.transport.loseWriteConnection()
        yield client.lost
        expected = b"%d:" % len(payload) + hashlib.sha256(payload).hexdigest().encode()
        self.assertEqual(b"".join(client.received), expected)
        state = self.pool.states()[0]
        self.assertEqual(state.bytesToUpstream, len(payload))
        self.assertEqual(state.bytesFromUpstream, len(expected))
        if not self.fast:
            return
        spliced = gatewayClient.transport._spliced
        if transport.SPLICE:
            self.assertGreater(spliced, len(payload) // 2)
        else:
            self.assertEqual(spliced, 0)

    @defer.inlineCallbacks
    def test_idlePipesReleased(self):
        """
        After 1 MiB each way, an idle connection gives its splice pipes back
        (the process holds as many descriptors as before the transfer), and
        a later bulk transfer still arrives exactly.
        """
        self.patch(transport, "PIPE_IDLE", 0.05)
        client = yield self.connect()
        upstream = yield self.upstream()
        client.transport.write(b"x")
        yield waitFor(lambda: upstream.received)
        (gatewayClient,) = self.gateway.clients
        sides = (gatewayClient.transport, gatewayClient.peer.transport)
        fdsOpen = len(os.listdir("/proc/self/fd"))
        up, down = os.urandom(1024 * 1024), os.urandom(1024 * 1024)
        client.transport.write(up)
        upstream.transport.write(down)
        yield waitFor(lambda: sum(map(len, upstream.received)) == 1 + len(up))
        yield waitFor(lambda: sum(map(len, client.received)) == len(down))
        try:
            yield waitFor(lambda: len(os.listdir("/proc/self/fd")) == fdsOpen, timeout=3)
        except defer.TimeoutError:
            pass
        self.assertEqual(len(os.listdir("/proc/self/fd")), fdsOpen, _fds())
        if self.fast:
            self.assertEqual([side._pipe for side in sides], [None, None])
        if self.fast and transport.SPLICE:  # pipes were made, and given back
            self.assertTrue(all(side._spliced for side in sides), [s._spliced for s in sides])
        self.assertEqual(b"".join(upstream.received), b"x" + up)
        self.assertEqual(b"".join(client.received), down)
        # Bulk again: splicing starts again where it is on.
        again = os.urandom(4 * 1024 * 1024)
        client.transport.write(again)
        client.transport.loseWriteConnection()
        yield client.lost
        payload = b"x" + up + again
        expected = b"%d:" % len(payload) + hashlib.sha256(payload).hexdigest().encode()
        self.assertEqual(b"".join(client.received), down + expected)

    def splicePatched(self, fails):
        """
        Make splice(2) raise C{OSError(errno)} where C{fails(src)} returns
        an errno for its source descriptor.

        @return: whether this class splices; where it does not (copy-only,
            Twisted's own transports), splice(2) is made to fail the test if
            it is called at all, and the caller checks the copy instead.
        """
        if not (self.fast and transport.SPLICE):
            self.patch(os, "splice", _spliceCalled)
            return False
        real = os.splice

        def splice(src, dst, count, flags=0):
            code = fails(src)
            if code:
                raise OSError(code, os.strerror(code))
            return real(src, dst, count, flags=flags)

        self.patch(os, "splice", splice)
        return True

    @defer.inlineCallbacks
    def copiedWithoutSplice(self):
        """
        Where splice is off: a bulk transfer is copied, byte for byte, and
        never calls splice(2).
        """
        client, side, expected = yield self.bulkThrough()
        self.assertEqual(b"".join(client.received), expected)
        self.assertEqual(getattr(side, "_spliced", 0), 0)

    @defer.inlineCallbacks
    def bulkThrough(self, size=8 * 1024 * 1024):
        """
        Send C{size} bytes through the gateway and half-close.

        @return: the client, its gateway side, and the reply expected.
        """
        client = yield self.connect()
        yield self.upstream()
        (gatewayClient,) = self.gateway.clients
        payload = os.urandom(size)
        client.transport.write(payload)
        client.transport.loseWriteConnection()
        yield client.lost.addTimeout(30, reactor)
        expected = b"%d:" % len(payload) + hashlib.sha256(payload).hexdigest().encode()
        return client, gatewayClient.transport, expected

    @defer.inlineCallbacks
    def test_socketThatCannotSpliceIsCopied(self):
        """
        A socket that cannot splice into the pipe (EINVAL) is copied from
        instead: the connection is not closed, every byte arrives in order.
        """
        if not self.splicePatched(lambda src: _isSocket(src) and errno.EINVAL):
            yield self.copiedWithoutSplice()
            return
        client, side, expected = yield self.bulkThrough()
        self.assertEqual(b"".join(client.received), expected)
        self.assertEqual((side._spliced, side._spliceOff), (0, True))

    @defer.inlineCallbacks
    def test_targetThatCannotSpliceGetsThePipeCopied(self):
        """
        A target that cannot be spliced to (EINVAL from the pipe): what the
        pipe holds is copied to it, ahead of what is queued, and the
        direction copies from then on: every byte arrives in order.
        """
        if not self.splicePatched(lambda src: _isPipe(src) and errno.EINVAL):
            yield self.copiedWithoutSplice()
            return
        client, side, expected = yield self.bulkThrough()
        self.assertEqual(b"".join(client.received), expected)
        self.assertGreater(side._spliced, 0)
        self.assertTrue(side._spliceOff)

    @defer.inlineCallbacks
    def test_socketErrorWhileSplicingCloses(self):
        """A real socket error while splicing (a reset) still closes the connection."""
        if not self.splicePatched(lambda src: _isSocket(src) and errno.ECONNRESET):
            yield self.copiedWithoutSplice()
            return
        client, side, expected = yield self.bulkThrough()
        self.assertEqual(b"".join(client.received), b"")
        self.assertFalse(side.connected)

    @defer.inlineCallbacks
    def test_noDelayBothSockets(self):
        """TCP_NODELAY is set on the client's and the member's connection."""
        client = yield self.connect()
        yield self.upstream()
        (gatewayClient,) = self.gateway.clients
        for transport in (gatewayClient.transport, gatewayClient.peer.transport):
            self.assertEqual(
                transport.getHandle().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 1
            )
        client.transport.loseConnection()
        yield client.lost

    @defer.inlineCallbacks
    def test_backpressure(self):
        """A client that does not read makes the gateway stop reading the member."""
        client = yield self.connect()
        client.transport.pauseProducing()
        upstream = yield self.upstream()
        total = 64 * 1024 * 1024
        chunk = os.urandom(1024 * 1024)
        for _ in range(total // len(chunk)):
            upstream.transport.write(chunk)
        (gatewayClient,) = self.gateway.clients
        gatewayUpstream = gatewayClient.peer.transport
        # the gateway's upstream reader pauses once its client-side buffer fills
        yield waitFor(lambda: gatewayUpstream not in reactor.getReaders())
        yield task.deferLater(reactor, 0.2, lambda: None)
        buffered = _queued(gatewayClient.transport) + _queued(gatewayUpstream)
        self.assertLess(buffered, 1024 * 1024)
        self.assertGreater(_queued(upstream.transport), total // 2)  # the member waits
        client.transport.resumeProducing()
        yield waitFor(lambda: sum(map(len, client.received)) >= total, timeout=60)
        self.assertEqual(b"".join(client.received), chunk * (total // len(chunk)))
        client.transport.loseConnection()
        yield client.lost

    @defer.inlineCallbacks
    def test_clientCloseClosesMember(self):
        """When the client closes, the member's connection is closed too."""
        client = yield self.connect()
        upstream = yield self.upstream()
        client.transport.loseConnection()
        yield upstream.lost
        yield client.lost
        yield self.settled()
        self.assertEqual(self.pool.stateOf(self.pool.endpoints[0]).connections, 1)

    @defer.inlineCallbacks
    def test_memberResetClosesClient(self):
        """A member that resets mid-stream gets the client's connection closed."""
        client = yield self.connect()
        upstream = yield self.upstream()
        upstream.transport.write(b"partial")
        yield waitFor(lambda: client.received)
        upstream.transport.abortConnection()
        yield client.lost
        self.assertEqual(b"".join(client.received), b"partial")
        yield waitFor(lambda: not self.gateway.clients)

    @defer.inlineCallbacks
    def joinedToRawClient(self):
        """
        A client that is a plain socket (so that the test decides when the
        kernel sends what), joined to a member.

        Half-closes the gateway's client protocols hear are recorded in
        C{self.halfClosed}.

        @return: the client socket, the gateway's two transports (client
            side, member side) and the member's protocol.
        """
        self.halfClosed = []
        heard = ClientProtocol.readConnectionLost

        def readConnectionLost(protocol):
            self.halfClosed.append(protocol)
            return heard(protocol)

        self.patch(ClientProtocol, "readConnectionLost", readConnectionLost)
        sock = socket.create_connection(("127.0.0.1", self.gatewayPort.getHost().port))
        self.addCleanup(sock.close)
        sock.setblocking(False)
        upstream = yield self.upstream()
        yield waitFor(lambda: self.pool.states()[0].active == 1)
        (gatewayClient,) = self.gateway.clients
        return sock, gatewayClient.transport, gatewayClient.peer.transport, upstream

    @defer.inlineCallbacks
    def assertResetReachedMember(self, upstream):
        """
        The member's connection ends with a reset (a lost connection), never
        with a clean end of stream (a half-close) first; the gateway never
        took the client's reset for a half-close.
        """
        yield upstream.lost.addTimeout(10, reactor)
        self.assertEqual(self.halfClosed, [], "the gateway took the reset for a half-close")
        self.assertFalse(upstream.readClosed, "the member got a FIN, not a reset")
        self.assertTrue(upstream.reason.check(error.ConnectionLost), upstream.reason)

    @defer.inlineCallbacks
    def test_clientResetWhileSending(self):
        """
        A client that resets while the member's reply is on its way to it
        (the gateway's send to the client meets the reset first) is seen by
        the member as a reset, not as a clean end of stream.
        """
        sock, clientSide, memberSide, upstream = yield self.joinedToRawClient()
        # One turn of the reactor: the member's reply arrives at the
        # gateway first, then the client's reset; the gateway forwards the
        # reply (its send meets the reset) before it reads the client.
        upstream.transport.getHandle().send(b"reply")
        _reset(sock)
        yield self.assertResetReachedMember(upstream)

    @defer.inlineCallbacks
    def test_writeToResetClient(self):
        """
        A write to a client whose reset has arrived (the send meets the
        reset) loses that connection at once: the member sees a reset.
        """
        sock, clientSide, memberSide, upstream = yield self.joinedToRawClient()
        _reset(sock)
        _waitForError(clientSide.getHandle())
        clientSide.write(b"late")
        yield self.assertResetReachedMember(upstream)

    @defer.inlineCallbacks
    def test_spliceToResetClient(self):
        """
        Bulk data spliced toward a client whose reset has arrived (the
        pipe's splice to it meets the reset) loses that connection at once:
        the member sees a reset.
        """
        if not (self.fast and transport.SPLICE):
            # Without splice the same reset meets a copy: test_writeToResetClient.
            self.patch(os, "splice", _spliceCalled)
            yield self.test_writeToResetClient()
            return
        sock, clientSide, memberSide, upstream = yield self.joinedToRawClient()
        upstream.transport.write(os.urandom(16 * 1024 * 1024))  # the client reads nothing
        yield waitFor(lambda: memberSide._pipeBytes > 0 and memberSide not in reactor.getReaders())
        _reset(sock)
        _waitForError(clientSide.getHandle())
        memberSide.doRead()  # as the reactor would: the member's socket is readable
        yield self.assertResetReachedMember(upstream)

    @defer.inlineCallbacks
    def test_noDescriptorLeak(self):
        """After many connections open and close, no descriptor is left open."""
        fdsBefore = None
        for i in range(51):
            client = yield self.connect()
            client.transport.write(b"x")
            client.transport.loseWriteConnection()
            yield client.lost
            if i == 0:  # the first connection warms up what the process opens once
                yield self.settled()
                fdsBefore = len(os.listdir("/proc/self/fd"))
        yield waitFor(lambda: not self.gateway.clients)
        yield self.settled()
        self.assertEqual(len(os.listdir("/proc/self/fd")), fdsBefore, _fds())
        self.assertEqual(self.gateway.accepted, 51)


def _reset(sock):
    """
    Close C{sock} with a reset (SO_LINGER 0).
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _waitForError(sock):
    """
    Wait (blocking the reactor: nothing reads C{sock} meanwhile) until the
    kernel reports an error or hang-up on C{sock}; poll(2) does not consume
    the error.
    """
    poller = select.poll()
    poller.register(sock, select.POLLERR | select.POLLHUP)
    if not poller.poll(5000):
        raise AssertionError("no reset arrived")


def _isSocket(fd):
    return stat.S_ISSOCK(os.fstat(fd).st_mode)


def _isPipe(fd):
    return stat.S_ISFIFO(os.fstat(fd).st_mode)


def _queued(transport):
    if not hasattr(transport, "dataBuffer"):
        return 0
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


def _build(factory, connected):
    p = Client()
    p.factory = factory
    p.eof = False
    original = p.connectionMade

    def made():
        original()
        connected.callback(p)

    p.connectionMade = made
    return p


def _fds():
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append((fd, os.readlink(f"/proc/self/fd/{fd}")))
        except OSError:
            pass
    return out


def _spliceCalled(*args, **kwargs):
    raise AssertionError("splice(2) called where splice is off")


class PythonRelayLoopbackTests(LoopbackTests):
    """
    The same, with the pure-Python forwarding step that the gateway uses
    where the C one (_etcdgw_relay) was not built.
    """

    def setUp(self):
        self.patch(transport, "_relay", relay._relayPython)
        return super().setUp()


class CopyOnlyLoopbackTests(LoopbackTests):
    """
    The same without splice(2): bulk data is copied, so a client that reads
    slower than its member writes exercises partial sends and the queue
    behind them (with splice, those transfers take the pipe).
    """

    def setUp(self):
        self.patch(transport, "SPLICE", False)
        return super().setUp()


class PythonRelayCopyOnlyLoopbackTests(CopyOnlyLoopbackTests):
    """
    Without splice, with the pure-Python forwarding step.
    """

    def setUp(self):
        self.patch(transport, "_relay", relay._relayPython)
        return super().setUp()


class StockLoopbackTests(LoopbackTests):
    """
    The same on Twisted's own transports and dispatch: what the gateway runs
    on when the gate (L{etcdgw.fast.gate}) refuses the fast path.
    """

    fast = False

    def setUp(self):
        self.patch(gate, "_decision", gate.Verdict("under test", ("the stock path under test",)))
        return super().setUp()


class LeanDispatchLoopbackTests(LoopbackTests):
    """
    The same with the gateway's lean dispatch on the reactor (as the
    gateway runs with C{--forward=epoll}, or where the kernel refuses
    io_uring): where the C step is built, the ready joined transports of
    each epoll batch are served by its batch step (C{serve}, issue 16).
    """

    #: Whether joined pairs may go through io_uring (etcdgw.fast.ring).
    ring = False

    def setUp(self):
        from etcdgw.fast import dispatch

        if not dispatch.leanDispatch(reactor, useRing=self.ring):
            raise SkipTest("not the epoll reactor")
        self.addCleanup(_twistedDispatch)
        self.served = 0
        serve = dispatch._serve
        if serve is not None:

            def counted(events, *args):
                rest, answers = serve(events, *args)
                self.served += len(events) - len(rest) - len(answers)
                return rest, answers

            self.patch(dispatch, "_serve", counted)
        return super().setUp()

    @defer.inlineCallbacks
    def test_servedInOneCall(self):
        """Where the C step is built, requests and answers are served by the batch step."""
        if not relay.RELAY_IN_C:
            raise SkipTest("the C step was not built")
        client = yield self.connect()
        upstream = yield self.upstream()
        for i in range(20):
            client.transport.write(b"request %d;" % i)
            yield waitFor(lambda: b"".join(upstream.received).endswith(b"request %d;" % i))
        client.transport.loseWriteConnection()
        yield client.lost
        self.assertGreater(self.served, 10)


def _twistedDispatch():
    """
    Give the reactor Twisted's own dispatch back (leanDispatch sets its
    own on the instance), without the io_uring ring.
    """
    ring.close(reactor)
    for name in ("doPoll", "doIteration"):
        reactor.__dict__.pop(name, None)


class LeanDispatchCopyOnlyLoopbackTests(LeanDispatchLoopbackTests):
    """
    The lean dispatch's batch step without splice: partial sends (answers
    it leaves to Python) and the queue behind them.
    """

    def setUp(self):
        self.patch(transport, "SPLICE", False)
        return super().setUp()


class RingLoopbackTests(LeanDispatchLoopbackTests):
    """
    The same as the gateway runs by default: joined pairs that are quiet
    forwarded through io_uring (L{etcdgw.fast.ring}), everything else on
    the lean dispatch.
    """

    ring = True

    def setUp(self):
        why = ring.available()
        if why is None and ring.open(reactor) is None:
            why = ring.unavailable
        if why is not None:
            if os.environ.get("CI"):
                self.fail(f"io_uring is not usable under CI: {why}")
            raise SkipTest(f"io_uring is not usable here: {why}")
        self.entered = []
        enter = ring.enter

        def counted(a, b):
            went = enter(a, b)
            self.entered.append(went)
            return went

        self.patch(ring, "enter", counted)
        return super().setUp()

    @defer.inlineCallbacks
    def test_servedInOneCall(self):
        """
        Requests and answers go through the ring: the pair went in when it
        was joined, and the gateway's reactor saw none of its bytes.
        """
        client = yield self.connect()
        upstream = yield self.upstream()
        for i in range(20):
            client.transport.write(b"request %d;" % i)
            yield waitFor(lambda: b"".join(upstream.received).endswith(b"request %d;" % i))
            upstream.transport.write(b"answer %d;" % i)
            yield waitFor(lambda: b"".join(client.received).endswith(b"answer %d;" % i))
        self.assertEqual(self.entered[:1], [True])
        self.assertEqual(ring.ringOf(reactor).engine.active(), 1)
        self.assertEqual(self.served, 0)  # the epoll batch step never saw them
        (gatewayClient,) = self.gateway.clients
        self.assertEqual(gatewayClient.state.toUpstream.n, len(b"".join(upstream.received)))
        self.assertEqual(gatewayClient.state.fromUpstream.n, len(b"".join(client.received)))
        client.transport.loseWriteConnection()
        yield client.lost
        self.assertEqual(ring.ringOf(reactor).engine.active(), 0)


class RingCopyOnlyLoopbackTests(RingLoopbackTests):
    """
    Through io_uring without splice: bulk reads leave the ring and come back
    once the copy path's queue drained.
    """

    def setUp(self):
        self.patch(transport, "SPLICE", False)
        return super().setUp()
