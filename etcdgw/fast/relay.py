"""
The forwarding step of two joined transports: receive once from one socket
into the one reused buffer, send what arrived to the other socket.

It is one call into C (C{etcdgw/fast/_relay.c}, built at install as the
top-level module C{_etcdgw_relay}) or, where that was not built (or is a
stale build with other answers), L{_relayPython}, which gives the same
answers. This module owns the receive buffer every fast transport reads
into (L{buffer}, L{view}): the gateway runs on one thread, and what a read
puts there is used (sent, queued as bytes, or handed to C{dataReceived},
which must copy it) before the next read.
"""

import errno
import os

#: The receive buffer's size: the most one read takes.
READ_SIZE = 65536
buffer = bytearray(READ_SIZE)
view = memoryview(buffer)
_buffers = (buffer,)
#: The C module's answers this module expects (see CONTRACT in _relay.c).
CONTRACT = 3
#: send(2) errors that mean "no room now", not a broken connection (as
#: Twisted's own write path counts them: EWOULDBLOCK and ENOBUFS).
_NO_ROOM = frozenset((errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR, errno.ENOBUFS))


def _relayPython(src, dst, buffer):
    """
    What C{_etcdgw_relay.relay} does (see etcdgw/fast/_relay.c), for where
    that module was not built: receive once from descriptor C{src} into
    C{buffer} (which is always L{buffer}) and send it to descriptor C{dst}.

    @return: C{n > 0} when C{n} bytes arrived and all were sent; C{0} at the
        end of the stream; L{None} when there is nothing to read;
        C{(n, sent)} when only the first C{sent} of C{n} were sent (no room
        at C{dst}); C{(n, -1)} when sending failed: C{dst}'s connection is
        lost (the failed send consumed its error: its next read would look
        like a clean end of stream).
    @raise OSError: receiving failed.
    """
    try:
        n = os.readv(src, _buffers)
    except (BlockingIOError, InterruptedError):
        return None
    if not n:
        return 0
    try:
        sent = os.write(dst, view[:n])
    except OSError as e:
        sent = 0 if e.errno in _NO_ROOM else -1
    return n if sent == n else (n, sent)


def _load():
    try:
        import _etcdgw_relay
    except ImportError:
        return _relayPython, None
    if getattr(_etcdgw_relay, "CONTRACT", None) != CONTRACT:
        return _relayPython, None  # a build of older sources: its answers differ
    return _etcdgw_relay.relay, _etcdgw_relay.serve


relay, serve = _load()
#: Whether the forwarding step runs in C.
RELAY_IN_C = relay is not _relayPython
#: serve(events, selectables, buffer, fastType, readSize): the forwarding
#: step for every ready joined transport of one epoll batch, in C (see
#: _relay.c; etcdgw.fast.dispatch uses it); None where C was not built.
