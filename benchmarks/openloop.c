/* Open-loop HTTP/1.1 load generator (wrk2-like), one thread, epoll, microsecond timers.
 *
 * Send times are drawn in advance from a Poisson process at RATE requests/s. Each request
 * goes out at its scheduled time on an idle keep-alive connection (a new connection is opened
 * when none is idle, up to MAXCONNS; beyond that requests wait in a FIFO). Latency is taken
 * from the *scheduled* send time, so a server that falls behind is charged for the queue it
 * causes (no coordinated omission); service time (from the actual send) and the driver's own
 * lateness are reported beside it. Prints the same JSON as benchmarks/openloop.py.
 *
 * With OBJECTIVE_MS (optional), "ok_within" counts the 200 answers whose latency (from the
 * scheduled send) was at most that: the goodput. "refused" describes the 503 answers: how
 * many, how many carried Retry-After, and their latency.
 *
 * Built by benchmarks/run.py with `cc -O2 -o openloop openloop.c -lm`.
 * usage: openloop HOST PORT PATH BODYFILE CONTENT_TYPE RATE DURATION_S WARMUP_S MAXCONNS SEED [OBJECTIVE_MS]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    int fd, busy;
    long req;             /* index of the request in flight */
    char *buf;
    size_t len, cap;
} conn_t;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void pct_json(FILE *out, double *v, long n) {
    if (n == 0) { fprintf(out, "{}"); return; }
    qsort(v, n, sizeof(double), cmp_double);
    double ps[] = {50, 90, 99, 99.9};
    const char *names[] = {"p50_ms", "p90_ms", "p99_ms", "p99_9_ms"};
    double sum = 0;
    for (long i = 0; i < n; i++) sum += v[i];
    fprintf(out, "{");
    for (int i = 0; i < 4; i++) {
        long k = (long)ceil(ps[i] / 100.0 * n - 1e-9) - 1  /* nearest rank */;
        if (k < 0) k = 0;
        if (k >= n) k = n - 1;
        fprintf(out, "\"%s\": %.4f, ", names[i], v[k] * 1000);
    }
    fprintf(out, "\"mean_ms\": %.4f, \"max_ms\": %.4f}", sum / n * 1000, v[n - 1] * 1000);
}

/* 1 when conn holds one whole response (consumed from its buffer), 0 when more is needed;
 * *retry: the response carries a Retry-After header. */
static int parse(conn_t *c, int *status, int *retry) {
    char *end = memmem(c->buf, c->len, "\r\n\r\n", 4);
    if (!end) return 0;
    size_t head = end - c->buf + 4, total;
    *status = c->len >= 12 ? atoi(c->buf + 9) : 0;
    *retry = 0;
    char *cl = NULL;
    for (char *p = c->buf; p < end; p++) {
        if (p[0] != '\n') continue;
        if (!cl && strncasecmp(p + 1, "content-length:", 15) == 0) cl = p + 16;
        else if (strncasecmp(p + 1, "retry-after:", 12) == 0) *retry = 1;
    }
    if (cl) {
        total = head + strtoul(cl, NULL, 10);
        if (c->len < total) return 0;
    } else if (memmem(c->buf, head, "chunked", 7)) {
        char *z = memmem(c->buf + head - 2, c->len - head + 2, "\r\n0\r\n\r\n", 7);
        if (!z) return 0;
        total = z - c->buf + 7;
    } else {
        total = head;
    }
    memmove(c->buf, c->buf + total, c->len - total);
    c->len -= total;
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 11 && argc != 12) {
        fprintf(stderr, "usage: %s HOST PORT PATH BODYFILE CONTENT_TYPE RATE DURATION WARMUP MAXCONNS SEED [OBJECTIVE_MS]\n", argv[0]);
        return 2;
    }
    const char *host = argv[1], *path = argv[3], *ctype = argv[5];
    int port = atoi(argv[2]), maxconns = atoi(argv[9]);
    double rate = atof(argv[6]), duration = atof(argv[7]), warmup = atof(argv[8]);
    double objective = argc == 12 ? atof(argv[11]) / 1000.0 : -1;  /* seconds; < 0: none */
    srand48(atol(argv[10]));

    FILE *bf = fopen(argv[4], "rb");
    if (!bf) { perror("body"); return 2; }
    fseek(bf, 0, SEEK_END);
    long blen = ftell(bf);
    fseek(bf, 0, SEEK_SET);
    char head[1024];
    int hlen = snprintf(head, sizeof head, "POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: %s\r\nContent-Length: %ld\r\n\r\n",
                        path, host, port, ctype, blen);
    size_t plen = hlen + blen;
    char *payload = malloc(plen);
    memcpy(payload, head, hlen);
    if (fread(payload + hlen, 1, blen, bf) != (size_t)blen) { perror("body"); return 2; }
    fclose(bf);

    /* the schedule */
    long cap = (long)(rate * (duration + warmup) * 1.2) + 1024, n = 0;
    double *sched = malloc(cap * sizeof(double)), t = 0;
    while (1) {
        t += -log(1.0 - drand48()) / rate;
        if (t >= duration + warmup) break;
        if (n == cap) { cap *= 2; sched = realloc(sched, cap * sizeof(double)); }
        sched[n++] = t;
    }
    double *sent = calloc(n, sizeof(double)), *done = calloc(n, sizeof(double));
    int *status = calloc(n, sizeof(int));
    char *retried = calloc(n, 1);  /* the answer carried Retry-After */
    long *fifo = malloc(n * sizeof(long)), fhead = 0, ftail = 0;

    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, host, &addr.sin_addr);
    int ep = epoll_create1(0);
    conn_t *conns = calloc(maxconns, sizeof(conn_t));
    int nconns = 0, nopen = 0, *idle = malloc(maxconns * sizeof(int)), nidle = 0;
    int *freeslot = malloc(maxconns * sizeof(int)), nfree = 0;  /* slots of closed connections */
    long outstanding = 0, next = 0, finished = 0, errors_conn = 0;
    struct epoll_event evs[256];
    int use_pwait2 = 1;
    double start = now_s() + 0.01;
    for (long i = 0; i < n; i++) sched[i] += start;

    while (finished < n) {
        double now = now_s();
        while (next < n && sched[next] <= now) fifo[ftail++] = next++;
        while (fhead < ftail) {  /* dispatch what is due */
            int ci;
            if (nidle > 0) ci = idle[--nidle];
            else if (nopen < maxconns) {
                int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
                if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
                    if (fd >= 0) close(fd);
                    long r = fifo[fhead++];
                    sent[r] = done[r] = now_s();
                    status[r] = 0;
                    finished++;
                    errors_conn++;
                    continue;
                }
                setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                ci = nfree > 0 ? freeslot[--nfree] : nconns++;
                nopen++;
                conns[ci].fd = fd;
                if (!conns[ci].buf) { conns[ci].cap = 65536; conns[ci].buf = malloc(conns[ci].cap); }
                struct epoll_event ev = {.events = EPOLLIN, .data.u32 = ci};
                epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
            } else break;
            conn_t *c = &conns[ci];
            long r = fifo[fhead++];
            c->busy = 1;
            c->req = r;
            sent[r] = now_s();
            size_t off = 0;
            while (off < plen) {
                ssize_t w = write(c->fd, payload + off, plen - off);
                if (w < 0) { if (errno == EINTR || errno == EAGAIN) continue; break; }
                off += w;
            }
            outstanding++;
        }
        /* wait for answers, or until the next send is due */
        double wait = next < n ? sched[next] - now_s() : 1.0;
        if (wait < 0) wait = 0;
        if (next >= n && outstanding == 0) break;
        if (next >= n && now_s() > sched[n - 1] + 60) break;  /* give up on stragglers */
        int k;
        if (use_pwait2) {
            struct timespec ts = {.tv_sec = (time_t)wait, .tv_nsec = (long)((wait - (time_t)wait) * 1e9)};
            k = epoll_pwait2(ep, evs, 256, &ts, NULL);
            if (k < 0 && errno == ENOSYS) { use_pwait2 = 0; continue; }
        } else {
            k = epoll_wait(ep, evs, 256, (int)(wait * 1000));
        }
        for (int i = 0; i < k; i++) {
            conn_t *c = &conns[evs[i].data.u32];
            if (c->fd < 0) continue;
            while (1) {
                if (c->cap - c->len < 16384) { c->cap *= 2; c->buf = realloc(c->buf, c->cap); }
                ssize_t got = read(c->fd, c->buf + c->len, c->cap - c->len);
                if (got <= 0) {
                    if (got < 0 && errno == EINTR) continue;
                    if (c->busy) {  /* connection lost mid-request */
                        status[c->req] = 0;
                        done[c->req] = now_s();
                        finished++;
                        outstanding--;
                        c->busy = 0;
                    }
                    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                    close(c->fd);
                    c->fd = -1;
                    c->len = 0;
                    for (int j = 0; j < nidle; j++)  /* it may have been idle */
                        if (idle[j] == (int)(c - conns)) { idle[j] = idle[--nidle]; break; }
                    freeslot[nfree++] = c - conns;
                    nopen--;
                    break;
                }
                c->len += got;
                int st, ra;
                if (c->busy && parse(c, &st, &ra)) {
                    done[c->req] = now_s();
                    status[c->req] = st;
                    retried[c->req] = ra;
                    finished++;
                    outstanding--;
                    c->busy = 0;
                    idle[nidle++] = c - conns;
                }
                break;
            }
        }
    }
    /* results: requests scheduled after the warm-up */
    double t0 = start + warmup, *lat = malloc(n * sizeof(double)), *svc = malloc(n * sizeof(double)),
           *late = malloc(n * sizeof(double)), *ref = malloc(n * sizeof(double));
    long measured = 0, ok = 0, nl = 0, unfinished = 0, within = 0, nref = 0, nretry = 0;
    for (long i = 0; i < n; i++) {
        if (sched[i] < t0) continue;
        measured++;
        if (done[i] == 0) { unfinished++; continue; }
        late[nl++] = sent[i] - sched[i];
        if (status[i] == 200) {
            lat[ok] = done[i] - sched[i];
            svc[ok] = done[i] - sent[i];
            if (lat[ok] <= objective) within++;
            ok++;
        } else if (status[i] == 503) {
            ref[nref++] = done[i] - sched[i];
            nretry += retried[i];
        }
    }
    printf("{\"mode\": \"open\", \"driver\": \"openloop.c\", \"rate\": %.3f, \"duration_s\": %.3f, \"sent\": %ld, \"ok\": %ld, "
           "\"errors\": %ld, \"unfinished\": %ld, \"connections\": %d, \"achieved_rps\": %.3f, ",
           rate, duration, measured, ok, measured - ok, unfinished, nconns, ok / duration);
    double *lat2 = malloc((ok ? ok : 1) * sizeof(double));
    memcpy(lat2, lat, ok * sizeof(double));
    qsort(lat2, ok, sizeof(double), cmp_double);
    if (ok) {
        double ps[] = {50, 90, 99, 99.9};
        const char *names[] = {"p50_ms", "p90_ms", "p99_ms", "p99_9_ms"};
        double sum = 0;
        for (long i = 0; i < ok; i++) sum += lat2[i];
        for (int i = 0; i < 4; i++) {
            long k = (long)ceil(ps[i] / 100.0 * ok - 1e-9) - 1;
            if (k < 0) k = 0;
            if (k >= ok) k = ok - 1;
            printf("\"%s\": %.4f, ", names[i], lat2[k] * 1000);
        }
        printf("\"mean_ms\": %.4f, \"max_ms\": %.4f, ", sum / ok * 1000, lat2[ok - 1] * 1000);
    }
    printf("\"status\": {");  /* answers by status code (0: no answer: connection failed or lost) */
    int codes[600] = {0};
    for (long i = 0; i < n; i++)
        if (sched[i] >= t0 && done[i] != 0 && status[i] >= 0 && status[i] < 600) codes[status[i]]++;
    for (int cde = 0, first = 1; cde < 600; cde++)
        if (codes[cde]) { printf("%s\"%d\": %d", first ? "" : ", ", cde, codes[cde]); first = 0; }
    printf("}, ");
    if (objective >= 0) printf("\"objective_ms\": %.3f, \"ok_within\": %ld, ", objective * 1000, within);
    printf("\"refused\": {\"count\": %ld, \"retry_after\": %ld, \"latency\": ", nref, nretry);
    pct_json(stdout, ref, nref);
    printf("}, \"service\": ");
    pct_json(stdout, svc, ok);
    printf(", \"lateness\": ");
    pct_json(stdout, late, nl);
    printf("}\n");
    return 0;
}
