"""
The io_uring ring (etcdgw/fast/_ring.c, etcdgw.fast.ring) on real sockets:
what it forwards, what it hands back, and that a slow reader holds neither
the writer nor the other pairs. The gateway's own promise tests
(test_reliability_bytes, test_proxy_loopback's Ring classes, test_portable's
RingTransferTests) run through it too; here are the ring's own.

Where the kernel refuses io_uring these fail under CI (with the reason) and
skip elsewhere.
"""

import os
import select
import socket
import threading
import time

from twisted.internet.epollreactor import EPollReactor
from twisted.trial.unittest import SkipTest, TestCase

from etcdgw.fast import ring
from etcdgw.fast.dispatch import leanDispatch
from etcdgw.pool import ByteCount
from tests.test_reactor import Reader
from tests.test_relay import _tcpPair
from tests.integration.reliability_helpers import (
    ThreadedServer,
    echoHandler,
    exchange,
    linger0,
    report,
    startGateway,
)


def _usable():
    why = ring.available()
    if why is None:
        try:
            with select.epoll() as ep:
                ring._etcdgw_ring.Ring(ep.fileno(), ring.BULK, 4, 4096).close()
        except OSError as e:
            why = f"io_uring refused: {e}"
    if why is not None:
        if os.environ.get("CI"):
            raise AssertionError(f"io_uring is not usable under CI: {why}")
        raise SkipTest(f"io_uring is not usable here: {why}")


class EngineTests(TestCase):
    """
    One ring, pairs of TCP sockets: client C{c} -> gateway's C{a} (ring)
    C{b} -> member C{m}.
    """

    def setUp(self):
        _usable()
        self.epoll = select.epoll()
        self.addCleanup(self.epoll.close)
        self.engine = ring._etcdgw_ring.Ring(self.epoll.fileno(), ring.BULK, 4, 65536)
        self.addCleanup(self.engine.close)
        self.sockets = []

    def pair(self):
        c, a = _tcpPair()
        b, m = _tcpPair()
        self.sockets += [c, a, b, m]
        for s in (c, a, b, m):
            s.setblocking(True)
            self.addCleanup(s.close)
        counts = ByteCount(), ByteCount()
        slot = self.engine.add("a", "b", a.fileno(), b.fileno(), *counts)
        return c, m, slot, counts

    def turn(self, until, timeout=10):
        """Turn the ring until C{until()} is true; every record that left."""
        left = []
        deadline = time.monotonic() + timeout
        while not until():
            self.assertLess(time.monotonic(), deadline, "timed out")
            _, records = self.engine.wait(0.01)
            left += records or []
        return left

    def test_forwardsAndCounts(self):
        """Bytes go both ways, in order, and are counted per direction."""
        c, m, slot, (up, down) = self.pair()
        m.setblocking(False)
        got = bytearray()

        def read(sock, into):
            try:
                into += sock.recv(65536)
            except BlockingIOError:
                pass
            return False

        for i in range(50):
            c.sendall(b"request %d;" % i)
        want = b"".join(b"request %d;" % i for i in range(50))
        self.turn(lambda: read(m, got) or bytes(got) == want)
        m.sendall(b"answer")
        c.setblocking(False)
        back = bytearray()
        self.turn(lambda: read(c, back) or bytes(back) == b"answer")
        self.assertEqual((up.n, down.n), (len(want), 6))
        self.assertEqual(self.engine.active(), 1)

    def test_endOfStreamAndReset(self):
        """
        An end of stream and a reset take the pair out, each named on its
        direction; nothing is in flight.
        """
        c, m, slot, _ = self.pair()
        c.shutdown(socket.SHUT_WR)
        (record,) = self.turn(lambda: False if not self.engine.active() == 0 else True)
        self.assertEqual(
            record[2], (("a", "b", 0, False, None), ("b", "a", None, False, None))
        )
        c, m, slot, _ = self.pair()
        linger0(m)
        m.close()
        (record,) = self.turn(lambda: self.engine.active() == 0)
        (_, _, read, failed, rest) = record[2][1]
        self.assertIsInstance(read, ConnectionResetError)
        self.assertEqual((failed, rest), (False, None))

    def test_bulkLeavesAfterSending(self):
        """A read that fills a whole buffer is sent, then the pair leaves (BULK)."""
        c, m, slot, (up, _) = self.pair()
        c.sendall(os.urandom(4 * 65536))
        (record,) = self.turn(lambda: self.engine.active() == 0)
        self.assertIs(record[2][0][2], ring.BULK)
        self.assertEqual(record[2][0][4], None)  # nothing left over
        self.assertEqual(up.n, 65536)

    def test_slowReaderHoldsNoSharedBuffer(self):
        """
        A member that reads nothing stalls its own pair only: with 4 shared
        buffers, 8 other pairs are served meanwhile, and the writer is held
        back by TCP once the socket buffers are full.
        """
        c, m, slot, (up, _) = self.pair()
        c.setblocking(False)
        sent = 0
        deadline = time.monotonic() + 1.0
        chunk = b"x" * 1000  # small: the ring's reads never fill a buffer
        while time.monotonic() < deadline:
            try:
                sent += c.send(chunk)
            except BlockingIOError:
                pass
            _, left = self.engine.wait(0.001)
            self.assertIsNone(left)
        others = [self.pair() for _ in range(8)]
        for oc, om, _, _ in others:
            oc.sendall(b"ping")
            om.setblocking(False)

        def arrived(sock):
            try:
                return sock.recv(4, socket.MSG_PEEK) == b"ping"
            except BlockingIOError:
                return False

        self.turn(lambda: all(arrived(o[1]) for o in others))
        report("ring slow-reader", writerBytes=sent, forwarded=up.n)
        self.assertLess(sent, 64 * 1024 * 1024)  # held back, not absorbed
        self.assertEqual(self.engine.active(), 9)

    def test_leaveHandsBackInFlight(self):
        """
        Taken out while a send waits for a reader, the pair hands back what
        it read and did not send: with what the member then reads, exactly
        what the client sent, in order.
        """
        c, m, slot, _ = self.pair()
        data = os.urandom(8 * 1024 * 1024)
        c.setblocking(False)
        offset = 0
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            try:
                offset += c.send(data[offset : offset + 1000])
            except BlockingIOError:
                pass
            self.engine.wait(0.001)
        record = self.engine.leave(slot)
        self.assertEqual(self.engine.active(), 0)
        rest = record[2][0][4] or b""
        m.setblocking(False)
        received = bytearray()
        try:
            while True:
                piece = m.recv(1 << 20)
                if not piece:
                    break
                received += piece
        except BlockingIOError:
            pass
        # What the gateway's socket a still holds unread comes after.
        self.assertEqual(bytes(received) + rest, data[: len(received) + len(rest)])
        report("ring leave", member=len(received), handedBack=len(rest), sent=offset)


    def test_leaveAll(self):
        """Every pair comes out at once, each with its record."""
        for _ in range(5):
            self.pair()
        self.assertEqual(self.engine.active(), 5)
        records = self.engine.leaveAll()
        self.assertEqual(len(records), 5)
        self.assertEqual(self.engine.active(), 0)
        self.assertEqual(self.engine.leaveAll(), [])


class DispatchTests(TestCase):
    """
    A reactor whose turns wait in the ring (the lean dispatch with
    C{useRing}): its own descriptors and timers work as on epoll.
    """

    def setUp(self):
        _usable()
        self.reactor = EPollReactor()
        self.addCleanup(self.reactor._poller.close)
        self.assertTrue(leanDispatch(self.reactor, useRing=True))
        self.assertIsNotNone(ring.open(self.reactor))
        self.addCleanup(ring.close, self.reactor)

    def test_wakesForReactorEvents(self):
        """
        A turn blocked in the ring returns once one of the reactor's own
        descriptors is readable, and handles it.
        """
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        seen = []
        self.reactor.addReader(Reader(a, seen))
        for _ in range(3):
            self.reactor.doIteration(0)  # settle: nothing ready
        threading.Timer(0.1, b.send, (b"ping",)).start()
        start = time.monotonic()
        while not seen and time.monotonic() - start < 5:
            self.reactor.doIteration(5)
        took = time.monotonic() - start
        report("ring wake", seconds=round(took, 3))
        self.assertEqual(seen, [b"ping"])
        self.assertLess(took, 1.0)

    def test_timeoutKept(self):
        """With nothing to do, a turn returns after its timeout, not much later."""
        for _ in range(3):
            self.reactor.doIteration(0)
        start = time.monotonic()
        self.reactor.doIteration(0.2)
        took = time.monotonic() - start
        self.assertGreaterEqual(took, 0.19)
        self.assertLess(took, 0.6)


class GatewayTests(TestCase):
    """
    The gateway process forwards through the ring by default, and on epoll
    with C{--forward=epoll}; each says so in one line.
    """

    def setUp(self):
        _usable()
        self.echo = ThreadedServer(echoHandler)
        self.addCleanup(self.echo.close)

    def test_ringByDefault(self):
        gw = startGateway(self, self.echo.address, "--health-check=tcp")
        received, _ = exchange(gw.address, [b"through io_uring"])
        self.assertEqual(received, b"through io_uring")
        gw.waitForLog("forwarding joined pairs through io_uring")
        self.assertNotIn("not io_uring", gw.log())

    def test_epollWhenAsked(self):
        gw = startGateway(self, self.echo.address, "--health-check=tcp", "--forward=epoll")
        received, _ = exchange(gw.address, [b"on epoll"])
        self.assertEqual(received, b"on epoll")
        self.assertNotIn("io_uring", gw.log())
