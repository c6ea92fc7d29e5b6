"""
Graceful shutdown: when the gateway stops (SIGTERM, SIGINT: twistd turns
both into C{reactor.stop()}, which stops the service tree), open client
connections get C{--shutdown-grace} to finish on their own; the rest are
then cut. etcd's gateway drops every connection at once.

The listener must stop accepting first. L{DrainService} is attached after
the listener in the same L{MultiService}, which stops its children in
reverse order within one call, so the port stops listening in the same
reactor turn as the drain begins.
"""

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

from etcdgw.duration import formatDuration

#: After cutting connections, how long to wait for them to report closed
#: (an abort takes one reactor turn) before giving up waiting.
CUT_WAIT = 1.0


class DrainService(Service):
    """
    On stop, wait up to C{grace} seconds for C{factory}'s clients to close,
    then abort the rest; logs how many drained and how many were cut.

    @param factory: the L{etcdgw.proxy.GatewayFactory}.
    @param clock: an L{IReactorTime}.
    @param grace: seconds; 0 cuts every connection at once.
    @ivar drained: connections that closed by themselves during the last stop.
    @ivar cut: connections aborted at the end of the grace period.
    """

    log = Logger()

    def __init__(self, factory, clock, grace):
        self.factory = factory
        self.clock = clock
        self.grace = grace
        self.drained = 0
        self.cut = 0

    def stopService(self):
        super().stopService()
        start = self.clock.seconds()
        opened = len(self.factory.clients)
        if not opened:
            self.log.info("shutting down: no open connection to drain")
            return defer.succeed(None)
        self.log.info(
            "shutting down: no longer accepting; waiting up to {grace} for "
            "{open} open connection(s) to finish",
            grace=formatDuration(self.grace),
            open=opened,
        )
        d = self._idle(self.grace)

        def graceOver(idle):
            remaining = list(self.factory.clients)
            self.cut = len(remaining)
            self.drained = max(0, opened - self.cut)
            for client in remaining:
                client.transport.abortConnection()
            self.log.info(
                "drained {drained} connection(s) in {elapsed:.3f}s, cut {cut} "
                "still open after the {grace} grace period",
                drained=self.drained,
                cut=self.cut,
                elapsed=self.clock.seconds() - start,
                grace=formatDuration(self.grace),
            )
            if remaining:
                return self._idle(CUT_WAIT)

        d.addCallback(graceOver)
        d.addCallback(lambda _: None)
        return d

    def _idle(self, timeout):
        """
        A Deferred firing with L{True} when the factory has no client left,
        or with L{False} after C{timeout} seconds.
        """
        if not self.factory.clients:
            return defer.succeed(True)
        if timeout <= 0:
            return defer.succeed(False)
        result = defer.Deferred()
        idle = self.factory.whenIdle()
        timer = self.clock.callLater(timeout, lambda: result.called or result.callback(False))

        def becameIdle(_):
            if timer.active():
                timer.cancel()
            if not result.called:
                result.callback(True)

        idle.addCallback(becameIdle)
        return result
