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
from etcdgw.listen import (
    ListenError,
    ListeningService,
    descriptorBudget,
    listenEndpoint,
    parseListenAddress,
    parseMode,
)
from etcdgw.reactor import leanDispatch
from etcdgw.transport import RELAY_IN_C
from etcdgw.pool import POLICIES, UpstreamPool
from etcdgw.proxy import GatewayFactory
from etcdgw.selfloop import SelfLoopError, checkSelfLoop
from etcdgw.sdnotify import SystemdNotifier, SystemdNotifyService, watchdogInterval
from etcdgw.shutdown import DrainService
from etcdgw.signals import ReloadService
from etcdgw.tlsfiles import TLSFileError, checkKeyPair, loadCertificates

log = Logger(namespace="etcdgw")

DEFAULT_ENDPOINTS = "127.0.0.1:2379"
DEFAULT_LISTEN = "127.0.0.1:23790"
#: etcd treats a retry delay of 0 as five minutes; so do we.
ZERO_RETRY_DELAY = 300.0
#: The largest --health-rise / --health-fall.
MAX_RISE_FALL = 1000
#: The largest --workers.
MAX_WORKERS = 256


def _quoted(text, limit=80):
    """
    C{text} in double quotes for an error message, cut after C{limit}
    characters (a 5000-digit value stays readable).
    """
    if len(text) > limit:
        return f'"{text[:limit]}..." ({len(text)} characters)'
    return f'"{text}"'


def _oneLine(message, limit=2000):
    """
    C{message} as one printable line for the terminal: control characters
    (a newline, an escape sequence in a value) and undecodable bytes from
    argv are written as escapes, and a message longer than C{limit} keeps
    its start (the flag) and its end (the reason).
    """
    out = []
    for c in message:
        if c.isprintable() and not 0xD800 <= ord(c) <= 0xDFFF:
            out.append(c)
        else:
            out.append(ascii(c)[1:-1])
    line = "".join(out)
    if len(line) > limit:
        line = f"{line[: limit // 2]} ... {line[-(limit // 2):]}"
    return line


def _shortened(message, arguments, limit=80):
    """
    C{message} with every long command-line value it quotes in full (a
    parser that echoes its input) cut to C{limit} characters.
    """
    values = set()
    for argument in arguments:
        values.add(argument)
        values.add(argument.partition("=")[2])
    for value in sorted(values, key=len, reverse=True):
        if len(value) > limit and value in message:
            message = message.replace(value, f"{value[:limit]}... ({len(value)} characters)")
    return message


def _duration(name, allowZero=True):
    """
    The converter of the duration flag C{--name}: Go syntax, not negative
    (nor zero unless C{allowZero}), at most Go's longest duration.
    """

    def convert(text):
        try:
            seconds = parseDuration(text)
        except DurationError as e:
            raise usage.UsageError(f"--{name}: {e}") from None
        if seconds < 0 or (seconds == 0 and not allowZero):
            raise usage.UsageError(
                f'--{name}: {_quoted(text)} must be {"zero or " if allowZero else ""}positive'
            )
        return seconds

    return convert


def _integer(name, text, low, high):
    """
    The value of the number flag C{--name}: ASCII digits only (C{int} also
    takes C{" 1"}, C{"1_0"}, C{"\u0663"}) and from C{low} to C{high}.

    @raise usage.UsageError: naming the flag and the value.
    """
    if isinstance(text, int):
        text = str(text)
    value = None
    if text.isascii() and text.isdigit() and len(text.lstrip("0")) <= len(str(high)):
        value = int(text)
    if value is None or not low <= value <= high:
        shown = value if value is not None else _quoted(text)
        raise usage.UsageError(f"--{name}: {shown} is not a number from {low} to {high}")
    return value


def _loadCertificates(path, flag):
    """
    The PEM certificates in C{path} (at least one), read by
    L{etcdgw.tlsfiles}: a regular file of bounded size.

    @raise usage.UsageError: naming the flag and the file.
    """
    try:
        return loadCertificates(path, flag)
    except TLSFileError as e:
        raise usage.UsageError(str(e)) from None


def _checkKeyPair(options, certFlag, keyFlag):
    """
    Check C{--certFlag} and C{--keyFlag} as a client certificate and its key
    (the key read from the certificate file when C{--keyFlag} is not given).

    @raise usage.UsageError: naming the flag and the file at fault.
    """
    if options[keyFlag] is not None and options[certFlag] is None:
        raise usage.UsageError(f"--{keyFlag} needs --{certFlag}")
    if options[certFlag] is None:
        return
    try:
        checkKeyPair(options[certFlag], options[keyFlag], f"--{certFlag}", f"--{keyFlag}")
    except TLSFileError as e:
        raise usage.UsageError(str(e)) from None


def _listenAddress(name, text):
    """
    Parse the listen address flag C{--name}.

    @raise usage.UsageError: naming the flag and the value.
    """
    try:
        address = parseListenAddress(text)
    except ValueError as e:  # ListenError, and idna's UnicodeError for a long name
        message = str(e) if isinstance(e, ListenError) else f"{_quoted(text)}: {e}"
        raise usage.UsageError(f"--{name}: {message}") from None
    if address.isTCP and not 0 <= address.port <= 65535:
        raise usage.UsageError(
            f"--{name}: {_quoted(text)}: port {address.port} is not in 0-65535"
        )
    return address


def _checkDomain(domain, serviceName):
    """
    Check C{--discovery-srv} (and C{--discovery-srv-name}) make DNS names
    that can be asked: no control characters or spaces, labels of at most 63
    bytes, names of at most 255.

    @raise usage.UsageError: naming the flag and the value.
    """
    import dns.exception
    import dns.name

    from etcdgw.discovery import serviceNames

    if not domain.strip("."):
        raise usage.UsageError(f"--discovery-srv: {_quoted(domain)} is not a DNS domain")
    for flag, value in (("discovery-srv", domain), ("discovery-srv-name", serviceName or "")):
        if any(not c.isprintable() or c.isspace() for c in value):
            raise usage.UsageError(
                f"--{flag}: {_quoted(value)} is not a DNS name: it holds spaces or "
                "control characters"
            )
    for name, _ in serviceNames(domain, serviceName):
        try:
            dns.name.from_text(name)
        except (dns.exception.DNSException, ValueError) as e:  # UnicodeError: IDNA
            raise usage.UsageError(
                f"--discovery-srv: the SRV name {_quoted(name)} cannot be looked up: {e}"
            ) from None


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
        options[name] = _integer(name, options[name], 1, MAX_RISE_FALL)
    _checkKeyPair(options, "health-cert-file", "health-key-file")


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
    # The key is read from the certificate file when not given (checked at
    # parse time by tlsfiles.checkKeyPair).
    policy = tlsPolicyFromFiles(options.get("trusted-ca-certificates"), cert, key or cert)
    return EtcdClient(reactor, options["health-timeout"], policy)


def _checkListenerOptions(options):
    """
    Check --listen-mode and --max-connections against --listen-addr.

    @raise usage.UsageError: naming the flag and the value.
    """
    mode = options["listen-mode"]
    if mode is not None and not isinstance(mode, int):
        try:
            mode = parseMode(mode, "--listen-mode:")
        except ListenError as e:
            raise usage.UsageError(str(e)) from None
        if not options["listen-addr"].isUNIX:
            raise usage.UsageError(
                "--listen-mode needs a unix: --listen-addr (it sets the socket file's "
                "permissions)"
            )
        if options["listen-addr"].mode is not None:
            raise usage.UsageError(
                "--listen-mode: the --listen-addr string gives mode= already; give it once"
            )
        options["listen-mode"] = mode
    cap = options["max-connections"]
    if cap is not None and not isinstance(cap, int):
        text = cap.strip()
        if not text.isascii() or not text.isdigit() or len(text.lstrip("0")) > 9:
            raise usage.UsageError(
                f'--max-connections: "{cap[:40]}" is not a number from 1 to 999999999'
            )
        if int(text) < 1:
            raise usage.UsageError(f'--max-connections: "{cap}" must be at least 1')
        options["max-connections"] = int(text)


def _connectionCaps(options):
    """
    The caps on open connections, C{(clients, metrics)}: --max-connections
    or what the open-files limit allows (L{descriptorBudget}).
    """
    import resource

    try:
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (OSError, ValueError):
        limit = None
    clients, metrics = descriptorBudget(limit)
    given = options.get("max-connections")
    if given is not None and given > clients:
        log.warn(
            "--max-connections={given} is above what the open-files limit ({limit}) "
            "leaves for clients ({clients}): past that, accepting pauses for lack of "
            "descriptors instead",
            given=given,
            limit=limit,
            clients=clients,
        )
    return (given if given is not None else clients), metrics


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
            "listen-mode",
            None,
            None,
            "Permissions of the socket file of a unix: --listen-addr (octal) "
            "[default: 0660: its owner and group may connect, nobody else].",
        ],
        [
            "max-connections",
            None,
            None,
            "Client connections open at once; at the cap accepting pauses (new "
            "clients wait in the listen queue, nothing is closed) [default: from "
            "ulimit -n: (limit - 32 - metrics cap) / 2, two descriptors per client, "
            "the rest kept for probes and the metrics address; 464 at 1024, 32720 "
            "at 65536].",
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
        [
            "health-rise",
            None,
            "2",
            f"Good answers in a row that make a member healthy (1 to {MAX_RISE_FALL}).",
        ],
        [
            "health-fall",
            None,
            "3",
            f"Bad answers in a row that make a member unhealthy (1 to {MAX_RISE_FALL}).",
        ],
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
            "Serve Prometheus /metrics, /health, /livez and a status page / on this "
            "address (same syntax as --listen-addr, e.g. 127.0.0.1:23791; at most 64 "
            "connections, each request whole within 10s); off by default.",
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
            e = usage.UsageError(_shortened(str(e), self.arguments))
            if self.parent is None:
                raise e from None
            # Run by twistd, which would print its whole help text before
            # the error: say just what is wrong, on one line, and exit 1.
            import sys

            sys.stderr.write(
                f"etcd-gateway: error: {_oneLine(str(e))} (see: twistd etcd-gateway --help)\n"
            )
            raise SystemExit(1)
        except Exception as e:
            if self.parent is None:
                raise
            # A parser bug (the flag fuzzer hunts them): still one line and
            # status 1, not a traceback, but saying it is a bug.
            import sys

            sys.stderr.write(
                "etcd-gateway: error: the flags could not be parsed (a bug: please "
                f"report it with the command line): {_oneLine(_shortened(repr(e), self.arguments))}\n"
            )
            raise SystemExit(1)

    def parseArgs(self, *args):
        if args:
            raise usage.UsageError(
                f"unexpected argument {_quoted(args[0])}: every flag takes the form "
                "--name=value or --name value"
            )

    def opt_workers(self, value):
        """
        Gateway processes sharing the TCP listen port (SO_REUSEPORT), each with its own endpoint health. [default: 1]
        """
        self["workers"] = _integer("workers", value, 1, MAX_WORKERS)

    def opt_worker_of(self, value):
        """
        (internal) This process is a worker of the gateway with this pid.
        """
        # Linux pids are at most 2**22; any 31-bit number is accepted.
        if not (value.isascii() and value.isdigit() and len(value) <= 10) or not (
            0 < int(value) < 2**31
        ):
            raise usage.UsageError(f"--worker-of: {_quoted(value)} is not a process id")
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
        self["listen-addr"] = _listenAddress("listen-addr", self["listen-addr"])
        if self["metrics-addr"] is not None:
            self["metrics-addr"] = _listenAddress("metrics-addr", self["metrics-addr"])
        _checkListenerOptions(self)
        if self["trusted-ca-file"] is not None:
            self["trusted-ca-certificates"] = _loadCertificates(
                self["trusted-ca-file"], "--trusted-ca-file"
            )
        if self["discovery-srv"] is not None and self["sync-interval"] not in (None, "0s", 0):
            raise usage.UsageError(
                "--sync-interval and --discovery-srv both set the endpoints: use one or "
                "the other"
            )
        if self["discovery-srv-name"] is not None and self["discovery-srv"] is None:
            raise usage.UsageError("--discovery-srv-name needs --discovery-srv")
        # Every file and value is checked before discovery asks the network.
        _checkHealthOptions(self)
        if self["discovery-srv"] is not None:
            self._discover()
        else:
            for flag in (
                "discovery-dns",
                "discovery-refresh",
                "discovery-cert-file",
                "discovery-key-file",
            ):
                if self[flag] is not None:
                    raise usage.UsageError(f"--{flag} needs --discovery-srv")
        if self["workers"] > 1 and not (self["listen-addr"].isTCP and self["listen-addr"].port):
            raise usage.UsageError(
                "--workers above 1 needs a TCP --listen-addr with a fixed port "
                "(the workers share it with SO_REUSEPORT)"
            )
        try:
            checkSelfLoop(self["listen-addr"], self["endpoints"])
        except SelfLoopError as e:
            raise usage.UsageError(f"--endpoints and --listen-addr: {e}") from None


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

        _checkDomain(self["discovery-srv"], self["discovery-srv-name"])
        nameserver = None
        if self["discovery-dns"] is not None:
            try:
                nameserver = parseNameserver(self["discovery-dns"])
            except ValueError as e:
                message = str(e)
                if "--discovery-dns" not in message:
                    message = f"--discovery-dns: {_quoted(self['discovery-dns'])}: {message}"
                raise usage.UsageError(message) from None
        _checkKeyPair(self, "discovery-cert-file", "discovery-key-file")
        cert = self["discovery-cert-file"]
        config = DiscoveryConfig(
            domain=self["discovery-srv"],
            serviceName=self["discovery-srv-name"],
            insecure=bool(self["insecure-discovery"]),
            trust=TLSTrust(self["trusted-ca-file"], cert, self["discovery-key-file"] or cert),
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
        super().__init__(endpoint, factory, address, flag="--listen-addr")
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
    maxClients, maxOperator = _connectionCaps(options)
    listener = ListenerService(
        listenEndpoint(
            reactor,
            options["listen-addr"],
            reusePort=workers > 1 or workerOf is not None,
            maxConnections=maxClients,
            mode=options.get("listen-mode"),
        ),
        factory,
        options["listen-addr"],
        pool,
    )
    listener.setName("listener")
    listener.setServiceParent(root)
    root.listener = listener
    # A member connection that reaches one of these is a self-loop.
    factory.listeners = [listener]

    health = HealthService(pool, reactor, options["retry-delay"], options["dial-timeout"])
    health.setName("health")
    health.setServiceParent(root)

    if options.get("health-check") == "etcd" or options.get("sync-interval"):
        from etcdgw.etcdhealth import ClusterIdentity

        client = _etcdClient(options, reactor)
        # The one judge of cluster IDs, whoever reads them.
        identity = ClusterIdentity(pool)
    if options.get("health-check") == "etcd":
        from etcdgw.etcdhealth import EtcdHealthService, EtcdProber

        etcdHealth = EtcdHealthService(
            pool,
            reactor,
            options["health-interval"],
            EtcdProber(client),
            rise=options["health-rise"],
            fall=options["health-fall"],
            identity=identity,
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
        from etcdgw.membership import MembershipSync, ownAddressCheck

        membership = MembershipSync(
            pool,
            reactor,
            options["sync-interval"],
            client,
            identity=identity,
            seeds=endpoints,
            refuse=ownAddressCheck(options["listen-addr"]),
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
            notifier, pool, listener, reactor, watchdogInterval(), listeners=[listener]
        )
        notify.setName("sdnotify")
        notify.setServiceParent(root)

    if options["metrics-addr"] is not None and workerOf is None:
        from etcdgw.status import StatusService

        web = StatusService(
            listenEndpoint(reactor, options["metrics-addr"], maxConnections=maxOperator),
            options["metrics-addr"],
            pool,
            factory,
            reactor,
            root,
            listeners=[listener],
        )
        web.setName("metrics")
        web.setServiceParent(root)
        factory.listeners = [listener, web]

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
