#!/usr/bin/env python3
"""
What a takeover's pause costs in the gateway itself (issue 14: a target of
200 ms at 2,000 connections): export, hand-over, adoption and start of N
idle held pairs, one gateway to another in this process, on one reactor,
over real loopback sockets (the clients, the gateways and the member are
all here). The descriptors go through a real C{SCM_RIGHTS} message, as the
takeover's wire sends them (one message per 200 pairs here: the wire's
framing is L{etcdgw.takeover}'s, so its figure is only indicative).

A measurement, not a test: run it from the repository root,

    python benchmarks/portable_pause.py [--pairs 2000] [--stock] [--bulk MiB]

It prints one line per step and the total, then checks that every pair
still answers through the new gateway. C{--bulk} first moves that many MiB
each way through one pair, taken over in the middle, and checks the bytes.
"""

import argparse
import gc
import hashlib
import json
import os
import random
import resource
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, protocol, reactor, task  # noqa: E402

from etcdgw import portable  # noqa: E402
from etcdgw.endpoint import Endpoint  # noqa: E402
from etcdgw.fast import gate  # noqa: E402
from etcdgw.listen import GatewayTCPEndpoint  # noqa: E402
from etcdgw.pool import UpstreamPool  # noqa: E402
from etcdgw.proxy import GatewayFactory  # noqa: E402

#: Pairs per SCM_RIGHTS message (two descriptors each; Linux allows 253).
PER_MESSAGE = 100


class Echo(protocol.Protocol):
    def connectionMade(self):
        self.factory.accepted += 1

    def dataReceived(self, data):
        self.transport.write(data)


def handOver(batch):
    """
    The records as JSON and the descriptors through a unix socket pair, in
    messages of L{PER_MESSAGE} pairs; the receiver gets new descriptors.
    """
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    received = []
    try:
        pairs = batch.pairs
        for i in range(0, len(pairs), PER_MESSAGE):
            group = pairs[i : i + PER_MESSAGE]
            message = json.dumps([p.record for p in group]).encode()
            fds = [fd for p in group for fd in p.fds]
            socket.send_fds(a, [len(message).to_bytes(4, "big") + message], fds)
            data, got, _, _ = socket.recv_fds(b, len(message) + 4, len(fds))
            while len(data) < len(message) + 4:
                data += b.recv(len(message) + 4 - len(data))
            records = json.loads(data[4:])
            it = iter(got)
            for record, pair in zip(records, group):
                n = 1 if record["clientOnly"] else 2
                received.append((record, pair.data, [next(it) for _ in range(n)]))
    finally:
        a.close()
        b.close()
    return received


def wait(condition, timeout=60.0):
    deadline = time.monotonic() + timeout

    def check():
        if condition():
            return None
        if time.monotonic() > deadline:
            raise RuntimeError("timed out")
        return task.deferLater(reactor, 0.01, check)

    return task.deferLater(reactor, 0, check)


def gateway(endpoint):
    return GatewayFactory(UpstreamPool([endpoint], reactor), reactor, dialTimeout=5)


@defer.inlineCallbacks
def bulk(old, new, port, mib):
    """
    C{mib} MiB each way through one pair to the echoing member, in random
    chunk sizes, read slowly (a non-blocking client driven from the
    reactor), taken over when half of it went through.
    """
    size = mib * 1024 * 1024
    s = socket.create_connection(("127.0.0.1", port))
    s.setblocking(False)
    block = os.urandom(2 << 20)
    view = memoryview(block)
    rng = random.Random(14)
    sent = received = 0
    sentHash, receivedHash = hashlib.sha256(), hashlib.sha256()
    tookOver = None
    slowUntil = 0.0
    start = time.monotonic()
    while received < size:
        if sent < size:
            # Random chunk sizes, from random places of the block.
            n = min(rng.randint(1, 1 << 20), size - sent)
            at = rng.randrange(0, len(block) - n + 1)
            try:
                k = s.send(view[at : at + n])
            except BlockingIOError:
                k = 0
            sentHash.update(view[at : at + k])
            sent += k
        # A slow reader: now and then it reads nothing for a few
        # milliseconds (the gateway's queues and the pipe fill), and it
        # reads random amounts.
        now = time.monotonic()
        if now >= slowUntil:
            if rng.random() < 0.01:
                slowUntil = now + rng.uniform(0.001, 0.01)
            try:
                chunk = s.recv(rng.randint(1, 1 << 20))
            except BlockingIOError:
                chunk = None
            if chunk:
                receivedHash.update(chunk)
                received += len(chunk)
        if tookOver is None and received >= size // 2:
            batch = portable.exportPairs(old)
            adopted = portable.adoptPairs(new, handOver(batch))
            batch.release()
            adopted.start()
            tookOver = batch.queued
        yield task.deferLater(reactor, 0, lambda: None)
    elapsed = time.monotonic() - start
    s.close()
    ok = sentHash.digest() == receivedHash.digest()
    print(
        f"bulk: {mib} MiB each way in {elapsed:.1f}s, taken over mid-way with "
        f"{tookOver} bytes queued in the old gateway: {'byte-exact' if ok else 'CORRUPTED'}"
    )
    if not ok:
        raise SystemExit(1)


@defer.inlineCallbacks
def main(options):
    if options.stock:
        gate._decision = gate.Verdict("benchmark", ("--stock",))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = options.pairs * 7 + 200
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    member = protocol.Factory.forProtocol(Echo)
    member.accepted = 0
    # A backlog for every dial at once: one that overflows leaves dials the
    # gateway thinks connected and the member never accepted.
    memberPort = reactor.listenTCP(0, member, backlog=4096, interface="127.0.0.1")
    endpoint = Endpoint("127.0.0.1", memberPort.getHost().port)
    old, new = gateway(endpoint), gateway(endpoint)
    port = yield GatewayTCPEndpoint(reactor, "127.0.0.1", 0, ).listen(old)
    address = ("127.0.0.1", port.getHost().port)
    print(
        f"{options.pairs} idle pairs, {'stock Twisted' if not gate.enabled() else 'fast path'} "
        f"transports, Python {sys.version.split()[0]}"
    )
    if options.bulk:
        yield bulk(old, new, address[1], options.bulk)
        yield wait(lambda: not new.clients)
        member.accepted = 0
        old, new = gateway(endpoint), gateway(endpoint)
        yield port.stopListening()
        port = yield GatewayTCPEndpoint(reactor, "127.0.0.1", 0).listen(old)
        address = ("127.0.0.1", port.getHost().port)
    clients = []
    for i in range(options.pairs):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(address)
        clients.append(s)
        if i % 200 == 199:
            yield task.deferLater(reactor, 0, lambda: None)
    yield wait(
        lambda: len(old.connections) == options.pairs and member.accepted >= options.pairs
    )
    gc.collect()
    timings = []
    t = time.perf_counter()
    batch = portable.exportPairs(old)
    timings.append(("export (freeze, describe, dup)", time.perf_counter() - t))
    t = time.perf_counter()
    pairs = handOver(batch)
    timings.append((f"hand-over (JSON + SCM_RIGHTS, {PER_MESSAGE} pairs a message)",
                    time.perf_counter() - t))
    t = time.perf_counter()
    adopted = portable.adoptPairs(new, pairs)
    timings.append(("adoptPairs (check the records)", time.perf_counter() - t))
    t = time.perf_counter()
    batch.release()
    timings.append(("release (the old gateway forgets them)", time.perf_counter() - t))
    t = time.perf_counter()
    counts = adopted.start()
    timings.append(("start (transports, join, register)", time.perf_counter() - t))
    for name, seconds in timings:
        print(f"  {name:<58} {seconds * 1000:8.1f} ms")
    pause = sum(s for name, s in timings if not name.startswith("release"))
    total = sum(s for _, s in timings)
    label = "pause (all but release, which can follow the first byte)"
    print(f"  {label:<58} {pause * 1000:8.1f} ms")
    print(f"  {'all steps':<58} {total * 1000:8.1f} ms "
          f"({total / options.pairs * 1e6:.0f} us a pair); adopted {counts}")
    # Every pair answers through the new gateway.
    for s in clients:
        s.send(b"ping")
    answered = set()

    def allAnswered():
        for i, s in enumerate(clients):
            if i not in answered:
                try:
                    if s.recv(16) == b"ping":
                        answered.add(i)
                except BlockingIOError:
                    pass
        return len(answered) == len(clients)

    yield wait(allAnswered)
    print(f"  all {len(answered)} pairs answer through the new gateway; "
          f"old gateway holds {len(old.clients)}, new holds {len(new.connections)}")
    for s in clients:
        s.close()
    yield wait(lambda: not new.clients)


def run():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--stock", action="store_true", help="Twisted's own transports")
    parser.add_argument("--bulk", type=int, default=0, metavar="MiB")
    options = parser.parse_args()
    failed = []

    def done(result):
        if isinstance(result, Exception) or hasattr(result, "printTraceback"):
            print(result.getTraceback(), flush=True)
            failed.append(result)
        reactor.stop()

    reactor.callWhenRunning(lambda: main(options).addBoth(done))
    reactor.run()
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    run()
