/*
 * The floor of a user-space copy proxy on epoll (issue 16): a minimal
 * single-threaded TCP relay in C with none of a real proxy's duties (no
 * health, no backpressure bookkeeping beyond dropping a chunk that does not
 * fit, no error handling worth the name). What it costs per forwarded
 * request is what any epoll proxy on this machine pays at least; it is for
 * benchmarks/floor.py only, never for users.
 *
 *   relay_epoll LISTEN_PORT BACKEND_PORT     (both on 127.0.0.1)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "tcp.h"

#define MAXFD 65536
static int peer[MAXFD];

int
main(int argc, char **argv)
{
    static char buf[65536];
    struct epoll_event ev, evs[64];
    int lfd, ep, i, n, one = 1;

    if (argc != 3)
        return 2;
    lfd = tcp(atoi(argv[1]), 1);
    ep = epoll_create1(0);
    ev.events = EPOLLIN;
    ev.data.fd = lfd;
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    for (;;) {
        n = epoll_wait(ep, evs, 64, -1);
        for (i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == lfd) {
                int c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK), m;
                if (c < 0)
                    continue;
                setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                m = tcp(atoi(argv[2]), 0);
                if (c >= MAXFD || m >= MAXFD)
                    exit(1);
                peer[c] = m;
                peer[m] = c;
                ev.data.fd = c;
                epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev);
                ev.data.fd = m;
                epoll_ctl(ep, EPOLL_CTL_ADD, m, &ev);
                continue;
            }
            ssize_t r = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
            if (r > 0) {
                send(peer[fd], buf, r, MSG_NOSIGNAL | MSG_DONTWAIT);
            } else if (r == 0 || (errno != EAGAIN && errno != EINTR)) {
                close(peer[fd]);
                close(fd);
            }
        }
    }
}
