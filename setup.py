from setuptools import Extension, find_packages, setup

setup(
    name="etcd-gateway",
    version="0.1.0",
    description="A local, stable TCP gateway to an etcd cluster (a twistd plugin).",
    long_description=open("README.rst", encoding="utf-8").read(),
    long_description_content_type="text/x-rst",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(exclude=["tests*", "benchmarks*"]) + ["twisted.plugins"],
    # The forwarding step in C (etcdgw/fast/relay.py). Optional: where it cannot
    # be built (no C compiler or Python headers), the install goes on and the
    # gateway forwards in pure Python, slower, and says so when it starts.
    # A top-level module, so that it is found from a checkout too.
    ext_modules=[
        Extension("_etcdgw_relay", ["etcdgw/fast/_relay.c"], optional=True),
        # Joined pairs through io_uring (etcdgw/fast/ring.py): Linux only, and
        # optional too: without it (or where the kernel refuses io_uring) the
        # gateway forwards on epoll.
        Extension("_etcdgw_ring", ["etcdgw/fast/_ring.c"], optional=True),
    ],
    install_requires=[
        # From the oldest the whole suite was run against (.ci/run runs the
        # loopback and byte-exactness tests on it too) to the newest minor
        # tested; etcdgw.fast.gate refuses the fast path outside that range.
        "Twisted>=25.5,<27",
        "service-identity>=21.1",
        "pyOpenSSL>=23.0",
        "dnspython>=2.3",
        "prometheus_client>=0.17",
    ],
    extras_require={
        "test": ["hypothesis>=6.0", "grpcio>=1.50"],
    },
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "Topic :: System :: Networking",
    ],
)
