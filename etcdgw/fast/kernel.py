"""
The kernel forwarding path, built and measured, not offered (see below):
two joined TCP sockets put into BPF socket maps with a stream verdict
program that redirects each socket's bytes to its peer, inside the kernel:
no byte reaches user space.

No compiler is needed: the program is a handful of BPF instructions
assembled here, loaded with C{bpf(2)} through C{ctypes}.

The maps (both C{BPF_MAP_TYPE_SOCKHASH}, 8-byte keys: socket cookies,
C{SO_COOKIE}):

 - C{targets}: key = a source socket's cookie, value = its PEER socket. No
   program is attached: being in it only makes a socket a redirect target.
 - C{sources}: key = a socket's own cookie, value = the socket itself; the
   verdict program is attached to this map, so a socket starts being
   redirected the moment it is put here, and stops when it is taken out.

The program, for every chunk a socket in C{sources} receives::

    key = bpf_get_socket_cookie(skb)
    return bpf_sk_redirect_hash(skb, targets, &key, 0)   # 0: the peer's egress

Order is what keeps bytes exact. A pair is put in C{targets} first (both
ways: nothing changes yet), then each socket into C{sources}: from that
moment its direction is the kernel's, and the lookup never fails while the
pair is joined (L{KernelMaps.attach}).

The redirect is asynchronous (the kernel queues redirected bytes on the
peer and a worker sends them), so before user space writes to a socket
itself, or passes a half-close on (C{shutdown(SHUT_WR)}), or takes a pair
out, every byte redirected into it must have reached its socket:
L{KernelMaps.inFlight} counts those from C{TCP_INFO} and C{SIOCOUTQ}.

Why the gateway does not offer it (C{--forward=kernel} is refused; README,
"Kernel forwarding"; measured with C{benchmarks/kernel_backpressure.py}
on Linux 6.18):

 - Backpressure is not kept. The verdict consumes what the source receives
   (its window stays open) and queues it on the peer without a bound and
   without charging the socket memory that C{/proc/net/sockstat} counts: a
   writer pushed 1 GiB in about 2.5 s into a reader taking 1 MiB/s; the
   host's available memory fell by 1.04 GiB while sockstat's "TCP mem"
   stayed at about 1,000 pages and the sockets' own queues at 4 MiB.
 - Bytes a socket had queued (unread) when it went into C{sources} are not
   forwarded until a later chunk arrives, are invisible to C{recv} and
   C{FIONREAD} meanwhile while epoll keeps reporting the socket readable;
   and a socket taken out of the map in that state is wedged: nothing it
   receives is delivered any more, and the kernel warns "TCP recvmsg seq #
   bug" (net/ipv4/tcp.c). The gateway joins pairs whose client has already
   sent its first request, and takes pairs out for live takeover: both
   meet this.

A pair handed to another process (live takeover) must be taken out of the
maps first (L{detach}): the maps, the program and the redirect belong to
this process. The successor puts it in its own maps.

Where C{bpf(2)} fails (not root, an old kernel, seccomp, a kernel without
sockmap) L{open} raises L{Unavailable} with the reason, in one line (the
tests skip with it, or fail with it under CI; were the mode offered, the
gateway would log it once and copy).
"""

import ctypes
import ctypes.util
import errno
import fcntl
import os
import socket
import struct
import termios

import attr

#: bpf(2) commands (include/uapi/linux/bpf.h, enum bpf_cmd).
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_PROG_LOAD = 5
BPF_PROG_ATTACH = 8
BPF_PROG_DETACH = 9
#: enum bpf_map_type, enum bpf_prog_type, enum bpf_attach_type.
BPF_MAP_TYPE_SOCKHASH = 18
BPF_PROG_TYPE_SK_SKB = 14
BPF_SK_SKB_STREAM_VERDICT = 5
#: Helper function numbers (enum bpf_func_id).
BPF_FUNC_get_socket_cookie = 46
BPF_FUNC_sk_redirect_hash = 72
#: BPF_ANY for map updates; BPF_NOEXIST.
BPF_ANY = 0
BPF_NOEXIST = 1
#: The bpf(2) system call's number on x86-64 and arm64.
_SYS_BPF = {"x86_64": 321, "aarch64": 280}
#: getsockopt(SOL_SOCKET, SO_COOKIE).
SO_COOKIE = 57
#: struct tcp_info: offsets of tcpi_bytes_acked and tcpi_bytes_received
#: (u64 each; Linux 4.1+), and the size to ask for.
_TCPI_BYTES_ACKED = 120
_TCPI_BYTES_RECEIVED = 128
_TCPI_SIZE = 136
#: The most pairs one process's maps hold (two entries per pair per map).
MAX_PAIRS = 65536


class Unavailable(Exception):
    """
    The kernel forwarding path cannot be set up here; the message says why.
    """


def _insn(code, dst=0, src=0, off=0, imm=0):
    return struct.pack("<BBhi", code, dst | (src << 4), off, imm)


def verdictProgram(targetsFd):
    """
    The stream verdict program's instructions (see the module docstring),
    with C{targetsFd} as its map.
    """
    R0, R1, R2, R3, R4, R6, R10 = 0, 1, 2, 3, 4, 6, 10
    return b"".join(
        (
            _insn(0xBF, R6, R1),  # r6 = r1 (the skb)
            _insn(0x85, imm=BPF_FUNC_get_socket_cookie),  # r0 = cookie(r1)
            _insn(0x7B, R10, R0, off=-8),  # *(u64 *)(r10 - 8) = r0
            _insn(0xBF, R1, R6),  # r1 = skb
            _insn(0x18, R2, 1, imm=targetsFd),  # r2 = the map (BPF_PSEUDO_MAP_FD)
            _insn(0x00),
            _insn(0xBF, R3, R10),  # r3 = r10
            _insn(0x07, R3, imm=-8),  # r3 += -8: &key
            _insn(0xB7, R4, imm=0),  # r4 = 0: the peer's egress
            _insn(0x85, imm=BPF_FUNC_sk_redirect_hash),
            _insn(0x95),  # exit: r0 (SK_PASS when redirected, else SK_DROP)
        )
    )


def _libcSyscall():
    """
    The real bpf(2), through C{ctypes}: C{call(cmd, attr)} with C{attr} a
    C{ctypes} buffer; returns the result, raises L{OSError}.
    """
    number = _SYS_BPF.get(os.uname().machine)
    if number is None:
        raise Unavailable(f"bpf(2) number unknown on {os.uname().machine}")
    syscall = _libc().syscall
    syscall.restype = ctypes.c_long
    syscall.argtypes = (ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint)

    def bpf(cmd, attr):
        r = syscall(number, cmd, ctypes.addressof(attr), ctypes.sizeof(attr))
        if r < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        return r

    return bpf


class _Sock:
    """
    getsockopt/ioctl on a descriptor without owning it.
    """

    #: TCP states after the peer's FIN arrived (include/net/tcp_states.h):
    #: TIME_WAIT, CLOSE_WAIT, LAST_ACK, CLOSING. tcpi_bytes_received counts
    #: the FIN as one byte in them.
    FIN_RECEIVED = frozenset((6, 8, 9, 11))

    @staticmethod
    def cookie(fd):
        buf = ctypes.create_string_buffer(8)
        size = ctypes.c_uint(8)
        if _libc().getsockopt(fd, socket.SOL_SOCKET, SO_COOKIE, buf, ctypes.byref(size)):
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        return struct.unpack("<Q", buf.raw)[0]

    @staticmethod
    def tcpInfo(fd):
        buf = ctypes.create_string_buffer(_TCPI_SIZE)
        size = ctypes.c_uint(_TCPI_SIZE)
        if _libc().getsockopt(fd, socket.IPPROTO_TCP, socket.TCP_INFO, buf, ctypes.byref(size)):
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        if size.value < _TCPI_SIZE:
            raise OSError(errno.EINVAL, "TCP_INFO too short")
        acked, received = struct.unpack_from("<QQ", buf.raw, _TCPI_BYTES_ACKED)
        if buf.raw[0] in _Sock.FIN_RECEIVED:
            received -= 1
        return acked, received

    @staticmethod
    def outq(fd):
        return struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0]


def _received(fd):
    """
    The bytes socket C{fd} has received (its FIN not counted).
    """
    return _Sock.tcpInfo(fd)[1]


def _written(fd):
    """
    What was written into socket C{fd}: acknowledged (an active opener's
    SYN, and a FIN sent, counted) plus queued.
    """
    return _Sock.tcpInfo(fd)[0] + _Sock.outq(fd)


@attr.s(frozen=True, slots=True)
class Pair:
    """
    Two sockets joined in the kernel (L{KernelMaps.attach}).

    @ivar a: one socket's descriptor; C{b} the other's.
    @ivar cookieA: C{a}'s cookie; C{cookieB}, C{b}'s.
    @ivar base: the L{KernelMaps.inFlight} baselines, a to b and b to a.
    """

    a = attr.ib()
    b = attr.ib()
    cookieA = attr.ib()
    cookieB = attr.ib()
    base = attr.ib()


_libcHandle = None


def _libc():
    global _libcHandle
    if _libcHandle is None:
        _libcHandle = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libcHandle


class KernelMaps:
    """
    This process's two socket maps and its verdict program (see the module
    docstring); made by L{open}.
    """

    def __init__(self, bpf, maxPairs=MAX_PAIRS):
        self._bpf = bpf
        self._fds = []
        try:
            self.targets = self._mapCreate(2 * maxPairs, b"etcdgw_targets")
            self.sources = self._mapCreate(2 * maxPairs, b"etcdgw_sources")
            self.program = self._progLoad(verdictProgram(self.targets))
            self._attach()
        except BaseException:
            self.close()
            raise
        #: Entries each map holds (what this process put and has not taken
        #: out; the kernel also drops a closed socket's entries itself).
        self.pairs = 0

    def _mapCreate(self, entries, name):
        attr = ctypes.create_string_buffer(72)
        struct.pack_into("<IIIII", attr, 0, BPF_MAP_TYPE_SOCKHASH, 8, 8, entries, 0)
        attr[28 : 28 + len(name)] = name[:15]
        fd = self._bpf(BPF_MAP_CREATE, attr)
        self._fds.append(fd)
        return fd

    def _progLoad(self, insns):
        code = ctypes.create_string_buffer(insns, len(insns))
        license = ctypes.create_string_buffer(b"GPL")
        logBuf = ctypes.create_string_buffer(4096)
        attr = ctypes.create_string_buffer(128)
        struct.pack_into(
            "<IIQQIIQ",
            attr,
            0,
            BPF_PROG_TYPE_SK_SKB,
            len(insns) // 8,
            ctypes.addressof(code),
            ctypes.addressof(license),
            1,
            len(logBuf),
            ctypes.addressof(logBuf),
        )
        attr[48:58] = b"etcdgw_fwd"
        struct.pack_into("<I", attr, 68, BPF_SK_SKB_STREAM_VERDICT)
        try:
            fd = self._bpf(BPF_PROG_LOAD, attr)
        except OSError as e:
            log = logBuf.value.decode("ascii", "replace").strip()
            raise OSError(e.errno, f"{e.strerror}{': ' + log if log else ''}") from None
        self._fds.append(fd)
        return fd

    def _attach(self):
        attr = ctypes.create_string_buffer(24)
        struct.pack_into("<III", attr, 0, self.sources, self.program, BPF_SK_SKB_STREAM_VERDICT)
        self._bpf(BPF_PROG_ATTACH, attr)

    def _elem(self, cmd, fd, key, value=None, flags=BPF_ANY):
        k = ctypes.c_uint64(key)
        attr = ctypes.create_string_buffer(32)
        struct.pack_into("<IIQ", attr, 0, fd, 0, ctypes.addressof(k))
        if value is not None:
            v = ctypes.c_uint64(value)
            struct.pack_into("<QQ", attr, 16, ctypes.addressof(v), flags)
        return self._bpf(cmd, attr)

    def put(self, map, key, sockFd):
        self._elem(BPF_MAP_UPDATE_ELEM, map, key, sockFd)

    def remove(self, map, key):
        """
        Take C{key} out of C{map}; a key the kernel already dropped (its
        socket closed) is not an error.
        """
        try:
            self._elem(BPF_MAP_DELETE_ELEM, map, key)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise

    def keys(self, map):
        """
        Every key in C{map} (for tests and the leak check).
        """
        out = []
        key = ctypes.c_uint64(0)
        nxt = ctypes.c_uint64(0)
        attr = ctypes.create_string_buffer(32)
        first = True
        while True:
            struct.pack_into(
                "<IIQQ",
                attr,
                0,
                map,
                0,
                0 if first else ctypes.addressof(key),
                ctypes.addressof(nxt),
            )
            try:
                self._bpf(BPF_MAP_GET_NEXT_KEY, attr)
            except OSError as e:
                if e.errno == errno.ENOENT:
                    return out
                raise
            out.append(nxt.value)
            key.value = nxt.value
            first = False

    def attach(self, a, b):
        """
        Join sockets C{a} and C{b} (descriptors) in the kernel: each one's
        bytes go to the other from now on. Call it when nothing is queued
        in user space for either and neither has bytes queued that nobody
        read (see the module docstring: such bytes wait for the next chunk,
        and taking that socket out again wedges it on Linux 6.18).

        @return: the L{Pair} (what L{inFlight} and L{detach} take).
        """
        ca, cb = _Sock.cookie(a), _Sock.cookie(b)
        # What TCP_INFO counts beyond the bytes forwarded (an active
        # opener's bytes_acked counts its SYN), taken while nothing is in
        # flight: the baseline of inFlight.
        base = (_written(b) - _received(a), _written(a) - _received(b))
        done = []
        try:
            for map, key, fd in (
                (self.targets, ca, b),
                (self.targets, cb, a),
                (self.sources, ca, a),
                (self.sources, cb, b),
            ):
                self.put(map, key, fd)
                done.append((map, key))
        except BaseException:
            for map, key in reversed(done):
                self.remove(map, key)
            raise
        self.pairs += 1
        return Pair(a, b, ca, cb, base)

    def detach(self, pair):
        """
        Take C{pair} out (sources first: no byte is redirected after; then
        targets). Call it when L{inFlight} is 0 both ways, or bytes already
        redirected are dropped with the peer's queue.
        """
        for map, key in (
            (self.sources, pair.cookieA),
            (self.sources, pair.cookieB),
            (self.targets, pair.cookieA),
            (self.targets, pair.cookieB),
        ):
            self.remove(map, key)
        self.pairs -= 1

    @staticmethod
    def inFlight(pair, fromA=True):
        """
        Bytes one socket of C{pair} received (from C{a} to C{b} if
        C{fromA}) that have not reached the other's send queue yet: the
        kernel redirected them and its worker has not sent them (or the
        source still holds them). A half-close or a close of the target
        must wait until this is 0. Valid until the target sends its own
        FIN (which TCP_INFO counts as a byte).

        (C{tcpi_bytes_received} of the source against C{tcpi_bytes_acked}
        plus C{SIOCOUTQ} of the target, everything written into it, less
        the baseline taken when the pair was joined.)
        """
        src, dst, base = (
            (pair.a, pair.b, pair.base[0]) if fromA else (pair.b, pair.a, pair.base[1])
        )
        return _received(src) - (_written(dst) - base)

    def close(self):
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []


#: This process's maps, where the kernel path is on (never, while
#: C{--forward=kernel} is refused: see README, "Kernel forwarding").
_maps = None


def detach(pair):
    """
    Take a forwarded pair out of this process's maps before it is handed to
    another process (live takeover): the maps, the program and the redirect
    belong to this process; the successor puts the pair in its own. Safe to
    call for any pair.

    @param pair: the L{Pair} L{KernelMaps.attach} returned, or L{None} (a
        pair the kernel does not forward).
    @return: whether it was in the maps.
    """
    if _maps is None or pair is None:
        return False
    _maps.detach(pair)
    return True


def open(bpf=None, maxPairs=MAX_PAIRS):
    """
    Make this process's maps and program.

    @param bpf: the bpf(2) call (tests inject one that fails).
    @raise Unavailable: with the reason, where the kernel refuses.
    """
    try:
        if bpf is None:
            bpf = _libcSyscall()
        maps = KernelMaps(bpf, maxPairs)
    except Unavailable:
        raise
    except OSError as e:
        raise Unavailable(f"bpf(2) refused: {e.strerror or e} (errno {e.errno})") from None
    return maps
