"""
A real DNS server on 127.0.0.1 for integration tests: twisted.names serving a
zone that tests change while it runs.

The server is a child process (C{python tests/integration/dns.py ZONE
PORTFILE}, by path: trial runs in C{_trial_temp}), so it keeps answering while the test process blocks (starting a
gateway, running etcdctl). The zone lives in a JSON file that the server reads
at every query, so a change is seen by the next query::

    server = DNSServer()
    server.start()                     # blocks until it answers
    server.setRecords([
        srv("_etcd-client-ssl._tcp.etcd.test", "m1.etcd.test", 2379, ttl=1),
        a("m1.etcd.test", "127.0.0.1"),
    ])
    "--discovery-dns=" + server.address
    server.stop()                      # queries now go unanswered
    server.cleanup()

A name with no record of any type is NXDOMAIN; a name with records of other
types answers with no records. A name given L{refused} (or L{servfail})
answers every query with that error code, as dnsmasq without a local zone
answers REFUSED for C{_etcd-client-ssl}::

    server.setRecords([refused("_etcd-client-ssl._tcp.etcd.test"), ...])

Every query is noted (L{DNSServer.queries}), so a test can see when a client
asks again.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HOST = "127.0.0.1"


def srv(name, target, port, priority=0, weight=0, ttl=60):
    return {
        "name": name, "type": "SRV", "target": target, "port": port,
        "priority": priority, "weight": weight, "ttl": ttl,
    }


def a(name, address="127.0.0.1", ttl=60):
    return {"name": name, "type": "A", "address": address, "ttl": ttl}


def refused(name):
    """
    Every query for C{name} is answered REFUSED.
    """
    return {"name": name, "type": "RCODE", "rcode": "REFUSED"}


def servfail(name):
    """
    Every query for C{name} is answered SERVFAIL.
    """
    return {"name": name, "type": "RCODE", "rcode": "SERVFAIL"}


class DNSServer:
    """
    The test's handle on the server process.
    """

    def __init__(self):
        self.directory = tempfile.mkdtemp(prefix="etcdgw-dns-")
        self.zonePath = os.path.join(self.directory, "zone.json")
        self.portPath = os.path.join(self.directory, "port")
        self.logPath = os.path.join(self.directory, "dns.log")
        self.queriesPath = os.path.join(self.directory, "queries.log")
        self.process = None
        self.port = None
        self.setRecords([])

    @property
    def address(self):
        return f"{HOST}:{self.port}"

    def setRecords(self, records):
        """
        Replace the zone (atomically); the next query sees it.
        """
        tmp = self.zonePath + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"records": list(records)}, f)
        os.replace(tmp, self.zonePath)

    def start(self, timeout=10):
        """
        Start the server and block until it answers a query. On a restart the
        same port is used again.
        """
        argv = [sys.executable, os.path.abspath(__file__), self.zonePath, self.portPath,
                "--queries=" + self.queriesPath]
        if self.port is not None:
            argv.append(str(self.port))
        elif os.path.exists(self.portPath):
            os.remove(self.portPath)
        with open(self.logPath, "ab") as log:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"DNS server exited: {open(self.logPath).read()}")
            if self.port is None and os.path.exists(self.portPath):
                with open(self.portPath) as f:
                    text = f.read().strip()
                if text:
                    self.port = int(text)
            if self.port is not None and self._answers():
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"DNS server not answering: {open(self.logPath).read()}")
            time.sleep(0.05)

    def queries(self):
        """
        Every query answered so far, in order: C{(time.monotonic() of the
        server, which is the test's clock too on Linux, name, type)}, e.g.
        C{(1234.5, "_etcd-client-ssl._tcp.etcd.test", "SRV")}.
        """
        try:
            with open(self.queriesPath) as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return []
        result = []
        for line in lines:
            when, name, kind = line.split(" ")
            result.append((float(when), name, kind))
        return result

    def _answers(self):
        import dns.message
        import dns.query

        try:
            dns.query.udp(dns.message.make_query("probe.invalid.", "A"), HOST,
                          port=self.port, timeout=0.5)
            return True
        except Exception:
            return False

    def stop(self):
        """
        Stop the server (SIGKILL, like a crash); queries go unanswered.
        """
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def cleanup(self):
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


# -- the server process --------------------------------------------------


def _serve(zonePath, portPath, port=None, queriesPath=None):
    from twisted.internet import defer, reactor
    from twisted.names import common, dns, server
    from twisted.python import failure

    class RCodeError(Exception):
        """
        Answer with this DNS response code (by name: REFUSED, SERVFAIL).
        """

        def __init__(self, rcode):
            super().__init__(rcode)
            self.rcode = {"REFUSED": dns.EREFUSED, "SERVFAIL": dns.ESERVER}[rcode]

    class JSONZone(common.ResolverBase):
        """
        Answers from the JSON zone file, re-read at each query.
        """

        def _records(self):
            with open(zonePath) as f:
                return json.load(f)["records"]

        def _lookup(self, name, cls, type, timeout=None):
            wanted = name.decode("ascii").lower().rstrip(".")
            if queriesPath is not None:
                with open(queriesPath, "a") as f:
                    kind = dns.QUERY_TYPES.get(type, dns.EXT_QUERIES.get(type, str(type)))
                    f.write(f"{time.monotonic()} {wanted} {kind}\n")
            records = [r for r in self._records() if r["name"].lower().rstrip(".") == wanted]
            if not records:
                return defer.fail(failure.Failure(dns.AuthoritativeDomainError(name)))
            for r in records:
                if r["type"] == "RCODE":
                    return defer.fail(failure.Failure(RCodeError(r["rcode"])))
            answers = []
            for r in records:
                if r["type"] == "SRV" and type in (dns.SRV, dns.ALL_RECORDS):
                    payload = dns.Record_SRV(
                        r["priority"], r["weight"], r["port"], r["target"], ttl=r["ttl"]
                    )
                elif r["type"] == "A" and type in (dns.A, dns.ALL_RECORDS):
                    payload = dns.Record_A(r["address"], ttl=r["ttl"])
                elif r["type"] == "AAAA" and type in (dns.AAAA, dns.ALL_RECORDS):
                    payload = dns.Record_AAAA(r["address"], ttl=r["ttl"])
                else:
                    continue
                answers.append(
                    dns.RRHeader(name, payload.TYPE, dns.IN, r["ttl"], payload, auth=True)
                )
            return defer.succeed((answers, [], []))

    class Factory(server.DNSServerFactory):
        def gotResolverError(self, reason, protocol, message, address):
            if not reason.check(RCodeError):
                return super().gotResolverError(reason, protocol, message, address)
            response = self._responseFromMessage(message=message, rCode=reason.value.rcode)
            self.sendReply(protocol, response, address)

    factory = Factory(authorities=[JSONZone()])
    if port is None:
        for _ in range(50):  # one port for UDP and TCP
            udp = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface=HOST)
            port = udp.getHost().port
            try:
                reactor.listenTCP(port, factory, interface=HOST)
                break
            except Exception:
                udp.stopListening()
        else:
            raise RuntimeError("no free port for UDP and TCP")
    else:
        reactor.listenUDP(port, dns.DNSDatagramProtocol(factory), interface=HOST)
        reactor.listenTCP(port, factory, interface=HOST)
    with open(portPath + ".tmp", "w") as f:
        f.write(str(port))
    os.replace(portPath + ".tmp", portPath)
    reactor.run()


if __name__ == "__main__":
    queries = [a[len("--queries="):] for a in sys.argv[1:] if a.startswith("--queries=")]
    positional = [a for a in sys.argv[1:] if not a.startswith("--queries=")]
    _serve(
        positional[0],
        positional[1],
        int(positional[2]) if len(positional) > 2 else None,
        queries[0] if queries else None,
    )
