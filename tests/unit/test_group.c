/* The thread group (im_group.h): two engines, each on its own thread with
 * its own event loop and listener, joined as one server. Real TCP clients
 * (binary IMP) on both workers exchange 1:1 and room messages; presence and
 * kick see both workers; ids stay unique; wake-ups come per batch; a
 * worker that wakes to hundreds of readable connections serves them all;
 * a loop with a coalescing budget waits once per wake-up, after its
 * output went out. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <arpa/inet.h>
#include <errno.h>
#include <event2/event.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <libim/im.h>
#include <libim/im_async.h>
#include <libim/im_event.h>
#include <libim/im_group.h>
#include <libim/im_redis.h>
#include <libim/im_router.h>

#include "proto/imp.h"
#include "proto/tcp_frame.h"

#define WORKERS 2
#define MSGS 300

/* ---- workers: an engine, a loop and a listener per thread ----------------------- */

typedef struct worker {
  struct event_base *base;
  im_server *srv;
  im_event *ev;
  im_mailbox *mb;
  int port;
  pthread_t th;
} worker;

/* The application: a msg to "to" goes to that user, a msg with a room to
 * the room (the sender's connection excepted); the library acks. */
static int on_message(im_server *srv, im_conn_id c, const im_msg *m, void *user) {
  (void)user;
  if (m->room)
    im_room_send(srv, m->room, m, c);
  else if (m->to)
    im_send_user(srv, m->to, m, c);
  return IM_MSG_ACK;
}

static void *worker_main(void *arg) {
  worker *w = arg;
  event_base_dispatch(w->base);
  return NULL;
}

static void stop_loop(im_server *srv, void *arg) {
  (void)srv;
  event_base_loopbreak(arg);
}

static void workers_start(im_group *g, worker *w) {
  im_callbacks cb = {.on_message = on_message};
  for (int i = 0; i < WORKERS; i++) {
    w[i].base = event_base_new();
    w[i].srv = im_server_new(NULL, &cb, &w[i]);
    w[i].ev = im_event_new(w[i].base, w[i].srv);
    assert_non_null(w[i].ev);
    assert_int_equal(im_event_listen(w[i].ev, IM_TRANSPORT_TCP, "127.0.0.1:0"), 0);
    w[i].port = im_event_port(w[i].ev, 0);
    w[i].mb = im_mailbox_new(w[i].base, w[i].srv);
    assert_int_equal(im_group_join(g, w[i].base, w[i].srv), i);
    assert_int_equal(pthread_create(&w[i].th, NULL, worker_main, &w[i]), 0);
  }
  assert_int_equal(im_group_join(g, w[0].base, w[0].srv), IM_ELIMIT);
}

static void workers_stop(im_group *g, worker *w) {
  for (int i = 0; i < WORKERS; i++) {
    assert_int_equal(im_mailbox_call(w[i].mb, stop_loop, w[i].base), 0);
    pthread_join(w[i].th, NULL);
  }
  im_group_free(g);
  for (int i = 0; i < WORKERS; i++) {
    im_mailbox_free(w[i].mb);
    im_event_free(w[i].ev);
    im_server_free(w[i].srv);
    event_base_free(w[i].base);
  }
}

/* Run fn(srv, arg) on worker w's thread and wait until it has run. */
typedef struct on_loop {
  void (*fn)(im_server *srv, void *arg);
  void *arg;
  pthread_mutex_t lock;
  pthread_cond_t cond;
  int done;
} on_loop;

static void on_loop_run(im_server *srv, void *arg) {
  on_loop *o = arg;
  if (o->fn) o->fn(srv, o->arg);
  pthread_mutex_lock(&o->lock);
  o->done++;
  pthread_cond_broadcast(&o->cond);
  pthread_mutex_unlock(&o->lock);
}

/* Wait until o->done reaches want (a callback completes it). */
static void on_loop_wait(on_loop *o, int want) {
  pthread_mutex_lock(&o->lock);
  while (o->done < want) pthread_cond_wait(&o->cond, &o->lock);
  pthread_mutex_unlock(&o->lock);
}

static void run_on(worker *w, void (*fn)(im_server *srv, void *arg), void *arg) {
  on_loop o = {fn, arg, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0};
  assert_int_equal(im_mailbox_call(w->mb, on_loop_run, &o), 0);
  on_loop_wait(&o, 1);
}

/* ---- clients: blocking TCP sockets speaking binary IMP --------------------------- */

typedef struct client {
  int fd;
  uint8_t buf[1 << 16];
  size_t len;
} client;

static void send_pkt(client *c, const imp_packet *p) {
  uint8_t buf[1024];
  size_t n = imp_bin_encode(p, buf + 4, sizeof buf - 4);
  tcp_frame_encode_header(buf, (uint32_t)n);
  assert_int_equal(send(c->fd, buf, n + 4, 0), (ssize_t)(n + 4));
}

/* The next packet; returns 0, or -1 at EOF. Fails after 10 s of silence. */
static int recv_pkt(client *c, imp_packet *p) {
  for (;;) {
    const uint8_t *body;
    uint32_t blen;
    long used = tcp_frame_parse(c->buf, c->len, 1 << 20, &body, &blen);
    assert_true(used >= 0);
    if (used > 0) {
      static uint8_t copy[1 << 16];
      memcpy(copy, body, blen);
      memmove(c->buf, c->buf + used, c->len - (size_t)used);
      c->len -= (size_t)used;
      assert_int_equal(imp_bin_decode(copy, blen, p), 0);
      return 0;
    }
    ssize_t k = recv(c->fd, c->buf + c->len, sizeof c->buf - c->len, 0);
    if (k < 0 && errno == EINTR) continue;
    assert_true(k >= 0); /* not a timeout */
    if (k == 0) return -1;
    c->len += (size_t)k;
  }
}

static void expect_op(client *c, int op, imp_packet *p) {
  assert_int_equal(recv_pkt(c, p), 0);
  assert_int_equal(p->op, op);
}

static void login(client *c, int port, const char *uid, const char *device) {
  memset(c, 0, sizeof *c);
  c->fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  assert_int_equal(connect(c->fd, (struct sockaddr *)&a, sizeof a), 0);
  struct timeval tv = {10, 0};
  setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  int one = 1;
  setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  imp_packet p = {.op = IMP_OP_AUTH};
  imp_set_str(&p, IMP_K_UID, uid, strlen(uid));
  imp_set_str(&p, IMP_K_TOKEN, "t", 1);
  imp_set_str(&p, IMP_K_DEVICE, device, strlen(device));
  send_pkt(c, &p);
  expect_op(c, IMP_OP_AUTH_OK, &p);
}

static void send_msg(client *c, const char *to, const char *room, int i) {
  char cid[16], data[16];
  snprintf(cid, sizeof cid, "c%d", i);
  snprintf(data, sizeof data, "%d", i);
  imp_packet p = {.op = IMP_OP_MSG};
  imp_set_str(&p, IMP_K_CID, cid, strlen(cid));
  if (to) imp_set_str(&p, IMP_K_TO, to, strlen(to));
  if (room) imp_set_str(&p, IMP_K_ROOM, room, strlen(room));
  imp_set_str(&p, IMP_K_DATA, data, strlen(data));
  send_pkt(c, &p);
}

/* Read count msgs 0..count-1 in order on c (acks of its own sends are
 * skipped); copies the ids to ids (when not NULL). */
static void expect_msgs(client *c, int count, char (*ids)[IM_ID_MAX]) {
  for (int next = 0; next < count;) {
    imp_packet p;
    assert_int_equal(recv_pkt(c, &p), 0);
    if (p.op == IMP_OP_ACK) continue;
    assert_int_equal(p.op, IMP_OP_MSG);
    char want[16];
    int wl = snprintf(want, sizeof want, "%d", next);
    assert_int_equal(p.str[IMP_K_DATA].n, (uint32_t)wl);
    assert_memory_equal(p.str[IMP_K_DATA].p, want, (size_t)wl);
    if (ids) {
      assert_true(p.str[IMP_K_ID].n < IM_ID_MAX);
      memcpy(ids[next], p.str[IMP_K_ID].p, p.str[IMP_K_ID].n);
      ids[next][p.str[IMP_K_ID].n] = '\0';
    }
    next++;
  }
}

/* A ping round trip: everything the server sent c before is read. */
static void expect_quiet(client *c) {
  imp_packet p = {.op = IMP_OP_PING};
  send_pkt(c, &p);
  for (;;) {
    assert_int_equal(recv_pkt(c, &p), 0);
    if (p.op == IMP_OP_PONG) return;
    assert_int_equal(p.op, IMP_OP_ACK); /* nothing but acks of its own sends */
  }
}

static void join_room(client *c, const char *room) {
  imp_packet p = {.op = IMP_OP_JOIN};
  imp_set_str(&p, IMP_K_ROOM, room, strlen(room));
  imp_set_str(&p, IMP_K_CID, "j", 1);
  send_pkt(c, &p);
  expect_op(c, IMP_OP_ACK, &p);
}

/* The connection was closed with code (TCP: an error op, then EOF). */
static void expect_closed(client *c, int code) {
  imp_packet p;
  for (;;) {
    assert_int_equal(recv_pkt(c, &p), 0);
    if (p.op == IMP_OP_ERROR) break;
  }
  assert_int_equal(p.num[IMP_K_CODE], (uint64_t)code);
  assert_int_equal(recv_pkt(c, &p), -1);
  close(c->fd);
}

static int cmp_ids(const void *a, const void *b) { return strcmp(a, b); }

static void assert_unique(char (*ids)[IM_ID_MAX], size_t n) {
  qsort(ids, n, IM_ID_MAX, cmp_ids);
  for (size_t i = 1; i < n; i++) assert_string_not_equal(ids[i - 1], ids[i]);
}

/* ---- the tests ------------------------------------------------------------------ */

static void messages_cross_workers_once_in_order(void **state) {
  (void)state;
  im_group *g = im_group_new(WORKERS, 0);
  assert_non_null(g);
  worker w[WORKERS];
  workers_start(g, w);
  client alice, carol, bob1, bob2;
  login(&alice, w[0].port, "alice", "a");
  login(&carol, w[1].port, "carol", "c");
  login(&bob1, w[0].port, "bob", "phone");
  login(&bob2, w[1].port, "bob", "laptop");
  /* 1:1: alice (worker 0) and carol (worker 1) both write to bob, whose
   * devices are on both workers */
  for (int i = 0; i < MSGS; i++) send_msg(&alice, "bob", NULL, i);
  static char ids[4][MSGS][IM_ID_MAX];
  expect_msgs(&bob1, MSGS, ids[0]);
  expect_msgs(&bob2, MSGS, ids[1]);
  for (int i = 0; i < MSGS; i++) assert_string_equal(ids[0][i], ids[1][i]); /* one message */
  for (int i = 0; i < MSGS; i++) send_msg(&carol, "bob", NULL, i);
  expect_msgs(&bob1, MSGS, ids[2]);
  expect_msgs(&bob2, MSGS, ids[3]);
  /* ids minted on both workers at the same time never collide */
  static char all[2 * MSGS][IM_ID_MAX];
  memcpy(all, ids[0], sizeof ids[0]);
  memcpy(all[MSGS], ids[2], sizeof ids[2]);
  assert_unique(all, 2 * MSGS);

  /* a room with members on both workers: each gets the message once, the
   * sender none */
  join_room(&alice, "lobby");
  join_room(&bob2, "lobby");
  join_room(&carol, "lobby");
  for (int i = 0; i < MSGS; i++) send_msg(&carol, NULL, "lobby", i);
  expect_msgs(&alice, MSGS, NULL);
  expect_msgs(&bob2, MSGS, NULL);
  expect_quiet(&alice);
  expect_quiet(&bob1);
  expect_quiet(&bob2);
  expect_quiet(&carol);

  /* batches: the workers were woken fewer times than operations posted */
  for (int i = 0; i < WORKERS; i++) {
    im_group_counters st;
    im_group_stats(g, (unsigned)i, &st);
    assert_true(st.posted > 0);
    assert_true(st.wakeups >= 1 && st.wakeups <= st.posted);
    assert_int_equal(st.applied, st.posted);
    assert_int_equal(st.dropped, 0);
    print_message("      worker %d: %llu operations, %llu wake-ups\n", i,
                  (unsigned long long)st.posted, (unsigned long long)st.wakeups);
  }
  client *all_clients[] = {&alice, &carol, &bob1, &bob2};
  for (int i = 0; i < 4; i++) close(all_clients[i]->fd);
  workers_stop(g, w);
}

/* ---- presence and kick from worker 0 ---- */

typedef struct asked {
  on_loop done;
  size_t n;
  int status;
  char devices[8][16];
  int kicked;
} asked;

static void presence_known(im_server *srv, const char *uid, const im_route *routes, size_t n,
                           int status, void *arg) {
  asked *a = arg;
  assert_string_equal(uid, "bob");
  a->n = n;
  a->status = status;
  for (size_t i = 0; i < n && i < 8; i++) {
    assert_null(routes[i].node);
    snprintf(a->devices[i], sizeof a->devices[i], "%s", routes[i].device);
  }
  on_loop_run(srv, &a->done);
}

static void ask_presence(im_server *srv, void *arg) {
  assert_int_equal(im_presence(srv, "bob", presence_known, arg), 0);
}

static void kick_bob(im_server *srv, void *arg) {
  ((asked *)arg)->kicked = im_kick_user(srv, "bob", IM_CLOSE_KICKED, "kicked");
}

static void presence_and_kick_see_every_worker(void **state) {
  (void)state;
  im_group *g = im_group_new(WORKERS, 0);
  worker w[WORKERS];
  workers_start(g, w);
  client bob1, bob2, bob3;
  login(&bob1, w[0].port, "bob", "phone");
  login(&bob2, w[1].port, "bob", "laptop");
  login(&bob3, w[1].port, "bob", "tablet");
  /* one record for bob in the process, counting the three on both workers */
  size_t users = 0;
  assert_int_equal(im_group_user_conns(g, "bob"), 3);
  im_group_totals(g, &users, NULL);
  assert_int_equal(users, 1);

  asked a = {.done = {NULL, NULL, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0}};
  assert_int_equal(im_mailbox_call(w[0].mb, ask_presence, &a), 0);
  on_loop_wait(&a.done, 1);
  assert_int_equal(a.status, 0);
  assert_int_equal(a.n, 3);
  assert_string_equal(a.devices[0], "phone"); /* the asking worker's first */
  int laptop = !strcmp(a.devices[1], "laptop") || !strcmp(a.devices[2], "laptop");
  int tablet = !strcmp(a.devices[1], "tablet") || !strcmp(a.devices[2], "tablet");
  assert_true(laptop && tablet);

  /* kick from worker 0: one local, two on worker 1, all closed */
  run_on(&w[0], kick_bob, &a);
  assert_int_equal(a.kicked, 3);
  expect_closed(&bob1, IM_CLOSE_KICKED);
  expect_closed(&bob2, IM_CLOSE_KICKED);
  expect_closed(&bob3, IM_CLOSE_KICKED);

  /* once they are gone, presence is empty and answered at once */
  client probe;
  login(&probe, w[1].port, "probe", "p");
  expect_quiet(&probe); /* worker 1 has released bob2 and bob3 by now */
  a.done.done = 0;
  assert_int_equal(im_mailbox_call(w[0].mb, ask_presence, &a), 0);
  on_loop_wait(&a.done, 1);
  assert_int_equal(a.n, 0);
  assert_int_equal(im_group_user_conns(g, "bob"), 0);
  im_group_totals(g, &users, NULL);
  assert_int_equal(users, 1); /* probe */
  close(probe.fd);
  workers_stop(g, w);
}


/* ---- an outer router after the group (a cluster module's place) ---- */

/* What the outer routers saw; member 0's takes the rooms. Written on the
 * members' threads, read by the test under the lock. */
typedef struct outer_log {
  pthread_mutex_t lock;
  pthread_cond_t cond;
  int opens[WORKERS], closes[WORKERS];  /* conn_open / conn_close per member */
  int sends[WORKERS];                   /* send_users per member */
  int kicks[WORKERS];
  int room_opens, room_closes;          /* of "lobby" */
  int room_wrong_thread;                /* room hooks not on member 0's thread */
  pthread_t th0;
} outer_log;

typedef struct outer_ud {
  outer_log *log;
  int member;
} outer_ud;

static outer_ud outer_uds[WORKERS];

static void log_bump(outer_ud *u, int *field) {
  pthread_mutex_lock(&u->log->lock);
  (*field)++;
  pthread_cond_broadcast(&u->log->cond);
  pthread_mutex_unlock(&u->log->lock);
}

/* A connection of the member's own (its info readable) opened or closed. */
static void o_conn(im_server *srv, im_conn_id c, outer_ud *u, int *counts) {
  im_conn_info info = {IM_STRUCT_SIZE(im_conn_info)};
  assert_int_equal(im_conn_get_info(srv, c, &info), 0);
  log_bump(u, &counts[u->member]);
}

static void o_conn_open(im_server *srv, im_conn_id c, void *ud) {
  o_conn(srv, c, ud, ((outer_ud *)ud)->log->opens);
}

static void o_conn_close(im_server *srv, im_conn_id c, void *ud) {
  o_conn(srv, c, ud, ((outer_ud *)ud)->log->closes);
}

static void o_room(outer_ud *u, const char *room, int *field) {
  assert_string_equal(room, "lobby");
  if (!pthread_equal(pthread_self(), u->log->th0)) u->log->room_wrong_thread++;
  log_bump(u, field);
}

static void o_room_open(im_server *srv, const char *room, void *ud) {
  (void)srv;
  o_room(ud, room, &((outer_ud *)ud)->log->room_opens);
}

static void o_room_close(im_server *srv, const char *room, void *ud) {
  (void)srv;
  o_room(ud, room, &((outer_ud *)ud)->log->room_closes);
}

static int o_send_users(im_server *srv, const char *const *uids, size_t n, const im_msg *m,
                        void *ud) {
  (void)srv;
  (void)uids;
  (void)n;
  (void)m;
  outer_ud *u = ud;
  log_bump(u, &u->log->sends[u->member]);
  return 5; /* "five connections on other nodes" */
}

static int o_kick_user(im_server *srv, const char *uid, int code, const char *reason, void *ud) {
  (void)srv;
  (void)uid;
  (void)code;
  (void)reason;
  outer_ud *u = ud;
  log_bump(u, &u->log->kicks[u->member]);
  return 1;
}

/* Adds one connection on node "far" to the process's. */
static int o_presence(im_server *srv, const char *uid, const im_route *local, size_t n_local,
                      im_presence_cb cb, void *arg, void *ud) {
  (void)ud;
  im_route all[8];
  assert_true(n_local < 8);
  memcpy(all, local, n_local * sizeof *all);
  all[n_local] = (im_route){.node = "far", .conn = "1", .device = "watch", .platform = "",
                            .peer = "10.0.0.1", .transport = IM_TRANSPORT_WS};
  cb(srv, uid, all, n_local + 1, 0, arg);
  return 0;
}

static void install_outer(im_server *srv, void *arg) {
  im_group *g = arg;
  int i = im_group_member(g, srv);
  assert_true(i >= 0);
  im_router r = {.conn_open = o_conn_open, .conn_close = o_conn_close,
                 .send_users = o_send_users, .kick_user = o_kick_user,
                 .presence = o_presence, .ud = &outer_uds[i]};
  if (i == 0) {
    r.room_open = o_room_open;
    r.room_close = o_room_close;
    outer_uds[0].log->th0 = pthread_self();
  }
  assert_int_equal(im_group_set_outer(g, srv, &r), 0);
}

/* Wait until *field (of the log) reaches want. */
static void log_wait(outer_log *l, const int *field, int want) {
  pthread_mutex_lock(&l->lock);
  while (*field < want) pthread_cond_wait(&l->cond, &l->lock);
  pthread_mutex_unlock(&l->lock);
}

static int log_read(outer_log *l, const int *field) {
  pthread_mutex_lock(&l->lock);
  int v = *field;
  pthread_mutex_unlock(&l->lock);
  return v;
}

typedef struct outer_calls {
  im_group *g;
  int sent;
  asked a;
} outer_calls;

static void send_bob_inbound(im_server *srv, void *arg) {
  outer_calls *o = arg;
  im_msg m = {IM_STRUCT_SIZE(im_msg), .from = "far-user", .data = "0", .data_len = 1};
  const char *uids[] = {"bob"};
  o->sent = im_group_local_send_users(o->g, srv, uids, 1, &m, 0);
}

static void presence_far(im_server *srv, const char *uid, const im_route *routes, size_t n,
                         int status, void *arg) {
  asked *a = arg;
  assert_string_equal(uid, "bob");
  assert_int_equal(status, 0);
  a->n = n;
  for (size_t i = 0; i < n && i < 8; i++)
    snprintf(a->devices[i], sizeof a->devices[i], "%s%s", routes[i].node ? "@" : "",
             routes[i].device);
  on_loop_run(srv, &a->done);
}

static void ask_presence_far(im_server *srv, void *arg) {
  assert_int_equal(im_presence(srv, "bob", presence_far, arg), 0);
}

static void leave_room(client *c, const char *room) {
  imp_packet p = {.op = IMP_OP_LEAVE};
  imp_set_str(&p, IMP_K_ROOM, room, strlen(room));
  imp_set_str(&p, IMP_K_CID, "l", 1);
  send_pkt(c, &p);
  expect_op(c, IMP_OP_ACK, &p);
}

static void outer_router_sees_the_process(void **state) {
  (void)state;
  outer_log log = {.lock = PTHREAD_MUTEX_INITIALIZER, .cond = PTHREAD_COND_INITIALIZER};
  im_group *g = im_group_new(WORKERS, 0);
  worker w[WORKERS];
  workers_start(g, w);
  for (int i = 0; i < WORKERS; i++) {
    outer_uds[i] = (outer_ud){&log, i};
    run_on(&w[i], install_outer, g);
  }
  client alice, bob0, bob1;
  login(&alice, w[0].port, "alice", "a");
  login(&bob0, w[0].port, "bob", "phone");
  login(&bob1, w[1].port, "bob", "laptop");
  /* each connection reaches the outer router of the member holding it */
  assert_int_equal(log_read(&log, &log.opens[0]), 2);
  assert_int_equal(log_read(&log, &log.opens[1]), 1);
  assert_int_equal(im_group_conns(g), 3); /* authenticated, on both */

  /* a send started on worker 0 reaches bob on both workers and is handed
   * to the outer router once, by worker 0 */
  send_msg(&alice, "bob", NULL, 0);
  expect_msgs(&bob0, 1, NULL);
  expect_msgs(&bob1, 1, NULL);
  assert_int_equal(log_read(&log, &log.sends[0]), 1);
  assert_int_equal(log_read(&log, &log.sends[1]), 0);
  /* what the outer router brings in reaches both workers, and never goes
   * back out: 1 local + 1 on worker 1 */
  outer_calls o = {.g = g};
  run_on(&w[0], send_bob_inbound, &o);
  assert_int_equal(o.sent, 2);
  expect_msgs(&bob0, 1, NULL);
  expect_msgs(&bob1, 1, NULL);
  assert_int_equal(log_read(&log, &log.sends[0]), 1);

  /* the process's rooms: one open when worker 1 gains the first member,
   * none for worker 0's, one close after the last member of both left;
   * always on member 0's thread */
  join_room(&bob1, "lobby");
  log_wait(&log, &log.room_opens, 1);
  join_room(&alice, "lobby");
  join_room(&bob0, "lobby");
  leave_room(&bob1, "lobby");
  leave_room(&alice, "lobby");
  expect_quiet(&alice);
  assert_int_equal(log_read(&log, &log.room_closes), 0);
  leave_room(&bob0, "lobby");
  log_wait(&log, &log.room_closes, 1);
  join_room(&bob1, "lobby"); /* and again */
  log_wait(&log, &log.room_opens, 2);
  expect_quiet(&bob0);
  expect_quiet(&bob1);
  assert_int_equal(log_read(&log, &log.room_opens), 2);
  assert_int_equal(log_read(&log, &log.room_closes), 1);
  assert_int_equal(log.room_wrong_thread, 0);

  /* presence from worker 1: the process's two, then the outer router's */
  o.a = (asked){.done = {NULL, NULL, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0}};
  assert_int_equal(im_mailbox_call(w[1].mb, ask_presence_far, &o.a), 0);
  on_loop_wait(&o.a.done, 1);
  assert_int_equal(o.a.n, 3);
  assert_string_equal(o.a.devices[0], "laptop");
  assert_string_equal(o.a.devices[1], "phone");
  assert_string_equal(o.a.devices[2], "@watch");

  /* a kick from worker 1: both of bob's closed, the outer router's count
   * added, its hook called by worker 1 alone */
  asked k = {0};
  run_on(&w[1], kick_bob, &k);
  assert_int_equal(k.kicked, 3);
  expect_closed(&bob0, IM_CLOSE_KICKED);
  expect_closed(&bob1, IM_CLOSE_KICKED);
  assert_int_equal(log_read(&log, &log.kicks[1]), 1);
  assert_int_equal(log_read(&log, &log.kicks[0]), 0);
  log_wait(&log, &log.closes[0], 1);
  log_wait(&log, &log.closes[1], 1);
  /* alice is still connected when the group goes: closing her afterwards
   * (im_event_free) reaches none of the freed group's hooks */
  workers_stop(g, w);
  close(alice.fd);
}


/* ---- the Redis module on a group: its API's contract (no Redis needed: it
 * connects from the loop, which does not run here) ---- */

static void redis_module_on_a_group(void **state) {
  (void)state;
  im_group *g = im_group_new(2, 0);
  struct event_base *base[3];
  im_server *srv[3];
  for (int i = 0; i < 3; i++) {
    base[i] = event_base_new();
    srv[i] = im_server_new(NULL, NULL, NULL);
    assert_non_null(srv[i]);
  }
  assert_int_equal(im_group_join(g, base[0], srv[0]), 0);
  assert_int_equal(im_group_join(g, base[1], srv[1]), 1);
  assert_int_equal(im_group_member(g, srv[1]), 1);
  assert_int_equal(im_group_member(g, srv[2]), IM_ENOENT);
  im_redis_config cfg;
  im_redis_config_init(&cfg);
  cfg.port = 1;
  cfg.node = "n1";
  /* the local halves: srv alone without a group, refused for a non-member */
  im_msg m = {IM_STRUCT_SIZE(im_msg), .id = "1", .data = "1", .data_len = 1};
  const char *uids[] = {"nobody"};
  assert_int_equal(im_group_local_send_users(NULL, srv[2], uids, 1, &m, 0), 0);
  assert_int_equal(im_group_local_kick_user(NULL, srv[2], "nobody", 1, "bad code"), IM_EINVAL);
  assert_int_equal(im_group_local_room_send(g, srv[2], "r", &m, 0), IM_ENOENT);
  /* srv[2] is no member: refused, and nothing is left installed */
  assert_null(im_redis_new_group(base[2], srv[2], g, &cfg));
  im_redis *home = im_redis_new_group(base[0], srv[0], g, &cfg);
  assert_non_null(home);
  assert_null(im_redis_join(NULL, base[1], srv[1]));
  assert_null(im_redis_join(home, base[2], srv[2])); /* not a member */
  im_redis *h = im_redis_join(home, base[1], srv[1]);
  assert_non_null(h);
  /* a handle reports the node's lease; draining is the home's */
  assert_string_equal(im_redis_node(h), "n1");
  assert_int_equal(im_redis_up(h), 0);
  assert_int_equal(im_redis_epoch(h), 0);
  assert_int_equal(im_redis_dropped(h), 0);
  assert_int_equal(im_redis_set_draining(h, 1), IM_EINVAL);
  assert_int_equal(im_redis_set_draining(home, 1), IM_ECLOSED); /* not connected yet */
  /* a module of a single server has no group to join */
  cfg.node = "n2";
  im_redis *alone = im_redis_new(base[2], srv[2], &cfg);
  assert_non_null(alone);
  assert_null(im_redis_join(alone, base[1], srv[1]));
  im_redis_free(alone);
  im_redis_free(h);
  im_redis_free(home);
  im_group_free(g);
  for (int i = 0; i < 3; i++) {
    im_server_free(srv[i]);
    event_base_free(base[i]);
  }
}

/* ---- message ids ---- */

#define IDS 20000

typedef struct minted {
  char (*ids)[IM_ID_MAX];
} minted;

static void mint(im_server *srv, void *arg) {
  minted *m = arg;
  for (int i = 0; i < IDS; i++) im_new_id(srv, m->ids[i]);
}

static void mint_one(im_server *srv, void *arg) { im_new_id(srv, ((minted *)arg)->ids[0]); }

static void *mint_thread(void *arg) {
  void **a = arg;
  run_on(a[0], mint, a[1]);
  return NULL;
}

static void ids_are_unique_across_workers(void **state) {
  (void)state;
  im_group *g = im_group_new(WORKERS, 0);
  worker w[WORKERS];
  workers_start(g, w);
  /* both workers mint at once, with the same node id, in the same ms */
  static char ids[WORKERS * IDS][IM_ID_MAX];
  minted m[WORKERS];
  pthread_t th[WORKERS];
  void *args[WORKERS][2];
  for (int i = 0; i < WORKERS; i++) {
    m[i].ids = ids + i * IDS;
    args[i][0] = &w[i];
    args[i][1] = &m[i];
    assert_int_equal(pthread_create(&th[i], NULL, mint_thread, args[i]), 0);
  }
  for (int i = 0; i < WORKERS; i++) pthread_join(th[i], NULL);
  assert_unique(ids, WORKERS * IDS);
  /* an id minted after another one, on the other worker, is greater (the
   * workers' tick clocks differ; the shared id clock orders them) */
  static char one[IM_ID_MAX], two[IM_ID_MAX];
  minted a = {&one}, b = {&two};
  for (int i = 0; i < 50; i++) {
    run_on(&w[i % 2], mint_one, &a);
    run_on(&w[(i + 1) % 2], mint_one, &b);
    assert_true(strtoull(two, NULL, 10) > strtoull(one, NULL, 10));
  }
  /* the shard rule: 0 <= shard < shards <= 4096 */
  assert_int_equal(im_server_set_id_shard(w[0].srv, 2, 2), IM_EINVAL);
  assert_int_equal(im_server_set_id_shard(w[0].srv, 0, 4097), IM_EINVAL);
  workers_stop(g, w);
}

/* ---- a stuck worker ---- */

typedef struct gate {
  pthread_mutex_t lock;
  pthread_cond_t cond;
  int held, open;
} gate;

/* Runs on a worker: holds its loop until the gate opens. */
static void hold_loop(im_server *srv, void *arg) {
  (void)srv;
  gate *g = arg;
  pthread_mutex_lock(&g->lock);
  g->held = 1;
  pthread_cond_broadcast(&g->cond);
  while (!g->open) pthread_cond_wait(&g->cond, &g->lock);
  pthread_mutex_unlock(&g->lock);
}

/* Stops w's loop (hold_loop on it) and returns once it is held. */
static void gate_hold(worker *w, gate *gt) {
  assert_int_equal(im_mailbox_call(w->mb, hold_loop, gt), 0);
  pthread_mutex_lock(&gt->lock);
  while (!gt->held) pthread_cond_wait(&gt->cond, &gt->lock);
  pthread_mutex_unlock(&gt->lock);
}

static void gate_open(gate *gt) {
  pthread_mutex_lock(&gt->lock);
  gt->open = 1;
  pthread_cond_broadcast(&gt->cond);
  pthread_mutex_unlock(&gt->lock);
}

static void send_many(im_server *srv, void *arg) {
  (void)arg;
  char data[16];
  for (int i = 0; i < 100; i++) {
    int n = snprintf(data, sizeof data, "%d", i);
    im_msg m = {.from = "game", .data = data, .data_len = (size_t)n};
    im_send_user(srv, "bob", &m, 0);
  }
}

static void a_stuck_worker_costs_bounded_memory(void **state) {
  (void)state;
  im_group *g = im_group_new(WORKERS, 10); /* at most 10 operations wait per worker */
  worker w[WORKERS];
  workers_start(g, w);
  client bob;
  login(&bob, w[1].port, "bob", "b");
  gate gt = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0};
  gate_hold(&w[1], &gt);
  run_on(&w[0], send_many, NULL); /* 100 sends to bob while worker 1 is stuck */
  im_group_counters st;
  im_group_stats(g, 1, &st);
  assert_int_equal(st.posted, 10);
  assert_int_equal(st.dropped, 90);
  assert_int_equal(st.applied, 0);
  gate_open(&gt);
  expect_msgs(&bob, 10, NULL); /* the first ten, in order */
  expect_quiet(&bob);
  close(bob.fd);
  workers_stop(g, w);
}

/* ---- many connections ready at once ---- */

#define SENDERS 600 /* over the driver's 256 ready connections per poll */

/* Every sender writes while worker 0's loop is held, so it wakes to
 * hundreds of readable connections at once (more than one poll takes):
 * each message arrives once, each sender gets its ack. */
static void many_connections_ready_at_once(void **state) {
  (void)state;
  im_group *g = im_group_new(WORKERS, 0);
  worker w[WORKERS];
  workers_start(g, w);
  client *s = calloc(SENDERS, sizeof *s), r;
  assert_non_null(s);
  login(&r, w[1].port, "r", "d");
  for (int i = 0; i < SENDERS; i++) {
    char uid[16];
    snprintf(uid, sizeof uid, "s%d", i);
    login(&s[i], w[0].port, uid, "d");
  }
  gate gt = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0};
  gate_hold(&w[0], &gt);
  for (int i = 0; i < SENDERS; i++) send_msg(&s[i], "r", NULL, i);
  gate_open(&gt);
  static bool seen[SENDERS];
  for (int got = 0; got < SENDERS;) {
    imp_packet p;
    assert_int_equal(recv_pkt(&r, &p), 0);
    if (p.op != IMP_OP_MSG) continue;
    char data[16];
    assert_true(p.str[IMP_K_DATA].n < sizeof data);
    memcpy(data, p.str[IMP_K_DATA].p, p.str[IMP_K_DATA].n);
    data[p.str[IMP_K_DATA].n] = '\0';
    int i = atoi(data);
    assert_true(i >= 0 && i < SENDERS);
    assert_false(seen[i]);
    seen[i] = true;
    got++;
  }
  for (int i = 0; i < SENDERS; i++) {
    imp_packet p;
    expect_op(&s[i], IMP_OP_ACK, &p);
    close(s[i].fd);
  }
  expect_quiet(&r);
  close(r.fd);
  free(s);
  workers_stop(g, w);
}

/* im_event_set_coalesce / im_event_counts, on the worker's own thread */
typedef struct coalesce_call {
  worker *w;
  unsigned set;     /* UINT32_MAX: only read the counts */
  int rc;
  uint64_t wakeups, naps;
} coalesce_call;

static void coalesce_on_loop(im_server *srv, void *arg) {
  (void)srv;
  coalesce_call *q = arg;
  if (q->set != UINT32_MAX) q->rc = im_event_set_coalesce(q->w->ev, q->set);
  im_event_counts(q->w->ev, &q->wakeups, &q->naps);
}

static coalesce_call coalesce(worker *w, unsigned set) {
  coalesce_call q = {w, set, 0, 0, 0};
  run_on(w, coalesce_on_loop, &q);
  return q;
}

/* Messages one at a time (each after the last one's ack): every one is
 * delivered on both workers; worker 0, with a budget, waited once per
 * wake-up that read input, and its acks came back all the same (the wait
 * comes after a pass's output is written); worker 1, without, never. A
 * budget over IM_EVENT_COALESCE_MAX is refused and changes nothing. */
static void coalescing_waits_after_output(void **state) {
  (void)state;
  im_group *g = im_group_new(WORKERS, 0);
  worker w[WORKERS];
  workers_start(g, w);
  assert_int_equal(coalesce(&w[0], 1000).rc, 0);
  assert_int_equal(coalesce(&w[0], IM_EVENT_COALESCE_MAX + 1).rc, IM_EINVAL);
  enum { ROUNDS = 20 };
  coalesce_call before[WORKERS], after[WORKERS];
  client s[WORKERS], r[WORKERS];
  for (int k = 0; k < WORKERS; k++) {
    char su[8], ru[8];
    snprintf(su, sizeof su, "cs%d", k);
    snprintf(ru, sizeof ru, "cr%d", k);
    login(&s[k], w[k].port, su, "d");
    login(&r[k], w[k].port, ru, "d");
    before[k] = coalesce(&w[k], UINT32_MAX);
    for (int i = 0; i < ROUNDS; i++) {
      imp_packet p;
      send_msg(&s[k], ru, NULL, i);
      expect_op(&s[k], IMP_OP_ACK, &p);
    }
    expect_msgs(&r[k], ROUNDS, NULL);
    after[k] = coalesce(&w[k], UINT32_MAX);
    close(s[k].fd);
    close(r[k].fd);
  }
  /* each message woke its loop (it was sent after the last ack) */
  for (int k = 0; k < WORKERS; k++)
    assert_true(after[k].wakeups - before[k].wakeups >= ROUNDS);
  assert_int_equal(after[0].naps - before[0].naps, after[0].wakeups - before[0].wakeups);
  assert_int_equal(after[1].naps, 0);
  workers_stop(g, w);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(messages_cross_workers_once_in_order),
      cmocka_unit_test(presence_and_kick_see_every_worker),
      cmocka_unit_test(outer_router_sees_the_process),
      cmocka_unit_test(redis_module_on_a_group),
      cmocka_unit_test(ids_are_unique_across_workers),
      cmocka_unit_test(a_stuck_worker_costs_bounded_memory),
      cmocka_unit_test(many_connections_ready_at_once),
      cmocka_unit_test(coalescing_waits_after_output),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
