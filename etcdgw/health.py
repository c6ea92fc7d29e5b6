"""
Bringing endpoints back: every C{--retry-delay}, each endpoint that is down is
probed with a TCP connect bounded by C{--dial-timeout}. The probe's outcome
is evidence for the monitor (L{etcdgw.monitor.Monitor.probeSucceeded},
L{etcdgw.monitor.Monitor.probeFailed}), which marks the endpoint up or keeps
it down; a probe that reaches the gateway itself (the self-loop guard) is a
failure, "self-loop".
"""

from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger

from etcdgw.dial import connected, describeFailure, dial
from etcdgw.monitor import legacyMonitor
from etcdgw.periodic import PeriodicService
from etcdgw.selfloop import SelfLoopError


class _Probe(Protocol):
    def __init__(self, guard):
        self._guard = guard
        self.loop = None

    def connectionMade(self):
        if self._guard is not None:
            self.loop = self._guard.reachedItself(self.transport)
        connected(self)
        self.transport.abortConnection()


def _judged(probe):
    if probe.loop is not None:
        raise SelfLoopError(f"self-loop: {probe.loop}")
    return None


def probeTCP(reactor, endpoint, timeout, guard=None):
    """
    Connect to C{endpoint} and close at once.

    @param guard: the L{etcdgw.selfloop.SelfLoopGuard}: a connection that
        reached the gateway itself is a failure.
    @return: a Deferred firing with L{None} on success, failing otherwise
        (with L{SelfLoopError} for a self-loop).
    """
    d = dial(reactor, endpoint, lambda addr: _Probe(guard), timeout)
    d.addCallback(_judged)
    return d


def guardedProbe(guard):
    """
    L{probeTCP} through C{guard}, as a C{probe(reactor, endpoint, timeout)}
    (for L{HealthService} and SIGHUP's re-probes).
    """

    def probe(reactor, endpoint, timeout):
        return probeTCP(reactor, endpoint, timeout, guard)

    return probe


class HealthService(PeriodicService):
    """
    Probes the pool's down endpoints every C{interval} seconds; tells the
    monitor what each probe found.

    @param probe: C{probe(reactor, endpoint, timeout)} -> Deferred (the
        gateway's: L{guardedProbe}).
    @param monitor: the gateway's L{etcdgw.monitor.Monitor} (by default the
        pool's, for the old wiring: see L{etcdgw.monitor.legacyMonitor}).
    """

    log = Logger()
    roundName = "health check round"

    def __init__(self, pool, reactor, interval, timeout, probe=probeTCP, monitor=None):
        super().__init__(reactor, interval)
        self.pool = pool
        self.reactor = reactor
        self.timeout = timeout
        self.monitor = monitor if monitor is not None else legacyMonitor(pool, reactor)
        self._probe = probe

    def probeNow(self):
        """
        Probe every down endpoint now (also what each tick does).

        @return: a Deferred that fires when every probe has ended.
        """
        return self.runNow()

    def runRound(self):
        probes = []
        for endpoint in self.pool.down():
            d = defer.maybeDeferred(self._probe, self.reactor, endpoint, self.timeout)
            d.addCallbacks(
                self._alive, self._dead, callbackArgs=(endpoint,), errbackArgs=(endpoint,)
            )
            probes.append(d)
        return defer.DeferredList(probes, consumeErrors=True)

    def _alive(self, result, endpoint):
        self.monitor.probeSucceeded(endpoint, "probe connected")

    def _dead(self, reason, endpoint):
        if reason.check(defer.CancelledError):
            return
        why = describeFailure(reason)
        self.log.info(
            "endpoint {endpoint} still down: {reason} (next probe in {interval}s)",
            endpoint=str(endpoint),
            reason=why,
            interval=self.interval,
        )
        self.monitor.probeFailed(endpoint, reason, why)
