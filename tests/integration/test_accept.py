"""
The accept path of a real gateway process: one client's failure never stops
the listener, connection caps pause accepting instead of exhausting
descriptors, and what cannot be listened on ends the start with one line.

No etcd here: an echo server stands in for the member.
"""

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request

from twisted.trial.unittest import TestCase

from tests.integration.etcd import freePort, waitUntil
from tests.integration.gateway import _TWISTD, REPOSITORY, checkoutEnvironment
from tests.integration.reliability_helpers import (
    ThreadedServer,
    echoHandler,
    exchange,
    startGateway,
)
from tests.integration.test_reliability_load import limitedGateway


def echoed(address, payload, timeout=10):
    received, _ = exchange(address, [payload], timeout=timeout)
    return received == payload


def getJSON(url, timeout=5):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class OneClientCannotStopTheListenerTests(TestCase):
    timeout = 120

    def test_synchronousDialErrorKeepsAccepting(self):
        """
        An endpoint whose connect raises at once (an IPv6 scope ID on an
        address that takes none: [::1%lo]) is marked down with the reason;
        the client is served by the next member, and every later client is
        accepted and served; /livez stays 200.
        """
        echo = ThreadedServer(echoHandler)
        self.addCleanup(echo.close)
        metrics = freePort()
        gw = startGateway(
            self,
            f"[::1%lo]:1,{echo.address}",
            "--retry-delay=1m",
            f"--metrics-addr=127.0.0.1:{metrics}",
        )
        served = sum(echoed(gw.address, b"ping %d" % i) for i in range(20))
        self.assertEqual(served, 20, gw.log()[-3000:])
        gw.waitForLog("endpoint [::1%lo]:1 up -> down")
        self.assertEqual(
            getJSON(f"http://127.0.0.1:{metrics}/livez"),
            (200, {"status": "ok", "listening": [gw.address]}),
        )
        self.assertNotIn("Traceback", gw.log())


class ConnectionCapTests(TestCase):
    timeout = 180

    def test_idleMetricsConnectionsDoNotStopTheProxy(self):
        """
        Under ulimit -n 128, 140 idle connections to the metrics address do
        not stop the proxy accepting and serving: the metrics address takes
        at most its cap, the rest wait in its listen queue.
        """
        echo = ThreadedServer(echoHandler)
        self.addCleanup(echo.close)
        metrics = freePort()
        gw = startGateway(
            self,
            echo.address,
            "--retry-delay=1s",
            f"--metrics-addr=127.0.0.1:{metrics}",
            gatewayClass=limitedGateway(128),
        )
        # The metrics address may start listening a moment after the proxy's.
        def answering():
            try:
                return getJSON(f"http://127.0.0.1:{metrics}/livez", timeout=1)[0] == 200
            except OSError:
                return False

        waitUntil(
            answering,
            10,
            message="the metrics address answering /livez",
        )
        idle = []
        self.addCleanup(lambda: [s.close() for s in idle])
        for _ in range(140):
            idle.append(socket.create_connection(("127.0.0.1", metrics), timeout=5))
        time.sleep(1)  # let the gateway accept what it will
        started = time.monotonic()
        served = sum(echoed(gw.address, b"through %d" % i, timeout=5) for i in range(30))
        elapsed = time.monotonic() - started
        self.assertEqual(served, 30, gw.log()[-3000:])
        self.assertLess(elapsed, 10)
        self.assertIn("the cap (16)", gw.log())
        self.assertNotIn("cannot accept new connections", gw.log())

    def test_clientCapPausesWithoutClosing(self):
        """
        At --max-connections, a new client waits (not closed, not served)
        until an open one closes, then is served.
        """
        echo = ThreadedServer(echoHandler)
        self.addCleanup(echo.close)
        gw = startGateway(self, echo.address, "--retry-delay=1s", "--max-connections=3")
        held = []
        self.addCleanup(lambda: [s.close() for s in held])
        for i in range(3):
            s = socket.create_connection((gw.host, gw.port), timeout=5)
            s.sendall(b"h")
            self.assertEqual(s.recv(1), b"h")
            held.append(s)
        waiting = socket.create_connection((gw.host, gw.port), timeout=5)
        held.append(waiting)
        waiting.sendall(b"w")
        waiting.settimeout(1.0)
        self.assertRaises(socket.timeout, waiting.recv, 1)  # waits, not closed
        held[0].close()
        waiting.settimeout(5.0)
        self.assertEqual(waiting.recv(1), b"w")
        gw.waitForLog("the cap (3): accepting paused until one closes")


def runGateway(args, env=None, timeout=30):
    """
    Run C{twistd -n etcd-gateway ARGS} to its end: C{(code, stdout, stderr)}.
    """
    with tempfile.TemporaryDirectory() as directory:
        result = subprocess.run(
            [sys.executable, "-c", _TWISTD, "-n",
             "--pidfile=" + os.path.join(directory, "twistd.pid"), "etcd-gateway", *args],
            cwd=REPOSITORY,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=checkoutEnvironment(env),
        )
    return result.returncode, result.stdout, result.stderr


class ListenTimeErrorTests(TestCase):
    """
    What cannot be listened on ends the start: exit status 1, one line on
    standard error naming the flag and the problem, no traceback.
    """

    timeout = 180

    def assertOneLine(self, args, flag, problem, env=None):
        code, out, err = runGateway(["--endpoints=127.0.0.1:1", *args], env=env)
        lines = err.strip().splitlines()
        self.assertEqual(code, 1, (out[-2000:], err[-2000:]))
        self.assertEqual(len(lines), 1, lines)
        self.assertTrue(lines[0].startswith(f"etcd-gateway: error: {flag}: "), lines[0])
        self.assertIn(problem, lines[0])
        self.assertNotIn("Traceback", out + err)

    def listening(self):
        s = socket.socket()
        self.addCleanup(s.close)
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        return s.getsockname()[1]

    def test_listenAddrInUse(self):
        """--listen-addr already in use."""
        port = self.listening()
        self.assertOneLine(
            [f"--listen-addr=127.0.0.1:{port}"], "--listen-addr", "address already in use"
        )

    def test_metricsAddrInUse(self):
        """--metrics-addr already in use."""
        port = self.listening()
        self.assertOneLine(
            [f"--listen-addr=127.0.0.1:{freePort()}", f"--metrics-addr=127.0.0.1:{port}"],
            "--metrics-addr",
            "address already in use",
        )

    def test_noSuchInterface(self):
        """tcp:P:interface=nonexistent."""
        self.assertOneLine(
            [f"--listen-addr=tcp:{freePort()}:interface=nonexistent"],
            "--listen-addr",
            "no such interface or host name",
        )

    def test_unixMissingDirectory(self):
        """A unix: path in a missing directory."""
        self.assertOneLine(
            ["--listen-addr=unix:/nonexistent/etcdgw/gw.sock"],
            "--listen-addr",
            "no such file or directory",
        )

    def test_systemdWithoutListenFDs(self):
        """systemd: without LISTEN_FDS."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
        self.assertOneLine(
            ["--listen-addr=systemd:domain=INET:index=0"],
            "--listen-addr",
            "LISTEN_FDS is not set",
            env=env,
        )

    def test_liveUnixSocketRefused(self):
        """A unix socket file another process listens on is refused, not taken."""
        directory = tempfile.mkdtemp(prefix="etcdgw-unix-")
        self.addCleanup(__import__("shutil").rmtree, directory, True)
        path = os.path.join(directory, "gw.sock")
        live = socket.socket(socket.AF_UNIX)
        self.addCleanup(live.close)
        live.bind(path)
        live.listen(1)
        self.assertOneLine(
            [f"--listen-addr=unix:{path}"], "--listen-addr", "another process listens on it"
        )


class UNIXListenerTests(TestCase):
    timeout = 120

    def test_staleSocketReplacedAndMode(self):
        """
        A stale socket file (nobody listening) is removed with a log line and
        listened on; the new socket file is mode 0660; clients are served.
        """
        echo = ThreadedServer(echoHandler)
        self.addCleanup(echo.close)
        directory = tempfile.mkdtemp(prefix="etcdgw-unix-")
        self.addCleanup(__import__("shutil").rmtree, directory, True)
        path = os.path.join(directory, "gw.sock")
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(path)
        stale.close()
        logPath = os.path.join(directory, "gw.log")
        with open(logPath, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-c", _TWISTD, "-n", "--pidfile=", "etcd-gateway",
                 f"--listen-addr=unix:{path}", f"--endpoints={echo.address}"],
                cwd=REPOSITORY, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=checkoutEnvironment(),
            )
        self.addCleanup(lambda: process.poll() is None and (process.kill(), process.wait()))

        def text():
            with open(logPath, errors="replace") as f:
                return f.read()

        waitUntil(lambda: "ready to proxy" in text() or process.poll() is not None, 20,
                  message="gateway ready")
        self.assertIn("removed the stale socket file", text())
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o660)
        client = socket.socket(socket.AF_UNIX)
        self.addCleanup(client.close)
        client.settimeout(5)
        client.connect(path)
        client.sendall(b"over unix")
        self.assertEqual(client.recv(64), b"over unix")
        process.send_signal(signal.SIGTERM)
        self.assertEqual(process.wait(15), 0)
