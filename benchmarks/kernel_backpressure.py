#!/usr/bin/env python3
"""
Does a forwarding path slow a writer for a slow reader? (issue 16)

A writer pushes up to --mb MiB as fast as it can into client socket c; the
forwarder moves the bytes from the gateway-side socket a to b; a reader on
the server socket s takes --rate MiB a second. Every second: what the
writer got accepted, what the reader read, the kernel's TCP socket memory
(/proc/net/sockstat "TCP: ... mem", pages), the host's MemAvailable drop
since the start, and the four sockets' queues.

    --path kernel   a and b joined by the BPF sockmap redirect
                    (etcdgw.fast.kernel): root and a sockmap kernel needed
    --path copy     a and b joined by a user-space loop (blocking recv and
                    sendall in a thread), bounded as the gateway's copy path

It stops early if MemAvailable fell by more than --abort-mb. Run on an
otherwise idle machine: MemAvailable counts every process's memory.
"""

import argparse
import fcntl
import os
import socket
import struct
import sys
import termios
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from etcdgw.fast import kernel  # noqa: E402

MiB = 1 << 20


def pair():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    near = socket.create_connection(listener.getsockname())
    far, _ = listener.accept()
    listener.close()
    return near, far


def queued(sock, code):
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), code, b"\0\0\0\0"))[0]


def memAvailableKiB():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])


def tcpMemPages():
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                fields = line.split()
                return int(fields[fields.index("mem") + 1])


def copyLoop(src, dst):
    while True:
        data = src.recv(65536)
        if not data:
            return
        dst.sendall(data)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", choices=("kernel", "copy"), default="kernel")
    parser.add_argument("--mb", type=int, default=1024, help="MiB the writer pushes")
    parser.add_argument("--rate", type=float, default=1.0, help="MiB/s the reader takes")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--abort-mb", type=int, default=2048)
    args = parser.parse_args()

    c, a = pair()
    b, s = pair()
    keep = None
    if args.path == "kernel":
        maps = kernel.open()
        keep = (maps, maps.attach(a.fileno(), b.fileno()))
    else:
        threading.Thread(target=copyLoop, args=(a, b), daemon=True).start()
        threading.Thread(target=copyLoop, args=(b, a), daemon=True).start()

    sent = [0]
    stop = threading.Event()

    def writer():
        chunk = b"x" * MiB
        c.settimeout(0.5)
        while sent[0] < args.mb * MiB and not stop.is_set():
            try:
                sent[0] += c.send(chunk)
            except socket.timeout:
                pass

    threading.Thread(target=writer, daemon=True).start()
    start = memAvailableKiB()
    read = 0
    for second in range(1, args.seconds + 1):
        end = time.monotonic() + 1
        want = int(args.rate * MiB)
        while want > 0:
            data = s.recv(want)
            read += len(data)
            want -= len(data)
        time.sleep(max(0.0, end - time.monotonic()))
        drop = (start - memAvailableKiB()) >> 10
        queues = (
            queued(c, termios.TIOCOUTQ),
            queued(a, termios.FIONREAD),
            queued(b, termios.TIOCOUTQ),
            queued(s, termios.FIONREAD),
        )
        print(
            f"{args.path} t={second}s written={sent[0] // MiB}MiB read={read // MiB}MiB "
            f"sockstat_tcp_mem={tcpMemPages()}pages memavailable_drop={drop}MiB "
            f"queues(c out, a in, b out, s in)={'/'.join(str(q >> 10) for q in queues)}KiB",
            flush=True,
        )
        if drop > args.abort_mb:
            print(f"stopped: MemAvailable fell by more than {args.abort_mb} MiB")
            break
    stop.set()
    del keep


if __name__ == "__main__":
    main()
