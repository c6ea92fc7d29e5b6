"""
The self-loop check: an endpoint that is the gateway's own listening address
would make every client connection dial the gateway again, without end.
"""

import socket

from etcdgw.endpoint import formatHostPort


class SelfLoopError(ValueError):
    """
    An endpoint resolves to the gateway's own listen address.
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
    if address.startswith("::ffff:") and "." in address:
        return address[len("::ffff:") :]
    return address.split("%", 1)[0]


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

    @param listen: the L{etcdgw.listen.ListenAddress}; only TCP ones are checked.
    @raise SelfLoopError: naming the endpoint and the listen address.
    """
    if not listen.isTCP:
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
