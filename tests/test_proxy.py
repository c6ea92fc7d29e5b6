import socket

from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import LogLevel
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from etcdgw.connections import MEMBER_USER_TIMEOUT
from etcdgw.endpoint import Endpoint, parseEndpoints
from etcdgw.etcdhealth import CheckResult
from etcdgw.monitor import Monitor
from etcdgw.pool import UpstreamPool
from etcdgw.proxy import ClientProtocol, GatewayFactory
from etcdgw.selfloop import SelfLoopGuard
from tests.test_selfloop import Connected, FakeListener


class FakeTCP(StringTransport):
    """
    A StringTransport that records half-closes and tells its protocol when it
    is closed, like a real TCP transport.
    """

    connected = True
    writeClosed = False
    noDelay = False

    def loseWriteConnection(self):
        self.writeClosed = True

    def setTcpNoDelay(self, enabled):
        self.noDelay = enabled

    def lose(self, reason):
        self.connected = False
        self.protocol.connectionLost(Failure(reason))


class ProxyCase(SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.gateway(
            UpstreamPool(parseEndpoints("10.0.0.1:2379,10.0.0.2:2379,10.0.0.3:2379"), self.reactor)
        )
        self.events = EventLoggingObserver.createWithCleanup(self, GatewayFactory.log.observer)

    def gateway(self, pool, guard=None):
        """
        The gateway factory of C{pool}, with its monitor and self-loop guard.
        """
        self.pool = pool
        self.monitor = Monitor(pool, self.reactor)
        self.guard = guard if guard is not None else SelfLoopGuard()
        self.factory = GatewayFactory(
            pool, self.reactor, dialTimeout=1.5, monitor=self.monitor, guard=self.guard
        )

    def accept(self):
        client = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
        transport = FakeTCP()
        transport.protocol = client
        client.makeConnection(transport)
        return client, transport

    def lastDial(self):
        host, port, factory, timeout, _ = self.reactor.tcpClients[-1]
        return host, port, factory, timeout

    def connectUpstream(self):
        host, port, dialFactory, timeout = self.lastDial()
        upstream = dialFactory.buildProtocol(IPv4Address("TCP", host, port))
        transport = FakeTCP(peerAddress=IPv4Address("TCP", host, port))
        transport.protocol = upstream
        upstream.makeConnection(transport)
        return upstream, transport

    def failDial(self, reason):
        host, port, dialFactory, timeout = self.lastDial()
        dialFactory.clientConnectionFailed(self.reactor.connectors[-1], Failure(reason))



class ProxyTests(ProxyCase):
    def test_pausedWhileDialling(self):
        """A new client is paused and the first endpoint is dialled with the dial timeout."""
        client, transport = self.accept()
        self.assertEqual(transport.producerState, "paused")
        self.assertTrue(transport.noDelay)
        self.assertEqual(self.lastDial()[:2] + (self.lastDial()[3],), ("10.0.0.1", 2379, 1.5))
        self.assertEqual(self.factory.clients, {client})

    def test_forwardBothWays(self):
        """Once connected, bytes pass unchanged both ways, with producers registered."""
        client, ctransport = self.accept()
        upstream, utransport = self.connectUpstream()
        self.assertEqual(ctransport.producerState, "producing")
        self.assertIs(ctransport.producer, utransport)
        self.assertIs(utransport.producer, ctransport)
        self.assertTrue(utransport.noDelay)
        payload = bytes(range(256)) * 3
        client.dataReceived(payload)
        upstream.dataReceived(b"\x00reply\xff")
        self.assertEqual(utransport.value(), payload)
        self.assertEqual(ctransport.value(), b"\x00reply\xff")
        state = self.pool.stateOf(Endpoint("10.0.0.1", 2379))
        self.assertEqual((state.active, state.bytesToUpstream, state.bytesFromUpstream), (1, 768, 7))

    def test_failover(self):
        """A failed dial marks the endpoint down and the next one is dialled; the client stays."""
        client, transport = self.accept()
        self.failDial(error.ConnectionRefusedError())
        self.assertFalse(self.pool.isUp(Endpoint("10.0.0.1", 2379)))
        self.assertEqual(self.lastDial()[:2], ("10.0.0.2", 2379))
        self.failDial(error.TimeoutError())
        self.assertEqual(self.pool.stateOf(Endpoint("10.0.0.2", 2379)).reason, "connect timed out")
        self.assertEqual(self.lastDial()[:2], ("10.0.0.3", 2379))
        self.assertFalse(transport.disconnecting)
        upstream, utransport = self.connectUpstream()
        client.dataReceived(b"x")
        self.assertEqual(utransport.value(), b"x")

    def test_allDown(self):
        """When no endpoint answers, the client is closed and an error is logged."""
        client, transport = self.accept()
        for _ in range(3):
            self.failDial(error.ConnectionRefusedError())
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.factory.refused, 1)
        errors = [
            e for e in self.events
            if e["log_level"] == LogLevel.error and e["log_namespace"].startswith("etcdgw.proxy")
        ]
        self.assertEqual(len(errors), 1)
        self.assertEqual(errors[0]["client"], "192.168.1.1:54321")
        self.assertEqual(len(errors[0]["tried"]), 3)
        # the next client is refused without dialling anything, and counted
        # into the next line rather than logged on its own
        dials = len(self.reactor.tcpClients)
        client2, transport2 = self.accept()
        self.assertTrue(transport2.disconnecting)
        self.assertEqual(len(self.reactor.tcpClients), dials)
        self.reactor.advance(1)
        self.accept()
        errors = [
            e for e in self.events
            if e["log_level"] == LogLevel.error and e["log_namespace"].startswith("etcdgw.proxy")
        ]
        self.assertEqual([e["more"] for e in errors], [0, 1])
        self.assertEqual(self.factory.refused, 3)

    def test_clientGoneWhileDialling(self):
        """A client that leaves during the dial cancels it; nothing is marked down."""
        client, transport = self.accept()
        transport.lose(error.ConnectionLost())
        self.assertTrue(self.reactor.connectors[-1].stoppedConnecting)
        self.failDial(error.UserError())  # what a stopped connector reports
        self.assertEqual(self.pool.upCount(), 3)
        self.assertEqual(self.factory.clients, set())

    def test_halfClose(self):
        """A client's half-close reaches the member; the reply still flows back."""
        client, ctransport = self.accept()
        upstream, utransport = self.connectUpstream()
        client.readConnectionLost()
        self.assertTrue(utransport.writeClosed)
        self.assertFalse(ctransport.disconnecting)
        upstream.dataReceived(b"late reply")
        self.assertEqual(ctransport.value(), b"late reply")
        upstream.readConnectionLost()
        self.assertTrue(ctransport.writeClosed)
        client.writeConnectionLost()
        self.assertTrue(ctransport.disconnecting)

    def test_closePropagates(self):
        """A clean close of one side closes the other, flushing it."""
        client, ctransport = self.accept()
        upstream, utransport = self.connectUpstream()
        ctransport.lose(error.ConnectionDone())
        self.assertTrue(utransport.disconnecting)
        self.assertFalse(utransport.disconnected)
        utransport.lose(error.ConnectionDone())
        self.assertEqual(self.pool.stateOf(Endpoint("10.0.0.1", 2379)).active, 0)
        self.assertEqual(self.factory.clients, set())

    def test_resetPropagates(self):
        """A reset on the member's side aborts the client's connection."""
        client, ctransport = self.accept()
        upstream, utransport = self.connectUpstream()
        utransport.lose(error.ConnectionLost())
        self.assertTrue(ctransport.disconnected)

    def test_whenIdle(self):
        """whenIdle fires once the last client connection has closed."""
        client, transport = self.accept()
        d = self.factory.whenIdle()
        self.assertNoResult(d)
        transport.lose(error.ConnectionDone())
        self.assertIsNone(self.successResultOf(d))
        self.assertIsNone(self.successResultOf(self.factory.whenIdle()))

    def test_hostnameDialTimeout(self):
        """A dial to a host name is bounded by the dial timeout, resolution included."""
        self.pool.replaceEndpoints([Endpoint("etcd.invalid", 2379), Endpoint("10.0.0.9", 1)])
        client, transport = self.accept()
        # MemoryReactor resolves every name to 127.0.0.1; the connect never ends
        self.assertEqual(self.lastDial()[:2], ("127.0.0.1", 2379))
        self.reactor.advance(1.4)
        self.assertTrue(self.pool.isUp(Endpoint("etcd.invalid", 2379)))
        self.reactor.advance(0.1)
        self.assertFalse(self.pool.isUp(Endpoint("etcd.invalid", 2379)))
        self.assertEqual(self.lastDial()[:2], ("10.0.0.9", 1))


class LocalResourceTests(ProxyCase):
    def test_outOfDescriptorsIsNotTheMember(self):
        """When the gateway cannot open a socket (EMFILE), the member stays up and the dial is retried."""
        client, transport = self.accept()
        self.failDial(error.ConnectBindError(24, "Too many open files"))
        self.assertEqual(self.pool.upCount(), 3)
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.reactor.advance(ClientProtocol.localRetryDelay)
        self.assertEqual(len(self.reactor.tcpClients), 2)  # dialled again
        self.connectUpstream()
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_outOfDescriptorsGivesUp(self):
        """Still out of descriptors after the retry window: the client is closed, logged, no member down."""
        client, transport = self.accept()
        while not transport.disconnecting:
            self.failDial(error.ConnectBindError(24, "Too many open files"))
            if self.reactor.getDelayedCalls():
                self.reactor.advance(self.reactor.getDelayedCalls()[0].getTime() - self.reactor.seconds())
        self.assertLessEqual(self.reactor.seconds(), ClientProtocol.localRetryWindow)
        self.assertGreater(self.reactor.seconds(), ClientProtocol.localRetryWindow - 1.5)
        self.assertEqual(self.pool.upCount(), 3)
        errors = [e for e in self.events if e["log_level"] == LogLevel.error]
        self.assertIn("out of resources", errors[-1]["log_format"])

    def test_clientLeavesDuringRetry(self):
        """A client that leaves while a local-failure retry is pending cancels it."""
        client, transport = self.accept()
        self.failDial(error.ConnectBindError(24, "Too many open files"))
        transport.lose(error.ConnectionLost())
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_closingConnectionFeedsWaitingClient(self):
        """A client waiting for descriptors dials as soon as another connection closes."""
        first, firstTransport = self.accept()
        self.connectUpstream()
        waiting, waitingTransport = self.accept()
        self.failDial(error.ConnectBindError(24, "Too many open files"))
        self.assertEqual(list(self.factory.starved), [waiting])
        dials = len(self.reactor.tcpClients)
        firstTransport.lose(error.ConnectionDone())
        self.assertEqual(len(self.reactor.tcpClients), dials + 1)  # at once, no timer
        self.assertEqual(list(self.factory.starved), [])
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class RaisingFor(MemoryReactorClock):
    """
    A reactor whose C{connectTCP} raises at once for C{host} (as Twisted's
    does for an IPv6 scope ID it cannot resolve), and connects elsewhere.
    """

    def __init__(self, host):
        super().__init__()
        self.raisingHost = host

    def connectTCP(self, host, port, factory, timeout=30, bindAddress=None):
        if host == self.raisingHost:
            import socket

            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return super().connectTCP(host, port, factory, timeout, bindAddress)


class StoppingConnector:
    """
    Twisted's real connector: C{stopConnecting} reports a C{UserError} to
    the factory at once.
    """

    def __init__(self, factory):
        self.factory = factory

    def stopConnecting(self):
        self.factory.clientConnectionFailed(self, Failure(error.UserError()))


class RealConnectors(MemoryReactorClock):
    def connectTCP(self, host, port, factory, timeout=30, bindAddress=None):
        super().connectTCP(host, port, factory, timeout, bindAddress)
        return StoppingConnector(factory)


class AcceptPathTests(ProxyCase):
    def test_synchronousDialErrorTriesNext(self):
        """
        A dial whose connect raises at once marks that member down, with the
        reason, and the next one is dialled; the client stays open.
        """
        self.reactor = RaisingFor("fe80::1%nosuchif0")
        self.gateway(
            UpstreamPool(
                [Endpoint("fe80::1%nosuchif0", 2379), Endpoint("10.0.0.2", 2379)], self.reactor
            )
        )
        client, transport = self.accept()
        state = self.pool.stateOf(Endpoint("fe80::1%nosuchif0", 2379))
        self.assertEqual(state.state, "down")
        self.assertIn("Name or service not known", state.reason)
        self.assertEqual(self.lastDial()[:2], ("10.0.0.2", 2379))
        self.assertFalse(transport.disconnecting)
        self.connectUpstream()
        self.assertEqual(transport.producerState, "producing")

    def test_clientGoneWithRealConnector(self):
        """
        A client that leaves mid-dial marks nothing down and starts no other
        dial, though a real connector reports UserError when stopped.
        """
        self.reactor = RealConnectors()
        self.gateway(UpstreamPool(parseEndpoints("10.0.0.1:2379,10.0.0.2:2379"), self.reactor))
        client, transport = self.accept()
        transport.lose(error.ConnectionLost())
        self.assertEqual(self.pool.upCount(), 2)
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.assertEqual(self.factory.clients, set())
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_waitingClientSurvivesReplacedEndpoint(self):
        """
        A client waiting for descriptors whose endpoint was replaced meanwhile
        (same address, new weight) dials again instead of crashing.
        """
        client, transport = self.accept()
        self.pool.replaceEndpoints(
            [Endpoint("10.0.0.1", 2379, weight=5), Endpoint("10.0.0.2", 2379)]
        )
        self.failDial(error.ConnectBindError(24, "Too many open files"))
        self.assertEqual(self.flushLoggedErrors(), [])
        self.reactor.advance(ClientProtocol.localRetryDelay)
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.connectUpstream()
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(self.pool.upCount(), 2)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_errorClosesThatClientOnly(self):
        """
        An error while handling one client's dial result closes that client,
        logged; the gateway goes on with the next client.
        """
        client, transport = self.accept()

        def broken(*args, **kwargs):
            raise RuntimeError("bug in pick")

        self.patch(self.pool, "pick", broken)
        self.failDial(error.ConnectionRefusedError())
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertTrue(transport.disconnected or transport.disconnecting)
        del self.pool.pick
        client2, transport2 = self.accept()
        self.assertFalse(transport2.disconnecting)

    def test_selfLoopMarkedDown(self):
        """
        A member connection whose peer is the gateway's own listening address
        is closed, the member marked down ("self-loop"), and the next dialled.
        """
        self.guard.listeners = [FakeListener("127.0.0.1", 23790)]
        self.pool.replaceEndpoints([Endpoint("127.0.0.1", 23790), Endpoint("10.0.0.2", 2379)])
        client, transport = self.accept()
        upstream, utransport = self.connectUpstream()
        self.assertTrue(utransport.disconnected or utransport.disconnecting)
        state = self.pool.stateOf(Endpoint("127.0.0.1", 23790))
        self.assertEqual(state.state, "down")
        self.assertTrue(state.reason.startswith("self-loop: 127.0.0.1:23790"), state.reason)
        self.assertEqual(self.lastDial()[:2], ("10.0.0.2", 2379))
        self.connectUpstream()
        self.assertEqual(transport.producerState, "producing")

    def test_selfLoopWildcardListener(self):
        """
        With a wildcard listener, any local address on the listening port is
        a self-loop; another port, or a non-local address, is not.
        """
        local = {"127.0.0.2", "10.1.2.3"}
        guard = SelfLoopGuard(listeners=[FakeListener("::", 23790)], isLocal=local.__contains__)
        T = Connected
        self.assertIsNotNone(guard.reachedItself(T("127.0.0.2", 23790)))
        self.assertIsNotNone(guard.reachedItself(T("::ffff:127.0.0.2", 23790)))
        self.assertIsNotNone(guard.reachedItself(T("10.1.2.3", 23790)))
        self.assertIsNone(guard.reachedItself(T("127.0.0.2", 2379)))
        self.assertIsNone(guard.reachedItself(T("10.9.9.9", 23790)))

    def test_dialOutcomesGoToTheMonitor(self):
        """
        The proxy decides nothing: each failed dial, a self-loop included,
        goes to the monitor, which marks the member down and announces it;
        dials and failures are counted.
        """
        changes = []
        self.monitor.subscribe(changes.append)
        self.guard.listeners = [FakeListener("127.0.0.1", 23790)]
        loop = Endpoint("127.0.0.1", 23790)
        self.pool.replaceEndpoints([loop, Endpoint("10.0.0.2", 2379), Endpoint("10.0.0.3", 2379)])
        client, transport = self.accept()
        self.connectUpstream()  # the gateway itself
        self.failDial(error.ConnectionRefusedError())
        self.connectUpstream()
        self.assertEqual(
            [(str(c.endpoint), c.what, c.new) for c in changes],
            [("127.0.0.1:23790", "state", "down"), ("10.0.0.2:2379", "state", "down")],
        )
        self.assertTrue(changes[0].reason.startswith("self-loop: 127.0.0.1:23790"))
        self.assertEqual(changes[1].reason, "connection refused")
        self.assertEqual(
            [(s.dialAttempts, s.dialFailures) for s in self.pool.states()],
            [(1, 1), (1, 1), (1, 0)],
        )
        # An etcd answer (which would come through the gateway) does not
        # bring the self-loop back.
        self.monitor.checked(loop, CheckResult(True, "ok", answered=True))
        self.assertFalse(self.pool.isUp(loop))


class KeepAliveTCP(FakeTCP):
    """
    A FakeTCP whose handle is a real (unconnected) socket, as a stock
    transport's is.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.socket = socket.socket()

    def getHandle(self):
        return self.socket


class HeldTests(ProxyCase):
    """
    Each joined pair is registered with the connection registry, once, and
    the registry can reset it.
    """

    key = ("10.0.0.1", 2379)

    def test_registeredWhileJoined(self):
        """A pair is registered when joined and unregistered when either side closes."""
        client, ctransport = self.accept()
        self.assertEqual(self.factory.connections.held(), {})
        upstream, utransport = self.connectUpstream()
        self.assertEqual(self.factory.connections.held(), {self.key: 1})
        ctransport.lose(error.ConnectionDone())
        self.assertEqual(self.factory.connections.held(), {})
        utransport.lose(error.ConnectionDone())
        self.assertEqual(self.factory.connections.held(), {})
        self.assertEqual(self.pool.stateOf(Endpoint(*self.key)).active, 0)

    def test_memberSideClosingUnregisters(self):
        """The member side closing first unregisters the pair too."""
        client, ctransport = self.accept()
        upstream, utransport = self.connectUpstream()
        utransport.lose(error.ConnectionLost())
        self.assertEqual(self.factory.connections.held(), {})

    def test_resetAbortsBothSides(self):
        """reset() aborts the client's connection and the member's."""
        client, ctransport = self.accept()
        upstream, utransport = self.connectUpstream()
        client.reset()
        self.assertTrue(ctransport.disconnected)
        self.assertTrue(utransport.disconnected)

    def test_memberDownResetsItsPairs(self):
        """With the registry running, a member marked down has its pairs reset; others stay."""
        registry = self.factory.connections
        registry.startService()
        self.addCleanup(registry.stopService)
        first, firstTransport = self.accept()
        upstream, firstUpstream = self.connectUpstream()
        second, secondTransport = self.accept()
        upstream2, secondUpstream = self.connectUpstream()
        self.assertEqual(self.lastDial()[:2], ("10.0.0.2", 2379))
        self.monitor.dialFailed(
            self.pool.stateOf(Endpoint(*self.key)), Failure(error.ConnectionRefusedError())
        )
        self.reactor.advance(1)
        self.assertTrue(firstTransport.disconnected and firstUpstream.disconnected)
        self.assertFalse(secondTransport.disconnected or secondUpstream.disconnected)
        self.assertEqual(registry.closedBy["down"], 1)

    def test_keepAliveOnStockMemberConnection(self):
        """A member connection on Twisted's own transport gets keep-alive and TCP_USER_TIMEOUT."""
        client, ctransport = self.accept()
        host, port, dialFactory, timeout = self.lastDial()
        upstream = dialFactory.buildProtocol(IPv4Address("TCP", host, port))
        transport = KeepAliveTCP(peerAddress=IPv4Address("TCP", host, port))
        self.addCleanup(transport.socket.close)
        transport.protocol = upstream
        upstream.makeConnection(transport)
        handle = transport.getHandle()
        self.assertEqual(handle.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE), 1)
        self.assertEqual(
            handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
            MEMBER_USER_TIMEOUT * 1000,
        )
