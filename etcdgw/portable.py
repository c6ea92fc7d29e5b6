"""
Live forwarded pairs, exported by one gateway process and adopted by its
successor (issue 14's takeover; the control socket, the wire and the
signals are L{etcdgw.takeover}'s).

A forwarded pair is two sockets, the bytes queued between them and a few
flags (DESIGN.md, "A connection is portable"). L{exportPairs} freezes every
pair of a L{etcdgw.proxy.GatewayFactory} at once (nothing is read from or
written to its sockets from then on, no timer acts on it) and describes
each as an L{ExportedPair}: a JSON-able record, the bytes queued in this
process each way, and C{dup()}s of its sockets. Then either:

  - L{ExportBatch.thaw}: the takeover failed; every pair resumes here
    exactly as it was (queued bytes still queued, in order).
  - L{ExportBatch.release}: the successor has them; this process forgets
    them without sending anything to either peer (no FIN, no reset, no
    queued byte) and closes its own descriptors.

The successor gives the records, bytes and descriptors to L{adoptPairs} and
L{AdoptedPairs.start}s them: transports (the fast path's or Twisted's, as
this process runs) on the same sockets, the queued bytes sent first,
half-closes as they were, joined and counted as if dialled here.

The order a takeover follows: export; send every record, its bytes and
its descriptors (the batch closes its duplicates in L{ExportBatch.release}
and L{ExportBatch.thaw}, so both come after the descriptors are sent); the
successor adopts (L{adoptPairs}: it owns the received descriptors from
then on) and either starts or aborts; the predecessor then releases or
thaws. The successor may start before the predecessor releases: the
predecessor's copies are frozen, and release sends nothing. A thaw after
the successor started is not safe: what the successor read and did not
forward is lost, and the queued bytes it already sent would be sent again
(a successor that dies before starting, or that aborts, is safe to thaw
behind).

Bytes queued in the old process, per direction (read out in the order they
would have been sent, see L{_queued}): what the source's splice pipe holds
(L{etcdgw.fast.transport.FastTransport._flushPipe} sends it before anything
Twisted queued, as C{_copyPipeOut} and C{doWrite} do), then Twisted's write
buffer, C{dataBuffer[offset:]} then C{_tempDataBuffer}
(C{abstract.FileDescriptor.doWrite}'s order).

Half-close: a socket's shutdown lives in the kernel (one socket, shared by
both processes), so the record says per side whether its write side was
shut down already (C{writeDone}: nothing more is ever written to it), or a
shutdown is pending behind queued bytes (C{writePending}: the successor
shuts it down once those are sent), whether its peer's end of stream was
read (C{readDone}: it is not read again), and whether a full close is
pending (C{closing}).

Not portable, left in the old process untouched and listed in
L{ExportBatch.skipped}: pairs whose member side is TLS originated here
(their TLS session lives in this process: C{portable = False} on the
transport, L{etcdgw.originate}), clients of TLS origination still being
dialled (they have read the client's first bytes), and anything this module
cannot describe (one line per batch, never one per pair). Not exported at
all: a pair already closing on one side (that side's connection lost, the
other flushing what it holds before it closes): the registry has let go of
it; it finishes in the old process while that runs.

Exporting reads Twisted's write buffer where the fast path does (the
gate's C{NEEDS} and its probe of the buffer), and releasing leans on one
more Twisted internal: C{tcp._SocketCloser._shouldShutdown} (Twisted calls
C{shutdown(SHUT_RDWR)} before closing a socket, which would send a FIN
although the successor holds the same socket). L{etcdgw.fast.gate} checks
both; L{exportPairs} refuses to run (L{NotPortable}) when either is wrong,
whatever transports the gateway runs on: the takeover then fails and the
old process keeps serving.
"""

import os
import socket
from typing import List, NamedTuple

from twisted.internet import error, tcp
from twisted.logger import Logger
from twisted.python.failure import Failure

from etcdgw.endpoint import Endpoint
from etcdgw.fast import join, serverTransport, settle, unsettleAll, writerFor
from etcdgw.proxy import UpstreamProtocol

__all__ = [
    "RECORD_VERSION",
    "AdoptedPairs",
    "ExportBatch",
    "ExportedPair",
    "NotPortable",
    "adoptPairs",
    "exportPairs",
]

log = Logger(namespace="etcdgw.portable")

#: The version of the records L{exportPairs} makes; L{adoptPairs} refuses
#: any other.
RECORD_VERSION = 1


class NotPortable(Exception):
    """
    Pairs cannot be exported (or adopted) by this process: the message says
    why.
    """


class ExportedPair(NamedTuple):
    """
    One pair, as exported.

    @ivar record: a JSON-able dict: C{v} (L{RECORD_VERSION}), C{clientOnly}
        (the member was still being dialled: the successor dials), C{endpoint}
        (C{host}, C{port}, C{priority}, C{weight}, C{tls}, C{serverName};
        L{None} when client-only), C{age} (seconds since the client was
        accepted), C{clientAddress} and C{memberAddress} (the peers'
        addresses as lists, or L{None}: the successor asks the sockets),
        C{toMember} and C{toClient} (the lengths of the queued
        bytes each way), C{client} and C{member} (each side's C{readDone},
        C{writeDone}, C{writePending}, C{closing}).
    @ivar data: the bytes queued toward the member, then those queued
        toward the client (C{toMember + toClient} bytes).
    @ivar fds: C{dup()}s of the client socket, then the member socket (one
        only when client-only); owned by the batch until released or thawed.
    """

    record: dict
    data: bytes
    fds: List[int]


def _queued(transport):
    """
    What Twisted's write buffer of C{transport} holds, in sending order
    (C{abstract.FileDescriptor.doWrite}: C{dataBuffer[offset:]}, then
    C{_tempDataBuffer}).
    """
    pending = bytes(transport.dataBuffer[transport.offset :])
    if transport._tempDataLen:
        pending += b"".join(bytes(chunk) for chunk in transport._tempDataBuffer)
        if len(pending) != len(transport.dataBuffer) - transport.offset + transport._tempDataLen:
            # Twisted keeps its queue elsewhere now: this pair stays here.
            raise NotPortable("Twisted's write buffer is not where it was")
    return pending


def _writeBufferProblem():
    """
    What the gate's probe of Twisted's write buffer finds wrong, or
    L{None}: the queued bytes are read where the fast path looks for them,
    whatever transports this process runs on (with the fast path off,
    because the gate refused this Twisted, a buffer that moved would be
    exported wrong).
    """
    from twisted.internet.abstract import FileDescriptor

    from etcdgw.fast.gate import _probeWriteBuffer
    from etcdgw.fast.transport import _maySendNow

    return _probeWriteBuffer(FileDescriptor, _maySendNow)


def _readPipe(source):
    """
    Read out what C{source}'s splice pipe holds (C{_pipeBytes} bytes; the
    pipe stays open, empty; C{_pipeBytes} is left as it was, for
    L{_refillPipe}).
    """
    pipe = source._pipe
    left = source._pipeBytes if pipe is not None else 0
    chunks = []
    while left:
        chunk = os.read(pipe[0], left)
        if not chunk:
            raise OSError("the splice pipe held fewer bytes than counted")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _refillPipe(source, data, target):
    """
    Put C{data} (read out by L{_readPipe}) back into C{source}'s empty pipe.
    Whatever the pipe does not take (never seen: it held them before) goes
    to the front of C{target}'s write buffer, ahead of what Twisted queued
    there, as C{FastTransport._copyPipeOut} does.
    """
    view = memoryview(data)
    written = 0
    try:
        while written < len(data):
            written += os.write(source._pipe[1], view[written:])
    except OSError:
        pass
    source._pipeBytes = written
    if written < len(data):
        target.dataBuffer = bytes(view[written:]) + bytes(target.dataBuffer[target.offset :])
        target.offset = 0
        if not written:
            # Nothing in the pipe: the source, which waits for the pipe to
            # drain, is resumed by its consumer's drained buffer instead.
            target.producerPaused = True


def _sides(protocol, transport):
    """
    The half-close flags of one side (see the module docstring).
    """
    return {
        "readDone": bool(protocol._readDone),
        "writeDone": bool(transport._writeDisconnected),
        "writePending": bool(transport._writeDisconnecting and not transport._writeDisconnected),
        "closing": bool(transport.disconnecting),
    }


def _peerAddress(transport):
    """
    The peer address of C{transport}, as C{tcp.Server}'s C{client} holds it
    (a list in the record: JSON has no tuples), without a system call; or
    L{None} (the successor asks the socket).
    """
    for name in ("client", "realAddress"):
        address = getattr(transport, name, None)
        if (
            isinstance(address, tuple)
            and len(address) in (2, 4)
            and isinstance(address[0], str)
            and isinstance(address[1], int)
        ):
            return list(address)
    return None


def _endpointRecord(endpoint):
    return {
        "host": endpoint.host,
        "port": endpoint.port,
        "priority": endpoint.priority,
        "weight": endpoint.weight,
        "tls": endpoint.tls,
        "serverName": endpoint.serverName,
    }


def _describe(transport):
    try:
        peer = transport.getPeer()
        return f"{peer.host}:{peer.port}"
    except Exception:
        return "?"


class _Frozen:
    """
    One frozen pair: what L{ExportBatch.thaw} needs to resume it, and
    L{ExportBatch.release} to forget it.
    """

    __slots__ = ("client", "upstream", "reading", "writing", "pipes", "swept", "redial")

    def __init__(self, client, upstream):
        self.client = client
        self.upstream = upstream
        self.reading = self.writing = ()
        #: (source, bytes read out of its pipe, target)
        self.pipes = []
        self.swept = []
        #: How to dial again on thaw: None (joined), "dialling", "waiting".
        self.redial = None

    def transports(self):
        if self.upstream is None:
            return (self.client.transport,)
        return (self.client.transport, self.upstream.transport)


class ExportBatch:
    """
    The pairs L{exportPairs} froze: handed over (L{release}) or resumed
    here (L{thaw}), once.

    @ivar pairs: the L{ExportedPair}s.
    @ivar skipped: the pairs left out and serving here, each a dict:
        C{client} (its address), C{endpoint} (its member, or L{None}),
        C{why}.
    @ivar queued: the bytes queued in this process, all pairs, both ways.
    """

    def __init__(self, factory):
        self.factory = factory
        self.pairs = []
        self.skipped = []
        self.queued = 0
        self._frozen = []
        self._done = None

    def _finish(self, how):
        if self._done is not None:
            raise RuntimeError(f"this batch was {self._done} already")
        self._done = how
        for pair in self.pairs:
            for fd in pair.fds:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def thaw(self):
        """
        The takeover failed: every pair resumes here as before it was
        frozen (its queued bytes still queued, in order; clients that were
        being dialled are dialled again); the descriptors' duplicates are
        closed. Nothing is sent to any peer by this call.
        """
        self._finish("thawed")
        factory = self.factory
        reactor = factory.reactor
        redial = []
        for frozen in self._frozen:
            for source, data, target in frozen.pipes:
                _refillPipe(source, data, target)
            if frozen.swept:
                from etcdgw.fast.transport import _PipeSweep

                sweep = _PipeSweep.of(reactor)
                for transport in frozen.swept:
                    if transport._pipe is not None:
                        sweep.add(transport)
            for transport in frozen.reading:
                transport.startReading()
            for transport in frozen.writing:
                transport.startWriting()
            if frozen.upstream is not None:
                factory.connections.register(frozen.client)
                settle(frozen.client.transport, frozen.upstream.transport)
            elif frozen.redial is not None:
                redial.append(frozen.client)
        for client in redial:
            if client.connected:
                client._dial()  # as its retry would have: may refuse it
        log.info(
            "takeover abandoned: {pairs} connections resumed here",
            pairs=len(self._frozen),
        )

    def release(self):
        """
        The takeover committed: forget every pair without sending anything
        to either peer (no FIN, no reset, no queued byte), close this
        process's sockets and the duplicates; the registry, the pool and
        the factory stop counting them. One log line.
        """
        self._finish("released")
        reason = Failure(error.ConnectionDone("handed over to the successor process"))
        for frozen in self._frozen:
            client, upstream = frozen.client, frozen.upstream
            # Unlinked first: neither protocol's connectionLost touches the
            # other side.
            client.peer = None
            client._write = None
            if upstream is not None:
                upstream.peer = None
                upstream._write = None
            transports = frozen.transports()
            for transport in transports:
                # Not stopProducing the peer (FileDescriptor.connectionLost
                # would: a close), no shutdown() before close (a FIN).
                transport.producer = None
                transport._shouldShutdown = False
            for transport in transports:
                try:
                    transport.connectionLost(reason)
                except Exception:
                    log.failure("releasing a handed-over connection failed")
        log.info(
            "handed over {pairs} connections ({queued} bytes queued) to the successor",
            pairs=len(self._frozen),
            queued=self.queued,
        )


def exportPairs(factory):
    """
    Freeze and describe every pair of C{factory} (a
    L{etcdgw.proxy.GatewayFactory}): each joined pair of its registry, and
    each client whose member is still being dialled (client-only: the dial
    is cancelled; the successor dials, or L{ExportBatch.thaw} dials again).
    From now on nothing is read from or written to their sockets here.

    @rtype: L{ExportBatch}
    @raise NotPortable: this process cannot release what it exports (a
        Twisted without C{_SocketCloser._shouldShutdown}).
    """
    if not hasattr(tcp._SocketCloser, "_shouldShutdown"):
        raise NotPortable(
            "this Twisted has no tcp._SocketCloser._shouldShutdown: releasing "
            "a connection would send a FIN"
        )
    wrong = _writeBufferProblem()
    if wrong:
        raise NotPortable(f"Twisted's write buffer is not as expected: {wrong}")
    batch = ExportBatch(factory)
    reactor = factory.reactor
    unsettleAll(reactor)  # pairs in io_uring come back to epoll, with what they had in flight
    readers = set(reactor.getReaders())
    writers = set(reactor.getWriters())
    for client in factory.connections.pairs():
        upstream = client.peer
        member = upstream.transport if upstream is not None else None
        if member is None or not getattr(member, "portable", True):
            batch.skipped.append(
                {
                    "client": _describe(client.transport),
                    "endpoint": str(client.state.endpoint),
                    "why": "TLS origination: its TLS session lives in this process",
                }
            )
            continue
        try:
            _exportJoined(batch, client, upstream, readers, writers)
        except Exception as e:
            batch.skipped.append(
                {
                    "client": _describe(client.transport),
                    "endpoint": str(client.state.endpoint),
                    "why": f"{type(e).__name__}: {e}",
                }
            )
    for client in list(factory.clients):
        if client.peer is not None or (client._dialing is None and client._retry is None):
            continue  # joined (above), or closing
        if not client.connected:
            continue  # closing
        if not client.portable:
            batch.skipped.append(
                {
                    "client": _describe(client.transport),
                    "endpoint": None,
                    "why": "TLS origination: dialling, the client's first bytes read here",
                }
            )
            continue
        _exportDialling(batch, client, readers, writers)
    if batch.pairs or batch.skipped:
        log.info(
            "exporting {pairs} connections ({clientOnly} still dialling; {queued} bytes "
            "queued); {skipped} left here",
            pairs=len(batch.pairs),
            clientOnly=sum(1 for p in batch.pairs if p.record["clientOnly"]),
            queued=batch.queued,
            skipped=len(batch.skipped),
            why=sorted({s["why"] for s in batch.skipped}),
        )
    return batch


def _freeze(frozen, readers, writers):
    transports = frozen.transports()
    frozen.reading = [t for t in transports if t in readers]
    frozen.writing = [t for t in transports if t in writers]
    for transport in transports:
        transport.stopReading()
    for transport in frozen.writing:  # most idle pairs write nothing
        transport.stopWriting()


def _exportJoined(batch, client, upstream, readers, writers):
    ct, mt = client.transport, upstream.transport
    frozen = _Frozen(client, upstream)
    _freeze(frozen, readers, writers)
    fds = []
    try:
        toMember = toClient = b""
        sweep = None
        for source, target in ((ct, mt), (mt, ct)):
            if getattr(source, "_pipe", None) is not None:
                from etcdgw.fast.transport import _PipeSweep

                sweep = _PipeSweep.of(source.reactor)
                if source in sweep.seen:
                    sweep.remove(source)
                    frozen.swept.append(source)
                if source._pipeBytes:
                    piped = _readPipe(source)
                    frozen.pipes.append((source, piped, target))
                    if source is ct:
                        toMember = piped
                    else:
                        toClient = piped
        toMember += _queued(mt)
        toClient += _queued(ct)
        fds.append(os.dup(ct.socket.fileno()))
        fds.append(os.dup(mt.socket.fileno()))
    except BaseException:
        for fd in fds:
            os.close(fd)
        _unfreeze(frozen, client.factory.reactor)
        raise
    client.factory.connections.unregister(client)
    record = {
        "v": RECORD_VERSION,
        "clientOnly": False,
        "endpoint": _endpointRecord(client.state.endpoint),
        "age": max(0.0, client.factory.reactor.seconds() - client._accepted),
        "clientAddress": _peerAddress(ct),
        "memberAddress": _peerAddress(mt),
        "toMember": len(toMember),
        "toClient": len(toClient),
        "client": _sides(client, ct),
        "member": _sides(upstream, mt),
    }
    batch._frozen.append(frozen)
    batch.pairs.append(ExportedPair(record, toMember + toClient, fds))
    batch.queued += len(toMember) + len(toClient)


def _unfreeze(frozen, reactor):
    """
    Undo L{_freeze} for a pair whose export failed half-way.
    """
    for source, data, target in frozen.pipes:
        _refillPipe(source, data, target)
    if frozen.swept:
        from etcdgw.fast.transport import _PipeSweep

        for transport in frozen.swept:
            _PipeSweep.of(reactor).add(transport)
    for transport in frozen.reading:
        transport.startReading()
    for transport in frozen.writing:
        transport.startWriting()


def _exportDialling(batch, client, readers, writers):
    frozen = _Frozen(client, None)
    _freeze(frozen, readers, writers)
    fds = [os.dup(client.transport.socket.fileno())]
    factory = client.factory
    if client._dialing is not None:
        dialling, client._dialing = client._dialing, None
        dialling.cancel()
        if client._tried:
            client._tried.pop()  # dialled again on thaw
        frozen.redial = "dialling"
    if client._retry is not None:
        if client._retry.active():
            client._retry.cancel()
        client._retry = None
        factory.fed(client)
        frozen.redial = "waiting"
    record = {
        "v": RECORD_VERSION,
        "clientOnly": True,
        "endpoint": None,
        "age": max(0.0, factory.reactor.seconds() - client._accepted),
        "clientAddress": _peerAddress(client.transport),
        "memberAddress": None,
        "toMember": 0,
        "toClient": 0,
        "client": _sides(client, client.transport),
        "member": None,
    }
    batch._frozen.append(frozen)
    batch.pairs.append(ExportedPair(record, b"", fds))


# Adoption


class _AdoptedPort:
    """
    Stands in for the listening port of an adopted connection (Twisted's
    C{tcp.Server} names its port in its repr).
    """

    _realPortNumber = "adopted"

    @staticmethod
    def connectionClosed():
        pass


_ADOPTED = _AdoptedPort()


class AdoptedPairs:
    """
    Pairs given to this process by its predecessor (L{adoptPairs}): started
    (L{start}) or given up (L{abort}), once. Until then this object owns
    their descriptors.

    @ivar adopted: pairs started (joined or client-only), after L{start}.
    @ivar failed: pairs that could not be started (their sockets closed).
    @ivar queued: the bytes queued, all pairs, both ways.
    """

    def __init__(self, factory, pairs, listener=None):
        self.factory = factory
        self.listener = listener
        self._pairs = pairs
        self._done = None
        self.adopted = 0
        self.failed = 0
        self.queued = sum(len(data) for _, data, _ in pairs)

    def _take(self, how):
        if self._done is not None:
            raise RuntimeError(f"these pairs were {self._done} already")
        self._done = how
        pairs, self._pairs = self._pairs, None
        return pairs

    def abort(self):
        """
        The takeover is abandoned before L{start}: close every descriptor,
        sending nothing (the predecessor still serves these connections).
        """
        for _, _, fds in self._take("aborted"):
            closeDescriptors(fds)

    def start(self):
        """
        Serve every pair here: transports on their sockets (the fast
        path's or Twisted's, as this process runs), the bytes queued in the
        predecessor sent first, half-closes restored, joined, counted by
        the pool and the registry like pairs dialled here, and reading
        resumed. A client-only pair is dialled now. A pair whose member is
        no longer in the pool keeps working; the registry treats it as
        held by a removed member. One log line.

        @return: C{(adopted, failed)} counts.
        """
        pairs = self._take("started")
        factory = self.factory
        reactor = factory.reactor
        states = {}
        serverClass = serverTransport()
        clientClass = serverClass
        if self.listener is not None:
            from etcdgw.listen import _counted

            clientClass = _counted(serverClass)
        now = reactor.seconds()
        failures = []
        dial = []
        for record, data, fds in pairs:
            sockets = []
            made = []
            try:
                for fd in fds:
                    sockets.append(socket.socket(fileno=fd))
                fds = ()  # the sockets own them (Twisted makes them non-blocking)
                if record["clientOnly"]:
                    client = self._client(sockets[0], clientClass, record, now, made)
                    dial.append(client)
                else:
                    self._joined(
                        sockets, data, record, serverClass, clientClass, states, now, made
                    )
                self.adopted += 1
            except Exception as e:
                # Nothing was registered (that comes last); the transports
                # made leave the reactor, and the sockets are closed without
                # a shutdown (no FIN while the predecessor still holds them).
                self.failed += 1
                failures.append(f"{type(e).__name__}: {e}")
                for transport in made:
                    transport.stopReading()
                    transport.stopWriting()
                for skt in sockets:
                    skt.close()
                closeDescriptors(fds)
        for client in dial:
            client._tried = []
            try:
                client._dial()
            except Exception:
                log.failure("dialling for an adopted client failed; closing that client only")
                client.transport.abortConnection()
        if failures:
            log.error(
                "{failed} adopted connections could not be started, closed: {why}",
                failed=self.failed,
                why=sorted(set(failures))[:5],
            )
        log.info(
            "took over {adopted} connections ({clientOnly} dialled here; {queued} bytes "
            "queued)",
            adopted=self.adopted,
            clientOnly=len(dial),
            queued=self.queued,
            failed=self.failed,
        )
        return self.adopted, self.failed

    def _transport(self, cls, server, skt, protocol, peer=None):
        """
        A transport of class C{cls} (a C{tcp.Server} or the fast path's
        L{etcdgw.fast.transport.GatewayServer}, either side: both take an
        established socket) for C{protocol} on C{skt}, whose peer address
        is C{peer} (from the record; asked of the socket when missing); a
        client on a unix socket gets Twisted's C{unix.Server}.
        """
        if skt.family == socket.AF_UNIX:
            from twisted.internet import unix

            cls, server = unix.Server, _ADOPTED
            peer = None
        if not peer:
            peer = skt.getpeername()
        return cls(skt, protocol, tuple(peer), server, 0, self.factory.reactor)

    def _client(self, skt, clientClass, record, now, made):
        """
        A client-only pair: its client, paused, ready to dial.
        """
        factory = self.factory
        client = factory.buildProtocol(None)
        transport = self._transport(
            clientClass, self.listener or _ADOPTED, skt, client, record.get("clientAddress")
        )
        made.append(transport)
        transport.stopReading()
        client.connected = 1
        client.transport = transport
        client._accepted = now - record["age"]
        factory.clients.add(client)
        return client

    def _joined(self, sockets, data, record, serverClass, clientClass, states, now, made):
        """
        A joined pair: its two transports on C{sockets}, joined, the bytes
        queued in the predecessor queued first, half-closes restored; then
        registered (last: nothing before it needs undoing should this
        raise).
        """
        factory = self.factory
        pool = factory.pool
        where = record["endpoint"]
        key = (where["host"], where["port"])
        state = states.get(key)
        if state is None:
            endpoint = Endpoint(
                where["host"], where["port"], where["priority"], where["weight"], where["tls"]
            )
            state = states[key] = pool.heldState(endpoint)
        toMember = data[: record["toMember"]]
        toClient = data[record["toMember"] : record["toMember"] + record["toClient"]]
        if len(toMember) + len(toClient) != len(data):
            raise ValueError("the queued bytes do not match the record's lengths")
        client = factory.buildProtocol(None)
        ct = self._transport(
            clientClass, self.listener or _ADOPTED, sockets[0], client, record.get("clientAddress")
        )
        made.append(ct)
        upstream = UpstreamProtocol(client)
        mt = self._transport(
            serverClass, _ADOPTED, sockets[1], upstream, record.get("memberAddress")
        )
        made.append(mt)
        client.connected = upstream.connected = 1
        client.transport = ct
        upstream.transport = mt
        client._accepted = now - record["age"]
        _restore(client, ct, record["client"])
        _restore(upstream, mt, record["member"])
        client._write = writerFor(mt)
        upstream._write = writerFor(ct)
        join(ct, mt, state.toUpstream, state.fromUpstream)
        ct.registerProducer(mt, True)
        mt.registerProducer(ct, True)
        # The predecessor's queued bytes first: reading starts only once
        # this returns to the reactor, and what it reads goes behind them.
        if toMember:
            tcp.Connection.write(mt, toMember)
        if toClient:
            tcp.Connection.write(ct, toClient)
        # Registered as ClientProtocol._connected does.
        factory.clients.add(client)
        upstream.state = client.state = state
        pool.connectionOpened(state)
        upstream.peer = client
        client.peer = upstream
        factory.connections.register(client)
        for transport, side, peer in ((ct, record["client"], mt), (mt, record["member"], ct)):
            if side["writePending"]:
                transport.loseWriteConnection()
            if side["closing"]:
                transport.loseConnection()
            if side["readDone"] or peer.producerPaused:
                transport.stopReading()
        settle(ct, mt)


def _restore(protocol, transport, side):
    """
    Give a new transport, and its protocol, the half-close state of
    C{side} (a record's C{client} or C{member}).
    """
    if side["readDone"]:
        protocol._readDone = True
        if getattr(transport, "fast", False):
            transport._eof = True
    if side["writeDone"]:
        protocol._writeDone = True
        transport._writeDisconnecting = True
        transport._writeDisconnected = True


def closeDescriptors(fds):
    """
    Close each of C{fds} (descriptor numbers), whatever the others do.
    """
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def adoptPairs(factory, pairs, listener=None):
    """
    Take the pairs a predecessor exported (L{exportPairs}), for
    C{factory} (this process's L{etcdgw.proxy.GatewayFactory}); nothing is
    started until L{AdoptedPairs.start}.

    @param pairs: C{[(record, data, fds)]}, as L{ExportedPair}s hold them;
        their descriptors are this call's from now on (closed on any error).
    @param listener: the port adopted client connections count against
        (its connection cap), if any.
    @rtype: L{AdoptedPairs}
    @raise NotPortable: a record this process does not understand (all
        descriptors are closed).
    """
    pairs = [(record, data, list(fds)) for record, data, fds in pairs]
    try:
        for record, data, fds in pairs:
            if record.get("v") != RECORD_VERSION:
                raise NotPortable(f"record version {record.get('v')!r}, not {RECORD_VERSION}")
            if len(fds) != (1 if record["clientOnly"] else 2):
                raise NotPortable(f"{len(fds)} descriptors for one pair")
            if len(data) != record["toMember"] + record["toClient"]:
                raise NotPortable("the queued bytes do not match the record's lengths")
    except BaseException:
        for _, _, fds in pairs:
            closeDescriptors(fds)
        raise
    return AdoptedPairs(factory, pairs, listener)
