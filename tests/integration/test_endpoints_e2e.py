"""
The address forms the README promises, end to end with a real gateway
process: an etcd member reached over IPv6 only, a wildcard listener reached
over IPv6 and IPv4, a unix-socket listener used by etcdctl, and an endpoint
given by host name, resolved again at each dial.
"""

import fcntl
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid

from twisted.trial.unittest import SkipTest, TestCase

from tests.integration.etcd import HOST, ClusterTestMixin, etcdctl, freePort
from tests.integration.gateway import REPOSITORY, GatewayProcess

HOSTS = "/etc/hosts"


class AddressFormsTests(ClusterTestMixin, TestCase):
    """
    One etcd member whose client URL listens on ::1 only, so that a gateway
    dialling it over IPv4 (or not at all) cannot pass.
    """

    clusterSize = 1
    clusterClientHost = "::1"

    def setUp(self):
        super().setUp()
        port = self.cluster.clientPort(0)
        # The member answers on ::1 and nothing listens on 127.0.0.1:port.
        with socket.create_connection(("::1", port), timeout=2):
            pass
        self.assertRaises(OSError, socket.create_connection, (HOST, port), 0.5)

    def gateway(self, listen=None, *args):
        gw = GatewayProcess(
            ["--endpoints=" + self.cluster.endpoints, "--retry-delay=1s", *args],
            listen=listen,
            cwd=REPOSITORY,
        )
        self.addCleanup(gw.cleanup)
        return gw.start()

    def ctl(self, gw, address, *args):
        rc, out, err = etcdctl(address, *args, timeout=5)
        self.assertEqual(
            rc, 0, f"etcdctl --endpoints={address} {args}: {err}\nlog:\n{gw.log()[-2000:]}"
        )
        return out

    def test_ipv6Endpoint(self):
        """
        --endpoints=[::1]:P reaches a member that listens on ::1 only: etcdctl
        writes and reads through the gateway, and the ready line names the
        endpoint in brackets.
        """
        endpoint = self.cluster.clientAddress(0)
        self.assertTrue(endpoint.startswith("[::1]:"), endpoint)
        gw = self.gateway()
        gw.waitForLog(f"ready to proxy client requests to [{endpoint}] on {gw.address}")
        self.ctl(gw, gw.address, "put", "e2e/v6", "over-ipv6")
        out = self.ctl(gw, gw.address, "get", "e2e/v6", "--print-value-only")
        self.assertEqual(out.strip(), "over-ipv6")
        self.assertNotIn("up -> down", gw.log())

    def test_wildcardListenServesBothFamilies(self):
        """
        --listen-addr=:P is reached over ::1 and over 127.0.0.1: a key written
        through one family is read through the other, both ways.
        """
        port = freePort()
        gw = self.gateway(f":{port}")
        v4, v6 = f"{HOST}:{port}", f"[::1]:{port}"
        self.ctl(gw, v4, "put", "e2e/dual", "from-ipv4")
        self.assertEqual(
            self.ctl(gw, v6, "get", "e2e/dual", "--print-value-only").strip(), "from-ipv4"
        )
        self.ctl(gw, v6, "put", "e2e/dual", "from-ipv6")
        self.assertEqual(
            self.ctl(gw, v4, "get", "e2e/dual", "--print-value-only").strip(), "from-ipv6"
        )
        # Each family reaches the gateway itself (not something else on the port).
        for family, address in ((socket.AF_INET, HOST), (socket.AF_INET6, "::1")):
            with socket.socket(family) as s:
                s.settimeout(5)
                s.connect((address, port))
                s.sendall(b"GET /version HTTP/1.0\r\n\r\n")
                self.assertIn(b"etcdserver", _readAll(s))

    def test_unixListen(self):
        """
        --listen-addr=unix:PATH serves etcdctl --endpoints=unix:///PATH
        (etcdctl 3.4 takes unix:// and an absolute path; it refuses unix:PATH).
        """
        directory = tempfile.mkdtemp(prefix="etcdgw-unix-")  # short: sun_path is 108 bytes
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "gw.sock")
        gw = self.gateway("unix:" + path)
        self.assertEqual(gw.address, "unix://" + path)
        gw.waitForLog(f"ready to proxy client requests to [{self.cluster.clientAddress(0)}]")
        self.ctl(gw, gw.address, "put", "e2e/unix", "over-unix")
        self.assertEqual(
            self.ctl(gw, gw.address, "get", "e2e/unix", "--print-value-only").strip(),
            "over-unix",
        )


def _readAll(sock):
    data = b""
    while True:
        more = sock.recv(65536)
        if not more:
            return data
        data += more


class HostsFile:
    """
    Entries for names of this test in /etc/hosts, the system resolver's own
    file (glibc reads it again at each look-up), removed at cleanup.  Each
    entry carries a marker so that only this test's lines are ever touched;
    the file is rewritten in place (it may be a bind mount) under an
    exclusive lock.
    """

    def __init__(self, path=HOSTS):
        self.path = path
        self.marker = f"# etcdgw-test {uuid.uuid4().hex}"

    @classmethod
    def require(cls):
        """
        Skip (fail under CI) where /etc/hosts cannot be written.
        """
        if os.access(HOSTS, os.W_OK):
            return cls()
        message = f"{HOSTS} is not writable: run as root to test name re-resolution"
        if os.environ.get("CI"):
            raise RuntimeError("CI is set and " + message)
        raise SkipTest(message)

    def _rewrite(self, lines):
        with open(self.path, "r+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                kept = [line for line in f.read().splitlines() if self.marker not in line]
                f.seek(0)
                f.write("\n".join(kept + lines) + "\n")
                f.truncate()
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def set(self, name, address):
        """
        Make C{name} resolve to C{address} (this test's other entries go).
        """
        self._rewrite([f"{address} {name} {self.marker}"])

    def cleanup(self):
        self._rewrite([])


class TaggedServer:
    """
    A TCP server on C{address}:C{port} that greets each connection with its
    tag and a newline, then echoes.
    """

    def __init__(self, address, port, tag):
        self.tag = tag
        self.accepted = 0
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((address, port))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock):
        with sock:
            try:
                sock.sendall(self.tag + b"\n")
                while True:
                    data = sock.recv(65536)
                    if not data:
                        return
                    sock.sendall(data)
            except OSError:
                return

    def close(self):
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()


def _taggedPair():
    """
    Two L{TaggedServer}s on the same port, one on 127.0.0.2 (tag A), one on
    127.0.0.3 (tag B): a name that moves from one address to the other
    reaches the other server with the same endpoint.
    """
    for _ in range(20):
        first = TaggedServer("127.0.0.2", 0, b"A")
        try:
            second = TaggedServer("127.0.0.3", first.port, b"B")
        except OSError:
            first.close()
            continue
        return first, second
    raise RuntimeError("no port free on both 127.0.0.2 and 127.0.0.3")


def _greeting(sock):
    data = b""
    while not data.endswith(b"\n"):
        more = sock.recv(1)
        if not more:
            break
        data += more
    return data.strip()


class NameResolutionTests(TestCase):
    """
    An endpoint given by host name, whose address changes under a running
    gateway.
    """

    def test_nameResolvedAtEachDial(self):
        """
        An endpoint named by host name is resolved again at each dial: after
        the name moves to another address, new clients reach the new one,
        while a connection made before stays where it was.
        """
        hosts = HostsFile.require()
        self.addCleanup(hosts.cleanup)
        a, b = _taggedPair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        name = f"etcdgw-{uuid.uuid4().hex[:12]}.test"
        hosts.set(name, "127.0.0.2")
        # --health-check=tcp: the members count every connection they accept.
        gw = GatewayProcess(
            [f"--endpoints={name}:{a.port}", "--retry-delay=1s", "--health-check=tcp"],
            cwd=REPOSITORY,
        )
        self.addCleanup(gw.cleanup)
        gw.start()

        def connect():
            sock = socket.create_connection((gw.host, gw.port), timeout=5)
            self.addCleanup(sock.close)
            return sock, _greeting(sock)

        before = [connect() for _ in range(3)]
        self.assertEqual([tag for _, tag in before], [b"A"] * 3)
        hosts.set(name, "127.0.0.3")
        started = time.monotonic()
        after = [connect() for _ in range(3)]
        self.assertEqual([tag for _, tag in after], [b"B"] * 3, gw.log()[-2000:])
        # The earlier connection still reaches the first address.
        held = before[0][0]
        held.sendall(b"still A")
        self.assertEqual(held.recv(64), b"still A")
        self.assertEqual((a.accepted, b.accepted), (3, 3))
        self.assertNotIn("up -> down", gw.log())
        print(f"\n  name moved: new clients reached it in {time.monotonic() - started:.3f}s")
