"""
The operator's HTTP address (C{--metrics-addr}): C{/metrics} for
Prometheus, C{/health} for load balancers, C{/livez} for liveness (the
gateway accepts clients; never depends on the members), C{/readyz} for
readiness (a member is usable), C{/} a status page a person
reads at a glance, C{/status.html} the part of it that the page fetches to
refresh itself in place (one renderer, L{renderFragment}, makes both), and
C{/status.json}, the same data for programs.

L{statusSite} is served by the gateway's operator listener
(L{etcdgw.gateway}), and reads the L{etcdgw.gateway.Gateway} it is given.
The address is an operator's, not a client's: its connections are capped
(see L{etcdgw.listen}), each request must arrive whole within
L{HEADER_TIMEOUT} (absolute: a byte now and then does not extend it), and
an idle keep-alive connection is closed after L{IDLE_TIMEOUT}.
"""

import datetime
import html
import json

from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Site

from etcdgw.metrics import MetricsResource, gatewayRegistry

#: How often the status page refreshes itself, in milliseconds.
REFRESH_MS = 2000
#: What the status page fetches to refresh itself: its endpoints' part,
#: rendered as in the page (L{renderFragment}).
FRAGMENT_PATH = "status.html"
#: How long a request (line, headers and body) may take to arrive, counted
#: from the connection's start or the end of the previous response.
HEADER_TIMEOUT = 10.0
#: How long a keep-alive connection may sit idle between requests.
IDLE_TIMEOUT = 5.0


def _iso(seconds):
    return (
        datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
        .isoformat(timespec="seconds")
        .replace("+00:00", "Z")
    )


def gatewayStatus(
    pool, factory, clock, listeners=(), source=None, healthCheck=None, connections=None
):
    """
    The gateway's state now, as a JSON-ready dict (what C{/status.json}
    serves and the status page shows).

    @param listeners: the client listeners (L{etcdgw.listen.ListeningService}).
    @param source: the endpoint source (L{etcdgw.sources.IEndpointSource}),
        whose one-line description is shown, or L{None}.
    @param healthCheck: C{--health-check} (with C{tcp} nobody asks the
        members for an answer: the page shows no verdict), or L{None}.
    @param connections: the L{etcdgw.connections.ConnectionRegistry}, whose
        counts of held connections closed (by reason) are shown, or L{None}.
    """
    now = clock.seconds()
    endpoints = []
    for state in pool.states():
        endpoints.append(
            {
                "endpoint": str(state.endpoint),
                "state": state.state,
                "since": _iso(state.since),
                "sinceSeconds": round(max(0.0, now - state.since), 3),
                "reason": state.reason,
                "active": state.active,
                "connections": state.connections,
                "dialAttempts": state.dialAttempts,
                "dialFailures": state.dialFailures,
                "bytesToUpstream": state.bytesToUpstream,
                "bytesFromUpstream": state.bytesFromUpstream,
                "health": state.health,
                "healthReason": state.healthReason,
                "foreign": state.foreign,
                "answering": state.answering,
                "silent": state.silent,
                "slow": state.slow,
                "silenceReason": state.silenceReason,
                "usable": state.usable,
                "priority": state.endpoint.priority,
                "weight": state.endpoint.weight,
            }
        )
    listen = ", ".join(listener.describe() for listener in listeners) or None
    return {
        "now": _iso(now),
        "listen": listen,
        "source": source.describe() if source is not None else None,
        "policy": pool.policyName,
        "healthCheck": healthCheck,
        "up": pool.upCount(),
        "usable": sum(1 for e in endpoints if e["usable"]),
        "total": len(endpoints),
        "clients": {
            "active": len(factory.clients),
            "accepted": factory.accepted,
            "refused": factory.refused,
        },
        "heldClosed": _heldClosed(connections),
        "endpoints": endpoints,
    }


def _heldClosed(connections):
    """
    The held connections the gateway closed, by reason (every reason, 0
    included), or L{None} without a registry.
    """
    return dict(connections.closedBy) if connections is not None else None


def _json(request, value, code=200):
    request.setResponseCode(code)
    request.setHeader("content-type", "application/json")
    request.setHeader("cache-control", "no-store")
    return (json.dumps(value, sort_keys=True) + "\n").encode("utf-8")


class StatusJSON(Resource):
    """
    C{/status.json}: L{gatewayStatus}.
    """

    isLeaf = True

    def __init__(self, status):
        super().__init__()
        self._status = status

    def render_GET(self, request):
        return _json(request, self._status())


class Health(Resource):
    """
    C{/health}: 200 when at least one endpoint is up, 503 otherwise; the
    JSON body gives the counts, and the held connections closed by reason
    (C{heldClosed}).
    """

    isLeaf = True

    def __init__(self, pool, connections=None):
        super().__init__()
        self.pool = pool
        self.connections = connections

    def render_GET(self, request):
        up = self.pool.upCount()
        total = len(self.pool.endpoints)
        healthy = up > 0
        body = {"status": "ok" if healthy else "unavailable", "up": up, "total": total}
        if self.connections is not None:
            body["heldClosed"] = _heldClosed(self.connections)
        return _json(request, body, 200 if healthy else 503)

    render_HEAD = render_GET


def unusableReason(pool):
    """
    Why no endpoint of C{pool} is usable, in one line: how many are down,
    of another cluster (or not proven of this one), unhealthy, silent.
    """
    counts = {}
    for state in pool.states():
        if not state.up:
            why = "down"
        elif not state.trusted:
            why = "of another cluster or not proven"
        elif state.silent:
            why = "silent"
        else:
            why = "unhealthy"
        counts[why] = counts.get(why, 0) + 1
    if not counts:
        return "no endpoint"
    parts = ", ".join(f"{n} {why}" for why, n in counts.items())
    return f"no endpoint is usable: {parts}"


class Readyz(Resource):
    """
    C{/readyz}: 200 while an endpoint is usable (up, of the cluster, not
    unhealthy, not silent), 503 with the reason otherwise. The gateway
    still forwards then when some member accepts TCP (fail open): readiness
    says whether new clients get a member that is known good.
    """

    isLeaf = True

    def __init__(self, pool):
        super().__init__()
        self.pool = pool

    def render_GET(self, request):
        usable = len(self.pool.usable())
        total = len(self.pool.endpoints)
        if usable:
            return _json(request, {"status": "ready", "usable": usable, "total": total})
        return _json(
            request,
            {
                "status": "not ready",
                "usable": 0,
                "total": total,
                "reason": unusableReason(self.pool),
            },
            503,
        )

    render_HEAD = render_GET


class Livez(Resource):
    """
    C{/livez}: 200 while every client listener is listening, 503 naming the
    one that is not. It never depends on the members (that is C{/health}):
    a gateway whose members are all down is alive; one that no longer
    accepts clients is not, and should be restarted.
    """

    isLeaf = True

    def __init__(self, listeners):
        super().__init__()
        self.listeners = listeners

    def render_GET(self, request):
        problems = [p for p in (listener.problem() for listener in self.listeners) if p]
        if problems:
            return _json(request, {"status": "not listening", "problems": problems}, 503)
        return _json(
            request,
            {"status": "ok", "listening": [listener.describe() for listener in self.listeners]},
        )

    render_HEAD = render_GET


class OperatorChannel(HTTPChannel):
    """
    The metrics address's HTTP connection: a request must arrive whole
    within L{HEADER_TIMEOUT} of the connection's start (or of the end of the
    previous response), however slowly its bytes trickle in; else the
    connection is aborted.
    """

    headerTimeout = HEADER_TIMEOUT
    abortTimeout = 2
    _deadline = None
    _received = 0
    _answered = 0

    def connectionMade(self):
        super().connectionMade()
        self._startDeadline()

    def _startDeadline(self):
        if self._deadline is None:
            self._deadline = self.callLater(self.headerTimeout, self._tooSlow)

    def _stopDeadline(self):
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _tooSlow(self):
        self._deadline = None
        self.transport.abortConnection()

    def allContentReceived(self):
        self._received += 1
        self._stopDeadline()
        super().allContentReceived()

    def requestDone(self, request):
        self._answered += 1
        super().requestDone(request)
        # Waiting for the next request (one already received whole, pipelined,
        # is being answered: its own requestDone starts the clock).
        if self.persistent and self._received == self._answered:
            self._startDeadline()

    def connectionLost(self, reason):
        self._stopDeadline()
        super().connectionLost(reason)


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>etcd-gateway</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }}
h1 {{ font-size: 1.3em; margin: 0 0 .2em; }}
p.summary {{ margin: 0 0 1em; color: #555; }}
table {{ border-collapse: collapse; }}
th, td {{ padding: .3em .8em; border-bottom: 1px solid #ddd; text-align: right; white-space: nowrap; }}
td.reason {{ white-space: normal; }}
th {{ background: #f3f3f3; }}
td.endpoint, td.reason, th.left {{ text-align: left; }}
td.state, td.health {{ text-align: center; }}
td.state {{ font-weight: bold; color: #fff; }}
tr.unusable td.health {{ color: #c0392b; font-weight: bold; }}
tr.silent td.answers {{ color: #c0392b; font-weight: bold; }}
tr.slow td.answers {{ color: #b9770e; font-weight: bold; }}
tr.up td.state {{ background: #2e8b3d; }}
tr.down td.state {{ background: #c0392b; }}
#refreshed, #refreshing {{ color: #888; font-size: .9em; }}
</style>
</head>
<body>
<h1>etcd-gateway</h1>
<div id="status">
{fragment}
</div>
<p id="refreshing" hidden>refreshes every {every}</p>
<script>
"use strict";
// The page is rendered by the gateway only (renderFragment): this script
// just swaps in a freshly rendered #status.
const REFRESH_MS = {refresh};
document.getElementById("refreshing").hidden = false;
function refresh() {{
  fetch("{fragmentPath}", {{cache: "no-store"}})
    .then(r => r.ok ? r.text() : Promise.reject(new Error("HTTP " + r.status)))
    .then(fragment => {{ document.getElementById("status").innerHTML = fragment; }})
    .catch(err => {{
      const refreshed = document.getElementById("refreshed");
      refreshed.textContent = "cannot reach the gateway: " + err;
      refreshed.dataset.source = "error";
    }})
    .finally(() => setTimeout(refresh, REFRESH_MS));
}}
setTimeout(refresh, REFRESH_MS);
</script>
</body>
</html>
"""

_TABLE_HEAD = """<table>
<thead><tr>
<th class="left">endpoint</th><th>state</th><th class="left">since</th>
<th class="left">reason</th><th>etcd health</th><th>answers</th><th>active</th><th>connections</th><th>dial failures</th>
<th>bytes to member</th><th>bytes from member</th>
</tr></thead>
<tbody id="endpoints">
"""


def _ago(seconds):
    """
    How long ago C{seconds} (at least 0) is, as a person reads it:
    C{42s ago}, C{3m ago}, C{5.2h ago}, C{1.5d ago}; whole units rounded
    half up.
    """
    if seconds < 60:
        return f"{int(seconds + 0.5)}s ago"
    if seconds < 3600:
        return f"{int(seconds / 60 + 0.5)}m ago"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}h ago"
    return f"{seconds / 86400:.1f}d ago"


def _humanBytes(n):
    """
    A byte count in binary units: C{777 B}, C{2.0 KiB}, ... C{1.5 TiB}.
    """
    value, unit = n, "B"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"


def _health(e):
    if e["foreign"]:
        return "other cluster"
    return e["health"] or "-"


def _answers(e, healthCheck=None):
    if healthCheck == "tcp":
        return "-"  # nobody asks
    if e.get("silent"):
        return "silent"
    if e.get("slow"):
        return "answering slowly"
    return "answering" if e["state"] == "up" else "-"


def _summary(status):
    text = (
        f"{status['up']}/{status['total']} endpoints up; "
        f"{status['clients']['active']} client connections open, "
        f"{status['clients']['accepted']} accepted, {status['clients']['refused']} refused"
    )
    if status["listen"]:
        text += f"; listening on {status['listen']}"
    if status.get("source"):
        text += f"; endpoints from {status['source']}"
    closed = {reason: n for reason, n in (status.get("heldClosed") or {}).items() if n}
    if closed:
        text += "; held connections closed: " + ", ".join(
            f"{n} {reason}" for reason, n in closed.items()
        )
    return text


def _row(e, healthCheck=None):
    cells = [
        ("endpoint", e["endpoint"], None),
        ("state", e["state"], None),
        ("since", _ago(e["sinceSeconds"]), e["since"]),
        ("reason", e["reason"], None),
        ("health", _health(e), e["healthReason"]),
        ("answers", _answers(e, healthCheck), e.get("silenceReason")),
        ("active", e["active"], None),
        ("connections", e["connections"], None),
        ("dialFailures", e["dialFailures"], None),
        ("bytesToUpstream", _humanBytes(e["bytesToUpstream"]), f"{e['bytesToUpstream']} bytes"),
        (
            "bytesFromUpstream",
            _humanBytes(e["bytesFromUpstream"]),
            f"{e['bytesFromUpstream']} bytes",
        ),
    ]
    silence = " silent" if e.get("silent") else " slow" if e.get("slow") else ""
    return (
        f'<tr class="{html.escape(e["state"])}{"" if e["usable"] else " unusable"}{silence}" '
        f'data-endpoint="{html.escape(e["endpoint"])}">'
        + "".join(
            f'<td class="{cls}"'
            + (f' title="{html.escape(str(title))}"' if title else "")
            + f'>{html.escape("" if text is None else str(text))}</td>'
            for cls, text, title in cells
        )
        + "</tr>"
    )


def renderFragment(status, source=FRAGMENT_PATH):
    """
    The part of the status page that shows C{status} (a L{gatewayStatus}
    dict): the summary, the endpoints' table and when it was taken. The one
    place where the page's texts, units and formats are made: the page
    embeds it as served, and its script swaps in the one served at
    L{FRAGMENT_PATH}.

    @param source: where it came from, for C{#refreshed}'s C{data-source}:
        C{"server"} in the page as served, else the fragment's path.
    """
    return (
        f'<p class="summary" id="summary">{html.escape(_summary(status))}</p>\n'
        + _TABLE_HEAD
        + "\n".join(_row(e, status.get("healthCheck")) for e in status["endpoints"])
        + "\n</tbody>\n</table>\n"
        f'<p id="refreshed" data-source="{html.escape(source)}">'
        f'as of {html.escape(status["now"])}</p>'
    )


def renderPage(status):
    """
    The status page for C{status} (a L{gatewayStatus} dict): complete
    without JavaScript (L{renderFragment}); its script then swaps in a fresh
    fragment every L{REFRESH_MS}.
    """
    return _PAGE.format(
        fragment=renderFragment(status, source="server"),
        every=f"{REFRESH_MS / 1000:g}s",
        refresh=REFRESH_MS,
        fragmentPath=FRAGMENT_PATH,
    ).encode("utf-8")


def _html(request, body):
    request.setHeader("content-type", "text/html; charset=utf-8")
    request.setHeader("cache-control", "no-store")
    return body


class StatusFragment(Resource):
    """
    C{/status.html}: L{renderFragment}, what the status page swaps in to
    refresh itself.
    """

    isLeaf = True

    def __init__(self, status):
        super().__init__()
        self._status = status

    def render_GET(self, request):
        return _html(request, renderFragment(self._status()).encode("utf-8"))


class StatusPage(Resource):
    """
    C{/}: the status page. Other unknown paths are 404.
    """

    def __init__(self, status):
        super().__init__()
        self._status = status

    def getChild(self, path, request):
        if path == b"":
            return self
        return Resource.getChild(self, path, request)

    def render_GET(self, request):
        return _html(request, renderPage(self._status()))


def statusSite(gateway, registry=None):
    """
    The L{Site} for C{--metrics-addr}: C{/}, C{/status.html},
    C{/status.json}, C{/health}, C{/livez}, C{/readyz}, C{/metrics}.

    @param gateway: the L{etcdgw.gateway.Gateway} whose state is served:
        its C{pool}, C{factory}, C{reactor} (whose timers also bound each
        connection) and C{listeners} (the clients', each checked by
        C{/livez}).
    @param registry: the metrics registry; by default the gateway's
        (L{gatewayRegistry}).
    """

    config = gateway.config
    healthCheck = config.health.check if config is not None else None

    def status():
        return gatewayStatus(
            gateway.pool,
            gateway.factory,
            gateway.reactor,
            gateway.listeners,
            gateway.source,
            healthCheck=healthCheck,
            connections=gateway.connections,
        )

    if registry is None:
        registry = gatewayRegistry(gateway)
    top = StatusPage(status)
    top.putChild(b"status.json", StatusJSON(status))
    top.putChild(FRAGMENT_PATH.encode("ascii"), StatusFragment(status))
    top.putChild(b"health", Health(gateway.pool, gateway.connections))
    top.putChild(b"livez", Livez(gateway.listeners))
    top.putChild(b"readyz", Readyz(gateway.pool))
    top.putChild(b"metrics", MetricsResource(registry))
    site = Site(top, timeout=IDLE_TIMEOUT, reactor=gateway.reactor)
    site.protocol = OperatorChannel
    site.noisy = False
    site.log = lambda request: None  # no access log line per scrape
    return site
