"""
Tests for L{etcdgw.gateway}: the gateway built from a configuration with no
I/O, and the start-up work (SRV discovery's first round, the self-loop
check, the listen host name) done when its tree starts, each failure one
line and exit status 1.
"""

import os
import socket
import subprocess
import sys
import tempfile

from prometheus_client import generate_latest
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

import etcdgw.discovery
import etcdgw.gateway
from etcdgw.discovery import DiscoveryService
from etcdgw.srv import DiscoveredEndpoint, DiscoveryError, DiscoveryResult
from etcdgw.endpoint import Endpoint
from etcdgw.gateway import Gateway, GatewayService, StartError, buildGateway
from etcdgw.metrics import gatewayRegistry
from etcdgw.pool import UpstreamPool
from etcdgw.proxy import GatewayFactory
from etcdgw.tap import Options
from tests.test_fuzz_flags import runTwistd
from tests.test_metrics import samples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def configOf(*argv):
    options = Options()
    options.parseOptions(list(argv))
    return options.config


class Names:
    """
    Stands in for C{socket.getaddrinfo}: answers the names it is given, and
    records every call (a real look-up never happens).
    """

    def __init__(self, **names):
        self.names = {name.replace("_", "."): address for name, address in names.items()}
        self.asked = []

    def __call__(self, host, port, *args, **kwargs):
        self.asked.append(host)
        address = self.names.get(host, host)
        try:
            socket.inet_pton(socket.AF_INET, address)
        except OSError:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port or 0))]


class GatewayTestCase(SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.names = Names(gw_test="127.0.0.1")
        self.patch(socket, "getaddrinfo", self.names)
        self.lines = []
        self.patch(etcdgw.gateway, "_stderrLine", self.lines.append)

    def build(self, *argv):
        return buildGateway(configOf(*argv), self.reactor)

    def start(self, gateway):
        """
        Start C{gateway}'s tree; stop it when the test ends.
        """
        gateway.service.startService()
        self.addCleanup(self.stop, gateway.service)

    def stop(self, service):
        service.stopService()
        self.reactor.advance(0)  # the ports close
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def assertStartFails(self, gateway, message):
        """
        Starting C{gateway} ends with C{message}: one line on standard error,
        exit status 1, no listener listening.
        """
        e = self.assertRaises(StartError, gateway.service.startService)
        self.assertEqual(e.code, 1)
        self.assertIsInstance(e, SystemExit)
        self.assertIsInstance(e, Exception)  # twistd removes its pidfile
        self.assertEqual(str(e), message)
        self.assertEqual(self.lines, [f"etcd-gateway: error: {message}"])
        self.assertIsNone(gateway.listener.port)


class BuildTests(GatewayTestCase):
    def test_oneGatewayObject(self):
        """
        The gateway holds its parts; its tree is a plain service tree, with
        no part hung on it as an attribute.
        """
        gateway = self.build("--endpoints=a:1", "--listen-addr=127.0.0.1:0",
                             "--metrics-addr=127.0.0.1:0")
        self.assertIsInstance(gateway.service, GatewayService)
        children = {s.name: s for s in gateway.service}
        self.assertIs(children["listener"], gateway.listener)
        self.assertIs(children["health"], gateway.health)
        self.assertIs(children["shutdown"], gateway.drain)
        self.assertIs(children["signals"], gateway.reload)
        self.assertIs(children["metrics"], gateway.web)
        self.assertEqual(gateway.allListeners, [gateway.listener, gateway.web])
        for name in ("pool", "factory", "listener"):
            self.assertFalse(hasattr(gateway.service, name), name)

    def test_buildAsksNothing(self):
        """
        Building resolves no name, even those the flags give, and runs no
        discovery: both wait for the start.
        """
        self.patch(etcdgw.discovery, "discoverAtStart", lambda *a: self.fail("discovered"))
        gateway = self.build("--listen-addr=gw.test:0", "--metrics-addr=gw.test:0",
                             "--endpoints=m.test:1")
        self.build("--discovery-srv=etcd.test", "--listen-addr=gw.test:0")
        self.assertEqual(self.names.asked, [])
        self.assertEqual(gateway.listener.address.host, "gw.test")

    def test_srvPoolEmptyUntilStart(self):
        """
        With SRV discovery the pool starts empty and there is no discovery
        service until the first round, at start.
        """
        gateway = self.build("--discovery-srv=etcd.test", "--listen-addr=127.0.0.1:0")
        self.assertEqual(gateway.pool.endpoints, [])
        self.assertIsNone(gateway.discovery)
        self.assertNotIn("discovery", {s.name for s in gateway.service})


class ListenNameTests(GatewayTestCase):
    def test_resolvedAtStart(self):
        """
        A listen host name is resolved when the listener starts, which then
        listens on (and describes) the address found.
        """
        gateway = self.build("--listen-addr=gw.test:0", "--endpoints=127.0.0.1:1")
        self.assertEqual(self.names.asked, [])
        self.start(gateway)
        self.assertIn("gw.test", self.names.asked)
        self.assertEqual(gateway.listener.address.host, "127.0.0.1")
        self.assertIsNone(gateway.listener.problem())
        port = gateway.listener.port.getHost().port
        self.assertEqual(gateway.listener.describe(), f"127.0.0.1:{port}")
        self.assertEqual(gateway.listener.endpoint.host, "127.0.0.1")

    def test_unresolvable(self):
        """
        A listen host name that does not resolve ends the start: one line
        naming the flag, as the flag parser said it before.
        """
        gateway = self.build("--listen-addr=nowhere.test:0")
        self.assertStartFails(
            gateway,
            '--listen-addr: listen address "nowhere.test:0": cannot resolve host: '
            "[Errno -2] Name or service not known",
        )

    def test_metricsAddress(self):
        """--metrics-addr's host name is resolved when it starts, too."""
        gateway = self.build("--listen-addr=127.0.0.1:0", "--metrics-addr=nowhere.test:0")
        e = self.assertRaises(StartError, gateway.service.startService)
        gateway.listener.stopService()  # it started first: close its socket
        self.reactor.advance(0)
        self.assertTrue(str(e).startswith('--metrics-addr: listen address "nowhere.test:0"'))
        self.assertEqual(len(self.lines), 1)


class ListenTimeErrorTests(GatewayTestCase):
    def test_portInUse(self):
        """
        A port that cannot be listened on ends the start with the listener's
        line, as a L{StartError} (so twistd removes its pidfile).
        """
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        gateway = self.build(f"--listen-addr=127.0.0.1:{port}")
        self.assertStartFails(
            gateway,
            f"--listen-addr: cannot listen on 127.0.0.1:{port}: address already in use "
            "(another process listens there)",
        )


class SelfLoopAtStartTests(GatewayTestCase):
    def test_nameResolvingToListenAddress(self):
        """
        An endpoint whose name resolves to the listen address is refused at
        start (the flag parser only judges literals), naming both flags.
        """
        gateway = self.build("--listen-addr=127.0.0.1:23999", "--endpoints=gw.test:23999")
        self.assertStartFails(
            gateway,
            "--endpoints and --listen-addr: endpoint gw.test:23999 resolves to "
            "127.0.0.1:23999, which is the gateway's own listen address "
            "(127.0.0.1:23999): it would forward clients to itself",
        )


class FakeDiscoverAtStart:
    """
    Stands in for L{etcdgw.discovery.discoverAtStart}: records what it is
    given; finds C{endpoints}, or raises C{error}.
    """

    def __init__(self, endpoints=(), error=None):
        self.endpoints = list(endpoints)
        self.error = error
        self.calls = []

    def __call__(self, config, fallback=None):
        self.calls.append((config, fallback))
        if self.error is not None:
            raise self.error
        return self.endpoints, DiscoveryResult(
            endpoints=tuple(self.endpoints), records=("r",), ttl=60
        )


class DiscoveryAtStartTests(GatewayTestCase):
    member = DiscoveredEndpoint(
        "127.0.0.2", 2379, 0, 0, True, name="m1.etcd.test", verified=True
    )

    def test_firstRoundAtStart(self):
        """
        The first SRV round runs when the tree starts, with the explicit
        --endpoints as its fallback: the pool gets what it found, and the
        re-resolving service is the gateway's C{discovery}, a child of its
        tree.
        """
        discover = FakeDiscoverAtStart([self.member])
        self.patch(etcdgw.discovery, "discoverAtStart", discover)
        gateway = self.build("--discovery-srv=etcd.test", "--endpoints=127.0.0.3:2379",
                             "--listen-addr=127.0.0.1:0")
        self.assertEqual(discover.calls, [])
        self.start(gateway)
        [(config, fallback)] = discover.calls
        self.assertIs(config, gateway.config.source.discovery)
        self.assertEqual(fallback, [Endpoint("127.0.0.3", 2379)])
        self.assertEqual(gateway.pool.endpoints, [self.member])
        self.assertIsInstance(gateway.discovery, DiscoveryService)
        self.assertTrue(gateway.discovery.running)
        self.assertIs(gateway.service.getServiceNamed("discovery"), gateway.discovery)

    def test_metricsReadDiscovery(self):
        """
        The discovery metrics are the gateway's discovery service's own
        counters (a rename there breaks this test, not a metric silently).
        """
        self.patch(etcdgw.discovery, "discoverAtStart", FakeDiscoverAtStart([self.member]))
        gateway = self.build("--discovery-srv=etcd.test", "--listen-addr=127.0.0.1:0")
        registry = gatewayRegistry(gateway, process=False)
        names = {key[0] for key in samples(generate_latest(registry).decode())}
        self.assertNotIn("etcd_gateway_discovery_refreshes_total", names)
        self.start(gateway)
        found = samples(generate_latest(registry).decode())
        self.assertEqual(
            (found[("etcd_gateway_discovery_refreshes_total", frozenset())],
             found[("etcd_gateway_discovery_failures_total", frozenset())]),
            (gateway.discovery.rounds, gateway.discovery.failures),
        )

    def test_nothingFound(self):
        """
        Discovery that finds nothing usable at start ends the start with its
        one line.
        """
        message = "--discovery-srv=etcd.test: no usable endpoint found: nothing"
        self.patch(etcdgw.discovery, "discoverAtStart",
                   FakeDiscoverAtStart(error=DiscoveryError(message)))
        gateway = self.build("--discovery-srv=etcd.test", "--listen-addr=127.0.0.1:0")
        self.assertStartFails(gateway, message)
        self.assertIsNone(gateway.discovery)

    def test_discoveredSelfLoop(self):
        """A discovered endpoint at the listen address is refused at start."""
        here = DiscoveredEndpoint("127.0.0.1", 23998, 0, 0, True, name="gw.test")
        self.patch(etcdgw.discovery, "discoverAtStart", FakeDiscoverAtStart([here]))
        gateway = self.build("--discovery-srv=etcd.test", "--listen-addr=127.0.0.1:23998")
        e = self.assertRaises(StartError, gateway.service.startService)
        self.assertIn("own listen address", str(e))


class ConsumerTests(SynchronousTestCase):
    def test_gatewayByHand(self):
        """
        A gateway of a pool and a factory alone is what the operators'
        surfaces need: no listener, no discovery.
        """
        clock = MemoryReactorClock()
        pool = UpstreamPool([Endpoint("10.0.0.1", 2379)], clock)
        gateway = Gateway(reactor=clock, pool=pool, factory=GatewayFactory(pool, clock, 1.0))
        self.assertEqual((gateway.listeners, gateway.allListeners), ([], []))
        self.assertIsNone(gateway.discovery)


_OWN_PROCESS = """
import signal
from twisted.internet import epollreactor
epollreactor.install()
from twisted.internet import reactor
import etcdgw.fast.dispatch
from etcdgw.gateway import buildGateway
from etcdgw.tap import Options

def lean():
    return getattr(reactor.doPoll, "__func__", None) in (
        etcdgw.fast.dispatch._doPoll, etcdgw.fast.dispatch._ringPoll
    )

options = Options()
options.parseOptions(["--listen-addr=127.0.0.1:0", "--endpoints=127.0.0.1:1"])
sighup = signal.getsignal(signal.SIGHUP)
gateway = buildGateway(options.config)
print("built", gateway.ownProcess, lean(), signal.getsignal(signal.SIGHUP) is sighup)
gateway.service.privilegedStartService()
print("privileged", lean())
gateway.service.startService()
print("started", signal.getsignal(signal.SIGHUP) == gateway.reload._onSignal)
"""


class OwnProcessTests(SynchronousTestCase):
    def test_takenAtStartNotAtBuild(self):
        """
        On the process's own reactor, building changes nothing
        process-wide; the lean dispatch comes with the start, SIGHUP's
        handler once the tree runs.
        """
        result = subprocess.run(
            [sys.executable, "-c", _OWN_PROCESS], capture_output=True, text=True, timeout=30,
            env={**os.environ, "PYTHONPATH": ROOT},
        )
        self.assertEqual(
            result.stdout.splitlines(),
            ["built True False True", "privileged True", "started True"],
            result.stderr[-2000:],
        )


class ProcessStartErrorTests(SynchronousTestCase):
    def test_oneLineNoPidfile(self):
        """
        A start-up failure of the real process (here the self-loop check,
        which resolves "localhost" at start) is one line on standard error,
        exit status 1, no traceback, and twistd's pidfile removed.
        """
        with tempfile.TemporaryDirectory() as directory:
            code, out, err = runTwistd(
                "--listen-addr=127.0.0.1:23997", "--endpoints=localhost:23997",
                directory=directory,
            )
            self.assertEqual(os.listdir(directory), [])
        self.assertEqual(code, 1, (out[-2000:], err[-2000:]))
        lines = err.strip().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertTrue(
            lines[0].startswith("etcd-gateway: error: --endpoints and --listen-addr: "
                                "endpoint localhost:23997 resolves to "),
            lines[0],
        )
        self.assertNotIn("Traceback", out + err)
