"""
The self-loop guard: an endpoint that is the gateway's own listening address
would make every client connection dial the gateway again, without end.

One guard (L{SelfLoopGuard}) answers every form of the question:

  - at start, for the configured endpoints (C{--endpoints}, SRV), names
    resolved: L{SelfLoopGuard.checkConfigured} (L{checkSelfLoop});
  - for endpoints learned from a member list, IP literals only (a host name
    would have to be resolved on the reactor thread):
    L{SelfLoopGuard.refuseLearned} (L{ownAddressCheck});
  - for every connection made to an endpoint, by the proxy's dial and by
    the health probes, whatever the endpoint's name resolves to now: whether
    its peer is one of the gateway's listening sockets,
    L{SelfLoopGuard.reachedItself}. A dial or probe that reaches the gateway
    itself fails with L{SelfLoopError} ("self-loop: ...").
"""

import ipaddress
import socket

from etcdgw.endpoint import formatHostPort


class SelfLoopError(ValueError):
    """
    An endpoint is, or reaches, the gateway's own listening address.
    """


def resolve(host, port):
    """
    The IP addresses C{host} resolves to (IPv4-mapped IPv6 ones unmapped);
    empty when it does not resolve.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return set()
    return {_unmap(info[4][0]) for info in infos}


def _unmap(address):
    """
    An address without an IPv6 scope ID, an IPv4-mapped IPv6 one unmapped.
    """
    address = address.split("%", 1)[0]
    if address.startswith("::ffff:") and "." in address:
        return address[len("::ffff:") :]
    return address


def _literal(host):
    """
    The IP address C{host} is a literal of (IPv4-mapped ones unmapped, the
    scope ID dropped), or L{None} for a host name.
    """
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if getattr(address, "ipv4_mapped", None) is not None:
        address = address.ipv4_mapped
    return address


def isLocalAddress(address):
    """
    Whether C{address} is one of this machine's own addresses: the kernel lets
    us bind a socket to it.
    """
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.bind((address, 0))
        except OSError:
            return False
    return True


def checkSelfLoop(listen, endpoints, resolve=resolve, isLocal=isLocalAddress):
    """
    Refuse endpoints that would send the gateway's traffic back to itself: an
    endpoint on the listening port that resolves to the listen address, or,
    when the gateway listens on every interface, to any local address.

    @param listen: the L{etcdgw.listenaddr.ListenAddress}; only TCP ones are checked.
    @raise SelfLoopError: naming the endpoint and the listen address.
    """
    if listen is None or not listen.isTCP:
        return
    listenAddresses = set() if listen.wildcard else resolve(listen.host, listen.port)
    for endpoint in endpoints:
        if endpoint.port != listen.port:
            continue
        for address in resolve(endpoint.host, endpoint.port):
            if address in listenAddresses or (listen.wildcard and isLocal(address)):
                raise SelfLoopError(
                    f"endpoint {endpoint} resolves to {formatHostPort(address, endpoint.port)}, "
                    f"which is the gateway's own listen address ({listen}): "
                    "it would forward clients to itself"
                )


class SelfLoopGuard:
    """
    The gateway's one self-loop guard (see the module docstring).

    @ivar listen: the C{--listen-addr} L{etcdgw.listenaddr.ListenAddress} (or
        L{None}): what configured endpoints are checked against at start,
        and learned ones always.
    @ivar listeners: the gateway's listening services (each with
        C{address}, C{boundAddress}, C{flag} and C{describe()}, as
        L{etcdgw.listen.ListeningService}): learned endpoints are checked
        against their addresses too (a host name in one is resolved when it
        starts), and a connection whose peer is one of their bound
        addresses reached the gateway itself. Set by whoever builds the
        gateway, once the listeners exist.
    """

    #: How many answers of C{isLocal} are remembered (one bind each).
    localCacheSize = 1024

    def __init__(self, listen=None, listeners=(), isLocal=isLocalAddress, resolve=resolve):
        self.listen = listen
        self.listeners = list(listeners)
        self._isLocal = isLocal
        self._resolve = resolve
        self._local = {}

    def _own(self, address):
        """
        Whether the IP address C{address} (text, unmapped) is this machine's.
        """
        literal = _literal(address)
        if literal is not None and literal.is_loopback:
            return True
        local = self._local.get(address)
        if local is None:
            if len(self._local) >= self.localCacheSize:
                self._local = {}
            local = self._local[address] = self._isLocal(address)
        return local

    def checkConfigured(self, endpoints):
        """
        Refuse configured endpoints that resolve to the listen address (names
        resolved: blocking; at start only).

        @raise SelfLoopError: naming the endpoint and the listen address.
        """
        checkSelfLoop(self.listen, endpoints, self._resolve, self._own)

    def refuseLearned(self, endpoint):
        """
        Why an endpoint learned from a member list is refused as one of the
        gateway's own listen addresses (L{listen}, and each listener's), or
        L{None}. Only IP literals are judged: on a listening port, the
        listen address itself or, when the gateway listens there on every
        interface, any address of this machine.
        """
        address = _literal(endpoint.host)
        if address is None:
            return None
        for listen in [self.listen] + [listener.address for listener in self.listeners]:
            if listen is None or not listen.isTCP or endpoint.port != listen.port:
                continue
            if listen.wildcard:
                own = self._own(str(address))
            else:
                own = address == _literal(listen.host)
            if own:
                return (
                    f"{formatHostPort(endpoint.host, endpoint.port)} is the gateway's own "
                    f"listen address ({listen}): it would forward clients to itself"
                )
        return None

    def reachedItself(self, transport):
        """
        Why the connection C{transport} (to an endpoint) reached the gateway
        itself (its peer is one of the gateway's listening addresses: the
        same port, and the same address or, for a wildcard listener, any
        address of this machine), or L{None}. Ports are compared first: most
        calls end there.
        """
        if not self.listeners:
            return None
        try:
            peer = transport.getPeer()
        except Exception:
            return None
        port = getattr(peer, "port", None)
        if port is None:
            return None
        for listener in self.listeners:
            bound = listener.boundAddress
            if bound is None or bound[1] != port:
                continue
            host, listening = _unmap(peer.host), _unmap(bound[0])
            if host == listening or (listening in ("0.0.0.0", "::") and self._own(host)):
                return (
                    f"{formatHostPort(peer.host, port)} is the gateway's own "
                    f"{listener.flag} ({listener.describe()})"
                )
        return None


def ownAddressCheck(listen, isLocal=isLocalAddress):
    """
    The check of learned endpoints against C{listen} (a callable: endpoint
    -> why it is refused, or L{None}): L{SelfLoopGuard.refuseLearned}.
    """
    return SelfLoopGuard(listen, isLocal=isLocal).refuseLearned
