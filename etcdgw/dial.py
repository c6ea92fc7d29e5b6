"""
Dialling one endpoint, bounded by a timeout: shared by the proxy and the
health checks.
"""

import errno

from twisted.internet import defer, error
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import ClientFactory
from twisted.python.failure import Failure

from etcdgw.fast import connectTCP


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
        # None once the dial was cancelled: stopConnecting then reports a
        # UserError, which is not the member's failure.
        if self.deferred is not None and not self.deferred.called:
            self.deferred.errback(reason)


def dial(reactor, endpoint, buildProtocol, timeout):
    """
    Connect to C{endpoint} within C{timeout} seconds.

    IP literals are dialled directly; host names through L{HostnameEndpoint},
    which resolves them anew at each dial, and the whole dial (resolution
    included) is bounded by C{timeout}.

    Whatever goes wrong is a failed dial, never an exception: an address
    whose connect raises at once (C{connectTCP} resolving an IPv6 scope ID
    that names no interface raises C{socket.gaierror}) fails the Deferred
    like a refused connection.

    @param buildProtocol: called with the address; returns the protocol, whose
        C{connectionMade} must call L{connected} (as
        L{etcdgw.proxy.UpstreamProtocol} and the health probe do).
    @return: a cancellable Deferred firing with the connected protocol, or
        failing with the connection error (L{error.TimeoutError} on timeout).
        Cancelled, it fails with L{defer.CancelledError} (never with the
        connector's C{UserError} or the endpoint's
        C{ConnectingCancelledError}, which would read as the member's fault).
    """
    try:
        if isIPAddress(endpoint.host) or isIPv6Address(endpoint.host):
            return _dialAddress(reactor, endpoint, buildProtocol, timeout)
        return _dialName(reactor, endpoint, buildProtocol, timeout)
    except Exception:
        return defer.fail()


def _dialAddress(reactor, endpoint, buildProtocol, timeout):
    connector = factory = None

    def cancel(d):
        factory.deferred = None
        if connector is not None:
            connector.stopConnecting()

    d = defer.Deferred(cancel)
    factory = _DialFactory(buildProtocol, d)
    connector = connectTCP(reactor, endpoint.host, endpoint.port, factory, timeout)
    return d


def _timedOut(result, timeout):
    raise error.TimeoutError(f"no connection within {timeout}s")


def _dialName(reactor, endpoint, buildProtocol, timeout):
    attempt = HostnameEndpoint(reactor, endpoint.host, endpoint.port, timeout=timeout).connect(
        _EndpointFactory(buildProtocol)
    )
    attempt.addTimeout(timeout, reactor, onTimeoutCancel=_timedOut)
    cancelled = []

    def cancel(d):
        cancelled.append(True)
        attempt.cancel()

    d = defer.Deferred(cancel)

    def relay(result):
        if not cancelled:
            d.callback(result)
        elif not isinstance(result, Failure):
            result.transport.abortConnection()  # connected as we gave up
        return None

    attempt.addBoth(relay)
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
    if type(value).__module__.partition(".")[0] in ("OpenSSL", "etcdgw", "service_identity"):
        from etcdgw.tls import describeTLSError  # pyOpenSSL: loaded only for a TLS failure

        tls = describeTLSError(value)
        if tls is not None:
            return tls
    text = str(value).strip() or reason.type.__name__
    return " ".join(text.split())
