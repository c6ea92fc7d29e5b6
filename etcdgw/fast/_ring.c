/*
 * _etcdgw_ring: joined pairs forwarded through io_uring (issue 16).
 *
 * On this machine a proxy on epoll pays, per forwarded request, a recv and a
 * send system call per direction and the epoll wake-ups around them: a
 * minimal C relay doing nothing else costs 0.90x HAProxy's CPU per request,
 * one on io_uring 0.74x (benchmarks/floor). A Ring keeps each joined pair
 * whose two connections are quiet (nothing queued, not closing, no splice
 * pipe: etcdgw.fast.ring decides) out of the reactor's epoll: a receive is
 * armed on each socket, what it brings is sent to the peer, and only once
 * that send is complete is the receive armed again, so a slow reader holds
 * at most one buffer per direction and the writer meets TCP's own
 * backpressure, as on the copy path. One io_uring_enter per turn submits
 * every send and receive and reaps every completion.
 *
 * Receives pick their buffer when data arrives (a provided-buffer ring,
 * IORING_REGISTER_PBUF_RING), so an idle pair holds no buffer. A receive
 * that finds none left (ENOBUFS) waits for a buffer to come back.
 *
 * Anything that is not "bytes arrived, bytes sent" takes the pair out of
 * the ring (it "leaves"): an end of stream, a receive or send error, a read
 * that filled the whole buffer (bulk: the copy path splices), or Python
 * asking (leave()). Leaving cancels what is outstanding on the pair; bytes
 * a cancelled send did not send are handed back (`rest`), to be queued in
 * front of anything else for that socket. A pair is handed back only once
 * nothing of it is outstanding in the kernel, as records:
 *
 *   (a, b, ((a, b, read, failed, rest), (b, a, read, failed, rest)))
 *
 * one per direction src -> dst: `read`, what reading src ended with: None
 * (nothing), 0 (end of stream), an OSError, or BULK (a full buffer, sent);
 * `failed`, whether a send to dst failed (dst is lost: the send consumed
 * its error); `rest`, bytes read from src that did not reach dst (or None).
 *
 * The reactor's own epoll descriptor is watched by a multishot poll on the
 * ring: wait() blocks in io_uring_enter, not epoll_wait, and says when the
 * reactor has events of its own.
 *
 * The ring is single-issuer with deferred task work (Linux 6.1): it must be
 * used by the thread that made it, which is the reactor's.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <linux/io_uring.h>
#include <linux/time_types.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#define K_WATCH 0
#define K_RECV 1
#define K_SEND 2
#define K_CANCEL 3

#define IDLE 0
#define RECVING 1
#define SENDING 2
#define STARVED 3 /* waiting for a buffer */

typedef struct {
    int src, dst;     /* descriptors */
    int state;        /* IDLE, RECVING, SENDING, STARVED */
    int bid;          /* provided buffer holding what is being sent, or -1 */
    char *heap;       /* or a copy of what a stalled send has left, or NULL */
    unsigned len, off; /* bytes to send, sent so far */
    PyObject *read;   /* what reading src ended with (NULL: nothing) */
    int failed;       /* a send to dst failed */
    PyObject *rest;   /* bytes not sent (leaving), or NULL */
    PyObject *count;  /* ByteCount: .n += bytes sent */
} Dir;

typedef struct {
    PyObject *a, *b;
    Dir d[2];
    int leaving, inflight;
    uint32_t gen;
    int next; /* free list / starved list link */
} Pair;

typedef struct {
    PyObject_HEAD
    int fd, epfd;
    pid_t pid;
    /* submission queue */
    unsigned *sqHead, *sqTail, sqMask, sqEntries, *sqArray;
    struct io_uring_sqe *sqes;
    unsigned sqLocal, toSubmit;
    /* completion queue */
    unsigned *cqHead, *cqTail, cqMask;
    struct io_uring_cqe *cqes;
    void *sqMap, *cqMap;
    size_t sqMapLen, cqMapLen, sqesLen;
    /* provided buffers */
    struct io_uring_buf_ring *br;
    size_t brLen;
    char *bufs;
    unsigned nbufs, bufSize;
    unsigned short brTail;
    /* pairs */
    Pair **pairs;
    int npairs, cap, freeList, active;
    uint32_t gen;
    int watchArmed, ready;
    unsigned starved, gave; /* directions waiting for a buffer; buffers given back */
    PyObject *left;      /* records of pairs that left, for wait() */
    PyObject *bulk;      /* the BULK marker */
} Ring;

static PyObject *s_n;

static int
enter(Ring *r, unsigned submit, unsigned minComplete, unsigned flags, struct __kernel_timespec *ts)
{
    struct io_uring_getevents_arg arg;
    int ret;

    if (ts) {
        memset(&arg, 0, sizeof arg);
        arg.sigmask_sz = _NSIG / 8;
        arg.ts = (uint64_t)(uintptr_t)ts;
        ret = (int)syscall(__NR_io_uring_enter, r->fd, submit, minComplete,
                           flags | IORING_ENTER_EXT_ARG, &arg, sizeof arg);
    } else {
        ret = (int)syscall(__NR_io_uring_enter, r->fd, submit, minComplete, flags, NULL, 0);
    }
    return ret < 0 ? -errno : ret;
}

/* Publish queued submissions and hand them to the kernel (no wait). */
static int
flush(Ring *r)
{
    while (r->toSubmit) {
        int n;
        __atomic_store_n(r->sqTail, r->sqLocal, __ATOMIC_RELEASE);
        n = enter(r, r->toSubmit, 0, IORING_ENTER_GETEVENTS, NULL);
        if (n == -EINTR)
            continue;
        if (n < 0)
            return n;
        if (n == 0)
            return -EBUSY;
        r->toSubmit -= (unsigned)n;
    }
    return 0;
}

static struct io_uring_sqe *
sqe(Ring *r)
{
    struct io_uring_sqe *e;

    if (r->sqLocal - __atomic_load_n(r->sqHead, __ATOMIC_ACQUIRE) >= r->sqEntries) {
        if (flush(r) < 0)
            return NULL;
    }
    e = &r->sqes[r->sqLocal & r->sqMask];
    if (r->sqArray)
        r->sqArray[r->sqLocal & r->sqMask] = r->sqLocal & r->sqMask;
    r->sqLocal++;
    r->toSubmit++;
    memset(e, 0, sizeof *e);
    return e;
}

static uint64_t
tag(Ring *r, int slot, int dir, int kind)
{
    return ((uint64_t)r->pairs[slot]->gen << 40) | ((uint64_t)(unsigned)slot << 8)
        | (uint64_t)(dir << 2) | (uint64_t)kind;
}

static void
giveBuffer(Ring *r, int bid)
{
    struct io_uring_buf *b = &r->br->bufs[r->brTail & (r->nbufs - 1)];

    b->addr = (uint64_t)(uintptr_t)(r->bufs + (size_t)bid * r->bufSize);
    b->len = r->bufSize;
    b->bid = (unsigned short)bid;
    r->brTail++;
    r->gave++;
    __atomic_store_n(&r->br->tail, r->brTail, __ATOMIC_RELEASE);
}

/* Where the bytes direction d still has to send start. */
static char *
pending(Ring *r, Dir *d)
{
    return (d->heap ? d->heap : r->bufs + (size_t)d->bid * r->bufSize) + d->off;
}

static int
armRecv(Ring *r, int slot, int dir)
{
    Pair *p = r->pairs[slot];
    struct io_uring_sqe *e = sqe(r);

    if (!e)
        return -1;
    e->opcode = IORING_OP_RECV;
    e->fd = p->d[dir].src;
    e->len = r->bufSize;
    e->flags = IOSQE_BUFFER_SELECT;
    e->buf_group = 0;
    e->user_data = tag(r, slot, dir, K_RECV);
    p->d[dir].state = RECVING;
    p->inflight++;
    return 0;
}

static int
armSend(Ring *r, int slot, int dir)
{
    Pair *p = r->pairs[slot];
    Dir *d = &p->d[dir];
    struct io_uring_sqe *e = sqe(r);

    if (!e)
        return -1;
    e->opcode = IORING_OP_SEND;
    e->fd = d->dst;
    e->addr = (uint64_t)(uintptr_t)pending(r, d);
    e->len = d->len - d->off;
    /* From a shared buffer, only what goes at once (a slow reader must not
     * hold one: the rest is copied out, see stall()); from the copy, a send
     * that waits for room. */
    e->msg_flags = MSG_NOSIGNAL | (d->heap ? 0 : MSG_DONTWAIT);
    e->user_data = tag(r, slot, dir, K_SEND);
    d->state = SENDING;
    p->inflight++;
    return 0;
}

static int
cancel(Ring *r, int slot, int dir, int kind)
{
    struct io_uring_sqe *e = sqe(r);

    if (!e)
        return -1;
    e->opcode = IORING_OP_ASYNC_CANCEL;
    e->fd = -1;
    e->addr = tag(r, slot, dir, kind);
    e->user_data = K_CANCEL;
    return 0;
}

static int
armWatch(Ring *r)
{
    struct io_uring_sqe *e = sqe(r);

    if (!e)
        return -1;
    e->opcode = IORING_OP_POLL_ADD;
    e->fd = r->epfd;
    e->poll32_events = POLLIN;
    e->len = IORING_POLL_ADD_MULTI;
    e->user_data = K_WATCH;
    r->watchArmed = 1;
    return 0;
}

/* Start taking pair `slot` out: cancel what is outstanding. */
static int
startLeaving(Ring *r, int slot)
{
    Pair *p = r->pairs[slot];
    int dir;

    if (p->leaving)
        return 0;
    p->leaving = 1;
    for (dir = 0; dir < 2; dir++) {
        Dir *d = &p->d[dir];
        if (d->state == RECVING && cancel(r, slot, dir, K_RECV) < 0)
            return -1;
        if (d->state == SENDING && cancel(r, slot, dir, K_SEND) < 0)
            return -1;
    }
    return 0;
}

static PyObject *
record(Ring *r, int slot)
{
    Pair *p = r->pairs[slot];
    PyObject *dirs[2], *rec;
    int dir;

    for (dir = 0; dir < 2; dir++) {
        Dir *d = &p->d[dir];
        PyObject *src = dir ? p->b : p->a, *dst = dir ? p->a : p->b;
        dirs[dir] = Py_BuildValue("(OOOOO)", src, dst, d->read ? d->read : Py_None,
                                  d->failed ? Py_True : Py_False, d->rest ? d->rest : Py_None);
        if (!dirs[dir]) {
            if (dir)
                Py_DECREF(dirs[0]);
            return NULL;
        }
    }
    rec = Py_BuildValue("(OO(NN))", p->a, p->b, dirs[0], dirs[1]);
    return rec;
}

static void
freePair(Ring *r, int slot)
{
    Pair *p = r->pairs[slot];
    int dir;

    for (dir = 0; dir < 2; dir++) {
        Py_CLEAR(p->d[dir].read);
        Py_CLEAR(p->d[dir].rest);
        Py_CLEAR(p->d[dir].count);
        if (p->d[dir].bid >= 0) {
            giveBuffer(r, p->d[dir].bid);
            p->d[dir].bid = -1;
        }
        PyMem_Free(p->d[dir].heap);
        p->d[dir].heap = NULL;
        if (p->d[dir].state == STARVED)
            r->starved--;
    }
    Py_CLEAR(p->a);
    Py_CLEAR(p->b);
    p->gen = ++r->gen & 0xffffff;
    p->next = r->freeList;
    r->freeList = slot;
    r->active--;
}

/* A pair that is leaving and has nothing outstanding: its record goes to
 * r->left. */
static int
finishIfDone(Ring *r, int slot)
{
    Pair *p = r->pairs[slot];
    PyObject *rec;
    int dir;

    if (!p->leaving || p->inflight)
        return 0;
    for (dir = 0; dir < 2; dir++) {
        Dir *d = &p->d[dir];
        if ((d->bid >= 0 || d->heap) && d->off < d->len) {
            d->rest = PyBytes_FromStringAndSize(pending(r, d), d->len - d->off);
            if (!d->rest)
                return -1;
        }
    }
    rec = record(r, slot);
    if (!rec || PyList_Append(r->left, rec) < 0) {
        Py_XDECREF(rec);
        return -1;
    }
    Py_DECREF(rec);
    freePair(r, slot);
    return 0;
}

static int
addCount(PyObject *count, long n)
{
    PyObject *old = PyObject_GetAttr(count, s_n), *add, *sum;
    int ret;

    if (!old)
        return -1;
    add = PyLong_FromLong(n);
    sum = add ? PyNumber_Add(old, add) : NULL;
    Py_DECREF(old);
    Py_XDECREF(add);
    if (!sum)
        return -1;
    ret = PyObject_SetAttr(count, s_n, sum);
    Py_DECREF(sum);
    return ret;
}

static PyObject *
osError(int err)
{
    return PyObject_CallFunction(PyExc_OSError, "is", err, strerror(err));
}

/* Re-arm every starved direction (a buffer came back). */
static int
rearmStarved(Ring *r)
{
    int slot, dir;

    for (slot = 0; slot < r->npairs; slot++) {
        Pair *p = r->pairs[slot];
        if (!p || !p->a || p->leaving)
            continue;
        for (dir = 0; dir < 2; dir++)
            if (p->d[dir].state == STARVED) {
                r->starved--;
                if (armRecv(r, slot, dir) < 0)
                    return -1;
            }
    }
    return 0;
}

static void sent(Ring *r, Dir *d);

/* A send from a shared buffer did not take everything at once: copy the
 * rest out, give the buffer back, and send from the copy (waiting for room).
 * A slow reader holds at most one such copy per direction, as the copy path
 * holds the rest in Twisted's write buffer. */
static int
stall(Ring *r, int slot, int dir)
{
    Dir *d = &r->pairs[slot]->d[dir];
    unsigned rest = d->len - d->off;
    char *copy = PyMem_Malloc(rest);

    if (!copy) {
        /* No memory for the rest: this pair alone goes, as if the send had
         * failed (its target is aborted, its peer hears a reset); the ring
         * and every other pair go on. */
        d->failed = 1;
        sent(r, d);
        if (startLeaving(r, slot) < 0)
            return -1;
        return finishIfDone(r, slot);
    }
    memcpy(copy, pending(r, d), rest);
    giveBuffer(r, d->bid);
    d->bid = -1;
    d->heap = copy;
    d->len = rest;
    d->off = 0;
    if (r->pairs[slot]->leaving)
        return finishIfDone(r, slot);
    return armSend(r, slot, dir);
}

/* A direction has sent everything: its buffer goes back. */
static void
sent(Ring *r, Dir *d)
{
    if (d->bid >= 0)
        giveBuffer(r, d->bid);
    d->bid = -1;
    PyMem_Free(d->heap);
    d->heap = NULL;
    d->len = d->off = 0;
}

static int
complete(Ring *r, struct io_uring_cqe *c)
{
    uint64_t u = c->user_data;
    int kind = u & 3, dir = (u >> 2) & 1, slot = (int)((u >> 8) & 0xffffffff);
    uint32_t gen = (uint32_t)(u >> 40);
    int res = c->res;
    Pair *p;
    Dir *d;

    if (kind == K_CANCEL)
        return 0;
    if (kind == K_WATCH) {
        r->ready = 1;
        if (!(c->flags & IORING_CQE_F_MORE))
            r->watchArmed = 0;
        return 0;
    }
    if (slot >= r->npairs || !(p = r->pairs[slot]) || p->gen != gen || !p->a) {
        /* Not ours any more: can only be a buffer to give back. */
        if (c->flags & IORING_CQE_F_BUFFER)
            giveBuffer(r, c->flags >> IORING_CQE_BUFFER_SHIFT);
        return 0;
    }
    d = &p->d[dir];
    p->inflight--;
    if (kind == K_RECV) {
        int bid = (c->flags & IORING_CQE_F_BUFFER) ? (int)(c->flags >> IORING_CQE_BUFFER_SHIFT) : -1;
        d->state = IDLE;
        if (res > 0 && bid >= 0) {
            d->bid = bid;
            d->len = (unsigned)res;
            d->off = 0;
            if (addCount(d->count, res) < 0)
                PyErr_Clear(); /* a counter that cannot count does not stop the bytes */
            if (p->leaving)
                return finishIfDone(r, slot); /* handed back as rest */
            if ((unsigned)res == r->bufSize) {
                /* Bulk: sent here, then the pair leaves for splice(2). */
                Py_INCREF(r->bulk);
                d->read = r->bulk;
                if (armSend(r, slot, dir) < 0 || startLeaving(r, slot) < 0)
                    return -1;
                return 0;
            }
            if (armSend(r, slot, dir) < 0)
                return -1;
            return 0;
        }
        if (bid >= 0)
            giveBuffer(r, bid);
        if (res == -ENOBUFS && !p->leaving) {
            d->state = STARVED;
            r->starved++;
            return 0;
        }
        if (res == -ECANCELED || res == -EINTR || res == -EAGAIN) {
            if (!p->leaving && armRecv(r, slot, dir) < 0)
                return -1;
        } else {
            d->read = res == 0 ? PyLong_FromLong(0) : osError(-res);
            if (!d->read)
                return -1;
            if (startLeaving(r, slot) < 0)
                return -1;
        }
        return finishIfDone(r, slot);
    }
    /* K_SEND */
    d->state = IDLE;
    if (res >= 0 || res == -EAGAIN) {
        if (res > 0)
            d->off += (unsigned)res;
        if (d->off < d->len) {
            /* Partial, or no room (a slow reader). */
            if (!d->heap)
                return stall(r, slot, dir);
            if (!p->leaving)
                return armSend(r, slot, dir);
            return finishIfDone(r, slot);
        }
        sent(r, d);
        if (!p->leaving)
            return armRecv(r, slot, dir);
        return finishIfDone(r, slot);
    }
    if (res == -ECANCELED || res == -EINTR) {
        if (!p->leaving)
            return armSend(r, slot, dir);
        return finishIfDone(r, slot);
    }
    /* The send failed: dst is lost; what was not sent goes with it. */
    d->failed = 1;
    sent(r, d);
    if (startLeaving(r, slot) < 0)
        return -1;
    return finishIfDone(r, slot);
}

/* Reap every completion there is. */
static int
reap(Ring *r)
{
    for (;;) {
        unsigned head = *r->cqHead, tail = __atomic_load_n(r->cqTail, __ATOMIC_ACQUIRE);
        if (head == tail)
            break;
        while (head != tail) {
            struct io_uring_cqe c = r->cqes[head & r->cqMask];
            head++;
            __atomic_store_n(r->cqHead, head, __ATOMIC_RELEASE);
            if (complete(r, &c) < 0)
                return -1;
        }
    }
    /* Directions that found no buffer are armed again once one came back
     * (not before: they would find none again, at once). */
    if (r->starved && r->gave) {
        r->gave = 0;
        if (rearmStarved(r) < 0)
            return -1;
    }
    return 0;
}

static PyObject *
raiseErrno(int err)
{
    errno = err;
    return PyErr_SetFromErrno(PyExc_OSError);
}

/* wait(timeout): timeout in seconds (float), negative: no limit. */
static PyObject *
Ring_wait(Ring *r, PyObject *arg)
{
    double timeout = PyFloat_AsDouble(arg);
    struct __kernel_timespec ts;
    PyObject *left, *out;
    int n, rounds;

    if (timeout == -1.0 && PyErr_Occurred())
        return NULL;
    if (r->fd < 0 || r->pid != getpid())
        return raiseErrno(EBADF);
    if (!r->watchArmed && armWatch(r) < 0)
        return raiseErrno(EBUSY);
    __atomic_store_n(r->sqTail, r->sqLocal, __ATOMIC_RELEASE);
    /* What an earlier leave() reaped (the reactor's wake-up, pairs that
     * left) is reported now, without waiting. */
    if (r->ready || PyList_GET_SIZE(r->left))
        timeout = 0;
    if (timeout >= 0) {
        ts.tv_sec = (long long)timeout;
        ts.tv_nsec = (long long)((timeout - (double)ts.tv_sec) * 1e9);
    }
    Py_BEGIN_ALLOW_THREADS
    n = enter(r, r->toSubmit, 1, IORING_ENTER_GETEVENTS, timeout >= 0 ? &ts : NULL);
    Py_END_ALLOW_THREADS
    if (n >= 0)
        r->toSubmit -= (unsigned)n;
    else if (n != -EINTR && n != -ETIME && n != -EBUSY)
        return raiseErrno(-n);
    /* Reap; what completions queue (sends, receives) is submitted and its
     * completions reaped too, while there are any (a few rounds). */
    for (rounds = 0; rounds < 8; rounds++) {
        if (reap(r) < 0)
            return NULL;
        if (!r->toSubmit)
            break;
        __atomic_store_n(r->sqTail, r->sqLocal, __ATOMIC_RELEASE);
        n = enter(r, r->toSubmit, 0, IORING_ENTER_GETEVENTS, NULL);
        if (n < 0 && n != -EINTR && n != -EBUSY)
            return raiseErrno(-n);
        if (n > 0)
            r->toSubmit -= (unsigned)n;
    }
    left = r->left;
    if (PyList_GET_SIZE(left)) {
        r->left = PyList_New(0);
        if (!r->left) {
            r->left = left;
            return NULL;
        }
    } else {
        Py_INCREF(Py_None);
        left = Py_None;
    }
    out = Py_BuildValue("(ON)", r->ready ? Py_True : Py_False, left);
    r->ready = 0;
    return out;
}

/* add(a, b, fdA, fdB, countAB, countBA): the pair's slot. */
static PyObject *
Ring_add(Ring *r, PyObject *args)
{
    PyObject *a, *b, *ca, *cb;
    int fa, fb, slot, dir;
    Pair *p;

    if (!PyArg_ParseTuple(args, "OOiiOO", &a, &b, &fa, &fb, &ca, &cb))
        return NULL;
    if (r->fd < 0)
        return raiseErrno(EBADF);
    if (r->freeList >= 0) {
        slot = r->freeList;
        p = r->pairs[slot];
        r->freeList = p->next;
    } else {
        if (r->npairs == r->cap) {
            int cap = r->cap ? r->cap * 2 : 64;
            Pair **grown = PyMem_Realloc(r->pairs, sizeof(Pair *) * (size_t)cap);
            if (!grown)
                return PyErr_NoMemory();
            r->pairs = grown;
            r->cap = cap;
        }
        p = PyMem_Calloc(1, sizeof(Pair));
        if (!p)
            return PyErr_NoMemory();
        slot = r->npairs++;
        r->pairs[slot] = p;
        p->gen = ++r->gen & 0xffffff;
    }
    Py_INCREF(a);
    Py_INCREF(b);
    p->a = a;
    p->b = b;
    p->leaving = p->inflight = 0;
    for (dir = 0; dir < 2; dir++) {
        Dir *d = &p->d[dir];
        d->src = dir ? fb : fa;
        d->dst = dir ? fa : fb;
        d->state = IDLE;
        d->bid = -1;
        d->heap = NULL;
        d->len = d->off = 0;
        d->read = d->rest = NULL;
        d->failed = 0;
        d->count = dir ? cb : ca;
        Py_INCREF(d->count);
    }
    r->active++;
    if (armRecv(r, slot, 0) < 0 || armRecv(r, slot, 1) < 0)
        return raiseErrno(EBUSY);
    return PyLong_FromLong(slot);
}

/* leave(slot): take the pair out now; its record. */
static PyObject *
Ring_leave(Ring *r, PyObject *arg)
{
    long slot = PyLong_AsLong(arg);
    Pair *p;
    PyObject *a;
    uint32_t gen;
    Py_ssize_t i;

    if (slot == -1 && PyErr_Occurred())
        return NULL;
    if (slot < 0 || slot >= r->npairs || !(p = r->pairs[slot]) || !p->a) {
        PyErr_SetString(PyExc_KeyError, "no such pair in the ring");
        return NULL;
    }
    gen = p->gen;
    a = p->a;
    Py_INCREF(a);
    if (startLeaving(r, (int)slot) < 0 || finishIfDone(r, (int)slot) < 0)
        goto fail;
    while (p->gen == gen && p->a) {
        int ret;
        __atomic_store_n(r->sqTail, r->sqLocal, __ATOMIC_RELEASE);
        ret = enter(r, r->toSubmit, 1, IORING_ENTER_GETEVENTS, NULL);
        if (ret < 0 && ret != -EINTR && ret != -EBUSY) {
            raiseErrno(-ret);
            goto fail;
        }
        if (ret > 0)
            r->toSubmit -= (unsigned)ret;
        if (reap(r) < 0)
            goto fail;
    }
    /* Its record is in r->left (the others there stay for wait()). */
    for (i = PyList_GET_SIZE(r->left) - 1; i >= 0; i--) {
        PyObject *rec = PyList_GET_ITEM(r->left, i);
        if (PyTuple_GET_ITEM(rec, 0) == a) {
            Py_INCREF(rec);
            if (PySequence_DelItem(r->left, i) < 0) {
                Py_DECREF(rec);
                goto fail;
            }
            Py_DECREF(a);
            return rec;
        }
    }
    PyErr_SetString(PyExc_RuntimeError, "a pair left the ring without a record");
fail:
    Py_DECREF(a);
    return NULL;
}

/* leaveAll(): take every pair out now; the records of every pair that left
 * since the last wait() (all of them, then). */
static PyObject *
Ring_leaveAll(Ring *r, PyObject *unused)
{
    PyObject *left;
    int slot;

    if (r->fd < 0)
        return PyList_New(0);
    for (slot = 0; slot < r->npairs; slot++) {
        Pair *p = r->pairs[slot];
        if (p && p->a && (startLeaving(r, slot) < 0 || finishIfDone(r, slot) < 0))
            return PyErr_Occurred() ? NULL : raiseErrno(EBUSY);
    }
    while (r->active) {
        int ret;
        __atomic_store_n(r->sqTail, r->sqLocal, __ATOMIC_RELEASE);
        ret = enter(r, r->toSubmit, 1, IORING_ENTER_GETEVENTS, NULL);
        if (ret < 0 && ret != -EINTR && ret != -EBUSY)
            return raiseErrno(-ret);
        if (ret > 0)
            r->toSubmit -= (unsigned)ret;
        if (reap(r) < 0)
            return NULL;
    }
    left = r->left;
    r->left = PyList_New(0);
    if (!r->left) {
        r->left = left;
        return NULL;
    }
    return left;
}

/* active(): how many pairs are in the ring. */
static PyObject *
Ring_active(Ring *r, PyObject *unused)
{
    return PyLong_FromLong(r->active);
}

static void
unmapAll(Ring *r)
{
    if (r->sqMap && r->sqMap != MAP_FAILED)
        munmap(r->sqMap, r->sqMapLen);
    if (r->cqMap && r->cqMap != MAP_FAILED && r->cqMap != r->sqMap)
        munmap(r->cqMap, r->cqMapLen);
    if (r->sqes && (void *)r->sqes != MAP_FAILED)
        munmap(r->sqes, r->sqesLen);
    if (r->br && (void *)r->br != MAP_FAILED)
        munmap(r->br, r->brLen);
    if (r->bufs && (void *)r->bufs != MAP_FAILED)
        munmap(r->bufs, (size_t)r->nbufs * r->bufSize);
    r->sqMap = r->cqMap = NULL;
    r->sqes = NULL;
    r->br = NULL;
    r->bufs = NULL;
}

/* close(): the ring's descriptor is closed (the kernel cancels what is
 * outstanding); pairs still in it are dropped without records. */
static PyObject *
Ring_close(Ring *r, PyObject *unused)
{
    int slot;

    if (r->fd >= 0) {
        close(r->fd);
        r->fd = -1;
    }
    for (slot = 0; slot < r->npairs; slot++) {
        Pair *p = r->pairs[slot];
        if (p && p->a)
            freePair(r, slot);
    }
    unmapAll(r);
    Py_RETURN_NONE;
}

static void
Ring_dealloc(Ring *r)
{
    int slot;

    Py_XDECREF(Ring_close(r, NULL));
    for (slot = 0; slot < r->npairs; slot++)
        PyMem_Free(r->pairs[slot]);
    PyMem_Free(r->pairs);
    Py_XDECREF(r->left);
    Py_XDECREF(r->bulk);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

/* Ring(epfd, bulk, nbufs=64, bufSize=65536, entries=1024) */
static int
Ring_init(Ring *r, PyObject *args, PyObject *kw)
{
    static char *names[] = {"epfd", "bulk", "nbufs", "bufSize", "entries", NULL};
    struct io_uring_params params;
    struct io_uring_buf_reg reg;
    unsigned entries = 1024, nbufs = 64, bufSize = 65536, i;
    int epfd, fd;
    PyObject *bulk;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "iO|III", names, &epfd, &bulk, &nbufs, &bufSize,
                                     &entries))
        return -1;
    if (nbufs == 0 || (nbufs & (nbufs - 1)) || nbufs > 32768 || bufSize == 0) {
        PyErr_SetString(PyExc_ValueError, "nbufs must be a power of two up to 32768");
        return -1;
    }
    if (r->left) {
        PyErr_SetString(PyExc_RuntimeError, "Ring.__init__ called twice");
        return -1;
    }
    r->fd = -1;
    r->freeList = -1;
    memset(&params, 0, sizeof params);
    params.flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_CLAMP
        | IORING_SETUP_SUBMIT_ALL;
    fd = (int)syscall(__NR_io_uring_setup, entries, &params);
    if (fd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    r->fd = fd;
    if (!(params.features & IORING_FEAT_EXT_ARG) || !(params.features & IORING_FEAT_FAST_POLL)) {
        errno = ENOTSUP;
        goto fail;
    }
    r->sqMapLen = params.sq_off.array + params.sq_entries * sizeof(unsigned);
    r->cqMapLen = params.cq_off.cqes + params.cq_entries * sizeof(struct io_uring_cqe);
    if (params.features & IORING_FEAT_SINGLE_MMAP) {
        if (r->cqMapLen > r->sqMapLen)
            r->sqMapLen = r->cqMapLen;
        r->cqMapLen = r->sqMapLen;
    }
    r->sqMap = mmap(NULL, r->sqMapLen, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
                    IORING_OFF_SQ_RING);
    if (r->sqMap == MAP_FAILED)
        goto fail;
    if (params.features & IORING_FEAT_SINGLE_MMAP) {
        r->cqMap = r->sqMap;
    } else {
        r->cqMap = mmap(NULL, r->cqMapLen, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
                        IORING_OFF_CQ_RING);
        if (r->cqMap == MAP_FAILED)
            goto fail;
    }
    r->sqesLen = params.sq_entries * sizeof(struct io_uring_sqe);
    r->sqes = mmap(NULL, r->sqesLen, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
                   IORING_OFF_SQES);
    if ((void *)r->sqes == MAP_FAILED)
        goto fail;
    r->sqHead = (unsigned *)((char *)r->sqMap + params.sq_off.head);
    r->sqTail = (unsigned *)((char *)r->sqMap + params.sq_off.tail);
    r->sqMask = *(unsigned *)((char *)r->sqMap + params.sq_off.ring_mask);
    r->sqEntries = *(unsigned *)((char *)r->sqMap + params.sq_off.ring_entries);
    r->sqArray = (unsigned *)((char *)r->sqMap + params.sq_off.array);
    r->sqLocal = *r->sqTail;
    r->cqHead = (unsigned *)((char *)r->cqMap + params.cq_off.head);
    r->cqTail = (unsigned *)((char *)r->cqMap + params.cq_off.tail);
    r->cqMask = *(unsigned *)((char *)r->cqMap + params.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)((char *)r->cqMap + params.cq_off.cqes);

    /* The provided buffers (group 0). */
    r->nbufs = nbufs;
    r->bufSize = bufSize;
    r->brLen = (size_t)nbufs * sizeof(struct io_uring_buf);
    r->br = mmap(NULL, r->brLen, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if ((void *)r->br == MAP_FAILED)
        goto fail;
    r->bufs = mmap(NULL, (size_t)nbufs * bufSize, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if ((void *)r->bufs == MAP_FAILED)
        goto fail;
    memset(&reg, 0, sizeof reg);
    reg.ring_addr = (uint64_t)(uintptr_t)r->br;
    reg.ring_entries = nbufs;
    reg.bgid = 0;
    if (syscall(__NR_io_uring_register, fd, IORING_REGISTER_PBUF_RING, &reg, 1) < 0)
        goto fail;
    r->brTail = 0;
    for (i = 0; i < nbufs; i++)
        giveBuffer(r, (int)i);

    r->epfd = epfd;
    r->pid = getpid();
    r->left = PyList_New(0);
    if (!r->left)
        return -1;
    Py_INCREF(bulk);
    r->bulk = bulk;
    if (armWatch(r) < 0 || flush(r) < 0) {
        errno = EBUSY;
        goto fail;
    }
    return 0;
fail:
    PyErr_SetFromErrno(PyExc_OSError);
    unmapAll(r);
    if (r->fd >= 0)
        close(r->fd);
    r->fd = -1;
    return -1;
}

static PyObject *
Ring_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    Ring *r = (Ring *)type->tp_alloc(type, 0);

    if (r) {
        r->fd = r->epfd = -1;
        r->freeList = -1;
    }
    return (PyObject *)r;
}

static PyMethodDef Ring_methods[] = {
    {"wait", (PyCFunction)Ring_wait, METH_O,
     "wait(timeout): (reactorReady, records or None); timeout in seconds, < 0: none."},
    {"add", (PyCFunction)Ring_add, METH_VARARGS,
     "add(a, b, fdA, fdB, countAB, countBA): put a joined pair in the ring; its slot."},
    {"leave", (PyCFunction)Ring_leave, METH_O, "leave(slot): take the pair out now; its record."},
    {"leaveAll", (PyCFunction)Ring_leaveAll, METH_NOARGS,
     "Take every pair out now; the records of every pair that left."},
    {"active", (PyCFunction)Ring_active, METH_NOARGS, "How many pairs are in the ring."},
    {"close", (PyCFunction)Ring_close, METH_NOARGS, "Close the ring."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject RingType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "_etcdgw_ring.Ring",
    .tp_basicsize = sizeof(Ring),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Joined pairs forwarded through io_uring.",
    .tp_new = Ring_new,
    .tp_init = (initproc)Ring_init,
    .tp_dealloc = (destructor)Ring_dealloc,
    .tp_methods = Ring_methods,
};

static struct PyModuleDef ringModule = {
    PyModuleDef_HEAD_INIT, "_etcdgw_ring", "Joined pairs forwarded through io_uring.", -1, NULL,
};

PyMODINIT_FUNC
PyInit__etcdgw_ring(void)
{
    PyObject *m;

    s_n = PyUnicode_InternFromString("n");
    if (!s_n || PyType_Ready(&RingType) < 0)
        return NULL;
    m = PyModule_Create(&ringModule);
    if (!m)
        return NULL;
    Py_INCREF(&RingType);
    if (PyModule_AddObject(m, "Ring", (PyObject *)&RingType) < 0
        || PyModule_AddIntConstant(m, "CONTRACT", 1) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
