from twisted.application.service import ServiceMaker

etcdGateway = ServiceMaker(
    "etcd gateway",
    "etcdgw.tap",
    "A local TCP gateway to an etcd cluster (etcd gateway start, done well).",
    "etcd-gateway",
)
