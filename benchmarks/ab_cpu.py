#!/usr/bin/env python3
"""
CPU per request of two or more source trees of the gateway (or HAProxy),
alternating A/B in one run (issue 16): on a shared, noisy machine a
difference of a few percent shows only in per-round ratios of runs that
alternate, never in two runs minutes apart.

    python3 benchmarks/ab_cpu.py --rounds 5 base=/tmp/base new=. newpy=.:pure haproxy=haproxy

NAME=DIR runs ``python -m twisted etcd-gateway`` from DIR (DIR first on
PYTHONPATH; build its C step there first: ``python setup.py build_ext
--inplace``); NAME=DIR:pure hides the C steps (benchmarks/gwbench/purepython);
NAME=DIR:epoll runs it with --forward=epoll (no io_uring);
NAME=haproxy runs HAProxy (``mode tcp``, one thread); NAME=floor-epoll and
NAME=floor-uring build and run the minimal C relays of benchmarks/floor/
(the floor of any epoll or io_uring copy proxy here; floor-uring needs
liburing-dev). One etcd member on
/dev/shm; each round starts each contender afresh, warms it up (wrk 2 s),
then measures ``wrk -t1 -c50 -d5s --latency /version`` through it: p99, CPU (perf stat
task-clock), user and system time (/proc/PID/stat) and system calls (perf
stat raw_syscalls:sys_enter) per request. Order alternates each round.
Prints each measurement, then the medians and the ranges.
"""

import argparse
import os
import re
import signal
import statistics
import subprocess
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PURE = os.path.join(HERE, "gwbench", "purepython")
HOST = "127.0.0.1"


def ticks(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def start(name, spec, etcdPort, port, tmp, python):
    if spec == "haproxy":
        cfg = os.path.join(tmp, "haproxy.cfg")
        with open(cfg, "w") as f:
            f.write(
                "global\n nbthread 1\ndefaults\n mode tcp\n timeout connect 1s\n"
                " timeout client 1h\n timeout server 1h\n"
                f"frontend fe\n bind {HOST}:{port}\n default_backend be\n"
                f"backend be\n server s0 {HOST}:{etcdPort}\n"
            )
        return subprocess.Popen(
            ["haproxy", "-db", "-f", cfg], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
    if spec in ("floor-epoll", "floor-uring"):
        kind = spec.split("-")[1]
        exe = os.path.join(tmp, f"relay_{kind}")
        if not os.path.exists(exe):
            subprocess.run(
                ["gcc", "-O2", "-o", exe, os.path.join(HERE, "floor", f"relay_{kind}.c")]
                + (["-luring"] if kind == "uring" else []),
                check=True,
            )
        return subprocess.Popen([exe, str(port), str(etcdPort)])
    tree, _, mode = spec.partition(":")
    pure = mode == "pure"
    tree = os.path.abspath(tree)
    env = dict(os.environ)
    env["PYTHONPATH"] = (PURE + os.pathsep if pure else "") + tree
    return subprocess.Popen(
        [python, "-m", "twisted", "etcd-gateway", f"--endpoints={HOST}:{etcdPort}",
         f"--listen-addr={HOST}:{port}"] + (["--forward=epoll"] if mode == "epoll" else []),
        # python -m puts its working directory first on sys.path: the stub's,
        # for :pure (from the tree, the tree's built C step would come first).
        cwd=PURE if pure else tree, env=env, stdout=open(os.path.join(tmp, f"{name}.log"), "w"),
        stderr=subprocess.STDOUT,
    )


def measure(gw, port, tmp, seconds, connections=50):
    url = f"http://{HOST}:{port}/version"
    subprocess.run(["wrk", "-t1", f"-c{connections}", "-d2s", url], capture_output=True)
    statFile = os.path.join(tmp, "stat.txt")
    u0, s0 = ticks(gw.pid)
    stat = subprocess.Popen(
        ["perf", "stat", "-x,", "-e", "task-clock,raw_syscalls:sys_enter", "-p", str(gw.pid),
         "-o", statFile]
    )
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url],
        capture_output=True,
        text=True,
    ).stdout
    u1, s1 = ticks(gw.pid)
    stat.send_signal(signal.SIGINT)
    stat.wait()
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    p99 = re.search(r"^\s*99%\s+([\d.]+)(us|ms|s)\b", out, re.M)
    p99ms = float(p99.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[p99.group(2)]
    text = open(statFile).read()
    ms = float(re.search(r"^([\d.]+),msec,task-clock", text, re.M).group(1))
    calls = float(re.search(r"^(\d+),,raw_syscalls", text, re.M).group(1))
    tick = os.sysconf("SC_CLK_TCK")
    return {
        "us": ms * 1000 / requests,
        "user": (u1 - u0) / tick * 1e6 / requests,
        "sys": (s1 - s0) / tick * 1e6 / requests,
        "rps": requests / seconds,
        "calls": calls / requests,
        "p99": p99ms,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    p.add_argument("contenders", nargs="+", metavar="NAME=DIR[:pure|:epoll]|NAME=haproxy|NAME=floor-epoll|NAME=floor-uring")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--connections", type=int, default=50, help="wrk -c (default 50)")
    p.add_argument("--python", default="python3")
    p.add_argument("--etcd-port", type=int, default=24201)
    p.add_argument("--port", type=int, default=24203)
    a = p.parse_args()
    contenders = [c.split("=", 1) for c in a.contenders]
    tmp = tempfile.mkdtemp(prefix="ab-cpu-")
    data = tempfile.mkdtemp(prefix="ab-cpu-etcd-", dir="/dev/shm")
    peer = a.etcd_port + 1
    etcd = subprocess.Popen(
        ["etcd", "--name", "ab", "--data-dir", data,
         "--listen-client-urls", f"http://{HOST}:{a.etcd_port}",
         "--advertise-client-urls", f"http://{HOST}:{a.etcd_port}",
         "--listen-peer-urls", f"http://{HOST}:{peer}",
         "--initial-advertise-peer-urls", f"http://{HOST}:{peer}",
         "--initial-cluster", f"ab=http://{HOST}:{peer}", "--log-level", "error",
         "--logger", "zap"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    results = {name: [] for name, _ in contenders}
    try:
        time.sleep(2)
        for r in range(a.rounds):
            for name, spec in contenders if r % 2 == 0 else contenders[::-1]:
                gw = start(name, spec, a.etcd_port, a.port, tmp, a.python)
                try:
                    time.sleep(2.5)
                    m = measure(gw, a.port, tmp, a.seconds, a.connections)
                finally:
                    gw.terminate()
                    gw.wait()
                results[name].append(m)
                print(
                    f"round {r + 1} {name:8s} {m['us']:6.1f} us/req (user {m['user']:5.1f}, "
                    f"system {m['sys']:5.1f}) {m['rps']:8.0f} req/s "
                    f"{m['calls']:5.2f} calls/req  p99 {m['p99']:5.2f} ms",
                    flush=True,
                )
    finally:
        etcd.terminate()
        etcd.wait()
        subprocess.run(["rm", "-rf", data])
    for name, _ in contenders:
        line = [f"{name:8s}"]
        for key, label in (("us", "CPU us/req"), ("user", "user"), ("sys", "system"),
                           ("rps", "req/s"), ("p99", "p99 ms")):
            v = [m[key] for m in results[name]]
            line.append(f"{label} {statistics.median(v):.1f} [{min(v):.1f}-{max(v):.1f}]")
        print("  ".join(line))
    base = contenders[0][0]
    for name, _ in contenders[1:]:
        for key, label in (("us", "CPU per request"), ("rps", "req/s"), ("p99", "p99")):
            ratios = [m[key] / b[key] for m, b in zip(results[name], results[base])]
            print(
                f"{name}/{base} {label}, per round: "
                + ", ".join(f"{x:.2f}" for x in ratios)
                + f"; median {statistics.median(ratios):.2f}"
            )


if __name__ == "__main__":
    main()
