"""
The gateway's own TCP transports: Twisted's, with a faster data path.

Two costs dominate a Python proxy's forwarding, and both are Twisted's
defaults rather than necessities:

 - C{transport.write} always queues the data and registers the socket for
   writability, so each forwarded chunk costs an C{epoll_ctl} and an extra
   turn of the reactor before it leaves. L{FastTransport.write} sends at once
   when nothing is queued and queues only what the kernel did not take.
 - C{doRead} allocates a new 64 KiB bytes object for every C{recv}.
   L{FastTransport.doRead} receives into one reused buffer and hands the
   protocol a C{memoryview} of it.

Everything else (the write buffer for what the kernel does not take at once,
producer pausing for backpressure, half-close and close handling) is
Twisted's, unchanged.

The memoryview is only valid during C{dataReceived}: a protocol given one
must use it at once or copy it. L{writerFor} gives the right way to pass it on
to any transport.
"""

import socket

from twisted.internet import main, tcp
from twisted.internet.posixbase import PosixReactorBase

READ_SIZE = 65536
_buffer = bytearray(READ_SIZE)
_view = memoryview(_buffer)


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
        C{__init__} runs.
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

    # Twisted formats two strings for every connection, for logging contexts
    # and repr; the gateway's lean dispatch does not use them, so they are
    # made only when asked for (a few hundred bytes less per connection).
    @property
    def logstr(self):
        return f"{type(self.protocol).__name__},{getattr(self, 'sessionno', 'client')}"

    @logstr.setter
    def logstr(self, value):
        pass

    # Twisted keeps the socket's bound fileno method per connection; look it
    # up when asked instead.
    @property
    def fileno(self):
        try:
            return self.socket.fileno
        except AttributeError:  # closed: Twisted deleted the socket
            return _closedFileno

    @fileno.setter
    def fileno(self, value):
        pass

    @fileno.deleter
    def fileno(self):
        pass

    @property
    def repstr(self):
        return f"<{type(self).__name__} {self.logstr}>"

    @repstr.setter
    def repstr(self, value):
        pass

    def doRead(self):
        try:
            n = self.socket.recv_into(_buffer)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return main.CONNECTION_LOST
        if not n:
            return main.CONNECTION_DONE
        self.protocol.dataReceived(_view[:n])
        return None

    def write(self, data):
        if (
            self._tempDataLen
            or self.dataBuffer
            or self.disconnecting
            or self._writeDisconnecting
            or not self.connected
        ):
            tcp.Connection.write(self, bytes(data))
            return
        try:
            sent = self.socket.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            # Let the transport meet the error in its own write path and
            # close the connection the usual way.
            tcp.Connection.write(self, bytes(data))
            return
        if sent < len(data):
            tcp.Connection.write(self, bytes(data[sent:]))


def _closedFileno():
    return -1


#: What Twisted sets on every connection: kept in slots rather than in a
#: per-connection dict (about 400 bytes less per connection).
_CONNECTION_SLOTS = (
    "socket",
    "protocol",
    "reactor",
    "producer",
    "streamingProducer",
    "producerPaused",
    "_tempDataBuffer",
    "_tempDataLen",
    "connected",
    "disconnecting",
    "disconnected",
    "dataBuffer",
    "offset",
    "_writeDisconnecting",
    "_writeDisconnected",
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
    A connection to an etcd member, with C{TCP_NODELAY} set before connecting.
    """

    __slots__ = _CONNECTION_SLOTS + ("addr", "realAddress", "connector", "_requiresResolution")

    def __init__(self, *args, **kwargs):
        self._initSlots()
        super().__init__(*args, **kwargs)

    def _connectDone(self):
        super()._connectDone()
        self.connector = _CONNECTED

    def createInternetSocket(self):
        s = super().createInternetSocket()
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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


def writerFor(transport):
    """
    A C{write(data)} for C{transport} that accepts the memoryviews
    L{FastTransport} reads produce: the transport's own C{write} when it is
    one of ours, else one that copies to bytes first.
    """
    if getattr(transport, "fast", False):
        return transport.write
    write = transport.write
    return lambda data: write(bytes(data))
