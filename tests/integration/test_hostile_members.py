"""
Membership sync against members that lie: fake members (stdlib HTTP servers
on 127.0.0.1, in threads, so they keep answering while the test blocks on
the gateway process) answer etcd's member list and status calls; one of the
genuine members' lists names attacker hosts of another cluster.
"""

import http.client
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from twisted.trial.unittest import TestCase

from tests.integration.etcd import HOST, waitUntil
from tests.integration.gateway import REPOSITORY, GatewayProcess

GENUINE = "1111"
ATTACKER = "6666"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):
        pass

    def _answer(self, code, body):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        self.close_connection = True

    def do_POST(self):
        member = self.server.member
        member.record(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        header = {"cluster_id": member.clusterID, "member_id": "1"}
        if self.path == "/v3/cluster/member/list":
            members = [
                {"ID": str(i), "name": m.name, "clientURLs": [m.url]}
                for i, m in enumerate(member.lists())
            ]
            self._answer(200, {"header": header, "members": members})
        elif self.path == "/v3/maintenance/status":
            self._answer(200, {"header": header, "version": "3.4.23"})
        else:
            self._answer(404, b"404 page not found\n")

    def do_GET(self):
        member = self.server.member
        member.record(self.path)
        if self.path == "/readyz":
            self._answer(404, b"404 page not found\n")
        elif self.path == "/health":
            self._answer(200, {"health": "true"})
        else:  # a client forwarded by the gateway
            self._answer(200, member.name.encode())


class FakeMember:
    """
    One fake etcd member: answers for C{clusterID}; its member list is
    C{lists()}; remembers every request path.
    """

    def __init__(self, name, clusterID):
        self.name = name
        self.clusterID = clusterID
        self.lists = lambda: [self]
        self.paths = []
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer((HOST, 0), _Handler)
        self.server.daemon_threads = True
        self.server.member = self
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def address(self):
        return f"{HOST}:{self.server.server_address[1]}"

    @property
    def url(self):
        return "http://" + self.address

    def record(self, path):
        with self._lock:
            self.paths.append(path)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def askThrough(gw, path="/client"):
    """
    The name of the fake member a new client connection through the
    gateway reached.
    """
    conn = http.client.HTTPConnection(gw.host, gw.port, timeout=5)
    try:
        conn.request("GET", path)
        return conn.getresponse().read().decode()
    finally:
        conn.close()


class HostileMemberListTests(TestCase):
    """
    A member list naming four attacker hosts of another cluster: they never
    vote, never get a client, and the genuine members stay in use.
    """

    def setUp(self):
        self.genuine = [FakeMember(f"g{i}", GENUINE) for i in range(2)]
        self.attackers = [FakeMember(f"x{i}", ATTACKER) for i in range(4)]
        for m in self.genuine + self.attackers:
            self.addCleanup(m.close)
        g0, g1 = self.genuine
        # g0 (asked first) names the attackers; g1 and the attackers list
        # only the attackers' own cluster view.
        g0.lists = lambda: self.genuine + self.attackers
        g1.lists = lambda: self.genuine
        for x in self.attackers:
            x.lists = lambda: self.attackers

    def gateway(self, *args):
        gw = GatewayProcess(
            ["--endpoints=" + ",".join(m.address for m in self.genuine),
             "--sync-interval=200ms", "--retry-delay=200ms", *args],
            cwd=REPOSITORY,
        )
        self.addCleanup(gw.cleanup)
        return gw.start()

    def checkOnlyGenuine(self, gw):
        # Clients all along, over ten sync rounds (and health rounds).
        reached = []
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            reached.append(askThrough(gw))
            time.sleep(0.05)
        for x in self.attackers:
            self.assertNotIn("/client", x.paths, (x.name, reached, gw.log()[-3000:]))
        self.assertEqual(set(reached), {"g0", "g1"}, reached)
        # At most max(2 seeds, 3) unproven learned endpoints at once: three
        # attacker hosts are added, found of another cluster (logged once
        # each); the fourth is held back for good.
        waitUntil(lambda: gw.log().count("ANOTHER etcd cluster") >= 3, timeout=5,
                  message="three attacker hosts logged as another cluster")
        reached = [askThrough(gw) for _ in range(10)]
        self.assertEqual(set(reached), {"g0", "g1"}, reached)
        log = gw.log()
        for x in self.attackers[:3]:
            self.assertEqual(log.count(f"endpoint {x.address} belongs to ANOTHER"), 1, log)
        self.assertEqual(log.count("ANOTHER etcd cluster"), 3, log)
        self.assertEqual(log.count("1 new endpoints held back"), 1, log)
        self.assertNotIn("/v3/maintenance/status", self.attackers[3].paths)
        for x in self.attackers:
            self.assertNotIn("/client", x.paths, x.name)
            self.assertNotIn("/v3/cluster/member/list", x.paths, x.name)
        return log

    def test_syncAlone(self):
        """
        --sync-interval alone: the attacker hosts are checked, found of
        another cluster and never get a client.
        """
        self.checkOnlyGenuine(self.gateway())

    def test_withEtcdHealth(self):
        """
        With --health-check=etcd too, the four attacker hosts do not
        out-vote the two configured members.
        """
        log = self.checkOnlyGenuine(
            self.gateway("--health-check=etcd", "--health-interval=200ms",
                         "--health-timeout=500ms")
        )
        for g in self.genuine:
            self.assertNotIn(f"endpoint {g.address} belongs to ANOTHER", log)
