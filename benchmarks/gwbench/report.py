"""What a run prints and saves: a one-line summary per measurement, the table of
medians over rounds, the slow-reader table, the ratios to etcd's gateway against
issue #4's targets, and the JSON file that ``--report-from`` prints again."""

import json
import statistics

# Issue #4 targets, ours / etcd gateway.  (metric key, label, "<=" or ">=", target)
TARGETS = [
    ("cpu_us_per_req", "CPU per request", "<=", 0.8),
    ("rps", "requests/s", ">=", 1.1),
    ("p99_ms", "p99 latency", "<=", 1.0),
    ("gbit_s", "bulk Gbit/s", ">=", 1.0),
    ("cpu_s_per_gb", "CPU per GB", "<=", 1.0),
    ("kb_per_conn", "KB per idle connection", "<=", 0.2),
]

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


def med(values):
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def table(hdr, rows, rst=False):
    """Lines of a plain table, or of a reStructuredText simple table."""
    widths = [max(len(str(x)) for x in col) for col in zip(hdr, *rows)]
    if rst:
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


def short(test, r):
    """One line for one measurement, as it is logged."""
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


def _syn_cell(per, syn_cap):
    syn = [p.get("syn") for p in per if p.get("syn") and "error" not in p["syn"]]
    if syn and not syn[0].get("applicable", True):
        return "n/a"
    if not syn:
        return "-"
    secs = [x["seconds"] if x["seconds"] is not None else float("inf") for x in syn]
    m = statistics.median(secs)
    cell = ("> %g s" % syn_cap) if m == float("inf") else "%.2f s" % m
    if not all(x.get("ok") for x in syn if x["seconds"] is not None):
        cell += " (error reply)"
    return cell


def summarize(results, contenders, tests, syn_cap, rst=False):
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
        s["syn"] = _syn_cell(per, syn_cap)
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
    lines.extend(table(hdr, rows, rst))
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


def slow_table(slow, rst=False):
    rows = []
    for name, r in slow.items():
        if "error" in r:
            rows.append([name, "error", "", "", ""])
        else:
            rows.append([name, "%.0f MB" % (r["bytes"] / 1e6), "%.1f" % (r["mb_s"] or 0),
                         "%.1f" % (r["rss_before_kb"] / 1024.0),
                         "%.1f" % (r["peak_rss_kb"] / 1024.0)])
    return table(["contender", "read", "MB/s", "RSS start MB", "peak RSS MB"], rows, rst)


def ratio_table(results, contenders, ours, rst=False):
    """Ratios to etcd's gateway, and whether `ours` meets each target."""
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
    return table(hdr, rows, rst)


def report(info, contenders, tests, results, slow, ours, syn_cap, rst=False):
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
        _, lines = summarize(results, contenders, tests, syn_cap, rst)
        print("\n".join(lines))
        print()
    if slow:
        print("slow reader (upstream writes as fast as it can):")
        print("\n".join(slow_table(slow, rst)))
        print()
    if results and "etcd" in contenders:
        print("medians of per-round ratios, contender / etcd gateway:")
        print("\n".join(ratio_table(results, contenders, ours, rst)))


# ----------------------------------------------------------------------------------
# the JSON file


def save(path, args, info, contenders, tests, results, slow, ours):
    with open(path, "w") as f:
        json.dump({"machine": info, "contenders": contenders, "tests": tests,
                   "rounds": results, "slow_reader": slow, "ours": ours,
                   "args": vars(args)}, f, indent=2, default=str)


def report_saved(path, syn_cap, rst=False):
    """Print the report of a file written by save(); its own --syn-cap wins."""
    with open(path) as f:
        saved = json.load(f)
    report(saved["machine"], saved["contenders"], saved["tests"], saved["rounds"],
           saved["slow_reader"], saved["ours"], saved["args"].get("syn_cap", syn_cap), rst)
