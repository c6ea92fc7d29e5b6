"""Children, ports and readiness.

Every child runs in its own session/process group and is stopped with its group;
whether something listens is read from /proc, so that no probe connection is made.
"""

import os
import random
import re
import resource
import signal
import socket
import subprocess
import time

from gwbench import HOST, BenchError, log


class Procs:
    """Every child runs in its own session/process group; stop() kills the group."""

    def __init__(self, tmpdir):
        self.tmpdir = tmpdir
        self.live = []
        self.counter = 0

    def start(self, name, cmd, cwd=None, env=None):
        self.counter += 1
        logpath = os.path.join(self.tmpdir, "%02d-%s.log" % (self.counter, name))
        logf = open(logpath, "wb")
        try:
            p = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                cwd=cwd, env=env, start_new_session=True,
            )
        finally:
            logf.close()
        p.bench_name = name
        p.bench_log = logpath
        self.live.append(p)
        return p

    def stop(self, p, grace=3.0):
        if p is None:
            return
        if p.poll() is None:
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    p.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        else:
            # leader gone; make sure nothing else in its group survives
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if p in self.live:
            self.live.remove(p)

    def stop_all(self):
        for p in list(reversed(self.live)):
            try:
                self.stop(p, grace=2.0)
            except Exception as e:  # keep cleaning up
                log("cleanup of %s failed: %s" % (p.bench_name, e))

    def run(self, name, cmd, timeout):
        """Run a tool to completion (bounded by timeout); return (rc, output)."""
        p = self.start(name, cmd)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(p)
            raise BenchError("%s did not finish within %.0f s" % (name, timeout))
        self.stop(p)
        with open(p.bench_log, "r", errors="replace") as f:
            return p.returncode, f.read()


def tail(path, n=15):
    try:
        with open(path, "r", errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def raise_nofile(want):
    """Soft limit to the hard limit; as root also raise the hard limit to `want`
    (children inherit it: etcd's gateway needs 6 descriptors per connection)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if want and hard != resource.RLIM_INFINITY and hard < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
        except (ValueError, OSError):
            pass
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# ----------------------------------------------------------------------------------
# ports and readiness


def is_listening(port):
    """True if something LISTENs on 127.0.0.1:port (or a wildcard).  Read from
    /proc/net/tcp* so that no connection is made (a probe would disturb the
    round-robin state that the SYN-drop test depends on)."""
    want = ":%04X" % port
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[3] == "0A" and parts[1].endswith(want):
                        return True
        except OSError:
            continue
    return False


def wait_listening(p, port, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise BenchError("%s exited with %s before listening on %d:\n%s"
                             % (p.bench_name, p.returncode, port, tail(p.bench_log)))
        if is_listening(port):
            return
        time.sleep(0.05)
    raise BenchError("%s not listening on %d after %.0f s:\n%s"
                     % (p.bench_name, port, timeout, tail(p.bench_log)))


_used_ports = set()


def _port_range():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
    except (OSError, ValueError):
        lo, hi = 32768, 60999
    return lo, hi


def free_port():
    """A free port below the ephemeral range, so that the tens of thousands of
    client connections (and their TIME_WAITs) made here cannot take it between
    this check and the moment a contender binds it."""
    lo, hi = _port_range()
    if lo >= 12000:
        candidates = list(range(lo - 10000, lo))
    else:
        candidates = list(range(hi + 1, 65536))
    rng = random.Random()
    for port in rng.sample(candidates, min(200, len(candidates))):
        if port in _used_ports:
            continue
        s = socket.socket()
        try:
            s.bind((HOST, port))
        except OSError:
            continue
        finally:
            s.close()
        _used_ports.add(port)
        return port
    raise BenchError("no free port")


def claim_port(port):
    """Never hand out `port` (bound here by other means) from free_port()."""
    _used_ports.add(port)


def http_get_version(port, timeout):
    """One GET /version; returns (seconds, ok) or (None, False) past timeout."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    s = socket.socket()
    try:
        s.settimeout(timeout)
        s.connect((HOST, port))
        s.sendall(b"GET /version HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        buf = b""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None, False
            s.settimeout(left)
            data = s.recv(65536)
            if not data:
                break
            buf += data
            head, sep, body = buf.partition(b"\r\n\r\n")
            m = re.search(rb"(?i)content-length:\s*(\d+)", head)
            if sep and m and len(body) >= int(m.group(1)):
                break
        ok = buf.startswith(b"HTTP/1.1 200") and b"etcdserver" in buf
        return time.monotonic() - t0, ok
    except socket.timeout:
        return None, False
    except OSError:
        return time.monotonic() - t0, False
    finally:
        s.close()
