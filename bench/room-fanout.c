/* room-fanout: room fan-out cost in the engine, through the public API
 * only, with the driver's write pattern (one writev per connection per loop
 * pass). Each pass writes every pending connection's iovecs with one
 * writev() and reports them sent: to /dev/null (a real system call per
 * connection per pass, without the TCP stack), or with `tcp` to one
 * loopback TCP connection per member, whose other ends a child process
 * reads (so the kernel's TCP cost is in the numbers, as in a gateway).
 *
 *   room-fanout [MEMBERS] [MSGS] [PER_PASS] [null|tcp]
 *                                       (defaults 10000 200 16 null)
 *
 * Phases, for MEMBERS authenticated WebSocket connections (imp.json) in one
 * room:
 *   throughput  MSGS room messages, PER_PASS of them per loop pass, each
 *               pass followed by the flush: deliveries/s on one core
 *               (median of 5 runs);
 *   latency     200 single messages: im_room_send to the last member's
 *               bytes written (p50, p99, max);
 *   linearity   the throughput phase again at MEMBERS/10 and MEMBERS/4:
 *               ns per delivery should not grow with the room.
 * It uses only <libim/im.h>, so one binary measures any build of the
 * library: LD_LIBRARY_PATH=/path/to/old/lib ./room-fanout gives "before".
 * Not installed. */
#include <arpa/inet.h>
#include <fcntl.h>
#include <libim/im.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "ws_upgrade.h"

#define IOV_BATCH 64
#define LAT_RUNS 200
#define RUNS 5

typedef struct pending {
  im_conn_id id;
  int fd;
} pending;

typedef struct bench {
  im_server *srv;
  pending *pend;      /* connections with output: the driver's flush list */
  size_t npend, cap;
  uint64_t bytes;
} bench;

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void want_write(im_server *srv, im_conn_id c, void *io_ctx, void *io_user) {
  (void)srv;
  bench *b = io_user;
  if (b->npend < b->cap) b->pend[b->npend++] = (pending){c, (int)(intptr_t)io_ctx};
}

static void io_close(im_server *srv, im_conn_id c, void *io_ctx, void *io_user) {
  (void)srv;
  (void)c;
  (void)io_ctx;
  (void)io_user;
}

/* One loop pass of a driver: every connection that wants to write gets one
 * writev of what is pending (more passes only for what did not fit). */
static void flush(bench *b) {
  while (b->npend) {
    size_t n = b->npend;
    b->npend = 0;
    for (size_t i = 0; i < n; i++) {
      im_conn_id c = b->pend[i].id;
      struct iovec iov[IOV_BATCH];
      int k;
      while ((k = im_conn_pending(b->srv, c, iov, IOV_BATCH)) > 0) {
        ssize_t w = writev(b->pend[i].fd, iov, k);
        if (w <= 0) {
          perror("writev");
          exit(1);
        }
        b->bytes += (uint64_t)w;
        im_conn_sent(b->srv, c, (size_t)w);
      }
    }
  }
}

static int cmp_d(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

/* MSGS messages to a room of `members`; returns seconds. */
static double run(bench *b, im_conn_id *conns, size_t members, size_t msgs, size_t per_pass,
                  const char *room, const im_msg *m) {
  for (size_t i = 0; i < members; i++)
    if (im_room_join(b->srv, conns[i], room) != 0) exit(1);
  im_stats st0, st1;
  im_server_stats(b->srv, &st0);
  double t0 = now_s();
  for (size_t sent = 0; sent < msgs;) {
    for (size_t k = 0; k < per_pass && sent < msgs; k++, sent++)
      if (im_room_send(b->srv, room, m, 0) != (int)members) exit(1);
    flush(b);
  }
  double t = now_s() - t0;
  im_server_stats(b->srv, &st1);
  if (st1.msgs_out - st0.msgs_out != (uint64_t)(msgs * members) || st1.shed != st0.shed) {
    fprintf(stderr, "deliveries %llu, expected %zu\n",
            (unsigned long long)(st1.msgs_out - st0.msgs_out), msgs * members);
    exit(1);
  }
  for (size_t i = 0; i < members; i++) im_room_leave(b->srv, conns[i], room);
  return t;
}

/* The child: reads every connection to the end (the members' clients). */
static void reader(int lfd, size_t members) {
  int ep = epoll_create1(0);
  size_t open_ = 0;
  for (size_t i = 0; i < members; i++) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a;
    socklen_t al = sizeof a;
    getsockname(lfd, (struct sockaddr *)&a, &al);
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) < 0) _exit(1);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    open_++;
  }
  static char buf[65536];
  struct epoll_event evs[256];
  while (open_) {
    int n = epoll_wait(ep, evs, 256, -1);
    for (int i = 0; i < n; i++) {
      ssize_t r = read(evs[i].data.fd, buf, sizeof buf);
      if (r <= 0) {
        close(evs[i].data.fd);
        open_--;
      }
    }
  }
  _exit(0);
}

/* MEMBERS loopback TCP connections (server ends returned in fds), read to
 * the end by a child process; returns its pid. */
static pid_t tcp_members(size_t members, int *fds) {
  int lfd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  if (lfd < 0 || bind(lfd, (struct sockaddr *)&a, sizeof a) < 0 || listen(lfd, 4096) < 0) exit(1);
  pid_t pid = fork();
  if (pid == 0) reader(lfd, members);
  for (size_t i = 0; i < members; i++) {
    fds[i] = accept(lfd, NULL, NULL);
    if (fds[i] < 0) {
      perror("accept");
      exit(1);
    }
    int one = 1;
    setsockopt(fds[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  }
  close(lfd);
  return pid;
}

int main(int argc, char **argv) {
  size_t members = argc > 1 ? strtoul(argv[1], NULL, 10) : 10000;
  size_t msgs = argc > 2 ? strtoul(argv[2], NULL, 10) : 200;
  size_t per_pass = argc > 3 ? strtoul(argv[3], NULL, 10) : 16;
  int tcp = argc > 4 && !strcmp(argv[4], "tcp");
  if (members < 10 || msgs == 0 || per_pass == 0) {
    fprintf(stderr, "usage: room-fanout [MEMBERS >= 10] [MSGS] [PER_PASS] [null|tcp]\n");
    return 2;
  }
  bench b = {0};
  b.cap = members;
  b.pend = malloc(members * sizeof *b.pend);
  im_conn_id *conns = malloc(members * sizeof *conns);
  int *fds = malloc(members * sizeof *fds);
  if (!fds) return 1;
  pid_t child = 0;
  if (tcp) {
    child = tcp_members(members, fds);
  } else {
    int sink = open("/dev/null", O_WRONLY);
    for (size_t i = 0; i < members; i++) fds[i] = sink;
  }
  im_config cfg;
  im_config_init(&cfg);
  cfg.max_conns_per_user = 0;
  b.srv = im_server_new(&cfg, NULL, NULL); /* defaults: any uid/token accepted */
  if (!b.pend || !conns || fds[0] < 0 || !b.srv) return 1;
  im_io io = {want_write, io_close, &b};
  im_server_set_io(b.srv, &io);
  for (size_t i = 0; i < members; i++)
    if (!(conns[i] = bench_ws_open(b.srv, i, (void *)(intptr_t)fds[i]))) return 1;
  flush(&b);
  char data[] = "{\"text\":\"hello, room: a message of a typical chat size, some 100 bytes\"}";
  im_msg m = {0};
  m.from = "u0";
  m.room = "r";
  m.data = data;
  m.data_len = sizeof data - 1;
  m.ts = 1700000000000ULL;

  /* warm-up, then RUNS measured runs: the median, and the spread */
  run(&b, conns, members, msgs / 4 + 1, per_pass, "r", &m);
  double tr[RUNS];
  for (int i = 0; i < RUNS; i++) tr[i] = run(&b, conns, members, msgs, per_pass, "r", &m);
  qsort(tr, RUNS, sizeof *tr, cmp_d);
  double d = (double)(msgs * members);
  printf("%s: members %zu, msgs %zu, %zu per pass: %.2fM deliveries/s (median of %d; %.2f-%.2fM), "
         "%.1f ns per delivery\n",
         tcp ? "tcp" : "null", members, msgs, per_pass, d / tr[RUNS / 2] / 1e6, RUNS, d / tr[RUNS - 1] / 1e6,
         d / tr[0] / 1e6, tr[RUNS / 2] * 1e9 / d);

  double lat[LAT_RUNS];
  for (size_t i = 0; i < members; i++) im_room_join(b.srv, conns[i], "r");
  for (int i = 0; i < LAT_RUNS; i++) {
    double t0 = now_s();
    if (im_room_send(b.srv, "r", &m, 0) != (int)members) return 1;
    flush(&b);
    lat[i] = (now_s() - t0) * 1e3;
  }
  for (size_t i = 0; i < members; i++) im_room_leave(b.srv, conns[i], "r");
  qsort(lat, LAT_RUNS, sizeof *lat, cmp_d);
  printf("one message to %zu members, send to last byte written: p50 %.2f ms, p99 %.2f ms, "
         "max %.2f ms\n",
         members, lat[LAT_RUNS / 2], lat[LAT_RUNS * 99 / 100], lat[LAT_RUNS - 1]);

  size_t sizes[2] = {members / 10, members / 4};
  for (int i = 0; i < 2; i++) {
    for (int k = 0; k < RUNS; k++) tr[k] = run(&b, conns, sizes[i], msgs, per_pass, "r", &m);
    qsort(tr, RUNS, sizeof *tr, cmp_d);
    printf("linearity: members %zu: %.1f ns per delivery (median of %d)\n", sizes[i],
           tr[RUNS / 2] * 1e9 / (double)(msgs * sizes[i]), RUNS);
  }
  for (size_t i = 0; i < members; i++) im_server_hangup(b.srv, conns[i]);
  im_server_free(b.srv);
  if (tcp) {
    for (size_t i = 0; i < members; i++) close(fds[i]);
    waitpid(child, NULL, 0);
  } else {
    close(fds[0]);
  }
  free(fds);
  free(b.pend);
  free(conns);
  return 0;
}
