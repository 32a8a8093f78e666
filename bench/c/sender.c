/* bench/ingest.py's paced sender: replays a file of datagrams to 127.0.0.1:PORT with sendmmsg.
 *
 * File: repeated [u32 length, u32 records, length bytes] (little endian), as ingest.py writes.
 * stdin, one command a line: "send PORT DATAGRAMS_PER_S SECONDS" -> one line on stdout:
 * "DATAGRAMS RECORDS ERRORS ELAPSED_S". "quit" or EOF ends it. The pace is kept by the clock
 * (what is due is sent in sendmmsg batches of at most 64), busy-waiting between batches on its
 * own core. A rate of 0 sends as fast as it can. Loopback only: the address is fixed here.
 * Built at run time by bench/ingest.py (gcc -O2); not part of the package. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: sender FILE\n"); return 2; }
    FILE *f = fopen(argv[1], "rb");
    if (!f) { perror("open"); return 1; }
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *blob = malloc(size > 0 ? size : 1);
    if (!blob || fread(blob, 1, size, f) != (size_t)size) { perror("read"); return 1; }
    fclose(f);
    size_t n = 0, cap = 1024;
    struct iovec *iov = malloc(cap * sizeof *iov);
    uint32_t *records = malloc(cap * sizeof *records);
    for (long off = 0; off + 8 <= size;) {
        uint32_t len, rec;
        memcpy(&len, blob + off, 4);
        memcpy(&rec, blob + off + 4, 4);
        if (off + 8 + (long)len > size) break;
        if (n == cap) {
            cap *= 2;
            iov = realloc(iov, cap * sizeof *iov);
            records = realloc(records, cap * sizeof *records);
        }
        iov[n].iov_base = blob + off + 8;
        iov[n].iov_len = len;
        records[n++] = rec;
        off += 8 + len;
    }
    if (n == 0) { fprintf(stderr, "no datagrams in %s\n", argv[1]); return 1; }
    printf("ready %zu\n", n);
    fflush(stdout);
    struct mmsghdr msgs[BATCH];
    char line[256];
    while (fgets(line, sizeof line, stdin)) {
        int port;
        double rate, seconds;
        if (sscanf(line, "send %d %lf %lf", &port, &rate, &seconds) != 3) break;
        if (seconds > 30) seconds = 30;
        int sock = socket(AF_INET, SOCK_DGRAM, 0);
        int sndbuf = 4 << 20;
        setsockopt(sock, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
        struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(port)};
        to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        if (connect(sock, (struct sockaddr *)&to, sizeof to) != 0) { perror("connect"); return 1; }
        unsigned long long sent = 0, recs = 0, errors = 0;
        size_t i = 0;
        double t0 = now(), deadline = t0 + seconds, t;
        while ((t = now()) < deadline) {
            long long due = rate > 0 ? (long long)((t - t0) * rate) - (long long)(sent + errors)
                                     : BATCH;
            if (due <= 0) continue;
            int k = due < BATCH ? (int)due : BATCH;
            memset(msgs, 0, sizeof msgs);
            for (int j = 0; j < k; j++) {
                msgs[j].msg_hdr.msg_iov = &iov[(i + j) % n];
                msgs[j].msg_hdr.msg_iovlen = 1;
            }
            int r = sendmmsg(sock, msgs, k, 0);
            if (r < 0) { r = 0; }
            for (int j = 0; j < r; j++) recs += records[(i + j) % n];
            sent += r;
            errors += k - r; /* ECONNREFUSED, ENOBUFS: counted, skipped */
            i = (i + k) % n;
        }
        double elapsed = now() - t0;
        close(sock);
        printf("%llu %llu %llu %.6f\n", sent, recs, errors, elapsed);
        fflush(stdout);
    }
    return 0;
}
