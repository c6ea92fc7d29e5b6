"""The measurements, one method per test, each run against one contender:

- wrk:  GET /version through the contender (req/s, p99, gateway CPU per request);
- bulk: iperf3 through the contender (Gbit/s, gateway CPU per GB);
- idle: memory and descriptors per idle connection, held by a helper that never sends;
- syn:  the first GET when the first endpoint drops SYNs;
- slow: a reader slower than its upstream (does the contender's memory stay bounded?).

Each returns a dict of numbers (the JSON's per-test entry) or raises BenchError.
"""

import contextlib
import json
import os
import re
import socket
import sys
import time

from gwbench import HOST, BenchError, log
from gwbench.processes import claim_port, free_port, http_get_version, wait_listening
from gwbench.readings import OtherWork, cpu_seconds, loadavg, nfds, nfds_tree, rss_kb, wait_quiet

ALL_TESTS = ("wrk", "bulk", "idle", "syn", "slow")
HELPERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers.py")


class Scenarios:
    def __init__(self, args, procs, contenders):
        self.args = args
        self.procs = procs
        self.contenders = contenders

    def run(self, test, name):
        """Test `test` (one of ALL_TESTS) against contender `name`."""
        return getattr(self, test)(name)

    @contextlib.contextmanager
    def _upstream(self, name, cmd, port):
        """A stand-in upstream listening on `port`; stopped on leaving the block."""
        p = self.procs.start(name, cmd)
        try:
            wait_listening(p, port)
            yield p
        finally:
            self.procs.stop(p)

    def _helper(self, name, port, *argv):
        return self._upstream(name, [sys.executable, HELPERS, name, HOST, str(port)]
                              + [str(x) for x in argv], port)

    def _measured(self, gw, tool, cmd, timeout):
        """Run the load tool once the machine is quiet; returns (rc, output,
        gateway CPU seconds, load at the start, cores of other work meanwhile)."""
        a = self.args
        wait_quiet(self.procs, a.quiet_threshold, a.quiet_wait)
        load = loadavg()
        other = OtherWork(self.procs)
        c0 = cpu_seconds(gw.pid)
        rc, out = self.procs.run(tool, cmd, timeout)
        c1 = cpu_seconds(gw.pid)
        return rc, out, c1 - c0, load, other.cores()

    def wrk(self, name):
        a = self.args
        with self.contenders.gateway(name, [self.contenders.etcd_port]) as (gw, port):
            url = "http://%s:%d/version" % (HOST, port)
            if a.warmup > 0:
                self.procs.run("wrk-warmup", [a.wrk, "-t1", "-c%d" % a.connections,
                                              "-d%ds" % a.warmup, url], a.warmup + 30)
            rc, out, cpu_s, load, other_cores = self._measured(
                gw, "wrk", [a.wrk, "-t1", "-c%d" % a.connections, "-d%ds" % a.duration,
                            "--latency", url], a.duration + 30)
            if rc != 0:
                raise BenchError("wrk failed (%s):\n%s" % (rc, out[-2000:]))
            r = parse_wrk(out)
            r["cpu_s"] = cpu_s
            r["cpu_us_per_req"] = cpu_s * 1e6 / r["requests"] if r["requests"] else None
            r["load"] = load
            r["other_cores"] = other_cores
            if r["errors"] or r["non2xx"]:
                log("  wrk %s: %d socket errors, %d non-2xx" % (name, r["errors"], r["non2xx"]))
            return r

    def bulk(self, name):
        a = self.args
        iport = free_port()
        with self._upstream("iperf3-server", [a.iperf3, "-s", "-p", str(iport)], iport), \
                self.contenders.gateway(name, [iport], etcd=False) as (gw, port):
            rc, out, cpu_s, load, other_cores = self._measured(
                gw, "iperf3", [a.iperf3, "-c", HOST, "-p", str(port), "-t", str(a.bulk_seconds),
                               "-J"], a.bulk_seconds + 30)
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
                "cpu_s": cpu_s,
                "cpu_s_per_gb": cpu_s / (nbytes / 1e9) if nbytes else None,
                "load": load,
                "other_cores": other_cores,
            }

    def idle(self, name):
        a = self.args
        hport = free_port()
        socks = []
        with self._helper("holder", hport, "300") as holder, \
                self.contenders.gateway(name, [hport], etcd=False) as (gw, port):
            try:
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
                                raise BenchError("idle: %d connects failed, last: %s"
                                                 % (failures, e))
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
                        return _per_connection(n_l, rss0, rss_l, gwfd0, fds_l, load, died=True,
                                               exit_status=gw.returncode,
                                               connections_at_death=len(socks))
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
                return _per_connection(n, rss0, rss1, gwfd0, gwfd1, load)
            finally:
                for s in socks:
                    s.close()

    def syn(self, name):
        """First endpoint drops SYNs (full accept queue of a backlog-0 listener)."""
        a = self.args
        bh = socket.socket()
        fillers = []
        try:
            bh.bind((HOST, 0))
            bh.listen(0)
            bport = bh.getsockname()[1]
            claim_port(bport)
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
            with self.contenders.gateway(name, [bport, self.contenders.etcd_port]) as (gw, port):
                if gw is None:
                    return {"seconds": None, "applicable": False}
                load = loadavg()
                dt, ok = http_get_version(port, a.syn_cap)
                return {"seconds": dt, "ok": ok, "capped": dt is None, "applicable": True,
                        "load": load}
        finally:
            for f in fillers:
                f.close()
            bh.close()

    def slow(self, name):
        a = self.args
        size = int(a.slow_mb * 1e6)
        rate = a.slow_rate_mb * 1e6
        cap = size / rate * 1.5 + 20
        fport = free_port()
        with self._helper("firehose", fport, size, cap + 10), \
                self.contenders.gateway(name, [fport], etcd=False) as (gw, port), \
                socket.socket() as s:
            time.sleep(0.5)
            rss0 = rss_kb(gw.pid)
            peak = rss0
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


def _per_connection(n, rss0, rss1, fds0, fds1, load, **died):
    """The idle test's result for n connections, between two readings of the
    gateway's RSS and descriptors; `died` (died, exit_status, connections_at_death)
    comes first where the gateway exited."""
    return dict(died, **{
        "connections": n,
        "rss_before_kb": rss0,
        "rss_after_kb": rss1,
        "kb_per_conn": (rss1 - rss0) / n if n else None,
        "fds_per_conn": (fds1 - fds0) / n if n else None,
        "load": load,
    })


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
