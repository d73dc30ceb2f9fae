/* Engine tests: drive im_server with plain byte arrays, as a custom event
 * loop would, and check the bytes it answers with. */
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

#include "engine_fixture.h"

/* ---- tests ----------------------------------------------------------------- */

static void test_echo_roundtrip(void **st) {
  (void)st;
  fake f;
  im_server *s = new_server(&f, NULL);
  im_conn_id c = ws_open(s, &f, "alice");
  feed_text(s, c, "{\"op\":\"msg\",\"cid\":\"c1\",\"data\":{\"t\":\"hi\"}}");
  assert_int_equal(f.msgs, 1);
  assert_string_equal(f.last_data, "{\"t\":\"hi\"}");
  uint8_t out[4096];
  size_t n = drain(s, c, out, sizeof out);
  sframe fr[4];
  assert_int_equal(parse_frames(out, n, fr, 4), 2);
  /* the echo copy was queued inside on_message, the ack after it */
  assert_non_null(memmem(fr[0].pl, fr[0].len, "\"op\":\"msg\"", 10));
  assert_non_null(memmem(fr[0].pl, fr[0].len, "\"data\":{\"t\":\"hi\"}", 17));
  assert_non_null(memmem(fr[1].pl, fr[1].len, "\"op\":\"ack\",\"cid\":\"c1\",\"id\":\"", 27));
  im_stats stt = {IM_STRUCT_SIZE(im_stats)};
  im_server_stats(s, &stt);
  assert_int_equal(stt.conns, 1);
  assert_int_equal(stt.conns_authed, 1);
  assert_int_equal(stt.msgs_in, 1);
  im_server_free(s);
}

/* A packet larger than the encoder's stack buffer (1 KiB) is framed whole:
 * a 3,000-byte data echoed back arrives byte for byte, and so does a small
 * one after it. */
static void test_large_packet_framed_whole(void **st) {
  (void)st;
  fake f;
  im_server *s = new_server(&f, NULL);
  im_conn_id c = ws_open(s, &f, "alice");
  static char in[3200], data[3003];
  data[0] = '"';
  for (int i = 1; i < 3001; i++) data[i] = (char)('a' + i % 26);
  data[3001] = '"';
  data[3002] = '\0';
  snprintf(in, sizeof in, "{\"op\":\"msg\",\"cid\":\"c1\",\"data\":%s}", data);
  feed_text(s, c, in);
  feed_text(s, c, "{\"op\":\"msg\",\"cid\":\"c2\",\"data\":\"x\"}");
  static uint8_t out[16384];
  size_t n = drain(s, c, out, sizeof out);
  sframe fr[8];
  assert_int_equal(parse_frames(out, n, fr, 8), 4); /* echo, ack, echo, ack */
  assert_true(fr[0].len > 3000);
  assert_non_null(memmem(fr[0].pl, fr[0].len, data, strlen(data)));
  assert_int_equal(((const char *)fr[0].pl)[fr[0].len - 1], '}');
  assert_non_null(memmem(fr[2].pl, fr[2].len, "\"data\":\"x\"", 10));
  im_server_free(s);
}

static void test_ping_pong_and_ws_ping(void **st) {
  (void)st;
  fake f;
  im_server *s = new_server(&f, NULL);
  im_conn_id c = ws_open(s, &f, "u");
  uint8_t out[4096];
  sframe fr[4];
  feed_text(s, c, "{\"op\":\"ping\"}");
  size_t n = drain(s, c, out, sizeof out);
  assert_int_equal(parse_frames(out, n, fr, 4), 1);
  assert_int_equal(fr[0].len, strlen("{\"op\":\"pong\"}"));
  assert_memory_equal(fr[0].pl, "{\"op\":\"pong\"}", fr[0].len);
  feed_frame(s, c, 0x9, 1, "abc", 3);
  n = drain(s, c, out, sizeof out);
  assert_int_equal(parse_frames(out, n, fr, 4), 1);
  assert_int_equal(fr[0].op, 0xa);
  assert_memory_equal(fr[0].pl, "abc", 3);
  im_server_free(s);
}

static void test_auth_required_first(void **st) {
  (void)st;
  fake f;
  im_server *s = new_server(&f, NULL);
  uint8_t out[4096];
  im_conn_id c = ws_accept(s, NULL, NULL);
  drain(s, c, out, sizeof out);
  feed_text(s, c, "{\"op\":\"msg\",\"cid\":\"x\",\"data\":1}");
  assert_int_equal(f.msgs, 0);
  size_t n = drain(s, c, out, sizeof out);
  sframe fr[2];
  assert_int_equal(parse_frames(out, n, fr, 2), 1);
  assert_non_null(memmem(fr[0].pl, fr[0].len, "\"code\":401", 10));
  feed_text(s, c, "{\"op\":\"ping\"}"); /* ping is fine before auth */
  n = drain(s, c, out, sizeof out);
  assert_non_null(memmem(out, n, "pong", 4));
  im_server_free(s);
}

static void test_bad_token_closes_4401(void **st) {
  (void)st;
  fake f;
  im_server *s = new_server(&f, NULL);
  uint8_t out[4096];
  im_conn_id c = ws_accept(s, NULL, NULL);
  drain(s, c, out, sizeof out);
  feed_text(s, c, "{\"op\":\"auth\",\"uid\":\"a\",\"token\":\"bad\"}");
  size_t n = drain(s, c, out, sizeof out);
  sframe fr[4];
  assert_int_equal(parse_frames(out, n, fr, 4), 2);
  assert_non_null(memmem(fr[0].pl, fr[0].len, "\"op\":\"error\"", 12));
  assert_non_null(memmem(fr[0].pl, fr[0].len, "\"code\":401", 10));
  assert_non_null(memmem(fr[0].pl, fr[0].len, "token rejected", 14));
  assert_int_equal(close_code_of(&fr[1]), 4401);
  assert_int_equal(f.nclosed, 1);
  assert_int_equal(f.nclose_cb, 1);
  assert_int_equal(f.on_close_codes[0], 4401);
  assert_int_equal(f.opens, 0);
  im_server_free(s);
}

static void test_query_auth(void **st) {
  (void)st;
  fake f;
  im_server *s = new_server(&f, NULL);
  uint8_t out[4096];
  im_conn_id c = ws_accept(s, "?uid=bob&token=t&device=phone&platform=ios", NULL);
  size_t n = drain(s, c, out, sizeof out);
  assert_non_null(strstr((char *)out, "HTTP/1.1 101"));
  assert_non_null(memmem(out, n, "auth_ok", 7));
  assert_string_equal(f.last_uid, "bob");
  im_conn_info info = {IM_STRUCT_SIZE(im_conn_info)};
  assert_int_equal(im_conn_get_info(s, c, &info), 0);
  assert_string_equal(info.uid, "bob");
  assert_string_equal(info.device, "phone");
  assert_string_equal(info.platform, "ios");
  /* a denied query auth gets 403 and no upgrade */
  im_conn_id d = ws_accept(s, "?uid=bob&token=bad", NULL);
  drain(s, d, out, sizeof out);
  assert_non_null(strstr((char *)out, "HTTP/1.1 403"));
  assert_null(strstr((char *)out, "101"));
  assert_true(f.closed[f.nclosed - 1] == d);
  im_server_free(s);
}

static void test_async_auth_holds_input(void **st) {
  (void)st;
  fake f;
  im_server *s = new_server(&f, NULL);
  f.auth_mode = IM_AUTH_PENDING;
  uint8_t out[4096];
  im_conn_id c = ws_accept(s, NULL, NULL);
  drain(s, c, out, sizeof out);
  /* auth and a message in one read: the message waits for the verdict */
  uint8_t buf[512];
  const char *a = "{\"op\":\"auth\",\"uid\":\"carol\",\"token\":\"t\"}";
  const char *m = "{\"op\":\"msg\",\"cid\":\"1\",\"data\":\"x\"}";
  size_t n = cframe(buf, 1, 1, a, strlen(a));
  n += cframe(buf + n, 1, 1, m, strlen(m));
  im_server_feed(s, c, buf, n);
  assert_int_equal(f.msgs, 0);
  assert_int_equal(f.opens, 0);
  assert_true(f.pending_auth == c);
  assert_int_equal(im_auth_complete(s, c, 1, 0, NULL), 0);
  assert_int_equal(f.opens, 1);
  assert_int_equal(f.msgs, 1);
  n = drain(s, c, out, sizeof out);
  assert_non_null(memmem(out, n, "auth_ok", 7));
  assert_non_null(memmem(out, n, "\"op\":\"ack\"", 10));
  assert_int_equal(im_auth_complete(s, c, 1, 0, NULL), IM_ESTATE);
  /* and a pending query auth that is refused later -> 403 */
  im_conn_id d = ws_accept(s, "?uid=z&token=t", NULL);
  assert_int_equal(im_conn_pending(s, d, (struct iovec[1]){{0}}, 1), 0);
  im_auth_complete(s, d, 0, 401, "nope");
  drain(s, d, out, sizeof out);
  assert_non_null(strstr((char *)out, "HTTP/1.1 403"));
  im_server_free(s);
}

static void test_fragmented_text_and_utf8(void **st) {
  (void)st;
  fake f;
  im_server *s = new_server(&f, NULL);
  im_conn_id c = ws_open(s, &f, "u");
  /* "é" split across fragments, and a ping in the middle */
  const char *p1 = "{\"op\":\"msg\",\"cid\":\"f\",\"data\":\"\xc3";
  const char *p2 = "\xa9\"}";
  feed_frame(s, c, 0x1, 0, p1, strlen(p1));
  feed_frame(s, c, 0x9, 1, "", 0);
  feed_frame(s, c, 0x0, 1, p2, strlen(p2));
  assert_int_equal(f.msgs, 1);
  assert_string_equal(f.last_data, "\"\xc3\xa9\"");
  uint8_t out[4096];
  size_t n = drain(s, c, out, sizeof out);
  sframe fr[4];
  assert_int_equal(parse_frames(out, n, fr, 4), 3);
  assert_int_equal(fr[0].op, 0xa);
  /* invalid UTF-8 -> 1007 */
  feed_frame(s, c, 0x1, 1, "\xc3\x28", 2);
  expect_closed_with(s, &f, c, 1007);
  im_server_free(s);
}

static void test_protocol_violations(void **st) {
  (void)st;
  struct {
    uint8_t bytes[16];
    size_t n;
    int code;
  } cases[] = {
      {{0x81, 0x00}, 2, 1002},                          /* unmasked */
      {{0xc1, 0x80, 1, 2, 3, 4}, 6, 1002},              /* RSV1 */
      {{0x83, 0x80, 1, 2, 3, 4}, 6, 1002},              /* reserved opcode */
      {{0x80, 0x80, 1, 2, 3, 4}, 6, 1002},              /* continuation first */
      {{0x09, 0x80, 1, 2, 3, 4}, 6, 1002},              /* fragmented ping */
      {{0x89, 0xfe, 0x00, 0x7e, 1, 2, 3, 4}, 8, 1002},  /* ping > 125 */
      {{0x88, 0x81, 0, 0, 0, 0, 3}, 7, 1002},           /* close with 1-byte body */
      {{0x88, 0x82, 0, 0, 0, 0, 0x03, 0xed}, 8, 1002},  /* close code 1005 */
      {{0x82, 0xff, 0, 0, 0, 0, 0, 1, 0, 1, 1, 2, 3, 4}, 14, 1009}, /* 64 KiB + 1 declared */
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    fake f;
    im_server *s = new_server(&f, NULL);
    im_conn_id other = ws_open(s, &f, "bystander");
    im_conn_id c = ws_open(s, &f, "v");
    im_server_feed(s, c, cases[i].bytes, cases[i].n);
    expect_closed_with(s, &f, c, cases[i].code);
    assert_int_equal(f.nclose_cb, 1);
    /* the other connection is untouched and still works */
    assert_int_equal(feed_text(s, other, "{\"op\":\"ping\"}"), 0);
    uint8_t out[256];
    assert_true(drain(s, other, out, sizeof out) > 0);
    im_stats stt = {IM_STRUCT_SIZE(im_stats)};
    im_server_stats(s, &stt);
    assert_int_equal(stt.conns, 1);
    assert_int_equal(stt.proto_errors, 1);
    im_server_free(s);
  }
}

static void test_oversize_fragments(void **st) {
  (void)st;
  fake f;
  im_config cfg;
  im_config_init(&cfg);
  cfg.max_message = 1000;
  im_server *s = new_server(&f, &cfg);
  im_conn_id c = ws_open(s, &f, "u");
  char big[600];
  memset(big, 'a', sizeof big);
  feed_frame(s, c, 0x2, 0, big, sizeof big);
  feed_frame(s, c, 0x0, 1, big, sizeof big);
  expect_closed_with(s, &f, c, 1009);
  im_server_free(s);
}

static void test_close_handshake(void **st) {
  (void)st;
  fake f;
  im_server *s = new_server(&f, NULL);
  im_conn_id c = ws_open(s, &f, "u");
  feed_frame(s, c, 0x8, 1, "\x03\xe8" "bye", 5);
  expect_closed_with(s, &f, c, 1000);
  assert_int_equal(f.on_close_codes[0], 1000);
  /* server-initiated: waits for the client's close */
  im_conn_id d = ws_open(s, &f, "w");
  assert_int_equal(im_conn_close(s, d, 4403, "kicked"), 0);
  uint8_t out[256];
  size_t n = drain(s, d, out, sizeof out);
  sframe fr[2];
  assert_int_equal(parse_frames(out, n, fr, 2), 1);
  assert_int_equal(close_code_of(&fr[0]), 4403);
  assert_int_equal(f.nclosed, 1);
  feed_frame(s, d, 0x8, 1, "\x11\x33", 2);
  assert_int_equal(f.nclosed, 2);
  assert_int_equal(f.on_close_codes[1], 4403);
  im_server_free(s);
}

static void test_registry_and_fanout(void **st) {
  (void)st;
  fake f;
  im_server *s = new_server(&f, NULL);
  im_conn_id a1 = ws_open(s, &f, "alice");
  im_conn_id a2 = ws_open(s, &f, "alice");
  im_conn_id b = ws_open(s, &f, "bob");
  im_conn_id ids[4];
  assert_int_equal(im_user_conns(s, "alice", ids, 4), 2);
  im_msg m = {.from = "sys", .data = "[1,2]", .data_len = 5};
  assert_int_equal(im_send_user(s, "alice", &m, a1), 1);
  assert_int_equal(im_send_user(s, "alice", &m, 0), 2);
  assert_int_equal(im_send_user(s, "nobody", &m, 0), 0);
  uint8_t out[4096];
  assert_int_equal(drain(s, a1, out, sizeof out) > 0, 1);
  size_t n = drain(s, a2, out, sizeof out);
  sframe fr[4];
  assert_int_equal(parse_frames(out, n, fr, 4), 2);
  assert_non_null(memmem(fr[0].pl, fr[0].len, "\"from\":\"sys\"", 12));
  /* rooms */
  assert_int_equal(im_room_join(s, a1, "r"), 0);
  assert_int_equal(im_room_join(s, a1, "r"), 0);
  assert_int_equal(im_room_join(s, b, "r"), 0);
  assert_int_equal(im_room_size(s, "r"), 2);
  assert_int_equal(im_room_send(s, "r", &m, b), 1);
  assert_int_equal(im_room_member(s, b, "r"), 1);
  assert_int_equal(im_room_member(s, a2, "r"), 0);
  const char *both[] = {"alice", "bob", "nobody"};
  assert_int_equal(im_send_users(s, both, 3, &m, a2), 2);
  feed_text(s, b, "{\"op\":\"leave\",\"room\":\"r\",\"cid\":\"l\"}");
  assert_int_equal(im_room_size(s, "r"), 1);
  n = drain(s, b, out, sizeof out);
  assert_non_null(memmem(out, n, "\"op\":\"ack\",\"cid\":\"l\"", 20));
  feed_text(s, b, "{\"op\":\"join\",\"room\":\"q\"}");
  assert_int_equal(im_room_size(s, "q"), 1);
  /* hang-up unregisters everywhere */
  im_server_hangup(s, a1);
  assert_int_equal(im_room_size(s, "r"), 0);
  assert_int_equal(im_user_conns(s, "alice", ids, 4), 1);
  assert_true(ids[0] == a2);
  assert_int_equal(f.on_close_codes[f.nclose_cb - 1], 1006);
  assert_int_equal(im_send_conn(s, a1, &m), IM_ENOENT);
  im_server_hangup(s, a2);
  assert_int_equal(im_user_conns(s, "alice", ids, 4), 0);
  im_stats stt = {IM_STRUCT_SIZE(im_stats)};
  im_server_stats(s, &stt);
  assert_int_equal(stt.users, 1);
  im_server_free(s);
}

static void test_output_bound_sheds(void **st) {
  (void)st;
  fake f;
  im_config cfg;
  im_config_init(&cfg);
  cfg.max_output = 4096;
  im_server *s = new_server(&f, &cfg);
  im_conn_id slow = ws_open(s, &f, "slow");
  im_conn_id fast = ws_open(s, &f, "fast");
  char data[1002];
  memset(data, 'x', sizeof data);
  data[0] = '"';
  data[sizeof data - 1] = '"';
  im_msg m = {.data = data, .data_len = sizeof data};
  int rc = 0, sent = 0;
  while ((rc = im_send_conn(s, slow, &m)) == 0) sent++;
  assert_int_equal(rc, IM_EFULL);
  assert_true(sent >= 3 && sent <= 4);
  assert_int_equal(im_send_conn(s, slow, &m), IM_ECLOSED);
  assert_int_equal(im_send_conn(s, fast, &m), 0);
  im_stats stt = {IM_STRUCT_SIZE(im_stats)};
  im_server_stats(s, &stt);
  assert_int_equal(stt.shed, 1);
  /* queued data was dropped in favour of the close frame */
  expect_closed_with(s, &f, slow, 4429);
  im_server_free(s);
}

static void test_timeouts(void **st) {
  (void)st;
  fake f;
  im_config cfg;
  im_config_init(&cfg);
  cfg.auth_timeout_ms = 1000;
  cfg.heartbeat_s = 2;
  cfg.idle_timeout_ms = 3000;
  im_server *s = new_server(&f, &cfg);
  uint64_t t = 1000000;
  im_conn_id idle = ws_accept(s, NULL, NULL); /* never authenticates */
  im_conn_id live = ws_open(s, &f, "live");
  im_conn_id quiet = ws_open(s, &f, "quiet");
  uint8_t out[512];
  drain(s, idle, out, sizeof out);
  im_server_tick(s, t + 900);
  assert_int_equal(f.nclose_cb, 0);
  im_server_tick(s, t + 1100);
  assert_int_equal(f.nclose_cb, 0); /* closing, not yet flushed */
  expect_closed_with(s, &f, idle, 4408);
  /* read-idle: `live` keeps talking, `quiet` does not */
  for (uint64_t dt = 1200; dt <= 5000; dt += 500) {
    im_server_tick(s, t + dt);
    feed_text(s, live, "{\"op\":\"ping\"}");
    drain(s, live, out, sizeof out);
  }
  expect_closed_with(s, &f, quiet, 4408);
  im_stats stt = {IM_STRUCT_SIZE(im_stats)};
  im_server_stats(s, &stt);
  assert_int_equal(stt.timeouts, 2);
  assert_int_equal(stt.conns, 1);
  im_server_free(s);
}

/* on_room returning IM_ROOM_DEFER: nothing is sent; the cid is readable
 * during the callback only; the application answers later itself. */
static char deferred_cid[32];
static int deferred_calls;

static int on_room_defer(im_server *s, im_conn_id c, const char *room, int join, void *u) {
  (void)c, (void)room, (void)u;
  deferred_calls++;
  const char *cid = im_op_cid(s);
  snprintf(deferred_cid, sizeof deferred_cid, "%s", cid ? cid : "(none)");
  return join ? IM_ROOM_DEFER : 0;
}

static void test_room_defer(void **st) {
  (void)st;
  fake f;
  memset(&f, 0, sizeof f);
  im_callbacks cb = {.on_auth = on_auth, .on_open = on_open, .on_room = on_room_defer,
                     .on_close = on_close};
  im_server *s = im_server_new(NULL, &cb, &f);
  assert_non_null(s);
  im_io io = {want_write, io_close, &f};
  im_server_set_io(s, &io);
  im_server_tick(s, 1000000);
  uint8_t out[1024];
  im_conn_id c = ws_open(s, &f, "a");
  feed_text(s, c, "{\"op\":\"join\",\"room\":\"r\",\"cid\":\"j1\"}");
  assert_int_equal(deferred_calls, 1);
  assert_string_equal(deferred_cid, "j1");
  assert_null(im_op_cid(s)); /* only during on_room */
  assert_int_equal(drain(s, c, out, sizeof out), 0);
  assert_int_equal(im_room_member(s, c, "r"), 0);
  assert_int_equal(im_room_join(s, c, "r"), 0);
  assert_int_equal(im_ack(s, c, deferred_cid, NULL, 0), 0);
  drain(s, c, out, sizeof out);
  assert_non_null(strstr((char *)out, "{\"op\":\"ack\",\"cid\":\"j1\"}"));
  feed_text(s, c, "{\"op\":\"join\",\"room\":\"q\"}");
  assert_string_equal(deferred_cid, "(none)");
  feed_text(s, c, "{\"op\":\"leave\",\"room\":\"r\",\"cid\":\"l\"}");
  drain(s, c, out, sizeof out);
  assert_non_null(strstr((char *)out, "\"cid\":\"l\""));
  assert_int_equal(im_room_member(s, c, "r"), 0);
  im_server_free(s);
}

/* im_conn_set_expiry: closed with 4410 at the deadline (not at idle), and
 * a later call moves it; 0 removes it. */
static void test_session_expiry(void **st) {
  (void)st;
  fake f;
  im_config cfg;
  im_config_init(&cfg);
  cfg.heartbeat_s = 0;
  cfg.idle_timeout_ms = 0; /* no idle timeout at all: the deadline alone */
  im_server *s = new_server(&f, &cfg);
  uint64_t t = 1000000;
  uint8_t out[512];
  im_conn_id a = ws_open(s, &f, "a"), b = ws_open(s, &f, "b"), c = ws_open(s, &f, "c");
  assert_int_equal(im_conn_set_expiry(s, a, 1500), 0);
  assert_int_equal(im_conn_set_expiry(s, b, 1500), 0);
  assert_int_equal(im_conn_set_expiry(s, b, 4000), 0); /* moved later */
  assert_int_equal(im_conn_set_expiry(s, c, 1000), 0);
  assert_int_equal(im_conn_set_expiry(s, c, 0), 0);    /* removed */
  im_server_tick(s, t + 1400);
  assert_int_equal(drain(s, a, out, sizeof out), 0);
  im_server_tick(s, t + 1600);
  expect_closed_with(s, &f, a, IM_CLOSE_EXPIRED);
  im_server_tick(s, t + 3900);
  assert_int_equal(drain(s, b, out, sizeof out), 0);
  im_server_tick(s, t + 4100);
  expect_closed_with(s, &f, b, IM_CLOSE_EXPIRED);
  im_server_tick(s, t + 50000);
  assert_int_equal(drain(s, c, out, sizeof out), 0); /* no deadline: still open */
  assert_int_equal(im_conn_set_expiry(s, 12345, 1), IM_ENOENT);
  im_server_free(s);
}

/* An auth op on an open connection is a refresh: auth_ok or an error, the
 * connection stays open either way; another uid is refused before on_auth. */
static void test_auth_refresh(void **st) {
  (void)st;
  fake f;
  im_server *s = new_server(&f, NULL);
  uint8_t out[1024];
  im_conn_id c = ws_open(s, &f, "alice");
  f.last_uid[0] = 0;
  feed_text(s, c, "{\"op\":\"auth\",\"token\":\"t2\"}");
  drain(s, c, out, sizeof out);
  assert_non_null(strstr((char *)out, "\"op\":\"auth_ok\""));
  assert_string_equal(f.last_uid, "alice"); /* defaulted to the connection's */
  assert_int_equal(f.opens, 1);              /* not opened again */
  feed_text(s, c, "{\"op\":\"auth\",\"token\":\"bad\"}");
  drain(s, c, out, sizeof out);
  assert_non_null(strstr((char *)out, "\"code\":401"));
  assert_non_null(strstr((char *)out, "token rejected"));
  f.last_uid[0] = 0;
  feed_text(s, c, "{\"op\":\"auth\",\"uid\":\"bob\",\"token\":\"t\",\"cid\":\"r\"}");
  drain(s, c, out, sizeof out);
  assert_non_null(strstr((char *)out, "\"code\":403"));
  assert_non_null(strstr((char *)out, "\"cid\":\"r\""));
  assert_string_equal(f.last_uid, ""); /* on_auth never saw it */
  /* pending: answered by im_auth_complete, still open */
  f.auth_mode = IM_AUTH_PENDING;
  feed_text(s, c, "{\"op\":\"auth\",\"token\":\"t3\"}");
  assert_int_equal(drain(s, c, out, sizeof out), 0);
  feed_text(s, c, "{\"op\":\"auth\",\"token\":\"t4\"}");
  drain(s, c, out, sizeof out);
  assert_non_null(strstr((char *)out, "already pending"));
  assert_int_equal(im_auth_complete(s, c, 0, 401, "nope"), 0);
  drain(s, c, out, sizeof out);
  assert_non_null(strstr((char *)out, "nope"));
  assert_int_equal(im_auth_complete(s, c, 1, 0, NULL), IM_ESTATE);
  feed_text(s, c, "{\"op\":\"ping\"}");
  drain(s, c, out, sizeof out);
  assert_non_null(strstr((char *)out, "pong"));
  assert_int_equal(f.nclose_cb, 0);
  im_stats stt = {IM_STRUCT_SIZE(im_stats)};
  im_server_stats(s, &stt);
  assert_int_equal(stt.conns_authed, 1);
  im_server_free(s);
}

/* max_msg_rate: a burst of 2 x rate, then 429 with the cid (on_message not
 * called); refills with time; strikes close with 4290. */
static void test_msg_rate(void **st) {
  (void)st;
  fake f;
  im_config cfg;
  im_config_init(&cfg);
  cfg.max_msg_rate = 5;
  cfg.max_rate_strikes = 3;
  im_server *s = new_server(&f, &cfg);
  uint64_t t = 1000000;
  static uint8_t out[8192];
  im_conn_id c = ws_open(s, &f, "a");
  char m[96];
  for (int i = 0; i < 12; i++) {
    snprintf(m, sizeof m, "{\"op\":\"msg\",\"cid\":\"c%d\",\"data\":1}", i);
    feed_text(s, c, m);
    if (i == 10) {
      /* 10 passed; the 11th was refused; a second later 5 more fit */
      assert_int_equal(f.msgs, 10);
      drain(s, c, out, sizeof out);
      assert_non_null(strstr((char *)out, "\"cid\":\"c10\",\"code\":429"));
      im_server_tick(s, t + 1000);
    }
  }
  assert_int_equal(f.msgs, 11);
  /* 4 more fit; then 3 more refusals make 4 strikes in 10 s: closed */
  for (int i = 0; i < 7; i++) {
    snprintf(m, sizeof m, "{\"op\":\"msg\",\"cid\":\"x%d\",\"data\":1}", i);
    feed_text(s, c, m);
    if (i == 3) drain(s, c, out, sizeof out);
  }
  assert_int_equal(f.msgs, 15);
  im_stats stt = {IM_STRUCT_SIZE(im_stats)};
  im_server_stats(s, &stt);
  assert_int_equal(stt.rate_limited, 4);
  assert_int_equal(stt.rate_closed, 1);
  expect_closed_with(s, &f, c, IM_CLOSE_RATE);
  im_server_free(s);
}

/* ---- reliable delivery ---------------------------------------------------- */

static im_msg reliable(const char *id, uint64_t seq) {
  im_msg m = {.id = id, .seq = seq, .data = "1", .data_len = 1, .flags = IM_SEND_RELIABLE};
  return m;
}

/* Drain c and return how many text frames carry "id":"<id>". */
static int frames_with_id(im_server *s, im_conn_id c, const char *id) {
  static uint8_t out[8192];
  size_t n = drain(s, c, out, sizeof out);
  sframe fr[16];
  int k = parse_frames(out, n, fr, 16), hits = 0;
  char pat[48];
  snprintf(pat, sizeof pat, "\"id\":\"%s\"", id);
  for (int i = 0; i < k; i++) hits += memmem(fr[i].pl, fr[i].len, pat, strlen(pat)) != NULL;
  return hits;
}

static void test_reliable_retransmit_then_4408(void **st) {
  (void)st;
  fake f;
  im_config cfg;
  im_config_init(&cfg);
  cfg.ack_timeout_ms = 1000;
  cfg.ack_retries = 2;
  cfg.heartbeat_s = 0; /* no idle timeout in the way */
  im_server *s = new_server(&f, &cfg);
  uint64_t t = 1000000;
  im_conn_id c = ws_open(s, &f, "bob");
  im_msg m = reliable("m1", 5);
  assert_int_equal(im_send_conn(s, c, &m), 0);
  assert_int_equal(frames_with_id(s, c, "m1"), 1);
  im_stats stt = {IM_STRUCT_SIZE(im_stats)};
  im_server_stats(s, &stt);
  assert_int_equal(stt.inflight, 1);
  im_server_tick(s, t + 900);
  assert_int_equal(frames_with_id(s, c, "m1"), 0); /* not due yet */
  im_server_tick(s, t + 1100);
  assert_int_equal(frames_with_id(s, c, "m1"), 1); /* retransmit 1: the same bytes */
  im_server_tick(s, t + 2200);
  assert_int_equal(frames_with_id(s, c, "m1"), 1); /* retransmit 2, the last */
  assert_int_equal(f.nclose_cb, 0);
  im_server_tick(s, t + 3300);
  expect_closed_with(s, &f, c, 4408);
  assert_int_equal(f.nclose_cb, 1);
  assert_int_equal(f.nundelivered, 1);
  assert_string_equal(f.undelivered[0], "m1");
  assert_int_equal(f.undelivered_seq[0], 5);
  assert_int_equal(f.undelivered_before_close, 0); /* reported before on_close */
  im_server_stats(s, &stt);
  assert_int_equal(stt.retransmits, 2);
  assert_int_equal(stt.ack_timeouts, 1);
  assert_int_equal(stt.undelivered, 1);
  assert_int_equal(stt.inflight, 0);
  im_server_free(s);
}

static void test_reliable_ack_clears(void **st) {
  (void)st;
  fake f;
  im_config cfg;
  im_config_init(&cfg);
  cfg.ack_timeout_ms = 1000;
  cfg.heartbeat_s = 0;
  im_server *s = new_server(&f, &cfg);
  im_conn_id c = ws_open(s, &f, "bob");
  im_msg m1 = reliable("m1", 7), m2 = reliable("m2", 8);
  im_send_conn(s, c, &m1);
  im_send_conn(s, c, &m2);
  frames_with_id(s, c, "m1");
  /* out of order, and an ack for an id that is not in flight (seq from the client) */
  feed_text(s, c, "{\"op\":\"ack\",\"id\":\"m2\"}");
  feed_text(s, c, "{\"op\":\"ack\",\"id\":\"m1\",\"seq\":99}");
  feed_text(s, c, "{\"op\":\"ack\",\"id\":\"other\",\"seq\":3}");
  assert_int_equal(f.nacked, 3);
  assert_string_equal(f.acked[0], "m2");
  assert_int_equal(f.acked_seq[0], 8);
  assert_int_equal(f.acked_seq[1], 7); /* the tracked seq, not the client's claim */
  assert_int_equal(f.acked_seq[2], 3);
  for (uint64_t dt = 0; dt <= 10000; dt += 500) im_server_tick(s, 1000000 + dt);
  assert_int_equal(frames_with_id(s, c, "m1") + frames_with_id(s, c, "m2"), 0);
  im_stats stt = {IM_STRUCT_SIZE(im_stats)};
  im_server_stats(s, &stt);
  assert_int_equal(stt.inflight, 0);
  assert_int_equal(stt.retransmits, 0);
  im_conn_close(s, c, 1000, "bye");
  feed_frame(s, c, 0x8, 1, "\x03\xe8", 2);
  assert_int_equal(f.nundelivered, 0);
  im_server_free(s);
}

static uint64_t fake_clock(void *ud) { return *(uint64_t *)ud; }

/* im_ack_rtt_us: from the send to the ack, by the application's clock or
 * in engine time; -1 for an ack of nothing in flight and outside on_ack. */
static void test_ack_rtt(void **st) {
  (void)st;
  fake f;
  im_server *s = new_server(&f, NULL);
  uint64_t now_us = 5000000;
  im_server_set_clock(s, fake_clock, &now_us);
  im_conn_id c = ws_open(s, &f, "bob");
  im_msg m1 = reliable("m1", 1), m2 = reliable("m2", 2);
  im_send_conn(s, c, &m1);
  now_us += 1500;
  im_send_conn(s, c, &m2);
  now_us += 250000;
  feed_text(s, c, "{\"op\":\"ack\",\"id\":\"m2\"}");
  now_us += 1000;
  feed_text(s, c, "{\"op\":\"ack\",\"id\":\"m1\"}");
  feed_text(s, c, "{\"op\":\"ack\",\"id\":\"m1\"}"); /* again: no longer in flight */
  assert_int_equal(f.nacked, 3);
  assert_int_equal(f.acked_rtt[0], 250000);
  assert_int_equal(f.acked_rtt[1], 252500);
  assert_int_equal(f.acked_rtt[2], -1);
  assert_int_equal(im_ack_rtt_us(s), -1);
  /* no clock: engine time, whole ticks */
  im_server_set_clock(s, NULL, NULL);
  im_msg m3 = reliable("m3", 3);
  im_send_conn(s, c, &m3);
  im_server_tick(s, 1000000 + 300);
  feed_text(s, c, "{\"op\":\"ack\",\"id\":\"m3\"}");
  assert_int_equal(f.acked_rtt[3], 300000);
  im_server_free(s);
}

static void test_reliable_window(void **st) {
  (void)st;
  fake f;
  im_config cfg;
  im_config_init(&cfg);
  cfg.max_inflight = 2;
  im_server *s = new_server(&f, &cfg);
  im_conn_id c = ws_open(s, &f, "bob");
  const char *ids[] = {"a", "b", "c", "d"};
  for (int i = 0; i < 4; i++) {
    im_msg m = reliable(ids[i], (uint64_t)i + 1);
    assert_int_equal(im_send_conn(s, c, &m), 0);
  }
  uint8_t out[4096];
  sframe fr[8];
  size_t n = drain(s, c, out, sizeof out);
  assert_int_equal(parse_frames(out, n, fr, 8), 2); /* a, b; c and d wait */
  feed_text(s, c, "{\"op\":\"ack\",\"id\":\"a\"}");
  assert_int_equal(frames_with_id(s, c, "c"), 1);  /* the window slides in order */
  im_stats stt = {IM_STRUCT_SIZE(im_stats)};
  im_server_stats(s, &stt);
  assert_int_equal(stt.inflight, 3);
  im_server_hangup(s, c);
  assert_int_equal(f.nundelivered, 3); /* b, c (sent) then d (waiting) */
  assert_string_equal(f.undelivered[0], "b");
  assert_string_equal(f.undelivered[1], "c");
  assert_string_equal(f.undelivered[2], "d");
  assert_int_equal(f.undelivered_seq[2], 4);
  im_server_stats(s, &stt);
  assert_int_equal(stt.inflight, 0);
  im_server_free(s);
}

static void test_dedupe_cid(void **st) {
  (void)st;
  fake f;
  im_config cfg;
  im_config_init(&cfg);
  cfg.dedupe_window = 2;
  im_server *s = new_server(&f, &cfg);
  im_conn_id c = ws_open(s, &f, "alice");
  uint8_t out[4096];
  feed_text(s, c, "{\"op\":\"msg\",\"cid\":\"c1\",\"data\":1}");
  size_t n = drain(s, c, out, sizeof out);
  char *ack = strstr((char *)out, "\"op\":\"ack\",\"cid\":\"c1\"");
  assert_non_null(ack);
  char first[128];
  snprintf(first, sizeof first, "%.*s", (int)(strchr(ack, '}') - ack), ack);
  feed_text(s, c, "{\"op\":\"msg\",\"cid\":\"c1\",\"data\":1}");
  assert_int_equal(f.msgs, 1); /* not delivered twice */
  n = drain(s, c, out, sizeof out);
  sframe fr[4];
  assert_int_equal(parse_frames(out, n, fr, 4), 1); /* only the ack, with the same id */
  assert_non_null(memmem(fr[0].pl, fr[0].len, first, strlen(first)));
  /* the window holds 2 cids: c1 is forgotten after c2, c3 */
  feed_text(s, c, "{\"op\":\"msg\",\"cid\":\"c2\",\"data\":1}");
  feed_text(s, c, "{\"op\":\"msg\",\"cid\":\"c3\",\"data\":1}");
  feed_text(s, c, "{\"op\":\"msg\",\"cid\":\"c1\",\"data\":1}");
  assert_int_equal(f.msgs, 4);
  drain(s, c, out, sizeof out);
  /* deferred and not yet acked: a retransmit is dropped silently */
  f.defer = 1;
  feed_text(s, c, "{\"op\":\"msg\",\"cid\":\"d1\",\"data\":1}");
  feed_text(s, c, "{\"op\":\"msg\",\"cid\":\"d1\",\"data\":1}");
  assert_int_equal(f.msgs, 5);
  assert_int_equal(drain(s, c, out, sizeof out), 0);
  /* the application's ack (with seq) is what later retransmits get */
  assert_int_equal(im_ack(s, c, "d1", "777", 42), 0);
  feed_text(s, c, "{\"op\":\"msg\",\"cid\":\"d1\",\"data\":1}");
  n = drain(s, c, out, sizeof out);
  assert_int_equal(parse_frames(out, n, fr, 4), 2);
  assert_memory_equal(fr[0].pl, "{\"op\":\"ack\",\"cid\":\"d1\",\"id\":\"777\",\"seq\":42}", fr[0].len);
  assert_memory_equal(fr[0].pl, fr[1].pl, fr[0].len);
  /* an error forgets the cid: the retry is processed again */
  feed_text(s, c, "{\"op\":\"msg\",\"cid\":\"e1\",\"data\":1}");
  im_reply_error(s, c, 500, "store failed", "e1");
  feed_text(s, c, "{\"op\":\"msg\",\"cid\":\"e1\",\"data\":1}");
  assert_int_equal(f.msgs, 7);
  im_stats stt = {IM_STRUCT_SIZE(im_stats)};
  im_server_stats(s, &stt);
  assert_int_equal(stt.dups, 3);
  im_server_free(s);
}

static void test_sync_ops(void **st) {
  (void)st;
  fake f;
  im_server *s = new_server(&f, NULL);
  im_conn_id c = ws_open(s, &f, "bob");
  uint8_t out[4096];
  feed_text(s, c, "{\"op\":\"sync\",\"since\":5,\"limit\":10}");
  assert_int_equal(f.syncs, 1);
  assert_int_equal(f.sync_since, 5);
  assert_int_equal(f.sync_limit, 10);
  size_t n = drain(s, c, out, sizeof out);
  sframe fr[4];
  assert_int_equal(parse_frames(out, n, fr, 4), 1);
  const char *want = "{\"op\":\"sync_end\",\"last\":9,\"more\":true}";
  assert_int_equal(fr[0].len, strlen(want));
  assert_memory_equal(fr[0].pl, want, fr[0].len);
  /* auth carrying since: auth_ok, then the sync in the same round trip */
  im_conn_id d = ws_accept(s, NULL, NULL);
  drain(s, d, out, sizeof out);
  feed_text(s, d, "{\"op\":\"auth\",\"uid\":\"bob\",\"token\":\"t\",\"since\":12}");
  assert_int_equal(f.syncs, 2);
  assert_int_equal(f.sync_since, 12);
  n = drain(s, d, out, sizeof out);
  assert_int_equal(parse_frames(out, n, fr, 4), 2);
  assert_non_null(memmem(fr[0].pl, fr[0].len, "auth_ok", 7));
  assert_non_null(memmem(fr[1].pl, fr[1].len, "\"last\":16", 9));
  im_server_free(s);
  /* an application without on_sync answers 501 */
  memset(&f, 0, sizeof f);
  im_callbacks cb = {.on_message = on_message};
  s = im_server_new(NULL, &cb, &f);
  im_io io = {want_write, io_close, &f};
  im_server_set_io(s, &io);
  c = im_server_accept(s, IM_TRANSPORT_TCP, "127.0.0.1:1", NULL);
  uint8_t in[] = {0, 0, 0, 7, 0x01, 0x01, 1, 'u', 0x02, 1, 't', 0, 0, 0, 1, 0x05};
  im_server_feed(s, c, in, sizeof in);
  n = drain(s, c, out, sizeof out);
  assert_non_null(memmem(out, n, "\x10\x02\x01\xf5", 4)); /* code 501 */
  im_server_free(s);
}

static void test_tcp_binary(void **st) {
  (void)st;
  fake f;
  im_server *s = new_server(&f, NULL);
  im_conn_id c = im_server_accept(s, IM_TRANSPORT_TCP, "127.0.0.1:1", NULL);
  /* auth: op 1, uid "u", token "t"; pipelined with a ping; fed byte by byte */
  uint8_t in[] = {0, 0, 0, 7, 0x01, 0x01, 1, 'u', 0x02, 1, 't', 0, 0, 0, 1, 0x07};
  for (size_t i = 0; i < sizeof in; i++) im_server_feed(s, c, &in[i], 1);
  assert_int_equal(f.opens, 1);
  uint8_t out[512];
  size_t n = drain(s, c, out, sizeof out);
  /* auth_ok frame then pong frame {0,0,0,1,8} */
  assert_int_equal(out[4], 0x02);
  uint32_t l0 = (uint32_t)out[0] << 24 | (uint32_t)out[1] << 16 | (uint32_t)out[2] << 8 | out[3];
  assert_int_equal(n, 4 + l0 + 5);
  assert_memory_equal(out + 4 + l0, "\x00\x00\x00\x01\x08", 5);
  /* oversize frame: refused from the header alone */
  uint8_t big[] = {0x7f, 0xff, 0xff, 0xff, 0x03};
  im_server_feed(s, c, big, sizeof big);
  n = drain(s, c, out, sizeof out);
  assert_int_equal(out[4], 0x0b); /* error op */
  assert_true(f.closed[f.nclosed - 1] == c);
  assert_int_equal(f.on_close_codes[0], 1009);
  im_server_free(s);
}

static void test_handshake_errors(void **st) {
  (void)st;
  fake f;
  im_server *s = new_server(&f, NULL);
  uint8_t out[1024];
  const char *req = "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n";
  im_conn_id c = im_server_accept(s, IM_TRANSPORT_WS, "p", NULL);
  im_server_feed(s, c, (void *)req, strlen(req));
  drain(s, c, out, sizeof out);
  assert_non_null(strstr((char *)out, "HTTP/1.1 426"));
  assert_non_null(strstr((char *)out, "Sec-WebSocket-Version: 13"));
  const char *plain = "GET /ws HTTP/1.1\r\nHost: x\r\n\r\n";
  c = im_server_accept(s, IM_TRANSPORT_WS, "p", NULL);
  im_server_feed(s, c, (void *)plain, strlen(plain));
  drain(s, c, out, sizeof out);
  assert_non_null(strstr((char *)out, "HTTP/1.1 400"));
  /* subprotocol imp.bin makes replies binary */
  c = ws_accept(s, NULL, "Sec-WebSocket-Protocol: imp.bin\r\n");
  size_t n = drain(s, c, out, sizeof out);
  assert_non_null(memmem(out, n, "Sec-WebSocket-Protocol: imp.bin", 31));
  im_conn_info info = {IM_STRUCT_SIZE(im_conn_info)};
  im_conn_get_info(s, c, &info);
  assert_int_equal(info.binary, 1);
  assert_int_equal(f.nclosed, 2);
  im_server_free(s);
}

static void test_bad_json_keeps_connection(void **st) {
  (void)st;
  fake f;
  im_server *s = new_server(&f, NULL);
  im_conn_id c = ws_open(s, &f, "u");
  uint8_t out[1024];
  const char *bad[] = {"{", "[]", "{\"op\":\"nope\"}", "{\"op\":\"msg\",\"data\":1}",
                       "{\"op\":\"msg\",\"cid\":\"x\"}", "{\"op\":\"join\"}"};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    assert_int_equal(feed_text(s, c, bad[i]), 0);
    size_t n = drain(s, c, out, sizeof out);
    assert_non_null(memmem(out, n, "\"code\":400", 10));
  }
  assert_int_equal(f.nclosed, 0);
  assert_int_equal(f.msgs, 0);
  im_server_free(s);
}


/* ---- allocation failure: fail the i-th allocation for every i ------------ */

typedef struct failalloc {
  long n, fail_at;
  long live;
} failalloc;

static void *fa_malloc(size_t n, void *ud) {
  failalloc *fa = ud;
  if (++fa->n == fa->fail_at) return NULL;
  void *p = malloc(n);
  if (p) fa->live++;
  return p;
}
static void *fa_calloc(size_t n, size_t m, void *ud) {
  failalloc *fa = ud;
  if (++fa->n == fa->fail_at) return NULL;
  void *p = calloc(n, m);
  if (p) fa->live++;
  return p;
}
static void *fa_realloc(void *p, size_t n, void *ud) {
  failalloc *fa = ud;
  if (++fa->n == fa->fail_at) return NULL;
  void *q = realloc(p, n);
  if (q && !p) fa->live++;
  return q;
}
static void fa_free(void *p, void *ud) {
  failalloc *fa = ud;
  if (p) fa->live--;
  free(p);
}

/* A whole session: handshake, auth, fragmented msg, room, fan-out, close.
 * Every step may fail; none may crash or leak. Returns true if it ran
 * without hitting the injected failure. */
static bool failmalloc_scenario(failalloc *fa) {
  im_allocator al = {fa_malloc, fa_calloc, fa_realloc, fa_free, fa};
  im_config cfg;
  im_config_init(&cfg);
  cfg.alloc = &al;
  fake f;
  memset(&f, 0, sizeof f);
  im_callbacks cb = {.on_message = on_message, .on_close = on_close};
  im_server *s = im_server_new(&cfg, &cb, &f);
  if (!s) return false;
  im_io io = {want_write, io_close, &f};
  im_server_set_io(s, &io);
  im_server_tick(s, 5000);
  uint8_t out[8192];
  char req[512];
  snprintf(req, sizeof req, UPGRADE, "?uid=a&token=t", "");
  im_conn_id c = im_server_accept(s, IM_TRANSPORT_WS, "p", NULL);
  im_conn_id t = im_server_accept(s, IM_TRANSPORT_TCP, "p", NULL);
  if (c) {
    im_server_feed(s, c, req, strlen(req));
    drain(s, c, out, sizeof out);
    const char *p1 = "{\"op\":\"msg\",\"cid\":\"1\",";
    const char *p2 = "\"data\":[1,2,3]}";
    feed_frame(s, c, 0x1, 0, p1, strlen(p1));
    feed_frame(s, c, 0x0, 1, p2, strlen(p2));
    feed_text(s, c, "{\"op\":\"join\",\"room\":\"r\",\"cid\":\"j\"}");
    im_msg m = {.from = "x", .data = "{}", .data_len = 2};
    im_room_send(s, "r", &m, 0);
    im_send_user(s, "a", &m, 0);
    drain(s, c, out, sizeof out);
    im_conn_close(s, c, 1000, "bye");
    drain(s, c, out, sizeof out);
  }
  if (t) {
    uint8_t in[] = {0, 0, 0, 7, 0x01, 0x01, 1, 'b', 0x02, 1, 't', 0, 0};
    im_server_feed(s, t, in, sizeof in);
    drain(s, t, out, sizeof out);
  }
  im_server_tick(s, 100000);
  im_server_free(s);
  assert_int_equal(fa->live, 0);
  return fa->fail_at > fa->n;
}

static void test_allocation_failures(void **st) {
  (void)st;
  long i = 1;
  for (;; i++) {
    failalloc fa = {0, i, 0};
    if (failmalloc_scenario(&fa)) break;
    assert_true(i < 10000);
  }
  print_message("allocation failure injected at each of %ld allocations\n", i - 1);
  assert_true(i > 20); /* the scenario really allocates */
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_echo_roundtrip),
      cmocka_unit_test(test_large_packet_framed_whole),
      cmocka_unit_test(test_ping_pong_and_ws_ping),
      cmocka_unit_test(test_auth_required_first),
      cmocka_unit_test(test_bad_token_closes_4401),
      cmocka_unit_test(test_query_auth),
      cmocka_unit_test(test_async_auth_holds_input),
      cmocka_unit_test(test_fragmented_text_and_utf8),
      cmocka_unit_test(test_protocol_violations),
      cmocka_unit_test(test_oversize_fragments),
      cmocka_unit_test(test_close_handshake),
      cmocka_unit_test(test_registry_and_fanout),
      cmocka_unit_test(test_output_bound_sheds),
      cmocka_unit_test(test_timeouts),
    cmocka_unit_test(test_session_expiry),
    cmocka_unit_test(test_room_defer),
    cmocka_unit_test(test_auth_refresh),
    cmocka_unit_test(test_msg_rate),
      cmocka_unit_test(test_reliable_retransmit_then_4408),
      cmocka_unit_test(test_reliable_ack_clears),
      cmocka_unit_test(test_ack_rtt),
      cmocka_unit_test(test_reliable_window),
      cmocka_unit_test(test_dedupe_cid),
      cmocka_unit_test(test_sync_ops),
      cmocka_unit_test(test_tcp_binary),
      cmocka_unit_test(test_handshake_errors),
      cmocka_unit_test(test_bad_json_keeps_connection),
      cmocka_unit_test(test_allocation_failures),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
