"""
Pick policies (C{--policy}): how one endpoint is chosen among the
candidates the pool offers. Each policy object owns its own state (a
rotation cursor, smooth credits, a random source); the pool owns the
endpoints and their states, keeps only the candidates (usable ones of the
lowest priority tier, see L{etcdgw.pool.UpstreamPool.pick}), and asks its
policy to choose within that tier.

Every policy is given, with the tier, the pool's endpoint keys in
configured order, and is told when that order changes
(L{Policy.endpointsChanged}).
"""

import random

#: The share of picks that weight-0 records get, together, when records of
#: the same priority have weights (RFC 2782: "a very small chance").
ZERO_WEIGHT_SHARE = 0.01


class _Rotation:
    """
    A cursor over the pool's endpoints in configured order: a, b, c, a, b, c
    with every endpoint a candidate and a, c, a, c with b left out.
    """

    __slots__ = ("cursor",)

    def __init__(self):
        self.cursor = 0

    def next(self, tier, order):
        """
        The first state of C{tier} at or after the cursor, in C{order}; the
        cursor moves past it.
        """
        count = len(order)
        members = {state.endpoint.key: state for state in tier}
        for step in range(count):
            index = (self.cursor + step) % count
            state = members.get(order[index])
            if state is not None:
                self.cursor = (index + 1) % count
                return state
        return tier[0]  # unreachable while tier is drawn from order

    def passed(self, state, order):
        """
        C{state} was chosen without asking the rotation (it was alone): the
        cursor moves past it all the same.
        """
        self.cursor = (order.index(state.endpoint.key) + 1) % len(order)

    def reorder(self, order):
        self.cursor = 0 if not order else self.cursor % len(order)


class Policy:
    """
    A pick policy: chooses one L{etcdgw.pool.EndpointState} of a tier.

    @cvar name: its C{--policy} name.
    """

    name = None

    def __init__(self, random=None):
        self._rotation = _Rotation()

    def choose(self, tier, order):
        """
        One state of C{tier} (a non-empty list of candidate states, in
        configured order); C{order} is every endpoint key of the pool, in
        configured order.
        """
        if len(tier) == 1:
            self._rotation.passed(tier[0], order)
            return tier[0]
        return self._choose(tier, order)

    def _choose(self, tier, order):
        raise NotImplementedError()

    def endpointsChanged(self, order):
        """
        The pool's endpoints are now C{order} (keys, in configured order):
        forget what is kept about the others.
        """
        self._rotation.reorder(order)


class RoundRobin(Policy):
    """
    The RFC 2782 rule, as etcd's gateway: a weighted random choice when SRV
    records carry weights (each endpoint with weight w > 0 is chosen with
    probability w / sum(w); weight-0 ones share L{ZERO_WEIGHT_SHARE} of the
    picks), a strict rotation in configured order when none does (static
    endpoints).
    """

    name = "round-robin"

    def __init__(self, random=None):
        super().__init__()
        self._random = random if random is not None else _systemRandom

    def _choose(self, tier, order):
        weighted = [state for state in tier if state.endpoint.weight > 0]
        if not weighted:
            return self._rotation.next(tier, order)
        zero = [state for state in tier if state.endpoint.weight <= 0]
        if zero and self._random.random() < ZERO_WEIGHT_SHARE:
            return zero[self._random.randrange(len(zero))]
        total = sum(state.endpoint.weight for state in weighted)
        # A uniform choice in [0, total): the first record whose running sum
        # exceeds it wins, so each is chosen in proportion to its weight
        # (etcd's gateway is off by one here and always picks the first of
        # two weight-1 records).
        choice = self._random.random() * total
        running = 0
        for state in weighted:
            running += state.endpoint.weight
            if choice < running:
                return state
        return weighted[-1]


class SmoothWeighted(Policy):
    """
    Smooth weighted round-robin (nginx's): deterministic, in proportion to
    the weights, and interleaved (weights 5, 1, 1 give a a b a c a a, not
    a a a a a b c). Each pick adds every endpoint's weight to its running
    credit, takes the endpoint with the most credit (the first in configured
    order on a tie) and takes the tier's total weight from it. A weight of 0
    counts as 1, so endpoints without weights rotate evenly.
    """

    name = "weighted"

    def __init__(self, random=None):
        super().__init__()
        #: Running credit by endpoint key.
        self.credit = {}

    def _choose(self, tier, order):
        credit = self.credit
        total = 0
        best = None
        for state in tier:
            weight = max(state.endpoint.weight, 1)
            total += weight
            key = state.endpoint.key
            credit[key] = credit.get(key, 0) + weight
            if best is None or credit[key] > credit[best.endpoint.key]:
                best = state
        credit[best.endpoint.key] -= total
        return best

    def endpointsChanged(self, order):
        super().endpointsChanged(order)
        keep = set(order)
        for key in [key for key in self.credit if key not in keep]:
            del self.credit[key]


class LeastConnections(Policy):
    """
    The endpoint with the fewest active connections; ties are broken in
    round-robin order, so an idle pool still rotates. Rebalances long-lived
    etcd client connections after a member returns.
    """

    name = "least-connections"

    def _choose(self, tier, order):
        fewest = min(state.active for state in tier)
        return self._rotation.next([state for state in tier if state.active == fewest], order)


#: Pick policies by C{--policy} name (the default, C{round-robin}, first).
POLICIES = {policy.name: policy for policy in (RoundRobin, SmoothWeighted, LeastConnections)}


def makePolicy(name, random=None):
    """
    A new policy object of C{--policy} name C{name}.

    @param random: the random source of policies that draw (a
        C{random.Random}; the system's by default).
    @raise ValueError: naming an unknown policy.
    """
    if name not in POLICIES:
        raise ValueError(f'unknown policy "{name}" (expected one of {", ".join(POLICIES)})')
    return POLICIES[name](random)


_systemRandom = random.SystemRandom()
