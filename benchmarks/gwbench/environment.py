"""What is installed and what the machine is: the tools each run needs (named with
the command that installs them), whether the interpreter has our plugin, versions."""

import os
import platform
import re
import shutil
import subprocess
import time

from gwbench import REPO
from gwbench.readings import loadavg

INSTALL_HINT = {
    "etcd": "apt-get install etcd-server   (Debian/Ubuntu; or a release from github.com/etcd-io/etcd)",
    "iperf3": "apt-get install iperf3",
    "wrk": "apt-get install wrk",
    "haproxy": "apt-get install haproxy",
}


def _twisted_help(python, *plugin):
    """`python -m twisted [plugin] --help` run from the repository, or None."""
    try:
        return subprocess.run([python, "-m", "twisted", *plugin, "--help"], cwd=REPO,
                              env=dict(os.environ, PYTHONPATH=REPO), capture_output=True,
                              text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None


def plugin_available(python):
    """(has the etcd-gateway plugin, the plugin has --workers)."""
    out = _twisted_help(python)
    if out is None:
        return False, False
    has = re.search(r"^\s+etcd-gateway\s", out, re.M) is not None
    workers = False
    if has:
        h = _twisted_help(python, "etcd-gateway")
        workers = h is not None and "--workers" in h
    return has, workers


def check_tools(a, contenders, tests):
    """Fill a.etcd, a.wrk, ... from PATH; return the problems that stop a run."""
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


def _tool_version(path, flag, pattern):
    return cmd_version([path, flag], pattern) if path else None


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
        "etcd": _tool_version(a.etcd, "--version", r"etcd Version:\s*(\S+)"),
        "haproxy": _tool_version(a.haproxy, "-v", r"version\s+(\S+)"),
        "iperf3": _tool_version(a.iperf3, "--version", r"iperf\s+(\S+)"),
        "wrk": _tool_version(a.wrk, "--version", r"wrk\s+(\S+)"),
        "loadavg_start": loadavg(),
        "repo_commit": cmd_version(["git", "-C", REPO, "log", "-1", "--format=%h %cd",
                                    "--date=iso"]),
        "repo_dirty": bool(cmd_version(["git", "-C", REPO, "status", "--porcelain",
                                        "--untracked-files=no", "--", "etcdgw", "twisted"])),
    }
    return info
