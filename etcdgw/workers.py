"""
C{--workers N}: more gateway processes on the same listening port.

One Python process forwards on one core. With C{--workers N} the gateway
starts N-1 more copies of itself (the same flags) that listen on the same TCP
port with C{SO_REUSEPORT}, so the kernel spreads new connections over N
processes, each with its own reactor and its own endpoint health. The first
process supervises the others (L{WorkersService}, Twisted's procmon plus what
it lacks): it logs their output with their name, restarts one that dies
(after a growing delay), passes SIGHUP on to each (which re-probes its own
endpoints), and on stop sends each SIGTERM (so it drains as usual) and waits
for it to exit before exiting itself. A worker whose supervisor disappears
stops by itself (L{SupervisorWatch}, in the worker).
"""

import os
import signal
import sys

from twisted.application.service import Service
from twisted.internet import defer, protocol
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.logger import Logger
from twisted.runner.procmon import ProcessMonitor
from zope.interface import implementer

from etcdgw.periodic import PeriodicService
from etcdgw.takeover import HOLDING

#: Runs twistd from an interpreter (twisted.scripts.twistd has no __main__).
#: SIGHUP and SIGUSR2 are ignored first thing, until the process's own
#: handlers are installed (L{etcdgw.signals.ReloadService},
#: L{etcdgw.takeover.TakeoverService}; a worker has none for SIGUSR2): their
#: default action would kill a worker, or a takeover's successor, that is
#: still starting.
TWISTD = (
    "import signal, sys; signal.signal(signal.SIGHUP, signal.SIG_IGN); "
    "signal.signal(signal.SIGUSR2, signal.SIG_IGN); "
    "sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"
)

#: Environment a worker must not inherit (systemd talks to the supervisor only).
PRIVATE_ENVIRONMENT = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS",
                       "LISTEN_PID", "LISTEN_FDNAMES", "ETCDGW_TAKEOVER_FD")


def workerArguments(pluginArguments, supervisor):
    """
    The plugin flags for a worker: the supervisor's, less C{--workers},
    C{--metrics-addr} (one status page, the supervisor's) and the takeover
    flags (a worker's control socket is its own, L{etcdgw.takeover}), plus
    C{--worker-of}.
    """
    result = []
    skip = False
    for argument in pluginArguments:
        if skip:
            skip = False
            continue
        name = argument.split("=", 1)[0]
        if name in ("--workers", "--metrics-addr", "--worker-of", "--control-socket",
                    "--takeover"):
            skip = "=" not in argument
            continue
        result.append(argument)
    return result + [f"--worker-of={supervisor}"]


class _Worker(protocol.ProcessProtocol):
    """
    Stands between one worker process and ProcessMonitor's protocol for it,
    for what procmon cannot do: procmon's C{LoggingProtocol} raises on an
    output line over 16 KiB (its line logger's transport has no
    C{loseConnection}) and cannot say whether the worker has written
    anything yet, so this logs the output itself; procmon's protocol still
    gets the connection (procmon signals the process through its
    C{transport}) and the end (procmon restarts it, or not).

    @ivar ended: fires with the exit status (C{ProcessDone} or
        C{ProcessTerminated}) after procmon has handled the end.
    @ivar talked: whether the worker wrote anything yet: then it runs
        L{TWISTD} and ignores SIGHUP, or handles it (see
        L{WorkersService.reload}).
    """

    log = Logger()

    def __init__(self, monitored):
        self.monitored = monitored
        self.name = monitored.name
        self.ended = defer.Deferred()
        self.talked = False
        self._partial = b""
        #: Fires once the worker says it holds what it took over
        #: (L{etcdgw.takeover.HOLDING}), when it was started to take over.
        self.holding = defer.Deferred()
        self.hasHeld = False

    def makeConnection(self, transport):
        self.monitored.makeConnection(transport)
        super().makeConnection(transport)

    def outReceived(self, data):
        self.talked = True
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            self._logLine(line)

    errReceived = outReceived

    def _logLine(self, line):
        text = line.decode("utf-8", "replace")
        self.log.info("[{worker}] {line}", worker=self.name, line=text)
        if not self.hasHeld and HOLDING in text:
            self.hasHeld = True
            self.holding.callback(self)

    def processEnded(self, reason):
        if self._partial:
            self._logLine(self._partial)
            self._partial = b""
        try:
            self.monitored.processEnded(reason)
        finally:
            if not self.hasHeld:
                self.hasHeld = True
                self.holding.errback(
                    RuntimeError(f"{self.name} exited before taking over ({reason.value})")
                )
                self.holding.addErrback(lambda f: None)
            # ProcessDone or ProcessTerminated: exitCode, or the signal's number.
            self.ended.callback(reason.value)


@implementer(IReactorProcess, IReactorTime)
class _Spawner:
    """
    The reactor as L{WorkersService}'s ProcessMonitor sees it: the same
    reactor, except that each process spawned gets a L{_Worker} in front of
    procmon's protocol (procmon builds that protocol itself and offers no
    hook to replace or extend it), and C{spawned(worker)} is told.
    """

    def __init__(self, reactor, spawned, environment=lambda name: {}):
        self._reactor = reactor
        self._spawned = spawned
        self._environment = environment

    def spawnProcess(self, processProtocol, executable, args=(), env=None, **kwargs):
        extra = self._environment(processProtocol.name)
        if extra:
            env = dict(env or {}, **extra)
        worker = _Worker(processProtocol)
        transport = self._reactor.spawnProcess(worker, executable, args, env=env, **kwargs)
        self._spawned(worker)
        return transport

    def callLater(self, delay, f, *args, **kwargs):
        return self._reactor.callLater(delay, f, *args, **kwargs)

    def seconds(self):
        return self._reactor.seconds()

    def getDelayedCalls(self):
        return self._reactor.getDelayedCalls()


def _signalName(signum):
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class WorkersService(ProcessMonitor):
    """
    Runs and supervises C{count} worker processes, named C{worker-1} to
    C{worker-N}.

    Twisted's L{ProcessMonitor} owns the processes: it spawns them, restarts
    one that dies (at once after a run longer than L{threshold}, else after
    a delay from L{minRestartDelay}, doubled at each quick death up to
    L{maxRestartDelay}), and on stop sends each SIGTERM (so it drains as
    usual) and SIGKILL after C{killTime} (C{stopTimeout}). This class adds
    only what procmon does not do: the workers' command line, built at start
    (it names this process's pid) with an environment without systemd's
    variables; their output logged with their name (L{_Worker}); each exit
    logged, with the signal's name when killed, and the restart delay
    (procmon logs nothing for a process that exits or is killed); SIGHUP
    passed on (L{reload}); and a L{stopService} whose Deferred fires when
    every worker has exited (procmon's returns nothing).

    @param count: how many workers (besides this process).
    @param pluginArguments: this gateway's own flags, which each worker gets
        (see L{workerArguments}).
    @param stopTimeout: how long a worker may take to drain after SIGTERM
        before it is killed.

    @ivar workers: the worker processes running now, by name (each a
        L{_Worker}); procmon's own tables (C{protocols}, C{restart}, ...)
        are read, never written, here.
    """

    log = Logger()
    threshold = 10.0
    minRestartDelay = 2.0
    maxRestartDelay = 30.0

    def __init__(self, count, pluginArguments, reactor, stopTimeout, env=None, successor=False):
        super().__init__(_Spawner(reactor, self._spawned, self._environmentFor))
        #: This supervisor takes over from another (L{etcdgw.takeover}): its
        #: workers start when the old one's workers are known.
        self.successor = successor
        self.handedOver = False
        self._takeoverEnv = {}
        self._holding = []
        self.count = count
        self.pluginArguments = pluginArguments
        self.argv = None
        self.reactor = reactor
        self.killTime = stopTimeout
        env = dict(os.environ if env is None else env)
        for name in PRIVATE_ENVIRONMENT:
            env.pop(name, None)
        self.env = env
        self.workers = {}

    def startService(self):
        if self.argv is None:
            # Only now: the pid must be the running (maybe daemonized) process's.
            self.argv = workerCommand(self.pluginArguments, os.getpid())
            for i in range(1, self.count + 1):
                self.addProcess(f"worker-{i}", self.argv, env=self.env)
        if self.successor:
            # Not yet: the old supervisor's workers are to be taken over.
            Service.startService(self)
            return
        super().startService()

    # Live takeover (etcdgw.takeover)

    def _environmentFor(self, name):
        return self._takeoverEnv.pop(name, {})

    def _names(self):
        return [f"worker-{i}" for i in range(1, self.count + 1)]

    def takeoverAddresses(self):
        """
        The control sockets of the workers running now (the old supervisor's
        side of a takeover).
        """
        from etcdgw.takeover import workerControl

        return [
            workerControl(worker.transport.pid)
            for _, worker in sorted(self.workers.items())
            if worker.talked and worker.transport is not None
        ]

    def takeOverFrom(self, addresses):
        """
        The successor supervisor's side: start a worker for each old one's
        control socket, taking over from it up to holding (adopted, waiting
        for L{takeoverCommitted}); the other workers start then.

        @return: a Deferred firing once every one holds; failing if one
            ends first.
        """
        from etcdgw.takeover import ENVIRONMENT_FROM, ENVIRONMENT_HOLD

        names = self._names()
        waiting = []
        for name, address in zip(names, addresses):
            self._takeoverEnv[name] = {ENVIRONMENT_FROM: address, ENVIRONMENT_HOLD: "1"}
            self.startProcess(name)
            worker = self.workers.get(name)
            if worker is None:
                return defer.fail(RuntimeError(f"cannot start {name}"))
            self._holding.append(worker)
            waiting.append(worker.holding)
        self.log.info(
            "takeover: {count} worker(s) taking over from the old supervisor's",
            count=len(waiting),
        )
        d = defer.gatherResults(waiting, consumeErrors=True)
        d.addErrback(lambda f: f.value.subFailure if hasattr(f.value, "subFailure") else f)
        return d

    def takeoverCommitted(self):
        """
        The takeover committed: each holding worker answers ready to its old
        one (SIGUSR1); the workers not taking over start now.
        """
        holding, self._holding = self._holding, []
        for worker in holding:
            try:
                worker.transport.signalProcess(signal.SIGUSR1)
            except ProcessExitedAlready:
                pass
        self.successor = False
        if self.running:
            for name in self._names():
                self.startProcess(name)  # does nothing for one running

    def abandonTakeover(self):
        """
        The takeover failed: the workers started for it go (they hold
        copies only: the old workers serve on).
        """
        holding, self._holding = self._holding, []
        self.running = False
        for worker in holding:
            try:
                worker.transport.signalProcess("KILL")
            except ProcessExitedAlready:
                pass

    def handOver(self):
        """
        The old supervisor's side, once committed: its workers hand over to
        the successor's and exit by themselves; none is stopped or restarted
        from here.
        """
        self.handedOver = True

    def _spawned(self, worker):
        self.workers[worker.name] = worker
        self.log.info("started {worker} (pid {pid})", worker=worker.name, pid=worker.transport.pid)
        worker.ended.addCallback(self._ended, worker)

    def _ended(self, status, worker):
        name = worker.name
        if self.workers.get(name) is worker:
            del self.workers[name]
        restart = self.restart.get(name)
        if not self.running or restart is None or not restart.active():
            return status
        # What procmon has just scheduled, to the millisecond (the reactor's
        # clock moved on a little since).
        delay = round(max(0.0, restart.getTime() - self.reactor.seconds()), 3)
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
                try:
                    worker.transport.signalProcess(signal.SIGHUP)
                except ProcessExitedAlready:
                    pass
                told.append(name)
            else:
                starting.append(name)
        self.log.info(
            "SIGHUP passed on to {count} worker(s); {starting} still starting",
            count=len(told), workers=told, starting=len(starting),
        )

    def stopService(self):
        """
        Stop restarting; SIGTERM each worker, SIGKILL one still there after
        C{killTime} (procmon's stop).

        @return: a Deferred that fires once every worker has exited.
        """
        if self.handedOver or self.successor:
            # Handed over (the workers hand over, then exit), or never
            # started (a successor whose takeover failed).
            Service.stopService(self)
            for call in list(self.restart.values()):
                if call.active():
                    call.cancel()
            return defer.succeed(None)
        ended = [worker.ended for worker in self.workers.values()]
        super().stopService()
        return defer.DeferredList(ended)


class SupervisorWatch(PeriodicService):
    """
    In a worker: stop the process when its supervisor is gone (the worker
    was re-parented), the same way SIGTERM would.
    """

    log = Logger()
    roundName = "supervisor watch"

    def __init__(self, supervisor, reactor, stop, getppid=os.getppid, interval=1.0,
                 busy=lambda: False):
        # The first look comes after one interval: startService runs before
        # the reactor does, and stopping a reactor not yet running does nothing.
        super().__init__(reactor, interval)
        self.supervisor = supervisor
        self._stop = stop
        self._getppid = getppid
        #: Whether the worker is handing its connections over (then it
        #: outlives its supervisor until done).
        self._busy = busy

    def runRound(self):
        if self._getppid() != self.supervisor and not self._busy():
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
