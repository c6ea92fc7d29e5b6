from twisted.trial.unittest import SynchronousTestCase

from etcdgw.endpoint import parseEndpoints
from etcdgw.listen import parseListenAddress
from etcdgw.selfloop import SelfLoopError, checkSelfLoop, isLocalAddress, resolve


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
