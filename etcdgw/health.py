"""
Bringing endpoints back: every C{--retry-delay}, each endpoint that is down is
probed with a TCP connect bounded by C{--dial-timeout}; one that answers is
marked up.
"""

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.protocol import Protocol
from twisted.logger import Logger

from etcdgw.dial import connected, describeFailure, dial


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


class HealthService(Service):
    """
    Probes the pool's down endpoints every C{interval} seconds.
    """

    log = Logger()

    def __init__(self, pool, reactor, interval, timeout, probe=probeTCP):
        self.pool = pool
        self.reactor = reactor
        self.interval = interval
        self.timeout = timeout
        self._probe = probe
        self._loop = None
        self._round = None

    def startService(self):
        super().startService()
        self._loop = task.LoopingCall(self._safeRound)
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=False)

    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._round is not None:
            self._round.cancel()
        return defer.succeed(None)

    def probeNow(self):
        """
        Probe every down endpoint now (also what each tick does).

        @return: a Deferred that fires when every probe has ended.
        """
        return self._safeRound()

    def _safeRound(self):
        if self._round is not None:
            return self._round  # the last round is still running
        d = self._round = defer.maybeDeferred(self._probeDown)

        def done(result):
            self._round = None
            return None

        def failed(reason):
            self.log.failure("health check round failed", reason)

        d.addErrback(failed)
        d.addBoth(done)
        return d

    def _probeDown(self):
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
