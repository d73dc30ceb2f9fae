/* The client core (lib/client) driven by hand with byte arrays: a fake
 * driver records the hooks, the "server" is the test writing frames. One
 * test runs the libevent driver (lib/client/client_event.c) against a real
 * listening socket. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <event2/event.h>
#include <libim/im_client_event.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "client/client.h"
#include "proto/ws_frame.h"
#include "proto/ws_handshake.h"

#define MAX_PKTS 64

typedef struct fake {
  im_client *cl;
  /* hooks */
  int connects, closes, fetches;
  im_client_addr addr;
  char host[64], path[64];
  char fetch_url[256];
  /* callbacks */
  int msgs, acks, errors, close_calls;
  char msg_data[16][64];
  uint64_t msg_seq[16];
  char ack_cid[16][IM_CLIENT_CID_MAX];
  unsigned close_code;
  /* what the client wrote */
  uint8_t out[1 << 16];
  size_t out_len;
  uint32_t masks[MAX_PKTS];
  int nmasks;
  uint32_t rnd;
} fake;

static uint32_t fake_rand(void *u) {
  fake *f = u;
  f->rnd = f->rnd * 1103515245u + 12345u;
  return f->rnd;
}

static int h_connect(im_client *cl, const im_client_addr *a, void *u) {
  (void)cl;
  fake *f = u;
  f->connects++;
  f->addr = *a;
  snprintf(f->host, sizeof f->host, "%s", a->host);
  snprintf(f->path, sizeof f->path, "%s", a->path);
  return 0;
}
static void h_want_write(im_client *cl, void *u) {
  (void)cl;
  (void)u;
}
static void h_close(im_client *cl, void *u) {
  fake *f = u;
  f->closes++;
  /* what is still queued (a close frame) goes out first */
  struct iovec iov[2];
  int n = im_client_pending(cl, iov, 2);
  for (int i = 0; i < n; i++) {
    memcpy(f->out + f->out_len, iov[i].iov_base, iov[i].iov_len);
    f->out_len += iov[i].iov_len;
    im_client_sent(cl, iov[i].iov_len);
  }
}
static void h_fetch(im_client *cl, const char *url, const char *key, void *u) {
  (void)cl;
  (void)key;
  fake *f = u;
  f->fetches++;
  snprintf(f->fetch_url, sizeof f->fetch_url, "%s", url);
}

static void c_message(im_client *cl, const im_client_msg *m, void *u) {
  (void)cl;
  fake *f = u;
  snprintf(f->msg_data[f->msgs % 16], 64, "%s", m->data);
  f->msg_seq[f->msgs % 16] = m->seq;
  f->msgs++;
}
static void c_ack(im_client *cl, const char *cid, const char *id, uint64_t seq, void *u) {
  (void)cl;
  (void)id;
  (void)seq;
  fake *f = u;
  snprintf(f->ack_cid[f->acks % 16], IM_CLIENT_CID_MAX, "%s", cid);
  f->acks++;
}
static void c_error(im_client *cl, unsigned code, const char *r, const char *cid, void *u) {
  (void)cl;
  (void)code;
  (void)r;
  (void)cid;
  ((fake *)u)->errors++;
}
static void c_close(im_client *cl, unsigned code, const char *r, void *u) {
  (void)cl;
  (void)r;
  fake *f = u;
  f->close_calls++;
  f->close_code = code;
}

static fake *mk(const char *const *urls, size_t n, void (*tune)(im_client_config *)) {
  fake *f = calloc(1, sizeof *f);
  im_client_config cfg;
  im_client_config_init(&cfg);
  cfg.uid = "bob";
  cfg.token = "t0k3n";
  cfg.device = "d1";
  cfg.urls = urls;
  cfg.n_urls = n;
  cfg.rand = fake_rand;
  cfg.rand_user = f;
  if (tune)
    tune(&cfg);
  im_client_callbacks cb = {
      .on_message = c_message, .on_ack = c_ack, .on_error = c_error, .on_close = c_close};
  f->cl = im_client_new(&cfg, &cb, f);
  assert_non_null(f->cl);
  im_client_io io = {h_connect, h_want_write, h_close, h_fetch};
  im_client_set_io(f->cl, &io, f);
  return f;
}

static void drop(fake *f) {
  im_client_free(f->cl);
  free(f);
}

/* Move the client's output into f->out. */
static void drain(fake *f) {
  struct iovec iov[2];
  int n;
  while ((n = im_client_pending(f->cl, iov, 2)) > 0) {
    memcpy(f->out + f->out_len, iov[0].iov_base, iov[0].iov_len);
    f->out_len += iov[0].iov_len;
    im_client_sent(f->cl, iov[0].iov_len);
  }
}

/* Client WebSocket frames in f->out (after any HTTP head): each must be
 * masked; writes the unmasked payloads, NUL-separated, into pk[]. */
static int ws_packets(fake *f, char pk[][512], int max) {
  drain(f);
  size_t off = 0;
  if (f->out_len > 4 && memcmp(f->out, "GET ", 4) == 0) {
    char *e = strstr((char *)f->out, "\r\n\r\n");
    assert_non_null(e);
    off = (size_t)(e + 4 - (char *)f->out);
  }
  int k = 0;
  f->nmasks = 0;
  while (off < f->out_len && k < max) {
    ws_frame_hdr h;
    int hl = ws_frame_parse_header(f->out + off, f->out_len - off, true, &h);
    assert_true(hl > 0); /* masked (require_mask) and well-formed */
    assert_true(h.len < 512);
    uint8_t tmp[512];
    memcpy(tmp, f->out + off + hl, (size_t)h.len);
    ws_unmask(tmp, (size_t)h.len, h.mask, 0);
    f->masks[f->nmasks++] = h.mask;
    if (h.opcode == WS_OP_CLOSE)
      snprintf(pk[k], 512, "CLOSE %u", (unsigned)(tmp[0] << 8 | tmp[1]));
    else
      snprintf(pk[k], 512, "%.*s", (int)h.len, (char *)tmp);
    k++;
    off += (size_t)hl + (size_t)h.len;
  }
  f->out_len = 0;
  return k;
}

/* Exactly one packet was sent, and it is `want`. */
static void expect_sent(fake *f, const char *want) {
  char pk[4][512];
  assert_int_equal(ws_packets(f, pk, 4), 1);
  assert_string_equal(pk[0], want);
}

/* A server text frame (unmasked). */
static void feed_json(fake *f, const char *json) {
  uint8_t b[1024];
  size_t n = strlen(json);
  size_t h = ws_frame_encode_header(b, WS_OP_TEXT, true, n);
  memcpy(b + h, json, n);
  assert_int_equal(im_client_feed(f->cl, b, h + n), 0);
}

/* A sync answer: msgs a..b (id "m<seq>", data <seq>), then sync_end with
 * last b, more false, and `extra` members. */
static void sync_answer(fake *f, unsigned a, unsigned b, const char *extra) {
  char j[160];
  for (unsigned s = a; s <= b; s++) {
    snprintf(j, sizeof j, "{\"op\":\"msg\",\"id\":\"m%u\",\"seq\":%u,\"data\":%u}", s, s, s);
    feed_json(f, j);
  }
  snprintf(j, sizeof j, "{\"op\":\"sync_end\",\"last\":%u,\"more\":false%s}", b, extra);
  feed_json(f, j);
}

/* Answer the upgrade request in f->out as a correct server would. */
static void accept_upgrade(fake *f) {
  drain(f);
  f->out[f->out_len] = 0;
  const char *k = strstr((char *)f->out, "Sec-WebSocket-Key: ");
  assert_non_null(k);
  k += 19;
  char accept[29];
  assert_int_equal(ws_hs_accept_key(k, 24, accept), 0);
  char resp[256];
  int n = snprintf(resp, sizeof resp,
                   "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                   "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n"
                   "Sec-WebSocket-Protocol: imp.json\r\n\r\n",
                   accept);
  f->out_len = 0;
  assert_int_equal(im_client_feed(f->cl, resp, (size_t)n), 0);
}

static const char *const WS1[] = {"ws://127.0.0.1:8080/ws"};

/* start, connect, upgrade, auth_ok and the (empty) sync answer */
static fake *open_client(const char *const *urls, size_t n, void (*tune)(im_client_config *)) {
  fake *f = mk(urls, n, tune);
  assert_int_equal(im_client_start(f->cl, 1000), 0);
  assert_int_equal(f->connects, 1);
  assert_int_equal(im_client_connected(f->cl), 0);
  accept_upgrade(f);
  assert_int_equal(im_client_state(f->cl), IM_CLIENT_AUTHENTICATING);
  feed_json(f, "{\"op\":\"auth_ok\",\"conn\":\"c1\",\"hb\":10}");
  feed_json(f, "{\"op\":\"sync_end\",\"last\":0,\"more\":false}");
  assert_int_equal(im_client_state(f->cl), IM_CLIENT_OPEN);
  char pk[8][512];
  ws_packets(f, pk, 8);
  return f;
}

/* The connection drops and the next one comes up at `now`: upgrade, auth,
 * auth_ok (conn id `conn`). What was sent before auth_ok is discarded. */
static void reconnect(fake *f, uint64_t now, const char *conn) {
  char pk[8][512], ok[96];
  im_client_disconnected(f->cl);
  im_client_tick(f->cl, now);
  im_client_connected(f->cl);
  accept_upgrade(f);
  ws_packets(f, pk, 8);
  snprintf(ok, sizeof ok, "{\"op\":\"auth_ok\",\"conn\":\"%s\",\"hb\":10}", conn);
  feed_json(f, ok);
}

/* ---- tests ------------------------------------------------------------------ */

static void test_handshake_accept_verified(void **state) {
  (void)state;
  fake *f = mk(WS1, 1, NULL);
  assert_int_equal(im_client_start(f->cl, 1000), 0);
  assert_int_equal(im_client_state(f->cl), IM_CLIENT_CONNECTING);
  assert_string_equal(f->host, "127.0.0.1");
  assert_int_equal(f->addr.port, 8080);
  assert_string_equal(f->path, "/ws");
  assert_int_equal(im_client_connected(f->cl), 0);
  drain(f);
  f->out[f->out_len] = 0;
  const char *req = (const char *)f->out;
  assert_non_null(strstr(req, "GET /ws HTTP/1.1\r\n"));
  assert_non_null(strstr(req, "Host: 127.0.0.1:8080\r\n"));
  assert_non_null(strstr(req, "Sec-WebSocket-Version: 13\r\n"));
  assert_non_null(strstr(req, "Sec-WebSocket-Protocol: imp.json\r\n"));
  /* the key is base64 of 16 bytes drawn from the random source */
  const char *k = strstr(req, "Sec-WebSocket-Key: ");
  assert_non_null(k);
  fake g = {0};
  uint8_t nonce[16];
  for (int i = 0; i < 16; i += 4) {
    uint32_t r = fake_rand(&g);
    memcpy(nonce + i, &r, 4);
  }
  /* the client drew 2 numbers for its cid prefix first */
  g.rnd = 0;
  fake_rand(&g);
  fake_rand(&g);
  for (int i = 0; i < 16; i += 4) {
    uint32_t r = fake_rand(&g);
    memcpy(nonce + i, &r, 4);
  }
  char want_key[25];
  ws_hs_client_key(nonce, want_key);
  assert_memory_equal(k + 19, want_key, 24);

  /* a wrong Sec-WebSocket-Accept fails the connection */
  const char *bad = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                    "Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
  f->out_len = 0;
  assert_int_equal(im_client_feed(f->cl, bad, strlen(bad)), IM_EPROTO);
  assert_int_equal(f->closes, 1);
  assert_int_equal(f->close_calls, 1);
  assert_int_equal(im_client_state(f->cl), IM_CLIENT_WAITING);
  drop(f);

  /* the RFC 6455 sample: key dGhlIHNhbXBsZSBub25jZQ== */
  ws_hs_reply r;
  static const char good[] = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                             "Connection: Upgrade\r\nSec-WebSocket-Accept: "
                             "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x81\x00";
  /* the head's length; the frame behind it is left for the caller */
  assert_int_equal(ws_hs_client_response(good, sizeof good - 1, "dGhlIHNhbXBsZSBub25jZQ==", &r),
                   (long)sizeof good - 3);
  assert_int_equal(ws_hs_client_response(good, 40, "dGhlIHNhbXBsZSBub25jZQ==", &r), WS_HS_MORE);
  const char *refused = "HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n";
  assert_int_equal(ws_hs_client_response(refused, strlen(refused), "dGhlIHNhbXBsZSBub25jZQ==", &r),
                   WS_HS_FAIL);
  assert_int_equal(r.http_status, 403);
}

static void test_every_frame_masked(void **state) {
  (void)state;
  fake *f = mk(WS1, 1, NULL);
  im_client_start(f->cl, 1000);
  im_client_connected(f->cl);
  accept_upgrade(f);
  char pk[8][512];
  assert_int_equal(ws_packets(f, pk, 8), 1);
  assert_string_equal(pk[0], "{\"op\":\"auth\",\"uid\":\"bob\",\"token\":\"t0k3n\",\"device\":\"d1\","
                             "\"since\":0}");
  feed_json(f, "{\"op\":\"auth_ok\",\"conn\":\"c1\",\"hb\":10}");
  feed_json(f, "{\"op\":\"sync_end\",\"last\":0,\"more\":false}");
  for (int i = 0; i < 3; i++)
    assert_int_equal(im_client_send(f->cl, IM_CLIENT_TO_USER, "al", "1", 1, NULL), 0);
  assert_int_equal(ws_packets(f, pk, 8), 3);
  /* a fresh mask per frame */
  assert_true(f->masks[0] != f->masks[1] && f->masks[1] != f->masks[2]);
  assert_non_null(strstr(pk[0], "\"to\":\"al\",\"data\":1}"));
  /* a server ping is answered by a masked pong with its payload */
  uint8_t ping[] = {0x89, 0x02, 'h', 'i'};
  assert_int_equal(im_client_feed(f->cl, ping, sizeof ping), 0);
  drain(f);
  ws_frame_hdr h;
  assert_int_equal(ws_frame_parse_header(f->out, f->out_len, true, &h), 6);
  assert_int_equal(h.opcode, WS_OP_PONG);
  ws_unmask(f->out + 6, 2, h.mask, 0);
  assert_memory_equal(f->out + 6, "hi", 2);
  f->out_len = 0;
  /* a masked server frame is a protocol error */
  uint8_t masked[] = {0x81, 0x81, 1, 2, 3, 4, 'x' ^ 1};
  assert_int_equal(im_client_feed(f->cl, masked, sizeof masked), IM_EPROTO);
  assert_int_equal(f->close_code, 1002);
  drop(f);
}

static void test_ack_and_dedupe(void **state) {
  (void)state;
  fake *f = open_client(WS1, 1, NULL);
  char pk[8][512];
  feed_json(f, "{\"op\":\"msg\",\"id\":\"m1\",\"from\":\"al\",\"seq\":1,\"data\":{\"t\":\"a\"}}");
  assert_int_equal(f->msgs, 1);
  assert_string_equal(f->msg_data[0], "{\"t\":\"a\"}");
  expect_sent(f, "{\"op\":\"ack\",\"id\":\"m1\",\"seq\":1}");
  /* the retransmission: ACKed again, not shown */
  feed_json(f, "{\"op\":\"msg\",\"id\":\"m1\",\"from\":\"al\",\"seq\":1,\"data\":{\"t\":\"a\"}}");
  assert_int_equal(f->msgs, 1);
  expect_sent(f, "{\"op\":\"ack\",\"id\":\"m1\",\"seq\":1}");
  /* a room message (no seq): by id */
  feed_json(f, "{\"op\":\"msg\",\"id\":\"r1\",\"room\":\"x\",\"data\":2}");
  feed_json(f, "{\"op\":\"msg\",\"id\":\"r1\",\"room\":\"x\",\"data\":2}");
  assert_int_equal(f->msgs, 2);
  assert_int_equal(ws_packets(f, pk, 8), 2);
  assert_string_equal(pk[1], "{\"op\":\"ack\",\"id\":\"r1\"}");
  /* a jump (seq 3 after 1): not shown, not ACKed; a sync from 1 instead */
  feed_json(f, "{\"op\":\"msg\",\"id\":\"m3\",\"seq\":3,\"data\":3}");
  assert_int_equal(f->msgs, 2);
  expect_sent(f, "{\"op\":\"sync\",\"since\":1}");
  sync_answer(f, 2, 3, "");
  assert_int_equal(f->msgs, 4);
  assert_int_equal(f->msg_seq[2], 2);
  assert_int_equal(f->msg_seq[3], 3);
  assert_int_equal(im_client_contiguous(f->cl), 3);
  /* our own message's seq (from its ack) counts as received */
  char cid[IM_CLIENT_CID_MAX];
  assert_int_equal(im_client_send(f->cl, IM_CLIENT_TO_USER, "al", "{}", 2, cid), 0);
  char ack[160];
  snprintf(ack, sizeof ack, "{\"op\":\"ack\",\"cid\":\"%s\",\"id\":\"m4\",\"seq\":4}", cid);
  feed_json(f, ack);
  assert_int_equal(f->acks, 1);
  assert_int_equal(im_client_contiguous(f->cl), 4);
  assert_int_equal(im_client_outbox_count(f->cl), 0);
  drop(f);
}

static void test_outbox_resent_after_reconnect(void **state) {
  (void)state;
  fake *f = open_client(WS1, 1, NULL);
  char pk[8][512], c1[IM_CLIENT_CID_MAX], c2[IM_CLIENT_CID_MAX];
  assert_int_equal(im_client_send(f->cl, IM_CLIENT_TO_USER, "al", "\"one\"", 5, c1), 0);
  assert_int_equal(im_client_send(f->cl, IM_CLIENT_TO_USER, "al", "\"two\"", 5, c2), 0);
  assert_string_not_equal(c1, c2);
  assert_int_equal(ws_packets(f, pk, 8), 2);
  /* the connection dies before any ack */
  assert_int_equal(im_client_disconnected(f->cl), 0);
  assert_int_equal(f->close_code, 1006);
  assert_int_equal(im_client_state(f->cl), IM_CLIENT_WAITING);
  /* messages queued while offline wait for the next auth_ok */
  assert_int_equal(im_client_send(f->cl, IM_CLIENT_TO_USER, "al", "\"three\"", 7, NULL), 0);
  assert_int_equal(ws_packets(f, pk, 8), 0);
  long t = im_client_timeout(f->cl, 1000);
  assert_true(t >= 0 && t <= 500); /* first retry within backoff_base */
  im_client_tick(f->cl, 1000 + (uint64_t)t);
  assert_int_equal(f->connects, 2);
  im_client_connected(f->cl);
  accept_upgrade(f);
  assert_int_equal(ws_packets(f, pk, 8), 1); /* auth, since 0 */
  feed_json(f, "{\"op\":\"auth_ok\",\"conn\":\"c2\",\"hb\":10}");
  assert_int_equal(ws_packets(f, pk, 8), 3);
  char want[160];
  snprintf(want, sizeof want, "{\"op\":\"msg\",\"cid\":\"%s\",\"to\":\"al\",\"data\":\"one\"}", c1);
  assert_string_equal(pk[0], want);
  snprintf(want, sizeof want, "{\"op\":\"msg\",\"cid\":\"%s\",\"to\":\"al\",\"data\":\"two\"}", c2);
  assert_string_equal(pk[1], want);
  assert_non_null(strstr(pk[2], "\"three\""));
  /* one ack, another drop: only the unacked two are resent */
  char ack[160];
  snprintf(ack, sizeof ack, "{\"op\":\"ack\",\"cid\":\"%s\",\"id\":\"x1\"}", c1);
  feed_json(f, ack);
  assert_int_equal(f->acks, 1);
  assert_string_equal(f->ack_cid[0], c1);
  reconnect(f, 100000, "c3");
  assert_int_equal(ws_packets(f, pk, 8), 2);
  assert_non_null(strstr(pk[0], c2));
  /* a 5xx keeps it for a later resend; a 4xx gives up on it */
  snprintf(ack, sizeof ack, "{\"op\":\"error\",\"code\":500,\"reason\":\"store failed\",\"cid\":\"%s\"}",
           c2);
  feed_json(f, ack);
  assert_int_equal(im_client_outbox_count(f->cl), 2);
  im_client_tick(f->cl, 100000 + 1000);
  assert_int_equal(ws_packets(f, pk, 8), 1);
  assert_non_null(strstr(pk[0], c2));
  snprintf(ack, sizeof ack, "{\"op\":\"error\",\"code\":403,\"reason\":\"no\",\"cid\":\"%s\"}", c2);
  feed_json(f, ack);
  assert_int_equal(im_client_outbox_count(f->cl), 1);
  drop(f);
}

static void no_room_acks(im_client_config *cfg) { cfg->no_room_acks = true; }

/* no_room_acks: a room message is shown (once) and not ACKed; stored
 * messages still are. */
static void test_room_messages_not_acked_when_asked(void **state) {
  (void)state;
  fake *f = open_client(WS1, 1, no_room_acks);
  char pk[8][512];
  feed_json(f, "{\"op\":\"msg\",\"id\":\"r1\",\"room\":\"x\",\"data\":2}");
  feed_json(f, "{\"op\":\"msg\",\"id\":\"r1\",\"room\":\"x\",\"data\":2}");
  assert_int_equal(f->msgs, 1);
  assert_int_equal(ws_packets(f, pk, 8), 0);
  feed_json(f, "{\"op\":\"msg\",\"id\":\"m1\",\"from\":\"al\",\"seq\":1,\"data\":1}");
  assert_int_equal(f->msgs, 2);
  expect_sent(f, "{\"op\":\"ack\",\"id\":\"m1\",\"seq\":1}");
  drop(f);
}

static void test_rooms_joined_again_after_reconnect(void **state) {
  (void)state;
  fake *f = mk(WS1, 1, NULL);
  char pk[8][512];
  /* joined before the connection is up: sent after auth_ok */
  assert_int_equal(im_client_join(f->cl, "lobby"), 0);
  assert_int_equal(im_client_join(f->cl, ""), IM_EINVAL);
  assert_int_equal(im_client_join(f->cl, NULL), IM_EINVAL);
  char long_room[130];
  memset(long_room, 'r', 129);
  long_room[129] = '\0';
  assert_int_equal(im_client_join(f->cl, long_room), IM_EINVAL);
  assert_int_equal(im_client_start(f->cl, 1000), 0);
  im_client_connected(f->cl);
  accept_upgrade(f);
  assert_int_equal(ws_packets(f, pk, 8), 1); /* auth only */
  feed_json(f, "{\"op\":\"auth_ok\",\"conn\":\"c1\",\"hb\":10}");
  expect_sent(f, "{\"op\":\"join\",\"room\":\"lobby\"}");
  feed_json(f, "{\"op\":\"sync_end\",\"last\":0,\"more\":false}");
  /* joined while open: sent at once; a second join of the same room is not */
  assert_int_equal(im_client_join(f->cl, "news"), 0);
  expect_sent(f, "{\"op\":\"join\",\"room\":\"news\"}");
  assert_int_equal(im_client_join(f->cl, "news"), 0);
  assert_int_equal(ws_packets(f, pk, 8), 0);
  /* a room message arrives with its room */
  feed_json(f, "{\"op\":\"msg\",\"id\":\"r1\",\"room\":\"news\",\"data\":{\"t\":1}}");
  assert_int_equal(f->msgs, 1);
  assert_string_equal(f->msg_data[0], "{\"t\":1}");
  ws_packets(f, pk, 8); /* its ack */
  /* the connection dies: both rooms are joined again on the next one */
  reconnect(f, 100000, "c2");
  assert_int_equal(ws_packets(f, pk, 8), 2);
  assert_string_equal(pk[0], "{\"op\":\"join\",\"room\":\"lobby\"}");
  assert_string_equal(pk[1], "{\"op\":\"join\",\"room\":\"news\"}");
  /* a room left is not joined again */
  assert_int_equal(im_client_leave(f->cl, "lobby"), 0);
  expect_sent(f, "{\"op\":\"leave\",\"room\":\"lobby\"}");
  assert_int_equal(im_client_leave(f->cl, "lobby"), IM_ENOENT);
  reconnect(f, 200000, "c3");
  expect_sent(f, "{\"op\":\"join\",\"room\":\"news\"}");
  drop(f);
}

/* The libevent driver with a source address: the server sees the
 * connection come from it. A real listening socket on 127.0.0.1. */
static void test_event_source_address(void **state) {
  (void)state;
  int lfd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t alen = sizeof a;
  assert_int_equal(bind(lfd, (struct sockaddr *)&a, sizeof a), 0);
  assert_int_equal(listen(lfd, 4), 0);
  assert_int_equal(getsockname(lfd, (struct sockaddr *)&a, &alen), 0);
  char url[64];
  snprintf(url, sizeof url, "ws://127.0.0.1:%u/ws", (unsigned)ntohs(a.sin_port));
  const char *urls[] = {url};
  fake *f = mk(urls, 1, NULL);
  struct event_base *base = event_base_new();
  im_client_event *ev = im_client_event_new(base, f->cl);
  assert_non_null(ev);
  assert_int_equal(im_client_event_set_source(ev, "not-an-address"), IM_EADDR);
  assert_int_equal(im_client_event_set_source(ev, "127.0.0.2"), 0);
  assert_int_equal(im_client_event_start(ev), 0);
  /* the connect is non-blocking: run the loop until the client has sent
   * its upgrade request, then accept */
  for (int i = 0; i < 100 && im_client_state(f->cl) != IM_CLIENT_HANDSHAKE; i++)
    event_base_loop(base, EVLOOP_ONCE | EVLOOP_NONBLOCK);
  assert_int_equal(im_client_state(f->cl), IM_CLIENT_HANDSHAKE);
  struct sockaddr_in peer;
  socklen_t plen = sizeof peer;
  int cfd = accept(lfd, (struct sockaddr *)&peer, &plen);
  assert_true(cfd >= 0);
  char ip[INET_ADDRSTRLEN];
  inet_ntop(AF_INET, &peer.sin_addr, ip, sizeof ip);
  assert_string_equal(ip, "127.0.0.2");
  char req[512];
  ssize_t n = recv(cfd, req, sizeof req - 1, 0);
  assert_true(n > 4);
  assert_memory_equal(req, "GET /ws", 7);
  close(cfd);
  close(lfd);
  im_client_stop(f->cl);
  im_client_event_free(ev);
  event_base_free(base);
  drop(f);
}

static void outbox_small(im_client_config *c) {
  c->outbox_max = 2;
}

static void test_outbox_bounded(void **state) {
  (void)state;
  fake *f = mk(WS1, 1, outbox_small);
  assert_int_equal(im_client_send(f->cl, IM_CLIENT_TO_USER, "al", "1", 1, NULL), 0);
  assert_int_equal(im_client_send(f->cl, IM_CLIENT_TO_USER, "al", "2", 1, NULL), 0);
  assert_int_equal(im_client_send(f->cl, IM_CLIENT_TO_USER, "al", "3", 1, NULL), IM_EFULL);
  assert_int_equal(im_client_send(f->cl, IM_CLIENT_TO_USER, "al", "{", 1, NULL), IM_EINVAL);
  assert_int_equal(im_client_send(f->cl, IM_CLIENT_TO_USER, "", "1", 1, NULL), IM_EINVAL);
  drop(f);
}

static void limit_2(im_client_config *c) {
  c->sync_limit = 2;
  c->since = 5;
}

static void test_sync_paging(void **state) {
  (void)state;
  fake *f = mk(WS1, 1, limit_2);
  char pk[8][512];
  im_client_start(f->cl, 0);
  im_client_connected(f->cl);
  accept_upgrade(f);
  assert_int_equal(ws_packets(f, pk, 8), 1);
  assert_non_null(strstr(pk[0], "\"since\":5}"));
  feed_json(f, "{\"op\":\"auth_ok\",\"conn\":\"c1\",\"hb\":10}");
  assert_int_equal(im_client_state(f->cl), IM_CLIENT_SYNCING);
  feed_json(f, "{\"op\":\"msg\",\"id\":\"a\",\"seq\":6,\"data\":6}");
  feed_json(f, "{\"op\":\"msg\",\"id\":\"b\",\"seq\":7,\"data\":7}");
  feed_json(f, "{\"op\":\"sync_end\",\"last\":7,\"more\":true}");
  assert_int_equal(ws_packets(f, pk, 8), 3);
  assert_string_equal(pk[2], "{\"op\":\"sync\",\"since\":7,\"limit\":2}");
  assert_int_equal(im_client_state(f->cl), IM_CLIENT_SYNCING);
  feed_json(f, "{\"op\":\"msg\",\"id\":\"c\",\"seq\":8,\"data\":8}");
  feed_json(f, "{\"op\":\"sync_end\",\"last\":8,\"more\":false}");
  assert_int_equal(im_client_state(f->cl), IM_CLIENT_OPEN);
  assert_int_equal(f->msgs, 3);
  assert_int_equal(im_client_contiguous(f->cl), 8);
  /* gap: retention removed 9..11, the answer starts at 12 */
  feed_json(f, "{\"op\":\"msg\",\"id\":\"e\",\"seq\":13,\"data\":13}");
  assert_int_equal(ws_packets(f, pk, 8), 2);
  assert_string_equal(pk[1], "{\"op\":\"sync\",\"since\":8,\"limit\":2}");
  sync_answer(f, 12, 13, ",\"gap\":true");
  assert_int_equal(im_client_contiguous(f->cl), 11);
  expect_sent(f, "{\"op\":\"sync\",\"since\":11,\"limit\":2}");
  sync_answer(f, 12, 13, "");
  assert_int_equal(f->msgs, 5);
  assert_int_equal(f->msg_seq[3], 12);
  assert_int_equal(f->msg_seq[4], 13);
  drop(f);
}

static void test_backoff_bounds(void **state) {
  (void)state;
  for (unsigned a = 0; a < 40; a++) {
    uint64_t top = a >= 6 ? 30000 : (uint64_t)500 << a;
    if (top > 30000)
      top = 30000;
    assert_int_equal(client_backoff_ms(500, 30000, a, 0), 0);
    assert_int_equal(client_backoff_ms(500, 30000, a, UINT32_MAX), top);
    assert_true(client_backoff_ms(500, 30000, a, 0x80000000u) <= top / 2 + 1);
  }
  /* the client's own delays stay inside the bound and grow until the cap */
  const char *const two[] = {"ws://127.0.0.1:1/ws", "tcp://127.0.0.1:2"};
  fake *f = mk(two, 2, NULL);
  uint64_t now = 0;
  im_client_start(f->cl, now);
  for (unsigned a = 0; a < 10; a++) {
    /* failed attempts rotate through the list */
    assert_int_equal(f->addr.port, a % 2 ? 2 : 1);
    assert_int_equal(f->addr.transport, a % 2 ? IM_TRANSPORT_TCP : IM_TRANSPORT_WS);
    im_client_disconnected(f->cl);
    long t = im_client_timeout(f->cl, now);
    uint64_t top = (uint64_t)500 << a;
    assert_true(t >= 0 && (uint64_t)t <= (top > 30000 ? 30000 : top));
    now += (uint64_t)t;
    im_client_tick(f->cl, now);
    assert_int_equal(f->connects, (int)a + 2);
  }
  drop(f);
}

/* A server that accepts and drops at once: the delays still grow; a
 * connection that stayed up long enough starts them over. */
static void test_backoff_after_flapping(void **state) {
  (void)state;
  fake *f = open_client(WS1, 1, NULL); /* auth_ok at t=1000 */
  uint64_t now = 1000;
  long longest = 0;
  for (unsigned a = 0; a < 6; a++) {
    im_client_disconnected(f->cl);
    long t = im_client_timeout(f->cl, now);
    assert_true(t >= 0 && t <= (500L << a));
    if (t > longest)
      longest = t;
    now += (uint64_t)t;
    im_client_tick(f->cl, now);
    im_client_connected(f->cl);
    accept_upgrade(f);
    feed_json(f, "{\"op\":\"auth_ok\",\"conn\":\"c\",\"hb\":10}");
  }
  assert_true(longest > 500);
  /* up for 10 s (connect_timeout_ms): the next delay is attempt 0's again */
  now += 10000;
  feed_json(f, "{\"op\":\"sync_end\",\"last\":0,\"more\":false}");
  im_client_tick(f->cl, now);
  im_client_disconnected(f->cl);
  assert_true(im_client_timeout(f->cl, now) <= 500);
  drop(f);
}

static void test_goaway(void **state) {
  (void)state;
  const char *const two[] = {"ws://10.0.0.1:80/ws", "ws://10.0.0.2:80/ws"};
  fake *f = open_client(two, 2, NULL);
  assert_string_equal(f->host, "10.0.0.1");
  feed_json(f, "{\"op\":\"goaway\",\"reason\":\"drain\",\"reconnect_ms\":2000}");
  im_client_tick(f->cl, 2999);
  assert_int_equal(im_client_state(f->cl), IM_CLIENT_OPEN);
  assert_int_equal(im_client_timeout(f->cl, 2999), 1);
  im_client_tick(f->cl, 3000);
  expect_sent(f, "CLOSE 1001");
  assert_int_equal(f->closes, 1);
  /* no backoff after a goaway: the next gateway right away */
  im_client_tick(f->cl, 3000);
  assert_int_equal(f->connects, 2);
  assert_string_equal(f->host, "10.0.0.2");
  drop(f);

  /* binary form (op 0x0c, key 0x17) over raw TCP; the server closes first */
  const char *const tcp2[] = {"tcp://10.0.0.1:9", "tcp://10.0.0.2:9"};
  f = mk(tcp2, 2, NULL);
  im_client_start(f->cl, 0);
  im_client_connected(f->cl);
  drain(f);
  assert_int_equal(f->out[4], 0x01); /* auth, TCP-framed */
  static const uint8_t auth_ok[] = {0, 0, 0, 4, 0x02, 0x06, 0x01, 0x0a};
  static const uint8_t sync_end[] = {0, 0, 0, 7, 0x06, 0x14, 0x01, 0x00, 0x15, 0x01, 0x00};
  static const uint8_t goaway[] = {0, 0, 0, 5, 0x0c, 0x17, 0x02, 0x01, 0xf4};
  im_client_feed(f->cl, auth_ok, sizeof auth_ok);
  im_client_feed(f->cl, sync_end, sizeof sync_end);
  assert_int_equal(im_client_state(f->cl), IM_CLIENT_OPEN);
  im_client_feed(f->cl, goaway, sizeof goaway);
  im_client_disconnected(f->cl); /* the server closed at once */
  assert_int_equal(im_client_timeout(f->cl, 0), 500);
  im_client_tick(f->cl, 500);
  assert_int_equal(f->connects, 2);
  assert_string_equal(f->host, "10.0.0.2");
  drop(f);
}

static void test_heartbeat_and_idle(void **state) {
  (void)state;
  fake *f = open_client(WS1, 1, NULL); /* hb 10 s, at t=1000 */
  char pk[8][512];
  assert_int_equal(im_client_timeout(f->cl, 1000), 10000);
  im_client_tick(f->cl, 11000);
  expect_sent(f, "{\"op\":\"ping\"}");
  feed_json(f, "{\"op\":\"pong\"}");
  /* background: every 2 x hb */
  im_client_set_background(f->cl, 1);
  im_client_tick(f->cl, 21000);
  assert_int_equal(ws_packets(f, pk, 8), 0);
  im_client_tick(f->cl, 31000);
  assert_int_equal(ws_packets(f, pk, 8), 1);
  /* no answer: after interval + pong timeout of silence, reconnect */
  im_client_tick(f->cl, 40999);
  assert_int_equal(im_client_state(f->cl), IM_CLIENT_OPEN);
  im_client_tick(f->cl, 41000);
  assert_int_equal(f->closes, 1);
  assert_int_equal(im_client_state(f->cl), IM_CLIENT_WAITING);
  drop(f);
}

static void with_fetch(im_client_config *c) {
  c->gateways_url = "http://127.0.0.1:9/v1/gateways";
  c->api_key = "k";
}

static void test_gateway_list(void **state) {
  (void)state;
  fake *f = mk(WS1, 1, with_fetch);
  im_client_start(f->cl, 0);
  assert_int_equal(im_client_state(f->cl), IM_CLIENT_RESOLVING);
  assert_string_equal(f->fetch_url, "http://127.0.0.1:9/v1/gateways?uid=bob");
  const char *body = "{\"gateways\":[{\"node\":\"n1\",\"ws\":\"ws://10.1.1.1:81/ws\","
                     "\"tcp\":\"10.1.1.1:82\",\"conns\":3},{\"ws\":\"ws://10.1.1.2:81/ws\"}]}";
  assert_int_equal(im_client_gateways_result(f->cl, 200, body, strlen(body)), 0);
  assert_string_equal(f->host, "10.1.1.1");
  assert_int_equal(f->addr.port, 81);
  im_client_disconnected(f->cl);
  im_client_tick(f->cl, 1000);
  assert_string_equal(f->host, "10.1.1.2");
  /* a whole round failed: fetch again; that fetch fails: the default */
  im_client_disconnected(f->cl);
  im_client_tick(f->cl, 2000);
  assert_int_equal(f->fetches, 2);
  assert_int_equal(im_client_gateways_result(f->cl, 404, "{}", 2), IM_EINVAL);
  assert_string_equal(f->host, "127.0.0.1");
  assert_int_equal(f->addr.port, 8080);
  drop(f);

  /* the fetch that never answers times out to the default too */
  f = mk(WS1, 1, with_fetch);
  im_client_start(f->cl, 0);
  im_client_tick(f->cl, 10000);
  assert_int_equal(f->connects, 1);
  assert_string_equal(f->host, "127.0.0.1");
  drop(f);

  gw_list l = {0};
  assert_int_equal(gw_list_from_json(&l, "[1]", 3, false), 0);
  const char *v6 = "{\"gateways\":[{\"tcp\":\"[::1]:7\"}]}";
  assert_int_equal(gw_list_from_json(&l, v6, strlen(v6), true), 1);
  assert_string_equal(l.v[0].a.host, "::1");
  assert_int_equal(l.v[0].a.port, 7);
  gw_list_clear(&l);
  gw_addr a;
  assert_int_equal(gw_parse_url("ws://h", 6, &a), 0);
  assert_int_equal(a.a.port, 80);
  assert_string_equal(a.a.path, "/");
  free(a.mem);
  assert_int_equal(gw_parse_url("ws://h:0/ws", 11, &a), -1);
  assert_int_equal(gw_parse_url("tcp://h:1/x", 11, &a), -1);
  assert_int_equal(gw_parse_url("ws://:1/", 8, &a), -1);
}

static void test_auth_refused_stops(void **state) {
  (void)state;
  fake *f = mk(WS1, 1, NULL);
  im_client_start(f->cl, 0);
  im_client_connected(f->cl);
  accept_upgrade(f);
  feed_json(f, "{\"op\":\"error\",\"code\":401,\"reason\":\"invalid token\"}");
  uint8_t close[] = {0x88, 0x02, 0x11, 0x31}; /* 4401 */
  assert_int_equal(im_client_feed(f->cl, close, sizeof close), 0);
  assert_int_equal(f->close_code, 4401);
  assert_int_equal(im_client_state(f->cl), IM_CLIENT_STOPPED);
  assert_int_equal(im_client_timeout(f->cl, 0), -1);
  /* a new token, and a start again */
  assert_int_equal(im_client_set_token(f->cl, "new"), 0);
  assert_int_equal(im_client_start(f->cl, 1), 0);
  assert_int_equal(f->connects, 2);
  drop(f);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_handshake_accept_verified),
      cmocka_unit_test(test_every_frame_masked),
      cmocka_unit_test(test_ack_and_dedupe),
      cmocka_unit_test(test_outbox_resent_after_reconnect),
      cmocka_unit_test(test_outbox_bounded),
      cmocka_unit_test(test_rooms_joined_again_after_reconnect),
      cmocka_unit_test(test_room_messages_not_acked_when_asked),
      cmocka_unit_test(test_event_source_address),
      cmocka_unit_test(test_sync_paging),
      cmocka_unit_test(test_backoff_bounds),
      cmocka_unit_test(test_backoff_after_flapping),
      cmocka_unit_test(test_goaway),
      cmocka_unit_test(test_heartbeat_and_idle),
      cmocka_unit_test(test_gateway_list),
      cmocka_unit_test(test_auth_refused_stops),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
