"""
--workers with real processes: several gateways on one port, one supervisor.
"""

import os
import signal
import socket
import time

from twisted.trial.unittest import TestCase

from tests.integration.etcd import ClusterTestMixin, etcdctl
from tests.integration.gateway import GatewayProcess
from tests.integration.reliability_helpers import childPids, running


class WorkersTests(ClusterTestMixin, TestCase):
    clusterSize = 1
    timeout = 60

    def test_workersShareThePort(self):
        """Two processes serve one port; both get clients; SIGTERM stops all of them, exit 0."""
        gw = GatewayProcess([f"--endpoints={self.cluster.endpoints}", "--workers=2"])
        self.addCleanup(gw.cleanup)
        gw.start()
        gw.waitForLog("[worker-1]")
        gw.waitForLog("ready to proxy client requests", timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and gw.log().count("ready to proxy client requests") < 2:
            time.sleep(0.05)
        self.assertEqual(gw.log().count("ready to proxy client requests"), 2)
        (worker,) = childPids(gw.pid)
        before = {pid: _sockets(pid) for pid in (gw.pid, worker)}
        for i in range(5):
            rc, out, err = etcdctl(gw.address, "put", f"workers/{i}", str(i))
            self.assertEqual(rc, 0, err)
        deadline = time.monotonic() + 10  # the gateways close those connections
        while time.monotonic() < deadline and any(_sockets(p) != n for p, n in before.items()):
            time.sleep(0.05)
        held = [socket.create_connection((gw.host, gw.port)) for _ in range(20)]
        self.addCleanup(lambda: [s.close() for s in held])
        # the kernel spread the 20 connections: both processes hold some
        # (each held client is two sockets in the process that took it)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            spread = {pid: _sockets(pid) - before[pid] for pid in before}
            if sum(spread.values()) >= 40:
                break
            time.sleep(0.05)
        self.assertEqual(sum(spread.values()), 40, spread)
        self.assertTrue(all(n > 0 for n in spread.values()), spread)
        self.assertEqual(gw.stop(), 0)
        self.assertFalse(running(worker))

    def test_sighupReachesEveryWorker(self):
        """SIGHUP to the supervisor makes it and each worker re-probe and log it; none dies."""
        gw = GatewayProcess([f"--endpoints={self.cluster.endpoints}", "--workers=2"])
        self.addCleanup(gw.cleanup)
        gw.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and gw.log().count("ready to proxy client requests") < 2:
            time.sleep(0.05)
        (worker,) = childPids(gw.pid)
        gw.signal(signal.SIGHUP)
        gw.waitForLog("SIGHUP passed on to 1 worker(s); 0 still starting")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and gw.log().count("SIGHUP done: 1/1") < 2:
            time.sleep(0.05)
        done = [line for line in gw.log().splitlines() if "SIGHUP done: 1/1" in line]
        self.assertEqual(len(done), 2, gw.log())
        self.assertEqual(sum("[worker-1]" in line for line in done), 1, done)
        self.assertEqual(childPids(gw.pid), [worker])
        self.assertNotIn("restarting it", gw.log())
        self.assertEqual(gw.stop(), 0)

    def test_orphanedWorkerStops(self):
        """A worker whose supervisor is killed stops by itself."""
        gw = GatewayProcess([f"--endpoints={self.cluster.endpoints}", "--workers=2"])
        self.addCleanup(gw.cleanup)
        gw.start()
        gw.waitForLog("started worker-1")
        deadline = time.monotonic() + 10
        while not childPids(gw.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        (worker,) = childPids(gw.pid)
        gw.signal(signal.SIGKILL)
        gw.wait()
        deadline = time.monotonic() + 10
        while running(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.assertFalse(running(worker))


def _sockets(pid):
    """
    How many sockets process C{pid} has open.
    """
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return count
