"""
The proxy: accept a client, pick an endpoint, dial it, then join the two
connections byte for byte.

The proxy decides nothing about endpoints: it asks the pool for one
(L{etcdgw.pool.UpstreamPool.pick}), reports each dial's outcome to the
monitor (L{etcdgw.monitor.Monitor.dialFailed},
L{etcdgw.monitor.Monitor.dialSucceeded}), and counts its dials and
connections on the pool. Whether a connection reached the gateway itself is
the self-loop guard's question (L{etcdgw.selfloop.SelfLoopGuard}). Each
joined pair is registered with the connection registry
(L{etcdgw.connections.ConnectionRegistry}), once when joined and once when
closed, which may close it (L{ClientProtocol.reset}) when its member goes
bad; nothing is done per forwarded chunk.
"""

import collections

from zope.interface import implementer

from twisted.internet import defer, error
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from etcdgw.connections import ConnectionRegistry, setMemberSocketOptions
from etcdgw.dial import connected, describeFailure, dial, isLocalResourceError
from etcdgw.monitor import legacyMonitor
from etcdgw.selfloop import SelfLoopError, SelfLoopGuard
from etcdgw.fast import join, settle, writerFor


def _noDelay(transport):
    if getattr(transport, "fast", False):
        return  # set when the socket was made
    try:
        transport.setTcpNoDelay(True)
    except (AttributeError, OSError):
        pass  # not TCP (a unix socket) or already closed


def _keepAlive(transport):
    """
    Keep-alive and C{TCP_USER_TIMEOUT} on a member connection
    (L{setMemberSocketOptions}): so a member that vanished from the network
    under it is noticed, and the client reset.
    """
    if getattr(transport, "fast", False):
        return  # set when the socket was made
    try:
        setMemberSocketOptions(transport.getHandle())
    except AttributeError:
        pass  # a test transport


@implementer(IHalfCloseableProtocol)
class _Side(Protocol):
    """
    One side of a joined pair: forwards what it reads to its peer, passes a
    half-close through, and closes when both directions are done.
    """

    # Slots: a gateway holds two of these per client, often for hours.
    __slots__ = (
        "factory",
        "transport",
        "connected",
        "peer",
        "state",
        "_write",
        "_readDone",
        "_writeDone",
    )

    def __init__(self):
        self.factory = self.transport = self.peer = self.state = self._write = None
        self.connected = 0
        self._readDone = self._writeDone = False

    def readConnectionLost(self):
        self._readDone = True
        if self.peer is not None:
            self.peer.transport.loseWriteConnection()
        self._maybeClose()

    def writeConnectionLost(self):
        self._writeDone = True
        self._maybeClose()

    def _maybeClose(self):
        if self._readDone and self._writeDone:
            self.transport.loseConnection()

    def _closePeer(self, reason):
        peer = self.peer
        if peer is None:
            return
        self.peer = None
        self._write = None
        peer.peer = None
        peer._write = None
        if peer.transport is None or not peer.transport.connected:
            return
        if reason.check(error.ConnectionDone):
            peer.transport.loseConnection()  # flush what is queued, then close
        else:
            peer.transport.abortConnection()  # a reset: pass it on at once


class UpstreamProtocol(_Side):
    """
    The gateway's connection to an etcd member.
    """

    __slots__ = ("client",)

    def __init__(self, client):
        super().__init__()
        self.client = client

    def connectionMade(self):
        _keepAlive(self.transport)
        connected(self)

    def dataReceived(self, data):
        # Only when the transports are not joined (see ClientProtocol._connected).
        if self._write is not None:
            self.state.fromUpstream.n += len(data)
            self._write(data)

    def connectionLost(self, reason):
        if self.state is not None:
            factory = self.client.factory
            factory.connections.unregister(self.client)
            factory.pool.connectionClosed(self.state)
        self.client = None
        self._closePeer(reason)


class ClientProtocol(_Side):
    """
    A client's connection to the gateway.
    """

    __slots__ = ("_dialing", "_tried", "_retry", "_accepted", "_localFailures")
    log = Logger()

    #: Whether this client, while its member is still dialled, may be
    #: handed to a successor process to dial for it (L{etcdgw.portable}):
    #: it has read nothing yet.
    portable = True

    #: The first wait before dialling again when the gateway itself is out
    #: of descriptors or buffers; doubled each time, up to a second.
    localRetryDelay = 0.05
    #: How long an accepted client may wait for the gateway to have a
    #: descriptor for its member connection before it is closed.
    localRetryWindow = 30.0

    def __init__(self):
        super().__init__()
        self._dialing = self._retry = None
        self._localFailures = 0

    def connectionMade(self):
        self.transport.pauseProducing()
        _noDelay(self.transport)
        self._tried = []
        self._accepted = self.factory.reactor.seconds()
        self.factory.clientConnected(self)
        self._dial()

    def _dial(self):
        factory = self.factory
        state = factory.pool.pick(exclude=self._tried)
        if state is None:
            factory.refuse(self, self._tried)
            return
        self._tried.append(state.endpoint)
        factory.pool.countDialAttempt(state)
        d = self._dialing = self._dialMember(state.endpoint)
        d.addCallbacks(
            self._connected, self._dialFailed, callbackArgs=(state,), errbackArgs=(state,)
        )
        d.addErrback(self._failed)

    def _dialMember(self, endpoint):
        """
        Dial C{endpoint} for this client (L{etcdgw.originate} makes it a TLS
        dial).

        @return: the cancellable Deferred of L{etcdgw.dial.dial}.
        """
        factory = self.factory
        return dial(
            factory.reactor, endpoint, lambda addr: UpstreamProtocol(self), factory.dialTimeout
        )

    def _failed(self, reason):
        """
        Handling this client's dial raised: close this client only, logged.
        """
        self._dialing = None
        self.log.failure(
            "error handling client {client}; closing that client only",
            reason,
            client=_describePeer(self.transport),
        )
        if self.connected and self.transport is not None:
            self.transport.abortConnection()

    def _dialFailed(self, reason, state):
        self._dialing = None
        if reason.check(defer.CancelledError) or not self.connected:
            return  # the client went away while we dialled
        if isLocalResourceError(reason):
            self._localFailure(reason, state)
            return
        self.factory.monitor.dialFailed(state, reason)
        self._dial()

    def _localFailure(self, reason, state):
        """
        The gateway itself could not open a socket (out of descriptors or
        buffers): not the member's fault, so it stays up. The client waits,
        paused, and the dial is tried again with a growing delay, for up to
        L{localRetryWindow} from its arrival; the listening port pauses
        accepting meanwhile, as it meets the same shortage.
        """
        # By key: discovery or sync may have replaced the pool's endpoint
        # (new priority or weight, same address) while we dialled it.
        key = state.endpoint.key
        self._tried = [e for e in self._tried if e.key != key]
        factory = self.factory
        waited = factory.reactor.seconds() - self._accepted
        delay = min(1.0, self.localRetryDelay * 2**self._localFailures)
        self._localFailures += 1
        if waited + delay > max(factory.dialTimeout, self.localRetryWindow):
            factory.refused += 1
            self.log.error(
                "cannot dial {endpoint} for client {client}: {reason} (the gateway is "
                "out of resources; the member is not marked down); closing the client "
                "after {waited:.2f}s",
                endpoint=str(state.endpoint),
                client=_describePeer(self.transport),
                reason=describeFailure(reason),
                waited=waited,
            )
            self.transport.loseConnection()
            return
        self._retry = factory.reactor.callLater(delay, self._dialAgain)
        factory.starve(self)

    def _dialAgain(self):
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        self.factory.fed(self)
        self._dial()

    def _connected(self, upstream, state):
        self._dialing = None
        if not self.connected:
            upstream.transport.abortConnection()  # the client left meanwhile
            return
        factory = self.factory
        loop = factory.guard.reachedItself(upstream.transport)
        if loop is not None:
            # What the endpoint's address reaches now is the gateway itself
            # (a member list, DNS or SRV answer that changed since start):
            # forwarding there would loop until descriptors run out.
            upstream.transport.abortConnection()
            self._dialFailed(Failure(SelfLoopError(f"self-loop: {loop}")), state)
            return
        factory.monitor.dialSucceeded(state)
        del self._tried
        upstream.state = self.state = state
        factory.pool.connectionOpened(state)
        # Linked first: should what follows raise, closing this client (see
        # _failed) closes the member connection too.
        upstream.peer = self
        self.peer = upstream
        factory.connections.register(self)
        _noDelay(upstream.transport)
        self._joinTransports(upstream, state)

    def _joinTransports(self, upstream, state):
        """
        Join this client's transport and C{upstream}'s, each the other's
        producer, and resume reading (L{etcdgw.originate} joins its own way).
        """
        self._write = writerFor(upstream.transport)
        upstream._write = writerFor(self.transport)
        # With the gateway's own transports, data then flows from socket to
        # socket without calling either protocol; they still hear of
        # half-closes and closes.
        join(self.transport, upstream.transport, state.toUpstream, state.fromUpstream)
        self.transport.registerProducer(upstream.transport, True)
        upstream.transport.registerProducer(self.transport, True)
        self.transport.resumeProducing()
        settle(self.transport, upstream.transport)

    def dataReceived(self, data):
        # Only when the transports are not joined (see _connected).
        if self._write is not None:
            self.state.toUpstream.n += len(data)
            self._write(data)

    def reset(self):
        """
        Close this client's connection and its member connection, both with
        a reset (the connection registry's: the member went bad, or the
        pair is moved): the client notices at once and reconnects.
        """
        peer = self.peer
        self.transport.abortConnection()
        if peer is not None and peer.transport is not None:
            peer.transport.abortConnection()

    def connectionLost(self, reason):
        self.connected = 0
        if self.state is not None:
            self.factory.connections.unregister(self)
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
            self.factory.fed(self)
        if self._dialing is not None:
            dialing, self._dialing = self._dialing, None
            dialing.cancel()
        self.factory.clientDisconnected(self)
        self._closePeer(reason)


def _describePeer(transport):
    try:
        peer = transport.getPeer()
    except Exception:
        return "?"
    host = getattr(peer, "host", None)
    if host is None:
        return str(getattr(peer, "name", peer) or "unix")
    return f"{host}:{peer.port}"


class GatewayFactory(Factory):
    """
    Accepts client connections and forwards each to an endpoint of C{pool}.

    @ivar pool: the L{etcdgw.pool.UpstreamPool} endpoints are picked from.
    @ivar monitor: the L{etcdgw.monitor.Monitor} dial outcomes go to.
    @ivar guard: the L{etcdgw.selfloop.SelfLoopGuard} each member connection
        passes before it is joined to its client.
    @ivar connections: the L{etcdgw.connections.ConnectionRegistry} each
        joined pair is registered with.
    @ivar clients: the client connections open now.
    @ivar accepted: client connections accepted since start.
    @ivar refused: clients closed because no endpoint was up.
    @ivar starved: accepted clients waiting, in arrival order, for the
        gateway to have a descriptor for their member connection. While any
        waits, the listening port accepts nothing new (see
        L{etcdgw.listen.GatewayPort}), and each connection that closes lets
        the first of them dial at once: new arrivals cannot take the
        descriptors that waiting clients need.
    """

    protocol = ClientProtocol
    noisy = False
    log = Logger()

    def __init__(self, pool, reactor, dialTimeout, monitor=None, guard=None, connections=None):
        """
        @param monitor: the gateway's monitor (by default the pool's, for
            the old wiring: see L{etcdgw.monitor.legacyMonitor}).
        @param guard: the gateway's self-loop guard (by default one that
            knows no listener).
        @param connections: the gateway's connection registry (by default
            one that only keeps count: it acts only once started as a
            service).
        """
        self.pool = pool
        self.reactor = reactor
        self.dialTimeout = dialTimeout
        self.monitor = monitor if monitor is not None else legacyMonitor(pool, reactor)
        self.guard = guard if guard is not None else SelfLoopGuard()
        self.connections = (
            connections
            if connections is not None
            else ConnectionRegistry(pool, self.monitor, reactor)
        )
        self.clients = set()
        self.accepted = 0
        self.refused = 0
        self.starved = collections.OrderedDict()
        self._idleWaiters = []

    #: Clients refused (no endpoint up) within this many seconds of the last
    #: logged refusal are counted into the next line rather than logged one
    #: by one: a whole fleet of clients retrying against a cluster that is
    #: down must not flood the log.
    refusalLogInterval = 1.0
    _lastRefusalLog = float("-inf")
    _unloggedRefusals = 0

    def refuse(self, client, tried):
        """
        Close C{client}: no endpoint is up. Logged at error level.
        """
        self.refused += 1
        now = self.reactor.seconds()
        if now - self._lastRefusalLog < self.refusalLogInterval:
            self._unloggedRefusals += 1
        else:
            self.log.error(
                "no endpoint is up: closing client {client} (tried {tried}); "
                "{more} more clients closed since the last such line",
                client=_describePeer(client.transport),
                tried=[str(e) for e in tried] or "none",
                more=self._unloggedRefusals,
            )
            self._lastRefusalLog = now
            self._unloggedRefusals = 0
        client.transport.loseConnection()

    def starve(self, client):
        self.starved[client] = None

    def fed(self, client):
        self.starved.pop(client, None)

    def clientConnected(self, client):
        self.accepted += 1
        self.clients.add(client)

    def clientDisconnected(self, client):
        self.clients.discard(client)
        if self.starved:
            # Descriptors were freed: the longest-waiting client dials now.
            next(iter(self.starved))._dialAgain()
        if not self.clients:
            waiters, self._idleWaiters = self._idleWaiters, []
            for d in waiters:
                d.callback(None)

    def whenIdle(self):
        """
        A Deferred that fires once no client connection is open.
        """
        if not self.clients:
            return defer.succeed(None)
        d = defer.Deferred()
        self._idleWaiters.append(d)
        return d
