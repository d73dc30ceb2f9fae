/* Sending: one message encoded once per wire format and queued on one
 * connection, every connection of some users, or every member of a room
 * (max_push_rate applies to rooms); routed copies for other nodes; room
 * membership calls. */
#include <string.h>

#include "core/abi.h"
#include "core/conn.h"
#include "core/reliable.h"


/* m itself when it has an id; else *copy with a fresh id written into id. */
static const im_msg *route_msg_with_id(im_server *s, const im_msg *m, im_msg *copy,
                                       char id[IM_ID_MAX]) {
  if (!(m = im__msg_in(m, copy)) || m->id) return m; /* NULL: struct_size too small */
  im_new_id(s, id);
  if (m != copy) *copy = *m;
  copy->id = id;
  return copy;
}

/* ---- sending --------------------------------------------------------------- */

/* Encode once per wire format, lazily (R16). */
typedef struct fanout {
  imp_packet pkt;
  im_buf *b[WIRE_N];
  bool reliable;
  bool rated;               /* a fan-out to many (room): max_push_rate applies */
  char id[24];
  im_msg msg;
} fanout;

static int fanout_init(im_server *s, fanout *f, const im_msg *m) {
  memset(f, 0, sizeof(*f));
  if (!(m = im__msg_in(m, &f->msg))) return IM_EINVAL; /* f->msg: an older layout's copy */
  f->pkt.op = IMP_OP_MSG;
  const char *id = m->id;
  if (!id) {
    im_new_id(s, f->id);
    id = f->id;
  }
  imp_set_str(&f->pkt, IMP_K_ID, id, strlen(id));
  f->reliable = m->flags & IM_SEND_RELIABLE;
  if (f->reliable && strlen(id) >= IM_ID_MAX) return IM_EINVAL;
  if (m->from) imp_set_str(&f->pkt, IMP_K_FROM, m->from, strlen(m->from));
  if (m->to) imp_set_str(&f->pkt, IMP_K_TO, m->to, strlen(m->to));
  if (m->group) imp_set_str(&f->pkt, IMP_K_GROUP, m->group, strlen(m->group));
  if (m->room) imp_set_str(&f->pkt, IMP_K_ROOM, m->room, strlen(m->room));
  if (m->ts) imp_set_num(&f->pkt, IMP_K_TS, m->ts);
  if (m->seq) imp_set_num(&f->pkt, IMP_K_SEQ, m->seq);
  if (m->data) imp_set_str(&f->pkt, IMP_K_DATA, m->data, m->data_len);
  /* data is bounded like upstream data; the envelope gets fixed headroom so
   * a maximal message can still be delivered. The JSON form is the longest
   * encoding: if it fits, every form does. It is measured only when a cheap
   * upper bound of it does not fit already (escaping makes a string at most
   * six times longer; the op, keys, quotes and two numbers take under 256
   * bytes): a measuring pass is a whole encoding. */
  if (m->data_len > s->cfg.max_message) return IM_ETOOBIG;
  size_t strs = 0;
  for (unsigned k = 1; k < IMP_K_MAX_; k++)
    if (imp_key_kind(k) == 'S') strs += f->pkt.str[k].n;
  size_t limit = (size_t)s->cfg.max_message + IM_ENVELOPE_MAX;
  if (256 + 6 * strs + m->data_len > limit && imp_json_encode(&f->pkt, NULL, 0) > limit)
    return IM_ETOOBIG;
  return 0;
}

/* How many members ahead a room fan-out prefetches. */
#define FANOUT_AHEAD 8

/* fanout_send: not queued on purpose (over max_push_rate); neither a
 * delivery nor an error of the fan-out. */
#define FANOUT_DROPPED 1

/* The push-rate bucket of c (max_push_rate): true when one more
 * non-reliable message may be queued now. */
static bool push_allowed(im_server *s, im_conn *c) {
  uint32_t rate = s->cfg.max_push_rate;
  if (!rate) return true;
  uint64_t burst = (uint64_t)(s->cfg.max_push_burst ? s->cfg.max_push_burst : 2 * rate) * 1000u;
  uint32_t now = (uint32_t)s->now_ms, dt = now - c->push_at;
  uint64_t tokens = c->push_tokens + (uint64_t)dt * rate;
  c->push_tokens = (uint32_t)(tokens > burst ? burst : tokens);
  c->push_at = now;
  if (c->push_tokens < 1000u) return false;
  c->push_tokens -= 1000u;
  return true;
}

static int fanout_send(im_server *s, fanout *f, im_conn *c) {
  if (c->state != CS_OPEN) return c->state >= CS_CLOSING ? IM_ECLOSED : IM_ESTATE;
  if (!f->reliable && f->rated && !push_allowed(s, c)) {
    s->st.push_dropped++;
    return FANOUT_DROPPED;
  }
  enum wire_kind w = conn_wire(c);
  if (!f->b[w] && !(f->b[w] = frame_packet(s, w, &f->pkt))) return IM_ENOMEM;
  const imp_str *id = &f->pkt.str[IMP_K_ID];
  int rc = f->reliable ? rel_send(s, c, f->b[w], id->p, id->n, f->pkt.num[IMP_K_SEQ]) : conn_queue(s, c, f->b[w]);
  if (rc == 0) s->st.msgs_out++;
  return rc;
}

static void fanout_done(im_server *s, fanout *f) {
  for (int i = 0; i < WIRE_N; i++) buf_unref(s, f->b[i]);
}

int im_send_conn(im_server *s, im_conn_id id, const im_msg *m) {
  im_conn *c = conn_live(s, id);
  if (!c) return IM_ENOENT;
  srv_enter(s);
  fanout f;
  int rc = fanout_init(s, &f, m);
  if (rc == 0) rc = fanout_send(s, &f, c);
  fanout_done(s, &f);
  srv_leave(s);
  return rc;
}

/* Queue f on every connection of uid but `except`; adds to *n. Returns 0 or
 * a code that stops the whole fan-out (the message cannot be encoded). */
static int fanout_user(im_server *s, fanout *f, const char *uid, im_conn_id except, int *n) {
  im_user *u = reg_user_find(s, uid, strlen(uid));
  for (im_conn *c = u ? u->conns : NULL, *next; c; c = next) {
    next = c->u_next; /* a shed connection leaves the list */
    if (c->id == except) continue;
    int r = fanout_send(s, f, c);
    if (r == 0)
      (*n)++;
    else if (r == IM_ETOOBIG || r == IM_ENOMEM)
      return r;
  }
  return 0;
}

int im_local_send_users(im_server *s, const char *const *uids, size_t nu, const im_msg *m,
                        im_conn_id except) {
  srv_enter(s);
  fanout f;
  int rc = fanout_init(s, &f, m), n = 0;
  for (size_t i = 0; rc == 0 && i < nu; i++) rc = fanout_user(s, &f, uids[i], except, &n);
  fanout_done(s, &f);
  srv_leave(s);
  return rc < 0 ? rc : n;
}

int im_send_users(im_server *s, const char *const *uids, size_t nu, const im_msg *m,
                  im_conn_id except) {
  if (!s->router.send_users) return im_local_send_users(s, uids, nu, m, except);
  im_msg routed;
  char id[IM_ID_MAX];
  if (!(m = route_msg_with_id(s, m, &routed, id))) return IM_EINVAL;
  int n = im_local_send_users(s, uids, nu, m, except);
  if (n < 0) return n;
  srv_enter(s);
  int rc = s->router.send_users(s, uids, nu, m, s->router.ud);
  srv_leave(s);
  return rc < 0 ? rc : n + rc;
}

int im_send_user(im_server *s, const char *uid, const im_msg *m, im_conn_id except) {
  return im_send_users(s, &uid, 1, m, except);
}

int im_local_room_send(im_server *s, const char *room, const im_msg *m, im_conn_id except) {
  im_room *r = reg_room_find(s, room, strlen(room));
  if (!r) return 0;
  srv_enter(s);
  fanout f;
  int rc = fanout_init(s, &f, m), n = 0;
  f.rated = true;
  reg_room_walk_begin(r);
  for (uint32_t i = 0; rc == 0 && i < r->n;) {
    /* the members' connections are apart in memory: ask for them early,
     * then (once a connection is in) for the tail of its output queue */
    if (i + FANOUT_AHEAD < r->n) __builtin_prefetch(r->m[i + FANOUT_AHEAD].conn);
    if (i + FANOUT_AHEAD / 2 < r->n) {
      const im_conn *p = r->m[i + FANOUT_AHEAD / 2].conn;
      if (p->out_tail) __builtin_prefetch(p->out_tail, 1);
    }
    im_conn *c = r->m[i].conn;
    if (c->id != except) {
      int x = fanout_send(s, &f, c);
      if (x == 0)
        n++;
      else if (x == IM_ETOOBIG || x == IM_ENOMEM)
        rc = x;
    }
    /* a shed member left the room: the last one moved into its slot */
    if (i < r->n && r->m[i].conn == c) i++;
  }
  reg_room_walk_end(s, r);
  fanout_done(s, &f);
  srv_leave(s);
  return rc < 0 ? rc : n;
}

int im_room_send(im_server *s, const char *room, const im_msg *m, im_conn_id except) {
  if (!s->router.room_send) return im_local_room_send(s, room, m, except);
  im_msg routed;
  char id[IM_ID_MAX];
  if (!(m = route_msg_with_id(s, m, &routed, id))) return IM_EINVAL;
  int n = im_local_room_send(s, room, m, except);
  if (n < 0) return n;
  srv_enter(s);
  int rc = s->router.room_send(s, room, m, s->router.ud);
  srv_leave(s);
  return rc < 0 ? rc : n + rc;
}

int im_room_join(im_server *s, im_conn_id id, const char *room) {
  im_conn *c = conn_live(s, id);
  if (!c) return IM_ENOENT;
  if (c->state != CS_OPEN) return IM_ESTATE;
  size_t n = strlen(room);
  if (n == 0 || n > ROOM_MAX) return IM_EINVAL;
  return reg_room_join(s, c, room, n);
}

int im_room_leave(im_server *s, im_conn_id id, const char *room) {
  im_conn *c = conn_live(s, id);
  if (!c) return IM_ENOENT;
  if (c->state != CS_OPEN) return IM_ESTATE;
  reg_room_leave(s, c, room, strlen(room));
  return 0;
}

int im_room_member(const im_server *s, im_conn_id id, const char *room) {
  im_conn *c = conn_live(s, id);
  im_room *r = c ? reg_room_find(s, room, strlen(room)) : NULL;
  for (room_member *m = c && r ? c->rooms : NULL; m; m = m->c_next)
    if (m->room == r) return 1;
  return 0;
}

size_t im_room_size(const im_server *s, const char *room) {
  im_room *r = reg_room_find(s, room, strlen(room));
  return r ? r->n : 0;
}

