/* epoll-echo: libim embedded in a hand-written epoll loop, no libevent.
 * The same echo service as im-echo, to show the engine's driver contract:
 * accept -> im_server_accept, readable -> im_server_feed, want_write hook
 * -> writev of im_conn_pending, EOF -> im_server_hangup, a timer -> tick.
 *
 *   epoll-echo 127.0.0.1:8080 [tcp-port]
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* accept4, clock_gettime: this example builds on its own too */
#endif
#include <arpa/inet.h>
#include <errno.h>
#include <libim/im.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* What the loop keeps per socket: the fd and the engine's id. A game
 * server would hang this off its own entity table instead. */
typedef struct sock {
  int fd;
  im_conn_id id;
  int listen_kind; /* 0: a connection, else enum im_transport of a listener */
  int dirty;       /* on the flush list */
  int closing;
  struct sock *next_dirty;
  struct sock *graveyard_next;
} sock;

static int ep;
static sock *dirty;
static sock *graveyard; /* closed this pass; freed once no event can name them */
static volatile sig_atomic_t stop;

static uint64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static void want_write(im_server *srv, im_conn_id c, void *io_ctx, void *io_user) {
  (void)srv, (void)c, (void)io_user;
  sock *s = io_ctx;
  if (!s->dirty) {
    s->dirty = 1;
    s->next_dirty = dirty;
    dirty = s;
  }
}

static void io_close(im_server *srv, im_conn_id c, void *io_ctx, void *io_user) {
  (void)srv, (void)c, (void)io_user;
  sock *s = io_ctx;
  if (s->closing) return;
  s->closing = 1;
  epoll_ctl(ep, EPOLL_CTL_DEL, s->fd, NULL);
  close(s->fd);
  s->graveyard_next = graveyard;
  graveyard = s;
}

static void flush(im_server *srv, sock *s) {
  struct iovec iov[32];
  int n;
  while (!s->closing && (n = im_conn_pending(srv, s->id, iov, 32)) > 0) {
    ssize_t w = writev(s->fd, iov, n);
    if (w < 0 && (errno == EAGAIN || errno == EINTR)) {
      struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = s};
      epoll_ctl(ep, EPOLL_CTL_MOD, s->fd, &ev);
      return;
    }
    if (w < 0) {
      im_server_hangup(srv, s->id);
      io_close(srv, s->id, s, NULL);
      return;
    }
    im_conn_sent(srv, s->id, (size_t)w);
  }
}

static int on_message(im_server *srv, im_conn_id c, const im_msg *m, void *user) {
  (void)user;
  im_ack(srv, c, m->cid, m->id, 0);
  im_msg echo = {IM_STRUCT_SIZE(im_msg), .id = m->id, .data = m->data, .data_len = m->data_len};
  im_send_conn(srv, c, &echo);
  return IM_MSG_DEFER;
}

static int listen_on(const char *host, int port, int kind) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (inet_pton(AF_INET, host, &a.sin_addr) != 1 || bind(fd, (void *)&a, sizeof a) < 0 ||
      listen(fd, 1024) < 0) {
    perror("epoll-echo: listen");
    exit(1);
  }
  sock *l = calloc(1, sizeof *l);
  l->fd = fd;
  l->listen_kind = kind;
  struct epoll_event ev = {.events = EPOLLIN, .data.ptr = l};
  epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
  socklen_t al = sizeof a;
  getsockname(fd, (void *)&a, &al);
  printf("epoll-echo: %s listening on %s port %d\n", kind == IM_TRANSPORT_WS ? "ws" : "tcp", host,
         ntohs(a.sin_port));
  return fd;
}

static void on_signal(int sig) { (void)sig, stop = 1; }

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: epoll-echo HOST:PORT [TCP-PORT]\n");
    return 2;
  }
  char host[64];
  int port = 0;
  if (sscanf(argv[1], "%63[^:]:%d", host, &port) != 2) {
    fprintf(stderr, "epoll-echo: bad address %s\n", argv[1]);
    return 2;
  }
  signal(SIGTERM, on_signal);
  signal(SIGINT, on_signal);
  signal(SIGPIPE, SIG_IGN);
  ep = epoll_create1(0);
  im_callbacks cb = {IM_STRUCT_SIZE(im_callbacks), .on_message = on_message};
  im_server *srv = im_server_new(NULL, &cb, NULL);
  im_io io = {want_write, io_close, NULL};
  im_server_set_io(srv, &io);
  im_server_tick(srv, now_ms());
  listen_on(host, port, IM_TRANSPORT_WS);
  if (argc > 2) listen_on(host, atoi(argv[2]), IM_TRANSPORT_TCP);
  fflush(stdout);
  static uint8_t buf[65536];
  while (!stop) {
    struct epoll_event evs[256];
    int n = epoll_wait(ep, evs, 256, 100);
    for (int i = 0; i < n; i++) {
      sock *s = evs[i].data.ptr;
      if (s->listen_kind) {
        char peer[64];
        struct sockaddr_in a;
        socklen_t al = sizeof a;
        int fd = accept4(s->fd, (void *)&a, &al, SOCK_NONBLOCK);
        if (fd < 0) continue;
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        sock *c = calloc(1, sizeof *c);
        c->fd = fd;
        snprintf(peer, sizeof peer, "%s:%d", inet_ntoa(a.sin_addr), ntohs(a.sin_port));
        c->id = im_server_accept(srv, (enum im_transport)s->listen_kind, peer, c);
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        if (!c->id || epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
          close(fd);
          free(c);
        }
        continue;
      }
      if (s->closing) continue;
      if (evs[i].events & EPOLLOUT) {
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = s};
        epoll_ctl(ep, EPOLL_CTL_MOD, s->fd, &ev);
        want_write(srv, s->id, s, NULL);
      }
      if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
        ssize_t r = read(s->fd, buf, sizeof buf);
        if (r > 0) {
          im_server_feed(srv, s->id, buf, (size_t)r);
        } else if (r == 0 || (errno != EAGAIN && errno != EINTR)) {
          im_server_hangup(srv, s->id);
          io_close(srv, s->id, s, NULL);
        }
      }
    }
    im_server_tick(srv, now_ms());
    /* one writev per connection per loop pass, after all reads and timers */
    while (dirty) {
      sock *s = dirty;
      dirty = s->next_dirty;
      s->dirty = 0;
      flush(srv, s);
    }
    while (graveyard) {
      sock *s = graveyard;
      graveyard = s->graveyard_next;
      free(s);
    }
  }
  im_server_close_all(srv, IM_CLOSE_GOING_AWAY, "shutting down");
  while (dirty) {
    sock *s = dirty;
    dirty = s->next_dirty;
    flush(srv, s);
  }
  im_server_free(srv);
  return 0;
}
