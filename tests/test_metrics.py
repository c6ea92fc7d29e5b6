"""
Tests for L{etcdgw.metrics}: scraped over real HTTP on 127.0.0.1 and parsed
with prometheus_client's own parser.
"""

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, readBody

from etcdgw.endpoint import Endpoint
from etcdgw.gateway import Gateway
from etcdgw.metrics import GatewayCollector, gatewayRegistry
from etcdgw.pool import UNHEALTHY, UpstreamPool
from etcdgw.proxy import GatewayFactory
from etcdgw.status import statusSite


def samples(text):
    """
    {(sample name, frozenset(labels)): value} from Prometheus text.
    """
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def gatewayState(clock):
    a = Endpoint("10.0.0.1", 2379)
    b = Endpoint("10.0.0.2", 2379)
    pool = UpstreamPool([a, b], clock)
    factory = GatewayFactory(pool, clock, 1.0)
    stateA = pool.stateOf(a)
    stateA.dialAttempts = 7
    stateA.dialFailures = 2
    stateA.bytesToUpstream = 1234
    stateA.bytesFromUpstream = 56789
    stateA.connections = 5
    stateA.active = 1
    factory.accepted = 6
    factory.refused = 1
    factory.clients = {object()}
    clock.advance(30)
    pool.markDown(b, "connection refused")
    pool.setHealth(a, UNHEALTHY, "etcdserver: no leader")
    clock.advance(12)
    return pool, factory, a, b


class FakeDiscovery:
    kind = "srv"
    rounds = 4
    failures = 1

    def describe(self):
        return "SRV discovery of etcd.test"


class HTTPScrapeTests(TestCase):
    """
    /metrics served by a real port, fetched with a real HTTP client.
    """

    def setUp(self):
        self.clock = Clock()
        self.pool, self.factory, self.a, self.b = gatewayState(self.clock)
        gateway = Gateway(
            reactor=self.clock, pool=self.pool, factory=self.factory, source=FakeDiscovery()
        )
        site = statusSite(gateway)
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.agent = Agent(reactor)

    def get(self, path, headers=None):
        url = f"http://127.0.0.1:{self.port.getHost().port}{path}".encode()
        d = self.agent.request(b"GET", url, headers)
        return d.addCallback(lambda response: readBody(response).addCallback(
            lambda body: (response, body)
        ))

    def test_scrape(self):
        """
        Every documented metric is served and holds the gateway's state.
        """

        def check(result):
            response, body = result
            self.assertEqual(response.code, 200)
            self.assertTrue(
                response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
            )
            found = samples(body.decode())
            A = frozenset({("endpoint", "10.0.0.1:2379")})
            B = frozenset({("endpoint", "10.0.0.2:2379")})
            none = frozenset()
            expected = {
                ("etcd_gateway_connections_accepted_total", none): 6,
                ("etcd_gateway_connections_active", none): 1,
                ("etcd_gateway_connections_closed_total", none): 5,
                ("etcd_gateway_connections_refused_total", none): 1,
                ("etcd_gateway_endpoint_up", A): 1,
                ("etcd_gateway_endpoint_up", B): 0,
                ("etcd_gateway_endpoint_state_seconds", A): 42,
                ("etcd_gateway_endpoint_state_seconds", B): 12,
                ("etcd_gateway_upstream_dial_attempts_total", A): 7,
                ("etcd_gateway_upstream_dial_failures_total", A): 2,
                ("etcd_gateway_upstream_dial_failures_total", B): 0,
                ("etcd_gateway_upstream_sent_bytes_total", A): 1234,
                ("etcd_gateway_upstream_received_bytes_total", A): 56789,
                ("etcd_gateway_upstream_connections_total", A): 5,
                ("etcd_gateway_upstream_connections_active", A): 1,
                ("etcd_gateway_endpoint_usable", A): 0,  # unhealthy
                ("etcd_gateway_endpoint_usable", B): 0,
                ("etcd_gateway_endpoint_health", A | {("health", "unhealthy")}): 1,
                ("etcd_gateway_endpoint_health", A | {("health", "healthy")}): 0,
                ("etcd_gateway_endpoint_health", B | {("health", "unknown")}): 1,
                ("etcd_gateway_discovery_refreshes_total", none): 4,
                ("etcd_gateway_discovery_failures_total", none): 1,
                ("etcd_gateway_source_rounds_total", frozenset({("source", "srv")})): 4,
                ("etcd_gateway_source_failures_total", frozenset({("source", "srv")})): 1,
            }
            for key, value in expected.items():
                self.assertEqual(found.get(key), value, key)
            self.assertIn(("process_open_fds", none), found)

        return self.get("/metrics").addCallback(check)

    def test_scrapeSeesChanges(self):
        """
        Each scrape reads the state of that moment.
        """
        first = self.get("/metrics")

        def change(result):
            self.pool.markUp(self.b, "probe connected")
            self.pool.stateOf(self.b).bytesToUpstream += 10
            return self.get("/metrics")

        def check(result):
            found = samples(result[1].decode())
            B = frozenset({("endpoint", "10.0.0.2:2379")})
            self.assertEqual(found[("etcd_gateway_endpoint_up", B)], 1)
            self.assertEqual(found[("etcd_gateway_endpoint_usable", B)], 1)
            self.assertEqual(found[("etcd_gateway_upstream_sent_bytes_total", B)], 10)
            self.assertEqual(found[("etcd_gateway_endpoint_state_seconds", B)], 0)

        return first.addCallback(change).addCallback(check)


class FakePort:
    openConnections = 3
    maxConnections = 40
    capPauses = 2
    acceptFailures = 5
    clientErrors = 1


class FakeListener:
    def __init__(self, flag, problem=None):
        self.flag = flag
        self.port = FakePort()
        self.gone = problem

    def problem(self):
        return self.gone


class CollectorTests(SynchronousTestCase):
    def test_listenerMetrics(self):
        """
        Each listener passed in is counted: open connections, cap, pauses at
        the cap, accept failures, client errors, and whether it listens.
        """
        from prometheus_client import generate_latest

        clock = Clock()
        pool, factory, a, b = gatewayState(clock)
        gateway = Gateway(
            reactor=clock, pool=pool, factory=factory,
            listener=FakeListener("--listen-addr"), web=FakeListener("--metrics-addr", "closed"),
        )
        registry = gatewayRegistry(gateway, process=False)
        found = samples(generate_latest(registry).decode())
        client = frozenset({("listener", "listen-addr")})
        metrics = frozenset({("listener", "metrics-addr")})
        for name, value in [
            ("etcd_gateway_listener_up", 1),
            ("etcd_gateway_listener_connections", 3),
            ("etcd_gateway_listener_max_connections", 40),
            ("etcd_gateway_listener_cap_pauses_total", 2),
            ("etcd_gateway_accept_failures_total", 5),
            ("etcd_gateway_listener_client_errors_total", 1),
        ]:
            self.assertEqual(found[(name, client)], value, name)
        self.assertEqual(found[("etcd_gateway_listener_up", metrics)], 0)


    def test_noDiscoveryNoDiscoveryMetrics(self):
        """
        Without a discovery service, no discovery metric is invented.
        """
        clock = Clock()
        pool, factory, a, b = gatewayState(clock)
        gateway = Gateway(reactor=clock, pool=pool, factory=factory)
        names = {f.name for f in GatewayCollector(gateway).collect()}
        self.assertNotIn("etcd_gateway_discovery_refreshes", names)
        self.assertIn("etcd_gateway_endpoint_up", names)

    def test_endpointsFollowPool(self):
        """
        An endpoint removed from the pool disappears from the metrics.
        """
        clock = Clock()
        pool, factory, a, b = gatewayState(clock)
        pool.replaceEndpoints([a])
        registry = gatewayRegistry(Gateway(reactor=clock, pool=pool, factory=factory), process=False)
        from prometheus_client import generate_latest

        found = samples(generate_latest(registry).decode())
        labels = {dict(k[1]).get("endpoint") for k in found}
        self.assertNotIn("10.0.0.2:2379", labels)
        self.assertIn("10.0.0.1:2379", labels)
