"""
The twistd plugin's body: C{etcd-gateway}'s flags and its service tree.
"""

import os
import signal

from twisted.application.service import MultiService
from twisted.logger import Logger
from twisted.python import usage

from etcdgw.duration import DurationError, formatDuration, parseDuration
from etcdgw.endpoint import EndpointError, parseEndpoints
from etcdgw.health import HealthService
from etcdgw.listen import ListenError, ListeningService, listenEndpoint, parseListenAddress
from etcdgw.reactor import leanDispatch
from etcdgw.transport import RELAY_IN_C
from etcdgw.pool import POLICIES, UpstreamPool
from etcdgw.proxy import GatewayFactory
from etcdgw.selfloop import SelfLoopError, checkSelfLoop
from etcdgw.sdnotify import SystemdNotifier, SystemdNotifyService, watchdogInterval
from etcdgw.shutdown import DrainService
from etcdgw.signals import ReloadService

log = Logger(namespace="etcdgw")

DEFAULT_ENDPOINTS = "127.0.0.1:2379"
DEFAULT_LISTEN = "127.0.0.1:23790"
#: etcd treats a retry delay of 0 as five minutes; so do we.
ZERO_RETRY_DELAY = 300.0


def _duration(name, allowZero=True):
    def convert(text):
        try:
            seconds = parseDuration(text)
        except DurationError as e:
            raise usage.UsageError(f"--{name}: {e}") from None
        if seconds < 0 or (seconds == 0 and not allowZero):
            raise usage.UsageError(
                f'--{name}: "{text}" must be {"zero or " if allowZero else ""}positive'
            )
        return seconds

    return convert


def _loadCertificates(path, flag):
    """
    Check that C{path} holds at least one PEM certificate.

    @raise usage.UsageError: naming the flag and the file.
    """
    from cryptography import x509

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise usage.UsageError(f'{flag}: cannot read "{path}": {e.strerror}') from None
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        certificates = []
    if not certificates:
        raise usage.UsageError(f'{flag}: "{path}" holds no PEM certificate')
    return certificates


def _checkHealthOptions(options):
    """
    Check and complete the flags of etcd-aware health, membership sync and
    balancing (L{etcdgw.etcdhealth}, L{etcdgw.membership}).

    @raise usage.UsageError: naming the bad flag.
    """
    for name, default in (
        ("health-interval", "5s"),
        ("health-timeout", "2s"),
        ("sync-interval", "0s"),
    ):
        if isinstance(options[name], str):  # the default, given as text
            options[name] = _duration(name)(options[name] or default)
    if options["policy"] not in POLICIES:
        raise usage.UsageError(
            f'--policy: "{options["policy"]}" is not one of {", ".join(POLICIES)}'
        )
    if options["health-check"] not in ("tcp", "etcd"):
        raise usage.UsageError(
            f'--health-check: "{options["health-check"]}" is not tcp or etcd'
        )
    for name in ("health-rise", "health-fall"):
        value = options[name]
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise usage.UsageError(f'--{name}: "{value}" is not a number') from None
        if value < 1:
            raise usage.UsageError(f"--{name}: {value} must be at least 1")
        options[name] = value
    if options["health-key-file"] is not None and options["health-cert-file"] is None:
        raise usage.UsageError("--health-key-file needs --health-cert-file")
    for name in ("health-cert-file", "health-key-file"):
        if options[name] is not None and not os.access(options[name], os.R_OK):
            raise usage.UsageError(f'--{name}: cannot read "{options[name]}"')


def _etcdClient(options, reactor):
    """
    The HTTP client of etcd health checks and membership sync, with the TLS
    trust of --trusted-ca-file and the client certificate of
    --health-cert-file (or --discovery-cert-file).
    """
    from etcdgw.etcdhealth import EtcdClient, tlsPolicyFromFiles

    cert, key = options.get("health-cert-file"), options.get("health-key-file")
    if cert is None:
        cert, key = options.get("discovery-cert-file"), options.get("discovery-key-file")
    policy = tlsPolicyFromFiles(options.get("trusted-ca-certificates"), cert, key)
    return EtcdClient(reactor, options["health-timeout"], policy)


class Options(usage.Options):
    """
    etcd's C{etcd gateway start} flags, with its defaults, and ours.
    """

    synopsis = "[options]"
    longdesc = (
        "A local, stable address for an etcd cluster: every client TCP connection "
        "is forwarded byte for byte to a healthy member. Accepts the flags of "
        "etcd's `etcd gateway start`."
    )

    optFlags = [
        [
            "insecure-discovery",
            None,
            "Accept SRV records that cannot be verified (plain etcd-client records, "
            "TLS endpoints without a valid certificate).",
        ],
    ]

    optParameters = [
        [
            "endpoints",
            None,
            DEFAULT_ENDPOINTS,
            "Comma-separated etcd client endpoints: host:port, [v6addr]:port, or "
            "http:// / https:// URLs (the scheme is stripped; https is passed through, "
            "TLS end to end). A member without a port is at etcd's client port, 2379 "
            "(host, [v6addr], https://host). Host names are resolved at each dial.",
        ],
        [
            "listen-addr",
            None,
            DEFAULT_LISTEN,
            "Where clients connect: host:port, [v6addr]:port, :port (all interfaces), "
            "or a Twisted endpoint (tcp:..., unix:/path, systemd:domain=INET:index=0).",
        ],
        [
            "retry-delay",
            None,
            "1m0s",
            "How often endpoints that are down are probed (Go duration: 300ms, 1m0s, "
            "1.5h; 0 means 5m, as etcd).",
            _duration("retry-delay"),
        ],
        [
            "dial-timeout",
            None,
            "1s",
            "How long one connect to an endpoint may take before the next endpoint is "
            "tried (Go duration). etcd's gateway has none.",
            _duration("dial-timeout", allowZero=False),
        ],
        [
            "policy",
            None,
            "round-robin",
            "How a member is chosen for each new connection: round-robin (as etcd: "
            "rotation, or RFC 2782 weighted random when SRV gives weights), weighted "
            "(smooth weighted round-robin on SRV weights), least-connections.",
        ],
        [
            "health-check",
            None,
            "tcp",
            "tcp: a member is used while it accepts TCP (as etcd's gateway). etcd: also "
            "ask every member /health (/readyz where served) and its cluster ID every "
            "--health-interval; unhealthy or foreign members get no new connections.",
        ],
        [
            "health-interval",
            None,
            "5s",
            "How often --health-check=etcd asks every member (Go duration).",
            _duration("health-interval", allowZero=False),
        ],
        [
            "health-timeout",
            None,
            "2s",
            "How long one etcd health answer may take (Go duration).",
            _duration("health-timeout", allowZero=False),
        ],
        ["health-rise", None, "2", "Good answers in a row that make a member healthy."],
        ["health-fall", None, "3", "Bad answers in a row that make a member unhealthy."],
        [
            "health-cert-file",
            None,
            None,
            "PEM client certificate for health checks and membership sync, for members "
            "with --client-cert-auth (default: --discovery-cert-file).",
        ],
        [
            "health-key-file",
            None,
            None,
            "Private key of --health-cert-file (default: read from that file).",
        ],
        [
            "sync-interval",
            None,
            "0s",
            "Read the member list this often and follow it: endpoints are added and "
            "removed to match the members' client URLs (Go duration; 0, the default, "
            "is off).",
            _duration("sync-interval"),
        ],
        [
            "shutdown-grace",
            None,
            "5s",
            "On SIGTERM/SIGINT, stop accepting at once and give open connections this "
            "long to finish before closing them (Go duration; 0 closes them at once).",
            _duration("shutdown-grace"),
        ],
        [
            "metrics-addr",
            None,
            None,
            "Serve Prometheus /metrics, /health and a status page / on this address "
            "(same syntax as --listen-addr, e.g. 127.0.0.1:23791); off by default.",
        ],
        ["discovery-srv", None, None, "DNS domain for SRV discovery of the endpoints."],
        [
            "discovery-srv-name",
            None,
            None,
            "Suffix of the SRV service name: _etcd-client-ssl-NAME._tcp, "
            "_etcd-client-NAME._tcp.",
        ],
        [
            "trusted-ca-file",
            None,
            None,
            "PEM CA bundle that discovered TLS endpoints' certificates must chain to.",
        ],
        [
            "discovery-dns",
            None,
            None,
            "DNS server for SRV discovery, IP:PORT (e.g. Consul at 127.0.0.1:8600); "
            "default: the system resolver.",
        ],
        [
            "discovery-refresh",
            None,
            None,
            "Re-resolve the SRV records this often (Go duration; 0 turns re-resolution "
            "off). Default: the records' TTL, clamped to 5s-5m.",
            _duration("discovery-refresh"),
        ],
        [
            "discovery-cert-file",
            None,
            None,
            "PEM client certificate presented in the validation handshake to members "
            "that require client certificates.",
        ],
        [
            "discovery-key-file",
            None,
            None,
            "Private key of --discovery-cert-file (default: read from that file).",
        ],
    ]

    def __init__(self):
        super().__init__()
        self.explicit = set()
        self.arguments = []

    def parseOptions(self, options=None):
        if options is None:
            import sys

            options = sys.argv[1:]
        self.arguments = list(options)  # what --workers passes on to workers
        try:
            return super().parseOptions(options)
        except usage.UsageError as e:
            if self.parent is None:
                raise
            # Run by twistd, which would print its whole help text before
            # the error: say just what is wrong, on one line, and exit 1.
            import sys

            sys.stderr.write(f"etcd-gateway: error: {e} (see: twistd etcd-gateway --help)\n")
            raise SystemExit(1)

    def opt_workers(self, value):
        """
        Gateway processes sharing the TCP listen port (SO_REUSEPORT), each with its own endpoint health. [default: 1]
        """
        try:
            count = int(value)
        except ValueError:
            count = 0
        if not 1 <= count <= 256:
            raise usage.UsageError(f'--workers: "{value}" is not a number from 1 to 256')
        self["workers"] = count

    def opt_worker_of(self, value):
        """
        (internal) This process is a worker of the gateway with this pid.
        """
        if not value.isdigit():
            raise usage.UsageError(f'--worker-of: "{value}" is not a process id')
        self["worker-of"] = int(value)

    def opt_endpoints(self, value):
        self.explicit.add("endpoints")
        self["endpoints"] = value

    def opt_version(self):
        from etcdgw import __version__

        relay = "forwarding step in C" if RELAY_IN_C else "forwarding in pure Python"
        print(f"etcd-gateway {__version__} ({relay})")
        raise SystemExit(0)

    def postOptions(self):
        self.setdefault("workers", 1)
        self.setdefault("worker-of", None)
        if self["retry-delay"] is None:
            self["retry-delay"] = parseDuration("1m0s")
        for name in ("retry-delay", "dial-timeout", "shutdown-grace"):
            if isinstance(self[name], str):  # the default, given as text
                self[name] = _duration(name)(self[name])
        if self["retry-delay"] == 0:
            self["retry-delay"] = ZERO_RETRY_DELAY
        try:
            self["endpoints"] = parseEndpoints(self["endpoints"])
        except EndpointError as e:
            raise usage.UsageError(f"--endpoints: {e}") from None
        try:
            self["listen-addr"] = parseListenAddress(self["listen-addr"])
        except ListenError as e:
            raise usage.UsageError(f"--listen-addr: {e}") from None
        if self["metrics-addr"] is not None:
            try:
                self["metrics-addr"] = parseListenAddress(self["metrics-addr"])
            except ListenError as e:
                raise usage.UsageError(f"--metrics-addr: {e}") from None
        if self["trusted-ca-file"] is not None:
            self["trusted-ca-certificates"] = _loadCertificates(
                self["trusted-ca-file"], "--trusted-ca-file"
            )
        if self["discovery-srv-name"] is not None and self["discovery-srv"] is None:
            raise usage.UsageError("--discovery-srv-name needs --discovery-srv")
        if self["discovery-srv"] is not None:
            self._discover()
        else:
            for flag in ("discovery-dns", "discovery-refresh", "discovery-cert-file"):
                if self[flag] is not None:
                    raise usage.UsageError(f"--{flag} needs --discovery-srv")
        _checkHealthOptions(self)
        if self["workers"] > 1 and not (self["listen-addr"].isTCP and self["listen-addr"].port):
            raise usage.UsageError(
                "--workers above 1 needs a TCP --listen-addr with a fixed port "
                "(the workers share it with SO_REUSEPORT)"
            )
        try:
            checkSelfLoop(self["listen-addr"], self["endpoints"])
        except SelfLoopError as e:
            raise usage.UsageError(str(e)) from None


    def _discover(self):
        """
        SRV discovery at start (blocking, bounded by timeouts; the reactor is
        not running yet): C{self["endpoints"]} becomes what was found, and
        C{self["discovery"]} the L{DiscoveryConfig} for re-resolution.
        """
        from etcdgw.discovery import (
            DiscoveryConfig,
            DiscoveryError,
            discoverAtStart,
            parseNameserver,
        )
        from etcdgw.verify import TLSTrust

        nameserver = None
        if self["discovery-dns"] is not None:
            try:
                nameserver = parseNameserver(self["discovery-dns"])
            except ValueError as e:
                raise usage.UsageError(str(e)) from None
        if self["discovery-key-file"] is not None and self["discovery-cert-file"] is None:
            raise usage.UsageError("--discovery-key-file needs --discovery-cert-file")
        for flag in ("discovery-cert-file", "discovery-key-file"):
            if self[flag] is not None and not os.access(self[flag], os.R_OK):
                raise usage.UsageError(f'--{flag}: cannot read "{self[flag]}"')
        config = DiscoveryConfig(
            domain=self["discovery-srv"],
            serviceName=self["discovery-srv-name"],
            insecure=bool(self["insecure-discovery"]),
            trust=TLSTrust(
                self["trusted-ca-file"],
                self["discovery-cert-file"],
                self["discovery-key-file"],
            ),
            nameserver=nameserver,
            refresh=self["discovery-refresh"],
        )
        fallback = self["endpoints"] if "endpoints" in self.explicit else None
        try:
            endpoints, first = discoverAtStart(config, fallback)
        except DiscoveryError as e:
            raise usage.UsageError(str(e)) from None
        self["endpoints"] = endpoints
        self["discovery"] = config
        self["discovery-first"] = first


class ListenerService(ListeningService):
    """
    Listens for clients; logs etcd's "ready" line once the port is open.
    """

    def __init__(self, endpoint, factory, address, pool):
        super().__init__(endpoint, factory, address)
        self.pool = pool

    def listening(self, port):
        log.info(
            "ready to proxy client requests to [{endpoints}] on {listen}",
            endpoints=" ".join(str(e) for e in self.pool.endpoints),
            listen=self.describe(),
        )


def makeService(options, reactor=None):
    """
    Build the gateway: a listener, the upstream pool, and the health checks.
    """
    # Only the process's own reactor (twistd's call) takes over SIGTERM/SIGINT.
    takeSignals = reactor is None
    if reactor is None:
        from twisted.internet import reactor

        leanDispatch(reactor)
        if not RELAY_IN_C:
            log.warn(
                "forwarding in pure Python: the C forwarding step (_etcdgw_relay) "
                "was not built at install (no C compiler or Python headers?); the "
                "gateway works, with about 10% more CPU per request; reinstall with "
                "gcc and the Python headers to get it"
            )
    endpoints = options["endpoints"]
    defaulted = [str(e) for e in endpoints if getattr(e, "portDefaulted", False)]
    if defaulted:
        log.info(
            "endpoints given without a port use etcd's client port 2379: {endpoints}",
            endpoints=defaulted,
        )
    for endpoint in endpoints:
        if endpoint.tls:
            log.info(
                "endpoint {endpoint} is https: TLS passes through the gateway end to "
                "end, untouched; clients speak TLS to the gateway as to the member",
                endpoint=str(endpoint),
            )
    pool = UpstreamPool(endpoints, reactor, policy=options.get("policy", "round-robin"))
    factory = GatewayFactory(pool, reactor, options["dial-timeout"])

    root = MultiService()
    root.pool = pool
    root.factory = factory

    workers = options.get("workers", 1)
    workerOf = options.get("worker-of")
    listener = ListenerService(
        listenEndpoint(
            reactor, options["listen-addr"], reusePort=workers > 1 or workerOf is not None
        ),
        factory,
        options["listen-addr"],
        pool,
    )
    listener.setName("listener")
    listener.setServiceParent(root)

    health = HealthService(pool, reactor, options["retry-delay"], options["dial-timeout"])
    health.setName("health")
    health.setServiceParent(root)

    etcdHealth = None
    if options.get("health-check") == "etcd" or options.get("sync-interval"):
        client = _etcdClient(options, reactor)
    if options.get("health-check") == "etcd":
        from etcdgw.etcdhealth import EtcdHealthService, EtcdProber

        etcdHealth = EtcdHealthService(
            pool,
            reactor,
            options["health-interval"],
            EtcdProber(client),
            rise=options["health-rise"],
            fall=options["health-fall"],
        )
        etcdHealth.setName("etcd-health")
        etcdHealth.setServiceParent(root)
        log.info(
            "etcd health: every member asked every {interval} (timeout {timeout}, "
            "rise {rise}, fall {fall}); policy {policy}",
            interval=formatDuration(options["health-interval"]),
            timeout=formatDuration(options["health-timeout"]),
            rise=options["health-rise"],
            fall=options["health-fall"],
            policy=pool.policyName,
        )
    if options.get("sync-interval"):
        from etcdgw.membership import MembershipSync

        membership = MembershipSync(
            pool,
            reactor,
            options["sync-interval"],
            client,
            clusterID=etcdHealth.clusterID if etcdHealth is not None else (lambda: None),
        )
        membership.setName("membership")
        membership.setServiceParent(root)
        log.info(
            "endpoints follow the cluster's member list, read every {interval}",
            interval=formatDuration(options["sync-interval"]),
        )

    # After the listener: MultiService stops children in reverse order, so
    # the port stops accepting in the same turn as the drain begins.
    drain = DrainService(
        factory,
        reactor,
        options["shutdown-grace"],
        installSignal=signal.signal if takeSignals else None,
    )
    drain.setName("shutdown")
    drain.setServiceParent(root)

    reload = ReloadService(
        root, pool, reactor, options["dial-timeout"],
        installSignal=signal.signal if takeSignals else None,
    )
    reload.setName("signals")
    reload.setServiceParent(root)

    if workers > 1:
        from etcdgw.workers import WorkersService

        supervisor = WorkersService(
            workers - 1, options.arguments, reactor, options["shutdown-grace"] + 5
        )
        supervisor.setName("workers")
        supervisor.setServiceParent(root)
        reload.workers = supervisor  # SIGHUP is passed on to every worker
    if workerOf is not None:
        from etcdgw.workers import SupervisorWatch

        watch = SupervisorWatch(workerOf, reactor, reactor.stop)
        watch.setName("supervisor-watch")
        watch.setServiceParent(root)

    notifier = SystemdNotifier.fromEnvironment() if workerOf is None else None
    if notifier is not None:
        notify = SystemdNotifyService(
            notifier, pool, listener, reactor, watchdogInterval()
        )
        notify.setName("sdnotify")
        notify.setServiceParent(root)

    if options["metrics-addr"] is not None and workerOf is None:
        from etcdgw.status import StatusService, statusSite

        web = StatusService(
            listenEndpoint(reactor, options["metrics-addr"]),
            statusSite(pool, factory, reactor, root),
            options["metrics-addr"],
        )
        web.setName("metrics")
        web.setServiceParent(root)

    if options.get("discovery") is not None:
        from etcdgw.discovery import DiscoveryService

        discovery = DiscoveryService(
            pool, reactor, options["discovery"], options["discovery-first"]
        )
        discovery.setName("discovery")
        discovery.setServiceParent(root)
    log.info(
        "endpoints down are probed every {retryDelay}; dial timeout {dialTimeout}; "
        "pid {pid}",
        retryDelay=formatDuration(options["retry-delay"]),
        dialTimeout=formatDuration(options["dial-timeout"]),
        pid=os.getpid(),
    )
    return root
