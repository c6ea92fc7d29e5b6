"""
The fast path's gate (L{etcdgw.fast.gate}): a Twisted of another version, or
missing what the fast path uses, gives Twisted's own transports and
dispatch and one warning line; and the private uses the gate keeps or
replaced outside Twisted.
"""

import importlib
import types

from twisted.internet import abstract, defer, tcp
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

import twisted
from etcdgw import fast
from etcdgw.endpoint import Endpoint
from etcdgw.etcdhealth import EtcdClient
from etcdgw.fast import gate, transport
from etcdgw.fast.transport import FastTransport, GatewayServer
from etcdgw.listen import GatewayPort, GatewayTCPEndpoint


def fakeTwisted(**modules):
    """
    An C{importModule} for L{gate.check}: the installed modules, except the
    ones given (by name, dots as double underscores).
    """
    replaced = {name.replace("__", "."): module for name, module in modules.items()}

    def importModule(name):
        if name in replaced:
            module = replaced[name]
            if module is None:
                raise ImportError(name)
            return module
        return importlib.import_module(name)

    return importModule


def moduleLike(real, **overrides):
    """
    A copy of module C{real} with some names replaced.
    """
    module = types.ModuleType(real.__name__)
    module.__dict__.update(vars(real))
    module.__dict__.update(overrides)
    return module


def epollReactor(testCase):
    reactor = EPollReactor()
    testCase.addCleanup(reactor._poller.close)
    for reader in list(reactor.getReaders()):
        testCase.addCleanup(reader.connectionLost, None)
    return reactor


class CheckTests(SynchronousTestCase):
    def test_installedTwistedPasses(self):
        """The installed Twisted (setup.py's range) passes, with its epoll reactor."""
        verdict = gate.check(epollReactor(self))
        self.assertEqual((verdict.fast, verdict.problems), (True, ()))
        self.assertEqual(verdict.version, twisted.__version__)

    def test_otherVersionRefused(self):
        """A Twisted outside the tested range is refused, even with every attribute."""
        for version in ("27.1.0", "25.4.0", "24.11.0", "100.0", "nonsense"):
            verdict = gate.check(
                importModule=fakeTwisted(twisted=moduleLike(twisted, __version__=version))
            )
            self.assertFalse(verdict.fast, version)
            [problem] = verdict.problems
            self.assertIn(f"Twisted {version} is not one it was tested with", problem)
        for version in ("25.5.0", "26.4.0", "26.10.0", "26.10.0rc1"):
            verdict = gate.check(
                importModule=fakeTwisted(twisted=moduleLike(twisted, __version__=version))
            )
            self.assertTrue(verdict.fast, version)

    def test_missingAttributeNamed(self):
        """A Twisted without a name the fast path uses is refused, naming it."""

        class Connector:
            pass  # no _makeTransport

        verdict = gate.check(
            importModule=fakeTwisted(twisted__internet__tcp=moduleLike(tcp, Connector=Connector))
        )
        self.assertEqual(
            verdict.problems, ("missing twisted.internet.tcp.Connector._makeTransport",)
        )
        verdict = gate.check(importModule=fakeTwisted(twisted__internet__epollreactor=None))
        self.assertIn("twisted.internet.epollreactor.EPollReactor.doPoll", verdict.describe())

    def test_slottedAttributeMustBePlain(self):
        """A class attribute the fast transports keep in a slot must not become a property."""

        class Connection(tcp.Connection):
            @property
            def dataBuffer(self):
                return b""

        verdict = gate.check(
            importModule=fakeTwisted(twisted__internet__tcp=moduleLike(tcp, Connection=Connection))
        )
        self.assertEqual(
            verdict.problems,
            ("missing twisted.internet.tcp.Connection.dataBuffer (as a plain class attribute)",),
        )

    def test_writeBufferMoved(self):
        """A Twisted that queues written bytes elsewhere is refused: the fast path would send ahead of them."""

        class FileDescriptor(abstract.FileDescriptor):
            def write(self, data):
                self.queued = getattr(self, "queued", b"") + data

        verdict = gate.check(
            importModule=fakeTwisted(
                twisted__internet__abstract=moduleLike(abstract, FileDescriptor=FileDescriptor)
            )
        )
        self.assertEqual(
            verdict.problems, ("bytes given to write() are not where the fast path looks",)
        )

    def test_reactorAttributes(self):
        """An epoll reactor without what the lean dispatch reads is refused, naming it."""
        reactor = epollReactor(self)
        selectables = reactor._selectables
        del reactor._selectables
        self.addCleanup(setattr, reactor, "_selectables", selectables)
        verdict = gate.check(reactor)
        self.assertEqual(verdict.problems, ("missing the epoll reactor's _selectables",))


class StartTests(SynchronousTestCase):
    def setUp(self):
        self.patch(gate, "_decision", None)
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def dial(self):
        """
        Dial through L{fast.connectTCP}: which connectTCP was used?
        """
        used = []
        self.patch(transport, "connectTCP", lambda *args: used.append("fast"))

        class Reactor(MemoryReactorClock):
            def connectTCP(self, *args, **kwargs):
                used.append("reactor")

        fast.connectTCP(Reactor(), "127.0.0.1", 2379, ClientFactory(), 5)
        return used

    def warnings(self):
        return [
            e
            for e in self.events
            if e["log_level"] >= LogLevel.warn and e.get("log_namespace") == "etcdgw.fast"
        ]

    def test_refusedGivesStockAndOneWarning(self):
        """
        A refused Twisted (another version): Twisted's own dispatch,
        transports for accepted and dialled connections, and one warning
        naming why.
        """
        reactor = epollReactor(self)
        verdict = gate.check(
            reactor, fakeTwisted(twisted=moduleLike(twisted, __version__="27.1.0"))
        )
        self.assertIs(fast.start(reactor, verdict), verdict)
        self.assertNotIn("doPoll", vars(reactor))  # EPollReactor's own
        self.assertFalse(fast.enabled())
        self.assertIs(fast.serverTransport(), tcp.Server)
        port = GatewayPort(0, Factory.forProtocol(Protocol), 50, "127.0.0.1", MemoryReactorClock())
        self.assertFalse(issubclass(port.transport, FastTransport))
        self.assertTrue(issubclass(port.transport, tcp.Server))
        self.assertEqual(self.dial(), ["reactor"])
        [warning] = self.warnings()
        self.assertIn("Twisted 27.1.0 is not one it was tested with", warning["problems"])
        self.assertIn("fast path off", warning["log_format"])

    def test_missingAttributeGivesStockAndOneWarning(self):
        """A Twisted missing an attribute: the same, the warning naming the attribute."""
        reactor = epollReactor(self)

        class Connector:
            pass

        verdict = gate.check(
            reactor, fakeTwisted(twisted__internet__tcp=moduleLike(tcp, Connector=Connector))
        )
        fast.start(reactor, verdict)
        self.assertNotIn("doPoll", vars(reactor))
        self.assertIs(fast.serverTransport(), tcp.Server)
        [warning] = self.warnings()
        self.assertIn("twisted.internet.tcp.Connector._makeTransport", warning["problems"])

    def test_acceptedGivesFastQuietly(self):
        """The installed Twisted: the lean dispatch, the fast transports, no warning."""
        reactor = epollReactor(self)
        self.assertTrue(fast.start(reactor).fast)
        self.assertIn("doPoll", vars(reactor))
        self.assertTrue(fast.enabled())
        self.assertIs(fast.serverTransport(), GatewayServer)
        port = GatewayPort(0, Factory.forProtocol(Protocol), 50, "127.0.0.1", MemoryReactorClock())
        self.assertTrue(issubclass(port.transport, GatewayServer))
        self.assertEqual(self.dial(), ["fast"])
        self.assertEqual(self.warnings(), [])

    def test_metricsAddressStock(self):
        """A listener asked for Twisted's own transports gets them, whatever the gate says."""
        fast.start(epollReactor(self))
        self.assertIs(fast.serverTransport(fast=False), tcp.Server)
        reactor = MemoryReactorClock()
        endpoint = GatewayTCPEndpoint(reactor, "127.0.0.1", 0, fast=False)
        port = self.successResultOf(endpoint.listen(Factory.forProtocol(Protocol)))
        self.addCleanup(port.connectionLost, None)
        self.assertFalse(issubclass(port.transport, FastTransport))

    def test_decidedOnce(self):
        """Without start, the first question decides, from the installed Twisted, once."""
        calls = []
        real = gate.check
        self.patch(gate, "check", lambda *a, **kw: calls.append(1) or real(*a, **kw))
        self.assertTrue(fast.enabled())
        self.assertTrue(fast.enabled())
        self.assertEqual(calls, [1])


class PrivateUsesTests(SynchronousTestCase):
    def test_verifyErrorText(self):
        """OpenSSL's own text for a verify error code."""
        self.assertEqual(gate.verifyErrorText(20), "unable to get local issuer certificate")

    def test_verifyErrorTextFallback(self):
        """Without pyOpenSSL's private binding: the code's public name, else the number."""
        importModule = fakeTwisted(OpenSSL___util=None)
        text = gate.verifyErrorText(20, importModule)
        self.assertTrue(text.endswith("(verify error 20)") or text == "verify error 20", text)
        self.assertEqual(gate.verifyErrorText(123456, importModule), "verify error 123456")

    def test_healthChecksQuiet(self):
        """An etcd health check's connection logs no "Starting factory" line."""
        reactor = MemoryReactorClock()
        d = EtcdClient(reactor, timeout=2.0).request(Endpoint("127.0.0.1", 2379), b"GET", "/health")
        factory = reactor.tcpClients[0][2]
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        factory.doStart()
        factory.doStop()
        self.assertEqual([e for e in events if "Starting factory" in e.get("log_format", "")], [])
        reactor.advance(2.0)
        self.failureResultOf(d, defer.TimeoutError)
