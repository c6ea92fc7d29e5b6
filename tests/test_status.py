"""
Tests for L{etcdgw.status}: C{/health}, C{/status.json} and the status page,
served over real HTTP on 127.0.0.1; the page is also loaded in headless
Chromium and what it shows is compared with the gateway's state.
"""

import json
import os
import shutil
import tempfile
from html.parser import HTMLParser

from twisted.internet import reactor
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.internet.task import Clock
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.client import Agent, readBody

from etcdgw.endpoint import Endpoint
from etcdgw.gateway import Gateway
from etcdgw.pool import UNHEALTHY, UpstreamPool
from etcdgw.proxy import GatewayFactory
from etcdgw.status import gatewayStatus, renderFragment, renderPage, statusSite


def chromium():
    """
    The path of Debian's chromium, or skip (fail under CI: it must be there).
    """
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    message = "chromium not found: install it with `apt-get install -y chromium` to test the status page"
    if os.environ.get("CI"):
        raise RuntimeError(message)
    raise SkipTest(message)


class Rows(HTMLParser):
    """
    The status page's endpoint rows: {endpoint: {cell class: text}}, plus the
    attributes of C{#refreshed} and the text of C{#summary}.
    """

    def __init__(self):
        super().__init__()
        self.rows = {}
        self.refreshed = {}
        self.summary = ""
        self._row = None
        self._cell = None
        self._in = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr" and "data-endpoint" in attrs:
            self._row = self.rows.setdefault(
                attrs["data-endpoint"], {"_class": attrs.get("class")}
            )
        elif tag == "td" and self._row is not None:
            self._cell = attrs.get("class")
            self._row[self._cell] = ""
        elif attrs.get("id") == "refreshed":
            self.refreshed = attrs
            self._in = "refreshed"
        elif attrs.get("id") == "summary":
            self._in = "summary"

    def handle_endtag(self, tag):
        if tag == "tr":
            self._row = None
        if tag == "td":
            self._cell = None
        if tag == "p":
            self._in = None

    def handle_data(self, data):
        if self._row is not None and self._cell is not None:
            self._row[self._cell] += data
        elif self._in == "summary":
            self.summary += data
        elif self._in == "refreshed":
            self.refreshed["text"] = self.refreshed.get("text", "") + data


def parsePage(text):
    parser = Rows()
    parser.feed(text)
    return parser


class ServedTestCase(TestCase):
    """
    A gateway state (on a fake clock) and its status site on a real port.
    """

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.a = Endpoint("10.0.0.1", 2379)
        self.b = Endpoint("10.0.0.2", 2379)
        self.pool = UpstreamPool([self.a, self.b], self.clock)
        self.factory = GatewayFactory(self.pool, self.clock, 1.0)
        state = self.pool.stateOf(self.a)
        state.active, state.connections, state.bytesToUpstream = 2, 3, 4096
        state.bytesFromUpstream = 5 * 1024 * 1024
        self.site = statusSite(Gateway(reactor=self.clock, pool=self.pool, factory=self.factory))
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.base = f"http://127.0.0.1:{self.port.getHost().port}"

    def get(self, path):
        d = Agent(reactor).request(b"GET", (self.base + path).encode())
        return d.addCallback(
            lambda r: readBody(r).addCallback(lambda body: (r.code, r.headers, body))
        )


class HealthTests(ServedTestCase):
    def test_upIs200(self):
        """
        /health is 200 with the counts while an endpoint is up.
        """

        def check(result):
            code, headers, body = result
            self.assertEqual(code, 200)
            self.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/json"])
            self.assertEqual(json.loads(body), {"status": "ok", "up": 2, "total": 2})

        return self.get("/health").addCallback(check)

    def test_allDownIs503(self):
        """
        /health is 503 when every endpoint is down.
        """
        self.pool.markDown(self.a, "refused")
        self.pool.markDown(self.b, "refused")

        def check(result):
            code, headers, body = result
            self.assertEqual(code, 503)
            self.assertEqual(json.loads(body), {"status": "unavailable", "up": 0, "total": 2})

        return self.get("/health").addCallback(check)

    def test_unknownPath404(self):
        """
        Paths the gateway does not serve are 404.
        """
        return self.get("/nope").addCallback(lambda r: self.assertEqual(r[0], 404))


class ReadyzTests(ServedTestCase):
    def test_usableIs200(self):
        """/readyz is 200 while an endpoint is usable (here one of two: the other silent)."""
        self.pool.setSilence(self.b, True, False, "no answer to 2 probes in a row")

        def check(result):
            code, headers, body = result
            self.assertEqual(code, 200)
            self.assertEqual(json.loads(body), {"status": "ready", "usable": 1, "total": 2})

        return self.get("/readyz").addCallback(check)

    def test_noneUsableIs503WithTheReason(self):
        """
        /readyz is 503 with the reason when no endpoint is usable, though
        /health (an endpoint up) and /livez (listening) say otherwise.
        """
        self.pool.markDown(self.a, "refused")
        self.pool.setSilence(self.b, True, False, "no answer to 2 probes in a row")

        def check(result):
            code, headers, body = result
            self.assertEqual(code, 503)
            self.assertEqual(
                json.loads(body),
                {
                    "status": "not ready",
                    "usable": 0,
                    "total": 2,
                    "reason": "no endpoint is usable: 1 down, 1 silent",
                },
            )
            return self.get("/health").addCallback(lambda r: self.assertEqual(r[0], 200))

        return self.get("/readyz").addCallback(check)

    def test_reasons(self):
        """The reason counts each kind: down, unhealthy, silent, not of the cluster."""
        from etcdgw.status import unusableReason

        c, d = Endpoint("10.0.0.3", 2379), Endpoint("10.0.0.4", 2379)
        self.pool.replaceEndpoints([self.a, self.b, c, d])
        self.pool.markDown(self.a, "refused")
        self.pool.setHealth(self.b, UNHEALTHY, "503")
        self.pool.setSilence(c, True, False, "no answer")
        self.pool.setIdentity(d, "9", True, "7")
        self.assertEqual(
            unusableReason(self.pool),
            "no endpoint is usable: 1 down, 1 unhealthy, 1 silent, "
            "1 of another cluster or not proven",
        )


class StatusJSONTests(ServedTestCase):
    def test_statusJSON(self):
        """
        /status.json gives each endpoint's state, since when, and counters.
        """
        self.clock.advance(5)
        self.pool.markDown(self.b, "connection refused")
        self.clock.advance(3)

        def check(result):
            code, headers, body = result
            self.assertEqual(code, 200)
            status = json.loads(body)
            self.assertEqual((status["up"], status["total"]), (1, 2))
            a, b = status["endpoints"]
            self.assertEqual(a["endpoint"], "10.0.0.1:2379")
            self.assertEqual((a["state"], a["active"], a["bytesToUpstream"]), ("up", 2, 4096))
            self.assertEqual(a["sinceSeconds"], 8)
            self.assertEqual((b["state"], b["reason"]), ("down", "connection refused"))
            self.assertEqual(b["since"], "2027-01-15T08:00:05Z")
            self.assertEqual(b["sinceSeconds"], 3)
            self.assertEqual((a["silent"], a["slow"], status["usable"]), (False, False, 1))

        return self.get("/status.json").addCallback(check)


class PageTests(SynchronousTestCase):
    def test_pageWithoutJavaScript(self):
        """
        The page as served shows every endpoint's state and counters.
        """
        clock = Clock()
        a, b = Endpoint("10.0.0.1", 2379), Endpoint("10.0.0.2", 2379)
        pool = UpstreamPool([a, b], clock)
        pool.markDown(b, "<refused>")
        pool.stateOf(a).bytesFromUpstream = 2048
        factory = GatewayFactory(pool, clock, 1.0)
        page = parsePage(renderPage(gatewayStatus(pool, factory, clock)).decode())
        self.assertEqual(page.rows["10.0.0.1:2379"]["state"], "up")
        self.assertEqual(page.rows["10.0.0.1:2379"]["bytesFromUpstream"], "2.0 KiB")
        self.assertEqual(page.rows["10.0.0.2:2379"]["_class"], "down unusable")
        self.assertEqual(page.rows["10.0.0.1:2379"]["health"], "unknown")
        self.assertEqual(page.rows["10.0.0.2:2379"]["reason"], "<refused>")  # escaped
        self.assertEqual(page.refreshed["data-source"], "server")
        self.assertIn("1/2 endpoints up", page.summary)

    def test_silenceShown(self):
        """
        Each endpoint's answers are shown: answering, answering slowly,
        silent (the row marked, the reason as its title); a down one "-".
        """
        clock = Clock()
        a, b, c, d = (Endpoint(f"10.0.0.{n}", 2379) for n in (1, 2, 3, 4))
        pool = UpstreamPool([a, b, c, d], clock)
        pool.setSilence(b, False, True, "no answer; still used")
        pool.setSilence(c, True, False, "no answer to 2 probes in a row")
        pool.markDown(d, "refused")
        page = parsePage(renderPage(gatewayStatus(pool, GatewayFactory(pool, clock, 1.0), clock)).decode())
        self.assertEqual(
            [page.rows[f"{e}"]["answers"] for e in (a, b, c, d)],
            ["answering", "answering slowly", "silent", "-"],
        )
        self.assertEqual(page.rows[str(c)]["_class"], "up unusable silent")
        self.assertEqual(page.rows[str(b)]["_class"], "up slow")
        html = renderPage(gatewayStatus(pool, GatewayFactory(pool, clock, 1.0), clock)).decode()
        self.assertIn('title="no answer to 2 probes in a row"', html)
        # With --health-check=tcp nobody asks: no verdict is shown.
        status = gatewayStatus(pool, GatewayFactory(pool, clock, 1.0), clock, healthCheck="tcp")
        self.assertEqual(status["healthCheck"], "tcp")
        page = parsePage(renderPage(status).decode())
        self.assertEqual({row["answers"] for row in page.rows.values()}, {"-"})


class ChromiumTests(ServedTestCase):
    """
    The status page in headless Chromium.
    """

    timeout = 60

    def browse(self, *extra):
        browser = chromium()
        profile = tempfile.mkdtemp(prefix="etcdgw-chromium-")
        self.addCleanup(shutil.rmtree, profile, ignore_errors=True)
        args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-extensions",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=3000",
            *extra,
            self.base + "/",
        ]
        env = {"HOME": profile, "PATH": os.environ.get("PATH", "")}
        return getProcessOutputAndValue(browser, args, env=env, reactor=reactor)

    def test_pageRefreshesInPlace(self):
        """
        Chromium shows each endpoint as the gateway has it, including a
        change made after the page was served: the page's script fetched
        /status.html and swapped it in.
        """
        page = self.site.resource
        served = page.render_GET

        def renderThenChange(request):
            body = served(request)
            # After the page is served: only its refresh can show these.
            self.clock.advance(90)
            self.pool.markDown(self.a, "refused after page load")
            self.pool.stateOf(self.b).bytesToUpstream = 777
            self.pool.setHealth(self.b, UNHEALTHY, "etcdserver: no leader")
            return body

        page.render_GET = renderThenChange

        def check(result):
            out, err, code = result
            self.assertEqual(code, 0, err.decode(errors="replace")[-2000:])
            shown = parsePage(out.decode())
            self.assertEqual(shown.refreshed.get("data-source"), "status.html", out[-3000:])
            status = gatewayStatus(self.pool, self.factory, self.clock)
            self.assertEqual(set(shown.rows), {e["endpoint"] for e in status["endpoints"]})
            for e in status["endpoints"]:
                row = shown.rows[e["endpoint"]]
                self.assertEqual(row["state"], e["state"])
                self.assertEqual(row["_class"].split()[0], e["state"])
                self.assertEqual("unusable" in row["_class"].split(), not e["usable"])
                self.assertEqual(row["health"], e["health"])
                self.assertEqual(row["reason"], e["reason"])
                self.assertEqual(row["active"], str(e["active"]))
                self.assertEqual(row["connections"], str(e["connections"]))
            a, b = shown.rows["10.0.0.1:2379"], shown.rows["10.0.0.2:2379"]
            self.assertEqual(a["state"], "down")
            self.assertEqual(a["since"], "0s ago")
            self.assertEqual(a["bytesFromUpstream"], "5.0 MiB")
            self.assertEqual(b["since"], "2m ago")
            self.assertEqual(b["bytesToUpstream"], "777 B")
            self.assertEqual((b["health"], b["_class"]), ("unhealthy", "up unusable"))
            self.assertIn("1/2 endpoints up", shown.summary)

        return self.browse("--dump-dom").addCallback(check)

    def test_refreshShowsWhatFirstPaintShowed(self):
        """
        For the same state, the page as served and the page after its
        refresh show the same texts (one renderer: the same units, the same
        formats), and the refresh note appears only with the script.
        """
        self.clock.advance(5400)
        self.pool.markDown(self.a, "refused")
        self.pool.stateOf(self.b).bytesToUpstream = 3 * 1024**4
        self.pool.setHealth(self.b, UNHEALTHY, "etcdserver: no leader")
        page = self.site.resource
        served = []
        render = page.render_GET

        def keep(request):
            served.append(render(request))
            return served[-1]

        page.render_GET = keep

        def check(result):
            out, err, code = result
            self.assertEqual(code, 0, err.decode(errors="replace")[-2000:])
            (first,) = served
            before, after = parsePage(first.decode()), parsePage(out.decode())
            self.assertEqual(before.refreshed["data-source"], "server")
            self.assertEqual(after.refreshed.get("data-source"), "status.html", out[-3000:])
            self.assertEqual(after.rows, before.rows)
            self.assertEqual(after.summary, before.summary)
            self.assertEqual(after.refreshed["text"], before.refreshed["text"])
            self.assertEqual(
                (after.rows["10.0.0.1:2379"]["since"], after.rows["10.0.0.2:2379"]["since"]),
                ("0s ago", "1.5h ago"),
            )
            self.assertEqual(after.rows["10.0.0.2:2379"]["bytesToUpstream"], "3.0 TiB")
            self.assertIn(b'<p id="refreshing" hidden>', first)
            self.assertIn(b'<p id="refreshing">refreshes every 2s</p>', out)

        return self.browse("--dump-dom").addCallback(check)


class FragmentTests(ServedTestCase):
    def test_fragmentIsThePagesPart(self):
        """
        /status.html is the page's #status part as the page embeds it, but
        for its data-source.
        """

        def check(results):
            (_, pageHeaders, page), (code, headers, fragment) = [r for _, r in results]
            self.assertEqual(code, 200)
            self.assertEqual(
                headers.getRawHeaders(b"content-type"), [b"text/html; charset=utf-8"]
            )
            self.assertEqual(headers.getRawHeaders(b"cache-control"), [b"no-store"])
            embedded = page.split(b'<div id="status">\n', 1)[1].split(b"\n</div>", 1)[0]
            self.assertEqual(
                fragment,
                embedded.replace(b'data-source="server"', b'data-source="status.html"'),
            )
            self.assertIn(b'data-endpoint="10.0.0.1:2379"', fragment)

        from twisted.internet.defer import DeferredList

        return DeferredList([self.get("/"), self.get("/status.html")]).addCallback(check)


class UnitsTests(SynchronousTestCase):
    def test_unitsAndAges(self):
        """Bytes are shown in B to TiB, ages in s, m, h, d (one place makes them)."""
        clock = Clock()
        ends = [Endpoint(f"10.0.0.{i}", 2379) for i in range(1, 8)]
        pool = UpstreamPool(ends, clock)
        sizes = [0, 1023, 1024, 1536 * 1024, 5 * 1024**3, 3 * 1024**4, 2000 * 1024**4]
        for end, size in zip(ends, sizes):
            pool.stateOf(end).bytesToUpstream = size
        now = 2.5 * 86400
        ages = [now, 5400, 150, 90, 59.4, 0.5, 0]
        for end, age in zip(ends[1:], ages[1:]):
            clock.advance(now - age - clock.seconds())
            pool.markDown(end, "refused")
        clock.advance(now - clock.seconds())
        status = gatewayStatus(pool, GatewayFactory(pool, clock, 1.0), clock)
        rows = parsePage(renderFragment(status)).rows
        self.assertEqual(
            [rows[str(e)]["bytesToUpstream"] for e in ends],
            ["0 B", "1023 B", "1.0 KiB", "1.5 MiB", "5.0 GiB", "3.0 TiB", "2000.0 TiB"],
        )
        self.assertEqual(
            [rows[str(e)]["since"] for e in ends],
            ["2.5d ago", "1.5h ago", "3m ago", "2m ago", "59s ago", "1s ago", "0s ago"],
        )


class FakeListener:
    flag = "--listen-addr"

    def __init__(self, where, problem=None):
        self.where = where
        self.gone = problem

    def problem(self):
        return self.gone

    def describe(self):
        return self.where


class LivezTests(SynchronousTestCase):
    def render(self, listeners, pool=None):
        from twisted.web.test.requesthelper import DummyRequest

        from etcdgw.status import Livez

        request = DummyRequest([b""])
        body = Livez(listeners).render_GET(request)
        return request.responseCode or 200, json.loads(body)

    def test_listeningIs200(self):
        """/livez is 200 while every client listener listens, whatever the members."""
        self.assertEqual(
            self.render([FakeListener("127.0.0.1:23790")]),
            (200, {"status": "ok", "listening": ["127.0.0.1:23790"]}),
        )

    def test_listenerGoneIs503(self):
        """/livez is 503 naming the listener that no longer listens."""
        code, body = self.render(
            [FakeListener("a", "--listen-addr 127.0.0.1:23790: the listening port is closed")]
        )
        self.assertEqual(code, 503)
        self.assertEqual(
            body["problems"], ["--listen-addr 127.0.0.1:23790: the listening port is closed"]
        )

    def test_servedNextToHealth(self):
        """statusSite serves /livez for the listeners it is given."""
        clock = Clock()
        pool = UpstreamPool([Endpoint("10.0.0.1", 2379)], clock)
        pool.markDown(Endpoint("10.0.0.1", 2379), "refused")  # members do not matter
        site = statusSite(Gateway(reactor=clock, pool=pool, factory=GatewayFactory(pool, clock, 1.0),
                                  listener=FakeListener("127.0.0.1:23790")))
        from twisted.web.test.requesthelper import DummyRequest

        request = DummyRequest([b"livez"])
        resource = site.getResourceFor(request)
        self.assertEqual(json.loads(resource.render_GET(request))["status"], "ok")


class OperatorConnectionTests(SynchronousTestCase):
    """
    The metrics address's connections are bounded in time.
    """

    def setUp(self):
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import MemoryReactorClock, StringTransport

        self.clock = MemoryReactorClock()
        pool = UpstreamPool([Endpoint("10.0.0.1", 2379)], self.clock)
        self.site = statusSite(
            Gateway(reactor=self.clock, pool=pool, factory=GatewayFactory(pool, self.clock, 1.0)),
            registry=__import__("prometheus_client").CollectorRegistry(),
        )
        self.channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)

    def test_headersDeadlineIsAbsolute(self):
        """A request trickling in a byte a second is cut at the header deadline."""
        from etcdgw.status import HEADER_TIMEOUT

        request = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
        for i in range(int(HEADER_TIMEOUT) - 1):
            self.channel.dataReceived(request[i : i + 1])
            self.clock.advance(1)
        self.assertFalse(self.transport.disconnecting)
        self.channel.dataReceived(request[20:21])
        self.clock.advance(1)
        self.assertTrue(self.transport.disconnecting)
        self.channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_requestsAnsweredIdleClosed(self):
        """
        Whole requests are answered on a kept-alive connection, each with a
        new deadline; an idle one is closed after the idle timeout.
        """
        from etcdgw.status import IDLE_TIMEOUT

        for _ in range(3):
            self.clock.advance(IDLE_TIMEOUT - 1)
            self.channel.dataReceived(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertIn(b"200 OK", self.transport.value())
            self.transport.clear()
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(IDLE_TIMEOUT)
        self.assertTrue(self.transport.disconnecting)
        self.channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])
