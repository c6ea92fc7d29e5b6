"""
The endpoint value type and the parsing of C{--endpoints}.
"""

import re

import attr
from twisted.internet.abstract import isIPAddress, isIPv6Address


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

    @property
    def key(self):
        """
        The identity of the endpoint in a pool: C{(host, port)}.
        """
        return (self.host, self.port)

    def __str__(self):
        return formatHostPort(self.host, self.port)


def formatHostPort(host, port):
    """
    C{host:port}, with brackets around an IPv6 literal.
    """
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


_HOSTNAME = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_.])?$")


def splitHostPort(text, what="endpoint", allowEmptyHost=False, allowPortZero=False):
    """
    Split C{host:port}, C{[v6]:port} (and C{:port} where C{allowEmptyHost};
    port 0, "any free port", where C{allowPortZero}).

    @return: C{(host, port)}, the host without brackets.
    @raise EndpointError: naming C{text}, if it is not of that form or the
        port is not a number in 1-65535.
    """
    if text.startswith("["):
        close = text.find("]")
        if close == -1 or text[close + 1 : close + 2] != ":":
            raise EndpointError(f'{what} "{text}": expected [IPv6]:port')
        host, portText = text[1:close], text[close + 2 :]
        if not isIPv6Address(host):
            raise EndpointError(f'{what} "{text}": "{host}" is not an IPv6 address')
    else:
        host, sep, portText = text.rpartition(":")
        if not sep:
            raise EndpointError(f'{what} "{text}": missing port (expected host:port)')
        if ":" in host:
            raise EndpointError(
                f'{what} "{text}": an IPv6 address needs brackets: [{host}]:{portText}'
            )
        if not host and not allowEmptyHost:
            raise EndpointError(f'{what} "{text}": missing host (expected host:port)')
        if host and not (isIPAddress(host) or _HOSTNAME.match(host)):
            raise EndpointError(f'{what} "{text}": "{host}" is not a valid host name')
    if not portText.isdigit() or not portText.isascii():
        raise EndpointError(f'{what} "{text}": port "{portText}" is not a number')
    port = int(portText)
    if not (0 if allowPortZero else 1) <= port <= 65535:
        raise EndpointError(
            f'{what} "{text}": port {port} is not in {0 if allowPortZero else 1}-65535'
        )
    return host, port


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def parseEndpoint(text):
    """
    Parse one C{--endpoints} item: C{host:port}, C{[v6]:port}, or either with
    an C{http://} or C{https://} prefix (and an ignored path), as etcd strips it.

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
    host, port = splitHostPort(item)
    return Endpoint(host.rstrip(".") if not isIPv6Address(host) else host, port, tls=tls)


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
