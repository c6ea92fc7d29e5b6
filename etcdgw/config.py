"""
The gateway's configuration: one frozen value, L{GatewayConfig}, holding
what the flags say once parsed and checked, in small frozen parts.

L{etcdgw.tap.Options} makes it (C{options.config}) and nothing else writes
it; L{etcdgw.gateway.buildGateway} builds the gateway from it. Making it
does no network I/O: host names are kept as given (a listen address's is
resolved when its listener starts, members' by the self-loop check at start
and at each dial), and SRV discovery asks DNS when the gateway starts. The
PEM files the flags name are read once, when the
flags are parsed (L{etcdgw.tlsfiles}), and their bytes are kept here
(L{PEMFile}).
"""

import attr


@attr.s(frozen=True, slots=True, auto_attribs=True)
class PEMFile:
    """
    A PEM file a flag names, as read when the flags were parsed.

    @ivar flag: the flag, e.g. C{"--trusted-ca-file"}.
    @ivar path: the file's name, as given.
    @ivar data: its bytes (at most L{etcdgw.tlsfiles.MAX_BYTES}).
    """

    flag: str
    path: str
    data: bytes = attr.ib(repr=False)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ClientCertificate:
    """
    A client certificate and its private key, checked as a pair.

    @ivar certificate: the L{PEMFile} of the certificate.
    @ivar key: the L{PEMFile} of the key: the certificate's own file when
        the key flag was not given (it holds both).
    """

    certificate: PEMFile
    key: PEMFile


@attr.s(frozen=True, slots=True, auto_attribs=True)
class TLSFiles:
    """
    The PEM files of C{--trusted-ca-file}, C{--health-cert-file} (and
    key) and C{--discovery-cert-file} (and key); L{None} where not given.

    @ivar trustedCA: the CA bundle's L{PEMFile}.
    @ivar caCertificates: its certificates (C{cryptography} objects), in
        file order; empty without C{--trusted-ca-file}.
    @ivar health: the etcd HTTP client's L{ClientCertificate}.
    @ivar discovery: the validation handshake's L{ClientCertificate}.
    """

    trustedCA: PEMFile = None
    caCertificates: tuple = ()
    health: ClientCertificate = None
    discovery: ClientCertificate = None

    def clientTLS(self, client=None):
        """
        The L{etcdgw.tls.ClientTLS} trusting C{--trusted-ca-file} (the
        platform's store without it) and presenting C{client}'s certificate
        (a L{ClientCertificate}, or L{None}), from the bytes read at parse
        time: nothing re-reads a file.
        """
        from etcdgw.tls import ClientTLS

        return ClientTLS(
            self.trustedCA.data if self.trustedCA is not None else None,
            client.certificate.data if client is not None else None,
            client.key.data if client is not None else None,
        )

    @property
    def etcdClient(self):
        """
        The client certificate of etcd health checks and member-list reads:
        C{--health-cert-file}'s, else C{--discovery-cert-file}'s, else
        L{None}.
        """
        return self.health if self.health is not None else self.discovery


@attr.s(frozen=True, slots=True, auto_attribs=True, kw_only=True)
class UpstreamTLSConfig:
    """
    C{--upstream-tls} and the TLS settings of origination.

    @ivar mode: C{"passthrough"} (clients speak TLS to the members through
        the gateway, untouched; the default) or C{"originate"} (clients speak
        plaintext; the gateway speaks TLS to the members).
    @ivar ca: C{--cacert}'s L{PEMFile}, or L{None} (the system store).
    @ivar client: the L{ClientCertificate} of C{--cert}/C{--key}, or
        L{None}.
    @ivar insecure: C{--insecure-skip-tls-verify}.
    @ivar remoteClients: C{--originate-remote-clients}: a listen address
        that is not loopback is allowed in originate mode.
    """

    mode: str = "passthrough"
    ca: PEMFile = None
    client: ClientCertificate = None
    insecure: bool = False
    remoteClients: bool = False

    @property
    def originate(self):
        return self.mode == "originate"

    def settings(self):
        """
        The L{etcdgw.originate.UpstreamTLS} made from the bytes read at
        parse time (which SIGHUP reads again from the same paths).
        """
        from etcdgw.originate import UpstreamTLS

        return UpstreamTLS(self.ca, self.client, self.insecure)


@attr.s(frozen=True, slots=True, auto_attribs=True)
class SourceConfig:
    """
    Where the endpoints come from: exactly one source.

      - static: C{--endpoints} (or its default), as given;
      - SRV discovery (C{--discovery-srv}): C{discovery} is set; the
        endpoints are found when the gateway starts, C{--endpoints} (when
        given) is the fallback;
      - the member list (C{--sync-interval} above 0): C{--endpoints} are
        the seeds.

    @ivar endpoints: the parsed C{--endpoints}, a tuple of
        L{etcdgw.endpoint.Endpoint}.
    @ivar explicit: whether C{--endpoints} was given (not the default).
    @ivar discovery: an L{etcdgw.srv.DiscoveryConfig}, or L{None}.
    @ivar syncInterval: seconds between member-list reads; 0 is off.
    """

    endpoints: tuple
    explicit: bool = False
    discovery: object = None
    syncInterval: float = 0.0

    @property
    def fallback(self):
        """
        What SRV discovery falls back to when it proves nothing: the
        explicit C{--endpoints}, or nothing.
        """
        return self.endpoints if self.explicit else ()


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ListenConfig:
    """
    Where clients connect.

    @ivar address: the parsed C{--listen-addr}
        (L{etcdgw.listenaddr.ListenAddress}); a host name in it is resolved when
        the listener starts.
    @ivar mode: C{--listen-mode}, or L{None}.
    @ivar maxConnections: C{--max-connections}, or L{None} (the cap then
        follows the open-files limit).
    """

    address: object
    mode: int = None
    maxConnections: int = None


@attr.s(frozen=True, slots=True, auto_attribs=True, kw_only=True)
class HealthConfig:
    """
    How members are judged.

    @ivar retryDelay: seconds between TCP probes of members that are down
        (C{--retry-delay}; 0 was turned into etcd's five minutes), with
        C{--health-check=tcp} or C{etcd}.
    @ivar check: C{"answer"}, C{"tcp"} or C{"etcd"} (C{--health-check}).
    @ivar interval: C{--health-interval}, seconds (its default follows
        C{check}).
    @ivar timeout: C{--health-timeout}, seconds (its default follows
        C{check}).
    @ivar rise: C{--health-rise}.
    @ivar fall: C{--health-fall} (its default follows C{check}).
    @ivar fastinter: C{--health-fastinter}, seconds.
    @ivar maxSilentShare: C{--max-silent-share}, a percentage.
    """

    retryDelay: float
    check: str
    interval: float
    timeout: float
    rise: int
    fall: int
    fastinter: float
    maxSilentShare: int


@attr.s(frozen=True, slots=True, auto_attribs=True, kw_only=True)
class HeldConfig:
    """
    What is done with the client connections a member holds
    (L{etcdgw.connections.ConnectionRegistry}).

    @ivar close: close them, paced, when their member goes bad
        (C{--held-close}).
    @ivar closeRate: at most this many a second (C{--held-close-rate}).
    @ivar rebalance: even out their spread over the members
        (C{--rebalance}).
    @ivar rebalanceRate: at most this many moved a second
        (C{--rebalance-rate}).
    """

    close: bool
    closeRate: int
    rebalance: bool
    rebalanceRate: int


@attr.s(frozen=True, slots=True, auto_attribs=True)
class WorkersConfig:
    """
    C{--workers} and C{--worker-of}.

    @ivar count: processes sharing the listening port, this one included.
    @ivar workerOf: the supervisor's pid when this process is a worker,
        else L{None}.
    @ivar arguments: the plugin's command line, as given (what the
        workers are started with).
    """

    count: int = 1
    workerOf: int = None
    arguments: tuple = ()


@attr.s(frozen=True, slots=True, auto_attribs=True, kw_only=True)
class TakeoverConfig:
    """
    Live takeover (L{etcdgw.takeover}).

    @ivar controlSocket: C{--control-socket}: the unix socket a successor
        started with C{--takeover} connects to, or L{None}.
    @ivar path: C{--takeover}: take over from the gateway listening on this
        control socket, or L{None}.
    @ivar fd: the inherited descriptor of a successor started by SIGUSR2
        (C{$ETCDGW_TAKEOVER_FD}), or L{None}.
    @ivar hold: a worker started by a successor supervisor (C{--workers}):
        once it has adopted, it waits for the supervisor's go.
    """

    controlSocket: str = None
    path: str = None
    fd: int = None
    hold: bool = False

    @property
    def successor(self):
        """
        This process takes over from a running gateway.
        """
        return self.path is not None or self.fd is not None


@attr.s(frozen=True, slots=True, auto_attribs=True, kw_only=True)
class GatewayConfig:
    """
    Everything the flags say, parsed and checked. Every field is given: the
    flags' defaults are the only ones (L{etcdgw.tap.Options}).

    @ivar source: the L{SourceConfig}.
    @ivar listen: the L{ListenConfig}.
    @ivar metrics: the parsed C{--metrics-addr}
        (L{etcdgw.listenaddr.ListenAddress}), or L{None}.
    @ivar dialTimeout: C{--dial-timeout}, seconds.
    @ivar policy: C{--policy}, a name of L{etcdgw.pool.POLICIES}.
    @ivar health: the L{HealthConfig}.
    @ivar held: the L{HeldConfig}.
    @ivar tls: the L{TLSFiles}.
    @ivar shutdownGrace: C{--shutdown-grace}, seconds.
    @ivar workers: the L{WorkersConfig}.
    @ivar upstreamTLS: the L{UpstreamTLSConfig}.
    @ivar takeover: the L{TakeoverConfig}.
    @ivar forward: C{--forward}: C{"copy"} (io_uring where the kernel
        allows it, else epoll) or C{"epoll"} (never io_uring); see
        L{etcdgw.fast.kernel} for C{kernel}, refused.
    """

    source: SourceConfig
    listen: ListenConfig
    health: HealthConfig
    held: HeldConfig
    metrics: object
    dialTimeout: float
    policy: str
    tls: TLSFiles
    shutdownGrace: float
    workers: WorkersConfig
    upstreamTLS: UpstreamTLSConfig = UpstreamTLSConfig()
    forward: str = "copy"
    takeover: TakeoverConfig = TakeoverConfig()
