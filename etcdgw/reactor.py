"""
Moved: the lean epoll dispatch is the fast path's, in
L{etcdgw.fast.dispatch}, applied by the gate at start (L{etcdgw.fast.start}).
These names stay importable from here only until the gateway's start
(L{etcdgw.gateway}) calls L{etcdgw.fast.start} itself and its test looks
for L{etcdgw.fast.dispatch._doPoll}.
"""

from etcdgw.fast import start
from etcdgw.fast.dispatch import _doPoll

__all__ = ["_doPoll", "leanDispatch"]


def leanDispatch(reactor):
    """
    The fast path's start (L{etcdgw.fast.start}): check the installed
    Twisted once, then apply the lean dispatch to C{reactor}, or log one
    warning and keep Twisted's own transports and dispatch.

    @return: whether the fast path is on.
    """
    return start(reactor).fast
