/* WebSocket input: the upgrade request, then frames: control frames,
 * fragments assembled into messages, UTF-8 checks, size limits. */
#include <string.h>

#include "core/auth.h"
#include "core/conn.h"
#include "core/dispatch.h"
#include "core/wire_in.h"
#include "proto/utf8.h"
#include "proto/ws_frame.h"
#include "proto/ws_handshake.h"

/* ---- WebSocket input ------------------------------------------------------- */

static void on_ws_close_frame(im_server *s, im_conn *c, const uint8_t *pl, size_t n) {
  unsigned code = 1005;
  if (n == 1) {
    conn_proto_fail(s, c, IM_CLOSE_PROTOCOL, "bad close payload");
    return;
  }
  if (n >= 2) {
    code = (unsigned)pl[0] << 8 | pl[1];
    if (!ws_close_code_valid(code)) {
      conn_proto_fail(s, c, IM_CLOSE_PROTOCOL, "bad close code");
      return;
    }
    if (utf8_validate(UTF8_ACCEPT, pl + 2, n - 2) != UTF8_ACCEPT) {
      conn_proto_fail(s, c, IM_CLOSE_BAD_DATA, "bad close reason");
      return;
    }
  }
  c->flags |= CF_CLOSE_RCVD;
  if (c->state == CS_CLOSING) {
    /* our close was answered */
    c->flags |= CF_FLUSH_CLOSE;
    if (!c->out_head) conn_finish(s, c);
    return;
  }
  conn_close(s, c, code == 1005 ? IM_CLOSE_NORMAL : (int)code, "", false);
  c->close_code = (uint16_t)code;
}

/* Append a fragment to the message being assembled. */
static bool msg_append(im_server *s, im_conn *c, const uint8_t *p, size_t n) {
  if (n == 0) return true; /* an empty fragment: nothing to keep, c->msg may be NULL */
  return bytes_append(s, &c->msg, p, n, 1024, s->cfg.max_message);
}

static void msg_reset(im_server *s, im_conn *c) {
  im_dealloc(s, c->msg);
  c->msg = NULL;
  c->frag_op = 0;
}

/* Handle one whole frame; payload already unmasked. */
static void on_ws_frame(im_server *s, im_conn *c, const ws_frame_hdr *h, uint8_t *pl) {
  size_t n = (size_t)h->len;
  switch (h->opcode) {
    case WS_OP_PING:
      if (c->state < CS_CLOSING) conn_queue_new(s, c, frame_ws(s, WS_OP_PONG, pl, n));
      return;
    case WS_OP_PONG:
      return;
    case WS_OP_CLOSE:
      on_ws_close_frame(s, c, pl, n);
      return;
    default:
      break;
  }
  if (c->state >= CS_CLOSING) return;
  uint8_t op = h->opcode == WS_OP_CONT ? c->frag_op : h->opcode;
  /* a text message's UTF-8 state across fragments lives with the message
   * being assembled (none yet, or none needed: the start state) */
  uint32_t utf8 = UTF8_ACCEPT;
  if (op == WS_OP_TEXT) {
    utf8 = utf8_validate(c->msg ? c->msg->aux : UTF8_ACCEPT, pl, n);
    if (utf8 == UTF8_REJECT || (h->fin && utf8 != UTF8_ACCEPT)) {
      conn_proto_fail(s, c, IM_CLOSE_BAD_DATA, "invalid UTF-8");
      return;
    }
  }
  if (h->fin && h->opcode != WS_OP_CONT) {
    dispatch_message(s, c, op == WS_OP_BINARY, pl, n);
    return;
  }
  if (h->opcode != WS_OP_CONT) c->frag_op = h->opcode;
  if (!msg_append(s, c, pl, n)) {
    conn_close(s, c, IM_CLOSE_INTERNAL, "out of memory", false);
    return;
  }
  if (c->msg) c->msg->aux = utf8;
  if (h->fin) {
    /* the assembled buffer belongs to c until reset; detach it so a
     * callback that closes c cannot free it under the dispatcher */
    im_bytes *m = c->msg;
    c->msg = NULL;
    msg_reset(s, c);
    dispatch_message(s, c, op == WS_OP_BINARY, m ? m->data : pl, bytes_len(m));
    im_dealloc(s, m);
  }
}

size_t ws_in_frames(im_server *s, im_conn *c, uint8_t *p, size_t n) {
  size_t off = 0;
  while (off < n && c->state != CS_CLOSED && c->state != CS_AUTH_PENDING &&
         !(c->flags & CF_FLUSH_CLOSE)) {
    ws_frame_hdr h;
    int hl = ws_frame_parse_header(p + off, n - off, true, &h);
    if (hl == WS_FRAME_INCOMPLETE) break;
    if (hl < 0) {
      conn_proto_fail(s, c, IM_CLOSE_PROTOCOL, "bad frame header");
      return n;
    }
    bool data = h.opcode == WS_OP_TEXT || h.opcode == WS_OP_BINARY || h.opcode == WS_OP_CONT;
    if (data) {
      if ((h.opcode == WS_OP_CONT) != (c->frag_op != 0)) {
        conn_proto_fail(s, c, IM_CLOSE_PROTOCOL,
                   h.opcode == WS_OP_CONT ? "continuation without start" : "expected continuation");
        return n;
      }
      /* refuse a declared oversize length before buffering any of it */
      if (h.len > s->cfg.max_message || bytes_len(c->msg) + h.len > s->cfg.max_message) {
        conn_proto_fail(s, c, IM_CLOSE_TOO_BIG, "message too big");
        return n;
      }
      /* before authentication only a small message (the auth op) is
       * worth buffering: an anonymous peer gets no max_message buffer */
      uint32_t pre = conn_preauth_limit(s, c);
      if (pre && (h.len > pre || bytes_len(c->msg) + h.len > pre)) {
        conn_proto_fail(s, c, IM_CLOSE_TOO_BIG, "message too big before authentication");
        return n;
      }
    }
    if (n - off < (size_t)hl + h.len) break;
    uint8_t *pl = p + off + hl;
    ws_unmask(pl, (size_t)h.len, h.mask, 0);
    off += (size_t)hl + (size_t)h.len;
    on_ws_frame(s, c, &h, pl);
  }
  return off;
}

size_t ws_in_handshake(im_server *s, im_conn *c, uint8_t *p, size_t n) {
  ws_hs_result res;
  /* the parser stops at WS_HS_MAX_REQUEST by itself; a lower
   * max_preauth_input stops it earlier */
  size_t take = n;
  if (s->cfg.max_preauth_input && s->cfg.max_preauth_input - c->hs_fed < take)
    take = s->cfg.max_preauth_input - c->hs_fed;
  int rc = ws_hs_feed(c->hs, p, take, &res);
  if (rc == WS_HS_MORE && take < n) {
    s->st.proto_errors++;
    auth_http_reject(s, c, 431, "request headers too large");
    return n;
  }
  c->hs_fed += (uint32_t)take;
  if (rc == WS_HS_MORE) return n;
  if (rc == WS_HS_FAIL) {
    s->st.proto_errors++;
    auth_http_reject(s, c, res.http_status, res.reason);
    return n;
  }
  c->binary = res.subproto == WS_SUB_BIN;
  if (res.uid || res.token) {
    /* auth in the upgrade request: 101 only after it succeeds */
    im_auth a = {.uid = res.uid ? res.uid : "", .token = res.token ? res.token : "",
                 .device = res.device ? res.device : "",
                 .platform = res.platform ? res.platform : "", .peer = c->peer,
                 .via_upgrade = 1};
    /* c->hs stays until the connection opens: it holds the 101's fields */
    c->flags |= CF_UPGRADE_AUTH;
    c->state = CS_AUTH;
    if (!auth_start(s, c, &a)) {
      if (auth_park(s, c, &a) < 0) conn_close(s, c, IM_CLOSE_INTERNAL, "out of memory", false);
    }
    return res.consumed;
  }
  auth_send_upgrade(s, c, &res);
  ws_hs_free(c->hs);
  c->hs = NULL;
  c->state = CS_AUTH;
  return res.consumed;
}
