import select
import socket

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from etcdgw.fast.dispatch import leanDispatch


class Reader:
    """
    A reactor reader of socket C{sock}: what each read brings goes to
    C{seen}.
    """

    def __init__(self, sock, seen):
        self.sock, self.seen = sock, seen

    def fileno(self):
        return self.sock.fileno()

    def doRead(self):
        self.seen.append(self.sock.recv(10))

    def logPrefix(self):
        return "reader"

    def connectionLost(self, reason):
        pass


class LeanDispatchTests(SynchronousTestCase):
    # The dispatch on epoll; through io_uring: tests/integration/test_ring.py.

    def test_otherReactorsUntouched(self):
        """Reactors other than epoll are left as they are."""
        reactor = MemoryReactorClock()
        self.assertFalse(leanDispatch(reactor))

    def test_dispatches(self):
        """A changed epoll reactor still delivers reads to their descriptors."""
        reactor = EPollReactor()
        self.addCleanup(reactor._poller.close)
        self.assertTrue(leanDispatch(reactor, useRing=False))
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        seen = []
        reader = Reader(a, seen)
        reactor.addReader(reader)
        b.send(b"ping")
        reactor.doIteration(0)
        reactor.removeReader(reader)
        self.assertEqual(seen, [b"ping"])
        reactor.doIteration(0)  # nothing ready, nothing raised

    def test_handlerErrorClosesConnection(self):
        """A doRead that raises is logged and its descriptor disconnected, as Twisted does."""
        reactor = EPollReactor()
        self.addCleanup(reactor._poller.close)
        leanDispatch(reactor, useRing=False)
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        lost = []

        class Broken:
            def fileno(self):
                return a.fileno()

            def doRead(self):
                raise ZeroDivisionError()

            def logPrefix(self):
                return "broken"

            def connectionLost(self, reason):
                lost.append(reason)

        broken = Broken()
        reactor.addReader(broken)
        b.send(b"x")
        reactor.doIteration(0)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(len(lost), 1)
        self.assertTrue(lost[0].check(ZeroDivisionError))
        self.assertNotIn(broken, reactor.getReaders())

    def test_listeningPortErrorKeepsListening(self):
        """
        A listening port whose doRead raises is logged and keeps listening:
        the dispatcher never closes the port every later client needs.
        """
        from zope.interface import implementer

        from twisted.internet.interfaces import IListeningPort

        reactor = EPollReactor()
        self.addCleanup(reactor._poller.close)
        leanDispatch(reactor, useRing=False)
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        lost = []
        reads = []

        @implementer(IListeningPort)
        class BrokenPort:
            def fileno(self):
                return a.fileno()

            def doRead(self):
                reads.append(1)
                raise ZeroDivisionError()

            def logPrefix(self):
                return "port"

            def connectionLost(self, reason):
                lost.append(reason)

            def readConnectionLost(self, reason):
                lost.append(reason)

        port = BrokenPort()
        reactor.addReader(port)
        self.addCleanup(reactor.removeReader, port)
        b.send(b"x")
        reactor.doIteration(0)
        reactor.doIteration(0)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 2)
        self.assertEqual((len(reads), lost), (2, []))
        self.assertIn(port, reactor.getReaders())

    def test_boundedBatch(self):
        """At most MAX_EVENTS events are asked of epoll per turn, however many descriptors."""
        from etcdgw.fast.dispatch import MAX_EVENTS

        reactor = EPollReactor()
        self.addCleanup(reactor._poller.close)
        leanDispatch(reactor, useRing=False)
        asked = []

        class Poller:
            def poll(self, timeout, maxevents):
                asked.append(maxevents)
                return []

        real, reactor._poller = reactor._poller, Poller()
        self.addCleanup(setattr, reactor, "_poller", real)
        reactor._selectables = dict.fromkeys(range(20000))
        reactor.doIteration(0)
        reactor._selectables = {}
        reactor.doIteration(0)
        self.assertEqual(asked, [MAX_EVENTS, 1])


class BatchResetTests(SynchronousTestCase):
    def test_resetConsumedBySendStaysAReset(self):
        """
        A client's reset that lands after epoll reported the client readable
        and the member readable, in that batch, and that the batch step's
        send of the member's data to the client then consumes, reaches the
        member as a reset, never as a half-close: the client's read later in
        the same batch, which sees a clean end of stream once the reset is
        consumed, is not believed (the send has aborted the client).
        """
        import struct

        from zope.interface import implementer

        from twisted.internet.interfaces import IHalfCloseableProtocol
        from twisted.internet.protocol import Protocol

        from etcdgw import fast
        from etcdgw.fast import relay as relayModule
        from etcdgw.fast.transport import GatewayServer
        from etcdgw.pool import ByteCount

        if relayModule.serve is None:
            self.fail("the C batch step (_etcdgw_relay.serve) was not built")
        reactor = EPollReactor()
        self.addCleanup(reactor._poller.close)
        self.assertTrue(leanDispatch(reactor, useRing=False))

        def tcpPair():
            server = socket.socket()
            server.bind(("127.0.0.1", 0))
            server.listen(1)
            a = socket.create_connection(server.getsockname())
            b, _ = server.accept()
            server.close()
            b.setblocking(False)
            return a, b

        clientPeer, clientSide = tcpPair()
        memberSide, memberPeer = tcpPair()
        memberSide, memberPeer = memberPeer, memberSide
        events = []

        @implementer(IHalfCloseableProtocol)
        class Side(Protocol):
            """Passes closes on as etcdgw.proxy does."""

            def __init__(self, name):
                self.name = name
                self.peer = None

            def readConnectionLost(self):
                events.append((self.name, "half-close"))
                self.peer.transport.loseWriteConnection()

            def writeConnectionLost(self):
                pass

            def connectionLost(self, reason):
                events.append((self.name, type(reason.value).__name__))
                if self.peer.transport.connected:
                    self.peer.transport.abortConnection()

        class Port:
            _realPortNumber = 0

        transports = []
        for sock, name in ((clientSide, "client"), (memberSide, "member")):
            protocol = Side(name)
            transport = GatewayServer(sock, protocol, ("127.0.0.1", 1), Port(), 1, reactor)
            protocol.makeConnection(transport)
            transports.append(transport)
            self.addCleanup(sock.close)
        client, member = transports
        client.protocol.peer, member.protocol.peer = member.protocol, client.protocol
        self.assertTrue(fast.join(client, member, ByteCount(), ByteCount()))

        # epoll said both were readable (EPOLLIN alone: the batch step's);
        # then the client's reset came.
        memberPeer.sendall(b"for the client")
        clientPeer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        clientPeer.close()
        batch = [(member.fileno(), select.EPOLLIN), (client.fileno(), select.EPOLLIN)]
        real = reactor._poller

        class Poller:
            def poll(self, timeout, maxevents):
                reactor._poller = real
                return batch

        reactor._poller = Poller()
        reactor.doIteration(0)
        for _ in range(3):
            reactor.runUntilCurrent()
            reactor.doIteration(0)
        self.assertNotIn(("client", "half-close"), events)
        self.assertEqual(
            events, [("client", "ConnectionAborted"), ("member", "ConnectionAborted")]
        )
        memberPeer.settimeout(5)
        with self.assertRaises(ConnectionResetError):
            memberPeer.recv(10)


class RingRefusedTests(SynchronousTestCase):
    """
    Where the kernel refuses io_uring (an old kernel, seccomp,
    io_uring_disabled), the reactor's first turn says why once and the
    reactor stays on epoll.
    """

    def test_refusedFallsBackToEpoll(self):
        import errno

        from etcdgw.fast import dispatch, ring

        class Refusing:
            CONTRACT = ring.CONTRACT

            @staticmethod
            def Ring(*args):
                raise OSError(errno.ENOSYS, "Function not implemented")

        self.patch(ring, "_etcdgw_ring", Refusing)
        self.patch(ring, "unavailable", None)
        logged = []
        self.patch(ring._log, "info", lambda fmt, **kw: logged.append(fmt.format(**kw)))
        reactor = EPollReactor()
        self.addCleanup(reactor._poller.close)
        self.assertTrue(leanDispatch(reactor, useRing=True))
        self.assertIs(reactor.doPoll.__func__, dispatch._ringPoll)
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        seen = []
        reactor.addReader(Reader(a, seen))
        b.send(b"ping")
        reactor.doIteration(0)
        self.assertEqual(seen, [b"ping"])  # served on epoll, that same turn
        self.assertIs(reactor.doPoll.__func__, dispatch._doPoll)
        self.assertIsNone(ring.ringOf(reactor))
        self.assertEqual(
            logged, ["forwarding on epoll, not io_uring: io_uring refused: Function not implemented"]
        )

    def test_notWantedWhenOff(self):
        """ETCDGW_IO_URING=0 (for comparisons) and --forward=epoll keep the ring off."""
        from etcdgw.fast import dispatch, ring

        self.patch(ring.os, "environ", {"ETCDGW_IO_URING": "0"})
        self.assertEqual(ring.available(), "ETCDGW_IO_URING=0")
        reactor = EPollReactor()
        self.addCleanup(reactor._poller.close)
        leanDispatch(reactor)
        self.assertIs(reactor.doPoll.__func__, dispatch._doPoll)
