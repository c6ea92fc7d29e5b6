"""
Where the pool's endpoint list comes from: exactly one endpoint source per
gateway, chosen by the configuration (C{--discovery-srv} and
C{--sync-interval} together are refused):

  - static C{--endpoints}: L{StaticEndpoints}, the list the pool starts
    with, never changed;
  - SRV discovery (C{--discovery-srv}): L{etcdgw.discovery.DiscoveryService};
  - the cluster's member list (C{--sync-interval}):
    L{etcdgw.membership.MembershipSync}.

A source proposes whole lists to the pool
(L{etcdgw.pool.UpstreamPool.replaceEndpoints}), each source from one method
of its own, and never decides health. The wiring and the operators'
surfaces (SIGHUP, metrics, the status page) use a source through
L{IEndpointSource} only, whichever it is: no service names, no
C{isinstance}, no attribute that only one kind has.
"""

from twisted.internet import defer
from zope.interface import Attribute, Interface, implementer


class IEndpointSource(Interface):
    """
    The gateway's one endpoint source.
    """

    kind = Attribute(
        'What the source follows: "static", "srv" or "member-list" (a label '
        "for metrics)."
    )
    rounds = Attribute(
        "The rounds run since start (SRV look-ups, member-list reads), an int."
    )
    failures = Attribute(
        "The rounds that failed or found nothing usable (the endpoints were "
        "kept, or fell back), an int."
    )

    def refreshNow():
        """
        Look again now (SIGHUP); while a round runs, wait for that one.

        @return: a Deferred firing, never failing, with one line saying what
            the round found, e.g. C{"SRV discovery: 3 endpoints, 1 added, 0
            removed"}.
        """

    def describe():
        """
        @return: one line for the status page: what the source follows, how
            often, and what its last round found.
        """


@implementer(IEndpointSource)
class StaticEndpoints:
    """
    The endpoints of C{--endpoints}: the pool starts with them and nothing
    changes them.
    """

    kind = "static"
    rounds = 0
    failures = 0

    def __init__(self, endpoints):
        self.endpoints = tuple(endpoints)

    def refreshNow(self):
        return defer.succeed("no discovery (static --endpoints)")

    def describe(self):
        listed = ", ".join(str(e) for e in self.endpoints) or "none"
        return f"static --endpoints: {listed}"
