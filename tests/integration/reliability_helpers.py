"""
Helpers of the reliability suite (C{tests/integration/test_reliability*.py}):
the C{ETCDGW_LONG} switch, the figures each test reports, small servers
standing in for etcd members (echo, source, reset), blocking socket clients,
etcd's JSON gateway over plain HTTP/1.1, and readings of a process from
C{/proc}.

Everything here is synchronous (threads and blocking sockets): the gateway
under test is a separate process, so the test's own reactor does not need to
run while it is exercised.

Run as a program it is a standalone echo server for tests that need one in
another process (to hold thousands of descriptors outside the test process)::

    python -m tests.integration.reliability_helpers echo PORTFILE
"""

import base64
import hashlib
import http.client
import json
import os
import resource
import selectors
import socket
import struct
import sys
import threading
import time

from tests.integration.etcd import waitUntil
from tests.integration.gateway import REPOSITORY

HOST = "127.0.0.1"

#: C{ETCDGW_LONG=1} runs the same tests longer and bigger.
LONG = os.environ.get("ETCDGW_LONG", "") not in ("", "0")

#: Where the figures of every run are appended, one line per test (relative to
#: trial's working directory, C{_trial_temp}).
REPORT_FILE = "reliability-figures.txt"


def scaled(default, long):
    """
    C{long} when C{ETCDGW_LONG} is set, else C{default}.
    """
    return long if LONG else default


def report(test, **figures):
    """
    Print one line of figures for C{test} (visible in trial's output), and
    append it to L{REPORT_FILE} and trial's C{test.log}.
    """
    from twisted.logger import Logger

    text = ", ".join(f"{k}={v}" for k, v in figures.items())
    line = f"reliability {test}{' [long]' if LONG else ''}: {text}"
    sys.__stdout__.write("\n  " + line + "\n")
    sys.__stdout__.flush()
    try:
        with open(REPORT_FILE, "a") as f:
            f.write(line + "\n")
    except OSError:
        pass
    Logger(namespace="reliability").info("{line}", line=line)


# -- /proc ------------------------------------------------------------------


def rssKiB(pid):
    """
    The resident set size of process C{pid} in KiB (C{VmRSS}).
    """
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def cpuSeconds(pid):
    """
    User plus system CPU time used by process C{pid} so far, in seconds.
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    # fields[0] is the state (field 3): utime, stime are fields 14 and 15.
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def fdCount(pid="self"):
    """
    How many descriptors process C{pid} has open.
    """
    return len(os.listdir(f"/proc/{pid}/fd"))


def running(pid):
    """
    Is process C{pid} running (not gone, not a zombie)?
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def childPids(pid):
    """
    The process IDs of C{pid}'s children (none once it is gone).
    """
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def socketInodes(pid):
    """
    The inodes of process C{pid}'s sockets, as /proc/net/tcp names them.
    """
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[len("socket:[") : -1])
    return inodes


def raiseNofile(wanted=None):
    """
    Raise this process's soft RLIMIT_NOFILE to C{wanted} (default: the hard
    limit); child processes inherit it.  Returns the old limits, for
    C{resource.setrlimit(resource.RLIMIT_NOFILE, old)}.
    """
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft, hard = old
    target = hard if wanted is None else min(wanted, hard)
    if hard == resource.RLIM_INFINITY and wanted is None:
        target = 1 << 20
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), hard))
    return old


def raiseNofileTo(wanted):
    """
    Make this process's RLIMIT_NOFILE at least C{wanted}, soft and hard
    (raising the hard limit needs root, or CAP_SYS_RESOURCE); child
    processes inherit it. Returns the old limits, for
    C{resource.setrlimit(resource.RLIMIT_NOFILE, old)}.

    @raise OSError: or L{ValueError}, when the limit cannot be raised; the
        message says what was asked and what the limits are.
    """
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft, hard = old
    if hard != resource.RLIM_INFINITY and hard < wanted:
        hard = wanted
    if soft != resource.RLIM_INFINITY and soft < wanted:
        soft = wanted
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    except (OSError, ValueError) as e:
        raise type(e)(
            f"cannot raise RLIMIT_NOFILE from {old} to {wanted}: {e} (raising the hard "
            "limit needs root or CAP_SYS_RESOURCE)"
        ) from None
    return old


# -- payloads -----------------------------------------------------------------


def pattern(offset, size, seed=0):
    """
    C{size} bytes of a deterministic, non-repeating-looking stream starting at
    C{offset} (aligned to 32-byte blocks of SHA-256 in counter mode is too slow
    for hundreds of MB; this is a 1 MiB random block, rotated by C{seed}).
    """
    block = _block(seed)
    out = bytearray()
    while size > 0:
        start = offset % len(block)
        piece = block[start : start + size]
        out += piece
        offset += len(piece)
        size -= len(piece)
    return bytes(out)


_blocks = {}


def _block(seed):
    block = _blocks.get(seed)
    if block is None:
        import random

        block = _blocks[seed] = random.Random(seed).randbytes(1 << 20)
    return block


def linger0(sock):
    """
    Make C{sock.close()} send a reset (SO_LINGER with a zero timeout).
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


# -- servers standing in for members -------------------------------------------


class ThreadedServer:
    """
    A TCP server on 127.0.0.1 running C{handler(sock, server)} in a thread for
    each connection.  C{results} collects what handlers append.
    """

    def __init__(self, handler, backlog=128):
        self.handler = handler
        self.results = []
        self.errors = []
        self.connections = 0
        self._lock = threading.Lock()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((HOST, 0))
        self._listener.listen(backlog)
        self.port = self._listener.getsockname()[1]
        self.address = f"{HOST}:{self.port}"
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self):
        while not self._closed:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._run, args=(sock,), daemon=True).start()

    def _run(self, sock):
        try:
            self.handler(sock, self)
        except OSError as e:
            self.errors.append(e)
        finally:
            sock.close()

    def record(self, value):
        with self._lock:
            self.results.append(value)

    def close(self):
        self._closed = True
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()


def echoHandler(sock, server):
    """
    Echo every byte; on the client's half-close, half-close back.
    """
    while True:
        data = sock.recv(1 << 18)
        if not data:
            break
        sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


def resetRecordingEchoHandler(sock, server):
    """
    Echo like L{echoHandler}, and record how the connection from the
    gateway ended: C{"eof"} (a clean end of stream) or C{"reset"} (a reset
    met while reading or writing): what a client's reset looks like at the
    member, if the gateway passes it on.
    """
    try:
        while True:
            data = sock.recv(1 << 18)
            if not data:
                break
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    except (ConnectionResetError, BrokenPipeError):
        server.record("reset")
        return
    server.record("eof")


def readHeader(sock):
    """
    Read a one-line header, byte by byte (what follows it stays unread).

    @return: the line with its newline, or L{None} if the peer closed first.
    """
    header = b""
    while not header.endswith(b"\n"):
        more = sock.recv(1)
        if not more:
            return None
        header += more
    return header


def digestHandler(sock, server):
    """
    Upstream half-closes first: read a header C{"N SEED\\n"}, send C{N} pattern
    bytes and half-close, while reading whatever the client sends until its
    EOF; record C{(received length, sha256)} for the test to check out of band.
    """
    header = readHeader(sock)
    if header is None:
        return
    size, seed = (int(x) for x in header.split())
    received = []

    def reader():
        while True:
            data = sock.recv(1 << 18)
            if not data:
                return
            received.append(data)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    sent = 0
    while sent < size:
        n = min(1 << 18, size - sent)
        sock.sendall(pattern(sent, n, seed))
        sent += n
    sock.shutdown(socket.SHUT_WR)
    t.join(60)
    data = b"".join(received)
    server.record((len(data), hashlib.sha256(data).hexdigest()))


def sourceHandler(sock, server):
    """
    Read a header C{"N\\n"} and send C{N} pattern bytes as fast as the
    connection takes them, then close.
    """
    header = readHeader(sock)
    if header is None:
        return
    size = int(header)
    sent = 0
    chunk = 1 << 18
    while sent < size:
        n = min(chunk, size - sent)
        sock.sendall(pattern(sent, n))
        sent += n
    server.record(sent)
    sock.shutdown(socket.SHUT_WR)
    sock.recv(1)


def resetHandler(sock, server):
    """
    A member that dies mid-stream: read a little, send a little, then reset.
    """
    sock.recv(1024)
    sock.sendall(b"partial reply")
    time.sleep(0.05)
    linger0(sock)


# -- clients --------------------------------------------------------------------


def exchange(address, chunks, timeout=60):
    """
    Connect to C{address} ("host:port"), send C{chunks} (a list of bytes)
    from a thread while reading, half-close, and read until EOF.

    @return: C{(received bytes, seconds)}.
    """
    host, port = address.rsplit(":", 1)
    start = time.monotonic()
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    received = []
    errors = []

    def writer():
        try:
            for chunk in chunks:
                sock.sendall(chunk)
            sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            errors.append(e)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        while True:
            data = sock.recv(1 << 18)
            if not data:
                break
            received.append(data)
    finally:
        t.join(timeout)
        sock.close()
    if errors:
        raise errors[0]
    return b"".join(received), time.monotonic() - start


def hexdigest(chunks):
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


# -- etcd's JSON gateway (HTTP/1.1, one new connection per call) -----------------


def _b64(text):
    return base64.b64encode(text.encode()).decode()


class NoResponse(Exception):
    """
    The connection closed (or reset) before any HTTP response.
    """


def etcdCall(address, path, body, timeout=5.0):
    """
    POST C{body} (a dict, as JSON) to C{http://address/v3/...} on a new
    connection.

    @return: C{(status, decoded JSON or text)}.
    @raise NoResponse: when the connection fails or closes before the
        response's status line.
    @raise socket.timeout: when no answer comes within C{timeout}.
    """
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        try:
            conn.request(
                "POST", path, body=json.dumps(body), headers={"Connection": "close"}
            )
            response = conn.getresponse()
        except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine) as e:
            raise NoResponse(f"{type(e).__name__}: {e}") from None
        data = response.read()
        try:
            return response.status, json.loads(data)
        except ValueError:
            return response.status, data.decode("utf-8", "replace")
    finally:
        conn.close()


def put(address, key, value, timeout=5.0):
    """
    C{/v3/kv/put}; true when etcd acknowledged it (HTTP 200 with a header).
    """
    status, answer = etcdCall(
        address, "/v3/kv/put", {"key": _b64(key), "value": _b64(value)}, timeout
    )
    return status == 200 and isinstance(answer, dict) and "header" in answer


def get(address, key, timeout=5.0):
    """
    C{/v3/kv/range} of one key (linearizable): its value, or L{None} when
    absent.

    @raise RuntimeError: when etcd answers with an error.
    """
    status, answer = etcdCall(address, "/v3/kv/range", {"key": _b64(key)}, timeout)
    if status != 200 or not isinstance(answer, dict):
        raise RuntimeError(f"range {key}: {status} {answer}")
    kvs = answer.get("kvs") or []
    return base64.b64decode(kvs[0]["value"]).decode() if kvs else None


def getPrefix(address, prefix, timeout=15.0):
    """
    Every key under C{prefix} with its value, as a dict.
    """
    end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    status, answer = etcdCall(
        address, "/v3/kv/range", {"key": _b64(prefix), "range_end": _b64(end)}, timeout
    )
    if status != 200 or not isinstance(answer, dict):
        raise RuntimeError(f"range {prefix}*: {status} {answer}")
    return {
        base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", "")).decode()
        for kv in answer.get("kvs") or []
    }


def gatewayStatus(metricsAddress, timeout=3.0):
    """
    The gateway's C{/status.json} (needs C{--metrics-addr}).
    """
    host, port = metricsAddress.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("GET", "/status.json")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def endpointStatus(metricsAddress, endpoint):
    for e in gatewayStatus(metricsAddress)["endpoints"]:
        if e["endpoint"] == endpoint:
            return e
    raise KeyError(endpoint)


# -- a standalone echo server process (thousands of connections) ------------------


def serveEcho(portFile):
    """
    An echo server with C{selectors}: echoes everything, passes a half-close
    back, bounded buffering (stops reading a connection whose replies are
    not taken).  Writes its port to C{portFile} once listening.
    """
    raiseNofile()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((HOST, 0))
    listener.listen(4096)
    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, None)
    pending = {}
    with open(portFile + ".tmp", "w") as f:
        f.write(str(listener.getsockname()[1]))
    os.rename(portFile + ".tmp", portFile)

    def close(sock):
        pending.pop(sock, None)
        try:
            sel.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()

    while True:
        for key, events in sel.select():
            sock = key.fileobj
            if sock is listener:
                while True:
                    try:
                        conn, _ = listener.accept()
                    except (BlockingIOError, OSError):
                        break
                    conn.setblocking(False)
                    pending[conn] = [b"", False]
                    sel.register(conn, selectors.EVENT_READ, None)
                continue
            state = pending.get(sock)
            if state is None:
                continue
            try:
                if events & selectors.EVENT_READ and not state[1] and len(state[0]) < (1 << 20):
                    data = sock.recv(1 << 16)
                    if data:
                        state[0] += data
                    else:
                        state[1] = True
                if state[0]:
                    n = sock.send(state[0])
                    state[0] = state[0][n:]
                if state[1] and not state[0]:
                    sock.shutdown(socket.SHUT_WR)
                    close(sock)
                    continue
                want = selectors.EVENT_WRITE if state[0] else 0
                if not state[1] and len(state[0]) < (1 << 20):
                    want |= selectors.EVENT_READ
                sel.modify(sock, want or selectors.EVENT_READ, None)
            except BlockingIOError:
                pass
            except OSError:
                close(sock)


if __name__ == "__main__":
    if sys.argv[1:2] == ["echo"]:
        serveEcho(sys.argv[2])
    else:
        sys.exit("usage: reliability_helpers echo PORTFILE")


class EchoProcess:
    """
    L{serveEcho} in its own process (so its descriptors do not count against
    the test process's limit).
    """

    def __init__(self):
        import subprocess
        import tempfile

        self.directory = tempfile.mkdtemp(prefix="etcdgw-echo-")
        portFile = os.path.join(self.directory, "port")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.reliability_helpers", "echo", portFile],
            cwd=REPOSITORY,
            stdin=subprocess.DEVNULL,
        )
        waitUntil(lambda: os.path.exists(portFile), 10, message="echo server port file")
        with open(portFile) as f:
            self.port = int(f.read())
        self.address = f"{HOST}:{self.port}"

    def stop(self):
        import shutil

        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        shutil.rmtree(self.directory, ignore_errors=True)

def synDroppingAddress(case):
    """
    C{host:port} of a listener whose accept queue is full (backlog 0, filled
    by connections nobody accepts): Linux then drops new SYNs, as a member
    with a full accept queue does. Closed at C{case}'s cleanup.
    """
    hole = socket.socket()
    hole.bind((HOST, 0))
    hole.listen(0)
    filler = []
    case.addCleanup(lambda: [s.close() for s in filler + [hole]])
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(hole.getsockname())
        except BlockingIOError:
            pass
        filler.append(s)
    time.sleep(0.2)
    return f"{HOST}:{hole.getsockname()[1]}"


def startGateway(case, endpoints, *args, gatewayClass=None, **kwargs):
    """
    Start a real gateway process (C{twistd -n etcd-gateway}) in front of
    C{endpoints}, stopped and removed at C{case}'s cleanup; with
    C{--forward=case.forward} where the case names one.
    """
    from tests.integration.gateway import GatewayProcess

    forward = getattr(case, "forward", None)
    if forward is not None:
        args = (*args, f"--forward={forward}")
    gatewayClass = gatewayClass or GatewayProcess
    gw = gatewayClass(["--endpoints=" + endpoints, *args], cwd=REPOSITORY, **kwargs)
    case.addCleanup(gw.cleanup)
    return gw.start()
