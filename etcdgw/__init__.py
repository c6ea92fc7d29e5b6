"""
etcd-gateway: a local TCP gateway to an etcd cluster.

Applications connect to one stable local address; the gateway forwards each
connection, byte for byte, to a healthy member of the cluster.
"""

__version__ = "0.1.0"
