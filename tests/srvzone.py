"""
A DNS zone and a validator for SRV discovery's tests, with no network: the
records in a dict (L{FakeResolver}), and proofs decided by the test
(L{FakeValidator}).
"""

import dns.rdata
import dns.rdataclass
import dns.rdatatype

from etcdgw.srvround import LookupFailed  # noqa: F401 - what a zone's failed look-up raises
from etcdgw.verify import ValidationError

SSL = "_etcd-client-ssl._tcp.etcd.test"
PLAIN = "_etcd-client._tcp.etcd.test"


def srvRdata(priority, weight, port, target):
    return dns.rdata.from_text(
        dns.rdataclass.IN, dns.rdatatype.SRV, f"{priority} {weight} {port} {target}"
    )


class _A:
    def __init__(self, address):
        self.address = address


class FakeResolver:
    """
    A zone in a dict: C{{(name, rdtype): (rdatas, ttl) or LookupFailed}}.
    """

    def __init__(self, zone):
        self.zone = zone
        self.asked = []

    def lookup(self, name, rdtype):
        self.asked.append((name, rdtype))
        answer = self.zone.get((name, rdtype), ([], None))
        if isinstance(answer, Exception):
            raise answer
        return answer


def zone(ssl=(), plain=(), ttl=30, hosts=None):
    """
    SRV records as C{(priority, weight, port, target)}; every target resolves
    to the address in C{hosts} (default 127.0.0.N in order of appearance).
    """
    result = {}
    if ssl:
        result[(SSL, "SRV")] = ([srvRdata(*r) for r in ssl], ttl)
    if plain:
        result[(PLAIN, "SRV")] = ([srvRdata(*r) for r in plain], ttl)
    hosts = dict(hosts or {})
    for index, record in enumerate(list(ssl) + list(plain)):
        target = record[3].rstrip(".")
        address = hosts.setdefault(target, f"127.0.0.{index + 1}")
        if address is not None:
            result[(target, "A")] = ([_A(address)], ttl)
    return result


class FakeValidator:
    """
    Records each validation; refuses targets listed in C{refuse}.
    """

    def __init__(self, refuse=(), raises=None):
        self.refuse = dict.fromkeys(refuse, "certificate verify failed: rogue")
        self.raises = dict(raises or {})
        self.calls = []

    def __call__(self, address, port, name, trust, timeout, context=None):
        self.calls.append((address, port, name))
        if name in self.refuse:
            raise ValidationError(self.refuse[name])
        if name in self.raises:
            raise self.raises[name]
