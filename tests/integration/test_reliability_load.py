"""
Reliability under load: thousands of concurrent connections held through the
real gateway process, and the gateway out of file descriptors.

C{ETCDGW_LONG=1} holds the connections longer and floods harder.
"""

import os
import resource
import selectors
import socket
import time

from twisted.trial.unittest import TestCase

from tests.integration.gateway import _TWISTD, GatewayProcess
from tests.integration.reliability_helpers import (
    EchoProcess,
    ThreadedServer,
    cpuSeconds,
    echoHandler,
    exchange,
    fdCount,
    raiseNofileTo,
    report,
    rssKiB,
    scaled,
    startGateway,
    waitUntil,
)


class LimitedGateway(GatewayProcess):
    """
    A gateway process started under C{RLIMIT_NOFILE = limit} (soft and
    hard), set by the interpreter itself before twistd runs.
    """

    limit = 64

    @property
    def argv(self):
        argv = super().argv
        assert argv[1] == "-c" and argv[2] == _TWISTD, argv
        code = (
            "import resource; resource.setrlimit(resource.RLIMIT_NOFILE, ({0}, {0})); ".format(
                self.limit
            )
            + _TWISTD
        )
        return [argv[0], "-c", code] + argv[3:]


def limitedGateway(limit):
    return type("LimitedGateway", (LimitedGateway,), {"limit": limit})


def echoAll(sockets, payload, timeout):
    """
    Send C{payload} on every socket and read it back on each, all at once.

    @return: how many sockets echoed C{payload} exactly within C{timeout}.
    """
    sel = selectors.DefaultSelector()
    got = {}
    for s in sockets:
        s.setblocking(False)
        s.send(payload)  # a few bytes always fit in an empty send buffer
        sel.register(s, selectors.EVENT_READ)
        got[s] = b""
    ok = 0
    deadline = time.monotonic() + timeout
    while got and time.monotonic() < deadline:
        for key, _ in sel.select(0.5):
            s = key.fileobj
            try:
                data = s.recv(64)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if data:
                got[s] += data
                if len(got[s]) < len(payload):
                    continue
                ok += got[s] == payload
            sel.unregister(s)
            del got[s]
    sel.close()
    return ok


def openMany(host, port, count):
    """
    Open C{count} connections (blocking connects; the kernel queues them
    while the gateway accepts).
    """
    sockets = []
    for i in range(count):
        sockets.append(socket.create_connection((host, port), timeout=10))
    return sockets


#: Most memory (RSS) the gateway may add per held client connection.
PER_CONNECTION_BYTES = 6 * 1024


class ManyConnectionsTests(TestCase):
    def test_8000Connections(self):
        """
        8,000 client connections are held open through the gateway at once
        (16,000 descriptors in the gateway) and each still echoes a byte at the
        end, with a bounded memory cost per connection; closing them all
        returns the gateway to its descriptor count. The test raises the
        descriptor limit itself (hard too: it needs root, as CI runs); where
        it cannot, it skips, or fails when CI is set.
        """
        count = 8000
        hold = scaled(2.0, 60.0)
        try:
            old = raiseNofileTo(2 * count + 200)
        except (OSError, ValueError) as e:
            if os.environ.get("CI"):
                self.fail(f"CI is set and {e}")
            self.skipTest(str(e))
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, old)
        echo = EchoProcess()  # inherits the raised limit
        self.addCleanup(echo.stop)
        gw = startGateway(self, echo.address)  # so does the gateway
        baseline = fdCount(gw.pid)
        rssBefore = rssKiB(gw.pid)
        started = time.monotonic()
        sockets = []
        self.addCleanup(lambda: [s.close() for s in sockets])
        sockets.extend(openMany(gw.host, gw.port, count))
        first = echoAll(sockets, b"a", 60)
        opened = time.monotonic() - started
        peak = fdCount(gw.pid)
        time.sleep(hold)
        last = echoAll(sockets, b"bc", 60)
        rssPeak = rssKiB(gw.pid)
        for s in sockets:
            s.close()
        waitUntil(
            lambda: fdCount(gw.pid) <= baseline,
            30,
            message=f"gateway back to {baseline} descriptors",
        )
        perConnection = (rssPeak - rssBefore) * 1024 / count
        report(
            "8000-connections",
            held=count,
            bytesPerConnection=round(perConnection),
            echoedFirst=first,
            echoedAtEnd=last,
            heldSeconds=hold,
            openAndEchoSeconds=round(opened, 1),
            gatewayFdsPeak=peak,
            gatewayFdsAfter=fdCount(gw.pid),
            rssMiB=f"{rssBefore // 1024}->{rssPeak // 1024}",
        )
        self.assertEqual(first, count)
        self.assertEqual(last, count)
        self.assertGreaterEqual(peak, baseline + 2 * count)
        # A client pair (two sockets, two protocols, two transports, counters):
        # measured 2.3 KiB with the gateway's slotted transports; 2.6 times that
        # fails the test.
        self.assertLess(perConnection, PER_CONNECTION_BYTES)


#: These tests are about running out of descriptors: without this, the
#: default --max-connections (derived from the limit) pauses accepting first.
NO_CAP = ("--max-connections=100000",)


class DescriptorExhaustionTests(TestCase):
    """
    The gateway under a low RLIMIT_NOFILE, flooded with connections.
    """

    def flood(self, gw, held, flooded):
        """
        Hold C{held} echoing connections, then open C{flooded} more (each
        sending one byte) while the gateway is out of descriptors.
        """
        heldSockets = []
        self.addCleanup(lambda: [s.close() for s in heldSockets])
        for i in range(held):
            s = socket.create_connection((gw.host, gw.port), timeout=5)
            heldSockets.append(s)
            s.sendall(b"h")
            self.assertEqual(s.recv(1), b"h")
        floodSockets = []
        self.addCleanup(lambda: [s.close() for s in floodSockets])
        for i in range(flooded):
            s = socket.create_connection((gw.host, gw.port), timeout=5)
            s.sendall(b"f")
            floodSockets.append(s)
        return heldSockets, floodSockets

    def test_keepsServingNoSpinRecovers(self):
        """
        Flooded past its limit (64 descriptors), the gateway keeps serving the
        connections it has, uses under 20% of a core, and once descriptors
        are free it accepts the waiting clients again.
        """
        echo = ThreadedServer(echoHandler, backlog=1024)
        self.addCleanup(echo.close)
        gw = startGateway(
            self, echo.address, "--retry-delay=1s", *NO_CAP, gatewayClass=limitedGateway(64)
        )
        limit = 64
        if (limit - fdCount(gw.pid)) % 2:
            # An even number of free descriptors: every accept that succeeds
            # can open its member connection (the odd case is the next test).
            limit -= 1
            resource.prlimit(gw.pid, resource.RLIMIT_NOFILE, (limit, limit))
        held, flooded = self.flood(gw, 20, scaled(300, 900))
        waitUntil(
            lambda: "cannot accept new connections: EMFILE" in gw.log(),
            10,
            message="EMFILE logged",
        )
        time.sleep(0.5)
        window = scaled(3.0, 10.0)
        cpu0 = cpuSeconds(gw.pid)
        time.sleep(window)
        cpu = (cpuSeconds(gw.pid) - cpu0) / window
        self.assertEqual(fdCount(gw.pid), limit)
        # The connections it has keep working while it cannot accept.
        self.assertEqual(echoAll(held, b"still", 10), len(held))
        # Free descriptors: every waiting client is served, in turn.
        for s in held:
            s.close()
        served = set()
        closed = set()
        deadline = time.monotonic() + scaled(30, 90)
        sel = selectors.DefaultSelector()
        for s in flooded:
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
        while len(served) + len(closed) < len(flooded) and time.monotonic() < deadline:
            for key, _ in sel.select(0.5):
                s = key.fileobj
                try:
                    data = s.recv(16)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                (served if data == b"f" else closed).add(s)
                sel.unregister(s)
                s.close()  # frees a pair of descriptors for the next one
        sel.close()
        fresh, _ = exchange(gw.address, [b"fresh"])
        report(
            "descriptor-exhaustion",
            limit=limit,
            held=len(held),
            flooded=len(flooded),
            cpuPercentSaturated=round(100 * cpu, 1),
            servedAfterFree=len(served),
            closedWithoutService=len(closed),
            waiting=len(flooded) - len(served) - len(closed),
        )
        self.assertLess(cpu, 0.20)
        self.assertEqual(fresh, b"fresh")
        self.assertEqual(len(served) + len(closed), len(flooded))
        self.assertEqual(len(closed), 0)

    def test_exhaustionIsNotMemberFailure(self):
        """
        When the gateway runs out of descriptors between accepting a client and
        opening the member connection (an odd number of free descriptors), it
        does not mark the healthy member down, and no waiting client is closed
        unserved once descriptors are free.
        """
        echo = ThreadedServer(echoHandler, backlog=1024)
        self.addCleanup(echo.close)
        gw = startGateway(
            self, echo.address, "--retry-delay=1s", *NO_CAP, gatewayClass=limitedGateway(64)
        )
        limit = fdCount(gw.pid) + 41  # 20 pairs and one odd descriptor
        resource.prlimit(gw.pid, resource.RLIMIT_NOFILE, (limit, limit))
        held, flooded = self.flood(gw, 10, 100)
        waitUntil(
            lambda: "cannot accept new connections" in gw.log(), 10, message="EMFILE logged"
        )
        for s in held:
            s.close()
        served = closed = 0
        for s in flooded:
            s.settimeout(10)
            try:
                data = s.recv(16)
            except OSError:
                data = b""
            if data == b"f":
                served += 1
            else:
                closed += 1
            s.close()
        downs = [line for line in gw.log().splitlines() if "up -> down" in line]
        report(
            "exhaustion-not-member-failure",
            limit=limit,
            flooded=len(flooded),
            served=served,
            closedUnserved=closed,
            memberMarkedDown=len(downs),
        )
        self.assertEqual(downs, [])
        self.assertEqual(closed, 0)

