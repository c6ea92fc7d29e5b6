"""
Bringing endpoints back: every C{--retry-delay}, each endpoint that is down is
probed with a TCP connect bounded by C{--dial-timeout}; one that answers is
marked up.
"""

from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger

from etcdgw.dial import connected, describeFailure, dial
from etcdgw.periodic import PeriodicService


class _Probe(Protocol):
    def connectionMade(self):
        connected(self)
        self.transport.abortConnection()


def probeTCP(reactor, endpoint, timeout):
    """
    Connect to C{endpoint} and close at once.

    @return: a Deferred firing with L{None} on success, failing otherwise.
    """
    d = dial(reactor, endpoint, lambda addr: _Probe(), timeout)
    d.addCallback(lambda _: None)
    return d


class HealthService(PeriodicService):
    """
    Probes the pool's down endpoints every C{interval} seconds.
    """

    log = Logger()
    roundName = "health check round"

    def __init__(self, pool, reactor, interval, timeout, probe=probeTCP):
        super().__init__(reactor, interval)
        self.pool = pool
        self.reactor = reactor
        self.timeout = timeout
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
        self.pool.markUp(endpoint, "probe connected")

    def _dead(self, reason, endpoint):
        if reason.check(defer.CancelledError):
            return
        self.log.info(
            "endpoint {endpoint} still down: {reason} (next probe in {interval}s)",
            endpoint=str(endpoint),
            reason=describeFailure(reason),
            interval=self.interval,
        )
