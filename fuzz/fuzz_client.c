/* libFuzzer harness: the client core (lib/client) reading what a server
 * sends: the 101 answer, WebSocket frames or TCP frames, IMP packets, with
 * time passing, reconnects and callbacks that send.
 *
 * Input: see fuzz_common.h. mode & 1: raw TCP (else WebSocket); mode & 2:
 * binary IMP on WebSocket; mode & 4: a valid 101 (WebSocket) and an auth_ok
 * come first, so the stream starts in the open connection. Control bytes:
 * 0x20 advance time 7 s before the chunk (heartbeats, timeouts, backoff;
 * a reconnect is answered with im_client_connected), 0x40 send a message
 * from the test before the chunk.
 *
 * Invariants: every byte the client writes is a whole masked WebSocket
 * frame (after the upgrade request) or a whole TCP frame; a message with a
 * seq is delivered only as contiguous + 1. */
#include "fuzz_common.h"

#include <libim/im_client.h>

#include "proto/tcp_frame.h"
#include "proto/ws_frame.h"
#include "proto/ws_handshake.h"

typedef struct fz_client {
  im_client *cl;
  bool tcp;
  uint32_t rnd;
  int sends;
} fz_client;

/* xorshift32: deterministic, so a crash replays */
static uint32_t fz_rand(void *u) {
  fz_client *f = u;
  f->rnd ^= f->rnd << 13;
  f->rnd ^= f->rnd >> 17;
  f->rnd ^= f->rnd << 5;
  return f->rnd;
}

/* The transport "opens" when the harness says so; want_write and close
 * need no action (the output is drained after every step). */
static int h_connect(im_client *cl, const im_client_addr *a, void *u) {
  (void)cl;
  (void)a;
  (void)u;
  return 0;
}

static void on_message(im_client *cl, const im_client_msg *m, void *u) {
  fz_client *f = u;
  /* in order: a stored message is shown only as the next one */
  FZ_CHECK(m->seq == 0 || im_client_contiguous(cl) == m->seq);
  FZ_CHECK(strlen(m->data) == m->data_len);
  if (f->sends++ % 3 == 0)
    im_client_send(cl, IM_CLIENT_TO_USER, "peer", "[1]", 3, NULL);
}

/* Take the client's output and check its framing. Returns the key of an
 * upgrade request found in it (into key), if any. */
static bool drain(fz_client *f, char key[25]) {
  struct iovec iov[2];
  bool found = false;
  int n = im_client_pending(f->cl, iov, 2);
  if (n <= 0)
    return false;
  const uint8_t *p = iov[0].iov_base;
  size_t len = iov[0].iov_len, off = 0;
  FZ_CHECK(p != NULL && len > 0);
  if (len > 4 && memcmp(p, "GET ", 4) == 0) {
    const char *k = memmem(p, len, "Sec-WebSocket-Key: ", 19);
    const char *e = memmem(p, len, "\r\n\r\n", 4);
    FZ_CHECK(k && e && (size_t)((const uint8_t *)k - p) + 19 + 24 <= len);
    memcpy(key, k + 19, 24);
    key[24] = '\0';
    found = true;
    off = (size_t)((const uint8_t *)e + 4 - p);
  }
  while (off < len) {
    if (f->tcp) {
      const uint8_t *body;
      uint32_t blen;
      long t = tcp_frame_parse(p + off, len - off, 1u << 20, &body, &blen);
      FZ_CHECK(t > 0);
      off += (size_t)t;
    } else {
      ws_frame_hdr h;
      int hl = ws_frame_parse_header(p + off, len - off, true, &h);
      FZ_CHECK(hl > 0 && h.fin && len - off - (size_t)hl >= h.len);
      off += (size_t)hl + (size_t)h.len;
    }
  }
  im_client_sent(f->cl, len);
  return found;
}

static void feed(fz_client *f, const void *p, size_t n) {
  uint8_t *copy = fz_dup(p, n);
  im_client_feed(f->cl, copy, n);
  free(copy);
}

/* A correct 101 for key, then auth_ok in the connection's form. */
static void open_conn(fz_client *f, const char *key, bool bin) {
  if (!f->tcp) {
    char accept[29], resp[256];
    FZ_CHECK(ws_hs_accept_key(key, 24, accept) == 0);
    int n = snprintf(resp, sizeof resp,
                     "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n",
                     accept);
    feed(f, resp, (size_t)n);
  }
  static const char ok_json[] = "{\"op\":\"auth_ok\",\"conn\":\"c\",\"hb\":5}";
  static const uint8_t ok_bin[] = {0x02, 0x06, 0x01, 0x05};
  uint8_t b[64];
  size_t h;
  if (f->tcp) {
    tcp_frame_encode_header(b, sizeof ok_bin);
    h = 4;
  } else {
    h = ws_frame_encode_header(b, bin ? WS_OP_BINARY : WS_OP_TEXT, true,
                               bin ? sizeof ok_bin : sizeof ok_json - 1);
  }
  memcpy(b + h, bin || f->tcp ? (const void *)ok_bin : ok_json,
         bin || f->tcp ? sizeof ok_bin : sizeof ok_json - 1);
  feed(f, b, h + (bin || f->tcp ? sizeof ok_bin : sizeof ok_json - 1));
  drain(f, (char[25]){0});
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  fz_input in;
  if (!fz_input_init(&in, data, size))
    return 0;
  fz_client f = {.tcp = in.mode & 1, .rnd = 2463534242u};
  bool bin = (in.mode & 2) != 0;
  const char *urls[] = {f.tcp ? "tcp://10.0.0.1:9" : "ws://10.0.0.1:80/ws"};
  im_client_config cfg;
  im_client_config_init(&cfg);
  cfg.uid = "me";
  cfg.token = "t";
  cfg.urls = urls;
  cfg.n_urls = 1;
  cfg.binary = bin;
  cfg.max_message = 4096;
  cfg.dedupe_window = 8;
  cfg.outbox_max = 16;
  cfg.rand = fz_rand;
  cfg.rand_user = &f;
  im_client_callbacks cb = {.on_message = on_message};
  f.cl = im_client_new(&cfg, &cb, &f);
  FZ_CHECK(f.cl);
  im_client_io io = {.connect = h_connect};
  im_client_set_io(f.cl, &io, &f);
  uint64_t now = 1000;
  im_client_start(f.cl, now);
  im_client_connected(f.cl);
  char key[25] = {0};
  drain(&f, key);
  if (in.mode & 4)
    open_conn(&f, key, bin);

  size_t off = 0, n;
  uint8_t ctl;
  while ((n = fz_next_chunk(&in, in.stream_len, &off, &ctl)) > 0) {
    if (ctl & 0x20) {
      now += 7000;
      im_client_tick(f.cl, now);
      if (im_client_state(f.cl) == IM_CLIENT_CONNECTING)
        im_client_connected(f.cl);
    }
    if (ctl & 0x40)
      im_client_send(f.cl, IM_CLIENT_TO_GROUP, "g", "{\"a\":1}", 7, NULL);
    drain(&f, key);
    feed(&f, in.stream + off, n);
    off += n;
    drain(&f, key);
  }
  im_client_stop(f.cl);
  drain(&f, key);
  im_client_free(f.cl);
  return 0;
}
