"""
The gateway, built from its configuration: one L{Gateway} object holding
every part (the pool, the proxy factory, the listeners, the endpoint
source, the health checks, shutdown, signals, systemd notification,
workers, the operator's HTTP address) and the service tree twistd runs.

L{buildGateway} builds it from an L{etcdgw.config.GatewayConfig} in small
named steps. Building does no I/O and changes nothing process-wide. The
work that needs the network or the process is done when the tree starts
(L{GatewayService}, under twistd before the reactor runs), in this order:
the process's own reactor gets the lean event dispatch; SRV discovery's
first round finds the endpoints; the self-loop check resolves the names it
needs; each listener resolves its host name, then listens. A failure there
is one line on standard error and exit status 1 (L{StartError}).

The parts never look each other up by name: a part that reads another is
given it, or given the L{Gateway} (metrics, the status page, SIGHUP).
"""

import os
import resource
import signal

import attr
from twisted.application.service import MultiService
from twisted.logger import Logger

from etcdgw import fast
from etcdgw.connections import ConnectionRegistry
from etcdgw.duration import formatDuration
from etcdgw.health import HealthService, guardedProbe
from etcdgw.listen import (
    ListeningService,
    _stderrLine,  # the line a listener that cannot listen writes, too
    descriptorBudget,
    describeListenError,
    listenEndpoint,
)
from etcdgw.listenaddr import isResolved, parseListenAddress
from etcdgw.pool import UpstreamPool
from etcdgw.proxy import GatewayFactory
from etcdgw.sdnotify import SystemdNotifier, SystemdNotifyService, watchdogInterval
from etcdgw.monitor import Monitor
from etcdgw.selfloop import SelfLoopError, SelfLoopGuard
from etcdgw.shutdown import DrainService
from etcdgw.signals import ReloadService
from etcdgw.sources import StaticEndpoints
from etcdgw.workers import SupervisorWatch, WorkersService

log = Logger(namespace="etcdgw")


class StartError(SystemExit, Exception):
    """
    The gateway cannot start; the line saying why was written on standard
    error (L{failStart}). The process exits with status 1.

    A L{SystemExit}, so the exit shows no traceback; an L{Exception} too,
    because twistd catches C{Exception} around the start to remove its
    pidfile first (and, daemonized, to pass the line to its parent).
    """

    def __init__(self, message):
        super().__init__(1)
        self.message = message

    def __str__(self):
        return self.message


def failStart(message):
    """
    End the start: C{message} logged, written on standard error as one line
    (C{etcd-gateway: error: ...}), exit status 1.

    @raise StartError: always.
    """
    log.critical("{message}", message=message)
    _stderrLine(f"etcd-gateway: error: {message}")
    raise StartError(message)


class ListenerService(ListeningService):
    """
    One of the gateway's listeners (the clients' or the operator's). When it
    starts, a host name in its address is resolved, then it listens (when
    either fails, one line and exit status 1: L{failStart}); once
    listening, C{announce(self)} is called.

    @param endpointOptions: keywords of L{listenEndpoint} (C{reusePort},
        C{maxConnections}, C{mode}).
    """

    def __init__(self, reactor, address, factory, flag, announce, takeover=None,
                 **endpointOptions):
        self._reactor = reactor
        self._endpointOptions = endpointOptions
        self._announce = announce
        self._takeover = takeover
        self._flag = flag
        super().__init__(self._endpointFor(address), factory, address, flag)

    def _endpointFor(self, address):
        endpoint = listenEndpoint(self._reactor, address, **self._endpointOptions)
        if self._takeover is not None:
            # A successor: the running gateway's socket for this flag and
            # address, if it has one (etcdgw.takeover).
            options = {
                name: value
                for name, value in self._endpointOptions.items()
                if name in ("maxConnections", "fast")
            }
            endpoint = self._takeover.endpoint(self._flag, address, endpoint, **options)
        return endpoint

    def privilegedStartService(self):
        if not isResolved(self.address):
            try:
                self.address = parseListenAddress(self.address.text)
            except ValueError as e:  # ListenError: the name does not resolve
                failStart(f"{self.flag}: {e}")
            self.endpoint = self._endpointFor(self.address)
        super().privilegedStartService()

    def cannotListen(self, e):
        # ListeningService's line, through failStart: twistd's pidfile goes.
        failStart(f"{self.flag}: cannot listen on {self.address}: {describeListenError(e)}")

    def listening(self, port):
        self._announce(self)


class GatewayService(MultiService):
    """
    The root of the gateway's service tree: before any child starts, it
    runs the gateway's start-up work (C{startUp}, L{Gateway.startUp}) once,
    from L{privilegedStartService} under twistd (the reactor is not running
    yet), or from L{startService} when that is called alone.
    """

    def __init__(self, startUp):
        super().__init__()
        self._startUp = startUp
        self._started = False

    def _startUpOnce(self):
        if not self._started:
            self._started = True
            self._startUp()

    def privilegedStartService(self):
        self._startUpOnce()
        super().privilegedStartService()

    def startService(self):
        self._startUpOnce()
        super().startService()


@attr.s(auto_attribs=True, kw_only=True, eq=False)
class Gateway:
    """
    One gateway's parts. L{buildGateway} sets each once, except
    L{discovery}, which the start sets (SRV discovery's first round gives
    it its endpoints). Parts that are off are L{None}.

    @ivar reactor: the reactor every part uses.
    @ivar pool: the L{etcdgw.pool.UpstreamPool}: the endpoints and their
        decided state.
    @ivar monitor: the L{etcdgw.monitor.Monitor}: the one judge of endpoint
        state (dial results, probes and etcd checks are its evidence); its
        subscribers hear each change.
    @ivar guard: the L{etcdgw.selfloop.SelfLoopGuard}.
    @ivar factory: the L{etcdgw.proxy.GatewayFactory}.
    @ivar connections: the L{etcdgw.connections.ConnectionRegistry}: the
        live forwarded pairs, closed when their member goes bad (and
        rebalanced with C{--rebalance}); it follows the monitor.
    @ivar config: the L{etcdgw.config.GatewayConfig} it was built from.
    @ivar ownProcess: built on the process's own reactor (twistd's): the
        gateway takes over its signals and event dispatch when it starts.
    @ivar service: the root of the service tree, a L{GatewayService}.
    @ivar listener: the clients' L{ListenerService}.
    @ivar web: the operator's L{ListenerService} (C{--metrics-addr}).
    @ivar health: the probes: with C{--health-check=answer}, the answer
        probes of every member (L{etcdgw.answer.AnswerService}); otherwise
        the TCP probes of members that are down
        (L{etcdgw.health.HealthService}).
    @ivar etcdHealth: the etcd checks (C{--health-check=etcd}).
    @ivar membership: the member-list sync (C{--sync-interval}).
    @ivar discovery: the SRV re-resolution (C{--discovery-srv}), from the
        start on.
    @ivar source: the one endpoint source (L{etcdgw.sources.IEndpointSource}):
        the static C{--endpoints}, L{membership}, or, from the start on,
        L{discovery}. SIGHUP, metrics and the status page use it.
    @ivar drain: the L{DrainService} (SIGTERM, SIGINT).
    @ivar reload: the L{ReloadService} (SIGHUP).
    @ivar workers: the L{WorkersService} (C{--workers} above 1).
    @ivar supervisorWatch: the L{SupervisorWatch} of a worker.
    @ivar notify: the L{SystemdNotifyService} (C{$NOTIFY_SOCKET}).
    @ivar takeover: in a successor (C{--takeover}, or started by SIGUSR2),
        the L{etcdgw.takeover.Takeover} taking over from the running
        gateway; else L{None}.
    @ivar takeovers: the L{etcdgw.takeover.TakeoverService}: SIGUSR2 and
        C{--control-socket}.
    @ivar upstreamTLS: the L{etcdgw.originate.UpstreamTLS} of
        C{--upstream-tls=originate} (every member connection's TLS
        settings; SIGHUP reads its files again), else L{None}.
    """

    reactor: object
    pool: object
    factory: object
    monitor: object = None
    guard: object = None
    connections: object = None
    config: object = None
    ownProcess: bool = False
    service: object = None
    listener: object = None
    web: object = None
    health: object = None
    etcdHealth: object = None
    membership: object = None
    discovery: object = None
    source: object = attr.ib(
        default=attr.Factory(lambda self: StaticEndpoints(self.pool.endpoints), takes_self=True)
    )
    drain: object = None
    reload: object = None
    workers: object = None
    supervisorWatch: object = None
    notify: object = None
    upstreamTLS: object = None
    takeover: object = None
    takeovers: object = None

    @property
    def listeners(self):
        """
        The clients' listeners.
        """
        return [self.listener] if self.listener is not None else []

    @property
    def allListeners(self):
        """
        Every listener: the clients', then the operator's. A member
        connection that reaches one of them is a self-loop.
        """
        return self.listeners + ([self.web] if self.web is not None else [])

    def startUp(self):
        """
        The start's work, before any part starts (L{GatewayService}): on the
        process's own reactor, the lean event dispatch; with
        C{--discovery-srv}, the first round (blocking, every look-up and
        handshake bounded) gives the endpoints; then the self-loop check.

        @raise StartError: after one line saying why.
        """
        if self.ownProcess:
            self._takeOverProcess()
        if self.config.source.discovery is not None:
            self._discoverAtStart()
        try:
            self.guard.checkConfigured(self.pool.endpoints)
        except SelfLoopError as e:
            failStart(f"--endpoints and --listen-addr: {e}")
        if self.takeover is not None:
            from etcdgw.takeover import TakeoverError

            try:
                self.takeover.connect()
            except TakeoverError as e:
                failStart(f"takeover: {e}")

    def _takeOverProcess(self):
        # The fast path's one gate: the lean dispatch and our transports, or
        # Twisted's own with one warning naming what is missing.
        fast.start(self.reactor, ring=self.config.forward != "epoll")
        if not fast.RELAY_IN_C:
            log.warn(
                "forwarding in pure Python: the C forwarding step (_etcdgw_relay) "
                "was not built at install (no C compiler or Python headers?); the "
                "gateway works, with about 10% more CPU per request; reinstall with "
                "gcc and the Python headers to get it"
            )

    def _discoverAtStart(self):
        """
        SRV discovery's first round: the pool gets what it found (or the
        explicit C{--endpoints} fallback), and L{discovery} re-resolves
        from then on.
        """
        # Optional and heavy (dnspython, pyOpenSSL): only with --discovery-srv.
        from etcdgw import discovery

        source = self.config.source
        found = source.discovery
        if self.upstreamTLS is not None:
            # Originate mode: validation trusts and presents what the
            # forwarded connections do (the one set of TLS settings).
            found = attr.evolve(found, trust=self.upstreamTLS)
        try:
            endpoints, first = discovery.discoverAtStart(found, list(source.fallback) or None)
        except discovery.DiscoveryError as e:
            failStart(str(e))
        self.pool.replaceEndpoints(endpoints, reason="configured")
        _announceEndpoints(endpoints, self.upstreamTLS is not None)
        self.discovery = self.source = _attach(
            self,
            "discovery",
            discovery.DiscoveryService(self.pool, self.reactor, found, first),
        )


def buildGateway(config, reactor=None):
    """
    Build the gateway C{config} describes: its parts and its service tree
    (C{gateway.service}, what twistd runs).

    @param config: an L{etcdgw.config.GatewayConfig}.
    @param reactor: the reactor every part uses; L{None} for the process's
        own (twistd's), whose signals and event dispatch the gateway then
        takes over when it starts.
    @rtype: L{Gateway}
    """
    ownProcess = reactor is None
    if ownProcess:
        # Imported when asked for: importing it installs the default
        # reactor, which is twistd's to choose.
        from twisted.internet import reactor
    pool = _pool(config, reactor)
    # The one judge of endpoint state, and the one self-loop guard (its
    # listeners are set once they exist, below).
    monitor = Monitor(
        pool,
        reactor,
        rise=config.health.rise,
        fall=config.health.fall,
        maxSilentShare=config.health.maxSilentShare,
    )
    guard = SelfLoopGuard(config.listen.address)
    probe = guardedProbe(guard)  # in originate mode, a TLS handshake (_originate)
    connections = _connectionRegistry(config, pool, monitor, reactor)
    gateway = Gateway(
        reactor=reactor,
        pool=pool,
        monitor=monitor,
        guard=guard,
        connections=connections,
        factory=GatewayFactory(
            pool,
            reactor,
            config.dialTimeout,
            monitor=monitor,
            guard=guard,
            connections=connections,
        ),
        config=config,
        ownProcess=ownProcess,
    )
    probe = _originate(gateway) or probe
    gateway.takeover = _successor(gateway)
    gateway.service = GatewayService(gateway.startUp)
    _attach(gateway, "connections", connections)
    clients, operator = _connectionCaps(config.listen.maxConnections)
    gateway.listener = _clientListener(gateway, clients)
    gateway.health = _attach(gateway, "health", _probes(gateway, probe))
    gateway.etcdHealth, gateway.membership = _etcdAware(gateway)
    gateway.source = gateway.membership or StaticEndpoints(config.source.endpoints)
    # After the listener: MultiService stops children in reverse order, so
    # the port stops accepting in the same turn as the drain begins.
    gateway.drain = _attach(
        gateway,
        "shutdown",
        DrainService(
            gateway.factory, reactor, config.shutdownGrace, installSignal=_signals(gateway)
        ),
    )
    gateway.reload = _attach(
        gateway,
        "signals",
        ReloadService(
            gateway, config.dialTimeout, probe=probe, installSignal=_signals(gateway)
        ),
    )
    gateway.workers, gateway.supervisorWatch = _workers(gateway)
    gateway.takeovers = _takeovers(gateway)
    gateway.notify = _systemdNotify(gateway)
    gateway.web = _operatorListener(gateway, operator)
    # A member connection (or probe) that reaches one of these is a self-loop.
    guard.listeners = gateway.allListeners
    if config.health.check == "answer":
        health = config.health
        log.info(
            "every endpoint is asked GET /version every {interval} (timeout {timeout}; "
            "{fastinter} after a probe that disagrees with its state; silent after "
            "{fall} misses in a row, answering after {rise} answers; at most "
            "{maxSilentShare}% of the endpoints, at least one, silent at once); dial "
            "timeout {dialTimeout}; pid {pid}",
            interval=formatDuration(health.interval),
            timeout=formatDuration(health.timeout),
            fastinter=formatDuration(health.fastinter),
            fall=health.fall,
            rise=health.rise,
            maxSilentShare=health.maxSilentShare,
            dialTimeout=formatDuration(config.dialTimeout),
            pid=os.getpid(),
        )
    else:
        log.info(
            "endpoints down are probed every {retryDelay}; dial timeout {dialTimeout}; "
            "pid {pid}",
            retryDelay=formatDuration(config.health.retryDelay),
            dialTimeout=formatDuration(config.dialTimeout),
            pid=os.getpid(),
        )
    return gateway


# The steps of buildGateway.


def _attach(gateway, name, service):
    """
    Make C{service} the child C{name} of the gateway's tree.

    @return: C{service}.
    """
    service.setName(name)
    service.setServiceParent(gateway.service)
    return service


def _signals(gateway):
    """
    What the drain and SIGHUP install their handlers with: C{signal.signal}
    on the process's own reactor; nothing on an injected one (the
    process's signals are not its caller's to take).
    """
    return signal.signal if gateway.ownProcess else None


def _originate(gateway):
    """
    C{--upstream-tls=originate}: the one L{etcdgw.originate.UpstreamTLS},
    and client connections that originate TLS to their member.

    @return: the probe of members that are down and of SIGHUP (a TLS
        handshake), or L{None} when not originating.
    """
    settings = gateway.config.upstreamTLS
    if not settings.originate:
        return None
    from etcdgw.originate import OriginatingClient, tlsProbe

    gateway.upstreamTLS = settings.settings()
    gateway.factory.protocol = OriginatingClient
    gateway.factory.upstreamTLS = gateway.upstreamTLS
    log.info(
        "upstream TLS: originate: clients speak plaintext to the gateway, which speaks "
        "TLS to the members (trusting {ca}, presenting {cert}; ALPN h2 or http/1.1 per "
        "connection)",
        ca=settings.ca.path if settings.ca is not None else "the system's trust store",
        cert=settings.client.certificate.path if settings.client is not None else "no certificate",
    )
    if settings.insecure:
        log.critical(
            "--insecure-skip-tls-verify: member certificates are NOT verified (any "
            "certificate, any name): anyone on the path to a member can read and change "
            "every request; never use this in production"
        )
    return tlsProbe(gateway.upstreamTLS, gateway.guard)


def _announceEndpoints(endpoints, originate=False):
    """
    Say, once, which endpoints take etcd's client port by default, and
    which are https (TLS passes through).
    """
    defaulted = [str(e) for e in endpoints if e.portDefaulted]
    if defaulted:
        log.info(
            "endpoints given without a port use etcd's client port 2379: {endpoints}",
            endpoints=defaulted,
        )
    for endpoint in endpoints:
        if endpoint.tls and not originate:
            log.info(
                "endpoint {endpoint} is https: TLS passes through the gateway end to "
                "end, untouched; clients speak TLS to the gateway as to the member",
                endpoint=str(endpoint),
            )


def _pool(config, reactor):
    """
    The pool, with the configured endpoints; empty with SRV discovery,
    whose first round, at start, gives them.
    """
    endpoints = () if config.source.discovery is not None else config.source.endpoints
    _announceEndpoints(endpoints, config.upstreamTLS.originate)
    return UpstreamPool(list(endpoints), reactor, policy=config.policy)


def _connectionRegistry(config, pool, monitor, reactor):
    """
    The connection registry (C{--held-close}, C{--rebalance} and their
    rates), following C{monitor}'s decisions once started.
    """
    held = config.held
    registry = ConnectionRegistry(
        pool,
        monitor,
        reactor,
        closeHeld=held.close,
        closeRate=held.closeRate,
        rebalance=held.rebalance,
        rebalanceRate=held.rebalanceRate,
    )
    log.info("{description}", description=registry.describe())
    return registry


def _connectionCaps(given):
    """
    The caps on open connections, C{(clients, operator)}: C{given}
    (--max-connections) or what the open-files limit allows
    (L{descriptorBudget}).
    """
    try:
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (OSError, ValueError):
        limit = None
    clients, operator = descriptorBudget(limit)
    if given is not None and given > clients:
        log.warn(
            "--max-connections={given} is above what the open-files limit ({limit}) "
            "leaves for clients ({clients}): past that, accepting pauses for lack of "
            "descriptors instead",
            given=given,
            limit=limit,
            clients=clients,
        )
    return (given if given is not None else clients), operator


def _clientListener(gateway, cap):
    """
    The clients' listener (C{--listen-addr}), capped at C{cap} connections;
    with C{--workers}, sharing its port.
    """
    config = gateway.config

    def announce(listener):
        log.info(
            "ready to proxy client requests to [{endpoints}] on {listen}",
            endpoints=" ".join(str(e) for e in gateway.pool.endpoints),
            listen=listener.describe(),
        )

    listener = ListenerService(
        gateway.reactor,
        config.listen.address,
        gateway.factory,
        "--listen-addr",
        announce,
        reusePort=config.workers.count > 1 or config.workers.workerOf is not None,
        maxConnections=cap,
        mode=config.listen.mode,
        takeover=gateway.takeover,
    )
    return _attach(gateway, "listener", listener)


def _probes(gateway, probe):
    """
    The probes of C{--health-check}: with C{answer}, every member asked for
    an answer every C{--health-interval} (L{etcdgw.answer.AnswerService});
    with C{tcp} and C{etcd}, the members that are down probed with a TCP
    connect every C{--retry-delay} (L{HealthService}).

    @param probe: the TCP probe, through the self-loop guard.
    """
    config = gateway.config
    health = config.health
    if health.check != "answer":
        return HealthService(
            gateway.pool,
            gateway.reactor,
            health.retryDelay,
            config.dialTimeout,
            probe=probe,
            monitor=gateway.monitor,
        )
    from etcdgw.answer import AnswerProber, AnswerService, probeContext

    client = config.tls.etcdClient
    # https members are asked over TLS, presenting the etcd client's
    # certificate when one is given (members with --client-cert-auth).
    context = None
    if client is not None or any(e.tls for e in config.source.endpoints):
        context = probeContext(
            client.certificate.data if client is not None else None,
            client.key.data if client is not None else None,
        )
    prober = AnswerProber(
        gateway.reactor,
        health.timeout,
        guard=gateway.guard,
        context=context,
        upstreamTLS=gateway.upstreamTLS,
    )
    return AnswerService(
        gateway.pool,
        gateway.reactor,
        gateway.monitor,
        prober,
        health.interval,
        health.fastinter,
        retryDelay=health.retryDelay,
    )


def _etcdAware(gateway):
    """
    C{--health-check=etcd} and C{--sync-interval}: the etcd checks and the
    member-list sync, sharing one HTTP client and one cluster identity (the
    one judge of cluster IDs, whoever reads them).

    @return: C{(etcd checks, member-list sync)}, each L{None} when off.
    """
    config = gateway.config
    checks = config.health.check == "etcd"
    sync = config.source.syncInterval > 0
    if not (checks or sync):
        return None, None
    client = _etcdClient(config, gateway.reactor, gateway.upstreamTLS)
    return (
        _etcdChecks(gateway, client) if checks else None,
        _memberSync(gateway, client) if sync else None,
    )


def _etcdClient(config, reactor, upstreamTLS=None):
    """
    The HTTP client of etcd checks and member-list reads: trusting
    C{--trusted-ca-file}, presenting C{--health-cert-file} (or
    C{--discovery-cert-file}); in originate mode, with C{upstreamTLS}.
    """
    from etcdgw import etcdhealth

    policy = upstreamTLS
    if policy is None:
        policy = config.tls.clientTLS(config.tls.etcdClient)
    return etcdhealth.EtcdClient(
        reactor, config.health.timeout, policy, allTLS=upstreamTLS is not None
    )


def _etcdChecks(gateway, client):
    from etcdgw.etcdhealth import EtcdHealthService, EtcdProber

    health = gateway.config.health
    service = EtcdHealthService(
        gateway.pool,
        gateway.reactor,
        health.interval,
        EtcdProber(client),
        monitor=gateway.monitor,
    )
    log.info(
        "etcd health: every member asked every {interval} (timeout {timeout}, "
        "rise {rise}, fall {fall}); policy {policy}",
        interval=formatDuration(health.interval),
        timeout=formatDuration(health.timeout),
        rise=health.rise,
        fall=health.fall,
        policy=gateway.pool.policyName,
    )
    return _attach(gateway, "etcd-health", service)


def _memberSync(gateway, client):
    from etcdgw.membership import MembershipSync

    source = gateway.config.source
    service = MembershipSync(
        gateway.pool,
        gateway.reactor,
        source.syncInterval,
        client,
        seeds=list(source.endpoints),
        # Against every listener's address (a host name is resolved at start).
        refuse=gateway.guard.refuseLearned,
        monitor=gateway.monitor,
    )
    log.info(
        "endpoints follow the cluster's member list, read every {interval}",
        interval=formatDuration(source.syncInterval),
    )
    return _attach(gateway, "membership", service)


def _workers(gateway):
    """
    C{--workers} above 1: the workers' supervisor; C{--worker-of}: the
    watch that stops a worker whose supervisor is gone.

    @return: C{(supervisor, watch)}, each L{None} when off.
    """
    workers = gateway.config.workers
    reactor = gateway.reactor
    supervisor = watch = None
    if workers.count > 1:
        supervisor = _attach(
            gateway,
            "workers",
            WorkersService(
                workers.count - 1,
                list(workers.arguments),
                reactor,
                gateway.config.shutdownGrace + 5,
                successor=gateway.takeover is not None,
            ),
        )
    if workers.workerOf is not None:

        def handingOver():
            # A worker handing over to its successor outlives its supervisor
            # (whose own successor took over) until it has.
            takeovers = gateway.takeovers
            return takeovers is not None and takeovers.current is not None

        watch = _attach(
            gateway,
            "supervisor-watch",
            SupervisorWatch(workers.workerOf, reactor, reactor.stop, busy=handingOver),
        )
    return supervisor, watch


def _successor(gateway):
    """
    A successor (C{--takeover}, or started by SIGUSR2): the
    L{etcdgw.takeover.Takeover} that takes the running gateway's listeners
    and connections over when this one starts; else L{None}.
    """
    takeover = gateway.config.takeover
    if not takeover.successor:
        return None
    from etcdgw.takeover import Takeover

    options = {}
    if not gateway.ownProcess:
        # An injected reactor: the process is not the gateway's to leave.
        options["exit"] = lambda status: gateway.reactor.stop()
    return Takeover(
        gateway,
        path=takeover.path,
        fd=takeover.fd,
        controlSocket=takeover.controlSocket,
        hold=takeover.hold,
        installSignal=_signals(gateway),
        **options,
    )


def _takeovers(gateway):
    """
    The triggers of a takeover of this gateway (L{etcdgw.takeover}):
    SIGUSR2 (the process's own reactor only) and C{--control-socket}; in a
    worker, only its own control socket (its supervisor is the one
    signalled; the successor supervisor's workers take the workers over).
    """
    from etcdgw.takeover import TakeoverService, twistdPidfile

    worker = gateway.config.workers.workerOf is not None
    options = {}
    if gateway.ownProcess and not worker:
        options["pidfile"] = twistdPidfile()
    if not gateway.ownProcess:
        options["exit"] = lambda status: None
    return _attach(
        gateway,
        "takeover",
        TakeoverService(
            gateway,
            controlSocket=gateway.config.takeover.controlSocket,
            # A worker: no SIGUSR2 (its supervisor's successor takes it
            # over, through the worker's own control socket).
            installSignal=None if worker else _signals(gateway),
            spawn=gateway.reactor.spawnProcess if gateway.ownProcess else None,
            **options,
        ),
    )


def _systemdNotify(gateway):
    """
    systemd's notify protocol, when C{$NOTIFY_SOCKET} asks for it (the
    supervisor's, not a worker's).
    """
    if gateway.config.workers.workerOf is not None:
        return None
    notifier = SystemdNotifier.fromEnvironment()
    if notifier is None:
        return None
    service = SystemdNotifyService(
        notifier,
        gateway.pool,
        gateway.listener,
        gateway.reactor,
        watchdogInterval(),
        listeners=gateway.listeners,
        takeover=gateway.takeover,
    )
    return _attach(gateway, "sdnotify", service)


def _operatorListener(gateway, cap):
    """
    The operator's HTTP address (C{--metrics-addr}; the supervisor's, not
    a worker's), capped at C{cap} connections.
    """
    config = gateway.config
    if config.metrics is None or config.workers.workerOf is not None:
        return None
    # Optional and heavy (prometheus_client, twisted.web): only when asked for.
    from etcdgw.status import statusSite

    def announce(listener):
        log.info(
            "metrics on http://{where}/metrics, health on /health, liveness on /livez, "
            "readiness on /readyz, status page on /",
            where=listener.describe(),
        )

    web = ListenerService(
        gateway.reactor,
        config.metrics,
        statusSite(gateway),
        "--metrics-addr",
        announce,
        maxConnections=cap,
        fast=False,  # Twisted's own transports: nothing here needs speed
        takeover=gateway.takeover,
    )
    return _attach(gateway, "metrics", web)
