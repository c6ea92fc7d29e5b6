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
 * CONTRACT is the version of these answers: etcdgw.fast.relay uses this
 * module only when it matches (a stale build falls back to Python).
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

static PyMethodDef methods[] = {
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
    PyObject *module = PyModule_Create(&moduledef);

    if (module != NULL && PyModule_AddIntConstant(module, "CONTRACT", 2) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
