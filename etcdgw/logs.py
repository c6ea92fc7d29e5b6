"""
Logs as one JSON object per line, for journald or a log shipper::

    twistd -n --logger=etcdgw.logs.jsonLogObserver etcd-gateway ...

Each line holds C{time} (ISO 8601, UTC), C{level}, C{namespace}, C{message}
(the event rendered as in the text log), the event's own keyword fields
(C{endpoint}, C{reason}, C{drained}, ...) and, for failures, C{traceback}.
Without C{--logger}, twistd's plain text log is used.
"""

import datetime
import json
import sys

from zope.interface import provider

from twisted.logger import ILogObserver, formatEvent

#: Event keys of twisted.logger's own that are not copied as fields.
_OWN = {"format", "message", "isError", "system", "time", "printed", "why"}


def _jsonable(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


def eventAsJSONLine(event):
    """
    One log event as a JSON line (no trailing newline).
    """
    record = {
        "time": datetime.datetime.fromtimestamp(
            event.get("log_time", 0), datetime.timezone.utc
        ).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": getattr(event.get("log_level"), "name", "info"),
        "namespace": event.get("log_namespace", "-"),
        "message": formatEvent(event),
    }
    if "log_system" in event:
        record["system"] = event["log_system"]
    failure = event.get("log_failure")
    if failure is not None:
        try:
            record["traceback"] = failure.getTraceback()
        except Exception:
            record["traceback"] = repr(failure)
    for key, value in event.items():
        if key.startswith("log_") or key in _OWN or key in record:
            continue
        record[key] = _jsonable(value)
    return json.dumps(record, sort_keys=False)


def jsonLineObserver(outFile):
    """
    A log observer writing each event to C{outFile} as one JSON line.
    """

    @provider(ILogObserver)
    def observe(event):
        try:
            line = eventAsJSONLine(event)
        except Exception as e:  # never lose an event to a bad field
            line = json.dumps({"level": "error", "message": f"unloggable event: {e!r}"})
        outFile.write(line + "\n")
        outFile.flush()

    return observe


def jsonLogObserver():
    """
    The observer factory for C{twistd --logger=etcdgw.logs.jsonLogObserver}:
    JSON lines on standard output.
    """
    return jsonLineObserver(sys.stdout)
