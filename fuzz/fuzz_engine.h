/* A fuzzing driver for the sans-I/O engine, shared by fuzz_ws.c and
 * fuzz_tcp.c: one connection per input on a fresh im_server, the input
 * stream fed in fuzzer-chosen chunks, output drained (fully, partially or
 * not at all) after each feed and parsed back, time ticked forward, and
 * every answer checked against what include/libim/im.h promises. */
#ifndef LIBIM_FUZZ_ENGINE_H
#define LIBIM_FUZZ_ENGINE_H

#include <libim/im.h>

#include "fuzz_common.h"
#include "proto/imp.h"
#include "proto/tcp_frame.h"
#include "proto/utf8.h"
#include "proto/ws_frame.h"

/* Control byte flags (low 5 bits: chunk size, see fz_chunk_size). */
#define FZ_CTL_TICK 0x20u     /* advance time 700 ms before the chunk; resolve a pending auth */
#define FZ_CTL_HALF 0x40u     /* drain only half of the pending output after the chunk */
#define FZ_CTL_NODRAIN 0x80u  /* do not drain after the chunk (slow reader) */

enum { OUT_HTTP, OUT_FRAMES, OUT_AFTER_CLOSE, OUT_AFTER_HTTP_ERROR, OUT_TCP };

typedef struct fz_engine {
  im_server *srv;
  im_conn_id id;
  int ctx_tag;            /* &ctx_tag is the io_ctx */
  int io_closes, on_closes, opens, want_writes;
  bool released;          /* io.close was called */
  bool closing;           /* a feed returned IM_ECLOSED */
  bool pending;           /* on_auth returned IM_AUTH_PENDING, not yet completed */
  bool pending_accept;
  bool drained_at_close;  /* nothing was queued when io.close was called */
  fz_buf out;             /* output drained but not yet parsed */
  int out_state;
  bool binary;            /* WebSocket: imp.bin was negotiated */
} fz_engine;

/* ---- output checking ------------------------------------------------------ */

static void fz_check_packet(const uint8_t *p, size_t n, bool binary) {
  imp_packet pkt;
  int rc;
  if (binary) {
    rc = imp_bin_decode(p, n, &pkt);
  } else {
    FZ_CHECK(utf8_validate(UTF8_ACCEPT, p, n) == UTF8_ACCEPT);
    char *scratch = malloc(n ? n : 1);
    FZ_CHECK(scratch != NULL);
    rc = imp_json_decode((const char *)p, n, &pkt, scratch, n);
    free(scratch);
  }
  FZ_CHECK(rc == IMP_OK);
  switch (pkt.op) {
    case IMP_OP_AUTH_OK:
      FZ_CHECK(IMP_HAS(&pkt, IMP_K_CONN) && IMP_HAS(&pkt, IMP_K_HB));
      break;
    case IMP_OP_ERROR:
      FZ_CHECK(IMP_HAS(&pkt, IMP_K_CODE) && IMP_HAS(&pkt, IMP_K_REASON));
      break;
    case IMP_OP_MSG:
      FZ_CHECK(IMP_HAS(&pkt, IMP_K_ID));
      break;
    case IMP_OP_SYNC_END:
      FZ_CHECK(IMP_HAS(&pkt, IMP_K_LAST) && IMP_HAS(&pkt, IMP_K_MORE));
      break;
    case IMP_OP_ACK:
    case IMP_OP_PONG:
      break;
    default:
      FZ_CHECK(!"unexpected op from the server");
  }
}

static unsigned fz_digits(const uint8_t *p, size_t n, size_t *used) {
  unsigned v = 0;
  size_t i = 0;
  while (i < n && i < 9 && p[i] >= '0' && p[i] <= '9') v = v * 10 + (unsigned)(p[i++] - '0');
  *used = i;
  return v;
}

/* Parse what the server wrote so far; keep an incomplete tail. */
static void fz_parse_output(fz_engine *e) {
  for (;;) {
    const uint8_t *p = e->out.p;
    size_t n = e->out.n;
    if (n == 0) return;
    switch (e->out_state) {
      case OUT_HTTP: {
        /* a WebSocket connection's output starts with the HTTP response */
        FZ_CHECK(memcmp(p, "HTTP/1.1 ", n < 9 ? n : 9) == 0);
        const uint8_t *end = fz_memmem(p, n, "\r\n\r\n");
        if (!end) {
          FZ_CHECK(n < 2048);
          return;
        }
        size_t hl = (size_t)(end - p) + 4, k;
        FZ_CHECK(hl > 13 && memcmp(p, "HTTP/1.1 ", 9) == 0 && p[12] == ' ');
        unsigned status = fz_digits(p + 9, 3, &k);
        FZ_CHECK(k == 3);
        if (status == 101) {
          static const char line[] = "HTTP/1.1 101 Switching Protocols\r\n";
          FZ_CHECK(memcmp(p, line, sizeof line - 1) == 0);
          FZ_CHECK(fz_memmem(p, hl, "\r\nUpgrade: websocket\r\n"));
          FZ_CHECK(fz_memmem(p, hl, "\r\nConnection: Upgrade\r\n"));
          const uint8_t *acc = fz_memmem(p, hl, "\r\nSec-WebSocket-Accept: ");
          FZ_CHECK(acc && (size_t)(end - acc) >= 24 + 28 && memcmp(acc + 24 + 28, "\r\n", 2) == 0);
          e->binary = fz_memmem(p, hl, "\r\nSec-WebSocket-Protocol: imp.bin\r\n") != NULL;
          e->out_state = OUT_FRAMES;
          fz_buf_drop(&e->out, hl);
          continue;
        }
        FZ_CHECK(status == 400 || status == 403 || status == 404 || status == 405 ||
                 status == 426 || status == 431 || status == 503);
        FZ_CHECK(fz_memmem(p, hl, "\r\nConnection: close\r\n"));
        const uint8_t *cl = fz_memmem(p, hl, "\r\nContent-Length: ");
        FZ_CHECK(cl);
        size_t body = fz_digits(cl + 18, (size_t)(end + 2 - (cl + 18)), &k);
        FZ_CHECK(k > 0 && cl[18 + k] == '\r' && body >= 1);
        if (n < hl + body) return;
        FZ_CHECK(p[hl + body - 1] == '\n');
        fz_buf_drop(&e->out, hl + body);
        e->out_state = OUT_AFTER_HTTP_ERROR;
        continue;
      }
      case OUT_FRAMES: {
        ws_frame_hdr h;
        int r = ws_frame_parse_header(p, n, false, &h);
        FZ_CHECK(r >= 0); /* a valid server frame header, or a prefix of one */
        if (r == 0) return;
        FZ_CHECK(!h.masked && h.rsv == 0 && h.fin);
        if ((uint64_t)(n - (size_t)r) < h.len) return;
        const uint8_t *pl = p + r;
        size_t len = (size_t)h.len;
        switch (h.opcode) {
          case WS_OP_TEXT:
          case WS_OP_BINARY:
            FZ_CHECK((h.opcode == WS_OP_BINARY) == e->binary);
            fz_check_packet(pl, len, e->binary);
            break;
          case WS_OP_PONG:
            break;
          case WS_OP_CLOSE:
            FZ_CHECK(len == 0 || len >= 2);
            if (len >= 2) {
              FZ_CHECK(ws_close_code_valid((unsigned)pl[0] << 8 | pl[1]));
              FZ_CHECK(utf8_validate(UTF8_ACCEPT, pl + 2, len - 2) == UTF8_ACCEPT);
            }
            e->out_state = OUT_AFTER_CLOSE;
            break;
          default:
            FZ_CHECK(!"unexpected opcode from the server");
        }
        fz_buf_drop(&e->out, (size_t)r + len);
        continue;
      }
      case OUT_TCP: {
        const uint8_t *body;
        uint32_t blen;
        long r = tcp_frame_parse(p, n, UINT32_MAX, &body, &blen);
        FZ_CHECK(r >= 0);
        if (r == 0) return;
        fz_check_packet(body, blen, true);
        fz_buf_drop(&e->out, (size_t)r);
        continue;
      }
      default:
        FZ_CHECK(!"output after the close frame / HTTP error response");
    }
  }
}

/* how: 0 all, 1 half of what is pending, 2 nothing. */
static void fz_drain(fz_engine *e, int how) {
  if (how == 2) return;
  while (!e->released) {
    struct iovec iov[8];
    int k = im_conn_pending(e->srv, e->id, iov, 8);
    FZ_CHECK(k >= 0 && k <= 8);
    if (k == 0) return;
    size_t total = 0;
    for (int i = 0; i < k; i++) {
      FZ_CHECK(iov[i].iov_base != NULL && iov[i].iov_len > 0);
      total += iov[i].iov_len;
    }
    size_t want = how == 1 ? (total + 1) / 2 : total, left = want;
    for (int i = 0; i < k && left; i++) {
      size_t take = iov[i].iov_len < left ? iov[i].iov_len : left;
      fz_buf_add(&e->out, iov[i].iov_base, take);
      left -= take;
    }
    fz_parse_output(e);
    FZ_CHECK(im_conn_sent(e->srv, e->id, want) == 0);
    if (how == 1) return;
  }
}

/* ---- callbacks ----------------------------------------------------------------- */

static int fz_on_auth(im_server *srv, im_conn_id c, im_auth *a, void *user) {
  fz_engine *e = user;
  (void)srv;
  FZ_CHECK(c == e->id && !e->pending);
  FZ_CHECK(a->uid && a->token && a->device && a->platform && a->peer);
  size_t ul = strlen(a->uid);
  FZ_CHECK(ul > 0 && ul <= 128);
  (void)(strlen(a->token) + strlen(a->device) + strlen(a->platform));
  FZ_CHECK(strcmp(a->peer, "127.0.0.1:40000") == 0);
  switch (a->token[0]) {
    case '\0':
      return IM_AUTH_DENY;
    case 'd': /* "dr": deny with the application's own code and reason */
      if (a->token[1] == 'r') {
        a->code = 403;
        a->reason = "denied by the application";
      }
      return IM_AUTH_DENY;
    case 'p':
      e->pending = true;
      e->pending_accept = a->token[1] != 'd';
      return IM_AUTH_PENDING;
    default:
      return IM_AUTH_ACCEPT;
  }
}

static void fz_on_open(im_server *srv, im_conn_id c, void *user) {
  fz_engine *e = user;
  FZ_CHECK(c == e->id);
  e->opens++;
  im_conn_info ci = {IM_STRUCT_SIZE(im_conn_info)};
  FZ_CHECK(im_conn_get_info(srv, c, &ci) == 0);
  FZ_CHECK(ci.uid && ci.device && ci.platform && ci.peer);
  FZ_CHECK(im_user_conns(srv, ci.uid, NULL, 0) == 1);
}

/* Results an application may see from a send inside a callback. */
static bool fz_send_rc_ok(int rc) {
  return rc == 0 || rc == IM_EFULL || rc == IM_ECLOSED || rc == IM_ETOOBIG || rc == IM_ENOENT ||
         rc == IM_ESTATE;
}

static int fz_on_message(im_server *srv, im_conn_id c, const im_msg *m, void *user) {
  fz_engine *e = user;
  FZ_CHECK(c == e->id);
  FZ_CHECK(m->id && m->cid && m->data && m->data_len > 0);
  FZ_CHECK(imp_json_valid(m->data, m->data_len));
  if (m->to) (void)strlen(m->to);
  if (m->group) (void)strlen(m->group);
  if (m->from) (void)strlen(m->from);
  im_msg echo = {.to = m->to, .group = m->group, .room = m->room, .seq = m->seq, .ts = m->ts,
                 .data = m->data, .data_len = m->data_len};
  /* ts odd: the copies are reliable (in flight until ACKed, retransmitted) */
  if (m->ts & 1) echo.flags = IM_SEND_RELIABLE;
  /* seq 1..32: echo that many copies (amplification reaches max_output) */
  for (uint64_t i = 0; m->seq <= 32 && i < m->seq; i++) {
    int rc = im_send_conn(srv, c, &echo);
    FZ_CHECK(fz_send_rc_ok(rc));
    if (rc != 0) break;
  }
  im_conn_info ci = {IM_STRUCT_SIZE(im_conn_info)};
  switch (m->cid[0]) {
    case 'D': /* defer, then ack from inside the callback */
      FZ_CHECK(fz_send_rc_ok(im_ack(srv, c, m->cid, m->id, m->seq)));
      return IM_MSG_DEFER;
    case 'E':
      FZ_CHECK(fz_send_rc_ok(im_reply_error(srv, c, 409, "refused by the application", m->cid)));
      return IM_MSG_DEFER;
    case 'C': {
      int rc = im_conn_close(srv, c, 4000, "closed by the application");
      FZ_CHECK(rc == 0 || rc == IM_ECLOSED || rc == IM_ENOENT);
      return IM_MSG_ACK;
    }
    case 'U':
      if (im_conn_get_info(srv, c, &ci) == 0 && ci.uid)
        FZ_CHECK(im_send_user(srv, ci.uid, &echo, 0) > IM_EFATAL);
      return IM_MSG_ACK;
    case 'R':
      if (m->room && *m->room) {
        int rc = im_room_join(srv, c, m->room);
        FZ_CHECK(rc == 0 || rc == IM_EINVAL || rc == IM_ESTATE || rc == IM_ENOENT ||
                 rc == IM_ELIMIT);
        if (rc == IM_ELIMIT) FZ_CHECK(im_room_member(srv, c, m->room) == 0);
        if (rc == 0) FZ_CHECK(im_room_member(srv, c, m->room) == 1);
        FZ_CHECK(im_room_send(srv, m->room, &echo, 0) > IM_EFATAL);
      }
      return IM_MSG_ACK;
    case 'M': /* several users at once, one of them twice, one unknown */
      if (im_conn_get_info(srv, c, &ci) == 0 && ci.uid) {
        const char *uids[3] = {ci.uid, "nobody", ci.uid};
        FZ_CHECK(im_send_users(srv, uids, 3, &echo, 0) > IM_EFATAL);
      }
      return IM_MSG_ACK;
    default:
      return IM_MSG_ACK;
  }
}

static int fz_on_room(im_server *srv, im_conn_id c, const char *room, int join, void *user) {
  fz_engine *e = user;
  (void)join;
  FZ_CHECK(c == e->id && room);
  size_t n = strlen(room);
  FZ_CHECK(n >= 1 && n <= 128);
  if (room[0] == 'x') return 403;
  if (room[0] == 'c') {
    int rc = im_conn_close(srv, c, 4001, "closed from on_room");
    FZ_CHECK(rc == 0 || rc == IM_ECLOSED || rc == IM_ENOENT);
  }
  return 0;
}

static void fz_on_ack(im_server *srv, im_conn_id c, const char *id, uint64_t seq, void *user) {
  fz_engine *e = user;
  (void)srv;
  (void)seq;
  FZ_CHECK(c == e->id && id);
  (void)strlen(id);
}

static void fz_on_undelivered(im_server *srv, im_conn_id c, const char *id, uint64_t seq,
                              void *user) {
  fz_engine *e = user;
  (void)srv;
  (void)seq;
  FZ_CHECK(c == e->id && id && *id);
}

/* Answer a sync with up to three reliable messages, then sync_end. */
static void fz_on_sync(im_server *srv, im_conn_id c, uint64_t since, uint32_t limit, void *user) {
  fz_engine *e = user;
  FZ_CHECK(c == e->id);
  uint32_t n = limit < 3 ? limit : 3;
  for (uint32_t i = 0; i < n; i++) {
    im_msg m = {.seq = since + i + 1, .data = "{}", .data_len = 2, .flags = IM_SEND_RELIABLE};
    FZ_CHECK(fz_send_rc_ok(im_send_conn(srv, c, &m)));
  }
  FZ_CHECK(fz_send_rc_ok(im_sync_end(srv, c, since + n, n == 3, since == 7)));
}

static void fz_on_close(im_server *srv, im_conn_id c, int code, void *user) {
  fz_engine *e = user;
  FZ_CHECK(c == e->id);
  FZ_CHECK(code >= 1000 && code <= 4999);
  /* the connection's identity stays readable in on_close */
  im_conn_info ci = {IM_STRUCT_SIZE(im_conn_info)};
  FZ_CHECK(im_conn_get_info(srv, c, &ci) == 0 && ci.peer);
  if (e->opens) FZ_CHECK(ci.uid && ci.device && ci.platform && strlen(ci.uid) > 0);
  e->on_closes++;
  FZ_CHECK(e->on_closes == 1);
}

static void fz_want_write(im_server *srv, im_conn_id c, void *io_ctx, void *io_user) {
  fz_engine *e = io_user;
  (void)srv;
  FZ_CHECK(c == e->id && io_ctx == &e->ctx_tag && !e->released);
  e->want_writes++;
}

static void fz_io_close(im_server *srv, im_conn_id c, void *io_ctx, void *io_user) {
  fz_engine *e = io_user;
  FZ_CHECK(c == e->id && io_ctx == &e->ctx_tag);
  e->io_closes++;
  FZ_CHECK(e->io_closes == 1);
  struct iovec v[1];
  int k = im_conn_pending(srv, c, v, 1);
  FZ_CHECK(k >= 0);
  e->drained_at_close = k == 0;
  e->released = true;
}

/* ---- the run --------------------------------------------------------------------- */

static void fz_resolve_pending(fz_engine *e) {
  if (!e->pending || e->released) return;
  e->pending = false;
  int rc = im_auth_complete(e->srv, e->id, e->pending_accept, 401, "denied later");
  FZ_CHECK(rc == 0 || rc == IM_ESTATE);
}

/* Feed `prefix` then the input's stream on one connection of `transport`. */
static void fz_engine_run(enum im_transport transport, const char *ws_path, const uint8_t *prefix,
                          size_t plen, fz_input *in) {
  fz_engine e;
  memset(&e, 0, sizeof e);
  e.out_state = transport == IM_TRANSPORT_TCP ? OUT_TCP : OUT_HTTP;

  im_config cfg;
  im_config_init(&cfg);
  cfg.max_message = 4096;
  cfg.max_output = 65536;
  cfg.auth_timeout_ms = 2000;
  cfg.heartbeat_s = 2;        /* idle timeout 5 s */
  cfg.close_timeout_ms = 1000;
  cfg.tick_ms = 100;
  cfg.ws_path = ws_path;
  cfg.ack_timeout_ms = 300;   /* retransmits and the 4408 close happen within the run */
  cfg.ack_retries = 2;
  cfg.max_inflight = 4;
  cfg.dedupe_window = 4;
  cfg.max_rooms = 4;          /* joins over it are refused (429 / IM_ELIMIT) */
  cfg.max_preauth_input = 1024; /* below max_message: the pre-auth bound decides */
  im_callbacks cb = {.on_auth = fz_on_auth, .on_open = fz_on_open, .on_message = fz_on_message,
                     .on_room = fz_on_room, .on_ack = fz_on_ack,
                     .on_undelivered = fz_on_undelivered, .on_sync = fz_on_sync,
                     .on_close = fz_on_close};
  e.srv = im_server_new(&cfg, &cb, &e);
  FZ_CHECK(e.srv != NULL);
  im_io io = {fz_want_write, fz_io_close, &e};
  im_server_set_io(e.srv, &io);
  uint64_t now = 1000;
  im_server_tick(e.srv, now);
  e.id = im_server_accept(e.srv, transport, "127.0.0.1:40000", &e.ctx_tag);
  FZ_CHECK(e.id != 0);

  fz_buf stream = {0};
  fz_buf_add(&stream, prefix, plen);
  fz_buf_add(&stream, in->stream, in->stream_len);

  size_t off = 0, n;
  uint8_t c;
  while ((n = fz_next_chunk(in, stream.n, &off, &c)) > 0) {
    if (c & FZ_CTL_TICK) {
      now += 700;
      im_server_tick(e.srv, now);
      fz_resolve_pending(&e);
      fz_drain(&e, 0);
    }
    bool was_released = e.released, was_closing = e.closing;
    uint8_t *chunk = fz_dup(stream.p + off, n);
    off += n;
    int rc = im_server_feed(e.srv, e.id, chunk, n);
    free(chunk);
    if (was_released) {
      FZ_CHECK(rc == IM_ENOENT || rc == IM_ECLOSED);
      break;
    }
    FZ_CHECK(rc == 0 || rc == IM_ECLOSED);
    if (was_closing || e.released) FZ_CHECK(rc == IM_ECLOSED);
    if (rc == IM_ECLOSED) e.closing = true;
    fz_drain(&e, (c & FZ_CTL_NODRAIN) ? 2 : (c & FZ_CTL_HALF) ? 1 : 0);
  }
  fz_buf_free(&stream);

  /* Let every timeout run out with a reader that keeps up: the engine must
   * close the connection on its own (auth 2 s, idle 5 s + jitter, close 1 s). */
  fz_resolve_pending(&e);
  fz_drain(&e, 0);
  for (int i = 0; i < 6 && !e.released; i++) {
    now += 3000;
    im_server_tick(e.srv, now);
    fz_resolve_pending(&e);
    fz_drain(&e, 0);
  }
  FZ_CHECK(e.released);
  FZ_CHECK(e.on_closes == 1);
  if (e.drained_at_close) FZ_CHECK(e.out.n == 0); /* no frame cut short */

  /* A released connection is gone for every entry point. */
  uint8_t byte = 0x81;
  struct iovec v[1];
  FZ_CHECK(im_server_feed(e.srv, e.id, &byte, 1) == IM_ENOENT);
  FZ_CHECK(im_conn_pending(e.srv, e.id, v, 1) == IM_ENOENT);
  FZ_CHECK(im_conn_sent(e.srv, e.id, 1) == IM_ENOENT);
  FZ_CHECK(im_server_hangup(e.srv, e.id) == IM_ENOENT);
  FZ_CHECK(im_conn_close(e.srv, e.id, 1000, "") == IM_ENOENT);
  FZ_CHECK(e.on_closes == 1);

  im_stats st = {IM_STRUCT_SIZE(im_stats)};
  im_server_stats(e.srv, &st);
  FZ_CHECK(st.conns == 0 && st.conns_authed == 0 && st.users == 0 && st.rooms == 0);
  FZ_CHECK(st.out_queued == 0);
  im_server_free(e.srv);
  fz_buf_free(&e.out);
}

#endif
