"""
The forwarding step, in C (_etcdgw_relay) and in Python (the fallback), on
real loopback TCP sockets: both must give the same answers.
"""

import os
import socket
import struct
import sys
import types

from twisted.trial.unittest import SkipTest, TestCase

from etcdgw.fast import relay as relayModule
from etcdgw.fast import transport


def _tcpPair():
    """
    Two connected, non-blocking loopback TCP sockets.
    """
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    a = socket.create_connection(server.getsockname())
    b, _ = server.accept()
    server.close()
    for s in (a, b):
        s.setblocking(False)
    return a, b


def _readAll(sock, expected):
    sock.setblocking(True)
    sock.settimeout(5)
    chunks, got = [], 0
    while got < expected:
        chunk = sock.recv(expected - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


class RelayTestsMixin:
    """
    The relay's contract (see etcdgw/_relay.c); C{relay} is set by subclasses.
    """

    relay = None

    def setUp(self):
        # client -> (src) gateway (dst) -> member
        self.client, self.src = _tcpPair()
        self.dst, self.member = _tcpPair()
        for s in (self.client, self.src, self.dst, self.member):
            self.addCleanup(s.close)

    def step(self):
        return self.relay(self.src.fileno(), self.dst.fileno(), relayModule.buffer)

    def stepUntilAnswer(self):
        """
        Step until the relay has something to report (what was sent on
        loopback is normally readable at once; this bounds the rare wait).
        """
        for _ in range(100):
            result = self.step()
            if result is not None:
                return result
        return None

    def test_forwardsWhatArrived(self):
        """All that arrived is sent on: the count is returned."""
        self.client.sendall(b"GET /version")
        result = self.stepUntilAnswer()
        self.assertEqual(result, 12)
        self.assertEqual(_readAll(self.member, 12), b"GET /version")

    def test_nothingToRead(self):
        """Nothing waiting: None, and nothing sent."""
        self.assertIsNone(self.step())

    def test_endOfStream(self):
        """The source's end of stream: 0."""
        self.client.shutdown(socket.SHUT_WR)
        result = self.stepUntilAnswer()
        self.assertEqual(result, 0)

    def test_resetRaises(self):
        """A reset on the source raises OSError, as recv does."""
        self.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.client.close()
        with self.assertRaises(OSError) as caught:
            for _ in range(100):
                self.step()
        self.assertEqual(caught.exception.errno, 104)  # ECONNRESET

    def test_partialSend(self):
        """
        When the target's buffers are full, what was received and how much
        of it was sent are both returned, so the caller queues the rest.
        """
        self.dst.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        self.member.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        # Fill the path to the member, which does not read.
        try:
            while True:
                self.dst.send(b"f" * 65536)
        except BlockingIOError:
            pass
        self.client.sendall(b"x" * 1000)
        result = self.stepUntilAnswer()
        self.assertEqual(result, (1000, 0))

    def test_sendFailureIsLost(self):
        """
        A target that cannot be sent to at all: (n, -1), the target's
        connection is lost (not (n, 0): the caller would queue it and wait
        for a write path error that the failed send already consumed).
        """
        self.dst.shutdown(socket.SHUT_WR)
        self.client.sendall(b"y" * 10)
        result = self.stepUntilAnswer()
        self.assertEqual(result, (10, -1))

    def test_resetTargetIsLost(self):
        """
        A target whose peer reset: (n, -1). The failed send consumed the
        reset: the target's next read is a clean end of stream, which is
        why the caller must take (n, -1) as a lost connection at once.
        """
        self.member.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.member.close()
        _waitForError(self.dst)
        self.client.sendall(b"z" * 10)
        result = self.stepUntilAnswer()
        self.assertEqual(result, (10, -1))
        self.assertEqual(self.dst.recv(10), b"")

    def test_notADescriptor(self):
        """A closed descriptor raises OSError (EBADF), not a crash."""
        fd = os.dup(self.src.fileno())
        os.close(fd)
        with self.assertRaises(OSError):
            self.relay(fd, self.dst.fileno(), relayModule.buffer)


def _waitForError(sock):
    """
    Wait until the kernel reports an error or hang-up on C{sock} (poll(2)
    reads it without consuming it).
    """
    import select

    poller = select.poll()
    poller.register(sock, select.POLLERR | select.POLLHUP)
    if not poller.poll(5000):
        raise AssertionError("no reset arrived")


class PythonRelayTests(RelayTestsMixin, TestCase):
    relay = staticmethod(relayModule._relayPython)


class CRelayTests(RelayTestsMixin, TestCase):
    def setUp(self):
        try:
            import _etcdgw_relay
        except ImportError:
            self.unusable("_etcdgw_relay was not built (no C compiler or Python headers?)")
        if getattr(_etcdgw_relay, "CONTRACT", None) != relayModule.CONTRACT:
            self.unusable(
                f"_etcdgw_relay ({_etcdgw_relay.__file__}) was built from older sources "
                "(its CONTRACT differs): reinstall the project"
            )
        self.relay = _etcdgw_relay.relay
        super().setUp()

    def unusable(self, message):
        if os.environ.get("CI"):
            raise RuntimeError("CI is set and " + message)
        raise SkipTest(message)

    def test_usedWhenBuilt(self):
        """Where it was built, the gateway forwards with it."""
        self.assertTrue(relayModule.RELAY_IN_C)
        self.assertIs(relayModule.relay, self.relay)
        self.assertIs(transport._relay, self.relay)
        self.assertIsNotNone(relayModule.serve)


class _Count:
    def __init__(self):
        self.n = 0


class FakeFast:
    """
    What the batch step (serve) reads of a joined transport and of its
    target (the attributes of etcdgw.fast.transport.FastTransport).
    """

    def __init__(self, fd, target=None):
        self._fd = fd
        self._target = target
        self._pipe = None
        self._count = _Count()
        self._tempDataLen = 0
        self.dataBuffer = b""
        self.disconnecting = 0
        self._writeDisconnecting = False
        self.connected = 1
        self._pipeSource = None
        self._pipeBytes = 0


class ServeTests(CRelayTests):
    """
    The batch step (serve in _relay.c, used by etcdgw.fast.dispatch) gives
    the same answers as relay for a served transport (the contract tests
    above, run through it), and leaves to Python every event it may not
    serve, on the same conditions as transport._maySendNow.
    """

    def setUp(self):
        super().setUp()
        import _etcdgw_relay

        self.serve = _etcdgw_relay.serve
        self.target = FakeFast(self.dst.fileno())
        self.source = FakeFast(self.src.fileno(), self.target)

    def served(self, events, selectables=None, fastType=FakeFast):
        if selectables is None:
            selectables = {self.src.fileno(): self.source}
        return self.serve(
            events, selectables, relayModule.buffer, fastType, relayModule.READ_SIZE
        )

    def step(self):
        before = self.source._count.n
        rest, answers = self.served([(self.src.fileno(), 1)])
        self.assertEqual(rest, [])
        if answers:
            ((transport, target, answer),) = answers
            self.assertEqual((transport, target), (self.source, self.target))
            if isinstance(answer, OSError):
                raise answer
            return answer
        return (self.source._count.n - before) or None

    def test_notADescriptor(self):
        """A closed descriptor: the OSError is the answer, not a crash."""
        fd = os.dup(self.src.fileno())
        os.close(fd)
        self.source._fd = fd
        self.assertRaises(OSError, self.step)

    def assertLeft(self, events, **kwargs):
        """C{events} are all left to Python, untouched; nothing read."""
        self.client.sendall(b"data")
        rest, answers = self.served(events, **kwargs)
        self.assertEqual((rest, answers), (events, []))
        self.assertEqual(self.source._count.n, 0)

    def test_otherEventsLeft(self):
        """Writes, hang-ups, errors, unknown descriptors and other types are left."""
        fd = self.src.fileno()
        self.assertLeft([(fd, 4), (fd, 1 | 16), (fd, 8)])
        self.assertLeft([(fd + 1000, 1)])
        self.assertLeft([(fd, 1)], fastType=_Count)
        self.assertLeft([(fd, 1)], selectables={fd: object()})

    def test_unjoinedOrSplicingLeft(self):
        """A transport not joined, or splicing, is left (doRead copies or splices)."""
        self.source._target = None
        self.assertLeft([(self.src.fileno(), 1)])
        self.source._target = self.target
        self.source._pipe = (5, 6)
        self.assertLeft([(self.src.fileno(), 1)])

    def test_maySendNowAsPython(self):
        """
        Each condition that makes transport._maySendNow say no makes the
        batch step leave the event; with none, both say yes.
        """
        pipeSource = FakeFast(-1)
        pipeSource._pipeBytes = 10
        for name, value in [
            ("_tempDataLen", 3),
            ("dataBuffer", b"queued"),
            ("disconnecting", 1),
            ("_writeDisconnecting", True),
            ("connected", 0),
            ("_pipeSource", pipeSource),
        ]:
            self.target = FakeFast(self.dst.fileno())
            self.source._target = self.target
            setattr(self.target, name, value)
            self.assertFalse(transport._maySendNow(self.target), name)
            self.assertLeft([(self.src.fileno(), 1)])
        self.target = FakeFast(self.dst.fileno())
        self.target._pipeSource = FakeFast(-1)  # a pipe into it, empty
        self.source._target = self.target
        self.assertTrue(transport._maySendNow(self.target))
        self.client.sendall(b"abc")
        self.assertEqual(self.stepUntilAnswer(), 6 * len(b"data") + 3)  # all that waited

    def test_bulkReadAnswered(self):
        """A read that fills the buffer is answered (doRead starts splicing), not counted."""
        self.client.sendall(b"b" * (4 * relayModule.READ_SIZE))
        for _ in range(100):
            rest, answers = self.served([(self.src.fileno(), 1)])
            if answers:
                break
        ((_, _, answer),) = answers
        self.assertEqual(answer, relayModule.READ_SIZE)
        self.assertEqual(self.source._count.n, 0)

    def test_manyInOneCall(self):
        """Several ready transports of one batch are served in one call, in order."""
        client2, src2 = _tcpPair()
        dst2, member2 = _tcpPair()
        for sock in (client2, src2, dst2, member2):
            self.addCleanup(sock.close)
        source2 = FakeFast(src2.fileno(), FakeFast(dst2.fileno()))
        self.client.sendall(b"one")
        client2.sendall(b"two!")
        selectables = {self.src.fileno(): self.source, src2.fileno(): source2}
        for _ in range(100):
            self.served([(self.src.fileno(), 1), (src2.fileno(), 1)], selectables)
            if self.source._count.n and source2._count.n:
                break
        self.assertEqual((self.source._count.n, source2._count.n), (3, 4))
        self.assertEqual(_readAll(self.member, 3), b"one")
        self.assertEqual(_readAll(member2, 4), b"two!")


class StaleBuildTests(TestCase):
    def test_staleBuildNotUsed(self):
        """
        A C module built from older sources (other answers: no CONTRACT, or
        another) is not used: the Python step is.
        """
        original = sys.modules.get("_etcdgw_relay")

        def restore():
            sys.modules.pop("_etcdgw_relay", None)
            if original is not None:
                sys.modules["_etcdgw_relay"] = original

        self.addCleanup(restore)
        for contract in (None, 1):
            stale = types.ModuleType("_etcdgw_relay")
            stale.relay = lambda src, dst, buffer: None
            if contract is not None:
                stale.CONTRACT = contract
            sys.modules["_etcdgw_relay"] = stale
            self.assertEqual(relayModule._load(), (relayModule._relayPython, None))
        current = types.ModuleType("_etcdgw_relay")
        current.relay = lambda src, dst, buffer: None
        current.serve = lambda *args: None
        current.CONTRACT = relayModule.CONTRACT
        sys.modules["_etcdgw_relay"] = current
        self.assertEqual(relayModule._load(), (current.relay, current.serve))


class FakePipeTransport:
    """
    What L{transport._PipeSweep} looks at: bytes spliced, bytes in the pipe.
    """

    def __init__(self):
        self._spliced = 0
        self._pipeBytes = 0
        self._target = object()
        self.closed = []

    def _closePipe(self, target):
        self.closed.append(target)
        transport._PipeSweep.of(self.reactor).remove(self)


class PipeSweepTests(TestCase):
    def setUp(self):
        from twisted.internet.task import Clock

        self.clock = Clock()
        self.sweep = transport._PipeSweep.of(self.clock)
        self.addCleanup(transport._PipeSweep._sweeps.pop, self.clock, None)

    def pipe(self):
        t = FakePipeTransport()
        t.reactor = self.clock
        self.sweep.add(t)
        return t

    def test_idlePipeClosedAfterOneToTwoPeriods(self):
        """An empty pipe that splices nothing is closed after one to two periods; the timer ends."""
        t = self.pipe()
        self.clock.advance(transport.PIPE_IDLE)
        self.assertEqual(t.closed, [])
        self.clock.advance(transport.PIPE_IDLE)
        self.assertEqual(t.closed, [t._target])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertNotIn(self.clock, transport._PipeSweep._sweeps)

    def test_busyOrFullPipeKept(self):
        """A pipe that spliced since the last look, or still holds bytes, is kept."""
        busy, full = self.pipe(), self.pipe()
        full._pipeBytes = 10
        for _ in range(5):
            busy._spliced += 65536
            self.clock.advance(transport.PIPE_IDLE)
        self.assertEqual((busy.closed, full.closed), ([], []))
        self.clock.advance(transport.PIPE_IDLE)
        self.assertEqual((len(busy.closed), full.closed), (1, []))
        full._pipeBytes = 0
        self.clock.advance(transport.PIPE_IDLE)
        self.assertEqual(len(full.closed), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_closedConnectionStopsTimer(self):
        """The last pipe closed by its connection cancels the timer."""
        t = self.pipe()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.sweep.remove(t)
        self.assertEqual(self.clock.getDelayedCalls(), [])
