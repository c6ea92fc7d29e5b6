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

Run ``python3 benchmarks/compare.py --help`` for every option.  This file is the
command line and the run's order; the pieces are in ``gwbench/`` (see its __init__).
"""

import argparse
import os
import shutil
import signal
import sys
import tempfile

from gwbench import HOST, REPO, BenchError, log
from gwbench.contenders import ALL_CONTENDERS, Contenders
from gwbench.environment import check_tools, machine_info, plugin_available
from gwbench.processes import Procs, raise_nofile
from gwbench.readings import loadavg
from gwbench.report import report, report_saved, save, short
from gwbench.scenarios import ALL_TESTS, Scenarios


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
    p.add_argument("--upstream-tls-originate", action="store_true",
                   help="instead of the usual run: ours with --upstream-tls=originate against "
                        "HAProxy doing the same (tcp mode, ALPN h2/http1.1 by req.payload(0,3), "
                        "ssl verify required verifyhost ... crt ...) to a TLS etcd member with "
                        "--client-cert-auth; tests wrk and bulk only (see gwbench/tlsorigin.py)")
    return p.parse_args(argv)


def _names(text, known, what):
    """The comma-separated names in `text`; exits naming any not in `known`."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in known]
    if bad:
        raise SystemExit("unknown %s(s) %s; choose from %s"
                         % (what, ", ".join(bad), ", ".join(known)))
    return names


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    if a.report_from:
        report_saved(a.report_from, a.syn_cap, a.rst)
        return 0
    if a.rounds < 1 or a.rounds > 50:
        raise SystemExit("--rounds must be 1..50")

    if a.upstream_tls_originate:
        return main_tls_originate(a)
    has_plugin, has_workers = plugin_available(a.python)
    if a.only:
        contenders = _names(a.only, ALL_CONTENDERS, "contender")
    else:
        contenders = ["ours" if has_plugin else "twisted-portforward", "etcd", "haproxy"]
    tests = _names(a.tests, ALL_TESTS, "test")
    problems = check_tools(a, contenders, tests)
    if {"ours", "ours-py", "ours-w2"} & set(contenders) and not has_plugin:
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
    gateways = Contenders(a, procs)
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
        gateways.start_etcd()
        log("etcd member on %s:%d" % (HOST, gateways.etcd_port))
        run(a, Scenarios(a, procs, gateways), contenders, tests, slow_set, results, slow)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted; cleaning up")
    finally:
        procs.stop_all()
        if gateways.etcd_datadir:
            shutil.rmtree(gateways.etcd_datadir, ignore_errors=True)
        if a.keep_logs:
            log("logs kept in " + tmpdir)
        else:
            shutil.rmtree(tmpdir, ignore_errors=True)

    info["loadavg_end"] = loadavg()
    report(info, contenders, tests, results, slow, ours, a.syn_cap, a.rst)
    if a.json:
        save(a.json, a, info, contenders, tests, results, slow, ours)
        log("raw results saved to " + a.json)
    return 130 if interrupted else 0


def main_tls_originate(a):
    """--upstream-tls-originate: TLS origination, ours against HAProxy (issue 15)."""
    import json

    from gwbench.tlsorigin import run_tls_originate

    tests = _names(a.tests, ("wrk", "bulk"), "test") if a.tests != ",".join(ALL_TESTS) \
        else ["wrk", "bulk"]
    problems = check_tools(a, ["ours", "haproxy"], tests)
    if not shutil.which("openssl"):
        problems.append("openssl (the command) makes the certificates: apt-get install openssl")
    if problems:
        print("cannot run the benchmark:\n" + "\n".join(problems), file=sys.stderr)
        return 2
    raise_nofile(a.nofile)
    tmpdir = tempfile.mkdtemp(prefix="etcdgw-bench-tls-")
    procs = Procs(tmpdir)
    try:
        result = run_tls_originate(a, procs, tests)
    finally:
        procs.stop_all()
        if a.keep_logs:
            log("logs kept in " + tmpdir)
        else:
            shutil.rmtree(tmpdir, ignore_errors=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"mode": "upstream-tls-originate", "machine": machine_info(a), **result},
                      f, indent=1, default=str)
        log("raw results saved to " + a.json)
    return 0


def run(a, scenarios, contenders, tests, slow_set, results, slow):
    """Every round's tests, the contenders alternating order (A,B,C then C,B,A ...),
    then the slow-reader check once per contender in slow_set.  Fills `results`
    (one dict per round: contender -> test -> numbers) and `slow` as it goes, so that
    an interruption keeps what was measured."""

    def measure(test, name, label):
        try:
            r = scenarios.run(test, name)
        except BenchError as e:
            log("  %s %s FAILED: %s" % (name, test, e))
            r = {"error": str(e)}
        log("  %-20s %s %s" % (name, label, short(test, r)))
        return r

    round_tests = [t for t in tests if t != "slow"]
    for rnd in range(a.rounds):
        order = contenders if rnd % 2 == 0 else list(reversed(contenders))
        log("round %d/%d: %s" % (rnd + 1, a.rounds, ", ".join(order)))
        res = {}
        results.append(res)
        for name in order:
            res[name] = {}
            for test in round_tests:
                res[name][test] = measure(test, name, "%-5s" % test)
    if "slow" in tests:
        for name in slow_set:
            slow[name] = measure("slow", name, "slow ")


if __name__ == "__main__":
    sys.exit(main())
