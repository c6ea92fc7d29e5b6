"""
The gateway as users run it (a real twistd process) in front of a real
3-member etcd cluster, used by etcdctl.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

from twisted.trial.unittest import TestCase

from tests.integration.etcd import ClusterTestMixin, etcdctl, freePort, requireEtcd
from tests.integration.gateway import _TWISTD, GatewayProcess, checkoutEnvironment


def blackhole():
    """
    A listening socket whose accept queue is full, so that the kernel drops
    new SYNs: a member that "drops packets".

    @return: C{(port, sockets to close)}.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    held = [listener]
    for _ in range(8):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        held.append(s)
    time.sleep(0.2)
    probe = socket.socket()
    probe.settimeout(0.5)
    try:
        probe.connect(("127.0.0.1", port))
    except socket.timeout:
        pass
    else:  # pragma: no cover - the kernel accepted more than expected
        raise RuntimeError("could not fill the accept queue of port %d" % port)
    finally:
        probe.close()
    return port, held


class GatewayTests(ClusterTestMixin, TestCase):
    clusterSize = 3
    timeout = 120

    def gateway(self, *args, **kw):
        args = list(args) or [f"--endpoints={self.cluster.endpoints}", "--retry-delay=1s"]
        gw = GatewayProcess(args, **kw)
        self.addCleanup(gw.cleanup)
        return gw.start()

    def ctl(self, gw, *args, timeout=10):
        rc, out, err = etcdctl(gw.address, *args, timeout=timeout)
        self.assertEqual(rc, 0, f"etcdctl {args}: {err}\ngateway log:\n{gw.log()[-3000:]}")
        return out

    def test_readyLine(self):
        """The gateway logs etcd's ready line with the endpoints and the listen address."""
        gw = self.gateway()
        endpoints = self.cluster.endpoints.replace(",", " ")
        gw.waitForLog(f"ready to proxy client requests to [{endpoints}] on {gw.address}")

    def test_putGet(self):
        """etcdctl put and get work through the gateway."""
        gw = self.gateway()
        self.ctl(gw, "put", "gateway/k", "value-1")
        self.assertEqual(self.ctl(gw, "get", "gateway/k", "--print-value-only").strip(), "value-1")

    def test_watch(self):
        """A watch through the gateway sees a put made through the gateway a second later."""
        gw = self.gateway()
        # Watch from the next revision: the put is seen even if it is made
        # before the watch is registered (no race with etcdctl's start).
        revision = json.loads(self.ctl(gw, "get", "gateway/w", "--write-out=json"))
        watcher = subprocess.Popen(
            ["etcdctl", f"--endpoints={gw.address}", "watch", "gateway/w",
             "--rev={}".format(revision["header"]["revision"] + 1)],
            env=dict(os.environ, ETCDCTL_API="3"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.addCleanup(watcher.wait, 10)
        self.addCleanup(watcher.kill)
        time.sleep(1)  # the watch's stream stays open, idle, for a while first
        self.ctl(gw, "put", "gateway/w", "seen")
        lines = _readLinesUntil(watcher.stdout, "seen", timeout=10)
        self.assertEqual(lines[-3:], ["PUT", "gateway/w", "seen"], gw.log()[-2000:])

    def test_lease(self):
        """A lease granted through the gateway holds a key until revoked."""
        gw = self.gateway()
        lease = self.ctl(gw, "lease", "grant", "60").split()[1]
        self.ctl(gw, "put", "gateway/leased", "x", f"--lease={lease}")
        self.assertIn("x", self.ctl(gw, "get", "gateway/leased"))
        self.ctl(gw, "lease", "revoke", lease)
        self.assertEqual(self.ctl(gw, "get", "gateway/leased").strip(), "")

    def test_memberKilled(self):
        """With one member killed, every new connection still works; it comes back after a retry delay."""
        gw = self.gateway()
        self.cluster.kill(0)
        self.cluster.waitHealthy([1, 2])
        for i in range(12):  # each etcdctl run is a new connection through the gateway
            self.ctl(gw, "put", f"gateway/kill/{i}", str(i))
        gw.waitForLog(f"endpoint {self.cluster.clientAddress(0)} up -> down")
        self.cluster.restart(0)
        gw.waitForLog(f"endpoint {self.cluster.clientAddress(0)} down -> up", timeout=5)
        self.assertEqual(self.ctl(gw, "get", "gateway/kill/11", "--print-value-only").strip(), "11")

    def test_droppedSYNs(self):
        """A member that drops SYNs costs a new client about the dial timeout, not minutes."""
        port, held = blackhole()
        self.addCleanup(lambda: [s.close() for s in held])
        gw = self.gateway(
            f"--endpoints=127.0.0.1:{port},{self.cluster.endpoints}", "--dial-timeout=1s"
        )
        started = time.monotonic()
        self.ctl(gw, "get", "gateway/none", timeout=20)
        elapsed = time.monotonic() - started
        self.assertLess(elapsed, 4.0)  # 1 s dial timeout + etcdctl's own start
        gw.waitForLog(f"endpoint 127.0.0.1:{port} up -> down: connect timed out")

    def test_allDown(self):
        """With every endpoint down, a client is closed at once and an error is logged."""
        gw = self.gateway(f"--endpoints=127.0.0.1:{freePort()}", "--retry-delay=1m")
        s = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
        self.addCleanup(s.close)
        self.assertEqual(s.recv(10), b"")  # closed, not hung
        gw.waitForLog("no endpoint is up: closing client")


class DaemonTests(TestCase):
    timeout = 60

    def test_daemonize(self):
        """twistd --pidfile --logfile daemonizes; SIGTERM stops it and removes the pidfile."""
        requireEtcd()
        directory = self.mktemp()
        os.makedirs(directory)
        pidfile = os.path.join(directory, "gw.pid")
        logfile = os.path.join(directory, "gw.log")
        port = freePort()
        rc = subprocess.call(
            [sys.executable, "-c", _TWISTD, f"--pidfile={pidfile}", f"--logfile={logfile}",
             "etcd-gateway", f"--listen-addr=127.0.0.1:{port}",
             f"--endpoints=127.0.0.1:{freePort()}"],
            timeout=30,
            env=checkoutEnvironment(),
        )
        self.assertEqual(rc, 0)
        deadline = time.monotonic() + 10
        while not os.path.exists(pidfile) and time.monotonic() < deadline:
            time.sleep(0.05)
        pid = int(open(pidfile).read())
        self.addCleanup(_kill, pid)
        while "ready to proxy" not in open(logfile).read() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertIn("ready to proxy client requests", open(logfile).read())
        os.kill(pid, signal.SIGTERM)
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertFalse(_alive(pid))
        self.assertFalse(os.path.exists(pidfile))

    def test_badFlag(self):
        """A bad flag exits non-zero with a one-line error naming it, and no traceback."""
        proc = subprocess.run(
            [sys.executable, "-c", _TWISTD, "-n", "etcd-gateway", "--endpoints=h:abc"],
            capture_output=True, text=True, timeout=30, env=checkoutEnvironment(),
        )
        self.assertNotEqual(proc.returncode, 0)
        output = proc.stdout + proc.stderr
        self.assertIn('--endpoints: endpoint "h:abc": port "abc" is not a number', output)
        self.assertNotIn("Traceback", output)


def _readLinesUntil(stream, last, timeout):
    """
    Read lines from the pipe C{stream} until one equals C{last}, for at most
    C{timeout} seconds (never blocking past it, whatever the process does).

    @return: the lines read (without newlines); the last is C{last} unless
        the time ran out or the pipe closed first.
    """
    import selectors

    fd = stream.fileno()
    os.set_blocking(fd, False)
    lines, partial = [], b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not selector.select(max(0, deadline - time.monotonic())):
                continue
            data = os.read(fd, 65536)
            if not data:
                break
            *complete, partial = (partial + data).split(b"\n")
            for line in complete:
                lines.append(line.decode("utf-8", "replace").strip())
                if lines[-1] == last:
                    return lines
    return lines


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie of ours is dead too
        return not os.waitpid(pid, os.WNOHANG)[0]
    except ChildProcessError:
        return True


def _kill(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
