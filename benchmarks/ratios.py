#!/usr/bin/env python3
"""
Ratios of a compare.py results file to any contender (issue 16: to HAProxy
and to "direct", no proxy at all), with the spread over rounds.

    python3 benchmarks/ratios.py results.json --base haproxy

For each metric and contender: the median over rounds of its value, and of
its per-round ratio to the base, with the smallest and largest per-round
ratio (the noise of a shared machine).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gwbench.report import COLUMNS, fmt, med  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip())
    p.add_argument("results")
    p.add_argument("--base", default="haproxy")
    a = p.parse_args()
    with open(a.results) as f:
        saved = json.load(f)
    rounds = saved["rounds"]
    names = saved["contenders"]
    print(f"{len(rounds)} rounds; ratios to {a.base}: median [min-max] of per-round ratios")
    for header, test, key, spec in COLUMNS:
        print(f"\n{header}")
        for name in names:
            values = [r.get(name, {}).get(test, {}).get(key) for r in rounds]
            ratios = []
            for r in rounds:
                v = r.get(name, {}).get(test, {}).get(key)
                b = r.get(a.base, {}).get(test, {}).get(key)
                if v is not None and b:
                    ratios.append(v / b)
            spread = f" [{min(ratios):.2f}-{max(ratios):.2f}]" if ratios else ""
            print(
                f"  {name:22s} {fmt(med(values), spec):>10s}   "
                f"{fmt(med(ratios), '.2f'):>5s}{spread}"
            )


if __name__ == "__main__":
    main()
