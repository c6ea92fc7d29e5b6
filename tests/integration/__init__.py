"""
Integration tests: real etcd members (Debian's etcd-server) and the gateway
as a real twistd process, all on 127.0.0.1.  Helpers: L{etcd}, L{gateway}.
"""
