/*
 * What both floor relays share (benchmarks/floor): a loopback TCP socket,
 * listening on or connected to `port`, with TCP_NODELAY.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

static int
tcp(int port, int listening)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    int one = 1, s = socket(AF_INET, SOCK_STREAM, 0);

    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (listening) {
        setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        /* The last run's ring may hold its port for a moment after exit. */
        for (int tries = 0; bind(s, (void *)&a, sizeof a) < 0 && tries < 50; tries++)
            usleep(100000);
        if (listen(s, 1024) < 0) {
            perror("listen");
            exit(1);
        }
    } else if (connect(s, (void *)&a, sizeof a) < 0) {
        perror("connect");
        exit(1);
    }
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return s;
}
