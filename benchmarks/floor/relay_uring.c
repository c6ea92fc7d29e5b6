/*
 * The same minimal relay as relay_epoll.c on io_uring (issue 16): one
 * io_uring_enter per turn submits every send and re-armed receive and
 * reaps every completion, instead of a recv and a send system call per
 * chunk. For benchmarks/floor.py only, never for users.
 *
 *   relay_uring LISTEN_PORT BACKEND_PORT     (both on 127.0.0.1)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <liburing.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "tcp.h"

#define MAXFD 65536
#define BUFSZ 16384
enum { ACCEPT, RECV, SEND };
static int peer[MAXFD];
static char *buf[MAXFD];
static int sentSoFar[MAXFD], pending[MAXFD];
static struct io_uring ring;
static int lfd, backendPort;

static struct io_uring_sqe *
sqe(void)
{
    struct io_uring_sqe *e = io_uring_get_sqe(&ring);
    if (!e) {
        io_uring_submit(&ring);
        e = io_uring_get_sqe(&ring);
    }
    return e;
}

static void
armRecv(int fd)
{
    struct io_uring_sqe *e = sqe();
    io_uring_prep_recv(e, fd, buf[fd], BUFSZ, 0);
    io_uring_sqe_set_data64(e, ((__u64)fd << 8) | RECV);
}

/* Send what fd received (pending[fd] bytes of buf[fd]) to its peer. */
static void
armSend(int fd)
{
    struct io_uring_sqe *e = sqe();
    io_uring_prep_send(e, peer[fd], buf[fd] + sentSoFar[fd], pending[fd] - sentSoFar[fd],
                       MSG_NOSIGNAL);
    io_uring_sqe_set_data64(e, ((__u64)fd << 8) | SEND);
}

static void
armAccept(void)
{
    struct io_uring_sqe *e = sqe();
    io_uring_prep_accept(e, lfd, NULL, NULL, 0);
    io_uring_sqe_set_data64(e, ACCEPT);
}

int
main(int argc, char **argv)
{
    struct io_uring_params p;
    struct io_uring_cqe *cqe;
    unsigned head, seen;

    if (argc != 3)
        return 2;
    memset(&p, 0, sizeof p);
    p.flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN;
    if (io_uring_queue_init_params(4096, &ring, &p) < 0) {
        p.flags = 0;
        if (io_uring_queue_init_params(4096, &ring, &p) < 0) {
            perror("io_uring");
            return 1;
        }
    }
    lfd = tcp(atoi(argv[1]), 1);
    backendPort = atoi(argv[2]);
    armAccept();
    for (;;) {
        io_uring_submit_and_wait(&ring, 1);
        seen = 0;
        io_uring_for_each_cqe(&ring, head, cqe) {
            int op = cqe->user_data & 0xff, fd = cqe->user_data >> 8, res = cqe->res;
            seen++;
            if (op == ACCEPT) {
                armAccept();
                if (res < 0)
                    continue;
                int m = tcp(backendPort, 0);
                if (res >= MAXFD || m >= MAXFD)
                    exit(1);
                peer[res] = m;
                peer[m] = res;
                buf[res] = buf[res] ? buf[res] : malloc(BUFSZ);
                buf[m] = buf[m] ? buf[m] : malloc(BUFSZ);
                armRecv(res);
                armRecv(m);
            } else if (op == RECV) {
                if (res <= 0) {
                    shutdown(peer[fd], SHUT_RDWR);
                    close(fd);
                    continue;
                }
                pending[fd] = res;
                sentSoFar[fd] = 0;
                armSend(fd);
            } else {
                if (res < 0) {
                    shutdown(fd, SHUT_RDWR);
                    continue;
                }
                sentSoFar[fd] += res;
                if (sentSoFar[fd] < pending[fd])
                    armSend(fd);
                else
                    armRecv(fd);
            }
        }
        io_uring_cq_advance(&ring, seen);
    }
}
