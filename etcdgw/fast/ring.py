"""
Joined pairs forwarded through io_uring (issue 16).

On epoll, every forwarded chunk costs a wake-up, a C{recv} and a C{send}
system call; even a C relay doing nothing else costs 0.90x HAProxy's CPU
per request on the reference machine, one on io_uring 0.74x
(C{benchmarks/floor}). Here a joined pair whose two connections are quiet
(nothing queued for either, neither closing nor half-closed, no splice pipe,
both reading) leaves the reactor's epoll for this process's L{Ring} (C, in
C{_ring.c}): a receive is armed on each socket, what it brings is sent to
the peer, and the receive is armed again only once all of it was sent, so
a slow reader holds one buffer per direction and the writer meets TCP's
backpressure, as on the copy path. The reactor waits in C{io_uring_enter}
(L{ringPoll}), which also watches its epoll descriptor.

Anything but "bytes arrived, bytes sent" takes a pair out of the ring, back
to the copy path, which handles it as it always has:

 - the ring finds it: an end of stream, a receive or send error, a read
   that filled the whole buffer (bulk: the copy path splices);
 - Python touches one of its transports: a write, a close, a half-close,
   a change of reading or writing (L{etcdgw.fast.transport.FastTransport}
   calls L{leave} first), or live takeover (L{leaveAll}).

Bytes a pair had in flight come back in order: what the ring had read and
not yet sent is queued on the target first. A pair goes back into the ring
when it is quiet again (L{enter}: at the join, when a write buffer drains,
when a splice pipe closes).

Each reactor has its own ring (its C{_etcdgwRing}), made in the reactor's
thread at its first turn; where that fails
(an old kernel, seccomp, C{io_uring_disabled}) one line says why and the
reactor stays on epoll. C{ETCDGW_IO_URING=0} in the environment keeps it on
epoll too (for comparisons; the flag for users is C{--forward}).
"""

import os

from twisted.internet import tcp
from twisted.logger import Logger

_log = Logger(namespace="etcdgw.fast.ring")

try:
    import _etcdgw_ring
except ImportError:  # not built (not Linux, no compiler)
    _etcdgw_ring = None

#: The C module's contract this module expects (CONTRACT in _ring.c).
CONTRACT = 1
#: Provided buffers: how many, and each one's size (a read that fills one is
#: bulk: the pair goes back to the copy path, which splices).
BUFFERS = 64
BUFFER_SIZE = 65536


class _Bulk:
    def __repr__(self):
        return "BULK"


#: What a direction's record says when its read filled a whole buffer.
BULK = _Bulk()

#: Why there is no ring (None: there is one, or none was tried yet): what
#: was last logged.
unavailable = None


class _Ring:
    """
    A reactor's ring and what goes with it (the reactor's C{_etcdgwRing}).
    """

    def __init__(self, engine):
        self.engine = engine
        self.pid = os.getpid()
        #: Records of pairs Python took out (L{leave}), whose answers (an end
        #: of stream the ring read, a failed send) are applied next turn.
        self.pending = []
        #: Whether the reactor's epoll may hold events no wake-up will
        #: announce (it is level-triggered: what a turn left stays ready).
        self.epollReady = True


def ringOf(reactor):
    """
    C{reactor}'s ring (a L{_Ring}), or None: its pairs stay on epoll.
    """
    return reactor.__dict__.get("_etcdgwRing")


def available():
    """
    Why the ring cannot be used in this build (None: it can be tried).
    """
    if _etcdgw_ring is None:
        return "the io_uring step (_etcdgw_ring) was not built"
    if getattr(_etcdgw_ring, "CONTRACT", None) != CONTRACT:
        return "the io_uring step (_etcdgw_ring) is a stale build"
    if os.environ.get("ETCDGW_IO_URING") == "0":
        return "ETCDGW_IO_URING=0"
    return None


def open(reactor):
    """
    Make C{reactor}'s ring (in the reactor's thread), or say once why not.

    @return: the L{_Ring}, or None.
    """
    global unavailable
    why = available()
    if why is None:
        try:
            engine = _etcdgw_ring.Ring(reactor._poller.fileno(), BULK, BUFFERS, BUFFER_SIZE)
        except (OSError, AttributeError) as e:
            why = f"io_uring refused: {getattr(e, 'strerror', None) or e}"
        else:
            ring = reactor._etcdgwRing = _Ring(engine)
            if unavailable is not False:
                _log.info("forwarding joined pairs through io_uring")
            unavailable = False
            return ring
    if unavailable != why:
        unavailable = why
        _log.info("forwarding on epoll, not io_uring: {why}", why=why)
    return None


def ringPoll(reactor, timeout, doPoll):
    """
    One turn of the reactor: wait in the ring (which watches the reactor's
    epoll), hand back the pairs that left it, then, when the reactor has
    events of its own, C{doPoll(reactor, 0)} (the lean dispatch).

    @return: L{False} when there is no ring (the caller polls epoll itself).
    """
    ring = reactor.__dict__.get("_etcdgwRing")
    if ring is None or ring.pid != os.getpid():
        # (A forked child: its parent's ring is not its own.)
        ring = open(reactor)
        if ring is None:
            return False
    if ring.pending:
        _applyPending(reactor, ring)
        timeout = 0
    if ring.epollReady:
        timeout = 0
    ready, left = ring.engine.wait(-1.0 if timeout is None else float(timeout))
    if left:
        for record in left:
            _restore(record)
        for record in left:
            _answer(reactor, record)
    if ready or ring.epollReady:
        ring.epollReady = doPoll(reactor, 0) > 0
    return True


def enter(a, b):
    """
    Put joined transports C{a} and C{b} into their reactor's ring if both
    are quiet: joined to each other, nothing queued for either, neither
    closing nor half-closed, no splice pipe, both reading and neither
    writing.

    @return: whether they went in.
    """
    reactor = a.reactor
    ring = reactor.__dict__.get("_etcdgwRing")
    if ring is None or a._ring is not None or b._ring is not None:
        return False
    if a._target is not b or b._target is not a or b.reactor is not reactor:
        return False
    from etcdgw.fast.transport import _maySendNow

    reads, writes = reactor._reads, reactor._writes
    for t in (a, b):
        # Nothing queued, connected, not closing (what the copy path asks
        # before it sends past Twisted's queue), and more: no splice pipe
        # either way (even an empty one), read side open, not paused, write
        # side not shut, reading and not writing.
        if (
            not _maySendNow(t)
            or t._pipe is not None
            or t._pipeSource is not None
            or t._eof
            or t.producerPaused
            or t._writeDisconnected
            or t._fd not in reads
            or t._fd in writes
        ):
            return False
    reactor.removeReader(a)
    reactor.removeReader(b)
    slot = ring.engine.add(a, b, a._fd, b._fd, a._count, b._count)
    a._ring = b._ring = slot
    return True


def leave(transport):
    """
    Take C{transport}'s pair out of the ring now, before Python touches it:
    what the ring had read and not sent is queued on its target, both are
    back on the reactor's epoll; what else the ring saw (an end of stream, a
    failed send) is applied at the next turn.
    """
    ring = transport.reactor._etcdgwRing
    record = ring.engine.leave(transport._ring)
    _restore(record)
    ring.pending.append(record)


def leaveAll(reactor):
    """
    Take every pair out of C{reactor}'s ring and apply at once what the ring
    saw (live takeover: what is exported must be all on epoll, and a pair
    that is closing must look so).
    """
    ring = reactor.__dict__.get("_etcdgwRing")
    if ring is None:
        return
    for record in ring.engine.leaveAll():
        _restore(record)
        ring.pending.append(record)
    _applyPending(reactor, ring)


def close(reactor):
    """
    Take every pair out of C{reactor}'s ring (L{leaveAll}) and close it:
    its pairs stay on epoll from now on (for a reactor given its own
    dispatch back).
    """
    ring = reactor.__dict__.get("_etcdgwRing")
    if ring is None:
        return
    leaveAll(reactor)
    ring.engine.close()
    del reactor._etcdgwRing


def _restore(record):
    a, b, directions = record
    a._ring = b._ring = None
    for src, dst, read, failed, rest in directions:
        if rest is not None and not failed:
            # Read before anything Python may queue now: first in line.
            tcp.Connection.write(dst, rest)
    for t in (a, b):
        if t.connected and not t.disconnected:
            t.reactor.addReader(t)


def _applyPending(reactor, ring):
    records = list(ring.pending)
    del ring.pending[:]
    for record in records:
        _answer(reactor, record)


def _answer(reactor, record):
    """
    Apply what the ring saw on a pair that left it, as the lean dispatch
    applies the C step's answers (L{FastTransport._relayed}).
    """
    directions = record[2]
    for src, dst, read, failed, rest in directions:
        if failed and not dst.disconnected:
            dst._sendFailed()
    for src, dst, read, failed, rest in directions:
        if read is None or src.disconnected:
            continue
        if read is BULK:
            if src._target is dst:
                src._bulkRead()
            continue
        if read == 0 and src._aborting:
            continue  # a failed send to it consumed its reset (see _sendFailed)
        try:
            why = src._relayed(dst, read)
        except BaseException as e:
            _log.failure("error handing back a connection from io_uring")
            why = e
        if why:
            reactor._disconnectSelectable(src, why, True)


__all__ = ["BULK", "available", "close", "enter", "leave", "leaveAll", "open", "ringOf", "ringPoll"]
