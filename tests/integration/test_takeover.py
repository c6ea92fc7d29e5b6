"""
Live takeover (issue 14) with real etcd members and real clients: the
gateway's successor takes every listener and live connection over, on
SIGUSR2 or by C{--takeover}, and clients notice nothing; a takeover that
fails leaves the running gateway serving everything.

One etcd cluster for the whole class. The figures (pause at 2,000
connections) are printed, and appended to C{reliability-figures.txt}.
"""

import hashlib
import http.client
import json
import random
import re
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

from twisted.trial import unittest

from tests.integration.etcd import HOST, ClusterTestMixin, freePort, waitUntil
from tests.integration.gateway import _TWISTD, GatewayProcess, checkoutEnvironment
from tests.integration.reliability_helpers import (
    ThreadedServer,
    childPids,
    fdCount,
    pattern,
    raiseNofile,
    report,
    running,
    scaled,
    socketInodes,
)


def readPid(path):
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def waitGone(pid, timeout=15):
    waitUntil(lambda: not running(pid), timeout, message=f"pid {pid} gone")


def localPorts(pid, remotePort):
    """
    The local ports of process C{pid}'s TCP connections to C{remotePort}
    (from /proc: its socket inodes, then /proc/net/tcp).
    """
    inodes = socketInodes(pid)
    ports = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(name) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[9] in inodes and int(fields[2].rpartition(":")[2], 16) == remotePort:
                    ports.add(int(fields[1].rpartition(":")[2], 16))
    return ports


def localPeers(pid, port):
    """
    The client ports of process C{pid}'s accepted connections on C{port}.
    """
    inodes = socketInodes(pid)
    peers = set()
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[9] in inodes and int(fields[1].rpartition(":")[2], 16) == port \
                    and fields[3] == "01":
                peers.add(int(fields[2].rpartition(":")[2], 16))
    return peers


def version(conn):
    """
    C{GET /version} on a kept HTTP/1.1 connection; the etcd server version.
    """
    conn.request("GET", "/version")
    response = conn.getresponse()
    body = response.read()
    assert response.status == 200, (response.status, body)
    return json.loads(body)["etcdserver"]


class NewConnections(threading.Thread):
    """
    Opens one new connection after another (C{GET /version}, HTTP/1.0)
    until stopped; counts those served and those that failed.
    """

    def __init__(self, port):
        super().__init__(daemon=True)
        self.port = port
        self.served = 0
        self.failures = []
        self._halt = threading.Event()

    def run(self):
        while not self._halt.is_set():
            try:
                with socket.create_connection((HOST, self.port), timeout=10) as s:
                    s.sendall(b"GET /version HTTP/1.0\r\n\r\n")
                    data = b""
                    while True:
                        chunk = s.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                if not data.startswith(b"HTTP/1.") or b" 200 " not in data.split(b"\r\n")[0]:
                    raise OSError(f"bad answer {data[:60]!r}")
                self.served += 1
            except OSError as e:
                self.failures.append(str(e))
            time.sleep(0.005)

    def stop(self):
        self._halt.set()
        self.join(15)


class NotifySocket:
    """
    A unix datagram socket standing in for systemd's C{$NOTIFY_SOCKET}.
    """

    def __init__(self, directory):
        self.path = os.path.join(directory, "notify")
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(self.path)
        self.socket.setblocking(False)
        self.messages = []

    def read(self):
        while True:
            try:
                self.messages.append(self.socket.recv(4096).decode())
            except BlockingIOError:
                return self.messages

    def close(self):
        self.socket.close()


class TakeoverTests(ClusterTestMixin, unittest.TestCase):
    """
    Takeovers of a running gateway by its successor.
    """

    clusterSize = 3

    def gateway(self, *args, listen=None, env=None):
        gw = GatewayProcess(
            ["--endpoints=" + (args[0] if args and not args[0].startswith("--") else
                               self.cluster.endpoints)]
            + [a for a in args if a.startswith("--")],
            listen=listen,
            env=env,
        )
        self.addCleanup(self.stopAll, gw)
        gw.pidfile = os.path.join(gw.directory, "twistd.pid")
        return gw.start()

    def stopAll(self, gw):
        """
        Stop whichever process the gateway's pidfile names now (a
        successor is no child of this process), then the first one.
        """
        pid = readPid(gw.pidfile)
        if pid is not None and running(pid) and pid != gw.pid:
            os.kill(pid, signal.SIGTERM)
            waitGone(pid)
        gw.cleanup()

    def takeOver(self, gw, timeout=20):
        """
        SIGUSR2 to the process the gateway's pidfile names; wait until its
        successor took over and it exited.

        @return: the successor's pid.
        """
        old = readPid(gw.pidfile)
        done = gw.log().count("takeover: took over")
        os.kill(old, signal.SIGUSR2)
        waitUntil(
            lambda: gw.log().count("takeover: took over") > done,
            timeout,
            message="the successor took over",
        )
        if old == gw.pid:
            self.assertEqual(gw.wait(timeout), 0, "the first gateway exits 0")
        else:
            waitGone(old, timeout)
        waitUntil(lambda: readPid(gw.pidfile) not in (None, old), timeout, message="pidfile")
        return readPid(gw.pidfile)

    def test_threeTakeoversInARow(self):
        """
        An etcdctl watch, a grpc channel and an HTTP/1.1 keep-alive
        connection opened before three SIGUSR2 takeovers in a row keep
        working on their TCP connections (same local ports), the watch
        receives every event; new connections during the takeovers are all
        served; the pidfile names the last successor; under systemd each
        successor says MAINPID= and READY=1, and no process says STOPPING=1.
        """
        import grpc

        from tests.integration.grpcetcd import EtcdGRPC

        directory = tempfile.mkdtemp(prefix="etcdgw-takeover-")
        self.addCleanup(shutil.rmtree, directory, True)
        notify = NotifySocket(directory)
        self.addCleanup(notify.close)
        metrics = freePort()
        gw = self.gateway(f"--metrics-addr={HOST}:{metrics}", env={"NOTIFY_SOCKET": notify.path})
        watchOut = open(os.path.join(directory, "watch.out"), "w+")
        watchErr = open(os.path.join(directory, "watch.err"), "w+")
        watch = subprocess.Popen(
            ["etcdctl", "--endpoints=" + gw.address, "watch", "tk", "--prefix"],
            stdout=watchOut,
            stderr=watchErr,
            env=dict(os.environ, ETCDCTL_API="3"),
        )
        self.addCleanup(lambda: (watch.kill(), watch.wait()))
        waitUntil(lambda: localPorts(watch.pid, gw.port), 10, message="watch connected")
        watchPorts = localPorts(watch.pid, gw.port)
        channel = grpc.insecure_channel(gw.address)
        self.addCleanup(channel.close)
        client = EtcdGRPC(channel)
        keepAlive = http.client.HTTPConnection(HOST, gw.port, timeout=10)
        self.addCleanup(keepAlive.close)
        version(keepAlive)
        httpPort = keepAlive.sock.getsockname()[1]
        client.put(b"tk0", b"before")
        newConnections = NewConnections(gw.port)
        newConnections.start()
        self.addCleanup(newConnections.stop)
        pids = [gw.pid]
        for i in range(1, 4):
            pids.append(self.takeOver(gw))
            client.put(b"tk%d" % i, b"after-%d" % i)
            self.assertEqual(client.get(b"tk%d" % i), b"after-%d" % i)
            version(keepAlive)
        newConnections.stop()
        waitUntil(
            lambda: open(watchOut.name).read().count("tk") >= 4,
            10,
            message="the watch saw every event",
        )
        events = open(watchOut.name).read().split()
        self.assertEqual(
            [events[i + 1] for i in range(0, len(events), 3)],
            ["tk0", "tk1", "tk2", "tk3"],
        )
        self.assertEqual(localPorts(watch.pid, gw.port), watchPorts)
        self.assertEqual(keepAlive.sock.getsockname()[1], httpPort)
        self.assertIsNone(watch.poll())
        self.assertEqual(open(watchErr.name).read(), "")
        self.assertEqual(newConnections.failures, [])
        self.assertGreater(newConnections.served, 0)
        self.assertEqual(len(set(pids)), 4)
        messages = notify.read()
        for pid in pids[1:]:
            self.assertTrue(
                any(f"MAINPID={pid}" in m and "READY=1" in m for m in messages), messages
            )
        self.assertFalse(any("STOPPING=1" in m for m in messages), messages)
        # The operator's listener was handed over too (the same flags: the
        # same address).
        status = http.client.HTTPConnection(HOST, metrics, timeout=10)
        status.request("GET", "/livez")
        self.assertEqual(status.getresponse().status, 200)
        status.close()
        log = gw.log()
        pauses = [
            float(line.rpartition("pause ")[2].split()[0])
            for line in log.splitlines()
            if "takeover: took over" in line
        ]
        report(
            "takeover three in a row",
            pauses_ms=pauses,
            new_connections_served=newConnections.served,
            new_connections_failed=len(newConnections.failures),
        )

    def test_takeoverWithOtherEndpoints(self):
        """
        A gateway started by hand with --takeover and other endpoints takes
        over from the one whose --control-socket that is; a connection to
        a member no longer in the list is handed over and keeps working;
        new ones go to the new list.
        """
        directory = tempfile.mkdtemp(prefix="etcdgw-takeover-")
        self.addCleanup(shutil.rmtree, directory, True)
        control = os.path.join(directory, "control")
        members = self.cluster.endpoints.split(",")
        old = self.gateway(members[0], f"--control-socket={control}")
        kept = http.client.HTTPConnection(HOST, old.port, timeout=10)
        self.addCleanup(kept.close)
        version(kept)
        # --held-close=off: the connection to the member left out is left
        # alone (with the default, it is closed, paced, as for any member
        # removed from the list).
        new = GatewayProcess(
            ["--endpoints=" + ",".join(members[1:]), f"--takeover={control}",
             f"--control-socket={control}", "--held-close=off"],
            listen=old.listen,
        )
        self.addCleanup(new.cleanup)
        new.start()
        new.waitForLog("takeover: took over 1 connection(s)", 20)
        self.assertEqual(old.wait(15), 0)
        self.assertIn("handed 1 connection(s)", old.log())
        for _ in range(5):
            version(kept)
            time.sleep(0.2)
        fresh = http.client.HTTPConnection(HOST, old.port, timeout=10)
        self.addCleanup(fresh.close)
        version(fresh)
        self.assertIn(f"ready to proxy client requests to [{' '.join(members[1:])}]", new.log())
        # The successor listens on the control socket in its turn.
        waitUntil(lambda: "control socket on" in new.log(), 10, message="control socket")

    def test_failuresLeaveTheGatewayServing(self):
        """
        A successor with a bad flag, one of another protocol version, one
        killed half-way (after the export), one that cannot listen: each
        time the running gateway keeps serving every connection and
        accepting new ones, says why in one line, and leaks no descriptor.
        """
        directory = tempfile.mkdtemp(prefix="etcdgw-takeover-")
        self.addCleanup(shutil.rmtree, directory, True)
        control = os.path.join(directory, "control")
        gw = self.gateway(f"--control-socket={control}")
        kept = http.client.HTTPConnection(HOST, gw.port, timeout=10)
        self.addCleanup(kept.close)
        version(kept)
        keptPort = kept.sock.getsockname()[1]
        waitUntil(lambda: "control socket on" in gw.log(), 10, message="control socket")
        baseline = fdCount(gw.pid)

        def stillServing(failures):
            waitUntil(
                lambda: gw.log().count("takeover failed") >= failures, 15,
                message="the failure logged",
            )
            self.assertTrue(gw.running())
            version(kept)
            self.assertEqual(kept.sock.getsockname()[1], keptPort)
            fresh = http.client.HTTPConnection(HOST, gw.port, timeout=10)
            version(fresh)
            fresh.close()
            waitUntil(lambda: fdCount(gw.pid) == baseline, 10,
                      message=f"descriptors back to {baseline} (now {fdCount(gw.pid)})")
            self.assertEqual(readPid(gw.pidfile), gw.pid)

        # 1. A bad flag: the successor exits 1 with one line, never connects.
        bad = subprocess.run(
            [sys.executable, "-c", _TWISTD, "-n", "--pidfile=", "etcd-gateway",
             f"--takeover={control}", "--health-rise=0"],
            env=checkoutEnvironment(), capture_output=True, timeout=30,
        )
        self.assertEqual(bad.returncode, 1)
        self.assertIn(b"--health-rise", bad.stderr)
        self.assertEqual(len(bad.stderr.strip().splitlines()), 1, bad.stderr)
        # ... and one given a path nobody listens on.
        lost = subprocess.run(
            [sys.executable, "-c", _TWISTD, "-n", "--pidfile=", "etcd-gateway",
             f"--listen-addr={HOST}:{freePort()}", "--endpoints=" + self.cluster.endpoints,
             f"--takeover={control}.nobody"],
            env=checkoutEnvironment(), capture_output=True, timeout=30,
        )
        self.assertEqual(lost.returncode, 1)
        self.assertIn(b"cannot reach the running gateway", lost.stderr)
        stillServing(0)

        # 2. Another protocol version: refused before anything is paused.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(control)
            header = json.dumps({"type": "hello", "version": 999, "pid": 1, "fds": 0}).encode()
            s.sendall(struct.pack("!II", len(header), 0) + header)
            s.settimeout(10)
            answer = s.recv(65536)
        self.assertIn(b'"refuse"', answer)
        stillServing(1)
        self.assertIn("speaks takeover protocol version 999", gw.log())

        # 3. Killed half-way: it said hello, got the listeners and pairs
        #    (with their descriptors), then died.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(control)
            header = json.dumps({"type": "hello", "version": 1, "pid": 1, "fds": 0}).encode()
            s.sendall(struct.pack("!II", len(header), 0) + header)
            s.settimeout(10)
            received = b""
            fds = []
            while b'"end"' not in received:
                data, more, _, _ = socket.recv_fds(s, 65536, 256)
                if not data:
                    break
                received += data
                fds += more
            for fd in fds:
                os.close(fd)
        self.assertIn(b'"listeners"', received)
        stillServing(2)
        self.assertIn("the successor went away before the commit", gw.log())

        # 4. A real successor that cannot listen (its --metrics-addr is
        #    taken): it gives up after the export; exit status 1.
        taken = socket.socket()
        taken.bind((HOST, 0))
        taken.listen(1)
        self.addCleanup(taken.close)
        failing = subprocess.run(
            [sys.executable, "-c", _TWISTD, "-n", "--pidfile=", "etcd-gateway",
             "--listen-addr=" + gw.listen, "--endpoints=" + self.cluster.endpoints,
             f"--takeover={control}", f"--metrics-addr={HOST}:{taken.getsockname()[1]}"],
            env=checkoutEnvironment(), capture_output=True, timeout=60,
        )
        self.assertEqual(failing.returncode, 1, failing.stderr)
        self.assertIn(b"takeover failed: --metrics-addr", failing.stderr)
        stillServing(3)
        self.assertIn("the successor gave up", gw.log())

    def test_twoThousandConnections(self):
        """
        2,000 held connections survive a SIGUSR2 takeover; the pause is
        measured inside (frozen in the old process to started in the new
        one) and outside (the longest request on a held connection across
        the takeover), and printed.
        """
        count = 2000
        old = raiseNofile(count * 4 + 1000)
        import resource

        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, old)
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft < count * 4 + 200:
            message = f"RLIMIT_NOFILE {soft} is too low for {count} connections"
            if os.environ.get("CI"):
                self.fail(message)
            raise unittest.SkipTest(message)
        gw = self.gateway()
        conns = []
        for _ in range(count):
            conn = http.client.HTTPConnection(HOST, gw.port, timeout=30)
            version(conn)
            conns.append(conn)
        self.addCleanup(lambda: [c.close() for c in conns])
        probe = conns[0]
        latencies = []
        stop = threading.Event()
        errors = []

        def probing():
            while not stop.is_set():
                start = time.monotonic()
                try:
                    version(probe)
                except Exception as e:
                    errors.append(repr(e))
                    return
                latencies.append((start, time.monotonic() - start))

        thread = threading.Thread(target=probing, daemon=True)
        time.sleep(0.2)
        thread.start()
        time.sleep(0.3)
        signalled = time.monotonic()
        self.takeOver(gw, timeout=60)
        took = time.monotonic() - signalled
        time.sleep(0.3)
        stop.set()
        thread.join(15)
        self.assertEqual(errors, [])
        for conn in conns:
            version(conn)
        line = [l for l in gw.log().splitlines() if "takeover: took over" in l][-1]
        self.assertIn(f"took over {count} connection(s)", line)
        inside = float(line.rpartition("pause ")[2].split()[0])
        outside = max(latency for start, latency in latencies if start >= signalled - 1)
        report(
            "takeover 2000 connections",
            pause_inside_ms=round(inside, 1),
            longest_request_across_ms=round(outside * 1000, 1),
            sigusr2_to_exit_s=round(took, 2),
            breakdown=line.partition("started here: ")[2].rstrip(")").replace(", ", "/"),
        )
        # Measured 140-310 ms on a 2-core machine (RELIABILITY.rst): bounded
        # at 3x the worst seen.
        self.assertLess(inside, 900)
        self.assertLess(outside * 1000, 900)

    def test_daemonizedWithPidfile(self):
        """
        A daemonized twistd (--pidfile, --logfile) hands over on SIGUSR2:
        the pidfile names the successor, the kept connection keeps working,
        and the successor removes the pidfile when it stops.
        """
        directory = tempfile.mkdtemp(prefix="etcdgw-takeover-")
        self.addCleanup(shutil.rmtree, directory, True)
        pidfile = os.path.join(directory, "gw.pid")
        logfile = os.path.join(directory, "gw.log")
        port = freePort()
        started = subprocess.run(
            [sys.executable, "-c", _TWISTD, f"--pidfile={pidfile}", f"--logfile={logfile}",
             "etcd-gateway", f"--listen-addr={HOST}:{port}",
             "--endpoints=" + self.cluster.endpoints],
            env=checkoutEnvironment(), capture_output=True, timeout=30, cwd=directory,
        )
        self.assertEqual(started.returncode, 0, started.stderr)
        first = readPid(pidfile)

        def stop():
            pid = readPid(pidfile)
            if pid is not None and running(pid):
                os.kill(pid, signal.SIGTERM)
                waitGone(pid)

        self.addCleanup(stop)
        self.assertTrue(running(first))
        kept = http.client.HTTPConnection(HOST, port, timeout=10)
        self.addCleanup(kept.close)
        version(kept)
        os.kill(first, signal.SIGUSR2)
        waitUntil(lambda: not running(first), 20, message="the first daemon exits")
        waitUntil(lambda: readPid(pidfile) not in (None, first), 10, message="pidfile")
        second = readPid(pidfile)
        self.assertTrue(running(second))
        version(kept)
        with open(logfile) as f:
            log = f.read()
        self.assertIn("takeover: took over 1 connection(s)", log)
        self.assertIn("takeover: handed 1 connection(s)", log)
        self.assertEqual(
            [name for name in os.listdir(directory) if "takeover" in name], []
        )
        os.kill(second, signal.SIGTERM)
        waitGone(second)
        self.assertFalse(os.path.exists(pidfile))

    def test_bytesInFlight(self):
        """
        A transfer of 1 GiB each way (random chunk sizes, a slow reader)
        across a takeover in the middle is byte-exact both ways, and both
        half-closes arrive after it.
        """
        size = scaled(1 << 30, 4 << 30)

        def send(sock, seed, rng):
            offset = 0
            while offset < size:
                n = min(size - offset, rng.randint(1, 256 * 1024))
                sock.sendall(pattern(offset, n, seed))
                offset += n
            sock.shutdown(socket.SHUT_WR)

        def receive(sock, progress=None, slow=0):
            digest = hashlib.sha256()
            total = 0
            while True:
                data = sock.recv(1 << 18 if total >= slow else 4096)
                if not data:
                    return total, digest.hexdigest()
                digest.update(data)
                total += len(data)
                if progress is not None:
                    progress[0] = total
                if total < slow:
                    time.sleep(0.0005)

        def member(sock, server):
            sender = threading.Thread(target=send, args=(sock, 1, random.Random(1)), daemon=True)
            sender.start()
            server.record(receive(sock))
            sender.join()

        expected = {}
        for seed in (1, 2):
            digest = hashlib.sha256()
            for offset in range(0, size, 1 << 24):
                digest.update(pattern(offset, min(1 << 24, size - offset), seed))
            expected[seed] = digest.hexdigest()
        server = ThreadedServer(member)
        self.addCleanup(server.close)
        gw = self.gateway(server.address, "--health-check=tcp")
        client = socket.create_connection((HOST, gw.port))
        self.addCleanup(client.close)
        progress = [0]
        results = {}
        sender = threading.Thread(target=send, args=(client, 2, random.Random(2)), daemon=True)
        reader = threading.Thread(
            target=lambda: results.update(client=receive(client, progress, slow=8 << 20)),
            daemon=True,
        )
        sender.start()
        reader.start()
        waitUntil(lambda: progress[0] >= 4 << 20, 60, message="under way")
        atByte = progress[0]
        self.takeOver(gw)
        sender.join(300)
        reader.join(300)
        waitUntil(lambda: server.results, 60, message="the member got the end")
        self.assertEqual(results["client"], (size, expected[1]))
        self.assertEqual(server.results, [(size, expected[2])])
        self.assertEqual(server.errors, [])
        handed = [l for l in gw.log().splitlines() if "takeover: handed" in l][-1]
        queued = int(re.search(r"\((\d+) bytes queued\)", handed).group(1))
        report(
            "takeover bytes in flight",
            bytes_each_way=size,
            queued_in_old_process=queued,
            client_had_read=atByte,
        )

    def test_workers(self):
        """
        --workers 2: SIGUSR2 to the supervisor; its successor takes over its
        connections, and the successor's worker takes over the old worker's;
        every held connection keeps working on its socket, both old
        processes exit, new connections are served.
        """
        gw = self.gateway("--workers=2")
        waitUntil(lambda: gw.log().count("ready to proxy client requests") >= 2, 15,
                  message="both processes ready")
        oldWorkers = childPids(gw.pid)
        self.assertEqual(len(oldWorkers), 1)
        held = []
        for _ in range(40):
            conn = http.client.HTTPConnection(HOST, gw.port, timeout=10)
            version(conn)
            held.append(conn)
        self.addCleanup(lambda: [c.close() for c in held])
        ports = [c.sock.getsockname()[1] for c in held]
        # Both processes hold some (the kernel spreads them).
        self.assertGreater(len(localPeers(oldWorkers[0], gw.port)), 0)
        successor = self.takeOver(gw, timeout=30)
        waitUntil(lambda: not running(oldWorkers[0]), 20, message="the old worker exits")
        newWorkers = childPids(successor)
        self.assertEqual(len(newWorkers), 1)
        for conn, port in zip(held, ports):
            version(conn)
            self.assertEqual(conn.sock.getsockname()[1], port)
        fresh = http.client.HTTPConnection(HOST, gw.port, timeout=10)
        version(fresh)
        fresh.close()
        log = gw.log()
        self.assertEqual(log.count("takeover: took over"), 2, log[-3000:])
        self.assertIn("[worker-1]", log)
        self.assertNotIn("takeover failed", log)
        self.assertGreater(len(localPeers(newWorkers[0], gw.port)), 0)
        tookOver = [l for l in log.splitlines() if "takeover: took over" in l]
        report(
            "takeover workers",
            connections=[int(re.search(r"took over (\d+) conn", l).group(1)) for l in tookOver],
            pauses_ms=[float(re.search(r"pause ([\d.]+) ms", l).group(1)) for l in tookOver],
        )

    def test_unixListener(self):
        """
        A unix-socket --listen-addr is handed over: its file stays, a held
        connection keeps working, new ones are served.
        """
        directory = tempfile.mkdtemp(prefix="etcdgw-takeover-")
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "gw.sock")
        gw = self.gateway(listen="unix:" + path)

        def ask(sock):
            sock.sendall(b"GET /version HTTP/1.1\r\nHost: gw\r\n\r\n")
            data = b""
            while b"\r\n\r\n" not in data:
                data += sock.recv(4096)
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
            while len(body) < length:
                body += sock.recv(4096)
            self.assertIn(b" 200 ", head.split(b"\r\n")[0])
            return json.loads(body)["etcdserver"]

        held = socket.socket(socket.AF_UNIX)
        self.addCleanup(held.close)
        held.settimeout(10)
        held.connect(path)
        ask(held)
        self.takeOver(gw)
        self.assertTrue(os.path.exists(path))
        ask(held)
        fresh = socket.socket(socket.AF_UNIX)
        self.addCleanup(fresh.close)
        fresh.settimeout(10)
        fresh.connect(path)
        ask(fresh)

    def test_socketActivated(self):
        """
        A gateway on systemd's socket (systemd-socket-activate, as
        etcd-gateway.socket) hands it over: the successor says MAINPID= and
        READY=1; a held connection keeps working; new ones are served.
        """
        activate = shutil.which("systemd-socket-activate")
        if activate is None:
            message = "systemd-socket-activate not found (Debian's systemd package)"
            if os.environ.get("CI"):
                self.fail("CI is set and " + message)
            raise unittest.SkipTest(message)
        directory = tempfile.mkdtemp(prefix="etcdgw-takeover-")
        self.addCleanup(shutil.rmtree, directory, True)
        notify = NotifySocket(directory)
        self.addCleanup(notify.close)
        port = freePort()
        log = open(os.path.join(directory, "gw.log"), "wb")
        self.addCleanup(log.close)
        process = subprocess.Popen(
            [
                activate, f"--listen={HOST}:{port}", "--fdname=etcd-gateway",
                f"--setenv=PYTHONPATH={checkoutEnvironment()['PYTHONPATH']}",
                f"--setenv=NOTIFY_SOCKET={notify.path}",
                sys.executable, "-c", _TWISTD, "-n", "--pidfile=", "etcd-gateway",
                "--listen-addr=systemd:domain=INET:index=0",
                "--endpoints=" + self.cluster.endpoints,
            ],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )

        def stop():
            for m in notify.read():
                found = re.search(r"MAINPID=(\d+)", m)
                if found and running(int(found.group(1))):
                    os.kill(int(found.group(1)), signal.SIGTERM)
                    waitGone(int(found.group(1)))
            if process.poll() is None:
                process.kill()
                process.wait()

        self.addCleanup(stop)

        def listening():
            try:
                socket.create_connection((HOST, port), timeout=1).close()
                return True
            except OSError:
                return False

        waitUntil(listening, 10, message="systemd-socket-activate listening")
        held = http.client.HTTPConnection(HOST, port, timeout=10)
        self.addCleanup(held.close)
        version(held)  # the first connection starts the gateway
        waitUntil(lambda: any("READY=1" in m for m in notify.read()), 15, message="READY")
        os.kill(process.pid, signal.SIGUSR2)
        self.assertEqual(process.wait(20), 0)
        waitUntil(
            lambda: any("READY=1" in m and f"MAINPID={process.pid}" not in m
                        for m in notify.read()),
            15, message="the successor's READY",
        )
        version(held)
        fresh = http.client.HTTPConnection(HOST, port, timeout=10)
        version(fresh)
        fresh.close()
        self.assertFalse(any("STOPPING=1" in m for m in notify.messages))

    def test_halfClosedStaysHalfClosed(self):
        """
        A connection whose client shut its write side down before the
        takeover stays half-closed across it: the member's reply, sent
        after, arrives whole, then the end.
        """
        go = threading.Event()

        def member(sock, server):
            data = b""
            while True:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
            server.record(("eof", data))
            go.wait(30)
            sock.sendall(b"reply to " + data)
            sock.shutdown(socket.SHUT_WR)

        server = ThreadedServer(member)
        self.addCleanup(server.close)
        gw = self.gateway(server.address, "--health-check=tcp")
        client = socket.create_connection((HOST, gw.port))
        self.addCleanup(client.close)
        client.settimeout(30)
        client.sendall(b"question")
        client.shutdown(socket.SHUT_WR)
        waitUntil(lambda: server.results, 10, message="the member saw the end")
        self.takeOver(gw)
        go.set()
        received = b""
        while True:
            chunk = client.recv(4096)
            if not chunk:
                break
            received += chunk
        self.assertEqual(server.results, [("eof", b"question")])
        self.assertEqual(received, b"reply to question")

    def test_workersFailureLeavesEveryProcessServing(self):
        """
        --workers 2, and a successor (by hand, --takeover) whose own
        listener fails after its worker has taken the old worker's
        connections up to holding: the held worker is killed, the old
        worker and the old supervisor thaw and serve every connection;
        nothing exits but the successor (status 1).
        """
        directory = tempfile.mkdtemp(prefix="etcdgw-takeover-")
        self.addCleanup(shutil.rmtree, directory, True)
        control = os.path.join(directory, "control")
        gw = self.gateway("--workers=2", f"--control-socket={control}")
        waitUntil(lambda: gw.log().count("ready to proxy client requests") >= 2, 15,
                  message="both processes ready")
        [oldWorker] = childPids(gw.pid)
        waitUntil(lambda: "control socket on @etcd-gateway-takeover" in gw.log(), 10,
                  message="the worker's control socket")
        held = []
        for _ in range(30):
            conn = http.client.HTTPConnection(HOST, gw.port, timeout=10)
            version(conn)
            held.append(conn)
        self.addCleanup(lambda: [c.close() for c in held])
        self.assertGreater(len(localPeers(oldWorker, gw.port)), 0)
        taken = socket.socket()
        taken.bind((HOST, 0))
        taken.listen(1)
        self.addCleanup(taken.close)
        failing = subprocess.run(
            [sys.executable, "-c", _TWISTD, "-n", "--pidfile=", "etcd-gateway",
             "--listen-addr=" + gw.listen, "--endpoints=" + self.cluster.endpoints,
             "--workers=2", f"--takeover={control}",
             f"--metrics-addr={HOST}:{taken.getsockname()[1]}"],
            env=checkoutEnvironment(), capture_output=True, timeout=60,
        )
        self.assertEqual(failing.returncode, 1, failing.stderr)
        self.assertIn(b"takeover failed: --metrics-addr", failing.stderr)
        self.assertIn(b"takeover: holding", failing.stdout + failing.stderr)
        waitUntil(lambda: gw.log().count("takeover failed") >= 2, 15,
                  message="the supervisor and its worker both thawed")
        self.assertTrue(gw.running())
        self.assertTrue(running(oldWorker))
        self.assertEqual(childPids(gw.pid), [oldWorker])
        for conn in held:
            version(conn)
        fresh = http.client.HTTPConnection(HOST, gw.port, timeout=10)
        version(fresh)
        fresh.close()
