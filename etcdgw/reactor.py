"""
Moved: the lean epoll dispatch is the fast path's, in
L{etcdgw.fast.dispatch}, applied by the gate at start (L{etcdgw.fast.start}).
L{leanDispatch} stays importable from here only until the plugin's start
calls L{etcdgw.fast.start} itself.
"""

from etcdgw.fast import start


def leanDispatch(reactor):
    """
    The fast path's start (L{etcdgw.fast.start}): check the installed
    Twisted once, then apply the lean dispatch to C{reactor}, or log one
    warning and keep Twisted's own transports and dispatch.

    @return: whether the fast path is on.
    """
    return start(reactor).fast
