"""
The fast path's one gate: whether this process forwards with the gateway's
own transports and dispatch, or with Twisted's.

The fast path (L{etcdgw.fast.transport}, L{etcdgw.fast.dispatch}, the C
step) leans on Twisted internals that any Twisted release may change: where
a connection keeps the bytes queued for it, how it marks a close, the epoll
reactor's loop. Were queued bytes to move, the fast path would send ahead
of them: silent corruption of a gRPC stream. So L{check} looks first: the
installed Twisted's version must be in L{TESTED_TWISTED}; every name in
L{NEEDS} must be there, and each class attribute a slot hides (L{SLOTTED})
a plain value; and Twisted's write buffer must behave as
L{etcdgw.fast.transport._maySendNow} assumes (L{_probeWriteBuffer}).
L{start} makes the process's decision at the gateway's start: the fast
path, or Twisted's own transports and dispatch with one warning line that
names what is missing. L{enabled} reads the decision (and makes it, without
the reactor's part, where nothing called L{start}: tests, tools).

The gateway's accept loop (L{etcdgw.listen.GatewayPort}) is not part of the
fast path: it is there for behaviour (EMFILE back-off, connection caps) and
runs with either kind of transport. Its one Twisted internal
(C{_fromListeningDescriptor}, for sockets from systemd) is checked and named
here too, as are the two private uses outside Twisted, with their
fallbacks (L{verifyErrorText}).

This module owns the decision (C{_decision}); nothing else writes it.
"""

import importlib
import re

import attr

from twisted.logger import Logger

log = Logger(namespace="etcdgw.fast")

#: The Twisted versions the fast path was tested with: from the first
#: (inclusive) up to the second (exclusive), as (year, month). setup.py's
#: range is the same.
TESTED_TWISTED = ((25, 5), (27, 0))

#: Twisted names the fast path and the accept loop use (module, then the
#: dotted name in it). Private ones first: they are why this gate exists.
NEEDS = (
    # Queued bytes and closing (etcdgw.fast.transport._maySendNow, _copyPipeOut).
    ("twisted.internet.abstract", "FileDescriptor.write"),
    ("twisted.internet.abstract", "FileDescriptor.doWrite"),
    ("twisted.internet.abstract", "FileDescriptor.loseConnection"),
    ("twisted.internet.abstract", "FileDescriptor.loseWriteConnection"),
    # The transports (etcdgw.fast.transport).
    ("twisted.internet.tcp", "Connection.write"),
    ("twisted.internet.tcp", "Connection.doWrite"),
    ("twisted.internet.tcp", "Connection.connectionLost"),
    ("twisted.internet.tcp", "Connection.abortConnection"),
    ("twisted.internet.tcp", "Connection._aborting"),
    ("twisted.internet.tcp", "Server"),
    ("twisted.internet.tcp", "Client.createInternetSocket"),
    ("twisted.internet.tcp", "BaseClient._connectDone"),
    ("twisted.internet.tcp", "Connector._makeTransport"),
    ("twisted.internet.posixbase", "PosixReactorBase"),
    ("twisted.internet.main", "CONNECTION_DONE"),
    ("twisted.internet.main", "CONNECTION_LOST"),
    # Releasing a connection handed to a successor process without a FIN
    # (etcdgw.portable: shutdown() is skipped when this is false).
    ("twisted.internet.tcp", "_SocketCloser._shouldShutdown"),
    # The lean dispatch (etcdgw.fast.dispatch); the reactor's own
    # _poller and _selectables are checked on the reactor (REACTOR_NEEDS).
    ("twisted.internet.epollreactor", "EPollReactor.doPoll"),
    ("twisted.internet.epollreactor", "EPollReactor._doReadOrWrite"),
    ("twisted.internet.epollreactor", "EPollReactor._disconnectSelectable"),
    # The accept loop (etcdgw.listen): sockets passed by systemd; the port
    # number in its log lines (tcp.Server's own __init__ reads it too).
    ("twisted.internet.tcp", "Port._fromListeningDescriptor"),
    ("twisted.internet.unix", "Port._fromListeningDescriptor"),
    ("twisted.internet.tcp", "Port._realPortNumber"),
)
#: What the lean dispatch reads on the epoll reactor itself (the io_uring
#: ring, etcdgw.fast.ring: which descriptors it reads and writes, _reads and
#: _writes, before it takes a pair off epoll).
REACTOR_NEEDS = ("_poller", "_selectables", "_reads", "_writes")
#: Class attributes of Twisted's connections that the fast transports keep
#: in slots (etcdgw.fast.transport._CONNECTION_SLOTS, given their defaults
#: in FastTransport._initSlots): each must be a plain class attribute (a
#: property there would be bypassed by the slot).
SLOTTED = (
    "producer",
    "streamingProducer",
    "producerPaused",
    "connected",
    "disconnecting",
    "disconnected",
    "dataBuffer",
    "offset",
    "_writeDisconnecting",
    "_writeDisconnected",
)


@attr.s(frozen=True, auto_attribs=True)
class Verdict:
    """
    What L{check} found.

    @ivar version: the installed Twisted's version.
    @ivar problems: why the fast path may not be used, each one short
        phrase naming what is missing or wrong; empty when it may.
    """

    version: str
    problems: tuple = ()

    @property
    def fast(self):
        """
        Whether the fast path may be used.
        """
        return not self.problems

    def describe(self):
        """
        The problems in one line.
        """
        return "; ".join(self.problems)


def _version(text):
    found = re.match(r"(\d+)\.(\d+)", text or "")
    return (int(found.group(1)), int(found.group(2))) if found else None


_MISSING = object()


def _lookup(importModule, module, dotted, default=None):
    """
    The object at C{module}'s C{dotted} name, or C{default} when the module
    or any step is missing.
    """
    try:
        value = importModule(module)
    except ImportError:
        return default
    for name in dotted.split("."):
        value = getattr(value, name, _MISSING)
        if value is _MISSING:
            return default
    return value


def _plainClassAttribute(cls, name):
    """
    Whether C{name} is a class attribute of C{cls} (or a base) and a plain
    value, not a descriptor that computes or guards it.
    """
    for klass in cls.__mro__:
        if name in vars(klass):
            value = vars(klass)[name]
            return not hasattr(type(value), "__get__")
    return False


class _NoReactor:
    """
    Stands in for a reactor in L{_probeWriteBuffer}: registers nothing.
    """

    def addReader(self, reader):
        pass

    def removeReader(self, reader):
        pass

    def addWriter(self, writer):
        pass

    def removeWriter(self, writer):
        pass


def _probeWriteBuffer(fileDescriptor, maySendNow):
    """
    Check, on stand-alone descriptors of Twisted's C{FileDescriptor} class
    (no socket, a reactor that registers nothing), that what the fast path
    reads says what it assumes: bytes given to C{write} and not yet sent,
    and a close or half-close asked for, each make C{maySendNow} false.

    @return: what does not hold, or L{None}.
    """

    class Probe(fileDescriptor):
        _pipeSource = None

        def writeSomeData(self, data):
            return 1  # the kernel takes one byte at a time

    def probe():
        p = Probe(reactor=_NoReactor())
        p.connected = 1
        return p

    try:
        p = probe()
        if not maySendNow(p):
            return "an idle connection looks busy"
        p.write(b"abc")
        if maySendNow(p):
            return "bytes given to write() are not where the fast path looks"
        p.doWrite()
        if maySendNow(p):
            return "bytes left by doWrite() are not where the fast path looks"
        p = probe()
        p.loseWriteConnection()
        if maySendNow(p):
            return "a half-close asked for is not where the fast path looks"
        p = probe()
        p.loseConnection()
        if maySendNow(p):
            return "a close asked for is not where the fast path looks"
    except Exception as e:
        return f"probing Twisted's write buffer failed: {type(e).__name__}: {e}"
    return None


def check(reactor=None, importModule=importlib.import_module):
    """
    Look at the installed Twisted (and C{reactor}, when it is an epoll
    reactor): may the fast path be used?

    @param importModule: imports a module by name; a test gives a fake
        Twisted here.
    @rtype: L{Verdict}
    """
    problems = []
    twisted = _lookup(importModule, "twisted", "__version__")
    version = str(twisted) if twisted is not None else "unknown"
    parsed = _version(version)
    low, high = TESTED_TWISTED
    if parsed is None or not low <= parsed < high:
        problems.append(
            f"Twisted {version} is not one it was tested with "
            f"({low[0]}.{low[1]} up to, not including, {high[0]}.{high[1]})"
        )
    missing = [
        f"{m}.{d}" for m, d in NEEDS if _lookup(importModule, m, d, _MISSING) is _MISSING
    ]
    connection = _lookup(importModule, "twisted.internet.tcp", "Connection")
    if connection is not None:
        missing += [
            f"twisted.internet.tcp.Connection.{name} (as a plain class attribute)"
            for name in SLOTTED
            if not _plainClassAttribute(connection, name)
        ]
    epoll = _lookup(importModule, "twisted.internet.epollreactor", "EPollReactor")
    if reactor is not None and epoll is not None and isinstance(reactor, epoll):
        missing += [
            f"the epoll reactor's {name}" for name in REACTOR_NEEDS if not hasattr(reactor, name)
        ]
    if missing:
        problems.append("missing " + ", ".join(missing))
    try:
        from etcdgw.fast.transport import _maySendNow
    except Exception as e:  # a Twisted the transports cannot even be built on
        problems.append(f"the fast transports do not load: {type(e).__name__}: {e}")
    else:
        fileDescriptor = _lookup(importModule, "twisted.internet.abstract", "FileDescriptor")
        if fileDescriptor is not None:
            wrong = _probeWriteBuffer(fileDescriptor, _maySendNow)
            if wrong:
                problems.append(wrong)
    return Verdict(version, tuple(problems))


_decision = None


def enabled():
    """
    Whether this process forwards on the fast path: L{start}'s decision,
    or (where nothing called it) L{check}'s answer for the installed
    Twisted, made once.
    """
    global _decision
    if _decision is None:
        _decision = check()
    return _decision.fast


def start(reactor, verdict=None, ring=True):
    """
    Decide, at the gateway's start, whether it uses the fast path: with
    C{reactor}, Twisted's epoll reactor, its lean dispatch is applied; when
    the fast path may not be used, one warning line names why, and the
    gateway runs on Twisted's own transports and dispatch.

    @param verdict: what L{check} found (default: L{check} of the installed
        Twisted and C{reactor}).
    @param ring: whether joined pairs may be forwarded through io_uring
        (L{etcdgw.fast.ring}; C{--forward=epoll} says no): where the kernel
        refuses it, the reactor's first turn says why in one line and stays
        on epoll.
    @rtype: L{Verdict}
    """
    global _decision
    if verdict is None:
        verdict = check(reactor)
    _decision = verdict
    if verdict.fast:
        from etcdgw.fast.dispatch import leanDispatch

        leanDispatch(reactor, useRing=ring)
    else:
        log.warn(
            "fast path off, forwarding with Twisted's own transports and dispatch "
            "(the same bytes, more CPU per request): {problems}",
            problems=verdict.describe(),
            twistedVersion=verdict.version,
        )
    return verdict


def verifyErrorText(code, importModule=importlib.import_module):
    """
    OpenSSL's text for certificate verify error C{code} (as a pyOpenSSL
    verify callback gets it), for L{etcdgw.verify}'s messages.

    No public API maps a code to OpenSSL's text (pyOpenSSL builds it only
    inside C{X509StoreContextError}), so this reads OpenSSL's
    C{X509_verify_cert_error_string} through pyOpenSSL's private binding,
    C{OpenSSL._util}. Where that is gone or fails: the code's public name in
    pyOpenSSL (C{SSL.X509VerificationCodes}), else the number.
    """
    text = _lookup(importModule, "OpenSSL._util", "lib.X509_verify_cert_error_string")
    ffi = _lookup(importModule, "OpenSSL._util", "ffi")
    if text is not None and ffi is not None:
        try:
            return ffi.string(text(code)).decode()
        except Exception:
            pass
    codes = _lookup(importModule, "OpenSSL.SSL", "X509VerificationCodes")
    for name in dir(codes) if codes is not None else ():
        if name.startswith("ERR_") and getattr(codes, name) == code:
            return f"{name[4:].lower().replace('_', ' ')} (verify error {code})"
    return f"verify error {code}"
