"""
A python grpc client for etcd's v3 API, with no generated code: the few
messages the tests need (Put, Range, Watch) encoded and decoded by hand
(protobuf's wire format: varints and length-delimited fields), sent over a
real C{grpc} channel. Enough for a test to hold one grpc channel (one TCP
connection, HTTP/2) through the gateway and use it across an event.

    channel = grpc.insecure_channel("127.0.0.1:23790")
    client = EtcdGRPC(channel)
    client.put(b"k", b"v")
    client.get(b"k")  # -> b"v"
    with client.watch(b"k") as events:
        next(events)  # -> (b"k", b"v2"), blocking
"""

import queue

import grpc


def _varint(value):
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number, payload):
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _intField(number, value):
    """A varint field (wire type 0)."""
    return _varint(number << 3) + _varint(value)


def _readVarint(data, i):
    shift = result = 0
    while True:
        byte = data[i]
        i += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, i
        shift += 7


def fields(data):
    """
    The fields of one message: a list of (number, value), the value an int
    for varints and bytes for length-delimited fields.
    """
    out = []
    i = 0
    while i < len(data):
        key, i = _readVarint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _readVarint(data, i)
        elif wire == 2:
            length, i = _readVarint(data, i)
            value, i = bytes(data[i:i + length]), i + length
        elif wire == 1:
            value, i = data[i:i + 8], i + 8
        elif wire == 5:
            value, i = data[i:i + 4], i + 4
        else:
            raise ValueError(f"wire type {wire} not supported")
        out.append((number, value))
    return out


def _keyValue(data):
    kv = dict(fields(data))
    return kv.get(1, b""), kv.get(5, b"")


def _identity(data):
    return data


class _Watch:
    """
    One watch stream: iterate for (key, value) of each PUT event, in order.
    """

    def __init__(self, call, responses):
        self._call = call
        self._responses = responses

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            item = self._responses.get(timeout=30)
            if isinstance(item, Exception):
                raise item
            return item

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._call.cancel()


class EtcdGRPC:
    """
    etcd's KV and Watch services on one grpc channel.
    """

    def __init__(self, channel, timeout=10):
        self.channel = channel
        self.timeout = timeout
        self._put = channel.unary_unary(
            "/etcdserverpb.KV/Put", request_serializer=_identity,
            response_deserializer=_identity)
        self._range = channel.unary_unary(
            "/etcdserverpb.KV/Range", request_serializer=_identity,
            response_deserializer=_identity)
        self._watch = channel.stream_stream(
            "/etcdserverpb.Watch/Watch", request_serializer=_identity,
            response_deserializer=_identity)

    def put(self, key, value):
        """Put; returns the revision from the response header."""
        answer = self._put(_field(1, key) + _field(2, value), timeout=self.timeout)
        header = dict(fields(dict(fields(answer)).get(1, b"")))
        return header.get(3, 0)

    def get(self, key):
        """The value of one key, or None."""
        answer = self._range(_field(1, key), timeout=self.timeout)
        for number, value in fields(answer):
            if number == 2:
                return _keyValue(value)[1]
        return None

    def watch(self, key, startRevision=0):
        """
        Watch one key: a context manager yielding an iterator of
        (key, value) for each PUT event. The watch is created (etcd said
        so) before this returns.
        """
        create = _field(1, key)
        if startRevision:
            create += _intField(3, startRevision)
        responses = queue.Queue()
        created = queue.Queue()
        call = self._watch(iter([_field(1, create)]))

        def pump():
            try:
                for answer in call:
                    message = fields(answer)
                    if any(n == 3 and v for n, v in message):
                        created.put(True)
                    for number, value in message:
                        if number == 11:
                            event = dict(fields(value))
                            if event.get(1, 0) == 0:
                                responses.put(_keyValue(event.get(2, b"")))
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.CANCELLED:
                    responses.put(e)
                    created.put(e)

        import threading
        threading.Thread(target=pump, daemon=True).start()
        result = created.get(timeout=self.timeout)
        if isinstance(result, Exception):
            raise result
        return _Watch(call, responses)
