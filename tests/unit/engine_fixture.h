/* The fake driver of the engine tests (test_server.c, test_limits.c): an
 * im_server driven with byte arrays, as a custom event loop would, with
 * helpers to speak WebSocket to it and read what it answers. Static
 * functions: each test file includes this once. */
#ifndef TESTS_ENGINE_FIXTURE_H
#define TESTS_ENGINE_FIXTURE_H

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

typedef struct fake {
  im_conn_id closed[64];
  int nclosed;
  int want_writes;
  im_conn_id on_close_ids[64];
  int on_close_codes[64];
  int nclose_cb;
  int opens;
  int auth_mode;          /* IM_AUTH_* to return from on_auth */
  im_conn_id pending_auth;
  char last_uid[64];
  char last_data[256];
  int msgs;
  int defer;              /* on_message returns IM_MSG_DEFER without acking */
  char acked[8][24];      /* on_ack ids and seqs */
  uint64_t acked_seq[8];
  int64_t acked_rtt[8];   /* im_ack_rtt_us during on_ack */
  int nacked;
  char undelivered[8][24];
  uint64_t undelivered_seq[8];
  int nundelivered;
  int undelivered_before_close; /* on_close count when the last on_undelivered ran */
  uint64_t sync_since;
  uint32_t sync_limit;
  int syncs;
} fake;

static void want_write(im_server *s, im_conn_id c, void *ctx, void *u) {
  (void)s, (void)c, (void)ctx;
  ((fake *)u)->want_writes++;
}

static void io_close(im_server *s, im_conn_id c, void *ctx, void *u) {
  (void)s, (void)ctx;
  fake *f = u;
  f->closed[f->nclosed++] = c;
}

static int on_auth(im_server *s, im_conn_id c, im_auth *a, void *u) {
  (void)s;
  fake *f = u;
  snprintf(f->last_uid, sizeof f->last_uid, "%s", a->uid);
  if (f->auth_mode == IM_AUTH_PENDING) f->pending_auth = c;
  if (f->auth_mode == IM_AUTH_ACCEPT && strcmp(a->token, "bad") == 0) {
    a->reason = "token rejected";
    return IM_AUTH_DENY;
  }
  return f->auth_mode;
}

static void on_open(im_server *s, im_conn_id c, void *u) {
  (void)s, (void)c;
  ((fake *)u)->opens++;
}

static int on_message(im_server *s, im_conn_id c, const im_msg *m, void *u) {
  fake *f = u;
  f->msgs++;
  snprintf(f->last_data, sizeof f->last_data, "%.*s", (int)m->data_len, m->data);
  if (f->defer) return IM_MSG_DEFER;
  im_msg echo = {.data = m->data, .data_len = m->data_len};
  im_send_conn(s, c, &echo);
  return IM_MSG_ACK;
}

static void on_ack(im_server *s, im_conn_id c, const char *id, uint64_t seq, void *u) {
  (void)c;
  fake *f = u;
  snprintf(f->acked[f->nacked % 8], 24, "%s", id);
  f->acked_rtt[f->nacked % 8] = im_ack_rtt_us(s);
  f->acked_seq[f->nacked++ % 8] = seq;
}

static void on_undelivered(im_server *s, im_conn_id c, const char *id, uint64_t seq, void *u) {
  (void)s, (void)c;
  fake *f = u;
  snprintf(f->undelivered[f->nundelivered % 8], 24, "%s", id);
  f->undelivered_seq[f->nundelivered++ % 8] = seq;
  f->undelivered_before_close = f->nclose_cb;
}

/* Answer every sync with sync_end(since + 4, more, no gap). */
static void on_sync(im_server *s, im_conn_id c, uint64_t since, uint32_t limit, void *u) {
  fake *f = u;
  f->syncs++;
  f->sync_since = since;
  f->sync_limit = limit;
  assert_int_equal(im_sync_end(s, c, since + 4, 1, 0), 0);
}

static void on_close(im_server *s, im_conn_id c, int code, void *u) {
  (void)s;
  fake *f = u;
  f->on_close_ids[f->nclose_cb] = c;
  f->on_close_codes[f->nclose_cb++] = code;
}

static im_server *new_server(fake *f, im_config *cfg) {
  memset(f, 0, sizeof *f);
  im_callbacks cb = {.on_auth = on_auth, .on_open = on_open, .on_message = on_message,
                     .on_ack = on_ack, .on_undelivered = on_undelivered, .on_sync = on_sync,
                     .on_close = on_close};
  im_server *s = im_server_new(cfg, &cb, f);
  assert_non_null(s);
  im_io io = {want_write, io_close, f};
  im_server_set_io(s, &io);
  im_server_tick(s, 1000000);
  return s;
}

/* Take all pending output of c into out (NUL-terminated); returns length. */
static size_t drain(im_server *s, im_conn_id c, uint8_t *out, size_t cap) {
  struct iovec iov[16];
  size_t total = 0;
  int n;
  while ((n = im_conn_pending(s, c, iov, 16)) > 0) {
    size_t k = 0;
    for (int i = 0; i < n; i++) {
      assert_true(total + iov[i].iov_len < cap);
      memcpy(out + total, iov[i].iov_base, iov[i].iov_len);
      total += iov[i].iov_len;
      k += iov[i].iov_len;
    }
    im_conn_sent(s, c, k);
  }
  out[total] = 0;
  return total;
}

/* A masked client frame. */
static size_t cframe(uint8_t *out, int op, int fin, const void *pl, size_t n) {
  static const uint8_t mask[4] = {0x37, 0xfa, 0x21, 0x3d};
  size_t h = 0;
  out[h++] = (uint8_t)((fin ? 0x80 : 0) | op);
  if (n < 126) {
    out[h++] = (uint8_t)(0x80 | n);
  } else if (n < 65536) {
    out[h++] = 0x80 | 126;
    out[h++] = (uint8_t)(n >> 8);
    out[h++] = (uint8_t)n;
  } else {
    out[h++] = 0x80 | 127;
    for (int i = 7; i >= 0; i--) out[h++] = (uint8_t)((uint64_t)n >> (8 * i));
  }
  memcpy(out + h, mask, 4);
  h += 4;
  for (size_t i = 0; i < n; i++) out[h + i] = ((const uint8_t *)pl)[i] ^ mask[i % 4];
  return h + n;
}

static int feed_frame(im_server *s, im_conn_id c, int op, int fin, const char *pl, size_t n) {
  static uint8_t buf[70000];
  size_t len = cframe(buf, op, fin, pl, n);
  return im_server_feed(s, c, buf, len);
}

static int feed_text(im_server *s, im_conn_id c, const char *text) {
  return feed_frame(s, c, 0x1, 1, text, strlen(text));
}

typedef struct sframe {
  int op, fin;
  const uint8_t *pl;
  size_t len;
} sframe;

/* Parse server frames from buf; returns the number parsed. */
static int parse_frames(const uint8_t *b, size_t n, sframe *out, int max) {
  int k = 0;
  size_t off = 0;
  while (off + 2 <= n && k < max) {
    size_t len = b[off + 1] & 0x7f, h = 2;
    assert_int_equal(b[off + 1] & 0x80, 0); /* servers never mask */
    if (len == 126) {
      len = (size_t)b[off + 2] << 8 | b[off + 3];
      h = 4;
    } else if (len == 127) {
      len = 0;
      for (int i = 0; i < 8; i++) len = len << 8 | b[off + 2 + i];
      h = 10;
    }
    out[k].op = b[off] & 0x0f;
    out[k].fin = b[off] >> 7;
    out[k].pl = b + off + h;
    out[k].len = len;
    k++;
    off += h + len;
  }
  assert_int_equal(off, n);
  return k;
}

static const char *UPGRADE =
    "GET /ws%s HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n%s\r\n";

static im_conn_id ws_accept(im_server *s, const char *query, const char *extra) {
  char req[1024];
  snprintf(req, sizeof req, UPGRADE, query ? query : "", extra ? extra : "");
  im_conn_id c = im_server_accept(s, IM_TRANSPORT_WS, "127.0.0.1:5000", NULL);
  assert_true(c != 0);
  im_server_feed(s, c, req, strlen(req));
  return c;
}

/* Upgrade + auth op; returns the id with all output drained. */
static im_conn_id ws_open(im_server *s, fake *f, const char *uid) {
  static uint8_t out[4096];
  im_conn_id c = ws_accept(s, NULL, NULL);
  drain(s, c, out, sizeof out);
  assert_non_null(strstr((char *)out, "HTTP/1.1 101"));
  assert_non_null(strstr((char *)out, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
  char auth[256];
  snprintf(auth, sizeof auth, "{\"op\":\"auth\",\"uid\":\"%s\",\"token\":\"t\",\"device\":\"d\"}", uid);
  int opens = f->opens;
  feed_text(s, c, auth);
  assert_int_equal(f->opens, opens + 1);
  size_t n = drain(s, c, out, sizeof out);
  sframe fr[4];
  assert_int_equal(parse_frames(out, n, fr, 4), 1);
  assert_int_equal(fr[0].op, 1);
  assert_true(fr[0].len > 0 && memmem(fr[0].pl, fr[0].len, "\"op\":\"auth_ok\"", 14));
  assert_non_null(memmem(fr[0].pl, fr[0].len, "\"hb\":", 5));
  return c;
}

static int close_code_of(const sframe *fr) {
  assert_int_equal(fr->op, 8);
  assert_true(fr->len >= 2);
  return fr->pl[0] << 8 | fr->pl[1];
}

/* Expect exactly: [optional text frames] then a close frame with code; the
 * transport is then closed by the engine. Returns nothing. */
static inline void expect_closed_with(im_server *s, fake *f, im_conn_id c, int code) {
  static uint8_t out[70000];
  size_t n = drain(s, c, out, sizeof out);
  sframe fr[8];
  int k = parse_frames(out, n, fr, 8);
  assert_true(k >= 1);
  assert_int_equal(close_code_of(&fr[k - 1]), code);
  assert_true(f->nclosed >= 1);
  assert_true(f->closed[f->nclosed - 1] == c);
}

#endif
