"""Stand-in upstreams, each run as its own process by the scenarios:

    python helpers.py holder HOST PORT MAX_SECONDS
    python helpers.py firehose HOST PORT NBYTES MAX_SECONDS

Standalone (standard library only, no package imports): it is run as a script.
"""

import selectors
import socket
import sys
import threading
import time


def _listener(host, port, backlog):
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((host, port))
    lsock.listen(backlog)
    return lsock


def holder(host, port, max_seconds):
    """Accept connections and hold them open, never sending; close when the peer does."""
    deadline = time.monotonic() + max_seconds
    lsock = _listener(host, port, 4096)
    lsock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(lsock, selectors.EVENT_READ, None)
    while time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.5):
            if key.data is None:
                for _ in range(256):
                    try:
                        conn, _ = lsock.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        time.sleep(0.01)
                        break
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ, "conn")
            else:
                try:
                    data = key.fileobj.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(key.fileobj)
                    key.fileobj.close()


def firehose(host, port, nbytes, max_seconds):
    """For each connection, send nbytes as fast as the peer takes them, then close."""
    deadline = time.monotonic() + max_seconds
    lsock = _listener(host, port, 64)
    lsock.settimeout(0.5)
    chunk = b"\xa5" * (256 * 1024)

    def serve(conn):
        conn.settimeout(1.0)
        sent = 0
        try:
            while sent < nbytes and time.monotonic() < deadline:
                view = memoryview(chunk)[: min(len(chunk), nbytes - sent)]
                try:
                    sent += conn.send(view)
                except socket.timeout:
                    continue
        except OSError:
            pass
        finally:
            conn.close()

    while time.monotonic() < deadline:
        try:
            conn, _ = lsock.accept()
        except socket.timeout:
            continue
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def main(argv):
    name = argv[0]
    if name == "holder":
        holder(argv[1], int(argv[2]), float(argv[3]))
    elif name == "firehose":
        firehose(argv[1], int(argv[2]), int(argv[3]), float(argv[4]))
    else:
        raise SystemExit("unknown helper %r" % name)


if __name__ == "__main__":
    main(sys.argv[1:])
