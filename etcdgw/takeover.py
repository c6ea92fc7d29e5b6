"""
Live takeover: a successor gateway process takes the listening sockets and
every live forwarded connection over from the running one, so that a
restart or an upgrade cuts nothing.

Two ways to start one:

  - SIGUSR2 to the running gateway: it starts a new copy of itself (the
    same twistd command line and environment, the code now installed),
    passing one end of a socket pair as descriptor 3, named by
    C{$ETCDGW_TAKEOVER_FD} (L{TakeoverService.spawnSuccessor});
  - C{--control-socket=PATH} on the running gateway, and a new gateway
    started by hand, with its own flags, plus C{--takeover=PATH}.

The protocol, over that unix stream socket, both sides on their reactor
(nothing blocks): frames of a JSON header and payload bytes
(L{encodeFrame}), descriptors passed with C{SCM_RIGHTS} with each frame's
first bytes, at most L{MAX_FDS_PER_FRAME} in one frame (the kernel takes
253 in one message):

    successor                                 running gateway (old)
    hello {version, pid, controlSocket}  -->
                                         <--  refuse {reason}   (another version; it keeps serving)
                                              pauses accepting; freezes and exports every pair
                                         <--  hello {version, pid}
                                         <--  listeners {[flag, address, family]} + their sockets
                                         <--  state {members: up/down, health, their counters}
                                         <--  pairs {count} + [record, bytes, fds] (pickled,
                                              plain data) + queued bytes + sockets (repeated)
                                         <--  end {pairs, bytes, frozenAt}
    adopts the pairs, the listeners (paused)
    ready                                -->
                                         <--  commit
                                              forgets the pairs, stops its ports (the queues stay:
                                              the successor holds the sockets)
    starts the pairs, accepts; exits on failure with status 1;
    the old one exits 0 once its own shutdown is done.

Until C{commit}, any failure or timeout (L{TIMEOUT}) on either side is
safe: the old process thaws its pairs and accepts again (one log line
saying why), the successor drops what it adopted without sending anything
and exits with status 1 (one line). New clients wait in the kernel's
listen queue meanwhile: none is refused. After C{commit} there is no way
back: the successor owns everything.

Member state is carried over (the C{state} frame): which members are up
or down, healthy or not, silent, their cluster IDs and the rise/fall
counters of their checks (L{etcdgw.monitor.Monitor.exportState}), for the
members both processes know; a member only the successor knows starts as
a new one.

With C{--workers}, the successor supervisor first sends C{prepare}; the
old one answers C{workers} with its workers' control sockets (each worker
listens on its own, abstract, L{workerControl}), nothing frozen yet. The
successor starts its workers, each a successor of one old worker that stops
after adopting ("holding", on its standard output, which the supervisor
reads); once all hold, it says hello and the exchange above follows. At the
commit it sends each of its workers SIGUSR1, and each answers ready to its
old worker, which commits and exits. The old supervisor leaves its workers
alone once it has committed (they exit by themselves), and a worker
outlives its supervisor while it hands over.

The pairs themselves (what a pair is on the wire, freezing, adopting) are
L{etcdgw.portable}'s business.
"""

import collections
import errno
import gc
import io
import json
import os
import pickle
import signal
import socket
import stat
import struct
import sys

from twisted.application.service import Service
from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from etcdgw.portable import closeDescriptors

#: The protocol's version: both sides must speak the same one.
PROTOCOL_VERSION = 1
#: The environment variable naming the inherited descriptor of a
#: successor started by SIGUSR2.
ENVIRONMENT_FD = "ETCDGW_TAKEOVER_FD"
#: The environment of a worker started by a successor supervisor to take
#: over from a worker of the old one (--workers): the old worker's control
#: socket, and "hold" (adopt, then wait for SIGUSR1 before answering ready).
ENVIRONMENT_FROM = "ETCDGW_TAKEOVER_FROM"
ENVIRONMENT_HOLD = "ETCDGW_TAKEOVER_HOLD"
#: What a holding worker writes (its supervisor reads its output).
HOLDING = "takeover: holding"
#: The descriptor number the successor gets its end of the socket pair as.
CHILD_FD = 3
#: At most this many descriptors in one frame (Linux takes 253, SCM_MAX_FD).
MAX_FDS_PER_FRAME = 250
#: A frame of pairs holds about this many queued bytes at most (one pair's
#: may make it larger).
MAX_PAYLOAD_PER_FRAME = 4 * 1024 * 1024
#: Frames larger than these are refused (a broken or hostile peer).
MAX_HEADER = 64 * 1024 * 1024
MAX_PAYLOAD = 1024 * 1024 * 1024
#: Bytes asked of one receive.
RECEIVE_SIZE = 1024 * 1024
#: Seconds a takeover may take, from the successor's hello to the commit.
TIMEOUT = 30.0
#: Seconds the successor may take to connect to a control socket.
CONNECT_TIMEOUT = 5.0

_PREFIX = struct.Struct("!II")


class TakeoverError(Exception):
    """
    A takeover cannot go on; the message says why, in one line.
    """


def encodeFrame(header, payload=b""):
    """
    One frame: the lengths of the JSON header and of the payload (two
    32-bit numbers, network order), the header, the payload.
    """
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return _PREFIX.pack(len(encoded), len(payload)) + encoded + bytes(payload)


class FrameReader:
    """
    Cuts the bytes (and descriptors) read from the channel into frames.
    Each frame's header says how many descriptors go with it (C{fds}):
    they were sent with its first bytes, so they have arrived, in order,
    by the time the frame is whole.
    """

    def __init__(self):
        self._buffer = bytearray()
        self._fds = collections.deque()

    def feed(self, data, fds=()):
        """
        @return: the frames now whole, each C{(header, payload, fds)}.
        @raise TakeoverError: on a malformed frame.
        """
        self._fds.extend(fds)
        self._buffer += data
        frames = []
        buffer = self._buffer
        start = 0
        while len(buffer) - start >= _PREFIX.size:
            headerLength, payloadLength = _PREFIX.unpack_from(buffer, start)
            if headerLength > MAX_HEADER or payloadLength > MAX_PAYLOAD:
                raise TakeoverError(
                    f"a frame of {headerLength}+{payloadLength} bytes: not the takeover protocol"
                )
            end = start + _PREFIX.size + headerLength + payloadLength
            if len(buffer) < end:
                break
            body = start + _PREFIX.size
            try:
                header = json.loads(bytes(buffer[body : body + headerLength]))
            except ValueError as e:
                raise TakeoverError(f"a frame's header is not JSON: {e}") from None
            if not isinstance(header, dict):
                raise TakeoverError("a frame's header is not a JSON object")
            count = header.get("fds", 0)
            if not isinstance(count, int) or count < 0 or count > len(self._fds):
                raise TakeoverError(
                    f"a frame names {count!r} descriptors, {len(self._fds)} arrived"
                )
            fds = [self._fds.popleft() for _ in range(count)]
            frames.append((header, bytes(buffer[body + headerLength : end]), fds))
            start = end
        if start:
            del buffer[:start]
        return frames

    def close(self):
        """
        Close the descriptors received and not yet given out in a frame.
        """
        fds, self._fds = list(self._fds), collections.deque()
        closeDescriptors(fds)


#: The channel's socket buffers: a takeover of thousands of pairs goes in
#: a few round trips, not hundreds (the pause grows with each).
CHANNEL_BUFFER = 4 * 1024 * 1024


def _largeBuffers(sock):
    """
    Ask for L{CHANNEL_BUFFER} each way; above C{net.core.wmem_max} only
    with C{CAP_NET_ADMIN} (C{SO_SNDBUFFORCE}); else what the kernel allows.
    """
    for force, plain in (
        (getattr(socket, "SO_SNDBUFFORCE", None), socket.SO_SNDBUF),
        (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF),
    ):
        for option in (force, plain):
            if option is None:
                continue
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, CHANNEL_BUFFER)
                break
            except OSError:
                continue


class SocketChannel:
    """
    The takeover's channel: a non-blocking unix stream socket on the
    reactor (an C{IReadWriteDescriptor}), carrying frames and descriptors.

    @param receiver: has C{frameReceived(header, payload, fds)} (the
        descriptors are its own from then on) and C{channelLost(why)}
        (once, unless the channel was closed by L{abort} or
        L{loseConnection}).
    """

    def __init__(self, reactor, sock, receiver):
        sock.setblocking(False)
        _largeBuffers(sock)
        self.reactor = reactor
        self.socket = sock
        self.receiver = receiver
        self.closed = False
        self._reader = FrameReader()
        #: [data (memoryview), descriptors, descriptors to close once sent]
        self._queue = collections.deque()
        self._writing = False
        self._closing = False
        reactor.addReader(self)

    def fileno(self):
        return -1 if self.closed else self.socket.fileno()

    def logPrefix(self):
        return "takeover"

    def send(self, header, payload=b"", fds=(), owned=False):
        """
        Send one frame with C{fds}. With C{owned}, the channel closes those
        descriptors once sent (or dropped); else they stay the caller's
        (and must stay open until the frame is sent or the channel closed).
        """
        if self.closed or self._closing:
            if owned:
                closeDescriptors(fds)
            return
        header = dict(header, fds=len(fds))
        data = memoryview(encodeFrame(header, payload))
        self._queue.append([data, list(fds), list(fds) if owned else []])
        self.doWrite()

    def doWrite(self):
        queue = self._queue
        while queue and not self.closed:
            item = queue[0]
            data, fds, owned = item
            try:
                if fds:
                    sent = socket.send_fds(self.socket, [data], fds)
                else:
                    sent = self.socket.send(data)
            except (BlockingIOError, InterruptedError):
                if not self._writing:
                    self._writing = True
                    self.reactor.addWriter(self)
                return None
            except OSError as e:
                self._lost(f"cannot send: {e.strerror or e}")
                return None
            item[1] = []  # the descriptors went with the first bytes
            if owned:
                item[2] = []
                closeDescriptors(owned)
            if sent < len(data):
                item[0] = data[sent:]
                continue
            queue.popleft()
        if self._writing and not self.closed:
            self._writing = False
            self.reactor.removeWriter(self)
        if self._closing and not queue:
            self._close()
        return None

    def doRead(self):
        if self.closed:
            return None
        try:
            data, fds, flags, _ = socket.recv_fds(
                self.socket, RECEIVE_SIZE, MAX_FDS_PER_FRAME + 3, socket.MSG_CMSG_CLOEXEC
            )
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as e:
            self._lost(f"cannot receive: {e.strerror or e}")
            return None
        if flags & socket.MSG_CTRUNC:
            closeDescriptors(fds)
            self._lost(
                "descriptors were cut off in transit (MSG_CTRUNC: the open-files limit?)"
            )
            return None
        if not data and not fds:
            self._lost("the other side closed the channel")
            return None
        try:
            frames = self._reader.feed(data, fds)
        except TakeoverError as e:
            self._lost(str(e))
            return None
        for header, payload, frameFds in frames:
            if self.closed:
                closeDescriptors(frameFds)
                continue
            self.receiver.frameReceived(header, payload, frameFds)
        return None

    def connectionLost(self, reason):
        # Only if the reactor drops us (doRead/doWrite never fail it).
        self._lost(f"lost: {reason.getErrorMessage()}")

    def _lost(self, why):
        if self.closed:
            return
        self._close()
        self.receiver.channelLost(why)

    def loseConnection(self):
        """
        Close once everything queued is sent; the receiver is not told.
        """
        self._closing = True
        if not self._queue:
            self._close()

    def abort(self):
        """
        Close now, dropping what is queued; the receiver is not told.
        """
        self._close()

    def _close(self):
        if self.closed:
            return
        self.reactor.removeReader(self)
        if self._writing:
            self.reactor.removeWriter(self)
            self._writing = False
        self.closed = True
        for _, _, owned in self._queue:
            closeDescriptors(owned)
        self._queue.clear()
        self._reader.close()
        self.socket.close()


class _PlainData(pickle.Unpickler):
    """
    Unpickles plain data only (dicts, lists, tuples, strings, numbers,
    booleans, None): any class or function a pickle names is refused, so
    nothing of the peer's runs here.
    """

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"not plain data: {module}.{name}")


def chunkPairs(pairs, maxFds=MAX_FDS_PER_FRAME, maxPayload=MAX_PAYLOAD_PER_FRAME):
    """
    Cut exported pairs into frames: each C{(header, payload, fds)} with at
    most C{maxFds} descriptors and about C{maxPayload} queued bytes.

    The payload is the pairs' records and lengths, pickled (plain data
    only: L{_PlainData}), then their queued bytes. Not in the JSON header:
    JSON took 25-30 ms of the pause at 2,000 pairs (encoding here, decoding
    there, both while the pairs are frozen); pickle takes 3-5.

    @param pairs: L{etcdgw.portable} exported pairs (C{record}, C{data},
        C{fds}).
    """
    frames = []
    items, payload, fds = [], [], []
    size = 0

    def cut():
        records = pickle.dumps(items, protocol=pickle.HIGHEST_PROTOCOL)
        header = {"type": "pairs", "count": len(items), "records": len(records)}
        frames.append((header, records + b"".join(payload), fds))

    for pair in pairs:
        if items and (len(fds) + len(pair.fds) > maxFds or size + len(pair.data) > maxPayload):
            cut()
            items, payload, fds, size = [], [], [], 0
        items.append((pair.record, len(pair.data), len(pair.fds)))
        payload.append(pair.data)
        fds.extend(pair.fds)
        size += len(pair.data)
    if items:
        cut()
    return frames


def splitPairs(header, payload, fds):
    """
    The pairs of one C{pairs} frame: C{[(record, data, fds)]}.

    @raise TakeoverError: when the frame's counts do not add up.
    """
    pairs = []
    try:
        length = int(header["records"])
        if not 0 < length <= len(payload):
            raise ValueError("the records' length is wrong")
        items = _PlainData(io.BytesIO(payload[:length])).load()
        if not isinstance(items, list) or len(items) != header["count"]:
            raise ValueError("not the count of pairs announced")
        offset, used = length, 0
        for record, size, count in items:
            if not isinstance(record, dict):
                raise ValueError("a record is not a mapping")
            if size < 0 or count < 1 or offset + size > len(payload) or used + count > len(fds):
                raise ValueError("counts do not add up")
            pairs.append((record, payload[offset : offset + size], fds[used : used + count]))
            offset += size
            used += count
    except Exception as e:
        raise TakeoverError(f"a malformed pairs frame: {e}") from None
    if offset != len(payload) or used != len(fds):
        raise TakeoverError("a malformed pairs frame: bytes or descriptors left over")
    return pairs


def _portFamily(port):
    try:
        return int(port.socket.family)
    except (AttributeError, OSError):
        return int(socket.AF_INET)


def socketAddress(path):
    """
    The address to bind or connect for a control socket C{path}: a leading
    C{@} names the abstract namespace (a worker's).
    """
    return "\0" + path[1:] if path.startswith("@") else path


def workerControl(pid):
    """
    The control socket of worker C{pid} (abstract: nothing to clean up).
    """
    return f"@etcd-gateway-takeover-{pid}"


def _samePeer(sock):
    """
    Whether the process at the other end of C{sock} runs as this one's
    user (or root): only it may take this gateway over.
    """
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return False
    _, uid, _ = struct.unpack("3i", creds)
    return uid in (os.geteuid(), 0)


def _holdCollector():
    """
    Hold Python's cyclic garbage collector while the pairs are frozen: a
    full collection over thousands of pairs' objects (tens of
    milliseconds) would lengthen the pause. (Measured at 2,000 pairs:
    a quarter of the pause.)

    @return: what lets it run again (as it was before).
    """
    if not gc.isenabled():
        return lambda: None
    gc.disable()
    return gc.enable


class Handover:
    """
    The running gateway's side of one takeover: one successor on one
    channel.

    @param gateway: the L{etcdgw.gateway.Gateway} handing over (its
        C{factory}, C{monitor} and C{allListeners} are read).
    @param sock: the connected unix stream socket to the successor.
    @param exportPairs: L{etcdgw.portable.exportPairs}.
    @param committed: called with this object once the successor owns
        everything (the caller stops the process).
    @param failed: called with the reason once the takeover failed and
        everything runs here again.
    """

    log = Logger()

    def __init__(self, gateway, sock, exportPairs, committed, failed, timeout=TIMEOUT):
        self.gateway = gateway
        self.reactor = gateway.reactor
        self.exportPairs = exportPairs
        self._committed = committed
        self._failed = failed
        self.phase = "hello"
        self.successor = None
        self.successorControl = None
        self.batch = None
        self._prepared = False
        self.frozenAt = self.exportedAt = None
        self.handedPairs = 0
        self.handedBytes = 0
        self.skipped = 0
        self._paused = []
        self._releaseCollector = lambda: None
        self.channel = SocketChannel(self.reactor, sock, self)
        self._timer = self.reactor.callLater(timeout, self._timedOut, timeout)

    # From the channel

    def frameReceived(self, header, payload, fds):
        closeDescriptors(fds)  # the successor sends none
        kind = header.get("type")
        try:
            if kind == "prepare" and self.phase == "hello":
                self._prepare(header)
            elif kind == "hello" and self.phase == "hello":
                self._hello(header)
            elif kind == "ready" and self.phase == "sent":
                self._commit()
            elif kind == "abort":
                self._fail(f"the successor gave up: {header.get('reason', 'no reason given')}")
            else:
                self._fail(f"unexpected message {kind!r} from the successor while {self.phase}")
        except Exception as e:
            self.log.failure("takeover: error handing over")
            self._fail(f"error handing over: {e}")

    def channelLost(self, why):
        if self.phase in ("committed", "failed"):
            return
        self._fail(f"the successor went away before the commit ({why})")

    # Steps

    def _prepare(self, header):
        """
        A successor supervisor (C{--workers}) asks for the workers' control
        sockets first, before anything is frozen here: its own workers take
        the old ones over (up to holding) before it says hello.
        """
        if header.get("version") != PROTOCOL_VERSION:
            self._hello(header)  # refused there, with the reason
            return
        self.successor = header.get("pid")
        self._prepared = True
        workers = self.gateway.workers
        self.channel.send(
            {
                "type": "workers",
                "workers": workers.takeoverAddresses() if workers is not None else [],
            }
        )

    def _hello(self, header):
        self.successor = header.get("pid")
        control = header.get("controlSocket")
        self.successorControl = control if isinstance(control, str) else None
        version = header.get("version")
        reason = None
        if version != PROTOCOL_VERSION:
            reason = (
                f"the successor (pid {self.successor}) speaks takeover protocol version "
                f"{version}, this gateway speaks {PROTOCOL_VERSION}"
            )
        elif (
            not self._prepared
            and self.gateway.workers is not None
            and self.gateway.workers.takeoverAddresses()
        ):
            reason = (
                f"the successor (pid {self.successor}) runs no --workers: this gateway's "
                "workers would have nobody to hand their connections to"
            )
        if reason is not None:
            self.channel.send({"type": "refuse", "reason": reason})
            self.channel.loseConnection()
            self._end(reason)
            return
        self.phase = "sending"
        self._releaseCollector = _holdCollector()
        self.frozenAt = self.reactor.seconds()
        # New clients wait in the listen queues from here on.
        for listener in self.gateway.allListeners:
            port = listener.port
            if port is not None:
                port.pauseForTakeover()
                self._paused.append((listener, port))
        self.batch = batch = self.exportPairs(self.gateway.factory)
        self.exportedAt = self.reactor.seconds()
        self.channel.send({"type": "hello", "version": PROTOCOL_VERSION, "pid": os.getpid()})
        listeners, fds = [], []
        for listener, port in self._paused:
            fds.append(os.dup(port.fileno()))
            listeners.append(
                {"flag": listener.flag, "address": listener.address.text, "family": _portFamily(port)}
            )
        self.channel.send({"type": "listeners", "listeners": listeners}, fds=fds, owned=True)
        self.channel.send({"type": "state", "state": self.gateway.monitor.exportState()})
        for header, payload, pairFds in chunkPairs(batch.pairs):
            self.channel.send(header, payload, pairFds)
        self.handedPairs = len(batch.pairs)
        self.handedBytes = sum(len(p.data) for p in batch.pairs)
        self.skipped = len(batch.skipped)
        self.channel.send(
            {
                "type": "end",
                "pairs": self.handedPairs,
                "bytes": self.handedBytes,
                "listeners": len(listeners),
                "frozenAt": self.frozenAt,
                "exportedAt": self.exportedAt,
            }
        )
        self.phase = "sent"

    def _commit(self):
        self.phase = "committed"
        self._cancelTimer()
        # No way back from here: the successor owns every pair. It is told
        # first (the pairs stay frozen here meanwhile); then this process
        # forgets them.
        self.channel.send({"type": "commit"})
        self.channel.loseConnection()
        try:
            self.batch.release()
        except Exception:
            # No way back after the commit: this process stops all the same.
            self.log.failure("takeover: error releasing the connections handed over")
        for listener, port in self._paused:
            port.handOver()
        if self.gateway.workers is not None:
            # Its workers hand over to the successor's, then exit: not
            # stopped, not restarted from here.
            self.gateway.workers.handOver()
        self._releaseCollector()
        elapsed = self.reactor.seconds() - self.frozenAt
        self.log.info(
            "takeover: handed {pairs} connection(s) ({queued} bytes queued) and {listeners} "
            "listener(s) to pid {pid} after {elapsed:.1f} ms frozen; {skipped} "
            "connection(s) not portable (TLS origination) drain here",
            pairs=self.handedPairs,
            queued=self.handedBytes,
            listeners=len(self._paused),
            pid=self.successor,
            elapsed=elapsed * 1000,
            skipped=self.skipped,
        )
        self._committed(self)

    def _timedOut(self, timeout):
        self._timer = None
        self._fail(f"no commit after {timeout:g}s")

    def abandon(self, why):
        """
        Give up now, before the commit (no effect after it): as any failure.
        """
        self._fail(why)

    def _fail(self, why):
        if self.phase in ("committed", "failed"):
            return
        self.channel.abort()
        if self.batch is not None:
            self.batch.thaw()
        for listener, port in self._paused:
            port.resumeAfterTakeover()
        self._end(why)

    def _end(self, why):
        self.phase = "failed"
        self._cancelTimer()
        self._releaseCollector()
        count = len(self.gateway.factory.clients)
        self.log.error(
            "takeover failed: {why}; still serving here ({count} connection(s))",
            why=why,
            count=count,
        )
        self._failed(why)

    def _cancelTimer(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


def _defaultExit(code):
    """
    Leave the process with C{code} at once (after flushing the standard
    streams): twistd has no exit status of its own, and would remove a
    pidfile that now names the successor.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


class _AdoptingEndpoint:
    """
    A successor's listener: listens on the socket the old process hands
    over for the same flag and address, else as configured (C{fallback}).
    The port accepts nothing until the commit.
    """

    def __init__(self, takeover, flag, address, fallback, options):
        self.takeover = takeover
        self.flag = flag
        self.address = address
        self.fallback = fallback
        self.options = options

    def listen(self, factory):
        return self.takeover._listen(self, factory)


class Takeover:
    """
    The successor's side: connects to the running gateway (a control
    socket's path, or an inherited descriptor), receives and adopts its
    listeners, member state and pairs, answers ready, starts on commit.

    @param gateway: the successor's L{etcdgw.gateway.Gateway}.
    @param path: the control socket's path (C{--takeover}), or L{None}.
    @param fd: the inherited descriptor (C{$ETCDGW_TAKEOVER_FD}), or L{None}.
    @param adoptPairs: L{etcdgw.portable.adoptPairs}.
    @param exit: C{exit(status)}: leave the process (after a failure).
    @ivar committed: a Deferred firing once this process owns everything.
    """

    log = Logger()
    #: The protocol version this side speaks.
    version = PROTOCOL_VERSION

    def __init__(self, gateway, path=None, fd=None, adoptPairs=None, exit=_defaultExit,
                 timeout=TIMEOUT, controlSocket=None, hold=False, installSignal=None):
        self.gateway = gateway
        self.reactor = gateway.reactor
        self.path = path
        self.fd = fd
        self._adoptPairs = adoptPairs
        self._exit = exit
        self.timeout = timeout
        self.controlSocket = controlSocket
        self.committed = defer.Deferred()
        self.phase = "connecting"
        self.predecessor = None
        self.channel = None
        self.pairs = []
        self.adopted = None
        self.ports = []
        self.clientPort = None
        self.listenersOffered = None
        self._requests = []
        self._timer = None
        self._end = None
        self.queuedBytes = 0
        self._releaseCollector = lambda: None
        #: A worker of a successor supervisor: once adopted, wait for its
        #: supervisor's SIGUSR1 before answering ready.
        self.hold = hold
        self._installSignal = installSignal
        self._prepared = False

    def describeSource(self):
        return self.path if self.path is not None else f"descriptor {self.fd}"

    def connect(self):
        """
        Open the channel and say hello. Called at start, before the
        listeners listen.

        @raise TakeoverError: when the running gateway cannot be reached.
        """
        if self.path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(CONNECT_TIMEOUT)
            try:
                sock.connect(socketAddress(self.path))
            except OSError as e:
                sock.close()
                raise TakeoverError(
                    f"--takeover: cannot reach the running gateway at {self.path}: "
                    f"{e.strerror or e} (is its --control-socket this path?)"
                ) from None
        else:
            try:
                sock = socket.socket(fileno=self.fd)
            except OSError as e:
                raise TakeoverError(
                    f"${ENVIRONMENT_FD}={self.fd}: not a socket ({e.strerror or e})"
                ) from None
            if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
                sock.detach()
                raise TakeoverError(f"${ENVIRONMENT_FD}={self.fd}: not a unix stream socket")
            os.set_inheritable(sock.fileno(), False)
        self.phase = "hello"
        self.channel = SocketChannel(self.reactor, sock, self)
        self._timer = self.reactor.callLater(self.timeout, self._timedOut)
        # The running gateway freezes its pairs when it hears the hello:
        # say it once this process has started everything else (the
        # reactor runs, every service started), not while it still starts.
        self.reactor.callWhenRunning(self.reactor.callLater, 0, self._hello)

    def _hello(self):
        if self.phase != "hello" or self.channel.closed:
            return
        if self.gateway.workers is not None and not self._prepared:
            # --workers: the old workers' control sockets first; this
            # process's workers take them over (up to holding) before the
            # old supervisor freezes anything.
            self.phase = "preparing"
            self.channel.send({"type": "prepare", "version": self.version, "pid": os.getpid()})
            return
        self._releaseCollector = _holdCollector()
        self.channel.send(
            {
                "type": "hello",
                "version": self.version,
                "pid": os.getpid(),
                "controlSocket": self.controlSocket,
            }
        )
        self.log.info(
            "takeover: asking the running gateway ({source}) for its listeners and "
            "connections",
            source=self.describeSource(),
        )

    def endpoint(self, flag, address, fallback, **options):
        """
        The endpoint of this process's listener C{flag} (C{--listen-addr},
        C{--metrics-addr}) on C{address}, instead of C{fallback}.

        @param options: C{maxConnections}, C{fast}: as the listener's own.
        """
        return _AdoptingEndpoint(self, flag, address, fallback, options)

    # Listeners

    def _listen(self, endpoint, factory):
        d = defer.Deferred()
        self._requests.append((endpoint, factory, d))
        if self.listenersOffered is not None:
            self._resolveListeners()
        return d

    def _resolveListeners(self):
        from etcdgw.listen import adoptListeningSocket

        requests, self._requests = self._requests, []
        for endpoint, factory, d in requests:
            key = (endpoint.flag, endpoint.address.text)
            offered = self.listenersOffered.pop(key, None)
            try:
                if offered is not None:
                    fd, family = offered
                    try:
                        port = adoptListeningSocket(
                            self.reactor, fd, family, factory,
                            systemd=endpoint.address.text.startswith("systemd:"),
                            **endpoint.options,
                        )
                    finally:
                        os.close(fd)
                    how = "taken over"
                else:
                    port = self._fallbackListen(endpoint, factory)
                    how = "new"
                port.pauseForTakeover()
            except Exception as e:
                from etcdgw.listen import describeListenError

                self.fail(
                    f"{endpoint.flag}: cannot listen on {endpoint.address}: "
                    f"{describeListenError(e)}"
                )
                return
            self.ports.append(port)
            if endpoint.flag == "--listen-addr":
                self.clientPort = port
            self.log.info(
                "takeover: {flag} {address}: {how} listening socket (accepting from the commit on)",
                flag=endpoint.flag, address=endpoint.address.text, how=how,
            )
            d.callback(port)

    def _fallbackListen(self, endpoint, factory):
        """
        Listen as configured (a listener the running gateway does not
        have). Our endpoints listen at once (their Deferred has fired).
        """
        result = []
        endpoint.fallback.listen(factory).addBoth(result.append)
        if not result:
            raise TakeoverError("the listener did not listen at once")
        if isinstance(result[0], Failure):
            result[0].raiseException()
        return result[0]

    # From the channel

    def frameReceived(self, header, payload, fds):
        kind = header.get("type")
        try:
            if kind == "refuse":
                closeDescriptors(fds)
                self.fail(f"the running gateway refused: {header.get('reason')}")
            elif kind == "workers" and self.phase == "preparing":
                self._workersOffered(header.get("workers") or [])
            elif kind == "hello" and self.phase == "hello":
                self.predecessor = header.get("pid")
                self.phase = "receiving"
            elif kind == "listeners" and self.phase == "receiving":
                self._listeners(header, fds)
            elif kind == "state" and self.phase == "receiving":
                closeDescriptors(fds)
                self.gateway.monitor.adoptState(header.get("state") or {})
            elif kind == "pairs" and self.phase == "receiving":
                pairs = splitPairs(header, payload, fds)
                self.pairs.extend(pairs)
                self.queuedBytes += len(payload)
            elif kind == "end" and self.phase == "receiving":
                self._adopt(header)
            elif kind == "commit" and self.phase == "ready":
                self._start()
            else:
                closeDescriptors(fds)
                self.fail(f"unexpected message {kind!r} while {self.phase}")
        except TakeoverError as e:
            closeDescriptors(fds)
            self.fail(str(e))
        except Exception as e:
            closeDescriptors(fds)
            self.log.failure("takeover: error taking over")
            self.fail(f"error taking over: {e}")

    def channelLost(self, why):
        if self.phase in ("started", "failed"):
            return
        self.fail(f"the running gateway went away before the commit ({why})")

    def _listeners(self, header, fds):
        listeners = header.get("listeners")
        if not isinstance(listeners, list) or len(listeners) != len(fds):
            closeDescriptors(fds)
            raise TakeoverError("a malformed listeners frame")
        self.listenersOffered = {
            (item["flag"], item["address"]): (fd, item["family"])
            for item, fd in zip(listeners, fds)
        }
        self._resolveListeners()

    def _adopt(self, header):
        if header.get("pairs") != len(self.pairs):
            raise TakeoverError(
                f"{len(self.pairs)} connection(s) arrived, the running gateway sent "
                f"{header.get('pairs')}"
            )
        if self._requests:
            raise TakeoverError("the listeners were not handed over")
        # Listening sockets of the old process that no listener here wants:
        # the old process closes its own at the commit.
        for fd, _ in (self.listenersOffered or {}).values():
            os.close(fd)
        self.listenersOffered = {}
        self._end = header
        self._times = {"end": self.reactor.seconds()}
        pairs, self.pairs = self.pairs, []
        adoptPairs = self._adoptPairs
        if adoptPairs is None:
            from etcdgw.portable import adoptPairs
        # The descriptors are adoptPairs' from the call on (it closes them
        # when it refuses): never closed here again.
        try:
            self.adopted = adoptPairs(self.gateway.factory, pairs, listener=self.clientPort)
        except Exception as e:
            raise TakeoverError(f"cannot adopt the connections: {e}") from None
        self.phase = "ready"
        self._times["adopted"] = self.reactor.seconds()
        if self.hold:
            self._holdForSupervisor()
        else:
            self._ready()

    def _workersOffered(self, addresses):
        if len(addresses) > self.gateway.workers.count:
            self.fail(
                f"the running gateway has {len(addresses)} worker(s) to hand over, "
                f"--workers here gives {self.gateway.workers.count}"
            )
            return

        def holding(ignored):
            if self.phase == "preparing":
                self.phase = "hello"
                self._prepared = True
                self._hello()

        d = self.gateway.workers.takeOverFrom(addresses)
        d.addCallbacks(holding, self._workersFailed)

    def _ready(self, ignored=None):
        if self.phase == "ready":
            self.channel.send({"type": "ready"})

    def _workersFailed(self, failure):
        self.fail(f"--workers: {failure.getErrorMessage()}")

    def _holdForSupervisor(self):
        """
        Say so on standard output (the supervisor reads it), and answer
        ready on its SIGUSR1.
        """
        if self._installSignal is not None:
            self._installSignal(
                signal.SIGUSR1,
                lambda signum, frame: self.reactor.callFromThread(self._ready),
            )
        self.log.info(HOLDING + ": adopted, waiting for the supervisor's go")

    def _start(self):
        self.phase = "started"
        self._cancelTimer()
        self.channel.loseConnection()
        committedAt = self.reactor.seconds()
        if self.adopted is not None:
            try:
                self.adopted.start()
            except Exception:
                # No way back after the commit: this process serves on.
                self.log.failure("takeover: error starting the connections taken over")
        for port in self.ports:
            port.resumeAfterTakeover()
        now = self.reactor.seconds()
        end = self._end or {}
        times = getattr(self, "_times", {})

        def ms(start, stop):
            if isinstance(start, (int, float)) and isinstance(stop, (int, float)):
                return (stop - start) * 1000
            return float("nan")

        pause = ms(end.get("frozenAt"), now)
        self.log.info(
            "takeover: took over {pairs} connection(s) ({queued} bytes queued) and {listeners} "
            "listener(s) from pid {pid}; pause {pause:.1f} ms (frozen there to started here: "
            "export {export:.1f} ms, transfer {transfer:.1f} ms, adopt {adopt:.1f} ms, "
            "commit {commit:.1f} ms, start {start:.1f} ms)",
            pairs=end.get("pairs", 0),
            queued=self.queuedBytes,
            listeners=len(self.ports),
            pid=self.predecessor,
            pause=pause,
            export=ms(end.get("frozenAt"), end.get("exportedAt")),
            transfer=ms(end.get("exportedAt"), times.get("end")),
            adopt=ms(times.get("end"), times.get("adopted")),
            commit=ms(times.get("adopted"), committedAt),
            start=ms(committedAt, now),
        )
        self._releaseCollector()
        if self.gateway.workers is not None:
            self.gateway.workers.takeoverCommitted()
        self.committed.callback(self)

    def _timedOut(self):
        self._timer = None
        self.fail(f"no commit after {self.timeout:g}s")

    def fail(self, why):
        """
        Give up before the commit: drop everything adopted (sending nothing
        to any peer: the running gateway still holds every socket), one
        line, exit status 1.
        """
        if self.phase in ("started", "failed"):
            return
        self.phase = "failed"
        self._cancelTimer()
        self._releaseCollector()
        if self.channel is not None:
            if not self.channel.closed:
                self.channel.send({"type": "abort", "reason": why})
                self.channel.loseConnection()
        if self.adopted is not None:
            self.adopted.abort()
            self.adopted = None
        for _, _, pairFds in self.pairs:
            closeDescriptors(pairFds)
        self.pairs = []
        for fd, _ in (self.listenersOffered or {}).values():
            closeDescriptors([fd])
        self.listenersOffered = {}
        for port in self.ports:
            port.dropForTakeover()
        self.ports = []
        from etcdgw.listen import _stderrLine

        if self.gateway.workers is not None:
            self.gateway.workers.abandonTakeover()
        self.log.critical("takeover failed: {why}; the running gateway keeps serving", why=why)
        _stderrLine(f"etcd-gateway: error: takeover failed: {why}")
        self._exit(1)

    def _cancelTimer(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


def twistdPidfile(argv=None, plugin="etcd-gateway"):
    """
    The pidfile twistd was given in C{argv} (default C{sys.argv}), as an
    absolute path, or L{None} (C{--pidfile=} or not twistd).
    """
    argv = sys.argv if argv is None else argv
    pidfile = "twistd.pid"
    args = list(argv[1:])
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == plugin:
            break
        if arg.startswith("--pidfile="):
            pidfile = arg.split("=", 1)[1]
        elif arg == "--pidfile" and i + 1 < len(args):
            pidfile = args[i + 1]
            i += 1
        i += 1
    else:
        return None  # not twistd's command line
    return os.path.abspath(pidfile) if pidfile else None


class PidfileAside:
    """
    twistd refuses to start while its pidfile names a live process: the
    pidfile naming this process is moved aside while the successor starts
    (which writes its own), dropped once it took over, put back after a
    failure.
    """

    def __init__(self, path, pid=None):
        self.path = path
        self.pid = os.getpid() if pid is None else pid
        self.aside = f"{path}.takeover-{self.pid}"
        self.moved = False

    def move(self):
        try:
            with open(self.path) as f:
                named = f.read().strip()
        except OSError:
            return
        if named != str(self.pid):
            return
        os.replace(self.path, self.aside)
        self.moved = True

    def restore(self):
        if self.moved:
            self.moved = False
            try:
                os.replace(self.aside, self.path)
            except OSError:
                pass

    def drop(self):
        if self.moved:
            self.moved = False
            try:
                os.unlink(self.aside)
            except OSError:
                pass


class _Successor(protocol.ProcessProtocol):
    """
    The process started by SIGUSR2: reaped when it exits (a daemonizing
    twistd's first process exits at once; the daemon lives on).
    """

    log = Logger()

    def __init__(self):
        self.ended = False
        self.status = None

    def processEnded(self, reason):
        self.ended = True
        self.status = getattr(reason.value, "exitCode", None)


def successorCommand(argv=None):
    """
    The command line of a successor: this twistd's arguments, run by this
    interpreter with the code now installed.
    """
    from etcdgw.workers import TWISTD

    argv = sys.argv if argv is None else argv
    return [sys.executable, "-c", TWISTD] + list(argv[1:])


class ControlSocket:
    """
    A listening unix socket (C{--control-socket}) on the reactor: each
    connection is a successor asking to take over.
    """

    log = Logger()

    def __init__(self, reactor, path, accepted):
        self.reactor = reactor
        self.path = path
        self.accepted = accepted
        self.socket = None

    def fileno(self):
        return -1 if self.socket is None else self.socket.fileno()

    def logPrefix(self):
        return "control-socket"

    def listen(self):
        """
        @raise OSError: when it cannot.
        """
        abstract = self.path.startswith("@")
        try:
            info = None if abstract else os.lstat(self.path)
        except FileNotFoundError:
            pass
        else:
            if info is not None:
                if not stat.S_ISSOCK(info.st_mode):
                    raise OSError(errno.EEXIST, f"{self.path} exists and is not a socket")
                os.unlink(self.path)  # a predecessor's, or a stale one
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old = os.umask(0o177)
            try:
                sock.bind(socketAddress(self.path))
            finally:
                os.umask(old)
            sock.listen(8)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.socket = sock
        self.reactor.addReader(self)

    def doRead(self):
        while self.socket is not None:
            try:
                conn, _ = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return None
            except OSError as e:
                self.log.warn("control socket: accept failed: {error}", error=e)
                return None
            if not _samePeer(conn):
                self.log.warn("control socket: refused a process of another user")
                conn.close()
                continue
            self.accepted(conn)
        return None

    def connectionLost(self, reason):
        self.close(unlink=False)

    def close(self, unlink=True):
        if self.socket is None:
            return
        self.reactor.removeReader(self)
        self.socket.close()
        self.socket = None
        if unlink and not self.path.startswith("@"):
            try:
                os.unlink(self.path)
            except OSError:
                pass


class TakeoverService(Service):
    """
    The running gateway's takeover triggers: SIGUSR2 starts a successor
    (L{spawnSuccessor}); C{--control-socket} accepts successors started by
    hand. One takeover at a time. Once one commits, the process stops
    (its own drain for connections that could not be handed over, TLS
    origination's) and exits 0 without removing the pidfile, which names
    the successor.

    In a successor (C{gateway.takeover} set), the control socket listens
    from the commit on.

    @param gateway: the L{etcdgw.gateway.Gateway}.
    @param controlSocket: C{--control-socket}'s path, or L{None}.
    @param installSignal: C{signal.signal} to handle SIGUSR2, or L{None}.
    @param exportPairs: L{etcdgw.portable.exportPairs}.
    @param spawn: C{spawn(processProtocol, executable, args, env, path,
        childFDs)} (the reactor's C{spawnProcess}).
    @param exit: leave the process with a status (after the commit: 0).
    """

    log = Logger()

    def __init__(self, gateway, controlSocket=None, installSignal=None, exportPairs=None,
                 spawn=None, exit=_defaultExit, timeout=TIMEOUT, pidfile=None, argv=None):
        self.gateway = gateway
        #: The command line this process was started with (C{sys.argv}).
        self.argv = sys.argv if argv is None else argv
        #: This process is a worker (C{--workers}): a control socket of its
        #: own, no SIGUSR2.
        self.worker = gateway.config.workers.workerOf is not None if getattr(
            gateway, "config", None) is not None else False
        self.reactor = gateway.reactor
        self.controlSocket = controlSocket
        self._installSignal = installSignal
        self._exportPairs = exportPairs
        self._spawn = spawn
        self._exit = exit
        self.timeout = timeout
        self.pidfile = pidfile
        self.control = None
        self.current = None
        self.handedOver = False
        self._previous = None
        self._aside = None
        self._successor = None

    def startService(self):
        super().startService()
        if self._installSignal is not None and hasattr(signal, "SIGUSR2"):
            self._previous = self._installSignal(signal.SIGUSR2, self._onSignal)
        if self.controlSocket is None and self.worker:
            # A worker's: its supervisor's successor starts a worker that
            # takes over from this one through it.
            self.controlSocket = workerControl(os.getpid())
        if self.controlSocket is not None:
            takeover = self.gateway.takeover
            if takeover is None:
                self._listenControl()
            else:
                takeover.committed.addCallback(lambda _: self._listenControl())

    def _listenControl(self):
        if not self.running:
            return
        control = ControlSocket(self.reactor, self.controlSocket, self._accepted)
        try:
            control.listen()
        except OSError as e:
            # Not fatal: the gateway serves; SIGUSR2 still works.
            self.log.error(
                "--control-socket: cannot listen on {path}: {error}; takeovers by "
                "--takeover are not possible (SIGUSR2 still is)",
                path=self.controlSocket,
                error=e.strerror or str(e),
            )
            return
        self.control = control
        self.log.info(
            "control socket on {path}: a gateway started with --takeover={path} takes "
            "over from this one",
            path=self.controlSocket,
        )

    def stopService(self):
        super().stopService()
        if self._previous is not None:
            self._installSignal(signal.SIGUSR2, self._previous)
            self._previous = None
        if self.current is not None:
            # Stopping (SIGTERM) in the middle of a takeover: every pair runs
            # here again first, so the drain that follows sees them.
            self.current.abandon("this gateway is stopping")
        if self.control is not None:
            # After a handover the path may be the successor's now.
            self.control.close(unlink=not self.handedOver)
            self.control = None

    def _onSignal(self, signum, frame):
        # In the signal handler: only hand over to the reactor.
        self.reactor.callFromThread(self.spawnSuccessor)

    def _busy(self):
        if self.handedOver:
            return "this gateway has handed over already"
        if self.current is not None:
            return "a takeover is already running"
        takeover = self.gateway.takeover
        if takeover is not None and takeover.phase != "started":
            return "this gateway is still taking over itself"
        return None

    def spawnSuccessor(self):
        """
        SIGUSR2: start a new copy of this gateway that takes over from it.
        """
        busy = self._busy()
        if busy is None and os.path.basename(self.argv[0] if self.argv else "") != "twistd":
            busy = (
                f"this process was not started by twistd ({self.argv[:1]}), whose command "
                "line a successor runs again; use --control-socket and --takeover"
            )
        if busy is not None:
            self.log.warn("SIGUSR2: not starting a successor: {why}", why=busy)
            return
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ)
        for name in ("WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
            env.pop(name, None)
        env[ENVIRONMENT_FD] = str(CHILD_FD)
        argv = successorCommand(self.argv)
        self._aside = None
        if self.pidfile is not None:
            self._aside = PidfileAside(self.pidfile)
            try:
                self._aside.move()
            except OSError as e:
                self.log.warn("SIGUSR2: cannot move the pidfile aside: {error}", error=e)
                self._aside = None
        successor = _Successor()
        try:
            transport = self._spawn(
                successor, sys.executable, argv, env=env, path=os.getcwd(),
                childFDs={0: 0, 1: 1, 2: 2, CHILD_FD: child.fileno()},
            )
        except Exception as e:
            child.close()
            parent.close()
            self._restorePidfile()
            self.log.error("SIGUSR2: cannot start a successor: {error}; still serving", error=e)
            return
        finally:
            if child.fileno() != -1:
                child.close()
        self._successor = (successor, transport)
        self.log.info(
            "SIGUSR2: started a successor (pid {pid}) to take over: {command}",
            pid=getattr(transport, "pid", None),
            command=" ".join(argv[3:]),
        )
        self._handOver(parent)

    def _accepted(self, sock):
        busy = self._busy()
        if busy is not None:
            self.log.warn("control socket: refusing a successor: {why}", why=busy)
            try:
                sock.setblocking(False)
                sock.send(encodeFrame({"type": "refuse", "reason": busy, "fds": 0}))
            except OSError:
                pass
            sock.close()
            return
        self._handOver(sock)

    def _handOver(self, sock):
        exportPairs = self._exportPairs
        if exportPairs is None:
            from etcdgw.portable import exportPairs
        self.current = Handover(
            self.gateway, sock, exportPairs, self._committed, self._failed, timeout=self.timeout
        )

    def _failed(self, why):
        self.current = None
        self._restorePidfile()
        if self._successor is not None:
            successor, transport = self._successor
            self._successor = None
            if not successor.ended:
                try:
                    transport.signalProcess("KILL")
                except Exception:
                    pass

    def _restorePidfile(self):
        if self._aside is not None:
            self._aside.restore()
            self._aside = None

    def _committed(self, handover):
        self.handedOver = True
        self.current = None
        if self._aside is not None:
            self._aside.drop()
            self._aside = None
        notify = self.gateway.notify
        if notify is not None:
            notify.handedOver = True
        if self.control is not None:
            successorControl = None
            if handover.successorControl is not None:
                successorControl = os.path.abspath(handover.successorControl)
            self.control.close(unlink=successorControl != os.path.abspath(self.controlSocket))
            self.control = None
        # Exit 0 once the process's own stop (a drain of what stayed) is
        # done, without twistd's removal of the pidfile.
        self.reactor.addSystemEventTrigger("after", "shutdown", self._exit, 0)
        self.reactor.stop()
