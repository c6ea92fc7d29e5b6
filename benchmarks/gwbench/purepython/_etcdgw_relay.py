"""Put first on PYTHONPATH by the "ours-py" contender: hides the built C
forwarding step, so the gateway forwards in pure Python (what an install
without a compiler gets; etcdgw.fast.relay falls back on this ImportError)."""

raise ImportError("hidden by benchmarks/gwbench/purepython: the pure-Python step is measured")
