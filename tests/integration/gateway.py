"""
Run the gateway as a real process, the way users do: C{twistd -n etcd-gateway}.

    gw = GatewayProcess(["--endpoints=" + cluster.endpoints, "--retry-delay=1s"])
    gw.start()                    # blocks until the listen port accepts TCP
    try:
        etcdctl(gw.address, "put", "k", "v")
    finally:
        code = gw.stop()          # SIGTERM, wait, exit code
    self.assertIn("ready to proxy client requests", gw.log())

The process is twistd run by this interpreter (C{sys.executable -c "...twistd
run()" -n ...}), from the current directory (the repository root under
trial), so the plugin is found either installed or from the checkout.  Note
that C{python -m twisted} is I{twist}, not twistd: it has no C{-n} and no
pidfile; C{runner="twist"} uses it instead.  Each process gets its own
directory holding C{gateway.log} (stdout and stderr) and C{twistd.pid}, so
several gateways can run at once.
"""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from .etcd import HOST, _live, _tail, freePort


REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def checkoutEnvironment(env=None):
    """
    C{env} (default: this process's) with this checkout first on
    C{PYTHONPATH}, so a child process runs this tree's code and plugin, not
    an installed copy (trial runs tests from _trial_temp, not the repository).
    """
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(
        [REPOSITORY] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    return env

# twisted.scripts.twistd has no __main__ guard, so "-m" would not run it.
_TWISTD = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"


def _listeningPorts():
    """
    The set of local TCP ports in LISTEN state, or C{None} without /proc.
    """
    ports = set()
    found = False
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        found = True
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "0A":
                ports.add(int(fields[1].rpartition(":")[2], 16))
    return ports if found else None


def _listeningUnix(path):
    """
    Is a unix socket listening on C{path}?  Read from /proc/net/unix (the
    flag C{__SO_ACCEPTCON}, 0x10000, marks a listening socket); without
    /proc, whether C{path} is a socket.
    """
    import stat

    try:
        with open("/proc/net/unix") as f:
            lines = f.readlines()[1:]
    except OSError:
        try:
            return stat.S_ISSOCK(os.stat(path).st_mode)
        except OSError:
            return False
    for line in lines:
        fields = line.split()
        if len(fields) >= 8 and fields[7] == path and int(fields[3], 16) & 0x10000:
            return True
    return False


class GatewayStartError(Exception):
    """
    The gateway exited, or did not listen, while starting.
    """


class GatewayProcess:
    """
    One C{twistd -n etcd-gateway} process.

    @param args: gateway flags after C{--listen-addr}, e.g.
        C{["--endpoints=127.0.0.1:2379", "--retry-delay=1s"]}.
    @param listen: the C{--listen-addr} value; default C{127.0.0.1:<free port>}.
        C{":port"} is connected to on 127.0.0.1.  C{"unix:PATH"} listens on
        a unix socket: then L{unixPath} is the path and L{address} is
        C{unix://PATH}, the form etcdctl 3.4 accepts (it refuses C{unix:PATH}).
    @param env: extra environment variables for the process.
    @param cwd: working directory (default: this process's).
    @param runner: C{"twistd"} (C{twistd -n}, the documented way) or
        C{"twist"} (C{python -m twisted}).
    @param twistdArgs: runner options before the plugin name (twistd's
        default: C{--pidfile=<own dir>/twistd.pid}, so gateways never share
        a pidfile; twist's default: C{--log-format=text}).
    """

    plugin = "etcd-gateway"

    def __init__(
        self, args=(), listen=None, env=None, cwd=None, twistdArgs=None, runner="twistd"
    ):
        if runner not in ("twistd", "twist"):
            raise ValueError("runner must be 'twistd' or 'twist', not {!r}".format(runner))
        self.runner = runner
        self.args = list(args)
        self.listen = listen if listen is not None else "{}:{}".format(HOST, freePort())
        self.directory = tempfile.mkdtemp(prefix="etcdgw-gw-")
        self.logPath = os.path.join(self.directory, "gateway.log")
        self.env = dict(os.environ)
        self.env["PYTHONUNBUFFERED"] = "1"
        # Run this checkout's code (and plugin), not an installed copy: under
        # trial the working directory is _trial_temp, not the repository.
        self.env = checkoutEnvironment(self.env)
        if env:
            self.env.update(env)
        self.cwd = cwd
        if twistdArgs is None:
            twistdArgs = []
            if runner == "twistd":
                twistdArgs = ["--pidfile=" + os.path.join(self.directory, "twistd.pid")]
            else:
                twistdArgs = ["--log-format=text"]
        self.twistdArgs = list(twistdArgs)
        self.process = None
        self.returncode = None

    @property
    def argv(self):
        """
        The full command line.
        """
        if self.runner == "twist":
            head = [sys.executable, "-m", "twisted"]
        else:
            head = [sys.executable, "-c", _TWISTD, "-n"]
        return (
            head
            + self.twistdArgs
            + [self.plugin, "--listen-addr=" + self.listen]
            + self.args
        )

    @property
    def unixPath(self):
        """
        The socket path of a C{unix:PATH} listener (Twisted's endpoint
        syntax: options such as C{:mode=660} follow the path), else L{None}.
        """
        if not self.listen.startswith("unix:"):
            return None
        return self.listen[len("unix:"):].split(":", 1)[0]

    @property
    def host(self):
        host, _, _ = self.listen.rpartition(":")
        host = host.strip("[]")
        return host if host not in ("", "0.0.0.0", "::") else HOST

    @property
    def port(self):
        return int(self.listen.rpartition(":")[2])

    @property
    def address(self):
        """
        C{"host:port"} for clients, e.g. for C{etcdctl --endpoints}
        (C{"unix:///path"} for a unix listener).
        """
        if self.unixPath is not None:
            return "unix://" + os.path.abspath(self.unixPath)
        host = self.host
        if ":" in host:
            host = "[{}]".format(host)
        return "{}:{}".format(host, self.port)

    @property
    def pid(self):
        return None if self.process is None else self.process.pid

    def running(self):
        return self.process is not None and self.process.poll() is None

    def log(self):
        """
        Everything the process has written to stdout and stderr so far.
        """
        try:
            with open(self.logPath, "r", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def start(self, timeout=15):
        """
        Start the process and block until its listen port is listening
        (accepts TCP connections).  Returns C{self}.

        @raise GatewayStartError: when the process exits first, or after
            C{timeout} seconds (the process is killed then); the message
            holds the command line and the log tail.
        """
        if self.running():
            raise RuntimeError("gateway already running")
        with open(self.logPath, "ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        _live.add(self.process)
        self.returncode = None
        deadline = time.monotonic() + timeout
        while True:
            code = self.process.poll()
            if code is not None:
                self._reaped()
                raise GatewayStartError(
                    "gateway exited with {} before listening on {}\n  {}\nlog tail:\n{}".format(
                        code, self.listen, " ".join(self.argv), _tail(self.logPath)
                    )
                )
            if self._accepts():
                return self
            if time.monotonic() > deadline:
                self.process.kill()
                self.process.wait()
                self._reaped()
                raise GatewayStartError(
                    "gateway not listening on {} after {}s\n  {}\nlog tail:\n{}".format(
                        self.listen, timeout, " ".join(self.argv), _tail(self.logPath)
                    )
                )
            time.sleep(0.05)

    def _accepts(self):
        """
        Is the listen port in LISTEN state?  Read from /proc/net/tcp{,6}
        where there is one, so that no connection is made: a probe
        connection would be a client to the gateway, which would dial an
        upstream for it and skew what the test measures.
        A unix listener: its path is a listening socket (/proc/net/unix).
        """
        if self.unixPath is not None:
            return _listeningUnix(os.path.abspath(self.unixPath))
        listening = _listeningPorts()
        if listening is not None:
            return self.port in listening
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def _reaped(self):
        self.returncode = self.process.returncode
        _live.discard(self.process)

    def waitForLog(self, text, timeout=10):
        """
        Block until C{text} appears in the log; return the log.

        @raise AssertionError: after C{timeout} seconds, with the log tail.
        """
        deadline = time.monotonic() + timeout
        while True:
            log = self.log()
            if text in log:
                return log
            if time.monotonic() > deadline:
                raise AssertionError(
                    "{!r} not in gateway log after {}s; tail:\n{}".format(
                        text, timeout, _tail(self.logPath)
                    )
                )
            time.sleep(0.05)

    def signal(self, signum):
        os.kill(self.process.pid, signum)

    def wait(self, timeout=10):
        """
        Wait for the process to exit on its own; return its exit code
        (negative: killed by that signal).
        """
        self.process.wait(timeout)
        self._reaped()
        return self.returncode

    def stop(self, timeout=10):
        """
        SIGTERM the process and wait for it; return its exit code (negative:
        killed by that signal: plain twistd re-raises SIGTERM after its
        shutdown, giving C{-15}; the gateway's own drain exits with C{0}).  After C{timeout} seconds it is SIGKILLed and
        C{AssertionError} is raised: a gateway must stop on SIGTERM.
        Safe to call again; returns the same code.
        """
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                self._reaped()
                raise AssertionError(
                    "gateway did not exit {}s after SIGTERM; log tail:\n{}".format(
                        timeout, _tail(self.logPath)
                    )
                )
        self._reaped()
        return self.returncode

    def cleanup(self):
        """
        Stop the process if it runs (never raises) and remove its directory.
        Meant for C{self.addCleanup(gw.cleanup)}.
        """
        try:
            self.stop()
        except AssertionError:
            pass
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.cleanup()
        return False
