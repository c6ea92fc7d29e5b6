from twisted.trial.unittest import SynchronousTestCase

from etcdgw.duration import MAX_SECONDS, MAX_TEXT, DurationError, formatDuration, parseDuration


class ParseDurationTests(SynchronousTestCase):
    def test_units(self):
        """Every Go unit is understood."""
        cases = {
            "300ms": 0.3,
            "1.5h": 5400.0,
            "2h45m": 9900.0,
            "1m0s": 60.0,
            "10us": 1e-5,
            "10\u00b5s": 1e-5,
            "5ns": 5e-9,
            ".5s": 0.5,
            "1.s": 1.0,
            "0": 0.0,
            "-1s": -1.0,
            "+2s": 2.0,
        }
        for text, seconds in cases.items():
            self.assertAlmostEqual(parseDuration(text), seconds, msg=text)

    def test_missingUnit(self):
        """A bare number is refused, saying that a unit is expected, as etcd does."""
        e = self.assertRaises(DurationError, parseDuration, "123")
        self.assertIn("expects a time unit", str(e))
        self.assertIn('"123"', str(e))

    def test_garbage(self):
        """Malformed durations are refused with a message naming them."""
        for text in ["", "abc", "s", "1x", "1..5s", "1s2", "--1s", "1 s", "1e3s"]:
            e = self.assertRaises(DurationError, parseDuration, text)
            self.assertIn(f'"{text}"', str(e))

    def test_outOfRange(self):
        """
        A duration longer than Go's longest (about 292 years) is refused, as
        Go refuses it, saying the bound: a 400-digit one no longer becomes
        infinite, positive or negative.
        """
        for text in ["9" * 400 + "h", "-" + "9" * 400 + "h", "1" + "0" * 400 + "ns",
                     "2562048h", "2562047h47m17s", "2562047h2562047h", "9" * 5000 + "." + "9s"]:
            e = self.assertRaises(DurationError, parseDuration, text)
            self.assertIn("out of range: at most 2562047h47m16.854775807s", str(e), text[:20])

    def test_longest(self):
        """Go's longest duration itself, and just under it, are accepted."""
        self.assertAlmostEqual(parseDuration(MAX_TEXT), MAX_SECONDS)
        self.assertAlmostEqual(parseDuration("-" + MAX_TEXT), -MAX_SECONDS)
        self.assertEqual(parseDuration("2562047h"), 2562047 * 3600.0)
        self.assertEqual(parseDuration("0." + "0" * 5000 + "1s"), 0.0)

    def test_longValueShortened(self):
        """The message quotes a long value shortened, with its length."""
        e = self.assertRaises(DurationError, parseDuration, "x" * 5000)
        self.assertIn('"' + "x" * 40 + '..." (5000 characters)', str(e))
        self.assertLess(len(str(e)), 200)


class FormatDurationTests(SynchronousTestCase):
    def test_goStyle(self):
        """Durations print as Go's Duration.String does."""
        cases = {
            60.0: "1m0s",
            0.3: "300ms",
            5400.0: "1h30m0s",
            1.5: "1.5s",
            0: "0s",
            3723.5: "1h2m3.5s",
            -1: "-1s",
            2e-6: "2\u00b5s",
        }
        for seconds, text in cases.items():
            self.assertEqual(formatDuration(seconds), text)

    def test_roundTrip(self):
        """What is formatted parses back to the same value."""
        for seconds in [0.001, 0.25, 1, 59.5, 61, 7200, 9999.125]:
            self.assertAlmostEqual(parseDuration(formatDuration(seconds)), seconds)
