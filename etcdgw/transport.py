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

    fast = True

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


class GatewayServer(FastTransport, tcp.Server):
    """
    An accepted client connection.
    """


class GatewayClient(FastTransport, tcp.Client):
    """
    A connection to an etcd member, with C{TCP_NODELAY} set before connecting.
    """

    def createInternetSocket(self):
        s = super().createInternetSocket()
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s


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
