import signal

from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.internet.error import ProcessTerminated
from twisted.trial.unittest import SynchronousTestCase

from etcdgw.tap import Options
from etcdgw.workers import SupervisorWatch, WorkersService, workerArguments


class WorkerArgumentsTests(SynchronousTestCase):
    def test_dropsSupervisorOnlyFlags(self):
        """Workers get the same flags, less --workers and --metrics-addr, plus --worker-of."""
        self.assertEqual(
            workerArguments(
                ["--endpoints=a:1", "--workers", "4", "--metrics-addr=127.0.0.1:9", "--retry-delay=1s"],
                123,
            ),
            ["--endpoints=a:1", "--retry-delay=1s", "--worker-of=123"],
        )

    def test_options(self):
        """--workers takes 1 to 256 and needs a fixed TCP port above 1."""
        o = Options()
        o.parseOptions(["--workers=3", "--listen-addr=127.0.0.1:23790"])
        self.assertEqual(o["workers"], 3)
        self.assertEqual(o.arguments, ["--workers=3", "--listen-addr=127.0.0.1:23790"])
        for args, message in [
            (["--workers=0"], "not a number from 1 to 256"),
            (["--workers=x"], "not a number from 1 to 256"),
            (["--workers=2", "--listen-addr=unix:/tmp/gw.sock"], "needs a TCP --listen-addr"),
            (["--workers=2", "--listen-addr=127.0.0.1:0"], "with a fixed port"),
        ]:
            e = self.assertRaises(usage.UsageError, Options().parseOptions, args)
            self.assertIn(message, str(e))


class FakeProcess:
    def __init__(self, pid):
        self.pid = pid
        self.signals = []

    def signalProcess(self, signum):
        # As Twisted's processes: a signal's name ("TERM", what procmon
        # sends) or its number; recorded as the number.
        if isinstance(signum, str):
            signum = getattr(signal, "SIG" + signum)
        self.signals.append(signum)


class ProcessReactor(MemoryReactorClock):
    def __init__(self):
        super().__init__()
        self.spawned = []

    def spawnProcess(self, protocol, executable, args, env=None, **kw):
        process = FakeProcess(1000 + len(self.spawned))
        self.spawned.append((protocol, args, env, process))
        protocol.makeConnection(process)
        return process


def exit(protocol, code, signum=None):
    protocol.processEnded(Failure(ProcessTerminated(exitCode=code, signal=signum)))


class WorkersServiceTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = ProcessReactor()
        self.service = WorkersService(
            2, ["--endpoints=a:1", "--workers=3"], self.reactor, stopTimeout=7,
            env={"NOTIFY_SOCKET": "/run/x", "PATH": "/bin"},
        )

    def test_startsWorkers(self):
        """Each worker runs the gateway with the worker flags, without systemd's variables."""
        self.service.startService()
        self.assertEqual(len(self.reactor.spawned), 2)
        protocol, args, env, process = self.reactor.spawned[0]
        self.assertIn("etcd-gateway", args)
        self.assertEqual(args[-2:][0], "--endpoints=a:1")
        self.assertTrue(args[-1].startswith("--worker-of="))
        self.assertEqual(env, {"PATH": "/bin"})

    def test_restartsDeadWorker(self):
        """A worker that exits is restarted after a delay, logged."""
        self.service.startService()
        protocol = self.reactor.spawned[0][0]
        exit(protocol, 1)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.reactor.advance(self.service.minRestartDelay)  # 2s
        self.assertEqual(len(self.reactor.spawned), 3)
        self.assertEqual(set(self.service.workers), {"worker-1", "worker-2"})

    def test_restartBacksOff(self):
        """
        A worker that dies within 10s is restarted after 2s, then 4s, 8s,
        16s, at most 30s; after a longer run, at once, and the delay starts
        again at 2s.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.service.startService()

        def die(ranFor):
            self.reactor.advance(ranFor)
            exit(self.service.workers["worker-1"], 1)
            delay = [e for e in events if e.get("worker") == "worker-1"][-1]["delay"]
            self.reactor.advance(delay)
            return delay

        self.assertEqual([die(1) for _ in range(6)], [2.0, 4.0, 8.0, 16.0, 30.0, 30.0])
        self.assertEqual(die(11), 0.0)
        self.assertEqual(die(1), 2.0)
        self.assertEqual(len(self.reactor.spawned), 2 + 8)
        self.service.stopService()

    def test_outputLoggedWhole(self):
        """
        A worker's output is logged a line at a time with its name, however
        long the line (procmon's own line logger raises past 16 KiB), and an
        unfinished last line when the worker ends.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.service.startService()
        protocol = self.reactor.spawned[0][0]
        long = "x" * 100_000
        protocol.outReceived(b"one\n" + long[:50_000].encode())
        protocol.errReceived(long[50_000:].encode() + b"\nlast \xff")
        exit(protocol, 0)
        lines = [(e["worker"], e["line"]) for e in events if "line" in e]
        self.assertEqual(
            lines, [("worker-1", "one"), ("worker-1", long), ("worker-1", "last \ufffd")]
        )
        self.service.stopService()

    def test_killedWorkerNamesTheSignal(self):
        """A worker killed by a signal is logged with the signal's name, not "status None"."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.service.startService()
        exit(self.reactor.spawned[0][0], None, signal.SIGKILL)
        (event,) = [e for e in events if e.get("worker") == "worker-1" and "delay" in e]
        self.assertEqual(event["signal"], "SIGKILL")
        self.assertEqual(
            formatEvent(event), "worker-1 was killed by SIGKILL; restarting it in 2.0s"
        )
        exit(self.reactor.spawned[1][0], 3)
        self.assertEqual(
            formatEvent(events[-1]), "worker-2 exited with status 3; restarting it in 2.0s"
        )
        self.service.stopService()
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_reloadPassesSIGHUPOn(self):
        """SIGHUP is passed on to every worker that runs, skipping one still starting; one line."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.service.startService()
        (p1, _, _, proc1), (p2, _, _, proc2) = self.reactor.spawned
        p1.outReceived(b"twistd starting up\n")
        self.service.reload()
        self.assertEqual((proc1.signals, proc2.signals), ([signal.SIGHUP], []))
        p2.errReceived(b"starting")
        self.service.reload()
        self.assertEqual((proc1.signals, proc2.signals), ([signal.SIGHUP] * 2, [signal.SIGHUP]))
        lines = [formatEvent(e) for e in events if "SIGHUP" in e["log_format"]]
        self.assertEqual(
            lines,
            [
                "SIGHUP passed on to 1 worker(s); 1 still starting",
                "SIGHUP passed on to 2 worker(s); 0 still starting",
            ],
        )

    def test_workerIgnoresSIGHUPUntilItHandlesIt(self):
        """A worker's command ignores SIGHUP before anything else (its default would kill it)."""
        self.service.startService()
        args = self.reactor.spawned[0][1]
        code = args[args.index("-c") + 1]
        self.assertTrue(code.startswith(
            "import signal, sys; signal.signal(signal.SIGHUP, signal.SIG_IGN); "
        ))

    def test_stopWaitsForWorkers(self):
        """Stopping sends SIGTERM and waits; a worker still there after the timeout is killed."""
        self.service.startService()
        d = self.service.stopService()
        (p1, _, _, proc1), (p2, _, _, proc2) = self.reactor.spawned
        self.assertEqual(proc1.signals, [signal.SIGTERM])
        exit(p1, 0)
        self.assertNoResult(d)
        self.reactor.advance(7)
        self.assertEqual(proc2.signals, [signal.SIGTERM, signal.SIGKILL])
        exit(p2, None)
        self.successResultOf(d)
        self.assertEqual(len(self.reactor.spawned), 2)  # none restarted
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class SupervisorWatchTests(SynchronousTestCase):
    def test_stopsWhenOrphaned(self):
        """A worker whose parent is no longer the supervisor stops itself."""
        reactor = MemoryReactorClock()
        parent = [42]
        stopped = []
        watch = SupervisorWatch(42, reactor, lambda: stopped.append(True), getppid=lambda: parent[0])
        watch.startService()
        reactor.advance(5)
        self.assertEqual(stopped, [])
        parent[0] = 1
        reactor.advance(1)
        self.assertEqual(stopped, [True])
        watch.stopService()
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_handingOverOutlivesSupervisor(self):
        """A worker handing its connections over outlives its supervisor until done."""
        reactor = MemoryReactorClock()
        busy = [True]
        stopped = []
        watch = SupervisorWatch(42, reactor, lambda: stopped.append(True), getppid=lambda: 1,
                                busy=lambda: busy[0])
        watch.startService()
        reactor.advance(3)
        self.assertEqual(stopped, [])
        busy[0] = False
        reactor.advance(1)
        self.assertEqual(stopped, [True])
        watch.stopService()


class TakeoverTests(SynchronousTestCase):
    """
    Live takeover with --workers (etcdgw.takeover): the successor
    supervisor's workers take over from the old one's.
    """

    def setUp(self):
        self.reactor = ProcessReactor()
        self.service = WorkersService(
            2, ["--endpoints=a:1", "--workers=3"], self.reactor, stopTimeout=7,
            env={"PATH": "/bin"}, successor=True,
        )

    def test_successorWaits(self):
        """
        A successor supervisor starts no worker until the old one's are
        known; each started to take over gets the old worker's control
        socket and "hold" in its environment, once.
        """
        self.service.startService()
        self.assertEqual(self.reactor.spawned, [])
        d = self.service.takeOverFrom(["@etcd-gateway-takeover-11"])
        [(protocol, args, env, process)] = self.reactor.spawned
        self.assertEqual(env["ETCDGW_TAKEOVER_FROM"], "@etcd-gateway-takeover-11")
        self.assertEqual(env["ETCDGW_TAKEOVER_HOLD"], "1")
        self.assertNoResult(d)
        protocol.outReceived(b"... takeover: holding: adopted, waiting\n")
        self.successResultOf(d)
        self.service.takeoverCommitted()
        self.assertEqual(process.signals, [signal.SIGUSR1])
        # The other worker starts now, plainly.
        self.assertEqual(len(self.reactor.spawned), 2)
        self.assertNotIn("ETCDGW_TAKEOVER_FROM", self.reactor.spawned[1][2])
        # A restart of the first is plain too.
        exit(protocol, 0)
        self.reactor.advance(60)
        self.assertNotIn("ETCDGW_TAKEOVER_FROM", self.reactor.spawned[-1][2])

    def test_workerFails(self):
        """
        A worker that ends before holding fails the takeover; abandoning it
        kills the workers started for it, and stopping kills nothing else.
        """
        self.service.startService()
        d = self.service.takeOverFrom(["@a", "@b"])
        (p1, _, _, process1), (p2, _, _, process2) = self.reactor.spawned
        p1.outReceived(b"takeover: holding\n")
        exit(p2, 1)
        self.failureResultOf(d, RuntimeError)
        self.service.abandonTakeover()
        self.assertEqual(process1.signals, [signal.SIGKILL])
        self.successResultOf(self.service.stopService())

    def test_oldSideHandsOver(self):
        """
        The old supervisor names its running workers' control sockets; once
        handed over, its stop signals none of them.
        """
        service = WorkersService(1, ["--workers=2"], self.reactor, stopTimeout=7, env={})
        service.startService()
        [(protocol, _, _, process)] = self.reactor.spawned
        self.assertEqual(service.takeoverAddresses(), [])  # silent yet: still starting
        protocol.outReceived(b"started\n")
        self.assertEqual(service.takeoverAddresses(), ["@etcd-gateway-takeover-1000"])
        service.handOver()
        self.successResultOf(service.stopService())
        self.assertEqual(process.signals, [])
