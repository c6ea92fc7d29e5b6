"""
The endpoint value type and the parsing of C{--endpoints}.
"""

import ipaddress
import re
import socket

import attr
from twisted.internet.abstract import isIPAddress, isIPv6Address

#: The port of a member given without one: etcd's client port.
DEFAULT_PORT = 2379


class EndpointError(ValueError):
    """
    An endpoint is malformed; the message names the bad item.
    """


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Endpoint:
    """
    One etcd member's client address.

    @ivar host: a host name or an IP literal (IPv6 without brackets).
    @ivar port: the TCP port.
    @ivar priority: the SRV priority (lower is preferred; 0 for static endpoints).
    @ivar weight: the SRV weight (0 for static endpoints).
    @ivar tls: whether clients speak TLS to it (an C{https://} endpoint or an
        C{_etcd-client-ssl} record). The gateway never terminates TLS; this is
        informational and selects how discovery verifies the endpoint.
    """

    host: str
    port: int
    priority: int = 0
    weight: int = 0
    tls: bool = False
    #: The port was not given and is L{DEFAULT_PORT} (not part of identity).
    portDefaulted: bool = attr.ib(default=False, eq=False, repr=False)

    @property
    def key(self):
        """
        The identity of the endpoint in a pool: C{(host, port)}.
        """
        return (self.host, self.port)

    @property
    def serverName(self):
        """
        The name a TLS member's certificate must carry, also sent as SNI:
        the host (a name or an IP literal) for a configured endpoint.
        """
        return self.host

    def __str__(self):
        return formatHostPort(self.host, self.port)


def formatHostPort(host, port):
    """
    C{host:port}, with brackets around an IPv6 literal.
    """
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


_HOSTNAME = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_.])?\Z")  # \Z: "$" takes "h\n"


def splitHostPort(
    text, what="endpoint", allowEmptyHost=False, allowPortZero=False, defaultPort=None
):
    """
    Split C{host:port}, C{[v6]:port} (and C{:port} where C{allowEmptyHost};
    port 0, "any free port", where C{allowPortZero}; C{host} and C{[v6]}
    alone, taking C{defaultPort}, where one is given).

    @return: C{(host, port)}, the host without brackets.
    @raise EndpointError: naming C{text}, if it is not of that form or the
        port is not a number in 1-65535.
    """
    if text.startswith("["):
        close = text.find("]")
        if close != -1 and close == len(text) - 1 and defaultPort is not None:
            portText = str(defaultPort)
        elif close == -1 or text[close + 1 : close + 2] != ":":
            raise EndpointError(f'{what} "{text}": expected [IPv6]:port')
        else:
            portText = text[close + 2 :]
        host = text[1:close]
        if not isIPv6Address(host):
            raise EndpointError(f'{what} "{text}": "{host}" is not an IPv6 address')
    else:
        host, sep, portText = text.rpartition(":")
        if not sep and defaultPort is not None:
            host, portText = text, str(defaultPort)
        elif not sep:
            raise EndpointError(f'{what} "{text}": missing port (expected host:port)')
        if ":" in host:
            bare = text if isIPv6Address(text) else host
            raise EndpointError(
                f'{what} "{text}": an IPv6 address needs brackets: [{bare}]:PORT'
            )
        if not host and not allowEmptyHost:
            raise EndpointError(f'{what} "{text}": missing host (expected host:port)')
        if host and not (isIPAddress(host) or _HOSTNAME.match(host)):
            raise EndpointError(f'{what} "{text}": "{host}" is not a valid host name')
    if not portText.isdigit() or not portText.isascii():
        raise EndpointError(f'{what} "{text}": port "{portText}" is not a number')
    # A port has at most 5 digits: past that, int() of thousands of digits is
    # slow or refused by Python itself.
    port = int(portText) if len(portText.lstrip("0")) <= 5 else 65536
    if not (0 if allowPortZero else 1) <= port <= 65535:
        shown = portText if len(portText) <= 20 else portText[:20] + "..."
        raise EndpointError(
            f'{what} "{text if len(text) <= 80 else text[:80] + "..."}": port {shown} '
            f"is not in {0 if allowPortZero else 1}-65535"
        )
    return host, port


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def addressProblem(host):
    """
    Why C{host} (an endpoint's host: a name or an IP literal) can never be an
    etcd member's address, or L{None} when it may be one.

    Refused: the unspecified addresses (C{0.0.0.0}, C{::}, and all of
    0.0.0.0/8: a connect there reaches this machine, so a gateway forwarding
    to it may forward to itself), multicast and broadcast addresses, numeric
    shorthands of IPv4 addresses that C{getaddrinfo} accepts but no check can
    read (C{0}, C{127.1}, C{2130706433}: write them dotted, C{a.b.c.d}), and
    IPv6 scope IDs that name no interface of this machine (a connect to them
    fails before it starts). The same check guards every source of
    endpoints: flags, SRV answers and member lists.
    """
    literal, _, scope = host.partition("%")
    try:
        address = ipaddress.ip_address(literal)
    except ValueError:
        address = None
    if address is None:
        if _isNumericShorthand(host):
            return f'"{host}" is a numeric shorthand of an IPv4 address: write it as a.b.c.d'
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_unspecified or (address.version == 4 and address.packed[0] == 0):
        return f"{literal} is an unspecified address (it would reach this machine), not a member's"
    if address.is_multicast or (address.version == 4 and literal == "255.255.255.255"):
        return f"{literal} is a multicast or broadcast address, not a member's"
    if scope:
        if address.version != 6:
            return f'"{host}": only IPv6 addresses take a scope ID'
        if not _interfaceExists(scope):
            return f'"{host}": scope ID "{scope}" names no network interface of this machine'
    return None


def _isNumericShorthand(host):
    """
    Whether C{host} is not a dotted quad but C{inet_aton} reads it as an
    IPv4 address (C{0}, C{127.1}, C{0x7f.1}, C{2130706433}).
    """
    if not re.fullmatch(r"[0-9A-Fa-fxX.]+", host) or not host[0].isdigit():
        return False
    try:
        socket.inet_aton(host)
    except OSError:
        return False
    return True


def _interfaceExists(scope):
    if not scope.isascii():
        return False  # int() reads other scripts' digits; the kernel does not
    try:
        if scope.isdigit():
            socket.if_indextoname(int(scope))
        else:
            socket.if_nametoindex(scope)
    except (OSError, ValueError, OverflowError):
        return False
    return True


def parseEndpoint(text, defaultPort=DEFAULT_PORT):
    """
    Parse one C{--endpoints} item: C{host:port}, C{[v6]:port}, or either with
    an C{http://} or C{https://} prefix (and an ignored path), as etcd strips it.
    A member given without a port (C{host}, C{[v6]}, C{https://host}) is at
    C{defaultPort}, etcd's client port 2379 (L{Endpoint.portDefaulted} says so).
    Addresses that can never be a member's are refused (L{addressProblem}).

    @rtype: L{Endpoint}
    @raise EndpointError: naming the item.
    """
    item = text.strip()
    if not item:
        raise EndpointError("empty endpoint in --endpoints")
    tls = False
    scheme = _SCHEME.match(item)
    if scheme:
        name = scheme.group(1).lower()
        if name not in ("http", "https"):
            raise EndpointError(
                f'endpoint "{item}": unsupported scheme "{name}" (use http:// or https://)'
            )
        tls = name == "https"
        item = item[scheme.end() :].split("/", 1)[0]
        if "@" in item:
            raise EndpointError(f'endpoint "{text}": user information is not supported')
    try:
        host, port = splitHostPort(item, defaultPort=defaultPort)
    except EndpointError as e:
        if item == text.strip():
            raise
        # Name the item as the user wrote it, scheme included.
        raise EndpointError(str(e).replace(f'"{item}"', f'"{text.strip()}"', 1)) from None
    problem = addressProblem(host)
    if problem is not None:
        raise EndpointError(f'endpoint "{text.strip()}": {problem}')
    defaulted = port == defaultPort and not _hasPort(item)
    return Endpoint(
        host.rstrip(".") if not isIPv6Address(host) else host,
        port,
        tls=tls,
        portDefaulted=defaulted,
    )


def _hasPort(item):
    if item.startswith("["):
        return not item.endswith("]")
    return ":" in item


def parseEndpoints(text):
    """
    Parse a comma-separated C{--endpoints} value into a list of endpoints, in
    order.

    @raise EndpointError: on the first bad item, or a duplicate.
    """
    endpoints = []
    seen = {}
    for item in text.split(","):
        endpoint = parseEndpoint(item)
        if endpoint.key in seen:
            raise EndpointError(
                f'endpoint "{item.strip()}" is listed twice '
                f'(as "{seen[endpoint.key]}"); list each member once'
            )
        seen[endpoint.key] = item.strip()
        endpoints.append(endpoint)
    return endpoints
