"""
The gateway's own TCP transports: Twisted's, with a faster data path.

Four costs dominate a Python proxy's forwarding, and all are Twisted's
defaults rather than necessities:

 - C{transport.write} always queues the data and registers the socket for
   writability, so each forwarded chunk costs an C{epoll_ctl} and an extra
   turn of the reactor before it leaves. L{FastTransport.write} sends at once
   when nothing is queued and queues only what the kernel did not take.
 - C{doRead} allocates a new 64 KiB bytes object for every C{recv}.
   L{FastTransport.doRead} receives into one reused buffer
   (L{etcdgw.fast.relay.buffer}) and hands the protocol a C{memoryview} of it.
 - Bulk data is copied into Python and back. A direction that moves bulk
   data (a read fills the whole buffer) switches to C{splice(2)}, socket to
   pipe to socket inside the kernel (see L{FastTransport._startSplicing}).
 - Each chunk passes through four Python calls (C{doRead}, the protocol's
   C{dataReceived}, the peer transport's C{write}, and the read helper) on
   its way from one socket to the other. L{FastTransport.joinTo} ties two
   transports together so that C{doRead} sends what it reads to the peer's
   socket itself (one call: L{etcdgw.fast.relay}); the protocols still hear
   of half-closes and closes.

Everything else (the write buffer for what the kernel does not take at once,
producer pausing for backpressure, half-close and close handling) is
Twisted's, unchanged.

This module leans on Twisted's internals (L{tcp.Connection}'s write buffer,
C{dataBuffer}, C{offset}, C{_tempDataLen}; its C{_writeDisconnecting}; the
class attributes a slot hides; C{tcp.Client._connectDone};
C{tcp.Connector._makeTransport}): L{etcdgw.fast.gate} checks each, and the
Twisted version, before the gateway uses these transports; with a Twisted
it was not tested with, the gateway uses Twisted's own.

A send to a socket outside Twisted's write path (the relay's, the splice
flush's, L{FastTransport.write}'s) that fails is a lost connection, at once
(L{FastTransport._sendFailed}): the failed send consumed the socket's error
(a reset), so its next read would look like a clean end of stream.

The memoryview is only valid during C{dataReceived}: a protocol given one
must use it at once or copy it. L{etcdgw.fast.writerFor} gives the right way
to pass it on to any transport.
"""

import errno
import fcntl
import os
import socket

from twisted.internet import main, tcp
from twisted.internet.posixbase import PosixReactorBase

from etcdgw.connections import setMemberSocketOptions
from etcdgw.fast import ring as _ringModule
from etcdgw.fast.gate import SLOTTED
from etcdgw.fast.relay import _NO_ROOM, READ_SIZE
from etcdgw.fast.relay import buffer as _buffer
from etcdgw.fast.relay import relay as _relay
from etcdgw.fast.relay import view as _view

#: splice(2) is Linux's; where os.splice is missing, bulk data is copied.
SPLICE = hasattr(os, "splice") and hasattr(fcntl, "F_SETPIPE_SZ")
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
#: The pipe between the two sockets of a bulk transfer.
PIPE_SIZE = 1024 * 1024
#: A direction's empty pipe that has spliced nothing for this many seconds
#: (checked every this many seconds: it goes after one to two of them) is
#: closed: its two descriptors go back; the next bulk read makes a new one.
PIPE_IDLE = 5.0
#: splice(2) errors that mean "these descriptors cannot splice" (not a
#: broken connection): that direction copies from then on.
_CANNOT_SPLICE = frozenset((errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP))
#: What L{FastTransport._flushPipe} returns when sending to the target failed.
_LOST = "lost"


def _maySendNow(target):
    """
    Whether bytes may go straight to C{target}'s socket now, outside
    Twisted's write path: nothing is queued for it (Twisted's write buffer,
    C{dataBuffer[offset:]} plus C{_tempDataBuffer}, counted by
    C{_tempDataLen}; nor a splice pipe into it), and it is connected and not
    closing (queued bytes and the close go first, in order).

    The one place this question is answered (L{FastTransport.doRead},
    L{FastTransport._spliceRead}, L{FastTransport.write} ask it). It must
    stay in step with where C{twisted.internet.abstract.FileDescriptor}
    keeps queued bytes (C{write}, C{doWrite}) and how it closes
    (C{loseConnection}, C{loseWriteConnection}); L{etcdgw.fast.gate}
    checks that layout before these transports are used.
    """
    return not (
        target._tempDataLen
        or target.dataBuffer
        or target.disconnecting
        or target._writeDisconnecting
        or not target.connected
        or (target._pipeSource is not None and target._pipeSource._pipeBytes)
    )


def _reenter(transport):
    """
    Put C{transport}'s pair back into the io_uring ring if it is quiet now
    (a write buffer drained, a splice pipe closed): called a turn later, once
    Twisted is done with it.
    """
    target = transport._target
    if target is not None:
        _ringModule.enter(transport, target)


def _madeWhenRead(getter):
    """
    A property that Twisted may assign or delete (ignored) and whose value is
    made from C{getter} each time it is read.
    """
    return property(getter, lambda self, value: None, lambda self: None)


def _closedFileno():
    return -1


class FastTransport:
    """
    Mixin for L{tcp.Connection} subclasses; it must come first in the bases.
    """

    __slots__ = ()
    fast = True

    def _initSlots(self):
        """
        Give the slotted attributes the defaults Twisted's classes keep as
        class attributes (a slot hides those), before Twisted's own
        C{__init__} runs. Must stay in step with the class attributes of
        C{twisted.internet.abstract.FileDescriptor} and C{_ConsumerMixin}
        (L{etcdgw.fast.gate} checks that each is still a plain class
        attribute there).
        """
        self.producer = None
        self.streamingProducer = False
        self.producerPaused = False
        self.connected = 0
        self.disconnecting = 0
        self.disconnected = 0
        self.dataBuffer = b""
        self.offset = 0
        self._writeDisconnecting = False
        self._writeDisconnected = False
        self._pipe = self._pipeSource = None
        self._pipeBytes = self._spliced = 0
        self._spliceOff = self._eof = False
        self._target = self._count = self._fd = self._ring = None

    # Twisted sets these on every connection; made only when read instead
    # (a few hundred bytes less per connection): the log-context and repr
    # strings, which the gateway's lean dispatch does not use, and the
    # socket's bound fileno method.
    logstr = _madeWhenRead(
        lambda self: f"{type(self.protocol).__name__},{getattr(self, 'sessionno', 'client')}"
    )
    repstr = _madeWhenRead(lambda self: f"<{type(self).__name__} {self.logstr}>")
    fileno = _madeWhenRead(
        lambda self: self.socket.fileno if hasattr(self, "socket") else _closedFileno
    )

    def doRead(self):
        target = self._target
        if target is None:
            return self._copyRead()
        if self._pipe is not None:
            return self._spliceRead(target)
        # Joined (see joinTo): what arrives goes straight to the target's
        # socket, without the protocols.
        if not _maySendNow(target):
            return self._copyRead()
        try:
            r = _relay(self._fd, target._fd, _buffer)
        except OSError:
            return main.CONNECTION_LOST
        return self._relayed(target, r)

    def _relayed(self, target, r):
        """
        What C{doRead} does with the forwarding step's answer C{r} (also
        given the answers the lean dispatch's batch step, C{serve} in
        _relay.c, leaves to Python: an OSError there is a lost connection).

        @return: what C{doRead} returns.
        """
        if r.__class__ is int:
            if not r:
                self._eof = True
                return main.CONNECTION_DONE
            self._count.n += r
            if r == READ_SIZE:
                self._bulkRead()
            return None
        if r is None:
            return None
        if isinstance(r, OSError):
            return main.CONNECTION_LOST
        n, sent = r
        if sent < 0:
            target._sendFailed()  # what arrived goes down with it
            return None
        # The target took only part: Twisted queues the rest.
        self._count.n += n
        tcp.Connection.write(target, bytes(_view[sent:n]))
        return None

    def _copyRead(self):
        """
        Read through Python: for a transport that is not joined (its
        protocol gets the data), and for a joined one whose target cannot be
        sent to at once (it holds queued data, or is closing: the data goes
        through the target's write, behind what is queued).
        """
        try:
            n = self.socket.recv_into(_buffer)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return main.CONNECTION_LOST
        if not n:
            self._eof = True
            return main.CONNECTION_DONE
        target = self._target
        if target is None:
            self.protocol.dataReceived(_view[:n])
        else:
            self._count.n += n
            target.write(_view[:n])
        return None

    # Bulk transfers: splice(2).
    #
    # A read that fills the whole buffer means a bulk transfer: from then on
    # this direction moves data socket -> pipe -> socket inside the kernel,
    # never copying it into Python (as Go's io.Copy does between two TCP
    # connections, which is what etcd's gateway uses). The pipe is this
    # transport's (the source's); the target drains what the kernel did not
    # take at once when it becomes writable, before anything Twisted queued
    # for it, so order is kept. Connections that never move bulk data never
    # get a pipe (two descriptors), so thousands of idle etcd clients cost
    # none, and a direction whose empty pipe spliced nothing for PIPE_IDLE
    # gives it back (see _PipeSweep). _spliced counts the bytes this
    # transport's reads moved by splice (the copy path never touches it).
    # A splice that fails because the descriptors cannot splice (EINVAL...,
    # not a socket error) turns splicing off for that direction: it copies.

    def _bulkRead(self):
        """
        A read filled the whole buffer (here or in the io_uring ring): a
        bulk transfer, spliced from now on where splice(2) is there.
        """
        if SPLICE and self.connected:
            self._startSplicing()

    def _startSplicing(self):
        target = self._target
        if target._pipeSource or self._spliceOff:
            return
        try:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return  # out of descriptors: keep copying
        try:
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # the default pipe size works, with more system calls
        self._pipe = (r, w)
        self._pipeBytes = 0
        target._pipeSource = self
        _PipeSweep.of(self.reactor).add(self)

    def _closePipe(self, target):
        """
        Close this direction's pipe (what it holds is dropped: callers close
        an empty one, or one whose connection is lost) and stop splicing
        into C{target} until a new pipe is made.
        """
        r, w = self._pipe
        self._pipe = None
        self._pipeBytes = 0
        os.close(r)
        os.close(w)
        if target is not None and target._pipeSource is self:
            target._pipeSource = None
        _PipeSweep.of(self.reactor).remove(self)
        if target is not None and "_etcdgwRing" in self.reactor.__dict__:
            self.reactor.callLater(0, _reenter, self)

    def _spliceRead(self, target):
        """
        Splice what arrived into the pipe and on to C{target}.

        @return: what C{doRead} returns.
        """
        if not target.connected:
            return main.CONNECTION_LOST
        if self._pipeBytes:
            flushed = self._flushPipe()
            if flushed is _LOST:
                target._sendFailed()
                return None
            if not flushed:
                self.stopReading()  # the target resumes us once it drained the pipe
                target.startWriting()
                return None
        if self._pipe is None or not _maySendNow(target):
            # The flush found the target cannot splice, or Twisted holds data
            # for the target (or it is closing): copy this read, behind what
            # is queued, so that order is kept.
            return self._copyRead()
        try:
            n = os.splice(self._fd, self._pipe[1], PIPE_SIZE, flags=_SPLICE_FLAGS)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as e:
            if e.errno not in _CANNOT_SPLICE:
                return main.CONNECTION_LOST
            # This socket cannot splice (the pipe is empty here): copy.
            self._spliceOff = True
            self._closePipe(target)
            return self._copyRead()
        if not n:
            self._eof = True
            return main.CONNECTION_DONE
        self._pipeBytes = n
        self._spliced += n
        self._count.n += n
        flushed = self._flushPipe()
        if flushed is _LOST:
            target._sendFailed()
        elif not flushed:
            self.stopReading()
            target.startWriting()
        return None

    def _flushPipe(self):
        """
        Move what the pipe holds to the target.

        @return: C{True} once the pipe is empty; C{False} while the target
            has no room for the rest; L{_LOST} when sending to the target
            failed (what the pipe held is dropped): the caller loses the
            target's connection at once, as the failed send consumed its
            error.
        """
        try:
            while self._pipeBytes:
                self._pipeBytes -= os.splice(
                    self._pipe[0],
                    self._target._fd,
                    self._pipeBytes,
                    flags=_SPLICE_FLAGS,
                )
        except OSError as e:
            if e.errno in _NO_ROOM:
                return False
            if e.errno in _CANNOT_SPLICE:
                self._copyPipeOut()
                return True
            self._pipeBytes = 0
            return _LOST
        except AttributeError:
            self._pipeBytes = 0  # the target is gone (unjoined: no _target)
        return True

    def _copyPipeOut(self):
        """
        The target cannot be spliced to: hand what the pipe holds to the
        target's write buffer, ahead of what Twisted queued there (which came
        after it), close the pipe, and copy this direction from now on.
        """
        target = self._target
        chunks = []
        while self._pipeBytes:
            chunk = os.read(self._pipe[0], self._pipeBytes)
            self._pipeBytes -= len(chunk)
            chunks.append(chunk)
        self._spliceOff = True
        self._closePipe(target)
        # Into Twisted's write buffer, ahead of what it holds: must stay in
        # step with abstract.FileDescriptor.doWrite, which sends
        # dataBuffer[offset:] before _tempDataBuffer.
        target.dataBuffer = b"".join(chunks) + bytes(target.dataBuffer[target.offset:])
        target.offset = 0
        target.startWriting()

    def doWrite(self):
        source = self._pipeSource
        if source is not None and source._pipeBytes:
            flushed = source._flushPipe()
            if flushed is _LOST:
                return main.CONNECTION_LOST  # as Twisted's write path says it
            if not flushed:
                return None  # still waiting for room
            if (
                source.connected
                and not source.disconnecting
                and not source._eof
                and not self.producerPaused
            ):
                source.startReading()
        why = tcp.Connection.doWrite(self)
        if (
            not why
            and self._target is not None
            and "_etcdgwRing" in self.reactor.__dict__
            and not self.dataBuffer
            and not self._tempDataLen
        ):
            self.reactor.callLater(0, _reenter, self)
        return why

    def connectionLost(self, reason):
        if self._ring is not None:
            _ringModule.leave(self)
        target = self._target
        if target is not None:
            # Unjoin both ways: from now on each side's protocol hears what
            # its transport reads, as before the join.
            self._target = self._count = self._fd = None
            if target._target is self:
                target._target = target._count = target._fd = None
        if self._pipe is not None:
            self._closePipe(target)
        self._pipeSource = None
        return super().connectionLost(reason)

    # A pair in the io_uring ring (etcdgw.fast.ring) is the ring's: before
    # anything touches its sockets' reading, writing or closing, it comes
    # back to the reactor's epoll, with what it had in flight.

    def writeSequence(self, iovec):
        if self._ring is not None:
            _ringModule.leave(self)
        return super().writeSequence(iovec)

    def loseConnection(self, *args, **kwargs):
        if self._ring is not None:
            _ringModule.leave(self)
        return super().loseConnection(*args, **kwargs)

    def abortConnection(self):
        if self._ring is not None:
            _ringModule.leave(self)
        return super().abortConnection()

    def loseWriteConnection(self):
        if self._ring is not None:
            _ringModule.leave(self)
        return super().loseWriteConnection()

    def startReading(self):
        if self._ring is not None:
            _ringModule.leave(self)
        return super().startReading()

    def stopReading(self):
        if self._ring is not None:
            _ringModule.leave(self)
        return super().stopReading()

    def startWriting(self):
        if self._ring is not None:
            _ringModule.leave(self)
        return super().startWriting()

    def stopWriting(self):
        if self._ring is not None:
            _ringModule.leave(self)
        return super().stopWriting()

    def write(self, data):
        if self._ring is not None:
            _ringModule.leave(self)
        if not _maySendNow(self):
            tcp.Connection.write(self, bytes(data))
            return
        try:
            sent = self.socket.send(data)
        except OSError as e:
            if e.errno not in _NO_ROOM:
                self._sendFailed()
                return
            sent = 0
        if sent < len(data):
            tcp.Connection.write(self, bytes(data[sent:]))

    def _sendFailed(self):
        """
        A send to this connection's socket outside Twisted's write path (the
        relay's, the splice flush's, L{write}'s) failed: the connection is
        lost, now. The failed send consumed the socket's pending error (a
        reset), so its next read would return 0, a clean end of stream, and
        the gateway would pass a half-close (a FIN) on to the peer instead of
        the reset. Aborted, its protocol hears of a lost connection
        (C{ConnectionAborted}) and aborts the peer: the reset is passed on.
        (Twisted's own write path returns C{CONNECTION_LOST} for a failed
        send; L{doWrite} does the same.)
        """
        self.abortConnection()

    def joinTo(self, target, count):
        """
        Send what this transport reads straight to C{target}'s socket (see
        L{etcdgw.fast.join}), adding its size to C{count}.
        """
        self._target, self._count, self._fd = target, count, self.socket.fileno()


class _PipeSweep:
    """
    Closes the pipes of directions that are done with bulk data: every
    L{PIPE_IDLE} seconds, a pipe that is empty and has spliced nothing since
    the last look (so for one to two periods) is closed. One per reactor; its
    timer runs only while some pipe is open, so a gateway without bulk
    transfers has none, and its cost is one look per open pipe per period,
    nothing per forwarded chunk.
    """

    _sweeps = {}

    @classmethod
    def of(cls, reactor):
        sweep = cls._sweeps.get(reactor)
        if sweep is None:
            sweep = cls._sweeps[reactor] = cls(reactor)
        return sweep

    def __init__(self, reactor):
        self.reactor = reactor
        #: transport -> its _spliced at the last look (None: not looked at).
        self.seen = {}
        self.call = None

    def add(self, transport):
        self.seen[transport] = None
        if self.call is None:
            self.call = self.reactor.callLater(PIPE_IDLE, self.sweep)

    def remove(self, transport):
        self.seen.pop(transport, None)
        if not self.seen:
            if self.call is not None and self.call.active():
                self.call.cancel()
            self.call = None
            if self._sweeps.get(self.reactor) is self:
                del self._sweeps[self.reactor]

    def sweep(self):
        self.call = None
        for transport, last in list(self.seen.items()):
            if transport._spliced == last and not transport._pipeBytes:
                transport._closePipe(transport._target)
            else:
                self.seen[transport] = transport._spliced
        if self.seen:
            self.call = self.reactor.callLater(PIPE_IDLE, self.sweep)


#: What Twisted sets on every connection: kept in slots rather than in a
#: per-connection dict (about 400 bytes less per connection). Must stay in
#: step with what tcp.Connection, tcp.Server and tcp.Client set; a name
#: Twisted no longer sets only wastes a slot, a new one lands in the dict.
_CONNECTION_SLOTS = (
    ("socket", "protocol", "reactor", "_tempDataBuffer", "_tempDataLen")
    + SLOTTED
    + (
        "_pipe",
        "_pipeBytes",
        "_pipeSource",
        "_spliced",
        "_spliceOff",
        "_eof",
        "_target",
        "_count",
        "_fd",
        "_ring",
    )
)


class GatewayServer(FastTransport, tcp.Server):
    """
    An accepted client connection.
    """

    __slots__ = _CONNECTION_SLOTS + ("client", "hostname", "server", "sessionno")

    def __init__(self, *args, **kwargs):
        self._initSlots()
        super().__init__(*args, **kwargs)


class GatewayClient(FastTransport, tcp.Client):
    """
    A connection to an etcd member, with C{TCP_NODELAY}, keep-alive and
    C{TCP_USER_TIMEOUT} (L{setMemberSocketOptions}) set before connecting.
    """

    __slots__ = _CONNECTION_SLOTS + ("addr", "realAddress", "connector", "_requiresResolution")

    def __init__(self, *args, **kwargs):
        self._initSlots()
        super().__init__(*args, **kwargs)

    def _connectDone(self):
        # tcp.BaseClient._connectDone (private; the gate checks it is there).
        super()._connectDone()
        self.connector = _CONNECTED

    def createInternetSocket(self):
        s = super().createInternetSocket()
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        setMemberSocketOptions(s)
        return s


class _Connected:
    """
    Stands in for a connector once its connection is made: a transport only
    tells it that the connection is lost, which the gateway's dial factories
    do not need to hear. Letting go of the real connector (and through it
    the dial's factory) saves several hundred bytes per open connection.
    """

    @staticmethod
    def connectionLost(reason):
        pass


_CONNECTED = _Connected()


class GatewayConnector(tcp.Connector):
    # tcp.Connector._makeTransport (private; the gate checks it is there):
    # it must build the transport as tcp.Connector's does.
    def _makeTransport(self):
        return GatewayClient(self.host, self.port, self.bindAddress, self, self.reactor)


def connectTCP(reactor, host, port, factory, timeout):
    """
    C{reactor.connectTCP} with L{GatewayClient} transports on Twisted's own
    POSIX reactors; the reactor's own method elsewhere (test reactors).
    """
    if isinstance(reactor, PosixReactorBase):
        connector = GatewayConnector(host, port, factory, timeout, None, reactor)
        connector.connect()
        return connector
    return reactor.connectTCP(host, port, factory, timeout=timeout)
