"""
The fast path: how the gateway forwards faster than Twisted's own transports
do, kept in one package behind one gate.

 - L{etcdgw.fast.gate}: the gate. At start (L{start}) it checks that the
   installed Twisted is one the fast path was tested with and has every
   internal the fast path uses; otherwise the gateway runs on Twisted's own
   transports and dispatch, with one warning line. It owns that decision.
 - L{etcdgw.fast.transport}: the gateway's TCP transports (send at once,
   one reused receive buffer, splice(2) for bulk, two connections joined
   socket to socket).
 - L{etcdgw.fast.relay}: the forwarding step of joined transports, in C
   (C{_relay.c}, built as C{_etcdgw_relay}) or Python.
 - L{etcdgw.fast.dispatch}: the lean epoll dispatch.

The rest of the gateway uses this package's functions only: L{connectTCP}
(dials), L{join} and L{writerFor} (the proxy), L{start} and L{enabled}
(the start and the listeners); L{etcdgw.listen} builds its accepted
connections from L{serverTransport}. Each works with either kind of
transport.
"""

from etcdgw.fast.gate import TESTED_TWISTED, Verdict, check, enabled, start
from etcdgw.fast.relay import RELAY_IN_C

__all__ = [
    "RELAY_IN_C",
    "TESTED_TWISTED",
    "Verdict",
    "check",
    "connectTCP",
    "enabled",
    "join",
    "serverTransport",
    "settle",
    "start",
    "unsettleAll",
    "writerFor",
]


def connectTCP(reactor, host, port, factory, timeout):
    """
    C{reactor.connectTCP(host, port, factory, timeout=timeout)}, with the
    fast path's transports when it is on (and C{reactor} is one of
    Twisted's POSIX reactors).
    """
    if enabled():
        from etcdgw.fast.transport import connectTCP

        return connectTCP(reactor, host, port, factory, timeout)
    return reactor.connectTCP(host, port, factory, timeout=timeout)


def serverTransport(fast=None):
    """
    The transport class for an accepted TCP connection: the fast path's
    (L{etcdgw.fast.transport.GatewayServer}) or Twisted's own
    (C{tcp.Server}); both take C{tcp.Server}'s arguments.

    @param fast: L{None} to follow the gate (L{enabled}); C{False} for
        Twisted's own whatever the gate says (the metrics address, which
        serves a few HTTP requests and needs no speed).
    """
    if fast is not False and enabled():
        from etcdgw.fast.transport import GatewayServer

        return GatewayServer
    from twisted.internet.tcp import Server

    return Server


def join(a, b, countA, countB):
    """
    Forward what transport C{a} reads straight to C{b}'s socket, adding its
    size to C{countA} (an L{etcdgw.pool.ByteCount}), and what C{b} reads to
    C{a}, counted in C{countB}: their protocols' C{dataReceived} is no
    longer called, which is most of a Python proxy's cost per forwarded
    chunk. Both must be the fast path's transports. The join ends when
    either connection is lost; close and half-close still reach the
    protocols as usual.

    @return: whether they were joined (C{False}: not both the fast path's;
        their protocols forward).
    """
    if not (getattr(a, "fast", False) and getattr(b, "fast", False)):
        return False
    a.joinTo(b, countA)
    b.joinTo(a, countB)
    return True


def settle(a, b):
    """
    Joined transports C{a} and C{b} are set up (producers registered,
    reading resumed, what was queued queued): the fast path may take the
    pair over now. With io_uring, a quiet pair leaves the reactor's epoll for
    the ring (L{etcdgw.fast.ring.enter}); otherwise nothing changes.
    """
    if getattr(a, "fast", False) and getattr(b, "fast", False):
        from etcdgw.fast import ring

        ring.enter(a, b)


def unsettleAll(reactor):
    """
    Take every pair the fast path took over (L{settle}) back to the
    reactor's epoll, with what it had in flight, and apply at once what was
    seen meanwhile (an end of stream, a failed send): live takeover exports
    what is on epoll only.
    """
    from etcdgw.fast import ring

    ring.leaveAll(reactor)


def writerFor(transport):
    """
    A C{write(data)} for C{transport} that accepts the memoryviews the fast
    transports' reads produce: the transport's own C{write} when it is one
    of the fast path's, else one that copies to bytes first.
    """
    if getattr(transport, "fast", False):
        return transport.write
    write = transport.write
    return lambda data: write(bytes(data))
