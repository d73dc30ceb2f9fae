/* The libevent driver: accepts sockets, reads into one shared buffer, feeds
 * the engine, and flushes every connection's queued frames with one
 * sendmsg() per connection per loop iteration. */
#include <errno.h>
#include <event2/event.h>
#include <event2/listener.h>
#include <event2/util.h>
#include <libim/im_event.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_LISTENERS 8
#define READ_BUF (64 * 1024)
#define IOV_MAX_BATCH 64

typedef struct ev_conn ev_conn;

struct ev_conn {
  im_event *owner;
  im_conn_id id;
  ev_conn *flush_next;   /* pending-output list */
  ev_conn *grave_next;   /* closed, freed once off every list */
  ev_conn *all_prev, *all_next; /* every open connection, for im_event_free */
  uint8_t in_flush : 1;
  uint8_t closed : 1;
  uint8_t writing : 1;   /* EV_WRITE is armed */
  /* the struct event follows, event_get_struct_event_size() bytes */
  _Alignas(max_align_t) unsigned char ev[];
};

typedef struct listener {
  im_event *owner;
  struct evconnlistener *l;
  enum im_transport t;
  int port;
} listener;

struct im_event {
  struct event_base *base;
  im_server *srv;
  listener ls[MAX_LISTENERS];
  int nls;
  struct event *tick;
  struct event *flush;
  struct event *sig[2];
  struct event *grace;
  ev_conn *flush_head, *flush_tail;
  ev_conn *grave;
  ev_conn *all;
  bool shutting_down;
  unsigned signal_grace_ms;
  uint8_t rbuf[READ_BUF];
};

static struct event *conn_event(ev_conn *ec) { return (struct event *)ec->ev; }

static uint64_t mono_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* Activating an already active event only merges flags, so this is cheap
 * to call for every connection that gets output in one loop iteration. */
static void schedule_flush(im_event *e) { event_active(e->flush, EV_WRITE, 0); }

static void all_unlink(im_event *e, ev_conn *ec) {
  if (ec->all_prev)
    ec->all_prev->all_next = ec->all_next;
  else
    e->all = ec->all_next;
  if (ec->all_next) ec->all_next->all_prev = ec->all_prev;
  ec->all_prev = ec->all_next = NULL;
}

/* Closed: stop events, close the socket, and park the memory until the
 * flush callback can free it (we may be inside this connection's callback). */
static void conn_bury(ev_conn *ec) {
  if (ec->closed) return;
  im_event *e = ec->owner;
  struct event *ev = conn_event(ec);
  int fd = event_get_fd(ev);
  event_del(ev);
  evutil_closesocket(fd);
  ec->closed = 1;
  all_unlink(e, ec);
  ec->grave_next = e->grave;
  e->grave = ec;
  schedule_flush(e);
}

static void conn_io_cb(evutil_socket_t fd, short what, void *arg);

static void arm(ev_conn *ec, bool writing) {
  if (ec->writing == writing || ec->closed) return;
  struct event *ev = conn_event(ec);
  int fd = event_get_fd(ev);
  event_del(ev);
  event_assign(ev, ec->owner->base, fd, EV_READ | EV_PERSIST | (writing ? EV_WRITE : 0), conn_io_cb,
               ec);
  event_add(ev, NULL);
  ec->writing = writing;
}

/* Write what the engine has queued; returns false if the connection died. */
static bool write_out(ev_conn *ec) {
  im_event *e = ec->owner;
  struct iovec iov[IOV_MAX_BATCH];
  while (!ec->closed) {
    int n = im_conn_pending(e->srv, ec->id, iov, IOV_MAX_BATCH);
    if (n <= 0) {
      arm(ec, false);
      return n == 0;
    }
    struct msghdr mh = {0};
    mh.msg_iov = iov;
    mh.msg_iovlen = (size_t)n;
    ssize_t w = sendmsg(event_get_fd(conn_event(ec)), &mh, MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        arm(ec, true);
        return true;
      }
      if (errno == EINTR) continue;
      im_conn_id id = ec->id;
      conn_bury(ec);
      im_server_hangup(e->srv, id);
      return false;
    }
    im_conn_sent(e->srv, ec->id, (size_t)w);
  }
  return false;
}

static void conn_io_cb(evutil_socket_t fd, short what, void *arg) {
  ev_conn *ec = arg;
  im_event *e = ec->owner;
  if ((what & EV_WRITE) && !write_out(ec)) return;
  if (!(what & EV_READ) || ec->closed) return;
  ssize_t n = recv(fd, e->rbuf, sizeof e->rbuf, 0);
  if (n > 0) {
    im_server_feed(e->srv, ec->id, e->rbuf, (size_t)n);
    return;
  }
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return;
  im_conn_id id = ec->id;
  conn_bury(ec);
  im_server_hangup(e->srv, id);
}

static void flush_cb(evutil_socket_t fd, short what, void *arg) {
  (void)fd;
  (void)what;
  im_event *e = arg;
  ev_conn *list = e->flush_head;
  e->flush_head = e->flush_tail = NULL;
  while (list) {
    ev_conn *ec = list;
    list = ec->flush_next;
    ec->flush_next = NULL;
    ec->in_flush = 0;
    if (!ec->closed) write_out(ec);
  }
  ev_conn **pp = &e->grave;
  while (*pp) {
    ev_conn *ec = *pp;
    if (ec->in_flush) {
      pp = &ec->grave_next;
      continue;
    }
    *pp = ec->grave_next;
    free(ec);
  }
  if (e->shutting_down) {
    im_stats st;
    im_server_stats(e->srv, &st);
    if (st.conns == 0) event_base_loopexit(e->base, NULL);
  }
}

/* ---- engine hooks ------------------------------------------------------- */

static void io_want_write(im_server *srv, im_conn_id c, void *io_ctx, void *io_user) {
  (void)srv;
  (void)c;
  ev_conn *ec = io_ctx;
  im_event *e = io_user;
  if (ec->in_flush || ec->closed || ec->writing) return;
  ec->in_flush = 1;
  ec->flush_next = NULL;
  if (e->flush_tail)
    e->flush_tail->flush_next = ec;
  else
    e->flush_head = ec;
  e->flush_tail = ec;
  schedule_flush(e);
}

static void io_close(im_server *srv, im_conn_id c, void *io_ctx, void *io_user) {
  (void)srv;
  (void)c;
  (void)io_user;
  ev_conn *ec = io_ctx;
  /* a graceful close: tell the peer we are done before the descriptor goes */
  shutdown(event_get_fd(conn_event(ec)), SHUT_WR);
  conn_bury(ec);
}

/* ---- listeners -------------------------------------------------------------- */

static void format_peer(const struct sockaddr *sa, char *out, size_t cap) {
  char host[64] = "?";
  int port = 0;
  if (sa->sa_family == AF_INET) {
    const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
    evutil_inet_ntop(AF_INET, &in->sin_addr, host, sizeof host);
    port = ntohs(in->sin_port);
    snprintf(out, cap, "%s:%d", host, port);
  } else if (sa->sa_family == AF_INET6) {
    const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
    evutil_inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host);
    port = ntohs(in6->sin6_port);
    snprintf(out, cap, "[%s]:%d", host, port);
  } else {
    snprintf(out, cap, "unix");
  }
}

static void accept_cb(struct evconnlistener *l, evutil_socket_t fd, struct sockaddr *sa, int salen,
                      void *arg) {
  (void)l;
  (void)salen;
  listener *ls = arg;
  im_event *e = ls->owner;
  if (e->shutting_down) {
    evutil_closesocket(fd);
    return;
  }
  int one = 1; /* small IMP frames must not wait for Nagle */
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  ev_conn *ec = calloc(1, sizeof(*ec) + event_get_struct_event_size());
  if (!ec) {
    evutil_closesocket(fd);
    return;
  }
  char peer[64];
  format_peer(sa, peer, sizeof peer);
  ec->owner = e;
  ec->id = im_server_accept(e->srv, ls->t, peer, ec);
  if (!ec->id) {
    free(ec);
    evutil_closesocket(fd);
    return;
  }
  event_assign(conn_event(ec), e->base, fd, EV_READ | EV_PERSIST, conn_io_cb, ec);
  event_add(conn_event(ec), NULL);
  ec->all_next = e->all;
  if (e->all) e->all->all_prev = ec;
  e->all = ec;
}

static void accept_error_cb(struct evconnlistener *l, void *arg) {
  (void)l;
  (void)arg;
  /* EMFILE and friends: the listener retries on its next readiness */
  int err = EVUTIL_SOCKET_ERROR();
  static uint64_t last;
  uint64_t now = mono_ms();
  if (now - last > 1000) {
    fprintf(stderr, "libim: accept: %s\n", evutil_socket_error_to_string(err));
    last = now;
  }
}

static void tick_cb(evutil_socket_t fd, short what, void *arg) {
  (void)fd;
  (void)what;
  im_event *e = arg;
  im_server_tick(e->srv, mono_ms());
}

im_event *im_event_new(struct event_base *base, im_server *srv) {
  im_event *e = calloc(1, sizeof(*e));
  if (!e) return NULL;
  e->base = base;
  e->srv = srv;
  e->flush = event_new(base, -1, 0, flush_cb, e);
  e->tick = event_new(base, -1, EV_PERSIST, tick_cb, e);
  if (!e->flush || !e->tick) {
    im_event_free(e);
    return NULL;
  }
  im_io io = {io_want_write, io_close, e};
  im_server_set_io(srv, &io);
  unsigned tick = im_server_config(srv)->tick_ms;
  struct timeval tv = {tick / 1000, (suseconds_t)(tick % 1000) * 1000};
  event_add(e->tick, &tv);
  im_server_tick(srv, mono_ms());
  return e;
}

/* "HOST:PORT" or "[V6]:PORT", numeric only; port 0 lets the kernel pick
 * (which evutil_parse_sockaddr_port refuses). */
static int parse_addr(const char *addr, struct sockaddr_storage *ss, int *len) {
  char host[64];
  const char *colon = addr ? strrchr(addr, ':') : NULL;
  if (!colon || (size_t)(colon - addr) >= sizeof host) return -1;
  const char *h = addr, *hend = colon;
  if (*h == '[') {
    if (hend[-1] != ']') return -1;
    h++;
    hend--;
  }
  memcpy(host, h, (size_t)(hend - h));
  host[hend - h] = '\0';
  char *end;
  long port = strtol(colon + 1, &end, 10);
  if (*end || end == colon + 1 || port < 0 || port > 65535) return -1;
  memset(ss, 0, sizeof *ss);
  struct sockaddr_in *in = (struct sockaddr_in *)ss;
  struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)ss;
  if (evutil_inet_pton(AF_INET, host, &in->sin_addr) == 1) {
    in->sin_family = AF_INET;
    in->sin_port = htons((uint16_t)port);
    *len = sizeof *in;
  } else if (evutil_inet_pton(AF_INET6, host, &in6->sin6_addr) == 1) {
    in6->sin6_family = AF_INET6;
    in6->sin6_port = htons((uint16_t)port);
    *len = sizeof *in6;
  } else {
    return -1;
  }
  return 0;
}

int im_event_listen(im_event *e, enum im_transport t, const char *addr) {
  if (e->nls == MAX_LISTENERS || (t != IM_TRANSPORT_WS && t != IM_TRANSPORT_TCP)) return IM_EINVAL;
  struct sockaddr_storage ss;
  int len;
  if (parse_addr(addr, &ss, &len) < 0) return IM_EADDR;
  listener *ls = &e->ls[e->nls];
  ls->owner = e;
  ls->t = t;
  ls->l = evconnlistener_new_bind(e->base, accept_cb, ls,
                                  LEV_OPT_CLOSE_ON_FREE | LEV_OPT_REUSEABLE | LEV_OPT_CLOSE_ON_EXEC,
                                  4096, (struct sockaddr *)&ss, len);
  if (!ls->l) return IM_EADDR;
  evconnlistener_set_error_cb(ls->l, accept_error_cb);
  struct sockaddr_storage bound;
  socklen_t bl = sizeof bound;
  ls->port = -1;
  if (getsockname(evconnlistener_get_fd(ls->l), (struct sockaddr *)&bound, &bl) == 0)
    ls->port = ntohs(bound.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&bound)->sin6_port
                                                 : ((struct sockaddr_in *)&bound)->sin_port);
  e->nls++;
  return 0;
}

int im_event_port(const im_event *e, int n) {
  return n >= 0 && n < e->nls ? e->ls[n].port : -1;
}

static void grace_cb(evutil_socket_t fd, short what, void *arg) {
  (void)fd;
  (void)what;
  im_event *e = arg;
  event_base_loopexit(e->base, NULL);
}

void im_event_shutdown(im_event *e, unsigned grace_ms) {
  if (e->shutting_down) return;
  e->shutting_down = true;
  for (int i = 0; i < e->nls; i++) evconnlistener_disable(e->ls[i].l);
  im_server_close_all(e->srv, IM_CLOSE_GOING_AWAY, "server shutting down");
  if (!e->grace) e->grace = evtimer_new(e->base, grace_cb, e);
  if (e->grace) {
    struct timeval tv = {grace_ms / 1000, (suseconds_t)(grace_ms % 1000) * 1000};
    evtimer_add(e->grace, &tv);
  }
  schedule_flush(e);
}

static void signal_cb(evutil_socket_t sig, short what, void *arg) {
  (void)sig;
  (void)what;
  im_event *e = arg;
  im_event_shutdown(e, e->signal_grace_ms);
}

int im_event_handle_signals(im_event *e, unsigned grace_ms) {
  e->signal_grace_ms = grace_ms;
  static const int sigs[2] = {SIGINT, SIGTERM};
  for (int i = 0; i < 2; i++) {
    if (!e->sig[i]) e->sig[i] = evsignal_new(e->base, sigs[i], signal_cb, e);
    if (!e->sig[i] || event_add(e->sig[i], NULL) < 0) return IM_ENOMEM;
  }
  return 0;
}

void im_event_free(im_event *e) {
  if (!e) return;
  for (int i = 0; i < e->nls; i++) evconnlistener_free(e->ls[i].l);
  for (int i = 0; i < 2; i++)
    if (e->sig[i]) event_free(e->sig[i]);
  if (e->grace) event_free(e->grace);
  if (e->tick) event_free(e->tick);
  /* the engine no longer calls into this driver; hang up what is open */
  im_io none = {0};
  im_server_set_io(e->srv, &none);
  while (e->all) {
    ev_conn *ec = e->all;
    e->all = ec->all_next;
    event_del(conn_event(ec));
    evutil_closesocket(event_get_fd(conn_event(ec)));
    im_server_hangup(e->srv, ec->id);
    free(ec);
  }
  while (e->grave) {
    ev_conn *ec = e->grave;
    e->grave = ec->grave_next;
    free(ec);
  }
  if (e->flush) event_free(e->flush);
  free(e);
}
