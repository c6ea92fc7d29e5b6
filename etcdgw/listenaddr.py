"""
Listen addresses: C{--listen-addr} and C{--metrics-addr} parsed into a
L{ListenAddress} (C{host:port}, C{[v6]:port}, C{:port}, or Twisted's
C{tcp:}, C{tcp6:}, C{unix:} and C{systemd:} endpoint strings). Parsing only:
a host name is kept as given and resolved when its listener starts
(L{parseListenAddress} resolves it then). The ports that serve these
addresses are L{etcdgw.listen}'s.
"""

import socket

import attr
from twisted.internet.abstract import isIPAddress, isIPv6Address

from etcdgw.endpoint import EndpointError, formatHostPort, splitHostPort

#: Endpoint-string types accepted as C{--listen-addr}, Twisted's syntax.
ENDPOINT_TYPES = ("tcp", "tcp6", "unix", "systemd")
#: Permissions of a unix socket file, unless C{--listen-mode} or C{mode=}
#: says otherwise: the owner and its group may connect, nobody else.
DEFAULT_UNIX_MODE = 0o660
class ListenError(ValueError):
    """
    C{--listen-addr} (or C{--metrics-addr}) is malformed or cannot be
    listened on; the message names it.
    """


@attr.s(frozen=True, auto_attribs=True)
class ListenAddress:
    """
    A parsed C{--listen-addr}.

    @ivar text: what the user gave.
    @ivar host: the interface for TCP (C{""} for all interfaces), else L{None}.
    @ivar port: the TCP port (0 means any free port), else L{None}.
    @ivar description: the endpoint string for unix and systemd listeners.
    @ivar path: the socket file of a unix listener.
    @ivar mode: the permissions a unix listener's string asked for
        (C{mode=}), else L{None}.
    @ivar backlog: the listen backlog a string asked for, else L{None}.
    @ivar lockfile: whether a unix listener keeps Twisted's C{PATH.lock}.
    """

    text: str
    host: str = None
    port: int = None
    description: str = None
    path: str = None
    mode: int = None
    backlog: int = None
    lockfile: bool = False

    @property
    def isTCP(self):
        return self.port is not None

    @property
    def isUNIX(self):
        return self.path is not None

    @property
    def wildcard(self):
        return self.isTCP and self.host in ("", "0.0.0.0", "::")

    def __str__(self):
        if self.isTCP:
            return formatHostPort(self.host or "*", self.port)
        return self.description


def splitEndpointString(text):
    """
    Split a Twisted endpoint string (C{kind:arg:key=value}, a backslash
    escaping the next character) into C{(kind, args, keywords)}, as
    L{twisted.internet.endpoints.serverFromString} reads it.
    """
    parts = [""]
    escaped = False
    for ch in text:
        if escaped:
            parts[-1] += ch
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            parts.append("")
        else:
            parts[-1] += ch
    kind, args, keywords = parts[0], [], {}
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        if sep:
            keywords[key] = value
        else:
            args.append(part)
    return kind, args, keywords


def _number(text, what, low, high):
    if not text.isascii() or not text.isdigit() or len(text.lstrip("0")) > 6:
        raise ListenError(f'{what} "{text[:40]}" is not a number')
    value = int(text)
    if not low <= value <= high:
        raise ListenError(f"{what} {value} is not in {low}-{high}")
    return value


def parseMode(text, what="mode"):
    """
    An octal permission mode (C{660}, C{0660}, C{0o660}) as an int.

    @raise ListenError: naming C{what} and the text.
    """
    digits = text[2:] if text[:2].lower() == "0o" else text
    if not digits or not digits.isascii() or any(c not in "01234567" for c in digits):
        raise ListenError(f'{what} "{text[:40]}" is not an octal mode such as 0660')
    mode = int(digits, 8)
    if mode > 0o777:
        raise ListenError(f'{what} "{text}" is not a permission mode (at most 0777)')
    return mode


def _parseEndpointString(text, kind, args, keywords):
    def only(*names):
        unknown = sorted(set(keywords) - set(names))
        if unknown:
            raise ListenError(
                f'listen address "{text}": unknown parameter "{unknown[0]}" '
                f"(known: {', '.join(names)})"
            )

    backlog = None
    if "backlog" in keywords:
        backlog = _number(keywords["backlog"], f'listen address "{text}": backlog', 1, 65535)
    if kind in ("tcp", "tcp6"):
        only("port", "interface", "backlog")
        if len(args) > 1 or (args and "port" in keywords):
            raise ListenError(f'listen address "{text}": one port, please')
        portText = args[0] if args else keywords.get("port")
        if not portText:
            raise ListenError(f'listen address "{text}": missing port ({kind}:PORT)')
        port = _number(portText, f'listen address "{text}": port', 0, 65535)
        interface = keywords.get("interface", "::" if kind == "tcp6" else "0.0.0.0")
        if not interface:
            raise ListenError(f'listen address "{text}": empty interface')
        return ListenAddress(text, interface, port, backlog=backlog)
    if kind == "unix":
        only("address", "mode", "backlog", "lockfile")
        if len(args) > 1 or (args and "address" in keywords):
            raise ListenError(f'listen address "{text}": one path, please')
        path = args[0] if args else keywords.get("address", "")
        if not path:
            raise ListenError(f'listen address "{text}": missing unix parameters (unix:/PATH)')
        if "\0" in path:
            raise ListenError(f'listen address "{text}": the path holds a NUL character')
        mode = None
        if "mode" in keywords:
            mode = parseMode(keywords["mode"], f'listen address "{text}": mode')
        lockfile = keywords.get("lockfile", "0")
        if lockfile not in ("0", "1"):
            raise ListenError(f'listen address "{text}": lockfile must be 0 or 1')
        return ListenAddress(
            text,
            description=text,
            path=path,
            mode=mode,
            backlog=backlog,
            lockfile=lockfile == "1",
        )
    # systemd: the socket is looked up when listening (LISTEN_FDS is the
    # start's business, not the parser's).
    only("domain", "index", "name")
    if args or not keywords:
        raise ListenError(
            f'listen address "{text}": missing systemd parameters '
            "(systemd:domain=INET:index=0 or systemd:domain=INET:name=NAME)"
        )
    if keywords.get("domain") not in ("INET", "INET6", "UNIX"):
        raise ListenError(f'listen address "{text}": domain must be INET, INET6 or UNIX')
    if ("index" in keywords) == ("name" in keywords):
        raise ListenError(f'listen address "{text}": give one of index= and name=')
    if "index" in keywords:
        _number(keywords["index"], f'listen address "{text}": index', 0, 65535)
    return ListenAddress(text, description=text)


def parseListenAddress(text):
    """
    Parse C{--listen-addr}: C{host:port}, C{[v6]:port}, C{:port} (all
    interfaces), or a Twisted endpoint string (C{tcp:PORT:interface=ADDR},
    C{tcp6:...}, C{unix:/PATH:mode=0660}, C{systemd:domain=INET:index=0}).

    @rtype: L{ListenAddress}
    @raise ListenError: naming C{text}.
    """
    text = text.strip()
    kind = text.split(":", 1)[0]
    if kind in ENDPOINT_TYPES:
        kind, args, keywords = splitEndpointString(text)
        return _parseEndpointString(text, kind, args, keywords)
    try:
        host, port = splitHostPort(
            text.replace("*:", ":", 1) if text.startswith("*:") else text,
            what="listen address",
            allowEmptyHost=True,
            allowPortZero=True,
        )
    except EndpointError as e:
        raise ListenError(
            f"{e} (or give a Twisted endpoint: tcp:PORT:interface=ADDR, unix:/PATH, "
            "systemd:domain=INET:index=0)"
        ) from None
    if host and not _isIP(host):
        try:
            host = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4][0]
        except OSError as e:
            raise ListenError(f'listen address "{text}": cannot resolve host: {e}')
    return ListenAddress(text, host, port)


def _isIP(host):
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return True
        except OSError:
            pass
    return False


def isResolved(address):
    """
    Whether the parsed listen address C{address} can be listened on as it
    is: not a TCP address whose host is a name (or a scoped IPv6 literal).
    L{etcdgw.tap.Options} keeps such a host as given; its
    L{etcdgw.gateway.ListenerService} resolves it when it starts.
    """
    host = address.host
    return not host or isIPAddress(host) or (isIPv6Address(host) and "%" not in host)
