"""The processes compared: one real etcd member upstream, and each contender
(ours, ours in pure Python, ours with two workers, etcd's gateway, HAProxy,
Twisted's portforward, and "direct": no proxy, the client straight to the
upstream) started in front of given upstream ports."""

import contextlib
import os
import tempfile
import time

from gwbench import HOST, REPO, BenchError
from gwbench.processes import free_port, http_get_version, tail, wait_listening

ALL_CONTENDERS = ("ours", "ours-epoll", "ours-py", "ours-w2", "etcd", "haproxy",
                  "twisted-portforward", "direct")
#: Put first on PYTHONPATH for "ours-py": hides the C forwarding step.
PURE_PYTHON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "purepython")

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


class Contenders:
    """Starts the etcd member and the gateways, every process through `procs`."""

    def __init__(self, args, procs):
        self.args = args
        self.procs = procs
        self.etcd_port = None
        self.etcd_datadir = None

    def start_etcd(self):
        """The upstream etcd member, answering /version on self.etcd_port."""
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

    def command(self, name, listen, upstreams, etcd=True):
        """Command (and cwd, env) for contender `name` listening on `listen`,
        forwarding to the list of upstream ports; (None, None, None) if it cannot
        take that many upstreams.  `etcd` says whether the upstreams are etcd
        members: where they are not (iperf3, the idle holder, the firehose),
        ours checks them as etcd's gateway and HAProxy do, by TCP only
        (--health-check=tcp), since its default check asks GET /version."""
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
        if name == "ours-py":
            env["PYTHONPATH"] = PURE_PYTHON + os.pathsep + env["PYTHONPATH"]
        if name in ("ours", "ours-epoll", "ours-py", "ours-w2"):
            cmd = [a.python, "-m", "twisted", "etcd-gateway", "--endpoints=" + eps,
                   "--listen-addr=%s:%d" % (HOST, listen)]
            if name == "ours-w2":
                cmd.append("--workers=2")
            if name == "ours-epoll":
                cmd.append("--forward=epoll")  # the copy path without io_uring
            if not etcd:
                cmd.append("--health-check=tcp")
            cmd.extend(a.ours_arg)
            # python -m puts its working directory first on sys.path: ours-py
            # runs from the directory of the stub, so the stub comes first
            # (from REPO, REPO's built C step would).
            return cmd, PURE_PYTHON if name == "ours-py" else REPO, env
        raise BenchError("unknown contender " + name)

    @contextlib.contextmanager
    def gateway(self, name, upstreams, etcd=True):
        """Contender `name` forwarding to `upstreams`, listening and settled: yields
        (process, port), or (None, None) if it cannot take these upstreams.  Stopped
        on leaving the block, also when it failed to start."""
        if name == "direct":
            # No proxy: the tools go straight to the upstream; a process
            # that does nothing stands in for the gateway (its CPU and
            # memory are nil). One upstream only (not the SYN test).
            if len(upstreams) != 1:
                yield None, None
                return
            p = self.procs.start("direct", ["sleep", "100000"])
            try:
                yield p, upstreams[0]
            finally:
                self.procs.stop(p)
            return
        listen = free_port()
        cmd, cwd, env = self.command(name, listen, upstreams, etcd)
        if cmd is None:
            yield None, None
            return
        p = self.procs.start("gw-" + name, cmd, cwd=cwd, env=env)
        try:
            wait_listening(p, listen)
            time.sleep(self.args.settle)
            if p.poll() is not None:
                raise BenchError("%s exited right after start:\n%s" % (name, tail(p.bench_log)))
            yield p, listen
        finally:
            self.procs.stop(p)
