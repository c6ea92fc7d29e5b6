"""
Tests for L{etcdgw.dial}: every way a dial can go wrong is a failed
Deferred, and a cancelled dial is a cancellation, not the member's fault.
"""

import socket

from twisted.internet import defer, error
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from etcdgw.dial import describeFailure, dial
from etcdgw.endpoint import Endpoint


class RaisingConnectReactor(MemoryReactorClock):
    """
    A reactor whose C{connectTCP} raises, as Twisted's does for an IPv6
    scope ID that names no interface (C{_resolveIPv6} raises C{gaierror}).
    """

    def connectTCP(self, host, port, factory, timeout=30, bindAddress=None):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


class StoppingConnector:
    """
    What Twisted's real connector does on C{stopConnecting}: report a
    C{UserError} to its factory's C{clientConnectionFailed}.
    """

    def __init__(self, factory):
        self.factory = factory
        self.stopped = False

    def stopConnecting(self):
        self.stopped = True
        self.factory.clientConnectionFailed(self, Failure(error.UserError()))


class RealConnectorReactor(MemoryReactorClock):
    def connectTCP(self, host, port, factory, timeout=30, bindAddress=None):
        super().connectTCP(host, port, factory, timeout, bindAddress)
        self.connector = StoppingConnector(factory)
        return self.connector


class DialTests(SynchronousTestCase):
    def test_synchronousErrorIsAFailedDial(self):
        """A connect that raises at once gives a failed Deferred, not an exception."""
        d = dial(RaisingConnectReactor(), Endpoint("::1%lo", 1), lambda a: Protocol(), 1.0)
        reason = self.failureResultOf(d, socket.gaierror)
        self.assertIn("Name or service not known", describeFailure(reason))

    def test_cancelIsCancelledNotUserError(self):
        """Cancelling a direct dial fails it with CancelledError, whatever the connector reports."""
        reactor = RealConnectorReactor()
        d = dial(reactor, Endpoint("10.0.0.1", 2379), lambda a: Protocol(), 1.0)
        d.cancel()
        self.assertTrue(reactor.connector.stopped)
        self.failureResultOf(d, defer.CancelledError)

    def test_cancelHostNameDialIsCancelled(self):
        """Cancelling a dial to a host name fails it with CancelledError, no timer left."""
        reactor = MemoryReactorClock()
        d = dial(reactor, Endpoint("etcd.invalid", 2379), lambda a: Protocol(), 1.0)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_hostNameTimeoutIsTimeout(self):
        """A dial to a host name that does not connect in time fails with a timeout."""
        reactor = MemoryReactorClock()
        d = dial(reactor, Endpoint("etcd.invalid", 2379), lambda a: Protocol(), 1.0)
        reactor.advance(1.0)
        reason = self.failureResultOf(d, error.TimeoutError)
        self.assertEqual(describeFailure(reason), "connect timed out")
        self.assertEqual(reactor.getDelayedCalls(), [])
