"""
systemd's notify protocol, spoken directly: C{READY=1} once the gateway
listens, C{STATUS=} with the endpoint counts whenever the pool changes,
C{WATCHDOG=1} pings when systemd asks for them, C{STOPPING=1} on shutdown.

The protocol is one datagram per message, C{KEY=VALUE} lines, sent to the
unix datagram socket named by C{$NOTIFY_SOCKET}; a name starting with C{@}
is in the abstract namespace (a leading NUL byte). No library is needed.
"""

import os
import socket

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger


class SystemdNotifier:
    """
    Sends notify messages to one socket address. Never raises: systemd being
    away must not stop the gateway; the first failure is logged.

    @ivar address: the socket address as given in C{$NOTIFY_SOCKET}.
    """

    log = Logger()

    def __init__(self, address):
        self.address = address
        self._target = "\0" + address[1:] if address.startswith("@") else address
        self._socket = None
        self._failed = False

    @classmethod
    def fromEnvironment(cls, environ=None):
        """
        The notifier for C{$NOTIFY_SOCKET}, or L{None} when it is unset or is
        not a unix socket address (systemd also accepts C{vsock:}, which we
        do not).
        """
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET", "")
        if not address.startswith(("/", "@")):
            if address:
                cls.log.warn(
                    "NOTIFY_SOCKET={address} is not a unix socket path or "
                    "@abstract name; not notifying systemd",
                    address=address,
                )
            return None
        return cls(address)

    def notify(self, **fields):
        """
        Send one message, e.g. C{notify(READY="1", STATUS="...")}.

        @return: L{True} when the datagram was sent.
        """
        message = "\n".join(f"{key}={value}" for key, value in fields.items())
        try:
            if self._socket is None:
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                )
            self._socket.sendto(message.encode("utf-8"), self._target)
        except OSError as e:
            if not self._failed:
                self._failed = True
                self.log.warn(
                    "cannot notify systemd at {address}: {error}",
                    address=self.address,
                    error=e.strerror or str(e),
                )
            return False
        self._failed = False
        return True

    def close(self):
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def watchdogInterval(environ=None, pid=None):
    """
    How often to send C{WATCHDOG=1}: half of C{$WATCHDOG_USEC} (as
    sd_watchdog_enabled(3) advises), in seconds; L{None} when the watchdog is
    off or C{$WATCHDOG_PID} names another process.
    """
    environ = os.environ if environ is None else environ
    pid = os.getpid() if pid is None else pid
    usec = environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    watchdogPid = environ.get("WATCHDOG_PID")
    if watchdogPid and watchdogPid != str(pid):
        return None
    try:
        microseconds = int(usec)
    except ValueError:
        return None
    if microseconds <= 0:
        return None
    return microseconds / 2e6


def describePool(pool, listening=None):
    """
    The C{STATUS=} text: endpoint counts, and where clients connect.
    """
    up = pool.upCount()
    total = len(pool.endpoints)
    text = f"{up}/{total} endpoints up"
    if up == 0:
        text += " (refusing clients)"
    if listening:
        text += f"; listening on {listening}"
    return text


class SystemdNotifyService(Service):
    """
    Tells systemd how the gateway is doing.

    @param notifier: a L{SystemdNotifier}.
    @param pool: the L{etcdgw.pool.UpstreamPool}, observed for C{STATUS=}.
    @param listener: the listening service; C{READY=1} is sent once its
        C{whenListening()} fires.
    @param clock: an L{IReactorTime} for the watchdog pings.
    @param watchdog: seconds between C{WATCHDOG=1} pings, or L{None}.
    @param listeners: the listeners whose loss stops the watchdog pings
        (default: C{listener}): a gateway that no longer accepts clients is
        not alive, and systemd restarts it.
    @param takeover: in a successor, its L{etcdgw.takeover.Takeover}:
        C{READY=1} (with C{MAINPID=} this process, which becomes the
        service's main process) waits for its commit.
    @ivar handedOver: set once a successor took this gateway over: its
        stop then says nothing to systemd (no C{STOPPING=1}: the service
        goes on, in the successor).
    """

    log = Logger()

    handedOver = False

    def __init__(self, notifier, pool, listener, clock, watchdog=None, listeners=None,
                 takeover=None):
        self.notifier = notifier
        self.pool = pool
        self.listener = listener
        self.listeners = [listener] if listeners is None else list(listeners)
        self.clock = clock
        self.watchdog = watchdog
        self.ready = False
        self._lastStatus = None
        self._loop = None
        self._withheld = None
        self.takeover = takeover

    def startService(self):
        super().startService()
        self.pool.addObserver(self._poolChanged)
        ready = self.listener.whenListening()
        if self.takeover is not None:
            ready.addCallback(self._afterCommit)
        ready.addCallbacks(self._listening, lambda f: None)
        if self.watchdog is not None:
            self._loop = task.LoopingCall(self._ping)
            self._loop.clock = self.clock
            self._loop.start(self.watchdog, now=True)

    def _afterCommit(self, port):
        done = defer.Deferred()

        def committed(result):
            done.callback(port)
            return result

        self.takeover.committed.addCallback(committed)
        return done

    def _ping(self):
        """
        C{WATCHDOG=1}, unless a listener is gone: then the pings stop (logged
        once, with C{STATUS=} saying why) and systemd's watchdog restarts the
        gateway.
        """
        try:
            problems = [p for p in (listener.problem() for listener in self.listeners) if p]
        except Exception:
            # A failing check must not stop the loop (nor, on its own,
            # the pings).
            self.log.failure("cannot check the listeners")
            problems = []
        if not problems:
            self._withheld = None
            self.notifier.notify(WATCHDOG="1")
            return
        if self._withheld != problems:
            self._withheld = problems
            self.log.critical(
                "not alive: {problems}; watchdog pings stop, so systemd restarts "
                "the gateway",
                problems="; ".join(problems),
            )
            self.notifier.notify(STATUS="not accepting clients: " + "; ".join(problems))

    def _listening(self, port):
        if not self.running:
            return
        self.ready = True
        self._lastStatus = describePool(self.pool, self.listener.describe())
        if not self.notifier.notify(
            READY="1", STATUS=self._lastStatus, MAINPID=os.getpid()
        ):
            return
        self.log.info(
            "told systemd: ready ({status}){watchdog}",
            status=self._lastStatus,
            watchdog=(
                f"; watchdog ping every {self.watchdog:g}s" if self.watchdog else ""
            ),
        )

    def _poolChanged(self, pool):
        if not self.ready:
            return
        status = describePool(pool, self.listener.describe())
        if status != self._lastStatus:
            self._lastStatus = status
            self.notifier.notify(STATUS=status)

    def stopService(self):
        super().stopService()
        self.pool.removeObserver(self._poolChanged)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if not self.handedOver:
            self.notifier.notify(STOPPING="1", STATUS="stopping: draining connections")
        self.notifier.close()
