import errno
import socket

from twisted.internet import reactor as globalReactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import LogLevel
from twisted.trial.unittest import SynchronousTestCase, TestCase

from etcdgw.listen import (
    ACCEPT_BACKOFF_MAX,
    ACCEPT_BACKOFF_MIN,
    GatewayPort,
    GatewayTCPEndpoint,
    ListenError,
    listenEndpoint,
    parseListenAddress,
)


class ParseListenAddressTests(SynchronousTestCase):
    def test_hostPort(self):
        """host:port, [v6]:port and :port are TCP listen addresses."""
        a = parseListenAddress("127.0.0.1:23790")
        self.assertEqual((a.host, a.port, a.isTCP, a.wildcard), ("127.0.0.1", 23790, True, False))
        a = parseListenAddress("[::1]:1")
        self.assertEqual((a.host, a.port), ("::1", 1))
        a = parseListenAddress(":23790")
        self.assertEqual((a.host, a.port, a.wildcard), ("", 23790, True))
        self.assertEqual(str(a), "*:23790")
        self.assertTrue(parseListenAddress("0.0.0.0:1").wildcard)

    def test_resolvesHost(self):
        """A host name is resolved to an address to listen on."""
        self.assertIn(parseListenAddress("localhost:1").host, ("127.0.0.1", "::1"))

    def test_endpointStrings(self):
        """Twisted endpoint strings are accepted; tcp ones become TCP addresses."""
        a = parseListenAddress("tcp:2000:interface=127.0.0.2")
        self.assertEqual((a.host, a.port), ("127.0.0.2", 2000))
        a = parseListenAddress("unix:/run/gw.sock")
        self.assertEqual((a.isTCP, a.description), (False, "unix:/run/gw.sock"))
        self.assertFalse(parseListenAddress("systemd:domain=INET:index=0").isTCP)

    def test_refused(self):
        """Malformed listen addresses are refused, naming them."""
        for text, message in [
            ("23790", "missing port"),
            ("h:x", "is not a number"),
            ("127.0.0.1:70000", "not in 0-65535"),
            ("tcp:notaport", "tcp:notaport"),
            ("nosuchhost.invalid:1", "cannot resolve"),
        ]:
            e = self.assertRaises(ListenError, parseListenAddress, text)
            self.assertIn(message, str(e))


class FakeListeningSocket:
    """
    A listening socket whose accept() raises the errors it is given, then
    hands out real connected sockets.
    """

    def __init__(self, results):
        self.results = list(results)
        self.family = socket.AF_INET

    def accept(self):
        result = self.results.pop(0) if self.results else BlockingIOError()
        if isinstance(result, BaseException):
            raise result
        return result


class AcceptBackoffTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.factory = Factory.forProtocol(Protocol)
        self.port = GatewayPort(0, self.factory, 50, "127.0.0.1", self.reactor)
        self.port.connected = True
        self.port._realPortNumber = 23790
        self.events = EventLoggingObserver.createWithCleanup(self, GatewayPort.log.observer)

    def test_emfilePausesAccepting(self):
        """EMFILE stops reading the listening socket for a while, logged once."""
        self.port.socket = FakeListeningSocket([OSError(errno.EMFILE, "Too many open files")])
        self.port.startReading()
        self.port.doRead()
        self.assertNotIn(self.port, self.reactor.getReaders())
        errors = [e for e in self.events if e["log_level"] == LogLevel.error]
        self.assertEqual(len(errors), 1)
        self.assertIn("EMFILE", errors[0]["error"])
        self.reactor.advance(ACCEPT_BACKOFF_MIN)
        self.assertIn(self.port, self.reactor.getReaders())
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_backoffGrows(self):
        """Failures in a row double the pause, up to the maximum, and log only once."""
        self.port.socket = FakeListeningSocket([OSError(errno.ENFILE, "x")] * 20)
        pauses = []
        for _ in range(10):
            self.port.doRead()
            pauses.append(self.port._backoff)
            self.reactor.advance(self.port._backoff)
        self.assertEqual(pauses[0], ACCEPT_BACKOFF_MIN)
        self.assertEqual(pauses[1], ACCEPT_BACKOFF_MIN * 2)
        self.assertEqual(pauses[-1], ACCEPT_BACKOFF_MAX)
        self.assertEqual(len([e for e in self.events if e["log_level"] == LogLevel.error]), 1)
        self.assertEqual(self.port.acceptFailures, 10)

    def test_recovers(self):
        """After the pause, connections are accepted again and the back-off resets."""
        a, b = socket.socketpair()
        self.addCleanup(b.close)
        self.port.socket = FakeListeningSocket(
            [OSError(errno.EMFILE, "x"), (a, ("127.0.0.1", 5000))]
        )
        built = []
        self.factory.buildProtocol = lambda addr: built.append(addr) or None
        self.port.doRead()
        self.reactor.advance(ACCEPT_BACKOFF_MIN)
        self.port.doRead()
        self.assertEqual([(x.host, x.port) for x in built], [("127.0.0.1", 5000)])
        self.assertEqual(self.port._backoff, 0.0)
        self.assertIn("accepting again", [e for e in self.events][-1]["log_format"])

    def test_abortedIgnored(self):
        """A connection aborted before accept is skipped without pausing."""
        self.port.socket = FakeListeningSocket([OSError(errno.ECONNABORTED, "x")])
        self.port.startReading()
        self.port.doRead()
        self.assertIn(self.port, self.reactor.getReaders())
        self.assertEqual(self.port._backoff, 0.0)


class RealListenTests(TestCase):
    def test_listenAndAccept(self):
        """GatewayTCPEndpoint listens with GatewayPort and accepts real clients."""
        connected = []

        class Record(Protocol):
            def connectionMade(self):
                connected.append(self.transport.getHandle().getsockopt(
                    socket.IPPROTO_TCP, socket.TCP_NODELAY))
                self.transport.loseConnection()

        d = listenEndpoint(globalReactor, parseListenAddress("127.0.0.1:0")).listen(
            Factory.forProtocol(Record)
        )

        def listening(port):
            self.addCleanup(port.stopListening)
            self.assertIsInstance(port, GatewayPort)
            s = socket.create_connection(("127.0.0.1", port.getHost().port))
            self.addCleanup(s.close)
            return _waitFor(lambda: connected)

        return d.addCallback(listening).addCallback(
            lambda _: self.assertEqual(connected, [1])  # TCP_NODELAY set on accept
        )

    def test_wildcardIsDualStack(self):
        """:port listens on every interface, IPv4 clients included."""
        d = GatewayTCPEndpoint(globalReactor, "", 0).listen(Factory.forProtocol(Protocol))

        def listening(port):
            self.addCleanup(port.stopListening)
            s = socket.create_connection(("127.0.0.1", port.getHost().port))
            s.close()

        return d.addCallback(listening)


def _waitFor(condition, timeout=5.0):
    from twisted.internet import defer, task

    def check():
        if condition():
            return True
        return task.deferLater(globalReactor, 0.01, lambda: None).addCallback(lambda _: check())

    d = defer.maybeDeferred(check)
    d.addTimeout(timeout, globalReactor)
    return d


class StarvedTests(SynchronousTestCase):
    def test_noAcceptWhileClientsWait(self):
        """While accepted clients wait for descriptors, the port accepts nothing new."""
        reactor = MemoryReactorClock()
        factory = Factory.forProtocol(Protocol)
        factory.starved = {"client": None}
        port = GatewayPort(0, factory, 50, "127.0.0.1", reactor)
        port.connected = True
        port.socket = FakeListeningSocket([OSError(errno.EMFILE, "unreachable")])
        port.startReading()
        port.doRead()
        self.assertNotIn(port, reactor.getReaders())
        self.assertEqual(len(port.socket.results), 1)  # accept() was not called
        self.assertEqual(port.acceptFailures, 0)
        factory.starved = {}
        reactor.advance(ACCEPT_BACKOFF_MIN)
        self.assertIn(port, reactor.getReaders())
