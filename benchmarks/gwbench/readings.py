"""/proc readings: CPU, RSS and descriptors of a process tree, load, and the CPU that
processes not started here use while something is measured."""

import os
import time

from gwbench import log

CLK_TCK = os.sysconf("SC_CLK_TCK")


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


def nfds_tree(pid):
    return sum(nfds(p) for p in proc_tree(pid))


def loadavg():
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


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
