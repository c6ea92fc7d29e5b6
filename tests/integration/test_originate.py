"""
C{--upstream-tls=originate} with real etcd: a 3-member cluster with TLS and
C{--client-cert-auth}, whose certificates name only C{localhost} (no IP
address), reached through the gateway by plaintext clients: etcdctl (put,
get, watch, lease, txn, snapshot), curl to etcd's JSON gateway, and a
python grpc channel. Three more "members" present refused certificates
(another CA, another name, expired): they never carry a client, and
C{/status.json} says why. One cluster and one gateway for the class.
"""

import datetime
import os
import shutil
import signal
import subprocess
import tempfile
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.trial.unittest import TestCase

from tests.certs import CertificateAuthority, TLSServer, _name, _writeCert, _writeKey
from tests.integration.etcd import HOST, EtcdCluster, TLSConfig, freePort, requireEtcd
from tests.integration.gateway import REPOSITORY, GatewayProcess
from tests.integration.reliability_helpers import gatewayStatus, get, put, waitUntil


class _NamedCluster(EtcdCluster):
    """
    The harness's own health checks dial 127.0.0.1, which the members'
    certificates do not name: they check the chain only.
    """

    def _sslContext(self):
        context = super()._sslContext()
        context.check_hostname = False
        return context


def _expired(ca, directory, basename, name):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=30))
        .not_valid_after(now - datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    certPath = os.path.join(directory, basename + ".crt")
    keyPath = os.path.join(directory, basename + ".key")
    _writeCert(certPath, cert)
    _writeKey(keyPath, key)
    return certPath, keyPath


class _Fixture:
    """
    The class's cluster, refused members and gateway, made once.
    """

    def __init__(self):
        self.directory = tempfile.mkdtemp(prefix="etcdgw-originate-")
        ca = CertificateAuthority("etcdgw originate CA")
        certs = tuple(
            ca.issue(self.directory, f"member{i}", ("localhost",), ips=()) for i in range(3)
        )
        client = ca.issue(self.directory, "client", (), ips=(), client=True)
        self.tls = TLSConfig(
            ca=ca.write(self.directory),
            certs=certs,
            clientCertAuth=True,
            clientCert=client[0],
            clientKey=client[1],
        )
        self.cluster = _NamedCluster(size=3, tls=self.tls)
        self.refused = {}
        self.gateway = None
        try:
            self.cluster.start()
            rogue = CertificateAuthority("rogue CA")
            for kind, pair in (
                ("another CA", rogue.issue(self.directory, "rogue", ("localhost",), ips=())),
                ("another name", ca.issue(self.directory, "other", ("other.example",), ips=())),
                ("expired", _expired(ca, self.directory, "expired", "localhost")),
            ):
                self.refused[kind] = TLSServer.withCertificate(pair)
            self.metrics = f"{HOST}:{freePort()}"
            members = [f"localhost:{self.cluster.clientPort(i)}" for i in range(3)]
            bad = [f"localhost:{s.port}" for s in self.refused.values()]
            self.gateway = GatewayProcess(
                [
                    "--endpoints=" + ",".join(members + bad),
                    "--upstream-tls=originate",
                    "--cacert=" + self.tls.ca,
                    "--cert=" + self.tls.clientCert,
                    "--key=" + self.tls.clientKey,
                    "--metrics-addr=" + self.metrics,
                    "--health-interval=300ms",
                ],
                cwd=REPOSITORY,
            ).start()
        except BaseException:
            self.stop()
            raise

    def stop(self):
        if self.gateway is not None:
            self.gateway.cleanup()
        for server in self.refused.values():
            server.close()
        self.cluster.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


_fixture = {}


class OriginateTests(TestCase):
    """
    Plaintext clients through a gateway originating TLS to a cluster with
    --client-cert-auth.
    """

    def setUp(self):
        requireEtcd()
        state = _fixture.get("state")
        if state is None:
            import unittest as pyunit

            state = _fixture["state"] = {
                "remaining": set(pyunit.TestLoader().getTestCaseNames(type(self))),
                "fixture": None,
                "error": None,
            }
        self.addCleanup(self._done, state)
        if state["error"] is not None:
            raise state["error"]
        if state["fixture"] is None:
            started = time.monotonic()
            try:
                state["fixture"] = _Fixture()
            except Exception as e:
                state["error"] = e
                raise
            print(f"\ncluster, refused members and gateway up in {time.monotonic() - started:.1f}s")
        self.fixture = state["fixture"]
        self.gateway = self.fixture.gateway
        self.address = self.gateway.address

    def _done(self, state):
        state["remaining"].discard(self._testMethodName)
        if not state["remaining"] and state["fixture"] is not None:
            state["fixture"].stop()
            state["fixture"] = None

    def etcdctl(self, *args, timeout=10):
        env = dict(os.environ, ETCDCTL_API="3")
        return subprocess.run(
            ["etcdctl", "--endpoints=" + self.address, "--command-timeout=5s", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )

    def test_etcdctl(self):
        """
        Plaintext etcdctl put, get, txn, lease, watch and snapshot work
        through the gateway against members that require client
        certificates.
        """
        started = time.monotonic()
        r = self.etcdctl("put", "originate/k", "v1")
        self.assertEqual(r.returncode, 0, r.stderr)
        r = self.etcdctl("get", "originate/k", "--print-value-only")
        self.assertEqual(r.stdout.strip(), "v1", r.stderr)
        txn = subprocess.run(
            ["etcdctl", "--endpoints=" + self.address, "txn"],
            input='value("originate/k") = "v1"\n\nput originate/k v2\n\nput originate/k v3\n\n',
            capture_output=True,
            text=True,
            timeout=10,
            env=dict(os.environ, ETCDCTL_API="3"),
        )
        self.assertIn("SUCCESS", txn.stdout, txn.stderr)
        r = self.etcdctl("get", "originate/k", "--print-value-only")
        self.assertEqual(r.stdout.strip(), "v2")
        r = self.etcdctl("lease", "grant", "60")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("granted", r.stdout)
        watch = subprocess.Popen(
            ["etcdctl", "--endpoints=" + self.address, "watch", "originate/w"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, ETCDCTL_API="3"),
        )
        try:
            time.sleep(0.5)
            self.assertEqual(self.etcdctl("put", "originate/w", "seen").returncode, 0)
            deadline = time.monotonic() + 5
            lines = []
            while time.monotonic() < deadline and "seen" not in lines:
                lines.append(watch.stdout.readline().strip())
            self.assertIn("seen", lines)
        finally:
            watch.kill()
            watch.wait()
        path = os.path.join(self.fixture.directory, "snap.db")
        r = self.etcdctl("snapshot", "save", path, timeout=20)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertGreater(os.path.getsize(path), 0)
        print(f"\netcdctl put/get/txn/lease/watch/snapshot in {time.monotonic() - started:.1f}s")

    def test_curlAndJSONGateway(self):
        """
        Plain curl reaches etcd's JSON gateway (HTTP/1.1) through the
        gateway.
        """
        self.assertTrue(put(self.address, "originate/json", "j1"))
        self.assertEqual(get(self.address, "originate/json"), "j1")
        r = subprocess.run(
            ["curl", "-sS", "--max-time", "5", f"http://{self.address}/version"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        self.assertIn("etcdserver", r.stdout, r.stderr)

    def test_grpcChannel(self):
        """
        A python grpc channel (HTTP/2, ALPN h2 toward the member) puts, gets
        and watches through the gateway.
        """
        import grpc

        from tests.integration.grpcetcd import EtcdGRPC

        channel = grpc.insecure_channel(self.address)
        try:
            client = EtcdGRPC(channel, timeout=5)
            self.assertGreater(client.put(b"originate/g", b"g1"), 0)
            self.assertEqual(client.get(b"originate/g"), b"g1")
            with client.watch(b"originate/gw") as events:
                client.put(b"originate/gw", b"w1")
                self.assertEqual(next(events), (b"originate/gw", b"w1"))
        finally:
            channel.close()

    def test_refusedMembers(self):
        """
        Members whose certificate chains to another CA, names another host
        or has expired are down, /status.json saying why; every client
        meanwhile is served by the others.
        """
        fixture = self.fixture
        expected = {
            "another CA": "certificate verify failed",
            "another name": "other.example",
            "expired": "expired",
        }

        def reasons():
            status = gatewayStatus(fixture.metrics)
            found = {}
            for kind, server in fixture.refused.items():
                for e in status["endpoints"]:
                    if e["endpoint"].endswith(f":{server.port}"):
                        found[kind] = e
            return found

        started = time.monotonic()

        def allDown():
            found = reasons()
            return len(found) == 3 and all(e["state"] == "down" for e in found.values())

        waitUntil(allDown, 5, message="refused members down")
        found = reasons()
        print(f"\nrefused members down within {time.monotonic() - started:.2f}s:")
        for kind, e in found.items():
            print(f"  {kind}: {e['reason']}")
            self.assertIn("TLS handshake failed", e["reason"])
            self.assertIn(expected[kind], e["reason"])
            self.assertEqual(e["connections"], 0)
        failures = 0
        for i in range(30):
            if not put(self.address, f"originate/many{i}", "x", timeout=5):
                failures += 1
        self.assertEqual(failures, 0)
        self.assertIn("TLS handshake failed", self.gateway.log())

    def test_sighupKeepsServing(self):
        """
        SIGHUP re-reads --cacert, --cert and --key (one log line) and the
        gateway keeps serving with them.
        """
        self.gateway.signal(signal.SIGHUP)
        self.gateway.waitForLog("upstream TLS files read again", timeout=5)
        self.assertTrue(put(self.address, "originate/hup", "h"))
        self.assertEqual(get(self.address, "originate/hup"), "h")

    def _gateway(self, *args):
        metrics = f"{HOST}:{freePort()}"
        fixture = self.fixture
        members = [f"localhost:{fixture.cluster.clientPort(i)}" for i in range(3)]
        bad = [f"localhost:{s.port}" for s in fixture.refused.values()]
        gw = GatewayProcess(
            [
                "--endpoints=" + ",".join(members + bad),
                "--upstream-tls=originate",
                "--cacert=" + fixture.tls.ca,
                "--cert=" + fixture.tls.clientCert,
                "--key=" + fixture.tls.clientKey,
                "--metrics-addr=" + metrics,
                *args,
            ],
            cwd=REPOSITORY,
        )
        self.addCleanup(gw.cleanup)
        gw.start()
        return gw, metrics

    def _states(self, metrics):
        return {e["endpoint"]: e for e in gatewayStatus(metrics)["endpoints"]}

    def test_healthChecksAndFailover(self):
        """
        --health-check=etcd and tcp in originate mode: the etcd checks speak
        TLS with the same settings (good members healthy), the TCP probes of
        down members make the handshake (refused members stay down, not
        brought up by a connect; the etcd checks find them unhealthy, saying
        why); a killed member is down, clients go on
        through the others, and a watch held on it resumes elsewhere.
        """
        fixture = self.fixture
        cluster = fixture.cluster
        started = time.monotonic()
        etcdGW, etcdMetrics = self._gateway(
            "--health-check=etcd", "--health-interval=300ms", "--health-timeout=1s"
        )
        tcpGW, tcpMetrics = self._gateway("--health-check=tcp", "--retry-delay=300ms")
        good = {f"localhost:{cluster.clientPort(i)}" for i in range(3)}
        bad = {f"localhost:{s.port}" for s in fixture.refused.values()}

        def etcdJudged():
            # A refused handshake is an unhealthy (and silent) member to the
            # etcd checks: no client goes there, the reason is shown.
            states = self._states(etcdMetrics)
            return all(states[e]["health"] == "healthy" for e in good) and all(
                not states[e]["usable"] and "TLS handshake failed" in states[e]["healthReason"]
                for e in bad
            )

        waitUntil(etcdJudged, 10, message="etcd checks judged every member")
        for i in range(12):  # the tcp gateway learns of the refused members by dialling them
            self.assertTrue(put(tcpGW.address, f"originate/tcp{i}", "t"))
        time.sleep(1.0)  # three --retry-delay probes of the down members
        states = self._states(tcpMetrics)
        for e in bad:
            self.assertEqual(states[e]["state"], "down", states[e])
            self.assertIn("TLS handshake failed", states[e]["reason"])
        print(f"\netcd and tcp checks settled in {time.monotonic() - started:.1f}s")

        # Failover, and a held watch, through the first gateway.
        watch = subprocess.Popen(
            ["etcdctl", "--endpoints=" + self.address, "watch", "originate/held"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, ETCDCTL_API="3"),
        )
        self.addCleanup(watch.wait)
        self.addCleanup(watch.kill)

        def holder():
            states = self._states(fixture.metrics)
            held = [i for i in range(3) if states[f"localhost:{cluster.clientPort(i)}"]["active"]]
            return held

        held = waitUntil(holder, 5, message="the watch held on a member")
        victim = held[0]
        killed = time.monotonic()
        cluster.kill(victim)
        self.addCleanup(cluster.restart, victim)
        cluster.waitHealthy([i for i in range(3) if i != victim], timeout=15)
        for i in range(10):
            self.assertTrue(put(self.address, f"originate/failover{i}", "f", timeout=5))
        self.assertTrue(put(self.address, "originate/held", "after"))
        deadline = time.monotonic() + 10
        line = ""
        while time.monotonic() < deadline and line != "after":
            line = watch.stdout.readline().strip()
        self.assertEqual(line, "after")
        print(f"member {victim} killed: failover and the held watch back in "
              f"{time.monotonic() - killed:.1f}s")
        victimName = f"localhost:{cluster.clientPort(victim)}"
        self.assertEqual(self._states(fixture.metrics)[victimName]["state"], "down")


class BadInputTests(TestCase):
    """
    Bad origination input through twistd: one line naming it, exit 1,
    nothing started.
    """

    def test_oneLineExit1(self):
        """
        A non-loopback listen address, a missing CA, a key of another
        certificate: each one line, status 1, no traceback.
        """
        import sys

        from tests.certs import CertificateAuthority
        from tests.integration.gateway import checkoutEnvironment
        from tests.integration.test_gateway import _TWISTD

        directory = tempfile.mkdtemp(prefix="etcdgw-originate-bad-")
        self.addCleanup(shutil.rmtree, directory, True)
        ca = CertificateAuthority("bad input CA")
        cert, _ = ca.issue(directory, "a", ("localhost",))
        _, otherKey = ca.issue(directory, "b", ("localhost",))
        pidfile = os.path.join(directory, "twistd.pid")
        cases = [
            (["--listen-addr=0.0.0.0:23790"], "--originate-remote-clients"),
            (["--cacert=" + os.path.join(directory, "missing.pem")], "--cacert"),
            (["--cert=" + cert, "--key=" + otherKey], "is not the one of the certificate"),
        ]
        for args, expected in cases:
            proc = subprocess.run(
                [sys.executable, "-c", _TWISTD, "--pidfile=" + pidfile, "-n", "etcd-gateway",
                 "--upstream-tls=originate", *args],
                capture_output=True, text=True, timeout=30, env=checkoutEnvironment(),
            )
            output = (proc.stdout + proc.stderr).strip()
            self.assertEqual(proc.returncode, 1, output)
            self.assertEqual(len(output.splitlines()), 1, output)
            self.assertIn(expected, output)
            self.assertNotIn("Traceback", output)
            self.assertFalse(os.path.exists(pidfile))
