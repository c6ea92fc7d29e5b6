"""
Graceful shutdown: when the gateway stops (SIGTERM, SIGINT: twistd turns
both into C{reactor.stop()}, which stops the service tree), open client
connections get C{--shutdown-grace} to finish on their own; the rest are
then cut. etcd's gateway drops every connection at once.

SIGTERM and SIGINT are taken over from the reactor once it runs: the
first one stops the reactor as twistd would, but the process then exits 0
after a clean stop (twistd would re-raise the signal and die of it); a
second one during the drain cuts the remaining connections at once.

The listener must stop accepting first. L{DrainService} is attached after
the listener in the same L{MultiService}, which stops its children in
reverse order within one call, so the port stops listening in the same
reactor turn as the drain begins.
"""

import signal

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

from etcdgw.duration import formatDuration

#: After cutting connections, how long to wait for them to report closed
#: (an abort takes one reactor turn) before giving up waiting.
CUT_WAIT = 1.0

#: The signals that stop the gateway.
STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGINT") if hasattr(signal, name)
)


class DrainService(Service):
    """
    On stop, wait up to C{grace} seconds for C{factory}'s clients to close,
    then abort the rest; logs how many drained and how many were cut.

    @param factory: the L{etcdgw.proxy.GatewayFactory}.
    @param clock: an L{IReactorTime}; with C{installSignal}, also
        L{IReactorCore} and C{callFromThread} (it is stopped on SIGTERM).
    @param grace: seconds; 0 cuts every connection at once.
    @param installSignal: C{signal.signal} to handle SIGTERM and SIGINT once
        the reactor runs, or L{None} to leave them to the reactor.
    @ivar drained: connections that closed by themselves during the last stop.
    @ivar cut: connections aborted at the end of the grace period.
    """

    log = Logger()

    def __init__(self, factory, clock, grace, installSignal=None):
        self.factory = factory
        self.clock = clock
        self.grace = grace
        self.drained = 0
        self.cut = 0
        self._installSignal = installSignal
        self._previous = {}
        self._stopping = False
        self._grace = None

    def startService(self):
        super().startService()
        if self._installSignal is not None:
            # After the reactor's own handlers, installed as it starts running.
            self.clock.callWhenRunning(self._takeSignals)

    def _takeSignals(self):
        if not self.running:
            return
        for signum in STOP_SIGNALS:
            self._previous[signum] = self._installSignal(signum, self._onSignal)

    def _restoreSignals(self):
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            self._installSignal(signum, handler)

    def _onSignal(self, signum, frame):
        # In the signal handler: only hand over to the reactor.
        self.clock.callFromThread(self.signalled, signum)

    def signalled(self, signum):
        """
        A stop signal arrived: stop the reactor (exit 0 follows a clean
        stop), or, if already draining, cut the remaining connections now.
        """
        name = signal.Signals(signum).name
        if not self._stopping:
            self._stopping = True
            self.log.info("received {signal}: shutting down", signal=name)
            self.clock.stop()
        elif self._grace is not None:
            self.log.warn(
                "received {signal} again: cutting {count} connection(s) now",
                signal=name,
                count=len(self.factory.clients),
            )
            self._endGrace()
        else:
            self.log.info("received {signal}: already shutting down", signal=name)

    def stopService(self):
        super().stopService()
        self._stopping = True
        d = self._drain()
        d.addBoth(lambda result: (self._restoreSignals(), result)[1])
        return d

    def _drain(self):
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
        timer = self.clock.callLater(timeout, self._endGrace)
        self._grace = (result, timer)

        def becameIdle(_):
            if self._grace is not None and self._grace[0] is result:
                self._grace = None
                if timer.active():
                    timer.cancel()
                result.callback(True)

        self.factory.whenIdle().addCallback(becameIdle)
        return result

    def _endGrace(self):
        """
        End the current wait now, idle or not.
        """
        if self._grace is None:
            return
        (result, timer), self._grace = self._grace, None
        if timer.active():
            timer.cancel()
        result.callback(False)
