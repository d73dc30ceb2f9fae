/* A connection's input: bytes fed by the driver go to the handshake,
 * WebSocket or TCP parser; what does not form a whole unit yet, or arrives
 * while an auth verdict is pending, is held (bounded) and resumed. */
#include <string.h>

#include "core/auth.h"
#include "core/conn.h"
#include "core/wire_in.h"

#define WS_MAX_HDR 14u

/* Process as much of p as forms whole units; returns bytes consumed. */
static size_t process(im_server *s, im_conn *c, uint8_t *p, size_t n) {
  size_t off = 0;
  if (c->state == CS_HANDSHAKE) {
    off = ws_in_handshake(s, c, p, n);
    if (c->state != CS_AUTH && c->state != CS_OPEN) return c->state == CS_AUTH_PENDING ? off : n;
  }
  if (c->state == CS_AUTH_PENDING) return off;
  if (c->transport == IM_TRANSPORT_TCP) return off + tcp_in_frames(s, c, p + off, n - off);
  return off + ws_in_frames(s, c, p + off, n - off);
}

/* Largest input held while auth is pending: one maximal frame, or
 * max_preauth_input when that is set. */
static size_t in_limit(const im_server *s) {
  if (s->cfg.max_preauth_input) return s->cfg.max_preauth_input;
  return (size_t)s->cfg.max_message + WS_MAX_HDR;
}

static bool in_append(im_server *s, im_conn *c, const uint8_t *p, size_t n) {
  return bytes_append(s, &c->in, p, n, 256, 0);
}

static void in_drop(im_server *s, im_conn *c, size_t consumed) {
  im_bytes *b = c->in;
  if (consumed >= b->len) {
    im_dealloc(s, b);
    c->in = NULL;
    return;
  }
  memmove(b->data, b->data + consumed, b->len - consumed);
  b->len -= (uint32_t)consumed;
}

/* Process what c holds; it is dropped as consumed unless c was closed or
 * its buffer replaced meanwhile. */
static void process_held(im_server *s, im_conn *c) {
  im_bytes *b = c->in;
  size_t used = process(s, c, b->data, b->len);
  if (c->state != CS_CLOSED && c->in == b) in_drop(s, c, used);
}

/* Re-run buffered input (after a pending auth resolved). */
static void resume_input(im_server *s, im_conn *c) {
  if (bytes_len(c->in)) process_held(s, c);
}

int im_server_feed(im_server *s, im_conn_id id, void *buf, size_t len) {
  im_conn *c = conn_live(s, id);
  if (!c) return IM_ENOENT;
  if ((c->flags & CF_FLUSH_CLOSE) || (c->state == CS_CLOSING && c->transport == IM_TRANSPORT_TCP))
    return IM_ECLOSED;
  srv_enter(s);
  s->st.bytes_in += len;
  c->last_rx = (uint32_t)now_tick(s);
  if (bytes_len(c->in) || c->state == CS_AUTH_PENDING) {
    /* While auth is pending, input is held unprocessed: bound it. Otherwise
     * the carried partial frame is already bounded by the frame checks. */
    if (c->state == CS_AUTH_PENDING && bytes_len(c->in) + len > in_limit(s)) {
      conn_proto_fail(s, c, IM_CLOSE_TOO_BIG, "input over limit");
    } else if (!in_append(s, c, buf, len)) {
      conn_close(s, c, IM_CLOSE_INTERNAL, "out of memory", false);
    } else if (c->state != CS_AUTH_PENDING) {
      process_held(s, c);
    }
  } else {
    size_t used = process(s, c, buf, len);
    if (used < len && c->state != CS_CLOSED && !(c->flags & CF_FLUSH_CLOSE)) {
      if (!in_append(s, c, (uint8_t *)buf + used, len - used))
        conn_close(s, c, IM_CLOSE_INTERNAL, "out of memory", false);
    }
  }
  /* a WebSocket waiting for the peer's close frame still wants input */
  int rc = c->state == CS_CLOSED || (c->flags & CF_FLUSH_CLOSE) ? IM_ECLOSED : 0;
  srv_leave(s);
  return rc;
}

int im_auth_complete(im_server *s, im_conn_id id, int accept, int code, const char *reason) {
  im_conn *c = conn_live(s, id);
  if (!c) return IM_ENOENT;
  srv_enter(s);
  bool resume;
  int rc = auth_complete(s, c, accept, code, reason, &resume);
  if (resume) resume_input(s, c);
  srv_leave(s);
  return rc;
}
