"""The pieces of ``benchmarks/compare.py``, one concern a module.

- ``processes``: children in their own process groups, ports, readiness, descriptor limits.
- ``readings``: /proc readings (CPU, RSS, descriptors) and the other work on the machine.
- ``contenders``: the etcd member upstream and each gateway in front of it.
- ``helpers``: the stand-in upstreams (idle holder, firehose), run as their own processes.
- ``scenarios``: the measurements (wrk, bulk, idle, syn, slow).
- ``environment``: which tools and versions are there, and what the machine is.
- ``report``: one-line summaries, tables, ratios to etcd's gateway, the JSON file.

Standard library only.
"""

import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HOST = "127.0.0.1"


class BenchError(Exception):
    pass


def log(msg):
    print(time.strftime("%H:%M:%S"), msg, file=sys.stderr, flush=True)
