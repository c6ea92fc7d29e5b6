"""
Work done every so often: the shape shared by the health checks, membership
sync and a worker's watch on its supervisor.
"""

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger


class PeriodicService(Service):
    """
    Calls L{runRound} every C{interval} seconds of an injected clock.

    One round at a time: a tick that comes while the last round still runs
    starts nothing (L{runNow} returns the running round). A round that fails
    is logged and the loop goes on (Twisted's C{TimerService} stops at the
    first failure). Stopping the service cancels the running round.

    @cvar runAtStart: whether the first round runs at start, or after one
        interval.
    @cvar roundName: what a round is called in the log.
    """

    log = Logger()
    runAtStart = False
    roundName = "periodic round"

    def __init__(self, clock, interval):
        self.clock = clock
        self.interval = interval
        self._loop = None
        self._round = None

    def startService(self):
        super().startService()
        self._loop = task.LoopingCall(self.runNow)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=self.runAtStart)

    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._round is not None:
            self._round.cancel()
        return defer.succeed(None)

    def runNow(self):
        """
        Run a round now, unless one is running.

        @return: a Deferred that fires (never fails) when the round has ended.
        """
        if self._round is not None:
            return self._round
        d = self._round = defer.maybeDeferred(self.runRound)

        def failed(reason):
            if not reason.check(defer.CancelledError):
                self.log.failure("{round} failed", reason, round=self.roundName)

        def done(result):
            self._round = None

        d.addErrback(failed)
        d.addBoth(done)
        return d

    def runRound(self):
        """
        One round of work; may return a Deferred.
        """
        raise NotImplementedError()
