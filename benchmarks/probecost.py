#!/usr/bin/env python3
"""
What one health probe costs one etcd 3.4 member (its process's CPU, less what
it uses idle), at a fleet's pace: GET /version kept alive (the answer probe),
with a new connection each time, over a kept TLS connection (the answer probe
of https members), and a TLS hello per probe answered by the member's alert or
ServerHello (what a probe that only counts the first answer would cost, and a
"rejected connection" line in the member's log each time).

A measurement, not a test (it was one, 40 s of the suite, asserting figures
that depend on the machine's speed): run it from the repository root with
etcd installed,

    python benchmarks/probecost.py

It prints one line of figures (README.rst, "What the probes cost the
cluster", has a run of it).
"""

import os
import socket
import ssl
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.integration.etcd import HOST, EtcdCluster, generateTLS  # noqa: E402
from tests.integration.reliability_helpers import cpuSeconds, report  # noqa: E402


def _clientHello():
    """
    A TLS ClientHello (pyOpenSSL on a memory BIO), as a probe that needs
    only the member's first answer would send.
    """
    from OpenSSL import SSL

    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_verify(SSL.VERIFY_NONE)
    connection = SSL.Connection(context, None)
    connection.set_connect_state()
    try:
        connection.do_handshake()
    except SSL.WantReadError:
        pass
    return connection.bio_read(65536)


class _CPU:
    """
    The CPU seconds one process uses, less what it uses idle.
    """

    def __init__(self, pid):
        self.pid = pid
        time.sleep(1.0)
        start = cpuSeconds(pid)
        time.sleep(4.0)
        self.idle = (cpuSeconds(pid) - start) / 4.0

    def per(self, run):
        """
        Run C{run()} (which returns how many probes it sent); the CPU of the
        process per probe, in microseconds.
        """
        start, began = cpuSeconds(self.pid), time.monotonic()
        count = run()
        elapsed = time.monotonic() - began
        time.sleep(0.3)  # what the last ones cost is counted
        used = cpuSeconds(self.pid) - start - self.idle * (elapsed + 0.3)
        return max(0.0, used) / count * 1e6


def _paced(rate, seconds, send):
    """
    Call C{send(n)} C{rate} times a second for C{seconds}, in groups of 10.

    @return: how many were sent.
    """
    began = time.monotonic()
    n = 0
    while time.monotonic() - began < seconds:
        delay = began + n / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        for k in range(10):
            send(n + k)
        n += 10
    return n


def _readVersion(sock):
    data = b""
    while not data.endswith(b"}"):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed")
        data += chunk


class ProbeCost:
    """
    What one probe costs one etcd 3.4 member (its process's CPU, less what
    it uses idle), at a fleet's pace: GET /version kept alive (the answer
    probe), with a new connection each time, over a kept TLS connection
    (the answer probe of https members), and a TLS hello per probe
    answered by the member's alert or ServerHello (what a probe that only
    counts the first answer would cost, and a "rejected connection" line
    in the member's log each time).
    """

    def __init__(self):
        self._clusters = []

    def cluster(self, tls=False):
        directory = tempfile.mkdtemp(prefix="etcdgw-cost-")
        cluster = EtcdCluster(size=1, tls=generateTLS(directory, size=1) if tls else None)
        cluster.start()
        self._clusters.append(cluster)
        return cluster

    def stop(self):
        for cluster in self._clusters:
            cluster.stop()

    def run(self):
        """Each kind of probe's cost per probe, printed; kept alive costs least."""
        request = b"GET /version HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: etcd-gateway\r\n\r\n"
        plain = self.cluster()
        port = plain.clientPort(0)
        cpu = _CPU(plain.members[0].process.pid)
        kept = [socket.create_connection((HOST, port)) for _ in range(50)]

        def keptProbe(n):
            sock = kept[n % len(kept)]
            sock.sendall(request)
            _readVersion(sock)

        def newProbe(n):
            with socket.create_connection((HOST, port)) as sock:
                sock.sendall(request)
                _readVersion(sock)

        keptUs = cpu.per(lambda: _paced(2000, 8.0, keptProbe))
        newUs = cpu.per(lambda: _paced(500, 8.0, newProbe))
        for sock in kept:
            sock.close()

        secure = self.cluster(tls=True)
        port = secure.clientPort(0)
        cpu = _CPU(secure.members[0].process.pid)
        context = ssl.create_default_context(cafile=secure.tls.ca)
        context.load_cert_chain(secure.tls.clientCert, secure.tls.clientKey)
        keptTLS = [
            context.wrap_socket(socket.create_connection((HOST, port)), server_hostname=HOST)
            for _ in range(50)
        ]

        def keptTLSProbe(n):
            sock = keptTLS[n % len(keptTLS)]
            sock.sendall(request)
            _readVersion(sock)

        hello = _clientHello()

        def helloProbe(n):
            sock = socket.create_connection((HOST, port))
            sock.sendall(hello)
            sock.recv(65536)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00" * 2)
            sock.close()

        keptTLSUs = cpu.per(lambda: _paced(2000, 8.0, keptTLSProbe))
        for sock in keptTLS:
            sock.close()
        rejectedBefore = secure.log(0).count("rejected connection")
        hellos = []

        def sendHellos():
            hellos.append(_paced(200, 5.0, helloProbe))
            return hellos[0]

        helloUs = cpu.per(sendHellos)
        time.sleep(0.5)
        rejected = secure.log(0).count("rejected connection") - rejectedBefore
        report(
            "probe-cost-etcd-3.4",
            keptAliveVersionUs=round(keptUs, 1),
            newConnectionVersionUs=round(newUs, 1),
            keptTLSVersionUs=round(keptTLSUs, 1),
            tlsHelloPerProbeUs=round(helloUs, 1),
            rejectedConnectionLinesPerHello=round(rejected / hellos[0], 2),
            fleet10000x3every1sCoresPerMember=round(10000 * keptUs / 1e6, 2),
        )
        return keptUs, newUs, keptTLSUs, helloUs


def main():
    cost = ProbeCost()
    try:
        keptUs, newUs, keptTLSUs, helloUs = cost.run()
    finally:
        cost.stop()
    if not (keptUs < newUs and keptTLSUs < helloUs):
        print("unexpected: a kept-alive probe cost more than a new connection or a hello")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
