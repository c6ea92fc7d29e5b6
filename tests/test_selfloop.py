from twisted.trial.unittest import SynchronousTestCase

from etcdgw.endpoint import Endpoint, parseEndpoints
from etcdgw.listenaddr import parseListenAddress
from etcdgw.selfloop import (
    SelfLoopError,
    SelfLoopGuard,
    checkSelfLoop,
    isLocalAddress,
    resolve,
)


class SelfLoopTests(SynchronousTestCase):
    def check(self, listen, endpoints):
        return checkSelfLoop(parseListenAddress(listen), parseEndpoints(endpoints))

    def test_sameAddress(self):
        """An endpoint equal to the listen address is refused, naming both."""
        e = self.assertRaises(SelfLoopError, self.check, "127.0.0.1:23790", "127.0.0.1:2379,127.0.0.1:23790")
        self.assertIn("127.0.0.1:23790", str(e))
        self.assertIn("own listen address", str(e))

    def test_resolvesToListen(self):
        """An endpoint host name that resolves to the listen address is refused."""
        self.assertRaises(SelfLoopError, self.check, "127.0.0.1:23790", "localhost:23790")

    def test_wildcard(self):
        """With a wildcard listen, any local address on the listen port is refused."""
        for listen in [":23790", "0.0.0.0:23790", "[::]:23790"]:
            self.assertRaises(SelfLoopError, self.check, listen, "127.0.0.1:23790")
            self.assertRaises(SelfLoopError, self.check, listen, "127.0.0.2:23790")

    def test_otherPortOrHost(self):
        """Another port, or another (non-local) address, is fine."""
        self.check(":23790", "127.0.0.1:2379")
        self.check("127.0.0.1:23790", "127.0.0.2:23790")
        self.check(":23790", "192.0.2.1:23790")  # TEST-NET-1: never local here

    def test_unixNotChecked(self):
        """A unix socket listener cannot loop through a TCP endpoint."""
        self.check("unix:/tmp/gw.sock", "127.0.0.1:23790")

    def test_unresolvable(self):
        """An endpoint that does not resolve now is not a loop (it is dialled later)."""
        self.check(":23790", "nosuchhost.invalid:23790")
        self.assertEqual(resolve("nosuchhost.invalid", 1), set())

    def test_isLocal(self):
        """Loopback addresses are local; a documentation address is not."""
        self.assertTrue(isLocalAddress("127.0.0.1"))
        self.assertTrue(isLocalAddress("127.3.2.1"))
        self.assertFalse(isLocalAddress("192.0.2.1"))


class FakeListener:
    """
    A listening service as the guard sees it (also used by the proxy's and
    the health probes' tests).
    """

    def __init__(self, host, port, flag="--listen-addr", address=None):
        self.boundAddress = (host, port)
        self.flag = flag
        self.address = address

    def describe(self):
        return f"{self.boundAddress[0] or '*'}:{self.boundAddress[1]}"


class Peer:
    def __init__(self, host, port):
        self.host, self.port = host, port


class Connected:
    """
    A connection's transport, as the guard sees it: its peer.
    """

    def __init__(self, host, port):
        self.peer = Peer(host, port)

    def getPeer(self):
        return self.peer


class GuardTests(SynchronousTestCase):
    """
    The one guard: configured endpoints (names resolved), learned ones
    (literals only), and connections' peers.
    """

    def test_configured(self):
        """checkConfigured is the start-time check, with the guard's resolver."""
        guard = SelfLoopGuard(
            parseListenAddress("127.0.0.1:23790"), resolve=lambda host, port: {"127.0.0.1"}
        )
        e = self.assertRaises(
            SelfLoopError, guard.checkConfigured, parseEndpoints("gw.example:23790")
        )
        self.assertIn("own listen address", str(e))
        guard.checkConfigured(parseEndpoints("gw.example:2379"))

    def test_learnedLiterals(self):
        """refuseLearned judges IP literals against the listen address; names pass."""
        guard = SelfLoopGuard(parseListenAddress("127.0.0.1:23790"))
        self.assertIn("own listen address", guard.refuseLearned(Endpoint("127.0.0.1", 23790)))
        self.assertIsNone(guard.refuseLearned(Endpoint("localhost", 23790)))
        self.assertIsNone(SelfLoopGuard().refuseLearned(Endpoint("127.0.0.1", 23790)))

    def test_learnedAgainstListeners(self):
        """
        Learned literals are checked against every listener's address too
        (as resolved when it started), not only the flag's.
        """
        guard = SelfLoopGuard()
        guard.listeners = [
            FakeListener("127.0.0.1", 23790, address=parseListenAddress("127.0.0.1:23790")),
            FakeListener("", 9090, "--metrics-addr", parseListenAddress(":9090")),
        ]
        self.assertIn("own listen address", guard.refuseLearned(Endpoint("127.0.0.1", 23790)))
        self.assertIn("own listen address", guard.refuseLearned(Endpoint("127.0.0.1", 9090)))
        self.assertIsNone(guard.refuseLearned(Endpoint("192.0.2.1", 9090)))
        self.assertIsNone(guard.refuseLearned(Endpoint("127.0.0.1", 2379)))

    def test_reachedItself(self):
        """A peer on any listener's bound address is the gateway itself, named by its flag."""
        guard = SelfLoopGuard(listeners=[FakeListener("127.0.0.1", 9090, "--metrics-addr")])
        why = guard.reachedItself(Connected("127.0.0.1", 9090))
        self.assertEqual(why, "127.0.0.1:9090 is the gateway's own --metrics-addr (127.0.0.1:9090)")
        self.assertIsNone(guard.reachedItself(Connected("127.0.0.1", 2379)))
        self.assertIsNone(SelfLoopGuard().reachedItself(Connected("127.0.0.1", 9090)))

    def test_localAnswersBounded(self):
        """The answers of isLocal are remembered, up to a bound."""
        asked = []

        def isLocal(address):
            asked.append(address)
            return False

        guard = SelfLoopGuard(listeners=[FakeListener("0.0.0.0", 23790)], isLocal=isLocal)
        guard.localCacheSize = 2
        for host in ["10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.3"]:
            self.assertIsNone(guard.reachedItself(Connected(host, 23790)))
        self.assertEqual(asked, ["10.0.0.1", "10.0.0.2", "10.0.0.3"])
        self.assertLessEqual(len(guard._local), 2)
