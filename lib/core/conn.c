/* The connection table (ids, slots, generations), each connection's
 * output (queued with the max_output bound, notified to the driver) and
 * closing: close frame or error, shedding a slow reader, release. */
#include <string.h>

#include "core/conn.h"
#include "proto/ws_frame.h"

/* The router (im_router.h) hears of authenticated connections closing. */
static void route_conn_close(im_server *s, im_conn *c) {
  if (s->router.conn_close) s->router.conn_close(s, c->id, s->router.ud);
}

/* ---- connection table --------------------------------------------------- */

im_conn *conn_lookup(const im_server *s, im_conn_id id) {
  uint32_t slot = (uint32_t)id;
  if (slot == 0 || slot > s->nslots) return NULL;
  im_conn *c = s->slots[slot - 1];
  if (!c || c->id != id) return NULL;
  return c;
}

im_conn *conn_live(const im_server *s, im_conn_id id) {
  im_conn *c = conn_lookup(s, id);
  return c && c->state != CS_CLOSED ? c : NULL;
}

static int slot_alloc(im_server *s, uint32_t *out) {
  if (s->nfree) {
    *out = s->free_slots[--s->nfree];
    return 0;
  }
  if (s->nslots == s->cap) {
    uint32_t ncap = s->cap ? s->cap * 2 : 1024;
    im_conn **sl = im_realloc(s, s->slots, ncap * sizeof(*sl));
    if (!sl) return IM_ENOMEM;
    s->slots = sl;
    uint32_t *g = im_realloc(s, s->gens, ncap * sizeof(*g));
    if (!g) return IM_ENOMEM;
    s->gens = g;
    uint32_t *f = im_realloc(s, s->free_slots, ncap * sizeof(*f));
    if (!f) return IM_ENOMEM;
    s->free_slots = f;
    s->cap = ncap;
  }
  s->gens[s->nslots] = 0;
  s->slots[s->nslots] = NULL;
  *out = s->nslots++;
  return 0;
}

int conn_attach(im_server *s, im_conn *c) {
  uint32_t slot;
  if (slot_alloc(s, &slot) < 0) return IM_ENOMEM;
  uint64_t gen = ++s->gens[slot];
  if (s->id_shards > 1 && s->id_shards <= 64) /* the shard tags the id (im_server_set_id_shard) */
    gen = (gen & 0x3ffffffu) | ((uint64_t)s->id_shard << 26);
  c->id = (gen << 32) | (slot + 1);
  s->slots[slot] = c;
  return 0;
}

void conn_detach(im_server *s, im_conn *c) {
  uint32_t slot = (uint32_t)c->id - 1;
  if (s->slots[slot] == c) {
    s->slots[slot] = NULL;
    s->free_slots[s->nfree++] = slot;
  }
}

/* ---- closing ------------------------------------------------------------ */

void conn_release(im_server *s, im_conn *c) {
  if (c->state == CS_CLOSED) return;
  c->state = CS_CLOSED;
  tw_cancel(&s->wheel, &c->timer);
  if (c->rel) tw_cancel(&s->ack_wheel, &c->rel->timer);
  reg_room_leave_all(s, c);
  if (c->flags & CF_REGISTERED) {
    s->st.conns_authed--;
    route_conn_close(s, c);
  }
  reg_user_del(s, c);
  s->st.conns--;
  /* the dead list reuses u_next: reg_user_del cleared it */
  c->u_next = s->dead;
  s->dead = c;
}

void conn_finish(im_server *s, im_conn *c) {
  if (c->state == CS_CLOSED) return;
  if (s->io.close) s->io.close(s, c->id, c->io_ctx, s->io.io_user);
  conn_release(s, c);
}

/* ---- output ------------------------------------------------------------ */

bool conn_over_bound(const im_server *s, const im_conn *c, size_t len) {
  /* reliable messages waiting for window space count as queued output */
  uint64_t held = c->rel ? c->rel->wait_bytes : 0;
  return (uint64_t)c->out_bytes + held + len > s->cfg.max_output;
}

/* Queue b on c, notifying the driver when the queue was empty. Over the
 * bound, the connection is shed. */
int conn_queue(im_server *s, im_conn *c, im_buf *b) {
  if (c->state == CS_CLOSED) return IM_ECLOSED;
  if (conn_over_bound(s, c, b->len)) {
    conn_shed(s, c);
    return IM_EFULL;
  }
  int rc = outq_push(s, c, b);
  if (rc < 0) return rc;
  if (!(c->flags & CF_NOTIFIED)) {
    c->flags |= CF_NOTIFIED;
    if (s->io.want_write) s->io.want_write(s, c->id, c->io_ctx, s->io.io_user);
  }
  return 0;
}

int conn_queue_new(im_server *s, im_conn *c, im_buf *b) {
  if (!b) return IM_ENOMEM;
  int rc = conn_queue(s, c, b);
  buf_unref(s, b);
  return rc;
}

int conn_send_packet(im_server *s, im_conn *c, const imp_packet *p) {
  return conn_queue_new(s, c, frame_packet(s, conn_wire(c), p));
}

int conn_send_error(im_server *s, im_conn *c, int code, const char *reason, const imp_str *cid) {
  imp_packet p = {.op = IMP_OP_ERROR};
  imp_set_num(&p, IMP_K_CODE, (uint64_t)code);
  imp_set_str(&p, IMP_K_REASON, reason, strlen(reason));
  if (cid && cid->p) imp_set_str(&p, IMP_K_CID, cid->p, cid->n);
  return conn_send_packet(s, c, &p);
}

void conn_close(im_server *s, im_conn *c, int code, const char *reason, bool wait_peer) {
  if (c->state >= CS_CLOSING) return;
  /* before the 101 there is no WebSocket to send a close frame on */
  bool handshake = c->state == CS_HANDSHAKE || (c->flags & CF_UPGRADE_AUTH);
  c->state = CS_CLOSING;
  c->close_code = (uint16_t)code;
  if (!reason) reason = "";
  size_t rl = strlen(reason);
  if (rl > 123) {
    rl = 123;
    while (rl > 0 && ((unsigned char)reason[rl] & 0xc0) == 0x80) rl--; /* keep UTF-8 whole */
  }
  if (handshake) {
    /* no WebSocket yet: drop the connection */
  } else if (c->transport == IM_TRANSPORT_WS) {
    uint8_t pl[125];
    pl[0] = (uint8_t)(code >> 8);
    pl[1] = (uint8_t)code;
    memcpy(pl + 2, reason, rl);
    conn_queue_new(s, c, frame_ws(s, WS_OP_CLOSE, pl, rl + 2));
  } else {
    conn_send_error(s, c, code, reason, NULL);
  }
  if (c->state == CS_CLOSED) return;
  if (!wait_peer || c->transport != IM_TRANSPORT_WS || handshake || (c->flags & CF_CLOSE_RCVD))
    c->flags |= CF_FLUSH_CLOSE;
  tw_schedule(&s->wheel, &c->timer, now_tick(s) + ms_to_ticks(s, s->cfg.close_timeout_ms));
  if ((c->flags & CF_FLUSH_CLOSE) && !c->out_head) conn_finish(s, c);
}

void conn_shed(im_server *s, im_conn *c) {
  if (c->state >= CS_CLOSING) {
    /* already closing: its close frame may itself not fit; just drop it */
    outq_clear(s, c, true);
    c->flags |= CF_FLUSH_CLOSE;
    if (!c->out_head) conn_finish(s, c);
    return;
  }
  s->st.shed++;
  outq_clear(s, c, true);
  if (c->flags & CF_HS_UNSENT) {
    /* the 101 never fully left: a close frame now would follow a dropped or
     * truncated upgrade response, so just drop the connection */
    c->state = CS_CLOSING;
    c->close_code = IM_CLOSE_SHED;
    c->flags |= CF_FLUSH_CLOSE;
    tw_schedule(&s->wheel, &c->timer, now_tick(s) + ms_to_ticks(s, s->cfg.close_timeout_ms));
    if (!c->out_head) conn_finish(s, c);
    return;
  }
  conn_close(s, c, IM_CLOSE_SHED, "output bound exceeded", false);
}

void conn_proto_fail(im_server *s, im_conn *c, int code, const char *reason) {
  s->st.proto_errors++;
  conn_close(s, c, code, reason, false);
}

/* ---- timers ------------------------------------------------------------- */

void conn_timer_at(im_server *s, im_conn *c, uint64_t due) {
  if (c->expire_tick && (!due || c->expire_tick < due)) due = c->expire_tick;
  if (due)
    tw_schedule(&s->wheel, &c->timer, due);
  else
    tw_cancel(&s->wheel, &c->timer); /* heartbeat 0 and idle_timeout 0: no idle check */
}
