/* The routing seam: two engines in one process joined by a test router
 * that forwards with the im_local_* calls, as a cross-thread or Redis
 * router does. Clients speak raw TCP with binary IMP. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libim/im.h>
#include <libim/im_router.h>

#include "proto/imp.h"
#include "proto/tcp_frame.h"

/* ---- a node: an engine with a fake driver ---------------------------------- */

typedef struct node {
  im_server *srv;
  struct node *peer;       /* where the test router forwards */
  int conn_opens, conn_closes, room_opens, room_closes, sends, room_sends, kicks;
  char last_room[64];
  im_conn_id last_closed;
  int router_error;        /* returned by send_users when non-zero */
} node;

static void want_write(im_server *s, im_conn_id c, void *ctx, void *u) { (void)s, (void)c, (void)ctx, (void)u; }
static void io_close(im_server *s, im_conn_id c, void *ctx, void *u) { (void)s, (void)c, (void)ctx, (void)u; }

static void node_init_cfg(node *n, const im_config *cfg) {
  memset(n, 0, sizeof *n);
  n->srv = im_server_new(cfg, NULL, n);
  assert_non_null(n->srv);
  im_io io = {want_write, io_close, n};
  im_server_set_io(n->srv, &io);
  im_server_tick(n->srv, 1000);
}

static void node_init(node *n) { node_init_cfg(n, NULL); }

/* Send one binary IMP packet on a TCP connection. */
static void send_pkt(im_server *s, im_conn_id c, const imp_packet *p) {
  uint8_t buf[1024];
  size_t n = imp_bin_encode(p, buf + 4, sizeof buf - 4);
  tcp_frame_encode_header(buf, (uint32_t)n);
  assert_int_equal(im_server_feed(s, c, buf, n + 4), 0);
}

/* Take c's output and decode its packets; returns how many. Strings point
 * into a static buffer valid until the next call. */
static int recv_pkts(im_server *s, im_conn_id c, imp_packet *out, int max) {
  static uint8_t buf[65536];
  size_t len = 0;
  struct iovec iov[16];
  int k;
  while ((k = im_conn_pending(s, c, iov, 16)) > 0) {
    size_t got = 0;
    for (int i = 0; i < k; i++) {
      memcpy(buf + len, iov[i].iov_base, iov[i].iov_len);
      len += iov[i].iov_len;
      got += iov[i].iov_len;
    }
    im_conn_sent(s, c, got);
  }
  int n = 0;
  for (size_t off = 0; off < len && n < max;) {
    const uint8_t *body;
    uint32_t blen;
    long used = tcp_frame_parse(buf + off, len - off, 1 << 20, &body, &blen);
    assert_true(used > 0);
    assert_int_equal(imp_bin_decode(body, blen, &out[n++]), 0);
    off += (size_t)used;
  }
  return n;
}

static im_conn_id login(node *n, const char *uid, const char *device) {
  im_conn_id c = im_server_accept(n->srv, IM_TRANSPORT_TCP, "127.0.0.1:4000", NULL);
  assert_true(c != 0);
  imp_packet p = {.op = IMP_OP_AUTH};
  imp_set_str(&p, IMP_K_UID, uid, strlen(uid));
  imp_set_str(&p, IMP_K_TOKEN, "t", 1);
  imp_set_str(&p, IMP_K_DEVICE, device, strlen(device));
  send_pkt(n->srv, c, &p);
  imp_packet got[4];
  assert_int_equal(recv_pkts(n->srv, c, got, 4), 1);
  assert_int_equal(got[0].op, IMP_OP_AUTH_OK);
  return c;
}

static void expect_msg(node *n, im_conn_id c, const char *id, const char *data) {
  imp_packet got[4];
  assert_int_equal(recv_pkts(n->srv, c, got, 4), 1);
  assert_int_equal(got[0].op, IMP_OP_MSG);
  assert_int_equal(got[0].str[IMP_K_ID].n, strlen(id));
  assert_memory_equal(got[0].str[IMP_K_ID].p, id, strlen(id));
  assert_memory_equal(got[0].str[IMP_K_DATA].p, data, strlen(data));
}

static void expect_nothing(node *n, im_conn_id c) {
  imp_packet got[4];
  assert_int_equal(recv_pkts(n->srv, c, got, 4), 0);
}

/* ---- the test router: forward to the peer node's local halves ------------- */

static void r_conn_open(im_server *s, im_conn_id c, void *ud) {
  im_conn_info info = {IM_STRUCT_SIZE(im_conn_info)};
  assert_int_equal(im_conn_get_info(s, c, &info), 0);
  assert_non_null(info.uid);
  ((node *)ud)->conn_opens++;
}
static void r_conn_close(im_server *s, im_conn_id c, void *ud) {
  im_conn_info info = {IM_STRUCT_SIZE(im_conn_info)};
  assert_int_equal(im_conn_get_info(s, c, &info), 0);
  assert_non_null(info.uid);
  ((node *)ud)->conn_closes++;
  ((node *)ud)->last_closed = c;
}
static void r_room_open(im_server *s, const char *room, void *ud) {
  (void)s;
  node *n = ud;
  n->room_opens++;
  snprintf(n->last_room, sizeof n->last_room, "%s", room);
}
static void r_room_close(im_server *s, const char *room, void *ud) {
  (void)s;
  node *n = ud;
  n->room_closes++;
  snprintf(n->last_room, sizeof n->last_room, "%s", room);
}
static int r_send_users(im_server *s, const char *const *uids, size_t k, const im_msg *m, void *ud) {
  (void)s;
  node *n = ud;
  n->sends++;
  assert_non_null(m->id);
  if (n->router_error) return n->router_error;
  int r = im_local_send_users(n->peer->srv, uids, k, m, 0);
  return r < 0 ? r : 0;
}
static int r_room_send(im_server *s, const char *room, const im_msg *m, void *ud) {
  (void)s;
  node *n = ud;
  n->room_sends++;
  assert_non_null(m->id);
  int r = im_local_room_send(n->peer->srv, room, m, 0);
  return r < 0 ? r : 0;
}
static int r_kick(im_server *s, const char *uid, int code, const char *reason, void *ud) {
  (void)s;
  node *n = ud;
  n->kicks++;
  int r = im_local_kick_user(n->peer->srv, uid, code, reason);
  return r < 0 ? r : 0;
}

/* presence answered later, as a remote query would be */
typedef struct pending_presence {
  im_presence_cb cb;
  void *arg;
  char uid[32];
  im_route local[4];
  char conn[4][24], device[4][32];
  size_t n;
} pending_presence;
static pending_presence pp;

static int r_presence(im_server *s, const char *uid, const im_route *local, size_t n,
                      im_presence_cb cb, void *arg, void *ud) {
  (void)s, (void)ud;
  pp.cb = cb;
  pp.arg = arg;
  snprintf(pp.uid, sizeof pp.uid, "%s", uid);
  pp.n = n < 4 ? n : 4;
  for (size_t i = 0; i < pp.n; i++) {
    pp.local[i] = local[i];
    snprintf(pp.conn[i], 24, "%s", local[i].conn);
    snprintf(pp.device[i], 32, "%s", local[i].device);
    pp.local[i].conn = pp.conn[i];
    pp.local[i].device = pp.device[i];
  }
  return 0;
}

static void link_nodes(node *a, node *b) {
  a->peer = b;
  b->peer = a;
  im_router r = {r_conn_open, r_conn_close, r_room_open, r_room_close,
                 r_send_users, r_room_send, r_kick, NULL, NULL};
  r.ud = a;
  assert_int_equal(im_server_set_router(a->srv, &r), 0);
  r.ud = b;
  assert_int_equal(im_server_set_router(b->srv, &r), 0);
}

static void nodes_free(node *a, node *b) {
  im_server_free(a->srv);
  im_server_free(b->srv);
}

/* ---- tests ---------------------------------------------------------------- */

static void without_router_sends_are_local(void **st) {
  (void)st;
  node a;
  node_init(&a);
  im_conn_id bob = login(&a, "bob", "phone");
  im_msg m = {.id = "7", .data = "1", .data_len = 1};
  assert_int_equal(im_send_user(a.srv, "bob", &m, 0), 1);
  expect_msg(&a, bob, "7", "1");
  assert_int_equal(im_send_user(a.srv, "nobody", &m, 0), 0);
  assert_int_equal(im_kick_user(a.srv, "bob", IM_CLOSE_KICKED, "kicked"), 1);
  assert_int_equal(im_kick_user(a.srv, "bob", 1005, "x"), IM_EINVAL);
  im_server_free(a.srv);
}

static void routes_follow_connections(void **st) {
  (void)st;
  node a, b;
  node_init(&a);
  node_init(&b);
  im_conn_id early = login(&a, "carol", "pc"); /* before the router: announced */
  assert_int_equal(im_room_join(a.srv, early, "lobby"), 0);
  link_nodes(&a, &b);
  assert_int_equal(a.conn_opens, 1);
  assert_int_equal(a.room_opens, 1);
  assert_string_equal(a.last_room, "lobby");
  im_conn_id bob = login(&b, "bob", "phone");
  assert_int_equal(b.conn_opens, 1);
  /* a second member opens nothing; the last one leaving closes the room */
  im_conn_id bob2 = login(&b, "bob", "pc");
  assert_int_equal(im_room_join(b.srv, bob, "lobby"), 0);
  assert_int_equal(im_room_join(b.srv, bob2, "lobby"), 0);
  assert_int_equal(b.room_opens, 1);
  assert_int_equal(im_room_leave(b.srv, bob, "lobby"), 0);
  assert_int_equal(b.room_closes, 0);
  assert_int_equal(im_server_hangup(b.srv, bob2), 0);
  assert_int_equal(b.room_closes, 1);
  assert_int_equal(b.conn_closes, 1);
  assert_true(b.last_closed == bob2);
  /* an unauthenticated connection is never announced */
  im_conn_id anon = im_server_accept(b.srv, IM_TRANSPORT_TCP, "127.0.0.1:1", NULL);
  im_server_hangup(b.srv, anon);
  assert_int_equal(b.conn_closes, 1);
  assert_int_equal(im_server_announce(b.srv), 1);
  assert_int_equal(b.conn_opens, 3);
  nodes_free(&a, &b);
}

static void user_send_reaches_the_other_node_once(void **st) {
  (void)st;
  node a, b;
  node_init(&a);
  node_init(&b);
  link_nodes(&a, &b);
  im_conn_id alice = login(&a, "alice", "pc");
  im_conn_id alice2 = login(&a, "alice", "phone");
  im_conn_id bob = login(&b, "bob", "phone");
  const char *uids[] = {"bob", "alice"};
  im_msg m = {.from = "alice", .to = "bob", .data = "\"hi\"", .data_len = 4};
  /* local: alice's other device (not the sending one); remote: bob */
  assert_int_equal(im_send_users(a.srv, uids, 2, &m, alice), 1);
  assert_int_equal(a.sends, 1);
  imp_packet got[4];
  assert_int_equal(recv_pkts(a.srv, alice2, got, 4), 1);
  char id[IM_ID_MAX];
  snprintf(id, sizeof id, "%.*s", (int)got[0].str[IMP_K_ID].n, got[0].str[IMP_K_ID].p);
  /* the forwarded copy carries the same generated id, and B does not
   * route it again */
  expect_msg(&b, bob, id, "\"hi\"");
  assert_int_equal(b.sends, 0);
  expect_nothing(&a, alice);
  /* a router failure is the caller's error; local delivery happened */
  a.router_error = IM_ENOMEM;
  assert_int_equal(im_send_user(a.srv, "alice", &m, alice), IM_ENOMEM);
  assert_int_equal(recv_pkts(a.srv, alice2, got, 4), 1);
  /* too big: neither local nor routed */
  a.router_error = 0;
  static char big[70000];
  memset(big, '1', sizeof big);
  im_msg huge = {.data = big, .data_len = sizeof big};
  int sends = a.sends;
  assert_int_equal(im_send_user(a.srv, "bob", &huge, 0), IM_ETOOBIG);
  assert_int_equal(a.sends, sends);
  /* data of the largest size passes; with a sender name long enough (and
   * escaped sixfold) to take the envelope past its headroom, it does not */
  uint32_t max = im_server_config(a.srv)->max_message;
  assert_true(max <= sizeof big);
  static char from[1200];
  for (size_t i = 0; i + 1 < sizeof from; i++) from[i] = (char)0x01; /* "\u0001" each */
  im_msg edge = {.data = big, .data_len = max, .from = "system"};
  assert_true(im_send_user(a.srv, "bob", &edge, 0) >= 0);
  assert_int_equal(a.sends, sends + 1);
  static char plain[800]; /* over the cheap bound, under the limit once measured */
  memset(plain, 'f', sizeof plain - 1);
  edge.from = plain;
  assert_true(im_send_user(a.srv, "bob", &edge, 0) >= 0);
  assert_int_equal(a.sends, sends + 2);
  edge.from = from;
  assert_int_equal(im_send_user(a.srv, "bob", &edge, 0), IM_ETOOBIG);
  assert_int_equal(a.sends, sends + 2);
  nodes_free(&a, &b);
}

static void room_send_and_kick_cross_nodes(void **st) {
  (void)st;
  node a, b;
  node_init(&a);
  node_init(&b);
  link_nodes(&a, &b);
  im_conn_id x = login(&a, "x", "d"), y = login(&a, "y", "d"), z = login(&b, "z", "d");
  for (im_conn_id c = x; c; c = c == x ? y : 0) assert_int_equal(im_room_join(a.srv, c, "r"), 0);
  assert_int_equal(im_room_join(b.srv, z, "r"), 0);
  im_msg m = {.id = "42", .room = "r", .data = "1", .data_len = 1};
  assert_int_equal(im_room_send(a.srv, "r", &m, x), 1);
  assert_int_equal(a.room_sends, 1);
  expect_msg(&a, y, "42", "1");
  expect_msg(&b, z, "42", "1");
  expect_nothing(&a, x);
  assert_int_equal(b.room_sends, 0);
  /* kick: local close plus the router's */
  login(&b, "x", "tablet");
  assert_int_equal(im_kick_user(a.srv, "x", IM_CLOSE_KICKED, "kicked"), 1);
  assert_int_equal(a.kicks, 1);
  im_conn_id ids[4];
  im_conn_info info = {IM_STRUCT_SIZE(im_conn_info)};
  assert_int_equal(im_user_conns(b.srv, "x", ids, 4), 1);
  assert_int_equal(im_conn_close(b.srv, ids[0], 1000, ""), IM_ECLOSED); /* already closing */
  assert_int_equal(im_conn_get_info(b.srv, ids[0], &info), 0);
  nodes_free(&a, &b);
}

static void presence_cb(im_server *s, const char *uid, const im_route *r, size_t n, int status,
                        void *arg) {
  (void)s;
  int *calls = arg;
  (*calls)++;
  assert_string_equal(uid, "bob");
  assert_int_equal(status, 0);
  assert_int_equal(n, 1);
  assert_null(r[0].node);
  assert_string_equal(r[0].device, "phone");
  assert_int_equal(r[0].transport, IM_TRANSPORT_TCP);
  assert_true(r[0].since_ms >= im_server_wall_base(s));
}

static void presence_local_and_deferred(void **st) {
  (void)st;
  node a, b;
  node_init(&a);
  node_init(&b);
  login(&a, "bob", "phone");
  int calls = 0;
  /* no router: answered before returning */
  assert_int_equal(im_presence(a.srv, "bob", presence_cb, &calls), 0);
  assert_int_equal(calls, 1);
  link_nodes(&a, &b);
  im_router r = {.presence = r_presence, .ud = &a};
  im_server_set_router(a.srv, &r);
  assert_int_equal(im_presence(a.srv, "bob", presence_cb, &calls), 0);
  assert_int_equal(calls, 1); /* the router answers later */
  pp.cb(a.srv, pp.uid, pp.local, pp.n, 0, pp.arg);
  assert_int_equal(calls, 2);
  nodes_free(&a, &b);
}

static void count_conn(im_server *s, im_conn_id c, void *arg) {
  (void)s, (void)c;
  (*(int *)arg)++;
}

/* A drain: goaway to every open connection (binary op 0c with
 * reconnect_ms and reason), visiting only authenticated ones. */
static void goaway_and_each_conn(void **st) {
  (void)st;
  node a;
  node_init(&a);
  im_conn_id x = login(&a, "x", "d"), y = login(&a, "y", "d");
  im_conn_id anon = im_server_accept(a.srv, IM_TRANSPORT_TCP, "127.0.0.1:2", NULL);
  int n = 0;
  assert_int_equal(im_server_each_conn(a.srv, count_conn, &n), 2);
  assert_int_equal(n, 2);
  assert_int_equal(im_conn_goaway(a.srv, x, 1500, "node draining"), 0);
  assert_int_equal(im_conn_goaway(a.srv, y, 0, NULL), 0);
  assert_int_equal(im_conn_goaway(a.srv, anon, 0, NULL), IM_ECLOSED);
  imp_packet got[4];
  assert_int_equal(recv_pkts(a.srv, x, got, 4), 1);
  assert_int_equal(got[0].op, IMP_OP_GOAWAY);
  assert_true(IMP_HAS(&got[0], IMP_K_RECONNECT_MS));
  assert_int_equal(got[0].num[IMP_K_RECONNECT_MS], 1500);
  assert_memory_equal(got[0].str[IMP_K_REASON].p, "node draining", 13);
  assert_int_equal(recv_pkts(a.srv, y, got, 4), 1);
  assert_int_equal(got[0].num[IMP_K_RECONNECT_MS], 0);
  assert_false(IMP_HAS(&got[0], IMP_K_REASON));
  /* the connection stays open: a message still reaches it */
  im_msg m = {.id = "1", .data = "1", .data_len = 1};
  assert_int_equal(im_send_user(a.srv, "x", &m, 0), 1);
  assert_int_equal(im_server_set_node_id(a.srv, 1024), IM_EINVAL);
  assert_int_equal(im_server_set_node_id(a.srv, 7), 0);
  char id[IM_ID_MAX];
  im_new_id(a.srv, id);
  assert_int_equal((strtoull(id, NULL, 10) >> 12) & 1023, 7); /* the node bits of the id */
  im_server_free(a.srv);
}

/* R27: room traffic to one connection is capped by max_push_rate (the
 * excess dropped and counted); stored (reliable) sends are never dropped. */
static void push_rate_caps_room_traffic(void **st) {
  (void)st;
  im_config cfg;
  im_config_init(&cfg);
  cfg.max_push_rate = 10;
  cfg.max_push_burst = 5;
  node a;
  node_init_cfg(&a, &cfg);
  im_conn_id phone = login(&a, "slow", "phone"), pc = login(&a, "busy", "pc");
  assert_int_equal(im_room_join(a.srv, phone, "r"), 0);
  assert_int_equal(im_room_join(a.srv, pc, "r"), 0);
  int reached = 0;
  for (int i = 0; i < 20; i++) {
    im_msg m = {.room = "r", .data = "1", .data_len = 1};
    reached += im_room_send(a.srv, "r", &m, 0);
  }
  assert_int_equal(reached, 10); /* the burst of 5, on each of the two */
  imp_packet got[32];
  assert_int_equal(recv_pkts(a.srv, phone, got, 32), 5);
  assert_int_equal(recv_pkts(a.srv, pc, got, 32), 5);
  im_stats stats = {IM_STRUCT_SIZE(im_stats)};
  im_server_stats(a.srv, &stats);
  assert_int_equal(stats.push_dropped, 30);
  /* stored traffic goes through all the same */
  for (int i = 0; i < 20; i++) {
    im_msg m = {.data = "2", .data_len = 1, .seq = (uint64_t)i + 1, .flags = IM_SEND_RELIABLE};
    assert_int_equal(im_send_user(a.srv, "slow", &m, 0), 1);
  }
  assert_int_equal(recv_pkts(a.srv, phone, got, 32), 20);
  /* the bucket refills at the rate: 0.3 s = 3 more */
  im_server_tick(a.srv, 1300);
  reached = 0;
  for (int i = 0; i < 10; i++) {
    im_msg m = {.room = "r", .data = "3", .data_len = 1};
    reached += im_room_send(a.srv, "r", &m, phone);
  }
  assert_int_equal(reached, 3);
  im_server_free(a.srv);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(without_router_sends_are_local),
      cmocka_unit_test(routes_follow_connections),
      cmocka_unit_test(user_send_reaches_the_other_node_once),
      cmocka_unit_test(room_send_and_kick_cross_nodes),
      cmocka_unit_test(presence_local_and_deferred),
      cmocka_unit_test(goaway_and_each_conn),
      cmocka_unit_test(push_rate_caps_room_traffic),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
