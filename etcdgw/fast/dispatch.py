"""
A leaner event dispatch for Twisted's epoll reactor.

For every ready descriptor, C{EPollReactor.doPoll} calls
C{log.callWithLogger}, which pushes and pops a legacy logging context (the
"system" prefix of old-style C{log.msg} lines) around the handler. In a proxy
that does little else per event, that context switch is a measurable share of
the CPU per forwarded request. The gateway logs through C{twisted.logger}
with namespaces and never relies on that prefix, so L{leanDispatch} replaces
the reactor's C{doPoll} with the same loop minus the context, and with the
common event (data to read, nothing else) dispatched inline: same events,
same handlers, same error handling (what a connection's handler raises is
logged and closes that connection, as in C{_doReadOrWrite}, which still
handles every other event), with one exception: a listening port whose
C{doRead} raises is logged and keeps listening. (Twisted's own ports catch
everything in their C{doRead}, so C{_doReadOrWrite} never meets that case;
one client must never close the port every later client needs.) It also
takes at most L{MAX_EVENTS} events per turn, where Twisted asks for (and
allocates room for) one per open descriptor.

Where the C forwarding step is built, every event of a batch that is data
to read on a joined fast transport whose target may be sent to now is
served in one call into C (C{serve} in C{_relay.c}, issue 16): the
interpreter runs nothing for it; what C leaves (every other event, and the
answers that need the transport: end of stream, bulk, a partial or failed
send, a receive error) is handled here as before, the answers by
C{FastTransport._relayed}, what C{doRead} does with them.

L{_doPoll} is a copy of C{twisted.internet.epollreactor.EPollReactor.doPoll}
(Twisted 25.5 to 26.x) and must stay in step with it and with
C{posixbase._PollLikeMixin._doReadOrWrite}, whose handling of a read it
inlines. It uses the reactor's private C{_poller}, C{_selectables},
C{_doReadOrWrite} and C{_disconnectSelectable}: L{etcdgw.fast.gate} checks
them (and the Twisted version) before L{leanDispatch} is applied; otherwise
the reactor keeps its own C{doPoll}.
"""

import errno
import select
import types

from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python import log

from etcdgw.fast import ring

_log = Logger(namespace="etcdgw.fast.dispatch")

_IN = select.EPOLLIN
#: At most this many ready descriptors are taken from one epoll_wait.
MAX_EVENTS = 1024
#: The C batch step and what it needs (set by leanDispatch; None: every
#: event through Python).
_serve = _buffer = _FastTransport = _READ_SIZE = None


def _doPoll(self, timeout):
    if timeout is None:
        timeout = -1
    try:
        # Twisted asks for as many events as it has descriptors, and
        # epoll.poll allocates room for that many on every call: 192 KB per
        # turn with 8,000 clients. A bounded batch; the rest come next turn.
        events = self._poller.poll(timeout, min(len(self._selectables), MAX_EVENTS) or 1)
    except OSError as err:
        if err.errno == errno.EINTR:
            return 0
        raise
    count = len(events)
    selectables = self._selectables
    dispatch = self._doReadOrWrite
    if _serve is not None and events:
        events, answers = _serve(events, selectables, _buffer, _FastTransport, _READ_SIZE)
        for transport, target, answer in answers:
            if answer == 0 and transport._aborting:
                # An end of stream from a transport a send to which failed
                # earlier in this batch (an answer before this one): that
                # send consumed its reset, so the end is not what happened,
                # and the abort already passes the reset on. (Asked of ends
                # only: the hot path's answers are byte counts.)
                continue
            try:
                why = transport._relayed(target, answer)
            except BaseException as e:
                log.err(None, "Unhandled error in doRead")
                why = e
            if why:
                self._disconnectSelectable(transport, why, True)
    for fd, event in events:
        selectable = selectables.get(fd)
        if selectable is None:
            continue
        if event != _IN:
            if event & _IN and IListeningPort.providedBy(selectable):
                _readListening(self, selectable)  # data and an error flag
                continue
            dispatch(selectable, fd, event)  # writes, hang-ups, errors
            continue
        # The common case, inlined: data to read, and nothing else.
        try:
            why = selectable.doRead()
        except BaseException as e:
            if IListeningPort.providedBy(selectable):
                _log.failure(
                    "error accepting on {port}; it keeps listening", port=repr(selectable)
                )
                continue
            log.err(None, "Unhandled error in doRead")
            why = e
        if why:
            self._disconnectSelectable(selectable, why, True)
    return count


def _ringPoll(self, timeout):
    # The reactor's turn through io_uring (etcdgw.fast.ring), which calls
    # _doPoll when the reactor's epoll has events; _doPoll alone where the
    # ring could not be made.
    if not ring.ringPoll(self, timeout, _doPoll):
        self.doPoll = self.doIteration = types.MethodType(_doPoll, self)
        _doPoll(self, timeout)


def _readListening(reactor, port):
    """
    Read (accept) on a listening port: an error is logged, never closes it.
    """
    try:
        why = port.doRead()
    except BaseException:
        _log.failure("error accepting on {port}; it keeps listening", port=repr(port))
        return
    if why:
        reactor._disconnectSelectable(port, why, True)


def leanDispatch(reactor, useRing=True):
    """
    Make C{reactor}'s event loop dispatch without the legacy logging context,
    if it is Twisted's epoll reactor; leave any other reactor alone.

    @return: whether the reactor was changed.
    """
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:  # not Linux
        return False
    if type(reactor) is not EPollReactor:
        return False
    global _serve, _buffer, _FastTransport, _READ_SIZE
    from etcdgw.fast import relay, transport

    _serve, _buffer, _READ_SIZE = relay.serve, relay.buffer, relay.READ_SIZE
    _FastTransport = transport.FastTransport
    poll = _ringPoll if useRing and ring.available() is None else _doPoll
    reactor.doPoll = reactor.doIteration = types.MethodType(poll, reactor)
    return True
