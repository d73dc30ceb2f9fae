/* The libevent driver: accepts sockets (im_listener), reads into one shared
 * buffer, feeds the engine, and flushes every connection's queued frames
 * with one im_stream_writev() per connection per loop iteration.
 *
 * Connections are not libevent events: they sit in an epoll set of the
 * driver's own, and that set's descriptor is the one event libevent
 * watches for them. An idle connection so costs neither a struct event
 * (128 bytes) nor a slot in libevent's descriptor map, only its record
 * here; readiness is level-triggered as libevent's, and one callback takes
 * at most POLL_BATCH ready connections, so timers and other events still
 * run between batches.
 *
 * A connection the engine closed lingers: its last frames and a FIN went
 * out, and the socket stays open, read and discarded, until the peer closes
 * too or LINGER_MS pass. Closing a socket with unread input makes the kernel
 * answer with a reset, which discards output the peer has not read yet: a
 * client still sending when its connection is closed (a flood, a rate
 * close) would lose the close frame or error op that says why. At most
 * LINGER_MAX connections of a driver linger; past that they close at once.
 *
 * The im_stream under each connection is a plain socket or a TLS session; a TLS
 * connection is handed to the engine at accept (so max_connections and the
 * auth timeout count it) but reads nothing until its handshake is done,
 * which must happen within the context's handshake timeout. */
#include <errno.h>
#include <event2/event.h>
#include <event2/util.h>
#include <libim/im_event.h>
#include <libim/im_net.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/queue.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "event/stream.h"

#define MAX_LISTENERS 8
#define READ_BUF (64 * 1024)
#define IOV_MAX_BATCH 64
#define POLL_BATCH 256
#define LINGER_MS 2000
#define LINGER_MAX 64

typedef struct ev_conn ev_conn;

/* 72 bytes, a plain connection's stream included: an idle connection costs
 * one 80-byte allocation here. A TLS handshake is
 * never on the flush list nor (being unlinked first) the grave list, so its
 * list links share their space. */
struct ev_conn {
  im_conn_id id;
  struct listener *ls;          /* that accepted it (ls->owner: the im_event) */
  ev_conn *all_prev, *all_next; /* every open connection, for im_event_free */
  union {
    struct {
      ev_conn *flush_next;      /* pending-output list */
      ev_conn *grave_next;      /* closed, freed once off every list */
    };
    struct {
      TAILQ_ENTRY(ev_conn) hs;  /* on its listener's handshake list, by deadline */
    };
  };
  uint32_t hs_deadline;         /* mono_ms() (low 32 bits) at which the handshake fails */
  uint8_t in_flush : 1;
  uint8_t closed : 1;
  uint8_t writing : 1;   /* EPOLLOUT is armed */
  uint8_t handshaking : 1;
  union {                       /* the stream (conn_stream): */
    im_stream plain;            /* of a plain connection */
    im_stream *tls;             /* of a TLS one (tls.c allocates it) */
  };
};

/* A closed connection's socket being read dry (its ev_conn is gone). In the
 * epoll set its pointer carries LINGER_TAG, which an ev_conn's (malloc()ed,
 * so aligned) never does. */
typedef struct lingering {
  TAILQ_ENTRY(lingering) link;   /* the driver's list, oldest first */
  int fd;
  uint32_t deadline;             /* mono_ms() (low 32 bits) */
} lingering;

#define LINGER_TAG ((uintptr_t)1)

typedef struct listener {
  im_event *owner;
  im_listener *l;
  enum im_transport t;
  im_tls *tls;               /* NULL: plain */
  TAILQ_HEAD(, ev_conn) hs;  /* TLS handshakes in progress, oldest first */
} listener;

struct im_event {
  struct event_base *base;
  im_server *srv;
  listener ls[MAX_LISTENERS];
  int nls;
  int epfd;                 /* the connections' epoll set */
  struct event *poll;       /* its readiness */
  struct event *tick;
  struct event *flush;
  struct event *sig[2];
  struct event *grace;
  ev_conn *flush_head, *flush_tail;
  ev_conn *grave;
  ev_conn *all;
  TAILQ_HEAD(, lingering) lingering;
  unsigned nlinger;
  bool shutting_down;
  bool reuseport;           /* im_event_set_reuseport */
  bool nap_due;             /* flush_cb naps once this pass's output is out */
  unsigned coalesce_us;     /* im_event_set_coalesce */
  uint64_t wakeups, naps;   /* im_event_counts */
  unsigned signal_grace_ms;
  uint8_t rbuf[READ_BUF];
};

static im_stream *conn_stream(ev_conn *ec) { return ec->ls->tls ? ec->tls : &ec->plain; }

/* Adds a connection's socket to the set, or changes what it waits for. */
static int conn_watch(ev_conn *ec, int op, bool writing) {
  struct epoll_event ev = {.events = EPOLLIN | (writing ? EPOLLOUT : 0), .data.ptr = ec};
  return epoll_ctl(ec->ls->owner->epfd, op, conn_stream(ec)->fd, &ev);
}

/* Before its descriptor is closed (a closed descriptor leaves the set by
 * itself only when no duplicate of it is open). */
static void conn_unwatch(ev_conn *ec) {
  struct epoll_event ev = {0};
  epoll_ctl(ec->ls->owner->epfd, EPOLL_CTL_DEL, conn_stream(ec)->fd, &ev);
}

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

static void hs_unlink(ev_conn *ec, struct listener *ls) {
  if (!ec->handshaking) return;
  TAILQ_REMOVE(&ls->hs, ec, hs);
  ec->handshaking = 0;
}

static void linger_end(im_event *e, lingering *l) {
  TAILQ_REMOVE(&e->lingering, l, link);
  close(l->fd); /* leaves the set with it */
  e->nlinger--;
  free(l);
}

/* Frees the stream and lets its socket (output shut down) linger; false,
 * with nothing done, when too many linger or memory ran out. */
static bool linger_start(im_event *e, ev_conn *ec) {
  lingering *l = e->nlinger < LINGER_MAX ? calloc(1, sizeof *l) : NULL;
  struct epoll_event ev = {.events = EPOLLIN, .data.ptr = (void *)((uintptr_t)l | LINGER_TAG)};
  if (!l || epoll_ctl(e->epfd, EPOLL_CTL_MOD, conn_stream(ec)->fd, &ev) < 0) {
    free(l);
    return false;
  }
  l->fd = im__stream_detach(conn_stream(ec));
  l->deadline = (uint32_t)(mono_ms() + LINGER_MS);
  TAILQ_INSERT_TAIL(&e->lingering, l, link);
  e->nlinger++;
  return true;
}

/* Input after the close: read and dropped until the peer's FIN (or an
 * error) ends the linger; a few buffers per readiness, so a peer that keeps
 * sending cannot hold the loop (the deadline ends it). */
static void linger_read(im_event *e, lingering *l) {
  for (int i = 0; i < 4; i++) {
    ssize_t n = recv(l->fd, e->rbuf, sizeof e->rbuf, 0);
    if (n > 0 || (n < 0 && errno == EINTR)) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    linger_end(e, l);
    return;
  }
}

/* Closed: stop events, close the socket (or let it linger), and park the
 * memory until the flush callback can free it (we may be inside this
 * connection's callback). */
static void conn_bury_as(ev_conn *ec, bool linger) {
  if (ec->closed) return;
  im_event *e = ec->ls->owner;
  if (ec->handshaking) hs_unlink(ec, ec->ls);
  if (!linger || !linger_start(e, ec)) {
    conn_unwatch(ec);
    im_stream_free(conn_stream(ec));
  }
  ec->closed = 1;
  all_unlink(e, ec);
  ec->grave_next = e->grave;
  e->grave = ec;
  schedule_flush(e);
}

static void conn_bury(ev_conn *ec) { conn_bury_as(ec, false); }

static void arm(ev_conn *ec, bool writing) {
  if (ec->writing == writing || ec->closed) return;
  /* cannot fail for a descriptor in the set but for ENOMEM, which leaves
   * it as it was: EPOLLIN still reports the peer's close */
  if (conn_watch(ec, EPOLL_CTL_MOD, writing) == 0) ec->writing = writing;
}

/* Write what the engine has queued; returns false if the connection died. */
static bool write_out(ev_conn *ec) {
  im_event *e = ec->ls->owner;
  struct iovec iov[IOV_MAX_BATCH];
  while (!ec->closed) {
    int n = im_conn_pending(e->srv, ec->id, iov, IOV_MAX_BATCH);
    if (n <= 0) {
      arm(ec, false);
      return n == 0;
    }
    ssize_t w = im_stream_writev(conn_stream(ec), iov, n);
    if (w < 0) {
      if (w == IM_STREAM_AGAIN) {
        arm(ec, (im_stream_wants(conn_stream(ec)) & IM_WANT_WRITE) != 0);
        return true;
      }
      im_conn_id id = ec->id;
      conn_bury(ec);
      im_server_hangup(e->srv, id);
      return false;
    }
    im_conn_sent(e->srv, ec->id, (size_t)w);
  }
  return false;
}

static void conn_fail(ev_conn *ec) {
  im_conn_id id = ec->id;
  conn_bury(ec);
  im_server_hangup(ec->ls->owner->srv, id);
}

/* Reads until the socket is drained for now; a TLS stream may hold
 * decrypted bytes that no readiness event will announce. */
static void read_in(ev_conn *ec) {
  im_event *e = ec->ls->owner;
  while (!ec->closed) {
    ssize_t n = im_stream_read(conn_stream(ec), e->rbuf, sizeof e->rbuf);
    if (n == IM_STREAM_AGAIN) return;
    if (n <= 0) {
      conn_fail(ec);
      return;
    }
    im_server_feed(e->srv, ec->id, e->rbuf, (size_t)n);
    if (ec->closed || !im_stream_pending(conn_stream(ec))) return;
  }
}

/* One step of a TLS handshake; once done, what arrived with it is read
 * and output the engine queued meanwhile is written. */
static void handshake_step(ev_conn *ec) {
  int r = im_stream_handshake(conn_stream(ec));
  if (r == IM_STREAM_AGAIN) {
    arm(ec, (im_stream_wants(conn_stream(ec)) & IM_WANT_WRITE) != 0);
    return;
  }
  if (r < 0) {
    conn_fail(ec);
    return;
  }
  hs_unlink(ec, ec->ls);
  arm(ec, false);
  if (!write_out(ec)) return;
  read_in(ec);
}

static void conn_io(ev_conn *ec, uint32_t what) {
  if (ec->handshaking) {
    handshake_step(ec);
    return;
  }
  if ((what & EPOLLOUT) && !write_out(ec)) return;
  if (!(what & EPOLLIN) || ec->closed) return;
  read_in(ec);
}

/* The set has ready connections. Records of connections closed meanwhile
 * are freed only by flush_cb, so every pointer returned stays valid here. */
static void poll_cb(evutil_socket_t fd, short what, void *arg) {
  (void)fd;
  (void)what;
  im_event *e = arg;
  struct epoll_event evs[POLL_BATCH];
  int n = epoll_wait(e->epfd, evs, POLL_BATCH, 0);
  if (n > 0) e->wakeups++;
  /* a wake-up for a few connections: once their output is out (flush_cb
   * runs after this callback in the same pass), let more input gather */
  if (e->coalesce_us && n > 0 && n < POLL_BATCH) {
    e->nap_due = true;
    schedule_flush(e);
  }
  for (int i = 0; i < n; i++) {
    if ((uintptr_t)evs[i].data.ptr & LINGER_TAG) {
      linger_read(e, (lingering *)((uintptr_t)evs[i].data.ptr & ~LINGER_TAG));
      continue;
    }
    ev_conn *ec = evs[i].data.ptr;
    uint32_t f = evs[i].events;
    if (ec->closed) continue;
    /* an error or hang-up is for the read to find (and a write, if armed) */
    if (f & (EPOLLERR | EPOLLHUP)) f |= EPOLLIN | (ec->writing ? EPOLLOUT : 0);
    conn_io(ec, f);
  }
}

/* im_event_set_coalesce: the thread sleeps, so everything on its loop
 * (timers, other events, completions from other threads) may wait up to
 * coalesce_us longer; input that arrives meanwhile is read in one wake-up. */
static void nap(im_event *e) {
  e->nap_due = false;
  if (e->shutting_down || !e->coalesce_us) return;
  struct timespec ts = {0, (long)e->coalesce_us * 1000};
  e->naps++;
  while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
  }
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
    im_stats st = {IM_STRUCT_SIZE(im_stats)};
    im_server_stats(e->srv, &st);
    if (st.conns == 0) event_base_loopexit(e->base, NULL);
  }
  if (e->nap_due) nap(e);
}

/* ---- engine hooks ------------------------------------------------------- */

static void io_want_write(im_server *srv, im_conn_id c, void *io_ctx, void *io_user) {
  (void)srv;
  (void)c;
  ev_conn *ec = io_ctx;
  im_event *e = io_user;
  /* a handshaking connection writes once the handshake is done */
  if (ec->in_flush || ec->closed || ec->writing || ec->handshaking) return;
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
  /* a graceful close: tell the peer we are done (a TLS close_notify, then
   * FIN) and read what it still sends until it closes too */
  if (ec->handshaking) {
    conn_bury(ec);
    return;
  }
  im_stream_shutdown(conn_stream(ec));
  conn_bury_as(ec, true);
}

/* ---- listeners -------------------------------------------------------------- */

static void accept_cb(int fd, const char *peer, void *arg) {
  listener *ls = arg;
  im_event *e = ls->owner;
  if (e->shutting_down) {
    evutil_closesocket(fd);
    return;
  }
  ev_conn *ec = calloc(1, sizeof(*ec));
  im_stream *st = NULL;
  if (ec && ls->tls)
    st = ec->tls = im_stream_new(fd, ls->tls);
  else if (ec)
    st = im__stream_plain_init(&ec->plain, fd);
  if (!st) {
    free(ec);
    evutil_closesocket(fd);
    return;
  }
  ec->ls = ls;
  ec->id = im_server_accept(e->srv, ls->t, peer, ec);
  if (!ec->id) {
    im_stream_free(st);
    free(ec);
    return;
  }
  if (ls->tls) {
    im_conn_set_secure(e->srv, ec->id, 1);
    ec->handshaking = 1;
    ec->hs_deadline = (uint32_t)(mono_ms() + im_tls_handshake_timeout(ls->tls));
    TAILQ_INSERT_TAIL(&ls->hs, ec, hs);
  }
  ec->all_next = e->all;
  if (e->all) e->all->all_prev = ec;
  e->all = ec;
  if (conn_watch(ec, EPOLL_CTL_ADD, false) < 0) conn_fail(ec); /* no memory for its entry */
}

static void tick_cb(evutil_socket_t fd, short what, void *arg) {
  (void)fd;
  (void)what;
  im_event *e = arg;
  uint64_t now = mono_ms();
  /* handshakes over time cost their connection; each list is in deadline
   * order (one timeout per listener) */
  for (int i = 0; i < e->nls; i++)
    for (ev_conn *ec; (ec = TAILQ_FIRST(&e->ls[i].hs)) &&
                      (int32_t)((uint32_t)now - ec->hs_deadline) >= 0;)
      conn_fail(ec);
  for (lingering *l; (l = TAILQ_FIRST(&e->lingering)) &&
                     (int32_t)((uint32_t)now - l->deadline) >= 0;)
    linger_end(e, l);
  im_server_tick(e->srv, now);
}

im_event *im_event_new(struct event_base *base, im_server *srv) {
  im_event *e = calloc(1, sizeof(*e));
  if (!e) return NULL;
  TAILQ_INIT(&e->lingering);
  e->base = base;
  e->srv = srv;
  e->epfd = epoll_create1(EPOLL_CLOEXEC);
  if (e->epfd < 0) {
    free(e);
    return NULL;
  }
  e->poll = event_new(base, e->epfd, EV_READ | EV_PERSIST, poll_cb, e);
  e->flush = event_new(base, -1, 0, flush_cb, e);
  e->tick = event_new(base, -1, EV_PERSIST, tick_cb, e);
  if (!e->poll || event_add(e->poll, NULL) < 0 || !e->flush || !e->tick) {
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

int im_event_listen_tls(im_event *e, enum im_transport t, const char *addr, im_tls *tls) {
  if (e->nls == MAX_LISTENERS || (t != IM_TRANSPORT_WS && t != IM_TRANSPORT_TCP)) return IM_EINVAL;
  listener *ls = &e->ls[e->nls];
  memset(ls, 0, sizeof *ls);
  TAILQ_INIT(&ls->hs);
  ls->owner = e;
  ls->t = t;
  ls->tls = tls;
  ls->l = e->reuseport ? im_listener_new_shared(e->base, addr, 4096, accept_cb, ls)
                       : im_listener_new(e->base, addr, 4096, accept_cb, ls);
  if (!ls->l) return IM_EADDR;
  if (e->shutting_down) im_listener_enable(ls->l, 0);
  e->nls++;
  return 0;
}

void im_event_set_reuseport(im_event *e, int on) { e->reuseport = on != 0; }

int im_event_set_coalesce(im_event *e, unsigned usec) {
  if (usec > IM_EVENT_COALESCE_MAX) return IM_EINVAL;
  e->coalesce_us = usec;
  return 0;
}

void im_event_counts(const im_event *e, uint64_t *wakeups, uint64_t *naps) {
  if (wakeups) *wakeups = e->wakeups;
  if (naps) *naps = e->naps;
}

int im_event_listen(im_event *e, enum im_transport t, const char *addr) {
  return im_event_listen_tls(e, t, addr, NULL);
}

int im_event_port(const im_event *e, int n) {
  return n >= 0 && n < e->nls ? im_listener_port(e->ls[n].l) : -1;
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
  for (int i = 0; i < e->nls; i++) {
    im_listener_enable(e->ls[i].l, 0);
    /* no channel to say goodbye on before the TLS handshake: just drop */
    while (!TAILQ_EMPTY(&e->ls[i].hs)) conn_fail(TAILQ_FIRST(&e->ls[i].hs));
  }
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
  for (int i = 0; i < e->nls; i++) im_listener_free(e->ls[i].l);
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
    conn_unwatch(ec);
    im_stream_free(conn_stream(ec));
    im_server_hangup(e->srv, ec->id);
    free(ec);
  }
  while (e->grave) {
    ev_conn *ec = e->grave;
    e->grave = ec->grave_next;
    free(ec);
  }
  while (!TAILQ_EMPTY(&e->lingering)) linger_end(e, TAILQ_FIRST(&e->lingering));
  if (e->flush) event_free(e->flush);
  if (e->poll) event_free(e->poll);
  close(e->epfd);
  free(e);
}
