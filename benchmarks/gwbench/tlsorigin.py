"""TLS origination side by side (issue 15): ours with ``--upstream-tls=originate``
against HAProxy doing the same job, as the issue describes it: tcp mode,
``tcp-request inspect-delay`` and ``req.payload(0,3)`` equal to ``PRI`` pick a
backend whose server speaks ``alpn h2``, anything else one with ``alpn http/1.1``;
each server ``ssl verify required verifyhost localhost ca-file ... crt ...``.

Upstream: one etcd member with TLS and ``--client-cert-auth`` whose certificate
names ``localhost`` only (for small requests: wrk GET /version, plaintext to the
contender), and for bulk an iperf3 server behind a TLS-terminating HAProxy (the
"member" end of the TLS, requiring the client certificate; its CPU is not counted).
Certificates are made with the ``openssl`` command.  Contenders alternate order
each round; medians are reported, with the ratio ours/HAProxy per round.
"""

import os
import statistics
import subprocess
import tempfile
import time

from gwbench import HOST, REPO, BenchError, log
from gwbench.processes import free_port, tail, wait_listening
from gwbench.readings import OtherWork, cpu_seconds, loadavg, wait_quiet

CONTENDERS = ("ours", "haproxy")

HAPROXY_ORIGINATE = """\
global
    nbthread 1
    maxconn 9000

defaults
    mode tcp
    timeout connect 1s
    timeout client 1h
    timeout server 1h

frontend fe
    bind {listen}
    tcp-request inspect-delay 5s
    tcp-request content accept if {{ req.len ge 3 }}
    use_backend be_h2 if {{ req.payload(0,3) -m str PRI }}
    default_backend be_h1

backend be_h2
    server m0 {upstream} ssl verify required verifyhost localhost ca-file {ca} crt {crt} alpn h2

backend be_h1
    server m0 {upstream} ssl verify required verifyhost localhost ca-file {ca} crt {crt} alpn http/1.1
"""

HAPROXY_TERMINATOR = """\
global
    nbthread 1
    maxconn 9000

defaults
    mode tcp
    timeout connect 1s
    timeout client 1h
    timeout server 1h

frontend fe
    bind {listen} ssl crt {crt} ca-file {ca} verify required alpn h2,http/1.1
    default_backend be

backend be
    server s0 {upstream}
"""


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certificates(directory):
    """A CA, a member certificate naming localhost only, a client certificate.
    Returns dict of paths (HAProxy's crt files hold the certificate and its key)."""
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", "ca.key", "-out", "ca.crt", "-days", "3", "-subj", "/CN=bench CA",
             cwd=directory)
    for name, ext in (("member", "subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth"),
                      ("client", "extendedKeyUsage=clientAuth")):
        with open(os.path.join(directory, name + ".ext"), "w") as f:
            f.write(ext + "\n")
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                 "-keyout", name + ".key", "-out", name + ".csr", "-subj", "/CN=" + name,
                 cwd=directory)
        _openssl("x509", "-req", "-in", name + ".csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", name + ".crt", "-days", "3",
                 "-extfile", name + ".ext", cwd=directory)
        with open(os.path.join(directory, name + ".pem"), "wb") as out:
            for part in (".crt", ".key"):
                with open(os.path.join(directory, name + part), "rb") as f:
                    out.write(f.read())
    return {k: os.path.join(directory, v) for k, v in (
        ("ca", "ca.crt"), ("member_crt", "member.crt"), ("member_key", "member.key"),
        ("member_pem", "member.pem"), ("client_crt", "client.crt"),
        ("client_key", "client.key"), ("client_pem", "client.pem"))}


class TLSOrigination:
    def __init__(self, args, procs):
        self.a = args
        self.procs = procs
        self.dir = tempfile.mkdtemp(prefix="tls-", dir=procs.tmpdir)
        self.certs = make_certificates(self.dir)
        self.etcd_port = None

    def start_etcd(self):
        a, c = self.a, self.certs
        self.etcd_port = free_port()
        peer = free_port()
        datadir = tempfile.mkdtemp(prefix="etcd-bench-tls-", dir=a.data_root)
        self.datadir = datadir
        cmd = [
            a.etcd, "--name", "bench", "--data-dir", datadir,
            "--listen-client-urls", "https://%s:%d" % (HOST, self.etcd_port),
            "--advertise-client-urls", "https://localhost:%d" % self.etcd_port,
            "--listen-peer-urls", "http://%s:%d" % (HOST, peer),
            "--initial-advertise-peer-urls", "http://%s:%d" % (HOST, peer),
            "--initial-cluster", "bench=http://%s:%d" % (HOST, peer),
            "--initial-cluster-state", "new",
            "--cert-file", c["member_crt"], "--key-file", c["member_key"],
            "--trusted-ca-file", c["ca"], "--client-cert-auth",
            "--logger", "zap", "--log-level", "error",
        ]
        p = self.procs.start("etcd-member-tls", cmd)
        wait_listening(p, self.etcd_port)
        time.sleep(1.5)
        return p

    def command(self, name, listen, upstream, etcd=True):
        a, c = self.a, self.certs
        if name == "haproxy":
            cfg = os.path.join(self.dir, "haproxy-originate-%d.cfg" % listen)
            with open(cfg, "w") as f:
                f.write(HAPROXY_ORIGINATE.format(
                    listen="%s:%d" % (HOST, listen), upstream="%s:%d" % (HOST, upstream),
                    ca=c["ca"], crt=c["client_pem"]))
            return [a.haproxy, "-db", "-f", cfg], None, None
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        cmd = [a.python, "-m", "twisted", "etcd-gateway", "--endpoints=localhost:%d" % upstream,
               "--listen-addr=%s:%d" % (HOST, listen), "--upstream-tls=originate",
               "--cacert=" + c["ca"], "--cert=" + c["client_crt"], "--key=" + c["client_key"]]
        if not etcd:
            # iperf3 behind the terminator is no etcd member: checked as HAProxy
            # does it here, not asked GET /version (which iperf3 would take for
            # a test's control connection).
            cmd.append("--health-check=tcp")
        cmd.extend(a.ours_arg)
        return cmd, REPO, env

    def gateway(self, name, upstream, etcd=True):
        listen = free_port()
        cmd, cwd, env = self.command(name, listen, upstream, etcd)
        p = self.procs.start("gw-tls-" + name, cmd, cwd=cwd, env=env)
        wait_listening(p, listen)
        time.sleep(self.a.settle + 0.5)
        if p.poll() is not None:
            raise BenchError("%s exited right after start:\n%s" % (name, tail(p.bench_log)))
        return p, listen

    def measured(self, gw, tool, cmd, timeout):
        wait_quiet(self.procs, self.a.quiet_threshold, self.a.quiet_wait)
        load = loadavg()
        other = OtherWork(self.procs)
        c0 = cpu_seconds(gw.pid)
        rc, out = self.procs.run(tool, cmd, timeout)
        c1 = cpu_seconds(gw.pid)
        return rc, out, c1 - c0, load, other.cores()

    def wrk(self, name):
        from gwbench.scenarios import parse_wrk

        a = self.a
        gw, port = self.gateway(name, self.etcd_port)
        try:
            url = "http://%s:%d/version" % (HOST, port)
            if a.warmup > 0:
                self.procs.run("wrk-warmup", [a.wrk, "-t1", "-c%d" % a.connections,
                                              "-d%ds" % a.warmup, url], a.warmup + 30)
            rc, out, cpu_s, load, other = self.measured(
                gw, "wrk", [a.wrk, "-t1", "-c%d" % a.connections, "-d%ds" % a.duration,
                            "--latency", url], a.duration + 30)
            if rc != 0:
                raise BenchError("wrk failed (%s):\n%s" % (rc, out[-2000:]))
            r = parse_wrk(out)
            if r["errors"] or r["non2xx"] or not r["requests"]:
                raise BenchError("wrk %s: %d socket errors, %d non-2xx, %d requests"
                                 % (name, r["errors"], r["non2xx"], r["requests"]))
            r.update(cpu_s=cpu_s, cpu_us_per_req=cpu_s * 1e6 / r["requests"], load=load,
                     other_cores=other)
            return r
        finally:
            self.procs.stop(gw)

    def bulk(self, name):
        import json

        a, c = self.a, self.certs
        iport, tport = free_port(), free_port()
        iperf = self.procs.start("iperf3-server", [a.iperf3, "-s", "-p", str(iport)])
        cfg = os.path.join(self.dir, "terminator-%d.cfg" % tport)
        with open(cfg, "w") as f:
            f.write(HAPROXY_TERMINATOR.format(listen="%s:%d" % (HOST, tport),
                                              upstream="%s:%d" % (HOST, iport),
                                              crt=c["member_pem"], ca=c["ca"]))
        term = self.procs.start("tls-terminator", [a.haproxy, "-db", "-f", cfg])
        gw = None
        try:
            wait_listening(iperf, iport)
            wait_listening(term, tport)
            gw, port = self.gateway(name, tport, etcd=False)
            rc, out, cpu_s, load, other = self.measured(
                gw, "iperf3", [a.iperf3, "-c", HOST, "-p", str(port), "-t", str(a.bulk_seconds),
                               "-J"], a.bulk_seconds + 30)
            try:
                j = json.loads(out[out.index("{"):])
            except ValueError:
                raise BenchError("iperf3 output not JSON (rc %s):\n%s" % (rc, out[-2000:]))
            if "error" in j:
                raise BenchError("iperf3: " + j["error"])
            nbytes = j["end"]["sum_received"]["bytes"]
            return {"bytes": nbytes, "gbit_s": j["end"]["sum_received"]["bits_per_second"] / 1e9,
                    "cpu_s": cpu_s, "cpu_s_per_gb": cpu_s / (nbytes / 1e9) if nbytes else None,
                    "load": load, "other_cores": other}
        finally:
            self.procs.stop(gw)
            self.procs.stop(term)
            self.procs.stop(iperf)


def run_tls_originate(a, procs, tests):
    """Rounds of wrk (and bulk) for ours and HAProxy in TLS-origination mode, alternating
    order; returns {"rounds": [...], "summary": {...}} and logs a table."""
    import shutil

    bench = TLSOrigination(a, procs)
    bench.start_etcd()
    log("TLS etcd member (--client-cert-auth, certificate naming localhost only) on %s:%d"
        % (HOST, bench.etcd_port))
    rounds = []
    try:
        for rnd in range(a.rounds):
            order = list(CONTENDERS) if rnd % 2 == 0 else list(reversed(CONTENDERS))
            log("TLS originate round %d/%d: %s" % (rnd + 1, a.rounds, ", ".join(order)))
            res = {}
            for name in order:
                res[name] = {}
                for test in tests:
                    try:
                        r = getattr(bench, test)(name)
                    except BenchError as e:
                        log("  %s %s FAILED: %s" % (name, test, e))
                        r = {"error": str(e)}
                    res[name][test] = r
                    if test == "wrk" and "rps" in r:
                        log("  %-8s wrk  %8.0f req/s  %6.1f us CPU/request  p99 %s ms"
                            % (name, r["rps"], r["cpu_us_per_req"], r["p99_ms"]))
                    elif test == "bulk" and "gbit_s" in r:
                        log("  %-8s bulk %6.2f Gbit/s  %6.2f CPU s/GB"
                            % (name, r["gbit_s"], r["cpu_s_per_gb"]))
            rounds.append(res)
    finally:
        shutil.rmtree(getattr(bench, "datadir", ""), ignore_errors=True)
    summary = summarize(rounds)
    for line in summary_lines(summary):
        print(line)
    return {"rounds": rounds, "summary": summary}


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(rounds):
    out = {}
    for test, keys in (("wrk", ("rps", "cpu_us_per_req", "p99_ms")),
                       ("bulk", ("gbit_s", "cpu_s_per_gb"))):
        for key in keys:
            for name in CONTENDERS:
                out["%s.%s.%s" % (name, test, key)] = _median(
                    [r[name].get(test, {}).get(key) for r in rounds])
            ratios = []
            for r in rounds:
                ours = r["ours"].get(test, {}).get(key)
                theirs = r["haproxy"].get(test, {}).get(key)
                if ours is not None and theirs:
                    ratios.append(ours / theirs)
            out["ratio.%s.%s" % (test, key)] = _median(ratios)
            out["ratio.%s.%s.range" % (test, key)] = (min(ratios), max(ratios)) if ratios else None
    return out


def summary_lines(s):
    def f(v, fmt):
        return fmt % v if v is not None else "-"

    lines = ["", "TLS origination (medians; ratio = median of per-round ours/HAProxy, range)",
             "%-26s %12s %12s %22s" % ("", "ours", "haproxy", "ratio")]
    for test, key, fmt in (("wrk", "rps", "%.0f"), ("wrk", "cpu_us_per_req", "%.1f"),
                           ("wrk", "p99_ms", "%.2f"), ("bulk", "gbit_s", "%.2f"),
                           ("bulk", "cpu_s_per_gb", "%.2f")):
        rng = s.get("ratio.%s.%s.range" % (test, key))
        lines.append("%-26s %12s %12s %10s %11s" % (
            "%s %s" % (test, key), f(s.get("ours.%s.%s" % (test, key)), fmt),
            f(s.get("haproxy.%s.%s" % (test, key)), fmt),
            f(s.get("ratio.%s.%s" % (test, key)), "%.2fx"),
            "(%.2f-%.2f)" % rng if rng else ""))
    return lines
