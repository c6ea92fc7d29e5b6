import errno
import os
import socket

from twisted.internet import error, tcp
from twisted.internet import reactor as globalReactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from etcdgw.fast.transport import FastTransport
from etcdgw.listen import (
    ACCEPT_BACKOFF_MAX,
    ACCEPT_BACKOFF_MIN,
    GatewayPort,
    GatewayTCPEndpoint,
    GatewayUNIXPort,
    ListeningService,
    describeListenError,
    listenEndpoint,
)
from etcdgw.listenaddr import ListenError, parseListenAddress


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


class EndpointStringTests(SynchronousTestCase):
    def test_tcp6IsGatewayTCP(self):
        """tcp6: and tcp: strings, any interface, are served by GatewayPort."""
        for text, host, port in [
            ("tcp6:2379", "::", 2379),
            ("tcp6:2379:interface=\\:\\:1", "::1", 2379),
            ("tcp6:port=0:interface=fe80\\:\\:1%lo", "fe80::1%lo", 0),
            ("tcp:23790", "0.0.0.0", 23790),
            ("tcp:23790:interface=\\:\\:1:backlog=7", "::1", 23790),
        ]:
            a = parseListenAddress(text)
            self.assertEqual((a.host, a.port, a.isTCP), (host, port, True), text)
            endpoint = listenEndpoint(MemoryReactorClock(), a, maxConnections=9)
            self.assertIsInstance(endpoint, GatewayTCPEndpoint, text)
            self.assertEqual((endpoint.maxConnections, endpoint.fast), (9, None))
            endpoint = listenEndpoint(MemoryReactorClock(), a, fast=False)
            self.assertIs(endpoint.fast, False)  # the metrics address: Twisted's transports
        self.assertTrue(parseListenAddress("tcp6:1").wildcard)
        self.assertEqual(parseListenAddress("tcp:1:backlog=7").backlog, 7)

    def test_unixString(self):
        """unix: strings give the path, and mode= in octal."""
        a = parseListenAddress("unix:/run/gw.sock:mode=0600")
        self.assertEqual((a.isUNIX, a.path, a.mode, a.isTCP), (True, "/run/gw.sock", 0o600, False))
        endpoint = listenEndpoint(MemoryReactorClock(), parseListenAddress("unix:/x.sock"))
        self.assertEqual(endpoint.mode, 0o660)  # the default
        endpoint = listenEndpoint(MemoryReactorClock(), parseListenAddress("unix:/x"), mode=0o600)
        self.assertEqual(endpoint.mode, 0o600)

    def test_badStrings(self):
        """Malformed endpoint strings are refused at parse time, naming the problem."""
        for text, message in [
            ("tcp6:", "missing port"),
            ("tcp:1:interface=", "empty interface"),
            ("tcp:1:bogus=1", 'unknown parameter "bogus"'),
            ("tcp:" + "9" * 5000, "is not a number"),
            ("tcp:1:backlog=0", "not in 1-65535"),
            ("unix:", "missing unix parameters"),
            ("unix:/x:mode=999", "octal mode"),
            ("unix:/x:mode=7777", "at most 0777"),
            ("systemd:", "missing systemd parameters"),
            ("systemd:domain=INET:index=x", "is not a number"),
            ("systemd:domain=IPX:index=0", "domain must be"),
            ("systemd:domain=INET", "one of index= and name="),
        ]:
            e = self.assertRaises(ListenError, parseListenAddress, text)
            self.assertIn(message, str(e), text)


class _Refusing(Protocol):
    pass


class BrokenFactory(Factory):
    """
    A factory whose protocols raise where the test says.
    """

    protocol = Protocol

    def __init__(self, where):
        self.where = where
        self.built = []

    def buildProtocol(self, addr):
        if self.where == "buildProtocol":
            raise RuntimeError("buildProtocol broke")
        protocol = Factory.buildProtocol(self, addr)
        self.built.append(protocol)
        if self.where == "connectionMade":

            def connectionMade():
                raise RuntimeError("connectionMade broke")

            protocol.connectionMade = connectionMade
        return protocol


class ClientErrorTests(SynchronousTestCase):
    """
    An error while starting one client closes that client only.
    """

    #: The port's choice of transports (see GatewayPort.fast).
    fast = None

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.events = EventLoggingObserver.createWithCleanup(self, GatewayPort.log.observer)

    def port(self, factory, sockets):
        port = GatewayPort(0, factory, 50, "127.0.0.1", self.reactor)
        port.fast = self.fast
        port.connected = True
        port._realPortNumber = 23790
        port.socket = FakeListeningSocket(sockets)
        port.startReading()
        return port

    def pairs(self, n):
        result = []
        for _ in range(n):
            a, b = socket.socketpair(socket.AF_UNIX)
            self.addCleanup(b.close)
            self.addCleanup(a.close)
            result.append((a, b))
        return result

    def check(self, where):
        factory = BrokenFactory(where)
        (a1, b1), (a2, b2) = self.pairs(2)
        port = self.port(factory, [(a1, ("127.0.0.1", 5000)), (a2, ("127.0.0.1", 5001))])
        port.doRead()
        self.reactor.advance(0)  # an aborted transport closes in the next turn
        self.assertEqual(port.clientErrors, 2)
        self.assertIn(port, self.reactor.getReaders())
        self.assertEqual(port.openConnections, 0)
        self.assertEqual(b1.recv(1), b"")  # closed, not left open
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)  # then rate-limited
        [logged] = [e for e in self.events if "error starting client" in e["log_format"]]
        self.assertEqual(logged["client"], "('127.0.0.1', 5000)")
        factory.where = None
        a3, b3 = self.pairs(1)[0]
        port.socket = FakeListeningSocket([(a3, ("127.0.0.1", 5002))])
        port.doRead()
        self.assertEqual(port.openConnections, 1)
        self.assertTrue(factory.built[-1].connected)

    def test_buildProtocolRaises(self):
        """A buildProtocol that raises closes that client; the port keeps accepting."""
        self.check("buildProtocol")

    def test_connectionMadeRaises(self):
        """A connectionMade that raises aborts that client; the port keeps accepting."""
        self.check("connectionMade")

    def test_loopErrorKeepsListening(self):
        """Whatever else the accept loop raises is logged; the port keeps listening."""
        port = self.port(Factory.forProtocol(Protocol), [])

        class Broken:
            family = socket.AF_INET

            def accept(self):
                raise ZeroDivisionError()

        port.socket = Broken()
        port.doRead()
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertIn(port, self.reactor.getReaders())


class StockClientErrorTests(ClientErrorTests):
    """
    The same with Twisted's own transports (the gate refused the fast path,
    or the metrics address): the accept loop is not part of the fast path.
    """

    fast = False

    def test_stockTransports(self):
        """The accepted clients' transports are Twisted's own, counted."""
        (a, b), = self.pairs(1)
        port = self.port(Factory.forProtocol(Protocol), [(a, ("127.0.0.1", 5000))])
        port.doRead()
        [transport] = [t for t in self.reactor.getReaders() if t is not port]
        self.assertIsInstance(transport, tcp.Server)
        self.assertNotIsInstance(transport, FastTransport)
        self.assertEqual(port.openConnections, 1)


class CapTests(SynchronousTestCase):
    fast = None

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.events = EventLoggingObserver.createWithCleanup(self, GatewayPort.log.observer)
        self.port = GatewayPort(0, Factory.forProtocol(Protocol), 50, "127.0.0.1", self.reactor)
        self.port.fast = self.fast
        self.port.connected = True
        self.port._realPortNumber = 23790
        self.port.maxConnections = 2

    def sockets(self, n):
        result = []
        for i in range(n):
            a, b = socket.socketpair(socket.AF_UNIX)
            self.addCleanup(b.close)
            self.addCleanup(a.close)
            result.append((a, ("127.0.0.1", 6000 + i)))
        return result

    def test_pausesAtCapAndResumes(self):
        """
        At the cap, accepting pauses (nothing more is accepted, nothing is
        closed), logged once; a connection closing resumes it.
        """
        self.port.socket = FakeListeningSocket(self.sockets(4))
        self.port.startReading()
        self.port.doRead()
        self.assertEqual(self.port.openConnections, 2)
        self.assertEqual(len(self.port.socket.results), 2)  # left in the queue
        self.assertNotIn(self.port, self.reactor.getReaders())
        self.assertEqual(self.port.capPauses, 1)
        warnings = [e for e in self.events if e["log_level"] == LogLevel.warn]
        self.assertEqual([(w["open"], w["cap"]) for w in warnings], [(2, 2)])
        [transport] = [t for t in self.reactor.getReaders() if t is not self.port][:1]
        transport.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(self.port.openConnections, 1)
        self.assertIn(self.port, self.reactor.getReaders())
        self.port.doRead()
        self.assertEqual(self.port.openConnections, 2)
        self.assertEqual(len(self.port.socket.results), 1)
        self.assertEqual(self.port.capPauses, 2)
        # A second pause within the log interval is counted, not logged.
        self.assertEqual(len([e for e in self.events if e["log_level"] == LogLevel.warn]), 1)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_noResumeOnceStopped(self):
        """A connection closing after the port stopped listening does not resume it."""
        self.port.socket = FakeListeningSocket(self.sockets(2))
        self.port.startReading()
        self.port.doRead()
        transports = [t for t in self.reactor.getReaders() if t is not self.port]
        self.port.disconnecting = True
        transports[0].connectionLost(Failure(error.ConnectionDone()))
        self.assertNotIn(self.port, self.reactor.getReaders())


class StockCapTests(CapTests):
    """
    The cap with Twisted's own transports: each closing connection still
    tells its port.
    """

    fast = False


class ClientAddressTests(SynchronousTestCase):
    def test_addresses(self):
        """Accepted clients' addresses are Twisted's public address types."""
        from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

        self.assertEqual(
            GatewayPort._clientAddress(("127.0.0.1", 5000)), IPv4Address("TCP", "127.0.0.1", 5000)
        )
        self.assertEqual(
            GatewayPort._clientAddress(("fe80::1%lo", 5000, 0, 1)),
            IPv6Address("TCP", "fe80::1%lo", 5000, 0, 1),
        )
        self.assertEqual(GatewayUNIXPort._clientAddress(""), UNIXAddress(""))


class UNIXListenTests(SynchronousTestCase):
    def setUp(self):
        import tempfile

        self.directory = tempfile.mkdtemp(prefix="etcdgw-unix-")
        self.addCleanup(__import__("shutil").rmtree, self.directory, True)
        self.path = self.directory + "/gw.sock"
        self.reactor = MemoryReactorClock()

    def listen(self, **kwargs):
        endpoint = listenEndpoint(self.reactor, parseListenAddress("unix:" + self.path), **kwargs)
        d = endpoint.listen(Factory.forProtocol(Protocol))
        return d

    def test_modeApplied(self):
        """The socket file gets mode 0660 by default, or the mode asked for."""
        import stat

        port = self.successResultOf(self.listen())
        self.assertIsInstance(port, GatewayUNIXPort)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o660)
        port.connectionLost(None)
        port = self.successResultOf(self.listen(mode=0o600))
        self.addCleanup(port.connectionLost, None)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_staleSocketRemoved(self):
        """A socket file nobody listens on is removed, with a log line, and listened on."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(self.path)
        stale.close()
        port = self.successResultOf(self.listen())
        self.addCleanup(port.connectionLost, None)
        [removed] = [e for e in events if "stale socket" in e.get("log_format", "")]
        self.assertEqual(removed["path"], self.path)

    def test_liveSocketRefused(self):
        """A socket file a live process listens on is refused, not taken over."""
        live = socket.socket(socket.AF_UNIX)
        self.addCleanup(live.close)
        live.bind(self.path)
        live.listen(1)
        e = self.failureResultOf(self.listen(), ListenError).value
        self.assertIn("in use: another process listens on it", str(e))
        self.assertTrue(os.path.exists(self.path))

    def test_notASocketRefused(self):
        """A path that is not a socket is never removed."""
        open(self.path, "w").close()
        e = self.failureResultOf(self.listen(), ListenError).value
        self.assertIn("is not a socket", str(e))

    def test_missingDirectory(self):
        """A path in a missing directory fails to listen, saying why."""
        self.path = self.directory + "/no/such/dir/gw.sock"
        reason = self.failureResultOf(self.listen())
        self.assertIn("no such file or directory", describeListenError(reason.value))


class SystemdListenTests(SynchronousTestCase):
    def test_withoutListenFDs(self):
        """Without LISTEN_FDS, listening fails with a ListenError saying so."""
        endpoint = listenEndpoint(
            MemoryReactorClock(), parseListenAddress("systemd:domain=INET:index=0")
        )
        endpoint.environ = {}
        e = self.failureResultOf(endpoint.listen(Factory()), ListenError).value
        self.assertIn("LISTEN_FDS is not set", str(e))

    def test_indexOutOfRange(self):
        """An index past the sockets systemd passed is named."""
        endpoint = listenEndpoint(
            MemoryReactorClock(), parseListenAddress("systemd:domain=INET:index=3")
        )
        endpoint.environ = {"LISTEN_FDS": "1", "LISTEN_PID": str(os.getpid())}
        e = self.failureResultOf(endpoint.listen(Factory()), ListenError).value
        self.assertIn("no socket at index=3", str(e))


class FailingEndpoint:
    def __init__(self, exception):
        self.exception = exception

    def listen(self, factory):
        from twisted.internet import defer

        return defer.fail(self.exception)


class ListeningServiceTests(SynchronousTestCase):
    def test_cannotListenIsOneLine(self):
        """
        A listen that fails ends the start with SystemExit(1) and one line on
        standard error naming the flag, the address and the problem.
        """
        from twisted.internet.error import CannotListenError

        import etcdgw.listen

        lines = []
        self.patch(etcdgw.listen, "_stderrLine", lines.append)
        service = ListeningService(
            FailingEndpoint(
                CannotListenError("127.0.0.1", 23790, OSError(errno.EADDRINUSE, "Address already in use"))
            ),
            Factory(),
            parseListenAddress("127.0.0.1:23790"),
            flag="--metrics-addr",
        )
        e = self.assertRaises(SystemExit, service.privilegedStartService)
        self.assertEqual(e.code, 1)
        self.assertEqual(
            lines,
            [
                "etcd-gateway: error: --metrics-addr: cannot listen on 127.0.0.1:23790: "
                "address already in use (another process listens there)"
            ],
        )

    def test_problem(self):
        """problem() is None while the port listens and names the flag once it is closed."""
        reactor = MemoryReactorClock()
        service = ListeningService(
            GatewayTCPEndpoint(reactor, "127.0.0.1", 0), Factory(), parseListenAddress("127.0.0.1:0")
        )
        self.assertIn("not listening", service.problem())
        service.privilegedStartService()
        self.addCleanup(lambda: service.port.connected and service.port.connectionLost(None))
        self.assertIsNone(service.problem())
        self.assertEqual(service.boundAddress[0], "127.0.0.1")
        service.port.connectionLost(None)
        self.assertIn("--listen-addr 127.0.0.1:", service.problem())


class AdoptedUNIXTests(SynchronousTestCase):
    def test_systemdSocketFileKept(self):
        """
        A unix socket passed by systemd keeps its file's mode while served
        and its file once the port closes: the unit owns it.
        """
        import shutil
        import stat
        import tempfile

        directory = tempfile.mkdtemp(prefix="etcdgw-sd-")
        self.addCleanup(shutil.rmtree, directory, True)
        path = directory + "/sd.sock"
        passed = socket.socket(socket.AF_UNIX)
        passed.bind(path)
        passed.listen(5)
        os.chmod(path, 0o640)
        fd = os.dup(passed.fileno())
        passed.close()
        self.addCleanup(lambda: os.path.exists(path) and os.unlink(path))
        reactor = MemoryReactorClock()
        endpoint = listenEndpoint(reactor, parseListenAddress("systemd:domain=UNIX:index=0"))
        self.patch(endpoint, "_descriptor", lambda: (fd, socket.AF_UNIX))
        port = self.successResultOf(endpoint.listen(Factory.forProtocol(Protocol)))
        self.assertIsInstance(port, GatewayUNIXPort)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o640)
        port.connectionLost(Failure(error.ConnectionDone()))
        self.assertTrue(os.path.exists(path))


class AdoptedTCPTests(SynchronousTestCase):
    def test_systemdTCPSocketTransports(self):
        """A TCP socket passed by systemd is served by GatewayPort, with the transports asked for."""
        passed = socket.socket()
        passed.bind(("127.0.0.1", 0))
        passed.listen(5)
        fd = os.dup(passed.fileno())
        passed.close()
        endpoint = listenEndpoint(
            MemoryReactorClock(), parseListenAddress("systemd:domain=INET:index=0"), fast=False
        )
        self.patch(endpoint, "_descriptor", lambda: (fd, socket.AF_INET))
        port = self.successResultOf(endpoint.listen(Factory.forProtocol(Protocol)))
        self.addCleanup(port.connectionLost, Failure(error.ConnectionDone()))
        self.assertIsInstance(port, GatewayPort)
        self.assertIs(port.fast, False)
        self.assertFalse(issubclass(port.transport, FastTransport))
