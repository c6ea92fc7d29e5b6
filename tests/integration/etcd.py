"""
Run real etcd members on 127.0.0.1 for integration tests.

Everything here is synchronous (subprocess + short blocking polls, each a
fraction of a second): fine in a trial test's C{setUp} or body, though it
blocks the reactor meanwhile.  The one asynchronous helper is
L{etcdctlDeferred}, for when the reactor must keep running (a gateway in
the test's own process).

Typical use, one cluster per test class (see L{ClusterTestMixin}: trial
never calls C{setUpClass}, so the mixin does the equivalent)::

    from twisted.trial import unittest
    from tests.integration.etcd import ClusterTestMixin

    class ThingTests(ClusterTestMixin, unittest.TestCase):
        clusterSize = 3

        def test_thing(self):
            rc, out, err = self.cluster.etcdctl("put", "k", "v")
            self.assertEqual(rc, 0, err)

or by hand::

    requireEtcd()
    cluster = EtcdCluster(size=3)
    cluster.start()            # blocks until every member is healthy
    try:
        cluster.endpoints      # "127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3"
        cluster.kill(0)        # SIGKILL member 0 (its data dir is kept)
        cluster.restart(0)     # start it again; it rejoins
    finally:
        cluster.stop()         # stop everything, remove the data dirs

TLS on the client URLs (peers stay plain http)::

    tls = generateTLS(directory, size=3)          # a CA + one cert per member
    cluster = EtcdCluster(size=3, tls=tls)        # client URLs are https://
    cluster.etcdctl("get", "k")                   # passes --cacert for you
"""

import atexit
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from twisted.trial.unittest import SkipTest

ETCD = "etcd"
ETCDCTL = "etcdctl"
HOST = "127.0.0.1"

# Fast failure detection for tests: a leader is re-elected in about a second.
HEARTBEAT_MS = 50
ELECTION_MS = 500


def requireEtcd():
    """
    Skip the calling test unless the etcd and etcdctl binaries are on PATH.

    When the environment variable C{CI} is set, missing binaries are an error
    (C{RuntimeError}) instead: CI must never silently skip integration tests.
    """
    missing = [name for name in (ETCD, ETCDCTL) if shutil.which(name) is None]
    if not missing:
        return
    message = "{} not found on PATH; install with: apt-get install etcd-server etcd-client".format(
        " and ".join(missing)
    )
    if os.environ.get("CI"):
        raise RuntimeError("CI is set and " + message)
    raise SkipTest(message)


def freePorts(count, host=HOST):
    """
    Return C{count} distinct TCP ports that were free on C{host} a moment ago.

    All the sockets are held open together so the kernel never hands out the
    same port twice; there is still a small window before the caller binds.
    An IPv6 C{host} (C{"::1"}) is bound with an IPv6 socket.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(family, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def freePort(host=HOST):
    """
    Return one TCP port that was free on C{host} a moment ago.
    """
    return freePorts(1, host)[0]


def _tail(path, lines=30):
    try:
        with open(path, "r", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError as e:
        return "<no log: {}>".format(e)


def _etcdctlCommand(endpoints, args, timeout, tls):
    if not isinstance(endpoints, str):
        endpoints = ",".join(endpoints)
    dial = max(1, int(min(timeout, 5)))
    argv = [
        ETCDCTL,
        "--endpoints=" + endpoints,
        "--dial-timeout={}s".format(dial),
        "--command-timeout={}s".format(max(1, int(timeout))),
    ]
    if tls is not None:
        argv.append("--cacert=" + tls.ca)
        if tls.clientCert:
            argv += ["--cert=" + tls.clientCert, "--key=" + tls.clientKey]
    return argv + [str(a) for a in args]


def _etcdctlEnv(env):
    full = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL_")}
    full["ETCDCTL_API"] = "3"
    if env:
        full.update(env)
    return full


def etcdctl(endpoints, *args, timeout=10, env=None, tls=None):
    """
    Run C{etcdctl --endpoints=ENDPOINTS ARGS...} (API v3) and wait for it.

    @param endpoints: C{"host:port,host:port"} or a list of C{"host:port"}.
    @param timeout: seconds; used for --command-timeout, caps --dial-timeout
        at 5 s, and the process is killed after C{timeout + 5} seconds
        (raising L{subprocess.TimeoutExpired}).
    @param env: extra environment variables (C{ETCDCTL_*} from the caller's
        environment are dropped first so they cannot leak in).
    @param tls: a L{TLSConfig}: adds C{--cacert} (and the client cert if set).
        The scheme is taken from C{endpoints} (C{https://...} for TLS).
    @return: C{(returncode, stdout, stderr)} with text output.
    """
    result = subprocess.run(
        _etcdctlCommand(endpoints, args, timeout, tls),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=_etcdctlEnv(env),
        timeout=timeout + 5,
    )
    return result.returncode, result.stdout, result.stderr


def etcdctlDeferred(endpoints, *args, timeout=10, env=None, tls=None, reactor=None):
    """
    Like L{etcdctl} but without blocking: a Deferred firing with
    C{(returncode, stdout, stderr)} (text).  Use inside a running reactor,
    for example while a gateway in this process forwards the connection.
    A negative return code means the process died of that signal.
    """
    from twisted.internet.utils import getProcessOutputAndValue

    if reactor is None:
        from twisted.internet import reactor
    argv = _etcdctlCommand(endpoints, args, timeout, tls)
    d = getProcessOutputAndValue(
        shutil.which(ETCDCTL) or ETCDCTL, argv[1:], env=_etcdctlEnv(env), reactor=reactor
    )

    def decode(result):
        out, err, code = result
        return code, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")

    def signalled(failure):
        # getProcessOutputAndValue errbacks with (out, err, signalNum) on a signal.
        out, err, signum = failure.value
        return -signum, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")

    d.addCallbacks(decode, signalled)
    return d


@dataclass(frozen=True)
class TLSConfig:
    """
    TLS for the members' client URLs.

    @ivar ca: path of the CA certificate (PEM) that signed every member cert.
    @ivar certs: one C{(certFile, keyFile)} per member, in member order.
    @ivar clientCertAuth: when true, members require client certificates
        signed by C{ca} (etcd's C{--client-cert-auth}).
    @ivar clientCert: C{clientKey}: a client certificate and key that
        L{etcdctl} presents, for clusters with C{clientCertAuth}.
    """

    ca: str
    certs: Tuple[Tuple[str, str], ...]
    clientCertAuth: bool = False
    clientCert: Optional[str] = None
    clientKey: Optional[str] = None

    @classmethod
    def coerce(cls, value):
        """
        Accept a L{TLSConfig}, or a dict with the same keys, or C{None}.
        """
        if value is None or isinstance(value, cls):
            return value
        value = dict(value)
        value["certs"] = tuple(tuple(pair) for pair in value["certs"])
        return cls(**value)


def waitUntil(condition, timeout, interval=0.05, message="condition"):
    """
    Poll C{condition()} until it returns a true value, which is returned.

    @raise AssertionError: after C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} not reached after {timeout}s")
        time.sleep(interval)


def generateTLS(directory, size=3, hostnames=("localhost",), ips=(HOST,), clientCert=True):
    """
    Write a throw-away CA and one server certificate per member into
    C{directory}, and return a L{TLSConfig} for them.

    Each server certificate has the subject alternative names C{hostnames}
    (DNS) and C{ips} (IP), so clients can verify C{https://127.0.0.1:port}
    and C{https://localhost:port}; it allows client use too (etcd's gRPC
    gateway dials the member with it).  With C{clientCert}, a client
    certificate (extended key usage clientAuth) is written too.
    """
    from tests.certs import CertificateAuthority

    ca = CertificateAuthority("etcdgw test CA")
    certs = tuple(
        ca.issue(directory, "member{}".format(i), hostnames, ips=ips) for i in range(size)
    )
    client = (None, None)
    if clientCert:
        client = ca.issue(directory, "client", (), ips=(), client=True)
    return TLSConfig(
        ca=ca.write(directory), certs=certs, clientCert=client[0], clientKey=client[1]
    )


class EtcdStartError(Exception):
    """
    A member did not become healthy in time, or exited while starting.
    """


# Every live process and unstopped cluster started here, so a crashed or
# interrupted test run leaves no orphan processes or directories.
_live = set()
_liveClusters = set()


@atexit.register
def _killOrphans():
    for cluster in list(_liveClusters):
        cluster.stop()
    for proc in list(_live):
        if proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
                proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                pass


@dataclass
class _Member:
    name: str
    clientPort: int
    peerPort: int
    directory: str
    initialCluster: str
    initialState: str = "new"
    process: Optional[subprocess.Popen] = None
    frozen: bool = False
    removed: bool = False

    @property
    def dataDir(self):
        return os.path.join(self.directory, "data")

    @property
    def logPath(self):
        return os.path.join(self.directory, "etcd.log")

    @property
    def peerURL(self):
        return "http://{}:{}".format(HOST, self.peerPort)


class EtcdCluster:
    """
    A real etcd cluster of C{size} members on 127.0.0.1.

    Each member gets a free client and peer port and its own directory under
    C{/dev/shm} (falling back to the default temp dir) holding C{data/} and
    C{etcd.log} (stdout and stderr).  Members are numbered from 0.  Peer URLs
    are always plain http; client URLs are https when C{tls} is given.

    @param size: number of members.
    @param tls: a L{TLSConfig} (or a dict of its fields) or C{None}.
    @param extraArgs: more etcd flags, given to every member.
    @param clientHost: the address the members' client URLs listen on and
        advertise (default 127.0.0.1; C{"::1"} for members reached over IPv6
        only). Peer URLs stay on 127.0.0.1.

    @ivar changed: C{time.monotonic()} when the last membership change
        (L{addMember}, L{removeMember}) was accepted by the cluster, before
        the harness waits for anything else; L{None} before the first.
    """

    def __init__(self, size=3, tls=None, extraArgs: Sequence[str] = (), clientHost=HOST):
        if size < 1:
            raise ValueError("size must be at least 1")
        self.tls = TLSConfig.coerce(tls)
        if self.tls is not None and len(self.tls.certs) < size:
            raise ValueError(
                "tls.certs has {} entries for {} members".format(len(self.tls.certs), size)
            )
        self.size = size
        self.extraArgs = list(extraArgs)
        self.clientHost = clientHost
        self.changed = None
        shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        self.directory = tempfile.mkdtemp(prefix="etcdgw-it-", dir=shm)
        self.token = os.path.basename(self.directory)
        ports = freePorts(2 * size)
        self.members: List[_Member] = []
        for i in range(size):
            self.members.append(
                _Member(
                    name="etcd{}".format(i),
                    clientPort=ports[2 * i],
                    peerPort=ports[2 * i + 1],
                    directory=os.path.join(self.directory, "etcd{}".format(i)),
                    initialCluster="",
                )
            )
        initial = ",".join("{}={}".format(m.name, m.peerURL) for m in self.members)
        for m in self.members:
            m.initialCluster = initial
            os.mkdir(m.directory)

    # -- addresses -----------------------------------------------------

    @property
    def scheme(self):
        return "https" if self.tls is not None else "http"

    @property
    def _clientHostInURL(self):
        host = self.clientHost
        return "[{}]".format(host) if ":" in host else host

    def clientAddress(self, i):
        """
        C{"127.0.0.1:port"} of member C{i}'s client URL (C{"[::1]:port"} with
        C{clientHost="::1"}).
        """
        return "{}:{}".format(self._clientHostInURL, self.members[i].clientPort)

    def clientPort(self, i):
        return self.members[i].clientPort

    def clientURL(self, i):
        """
        C{"http://127.0.0.1:port"} (or https with TLS) of member C{i}.
        """
        return "{}://{}".format(self.scheme, self.clientAddress(i))

    def peerURL(self, i):
        return self.members[i].peerURL

    def _indexes(self):
        return [i for i, m in enumerate(self.members) if not m.removed]

    @property
    def endpoints(self):
        """
        C{"127.0.0.1:p1,127.0.0.1:p2,..."}: every member's client address
        (members removed with L{removeMember} left out), in member order.
        """
        return ",".join(self.clientAddress(i) for i in self._indexes())

    @property
    def clientURLs(self):
        return ",".join(self.clientURL(i) for i in self._indexes())

    def logPath(self, i):
        return self.members[i].logPath

    def log(self, i):
        """
        The text member C{i} has written to stdout/stderr so far.
        """
        with open(self.members[i].logPath, "r", errors="replace") as f:
            return f.read()

    def dataDir(self, i):
        return self.members[i].dataDir

    def isRunning(self, i):
        proc = self.members[i].process
        return proc is not None and proc.poll() is None

    # -- processes -----------------------------------------------------

    def _argv(self, m):
        argv = [
            ETCD,
            "--name=" + m.name,
            "--data-dir=" + m.dataDir,
            "--listen-client-urls={}://{}:{}".format(
                self.scheme, self._clientHostInURL, m.clientPort
            ),
            "--advertise-client-urls={}://{}:{}".format(
                self.scheme, self._clientHostInURL, m.clientPort
            ),
            "--listen-peer-urls=" + m.peerURL,
            "--initial-advertise-peer-urls=" + m.peerURL,
            "--initial-cluster=" + m.initialCluster,
            "--initial-cluster-state=" + m.initialState,
            "--initial-cluster-token=" + self.token,
            "--heartbeat-interval={}".format(HEARTBEAT_MS),
            "--election-timeout={}".format(ELECTION_MS),
            # A small backend quota: the data dirs live in RAM (/dev/shm).
            "--quota-backend-bytes={}".format(64 * 1024 * 1024),
            "--logger=zap",
            "--log-outputs=stderr",
        ]
        if self.tls is not None:
            index = self.members.index(m)
            cert, key = self.tls.certs[index]
            argv += ["--cert-file=" + cert, "--key-file=" + key, "--trusted-ca-file=" + self.tls.ca]
            if self.tls.clientCertAuth:
                argv.append("--client-cert-auth")
        return argv + self.extraArgs

    def _spawn(self, i):
        m = self.members[i]
        if self.isRunning(i):
            raise RuntimeError("member {} is already running".format(i))
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
        # Append, so a restarted member's log keeps the earlier run too.
        with open(m.logPath, "ab") as log:
            log.write("--- starting {} ---\n".format(" ".join(self._argv(m))).encode())
            log.flush()
            m.process = subprocess.Popen(
                self._argv(m),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        m.frozen = False
        _live.add(m.process)

    def start(self, timeout=30):
        """
        Start every member and block until each answers C{/health} with
        C{"health": "true"}.

        @raise EtcdStartError: on timeout or when a member exits; the message
            holds the member's log tail.  The cluster is stopped and its
            directory removed before raising.
        """
        _liveClusters.add(self)
        try:
            for i in self._indexes():
                self._spawn(i)
            self.waitHealthy(timeout=timeout)
        except BaseException:
            self.stop()
            raise

    def waitHealthy(self, indexes=None, timeout=30):
        """
        Block until each member in C{indexes} (default: every running
        member) reports healthy, which needs a leader and a quorum.  After
        killing or freezing the leader, this waits out the election (about
        a second); writes sent before it may fail with "request timed out,
        possibly due to previous leader failure".

        @raise EtcdStartError: on timeout, or when one of them has exited.
        """
        if indexes is None:
            indexes = [i for i in self._indexes() if self.isRunning(i)]
        deadline = time.monotonic() + timeout
        pending = list(indexes)
        lastError = {}
        while pending:
            for i in list(pending):
                proc = self.members[i].process
                if proc is None or proc.poll() is not None:
                    raise EtcdStartError(
                        "etcd member {} exited with {} while starting; log tail of {}:\n{}".format(
                            i,
                            None if proc is None else proc.returncode,
                            self.members[i].logPath,
                            _tail(self.members[i].logPath),
                        )
                    )
                ok, detail = self.health(i)
                if ok:
                    pending.remove(i)
                else:
                    lastError[i] = detail
            if not pending:
                break
            if time.monotonic() > deadline:
                i = pending[0]
                raise EtcdStartError(
                    "etcd member {} ({}) not healthy after {}s (last answer: {}); "
                    "log tail of {}:\n{}".format(
                        i, self.clientURL(i), timeout, lastError.get(i),
                        self.members[i].logPath, _tail(self.members[i].logPath),
                    )
                )
            time.sleep(0.05)

    def _sslContext(self):
        context = ssl.create_default_context(cafile=self.tls.ca)
        if self.tls.clientCert:
            context.load_cert_chain(self.tls.clientCert, self.tls.clientKey)
        return context

    def health(self, i, timeout=2.0):
        """
        Ask member C{i}'s C{/health}.  Returns C{(healthy, detail)} where
        C{detail} is the body or the error.  Never raises.
        """
        m = self.members[i]
        if self.tls is not None:
            conn = http.client.HTTPSConnection(
                self.clientHost, m.clientPort, timeout=timeout, context=self._sslContext()
            )
        else:
            conn = http.client.HTTPConnection(self.clientHost, m.clientPort, timeout=timeout)
        try:
            conn.request("GET", "/health")
            body = conn.getresponse().read().decode("utf-8", "replace")
        except (OSError, http.client.HTTPException) as e:
            return False, repr(e)
        finally:
            conn.close()
        try:
            healthy = json.loads(body).get("health") in ("true", True)
        except ValueError:
            healthy = False
        return healthy, body

    def _signal(self, i, signum):
        proc = self.members[i].process
        if proc is None or proc.poll() is not None:
            raise RuntimeError("member {} is not running".format(i))
        os.kill(proc.pid, signum)

    def kill(self, i):
        """
        SIGKILL member C{i} and reap it.  Its data dir is kept for L{restart}.
        If it was the leader, call L{waitHealthy} before writing.
        """
        self._signal(i, signal.SIGKILL)
        self._reap(i, timeout=10)

    def _reap(self, i, timeout):
        m = self.members[i]
        code = m.process.wait(timeout)
        _live.discard(m.process)
        m.frozen = False
        return code

    def _stopMember(self, i, timeout):
        m = self.members[i]
        if m.process is None:
            return None
        if m.process.poll() is None:
            # A stopped process keeps SIGTERM pending; wake it first.
            os.kill(m.process.pid, signal.SIGCONT)
            m.process.terminate()
            try:
                return self._reap(i, timeout)
            except subprocess.TimeoutExpired:
                m.process.kill()
        return self._reap(i, 10)

    def stop(self, i=None, timeout=10):
        """
        With C{i}: SIGTERM member C{i}, wait for it (SIGKILL after
        C{timeout} seconds), keep its data dir, return its exit code.

        Without: stop every member and remove the cluster's directory (data
        dirs and logs).  Safe to call more than once.
        """
        if i is not None:
            return self._stopMember(i, timeout)
        for j in range(len(self.members)):
            try:
                self._stopMember(j, timeout)
            except Exception:
                pass
        shutil.rmtree(self.directory, ignore_errors=True)
        _liveClusters.discard(self)
        return None

    def restart(self, i, timeout=30, wait=True):
        """
        Start member C{i} again with its old data dir (stopping it first if
        it runs), so it rejoins the cluster.  With C{wait}, block until it is
        healthy, which needs a quorum of the cluster to be up.
        """
        if self.isRunning(i):
            self._stopMember(i, 10)
        m = self.members[i]
        if m.removed:
            raise RuntimeError("member {} was removed from the cluster".format(i))
        self._spawn(i)
        if wait:
            self.waitHealthy([i], timeout=timeout)

    def freeze(self, i):
        """
        SIGSTOP member C{i}: its sockets stay open but nothing answers, like
        a hung host.  Undo with L{thaw}; L{stop} and L{kill} also wake it.
        """
        self._signal(i, signal.SIGSTOP)
        self.members[i].frozen = True

    def thaw(self, i):
        """
        SIGCONT member C{i} after L{freeze}.
        """
        self._signal(i, signal.SIGCONT)
        self.members[i].frozen = False

    # -- etcdctl and membership ----------------------------------------

    def etcdctl(self, *args, endpoints=None, timeout=10, env=None):
        """
        L{etcdctl} against this cluster (default: every member's client URL),
        with the cluster's TLS settings.
        """
        if endpoints is None:
            endpoints = self.clientURLs
        return etcdctl(endpoints, *args, timeout=timeout, env=env, tls=self.tls)

    def _reconfigure(self, timeout, *args, endpoints=None):
        """
        Run a membership change, retrying while etcd refuses it as
        "unhealthy cluster": with strict reconfig checks (the default) a
        change is refused until every member has been connected for 5 s,
        so right after a restart or thaw it fails for a few seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            rc, out, err = self.etcdctl(*args, endpoints=endpoints)
            if rc == 0:
                return rc, out, err
            if "unhealthy cluster" not in err or time.monotonic() > deadline:
                raise RuntimeError("etcdctl {} failed: {}".format(" ".join(args), err))
            time.sleep(0.25)

    def leader(self, timeout=10):
        """
        The index of the current leader, asked of every running member;
        C{None} when none of them knows one.
        """
        running = [j for j in self._indexes() if self.isRunning(j) and not self.members[j].frozen]
        urls = ",".join(self.clientURL(j) for j in running)
        rc, out, err = self.etcdctl("endpoint", "status", "--write-out=json", endpoints=urls,
                                    timeout=timeout)
        for status in json.loads(out or "[]"):
            leaderID = status.get("Status", {}).get("leader")
            memberID = status.get("Status", {}).get("header", {}).get("member_id")
            if leaderID and leaderID == memberID:
                endpoint = status["Endpoint"]
                for j in running:
                    if endpoint == self.clientURL(j):
                        return j
        return None

    def memberID(self, i):
        """
        Member C{i}'s ID as etcdctl prints it (hex), from C{member list}.
        """
        rc, out, err = self.etcdctl("member", "list", "--write-out=json")
        if rc != 0:
            raise RuntimeError("etcdctl member list failed: " + err)
        for member in json.loads(out)["members"]:
            if member.get("name") == self.members[i].name or self.peerURL(i) in member.get(
                "peerURLs", []
            ):
                return "{:x}".format(member["ID"])
        raise KeyError("member {} not in member list: {}".format(i, out))

    def addMember(self, timeout=30, wait=True):
        """
        Grow the cluster by one: C{etcdctl member add}, then start the new
        member with C{--initial-cluster-state=existing}.  Returns its index.
        TLS clusters need a cert for it in C{tls.certs} already.
        """
        i = len(self.members)
        if self.tls is not None and len(self.tls.certs) <= i:
            raise ValueError("tls.certs has no entry for member {}".format(i))
        (clientPort, peerPort) = freePorts(2)
        m = _Member(
            name="etcd{}".format(i),
            clientPort=clientPort,
            peerPort=peerPort,
            directory=os.path.join(self.directory, "etcd{}".format(i)),
            initialCluster="",
            initialState="existing",
        )
        rc, out, err = self._reconfigure(
            timeout, "member", "add", m.name, "--peer-urls=" + m.peerURL
        )
        self.changed = time.monotonic()
        for line in out.splitlines():
            if line.startswith("ETCD_INITIAL_CLUSTER="):
                m.initialCluster = line.split("=", 1)[1].strip().strip('"')
        if not m.initialCluster:
            raise RuntimeError("no ETCD_INITIAL_CLUSTER in etcdctl output: " + out)
        os.mkdir(m.directory)
        self.members.append(m)
        self.size += 1
        self._spawn(i)
        if wait:
            self.waitHealthy([i], timeout=timeout)
        return i

    def memberClientURLs(self):
        """
        The client URLs the cluster's member list advertises now (a set):
        a member added by L{addMember} appears here once it has started
        and published them, which is when a client can learn it.
        """
        rc, out, err = self.etcdctl("member", "list", "--write-out=json")
        if rc != 0:
            raise RuntimeError("etcdctl member list failed: " + err)
        return {
            url for member in json.loads(out)["members"] for url in member.get("clientURLs", [])
        }

    def removeMember(self, i):
        """
        C{etcdctl member remove} member C{i}, stop its process, and wait
        until the remaining members are healthy.  Its index stays taken; it
        leaves L{endpoints}.
        """
        memberID = self.memberID(i)
        others = ",".join(self.clientURL(j) for j in self._indexes() if j != i)
        self._reconfigure(30, "member", "remove", memberID, endpoints=others)
        self.changed = time.monotonic()
        self.members[i].removed = True
        self._stopMember(i, 10)
        self.size -= 1
        # Removing the leader leaves the others leaderless for an election.
        self.waitHealthy(timeout=30)

    # -- context manager -----------------------------------------------

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
        return False


class _ClassCluster:
    """
    The cluster of one test class, with what is needed to stop it.
    """

    def __init__(self, testNames):
        self.remaining = set(testNames)
        self.cluster = None
        self.tlsDir = None
        self.error = None

    def stop(self):
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None
        if self.tlsDir is not None:
            shutil.rmtree(self.tlsDir, ignore_errors=True)
            self.tlsDir = None


_classClusters = {}


@atexit.register
def _stopClassClusters():
    for state in list(_classClusters.values()):
        state.stop()


class ClusterTestMixin:
    """
    One L{EtcdCluster} per trial test class, as C{self.cluster}.

    Mix into C{twisted.trial.unittest.TestCase} (or SynchronousTestCase),
    before it in the bases; a subclass's C{setUp} must call C{super().setUp()}.
    Set C{clusterSize} and optionally C{clusterTLS} (a L{TLSConfig}, or a
    callable taking a fresh directory and returning one, e.g.
    C{staticmethod(generateTLS)} with the default size 3), and
    C{clusterClientHost} (default 127.0.0.1; C{"::1"} for members whose
    client URLs are on IPv6 only).

    Trial does not call C{setUpClass}/C{tearDownClass} (its suites never run
    stdlib's class fixtures), so: the first test's C{setUp} starts the
    cluster (a failure to start is remembered and re-raised for the other
    tests of the class, without waiting again); a cleanup after the class's
    last test method stops it and removes its directory; and when only part
    of the class runs, an C{atexit} hook stops it.

    Tests that kill or freeze members need not put them back: C{setUp}
    thaws frozen members, restarts stopped ones, and waits until the whole
    cluster is healthy.
    """

    clusterSize = 3
    clusterTLS = None
    clusterClientHost = HOST

    def setUp(self):
        super().setUp()
        requireEtcd()
        cls = type(self)
        state = _classClusters.get(cls)
        if state is None:
            import unittest as pyunit

            state = _classClusters[cls] = _ClassCluster(
                pyunit.TestLoader().getTestCaseNames(cls)
            )
        self.addCleanup(self._testDone, state)
        if state.error is not None:
            raise state.error
        if state.cluster is None:
            try:
                tls = cls.clusterTLS
                if callable(tls):
                    state.tlsDir = tempfile.mkdtemp(prefix="etcdgw-tls-")
                    tls = tls(state.tlsDir)
                cluster = EtcdCluster(
                    size=cls.clusterSize, tls=tls, clientHost=cls.clusterClientHost
                )
                cluster.start()
            except Exception as e:
                state.error = e
                state.stop()
                raise
            state.cluster = cluster
        self.cluster = cluster = state.cluster
        for i in cluster._indexes():
            if cluster.members[i].frozen:
                cluster.thaw(i)
            if not cluster.isRunning(i):
                cluster.restart(i, wait=False)
        cluster.waitHealthy(cluster._indexes())

    def _testDone(self, state):
        state.remaining.discard(self._testMethodName)
        if not state.remaining:
            state.stop()


class PeerPartition:
    """
    Cut member C{i} of C{cluster} off from its peers only (its client port
    stays reachable): nft rules on loopback drop every packet to and from
    its peer port, and every packet of the connections it dials to the
    other members' peer ports (etcd's raft streams run both ways over the
    connection the reader dials), both ways. The member's own connections
    are told apart by its cgroup (v2): L{start} restarts the member inside a
    cgroup of its own (children inherit the cgroup of the process that
    forks them; a socket keeps the cgroup it was made in). Root only; the
    rules' table, and the cgroup, are removed by L{stop}.
    """

    CGROUP2 = "/sys/fs/cgroup/unified"

    def __init__(self, cluster, i):
        self.cluster = cluster
        self.i = i
        name = f"etcdgw_peers_{os.getpid()}_{cluster.members[i].peerPort}"
        self.table = name
        self.cgroup = os.path.join(self.CGROUP2, name)
        self.active = False

    @classmethod
    def require(cls):
        """
        Why this cannot run here (a message), or L{None}.
        """
        if shutil.which("nft") is None or os.geteuid() != 0:
            return "needs nft and root"
        if not os.path.exists(os.path.join(cls.CGROUP2, "cgroup.procs")):
            return f"needs cgroup v2 at {cls.CGROUP2}"
        return None

    def isolateMember(self, timeout=30):
        """
        Restart the member inside its own cgroup (this process joins it
        for the fork only), then wait for the cluster to be healthy.
        """
        os.makedirs(self.cgroup, exist_ok=True)
        root = os.path.join(os.path.dirname(self.cgroup), "cgroup.procs")
        with open("/proc/self/cgroup") as f:
            mine = [line.split(":", 2)[2].strip() for line in f if line.startswith("0::")]
        back = os.path.join(self.CGROUP2, mine[0].lstrip("/"), "cgroup.procs") if mine else root
        with open(os.path.join(self.cgroup, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
        try:
            self.cluster.restart(self.i, wait=False)
        finally:
            with open(back, "w") as f:
                f.write(str(os.getpid()))
        self.cluster.waitHealthy(timeout=timeout)

    def start(self):
        own = self.cluster.members[self.i].peerPort
        others = ", ".join(
            str(m.peerPort) for j, m in enumerate(self.cluster.members) if j != self.i
        )
        path = os.path.relpath(self.cgroup, "/sys/fs/cgroup")
        rules = (
            f"table inet {self.table} {{\n"
            f"  chain output {{\n"
            f"    type filter hook output priority 0; policy accept;\n"
            f'    oifname "lo" tcp dport {own} drop\n'
            f'    oifname "lo" tcp sport {own} drop\n'
            f'    oifname "lo" socket cgroupv2 level 1 "{path}" tcp dport {{ {others} }} drop\n'
            f"  }}\n"
            f"  chain input {{\n"
            f"    type filter hook input priority 0; policy accept;\n"
            f'    iifname "lo" tcp sport {{ {others} }} socket cgroupv2 level 1 "{path}" drop\n'
            f"  }}\n"
            f"}}\n"
        )
        subprocess.run(["nft", "-f", "-"], input=rules.encode(), check=True)
        self.active = True

    def stop(self):
        """
        Remove the rules (the member stays in its cgroup until it stops).
        """
        if self.active:
            subprocess.run(["nft", "delete", "table", "inet", self.table], check=False)
            self.active = False

    def cleanup(self):
        self.stop()
        if os.path.isdir(self.cgroup):
            with open(os.path.join(self.cgroup, "cgroup.procs")) as f:
                pids = f.read().split()
            root = os.path.join(self.CGROUP2, "cgroup.procs")
            for pid in pids:
                try:
                    with open(root, "w") as f:
                        f.write(pid)
                except OSError:
                    pass
            try:
                os.rmdir(self.cgroup)
            except OSError:
                pass
