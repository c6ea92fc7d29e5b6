"""
Tests for L{etcdgw.takeover}: the hand-over protocol between two gateway
processes, both sides in this process, each on its own
L{MemoryReactorClock}, over a real unix socket pair (descriptors must
pass); the exported pairs are stand-ins of L{etcdgw.portable}'s (real
sockets, so their descriptors are real).
"""

import gc
import os
import socket
import sys
import tempfile

import attr
from twisted.internet import protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from etcdgw import takeover
from etcdgw.config import TakeoverConfig
from etcdgw.endpoint import Endpoint
from etcdgw.listenaddr import parseListenAddress
from etcdgw.monitor import Monitor
from etcdgw.pool import DOWN, UpstreamPool
from etcdgw.tap import Options
from etcdgw.takeover import (
    MAX_FDS_PER_FRAME,
    PROTOCOL_VERSION,
    FrameReader,
    Handover,
    PidfileAside,
    SocketChannel,
    Takeover,
    TakeoverError,
    chunkPairs,
    encodeFrame,
    splitPairs,
    twistdPidfile,
)


A = Endpoint("127.0.0.1", 2379)
B = Endpoint("127.0.0.1", 22379)


def openDescriptors():
    """
    This process's open socket descriptors and what each is.
    """
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink("/proc/self/fd/" + fd)
        except OSError:
            continue  # the listing's own descriptor, closed by now
        if link.startswith("socket:"):
            found.add((fd, link))
    return found


def sameSocket(fd1, fd2):
    a, b = os.fstat(fd1), os.fstat(fd2)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


@attr.s
class Exported:
    record = attr.ib()
    data = attr.ib()
    fds = attr.ib()


class FakeBatch:
    """
    What L{etcdgw.portable.exportPairs} returns: pairs whose descriptors
    are duplicates the batch owns.
    """

    def __init__(self, pairs, skipped=()):
        self.pairs = pairs
        self.skipped = list(skipped)
        self.thawed = self.released = False

    def _close(self):
        for pair in self.pairs:
            for fd in pair.fds:
                os.close(fd)

    def thaw(self):
        self.thawed = True
        self._close()

    def release(self):
        self.released = True
        self._close()


class FakeAdopted:
    def __init__(self, pairs):
        self.pairs = pairs
        self.started = self.aborted = False

    def _close(self):
        for _, _, fds in self.pairs:
            for fd in fds:
                os.close(fd)

    def start(self):
        self.started = True
        self._close()

    def abort(self):
        self.aborted = True
        self._close()


class Factory(protocol.Factory):
    def __init__(self):
        self.clients = []


@attr.s
class Listener:
    flag = attr.ib()
    address = attr.ib()
    port = attr.ib()


class FakeGateway:
    def __init__(self, reactor, endpoints=(A, B), listeners=()):
        self.reactor = reactor
        self.pool = UpstreamPool(list(endpoints), reactor)
        self.monitor = Monitor(self.pool, reactor)
        self.factory = Factory()
        self.allListeners = list(listeners)
        self.notify = None
        self.takeover = None
        self.workers = None


class Pairs:
    """
    Real TCP-less socket pairs standing in for forwarded pairs: each
    exported pair's descriptors are duplicates of one end of each.
    """

    def __init__(self, testCase, count, fdsPerPair=2, data=b"queued"):
        self.ends = []
        self.exported = []
        for i in range(count):
            fds = []
            for _ in range(fdsPerPair):
                a, b = socket.socketpair()
                testCase.addCleanup(a.close)
                testCase.addCleanup(b.close)
                self.ends += [a, b]
                fds.append(os.dup(a.fileno()))
            self.exported.append(Exported({"n": i, "member": "127.0.0.1:2379"}, data + b"%d" % i, fds))


def listeningPort(testCase, reactor):
    """
    A real listening TCP socket served by one of our ports, on C{reactor}.
    """
    from etcdgw.listen import GatewayPort

    port = GatewayPort(0, Factory(), 50, "127.0.0.1", reactor)
    port.startListening()
    testCase.addCleanup(lambda: port.connected and port.connectionLost(None))
    return port


def pump(*reactors, rounds=200):
    """
    Serve every reader of C{reactors} until nothing more happens.
    """
    for _ in range(rounds):
        busy = False
        for reactor in reactors:
            reactor.running = True
            hooks, reactor.whenRunningHooks = reactor.whenRunningHooks, []
            for f, args, kwargs in hooks:
                f(*args, **kwargs)
                busy = True
            if any(call.getTime() <= reactor.seconds() for call in reactor.getDelayedCalls()):
                busy = True
            reactor.advance(0)
            for reader in list(reactor.getReaders()):
                if getattr(reader, "closed", False) or not hasattr(reader, "receiver"):
                    continue
                try:
                    reader.socket.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                except BlockingIOError:
                    continue
                except OSError:
                    pass
                reader.doRead()
                busy = True
            for writer in list(reactor.getWriters()):
                writer.doWrite()
                busy = True
        if not busy:
            return


class Recorder:
    def __init__(self):
        self.frames = []
        self.lost = []

    def frameReceived(self, header, payload, fds):
        self.frames.append((header, payload, fds))

    def channelLost(self, why):
        self.lost.append(why)


class FramingTests(SynchronousTestCase):
    """
    Frames: a JSON header and payload bytes, descriptors counted in the
    header.
    """

    def test_roundTrip(self):
        """
        Frames fed byte by byte come out whole, with their descriptors.
        """
        data = encodeFrame({"type": "a", "fds": 2}, b"xyz") + encodeFrame({"type": "b"})
        reader = FrameReader()
        frames = []
        for i in range(len(data)):
            frames += reader.feed(data[i : i + 1], [7, 8] if i == 0 else [])
        self.assertEqual(
            frames, [({"type": "a", "fds": 2}, b"xyz", [7, 8]), ({"type": "b"}, b"", [])]
        )

    def test_missingDescriptors(self):
        """
        A frame naming descriptors that did not arrive is refused.
        """
        with self.assertRaises(TakeoverError):
            FrameReader().feed(encodeFrame({"type": "a", "fds": 1}))

    def test_notJSON(self):
        """
        A header that is not a JSON object is refused.
        """
        with self.assertRaises(TakeoverError):
            FrameReader().feed(b"\0\0\0\3\0\0\0\0abc")
        with self.assertRaises(TakeoverError):
            FrameReader().feed(encodeFrame([1, 2]))

    def test_tooLarge(self):
        """
        A frame larger than any the protocol sends is refused at once.
        """
        with self.assertRaises(TakeoverError):
            FrameReader().feed(b"\xff\xff\xff\xff\0\0\0\0")

    def test_chunking(self):
        """
        Pairs are cut into frames of at most 250 descriptors, which
        L{splitPairs} takes apart again.
        """
        pairs = [Exported({"n": i}, b"d" * i, [i * 2, i * 2 + 1]) for i in range(300)]
        frames = chunkPairs(pairs)
        self.assertEqual(len(frames), 3)
        self.assertTrue(all(len(fds) <= MAX_FDS_PER_FRAME for _, _, fds in frames))
        back = []
        for header, payload, fds in frames:
            back += splitPairs(header, payload, fds)
        self.assertEqual(back, [(p.record, p.data, p.fds) for p in pairs])

    def test_chunkingByBytes(self):
        """
        A frame holds about 4 MiB of queued bytes at most.
        """
        pairs = [Exported({}, b"x" * (3 * 1024 * 1024), [i]) for i in range(3)]
        self.assertEqual(len(chunkPairs(pairs)), 3)

    def test_malformedPairs(self):
        """
        A pairs frame whose counts do not add up is refused.
        """
        [(header, payload, fds)] = chunkPairs([Exported({"n": 1}, b"abc", [7])])
        self.assertEqual(splitPairs(header, payload, fds), [({"n": 1}, b"abc", [7])])
        for header, payload, fds in [
            (header, payload[:-1], fds),
            (header, payload + b"x", fds),
            (header, payload, []),
            (dict(header, count=2), payload, fds),
            (dict(header, records=0), payload, fds),
            ({"type": "pairs"}, payload, fds),
        ]:
            with self.assertRaises(TakeoverError):
                splitPairs(header, payload, fds)

    def test_plainDataOnly(self):
        """
        Records that name a class or function are refused, unrun.
        """
        import pickle

        records = pickle.dumps([(OSError("x"), 0, 1)])
        header = {"type": "pairs", "count": 1, "records": len(records)}
        e = self.assertRaises(TakeoverError, splitPairs, header, records, [7])
        self.assertIn("not plain data: builtins.OSError", str(e))


class ChannelTests(SynchronousTestCase):
    """
    L{SocketChannel} over a real unix socket pair.
    """

    def setUp(self):
        self.reactor = MemoryReactorClock()
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.left, self.right = Recorder(), Recorder()
        self.a = SocketChannel(self.reactor, a, self.left)
        self.b = SocketChannel(self.reactor, b, self.right)
        self.addCleanup(self.a.abort)
        self.addCleanup(self.b.abort)

    def test_descriptors(self):
        """
        Descriptors sent with frames arrive with them, in order, as new
        descriptors of the same sockets; 600 go in frames of 250 at most.
        """
        before = openDescriptors()
        sockets = [socket.socket() for _ in range(600)]
        self.addCleanup(lambda: [s.close() for s in sockets])
        fds = [s.fileno() for s in sockets]
        for i in range(0, 600, MAX_FDS_PER_FRAME):
            self.a.send({"type": "x", "i": i}, b"p" * i, fds[i : i + MAX_FDS_PER_FRAME])
        pump(self.reactor)
        received = [fd for _, _, frameFds in self.right.frames for fd in frameFds]
        self.assertEqual([h["i"] for h, _, _ in self.right.frames], [0, 250, 500])
        self.assertEqual(len(received), 600)
        self.assertTrue(all(sameSocket(x, y) for x, y in zip(fds, received)))
        for fd in received:
            os.close(fd)
        for s in sockets:
            s.close()
        self.assertEqual(openDescriptors() - before, set())

    def test_ownedDescriptorsClosed(self):
        """
        Descriptors handed to the channel (C{owned}) are closed once sent.
        """
        s = socket.socket()
        self.addCleanup(s.close)
        fd = os.dup(s.fileno())
        self.a.send({"type": "x"}, fds=[fd], owned=True)
        with self.assertRaises(OSError):
            os.fstat(fd)
        pump(self.reactor)
        (_, _, [received]), = self.right.frames
        os.close(received)

    def test_bigFrame(self):
        """
        A frame larger than the socket buffer is sent in pieces as the
        peer reads.
        """
        self.a.send({"type": "big"}, b"x" * (8 * 1024 * 1024))
        self.assertIn(self.a, self.reactor.getWriters())
        pump(self.reactor, rounds=2000)
        [(header, payload, fds)] = self.right.frames
        self.assertEqual(len(payload), 8 * 1024 * 1024)
        self.assertNotIn(self.a, self.reactor.getWriters())

    def test_peerCloses(self):
        """
        The peer closing is told once; a channel closed here tells nothing.
        """
        self.a.abort()
        pump(self.reactor)
        self.assertEqual(self.right.lost, ["the other side closed the channel"])
        self.assertEqual(self.left.lost, [])
        self.assertEqual(self.reactor.getReaders(), [])

    def test_garbage(self):
        """
        Bytes that are not frames end the channel with the reason.
        """
        self.a.socket.send(b"\xff\xff\xff\xff\0\0\0\0")
        pump(self.reactor)
        self.assertEqual(len(self.right.lost), 1)
        self.assertIn("not the takeover protocol", self.right.lost[0])


class Sides:
    """
    An old gateway and its successor, each on its own clock, joined by a
    real socket pair; the old one has one listening port and C{count}
    pairs.
    """

    def __init__(self, testCase, count=3, fdsPerPair=2, adopt=None, timeout=30.0, raw=False):
        self.testCase = testCase
        self.oldReactor = MemoryReactorClock()
        self.newReactor = MemoryReactorClock()
        self.port = listeningPort(testCase, self.oldReactor)
        address = parseListenAddress(f"127.0.0.1:{self.port.getHost().port}")
        self.address = address
        self.old = FakeGateway(
            self.oldReactor, listeners=[Listener("--listen-addr", address, self.port)]
        )
        self.old.pool.markDown(B, "refused")
        self.new = FakeGateway(self.newReactor)
        self.pairs = Pairs(testCase, count, fdsPerPair)
        self.batch = None
        self.committed = []
        self.failed = []
        self.exits = []
        self.adoptedWith = None
        self.adopted = None
        self._adopt = adopt
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.handover = Handover(
            self.old, a, self.export, self.committed.append, self.failed.append, timeout=timeout
        )
        self.newPorts = []
        self.portNumber = self.port.getHost().port
        if raw:
            # A successor that says hello and then nothing.
            self.recorder = Recorder()
            self.raw = SocketChannel(self.newReactor, b, self.recorder)
            self.raw.send({"type": "hello", "version": PROTOCOL_VERSION, "pid": 1})
            testCase.addCleanup(self.raw.abort)
            return
        self.takeover = Takeover(
            self.new, fd=b.detach(), adoptPairs=self.adoptPairs, exit=self.exits.append,
            timeout=timeout,
        )

    def export(self, factory):
        self.batch = FakeBatch(self.pairs.exported, skipped=["tls"])
        return self.batch

    def adoptPairs(self, factory, pairs, listener=None):
        self.adoptedWith = pairs
        self.identities = [[os.fstat(fd)[1:3] for fd in fds] for _, _, fds in pairs]
        if self._adopt is not None:
            return self._adopt(factory, pairs)
        self.adopted = FakeAdopted(pairs)
        return self.adopted

    def start(self):
        self.takeover.connect()
        endpoint = self.takeover.endpoint("--listen-addr", self.address, fallback=None)
        endpoint.listen(Factory()).addCallback(self.newPorts.append)

    def run(self):
        pump(self.oldReactor, self.newReactor)

    def close(self):
        """
        Close the test's own sockets (the pairs' ends, the old port).
        """
        for end in self.pairs.ends:
            end.close()
        if self.port.connected:
            self.port.connectionLost(None)


class HandoverTests(SynchronousTestCase):
    """
    A whole takeover, and each way one fails.
    """

    def test_takeover(self):
        """
        The successor gets the listening socket, every pair (its record,
        queued bytes and descriptors of the same sockets) and the member
        state; the old side releases its batch and stops its port; the
        successor starts the pairs and accepts.
        """
        before = openDescriptors()
        sides = Sides(self, count=3)
        originals = [list(map(os.dup, p.fds)) for p in sides.pairs.exported]
        sides.start()
        sides.run()
        self.assertEqual(sides.failed, [])
        self.assertEqual(sides.exits, [])
        self.assertEqual(sides.committed, [sides.handover])
        self.assertTrue(sides.batch.released)
        self.assertFalse(sides.batch.thawed)
        [(record, data, fds)] = sides.adoptedWith[:1]
        self.assertEqual((record, data), ({"n": 0, "member": "127.0.0.1:2379"}, b"queued0"))
        self.assertEqual(len(sides.adoptedWith), 3)
        for ids, orig in zip(sides.identities, originals):
            self.assertEqual(ids, [os.fstat(fd)[1:3] for fd in orig])
        for orig in originals:
            for fd in orig:
                os.close(fd)
        self.assertTrue(sides.adopted.started)
        self.assertTrue(gc.isenabled())
        # The listening socket: the successor's port listens on it, and
        # accepts again; the old one's is closed.
        [port] = sides.newPorts
        self.assertEqual(port.getHost().port, sides.portNumber)
        self.assertIn(port, sides.newReactor.getReaders())
        self.assertFalse(sides.port.connected)
        # Still listening: the old side closed its descriptor without
        # shutting the shared socket down.
        client = socket.create_connection(("127.0.0.1", sides.portNumber))
        accepted, _ = port.socket.accept()
        accepted.close()
        client.close()
        self.assertEqual(self.successResultOf(sides.takeover.committed), sides.takeover)
        # Member state came over.
        self.assertEqual(sides.new.pool.stateOf(B).state, DOWN)
        self.assertEqual(sides.oldReactor.getDelayedCalls(), [])
        self.assertEqual(sides.newReactor.getDelayedCalls(), [])
        port.connectionLost(None)
        sides.close()
        self.assertEqual(openDescriptors() - before, set())

    def test_pairsInManyFrames(self):
        """
        300 pairs of two descriptors each (600, more than one message
        carries) all arrive.
        """
        sides = Sides(self, count=300)
        sides.start()
        sides.run()
        self.assertEqual(len(sides.adoptedWith), 300)
        self.assertEqual([r["n"] for r, _, _ in sides.adoptedWith], list(range(300)))
        self.assertTrue(sides.adopted.started)
        sides.newPorts[0].connectionLost(None)

    def test_versionMismatch(self):
        """
        A successor of another protocol version is refused before anything
        is paused or exported; it exits with status 1.
        """
        sides = Sides(self)
        sides.takeover.version = PROTOCOL_VERSION + 1
        sides.start()
        sides.run()
        self.assertIsNone(sides.batch)
        self.assertEqual(len(sides.failed), 1)
        self.assertIn(f"version {PROTOCOL_VERSION + 1}", sides.failed[0])
        self.assertIn(sides.port, sides.oldReactor.getReaders())
        self.assertEqual(sides.exits, [1])
        self.assertEqual(sides.takeover.phase, "failed")
        self.assertEqual(sides.oldReactor.getDelayedCalls(), [])

    def test_adoptionFails(self):
        """
        When the successor cannot adopt, it exits 1 and the old side thaws
        its pairs and accepts again; no descriptor is left open.
        """
        before = openDescriptors()

        def adopt(factory, pairs, listener=None):
            # As etcdgw.portable.adoptPairs: the descriptors are its own.
            for _, _, fds in pairs:
                for fd in fds:
                    os.close(fd)
            raise ValueError("record version 2, not 1")

        sides = Sides(self, adopt=adopt)
        sides.start()
        sides.run()
        self.assertEqual(sides.exits, [1])
        self.assertTrue(sides.batch.thawed)
        self.assertFalse(sides.batch.released)
        self.assertEqual(len(sides.failed), 1)
        self.assertIn("gave up: cannot adopt the connections: record version 2", sides.failed[0])
        self.assertIn(sides.port, sides.oldReactor.getReaders())
        self.assertTrue(sides.port.connected)
        sides.close()
        self.assertEqual(openDescriptors() - before, set())

    def test_successorKilled(self):
        """
        A successor that goes away after the hello (killed half-way):
        the old side thaws and accepts again.
        """
        before = openDescriptors()
        sides = Sides(self, raw=True)
        sides.run()
        self.assertIsNotNone(sides.batch)
        self.assertNotIn(sides.port, sides.oldReactor.getReaders())
        self.assertFalse(gc.isenabled(), "the collector is held while frozen")
        kinds = [h["type"] for h, _, _ in sides.recorder.frames]
        self.assertEqual(kinds, ["hello", "listeners", "state", "pairs", "end"])
        for _, _, fds in sides.recorder.frames:
            for fd in fds:
                os.close(fd)
        sides.raw.abort()
        sides.run()
        self.assertTrue(sides.batch.thawed)
        self.assertIn(sides.port, sides.oldReactor.getReaders())
        self.assertIn("went away", sides.failed[0])
        self.assertTrue(gc.isenabled())
        self.assertEqual(sides.oldReactor.getDelayedCalls(), [])
        sides.close()
        self.assertEqual(openDescriptors() - before, set())

    def test_oldTimeout(self):
        """
        No ready within the timeout: the old side thaws.
        """
        sides = Sides(self, timeout=5.0, raw=True)
        sides.run()
        sides.oldReactor.advance(5.0)
        self.assertTrue(sides.batch.thawed)
        self.assertEqual(sides.failed, ["no commit after 5s"])
        self.assertIn(sides.port, sides.oldReactor.getReaders())
        for _, _, fds in sides.recorder.frames:
            for fd in fds:
                os.close(fd)
        sides.close()

    def test_successorTimeout(self):
        """
        A running gateway that never answers: the successor exits 1 after
        the timeout.
        """
        reactor = MemoryReactorClock()
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        exits = []
        t = Takeover(FakeGateway(reactor), fd=b.detach(), exit=exits.append, timeout=3.0)
        t.connect()
        reactor.advance(3.0)
        self.assertEqual(exits, [1])
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_unreachable(self):
        """
        A --takeover path nobody listens on is one line.
        """
        t = Takeover(FakeGateway(MemoryReactorClock()), path="/nonexistent/control")
        e = self.assertRaises(TakeoverError, t.connect)
        self.assertIn("cannot reach the running gateway at /nonexistent/control", str(e))

    def test_notASocket(self):
        """
        An inherited descriptor that is not a unix stream socket is refused.
        """
        r, w = os.pipe()
        self.addCleanup(os.close, w)
        t = Takeover(FakeGateway(MemoryReactorClock()), fd=r)
        self.assertRaises(TakeoverError, t.connect)
        os.close(r)


class StateTests(SynchronousTestCase):
    """
    Member state carried over through the monitor.
    """

    def test_roundTrip(self):
        """
        Up/down, health, silence and check counters come over for the
        members both know; others are left alone.
        """
        clock = MemoryReactorClock()
        old = FakeGateway(clock, endpoints=(A, B))
        old.pool.markDown(B, "refused")
        from etcdgw.monitor import _Silence, _Track

        old.monitor._tracks[A.key] = _Track(2, 1)
        old.monitor._silence[A.key] = _Silence(3, 0, False, 0, "answered")
        old.pool.stateOf(A).dialFailures = 4
        import json

        exported = json.loads(json.dumps(old.monitor.exportState()))
        C = Endpoint("127.0.0.1", 32379)
        new = FakeGateway(clock, endpoints=(A, B, C))
        self.assertEqual(new.monitor.adoptState(exported), 2)
        self.assertEqual(new.pool.stateOf(B).state, DOWN)
        self.assertEqual(new.pool.stateOf(A).dialFailures, 4)
        self.assertEqual(new.monitor._tracks[A.key], _Track(2, 1))
        self.assertEqual(new.monitor._silence[A.key].answers, 3)
        self.assertTrue(new.pool.stateOf(C).up)


class PidfileTests(SynchronousTestCase):
    """
    twistd's pidfile, moved aside while a successor starts.
    """

    def test_twistdPidfile(self):
        """
        The pidfile of twistd's command line, before the plugin's name.
        """
        self.assertEqual(
            twistdPidfile(["twistd", "-n", "--pidfile=/run/x.pid", "etcd-gateway", "--pidfile=y"]),
            "/run/x.pid",
        )
        self.assertEqual(
            twistdPidfile(["twistd", "--pidfile", "/run/y.pid", "etcd-gateway"]), "/run/y.pid"
        )
        self.assertEqual(
            twistdPidfile(["twistd", "etcd-gateway"]), os.path.abspath("twistd.pid")
        )
        self.assertIsNone(twistdPidfile(["twistd", "--pidfile=", "etcd-gateway"]))
        self.assertIsNone(twistdPidfile(["trial", "tests"]))

    def test_moveRestoreDrop(self):
        """
        Only a pidfile naming this process is moved; restored on failure,
        dropped after the commit.
        """
        directory = tempfile.mkdtemp()
        path = os.path.join(directory, "twistd.pid")
        with open(path, "w") as f:
            f.write("1234")
        aside = PidfileAside(path, pid=1234)
        aside.move()
        self.assertFalse(os.path.exists(path))
        aside.restore()
        with open(path) as f:
            self.assertEqual(f.read(), "1234")
        aside.move()
        with open(path, "w") as f:
            f.write("5678")  # the successor's
        aside.drop()
        with open(path) as f:
            self.assertEqual(f.read(), "5678")
        self.assertEqual(os.listdir(directory), ["twistd.pid"])
        other = PidfileAside(path, pid=1)
        other.move()
        self.assertTrue(os.path.exists(path))


class OptionsTests(SynchronousTestCase):
    """
    --control-socket, --takeover and $ETCDGW_TAKEOVER_FD.
    """

    def parse(self, *args, environ=None):
        options = Options()
        if environ is not None:
            self.patch(os, "environ", environ)
        options.parseOptions(list(args))
        return options.config.takeover

    def test_default(self):
        """
        Off by default.
        """
        self.assertEqual(self.parse(environ={}), TakeoverConfig())
        self.assertFalse(self.parse(environ={}).successor)

    def test_flags(self):
        """
        The paths are kept as given.
        """
        config = self.parse("--control-socket=/run/gw/control", "--takeover=/run/gw/old",
                            environ={})
        self.assertEqual(config.controlSocket, "/run/gw/control")
        self.assertEqual(config.path, "/run/gw/old")
        self.assertTrue(config.successor)

    def test_environment(self):
        """
        A successor started by SIGUSR2 finds its descriptor in the environment.
        """
        self.assertEqual(self.parse(environ={"ETCDGW_TAKEOVER_FD": "3"}).fd, 3)

    def test_bad(self):
        """
        Bad values are one line naming the flag.
        """
        from twisted.python.usage import UsageError

        for args, environ, text in [
            (["--takeover="], {}, "--takeover"),
            (["--control-socket=" + "x" * 200], {}, "longer than a unix socket path"),
            ([], {"ETCDGW_TAKEOVER_FD": "x"}, "ETCDGW_TAKEOVER_FD"),
            (["--takeover=/a"], {"ETCDGW_TAKEOVER_FD": "3"}, "both"),
            (["--takeover=/a", "--worker-of=1"], {}, "the supervisor's"),
        ]:
            e = self.assertRaises(UsageError, self.parse, *args, environ=environ)
            self.assertIn(text, str(e))


class ListeningPortTests(SynchronousTestCase):
    """
    Our ports held for a takeover, handed over, or dropped.
    """

    def test_holdAndResume(self):
        """
        Held, a port reads nothing, and nothing else (a back-off's end)
        starts it reading; resumed, it reads again.
        """
        reactor = MemoryReactorClock()
        port = listeningPort(self, reactor)
        port.pauseForTakeover()
        self.assertNotIn(port, reactor.getReaders())
        port._resumeAccepting()
        self.assertNotIn(port, reactor.getReaders())
        port.resumeAfterTakeover()
        self.assertIn(port, reactor.getReaders())

    def test_handOverUnixKeepsFile(self):
        """
        A unix port handed over closes without removing its socket file,
        and the socket, held elsewhere, still takes connections.
        """
        from etcdgw.listen import GatewayUNIXPort

        reactor = MemoryReactorClock()
        path = os.path.join(tempfile.mkdtemp(), "gw.sock")
        port = GatewayUNIXPort(path, Factory(), 50, 0o600, reactor)
        port.startListening()
        kept = socket.socket(fileno=os.dup(port.fileno()))
        self.addCleanup(kept.close)
        port.handOver()
        self.assertFalse(port.connected)
        self.assertTrue(os.path.exists(path))
        client = socket.socket(socket.AF_UNIX)
        self.addCleanup(client.close)
        client.connect(path)
        accepted, _ = kept.accept()
        accepted.close()
        port.stopListening()  # the listener's own stop, later: nothing more

    def test_adoptListeningSocket(self):
        """
        A handed-over descriptor becomes one of our ports (the descriptor
        stays the caller's), with the listener's cap.
        """
        from etcdgw.listen import adoptListeningSocket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(5)
        self.addCleanup(s.close)
        reactor = MemoryReactorClock()
        port = adoptListeningSocket(reactor, s.fileno(), socket.AF_INET, Factory(),
                                    maxConnections=7)
        self.assertEqual(port.getHost().port, s.getsockname()[1])
        self.assertEqual(port.maxConnections, 7)
        self.assertIn(port, reactor.getReaders())
        port.handOver()
        os.fstat(s.fileno())


class FakeProcess:
    def __init__(self):
        self.pid = 4242
        self.signals = []

    def signalProcess(self, name):
        self.signals.append(name)


class ServiceTests(SynchronousTestCase):
    """
    L{TakeoverService}: SIGUSR2 and the control socket, in the running
    gateway.
    """

    def setUp(self):
        from etcdgw.takeover import TakeoverService

        self.reactor = MemoryReactorClock()
        self.reactor.running = True
        self.port = listeningPort(self, self.reactor)
        address = parseListenAddress(f"127.0.0.1:{self.port.getHost().port}")
        self.gateway = FakeGateway(
            self.reactor, listeners=[Listener("--listen-addr", address, self.port)]
        )
        self.directory = tempfile.mkdtemp()
        self.pidfile = os.path.join(self.directory, "twistd.pid")
        with open(self.pidfile, "w") as f:
            f.write(str(os.getpid()))
        self.spawned = []
        self.exits = []
        self.batches = []
        self.argv = ["/venv/bin/twistd", "-n", "etcd-gateway", "--endpoints=127.0.0.1:2379"]
        self.service = TakeoverService(
            self.gateway,
            controlSocket=os.path.join(self.directory, "control"),
            exportPairs=self.export,
            spawn=self.spawn,
            exit=self.exits.append,
            pidfile=self.pidfile,
            argv=self.argv,
        )

    def export(self, factory):
        self.batches.append(FakeBatch([]))
        return self.batches[-1]

    def spawn(self, protocol, executable, args, env, path, childFDs):
        # The successor's end, kept past the service's own close of it.
        child = socket.socket(fileno=os.dup(childFDs[3]))
        self.addCleanup(child.close)
        process = FakeProcess()
        self.spawned.append((protocol, executable, args, env, path, childFDs, child, process))
        return process

    def test_sigusr2StartsSuccessor(self):
        """
        SIGUSR2 starts this twistd's command line again, with the socket
        pair's end as descriptor 3 named in the environment, the pidfile
        moved aside; the successor's failure puts the pidfile back and
        kills it.
        """
        self.service.spawnSuccessor()
        [(protocol, executable, args, env, path, childFDs, child, process)] = self.spawned
        self.assertEqual(executable, sys.executable)
        self.assertEqual(args, takeover.successorCommand(self.argv))
        self.assertEqual(args[3:], ["-n", "etcd-gateway", "--endpoints=127.0.0.1:2379"])
        self.assertEqual(env["ETCDGW_TAKEOVER_FD"], "3")
        self.assertNotIn("WATCHDOG_PID", env)
        self.assertEqual(sorted(childFDs), [0, 1, 2, 3])
        self.assertEqual(path, os.getcwd())
        self.assertFalse(os.path.exists(self.pidfile))
        self.assertIsNotNone(self.service.current)
        # A second SIGUSR2 meanwhile starts nothing.
        self.service.spawnSuccessor()
        self.assertEqual(len(self.spawned), 1)
        child.close()
        pump(self.reactor)
        self.assertIsNone(self.service.current)
        self.assertTrue(os.path.exists(self.pidfile))
        self.assertEqual(process.signals, ["KILL"])
        self.assertEqual(self.exits, [])

    def test_notTwistd(self):
        """
        A process not started by twistd (twist, trial) starts no successor
        on SIGUSR2, and says why.
        """
        self.service.argv = ["/usr/lib/python3/dist-packages/twisted/__main__.py", "etcd-gateway"]
        self.service.spawnSuccessor()
        self.assertEqual(self.spawned, [])
        self.assertTrue(os.path.exists(self.pidfile))

    def test_controlSocket(self):
        """
        The control socket listens (mode 0600) while the service runs, each
        connection a successor; it is removed at stop.
        """
        self.service.startService()
        path = self.service.controlSocket
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        client = socket.socket(socket.AF_UNIX)
        self.addCleanup(client.close)
        client.connect(path)
        self.service.control.doRead()
        self.assertIsNotNone(self.service.current)
        # Another one meanwhile is refused, with the reason.
        other = socket.socket(socket.AF_UNIX)
        self.addCleanup(other.close)
        other.connect(path)
        self.service.control.doRead()
        [(header, _, _)] = FrameReader().feed(other.recv(65536))
        self.assertEqual(header["type"], "refuse")
        self.assertIn("already running", header["reason"])
        self.service.current._fail("test over")
        self.service.stopService()
        self.assertFalse(os.path.exists(path))

    def test_committed(self):
        """
        After the commit the process stops and exits 0 without removing
        the pidfile; the aside copy goes; systemd hears no STOPPING.
        """

        class Notify:
            handedOver = False

        self.gateway.notify = Notify()
        self.service.startService()
        self.service.spawnSuccessor()
        with open(self.pidfile, "w") as f:
            f.write("4242")  # the successor's own
        handover = self.service.current
        handover.successorControl = self.service.controlSocket
        self.service._committed(handover)
        self.assertTrue(self.gateway.notify.handedOver)
        self.assertTrue(self.reactor.hasStopped)
        after = self.reactor.triggers["after"]["shutdown"]
        self.assertEqual([(f, a) for f, a, k in after], [(self.exits.append, (0,))])
        self.assertEqual(sorted(os.listdir(self.directory)), ["control", "twistd.pid"])
        # The successor named the same control socket path: not removed.
        self.assertTrue(os.path.exists(self.service.controlSocket))
        self.service.stopService()
        self.assertTrue(os.path.exists(self.service.controlSocket))
        handover.channel.abort()


class WiringTests(SynchronousTestCase):
    """
    What L{etcdgw.gateway.buildGateway} makes of the takeover flags.
    """

    def build(self, *args):
        from etcdgw.gateway import buildGateway

        self.patch(os, "environ", {})
        options = Options()
        options.parseOptions(["--listen-addr=127.0.0.1:0", "--metrics-addr=127.0.0.1:0"]
                             + list(args))
        return buildGateway(options.config, MemoryReactorClock())

    def test_runningGateway(self):
        """
        Every gateway can be taken over (SIGUSR2); the control socket is
        its flag; it takes nothing over itself.
        """
        gateway = self.build("--control-socket=/run/gw/control")
        self.assertIsNone(gateway.takeover)
        self.assertEqual(gateway.takeovers.controlSocket, "/run/gw/control")
        self.assertIs(gateway.service.getServiceNamed("takeover"), gateway.takeovers)
        self.assertIsNone(self.build().takeovers.controlSocket)

    def test_successor(self):
        """
        A successor's listeners (clients' and operator's) ask the takeover
        for their sockets; systemd's READY waits for its commit.
        """
        from etcdgw.takeover import _AdoptingEndpoint

        gateway = self.build("--takeover=/run/gw/control")
        self.assertIsInstance(gateway.takeover, Takeover)
        self.assertEqual(gateway.takeover.path, "/run/gw/control")
        for listener, flag in ((gateway.listener, "--listen-addr"), (gateway.web, "--metrics-addr")):
            self.assertIsInstance(listener.endpoint, _AdoptingEndpoint)
            self.assertEqual(listener.endpoint.flag, flag)


class WorkersTests(SynchronousTestCase):
    """
    --workers: each worker of the successor supervisor takes over from one
    of the old one's.
    """

    def test_workerEnvironment(self):
        """
        A worker started to take over finds the old worker's control socket
        and "hold" in its environment.
        """
        options = Options()
        self.patch(os, "environ", {"ETCDGW_TAKEOVER_FROM": "@etcd-gateway-takeover-12",
                                   "ETCDGW_TAKEOVER_HOLD": "1"})
        options.parseOptions(["--worker-of=5"])
        self.assertEqual(
            options.config.takeover, TakeoverConfig(path="@etcd-gateway-takeover-12", hold=True)
        )

    def test_workerArguments(self):
        """
        Workers do not get the supervisor's takeover flags.
        """
        from etcdgw.workers import workerArguments

        self.assertEqual(
            workerArguments(["--control-socket=/run/c", "--takeover", "/run/c", "--endpoints=x"], 7),
            ["--endpoints=x", "--worker-of=7"],
        )

    def test_abstractControlSocket(self):
        """
        A worker's control socket is abstract (nothing to remove), and only
        a process of the same user gets in.
        """
        from etcdgw.takeover import ControlSocket, workerControl

        reactor = MemoryReactorClock()
        accepted = []
        control = ControlSocket(reactor, workerControl(os.getpid()) + "-test", accepted.append)
        control.listen()
        self.addCleanup(control.close)
        client = socket.socket(socket.AF_UNIX)
        self.addCleanup(client.close)
        client.connect("\0" + control.path[1:])
        control.doRead()
        self.assertEqual(len(accepted), 1)
        accepted[0].close()

    def test_childrenIgnoreSIGUSR2(self):
        """
        Workers and successors ignore SIGUSR2 until they handle it.
        """
        from etcdgw.workers import TWISTD

        self.assertIn("signal.signal(signal.SIGUSR2, signal.SIG_IGN)", TWISTD)


class StopTests(SynchronousTestCase):
    """
    The running gateway stops (SIGTERM) in the middle of a takeover.
    """

    def test_stopThaws(self):
        """
        Its pairs are thawed first, so the drain sees them; the successor
        is told nothing more and gives up on its own.
        """
        from etcdgw.takeover import TakeoverService

        sides = Sides(self, raw=True)
        service = TakeoverService(sides.old, exportPairs=sides.export)
        service.startService()
        sides.handover._failed = service._failed
        service.current = sides.handover
        sides.run()
        self.assertIsNotNone(sides.batch)
        service.stopService()
        self.assertTrue(sides.batch.thawed)
        self.assertIsNone(service.current)
        self.assertEqual(sides.oldReactor.getDelayedCalls(), [])
        for _, _, fds in sides.recorder.frames:
            for fd in fds:
                os.close(fd)
        sides.close()


class FallbackTests(SynchronousTestCase):
    """
    A successor's listener that the running gateway does not have.
    """

    def test_listensItself(self):
        """
        It listens as configured, accepting only from the commit on; a
        listener of the old one nobody asked for is closed here.
        """
        sides = Sides(self)
        own = listeningPort(self, sides.newReactor)

        class Fallback:
            def listen(self, factory):
                from twisted.internet import defer

                return defer.succeed(own)

        ports = []
        sides.start()
        other = parseListenAddress("127.0.0.1:1")
        sides.takeover.endpoint("--metrics-addr", other, Fallback()).listen(Factory()).addCallback(
            ports.append
        )
        readingAtAdoption = []

        def adopt(factory, pairs, listener=None):
            readingAtAdoption.append(own in sides.newReactor.getReaders())
            sides.adopted = FakeAdopted(pairs)
            return sides.adopted

        sides._adopt = adopt
        sides.run()
        self.assertEqual(ports, [own])
        # Held before the commit ...
        self.assertEqual(readingAtAdoption, [False])
        self.assertTrue(sides.adopted.started)
        # ... accepting after it.
        self.assertIn(own, sides.newReactor.getReaders())
        self.assertEqual(len(sides.takeover.ports), 2)
        sides.newPorts[0].connectionLost(None)
        own.connectionLost(None)
        sides.close()

    def test_cannotListen(self):
        """
        A listener that cannot listen ends the takeover: exit 1, one line
        naming the flag; the running gateway thaws.
        """
        sides = Sides(self)

        class Fallback:
            def listen(self, factory):
                from twisted.internet import defer

                return defer.fail(OSError(98, "Address already in use"))

        sides.start()
        sides.takeover.endpoint(
            "--metrics-addr", parseListenAddress("127.0.0.1:1"), Fallback()
        ).listen(Factory())
        sides.run()
        self.assertEqual(sides.exits, [1])
        self.assertTrue(sides.batch.thawed)
        self.assertIn("--metrics-addr: cannot listen on 127.0.0.1:1", sides.failed[0])
        self.assertTrue(sides.port.connected)
        self.assertIn(sides.port, sides.oldReactor.getReaders())
        sides.close()


class FakeWorkers:
    def __init__(self, addresses, count=1):
        self.addresses = addresses
        self.count = count
        self.handedOver = False

    def takeoverAddresses(self):
        return self.addresses

    def handOver(self):
        self.handedOver = True


class WorkersProtocolTests(SynchronousTestCase):
    """
    The takeover of a gateway with --workers, as its supervisor sees it.
    """

    def test_successorWithoutWorkersRefused(self):
        """
        A successor that runs no workers cannot take over a gateway whose
        workers hold connections: refused before anything is frozen.
        """
        sides = Sides(self)
        sides.old.workers = FakeWorkers(["@etcd-gateway-takeover-9"])
        sides.start()
        sides.run()
        self.assertIsNone(sides.batch)
        self.assertIn("runs no --workers", sides.failed[0])
        self.assertEqual(sides.exits, [1])
        sides.close()

    def test_tooFewWorkers(self):
        """
        A successor with fewer workers than the old one's gives up before
        anything is frozen.
        """
        sides = Sides(self)
        sides.old.workers = FakeWorkers(["@a", "@b"])
        sides.new.workers = FakeWorkers([], count=1)
        sides.new.workers.abandonTakeover = lambda: None
        sides.start()
        sides.run()
        self.assertIsNone(sides.batch)
        self.assertEqual(sides.exits, [1])
        self.assertIn("has 2 worker(s) to hand over, --workers here gives 1", sides.failed[0])
        sides.close()
