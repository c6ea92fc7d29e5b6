"""
Endpoints that follow the cluster's membership (C{--sync-interval}): every
interval, the member list is read from a usable member (C{POST
/v3/cluster/member/list} on etcd's JSON gateway, over TLS for TLS endpoints)
and the pool's endpoints are made to match the members' client URLs, so
C{etcdctl member add/remove} reaches every application with nothing to
change on their side.
"""

import attr

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from etcdgw.endpoint import EndpointError, parseEndpoint
from etcdgw.etcdhealth import describeCheckFailure
from etcdgw.periodic import PeriodicService


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Merge:
    """
    What a member list means for the pool.

    @ivar endpoints: the new endpoint list, or L{None} when the list must be
        ignored.
    @ivar skipped: C{(member, why)} pairs for members not used.
    @ivar refusal: why the list is ignored, when C{endpoints} is L{None}.
    """

    endpoints: tuple
    skipped: tuple = ()
    refusal: str = None


def _memberName(member):
    return member.get("name") or f"ID {member.get('ID', '?')}"


def mergeMembers(members, current):
    """
    The endpoint list that matches C{members} (the C{members} array of
    etcd's member list), given the C{current} endpoints.

    Each started, voting member gives one endpoint: the client URL already
    in C{current} if it has one (keeping its priority and weight), else its
    first valid one. Members with no client URL yet (added, not started) and
    learners (which do not serve clients) are skipped. Kept endpoints stay in
    their order; new ones follow in member-list order. A list that would
    leave none of the current endpoints is refused (a member list of a
    different cluster, or members advertising addresses the gateway cannot
    reach are more likely than a whole cluster replaced between two syncs).

    @rtype: L{Merge}
    """
    byKey = {e.key: e for e in current}
    chosen = []
    skipped = []
    for member in members:
        if not isinstance(member, dict):
            skipped.append(("?", f"not an object: {member!r}"))
            continue
        name = _memberName(member)
        if member.get("isLearner"):
            skipped.append((name, "a learner (serves no clients)"))
            continue
        urls = member.get("clientURLs") or []
        if not urls:
            skipped.append((name, "no client URL yet (not started)"))
            continue
        parsed = []
        for url in urls:
            try:
                # A member advertises full URLs: no default port here.
                parsed.append(parseEndpoint(str(url), defaultPort=None))
            except EndpointError as e:
                skipped.append((name, f"bad client URL: {e}"))
        if not parsed:
            continue
        known = [e for e in parsed if e.key in byKey]
        if known:
            old = byKey[known[0].key]
            endpoint = attr.evolve(old, tls=known[0].tls)
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
    added = [e for e in chosen if e.key not in byKey]
    seen = set()
    result = []
    for e in kept + added:
        if e.key not in seen:
            seen.add(e.key)
            result.append(e)
    return Merge(tuple(result), tuple(skipped))


class MembershipSync(PeriodicService):
    """
    Every C{interval} seconds, read the member list from a usable member
    through C{client} (an L{etcdgw.etcdhealth.EtcdClient}) and replace the
    pool's endpoints to match.

    @param clusterID: a callable returning the majority's cluster ID (from
        the etcd health checks) or L{None}; a member list from another
        cluster is ignored.
    """

    log = Logger()
    runAtStart = True
    roundName = "membership sync"

    def __init__(self, pool, reactor, interval, client, clusterID=lambda: None):
        super().__init__(reactor, interval)
        self.pool = pool
        self.reactor = reactor
        self.client = client
        self._clusterID = clusterID
        self._lastSkipped = None

    def syncNow(self):
        """
        Read the member list once (unless a read is running) and apply it.

        @return: a Deferred firing when done; never failing.
        """
        return self.runNow()

    def runRound(self):
        return self._sync()

    @defer.inlineCallbacks
    def _sync(self):
        candidates = [s.endpoint for s in self.pool.usable()]
        if not candidates:
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
            self._apply(endpoint, answer)
            return
        self.log.warn(
            "membership sync: no member answered the member list: {errors}",
            errors="; ".join(errors),
        )

    def _apply(self, source, answer):
        header = answer.get("header")
        clusterID = header.get("cluster_id") if isinstance(header, dict) else None
        expected = self._clusterID()
        if expected is not None and clusterID is not None and str(clusterID) != expected:
            self.log.error(
                "membership sync: {source} answered for cluster {clusterID}, not "
                "{expected}: member list ignored",
                source=str(source),
                clusterID=str(clusterID),
                expected=expected,
            )
            return
        members = answer.get("members")
        if not isinstance(members, list):
            self.log.warn(
                "membership sync: {source} answered no member list", source=str(source)
            )
            return
        merge = mergeMembers(members, self.pool.endpoints)
        if merge.skipped != self._lastSkipped:
            self._lastSkipped = merge.skipped
            for name, why in merge.skipped:
                self.log.info(
                    "membership sync: member {member} skipped: {why}", member=name, why=why
                )
        if merge.endpoints is None:
            self.log.error(
                "membership sync: member list from {source} ignored: {why}",
                source=str(source),
                why=merge.refusal,
            )
            return
        self.pool.replaceEndpoints(
            list(merge.endpoints), reason=f"member list from {source}"
        )
