/* The IMP dispatcher: a decoded op goes to its handler (msg with rate
 * limits and cid de-duplication, ack, sync, join/leave, ping) or is
 * refused; and the replies an application sends on a connection (im_ack,
 * im_sync_end, im_conn_goaway, im_reply_error). */
#include <string.h>

#include "core/auth.h"
#include "core/conn.h"
#include "core/dedupe.h"
#include "core/dispatch.h"
#include "core/reliable.h"
#include "core/shared.h"

static int send_ack(im_server *s, im_conn *c, const char *cid, size_t cidlen, const char *id,
                    uint64_t seq) {
  imp_packet a = {.op = IMP_OP_ACK};
  if (cid) imp_set_str(&a, IMP_K_CID, cid, cidlen);
  if (id) imp_set_str(&a, IMP_K_ID, id, strlen(id));
  if (seq) imp_set_num(&a, IMP_K_SEQ, seq);
  return conn_send_packet(s, c, &a);
}

/* Charge one msg to c and its user; false when either is over its rate
 * (then neither is charged). Without memory for c's rate state the msg is
 * let through uncharged. */
static bool rate_admit(im_server *s, im_conn *c) {
  im_rel *r = rel_get(s, c);
  if (!r) return true;
  uint64_t now_us = s->now_ms * 1000u, cn = r->rate_tat, un = c->user ? c->user->rate_tat : 0;
  if (s->cfg.max_msg_rate && !gcra_fits(r->rate_tat, now_us, s->cfg.max_msg_rate, &cn))
    return false;
  if (s->cfg.max_user_msg_rate && c->user && c->user->sh) { /* the uid's bucket of all engines */
    if (!shared_user_charge(c->user->sh, (s->t0 + s->now_ms) * 1000u, s->cfg.max_user_msg_rate))
      return false;
  } else if (s->cfg.max_user_msg_rate && c->user &&
             !gcra_fits(c->user->rate_tat, now_us, s->cfg.max_user_msg_rate, &un)) {
    return false;
  }
  r->rate_tat = cn;
  if (c->user) c->user->rate_tat = un;
  return true;
}

/* A msg over the rate (rate_admit gave c its im_rel): refused; persistent
 * excess closes the connection. */
static void rate_refuse(im_server *s, im_conn *c, const imp_str *cid) {
  im_rel *r = c->rel;
  s->st.rate_limited++;
  if (s->now_ms - r->strike_ms >= 10000 || !r->strikes) {
    r->strike_ms = s->now_ms;
    r->strikes = 0;
  }
  if (s->cfg.max_rate_strikes && ++r->strikes > s->cfg.max_rate_strikes) {
    s->st.rate_closed++;
    conn_send_error(s, c, 429, "rate limit exceeded", cid);
    conn_close(s, c, IM_CLOSE_RATE, "rate limit exceeded", false);
    return;
  }
  conn_send_error(s, c, 429, "rate limit exceeded", cid);
}

static void on_msg_op(im_server *s, im_conn *c, const imp_packet *p) {
  const imp_str *cid = IMP_HAS(p, IMP_K_CID) ? &p->str[IMP_K_CID] : NULL;
  if (!cid) {
    conn_send_error(s, c, 400, "missing cid", NULL);
    return;
  }
  if (!IMP_HAS(p, IMP_K_DATA)) {
    conn_send_error(s, c, 400, "missing data", cid);
    return;
  }
  s->st.msgs_in++;
  dd_entry *dd = dd_find(s, c, cid->p, cid->n);
  if (dd) {
    /* a client retransmit: answer it like the original, deliver nothing */
    s->st.dups++;
    if (dd->state == DD_ACKED) send_ack(s, c, cid->p, cid->n, dd->id, dd->seq);
    return;
  }
  if ((s->cfg.max_msg_rate || s->cfg.max_user_msg_rate) && !rate_admit(s, c)) {
    rate_refuse(s, c, cid);
    return;
  }
  dd = dd_add(s, c, cid->p, cid->n);
  size_t used = 0;
  char id[24];
  im_new_id(s, id);
  im_msg m = {IM_STRUCT_SIZE(im_msg)};
  m.id = id;
  m.cid = srv_field(s, p, IMP_K_CID, &used);
  m.to = srv_field(s, p, IMP_K_TO, &used);
  m.group = srv_field(s, p, IMP_K_GROUP, &used);
  m.room = srv_field(s, p, IMP_K_ROOM, &used);
  m.seq = IMP_HAS(p, IMP_K_SEQ) ? p->num[IMP_K_SEQ] : 0;
  m.ts = IMP_HAS(p, IMP_K_TS) ? p->num[IMP_K_TS] : 0;
  m.data = p->str[IMP_K_DATA].p;
  m.data_len = p->str[IMP_K_DATA].n;
  int v = s->cb.on_message ? s->cb.on_message(s, c->id, &m, s->user) : IM_MSG_ACK;
  if (v == IM_MSG_ACK && c->state == CS_OPEN) {
    if (dd) dd_acked(dd, id, 0);
    send_ack(s, c, cid->p, cid->n, id, 0);
  }
}

const char *im_op_cid(const im_server *s) { return s->op_cid; }

static void on_room_op(im_server *s, im_conn *c, const imp_packet *p, int join) {
  const imp_str *cid = IMP_HAS(p, IMP_K_CID) ? &p->str[IMP_K_CID] : NULL;
  const imp_str *r = &p->str[IMP_K_ROOM];
  if (!IMP_HAS(p, IMP_K_ROOM) || r->n == 0 || r->n > ROOM_MAX) {
    conn_send_error(s, c, 400, "missing or bad room", cid);
    return;
  }
  size_t used = 0;
  const char *room = srv_field(s, p, IMP_K_ROOM, &used);
  s->op_cid = srv_field(s, p, IMP_K_CID, &used);
  int code = s->cb.on_room ? s->cb.on_room(s, c->id, room, join, s->user) : 0;
  s->op_cid = NULL;
  if (c->state != CS_OPEN || code == IM_ROOM_DEFER) return;
  if (code) {
    conn_send_error(s, c, code, join ? "join refused" : "leave refused", cid);
    return;
  }
  int rc = join ? reg_room_join(s, c, room, r->n) : (reg_room_leave(s, c, room, r->n), 0);
  if (rc < 0) {
    conn_send_error(s, c, rc == IM_ELIMIT ? 429 : 500,
               rc == IM_ELIMIT ? "too many rooms" : "out of memory", cid);
    return;
  }
  if (cid) {
    imp_packet a = {.op = IMP_OP_ACK};
    imp_set_str(&a, IMP_K_CID, cid->p, cid->n);
    conn_send_packet(s, c, &a);
  }
}

static void dispatch(im_server *s, im_conn *c, const imp_packet *p) {
  const imp_str *cid = IMP_HAS(p, IMP_K_CID) ? &p->str[IMP_K_CID] : NULL;
  switch (p->op) {
    case IMP_OP_PING: {
      imp_packet pong = {.op = IMP_OP_PONG};
      conn_send_packet(s, c, &pong);
      return;
    }
    case IMP_OP_PONG:
      return;
    case IMP_OP_AUTH:
      auth_on_op(s, c, p);
      return;
    default:
      break;
  }
  if (c->state != CS_OPEN) {
    conn_send_error(s, c, 401, "authenticate first", cid);
    return;
  }
  switch (p->op) {
    case IMP_OP_MSG:
      on_msg_op(s, c, p);
      break;
    case IMP_OP_ACK:
      if (!IMP_HAS(p, IMP_K_ID)) {
        conn_send_error(s, c, 400, "missing id", cid);
      } else {
        const imp_str *id = &p->str[IMP_K_ID];
        uint64_t seq = IMP_HAS(p, IMP_K_SEQ) ? p->num[IMP_K_SEQ] : 0;
        int64_t rtt = -1;
        rel_ack(s, c, id->p, id->n, &seq, &rtt);
        if (s->cb.on_ack) {
          size_t used = 0;
          s->ack_rtt = &rtt; /* im_ack_rtt_us */
          s->cb.on_ack(s, c->id, srv_field(s, p, IMP_K_ID, &used), seq, s->user);
          s->ack_rtt = NULL;
        }
      }
      break;
    case IMP_OP_SYNC:
      if (!s->cb.on_sync) {
        conn_send_error(s, c, 501, "sync not supported", cid);
      } else {
        uint64_t lim = IMP_HAS(p, IMP_K_LIMIT) ? p->num[IMP_K_LIMIT] : 0;
        s->cb.on_sync(s, c->id, IMP_HAS(p, IMP_K_SINCE) ? p->num[IMP_K_SINCE] : 0,
                      lim > UINT32_MAX ? UINT32_MAX : (uint32_t)lim, s->user);
      }
      break;
    case IMP_OP_JOIN:
    case IMP_OP_LEAVE:
      on_room_op(s, c, p, p->op == IMP_OP_JOIN);
      break;
    default:
      conn_send_error(s, c, 400, "unsupported op", cid);
      break;
  }
}

static const char *imp_err_text(int rc) {
  switch (rc) {
    case IMP_E_OP: return "missing or unknown op";
    case IMP_E_TYPE: return "field of the wrong type";
    case IMP_E_UTF8: return "invalid UTF-8";
    case IMP_E_SPACE: return "message too large";
    default: return "malformed message";
  }
}

/* One complete application message (a WebSocket message or TCP frame body). */
void dispatch_message(im_server *s, im_conn *c, bool binary, const uint8_t *p, size_t n) {
  imp_packet pkt;
  int rc = binary ? imp_bin_decode(p, n, &pkt)
                  : imp_json_decode((const char *)p, n, &pkt, s->scratch, s->cfg.max_message);
  if (rc != IMP_OK) {
    conn_send_error(s, c, 400, imp_err_text(rc), NULL);
    return;
  }
  dispatch(s, c, &pkt);
}

int im_ack(im_server *s, im_conn_id id, const char *cid, const char *msg_id, uint64_t seq) {
  im_conn *c = conn_live(s, id);
  if (!c) return IM_ENOENT;
  if (c->state != CS_OPEN) return IM_ECLOSED;
  srv_enter(s);
  size_t cl = cid ? strlen(cid) : 0;
  dd_entry *dd = cid ? dd_find(s, c, cid, cl) : NULL;
  if (dd && msg_id)
    dd_acked(dd, msg_id, seq);
  else if (dd)
    dd->state = DD_FREE; /* nothing to repeat: a retry is processed again */
  int rc = send_ack(s, c, cid, cl, msg_id, seq);
  srv_leave(s);
  return rc;
}

/* Send p on the open connection id, as a public entry point: returns like
 * conn_send_packet, or IM_ENOENT / IM_ECLOSED. */
static int send_open(im_server *s, im_conn_id id, const imp_packet *p) {
  im_conn *c = conn_live(s, id);
  if (!c) return IM_ENOENT;
  if (c->state != CS_OPEN) return IM_ECLOSED;
  srv_enter(s);
  int rc = conn_send_packet(s, c, p);
  srv_leave(s);
  return rc;
}

int im_sync_end(im_server *s, im_conn_id id, uint64_t last, int more, int gap) {
  imp_packet p = {.op = IMP_OP_SYNC_END};
  imp_set_num(&p, IMP_K_LAST, last);
  imp_set_num(&p, IMP_K_MORE, more != 0);
  if (gap) imp_set_num(&p, IMP_K_GAP, 1);
  return send_open(s, id, &p);
}

int im_conn_goaway(im_server *s, im_conn_id id, uint32_t reconnect_ms, const char *reason) {
  imp_packet p = {.op = IMP_OP_GOAWAY};
  imp_set_num(&p, IMP_K_RECONNECT_MS, reconnect_ms);
  if (reason && *reason) imp_set_str(&p, IMP_K_REASON, reason, strlen(reason));
  return send_open(s, id, &p);
}

int im_reply_error(im_server *s, im_conn_id id, int code, const char *reason, const char *cid) {
  im_conn *c = conn_live(s, id);
  if (!c) return IM_ENOENT;
  if (c->state >= CS_CLOSING) return IM_ECLOSED;
  /* before the 101 there is no WebSocket stream to put an error on */
  if (c->state == CS_HANDSHAKE || (c->flags & CF_UPGRADE_AUTH)) return IM_ESTATE;
  srv_enter(s);
  imp_str cs = {cid, cid ? (uint32_t)strlen(cid) : 0};
  dd_entry *dd = cid ? dd_find(s, c, cid, cs.n) : NULL;
  if (dd && dd->state == DD_PENDING) dd->state = DD_FREE; /* a retry is processed again */
  int rc = conn_send_error(s, c, code, reason ? reason : "", cid ? &cs : NULL);
  srv_leave(s);
  return rc;
}
