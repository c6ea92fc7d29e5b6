"""
Tests for L{etcdgw.srvround}: one blocking round against a fake resolver and
validator, and the one bounded pool of daemon threads that runs it.
"""

import threading

from twisted.python import failure
from twisted.trial.unittest import SynchronousTestCase

from etcdgw.srv import PLAIN_REFUSED, DiscoveredEndpoint, DiscoveryConfig
from etcdgw.srvround import BlockingPool, LookupFailed, discover
from tests.srvzone import PLAIN, SSL, FakeResolver, FakeValidator, _A, srvRdata, zone


class DiscoverTests(SynchronousTestCase):
    def test_tlsVerified(self):
        """
        TLS records become endpoints at the target's address, carrying the
        name, priority and weight, after validation against the target name.
        """
        validator = FakeValidator()
        result = discover(
            DiscoveryConfig("etcd.test"),
            FakeResolver(zone(ssl=[(0, 1, 2379, "m1.etcd.test."), (1, 2, 2380, "m2.etcd.test.")], ttl=17)),
            validator,
        )
        self.assertEqual(
            list(result.endpoints),
            [
                DiscoveredEndpoint("127.0.0.1", 2379, 0, 1, True, name="m1.etcd.test", verified=True),
                DiscoveredEndpoint("127.0.0.2", 2380, 1, 2, True, name="m2.etcd.test", verified=True),
            ],
        )
        self.assertEqual(
            sorted(validator.calls),
            [("127.0.0.1", 2379, "m1.etcd.test"), ("127.0.0.2", 2380, "m2.etcd.test")],
        )
        self.assertEqual(result.ttl, 17)
        self.assertEqual(str(result.endpoints[0]), "m1.etcd.test:2379 (127.0.0.1)")
        self.assertEqual(result.endpoints[0].key, ("127.0.0.1", 2379))

    def test_plainRefused(self):
        """
        Without --insecure-discovery a plain record is refused with the
        documented reason and never validated.
        """
        validator = FakeValidator()
        result = discover(
            DiscoveryConfig("etcd.test"), FakeResolver(zone(plain=[(0, 0, 2379, "m1.etcd.test.")])), validator
        )
        self.assertEqual(result.endpoints, ())
        self.assertEqual(result.refused, ((f"{PLAIN} m1.etcd.test:2379", PLAIN_REFUSED),))
        self.assertEqual(validator.calls, [])
        self.assertIn("--insecure-discovery accepts it", result.describe())

    def test_insecure(self):
        """
        With --insecure-discovery every record is accepted, unverified, without
        a handshake.
        """
        validator = FakeValidator()
        result = discover(
            DiscoveryConfig("etcd.test", insecure=True),
            FakeResolver(zone(ssl=[(0, 0, 2379, "m1.etcd.test.")], plain=[(0, 0, 2380, "m2.etcd.test.")])),
            validator,
        )
        self.assertEqual([(e.port, e.tls, e.verified) for e in result.endpoints],
                         [(2379, True, False), (2380, False, False)])
        self.assertEqual(validator.calls, [])

    def test_validationRefused(self):
        """
        A TLS endpoint that fails validation is refused with the reason; the
        others are kept.
        """
        result = discover(
            DiscoveryConfig("etcd.test"),
            FakeResolver(zone(ssl=[(0, 0, 2379, "rogue.etcd.test."), (0, 0, 2380, "m1.etcd.test.")])),
            FakeValidator(refuse=["rogue.etcd.test"]),
        )
        self.assertEqual([e.name for e in result.endpoints], ["m1.etcd.test"])
        self.assertEqual(
            result.refused,
            ((f"{SSL} rogue.etcd.test:2379", "certificate verify failed: rogue"),),
        )

    def test_unresolvedTarget(self):
        """
        A target without an address is refused, saying so.
        """
        result = discover(
            DiscoveryConfig("etcd.test"),
            FakeResolver(zone(ssl=[(0, 0, 2379, "gone.etcd.test.")], hosts={"gone.etcd.test": None})),
            FakeValidator(),
        )
        self.assertEqual(result.endpoints, ())
        self.assertIn("target gone.etcd.test has no A or AAAA record", result.describe())

    def test_knownNotValidatedAgain(self):
        """
        An endpoint already proven (same name, address, port) is accepted
        without a new handshake.
        """
        validator = FakeValidator()
        known = {("m1.etcd.test", "127.0.0.1", 2379, True)}
        result = discover(
            DiscoveryConfig("etcd.test"),
            FakeResolver(zone(ssl=[(0, 0, 2379, "m1.etcd.test.")])),
            validator,
            known=frozenset(known),
        )
        self.assertEqual(len(result.endpoints), 1)
        self.assertEqual(validator.calls, [])

    def test_dnsFailure(self):
        """
        A failed look-up (not NXDOMAIN) marks the round failed.
        """
        resolver = FakeResolver({(SSL, "SRV"): LookupFailed("SRV look-up of x failed: timed out")})
        result = discover(DiscoveryConfig("etcd.test"), resolver, FakeValidator())
        self.assertTrue(result.dnsFailed)
        self.assertIn("timed out", result.describe())


class BadRecordTests(SynchronousTestCase):
    """
    Issue 11 item 5: one bad record refuses that record only, whatever it
    raises; one look-up that raises fails that look-up only.
    """

    def test_anyExceptionRefusesThatRecord(self):
        """
        Exceptions other than ValidationError from a proof (service_identity's
        CertificateError, a ValueError, anything) refuse that record with a
        one-line reason and are kept for logging; the good record is accepted.
        """
        from service_identity import CertificateError

        validator = FakeValidator(raises={
            "nosan.etcd.test": CertificateError("Certificate does not contain any `subjectAltName`s."),
            "ip.etcd.test": ValueError("Invalid DNS-ID."),
            "boom.etcd.test": RuntimeError("boom\nwith a second line"),
        })
        result = discover(
            DiscoveryConfig("etcd.test"),
            FakeResolver(zone(ssl=[
                (0, 0, 2379, "nosan.etcd.test."), (0, 0, 2379, "ip.etcd.test."),
                (0, 0, 2379, "boom.etcd.test."), (1, 0, 2379, "m1.etcd.test."),
            ])),
            validator,
        )
        self.assertEqual([e.name for e in result.endpoints], ["m1.etcd.test"])
        reasons = dict(result.refused)
        self.assertEqual(
            reasons[f"{SSL} nosan.etcd.test:2379"],
            "unexpected error: CertificateError: Certificate does not contain any `subjectAltName`s.",
        )
        self.assertEqual(reasons[f"{SSL} ip.etcd.test:2379"], "unexpected error: ValueError: Invalid DNS-ID.")
        self.assertEqual(
            reasons[f"{SSL} boom.etcd.test:2379"], "unexpected error: RuntimeError: boom with a second line"
        )
        self.assertEqual(
            sorted(type(f.value).__name__ for _, f in result.failures),
            ["CertificateError", "RuntimeError", "ValueError"],
        )

    def test_singleRecordException(self):
        """
        A round with one record whose proof raises is a refusal, not an
        exception out of discover().
        """
        result = discover(
            DiscoveryConfig("etcd.test"),
            FakeResolver(zone(ssl=[(0, 0, 2379, "m1.etcd.test.")])),
            FakeValidator(raises={"m1.etcd.test": KeyError("x")}),
        )
        self.assertEqual(result.endpoints, ())
        self.assertEqual(result.refused, ((f"{SSL} m1.etcd.test:2379", "unexpected error: KeyError: 'x'"),))

    def test_lookupException(self):
        """
        A look-up that raises something unexpected fails that name only: the
        other name's records are used.
        """
        records = zone(plain=[(0, 0, 2379, "m1.etcd.test.")])
        records[(SSL, "SRV")] = AttributeError("resolver bug")
        result = discover(DiscoveryConfig("etcd.test", insecure=True), FakeResolver(records), FakeValidator())
        self.assertEqual([e.name for e in result.endpoints], ["m1.etcd.test"])
        self.assertEqual(result.errors, ((SSL, f"SRV look-up of {SSL} failed: AttributeError: resolver bug"),))
        self.assertEqual(len(result.failures), 1)
        self.assertFalse(result.allFailed)

    def test_unusableAddressRefused(self):
        """
        An address from an A/AAAA answer passes the same check as flags: a
        target at 0.0.0.0 or a multicast address is refused, with the reason,
        and never dialled; a target with also a good address uses that one.
        """
        records = zone(ssl=[(0, 0, 2379, "zero.etcd.test."), (0, 0, 2379, "multi.etcd.test."),
                            (0, 0, 2379, "mixed.etcd.test.")],
                       hosts={"zero.etcd.test": "0.0.0.0", "multi.etcd.test": "224.0.0.1",
                              "mixed.etcd.test": None})
        records[("mixed.etcd.test", "A")] = ([_A("0.0.0.0"), _A("127.0.0.5")], 30)
        validator = FakeValidator()
        result = discover(DiscoveryConfig("etcd.test"), FakeResolver(records), validator)
        self.assertEqual([(e.name, e.host) for e in result.endpoints], [("mixed.etcd.test", "127.0.0.5")])
        reasons = dict(result.refused)
        self.assertIn("0.0.0.0 is an unspecified address", reasons[f"{SSL} zero.etcd.test:2379"])
        self.assertIn("224.0.0.1 is a multicast", reasons[f"{SSL} multi.etcd.test:2379"])
        self.assertEqual(validator.calls, [("127.0.0.5", 2379, "mixed.etcd.test")])

    def test_unusableAddressRefusedInsecure(self):
        """
        With --insecure-discovery too, an unusable address is refused.
        """
        result = discover(
            DiscoveryConfig("etcd.test", insecure=True),
            FakeResolver(zone(plain=[(0, 0, 2379, "zero.etcd.test.")], hosts={"zero.etcd.test": "0.0.0.0"})),
            FakeValidator(),
        )
        self.assertEqual(result.endpoints, ())
        self.assertIn("unspecified address", result.describe())

    def test_ipLiteralTarget(self):
        """
        An IP-literal target is that address (no A look-up), proven against
        the IP; an unusable one (0.0.0.0) is refused.
        """
        resolver = FakeResolver({(SSL, "SRV"): ([srvRdata(0, 0, 2379, "127.0.0.9."),
                                                 srvRdata(0, 0, 2380, "0.0.0.0.")], 30)})
        validator = FakeValidator()
        result = discover(DiscoveryConfig("etcd.test"), resolver, validator)
        self.assertEqual(
            list(result.endpoints),
            [DiscoveredEndpoint("127.0.0.9", 2379, 0, 0, True, name="127.0.0.9", verified=True)],
        )
        self.assertEqual(validator.calls, [("127.0.0.9", 2379, "127.0.0.9")])
        self.assertEqual(resolver.asked, [(SSL, "SRV"), (PLAIN, "SRV")])
        self.assertIn("0.0.0.0 is an unspecified address", dict(result.refused)[f"{SSL} 0.0.0.0:2380"])

    def test_targetLookupFailed(self):
        """
        A target whose address look-up failed (not "no address") is refused
        and marked unresolved, so the service can keep its last endpoint.
        """
        records = zone(ssl=[(0, 0, 2379, "m1.etcd.test."), (0, 0, 2379, "m2.etcd.test.")])
        records[("m2.etcd.test", "A")] = LookupFailed("A look-up of m2.etcd.test failed: timed out")
        result = discover(DiscoveryConfig("etcd.test"), FakeResolver(records), FakeValidator())
        self.assertEqual([e.name for e in result.endpoints], ["m1.etcd.test"])
        self.assertEqual([r.target for r in result.unresolved], ["m2.etcd.test"])
        self.assertIn("timed out", dict(result.refused)[f"{SSL} m2.etcd.test:2379"])


class BlockingPoolTests(SynchronousTestCase):
    """
    The one executor of a round's blocking work: bounded, daemon threads,
    and it never loses an exception.
    """

    def test_exceptionIsFailure(self):
        """
        An item whose call raises gets a Failure in its place; the others
        get their results, in order.
        """

        def f(item):
            if item == 2:
                raise ValueError("two")
            return item * 10

        results = BlockingPool().map(f, [1, 2, 3])
        self.assertEqual((results[0], results[2]), (10, 30))
        self.assertIsInstance(results[1], failure.Failure)
        self.assertEqual(results[1].getErrorMessage(), "two")

    def test_bounded(self):
        """
        No more than the limit run at once, however many items there are.
        """
        lock = threading.Lock()
        running = [0, 0]  # now, most
        barrier = threading.Barrier(3)

        def f(item):
            with lock:
                running[0] += 1
                running[1] = max(running[1], running[0])
            try:
                barrier.wait(timeout=10)  # three at a time, all the way
            finally:
                with lock:
                    running[0] -= 1
            return item

        self.assertEqual(BlockingPool(limit=3).map(f, list(range(12))), list(range(12)))
        self.assertEqual(running[1], 3)

    def test_daemonThreads(self):
        """
        The pool's threads are daemons: a process that exits does not wait
        for one in a DNS time-out.
        """
        threads = []

        def f(item):
            threads.append(threading.current_thread())
            return item

        BlockingPool(limit=4).map(f, range(8))
        workers = [t for t in threads if t is not threading.current_thread()]
        self.assertTrue(workers)
        self.assertTrue(all(t.daemon for t in workers))

    def test_roundInThePool(self):
        """
        A round running in the pool maps its items through the same pool,
        even when every other thread of it is busy: it does them itself,
        nothing waits for a thread it holds.
        """
        pool = BlockingPool(limit=2)
        reactor = _ThreadReactor()
        release = threading.Event()
        busy = threading.Event()

        def hold():
            busy.set()
            release.wait(10)

        pool.deferToThread(reactor, hold)  # the pool's other thread, held
        self.assertTrue(busy.wait(10))
        try:
            d = pool.deferToThread(reactor, pool.map, lambda item: item * 2, [1, 2, 3])
            self.assertTrue(reactor.wait(1), "the round waited for a thread it held")
        finally:
            release.set()
        self.assertEqual(self.successResultOf(d), [2, 4, 6])

    def test_deferToThread(self):
        """
        A call run in the pool fires its Deferred through the reactor's
        callFromThread, with its result or its failure.
        """
        pool = BlockingPool(limit=1)
        reactor = _ThreadReactor()
        ok = pool.deferToThread(reactor, lambda x: x + 1, 1)
        bad = pool.deferToThread(reactor, lambda: 1 / 0)
        self.assertTrue(reactor.wait(2))
        self.assertEqual(self.successResultOf(ok), 2)
        self.failureResultOf(bad, ZeroDivisionError)

    def test_forked(self):
        """
        A process forked after the pool ran work (twistd daemonizing after
        the round at start) gets threads of its own: its work is done, not
        queued for threads that stayed in the parent.
        """
        import os

        pool = BlockingPool(limit=3)
        self.assertEqual(pool.map(lambda item: item, range(6)), list(range(6)))
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: answer through the pipe, exit at once
            try:
                reactor = _ThreadReactor()
                d = pool.deferToThread(reactor, pool.map, lambda item: item * 2, range(6))
                results = []
                d.addCallback(results.append)
                ok = reactor.wait(1, timeout=5) and results == [[0, 2, 4, 6, 8, 10]]
                os.write(write, b"ok" if ok else b"hung")
            finally:
                os._exit(0)
        os.close(write)
        try:
            self.assertEqual(os.read(read, 10), b"ok")
        finally:
            os.close(read)
            os.waitpid(pid, 0)


class _ThreadReactor:
    """
    Enough of a reactor for L{BlockingPool.deferToThread}: what is called
    from a thread runs in the test's thread, in L{wait}.
    """

    def __init__(self):
        self._calls = []
        self._arrived = threading.Semaphore(0)

    def callFromThread(self, f, *args, **kwargs):
        self._calls.append((f, args, kwargs))
        self._arrived.release()

    def wait(self, count, timeout=10):
        """
        Wait for C{count} calls from threads, run them; whether they came.
        """
        for _ in range(count):
            if not self._arrived.acquire(timeout=timeout):
                return False
        calls, self._calls = self._calls, []
        for f, args, kwargs in calls:
            f(*args, **kwargs)
        return True
