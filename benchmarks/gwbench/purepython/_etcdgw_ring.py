"""Put first on PYTHONPATH by the "ours-py" contender with _etcdgw_relay.py: hides
the built io_uring step too, so the gateway forwards as an install without a
compiler does (pure Python, on epoll)."""

raise ImportError("hidden by benchmarks/gwbench/purepython: the pure-Python step is measured")
