"""
The twistd plugin's body: C{etcd-gateway}'s flags (L{Options}) and
L{makeService}.

L{Options} parses and checks the flags into one frozen configuration value,
C{options.config} (L{etcdgw.config.GatewayConfig}), and does nothing else:
no name is resolved, no socket opened, no DNS asked (the listen address's
host name, the self-loop check's names and SRV discovery are the start's
business, L{etcdgw.gateway}). It reads and checks the PEM files the flags
name (bounded, L{etcdgw.tlsfiles}) and keeps their bytes in the
configuration. A bad value is a L{usage.UsageError} naming the flag; run by
twistd, one line and exit status 1.
"""

import ipaddress
import os
import sys

import attr
from twisted.python import usage

from etcdgw.config import (
    ClientCertificate,
    GatewayConfig,
    HealthConfig,
    HeldConfig,
    ListenConfig,
    PEMFile,
    SourceConfig,
    TakeoverConfig,
    TLSFiles,
    UpstreamTLSConfig,
    WorkersConfig,
)
from etcdgw.duration import DurationError, parseDuration
from etcdgw.endpoint import EndpointError, parseEndpoints, splitHostPort
from etcdgw.gateway import buildGateway
from etcdgw.listenaddr import (
    ENDPOINT_TYPES,
    ListenAddress,
    ListenError,
    isResolved,
    parseListenAddress,
    parseMode,
)
from etcdgw.pool import POLICIES
from etcdgw.selfloop import SelfLoopError, checkSelfLoop
from etcdgw.tlsfiles import TLSFileError, checkKeyPair, loadCertificates, readPEMFile
from etcdgw.fast import RELAY_IN_C

DEFAULT_ENDPOINTS = "127.0.0.1:2379"
DEFAULT_LISTEN = "127.0.0.1:23790"
#: etcd treats a retry delay of 0 as five minutes; so do we.
ZERO_RETRY_DELAY = 300.0
#: The largest --health-rise / --health-fall.
MAX_RISE_FALL = 1000
#: The --health-check values.
HEALTH_CHECKS = ("answer", "tcp", "etcd")
#: The defaults of --health-interval, --health-timeout and --health-fall,
#: which depend on --health-check: the answer probe is cheap and must find
#: a hung member within about 3 s (worst case interval + timeout +
#: fastinter + timeout = 2.25 s); the etcd check asks far more of the
#: cluster (in etcd 3.4, /health is a quorum read through the leader).
HEALTH_DEFAULTS = {
    "answer": {"health-interval": "1s", "health-timeout": "500ms", "health-fall": "2"},
    "tcp": {"health-interval": "1s", "health-timeout": "500ms", "health-fall": "2"},
    "etcd": {"health-interval": "5s", "health-timeout": "2s", "health-fall": "3"},
}
#: The defaults of --held-close-rate and --rebalance-rate, a second.
HELD_CLOSE_RATE = 100
REBALANCE_RATE = 5
#: The largest --held-close-rate and --rebalance-rate.
MAX_RATE = 1000000
#: The longest unix socket path (sun_path holds 108 bytes with the NUL).
MAX_SOCKET_PATH = 107
#: The largest --workers.
MAX_WORKERS = 256
#: The --upstream-tls values.
UPSTREAM_TLS = ("passthrough", "originate")
#: The flags that only mean something with --upstream-tls=originate.
ORIGINATE_FLAGS = ("cacert", "cert", "key", "insecure-skip-tls-verify", "originate-remote-clients")
#: The TLS flags of passthrough mode, which --cacert, --cert and --key
#: replace in originate mode (one set of settings for every connection).
PASSTHROUGH_TLS_FLAGS = (
    "trusted-ca-file",
    "health-cert-file",
    "health-key-file",
    "discovery-cert-file",
    "discovery-key-file",
)
#: The flags that only mean something with --discovery-srv.
DISCOVERY_FLAGS = ("discovery-dns", "discovery-refresh", "discovery-cert-file", "discovery-key-file")


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


# The converters of the flags (the fifth column of optParameters): each
# turns the text given into the flag's value, or raises a UsageError naming
# the flag.


def _duration(name, allowZero=True, zeroMeans=None):
    """
    The converter of the duration flag C{--name}: Go syntax, not negative
    (nor zero unless C{allowZero}), at most Go's longest duration; zero is
    C{zeroMeans} when given.
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
        if seconds == 0 and zeroMeans is not None:
            return zeroMeans
        return seconds

    return convert


def _integer(name, text, low, high):
    """
    The value of the number flag C{--name}: ASCII digits only (C{int} also
    takes C{" 1"}, C{"1_0"}, C{"\u0663"}) and from C{low} to C{high}.

    @raise usage.UsageError: naming the flag and the value.
    """
    value = None
    if text.isascii() and text.isdigit() and len(text.lstrip("0")) <= len(str(high)):
        value = int(text)
    if value is None or not low <= value <= high:
        shown = value if value is not None else _quoted(text)
        raise usage.UsageError(f"--{name}: {shown} is not a number from {low} to {high}")
    return value


def _number(name, low, high):
    """
    The converter of the number flag C{--name} (L{_integer}).
    """
    return lambda text: _integer(name, text, low, high)


def _share(text):
    """
    The converter of C{--max-silent-share}: a percentage from 0 to 100, with
    or without its C{%}.
    """
    digits = text[:-1] if text.endswith("%") else text
    try:
        return _integer("max-silent-share", digits, 0, 100)
    except usage.UsageError:
        raise usage.UsageError(
            f"--max-silent-share: {_quoted(text)} is not a percentage from 0 to 100 "
            "(e.g. 50 or 50%)"
        ) from None
def _choice(name, text, choices):
    """
    The value of C{--name}: one of C{choices}.
    """
    if text not in choices:
        raise usage.UsageError(f"--{name}: {_quoted(text)} is not {' or '.join(choices)}")
    return text


def _onOff(name):
    """
    The converter of the switch C{--name}: C{on} or C{off}, as a bool.
    """

    def convert(text):
        if text not in ("on", "off"):
            raise usage.UsageError(f"--{name}: {_quoted(text)} is not on or off")
        return text == "on"

    return convert


def _forward(text):
    """
    The converter of C{--forward} (issue 16): C{copy} (through the gateway,
    on io_uring where the kernel allows it, else epoll) or C{epoll} (the same,
    never io_uring: L{etcdgw.fast.ring}). C{kernel} (BPF
    sockmap redirect, L{etcdgw.fast.kernel}) is refused: on Linux 6.18 it
    lets a slow reader's writer fill kernel memory without bound, and wedges
    a socket that had bytes queued when it joined the map (README, "Kernel
    forwarding").
    """
    if text == "kernel":
        raise usage.UsageError(
            "--forward=kernel: not offered: the kernel's sockmap redirect does not slow "
            "a writer for a slow reader (1 GiB went into kernel memory in 2.5 s); see "
            "README, Kernel forwarding"
        )
    if text not in ("copy", "epoll"):
        raise usage.UsageError(f"--forward: {_quoted(text)} is not copy, epoll or kernel")
    return text


def _maxConnections(text):
    """
    The converter of C{--max-connections}: a number from 1 to 999999999.
    """
    digits = text.strip()
    if not digits.isascii() or not digits.isdigit() or len(digits.lstrip("0")) > 9:
        raise usage.UsageError(
            f'--max-connections: "{text[:40]}" is not a number from 1 to 999999999'
        )
    if int(digits) < 1:
        raise usage.UsageError(f'--max-connections: "{text}" must be at least 1')
    return int(digits)


def _socketPath(name):
    """
    The converter of a unix socket path flag (C{--control-socket},
    C{--takeover}): not empty, no NUL, short enough for a socket address.
    """

    def convert(text):
        if not text or "\0" in text:
            raise usage.UsageError(f"--{name}: {_quoted(text)} is not a path")
        if len(os.fsencode(text)) > MAX_SOCKET_PATH:
            raise usage.UsageError(
                f"--{name}: {_quoted(text)} is longer than a unix socket path may be "
                f"({MAX_SOCKET_PATH} bytes)"
            )
        return text

    return convert


def _listenMode(text):
    """
    The converter of C{--listen-mode}: an octal permission mode.
    """
    try:
        return parseMode(text, "--listen-mode:")
    except ListenError as e:
        raise usage.UsageError(str(e)) from None


def _unresolvedListenAddress(text):
    """
    L{parseListenAddress} without its look-up: the host of C{host:port}, if
    a name (or a scoped IPv6 literal), is kept as given, once checked to be
    one DNS can hold; the listener resolves it when it starts
    (L{etcdgw.gateway.ListenerService}).

    @raise ValueError: L{ListenError} naming C{text}, or idna's
        C{UnicodeError} for a name no DNS can hold.
    """
    text = text.strip()
    if text.split(":", 1)[0] not in ENDPOINT_TYPES:
        try:
            host, port = splitHostPort(
                text[1:] if text.startswith("*:") else text,
                what="listen address",
                allowEmptyHost=True,
                allowPortZero=True,
            )
        except EndpointError:
            pass  # parseListenAddress says why, before any look-up
        else:
            address = ListenAddress(text, host, port)
            if not isResolved(address):
                host.encode("idna")  # a label over 63 bytes, an empty one
                return address
    return parseListenAddress(text)


def _listenAddress(name):
    """
    The converter of the listen address flag C{--name}
    (L{_unresolvedListenAddress}).
    """

    def convert(text):
        try:
            address = _unresolvedListenAddress(text)
        except ValueError as e:  # ListenError, and idna's UnicodeError for a long name
            message = str(e) if isinstance(e, ListenError) else f"{_quoted(text)}: {e}"
            raise usage.UsageError(f"--{name}: {message}") from None
        if address.isTCP and not 0 <= address.port <= 65535:
            raise usage.UsageError(
                f"--{name}: {_quoted(text)}: port {address.port} is not in 0-65535"
            )
        return address

    return convert


# Checks and values that read several flags (postOptions).


def _pemFile(path, flag):
    """
    The L{PEMFile} of C{--flag}, read by L{etcdgw.tlsfiles} (a regular file
    of bounded size).

    @raise usage.UsageError: naming the flag and the file.
    """
    try:
        return PEMFile(flag, path, readPEMFile(path, flag))
    except TLSFileError as e:
        raise usage.UsageError(str(e)) from None


def _trustedCA(path):
    """
    C{--trusted-ca-file}: its L{PEMFile} and its certificates (at least
    one), or C{(None, ())} without it.

    @raise usage.UsageError: naming the flag and the file.
    """
    if path is None:
        return None, ()
    try:
        certificates = tuple(loadCertificates(path, "--trusted-ca-file"))
    except TLSFileError as e:
        raise usage.UsageError(str(e)) from None
    # Its bytes are kept too (read again, still while parsing).
    return _pemFile(path, "--trusted-ca-file"), certificates


def _clientCertificate(options, certFlag, keyFlag):
    """
    C{--certFlag} and C{--keyFlag}, checked as a client certificate and its
    key (the key read from the certificate file when C{--keyFlag} is not
    given): a L{ClientCertificate}, or L{None} when neither is given.

    @raise usage.UsageError: naming the flag and the file at fault.
    """
    if options[keyFlag] is not None and options[certFlag] is None:
        raise usage.UsageError(f"--{keyFlag} needs --{certFlag}")
    if options[certFlag] is None:
        return None
    try:
        checkKeyPair(options[certFlag], options[keyFlag], f"--{certFlag}", f"--{keyFlag}")
    except TLSFileError as e:
        raise usage.UsageError(str(e)) from None
    # tlsfiles checked the pair; their bytes are kept (read again, still
    # while parsing) so that nothing reads the files later.
    certificate = _pemFile(options[certFlag], f"--{certFlag}")
    if options[keyFlag] is None:
        return ClientCertificate(certificate, certificate)
    return ClientCertificate(certificate, _pemFile(options[keyFlag], f"--{keyFlag}"))


def _checkDomain(domain, serviceName):
    """
    Check C{--discovery-srv} (and C{--discovery-srv-name}) make DNS names
    that can be asked: no control characters or spaces, labels of at most 63
    bytes, names of at most 255.

    @raise usage.UsageError: naming the flag and the value.
    """
    # Optional and heavy (dnspython, pyOpenSSL): only with --discovery-srv.
    import dns.exception
    import dns.name

    from etcdgw.srv import serviceNames

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


def _literalAddresses(host, port):
    """
    L{etcdgw.selfloop.resolve} for IP literals only, with no look-up: the
    address C{host} is (IPv4-mapped ones unmapped, the scope dropped), or
    nothing for a host name.
    """
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return set()
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return {str(address)}


def _isLoopback(address):
    """
    Whether the literal C{address} is one of this machine's own without
    asking the kernel: a loopback address.
    """
    return ipaddress.ip_address(address).is_loopback


def _checkLiteralSelfLoop(listen, endpoints):
    """
    The self-loop check on what the flags say literally: an endpoint that is
    the listen address, or a loopback address when the gateway listens on
    every interface. (Names, and the other addresses of this machine, are
    checked when the gateway starts.)

    @raise usage.UsageError: naming the two flags.
    """
    try:
        checkSelfLoop(listen, endpoints, resolve=_literalAddresses, isLocal=_isLoopback)
    except SelfLoopError as e:
        raise usage.UsageError(f"--endpoints and --listen-addr: {e}") from None


def _isLocalListen(listen):
    """
    Whether only this machine can reach C{listen}: a unix socket, or TCP on
    a loopback address (or C{localhost}).
    """
    if listen.isUNIX:
        return True
    if not listen.isTCP:
        return False  # systemd: and other endpoint strings: unknown
    host = (listen.host or "").split("%", 1)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Options(usage.Options):
    """
    etcd's C{etcd gateway start} flags, with its defaults, and ours.

    @ivar config: the L{GatewayConfig} the flags make, once parsed.
    @ivar arguments: the command line, as given (what C{--workers} passes
        on to the workers).
    @ivar explicit: the flags given whose default matters when absent
        (C{"endpoints"}: the SRV discovery fallback).
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
        [
            "insecure-skip-tls-verify",
            None,
            "With --upstream-tls=originate: accept any member certificate, for any "
            "name (no verification at all; logged loudly at start). Never the default.",
        ],
        [
            "originate-remote-clients",
            None,
            "With --upstream-tls=originate: allow a --listen-addr that is not loopback "
            "or a unix socket (anyone who can connect then uses the gateway's client "
            "certificate).",
        ],
        [
            "rebalance",
            None,
            "Even out the client connections members hold (after a member returns, "
            "all sit on the others): the oldest of the most loaded member are closed, "
            "at most --rebalance-rate a second, until each member is within 20% of "
            "its share; the clients reconnect. Off by default.",
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
            _listenAddress("listen-addr"),
        ],
        [
            "listen-mode",
            None,
            None,
            "Permissions of the socket file of a unix: --listen-addr (octal) "
            "[default: 0660: its owner and group may connect, nobody else].",
            _listenMode,
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
            _maxConnections,
        ],
        [
            "retry-delay",
            None,
            "1m0s",
            "How often endpoints that are down are probed with a TCP connect, with "
            "--health-check=tcp or etcd (Go duration: 300ms, 1m0s, 1.5h; 0 means 5m, as "
            "etcd). With --health-check=answer every member is probed every "
            "--health-interval instead.",
            _duration("retry-delay", zeroMeans=ZERO_RETRY_DELAY),
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
            "answer",
            "answer: every member, up or down, is asked GET /version (over TLS for "
            "https members) every --health-interval on a kept connection; one that "
            "accepts TCP but answers nothing (hung, frozen) is silent and gets no new "
            "connections (about 2 s with the defaults, 3 s at worst). tcp: a member is "
            "used while it accepts TCP; those down are probed every --retry-delay (as "
            "etcd's gateway). etcd: ask every member /health (/readyz where served) and "
            "its cluster ID every --health-interval; unhealthy, silent or foreign members "
            "get no new connections.",
        ],
        [
            "health-interval",
            None,
            None,
            "How often every member is probed (Go duration) [default: 1s; 5s with "
            "--health-check=etcd].",
            _duration("health-interval", allowZero=False),
        ],
        [
            "health-timeout",
            None,
            None,
            "How long one probe's answer may take, its connect included (Go duration) "
            "[default: 500ms; 2s with --health-check=etcd].",
            _duration("health-timeout", allowZero=False),
        ],
        [
            "health-fastinter",
            None,
            "250ms",
            "While a member's probes disagree with its state (a miss while it answers, "
            "an answer while it is silent), the next probe comes this long after the "
            "last one, not a whole --health-interval (HAProxy's fastinter; Go duration).",
            _duration("health-fastinter", allowZero=False),
        ],
        [
            "health-rise",
            None,
            "2",
            f"Good answers in a row that make a member healthy, or no longer silent (1 to "
            f"{MAX_RISE_FALL}).",
            _number("health-rise", 1, MAX_RISE_FALL),
        ],
        [
            "health-fall",
            None,
            None,
            f"Probes in a row without an answer that make a member silent, bad etcd "
            f"answers that make it unhealthy (1 to {MAX_RISE_FALL}) [default: 2; 3 with "
            f"--health-check=etcd].",
            _number("health-fall", 1, MAX_RISE_FALL),
        ],
        [
            "max-silent-share",
            None,
            "50%",
            "At most this share of the members is silent at once, at least one (Envoy's "
            "max_ejection_percent): a member whose silence would pass it stays in use, "
            "'answering slowly', so members that are merely slow are not all emptied "
            "onto the rest. 50%: 1 of 3, 2 of 5, the most an etcd cluster can lose and "
            "keep its quorum. Members that refuse connections are down, not silent, "
            "and do not count.",
            _share,
        ],
        [
            "held-close",
            None,
            "on",
            "on: when a member goes down, unhealthy, silent, leaves the endpoint list "
            "or shows another cluster ID, the client connections it holds are closed "
            "with a reset (paced, never while no other member is usable), so clients "
            "reconnect to a good member at once. off: they stay until they end.",
            _onOff("held-close"),
        ],
        [
            "held-close-rate",
            None,
            None,
            f"At most this many held connections closed a second, jittered (1 to "
            f"{MAX_RATE}) [default: {HELD_CLOSE_RATE}].",
            _number("held-close-rate", 1, MAX_RATE),
        ],
        [
            "rebalance-rate",
            None,
            None,
            f"With --rebalance, at most this many connections moved a second (1 to "
            f"{MAX_RATE}) [default: {REBALANCE_RATE}].",
            _number("rebalance-rate", 1, MAX_RATE),
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
            "forward",
            None,
            "copy",
            "How bytes go from one socket of a pair to the other: copy (through the "
            "gateway: io_uring where the kernel allows it, else epoll and a C step; "
            "splice(2) for bulk), or epoll (the same without io_uring). kernel (BPF "
            "sockmap redirect) is refused: it does not keep backpressure (README, "
            "Kernel forwarding).",
            _forward,
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
            _listenAddress("metrics-addr"),
        ],
        [
            "upstream-tls",
            None,
            "passthrough",
            "passthrough: TLS from clients passes through to the members untouched "
            "(etcd's gateway). originate: clients speak plaintext to the gateway (on "
            "loopback or a unix socket), the gateway speaks TLS to the members, "
            "verified with --cacert, presenting --cert/--key; ALPN h2 or http/1.1 "
            "chosen per connection from the client's first bytes.",
            lambda text: _choice("upstream-tls", text, UPSTREAM_TLS),
        ],
        [
            "cacert",
            None,
            None,
            "With --upstream-tls=originate: PEM CA bundle members' certificates must "
            "chain to (default: the system's trust store); SIGHUP reads it again.",
        ],
        [
            "cert",
            None,
            None,
            "With --upstream-tls=originate: PEM client certificate presented to the "
            "members (for --client-cert-auth); SIGHUP reads it again.",
        ],
        [
            "key",
            None,
            None,
            "Private key of --cert (default: read from that file); SIGHUP reads it again.",
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
        [
            "control-socket",
            None,
            None,
            "Listen on this unix socket (mode 0600) for a new gateway started with "
            "--takeover=PATH, which then takes over every listener and live connection "
            "(README: Upgrades and restarts). Off by default.",
            _socketPath("control-socket"),
        ],
        [
            "takeover",
            None,
            None,
            "Take the listeners and every live connection over from the running gateway "
            "whose --control-socket is PATH, then serve with this command line's flags; "
            "it exits once this one has them. Exit 1, and the running one keeps "
            "serving, if that fails.",
            _socketPath("takeover"),
        ],
    ]

    def __init__(self):
        super().__init__()
        self.explicit = set()
        self.arguments = []
        self.config = None
        self["workers"] = 1
        self["worker-of"] = None
        # Each default given as text is converted once, here, by its flag's
        # own converter: a flag's value is typed whether given or not.
        for name, _, default, _, *convert in self.optParameters:
            if convert and isinstance(default, str):
                self[name] = convert[0](default)

    def parseOptions(self, options=None):
        if options is None:
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
            sys.stderr.write(
                f"etcd-gateway: error: {_oneLine(str(e))} (see: twistd etcd-gateway --help)\n"
            )
            raise SystemExit(1)
        except Exception as e:
            if self.parent is None:
                raise
            # A parser bug (the flag fuzzer hunts them): still one line and
            # status 1, not a traceback, but saying it is a bug.
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

        from etcdgw.fast import ring

        relay = "forwarding step in C" if RELAY_IN_C else "forwarding in pure Python"
        # Built or not; whether the kernel allows it is known at the first turn.
        uring = "io_uring step built" if ring.available() is None else ring.available()
        print(f"etcd-gateway {__version__} ({relay}; {uring})")
        raise SystemExit(0)

    def postOptions(self):
        """
        Check what needs several flags, and make L{config}. The checks run
        in the order they always did (the PEM files before the discovery
        flags); none looks anything up.
        """
        try:
            endpoints = tuple(parseEndpoints(self["endpoints"]))
        except EndpointError as e:
            raise usage.UsageError(f"--endpoints: {e}") from None
        listen = self._listen()
        upstreamTLS = self._upstreamTLS(listen.address)
        if upstreamTLS.originate:
            # Every member is spoken to over TLS: the health checks too.
            endpoints = tuple(attr.evolve(e, tls=True) for e in endpoints)
        trustedCA, caCertificates = _trustedCA(self["trusted-ca-file"])
        if self["discovery-srv"] is not None and self["sync-interval"]:
            raise usage.UsageError(
                "--sync-interval and --discovery-srv both set the endpoints: use one or "
                "the other"
            )
        if self["discovery-srv-name"] is not None and self["discovery-srv"] is None:
            raise usage.UsageError("--discovery-srv-name needs --discovery-srv")
        health = self._health()
        healthClient = _clientCertificate(self, "health-cert-file", "health-key-file")
        discoveryClient, discovery = self._discovery(trustedCA)
        workers = self._workers(listen.address)
        source = SourceConfig(
            endpoints,
            explicit="endpoints" in self.explicit,
            discovery=discovery,
            syncInterval=self["sync-interval"],
        )
        if discovery is None:  # discovered endpoints are checked when found
            _checkLiteralSelfLoop(listen.address, endpoints)
        self.config = GatewayConfig(
            source=source,
            listen=listen,
            health=health,
            held=self._held(),
            metrics=self["metrics-addr"],
            dialTimeout=self["dial-timeout"],
            policy=self["policy"],
            tls=TLSFiles(trustedCA, caCertificates, healthClient, discoveryClient),
            shutdownGrace=self["shutdown-grace"],
            workers=workers,
            upstreamTLS=upstreamTLS,
            forward=self["forward"],
            takeover=self._takeover(workers),
        )

    def _listen(self):
        """
        The L{ListenConfig}: C{--listen-addr} with C{--listen-mode} and
        C{--max-connections}.
        """
        address = self["listen-addr"]
        mode = self["listen-mode"]
        if mode is not None:
            if not address.isUNIX:
                raise usage.UsageError(
                    "--listen-mode needs a unix: --listen-addr (it sets the socket file's "
                    "permissions)"
                )
            if address.mode is not None:
                raise usage.UsageError(
                    "--listen-mode: the --listen-addr string gives mode= already; give it once"
                )
        return ListenConfig(address, mode, self["max-connections"])

    def _upstreamTLS(self, listen):
        """
        The L{UpstreamTLSConfig}: C{--upstream-tls} and, in originate mode,
        C{--cacert}, C{--cert}, C{--key}, C{--insecure-skip-tls-verify}, and
        the listen address's check (loopback or a unix socket unless
        C{--originate-remote-clients}).
        """
        if self["upstream-tls"] != "originate":
            for flag in ORIGINATE_FLAGS:
                if self[flag]:
                    raise usage.UsageError(f"--{flag} needs --upstream-tls=originate")
            return UpstreamTLSConfig()
        for flag in PASSTHROUGH_TLS_FLAGS:
            if self[flag] is not None:
                raise usage.UsageError(
                    f"--{flag}: with --upstream-tls=originate, --cacert, --cert and --key "
                    "are the TLS settings of every member connection (health checks, "
                    "member sync and discovery included): give those instead"
                )
        if not self["originate-remote-clients"] and not _isLocalListen(listen):
            raise usage.UsageError(
                f"--listen-addr: {_quoted(str(listen))} is not a loopback address or a unix "
                "socket: with --upstream-tls=originate anyone who can connect uses the "
                "gateway's TLS client certificate (give --originate-remote-clients to "
                "allow it)"
            )
        ca = None
        if self["cacert"] is not None:
            try:
                loadCertificates(self["cacert"], "--cacert")
            except TLSFileError as e:
                raise usage.UsageError(str(e)) from None
            ca = _pemFile(self["cacert"], "--cacert")
        config = UpstreamTLSConfig(
            mode="originate",
            ca=ca,
            client=_clientCertificate(self, "cert", "key"),
            insecure=bool(self["insecure-skip-tls-verify"]),
            remoteClients=bool(self["originate-remote-clients"]),
        )
        from etcdgw.tls import TLSSettingsError

        try:
            config.settings()  # what OpenSSL makes of the bytes, checked now
        except TLSSettingsError as e:
            raise usage.UsageError(f"--cacert/--cert/--key: {e}") from None
        return config

    def _health(self):
        """
        The L{HealthConfig}: --retry-delay, --health-check and its timing,
        and the pick --policy.
        """
        if self["policy"] not in POLICIES:
            raise usage.UsageError(
                f'--policy: "{self["policy"]}" is not one of {", ".join(POLICIES)}'
            )
        check = self["health-check"]
        if check not in HEALTH_CHECKS:
            raise usage.UsageError(
                f"--health-check: {_quoted(check)} is not answer, tcp or etcd"
            )
        defaults = HEALTH_DEFAULTS[check]
        interval = self._orDefault("health-interval", defaults)
        timeout = self._orDefault("health-timeout", defaults)
        fastinter = self["health-fastinter"]
        return HealthConfig(
            retryDelay=self["retry-delay"],
            check=check,
            interval=interval,
            timeout=timeout,
            rise=self["health-rise"],
            fall=self._orDefault("health-fall", defaults),
            fastinter=fastinter,
            maxSilentShare=self["max-silent-share"],
        )

    def _orDefault(self, name, defaults):
        """
        The value of C{--name}, or its default for the --health-check given
        (L{HEALTH_DEFAULTS}), converted by the flag's own converter.
        """
        if self[name] is not None:
            return self[name]
        for flag, _, _, _, convert in (p for p in self.optParameters if len(p) > 4):
            if flag == name:
                return convert(defaults[name])
        raise KeyError(name)
    def _held(self):
        """
        The L{HeldConfig}: --held-close and its rate, --rebalance and its
        rate.
        """
        if self["held-close-rate"] is not None and not self["held-close"]:
            raise usage.UsageError("--held-close-rate needs --held-close=on")
        if self["rebalance-rate"] is not None and not self["rebalance"]:
            raise usage.UsageError("--rebalance-rate needs --rebalance")
        return HeldConfig(
            close=self["held-close"],
            closeRate=self["held-close-rate"] or HELD_CLOSE_RATE,
            rebalance=bool(self["rebalance"]),
            rebalanceRate=self["rebalance-rate"] or REBALANCE_RATE,
        )

    def _discovery(self, trustedCA):
        """
        C{--discovery-srv} and its flags: C{(client certificate,
        L{etcdgw.srv.DiscoveryConfig})}, or C{(None, None)} without
        it. Nothing is looked up: the first round runs when the gateway
        starts.
        """
        if self["discovery-srv"] is None:
            for flag in DISCOVERY_FLAGS:
                if self[flag] is not None:
                    raise usage.UsageError(f"--{flag} needs --discovery-srv")
            return None, None
        # Optional and heavy (pyOpenSSL): only with --discovery-srv.
        from etcdgw.srv import DiscoveryConfig, parseNameserver

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
        client = _clientCertificate(self, "discovery-cert-file", "discovery-key-file")
        # What the validation handshakes trust and present, from the bytes
        # read here: nothing re-reads the files.
        trust = TLSFiles(trustedCA).clientTLS(client)
        return client, DiscoveryConfig(
            domain=self["discovery-srv"],
            serviceName=self["discovery-srv-name"],
            insecure=bool(self["insecure-discovery"]),
            trust=trust,
            nameserver=nameserver,
            refresh=self["discovery-refresh"],
        )

    def _workers(self, listen):
        """
        The L{WorkersConfig}: --workers above 1 needs a TCP --listen-addr
        with a fixed port.
        """
        if self["workers"] > 1 and not (listen.isTCP and listen.port):
            raise usage.UsageError(
                "--workers above 1 needs a TCP --listen-addr with a fixed port "
                "(the workers share it with SO_REUSEPORT)"
            )
        return WorkersConfig(self["workers"], self["worker-of"], tuple(self.arguments))


    def _takeover(self, workers, environ=None):
        """
        The L{TakeoverConfig}: C{--control-socket}, and what to take over
        from: C{--takeover}'s path, or the descriptor C{$ETCDGW_TAKEOVER_FD}
        names (a successor started by SIGUSR2).
        """
        from etcdgw.takeover import ENVIRONMENT_FD, ENVIRONMENT_FROM, ENVIRONMENT_HOLD

        environ = os.environ if environ is None else environ
        fd = None
        text = environ.get(ENVIRONMENT_FD)
        if text is not None:
            if not (text.isascii() and text.isdigit() and 3 <= int(text) < 2**20):
                raise usage.UsageError(
                    f"${ENVIRONMENT_FD}: {_quoted(text)} is not a descriptor number"
                )
            fd = int(text)
            if self["takeover"] is not None:
                raise usage.UsageError(
                    f"--takeover and ${ENVIRONMENT_FD} both name what to take over from"
                )
        path, hold = self["takeover"], False
        if workers.workerOf is not None:
            for flag in ("takeover", "control-socket"):
                if self[flag] is not None:
                    raise usage.UsageError(f"--{flag} is the supervisor's, not a worker's")
            # A worker started by a successor supervisor takes over from a
            # worker of the old one (etcdgw.takeover, --workers).
            path = environ.get(ENVIRONMENT_FROM) or None
            hold = path is not None and environ.get(ENVIRONMENT_HOLD) == "1"
        return TakeoverConfig(
            controlSocket=self["control-socket"], path=path, fd=fd, hold=hold
        )


def makeService(options, reactor=None):
    """
    The gateway's service tree, built from the parsed flags
    (L{etcdgw.gateway.buildGateway}).

    @param reactor: the reactor to use; by default the process's own, whose
        signals and event dispatch the gateway then takes over when it
        starts.
    """
    gateway = buildGateway(options.config, reactor)
    return gateway.service
