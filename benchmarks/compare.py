#!/usr/bin/env python3
"""Side-by-side benchmark: our etcd gateway against etcd's own gateway and HAProxy.

Everything runs on 127.0.0.1: one real etcd member (data dir under /dev/shm), an
iperf3 server, an idle-connection holder, a "firehose" for the slow-reader check, and
each contender on its own port.  Contenders are alternated (A,B,C then C,B,A ...) and
every number is a median over the rounds.  Ratios are medians of per-round ratios
to etcd's gateway, measured in the same run.

Standard library only.  Installs nothing: missing tools are named with the command that
installs them.  Every process it starts runs in its own process group and is stopped on
exit, error or Ctrl-C.

    python3 benchmarks/compare.py                      # ours (or stand-in), etcd, haproxy
    python3 benchmarks/compare.py --only etcd,haproxy,twisted-portforward --rounds 1
    python3 benchmarks/compare.py --json results.json

Run ``python3 benchmarks/compare.py --help`` for every option.
"""

import argparse
import json
import os
import platform
import random
import re
import resource
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLK_TCK = os.sysconf("SC_CLK_TCK")
HOST = "127.0.0.1"

ALL_CONTENDERS = ("ours", "ours-w2", "etcd", "haproxy", "twisted-portforward")
ALL_TESTS = ("wrk", "bulk", "idle", "syn", "slow")
INSTALL_HINT = {
    "etcd": "apt-get install etcd-server   (Debian/Ubuntu; or a release from github.com/etcd-io/etcd)",
    "iperf3": "apt-get install iperf3",
    "wrk": "apt-get install wrk",
    "haproxy": "apt-get install haproxy",
}
# Issue #4 targets, ours / etcd gateway.  (metric key, label, "<=" or ">=", target)
TARGETS = [
    ("cpu_us_per_req", "CPU per request", "<=", 0.8),
    ("rps", "requests/s", ">=", 1.1),
    ("p99_ms", "p99 latency", "<=", 1.0),
    ("gbit_s", "bulk Gbit/s", ">=", 1.0),
    ("cpu_s_per_gb", "CPU per GB", "<=", 1.0),
    ("kb_per_conn", "KB per idle connection", "<=", 0.2),
]


class BenchError(Exception):
    pass


def log(msg):
    print(time.strftime("%H:%M:%S"), msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------
# helper processes (run as `compare.py --_helper NAME ...` with this interpreter)


def helper_holder(port, max_seconds):
    """Accept connections and hold them open, never sending; close when the peer does."""
    deadline = time.monotonic() + max_seconds
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((HOST, port))
    lsock.listen(4096)
    lsock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(lsock, selectors.EVENT_READ, None)
    while time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.5):
            if key.data is None:
                for _ in range(256):
                    try:
                        conn, _ = lsock.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        time.sleep(0.01)
                        break
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ, "conn")
            else:
                try:
                    data = key.fileobj.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(key.fileobj)
                    key.fileobj.close()


def helper_firehose(port, nbytes, max_seconds):
    """For each connection, send nbytes as fast as the peer takes them, then close."""
    deadline = time.monotonic() + max_seconds
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((HOST, port))
    lsock.listen(64)
    lsock.settimeout(0.5)
    chunk = b"\xa5" * (256 * 1024)

    def serve(conn):
        conn.settimeout(1.0)
        sent = 0
        try:
            while sent < nbytes and time.monotonic() < deadline:
                view = memoryview(chunk)[: min(len(chunk), nbytes - sent)]
                try:
                    sent += conn.send(view)
                except socket.timeout:
                    continue
        except OSError:
            pass
        finally:
            conn.close()

    while time.monotonic() < deadline:
        try:
            conn, _ = lsock.accept()
        except socket.timeout:
            continue
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def run_helper(argv):
    name = argv[0]
    if name == "holder":
        helper_holder(int(argv[1]), float(argv[2]))
    elif name == "firehose":
        helper_firehose(int(argv[1]), int(argv[2]), float(argv[3]))
    else:
        raise SystemExit("unknown helper %r" % name)


# ----------------------------------------------------------------------------------
# process bookkeeping


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


# ----------------------------------------------------------------------------------
# /proc readings


def _stat_fields(pid):
    with open("/proc/%d/stat" % pid) as f:
        data = f.read()
    return data[data.rindex(")") + 2:].split()  # fields from 3 (state) on


def proc_tree(pid):
    """pid and all its live descendants."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry))[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pid):
    """utime+stime (+ reaped children's) summed over the process tree, in seconds."""
    ticks = 0
    for p in proc_tree(pid):
        try:
            f = _stat_fields(p)
        except OSError:
            continue
        # fields 14..17 (utime stime cutime cstime) -> index 11..14 here
        ticks += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return ticks / CLK_TCK


def rss_kb(pid):
    """VmRSS summed over the process tree, in KB."""
    total = 0
    for p in proc_tree(pid):
        try:
            with open("/proc/%d/status" % p) as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total


def nfds(pid):
    try:
        return len(os.listdir("/proc/%d/fd" % pid))
    except OSError:
        return 0


def system_busy_seconds():
    """CPU seconds the whole machine spent busy (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / CLK_TCK


class OtherWork:
    """Measures how much CPU processes *not* started here used during a
    measurement (in cores), so that a number taken on a busy machine shows it."""

    def __init__(self, procs):
        self.procs = procs
        self.t0 = time.monotonic()
        self.busy0 = system_busy_seconds()
        self.own0 = self._own()

    def _own(self):
        t = os.times()
        total = t.user + t.system + t.children_user + t.children_system
        for p in list(self.procs.live):
            try:
                total += cpu_seconds(p.pid)
            except OSError:
                pass
        return total

    def cores(self):
        wall = time.monotonic() - self.t0
        other = (system_busy_seconds() - self.busy0) - (self._own() - self.own0)
        return max(0.0, other / wall) if wall > 0 else None


def wait_quiet(procs, threshold, max_wait):
    """Wait (at most max_wait s) until other work uses under `threshold` cores
    over one second.  Returns the seconds waited."""
    if max_wait <= 0:
        return 0.0
    t0 = time.monotonic()
    while True:
        meter = OtherWork(procs)
        time.sleep(1.0)
        if meter.cores() < threshold:
            return time.monotonic() - t0
        if time.monotonic() - t0 >= max_wait:
            log("  machine still busy (%.2f cores of other work) after %.0f s; measuring anyway"
                % (meter.cores(), max_wait))
            return time.monotonic() - t0


def nfds_tree(pid):
    return sum(nfds(p) for p in proc_tree(pid))


def loadavg():
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


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


# ----------------------------------------------------------------------------------
# contenders


class Bench:
    def __init__(self, args, procs):
        self.args = args
        self.procs = procs
        self.etcd_port = None

    # -- the upstream etcd member ---------------------------------------------------

    def start_etcd(self):
        a = self.args
        self.etcd_port = free_port()
        peer = free_port()
        datadir = tempfile.mkdtemp(prefix="etcd-bench-", dir=a.data_root)
        self.etcd_datadir = datadir
        cmd = [
            a.etcd, "--name", "bench", "--data-dir", datadir,
            "--listen-client-urls", "http://%s:%d" % (HOST, self.etcd_port),
            "--advertise-client-urls", "http://%s:%d" % (HOST, self.etcd_port),
            "--listen-peer-urls", "http://%s:%d" % (HOST, peer),
            "--initial-advertise-peer-urls", "http://%s:%d" % (HOST, peer),
            "--initial-cluster", "bench=http://%s:%d" % (HOST, peer),
            "--initial-cluster-state", "new",
            "--logger", "zap", "--log-level", "error",
        ]
        p = self.procs.start("etcd-member", cmd)
        wait_listening(p, self.etcd_port)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            dt, ok = http_get_version(self.etcd_port, 2.0)
            if ok:
                return p
            time.sleep(0.2)
        raise BenchError("etcd member does not answer /version:\n" + tail(p.bench_log))

    # -- one gateway instance ----------------------------------------------------------

    def gateway_cmd(self, name, listen, upstreams):
        """Command (and cwd, env) for contender `name` listening on `listen`,
        forwarding to the list of upstream ports."""
        a = self.args
        eps = ",".join("%s:%d" % (HOST, p) for p in upstreams)
        if name == "etcd":
            return [a.etcd, "gateway", "start", "--endpoints=" + eps,
                    "--listen-addr=%s:%d" % (HOST, listen)], None, None
        if name == "haproxy":
            cfg = os.path.join(self.procs.tmpdir, "haproxy-%d.cfg" % listen)
            servers = "".join("    server s%d %s:%d\n" % (i, HOST, p)
                              for i, p in enumerate(upstreams))
            with open(cfg, "w") as f:
                f.write(HAPROXY_CFG.format(listen="%s:%d" % (HOST, listen), servers=servers,
                                           connect_timeout=a.haproxy_connect_timeout))
            return [a.haproxy, "-db", "-f", cfg], None, None
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        if name == "twisted-portforward":
            if len(upstreams) != 1:
                return None, None, None
            return [a.python, "-m", "twisted", "portforward",
                    "--port=tcp:%d:interface=%s" % (listen, HOST),
                    "--host=" + HOST, "--dest_port=%d" % upstreams[0]], REPO, env
        if name in ("ours", "ours-w2"):
            cmd = [a.python, "-m", "twisted", "etcd-gateway", "--endpoints=" + eps,
                   "--listen-addr=%s:%d" % (HOST, listen)]
            if name == "ours-w2":
                cmd.append("--workers=2")
            cmd.extend(a.ours_arg)
            return cmd, REPO, env
        raise BenchError("unknown contender " + name)

    def start_gateway(self, name, upstreams):
        listen = free_port()
        cmd, cwd, env = self.gateway_cmd(name, listen, upstreams)
        if cmd is None:
            return None, None
        p = self.procs.start("gw-" + name, cmd, cwd=cwd, env=env)
        wait_listening(p, listen)
        time.sleep(self.args.settle)
        if p.poll() is not None:
            raise BenchError("%s exited right after start:\n%s" % (name, tail(p.bench_log)))
        return p, listen

    # -- tests ---------------------------------------------------------------------------

    def test_wrk(self, name):
        a = self.args
        gw, port = self.start_gateway(name, [self.etcd_port])
        try:
            url = "http://%s:%d/version" % (HOST, port)
            if a.warmup > 0:
                self.procs.run("wrk-warmup", [a.wrk, "-t1", "-c%d" % a.connections,
                                              "-d%ds" % a.warmup, url], a.warmup + 30)
            wait_quiet(self.procs, a.quiet_threshold, a.quiet_wait)
            load = loadavg()
            other = OtherWork(self.procs)
            c0 = cpu_seconds(gw.pid)
            rc, out = self.procs.run("wrk", [a.wrk, "-t1", "-c%d" % a.connections,
                                             "-d%ds" % a.duration, "--latency", url],
                                     a.duration + 30)
            c1 = cpu_seconds(gw.pid)
            if rc != 0:
                raise BenchError("wrk failed (%s):\n%s" % (rc, out[-2000:]))
            r = parse_wrk(out)
            r["cpu_s"] = c1 - c0
            r["cpu_us_per_req"] = (c1 - c0) * 1e6 / r["requests"] if r["requests"] else None
            r["load"] = load
            r["other_cores"] = other.cores()
            if r["errors"] or r["non2xx"]:
                log("  wrk %s: %d socket errors, %d non-2xx" % (name, r["errors"], r["non2xx"]))
            return r
        finally:
            self.procs.stop(gw)

    def test_bulk(self, name):
        a = self.args
        iport = free_port()
        srv = self.procs.start("iperf3-server", [a.iperf3, "-s", "-p", str(iport)])
        gw = None
        try:
            wait_listening(srv, iport)
            gw, port = self.start_gateway(name, [iport])
            wait_quiet(self.procs, a.quiet_threshold, a.quiet_wait)
            load = loadavg()
            other = OtherWork(self.procs)
            c0 = cpu_seconds(gw.pid)
            rc, out = self.procs.run("iperf3", [a.iperf3, "-c", HOST, "-p", str(port),
                                                "-t", str(a.bulk_seconds), "-J"],
                                     a.bulk_seconds + 30)
            c1 = cpu_seconds(gw.pid)
            other_cores = other.cores()
            try:
                j = json.loads(out[out.index("{"):])
            except ValueError:
                raise BenchError("iperf3 output not JSON (rc %s):\n%s" % (rc, out[-2000:]))
            if "error" in j:
                raise BenchError("iperf3: " + j["error"])
            recv = j["end"]["sum_received"]
            nbytes = recv["bytes"]
            return {
                "bytes": nbytes,
                "gbit_s": recv["bits_per_second"] / 1e9,
                "cpu_s": c1 - c0,
                "cpu_s_per_gb": (c1 - c0) / (nbytes / 1e9) if nbytes else None,
                "load": load,
                "other_cores": other_cores,
            }
        finally:
            self.procs.stop(gw)
            self.procs.stop(srv)

    def test_idle(self, name):
        a = self.args
        hport = free_port()
        holder = self.procs.start("holder", [sys.executable, os.path.abspath(__file__),
                                             "--_helper", "holder", str(hport), "300"])
        gw = None
        socks = []
        try:
            wait_listening(holder, hport)
            gw, port = self.start_gateway(name, [hport])
            time.sleep(0.5)
            load = loadavg()
            rss0 = rss_kb(gw.pid)
            fd0 = nfds(holder.pid)
            gwfd0 = nfds_tree(gw.pid)
            last = (rss0, gwfd0, 0)  # last reading while the gateway was alive
            deadline = time.monotonic() + a.idle_timeout
            failures = 0
            while len(socks) < a.idle_conns and time.monotonic() < deadline:
                batch = min(a.idle_batch, a.idle_conns - len(socks))
                for _ in range(batch):
                    s = socket.socket()
                    s.settimeout(5.0)
                    try:
                        s.connect((HOST, port))
                        socks.append(s)
                    except OSError as e:
                        s.close()
                        failures += 1
                        if failures > 20:
                            raise BenchError("idle: %d connects failed, last: %s" % (failures, e))
                # wait until the holder has the other end of all of them (bounded)
                bdeadline = min(deadline, time.monotonic() + 10)
                while nfds(holder.pid) - fd0 < len(socks) and time.monotonic() < bdeadline:
                    time.sleep(0.01)
                if gw.poll() is not None:
                    rss_l, fds_l, n_l = last
                    log("  idle %s: gateway exited (status %s) with %d connections open; "
                        "%d descriptors (%.1f per connection) at its last reading"
                        % (name, gw.returncode, len(socks), fds_l,
                           (fds_l - gwfd0) / n_l if n_l else 0))
                    return {
                        "died": True, "exit_status": gw.returncode,
                        "connections_at_death": len(socks),
                        "connections": n_l, "rss_before_kb": rss0, "rss_after_kb": rss_l,
                        "kb_per_conn": (rss_l - rss0) / n_l if n_l else None,
                        "fds_per_conn": (fds_l - gwfd0) / n_l if n_l else None,
                        "load": load,
                    }
                held = nfds(holder.pid) - fd0
                if held > 0:
                    last = (rss_kb(gw.pid), nfds_tree(gw.pid), min(held, len(socks)))
            time.sleep(1.0)
            held = nfds(holder.pid) - fd0
            rss1 = rss_kb(gw.pid)
            gwfd1 = nfds_tree(gw.pid)
            n = min(len(socks), held)
            if n < a.idle_conns:
                log("  idle %s: only %d of %d connections reached the holder"
                    % (name, n, a.idle_conns))
            return {
                "connections": n,
                "rss_before_kb": rss0,
                "rss_after_kb": rss1,
                "kb_per_conn": (rss1 - rss0) / n if n else None,
                "fds_per_conn": (gwfd1 - gwfd0) / n if n else None,
                "load": load,
            }
        finally:
            for s in socks:
                s.close()
            self.procs.stop(gw)
            self.procs.stop(holder)

    def test_syn(self, name):
        """First endpoint drops SYNs (full accept queue of a backlog-0 listener)."""
        a = self.args
        bh = socket.socket()
        fillers = []
        gw = None
        try:
            bh.bind((HOST, 0))
            bh.listen(0)
            bport = bh.getsockname()[1]
            _used_ports.add(bport)
            blackholed = False
            for _ in range(8):
                f = socket.socket()
                f.setblocking(False)
                try:
                    f.connect((HOST, bport))
                except BlockingIOError:
                    pass
                fillers.append(f)
                probe = socket.socket()
                probe.settimeout(0.3)
                try:
                    probe.connect((HOST, bport))
                    fillers.append(probe)
                except (socket.timeout, OSError):
                    probe.close()
                    blackholed = True
                    break
            if not blackholed:
                raise BenchError("could not make a SYN-dropping listener")
            gw, port = self.start_gateway(name, [bport, self.etcd_port])
            if gw is None:
                return {"seconds": None, "applicable": False}
            load = loadavg()
            dt, ok = http_get_version(port, a.syn_cap)
            return {"seconds": dt, "ok": ok, "capped": dt is None, "applicable": True,
                    "load": load}
        finally:
            self.procs.stop(gw)
            for f in fillers:
                f.close()
            bh.close()

    def test_slow(self, name):
        a = self.args
        size = int(a.slow_mb * 1e6)
        rate = a.slow_rate_mb * 1e6
        cap = size / rate * 1.5 + 20
        fport = free_port()
        fh = self.procs.start("firehose", [sys.executable, os.path.abspath(__file__),
                                           "--_helper", "firehose", str(fport), str(size),
                                           str(cap + 10)])
        gw = None
        s = None
        try:
            wait_listening(fh, fport)
            gw, port = self.start_gateway(name, [fport])
            time.sleep(0.5)
            rss0 = rss_kb(gw.pid)
            peak = rss0
            s = socket.socket()
            s.settimeout(5.0)
            s.connect((HOST, port))
            got = 0
            t0 = time.monotonic()
            deadline = t0 + cap
            next_sample = t0
            while got < size and time.monotonic() < deadline:
                data = s.recv(65536)
                if not data:
                    break
                got += len(data)
                now = time.monotonic()
                if now >= next_sample:
                    peak = max(peak, rss_kb(gw.pid))
                    next_sample = now + 0.1
                ahead = got / rate - (now - t0)
                if ahead > 0:
                    time.sleep(ahead)
            elapsed = time.monotonic() - t0
            peak = max(peak, rss_kb(gw.pid))
            return {
                "bytes": got, "seconds": elapsed,
                "mb_s": got / elapsed / 1e6 if elapsed else None,
                "rss_before_kb": rss0, "peak_rss_kb": peak,
                "growth_mb": (peak - rss0) / 1024.0,
            }
        finally:
            if s is not None:
                s.close()
            self.procs.stop(gw)
            self.procs.stop(fh)


HAPROXY_CFG = """\
global
    nbthread 1
    maxconn 9000

defaults
    mode tcp
    timeout connect {connect_timeout}
    timeout client 1h
    timeout server 1h
    retries 2
    option redispatch 1

frontend fe
    bind {listen}
    default_backend be

backend be
    balance roundrobin
{servers}"""


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text):
    m = re.match(r"([\d.]+)(us|ms|s|m)$", text)
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out):
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+),", out)
    if not m:
        raise BenchError("cannot parse wrk output:\n" + out[-2000:])
    rps = re.search(r"Requests/sec:\s*([\d.]+)", out)
    p99 = re.search(r"^\s*99%\s+(\S+)", out, re.M)
    p50 = re.search(r"^\s*50%\s+(\S+)", out, re.M)
    err = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
    return {
        "requests": int(m.group(1)),
        "rps": float(rps.group(1)),
        "p50_ms": _ms(p50.group(1)) if p50 else None,
        "p99_ms": _ms(p99.group(1)) if p99 else None,
        "errors": sum(int(x) for x in err.groups()) if err else 0,
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
    }


# ----------------------------------------------------------------------------------
# environment


def plugin_available(python):
    try:
        out = subprocess.run([python, "-m", "twisted", "--help"], cwd=REPO,
                             env=dict(os.environ, PYTHONPATH=REPO), capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False, False
    has = re.search(r"^\s+etcd-gateway\s", out, re.M) is not None
    workers = False
    if has:
        try:
            h = subprocess.run([python, "-m", "twisted", "etcd-gateway", "--help"], cwd=REPO,
                               env=dict(os.environ, PYTHONPATH=REPO), capture_output=True,
                               text=True, timeout=60).stdout
            workers = "--workers" in h
        except (OSError, subprocess.TimeoutExpired):
            pass
    return has, workers


def cmd_version(cmd, pattern=None):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        out = (r.stdout + r.stderr).strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    if pattern:
        m = re.search(pattern, out)
        return m.group(1) if m else out.splitlines()[0] if out else None
    return out.splitlines()[0] if out else None


def machine_info(a):
    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": cmd_version([a.python, "-c", "import sys; print(sys.version.split()[0])"]),
        "twisted": cmd_version([a.python, "-c", "import twisted; print(twisted.__version__)"]),
        "etcd": cmd_version([a.etcd, "--version"], r"etcd Version:\s*(\S+)") if a.etcd else None,
        "haproxy": cmd_version([a.haproxy, "-v"], r"version\s+(\S+)") if a.haproxy else None,
        "iperf3": cmd_version([a.iperf3, "--version"], r"iperf\s+(\S+)") if a.iperf3 else None,
        "wrk": cmd_version([a.wrk, "--version"], r"wrk\s+(\S+)") if a.wrk else None,
        "loadavg_start": loadavg(),
        "repo_commit": cmd_version(["git", "-C", REPO, "log", "-1", "--format=%h %cd",
                                    "--date=iso"]),
        "repo_dirty": bool(cmd_version(["git", "-C", REPO, "status", "--porcelain",
                                        "--untracked-files=no", "--", "etcdgw", "twisted"])),
    }
    return info


def check_tools(a, contenders, tests):
    need = {"etcd"}  # the upstream member, always
    if "wrk" in tests:
        need.add("wrk")
    if "bulk" in tests:
        need.add("iperf3")
    if "haproxy" in contenders:
        need.add("haproxy")
    missing = []
    for tool in sorted(need):
        path = getattr(a, tool) or shutil.which(tool)
        if not path or not os.access(path, os.X_OK):
            missing.append(tool)
        setattr(a, tool, path)
    problems = []
    if missing:
        problems.append("missing tools: %s\n  install with:\n%s" % (
            ", ".join(missing),
            "".join("    %s\n" % INSTALL_HINT[t] for t in missing)))
    if subprocess.run([a.python, "-c", "import twisted"], capture_output=True).returncode:
        problems.append("%s cannot import twisted; install the project first "
                        "(pip install -e %s) or pass --python" % (a.python, REPO))
    return problems


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
# reporting


def med(values):
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


COLUMNS = [
    # (header, test, key, format)
    ("req/s", "wrk", "rps", ".0f"),
    ("p99 ms", "wrk", "p99_ms", ".2f"),
    ("CPU us/req", "wrk", "cpu_us_per_req", ".1f"),
    ("Gbit/s", "bulk", "gbit_s", ".2f"),
    ("CPU s/GB", "bulk", "cpu_s_per_gb", ".3f"),
    ("KB/idle conn", "idle", "kb_per_conn", ".2f"),
    ("fds/conn", "idle", "fds_per_conn", ".1f"),
]


def summarize(results, contenders, tests, syn_cap):
    """results[round][contender][test] -> dict.  Returns summary dict and text."""
    summary = {}
    lines = []
    hdr = ["contender"] + [c[0] for c in COLUMNS] + ["SYN-drop 1st GET", "load 1m",
                                                     "other work"]
    rows = []
    for name in contenders:
        per = [r.get(name, {}) for r in results]
        s = {}
        for _, test, key, _ in COLUMNS:
            s[key] = med(p.get(test, {}).get(key) for p in per)
        syn = [p.get("syn") for p in per if p.get("syn") and "error" not in p["syn"]]
        if syn and not syn[0].get("applicable", True):
            s["syn"] = "n/a"
        elif syn:
            secs = [x["seconds"] if x["seconds"] is not None else float("inf") for x in syn]
            m = statistics.median(secs)
            s["syn"] = ("> %g s" % syn_cap) if m == float("inf") else "%.2f s" % m
            if not all(x.get("ok") for x in syn if x["seconds"] is not None):
                s["syn"] += " (error reply)"
        else:
            s["syn"] = "-"
        loads = [p[t]["load"][0] for p in per for t in p if isinstance(p[t], dict) and "load" in p[t]]
        s["load_median"] = med(loads)
        s["load_max"] = max(loads) if loads else None
        others = [p[t]["other_cores"] for p in per for t in ("wrk", "bulk")
                  if isinstance(p.get(t), dict) and p[t].get("other_cores") is not None]
        s["other_cores_median"] = med(others)
        s["other_cores_max"] = max(others) if others else None
        died = [p["idle"] for p in per if p.get("idle", {}).get("died")]
        s["idle_died"] = [(d["connections_at_death"], d["exit_status"]) for d in died]
        summary[name] = s
        cells = [fmt(s[c[2]], c[3]) + ("*" if c[1] == "idle" and died else "") for c in COLUMNS]
        rows.append([name] + cells
                    + [s["syn"], "%s (max %s)" % (fmt(s["load_median"], ".2f"),
                                                  fmt(s["load_max"], ".2f")),
                       "%s (max %s)" % (fmt(s["other_cores_median"], ".2f"),
                                        fmt(s["other_cores_max"], ".2f"))])
    lines.extend(table(hdr, rows))
    for name in contenders:
        died = summary[name]["idle_died"]
        if died:
            lines.append("* %s exited (status %s) in %d of %d rounds, at %s open idle "
                         "connections; its idle numbers are from the last reading before that"
                         % (name, "/".join(sorted(set(str(st) for _, st in died))), len(died),
                            len(results), "/".join(str(c) for c, _ in died)))
    lines.append("load 1m: load average at the start of each measurement; other work: CPU "
                 "cores used by processes not started here during wrk and iperf3 (median, max)")
    return summary, lines


def ratios(results, contenders, base="etcd"):
    """Median over rounds of (contender / base) per metric."""
    out = {}
    for name in contenders:
        if name == base:
            continue
        r = {}
        for key, _, _, _ in TARGETS:
            test = next(c[1] for c in COLUMNS if c[2] == key)
            vals = []
            for rnd in results:
                a = rnd.get(name, {}).get(test, {}).get(key)
                b = rnd.get(base, {}).get(test, {}).get(key)
                if a is not None and b:
                    vals.append(a / b)
            r[key] = med(vals)
        out[name] = r
    return out


TABLE_STYLE = {"rst": False}


def table(hdr, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(hdr, *rows)]
    if TABLE_STYLE["rst"]:
        rule = "  ".join("=" * w for w in widths)
        out = [rule, "  ".join("%-*s" % (w, h) for w, h in zip(widths, hdr)), rule]
        for row in rows:
            out.append("  ".join(("%-*s" if i == 0 else "%*s") % (w, x or "--")
                                 for i, (w, x) in enumerate(zip(widths, row))))
        out.append(rule)
        return out
    line = "  ".join("%-*s" % (w, h) for w, h in zip(widths, hdr))
    out = [line, "  ".join("-" * w for w in widths)]
    for row in rows:
        out.append("  ".join(("%-*s" if i == 0 else "%*s") % (w, x)
                             for i, (w, x) in enumerate(zip(widths, row))))
    return out


# ----------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Benchmark etcd-gateway against etcd's gateway and HAProxy on 127.0.0.1.")
    p.add_argument("--only", help="comma-separated contenders from: %s (default: ours,etcd,"
                   "haproxy; twisted-portforward stands in for ours if the plugin is missing)"
                   % ",".join(ALL_CONTENDERS))
    p.add_argument("--tests", default=",".join(ALL_TESTS),
                   help="comma-separated subset of: %s (default all)" % ",".join(ALL_TESTS))
    p.add_argument("--rounds", type=int, default=3, help="rounds, alternating order (default 3)")
    p.add_argument("--ours", default=None,
                   help="contender compared to etcd in the ratio table (default: ours, "
                        "else twisted-portforward)")
    p.add_argument("--python", default=sys.executable,
                   help="interpreter that runs ours / twisted-portforward (default: this one)")
    p.add_argument("--ours-arg", action="append", default=[],
                   help="extra argument for ours (repeatable), e.g. --ours-arg=--retry-delay=5s")
    p.add_argument("--etcd", help="path to etcd (default: from PATH)")
    p.add_argument("--haproxy", help="path to haproxy (default: from PATH)")
    p.add_argument("--iperf3", help="path to iperf3 (default: from PATH)")
    p.add_argument("--wrk", help="path to wrk (default: from PATH)")
    p.add_argument("--duration", type=int, default=10, help="wrk seconds (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="wrk warm-up seconds, not measured")
    p.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    p.add_argument("--bulk-seconds", type=int, default=5, help="iperf3 -t (default 5)")
    p.add_argument("--idle-conns", type=int, default=4000, help="idle connections (default 4000)")
    p.add_argument("--idle-batch", type=int, default=40, help="connections opened per batch")
    p.add_argument("--idle-timeout", type=float, default=90.0, help="cap for opening them (s)")
    p.add_argument("--syn-cap", type=float, default=10.0,
                   help="cap for the GET when the first endpoint drops SYNs (default 10 s)")
    p.add_argument("--slow-mb", type=float, default=200.0,
                   help="slow-reader stream size in MB (default 200)")
    p.add_argument("--slow-rate-mb", type=float, default=20.0,
                   help="slow-reader read rate in MB/s (default 20)")
    p.add_argument("--slow-contenders", default=None,
                   help="contenders for the slow-reader check (default: all selected)")
    p.add_argument("--haproxy-connect-timeout", default="1s",
                   help="HAProxy 'timeout connect' (default 1s)")
    p.add_argument("--quiet-threshold", type=float, default=0.3,
                   help="before wrk and iperf3, wait until processes not started here use "
                        "fewer than this many cores (default 0.3)")
    p.add_argument("--quiet-wait", type=float, default=30.0,
                   help="longest wait for that, in seconds; 0 disables (default 30)")
    p.add_argument("--settle", type=float, default=0.3, help="seconds after a gateway listens")
    p.add_argument("--data-root", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                   help="where the etcd data dir goes (default /dev/shm)")
    p.add_argument("--nofile", type=int, default=65536 if os.geteuid() == 0 else 0,
                   help="as root, raise the hard RLIMIT_NOFILE to this for every process "
                        "started (default 65536 as root; otherwise soft = hard limit)")
    p.add_argument("--json", metavar="FILE", help="save raw results here")
    p.add_argument("--report-from", metavar="FILE",
                   help="print the report of a saved --json FILE and exit (runs nothing)")
    p.add_argument("--rst", action="store_true",
                   help="print the tables as reStructuredText (for BENCHMARKS.rst)")
    p.add_argument("--keep-logs", action="store_true", help="keep the temp dir with all logs")
    return p.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_helper"]:
        return run_helper(argv[1:])
    a = parse_args(argv)
    TABLE_STYLE["rst"] = a.rst
    if a.report_from:
        with open(a.report_from) as f:
            saved = json.load(f)
        a.syn_cap = saved["args"].get("syn_cap", a.syn_cap)
        report(a, saved["machine"], saved["contenders"], saved["tests"], saved["rounds"],
               saved["slow_reader"], saved["ours"])
        return 0
    if a.rounds < 1 or a.rounds > 50:
        raise SystemExit("--rounds must be 1..50")

    has_plugin, has_workers = plugin_available(a.python)
    if a.only:
        contenders = [c.strip() for c in a.only.split(",") if c.strip()]
    else:
        contenders = ["ours" if has_plugin else "twisted-portforward", "etcd", "haproxy"]
    bad = [c for c in contenders if c not in ALL_CONTENDERS]
    if bad:
        raise SystemExit("unknown contender(s) %s; choose from %s"
                         % (", ".join(bad), ", ".join(ALL_CONTENDERS)))
    tests = [t.strip() for t in a.tests.split(",") if t.strip()]
    bad = [t for t in tests if t not in ALL_TESTS]
    if bad:
        raise SystemExit("unknown test(s) %s; choose from %s" % (", ".join(bad), ", ".join(ALL_TESTS)))
    problems = check_tools(a, contenders, tests)
    if ("ours" in contenders or "ours-w2" in contenders) and not has_plugin:
        problems.append("`%s -m twisted --help` does not list etcd-gateway: install the project "
                        "(pip install -e %s) or use --only etcd,haproxy,twisted-portforward"
                        % (a.python, REPO))
    if "ours-w2" in contenders and has_plugin and not has_workers:
        problems.append("ours-w2 needs `etcd-gateway --workers`, which this version lacks")
    if problems:
        print("cannot run the benchmark:\n" + "\n".join(problems), file=sys.stderr)
        return 2
    ours = a.ours or ("ours" if "ours" in contenders else
                      "twisted-portforward" if "twisted-portforward" in contenders else None)
    slow_set = (contenders if a.slow_contenders is None
                else [c.strip() for c in a.slow_contenders.split(",")])

    nofile = raise_nofile(a.nofile)
    log("RLIMIT_NOFILE for every process started here: %d" % nofile[0])
    if "idle" in tests and nofile[0] < a.idle_conns + 200:
        print("RLIMIT_NOFILE is %d (hard); need about %d for --idle-conns %d. Raise the hard "
              "limit (ulimit -Hn) or lower --idle-conns." % (nofile[1], a.idle_conns + 200,
                                                            a.idle_conns), file=sys.stderr)
        return 2

    tmpdir = tempfile.mkdtemp(prefix="etcdgw-bench-")
    procs = Procs(tmpdir)
    bench = Bench(a, procs)
    info = machine_info(a)
    results = []
    slow = {}
    interrupted = False

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)

    try:
        log("machine: %s cores, %s, kernel %s; load %s" % (
            info["nproc"], info["cpu"], info["kernel"], info["loadavg_start"]))
        bench.start_etcd()
        log("etcd member on %s:%d" % (HOST, bench.etcd_port))
        round_tests = [t for t in tests if t != "slow"]
        for rnd in range(a.rounds):
            order = contenders if rnd % 2 == 0 else list(reversed(contenders))
            log("round %d/%d: %s" % (rnd + 1, a.rounds, ", ".join(order)))
            res = {}
            results.append(res)
            for name in order:
                res[name] = {}
                for test in round_tests:
                    try:
                        r = getattr(bench, "test_" + test)(name)
                    except BenchError as e:
                        log("  %s %s FAILED: %s" % (name, test, e))
                        r = {"error": str(e)}
                    res[name][test] = r
                    log("  %-20s %-5s %s" % (name, test, short(test, r)))
        if "slow" in tests:
            for name in slow_set:
                try:
                    r = bench.test_slow(name)
                except BenchError as e:
                    log("  %s slow FAILED: %s" % (name, e))
                    r = {"error": str(e)}
                slow[name] = r
                log("  %-20s slow  %s" % (name, short("slow", r)))
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted; cleaning up")
    finally:
        procs.stop_all()
        if getattr(bench, "etcd_datadir", None):
            shutil.rmtree(bench.etcd_datadir, ignore_errors=True)
        if a.keep_logs:
            log("logs kept in " + tmpdir)
        else:
            shutil.rmtree(tmpdir, ignore_errors=True)

    info["loadavg_end"] = loadavg()
    report(a, info, contenders, tests, results, slow, ours)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": info, "contenders": contenders, "tests": tests,
                       "rounds": results, "slow_reader": slow, "ours": ours,
                       "args": vars(a)}, f, indent=2, default=str)
        log("raw results saved to " + a.json)
    return 130 if interrupted else 0


def short(test, r):
    if "error" in r:
        return "error"
    if test == "wrk":
        return "%.0f req/s  p99 %.2f ms  %.1f us/req  (other work %.2f cores)" % (
            r["rps"], r["p99_ms"] or 0, r["cpu_us_per_req"] or 0, r["other_cores"] or 0)
    if test == "bulk":
        return "%.2f Gbit/s  %.3f CPU s/GB  (other work %.2f cores)" % (
            r["gbit_s"], r["cpu_s_per_gb"] or 0, r["other_cores"] or 0)
    if test == "idle":
        return "%d conns  %.2f KB/conn  %.1f fds/conn  (RSS %d -> %d KB)%s" % (
            r["connections"], r["kb_per_conn"] or 0, r["fds_per_conn"] or 0,
            r["rss_before_kb"], r["rss_after_kb"],
            "  DIED (exit %s) at %d connections" % (r["exit_status"], r["connections_at_death"])
            if r.get("died") else "")
    if test == "syn":
        if not r.get("applicable", True):
            return "n/a (single upstream only)"
        return "capped" if r["seconds"] is None else "%.3f s ok=%s" % (r["seconds"], r["ok"])
    if test == "slow":
        return "%.0f MB at %.1f MB/s; RSS %d KB, peak %d KB (+%.1f MB)" % (
            r["bytes"] / 1e6, r["mb_s"] or 0, r["rss_before_kb"], r["peak_rss_kb"],
            r["growth_mb"])
    return str(r)


def report(a, info, contenders, tests, results, slow, ours):
    print()
    print("machine: %s cores, %s, kernel %s, %s" % (info["nproc"], info["cpu"], info["kernel"],
                                                   info["date"]))
    print("versions: python %s, Twisted %s, etcd %s, haproxy %s, iperf3 %s, wrk %s" % (
        info["python"], info["twisted"], info["etcd"], info["haproxy"], info["iperf3"],
        info["wrk"]))
    print("gateway code: commit %s%s" % (info["repo_commit"],
                                         " + uncommitted changes" if info["repo_dirty"] else ""))
    print("load average: start %s, end %s" % (info["loadavg_start"], info["loadavg_end"]))
    print("rounds: %d (medians)" % len(results))
    print()
    if results:
        _, lines = summarize(results, contenders, tests, a.syn_cap)
        print("\n".join(lines))
        print()
    if slow:
        rows = []
        for name, r in slow.items():
            if "error" in r:
                rows.append([name, "error", "", "", ""])
            else:
                rows.append([name, "%.0f MB" % (r["bytes"] / 1e6), "%.1f" % (r["mb_s"] or 0),
                             "%.1f" % (r["rss_before_kb"] / 1024.0),
                             "%.1f" % (r["peak_rss_kb"] / 1024.0)])
        print("slow reader (upstream writes as fast as it can):")
        print("\n".join(table(["contender", "read", "MB/s", "RSS start MB", "peak RSS MB"], rows)))
        print()
    if results and "etcd" in contenders:
        rat = ratios(results, contenders)
        hdr = ["ratio to etcd gateway"] + [n for n in contenders if n != "etcd"]
        if ours in rat:
            hdr.append("target (%s)" % ours)
        rows = []
        for key, label, op, target in TARGETS:
            row = [label] + [fmt(rat[n][key], ".2f") for n in contenders if n != "etcd"]
            if ours in rat:
                v = rat[ours][key]
                row.append("%s %.1f %s" % (op, target, "" if v is None else
                                           ("met" if (v <= target if op == "<=" else v >= target)
                                            else "NOT met")))
            rows.append(row)
        print("medians of per-round ratios, contender / etcd gateway:")
        print("\n".join(table(hdr, rows)))


if __name__ == "__main__":
    sys.exit(main())
