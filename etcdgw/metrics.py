"""
Prometheus metrics, read at scrape time.

Nothing is counted for Prometheus as traffic flows: the pool's
L{etcdgw.pool.EndpointState} and the L{etcdgw.proxy.GatewayFactory} already
keep the counters, and L{GatewayCollector} turns them into metric families
only when C{/metrics} is asked for, so the proxy's per-chunk path does no
extra work.
"""

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector
from twisted.web.resource import Resource

PREFIX = "etcd_gateway"

#: The values of L{etcdgw.pool.EndpointState.health}, each a label value of
#: C{etcd_gateway_endpoint_health}.
HEALTH_VALUES = ("healthy", "unhealthy", "unknown")


class GatewayCollector:
    """
    A prometheus_client collector over the gateway's live state.

    @param gateway: the L{etcdgw.gateway.Gateway}, read at each scrape: its
        C{pool} and C{factory} (the counters), C{reactor} (the clock, for
        the age of endpoint states), C{connections} (the held connections
        closed, by reason), C{allListeners} (their ports' counters) and
        C{discovery} (its C{rounds} and C{failures}, when the gateway has
        SRV discovery).
    """

    def __init__(self, gateway):
        self.gateway = gateway

    def describe(self):
        # Collected metrics depend on runtime state (discovery appears at start);
        # returning nothing tells the registry not to call collect() early.
        return []

    def collect(self):
        factory = self.gateway.factory
        active = len(factory.clients)
        yield CounterMetricFamily(
            f"{PREFIX}_connections_accepted",
            "Client connections accepted.",
            value=factory.accepted,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_connections_active",
            "Client connections open now (including those being dialled).",
            value=active,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_connections_closed",
            "Client connections closed.",
            value=factory.accepted - active,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_connections_refused",
            "Client connections closed at once because no endpoint was up.",
            value=factory.refused,
        )
        yield from self._held()
        yield from self._endpoints()
        yield from self._listener()
        yield from self._discovery()

    def _held(self):
        connections = self.gateway.connections
        if connections is None:
            return
        family = CounterMetricFamily(
            f"{PREFIX}_held_closed",
            "Client connections the gateway closed with a reset because their member "
            "went down, unhealthy, silent, was removed or is of another cluster, or to "
            "rebalance, by reason.",
            labels=["reason"],
        )
        for reason, count in connections.closedBy.items():
            family.add_metric([reason], count)
        yield family

    def _endpoints(self):
        now = self.gateway.reactor.seconds()
        families = {
            "up": GaugeMetricFamily(
                f"{PREFIX}_endpoint_up",
                "1 when the endpoint gets new connections, 0 when it is down.",
                labels=["endpoint"],
            ),
            "age": GaugeMetricFamily(
                f"{PREFIX}_endpoint_state_seconds",
                "Seconds since the endpoint's last state change (or since it joined).",
                labels=["endpoint"],
            ),
            "active": GaugeMetricFamily(
                f"{PREFIX}_upstream_connections_active",
                "Connections open to the endpoint now.",
                labels=["endpoint"],
            ),
            "connections": CounterMetricFamily(
                f"{PREFIX}_upstream_connections",
                "Connections opened to the endpoint.",
                labels=["endpoint"],
            ),
            "attempts": CounterMetricFamily(
                f"{PREFIX}_upstream_dial_attempts",
                "Dials to the endpoint for clients.",
                labels=["endpoint"],
            ),
            "failures": CounterMetricFamily(
                f"{PREFIX}_upstream_dial_failures",
                "Dials to the endpoint that failed.",
                labels=["endpoint"],
            ),
            "sent": CounterMetricFamily(
                f"{PREFIX}_upstream_sent_bytes",
                "Bytes forwarded from clients to the endpoint.",
                labels=["endpoint"],
            ),
            "received": CounterMetricFamily(
                f"{PREFIX}_upstream_received_bytes",
                "Bytes forwarded from the endpoint to clients.",
                labels=["endpoint"],
            ),
            "usable": GaugeMetricFamily(
                f"{PREFIX}_endpoint_usable",
                "1 when new connections prefer the endpoint: up, not known "
                "unhealthy, not silent, of the right cluster.",
                labels=["endpoint"],
            ),
            "silent": GaugeMetricFamily(
                f"{PREFIX}_endpoint_silent",
                "1 when the endpoint is up but answers no probe (it gets no new "
                "connections while another endpoint is usable).",
                labels=["endpoint"],
            ),
            "slow": GaugeMetricFamily(
                f"{PREFIX}_endpoint_answering_slowly",
                "1 when the endpoint answers no probe either but stays in use: "
                "--max-silent-share of the endpoints are silent already.",
                labels=["endpoint"],
            ),
            "health": GaugeMetricFamily(
                f"{PREFIX}_endpoint_health",
                "What etcd-aware health checks say of the endpoint: 1 for its "
                "current health (healthy, unhealthy or unknown), 0 for the others.",
                labels=["endpoint", "health"],
            ),
        }
        for state in self.gateway.pool.states():
            label = [str(state.endpoint)]
            families["up"].add_metric(label, 1 if state.up else 0)
            families["age"].add_metric(label, max(0.0, now - state.since))
            families["active"].add_metric(label, state.active)
            families["connections"].add_metric(label, state.connections)
            families["attempts"].add_metric(label, state.dialAttempts)
            families["failures"].add_metric(label, state.dialFailures)
            families["sent"].add_metric(label, state.bytesToUpstream)
            families["received"].add_metric(label, state.bytesFromUpstream)
            families["usable"].add_metric(label, 1 if state.usable else 0)
            families["silent"].add_metric(label, 1 if state.silent else 0)
            families["slow"].add_metric(label, 1 if state.slow else 0)
            for value in HEALTH_VALUES:
                families["health"].add_metric(label + [value], 1 if state.health == value else 0)
        yield from families.values()
        yield from self._upstreamTLS()

    def _upstreamTLS(self):
        """
        C{--upstream-tls=originate}: which endpoints are down because their
        TLS handshake was refused, handshakes failed, SIGHUP reloads.
        """
        tls = self.gateway.upstreamTLS
        if tls is None:
            return
        refused = GaugeMetricFamily(
            f"{PREFIX}_endpoint_tls_refused",
            "1 when the endpoint is down because its TLS handshake failed (certificate "
            "refused: another CA, another name, expired; or an alert).",
            labels=["endpoint"],
        )
        for state in self.gateway.pool.states():
            down = not state.up and "TLS handshake failed" in (state.reason or "")
            refused.add_metric([str(state.endpoint)], 1 if down else 0)
        yield refused
        yield CounterMetricFamily(
            f"{PREFIX}_upstream_tls_handshake_failures",
            "TLS handshakes of forwarded connections that failed (each a failed dial).",
            value=tls.handshakeFailures,
        )
        reloads = CounterMetricFamily(
            f"{PREFIX}_upstream_tls_reloads",
            "SIGHUP re-reads of --cacert, --cert and --key, by result.",
            labels=["result"],
        )
        reloads.add_metric(["taken"], tls.reloads)
        reloads.add_metric(["refused"], tls.refusedReloads)
        yield reloads

    def _listener(self):
        families = {
            "up": GaugeMetricFamily(
                f"{PREFIX}_listener_up",
                "1 while the listener listens (paused accepting included), 0 once closed.",
                labels=["listener"],
            ),
            "open": GaugeMetricFamily(
                f"{PREFIX}_listener_connections",
                "Connections accepted by the listener and open now.",
                labels=["listener"],
            ),
            "cap": GaugeMetricFamily(
                f"{PREFIX}_listener_max_connections",
                "The listener's cap on open connections (accepting pauses there).",
                labels=["listener"],
            ),
            "pauses": CounterMetricFamily(
                f"{PREFIX}_listener_cap_pauses",
                "Times accepting paused because the cap was reached.",
                labels=["listener"],
            ),
            "failures": CounterMetricFamily(
                f"{PREFIX}_accept_failures",
                "Accepts that failed for lack of file descriptors or memory.",
                labels=["listener"],
            ),
            "errors": CounterMetricFamily(
                f"{PREFIX}_listener_client_errors",
                "Accepted clients closed because starting them raised an error.",
                labels=["listener"],
            ),
        }
        for listener in self.gateway.allListeners:
            port = listener.port
            if port is None:
                continue
            label = [listener.flag.lstrip("-")]
            families["up"].add_metric(label, 0 if listener.problem() else 1)
            families["open"].add_metric(label, getattr(port, "openConnections", 0))
            cap = getattr(port, "maxConnections", None)
            if cap is not None:
                families["cap"].add_metric(label, cap)
            families["pauses"].add_metric(label, getattr(port, "capPauses", 0))
            families["failures"].add_metric(label, getattr(port, "acceptFailures", 0))
            families["errors"].add_metric(label, getattr(port, "clientErrors", 0))
        for family in families.values():
            if family.samples:
                yield family

    def _discovery(self):
        source = self.gateway.source
        if source.kind == "static":
            return
        rounds = CounterMetricFamily(
            f"{PREFIX}_source_rounds",
            "Rounds of the endpoint source (SRV look-ups, member-list reads).",
            labels=["source"],
        )
        rounds.add_metric([source.kind], source.rounds)
        failures = CounterMetricFamily(
            f"{PREFIX}_source_failures",
            "Rounds of the endpoint source that failed or found nothing usable.",
            labels=["source"],
        )
        failures.add_metric([source.kind], source.failures)
        yield rounds
        yield failures
        if source.kind == "srv":
            # The names of the first release, kept for existing dashboards.
            yield CounterMetricFamily(
                f"{PREFIX}_discovery_refreshes",
                "DNS SRV discovery refreshes.",
                value=source.rounds,
            )
            yield CounterMetricFamily(
                f"{PREFIX}_discovery_failures",
                "DNS SRV discovery refreshes that failed.",
                value=source.failures,
            )


def gatewayRegistry(gateway, process=True):
    """
    A registry holding the metrics of C{gateway} (an
    L{etcdgw.gateway.Gateway}; see L{GatewayCollector}) and, with
    C{process}, the standard C{process_*} metrics: CPU, memory, open file
    descriptors.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(gateway))
    if process:
        ProcessCollector(registry=registry)
    return registry


class MetricsResource(Resource):
    """
    C{/metrics}: the registry in Prometheus text format (or OpenMetrics when
    the scraper asks for it). Rendered in the reactor thread, where the
    state it reads lives (prometheus_client's own Twisted resource renders in
    a thread pool).
    """

    isLeaf = True

    def __init__(self, registry):
        super().__init__()
        self.registry = registry

    def render_GET(self, request):
        accept = request.getHeader("accept")
        encoder, contentType = choose_encoder(accept)
        request.setHeader("content-type", contentType)
        request.setHeader("cache-control", "no-store")
        return encoder(self.registry)
