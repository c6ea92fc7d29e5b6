"""
SIGHUP: look again now. Every endpoint is probed at once (an up endpoint
that does not answer is marked down, a down one that answers is marked up),
and, when the gateway has SRV discovery, DNS is queried again now.
The result is logged as one line. With C{--workers}, the supervisor also
passes the signal on to every worker, which does the same for its own
endpoints. (SIGTERM and SIGINT are twistd's: they stop the reactor, see
L{etcdgw.shutdown}.)
"""

import signal

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

from etcdgw.dial import describeFailure
from etcdgw.health import probeTCP


class ReloadService(Service):
    """
    Re-probes every endpoint, and refreshes discovery, on SIGHUP.

    @param gateway: the L{etcdgw.gateway.Gateway}: its C{pool} is probed,
        its C{discovery} (when not L{None}) has its C{refreshNow()} called,
        and its C{workers} (when not L{None}, this process supervises
        C{--workers}) are told first. Its C{reactor} provides
        L{IReactorTCP}, L{IReactorTime} and C{callFromThread} (the signal
        handler hands over to the reactor).
    @param timeout: seconds each probe may take (C{--dial-timeout}).
    @param probe: C{probe(reactor, endpoint, timeout)} -> Deferred.
    @param installSignal: C{signal.signal} to handle SIGHUP while the service
        runs, or L{None} to handle none (an injected reactor: the process's
        signals are not the caller's to take), as L{etcdgw.shutdown.DrainService}.
    """

    log = Logger()

    def __init__(self, gateway, timeout, probe=probeTCP, installSignal=None):
        self.gateway = gateway
        self.pool = gateway.pool
        self.reactor = gateway.reactor
        self.timeout = timeout
        self._probe = probe
        self._installSignal = installSignal
        self._previous = None
        self._running = None

    def startService(self):
        super().startService()
        if self._installSignal is not None and hasattr(signal, "SIGHUP"):
            self._previous = self._installSignal(signal.SIGHUP, self._onSignal)

    def stopService(self):
        super().stopService()
        if self._previous is not None:
            self._installSignal(signal.SIGHUP, self._previous)
            self._previous = None

    def _onSignal(self, signum, frame):
        # In the signal handler: only hand over to the reactor.
        self.reactor.callFromThread(self.reload)

    def reload(self):
        """
        Pass the signal on to the workers, if any; probe every endpoint and
        refresh discovery now; log the result.

        @return: a Deferred firing with the summary line once everything
            asked has answered. A reload already running is not doubled
            (the workers are still told: each has its own).
        """
        workers = self.gateway.workers
        if workers is not None:
            workers.reload()
        if self._running is not None:
            self.log.info("SIGHUP: a reload is already running")
            return self._running
        if self.gateway.upstreamTLS is not None:
            self.gateway.upstreamTLS.reload()  # --upstream-tls=originate: re-read the PEM files
        self.log.info("SIGHUP: probing every endpoint and refreshing discovery now")
        # Discovery first: it may change the endpoints that are then probed.
        d = self._running = self._refreshDiscovery()
        d.addCallback(
            lambda discovery: self._probeAll().addCallback(
                lambda probed: (discovery, probed)
            )
        )
        d.addCallback(self._report)

        def done(result):
            self._running = None
            return result

        d.addErrback(lambda f: self.log.failure("SIGHUP reload failed", f))
        d.addBoth(done)
        return d

    def _refreshDiscovery(self):
        # The gateway's one endpoint source (etcdgw.sources.IEndpointSource):
        # static endpoints say so, SRV discovery and the member list look again.
        d = defer.maybeDeferred(self.gateway.source.refreshNow)
        d.addCallbacks(
            # A source that describes its round (a string) is quoted.
            lambda result: result if isinstance(result, str) else "discovery refreshed",
            lambda f: f"discovery refresh failed: {describeFailure(f)}",
        )
        return d

    def _probeAll(self):
        probes = []
        for state in self.pool.states():
            endpoint = state.endpoint
            d = self._probe(self.reactor, endpoint, self.timeout)
            d.addCallbacks(
                self._alive,
                self._dead,
                callbackArgs=(endpoint,),
                errbackArgs=(endpoint,),
            )
            probes.append(d)
        d = defer.gatherResults(probes, consumeErrors=True)
        d.addCallback(lambda answers: (sum(answers), len(answers)))
        return d

    def _alive(self, result, endpoint):
        self.gateway.monitor.probeSucceeded(endpoint, "SIGHUP probe connected")
        return 1

    def _dead(self, reason, endpoint):
        self.gateway.monitor.probeFailed(
            endpoint, reason, f"SIGHUP probe: {describeFailure(reason)}"
        )
        return 0

    def _report(self, result):
        discovery, (answered, probed) = result
        summary = (
            f"{answered}/{probed} endpoints answered; "
            f"{self.pool.upCount()}/{len(self.pool.endpoints)} up; {discovery}"
        )
        self.log.info(
            "SIGHUP done: {answered}/{probed} endpoints answered; {up}/{total} up; "
            "{discovery}",
            answered=answered,
            probed=probed,
            up=self.pool.upCount(),
            total=len(self.pool.endpoints),
            discovery=discovery,
        )
        return summary
