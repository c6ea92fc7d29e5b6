"""
Moved: the gateway's transports are the fast path's, in L{etcdgw.fast}
(L{etcdgw.fast.transport}, behind the gate L{etcdgw.fast.gate}). The names
below stay importable from here only until every importer (the proxy, the
gateway's start) imports them from L{etcdgw.fast}.
"""

from etcdgw.fast import RELAY_IN_C, join, writerFor

__all__ = ["RELAY_IN_C", "join", "writerFor"]
