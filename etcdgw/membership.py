"""
Endpoints that follow the cluster's membership (C{--sync-interval}): every
interval, the member list is read from a usable member (C{POST
/v3/cluster/member/list} on etcd's JSON gateway, over TLS for TLS endpoints)
and the pool's endpoints are made to match the members' client URLs, so
C{etcdctl member add/remove} reaches every application with nothing to
change on their side.

What a member list says is learned data, and never outranks the
configuration: it is used only from a member that reported the cluster ID
the configured endpoints pinned (L{etcdgw.etcdhealth.ClusterIdentity}); an
endpoint it adds gets no client until it has itself reported that ID (this
service asks it, so the rule holds without C{--health-check=etcd}); it
cannot turn an https endpoint into http, nor add http endpoints to a cluster
configured with https; its addresses pass the checks of C{--endpoints} and
may not be the gateway's own listen address; and the endpoints awaiting
their check are bounded (L{MembershipSync}).
"""

import ipaddress

import attr

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from etcdgw.duration import formatDuration
from etcdgw.endpoint import EndpointError, formatHostPort, parseEndpoint
from etcdgw.etcdhealth import ClusterIdentity, EtcdHTTPError, describeCheckFailure
from etcdgw.periodic import PeriodicService
from etcdgw.selfloop import isLocalAddress
from etcdgw.sources import IEndpointSource

#: The least number of learned endpoints that may await their cluster ID
#: check at once (see L{MembershipSync}).
MIN_UNPROVEN = 3


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Merge:
    """
    What a member list means for the pool.

    @ivar endpoints: the new endpoint list, or L{None} when the list must be
        ignored.
    @ivar skipped: C{(member, why)} pairs for members not used.
    @ivar refusal: why the list is ignored, when C{endpoints} is L{None}.
    @ivar heldBack: new endpoints left out by the bound, for a later round.
    """

    endpoints: tuple
    skipped: tuple = ()
    refusal: str = None
    heldBack: tuple = ()


def _memberName(member):
    return member.get("name") or f"ID {member.get('ID', '?')}"


def mergeMembers(
    members, current, tlsRequired=False, refuse=None, unproven=(), maxUnproven=None
):
    """
    The endpoint list that matches C{members} (the C{members} array of
    etcd's member list), given the C{current} endpoints.

    Each started, voting member gives one endpoint: the client URL already
    in C{current} if it has one (keeping its priority and weight, and its
    TLS: an https endpoint stays https whatever the list says), else its
    first valid one. Members with no client URL yet (added, not started) and
    learners (which do not serve clients) are skipped, and so are client
    URLs that fail the checks of C{--endpoints}, plain http ones when
    C{tlsRequired} (the cluster is configured with https), and those that
    C{refuse} (a callable: endpoint -> why, or L{None}) refuses. Kept
    endpoints stay in their order; new ones follow in member-list order,
    as many as C{maxUnproven} allows: the endpoints of C{unproven} (keys of
    learned endpoints that have not proven their cluster ID yet) that the
    list keeps, plus the new ones, are at most C{maxUnproven}; the others
    are held back. A list that would leave none of the current endpoints is
    refused (a member list of a different cluster, or members advertising
    addresses the gateway cannot reach are more likely than a whole cluster
    replaced between two syncs).

    @rtype: L{Merge}
    """
    byKey = {e.key: e for e in current}
    chosen = []
    skipped = []
    for member in members:
        if not isinstance(member, dict):
            skipped.append(("?", f"not an object: {_short(repr(member))}"))
            continue
        name = _short(str(_memberName(member)))
        if member.get("isLearner"):
            skipped.append((name, "a learner (serves no clients)"))
            continue
        urls = member.get("clientURLs") or []
        if not isinstance(urls, list):
            urls = [urls]
        if not urls:
            skipped.append((name, "no client URL yet (not started)"))
            continue
        parsed = []
        for url in urls:
            url = _short(str(url))
            try:
                # A member advertises full URLs: no default port here.
                endpoint = parseEndpoint(url, defaultPort=None)
            except EndpointError as e:
                skipped.append((name, f"bad client URL: {e}"))
                continue
            if tlsRequired and not endpoint.tls:
                skipped.append(
                    (name, f"client URL {url} is plain http in a cluster configured "
                           "with https: TLS is never downgraded")
                )
                continue
            why = refuse(endpoint) if refuse is not None else None
            if why is not None:
                skipped.append((name, f"client URL {url} refused: {why}"))
                continue
            parsed.append(endpoint)
        if not parsed:
            continue
        known = [e for e in parsed if e.key in byKey]
        if known:
            old = byKey[known[0].key]
            endpoint = old if old.tls else attr.evolve(old, tls=known[0].tls)
        else:
            endpoint = parsed[0]
        chosen.append(endpoint)
    if not chosen:
        return Merge(None, tuple(skipped), "it names no usable client URL")
    if current and not any(e.key in byKey for e in chosen):
        return Merge(
            None,
            tuple(skipped),
            "it would remove every current endpoint "
            f"({', '.join(str(e) for e in current)})",
        )
    keys = {e.key for e in chosen}
    newByKey = {e.key: e for e in chosen}
    kept = [newByKey[e.key] for e in current if e.key in keys]
    added = []
    for e in chosen:
        if e.key not in byKey and e.key not in {a.key for a in added}:
            added.append(e)
    heldBack = ()
    if maxUnproven is not None:
        room = max(0, maxUnproven - len(set(unproven) & keys))
        added, heldBack = added[:room], tuple(added[room:])
    return Merge(tuple(kept + added), tuple(skipped), heldBack=heldBack)


def _short(text, size=200):
    return text if len(text) <= size else text[:size] + "..."


def _address(host):
    """
    The IP address C{host} is a literal of (IPv4-mapped ones unmapped, the
    scope ID dropped), or L{None} for a host name.
    """
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if getattr(address, "ipv4_mapped", None) is not None:
        address = address.ipv4_mapped
    return address


def ownAddressCheck(listen, isLocal=isLocalAddress):
    """
    A check, for member lists, of endpoints that are the gateway's own
    C{listen} address (a L{etcdgw.listen.ListenAddress}): a callable taking
    an endpoint and returning why it is refused, or L{None}. Only IP
    literals are judged (a host name would have to be resolved on the
    reactor thread; the dial-time guard covers every endpoint): on the
    listening port, the listen address itself, or, when the gateway listens
    on every interface, any address of this machine.
    """
    if listen is None or not listen.isTCP or not listen.port:
        return lambda endpoint: None
    listenAddress = None if listen.wildcard else _address(listen.host)

    def check(endpoint):
        if endpoint.port != listen.port:
            return None
        address = _address(endpoint.host)
        if address is None:
            return None
        if listen.wildcard:
            own = address.is_loopback or isLocal(str(address))
        else:
            own = address == listenAddress
        if not own:
            return None
        return (
            f"{formatHostPort(endpoint.host, endpoint.port)} is the gateway's own "
            f"listen address ({listen}): it would forward clients to itself"
        )

    return check


@implementer(IEndpointSource)
class MembershipSync(PeriodicService):
    """
    Every C{interval} seconds, read the member list from a usable member
    through C{client} (an L{etcdgw.etcdhealth.EtcdClient}) and propose to
    the pool the endpoints that match it (learned data: see
    L{etcdgw.pool.UpstreamPool.replaceEndpoints}); then ask each endpoint
    added from a member list that has not reported its cluster ID yet for
    it (C{POST /v3/maintenance/status}), so it gets clients once it proves
    it is of the gateway's cluster. The endpoint source of
    C{--sync-interval} (an L{etcdgw.sources.IEndpointSource}).

    @param identity: the L{etcdgw.etcdhealth.ClusterIdentity} the cluster
        IDs go to, shared with the etcd health checks when they run (a new
        one of C{pool} by default). A member list is used only from a member
        that reported the pinned cluster ID (in the list's own header).
    @param seeds: the configured endpoints (default: the pool's at
        construction). When any is https, learned endpoints must be too.
        Their number sets the bound: at most C{max(len(seeds),
        MIN_UNPROVEN)} learned endpoints await their cluster ID check at
        once, so a round adds at most that many, fewer while earlier ones
        are still unproven. A real cluster grows one C{member add} at a
        time, and learning a cluster of up to 7 from one seed takes at most
        two rounds; a hostile list can only ever put that many endpoints in
        the pool that are not of the cluster (none of them gets a client).
    @param refuse: a check of learned endpoints (endpoint -> why it is
        refused, or L{None}), e.g. L{ownAddressCheck}.
    """

    log = Logger()
    runAtStart = True
    roundName = "membership sync"
    kind = "member-list"

    def __init__(
        self, pool, reactor, interval, client, identity=None, seeds=None, refuse=None
    ):
        super().__init__(reactor, interval)
        self.pool = pool
        self.reactor = reactor
        self.client = client
        self.identity = identity if identity is not None else ClusterIdentity(pool)
        seeds = list(pool.endpoints if seeds is None else seeds)
        self.tlsRequired = any(e.tls for e in seeds)
        self.maxUnproven = max(len(seeds), MIN_UNPROVEN)
        self._refuse = refuse
        self._lastSkipped = None
        self._lastHeldBack = ()
        self._ignored = set()
        self._waiting = set()
        self.rounds = 0
        self.failures = 0
        self.lastResult = "no read since start"

    def syncNow(self):
        """
        Read the member list once (unless a read is running) and apply it.

        @return: a Deferred firing when done; never failing.
        """
        return self.runNow()

    def refreshNow(self):
        """
        Read the member list now (SIGHUP); while a read runs, wait for it.

        @return: a Deferred firing, never failing, with one line saying what
            the round did.
        """
        summary = defer.Deferred()

        def done(_):
            summary.callback(f"membership sync: {self.lastResult}")

        # The round's own Deferred is shared (the loop waits on it): only
        # observe it, its result stays None.
        self.runNow().addBoth(done)
        return summary

    def describe(self):
        """
        One line for the status page: how often the list is read, and what
        the last read did.
        """
        return (
            f"member list read every {formatDuration(self.interval)}: {self.lastResult}"
        )

    def runRound(self):
        d = self._sync()

        def failed(reason):
            if not reason.check(defer.CancelledError):
                self._failed(f"round failed ({describeCheckFailure(reason)})")
            return reason  # logged by PeriodicService

        def counted(result):
            if not (isinstance(result, Failure) and result.check(defer.CancelledError)):
                self.rounds += 1
            return result

        return d.addErrback(failed).addBoth(counted)

    def _failed(self, lastResult):
        """
        This round found no member list it could use: counted, and said by
        L{refreshNow} and L{describe}.
        """
        self.failures += 1
        self.lastResult = lastResult

    def _propose(self, endpoints, reason):
        """
        The one way this source changes the pool: propose a whole list, as
        learned data.

        @return: C{(added, removed)}, as the pool says.
        """
        return self.pool.replaceEndpoints(list(endpoints), reason=reason, learned=True)

    @defer.inlineCallbacks
    def _sync(self):
        keys = {s.endpoint.key for s in self.pool.states()}
        self._ignored = {k for k in self._ignored if k[0] in keys}
        self._waiting &= keys
        yield self._readMembers()
        yield self._proveLearned()

    @defer.inlineCallbacks
    def _readMembers(self):
        candidates = [s.endpoint for s in self.pool.usable()]
        if not candidates:
            self._failed("skipped: no usable endpoint to ask")
            self.log.warn("membership sync skipped: no usable endpoint to ask")
            return
        errors = []
        for endpoint in candidates:
            try:
                answer = yield self.client.requestJSON(
                    endpoint, b"POST", "/v3/cluster/member/list", {}
                )
            except defer.CancelledError:
                raise
            except Exception as e:
                errors.append(f"{endpoint}: {describeCheckFailure(Failure(e))}")
                continue
            why = self._apply(endpoint, answer)
            if why is None:
                return
            errors.append(f"{endpoint}: {why}")
        self._failed(f"no member list could be used: {'; '.join(errors)}")
        self.log.warn(
            "membership sync: no member list could be used: {errors}",
            errors="; ".join(errors),
        )

    def _proveLearned(self):
        """
        Ask every learned endpoint that has not reported a cluster ID yet
        for it.
        """
        checks = []
        for state in self.pool.states():
            if not state.learned or state.clusterID is not None:
                continue
            endpoint = state.endpoint
            d = self.client.requestJSON(endpoint, b"POST", "/v3/maintenance/status", {})
            d.addCallbacks(
                self._proved,
                self._notProved,
                callbackArgs=(endpoint,),
                errbackArgs=(endpoint,),
            )
            checks.append(d)
        return defer.DeferredList(checks, consumeErrors=True)

    def _proved(self, answer, endpoint):
        header = answer.get("header")
        clusterID = header.get("cluster_id") if isinstance(header, dict) else None
        if clusterID is None:
            self._notProved(Failure(EtcdHTTPError("its status names no cluster ID")), endpoint)
            return
        self._waiting.discard(endpoint.key)
        self.identity.report(endpoint, str(clusterID))

    def _notProved(self, reason, endpoint):
        if reason.check(defer.CancelledError):
            return reason
        if endpoint.key in self._waiting:
            return None
        self._waiting.add(endpoint.key)
        self.log.info(
            "membership sync: {endpoint} (from a member list) gets no client until it "
            "reports its cluster ID: {why}",
            endpoint=str(endpoint),
            why=describeCheckFailure(reason),
        )

    def _apply(self, source, answer):
        """
        Use C{answer}, C{source}'s member list.

        @return: L{None}, or why the list may not be used and another
            member must be asked (not from a member of the gateway's cluster).
        """
        header = answer.get("header")
        clusterID = header.get("cluster_id") if isinstance(header, dict) else None
        if clusterID is None:
            why = "its member list names no cluster ID"
            self._ignoredOnce(source, None, why)
            return why
        clusterID = str(clusterID)
        self.identity.report(source, clusterID)
        if not self.identity.accepts(source):
            why = f"cluster {clusterID} is not the gateway's ({self.identity.pinned})"
            self._ignoredOnce(source, clusterID, why)
            return why
        members = answer.get("members")
        if not isinstance(members, list):
            self._failed(f"{source} answered no member list")
            self.log.warn(
                "membership sync: {source} answered no member list", source=str(source)
            )
            return None
        unproven = {
            s.endpoint.key for s in self.pool.states() if s.learned and not s.proven
        }
        merge = mergeMembers(
            members,
            self.pool.endpoints,
            tlsRequired=self.tlsRequired,
            refuse=self._refuse,
            unproven=unproven,
            maxUnproven=self.maxUnproven,
        )
        if merge.skipped != self._lastSkipped:
            self._lastSkipped = merge.skipped
            for name, why in merge.skipped:
                self.log.info(
                    "membership sync: member {member} skipped: {why}", member=name, why=why
                )
        if merge.endpoints is None:
            self._failed(f"member list from {source} ignored: {merge.refusal}")
            self.log.error(
                "membership sync: member list from {source} ignored: {why}",
                source=str(source),
                why=merge.refusal,
            )
            return None
        if merge.heldBack and merge.heldBack != self._lastHeldBack:
            self.log.warn(
                "membership sync: {count} new endpoints held back for a later round: at "
                "most {bound} learned endpoints may await their cluster ID check at "
                "once: {endpoints}",
                count=len(merge.heldBack),
                bound=self.maxUnproven,
                endpoints=[str(e) for e in merge.heldBack],
            )
        self._lastHeldBack = merge.heldBack
        added, removed = self._propose(merge.endpoints, reason=f"member list from {source}")
        self.lastResult = (
            f"member list from {source}: {len(self.pool.endpoints)} endpoints, "
            f"{len(added)} added, {len(removed)} removed"
        )
        if merge.heldBack:
            self.lastResult += f", {len(merge.heldBack)} held back"
        return None

    def _ignoredOnce(self, source, clusterID, why):
        """
        Log, at error level and once per source and cluster ID, that
        C{source}'s member list is ignored.
        """
        if (source.key, clusterID) in self._ignored:
            return
        self._ignored.add((source.key, clusterID))
        self.log.error(
            "membership sync: member list from {source} ignored: {why}",
            source=str(source),
            clusterID=clusterID,
            expected=self.identity.pinned,
            why=why,
        )
