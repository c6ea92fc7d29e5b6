"""
Tests for L{etcdgw.logs}: one JSON object per line.
"""

import io
import json

from twisted.logger import ILogObserver, LogLevel, Logger, LogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from etcdgw.endpoint import Endpoint
from etcdgw.logs import eventAsJSONLine, jsonLineObserver, jsonLogObserver


class JSONLinesTests(SynchronousTestCase):
    def setUp(self):
        self.out = io.StringIO()
        publisher = LogPublisher(jsonLineObserver(self.out))
        self.log = Logger(namespace="etcdgw.test", observer=publisher)

    def lines(self):
        text = self.out.getvalue()
        self.assertTrue(text.endswith("\n"))
        return [json.loads(line) for line in text.splitlines()]

    def test_event(self):
        """
        An event becomes one line: time, level, namespace, rendered message
        and its fields.
        """
        self.log.warn(
            "endpoint {endpoint} down: {reason}",
            endpoint="10.0.0.1:2379",
            reason="connection refused",
        )
        [record] = self.lines()
        self.assertEqual(record["level"], "warn")
        self.assertEqual(record["namespace"], "etcdgw.test")
        self.assertEqual(record["message"], "endpoint 10.0.0.1:2379 down: connection refused")
        self.assertEqual(record["endpoint"], "10.0.0.1:2379")
        self.assertEqual(record["reason"], "connection refused")
        self.assertRegex(record["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        self.assertFalse([key for key in record if key.startswith("log_")])

    def test_oneLinePerEvent(self):
        """
        Messages with newlines still take one line each.
        """
        self.log.info("first\nsecond")
        self.log.error("third", drained=2)
        records = self.lines()
        self.assertEqual([r["message"] for r in records], ["first\nsecond", "third"])
        self.assertEqual(records[1]["drained"], 2)

    def test_unserializableFields(self):
        """
        Fields that are not JSON types are written as their text.
        """
        self.log.info("x {endpoint}", endpoint=Endpoint("::1", 2379), tried=[Endpoint("h", 1)])
        [record] = self.lines()
        self.assertEqual(record["endpoint"], "[::1]:2379")
        self.assertEqual(record["tried"], ["h:1"])

    def test_failure(self):
        """
        A logged failure carries its traceback.
        """
        try:
            1 / 0
        except ZeroDivisionError:
            self.log.failure("probe round failed", Failure())
        [record] = self.lines()
        self.assertEqual(record["level"], "critical")
        self.assertIn("ZeroDivisionError", record["traceback"])

    def test_factory(self):
        """
        The --logger factory takes no argument and gives a new-style observer.
        """
        observer = jsonLogObserver()
        self.assertTrue(ILogObserver.providedBy(observer))

    def test_legacyEvent(self):
        """
        Legacy twisted.python.log events (twistd's own) are rendered too.
        """
        line = eventAsJSONLine(
            {"message": ("GatewayFactory starting on 23790",), "isError": 0,
             "system": "-", "log_time": 0.0, "log_level": LogLevel.info,
             "log_format": "{log_io}", "log_io": "GatewayFactory starting on 23790"}
        )
        record = json.loads(line)
        self.assertEqual(record["message"], "GatewayFactory starting on 23790")
        self.assertEqual(record["time"], "1970-01-01T00:00:00.000Z")
