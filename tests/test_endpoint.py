from twisted.trial.unittest import SynchronousTestCase

from etcdgw.endpoint import (
    Endpoint,
    EndpointError,
    formatHostPort,
    parseEndpoint,
    parseEndpoints,
)


class ParseEndpointTests(SynchronousTestCase):
    def test_hostPort(self):
        """host:port, [v6]:port and host names parse to an Endpoint."""
        self.assertEqual(parseEndpoint("127.0.0.1:2379"), Endpoint("127.0.0.1", 2379))
        self.assertEqual(parseEndpoint("[::1]:2379"), Endpoint("::1", 2379))
        self.assertEqual(parseEndpoint(" etcd-1.example.com:2379 "), Endpoint("etcd-1.example.com", 2379))

    def test_schemes(self):
        """http:// and https:// prefixes (and paths) are stripped; https marks TLS."""
        self.assertEqual(parseEndpoint("http://10.0.0.1:2379"), Endpoint("10.0.0.1", 2379))
        self.assertEqual(
            parseEndpoint("https://h:2379/v3/path"), Endpoint("h", 2379, tls=True)
        )
        self.assertEqual(parseEndpoint("HTTPS://[::1]:1"), Endpoint("::1", 1, tls=True))

    def test_refused(self):
        """Each malformed item is refused with an error that names it."""
        cases = {
            "h": "missing port",
            "h:abc": 'port "abc" is not a number',
            "h:0": "not in 1-65535",
            "h:65536": "not in 1-65535",
            "h:": 'port "" is not a number',
            ":2379": "missing host",
            "::1:2379": "needs brackets",
            "[::1]2379": "expected [IPv6]:port",
            "[nothost]:1": "is not an IPv6 address",
            "ftp://h:1": 'unsupported scheme "ftp"',
            "bad host:1": "is not a valid host name",
            "h:-1": "is not a number",
            "h:\u0661": "is not a number",
        }
        for text, message in cases.items():
            e = self.assertRaises(EndpointError, parseEndpoint, text)
            self.assertIn(message, str(e), text)
            self.assertIn(text.split("://")[-1] if "://" not in text else text, str(e))

    def test_str(self):
        """Endpoints print as host:port, IPv6 in brackets."""
        self.assertEqual(str(Endpoint("::1", 2379)), "[::1]:2379")
        self.assertEqual(formatHostPort("h", 1), "h:1")


class ParseEndpointsTests(SynchronousTestCase):
    def test_list(self):
        """A comma-separated list keeps its order."""
        self.assertEqual(
            [str(e) for e in parseEndpoints("a:1,[::1]:2,https://c:3")],
            ["a:1", "[::1]:2", "c:3"],
        )

    def test_empty(self):
        """An empty item is refused."""
        for text in ["", "a:1,,b:2", "a:1,"]:
            e = self.assertRaises(EndpointError, parseEndpoints, text)
            self.assertIn("empty endpoint", str(e))

    def test_duplicate(self):
        """The same member listed twice (even with another scheme) is refused."""
        e = self.assertRaises(EndpointError, parseEndpoints, "a:1,b:2,http://a:1")
        self.assertIn("listed twice", str(e))
        self.assertIn("http://a:1", str(e))
