/* IMP over TCP input: length-prefixed frames of binary IMP. */
#include "core/conn.h"
#include "core/dispatch.h"
#include "core/wire_in.h"
#include "proto/tcp_frame.h"

/* ---- TCP input -------------------------------------------------------------- */

size_t tcp_in_frames(im_server *s, im_conn *c, uint8_t *p, size_t n) {
  size_t off = 0;
  while (off < n && c->state < CS_CLOSING && c->state != CS_AUTH_PENDING) {
    const uint8_t *body;
    uint32_t blen;
    uint32_t pre = conn_preauth_limit(s, c);
    uint32_t max = pre && pre < s->cfg.max_message ? pre : s->cfg.max_message;
    long fl = tcp_frame_parse(p + off, n - off, max, &body, &blen);
    if (fl == TCP_FRAME_INCOMPLETE) break;
    if (fl < 0) {
      conn_proto_fail(s, c, fl == TCP_FRAME_E_TOO_BIG ? IM_CLOSE_TOO_BIG : IM_CLOSE_PROTOCOL,
                 fl != TCP_FRAME_E_TOO_BIG ? "empty frame"
                 : max < s->cfg.max_message ? "frame too big before authentication"
                                            : "frame too big");
      return n;
    }
    off += (size_t)fl;
    dispatch_message(s, c, true, body, blen);
  }
  if (c->state >= CS_CLOSING) return n;
  return off;
}

