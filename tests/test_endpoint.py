from twisted.trial.unittest import SynchronousTestCase

from etcdgw.endpoint import (
    Endpoint,
    addressProblem,
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
            "h:99999": "not in 1-65535",
            "h:" + "9" * 5000: "not in 1-65535",
            "[::1]:": 'port "" is not a number',
            "https://h:": 'port "" is not a number',
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
            self.assertIn(text[:40], str(e))

    def test_defaultPort(self):
        """
        A member without a port is at etcd's client port 2379, as etcd's
        documentation writes --endpoints (host names, [v6] and URLs alike).
        """
        for text, expected in [
            ("infra0.example.com", Endpoint("infra0.example.com", 2379)),
            ("[::1]", Endpoint("::1", 2379)),
            ("https://infra1.example.com", Endpoint("infra1.example.com", 2379, tls=True)),
            ("http://10.0.1.10/", Endpoint("10.0.1.10", 2379)),
        ]:
            endpoint = parseEndpoint(text)
            self.assertEqual(endpoint, expected, text)
            self.assertTrue(endpoint.portDefaulted, text)
        self.assertFalse(parseEndpoint("h:2379").portDefaulted)

    def test_documentedExample(self):
        """etcd's documented gateway command line parses (it fails in etcd itself)."""
        self.assertEqual(
            [str(e) for e in parseEndpoints(
                "infra0.example.com,infra1.example.com,infra2.example.com"
            )],
            ["infra0.example.com:2379", "infra1.example.com:2379", "infra2.example.com:2379"],
        )

    def test_addressesNeverMembers(self):
        """
        Unspecified, multicast and broadcast addresses, numeric IPv4
        shorthands and IPv6 scope IDs naming no interface are refused, with the
        item named: each either reaches this machine unseen by the self-loop
        check or makes every connect fail before it starts.
        """
        cases = {
            "0.0.0.0:2379": "unspecified",
            "0.1.2.3:2379": "unspecified",
            "[::]:2379": "unspecified",
            "[::ffff:0.0.0.0]:2379": "unspecified",
            "0:2379": "numeric shorthand",
            "127.1:2379": "numeric shorthand",
            "2130706433:2379": "numeric shorthand",
            "0x7f.1:2379": "numeric shorthand",
            "224.0.0.1:2379": "multicast",
            "[ff02::1]:2379": "multicast",
            "255.255.255.255:2379": "broadcast",
            "[fe80::1%nosuchif0]:2379": "names no network interface",
            "[fe80::1%\u0661]:2379": "names no network interface",
            "http://0.0.0.0": "unspecified",
        }
        for text, message in cases.items():
            e = self.assertRaises(EndpointError, parseEndpoint, text)
            self.assertIn(message, str(e), text)
            self.assertIn(text, str(e))
        # A scope ID of an interface that exists is fine, and so are names
        # that merely start with a digit.
        self.assertEqual(parseEndpoint("[fe80::1%lo]:2379").host, "fe80::1%lo")
        self.assertEqual(parseEndpoint("0etcd:2379").host, "0etcd")
        self.assertEqual(parseEndpoint("10.0.0.1:2379").host, "10.0.0.1")

    def test_addressProblem(self):
        """The shared check passes members' addresses and names."""
        for host in ["10.0.0.1", "::1", "etcd.example.com", "127.0.0.1"]:
            self.assertIsNone(addressProblem(host), host)
        for host in ["0.0.0.0", "::", "0", "239.1.1.1"]:
            self.assertIsNotNone(addressProblem(host), host)

    def test_bareIPv6(self):
        """A bare IPv6 address is refused with the bracketed form to use."""
        e = self.assertRaises(EndpointError, parseEndpoint, "fe80::1")
        self.assertIn("[fe80::1]:PORT", str(e))

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

    def test_duplicateAfterDefaultPort(self):
        """A member given with and without its port 2379 is listed twice."""
        e = self.assertRaises(EndpointError, parseEndpoints, "a,b:1,a:2379")
        self.assertIn("listed twice", str(e))

    def test_duplicate(self):
        """The same member listed twice (even with another scheme) is refused."""
        e = self.assertRaises(EndpointError, parseEndpoints, "a:1,b:2,http://a:1")
        self.assertIn("listed twice", str(e))
        self.assertIn("http://a:1", str(e))
