"""
Reliability: every byte, in order, both ways, through the real gateway
process; a slow reader does not grow the gateway's memory; resets leave no
descriptor behind.

The members here are small servers on 127.0.0.1 (echo, source, reset) in
front of which the gateway runs as a real C{twistd -n etcd-gateway} process.
C{ETCDGW_LONG=1} runs more examples and bigger payloads.
"""

import hashlib
import socket
import threading
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twisted.trial.unittest import TestCase

from tests.integration.reliability_helpers import (
    ThreadedServer,
    digestHandler,
    echoHandler,
    exchange,
    fdCount,
    hexdigest,
    linger0,
    pattern,
    report,
    resetHandler,
    resetRecordingEchoHandler,
    rssKiB,
    scaled,
    sourceHandler,
    startGateway,
    waitUntil,
)

MiB = 1 << 20


#: At most this many chunks per payload: tiny chunks of a large payload would
#: measure Python's sendall, not the gateway.
MAX_CHUNKS = 2000


def split(payload, sizes):
    """
    Cut C{payload} into chunks of C{sizes}, cycled (each at least
    1/L{MAX_CHUNKS} of the payload).
    """
    smallest = -(-len(payload) // MAX_CHUNKS)
    chunks, offset, i = [], 0, 0
    while offset < len(payload):
        size = max(sizes[i % len(sizes)], smallest)
        chunks.append(payload[offset : offset + size])
        offset += size
        i += 1
    return chunks


def streamEcho(address, size, chunk=256 * 1024, seed=1):
    """
    Send C{size} pattern bytes through an echo upstream, half-close, and read
    the echo until EOF, hashing both on the fly (no payload is held whole).

    @return: C{(sent digest, received digest, received length, seconds)}.
    """
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=120)
    sent = hashlib.sha256()
    received = hashlib.sha256()
    total = 0
    errors = []

    def writer():
        try:
            offset = 0
            while offset < size:
                piece = pattern(offset, min(chunk, size - offset), seed)
                sent.update(piece)
                sock.sendall(piece)
                offset += len(piece)
            sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            errors.append(e)

    start = time.monotonic()
    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        while True:
            data = sock.recv(MiB)
            if not data:
                break
            received.update(data)
            total += len(data)
    finally:
        t.join(120)
        sock.close()
    if errors:
        raise errors[0]
    return sent.hexdigest(), received.hexdigest(), total, time.monotonic() - start


def patternDigest(size, seed=0, chunk=4 * MiB):
    """
    The SHA-256 of C{pattern(0, size, seed)}, computed piece by piece.
    """
    h = hashlib.sha256()
    for offset in range(0, size, chunk):
        h.update(pattern(offset, min(chunk, size - offset), seed))
    return h.hexdigest()


class ByteExactnessTests(TestCase):
    """
    Random payloads and chunkings, both directions, with half-close from
    either side, through the gateway process; checked by SHA-256.
    """

    def setUp(self):
        self.echo = ThreadedServer(echoHandler)
        self.addCleanup(self.echo.close)
        self.digest = ThreadedServer(digestHandler)
        self.addCleanup(self.digest.close)
        # Members that are not etcd, which count every connection: no
        # answer probes (--health-check=tcp, as etcd's gateway).
        self.echoGateway = startGateway(self, self.echo.address, "--health-check=tcp")
        self.digestGateway = startGateway(self, self.digest.address, "--health-check=tcp")

    def test_randomPayloadsBothDirections(self):
        """
        For random payload sizes (0 to 2 MiB; 16 MiB long) and chunkings, the
        client's bytes reach the member and the member's bytes reach the
        client, exactly, with the client half-closing first (echo) or the
        member half-closing first (the client keeps sending after it).
        """
        figures = {"examples": 0, "bytes": 0, "lost": 0}
        maxSize = scaled(2 * MiB, 16 * MiB)

        @settings(
            max_examples=scaled(100, 500),
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        @given(
            size=st.integers(0, maxSize),
            reply=st.integers(0, maxSize),
            sizes=st.lists(st.integers(1, 256 * 1024), min_size=1, max_size=8),
            seed=st.integers(0, 7),
            before=st.floats(0, 1),
        )
        def check(size, reply, sizes, seed, before):
            payload = pattern(seed * 7919, size, seed)
            chunks = split(payload, sizes)
            # Client half-closes first: the echo must still come back whole.
            received, _ = exchange(self.echoGateway.address, chunks)
            self.assertEqual(len(received), size)
            self.assertEqual(hexdigest([received]), hexdigest([payload]))
            # Member half-closes first: the client keeps sending after it.
            self._memberHalfClosesFirst(chunks, payload, reply, seed, before)
            figures["examples"] += 1
            figures["bytes"] += 2 * size + reply

        check()
        report("byte-exactness", **figures)

    def _memberHalfClosesFirst(self, chunks, payload, reply, seed, before):
        host, port = self.digestGateway.address.rsplit(":", 1)
        recorded = len(self.digest.results)
        sock = socket.create_connection((host, int(port)), timeout=60)
        try:
            sock.sendall(b"%d %d\n" % (reply, seed))
            cut = int(len(chunks) * before)
            sender = threading.Thread(
                target=lambda: [sock.sendall(c) for c in chunks[:cut]], daemon=True
            )
            sender.start()
            got = hashlib.sha256()
            length = 0
            while True:
                data = sock.recv(MiB)
                if not data:
                    break
                got.update(data)
                length += len(data)
            sender.join(60)
            self.assertEqual(length, reply)
            self.assertEqual(got.hexdigest(), hexdigest([pattern(0, reply, seed)]))
            for c in chunks[cut:]:
                sock.sendall(c)  # after the member's half-close
            sock.shutdown(socket.SHUT_WR)
            self.assertEqual(sock.recv(1), b"")
        finally:
            sock.close()
        waitUntil(lambda: len(self.digest.results) > recorded, 30, message="member digest")
        self.assertEqual(
            self.digest.results[recorded], (len(payload), hexdigest([payload]))
        )

    def test_largePayload(self):
        """
        One payload of 64 MiB (512 MiB long) through the gateway and back,
        exactly.
        """
        size = scaled(64 * MiB, 512 * MiB)
        sent, received, length, seconds = streamEcho(self.echoGateway.address, size)
        self.assertEqual(length, size)
        self.assertEqual(received, sent)
        report(
            "large-payload",
            bytes=2 * size,
            seconds=round(seconds, 2),
            MiBps=round(2 * size / MiB / seconds, 1),
            lost=0,
        )


class SlowReaderTests(TestCase):
    """
    A client that reads a large response slowly: the gateway stops reading
    from the member (backpressure) and its memory stays flat.
    """

    def test_memoryFlat(self):
        """
        A 256 MiB (1 GiB long) response read after a 2 s stall and then at a
        throttled pace grows the gateway's RSS by less than 24 MiB.
        """
        size = scaled(256 * MiB, 1024 * MiB)
        source = ThreadedServer(sourceHandler)
        self.addCleanup(source.close)
        gw = startGateway(self, source.address, "--health-check=tcp")
        # Warm up (imports, buffers) before the baseline.
        warm = socket.create_connection((gw.host, gw.port), timeout=10)
        warm.sendall(b"1048576\n")
        while warm.recv(MiB):
            pass
        warm.close()
        time.sleep(0.2)
        baseline = rssKiB(gw.pid)
        samples = []
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                samples.append(rssKiB(gw.pid))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        sock = socket.create_connection((gw.host, gw.port), timeout=30)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        started = time.monotonic()
        try:
            sock.sendall(b"%d\n" % size)
            time.sleep(2.0)  # read nothing: without backpressure the gateway swells
            digest = hashlib.sha256()
            length = 0
            while True:
                data = sock.recv(64 * 1024)
                if not data:
                    break
                digest.update(data)
                length += len(data)
                if length % (4 * MiB) < len(data):
                    time.sleep(0.02)  # a slow reader: at most ~200 MiB/s
        finally:
            sock.close()
            stop.set()
            sampler.join()
        seconds = time.monotonic() - started
        self.assertEqual(length, size)
        self.assertEqual(digest.hexdigest(), patternDigest(size))
        growth = (max(samples) - baseline) / 1024
        report(
            "slow-reader",
            bytes=size,
            seconds=round(seconds, 1),
            rssBaselineMiB=round(baseline / 1024, 1),
            rssMaxGrowthMiB=round(growth, 1),
            samples=len(samples),
        )
        self.assertLess(growth, 24, f"gateway RSS grew by {growth:.1f} MiB")


class ResetTests(TestCase):
    """
    Clients and members that reset mid-stream (SO_LINGER 0): the gateway
    passes the reset on and keeps no descriptor.
    """

    def test_noDescriptorLeak(self):
        """
        After 200 client resets (400 long) mid-stream and 200 member resets,
        the gateway's descriptor count is back to where it was, it still
        forwards, and each member reset reaches its client as a reset (how
        each client reset reached the member is measured and reported; see
        L{test_clientResetReachesMember}).
        """
        count = scaled(200, 400)
        echo = ThreadedServer(resetRecordingEchoHandler)
        self.addCleanup(echo.close)
        resetter = ThreadedServer(resetHandler)
        self.addCleanup(resetter.close)
        gwEcho = startGateway(self, echo.address, "--health-check=tcp")
        gwReset = startGateway(self, resetter.address, "--health-check=tcp")
        # One exchange each first, so lazily opened descriptors are counted.
        exchange(gwEcho.address, [b"warm"])
        before = {gw.pid: fdCount(gw.pid) for gw in (gwEcho, gwReset)}

        clientResets = 0
        for i in range(count):
            sock = socket.create_connection((gwEcho.host, gwEcho.port), timeout=10)
            sock.sendall(pattern(0, 64 * 1024 + i))
            if i % 2:
                sock.recv(1024)  # mid-stream: part of the echo read
            linger0(sock)
            sock.close()
            clientResets += 1

        memberResets = 0
        for i in range(count):
            sock = socket.create_connection((gwReset.host, gwReset.port), timeout=10)
            sock.sendall(b"request")
            data = b""
            try:
                while True:
                    more = sock.recv(1024)
                    if not more:
                        break
                    data += more
            except ConnectionResetError:
                memberResets += 1
            sock.close()
        waitUntil(lambda: echo.connections >= count + 1, 10, message="echo connections")
        # How each client connection ended at the member (the warm-up one ended
        # cleanly): a reset, passed on by the gateway, not a clean end.
        waitUntil(lambda: len(echo.results) >= count + 1, 10, message="echo endings")
        endings = echo.results[1 : count + 1]
        resetsSeenByMember = endings.count("reset")
        for gw in (gwEcho, gwReset):
            waitUntil(
                lambda: fdCount(gw.pid) <= before[gw.pid],
                10,
                message=f"gateway {gw.pid} back to {before[gw.pid]} descriptors "
                f"(has {fdCount(gw.pid)})",
            )
        after = {gw.pid: fdCount(gw.pid) for gw in (gwEcho, gwReset)}
        received, _ = exchange(gwEcho.address, [b"still forwarding"])
        self.assertEqual(received, b"still forwarding")
        report(
            "resets",
            clientResets=clientResets,
            clientResetsSeenByMember=resetsSeenByMember,
            memberResets=resetter.connections,
            memberResetsSeenByClients=memberResets,
            fdsBefore=sorted(before.values()),
            fdsAfter=sorted(after.values()),
            leaked=sum(max(0, after[pid] - before[pid]) for pid in before),
        )
        # Each member reset reaches its client as a reset (not a clean EOF).
        self.assertEqual(memberResets, count)

    def test_clientResetReachesMember(self):
        """
        A client that resets its connection while the gateway is sending it
        the member's reply (it read part of it) is seen by the member as a
        reset, not as a clean end of stream: 100 such resets, each checked.
        """
        count = scaled(100, 400)
        echo = ThreadedServer(resetRecordingEchoHandler)
        self.addCleanup(echo.close)
        gw = startGateway(self, echo.address, "--health-check=tcp")
        for i in range(count):
            sock = socket.create_connection((gw.host, gw.port), timeout=10)
            sock.sendall(pattern(0, 64 * 1024 + i))
            sock.recv(1024)  # the reply is flowing back when the reset comes
            linger0(sock)
            sock.close()
        waitUntil(lambda: len(echo.results) >= count, 10, message="member saw every end")
        endings = {e: echo.results.count(e) for e in set(echo.results)}
        report(
            "client-resets-at-member",
            clientResets=count,
            seenByMemberAsReset=endings.get("reset", 0),
            seenByMemberAsCleanEnd=endings.get("eof", 0),
        )
        self.assertEqual(endings, {"reset": count})


# The same promises on epoll (--forward=epoll): the classes above run as the
# gateway does by default, joined pairs through io_uring where the kernel
# allows it (tests/integration/test_ring.py checks that it does here).


class EpollByteExactnessTests(ByteExactnessTests):
    forward = "epoll"


class EpollSlowReaderTests(SlowReaderTests):
    forward = "epoll"


class EpollResetTests(ResetTests):
    forward = "epoll"
