"""
Bytes in flight across a live takeover, between real processes: a gateway
with C{--control-socket}, a successor started with C{--takeover}, a member
and clients of our own (threads and blocking sockets) that check every byte.

 - 1 GiB each way (C{ETCDGW_LONG}: 4 GiB) on one connection, random chunk
   sizes on both sides, both readers stopped while the takeover happens, so
   the old process holds queued bytes both ways (its write buffers and its
   splice pipes) when it hands the connection over: each stream arrives
   byte-exact, once, in order;
 - a connection the member half-closed before the takeover stays
   half-closed (no second end of stream, no reset), and the client's
   direction still flows after the takeover.
"""

import hashlib
import os
import random
import re
import shutil
import socket
import tempfile
import threading
import time

from twisted.trial.unittest import TestCase

from tests.integration.gateway import REPOSITORY, GatewayProcess
from tests.integration.reliability_helpers import (
    ThreadedServer,
    pattern,
    readHeader,
    report,
    scaled,
)

#: Bytes each way on the bulk connection.
BULK = scaled(1 << 30, 4 << 30)
CHUNK = 1 << 18


def _chunks(size, seed, rng):
    """
    C{(offset, length)} of C{size} bytes cut at random (1 byte to 256 KiB).
    """
    offset = 0
    while offset < size:
        n = min(size - offset, rng.randint(1, CHUNK))
        yield offset, n
        offset += n


def _expected(size, seed):
    digest = hashlib.sha256()
    for offset in range(0, size, 1 << 20):
        digest.update(pattern(offset, min(1 << 20, size - offset), seed))
    return digest.hexdigest()


class _Gate:
    """
    Where the readers of both ends wait while the takeover happens, once
    they have read C{at} bytes.
    """

    def __init__(self, at):
        self.at = at
        self.open = threading.Event()
        self.reached = threading.Semaphore(0)

    def passing(self, received):
        if received >= self.at and not self.open.is_set():
            self.reached.release()
            self.open.wait(60)


def _readAll(sock, gate=None):
    """
    Read until the end of stream: C{(length, sha256 hex)}.
    """
    digest = hashlib.sha256()
    received = 0
    while True:
        if gate is not None:
            gate.passing(received)
        data = sock.recv(CHUNK)
        if not data:
            return received, digest.hexdigest()
        received += len(data)
        digest.update(data)


def _sendAll(sock, size, seed, rng):
    for offset, n in _chunks(size, seed, rng):
        sock.sendall(pattern(offset, n, seed))


def memberHandler(sock, server):
    """
    The member: read a header C{"NAME SIZE SEED\\n"}, send SIZE pattern
    bytes of SEED in random chunks and half-close, while reading what the
    client sends until its end of stream; record C{(NAME, received length,
    sha256)}.
    """
    header = readHeader(sock)
    if header is None:
        return
    name, size, seed = header.decode().split()
    size, seed = int(size), int(seed)

    def send():
        _sendAll(sock, size, seed, random.Random(seed))
        sock.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    gate = server.gates.get(name)
    server.record((name,) + _readAll(sock, gate))
    sender.join(120)


class TakeoverBytesTests(TestCase):
    timeout = 240

    def setUp(self):
        self.member = ThreadedServer(memberHandler)
        self.member.gates = {}
        self.addCleanup(self.member.close)
        self.directory = tempfile.mkdtemp(prefix="etcdgw-takeover-bytes-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.control = os.path.join(self.directory, "control.sock")
        self.flags = ["--endpoints=" + self.member.address, "--health-check=tcp"]
        self.old = GatewayProcess(
            self.flags + ["--control-socket=" + self.control], cwd=REPOSITORY
        )
        self.addCleanup(self.old.cleanup)
        self.old.start()

    def takeOver(self):
        """
        Start a successor with C{--takeover}; wait for the old gateway to
        exit, with status 0.

        @return: the successor, and the seconds from its start to the old
            one's exit.
        """
        new = GatewayProcess(
            self.flags + ["--takeover=" + self.control], listen=self.old.listen, cwd=REPOSITORY
        )
        self.addCleanup(new.cleanup)
        started = time.monotonic()
        new.start()
        code = self.old.wait(timeout=60)
        took = time.monotonic() - started
        self.assertEqual(code, 0, self.old.log()[-3000:])
        self.assertTrue(new.running(), new.log()[-3000:])
        return new, took

    def connect(self, name, size, seed):
        sock = socket.create_connection((self.old.host, self.old.port), timeout=120)
        self.addCleanup(sock.close)
        sock.sendall(f"{name} {size} {seed}\n".encode())
        return sock

    def test_bulkBothWaysAcrossTakeover(self):
        """
        1 GiB each way, random chunks, both readers stopped at a third of it
        while the gateway changes process: both streams byte-exact.
        """
        down, up = 11, 12
        clientGate = _Gate(BULK // 3)
        self.member.gates["bulk"] = _Gate(BULK // 3)
        sock = self.connect("bulk", BULK, down)
        result = {}

        def client():
            result["down"] = _readAll(sock, clientGate)

        def writer():
            _sendAll(sock, BULK, up, random.Random(up))
            sock.shutdown(socket.SHUT_WR)

        started = time.monotonic()
        threads = [threading.Thread(target=f, daemon=True) for f in (client, writer)]
        for t in threads:
            t.start()
        # Both readers stop at a third; the writers go on until the kernel's
        # and the gateway's buffers between them are full.
        self.assertTrue(clientGate.reached.acquire(timeout=120), "client reader never got a third")
        self.assertTrue(
            self.member.gates["bulk"].reached.acquire(timeout=120),
            "member reader never got a third",
        )
        time.sleep(0.5)
        new, took = self.takeOver()
        log = self.old.log()
        clientGate.open.set()
        self.member.gates["bulk"].open.set()
        for t in threads:
            t.join(180)
        seconds = time.monotonic() - started
        waitFor = time.monotonic() + 30
        while not self.member.results and time.monotonic() < waitFor:
            time.sleep(0.05)
        handed = [line for line in log.splitlines() if "takeover: handed" in line][-1]
        queued = int(re.search(r"\((\d+) bytes queued\)", handed).group(1))
        report(
            "takeover-bytes",
            eachWayMiB=BULK >> 20,
            seconds=round(seconds, 1),
            takeoverS=round(took, 2),
            queuedBytes=queued,
        )
        # Both readers stopped: the old process held bytes of the transfer.
        self.assertGreater(queued, 0, handed)
        self.assertEqual(result.get("down"), (BULK, _expected(BULK, down)))
        self.assertEqual(self.member.results, [("bulk", BULK, _expected(BULK, up))])
        self.assertEqual(self.member.errors, [])

    def test_memberHalfClosedStaysHalfClosed(self):
        """
        A connection the member half-closed before the takeover goes on
        carrying the client's bytes after it, and ends cleanly (no second
        end of stream, no reset). (The client's half-close:
        tests.integration.test_takeover.)
        """
        small = 8 << 20
        memberClosed = self.connect("memberClosed", 0, 21)  # it sends nothing
        memberClosed.settimeout(10)
        self.assertEqual(memberClosed.recv(1), b"")

        self.takeOver()

        _sendAll(memberClosed, small, 23, random.Random(23))
        memberClosed.shutdown(socket.SHUT_WR)
        self.assertEqual(memberClosed.recv(1), b"")
        deadline = time.monotonic() + 10
        while not self.member.results and time.monotonic() < deadline:
            time.sleep(0.02)
        self.assertEqual(self.member.results, [("memberClosed", small, _expected(small, 23))])
        self.assertEqual(self.member.errors, [])
