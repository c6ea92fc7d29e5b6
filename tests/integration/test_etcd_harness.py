"""
The etcd harness against real etcd members, no gateway involved.
"""

import os

from twisted.trial import unittest

from tests.integration import etcd
from tests.integration.etcd import (
    ClusterTestMixin,
    EtcdCluster,
    EtcdStartError,
    etcdctl,
    etcdctlDeferred,
    generateTLS,
    requireEtcd,
)


class EtcdClusterTests(ClusterTestMixin, unittest.TestCase):
    """
    One three-member cluster shared by every test of the class.
    """

    clusterSize = 3

    def test_endpoints(self):
        """
        endpoints lists every member's 127.0.0.1 client address, in order.
        """
        addresses = [self.cluster.clientAddress(i) for i in range(3)]
        self.assertEqual(self.cluster.endpoints, ",".join(addresses))
        for i, address in enumerate(addresses):
            self.assertEqual(address, "127.0.0.1:{}".format(self.cluster.clientPort(i)))
            self.assertEqual(self.cluster.clientURL(i), "http://" + address)
        self.assertEqual(len(set(addresses)), 3)

    def test_putGet(self):
        """
        A key put through one member is read through every member.
        """
        rc, out, err = etcdctl(self.cluster.clientAddress(0), "put", "greeting", "hello")
        self.assertEqual((rc, out), (0, "OK\n"), err)
        for i in range(3):
            rc, out, err = etcdctl(
                self.cluster.clientAddress(i), "get", "greeting", "--consistency=l"
            )
            self.assertEqual((rc, out), (0, "greeting\nhello\n"), err)

    def test_killLeaderAndRestart(self):
        """
        With the leader SIGKILLed the others elect another and answer;
        restarted on its data dir, it rejoins and serves what was written
        while it was down.
        """
        leader = self.cluster.leader()
        self.assertIn(leader, (0, 1, 2))
        starts = self.cluster.log(leader).count("--- starting")
        self.cluster.kill(leader)
        self.assertFalse(self.cluster.isRunning(leader))
        self.cluster.waitHealthy(timeout=10)
        newLeader = self.cluster.leader()
        self.assertNotIn(newLeader, (None, leader))
        rc, out, err = self.cluster.etcdctl("put", "written-while-down", "yes")
        self.assertEqual(rc, 0, err)
        self.cluster.restart(leader)
        self.assertTrue(self.cluster.health(leader)[0])
        rc, out, err = etcdctl(
            self.cluster.clientAddress(leader), "get", "written-while-down", "--print-value-only"
        )
        self.assertEqual((rc, out), (0, "yes\n"), err)
        self.assertEqual(self.cluster.log(leader).count("--- starting"), starts + 1)

    def test_freezeAndThaw(self):
        """
        A frozen follower does not answer and the others still do; thawed,
        it is healthy again.
        """
        leader = self.cluster.leader()
        follower = (leader + 1) % 3
        self.cluster.freeze(follower)
        self.assertEqual(self.cluster.health(follower, timeout=0.3)[0], False)
        rc, out, err = self.cluster.etcdctl(
            "put", "k", "v", endpoints=self.cluster.clientAddress(leader)
        )
        self.assertEqual(rc, 0, err)
        self.cluster.thaw(follower)
        self.cluster.waitHealthy([follower], timeout=10)

    def test_killIsUndoneBySetUp(self):
        """
        A test may leave a member dead: the next setUp restarts it, and it is
        still running and healthy when the test's cleanups run.
        """
        killed = self.cluster.members[1].process.pid
        self.cluster.kill(1)
        self.assertFalse(self.cluster.isRunning(1))
        self.setUp()
        # Checked when the cleanups run (not now), before the class's cluster
        # could be stopped: setUp's own cleanup was added just before this one.
        self.addCleanup(lambda: self.assertEqual(
            (self.cluster.isRunning(1), self.cluster.health(1)[0]), (True, True)
        ))
        self.assertTrue(self.cluster.isRunning(1))
        self.assertNotEqual(self.cluster.members[1].process.pid, killed)

    def test_etcdctlDeferred(self):
        """
        The asynchronous etcdctl fires with (returncode, stdout, stderr).
        """
        d = etcdctlDeferred(self.cluster.endpoints, "endpoint", "health")

        def check(result):
            rc, out, err = result
            self.assertEqual(rc, 0, err)
            self.assertEqual(err.count("is healthy"), 3, err)

        return d.addCallback(check)


class EtcdClusterLifecycleTests(unittest.TestCase):
    """
    Clusters started and stopped by the test itself.
    """

    def setUp(self):
        requireEtcd()

    def test_stopRemovesDirectory(self):
        """
        Members keep their data and log under /dev/shm; stop() removes it all
        and a second stop() is harmless.
        """
        cluster = EtcdCluster(size=1)
        self.addCleanup(cluster.stop)
        cluster.start()
        if os.path.isdir("/dev/shm"):
            self.assertTrue(cluster.directory.startswith("/dev/shm/"))
        self.assertTrue(os.path.isdir(os.path.join(cluster.dataDir(0), "member")))
        self.assertTrue(os.path.isfile(cluster.logPath(0)))
        cluster.stop()
        self.assertFalse(os.path.exists(cluster.directory))
        self.assertFalse(cluster.isRunning(0))
        cluster.stop()

    def test_startFailureShowsLog(self):
        """
        A member that exits while starting fails start() at once with its log
        tail, and nothing is left behind.
        """
        cluster = EtcdCluster(size=1, extraArgs=["--no-such-flag"])
        self.addCleanup(cluster.stop)
        error = self.assertRaises(EtcdStartError, cluster.start, timeout=10)
        self.assertIn("no-such-flag", str(error))
        self.assertIn("exited", str(error))
        self.assertFalse(os.path.exists(cluster.directory))

    def test_addAndRemoveMember(self):
        """
        addMember grows the cluster by a running member; removeMember takes
        one out of the cluster and out of endpoints.
        """
        cluster = EtcdCluster(size=1)
        self.addCleanup(cluster.stop)
        cluster.start()
        self.assertEqual(cluster.addMember(), 1)
        self.assertEqual(len(cluster.endpoints.split(",")), 2)
        rc, out, err = cluster.etcdctl("member", "list")
        self.assertEqual(rc, 0, err)
        self.assertEqual(out.count(", started, "), 2, out)
        cluster.removeMember(0)
        self.assertEqual(cluster.endpoints, cluster.clientAddress(1))
        rc, out, err = cluster.etcdctl("put", "k", "v")
        self.assertEqual(rc, 0, err)

    def test_tls(self):
        """
        With tls, client URLs are https with certificates from the given CA,
        verified for 127.0.0.1.
        """
        tls = generateTLS(self._tlsDir(), size=1)
        cluster = EtcdCluster(size=1, tls=tls)
        self.addCleanup(cluster.stop)
        cluster.start()
        self.assertTrue(cluster.clientURL(0).startswith("https://127.0.0.1:"))
        rc, out, err = cluster.etcdctl("put", "k", "secret")
        self.assertEqual(rc, 0, err)
        rc, out, err = etcdctl(cluster.clientURL(0), "get", "k", tls=tls)
        self.assertEqual((rc, out), (0, "k\nsecret\n"), err)
        # Without the CA the server certificate is not trusted.
        rc, out, err = etcdctl(cluster.clientURL(0), "get", "k", timeout=2)
        self.assertNotEqual(rc, 0)

    def _tlsDir(self):
        path = self.mktemp()
        os.makedirs(path)
        return path


class RequireEtcdTests(unittest.SynchronousTestCase):
    """
    requireEtcd skips on a developer's machine and fails under CI.
    """

    def setUp(self):
        self.patch(etcd, "ETCD", "etcd-not-installed-here")

    def test_skipWithoutCI(self):
        """
        Without CI, a missing binary skips, naming the Debian packages.
        """
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if k != "CI"})
        error = self.assertRaises(unittest.SkipTest, requireEtcd)
        self.assertIn("apt-get install etcd-server etcd-client", str(error))

    def test_failUnderCI(self):
        """
        With CI set, a missing binary is an error, never a skip.
        """
        self.patch(os, "environ", dict(os.environ, CI="true"))
        error = self.assertRaises(RuntimeError, requireEtcd)
        self.assertIn("etcd-not-installed-here", str(error))
