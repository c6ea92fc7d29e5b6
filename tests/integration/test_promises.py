"""
Promises held with real processes that no other test holds: clients never
hang on a frozen leader under C{--health-check=etcd}, a member of another
etcd cluster gets no client, C{--workers} replaces a killed worker and
drains on stop, and the gateway serves without its C forwarding step.
"""

import os
import shutil
import signal
import socket
import tempfile
import time

from twisted.trial.unittest import TestCase

from tests.integration.etcd import HOST, ClusterTestMixin, EtcdCluster, etcdctl, freePort
from tests.integration.gateway import REPOSITORY, GatewayProcess
from tests.integration.reliability_helpers import (
    childPids,
    endpointStatus,
    get,
    put,
    report,
    running,
    socketInodes,
    waitUntil,
)


def _gateway(case, args, **kwargs):
    gw = GatewayProcess(list(args), cwd=REPOSITORY, **kwargs)
    case.addCleanup(gw.cleanup)
    return gw.start()


def _version(address, timeout):
    """
    GET /version on a new connection through C{address}: what every etcd
    member answers at once, leader or not.

    @return: C{(seconds, outcome)}: C{"ok"}, C{"timeout"} or C{"closed"}.
    """
    host, port = address.rsplit(":", 1)
    start = time.monotonic()
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as s:
            s.sendall(b"GET /version HTTP/1.0\r\nHost: x\r\n\r\n")
            data = b""
            while True:
                more = s.recv(4096)
                if not more:
                    break
                data += more
        outcome = "ok" if b"etcdserver" in data else "closed"
    except socket.timeout:
        outcome = "timeout"
    except OSError:
        outcome = "closed"
    return time.monotonic() - start, outcome


class EtcdAwareFallbackTests(ClusterTestMixin, TestCase):
    """
    --health-check=etcd against a real 3-member cluster, and a member of a
    second, one-member cluster.
    """

    clusterSize = 3

    def frozenLeader(self, healthTimeout, rise):
        """
        Freeze the leader under --health-check=etcd; once the gateway has
        marked it unhealthy, send a new client every 50ms for 2s (each may
        wait 2s for its answer).

        @return: C{(figures, clients, dials to the frozen leader meanwhile)}.
        """
        cluster = self.cluster
        metrics = f"{HOST}:{freePort()}"
        gw = _gateway(
            self,
            [
                "--endpoints=" + cluster.endpoints,
                "--health-check=etcd",
                "--health-interval=200ms",
                "--health-timeout=" + healthTimeout,
                # Every bad answer counts at once and recovery is slow, so the
                # followers' answers during the election make every member
                # unhealthy for a while: the fallback is exercised.
                "--health-fall=1",
                f"--health-rise={rise}",
                "--metrics-addr=" + metrics,
            ],
        )
        for i in range(3):
            gw.waitForLog(
                f"endpoint {cluster.clientAddress(i)} etcd health unknown -> healthy", timeout=5
            )
        leader = cluster.leader()
        frozen = cluster.clientAddress(leader)
        cluster.freeze(leader)
        frozenAt = time.monotonic()
        gw.waitForLog(f"endpoint {frozen} etcd health healthy -> unhealthy", timeout=5)
        detected = time.monotonic() - frozenAt
        dialsBefore = endpointStatus(metrics, frozen)["dialAttempts"]
        logBefore = len(gw.log())
        clients = []
        started = time.monotonic()
        while time.monotonic() - started < 2.0:
            clients.append(_version(gw.address, timeout=2.0))
            time.sleep(0.05)
        dialsToFrozen = endpointStatus(metrics, frozen)["dialAttempts"] - dialsBefore
        cluster.thaw(leader)
        log = gw.log()
        # Was no member healthy at some time while the clients came (so that
        # the fallback chose where they went)?
        atStart = [
            line for line in log[:logBefore].splitlines()
            if "no endpoint is healthy" in line or "an endpoint is healthy again" in line
        ]
        degraded = bool(atStart and "no endpoint is healthy" in atStart[-1]) or (
            "no endpoint is healthy" in log[logBefore:]
        )
        worst = max(seconds for seconds, _ in clients)
        outcomes = {}
        for _, outcome in clients:
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
        figures = dict(
            healthTimeout=healthTimeout,
            detectedS=round(detected, 2),
            clients=len(clients),
            outcomes=outcomes,
            worstClientS=round(worst, 3),
            dialsToFrozenLeader=dialsToFrozen,
            noMemberHealthyMeanwhile=degraded,
        )
        report("frozen-leader-etcd-health", **figures)
        return figures, clients, dialsToFrozen

    def test_frozenLeaderHangsNoClient(self):
        """
        With the leader SIGSTOPped, once the gateway has marked it unhealthy
        no new client hangs: through the election, when no member is healthy
        and the gateway falls back to the ones that still answer (503, no
        leader), every client is answered at once and none is sent to the
        frozen leader. --health-timeout=1500ms: longer than the 1s etcd 3.4's
        /health waits for a quorum read, so the followers do answer.
        """
        figures, clients, dialsToFrozen = self.frozenLeader("1500ms", rise=15)
        self.assertTrue(figures["noMemberHealthyMeanwhile"], figures)
        self.assertEqual(figures["outcomes"], {"ok": len(clients)}, clients)
        self.assertEqual(dialsToFrozen, 0)
        # Measured: under 0.05s; a client sent to the frozen leader waits its
        # whole 2s timeout. (A bound of 2-3x the measured figure would be
        # 0.15s: too close to scheduling noise on a loaded CI machine.)
        self.assertLess(figures["worstClientS"], 0.5)

    def test_frozenLeaderShortHealthTimeout(self):
        """
        The same with --health-timeout=300ms (as the other etcd-aware tests
        use): no new client hangs once the frozen leader is marked unhealthy.
        """
        figures, clients, dialsToFrozen = self.frozenLeader("300ms", rise=5)
        # Before the fix, 1 of 2 or 3 clients went to the frozen leader and
        # hung: the followers' /health timed out too, so the fallback could
        # not tell them from the frozen one; their /version answers now do.
        self.assertEqual(figures["outcomes"], {"ok": len(clients)}, clients)
        self.assertEqual(dialsToFrozen, 0)

    def test_memberOfAnotherClusterGetsNoClient(self):
        """
        A member of another etcd cluster among the endpoints (first, where
        round-robin starts) is logged at error level as belonging to another
        cluster, and the proxy never dials it: every client reaches the
        configured cluster.
        """
        other = EtcdCluster(size=1)
        self.addCleanup(other.stop)
        other.start()
        foreign = other.clientAddress(0)
        metrics = f"{HOST}:{freePort()}"
        gw = _gateway(
            self,
            [
                f"--endpoints={foreign},{self.cluster.endpoints}",
                "--health-check=etcd",
                "--health-interval=200ms",
                "--health-timeout=500ms",
                "--metrics-addr=" + metrics,
            ],
        )
        gw.waitForLog(f"endpoint {foreign} belongs to ANOTHER etcd cluster", timeout=5)
        ours = _clusterID(self.cluster.clientAddress(0))
        theirs = _clusterID(foreign)
        self.assertNotEqual(ours, theirs)
        reached = [_clusterID(gw.address) for _ in range(12)]
        status = endpointStatus(metrics, foreign)
        report(
            "foreign-member",
            clients=len(reached),
            reachedOurCluster=reached.count(ours),
            dialsToForeign=status["dialAttempts"],
        )
        self.assertEqual(reached, [ours] * 12)
        self.assertEqual((status["dialAttempts"], status["connections"]), (0, 0))
        line = [l for l in gw.log().splitlines() if "belongs to ANOTHER etcd cluster" in l]
        self.assertEqual(len(line), 1, line)
        self.assertIn(f"cluster ID {theirs}", line[0])
        self.assertIn("#error]", line[0])


def _clusterID(address):
    """
    The cluster ID (decimal string) of the member answering on C{address}.
    """
    import http.client
    import json

    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("POST", "/v3/maintenance/status", body="{}")
        return str(json.loads(conn.getresponse().read())["header"]["cluster_id"])
    finally:
        conn.close()


# -- --workers as processes ----------------------------------------------------


def _ownerOf(sock, listenPort, pids):
    """
    Which of C{pids} holds the accepted end of client socket C{sock}
    (connected to C{listenPort} on 127.0.0.1), from /proc/net/tcp.
    """
    local = sock.getsockname()[1]
    wanted = None
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if (
                int(fields[1].rpartition(":")[2], 16) == listenPort
                and int(fields[2].rpartition(":")[2], 16) == local
            ):
                wanted = fields[9]
    if wanted is None:
        return None
    for pid in pids:
        if wanted in socketInodes(pid):
            return pid
    return None


class WorkersProcessTests(ClusterTestMixin, TestCase):
    """
    --workers=2: a supervisor and one worker process on one port.
    """

    clusterSize = 1

    def workers(self, *args):
        gw = _gateway(self, [f"--endpoints={self.cluster.endpoints}", "--workers=2", *args])
        waitUntil(lambda: gw.log().count("ready to proxy client requests") >= 2, 10,
                  message="supervisor and worker ready")
        (worker,) = waitUntil(lambda: childPids(gw.pid), 10, message="worker process")
        return gw, worker

    def test_killedWorkerIsReplaced(self):
        """
        A SIGKILLed worker is logged as exited and replaced by a new process
        that serves clients on the shared port.
        """
        gw, worker = self.workers()
        os.kill(worker, signal.SIGKILL)
        killed = time.monotonic()
        gw.waitForLog("worker-1 was killed by SIGKILL", timeout=5)
        log = waitUntil(
            lambda: gw.log().count("ready to proxy client requests") >= 3 and gw.log(),
            10,
            message="replacement worker ready",
        )
        replacedAfter = time.monotonic() - killed
        self.assertEqual(log.count("started worker-1 (pid"), 2)
        (replacement,) = childPids(gw.pid)
        self.assertNotEqual(replacement, worker)
        self.assertFalse(running(worker))
        # The kernel spreads new connections over both processes again.
        held = []
        self.addCleanup(lambda: [s.close() for s in held])
        for _ in range(40):
            held.append(socket.create_connection((gw.host, gw.port), timeout=5))

        def owners():
            found = {_ownerOf(s, gw.port, (gw.pid, replacement)) for s in held}
            return found if None not in found else None  # None: not accepted yet

        self.assertEqual(
            waitUntil(owners, 5, message="every connection accepted"), {gw.pid, replacement}
        )
        report("worker-replaced", replacedAfterS=round(replacedAfter, 2))
        # The restart delay of a worker that ran under 10s is 2s; measured
        # 2.8-3.9s with the new process's start.
        self.assertLess(replacedAfter, 8.0)
        self.assertEqual(gw.stop(), 0)
        self.assertFalse(running(replacement))

    def test_workerDrainsOnStop(self):
        """
        On SIGTERM to the supervisor, a connection held by the worker keeps
        working through the grace period; once it closes the worker logs it
        as drained and exits, and the supervisor exits 0.
        """
        import http.client

        gw, worker = self.workers("--shutdown-grace=10s")
        connections = []
        self.addCleanup(lambda: [c.close() for c in connections])
        onWorker = None
        for _ in range(60):
            conn = http.client.HTTPConnection(gw.host, gw.port, timeout=5)
            conn.request("GET", "/version")
            self.assertEqual(conn.getresponse().read()[:1], b"{")
            if _ownerOf(conn.sock, gw.port, (worker,)) == worker:
                onWorker = conn
                break
            connections.append(conn)
        self.assertIsNotNone(onWorker, "no connection landed on the worker")
        for c in connections:
            c.close()
        connections.append(onWorker)
        gw.signal(signal.SIGTERM)
        waitUntil(
            lambda: any(
                "[worker-1]" in line and "waiting up to 10s for 1 open connection(s)" in line
                for line in gw.log().splitlines()
            ),
            5,
            message="worker draining its connection",
        )
        # Still forwarded during the grace period, by the draining worker.
        body = '{"key": "ZHJhaW4td29ya2Vy", "value": "b2s="}'  # drain-worker=ok
        onWorker.request("POST", "/v3/kv/put", body=body)
        response = onWorker.getresponse()
        self.assertEqual(response.status, 200, response.read())
        response.read()
        self.assertTrue(running(worker))
        onWorker.close()
        closed = time.monotonic()
        self.assertEqual(gw.wait(timeout=8), 0)
        exitAfterClose = time.monotonic() - closed
        self.assertFalse(running(worker))
        log = gw.log()
        drained = [l for l in log.splitlines() if "[worker-1]" in l and "drained 1 connection(s)" in l]
        self.assertEqual(len(drained), 1, log[-3000:])
        rc, out, err = self.cluster.etcdctl("get", "drain-worker", "--print-value-only")
        self.assertEqual((rc, out.strip()), (0, "ok"), err)
        report("worker-drain", exitAfterCloseS=round(exitAfterClose, 2))
        # Measured 0.3-0.6s; the grace period is 10s.
        self.assertLess(exitAfterClose, 1.5)


class PurePythonFallbackTests(ClusterTestMixin, TestCase):
    """
    The gateway where the C forwarding step (_etcdgw_relay) cannot be
    imported.
    """

    clusterSize = 1

    def test_servesWithoutCStep(self):
        """
        With _etcdgw_relay blocked (a module of that name first on the path
        raises ImportError), the gateway logs "forwarding in pure Python"
        once, and serves: a 512 KiB value written and read back exactly, and
        etcdctl.
        """
        blocked = tempfile.mkdtemp(prefix="etcdgw-noc-")
        self.addCleanup(shutil.rmtree, blocked, True)
        with open(os.path.join(blocked, "_etcdgw_relay.py"), "w") as f:
            f.write('raise ImportError("_etcdgw_relay blocked by the test")\n')
        gw = _gateway(
            self,
            [f"--endpoints={self.cluster.endpoints}"],
            env={"PYTHONPATH": os.pathsep.join([REPOSITORY, blocked])},
        )
        log = gw.waitForLog("ready to proxy client requests")
        self.assertEqual(log.count("forwarding in pure Python"), 1, log)
        value = (os.urandom(192 * 1024).hex() + "x" * 200)[: 512 * 1024]
        self.assertTrue(put(gw.address, "pure/big", value, timeout=10))
        self.assertEqual(get(gw.address, "pure/big", timeout=10), value)
        rc, out, err = etcdctl(gw.address, "get", "pure/big", "--print-value-only")
        self.assertEqual((rc, out.rstrip("\n")), (0, value), err)
