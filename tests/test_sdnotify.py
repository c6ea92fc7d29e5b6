"""
Tests for L{etcdgw.sdnotify}: the notify protocol against a real unix
datagram socket, as systemd's C{$NOTIFY_SOCKET}.
"""

import os
import socket
import tempfile

from twisted.internet import defer
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from etcdgw.endpoint import Endpoint
from etcdgw.pool import UpstreamPool
from etcdgw.sdnotify import (
    SystemdNotifier,
    SystemdNotifyService,
    describePool,
    watchdogInterval,
)


class NotifySocket:
    """
    A unix datagram socket standing in for systemd's notify socket.
    """

    def __init__(self, testCase, abstract=False):
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        testCase.addCleanup(self.socket.close)
        if abstract:
            name = f"etcdgw-test-{os.getpid()}-{id(self)}"
            self.socket.bind("\0" + name)
            self.address = "@" + name
        else:
            directory = tempfile.mkdtemp(prefix="etcdgw-notify-")
            self.address = os.path.join(directory, "notify")
            self.socket.bind(self.address)
            testCase.addCleanup(os.rmdir, directory)
            testCase.addCleanup(os.unlink, self.address)
        self.socket.setblocking(False)

    def messages(self):
        """
        Every datagram received so far, each as a dict of its fields.
        """
        received = []
        while True:
            try:
                data = self.socket.recv(4096)
            except BlockingIOError:
                return received
            received.append(dict(line.split("=", 1) for line in data.decode().split("\n")))


class FakeListener:
    gone = None

    def __init__(self):
        self.listening = defer.Deferred()

    def problem(self):
        return self.gone

    def whenListening(self):
        d = defer.Deferred()
        self.listening.addCallback(lambda port: (d.callback(port), port)[1])
        return d

    def describe(self):
        return "127.0.0.1:23790"


class SystemdNotifierTests(SynchronousTestCase):
    def test_pathSocket(self):
        """
        A message to a path socket arrives as one datagram of KEY=VALUE lines.
        """
        sink = NotifySocket(self)
        notifier = SystemdNotifier(sink.address)
        self.addCleanup(notifier.close)
        self.assertTrue(notifier.notify(READY="1", STATUS="2/3 endpoints up"))
        self.assertEqual(sink.messages(), [{"READY": "1", "STATUS": "2/3 endpoints up"}])

    def test_abstractSocket(self):
        """
        An address starting with @ names a socket in the abstract namespace.
        """
        sink = NotifySocket(self, abstract=True)
        notifier = SystemdNotifier(sink.address)
        self.addCleanup(notifier.close)
        self.assertTrue(notifier.notify(WATCHDOG="1"))
        self.assertEqual(sink.messages(), [{"WATCHDOG": "1"}])

    def test_fromEnvironment(self):
        """
        The notifier follows NOTIFY_SOCKET; unset or unusable gives None.
        """
        self.assertIsNone(SystemdNotifier.fromEnvironment({}))
        self.assertIsNone(SystemdNotifier.fromEnvironment({"NOTIFY_SOCKET": "vsock:2:9"}))
        notifier = SystemdNotifier.fromEnvironment({"NOTIFY_SOCKET": "@x"})
        self.assertEqual(notifier.address, "@x")

    def test_missingSocketNeverRaises(self):
        """
        A notify socket that is gone gives False and one warning, not an error.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        notifier = SystemdNotifier("/nonexistent/etcdgw/notify")
        self.addCleanup(notifier.close)
        self.assertFalse(notifier.notify(READY="1"))
        self.assertFalse(notifier.notify(READY="1"))
        [warning] = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(warning["address"], "/nonexistent/etcdgw/notify")

    def test_watchdogInterval(self):
        """
        Pings go at half of WATCHDOG_USEC, only for the process it names.
        """
        self.assertIsNone(watchdogInterval({}, pid=5))
        self.assertEqual(watchdogInterval({"WATCHDOG_USEC": "30000000"}, pid=5), 15.0)
        self.assertEqual(
            watchdogInterval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "5"}, pid=5), 1.0
        )
        self.assertIsNone(
            watchdogInterval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "6"}, pid=5)
        )
        self.assertIsNone(watchdogInterval({"WATCHDOG_USEC": "soon"}, pid=5))


class SystemdNotifyServiceTests(SynchronousTestCase):
    def setUp(self):
        self.clock = MemoryReactorClock()
        self.a = Endpoint("10.0.0.1", 2379)
        self.b = Endpoint("10.0.0.2", 2379)
        self.pool = UpstreamPool([self.a, self.b], self.clock)
        self.sink = NotifySocket(self)
        self.listener = FakeListener()
        self.service = SystemdNotifyService(
            SystemdNotifier(self.sink.address), self.pool, self.listener, self.clock, 10.0
        )

    def test_readyOnlyOnceListening(self):
        """
        READY=1, with the endpoint counts, is sent when the port listens, not before.
        """
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.assertNotIn("READY", {k for m in self.sink.messages() for k in m})
        self.listener.listening.callback(object())
        [ready] = [m for m in self.sink.messages() if "READY" in m]
        self.assertEqual(ready["READY"], "1")
        self.assertEqual(ready["STATUS"], "2/2 endpoints up; listening on 127.0.0.1:23790")
        self.assertEqual(ready["MAINPID"], str(os.getpid()))

    def test_statusFollowsPool(self):
        """
        Each change of the pool's up count is sent as STATUS=.
        """
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.listener.listening.callback(object())
        self.sink.messages()
        self.pool.markDown(self.a, "refused")
        self.pool.markDown(self.b, "refused")
        self.pool.markDown(self.b, "refused again")  # no change, no message
        self.assertEqual(
            [m["STATUS"] for m in self.sink.messages()],
            [
                "1/2 endpoints up; listening on 127.0.0.1:23790",
                "0/2 endpoints up (refusing clients); listening on 127.0.0.1:23790",
            ],
        )

    def test_watchdogPings(self):
        """
        WATCHDOG=1 is sent at start and every interval, until stop.
        """
        self.service.startService()
        self.clock.advance(10)
        self.clock.advance(10)
        pings = [m for m in self.sink.messages() if m.get("WATCHDOG") == "1"]
        self.assertEqual(len(pings), 3)
        self.service.stopService()
        self.clock.advance(10)
        self.assertEqual([m for m in self.sink.messages() if "WATCHDOG" in m], [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_watchdogStopsWhenListenerGone(self):
        """
        Once a listener no longer listens, WATCHDOG=1 is no longer sent (systemd
        then restarts the gateway); STATUS= and the log say why, once.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.listener.listening.callback(object())
        self.sink.messages()
        self.listener.gone = "--listen-addr 127.0.0.1:23790: the listening port is closed"
        self.clock.advance(10)
        self.clock.advance(10)
        messages = self.sink.messages()
        self.assertNotIn("WATCHDOG", {k for m in messages for k in m})
        self.assertEqual(
            [m["STATUS"] for m in messages],
            ["not accepting clients: --listen-addr 127.0.0.1:23790: the listening port is closed"],
        )
        self.assertEqual(len([e for e in events if e["log_level"] == LogLevel.critical]), 1)

    def test_stoppingOnStop(self):
        """
        STOPPING=1 is sent on stop; the pool is no longer observed.
        """
        self.service.startService()
        self.listener.listening.callback(object())
        self.sink.messages()
        self.service.stopService()
        [stopping] = self.sink.messages()
        self.assertEqual(stopping["STOPPING"], "1")
        self.pool.markDown(self.a, "refused")
        self.assertEqual(self.sink.messages(), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_describePool(self):
        """
        The status text counts up endpoints and says when clients are refused.
        """
        self.assertEqual(describePool(self.pool), "2/2 endpoints up")
        self.pool.markDown(self.a, "x")
        self.pool.markDown(self.b, "x")
        self.assertEqual(describePool(self.pool), "0/2 endpoints up (refusing clients)")


class FakeTakeover:
    def __init__(self):
        self.committed = defer.Deferred()


class SuccessorNotifyTests(SynchronousTestCase):
    """
    A successor (live takeover) tells systemd it is the service's main
    process once it owns everything; a process taken over says nothing
    at its stop.
    """

    def setUp(self):
        self.clock = MemoryReactorClock()
        self.pool = UpstreamPool([Endpoint("10.0.0.1", 2379)], self.clock)
        self.sink = NotifySocket(self)
        self.listener = FakeListener()

    def test_readyAfterCommit(self):
        """
        READY=1 with MAINPID= this process waits for the takeover's commit,
        listening or not.
        """
        takeover = FakeTakeover()
        service = SystemdNotifyService(
            SystemdNotifier(self.sink.address), self.pool, self.listener, self.clock,
            takeover=takeover,
        )
        service.startService()
        self.addCleanup(service.stopService)
        self.listener.listening.callback(object())
        self.assertEqual([m for m in self.sink.messages() if "READY" in m], [])
        takeover.committed.callback(takeover)
        [ready] = [m for m in self.sink.messages() if "READY" in m]
        self.assertEqual(ready["MAINPID"], str(os.getpid()))
        self.assertIs(self.successResultOf(takeover.committed), takeover)

    def test_noStoppingAfterHandover(self):
        """
        Once handed over, the stop sends no STOPPING=1 (the service goes on
        in the successor).
        """
        service = SystemdNotifyService(
            SystemdNotifier(self.sink.address), self.pool, self.listener, self.clock
        )
        service.startService()
        self.listener.listening.callback(object())
        self.sink.messages()
        service.handedOver = True
        service.stopService()
        self.assertEqual(self.sink.messages(), [])
