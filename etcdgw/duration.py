"""
Go's duration syntax (C{time.ParseDuration}), as etcd's flags use it.

C{parseDuration("1m30s") == 90.0}; C{formatDuration(60.0) == "1m0s"}.
"""

import re

_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,  # micro sign
    "\u03bcs": 1e-6,  # Greek mu
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}

#: The longest duration, in seconds: Go's (2**63-1 ns, about 292 years).
#: Longer ones are refused, as Go and etcd refuse them; past it a float
#: duration loses the nanoseconds, and a 400-digit one is infinite.
MAX_SECONDS = (2**63 - 1) / 1e9
MAX_TEXT = "2562047h47m16.854775807s"

_TERM = re.compile(r"([0-9]*(?:\.[0-9]*)?)([^0-9.]+)")


class DurationError(ValueError):
    """
    A string is not a Go duration; the message names it.
    """


def parseDuration(text):
    """
    Parse a Go duration such as C{300ms}, C{1.5h} or C{2h45m} into seconds.

    A bare number other than C{0} is refused, as Go and etcd refuse it, and
    so is a duration longer than Go's longest (L{MAX_SECONDS}, about 292
    years), positive or negative.

    @raise DurationError: if C{text} is not a duration; the message quotes
        it (shortened past 40 characters).
    """
    original = _quote(text)
    sign = 1.0
    if text[:1] in ("-", "+"):
        if text[0] == "-":
            sign = -1.0
        text = text[1:]
    if text == "0":
        return 0.0
    if not text:
        raise DurationError(f"invalid duration {original}")
    total = 0.0
    position = 0
    while position < len(text):
        match = _TERM.match(text, position)
        if match is None:
            if re.fullmatch(r"[0-9]*\.?[0-9]*", text[position:]):
                raise DurationError(
                    f"missing unit in duration {original}: "
                    "expects a time unit (ns, us, ms, s, m, h)"
                )
            raise DurationError(f"invalid duration {original}")
        number, unit = match.groups()
        if number in ("", "."):
            raise DurationError(f"invalid duration {original}")
        if unit not in _UNITS:
            raise DurationError(f"unknown unit {_quote(unit)} in duration {original}")
        total += float(number) * _UNITS[unit]
        if not total <= MAX_SECONDS:  # also catches inf and nan
            raise DurationError(
                f"duration {original} is out of range: at most {MAX_TEXT} "
                "(about 292 years, Go's longest duration)"
            )
        position = match.end()
    return sign * total


def _quote(text, limit=40):
    """
    C{text} in double quotes, cut after C{limit} characters: a message that
    names a 5000-digit value stays readable.
    """
    if len(text) > limit:
        return f'"{text[:limit]}..." ({len(text)} characters)'
    return f'"{text}"'


def formatDuration(seconds):
    """
    Format seconds the way Go's C{Duration.String} does: C{1m0s}, C{1.5s},
    C{300ms}, C{2h45m0s}, C{0s}.
    """
    nanos = round(seconds * 1e9)
    if nanos == 0:
        return "0s"
    sign = "-" if nanos < 0 else ""
    nanos = abs(nanos)
    if nanos < 1000:
        return f"{sign}{nanos}ns"
    if nanos < 1000000:
        return sign + _fraction(nanos, 1000) + "\u00b5s"
    if nanos < 1000000000:
        return sign + _fraction(nanos, 1000000) + "ms"
    hours, rest = divmod(nanos, 3600 * 10**9)
    minutes, rest = divmod(rest, 60 * 10**9)
    text = _fraction(rest, 10**9) + "s"
    if hours:
        return f"{sign}{hours}h{minutes}m{text}"
    if minutes:
        return f"{sign}{minutes}m{text}"
    return sign + text


def _fraction(value, unit):
    whole, part = divmod(value, unit)
    if not part:
        return str(whole)
    digits = len(str(unit)) - 1
    return f"{whole}.{part:0{digits}d}".rstrip("0")
