"""
Operating a real gateway process in front of a real etcd member: drain on
SIGTERM, SIGHUP, systemd notifications, metrics over HTTP, JSON logs.
"""

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial import unittest

from .etcd import HOST, ClusterTestMixin, etcdctl, freePort, waitUntil
from .gateway import _TWISTD, REPOSITORY, GatewayProcess


def _refused(address):
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=0.5).close()
    except ConnectionRefusedError:
        return True
    return False


def _get(url, timeout=5):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _samples(text):
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, sample.labels.get("endpoint"))] = sample.value
    return found


class OperationsTests(ClusterTestMixin, unittest.TestCase):
    """
    One etcd member for the class; a gateway process per test.
    """

    clusterSize = 1

    def gateway(self, *args, env=None, twistdArgs=()):
        env = dict(env or {}, PYTHONPATH=REPOSITORY)
        gw = GatewayProcess(
            ["--endpoints=" + self.cluster.endpoints, "--retry-delay=1s", *args],
            env=env,
            cwd=REPOSITORY,
        )
        gw.twistdArgs.extend(twistdArgs)
        self.addCleanup(gw.cleanup)
        return gw

    def keptAlive(self, gw):
        """
        An HTTP/1.1 keep-alive connection through the gateway to etcd, used once.
        """
        connection = http.client.HTTPConnection(gw.host, gw.port, timeout=5)
        self.addCleanup(connection.close)
        connection.request("GET", "/version")
        response = connection.getresponse()
        self.assertEqual(response.status, 200)
        self.assertIn("etcdserver", json.loads(response.read()))
        return connection

    def test_drainLetsOpenConnectionFinish(self):
        """
        On SIGTERM the gateway refuses new clients at once, an open connection
        keeps working through the grace period, and once it closes the
        process exits 0 having logged it as drained.
        """
        gw = self.gateway("--shutdown-grace=10s").start()
        connection = self.keptAlive(gw)
        gw.signal(signal.SIGTERM)
        signalled = time.monotonic()
        # Probe only once the signal is handled: a probe that connects before
        # would be a second open connection to drain.
        gw.waitForLog("no longer accepting", timeout=2)
        waitUntil(lambda: _refused(gw.address), timeout=2, interval=0.02, message="refused")
        refusedAfter = time.monotonic() - signalled
        self.assertLess(refusedAfter, 2)
        # The open connection still reaches etcd during the grace period.
        body = json.dumps({"key": "ZHJhaW4=", "value": "b2s="})  # drain=ok
        connection.request("POST", "/v3/kv/put", body=body)
        response = connection.getresponse()
        self.assertEqual(response.status, 200, response.read())
        response.read()
        self.assertTrue(gw.running())
        connection.close()
        closed = time.monotonic()
        self.assertEqual(gw.wait(timeout=5), 0)
        exitAfterClose = time.monotonic() - closed
        self.assertLess(exitAfterClose, 2)  # not the 10s grace
        log = gw.log()
        self.assertIn("waiting up to 10s for 1 open connection(s)", log)
        self.assertIn("drained 1 connection(s)", log)
        self.assertIn("cut 0 still open", log)
        rc, out, err = self.cluster.etcdctl("get", "drain", "--print-value-only")
        self.assertEqual((rc, out.strip()), (0, "ok"), err)

    def test_cutAfterGrace(self):
        """
        A connection still open when the grace period ends is closed, and
        the process exits 0 soon after, having logged it as cut.
        """
        gw = self.gateway("--shutdown-grace=1s").start()
        connection = self.keptAlive(gw)
        gw.signal(signal.SIGTERM)
        signalled = time.monotonic()
        self.assertEqual(gw.wait(timeout=6), 0)
        elapsed = time.monotonic() - signalled
        self.assertGreaterEqual(elapsed, 0.9)
        self.assertLess(elapsed, 3)
        connection.sock.settimeout(2)
        try:
            self.assertEqual(connection.sock.recv(1), b"")
        except ConnectionResetError:
            pass  # cut: a reset is as good as an end of stream
        log = gw.log()
        self.assertIn("drained 0 connection(s)", log)
        self.assertIn("cut 1 still open after the 1s grace period", log)

    def test_systemdNotify(self):
        """
        Through a real NOTIFY_SOCKET (abstract namespace): READY=1 with the
        endpoint counts once listening, WATCHDOG=1 pings at half of
        WATCHDOG_USEC, STOPPING=1 on SIGTERM.
        """
        sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(sink.close)
        name = f"etcdgw-it-{os.getpid()}-{time.monotonic_ns()}"
        sink.bind("\0" + name)
        sink.settimeout(5)
        gw = self.gateway(
            env={"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "400000"}
        ).start()

        def receive():
            data = sink.recv(4096).decode()
            return dict(line.split("=", 1) for line in data.split("\n"))

        messages = [receive() for _ in range(4)]
        ready = [m for m in messages if "READY" in m]
        self.assertEqual(len(ready), 1, messages)
        self.assertEqual(ready[0]["STATUS"], f"1/1 endpoints up; listening on {gw.address}")
        self.assertEqual(ready[0]["MAINPID"], str(gw.pid))
        start = time.monotonic()
        pings = 0
        while pings < 3:
            if receive().get("WATCHDOG") == "1":
                pings += 1
        # 3 pings at 0.2s intervals
        self.assertLess(time.monotonic() - start, 2)
        self.assertEqual(gw.stop(), 0)
        sink.settimeout(0.5)
        rest = []
        try:
            while True:
                rest.append(receive())
        except socket.timeout:
            pass
        self.assertIn("1", [m.get("STOPPING") for m in rest], rest)

    def test_metricsHealthAndSighup(self):
        """
        Metrics scraped from the real process follow real traffic (a dead
        endpoint is tried, fails and shows as down); SIGHUP probes every
        endpoint at once, so with --retry-delay=1h it is SIGHUP alone that
        brings the endpoint back when it answers, and takes it out again when
        it stops answering.
        """
        metricsPort = freePort()
        deadPort = freePort()
        dead = f"{HOST}:{deadPort}"
        gw = self.gateway(
            f"--endpoints={self.cluster.endpoints},{dead}",
            "--retry-delay=1h",
            f"--metrics-addr={HOST}:{metricsPort}",
            # Down endpoints probed every --retry-delay only (the answer
            # probes, the default, probe every member every second).
            "--health-check=tcp",
        ).start()
        base = f"http://{HOST}:{metricsPort}"
        member = self.cluster.endpoints
        for i in range(3):
            rc, out, err = etcdctl(gw.address, "put", f"k{i}", "v" * 100)
            self.assertEqual(rc, 0, err)
        code, text = _get(base + "/metrics")
        self.assertEqual(code, 200)
        found = _samples(text)
        self.assertEqual(found[("etcd_gateway_endpoint_up", member)], 1)
        self.assertEqual(found[("etcd_gateway_endpoint_up", dead)], 0)
        self.assertGreaterEqual(found[("etcd_gateway_upstream_dial_failures_total", dead)], 1)
        self.assertEqual(found[("etcd_gateway_upstream_dial_failures_total", member)], 0)
        self.assertGreaterEqual(found[("etcd_gateway_connections_accepted_total", None)], 3)
        self.assertEqual(found[("etcd_gateway_connections_refused_total", None)], 0)
        self.assertGreater(found[("etcd_gateway_upstream_sent_bytes_total", member)], 300)
        self.assertGreater(found[("etcd_gateway_upstream_received_bytes_total", member)], 0)
        self.assertEqual(found[("etcd_gateway_upstream_sent_bytes_total", dead)], 0)

        # Something answers on the dead endpoint now: SIGHUP brings it back.
        answering = socket.socket()
        self.addCleanup(answering.close)
        answering.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        answering.bind((HOST, deadPort))
        answering.listen(8)
        gw.signal(signal.SIGHUP)
        log = gw.waitForLog("SIGHUP done")
        self.assertIn("SIGHUP done: 2/2 endpoints answered; 2/2 up", log)
        found = _samples(_get(base + "/metrics")[1])
        self.assertEqual(found[("etcd_gateway_endpoint_up", dead)], 1)
        self.assertLess(found[("etcd_gateway_endpoint_state_seconds", dead)], 5)
        code, body = _get(base + "/health")
        health = json.loads(body)
        # (and the held connections closed, by reason: none here)
        closed = health.pop("heldClosed")
        self.assertEqual((code, health), (200, {"status": "ok", "up": 2, "total": 2}))
        self.assertEqual(set(closed.values()), {0})

        # It stops answering: the next SIGHUP takes it out.
        answering.close()
        gw.signal(signal.SIGHUP)
        waitUntil(lambda: gw.log().count("SIGHUP done") == 2, timeout=10, interval=0.02, message="second SIGHUP done")
        self.assertIn("SIGHUP done: 1/2 endpoints answered; 1/2 up", gw.log())
        status = json.loads(_get(base + "/status.json")[1])
        states = {e["endpoint"]: e["state"] for e in status["endpoints"]}
        self.assertEqual(states, {member: "up", dead: "down"})
        self.assertEqual(gw.stop(), 0)

    def test_jsonLogs(self):
        """
        With --logger=etcdgw.logs.jsonLogObserver every line the process
        writes is one JSON object, the gateway's fields included.
        """
        gw = self.gateway(twistdArgs=["--logger=etcdgw.logs.jsonLogObserver"]).start()
        rc, out, err = etcdctl(gw.address, "put", "json", "logs")
        self.assertEqual(rc, 0, err)
        self.assertEqual(gw.stop(), 0)
        records = [json.loads(line) for line in gw.log().splitlines()]
        [ready] = [r for r in records if r["message"].startswith("ready to proxy")]
        self.assertEqual(ready["endpoints"], self.cluster.endpoints)
        self.assertEqual(ready["level"], "info")
        [stop] = [r for r in records if r["message"] == "received SIGTERM: shutting down"]
        self.assertEqual((stop["signal"], stop["namespace"]), ("SIGTERM", "etcdgw.shutdown.DrainService"))


class SocketActivationTests(ClusterTestMixin, unittest.TestCase):
    """
    The gateway started by systemd's socket activation protocol, as
    etcd-gateway.socket does, through systemd-socket-activate(1).
    """

    clusterSize = 1

    def test_socketActivated(self):
        """
        The first client connection starts the gateway on the passed socket
        (LISTEN_FDS); it is served; READY=1 arrives on NOTIFY_SOCKET; SIGTERM
        ends it with status 0. Without systemd-socket-activate it skips, and
        fails when CI is set (CI must never skip it silently).
        """
        activate = shutil.which("systemd-socket-activate")
        if activate is None:
            message = "systemd-socket-activate not found (Debian's systemd package)"
            if os.environ.get("CI"):
                self.fail("CI is set and " + message + "; .ci/run installs it")
            raise unittest.SkipTest(message)
        sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(sink.close)
        name = f"etcdgw-sa-{os.getpid()}-{time.monotonic_ns()}"
        sink.bind("\0" + name)
        sink.settimeout(10)
        port = freePort()
        log = open(os.path.join(self.mktemp() + ".log"), "wb")
        self.addCleanup(log.close)
        process = subprocess.Popen(
            [
                activate,
                f"--listen={HOST}:{port}",
                "--fdname=etcd-gateway",  # systemd >= 227 always sets LISTEN_FDNAMES
                f"--setenv=PYTHONPATH={REPOSITORY}",
                f"--setenv=NOTIFY_SOCKET=@{name}",
                sys.executable, "-c", _TWISTD, "-n", "--pidfile=", "etcd-gateway",
                "--listen-addr=systemd:domain=INET:index=0",
                "--endpoints=" + self.cluster.endpoints,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPOSITORY,
            start_new_session=True,
        )

        def stop():
            if process.poll() is None:
                process.kill()
                process.wait()

        self.addCleanup(stop)
        waitUntil(lambda: not _refused(f"{HOST}:{port}"), timeout=5, interval=0.02, message="accepting")
        rc, out, err = etcdctl(f"{HOST}:{port}", "put", "activated", "yes")
        self.assertEqual(rc, 0, err)
        data = sink.recv(4096).decode()
        self.assertIn("READY=1", data.split("\n"))
        self.assertIn(f"MAINPID={process.pid}", data.split("\n"))
        process.terminate()
        self.assertEqual(process.wait(timeout=10), 0)
        rc, out, err = self.cluster.etcdctl("get", "activated", "--print-value-only")
        self.assertEqual(out.strip(), "yes")
