"""
The write fast path.

C{transport.write} always queues the data and registers the socket for
writability, so every forwarded chunk costs an C{epoll_ctl} and an extra turn
of the reactor loop before it leaves. When nothing is queued we can send at
once and queue only what the kernel did not take; the transport's own buffer,
producer pausing (backpressure) and close handling stay in charge of the rest.
"""

from twisted.internet import tcp


def fastWriter(transport):
    """
    Return a C{write(data)} for C{transport} that sends at once when the
    transport has nothing queued, and otherwise falls back to
    C{transport.write}. Transports other than Twisted's TCP and UNIX stream
    connections get C{transport.write} itself.
    """
    if not isinstance(transport, tcp.Connection) or not hasattr(transport, "socket"):
        return transport.write
    send = transport.socket.send
    slowWrite = transport.write

    def write(data):
        if (
            transport._tempDataLen
            or transport.dataBuffer
            or transport.disconnecting
            or transport._writeDisconnecting
            or not transport.connected
        ):
            slowWrite(data)
            return
        try:
            sent = send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            # Let the transport meet the error in its own write path and
            # close the connection the usual way.
            slowWrite(data)
            return
        if sent < len(data):
            slowWrite(data[sent:])

    return write
