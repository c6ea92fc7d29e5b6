/*
 * _etcdgw_relay: the gateway's forwarding step, in C.
 *
 * relay(src, dst, buffer) receives once from descriptor src into buffer and
 * sends what arrived to descriptor dst: both system calls under one release
 * of the GIL, and no Python objects made on the way (no memoryview slice, no
 * bound methods, no intermediate ints). It is what
 * etcdgw.transport._relayPython does, which the gateway uses where this
 * module was not built; see etcdgw/fast/relay.py.
 *
 * Returns:
 *   n > 0       n bytes arrived and all n were sent;
 *   0           end of stream on src (nothing sent);
 *   None        nothing to read now (EAGAIN, EWOULDBLOCK or EINTR);
 *   (n, sent)   n bytes arrived, only the first sent (0 <= sent < n) were
 *               sent: dst's buffer is full (the caller queues the rest);
 *   (n, -1)     n bytes arrived and sending them failed (a reset, for one):
 *               dst's connection is lost. send(2) has consumed dst's
 *               pending error, so the caller must treat dst as lost now:
 *               dst's next recv would read a clean end of stream.
 * Raises OSError when receiving fails (a reset, for one).
 *
 * serve(events, selectables, buffer, fastType, readSize) is the same step
 * for a whole epoll batch (etcdgw/fast/dispatch.py, issue 16): for each
 * (fd, event) of `events` that is EPOLLIN alone, on a transport of
 * `fastType` (in `selectables`, the reactor's fd -> selectable) joined to a
 * target (its _target; no splice pipe, _pipe None) that may be sent to now
 * (maySendNow below: etcdgw.fast.transport._maySendNow, the same checks),
 * it relays as relay() does, from the transport's _fd to the target's _fd.
 * When all of n bytes (0 < n < readSize) were sent it adds n to the
 * transport's _count.n and is done with that event; nothing to read: done
 * too. Returns (rest, answers), what Python must still handle: `rest`, every
 * other event as given, in order; `answers`, (transport, target, answer)
 * for each relay whose answer needs the transport (FastTransport._relayed):
 * 0 (end of stream), n == readSize (bulk: splice), (n, sent), (n, -1), or
 * the OSError receiving raised.
 *
 * CONTRACT is the version of these answers: etcdgw.fast.relay uses this
 * module only when it matches (a stale build falls back to Python).
 * 3: serve() added.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <sys/socket.h>
#include <sys/types.h>

#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0
#endif

static int
descriptor(PyObject *o, int *fd)
{
    long v = PyLong_AsLong(o);

    if (v == -1 && PyErr_Occurred())
        return -1;
    if (v < 0 || v > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "not a file descriptor");
        return -1;
    }
    *fd = (int)v;
    return 0;
}

static PyObject *
relay(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    int src, dst, err = 0;
    Py_buffer view;
    ssize_t n, sent = 0;

    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "relay(src, dst, buffer) takes 3 arguments");
        return NULL;
    }
    if (descriptor(args[0], &src) < 0 || descriptor(args[1], &dst) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[2], &view, PyBUF_WRITABLE) < 0)
        return NULL;

    Py_BEGIN_ALLOW_THREADS
    n = recv(src, view.buf, (size_t)view.len, 0);
    if (n < 0) {
        err = errno;
    } else if (n > 0) {
        sent = send(dst, view.buf, (size_t)n, MSG_NOSIGNAL);
        if (sent < 0) {
            /* No room (as Twisted's writeSomeData: EWOULDBLOCK, ENOBUFS)
             * is not a failure; anything else is. */
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR
                || errno == ENOBUFS)
                sent = 0;
            else
                sent = -1;
        }
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);

    if (n < 0) {
        if (err == EAGAIN || err == EWOULDBLOCK || err == EINTR)
            Py_RETURN_NONE;
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (sent == n)
        return PyLong_FromSsize_t(n);
    return Py_BuildValue("(nn)", (Py_ssize_t)n, (Py_ssize_t)sent);
}

static PyObject *s_target, *s_pipe, *s_fd, *s_count, *s_n, *s_tempDataLen, *s_dataBuffer,
    *s_disconnecting, *s_writeDisconnecting, *s_connected, *s_pipeSource, *s_pipeBytes;

/* The truth of attribute `name` of `o`: 1, 0, or -1 with an exception. */
static int
attrTrue(PyObject *o, PyObject *name)
{
    PyObject *v = PyObject_GetAttr(o, name);
    int r;

    if (v == NULL)
        return -1;
    r = PyObject_IsTrue(v);
    Py_DECREF(v);
    return r;
}

/* etcdgw.fast.transport._maySendNow(target), the same checks in the same
 * order: 1 (may send now), 0, or -1 with an exception. Must stay in step
 * with it (tests/test_relay.py checks each condition against it). */
static int
maySendNow(PyObject *target)
{
    PyObject *const queued[] = {s_tempDataLen, s_dataBuffer, s_disconnecting,
                                s_writeDisconnecting};
    PyObject *source;
    size_t i;
    int r;

    for (i = 0; i < sizeof(queued) / sizeof(queued[0]); i++) {
        r = attrTrue(target, queued[i]);
        if (r != 0)
            return r < 0 ? -1 : 0;
    }
    r = attrTrue(target, s_connected);
    if (r <= 0)
        return r;
    source = PyObject_GetAttr(target, s_pipeSource);
    if (source == NULL)
        return -1;
    r = 1;
    if (source != Py_None) {
        int b = attrTrue(source, s_pipeBytes);
        r = b < 0 ? -1 : !b;
    }
    Py_DECREF(source);
    return r;
}

/* The descriptor in attribute _fd of `o`, or -1 with an exception. */
static int
fdOf(PyObject *o)
{
    PyObject *v = PyObject_GetAttr(o, s_fd);
    int fd;

    if (v == NULL)
        return -1;
    if (descriptor(v, &fd) < 0)
        fd = -1;
    Py_DECREF(v);
    return fd;
}

/* _count.n += n on `transport`: 0, or -1 with an exception. */
static int
count(PyObject *transport, ssize_t n)
{
    PyObject *c = PyObject_GetAttr(transport, s_count), *old, *add, *sum;
    int r = -1;

    if (c == NULL)
        return -1;
    old = PyObject_GetAttr(c, s_n);
    if (old != NULL) {
        add = PyLong_FromSsize_t(n);
        if (add != NULL) {
            sum = PyNumber_Add(old, add);
            if (sum != NULL) {
                r = PyObject_SetAttr(c, s_n, sum);
                Py_DECREF(sum);
            }
            Py_DECREF(add);
        }
        Py_DECREF(old);
    }
    Py_DECREF(c);
    return r;
}

/* Append a new reference `item` to `out` (stolen): 0, or -1. */
static int
appendNew(PyObject *out, PyObject *item)
{
    int r;

    if (item == NULL)
        return -1;
    r = PyList_Append(out, item);
    Py_DECREF(item);
    return r;
}

/* Whether `item` (an epoll event) is one serve() may take: its transport
 * and target (new references) in *transport, *target; 0 (leave it to
 * Python) or 1. Never raises: anything unexpected leaves it to Python. */
static int
servable(PyObject *item, PyObject *selectables, PyObject *fastType, PyObject **transport,
         PyObject **target, int *src, int *dst)
{
    PyObject *tr, *tg, *pipe;
    long event;

    if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2)
        return 0;
    event = PyLong_AsLong(PyTuple_GET_ITEM(item, 1));
    if (event != 1) { /* EPOLLIN alone */
        PyErr_Clear();
        return 0;
    }
    tr = PyDict_GetItemWithError(selectables, PyTuple_GET_ITEM(item, 0));
    if (tr == NULL || !PyObject_TypeCheck(tr, (PyTypeObject *)fastType)) {
        PyErr_Clear();
        return 0;
    }
    Py_INCREF(tr);
    tg = PyObject_GetAttr(tr, s_target);
    if (tg == NULL || tg == Py_None)
        goto no;
    pipe = PyObject_GetAttr(tr, s_pipe);
    if (pipe == NULL)
        goto no;
    Py_DECREF(pipe);
    if (pipe != Py_None || maySendNow(tg) != 1)
        goto no;
    if ((*src = fdOf(tr)) < 0 || (*dst = fdOf(tg)) < 0)
        goto no;
    *transport = tr;
    *target = tg;
    return 1;
no:
    PyErr_Clear();
    Py_XDECREF(tg);
    Py_DECREF(tr);
    return 0;
}

static PyObject *
serve(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *events, *out, *answers = NULL, *transport, *target, *item, *answer;
    Py_buffer view;
    Py_ssize_t i, size, readSize;
    int src, dst, err;
    ssize_t n, sent;

    if (nargs != 5 || !PyDict_Check(args[1]) || !PyType_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError,
                        "serve(events, selectables, buffer, fastType, readSize)");
        return NULL;
    }
    readSize = PyLong_AsSsize_t(args[4]);
    if (readSize == -1 && PyErr_Occurred())
        return NULL;
    events = PySequence_Fast(args[0], "events must be a sequence");
    if (events == NULL)
        return NULL;
    if (PyObject_GetBuffer(args[2], &view, PyBUF_WRITABLE) < 0) {
        Py_DECREF(events);
        return NULL;
    }
    if (readSize > view.len)
        readSize = view.len;
    out = PyList_New(0);
    answers = PyList_New(0);
    if (out == NULL || answers == NULL)
        goto fail;
    size = PySequence_Fast_GET_SIZE(events);
    for (i = 0; i < size; i++) {
        item = PySequence_Fast_GET_ITEM(events, i);
        if (!servable(item, args[1], args[3], &transport, &target, &src, &dst)) {
            if (PyList_Append(out, item) < 0)
                goto fail;
            continue;
        }
        err = 0;
        sent = 0;
        /* The GIL is kept: both calls are non-blocking (the reactor's
         * sockets), and taking it back per event is a measurable share
         * of a small request's cost. */
        n = recv(src, view.buf, (size_t)readSize, 0);
        if (n < 0) {
            err = errno;
        } else if (n > 0) {
            sent = send(dst, view.buf, (size_t)n, MSG_NOSIGNAL);
            if (sent < 0) {
                if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR
                    || errno == ENOBUFS)
                    sent = 0;
                else
                    sent = -1;
            }
        }
        answer = NULL;
        if (n < 0) {
            if (err != EAGAIN && err != EWOULDBLOCK && err != EINTR) {
                errno = err;
                PyErr_SetFromErrno(PyExc_OSError);
                {
                    PyObject *type, *value, *tb;
                    PyErr_Fetch(&type, &value, &tb);
                    PyErr_NormalizeException(&type, &value, &tb);
                    Py_XDECREF(type);
                    Py_XDECREF(tb);
                    answer = value;
                }
            }
        } else if (n > 0 && sent == n && n < readSize) {
            if (count(transport, n) < 0)
                answer = PyLong_FromSsize_t(n); /* let Python count it */
        } else if (sent == n) {
            answer = PyLong_FromSsize_t(n); /* 0 (end) or a full read */
        } else {
            answer = Py_BuildValue("(nn)", (Py_ssize_t)n, (Py_ssize_t)sent);
        }
        if (answer != NULL) {
            PyErr_Clear();
            if (appendNew(answers, PyTuple_Pack(3, transport, target, answer)) < 0) {
                Py_DECREF(answer);
                Py_DECREF(transport);
                Py_DECREF(target);
                goto fail;
            }
            Py_DECREF(answer);
        }
        Py_DECREF(transport);
        Py_DECREF(target);
    }
    PyBuffer_Release(&view);
    Py_DECREF(events);
    item = PyTuple_Pack(2, out, answers);
    Py_DECREF(out);
    Py_DECREF(answers);
    return item;
fail:
    PyBuffer_Release(&view);
    Py_DECREF(events);
    Py_XDECREF(out);
    Py_XDECREF(answers);
    return NULL;
}

static PyMethodDef methods[] = {
    {"serve", (PyCFunction)(void (*)(void))serve, METH_FASTCALL,
     "serve(events, selectables, buffer, fastType, readSize): relay() for every "
     "ready joined transport of an epoll batch; see the module's source."},
    {"relay", (PyCFunction)(void (*)(void))relay, METH_FASTCALL,
     "relay(src, dst, buffer): receive once from src into buffer and send "
     "it to dst; see the module's source for what it returns."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "_etcdgw_relay",
    "The gateway's forwarding step in C (see etcdgw.fast.relay).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__etcdgw_relay(void)
{
    PyObject *module;

#define INTERN(var, text) \
    if ((var = PyUnicode_InternFromString(text)) == NULL) \
        return NULL;
    INTERN(s_target, "_target")
    INTERN(s_pipe, "_pipe")
    INTERN(s_fd, "_fd")
    INTERN(s_count, "_count")
    INTERN(s_n, "n")
    INTERN(s_tempDataLen, "_tempDataLen")
    INTERN(s_dataBuffer, "dataBuffer")
    INTERN(s_disconnecting, "disconnecting")
    INTERN(s_writeDisconnecting, "_writeDisconnecting")
    INTERN(s_connected, "connected")
    INTERN(s_pipeSource, "_pipeSource")
    INTERN(s_pipeBytes, "_pipeBytes")
#undef INTERN
    module = PyModule_Create(&moduledef);
    if (module != NULL && PyModule_AddIntConstant(module, "CONTRACT", 3) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
