import socket

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from etcdgw.fast.dispatch import leanDispatch


class LeanDispatchTests(SynchronousTestCase):
    def test_otherReactorsUntouched(self):
        """Reactors other than epoll are left as they are."""
        reactor = MemoryReactorClock()
        self.assertFalse(leanDispatch(reactor))

    def test_dispatches(self):
        """A changed epoll reactor still delivers reads to their descriptors."""
        reactor = EPollReactor()
        self.addCleanup(reactor._poller.close)
        self.assertTrue(leanDispatch(reactor))
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        seen = []

        class Reader:
            def fileno(self):
                return a.fileno()

            def doRead(self):
                seen.append(a.recv(10))

            def logPrefix(self):
                return "reader"

            def connectionLost(self, reason):
                pass

        reader = Reader()
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
        leanDispatch(reactor)
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
        leanDispatch(reactor)
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
        leanDispatch(reactor)
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
