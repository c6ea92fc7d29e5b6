"""
Dialling one endpoint, bounded by a timeout: shared by the proxy and the
health checks.
"""

import errno

from twisted.internet import defer, error
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import ClientFactory

from etcdgw.transport import connectTCP


class _DialFactory(ClientFactory):
    """
    Build one protocol for a direct C{connectTCP} and fire a Deferred with it
    once connected, or fail it.
    """

    noisy = False

    def __init__(self, buildProtocol, deferred):
        self._build = buildProtocol
        self.deferred = deferred

    def buildProtocol(self, addr):
        protocol = self._build(addr)
        protocol.factory = self
        return protocol

    def clientConnectionFailed(self, connector, reason):
        if not self.deferred.called:
            self.deferred.errback(reason)


def dial(reactor, endpoint, buildProtocol, timeout):
    """
    Connect to C{endpoint} within C{timeout} seconds.

    IP literals are dialled directly; host names through L{HostnameEndpoint},
    which resolves them anew at each dial, and the whole dial (resolution
    included) is bounded by C{timeout}.

    @param buildProtocol: called with the address; returns the protocol, whose
        C{connectionMade} must call C{self.factory.deferred.callback(self)}
        (L{Connected} does) for direct dials.
    @return: a cancellable Deferred firing with the connected protocol, or
        failing with the connection error (L{error.TimeoutError} on timeout).
    """
    if isIPAddress(endpoint.host) or isIPv6Address(endpoint.host):
        connector = None

        def cancel(d):
            if connector is not None:
                connector.stopConnecting()

        d = defer.Deferred(cancel)
        connector = connectTCP(
            reactor, endpoint.host, endpoint.port, _DialFactory(buildProtocol, d), timeout
        )
        return d
    factory = _EndpointFactory(buildProtocol)
    d = HostnameEndpoint(reactor, endpoint.host, endpoint.port, timeout=timeout).connect(
        factory
    )
    d.addTimeout(timeout, reactor)
    return d


class _EndpointFactory(ClientFactory):
    noisy = False
    deferred = None

    def __init__(self, buildProtocol):
        self._build = buildProtocol

    def buildProtocol(self, addr):
        protocol = self._build(addr)
        protocol.factory = self
        return protocol


def connected(protocol):
    """
    Tell the dial that C{protocol} is connected (call from C{connectionMade}).
    A no-op for dials through an endpoint, which report it themselves.
    """
    factory = protocol.factory
    deferred = getattr(factory, "deferred", None)
    if deferred is not None and not deferred.called:
        # The connector keeps the factory for the connection's life: let go
        # of what only the dial needed.
        factory.deferred = factory._build = None
        deferred.callback(protocol)


#: errno values that mean the gateway itself ran short, not the member.
LOCAL_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def isLocalResourceError(reason):
    """
    Whether a dial failed because this process or machine is out of
    descriptors, buffers or memory (creating the socket failed), rather than
    because of the member.
    """
    value = reason.value
    code = getattr(value, "osError", None)
    if code is None and isinstance(value, OSError):
        code = value.errno
    return code in LOCAL_RESOURCE_ERRORS


def describeFailure(reason):
    """
    A short, one-line description of a dial failure for logs.
    """
    if reason.check(defer.TimeoutError, error.TimeoutError):
        return "connect timed out"
    if reason.check(defer.CancelledError):
        return "dial cancelled"
    value = reason.value
    if reason.check(error.ConnectionRefusedError):
        return "connection refused"
    if reason.check(error.DNSLookupError):
        return f"DNS lookup failed: {value}"
    text = str(value).strip() or reason.type.__name__
    return " ".join(text.split())
