"""
A hung member is found with the DEFAULT flags (C{--health-check=answer}),
against a real 3-member etcd 3.4 cluster on 127.0.0.1 and the real gateway
process: a member frozen with SIGSTOP (its kernel still completes TCP
handshakes, nothing answers) gets no new connection 3 s after the freeze;
thawed, it answers again; every member frozen, nothing is refused or
crashes and everything resumes on thaw; two members slow at once (stopped
and continued on a duty cycle, answering after about the probe timeout)
are never both silent. The same over TLS, where the probes' kept
connections leave nothing in the members' logs. (What a probe costs one
etcd member is measured by benchmarks/probecost.py.)

Clients speak etcd's JSON gateway over HTTP/1.1 (C{/v3/kv/range},
serializable: no leader needed), one new TCP connection through the
gateway per call. The gateway's C{--metrics-addr} (which changes nothing
of its health decisions) tells what it decided, through C{/status.json}.
"""

import base64
import http.client
import json
import os
import signal
import socket
import ssl
import threading
import time

from twisted.trial.unittest import TestCase

from tests.integration.etcd import (
    HOST,
    ClusterTestMixin,
    freePort,
    generateTLS,
)
from tests.integration.reliability_helpers import (
    gatewayStatus,
    report,
    startGateway,
    synDroppingAddress,
)

KEY = base64.b64encode(b"hung/k").decode()


def readSerializable(address, timeout, context=None):
    """
    One client: a new connection through the gateway, a serializable
    C{/v3/kv/range}.

    @return: C{"ok"}, or why not (C{"timeout"}, C{"no response"}, an HTTP
        status).
    """
    host, port = address.rsplit(":", 1)
    if context is None:
        conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    else:
        conn = http.client.HTTPSConnection(host, int(port), timeout=timeout, context=context)
    try:
        conn.request(
            "POST",
            "/v3/kv/range",
            body=json.dumps({"key": KEY, "serializable": True}),
            headers={"Connection": "close"},
        )
        response = conn.getresponse()
        response.read()
        return "ok" if response.status == 200 else f"HTTP {response.status}"
    except socket.timeout:
        return "timeout"
    except (OSError, http.client.HTTPException) as e:
        return f"no response: {type(e).__name__}"
    finally:
        conn.close()


def states(metrics):
    """
    Each endpoint's C{/status.json} entry, by endpoint.
    """
    return {e["endpoint"]: e for e in gatewayStatus(metrics)["endpoints"]}


def waitFor(condition, timeout, interval=0.02):
    """
    Poll C{condition()} until true; return the seconds it took, or L{None}
    after C{timeout}.
    """
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if condition():
            return time.monotonic() - start
        time.sleep(interval)
    return None


class HungMemberTests(ClusterTestMixin, TestCase):
    """
    The default flags against a real 3-member cluster.
    """

    clusterSize = 3
    timeout = 180

    def gateway(self, *extra):
        self.metrics = f"{HOST}:{freePort()}"
        gw = startGateway(self, self.cluster.endpoints, "--metrics-addr=" + self.metrics, *extra)
        gw.waitForLog("readiness on /readyz", timeout=10)
        time.sleep(1.5)  # the first probes (at start) and one more round
        return gw

    def follower(self):
        leader = self.cluster.leader()
        return [i for i in self.cluster._indexes() if i != leader][0]

    def test_frozenMember(self):
        """
        A member frozen with SIGSTOP: silent within 3 s (printed); of 50 new
        connections made after the first 3 s, none fails and none is dialled
        to it; thawed, it answers again and gets new connections.
        """
        cluster = self.cluster
        gw = self.gateway()
        self.assertIn("every endpoint is asked GET /version every 1s", gw.log())
        victim = self.follower()
        endpoint = cluster.clientAddress(victim)
        frozenAt = time.monotonic()
        cluster.freeze(victim)
        silentAfter = waitFor(lambda: states(self.metrics)[endpoint]["silent"], 10)
        self.assertIsNotNone(silentAfter, gw.log()[-3000:])
        # The clients of the first 3 s: some were sent to the frozen member.
        time.sleep(max(0.0, 3.0 - (time.monotonic() - frozenAt)))
        before = states(self.metrics)[endpoint]["dialAttempts"]
        outcomes = [readSerializable(gw.address, timeout=2.0) for _ in range(50)]
        dialledToFrozen = states(self.metrics)[endpoint]["dialAttempts"] - before
        failed = [o for o in outcomes if o != "ok"]
        thawedAt = time.monotonic()
        cluster.thaw(victim)
        answeringAfter = waitFor(lambda: not states(self.metrics)[endpoint]["silent"], 10)
        before = states(self.metrics)[endpoint]["connections"]
        after = [readSerializable(gw.address, timeout=2.0) for _ in range(9)]
        reached = states(self.metrics)[endpoint]["connections"] - before
        report(
            "hung-member-default-flags",
            silentAfterS=round(silentAfter, 2),
            newClientsAfter3s=len(outcomes),
            failed=len(failed),
            dialledToFrozen=dialledToFrozen,
            answeringAfterThawS=None if answeringAfter is None else round(answeringAfter, 2),
            clientsAfterThaw=len(after),
            reachedThawed=reached,
        )
        self.assertEqual(failed, [])
        self.assertEqual(dialledToFrozen, 0)
        # 2.25 s at worst by design (interval + timeout + fastinter + timeout).
        self.assertLess(silentAfter, 3.0)
        self.assertIsNotNone(answeringAfter)
        self.assertLess(answeringAfter, 3.0)  # rise 2: about 1.3 s by design
        self.assertEqual(after, ["ok"] * 9)
        self.assertGreater(reached, 0)
        self.assertIn(f"endpoint {endpoint} answering -> silent: no answer to 2 probes", gw.log())
        self.assertIn(f"endpoint {endpoint} silent -> answering", gw.log())
        self.assertLess(time.monotonic() - thawedAt, 30)

    def test_synDroppingMember(self):
        """
        A member whose accept queue is full (SYNs dropped): the probes'
        connects time out, so it is silent (not down: the share counts it)
        within about 2 s of the start, and no client waits a dial timeout
        on it after that.
        """
        blackhole = synDroppingAddress(self)
        metrics = f"{HOST}:{freePort()}"
        gw = startGateway(self, blackhole + "," + self.cluster.endpoints, "--metrics-addr=" + metrics)
        silentAfter = waitFor(lambda: states(metrics)[blackhole]["silent"], 10)
        timings = []
        for n in range(10):
            began = time.monotonic()
            self.assertEqual(readSerializable(gw.address, timeout=5.0), "ok")
            timings.append(time.monotonic() - began)
        report(
            "syn-drop-default-flags",
            silentAfterListeningS=None if silentAfter is None else round(silentAfter, 2),
            worstClientS=round(max(timings), 3),
            state=states(metrics)[blackhole]["state"],
        )
        self.assertIsNotNone(silentAfter, gw.log()[-2000:])
        self.assertIn(f"endpoint {blackhole} answering -> silent", gw.log())
        self.assertEqual(states(metrics)[blackhole]["state"], "up")
        self.assertLess(max(timings), 0.5)

    def test_everyMemberFrozen(self):
        """
        Every member frozen: nothing crashes, at most one is silent (the
        cap), new clients are still dialled (fail open), and the one waiting
        is answered once the members thaw; everything resumes.
        """
        cluster = self.cluster
        gw = self.gateway()
        for i in cluster._indexes():
            cluster.freeze(i)
        frozenAt = time.monotonic()
        time.sleep(3.5)
        during = states(self.metrics)
        dialsBefore = sum(e["dialAttempts"] for e in during.values())
        result = {}
        client = threading.Thread(
            target=lambda: result.update(outcome=readSerializable(gw.address, timeout=30.0))
        )
        client.start()
        dialled = waitFor(
            lambda: sum(e["dialAttempts"] for e in states(self.metrics).values()) > dialsBefore,
            5,
        )
        time.sleep(1.0)
        silentAtOnce = sum(e["silent"] for e in states(self.metrics).values())
        for i in cluster._indexes():
            cluster.thaw(i)
        thawedAt = time.monotonic()
        client.join(30)
        answeredAfterThaw = time.monotonic() - thawedAt
        resumed = waitFor(
            lambda: all(not e["silent"] for e in states(self.metrics).values()), 15
        )
        later = [readSerializable(gw.address, timeout=5.0) for _ in range(10)]
        log = gw.log()
        report(
            "every-member-frozen",
            frozenS=round(thawedAt - frozenAt, 1),
            silentAtOnce=silentAtOnce,
            clientDialled=dialled is not None,
            waitingClient=result.get("outcome"),
            answeredAfterThawS=round(answeredAfterThaw, 2),
            allAnsweringAfterThawS=None if resumed is None else round(resumed, 2),
            laterClientsOk=later.count("ok"),
        )
        self.assertTrue(gw.running())
        self.assertNotIn("Traceback", log)
        self.assertNotIn("Unhandled", log)
        self.assertIsNotNone(dialled)
        self.assertEqual(silentAtOnce, 1)
        self.assertEqual(result.get("outcome"), "ok")
        self.assertIsNotNone(resumed)
        self.assertEqual(later, ["ok"] * 10)

    def test_twoSlowMembers(self):
        """
        Two of three members made slow at once (each stopped 1.2 s and
        continued 0.1 s, on its own phase: a probe's answer comes after 0
        to 1.2 s, about the probe timeout on average): never both silent at
        once, the other one answering slowly; the third is never silent.
        """
        cluster = self.cluster
        gw = self.gateway()
        slow = [i for i in cluster._indexes()][:2]
        third = cluster.clientAddress([i for i in cluster._indexes() if i not in slow][0])
        stop = threading.Event()

        def dutyCycle(i, phase):
            pid = cluster.members[i].process.pid
            time.sleep(phase)
            while not stop.is_set():
                os.kill(pid, signal.SIGSTOP)
                stop.wait(1.2)
                os.kill(pid, signal.SIGCONT)
                stop.wait(0.1)

        threads = [
            threading.Thread(target=dutyCycle, args=(i, phase))
            for i, phase in zip(slow, (0.0, 0.6))
        ]
        for t in threads:
            t.start()
        samples = 0
        silentSamples = slowSamples = mostSilent = 0
        thirdSilent = False
        try:
            end = time.monotonic() + 10.0
            while time.monotonic() < end:
                now = states(self.metrics)
                samples += 1
                silent = sum(e["silent"] for e in now.values())
                mostSilent = max(mostSilent, silent)
                silentSamples += silent > 0
                slowSamples += any(e["slow"] for e in now.values())
                thirdSilent = thirdSilent or now[third]["silent"]
                time.sleep(0.05)
        finally:
            stop.set()
            for t in threads:
                t.join()
            for i in slow:
                os.kill(cluster.members[i].process.pid, signal.SIGCONT)
        log = gw.log()
        report(
            "two-slow-members",
            samples=samples,
            mostSilentAtOnce=mostSilent,
            samplesWithOneSilent=silentSamples,
            samplesWithOneAnsweringSlowly=slowSamples,
            silentEpisodes=log.count("-> silent:"),
            slowEpisodes=log.count("-> answering slowly:"),
        )
        self.assertLessEqual(mostSilent, 1)
        self.assertFalse(thirdSilent)
        self.assertGreater(silentSamples, 0)  # the slowness was seen at all
        self.assertGreater(slowSamples, 0)  # and the guard held one back


class TLSHungMemberTests(ClusterTestMixin, TestCase):
    """
    The same over TLS (https members requiring client certificates, TLS
    passed through): with the etcd client's certificate
    (C{--health-cert-file}) the probes keep their TLS connections, and the
    members log nothing for them; without it, each probe's refused
    handshake is its answer, at the price of a "rejected connection" line
    in the member's log.
    """

    clusterSize = 3
    clusterTLS = staticmethod(generateTLS)
    timeout = 120

    def frozen(self, *extra):
        """
        Start a gateway with C{extra} flags; freeze a follower; send new
        clients 3 s after; thaw.

        @return: the figures, and the log lines "rejected connection" of
            every member while the probes ran with nothing frozen.
        """
        cluster = self.cluster
        tls = cluster.tls
        rejectedBefore = [cluster.log(i).count("rejected connection") for i in range(3)]
        metrics = f"{HOST}:{freePort()}"
        gw = startGateway(self, cluster.clientURLs, "--metrics-addr=" + metrics, *extra)
        gw.waitForLog("readiness on /readyz", timeout=10)
        time.sleep(3.0)  # about three probes of each member
        rejected = sum(
            cluster.log(i).count("rejected connection") - rejectedBefore[i] for i in range(3)
        )
        context = ssl.create_default_context(cafile=tls.ca)
        context.load_cert_chain(tls.clientCert, tls.clientKey)
        leader = cluster.leader()
        victim = [i for i in cluster._indexes() if i != leader][0]
        endpoint = cluster.clientAddress(victim)
        frozenAt = time.monotonic()
        cluster.freeze(victim)
        silentAfter = waitFor(lambda: states(metrics)[endpoint]["silent"], 10)
        time.sleep(max(0.0, 3.0 - (time.monotonic() - frozenAt)))
        before = states(metrics)[endpoint]["dialAttempts"]
        outcomes = [readSerializable(gw.address, 2.0, context) for _ in range(20)]
        dialledToFrozen = states(metrics)[endpoint]["dialAttempts"] - before
        cluster.thaw(victim)
        answeringAfter = waitFor(lambda: not states(metrics)[endpoint]["silent"], 10)
        figures = dict(
            rejectedConnectionLinesIn3s=rejected,
            silentAfterS=None if silentAfter is None else round(silentAfter, 2),
            newClientsAfter3s=len(outcomes),
            failed=len([o for o in outcomes if o != "ok"]),
            dialledToFrozen=dialledToFrozen,
            answeringAfterThawS=None if answeringAfter is None else round(answeringAfter, 2),
        )
        self.assertIsNotNone(silentAfter, gw.log()[-2000:])
        self.assertLess(silentAfter, 3.0)
        self.assertEqual(outcomes, ["ok"] * 20)
        self.assertEqual(dialledToFrozen, 0)
        self.assertIsNotNone(answeringAfter)
        return gw, figures

    def test_frozenMemberOverTLS(self):
        """
        With --health-cert-file, an https member frozen is silent within
        3 s, no new client is sent to it after that, it answers again once
        thawed, and the probes leave no "rejected connection" line in the
        members' logs.
        """
        tls = self.cluster.tls
        gw, figures = self.frozen(
            "--health-cert-file=" + tls.clientCert, "--health-key-file=" + tls.clientKey
        )
        report("hung-member-tls", **figures)
        self.assertEqual(figures["rejectedConnectionLinesIn3s"], 0)
        self.assertNotIn("refusal", gw.log())

    def test_withoutClientCertificate(self):
        """
        Without a client certificate the members refuse the probes'
        handshakes: each refusal is an answer (a frozen member is still
        found), logged once by the gateway, and costs a line in the member's
        log per probe.
        """
        gw, figures = self.frozen()
        report("hung-member-tls-no-client-certificate", **figures)
        self.assertGreater(figures["rejectedConnectionLinesIn3s"], 0)
        self.assertEqual(gw.log().count("answers the probe's TLS handshake with a refusal"), 3)
