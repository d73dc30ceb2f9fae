/* Engine limits: rooms per connection, input before authentication,
 * connections per uid, and the registry's order when connections of one
 * uid come and go. Driven with byte arrays like tests/unit/test_server.c
 * (their fake driver: engine_fixture.h). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libim/im.h>
#include <libim/im_guard.h>
#include <libim/im_shared.h>

#include "engine_fixture.h"

/* ---- tests ----------------------------------------------------------------- */

/* Error frames of c's pending output that carry code and reason. */
static int errors_with(im_server *s, im_conn_id c, int code, const char *reason) {
  static uint8_t out[70000];
  size_t n = drain(s, c, out, sizeof out);
  sframe fr[256];
  int k = parse_frames(out, n, fr, 256), hits = 0;
  char want[64];
  snprintf(want, sizeof want, "\"code\":%d", code);
  for (int i = 0; i < k; i++)
    if (fr[i].op == 1 && memmem(fr[i].pl, fr[i].len, "\"op\":\"error\"", 12) &&
        memmem(fr[i].pl, fr[i].len, want, strlen(want)) &&
        memmem(fr[i].pl, fr[i].len, reason, strlen(reason)))
      hits++;
  return hits;
}

static void test_max_rooms(void **st) {
  (void)st;
  fake f;
  im_config cfg;
  im_config_init(&cfg);
  assert_int_equal(cfg.max_rooms, 64);
  cfg.max_rooms = 3;
  im_server *s = new_server(&f, &cfg);
  im_conn_id c = ws_open(s, &f, "alice");
  char op[128];
  for (int i = 0; i < 3; i++) {
    snprintf(op, sizeof op, "{\"op\":\"join\",\"room\":\"r%d\",\"cid\":\"j%d\"}", i, i);
    assert_int_equal(feed_text(s, c, op), 0);
  }
  assert_int_equal(errors_with(s, c, 429, "too many rooms"), 0);
  /* the fourth room is refused over IMP and through the API; the
   * connection stays open and keeps its three rooms */
  assert_int_equal(feed_text(s, c, "{\"op\":\"join\",\"room\":\"r3\",\"cid\":\"j3\"}"), 0);
  assert_int_equal(errors_with(s, c, 429, "too many rooms"), 1);
  assert_int_equal(im_room_join(s, c, "r3"), IM_ELIMIT);
  assert_int_equal(im_room_size(s, "r3"), 0);
  /* joining a room it is already in is not a new room */
  assert_int_equal(im_room_join(s, c, "r1"), 0);
  assert_int_equal(f.nclosed, 0);
  im_stats stt = {IM_STRUCT_SIZE(im_stats)};
  im_server_stats(s, &stt);
  assert_int_equal(stt.rooms, 3);
  /* leaving makes room again */
  assert_int_equal(im_room_leave(s, c, "r0"), 0);
  assert_int_equal(im_room_join(s, c, "r3"), 0);
  assert_int_equal(im_room_size(s, "r3"), 1);
  im_server_free(s);

  /* 0: unlimited */
  cfg.max_rooms = 0;
  s = new_server(&f, &cfg);
  c = ws_open(s, &f, "bob");
  for (int i = 0; i < 200; i++) {
    snprintf(op, sizeof op, "room-%d", i);
    assert_int_equal(im_room_join(s, c, op), 0);
  }
  im_server_stats(s, &stt);
  assert_int_equal(stt.rooms, 200);
  im_server_free(s);
}

static void test_preauth_input_limit(void **st) {
  (void)st;
  fake f;
  im_config cfg;
  im_config_init(&cfg);
  assert_int_equal(cfg.max_preauth_input, 8192);
  cfg.max_preauth_input = 256;
  im_server *s = new_server(&f, &cfg);
  static uint8_t out[70000];
  char big[300];
  memset(big, 'x', sizeof big);

  /* WebSocket, upgraded, not authenticated: a 300-byte frame is refused
   * from its header (1009), though max_message would allow it */
  im_conn_id c = ws_accept(s, NULL, NULL);
  drain(s, c, out, sizeof out);
  uint8_t hdr[] = {0x81, 0x80 | 126, 0x01, 0x2c, 1, 2, 3, 4}; /* text, masked, 300 bytes */
  im_server_feed(s, c, hdr, sizeof hdr);
  expect_closed_with(s, &f, c, 1009);

  /* the same frame after authentication is fine */
  c = ws_open(s, &f, "alice");
  char msg[400];
  snprintf(msg, sizeof msg, "{\"op\":\"msg\",\"cid\":\"c\",\"data\":\"%.*s\"}", 250, big);
  assert_int_equal(feed_text(s, c, msg), 0);
  assert_int_equal(f.msgs, 1);

  /* fragments add up: 200 + 200 bytes before auth */
  c = ws_accept(s, NULL, NULL);
  drain(s, c, out, sizeof out);
  feed_frame(s, c, 0x1, 0, big, 200);
  feed_frame(s, c, 0x0, 1, big, 200);
  expect_closed_with(s, &f, c, 1009);

  /* TCP: a length prefix over the limit before auth: error op, then closed */
  c = im_server_accept(s, IM_TRANSPORT_TCP, "127.0.0.1:2", NULL);
  uint8_t tcp[] = {0, 0, 0x01, 0x2c, 0x03};
  im_server_feed(s, c, tcp, sizeof tcp);
  size_t n = drain(s, c, out, sizeof out);
  assert_true(n > 5 && out[4] == 0x0b);
  assert_non_null(memmem(out, n, "before authentication", 21));
  assert_true(f.closed[f.nclosed - 1] == c);
  assert_int_equal(f.on_close_codes[f.nclose_cb - 1], 1009);

  /* an upgrade request longer than the limit: 431 */
  char hdrs[400];
  snprintf(hdrs, sizeof hdrs, "X-Pad: %.*s\r\n", 280, big);
  c = ws_accept(s, NULL, hdrs);
  n = drain(s, c, out, sizeof out);
  assert_non_null(strstr((char *)out, "HTTP/1.1 431"));
  assert_true(f.closed[f.nclosed - 1] == c);
  /* ... fed in small pieces too */
  char req[1024];
  snprintf(req, sizeof req,
           "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n%s\r\n",
           hdrs);
  c = im_server_accept(s, IM_TRANSPORT_WS, "127.0.0.1:3", NULL);
  for (size_t i = 0; i < strlen(req); i += 7) {
    size_t k = strlen(req) - i < 7 ? strlen(req) - i : 7;
    if (im_server_feed(s, c, req + i, k) != 0) break;
  }
  n = drain(s, c, out, sizeof out);
  assert_non_null(strstr((char *)out, "HTTP/1.1 431"));

  /* input held while an auth is pending is bounded by the limit too */
  f.auth_mode = IM_AUTH_PENDING;
  c = ws_accept(s, NULL, NULL);
  drain(s, c, out, sizeof out);
  feed_text(s, c, "{\"op\":\"auth\",\"uid\":\"p\",\"token\":\"t\"}");
  assert_true(f.pending_auth == c);
  assert_int_equal(feed_frame(s, c, 0x1, 1, big, 150), 0);
  feed_frame(s, c, 0x1, 1, big, 150);
  drain(s, c, out, sizeof out);
  assert_true(f.closed[f.nclosed - 1] == c);
  assert_int_equal(f.on_close_codes[f.nclose_cb - 1], 1009);
  im_server_free(s);
}

static void test_max_conns_per_user(void **st) {
  (void)st;
  fake f;
  im_config cfg;
  im_config_init(&cfg);
  assert_int_equal(cfg.max_conns_per_user, 32);
  cfg.max_conns_per_user = 2;
  im_server *s = new_server(&f, &cfg);
  static uint8_t out[4096];
  im_conn_id a1 = ws_open(s, &f, "alice");
  im_conn_id a2 = ws_open(s, &f, "alice");
  im_conn_id b = ws_open(s, &f, "bob");
  (void)b;
  /* the third alice is refused: error 429, then close 1008 */
  im_conn_id a3 = ws_accept(s, NULL, NULL);
  drain(s, a3, out, sizeof out);
  int opens = f.opens;
  feed_text(s, a3, "{\"op\":\"auth\",\"uid\":\"alice\",\"token\":\"t\"}");
  assert_int_equal(f.opens, opens);
  assert_int_equal(errors_with(s, a3, 429, "too many connections for this user"), 1);
  assert_true(f.closed[f.nclosed - 1] == a3);
  assert_int_equal(f.on_close_codes[f.nclose_cb - 1], 1008);
  /* through the upgrade query: HTTP 403 with the reason */
  im_conn_id a4 = ws_accept(s, "?uid=alice&token=t", NULL);
  size_t n = drain(s, a4, out, sizeof out);
  assert_true(n > 0);
  assert_non_null(strstr((char *)out, "HTTP/1.1 403"));
  assert_non_null(strstr((char *)out, "too many connections for this user"));
  /* the two open ones are untouched */
  im_conn_id ids[4];
  assert_int_equal(im_user_conns(s, "alice", ids, 4), 2);
  im_stats stt = {IM_STRUCT_SIZE(im_stats)};
  im_server_stats(s, &stt);
  assert_int_equal(stt.conns_authed, 3);
  assert_int_equal(stt.auth_failures, 2);
  /* one gone: a new one fits */
  im_server_hangup(s, a1);
  im_conn_id a5 = ws_open(s, &f, "alice");
  assert_int_equal(im_user_conns(s, "alice", ids, 4), 2);
  (void)a2, (void)a5;
  im_server_free(s);
}

/* Three connections of one uid; the newest hangs up, then the middle one:
 * the registry and a send to the uid must reach exactly the oldest (the
 * unlinking of a list head and of an inner node). Then the same with the
 * other orders. */
static void registry_keeps_one(int first, int second) {
  fake f;
  im_server *s = new_server(&f, NULL);
  im_conn_id c[3];
  for (int i = 0; i < 3; i++) c[i] = ws_open(s, &f, "u");
  im_conn_id other = ws_open(s, &f, "v");
  im_conn_id ids[4];
  assert_int_equal(im_user_conns(s, "u", ids, 4), 3);
  assert_int_equal(im_server_hangup(s, c[first]), 0);
  assert_int_equal(im_user_conns(s, "u", ids, 4), 2);
  assert_int_equal(im_server_hangup(s, c[second]), 0);
  int keep = 3 - first - second;
  memset(ids, 0, sizeof ids);
  assert_int_equal(im_user_conns(s, "u", ids, 4), 1);
  assert_true(ids[0] == c[keep]);
  im_msg m = {.from = "sys", .data = "\"hi\"", .data_len = 4};
  assert_int_equal(im_send_user(s, "u", &m, 0), 1);
  assert_int_equal(im_send_user(s, "u", &m, c[keep]), 0);
  const char *uids[] = {"u", "v"};
  assert_int_equal(im_send_users(s, uids, 2, &m, 0), 2);
  static uint8_t out[4096];
  size_t n = drain(s, c[keep], out, sizeof out);
  sframe fr[4];
  assert_int_equal(parse_frames(out, n, fr, 4), 2);
  for (int i = 0; i < 2; i++) assert_non_null(memmem(fr[i].pl, fr[i].len, "\"hi\"", 4));
  n = drain(s, other, out, sizeof out);
  assert_int_equal(parse_frames(out, n, fr, 4), 1);
  assert_int_equal(im_send_conn(s, c[first], &m), IM_ENOENT);
  assert_int_equal(im_send_conn(s, c[second], &m), IM_ENOENT);
  im_stats stt = {IM_STRUCT_SIZE(im_stats)};
  im_server_stats(s, &stt);
  assert_int_equal(stt.users, 2);
  assert_int_equal(stt.conns_authed, 2);
  /* the last one leaves: the uid is gone */
  im_server_hangup(s, c[keep]);
  assert_int_equal(im_user_conns(s, "u", ids, 4), 0);
  assert_int_equal(im_send_user(s, "u", &m, 0), 0);
  im_server_stats(s, &stt);
  assert_int_equal(stt.users, 1);
  im_server_free(s);
}

static void test_registry_newest_then_middle(void **st) {
  (void)st;
  registry_keeps_one(2, 1); /* the brief's order: the oldest stays */
  registry_keeps_one(1, 2);
  registry_keeps_one(0, 1);
  registry_keeps_one(0, 2);
  registry_keeps_one(1, 0);
  registry_keeps_one(2, 0);
}

/* Two engines attached to one im_shared (as the members of an im_group
 * are): max_connections, max_conns_per_user, max_user_msg_rate and the
 * guard count both together. */
static void test_shared_between_engines(void **st) {
  (void)st;
  fake f1, f2;
  im_config cfg;
  im_config_init(&cfg);
  cfg.max_conns_per_user = 2;
  cfg.max_connections = 4;
  cfg.max_user_msg_rate = 5; /* a burst of 10 */
  im_server *s1 = new_server(&f1, &cfg), *s2 = new_server(&f2, &cfg);
  im_shared *sh = im_shared_new();
  assert_non_null(sh);
  assert_int_equal(im_server_set_shared(s1, sh), 0);
  assert_int_equal(im_server_set_shared(s2, sh), 0);
  im_conn_id a1 = ws_open(s1, &f1, "alice"), a2 = ws_open(s2, &f2, "alice");
  assert_int_equal(im_shared_user_conns(sh, "alice"), 2);
  assert_int_equal(im_shared_conns(sh), 2);
  /* a third alice on either engine: refused */
  static uint8_t out[4096];
  im_conn_id a3 = ws_accept(s1, NULL, NULL);
  drain(s1, a3, out, sizeof out);
  feed_text(s1, a3, "{\"op\":\"auth\",\"uid\":\"alice\",\"token\":\"t\"}");
  assert_int_equal(errors_with(s1, a3, 429, "too many connections for this user"), 1);
  assert_int_equal(im_shared_user_conns(sh, "alice"), 2);
  /* max_connections: 4 in all (a3 is closed) */
  ws_open(s2, &f2, "bob");
  ws_open(s1, &f1, "carol");
  assert_int_equal(im_shared_conns(sh), 4);
  assert_int_equal(im_shared_authed(sh), 4); /* alice twice, bob, carol */
  assert_int_equal(im_server_accept(s2, IM_TRANSPORT_TCP, "10.0.0.9:1", NULL), 0);
  assert_int_equal(im_server_accept(s1, IM_TRANSPORT_TCP, "10.0.0.9:1", NULL), 0);
  /* one uid's msgs on both engines draw on one bucket of 10 */
  char op[96];
  for (int i = 0; i < 16; i++) {
    snprintf(op, sizeof op, "{\"op\":\"msg\",\"cid\":\"m%d\",\"to\":\"bob\",\"data\":1}", i);
    feed_text(i % 2 ? s2 : s1, i % 2 ? a2 : a1, op);
  }
  assert_int_equal(f1.msgs + f2.msgs, 10);
  /* an attached engine with connections cannot change its im_shared */
  assert_int_equal(im_server_set_shared(s1, NULL), IM_ESTATE);
  /* one alice goes: a new one fits on the other engine */
  im_server_hangup(s2, a2);
  assert_int_equal(im_shared_user_conns(sh, "alice"), 1);
  assert_int_equal(im_shared_authed(sh), 3);
  ws_open(s1, &f1, "alice");
  /* a ban through one engine refuses on the other */
  im_server_hangup(s1, a1);
  assert_int_equal(im_guard_ban(s1, "10.1.0.0/16", 0), 0);
  assert_int_equal(im_server_accept(s2, IM_TRANSPORT_TCP, "10.1.2.3:4", NULL), 0);
  assert_true(im_server_accept(s2, IM_TRANSPORT_TCP, "10.2.2.3:4", NULL) != 0);
  im_guard_stats gs;
  im_guard_get_stats(s2, &gs);
  assert_int_equal(gs.refused_banned, 1);
  im_shared_release(sh); /* the servers keep it until they are freed */
  im_server_free(s1);
  assert_int_equal(im_shared_conns(sh), 3 - 1); /* s2's: bob and the 10.2.2.3 one */
  im_server_free(s2);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_max_rooms),
      cmocka_unit_test(test_preauth_input_limit),
      cmocka_unit_test(test_max_conns_per_user),
      cmocka_unit_test(test_registry_newest_then_middle),
      cmocka_unit_test(test_shared_between_engines),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
