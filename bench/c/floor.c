/* bench/ingest.py's floor receiver: recvmmsg on 127.0.0.1:PORT, 64 datagrams a call, counting
 * them and touching nothing else: what receiving alone costs. Blocks in recvmmsg (wakes on
 * the first datagram, takes what is queued). Prints "port P" once bound; runs until killed.
 * Built at run time by bench/ingest.py (gcc -O2); not part of the package. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>

#define BATCH 64
#define SIZE 65536

int main(int argc, char **argv) {
    int rcvbuf = argc > 1 ? atoi(argv[1]) : 4 << 20;
    int sock = socket(AF_INET, SOCK_DGRAM, 0);
    if (setsockopt(sock, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof rcvbuf) != 0)
        setsockopt(sock, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    struct sockaddr_in me = {.sin_family = AF_INET};
    me.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(sock, (struct sockaddr *)&me, sizeof me) != 0) { perror("bind"); return 1; }
    socklen_t len = sizeof me;
    getsockname(sock, (struct sockaddr *)&me, &len);
    printf("port %d\n", ntohs(me.sin_port));
    fflush(stdout);
    static char bufs[BATCH][SIZE];
    struct iovec iov[BATCH];
    struct mmsghdr msgs[BATCH];
    struct sockaddr_in from[BATCH];
    unsigned long long datagrams = 0, bytes = 0;
    for (;;) {
        memset(msgs, 0, sizeof msgs);
        for (int i = 0; i < BATCH; i++) {
            iov[i].iov_base = bufs[i];
            iov[i].iov_len = SIZE;
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
            msgs[i].msg_hdr.msg_name = &from[i];
            msgs[i].msg_hdr.msg_namelen = sizeof from[i];
        }
        int r = recvmmsg(sock, msgs, BATCH, MSG_WAITFORONE, NULL);
        if (r < 0) continue;
        datagrams += r;
        for (int i = 0; i < r; i++) bytes += msgs[i].msg_len;
    }
    return 0;
}
