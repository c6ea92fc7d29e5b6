"""
C{--workers N}: more gateway processes on the same listening port.

One Python process forwards on one core. With C{--workers N} the gateway
starts N-1 more copies of itself (the same flags) that listen on the same TCP
port with C{SO_REUSEPORT}, so the kernel spreads new connections over N
processes, each with its own reactor and its own endpoint health. The first
process supervises the others: it logs their output with their name, restarts
one that dies (after a growing delay), passes SIGHUP on to each (which
re-probes its own endpoints), and on stop sends each SIGTERM (so it drains as
usual) and waits for it to exit before exiting itself. A worker whose
supervisor disappears stops by itself.
"""

import os
import signal
import sys

from twisted.application.service import Service
from twisted.internet import defer, protocol
from twisted.logger import Logger

from etcdgw.periodic import PeriodicService

#: Runs twistd from an interpreter (twisted.scripts.twistd has no __main__).
#: SIGHUP is ignored first thing, until the worker's own handler is installed
#: (L{etcdgw.signals.ReloadService}): SIGHUP's default action would kill a
#: worker that is still starting.
TWISTD = (
    "import signal, sys; signal.signal(signal.SIGHUP, signal.SIG_IGN); "
    "sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"
)

#: Environment a worker must not inherit (systemd talks to the supervisor only).
PRIVATE_ENVIRONMENT = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS",
                       "LISTEN_PID", "LISTEN_FDNAMES")


def workerArguments(pluginArguments, supervisor):
    """
    The plugin flags for a worker: the supervisor's, less C{--workers} and
    C{--metrics-addr} (one status page, the supervisor's), plus
    C{--worker-of}.
    """
    result = []
    skip = False
    for argument in pluginArguments:
        if skip:
            skip = False
            continue
        name = argument.split("=", 1)[0]
        if name in ("--workers", "--metrics-addr", "--worker-of"):
            skip = "=" not in argument
            continue
        result.append(argument)
    return result + [f"--worker-of={supervisor}"]


class _Worker(protocol.ProcessProtocol):
    log = Logger()

    def __init__(self, name):
        self.name = name
        self.ended = defer.Deferred()
        #: Whether it wrote anything yet: then it runs TWISTD and ignores
        #: SIGHUP, or handles it (see L{WorkersService.reload}).
        self.talked = False
        self._partial = b""

    def outReceived(self, data):
        self.talked = True
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            self.log.info("[{worker}] {line}", worker=self.name,
                          line=line.decode("utf-8", "replace"))

    errReceived = outReceived

    def processEnded(self, reason):
        # ProcessDone or ProcessTerminated: exitCode, or the signal's number.
        self.ended.callback(reason.value)


def _signalName(signum):
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class WorkersService(Service):
    """
    Runs and supervises C{count} worker processes.

    @param count: how many workers (besides this process).
    @param pluginArguments: this gateway's own flags, which each worker gets
        (see L{workerArguments}).
    @param stopTimeout: how long a worker may take to drain after SIGTERM
        before it is killed.
    """

    log = Logger()
    restartDelay = 1.0
    maxRestartDelay = 30.0

    def __init__(self, count, pluginArguments, reactor, stopTimeout, env=None):
        self.count = count
        self.pluginArguments = pluginArguments
        self.argv = None
        self.reactor = reactor
        self.stopTimeout = stopTimeout
        env = dict(os.environ if env is None else env)
        for name in PRIVATE_ENVIRONMENT:
            env.pop(name, None)
        self.env = env
        self.workers = {}
        self._delays = {}
        self._restarts = {}

    def startService(self):
        super().startService()
        # Only now: the pid must be the running (maybe daemonized) process's.
        self.argv = workerCommand(self.pluginArguments, os.getpid())
        for i in range(1, self.count + 1):
            self._start(f"worker-{i}")

    def _start(self, name):
        self._restarts.pop(name, None)
        worker = _Worker(name)
        self.workers[name] = worker
        worker.transport = self.reactor.spawnProcess(
            worker, self.argv[0], self.argv, env=self.env
        )
        worker.started = self.reactor.seconds()
        self.log.info("started {worker} (pid {pid})", worker=name, pid=worker.transport.pid)
        worker.ended.addCallback(self._ended, name, worker)

    def _ended(self, status, name, worker):
        if self.workers.get(name) is worker:
            del self.workers[name]
        if not self.running:
            return status
        ranFor = self.reactor.seconds() - worker.started
        delay = self._delays.get(name, self.restartDelay)
        delay = self.restartDelay if ranFor > 10 else min(self.maxRestartDelay, delay * 2)
        self._delays[name] = delay
        if status.signal is not None:
            self.log.error(
                "{worker} was killed by {signal}; restarting it in {delay}s",
                worker=name, signal=_signalName(status.signal), delay=delay,
            )
        else:
            self.log.error(
                "{worker} exited with status {code}; restarting it in {delay}s",
                worker=name, code=status.exitCode, delay=delay,
            )
        self._restarts[name] = self.reactor.callLater(delay, self._start, name)
        return status

    def reload(self):
        """
        Pass SIGHUP on to every worker (each re-probes its own endpoints);
        log one line. A worker that has written nothing yet is still
        starting (it may not ignore SIGHUP yet) and probes everything as it
        starts anyway: it is skipped.
        """
        told, starting = [], []
        for name, worker in sorted(self.workers.items()):
            if worker.talked:
                self._signal(worker, signal.SIGHUP)
                told.append(name)
            else:
                starting.append(name)
        self.log.info(
            "SIGHUP passed on to {count} worker(s); {starting} still starting",
            count=len(told), workers=told, starting=len(starting),
        )

    def stopService(self):
        super().stopService()
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        ended = []
        for name, worker in list(self.workers.items()):
            self._signal(worker, signal.SIGTERM)
            kill = self.reactor.callLater(self.stopTimeout, self._signal, worker, signal.SIGKILL)
            worker.ended.addBoth(lambda result, kill=kill: kill.active() and kill.cancel())
            ended.append(worker.ended)
        return defer.DeferredList(ended)

    def _signal(self, worker, signum):
        try:
            worker.transport.signalProcess(signum)
        except Exception:
            pass  # already gone


class SupervisorWatch(PeriodicService):
    """
    In a worker: stop the process when its supervisor is gone (the worker
    was re-parented), the same way SIGTERM would.
    """

    log = Logger()
    roundName = "supervisor watch"

    def __init__(self, supervisor, reactor, stop, getppid=os.getppid, interval=1.0):
        # The first look comes after one interval: startService runs before
        # the reactor does, and stopping a reactor not yet running does nothing.
        super().__init__(reactor, interval)
        self.supervisor = supervisor
        self._stop = stop
        self._getppid = getppid

    def runRound(self):
        if self._getppid() != self.supervisor:
            self.log.error(
                "supervisor (pid {pid}) is gone: stopping this worker", pid=self.supervisor
            )
            self._loop.stop()
            self._stop()


def workerCommand(pluginArguments, supervisor):
    """
    The full command line that runs one worker in the foreground, logging to
    its standard output (which the supervisor reads).
    """
    return [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "etcd-gateway"] + (
        workerArguments(pluginArguments, supervisor)
    )
