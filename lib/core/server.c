/* The engine: connection table and state machine, WebSocket/TCP input
 * processing, the IMP dispatcher, timeouts and the send paths. No I/O:
 * bytes come in through im_server_feed() and leave through im_conn_pending()
 * and the im_io hooks. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/abi.h"
#include "core/engine.h"
#include "proto/tcp_frame.h"
#include "proto/utf8.h"
#include "proto/ws_frame.h"
#include "proto/ws_handshake.h"

#define UID_MAX 128u
#define ROOM_MAX 128u
#define WS_MAX_HDR 14u

static void *std_malloc(size_t n, void *ud) { (void)ud; return malloc(n); }
static void *std_calloc(size_t n, size_t m, void *ud) { (void)ud; return calloc(n, m); }
static void *std_realloc(void *p, size_t n, void *ud) { (void)ud; return realloc(p, n); }
static void std_free(void *p, void *ud) { (void)ud; free(p); }

int im_config_init_size(im_config *out, size_t size) {
  im_config def, *cfg = &def;
  memset(cfg, 0, sizeof(*cfg));
  cfg->max_message = 64 * 1024;
  cfg->max_output = 1024 * 1024;
  cfg->auth_timeout_ms = 10000;
  cfg->heartbeat_s = 30;
  cfg->close_timeout_ms = 3000;
  cfg->tick_ms = 100;
  cfg->ws_path = "/ws";
  cfg->ack_timeout_ms = 18000;
  cfg->ack_retries = 3;
  cfg->max_inflight = 128;
  cfg->dedupe_window = 32;
  cfg->max_rooms = 64;
  cfg->max_preauth_input = 8192;
  cfg->max_conns_per_user = 32;
  return im__config_out(out, size, cfg);
}

/* The preauth limit for a connection in its current state (0: none). */
static uint32_t preauth_limit(const im_server *s, const im_conn *c) {
  return c->state < CS_OPEN ? s->cfg.max_preauth_input : 0;
}

static uint64_t rng_next(im_server *s) {
  /* xorshift64*: jitter only, not security */
  uint64_t x = s->rng;
  x ^= x >> 12;
  x ^= x << 25;
  x ^= x >> 27;
  s->rng = x;
  return x * 0x2545F4914F6CDD1DULL;
}

static uint64_t ms_to_ticks(const im_server *s, uint64_t ms) {
  return (ms + s->cfg.tick_ms - 1) / s->cfg.tick_ms;
}

uint64_t now_tick(const im_server *s) { return s->now_ms / s->cfg.tick_ms; }

/* The router (im_router.h) hears of connections opening and closing; a
 * routed send needs its id before it leaves (the remote copies carry the
 * same one). */
static void route_conn_open(im_server *s, im_conn *c) {
  if (s->router.conn_open) s->router.conn_open(s, c->id, s->router.ud);
}

static void route_conn_close(im_server *s, im_conn *c) {
  if (s->router.conn_close) s->router.conn_close(s, c->id, s->router.ud);
}

static void next_id(im_server *s, char out[24]);

/* m itself when it has an id; else *copy with a fresh id written into id. */
static const im_msg *route_msg_with_id(im_server *s, const im_msg *m, im_msg *copy,
                                       char id[IM_ID_MAX]) {
  if (!(m = im__msg_in(m, copy)) || m->id) return m; /* NULL: struct_size too small */
  next_id(s, id);
  if (m != copy) *copy = *m;
  copy->id = id;
  return copy;
}

im_server *im_server_new(const im_config *cfg, const im_callbacks *cb, void *user) {
  im_config def;
  im_callbacks cb_tmp;
  im_config_init(&def);
  cfg = cfg ? im__config_in(cfg, &def) : &def;
  if (cb && !(cb = im__callbacks_in(cb, &cb_tmp))) return NULL;
  if (!cfg || cfg->tick_ms == 0 || cfg->max_message < 16 || cfg->node_id > 1023) return NULL;
  const im_allocator *a = cfg->alloc;
  im_allocator al = {std_malloc, std_calloc, std_realloc, std_free, NULL};
  if (a && a->malloc && a->calloc && a->realloc && a->free) al = *a;
  im_server *s = al.calloc(1, sizeof(*s), al.ud);
  if (!s) return NULL;
  s->cfg = *cfg;
  s->cfg.struct_size = sizeof(s->cfg);
  s->alloc = al;
  if (cb) s->cb = *cb;
  s->cb.struct_size = sizeof(s->cb);
  s->user = user;
  if (cfg->ws_path) {
    size_t pl = strlen(cfg->ws_path) + 1;
    char *path = im_alloc(s, pl);
    if (!path) {
      al.free(s, al.ud);
      return NULL;
    }
    memcpy(path, cfg->ws_path, pl);
    s->cfg.ws_path = path;
  }
  if (s->cfg.idle_timeout_ms == 0) s->cfg.idle_timeout_ms = s->cfg.heartbeat_s * 2500u;
  s->idle_ticks = (uint32_t)ms_to_ticks(s, s->cfg.idle_timeout_ms);
  if (s->cfg.ack_timeout_ms == 0) s->cfg.ack_timeout_ms = 18000;
  if (s->cfg.max_inflight == 0) s->cfg.max_inflight = 128;
  s->ack_ticks = (uint32_t)ms_to_ticks(s, s->cfg.ack_timeout_ms);
  s->fields_cap = (size_t)s->cfg.max_message + 64;
  s->scratch = im_alloc(s, s->cfg.max_message);
  s->fields = im_alloc(s, s->fields_cap);
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  s->id_wall0 = (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
  s->rng = (s->id_wall0 ^ (uintptr_t)s) | 1u;
  if (!s->scratch || !s->fields || strmap_init(&s->users, 1024) < 0 ||
      strmap_init(&s->rooms, 64) < 0 || tw_init(&s->wheel, 4096, 0) < 0 ||
      tw_init(&s->ack_wheel, 1024, 0) < 0) {
    im_server_free(s);
    return NULL;
  }
  return s;
}

void im_server_set_io(im_server *s, const im_io *io) { s->io = *io; }
void *im_server_user(const im_server *s) { return s->user; }
const im_config *im_server_config(const im_server *s) { return &s->cfg; }

static void conn_free(im_server *s, im_conn *c);

void im_server_free(im_server *s) {
  if (!s) return;
  for (uint32_t i = 0; i < s->nslots; i++)
    if (s->slots[i]) conn_free(s, s->slots[i]);
  while (s->dead) {
    im_conn *c = s->dead;
    s->dead = c->u_next;
    conn_free(s, c);
  }
  im_dealloc(s, s->slots);
  im_dealloc(s, s->gens);
  im_dealloc(s, s->free_slots);
  guard_free(s);
  strmap_free(&s->users);
  strmap_free(&s->rooms);
  tw_free(&s->wheel);
  tw_free(&s->ack_wheel);
  outq_pool_free(s);
  im_dealloc(s, s->scratch);
  im_dealloc(s, s->fields);
  im_dealloc(s, (char *)s->cfg.ws_path);
  im_dealloc(s, s);
}

/* ---- connection table --------------------------------------------------- */

im_conn *conn_lookup(const im_server *s, im_conn_id id) {
  uint32_t slot = (uint32_t)id;
  if (slot == 0 || slot > s->nslots) return NULL;
  im_conn *c = s->slots[slot - 1];
  if (!c || c->id != id) return NULL;
  return c;
}

/* A live connection: known and not yet released. */
static im_conn *conn_live(const im_server *s, im_conn_id id) {
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

static void conn_free(im_server *s, im_conn *c) {
  uint32_t slot = (uint32_t)c->id - 1;
  if (s->slots[slot] == c) {
    s->slots[slot] = NULL;
    s->free_slots[s->nfree++] = slot;
  }
  tw_cancel(&s->wheel, &c->timer);
  guard_release(s, c->peer);
  rel_free(s, c);
  reg_room_leave_all(s, c);
  reg_user_del(s, c);
  outq_clear(s, c, false);
  if (c->hs) ws_hs_free(c->hs);
  im_dealloc(s, c->in);
  im_dealloc(s, c->msg);
  im_dealloc(s, c->ident);
  im_dealloc(s, c);
}

/* Enter / leave a public entry point; connections closed inside are
 * released (on_close, then free) only when the outermost call returns, so
 * no callback ever sees its connection's memory disappear under it. */
static void enter(im_server *s) { s->depth++; }

static void leave(im_server *s) {
  if (s->depth > 1) {
    s->depth--;
    return;
  }
  while (s->dead) {
    im_conn *c = s->dead;
    s->dead = c->u_next;
    c->u_next = NULL;
    rel_undelivered(s, c);
    if (s->cb.on_close) s->cb.on_close(s, c->id, c->close_code ? c->close_code : 1006, s->user);
    conn_free(s, c);
  }
  s->depth--;
}

/* Mark c closed: unregister now (it must not receive more sends) and queue
 * the release. */
static void conn_release(im_server *s, im_conn *c) {
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

/* Output is flushed on a closing connection: have the driver close it. */
static void conn_finish(im_server *s, im_conn *c) {
  if (c->state == CS_CLOSED) return;
  if (s->io.close) s->io.close(s, c->id, c->io_ctx, s->io.io_user);
  conn_release(s, c);
}

/* ---- output ------------------------------------------------------------ */

static enum wire_kind conn_wire(const im_conn *c) {
  if (c->transport == IM_TRANSPORT_TCP) return WIRE_TCP;
  return c->binary ? WIRE_WS_BIN : WIRE_WS_TEXT;
}

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

static int conn_queue_new(im_server *s, im_conn *c, im_buf *b) {
  if (!b) return IM_ENOMEM;
  int rc = conn_queue(s, c, b);
  buf_unref(s, b);
  return rc;
}

static int send_packet(im_server *s, im_conn *c, const imp_packet *p) {
  return conn_queue_new(s, c, frame_packet(s, conn_wire(c), p));
}

static int send_error(im_server *s, im_conn *c, int code, const char *reason, const imp_str *cid) {
  imp_packet p = {.op = IMP_OP_ERROR};
  imp_set_num(&p, IMP_K_CODE, (uint64_t)code);
  imp_set_str(&p, IMP_K_REASON, reason, strlen(reason));
  if (cid && cid->p) imp_set_str(&p, IMP_K_CID, cid->p, cid->n);
  return send_packet(s, c, &p);
}

/* Start closing c with code. For WebSocket a close frame is queued; for TCP
 * an IMP error op. When `wait_peer`, a WebSocket waits (close_timeout) for
 * the peer's close frame; otherwise the transport closes once flushed. */
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
    send_error(s, c, code, reason, NULL);
  }
  if (c->state == CS_CLOSED) return;
  if (!wait_peer || c->transport != IM_TRANSPORT_WS || handshake || (c->flags & CF_CLOSE_RCVD))
    c->flags |= CF_FLUSH_CLOSE;
  tw_schedule(&s->wheel, &c->timer, now_tick(s) + ms_to_ticks(s, s->cfg.close_timeout_ms));
  if ((c->flags & CF_FLUSH_CLOSE) && !c->out_head) conn_finish(s, c);
}

/* A slow reader hit max_output: drop what is queued (keeping a partially
 * written frame so the stream stays well-formed) and close. */
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

static void proto_fail(im_server *s, im_conn *c, int code, const char *reason) {
  s->st.proto_errors++;
  conn_close(s, c, code, reason, false);
}

static void http_reject(im_server *s, im_conn *c, int status, const char *reason) {
  char resp[512];
  size_t n = ws_hs_error_response(status, reason, resp, sizeof resp);
  if (n > sizeof resp) n = sizeof resp;
  im_buf *b = buf_new(s, n);
  if (b) memcpy(b->data, resp, n);
  conn_queue_new(s, c, b);
  c->close_code = (uint16_t)(status == 403 ? IM_CLOSE_AUTH_FAILED : IM_CLOSE_PROTOCOL);
  c->state = CS_CLOSING;
  c->flags |= CF_FLUSH_CLOSE;
  tw_schedule(&s->wheel, &c->timer, now_tick(s) + ms_to_ticks(s, s->cfg.close_timeout_ms));
  if (!c->out_head) conn_finish(s, c);
}

/* ---- message ids ------------------------------------------------------- */

/* With a shared id clock (im_server_set_id_clock): an id above every id
 * any server sharing it minted before, in this server's shard. */
static uint64_t shared_clock_id(im_server *s, uint64_t id, uint32_t step) {
  uint64_t seen = __atomic_load_n(s->id_clock, __ATOMIC_ACQUIRE);
  while (id <= seen) {
    uint64_t ms = seen >> 22, c = seen & 0xfff;
    uint64_t next = c - c % step + s->id_shard;
    if (next <= c) next += step;
    if (next >= 4096) {
      ms++;
      next = s->id_shard;
    }
    s->id_last_ms = ms;
    s->id_counter = (uint32_t)next;
    id = (ms << 22) | ((uint64_t)s->cfg.node_id << 12) | next;
  }
  while (seen < id && !__atomic_compare_exchange_n(s->id_clock, &seen, id, true, __ATOMIC_ACQ_REL,
                                                   __ATOMIC_ACQUIRE)) {
  }
  return id;
}

/* Snowflake-style: 41 bits of milliseconds, 10 of node, 12 of counter;
 * the millisecond part never goes back, so ids grow and stay unique. */
static void next_id(im_server *s, char out[24]) {
  uint64_t ms = s->id_wall0 + s->now_ms - 1700000000000ULL;
  /* a shard (im_server_set_id_shard) takes every id_shards-th counter */
  uint32_t step = s->id_shards ? s->id_shards : 1;
  if (ms > s->id_last_ms) {
    s->id_last_ms = ms;
    s->id_counter = s->id_shard;
  } else if ((s->id_counter += step) >= 4096) {
    s->id_last_ms++;
    s->id_counter = s->id_shard;
  }
  uint64_t id = (s->id_last_ms << 22) | ((uint64_t)s->cfg.node_id << 12) | s->id_counter;
  if (s->id_clock) id = shared_clock_id(s, id, step);
  snprintf(out, 24, "%" PRIu64, id);
}

void im_new_id(im_server *s, char out[IM_ID_MAX]) { next_id(s, out); }

/* ---- accept / hangup ----------------------------------------------------- */

im_conn_id im_server_accept(im_server *s, enum im_transport t, const char *peer, void *io_ctx) {
  if (t != IM_TRANSPORT_WS && t != IM_TRANSPORT_TCP) return 0;
  if (s->cfg.max_connections && s->st.conns >= s->cfg.max_connections) return 0;
  if (!guard_admit(s, peer)) return 0;
  im_conn *c = im_zalloc(s, sizeof(*c));
  if (c && t == IM_TRANSPORT_WS && !(c->hs = ws_hs_new(s->cfg.ws_path))) {
    im_dealloc(s, c);
    c = NULL;
  }
  uint32_t slot;
  if (c && slot_alloc(s, &slot) < 0) {
    if (c->hs) ws_hs_free(c->hs);
    im_dealloc(s, c);
    c = NULL;
  }
  if (!c) {
    guard_release(s, peer);
    return 0;
  }
  uint64_t gen = ++s->gens[slot];
  if (s->id_shards > 1 && s->id_shards <= 64) /* the shard tags the id (im_server_set_id_shard) */
    gen = (gen & 0x3ffffffu) | ((uint64_t)s->id_shard << 26);
  c->id = (gen << 32) | (slot + 1);
  s->slots[slot] = c;
  c->transport = (uint8_t)t;
  c->binary = t == IM_TRANSPORT_TCP;
  c->state = t == IM_TRANSPORT_WS ? CS_HANDSHAKE : CS_AUTH;
  c->io_ctx = io_ctx;
  c->since_ms = s->now_ms;
  c->last_rx = (uint32_t)now_tick(s);
  c->utf8 = UTF8_ACCEPT;
  if (peer) snprintf(c->peer, sizeof c->peer, "%s", peer);
  tw_entry_init(&c->timer);
  tw_schedule(&s->wheel, &c->timer, now_tick(s) + ms_to_ticks(s, s->cfg.auth_timeout_ms));
  s->st.conns++;
  return c->id;
}

int im_server_hangup(im_server *s, im_conn_id id) {
  im_conn *c = conn_live(s, id);
  if (!c) return IM_ENOENT;
  enter(s);
  if (!c->close_code) c->close_code = 1006;
  conn_release(s, c);
  leave(s);
  return 0;
}

/* ---- authentication ------------------------------------------------------ */

/* Schedule an open connection's timer at `due` (its idle deadline; 0 =
 * none), or at its expiry deadline when that comes first. */
static void open_timer_at(im_server *s, im_conn *c, uint64_t due) {
  if (c->expire_tick && (!due || c->expire_tick < due)) due = c->expire_tick;
  if (due)
    tw_schedule(&s->wheel, &c->timer, due);
  else
    tw_cancel(&s->wheel, &c->timer); /* heartbeat 0 and idle_timeout 0: no idle check */
}

static void set_auth_timer_idle(im_server *s, im_conn *c) {
  if (s->idle_ticks == 0) {
    open_timer_at(s, c, 0);
    return;
  }
  /* first idle deadline jittered by up to 1/8 so a mass reconnect does not
   * time out in lockstep (R8) */
  uint64_t jitter = s->idle_ticks >= 8 ? rng_next(s) % (s->idle_ticks / 8) : 0;
  open_timer_at(s, c, (uint64_t)c->last_rx + s->idle_ticks + jitter);
}

int im_conn_set_expiry(im_server *s, im_conn_id id, uint64_t after_ms) {
  im_conn *c = conn_live(s, id);
  if (!c) return IM_ENOENT;
  if (c->state >= CS_CLOSING) return IM_ECLOSED;
  c->expire_tick = after_ms ? now_tick(s) + (ms_to_ticks(s, after_ms) ? ms_to_ticks(s, after_ms) : 1)
                            : 0;
  /* before the connection opens the timer is the auth timeout: the
   * deadline is taken up when it opens (set_auth_timer_idle) */
  if (c->state == CS_OPEN)
    open_timer_at(s, c, s->idle_ticks ? (uint64_t)c->last_rx + s->idle_ticks : 0);
  return 0;
}

const char *im_op_cid(const im_server *s) { return s->op_cid; }

static int conn_open(im_server *s, im_conn *c, const char *uid, const char *device,
                     const char *platform) {
  size_t ul = strlen(uid), dl = strlen(device), pl = strlen(platform);
  char *ident = im_alloc(s, ul + dl + pl + 3);
  if (!ident) return IM_ENOMEM;
  memcpy(ident, uid, ul + 1);
  memcpy(ident + ul + 1, device, dl + 1);
  memcpy(ident + ul + dl + 2, platform, pl + 1);
  im_dealloc(s, c->ident);
  c->ident = ident;
  int rc = reg_user_add(s, c, uid, ul);
  if (rc < 0) return rc;
  c->flags |= CF_REGISTERED;
  s->st.conns_authed++;
  c->state = CS_OPEN;
  c->push_at = (uint32_t)s->now_ms; /* a full bucket to start with */
  c->push_tokens = (s->cfg.max_push_burst ? s->cfg.max_push_burst : 2 * s->cfg.max_push_rate) * 1000u;
  set_auth_timer_idle(s, c);
  route_conn_open(s, c);
  return 0;
}

static void send_auth_ok(im_server *s, im_conn *c) {
  char conn[24];
  snprintf(conn, sizeof conn, "%" PRIx64, c->id);
  imp_packet p = {.op = IMP_OP_AUTH_OK};
  imp_set_str(&p, IMP_K_CONN, conn, strlen(conn));
  imp_set_num(&p, IMP_K_HB, s->cfg.heartbeat_s);
  send_packet(s, c, &p);
}

static void send_upgrade(im_server *s, im_conn *c, const ws_hs_result *res) {
  char resp[256];
  size_t n = ws_hs_accept_response(res, resp, sizeof resp);
  im_buf *b = n <= sizeof resp ? buf_new(s, n) : NULL;
  if (b) memcpy(b->data, resp, n);
  if (conn_queue_new(s, c, b) == 0) c->flags |= CF_HS_UNSENT;
}

static void auth_deny(im_server *s, im_conn *c, int code, const char *reason) {
  s->st.auth_failures++;
  if (c->flags & CF_UPGRADE_AUTH) {
    http_reject(s, c, 403, reason && *reason ? reason : "authentication failed");
    return;
  }
  send_error(s, c, code ? code : 401, reason && *reason ? reason : "authentication failed", NULL);
  conn_close(s, c, IM_CLOSE_AUTH_FAILED, "authentication failed", false);
}

static size_t process(im_server *s, im_conn *c, uint8_t *p, size_t n);
static void resume_input(im_server *s, im_conn *c);

/* The verdict is in (from on_auth or im_auth_complete). `a` holds the
 * credentials that were checked. */
static void auth_finish(im_server *s, im_conn *c, const im_auth *a, bool ok, int code,
                        const char *reason) {
  bool upgrade = c->flags & CF_UPGRADE_AUTH;
  if (!ok) {
    auth_deny(s, c, code, reason);
    return;
  }
  if (s->cfg.max_conns_per_user) {
    /* the newest connection is the one refused: those already open keep
     * working, and a client stuck in a reconnect loop cannot push them out */
    im_user *u = reg_user_find(s, a->uid, strlen(a->uid));
    if (u && u->nconns >= s->cfg.max_conns_per_user) {
      s->st.auth_failures++;
      if (upgrade) {
        http_reject(s, c, 403, "too many connections for this user");
      } else {
        send_error(s, c, 429, "too many connections for this user", NULL);
        conn_close(s, c, IM_CLOSE_POLICY, "too many connections for this user", false);
      }
      return;
    }
  }
  if (upgrade) {
    /* the finished handshake repeats its verdict (accept key, protocol) */
    ws_hs_result res;
    ws_hs_feed(c->hs, NULL, 0, &res);
    send_upgrade(s, c, &res);
    c->flags &= (uint16_t)~CF_UPGRADE_AUTH;
  }
  if (conn_open(s, c, a->uid, a->device, a->platform) < 0) {
    conn_close(s, c, IM_CLOSE_INTERNAL, "out of memory", false);
    return;
  }
  if (c->hs) {
    ws_hs_free(c->hs);
    c->hs = NULL;
  }
  send_auth_ok(s, c);
  if (s->cb.on_open && c->state == CS_OPEN) s->cb.on_open(s, c->id, s->user);
  if ((c->flags & CF_SYNC_ON_OPEN) && c->state == CS_OPEN) {
    c->flags &= (uint16_t)~CF_SYNC_ON_OPEN;
    if (s->cb.on_sync)
      s->cb.on_sync(s, c->id, c->sync_since, 0, s->user);
    else
      send_error(s, c, 501, "sync not supported", NULL);
  }
}

static bool auth_default(const im_auth *a) { return *a->uid && *a->token; }

/* Run on_auth for credentials `a`; returns false when input must pause. */
static bool auth_start(im_server *s, im_conn *c, im_auth *a) {
  size_t ul = strlen(a->uid);
  if (ul == 0 || ul > UID_MAX) {
    auth_deny(s, c, 401, ul ? "uid too long" : "missing uid");
    return true;
  }
  /* device and platform are kept for the connection's life and end up in
   * applications' logs and metrics labels: bound them like the uid */
  if (strlen(a->device) > IM_DEVICE_MAX || strlen(a->platform) > IM_DEVICE_MAX) {
    auth_deny(s, c, 400,
              strlen(a->device) > IM_DEVICE_MAX ? "device too long" : "platform too long");
    return true;
  }
  int v = s->cb.on_auth ? s->cb.on_auth(s, c->id, a, s->user)
                        : (auth_default(a) ? IM_AUTH_ACCEPT : IM_AUTH_DENY);
  if (c->state == CS_CLOSED || c->state == CS_CLOSING) return true;
  if (v == IM_AUTH_PENDING) {
    c->state = CS_AUTH_PENDING;
    return false;
  }
  auth_finish(s, c, a, v == IM_AUTH_ACCEPT, a->code ? a->code : 401,
              a->reason ? a->reason : "authentication failed");
  return true;
}

/* The verdict on a refresh: the connection stays open either way. */
static void refresh_finish(im_server *s, im_conn *c, bool ok, int code, const char *reason) {
  c->flags &= (uint16_t)~CF_REFRESH_PENDING;
  if (ok) {
    send_auth_ok(s, c);
    return;
  }
  s->st.auth_failures++;
  send_error(s, c, code ? code : 401, reason && *reason ? reason : "authentication failed", NULL);
}

int im_auth_complete(im_server *s, im_conn_id id, int accept, int code, const char *reason) {
  im_conn *c = conn_live(s, id);
  if (!c) return IM_ENOENT;
  if (c->state == CS_OPEN && (c->flags & CF_REFRESH_PENDING)) {
    enter(s);
    refresh_finish(s, c, accept != 0, code, reason);
    leave(s);
    return 0;
  }
  if (c->state != CS_AUTH_PENDING) return IM_ESTATE;
  enter(s);
  /* The credentials were parked in c->ident by auth_park. */
  im_auth a = {0};
  a.uid = c->ident;
  a.device = a.uid + strlen(a.uid) + 1;
  a.platform = a.device + strlen(a.device) + 1;
  a.token = "";
  a.peer = c->peer;
  char *parked = c->ident;
  c->ident = NULL;
  c->state = CS_AUTH;
  auth_finish(s, c, &a, accept != 0, code, reason);
  im_dealloc(s, parked);
  if (c->state == CS_OPEN) resume_input(s, c);
  leave(s);
  return 0;
}

/* Keep a pending auth's uid/device/platform on the connection (the input
 * they came from is gone by the time im_auth_complete is called). */
static int auth_park(im_server *s, im_conn *c, const im_auth *a) {
  size_t ul = strlen(a->uid) + 1, dl = strlen(a->device) + 1, pl = strlen(a->platform) + 1;
  char *p = im_alloc(s, ul + dl + pl);
  if (!p) return IM_ENOMEM;
  memcpy(p, a->uid, ul);
  memcpy(p + ul, a->device, dl);
  memcpy(p + ul + dl, a->platform, pl);
  im_dealloc(s, c->ident);
  c->ident = p;
  return 0;
}

/* ---- IMP dispatch ------------------------------------------------------- */

/* Copy a packet string field into s->fields as a C string; NULL if absent. */
static const char *field(im_server *s, const imp_packet *p, unsigned key, size_t *used) {
  if (!IMP_HAS(p, key)) return NULL;
  const imp_str *v = &p->str[key];
  if (*used + v->n + 1 > s->fields_cap) return NULL;
  char *d = s->fields + *used;
  memcpy(d, v->p, v->n);
  d[v->n] = '\0';
  *used += v->n + 1;
  return d;
}

/* An auth op on an open connection: new credentials for the same uid and
 * device (a token about to expire is replaced without reconnecting). */
static void auth_refresh(im_server *s, im_conn *c, const imp_packet *p) {
  const imp_str *cid = IMP_HAS(p, IMP_K_CID) ? &p->str[IMP_K_CID] : NULL;
  if (c->flags & CF_REFRESH_PENDING) {
    send_error(s, c, 409, "a refresh is already pending", cid);
    return;
  }
  const char *uid = c->ident, *device = uid + strlen(uid) + 1;
  size_t used = 0;
  im_auth a = {0};
  a.uid = field(s, p, IMP_K_UID, &used);
  a.token = field(s, p, IMP_K_TOKEN, &used);
  a.device = field(s, p, IMP_K_DEVICE, &used);
  if (!a.uid) a.uid = uid;
  if (!a.device) a.device = device;
  if (!a.token) a.token = "";
  if (strcmp(a.uid, uid) || strcmp(a.device, device)) {
    s->st.auth_failures++;
    send_error(s, c, 403, "a refresh cannot change uid or device", cid);
    return;
  }
  a.platform = device + strlen(device) + 1;
  a.peer = c->peer;
  a.refresh = 1;
  int v = s->cb.on_auth ? s->cb.on_auth(s, c->id, &a, s->user)
                        : (auth_default(&a) ? IM_AUTH_ACCEPT : IM_AUTH_DENY);
  if (c->state != CS_OPEN) return;
  if (v == IM_AUTH_PENDING) {
    c->flags |= CF_REFRESH_PENDING;
    return;
  }
  refresh_finish(s, c, v == IM_AUTH_ACCEPT, a.code ? a.code : 401,
                 a.reason ? a.reason : "authentication failed");
}

static void on_auth_op(im_server *s, im_conn *c, const imp_packet *p) {
  if (c->state == CS_OPEN) {
    auth_refresh(s, c, p);
    return;
  }
  if (c->state != CS_AUTH) {
    send_error(s, c, 409, "already authenticated", IMP_HAS(p, IMP_K_CID) ? &p->str[IMP_K_CID] : NULL);
    return;
  }
  size_t used = 0;
  im_auth a = {0};
  a.uid = field(s, p, IMP_K_UID, &used);
  a.token = field(s, p, IMP_K_TOKEN, &used);
  a.device = field(s, p, IMP_K_DEVICE, &used);
  a.platform = field(s, p, IMP_K_PLATFORM, &used);
  if (!a.uid) a.uid = "";
  if (!a.token) a.token = "";
  if (!a.device) a.device = "";
  if (!a.platform) a.platform = "";
  a.peer = c->peer;
  if (IMP_HAS(p, IMP_K_SINCE)) {
    a.has_since = 1;
    a.since = c->sync_since = p->num[IMP_K_SINCE];
    c->flags |= CF_SYNC_ON_OPEN;
  }
  if (!auth_start(s, c, &a) && auth_park(s, c, &a) < 0)
    conn_close(s, c, IM_CLOSE_INTERNAL, "out of memory", false);
}

static int send_ack(im_server *s, im_conn *c, const char *cid, size_t cidlen, const char *id,
                    uint64_t seq) {
  imp_packet a = {.op = IMP_OP_ACK};
  if (cid) imp_set_str(&a, IMP_K_CID, cid, cidlen);
  if (id) imp_set_str(&a, IMP_K_ID, id, strlen(id));
  if (seq) imp_set_num(&a, IMP_K_SEQ, seq);
  return send_packet(s, c, &a);
}

static void dd_acked(dd_entry *dd, const char *id, uint64_t seq) {
  size_t n = strlen(id);
  if (n >= IM_ID_MAX) n = IM_ID_MAX - 1;
  memcpy(dd->id, id, n);
  dd->id[n] = '\0';
  dd->seq = seq;
  dd->state = DD_ACKED;
}

/* GCRA, one word per bucket: *tat is when the bucket would be empty
 * (engine us). rate per second, bursts of 2 x rate. True (and *tat moved)
 * when one more message fits. */
static bool rate_fits(uint64_t tat, uint64_t now_us, uint32_t rate, uint64_t *next) {
  uint64_t t = 1000000u / rate;
  if (!t) t = 1;
  uint64_t x = tat > now_us ? tat : now_us;
  if (x - now_us > t * (2 * (uint64_t)rate - 1)) return false;
  *next = x + t;
  return true;
}

/* Charge one msg to c and its user; false when either is over its rate
 * (then neither is charged). */
static bool rate_admit(im_server *s, im_conn *c) {
  uint64_t now_us = s->now_ms * 1000u, cn = c->rate_tat, un = c->user ? c->user->rate_tat : 0;
  if (s->cfg.max_msg_rate && !rate_fits(c->rate_tat, now_us, s->cfg.max_msg_rate, &cn))
    return false;
  if (s->cfg.max_user_msg_rate && c->user &&
      !rate_fits(c->user->rate_tat, now_us, s->cfg.max_user_msg_rate, &un))
    return false;
  c->rate_tat = cn;
  if (c->user) c->user->rate_tat = un;
  return true;
}

/* A msg over the rate: refused; persistent excess closes the connection. */
static void rate_refuse(im_server *s, im_conn *c, const imp_str *cid) {
  s->st.rate_limited++;
  if (s->now_ms - c->strike_ms >= 10000 || !c->strikes) {
    c->strike_ms = s->now_ms;
    c->strikes = 0;
  }
  if (s->cfg.max_rate_strikes && ++c->strikes > s->cfg.max_rate_strikes) {
    s->st.rate_closed++;
    send_error(s, c, 429, "rate limit exceeded", cid);
    conn_close(s, c, IM_CLOSE_RATE, "rate limit exceeded", false);
    return;
  }
  send_error(s, c, 429, "rate limit exceeded", cid);
}

static void on_msg_op(im_server *s, im_conn *c, const imp_packet *p) {
  const imp_str *cid = IMP_HAS(p, IMP_K_CID) ? &p->str[IMP_K_CID] : NULL;
  if (!cid) {
    send_error(s, c, 400, "missing cid", NULL);
    return;
  }
  if (!IMP_HAS(p, IMP_K_DATA)) {
    send_error(s, c, 400, "missing data", cid);
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
  next_id(s, id);
  im_msg m = {IM_STRUCT_SIZE(im_msg)};
  m.id = id;
  m.cid = field(s, p, IMP_K_CID, &used);
  m.to = field(s, p, IMP_K_TO, &used);
  m.group = field(s, p, IMP_K_GROUP, &used);
  m.room = field(s, p, IMP_K_ROOM, &used);
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

static void on_room_op(im_server *s, im_conn *c, const imp_packet *p, int join) {
  const imp_str *cid = IMP_HAS(p, IMP_K_CID) ? &p->str[IMP_K_CID] : NULL;
  const imp_str *r = &p->str[IMP_K_ROOM];
  if (!IMP_HAS(p, IMP_K_ROOM) || r->n == 0 || r->n > ROOM_MAX) {
    send_error(s, c, 400, "missing or bad room", cid);
    return;
  }
  size_t used = 0;
  const char *room = field(s, p, IMP_K_ROOM, &used);
  s->op_cid = field(s, p, IMP_K_CID, &used);
  int code = s->cb.on_room ? s->cb.on_room(s, c->id, room, join, s->user) : 0;
  s->op_cid = NULL;
  if (c->state != CS_OPEN || code == IM_ROOM_DEFER) return;
  if (code) {
    send_error(s, c, code, join ? "join refused" : "leave refused", cid);
    return;
  }
  int rc = join ? reg_room_join(s, c, room, r->n) : (reg_room_leave(s, c, room, r->n), 0);
  if (rc < 0) {
    send_error(s, c, rc == IM_ELIMIT ? 429 : 500,
               rc == IM_ELIMIT ? "too many rooms" : "out of memory", cid);
    return;
  }
  if (cid) {
    imp_packet a = {.op = IMP_OP_ACK};
    imp_set_str(&a, IMP_K_CID, cid->p, cid->n);
    send_packet(s, c, &a);
  }
}

static void dispatch(im_server *s, im_conn *c, const imp_packet *p) {
  const imp_str *cid = IMP_HAS(p, IMP_K_CID) ? &p->str[IMP_K_CID] : NULL;
  switch (p->op) {
    case IMP_OP_PING: {
      imp_packet pong = {.op = IMP_OP_PONG};
      send_packet(s, c, &pong);
      return;
    }
    case IMP_OP_PONG:
      return;
    case IMP_OP_AUTH:
      on_auth_op(s, c, p);
      return;
    default:
      break;
  }
  if (c->state != CS_OPEN) {
    send_error(s, c, 401, "authenticate first", cid);
    return;
  }
  switch (p->op) {
    case IMP_OP_MSG:
      on_msg_op(s, c, p);
      break;
    case IMP_OP_ACK:
      if (!IMP_HAS(p, IMP_K_ID)) {
        send_error(s, c, 400, "missing id", cid);
      } else {
        const imp_str *id = &p->str[IMP_K_ID];
        uint64_t seq = IMP_HAS(p, IMP_K_SEQ) ? p->num[IMP_K_SEQ] : 0;
        int64_t rtt = -1;
        rel_ack(s, c, id->p, id->n, &seq, &rtt);
        if (s->cb.on_ack) {
          size_t used = 0;
          s->ack_rtt = &rtt; /* im_ack_rtt_us */
          s->cb.on_ack(s, c->id, field(s, p, IMP_K_ID, &used), seq, s->user);
          s->ack_rtt = NULL;
        }
      }
      break;
    case IMP_OP_SYNC:
      if (!s->cb.on_sync) {
        send_error(s, c, 501, "sync not supported", cid);
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
      send_error(s, c, 400, "unsupported op", cid);
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
static void on_message_bytes(im_server *s, im_conn *c, bool binary, const uint8_t *p, size_t n) {
  imp_packet pkt;
  int rc = binary ? imp_bin_decode(p, n, &pkt)
                  : imp_json_decode((const char *)p, n, &pkt, s->scratch, s->cfg.max_message);
  if (rc != IMP_OK) {
    send_error(s, c, 400, imp_err_text(rc), NULL);
    return;
  }
  dispatch(s, c, &pkt);
}

/* ---- WebSocket input ------------------------------------------------------- */

static void on_ws_close_frame(im_server *s, im_conn *c, const uint8_t *pl, size_t n) {
  unsigned code = 1005;
  if (n == 1) {
    proto_fail(s, c, IM_CLOSE_PROTOCOL, "bad close payload");
    return;
  }
  if (n >= 2) {
    code = (unsigned)pl[0] << 8 | pl[1];
    if (!ws_close_code_valid(code)) {
      proto_fail(s, c, IM_CLOSE_PROTOCOL, "bad close code");
      return;
    }
    if (utf8_validate(UTF8_ACCEPT, pl + 2, n - 2) != UTF8_ACCEPT) {
      proto_fail(s, c, IM_CLOSE_BAD_DATA, "bad close reason");
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
  if (c->msg_len + n > c->msg_cap) {
    size_t cap = c->msg_cap ? c->msg_cap : 1024;
    while (cap < c->msg_len + n) cap *= 2;
    if (cap > s->cfg.max_message) cap = s->cfg.max_message;
    uint8_t *m = im_realloc(s, c->msg, cap);
    if (!m) return false;
    c->msg = m;
    c->msg_cap = (uint32_t)cap;
  }
  memcpy(c->msg + c->msg_len, p, n);
  c->msg_len += (uint32_t)n;
  return true;
}

static void msg_reset(im_server *s, im_conn *c) {
  im_dealloc(s, c->msg);
  c->msg = NULL;
  c->msg_len = c->msg_cap = 0;
  c->frag_op = 0;
  c->utf8 = UTF8_ACCEPT;
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
  if (op == WS_OP_TEXT) {
    c->utf8 = utf8_validate(c->utf8, pl, n);
    if (c->utf8 == UTF8_REJECT || (h->fin && c->utf8 != UTF8_ACCEPT)) {
      proto_fail(s, c, IM_CLOSE_BAD_DATA, "invalid UTF-8");
      return;
    }
  }
  if (h->fin && h->opcode != WS_OP_CONT) {
    c->utf8 = UTF8_ACCEPT;
    on_message_bytes(s, c, op == WS_OP_BINARY, pl, n);
    return;
  }
  if (h->opcode != WS_OP_CONT) c->frag_op = h->opcode;
  if (!msg_append(s, c, pl, n)) {
    conn_close(s, c, IM_CLOSE_INTERNAL, "out of memory", false);
    return;
  }
  if (h->fin) {
    /* the assembled buffer belongs to c until reset; detach it so a
     * callback that closes c cannot free it under the dispatcher */
    uint8_t *m = c->msg;
    uint32_t len = c->msg_len;
    c->msg = NULL;
    msg_reset(s, c);
    on_message_bytes(s, c, op == WS_OP_BINARY, m, len);
    im_dealloc(s, m);
  }
}

static size_t process_ws_frames(im_server *s, im_conn *c, uint8_t *p, size_t n) {
  size_t off = 0;
  while (off < n && c->state != CS_CLOSED && c->state != CS_AUTH_PENDING &&
         !(c->flags & CF_FLUSH_CLOSE)) {
    ws_frame_hdr h;
    int hl = ws_frame_parse_header(p + off, n - off, true, &h);
    if (hl == WS_FRAME_INCOMPLETE) break;
    if (hl < 0) {
      proto_fail(s, c, IM_CLOSE_PROTOCOL, "bad frame header");
      return n;
    }
    bool data = h.opcode == WS_OP_TEXT || h.opcode == WS_OP_BINARY || h.opcode == WS_OP_CONT;
    if (data) {
      if ((h.opcode == WS_OP_CONT) != (c->frag_op != 0)) {
        proto_fail(s, c, IM_CLOSE_PROTOCOL,
                   h.opcode == WS_OP_CONT ? "continuation without start" : "expected continuation");
        return n;
      }
      /* refuse a declared oversize length before buffering any of it */
      if (h.len > s->cfg.max_message || c->msg_len + h.len > s->cfg.max_message) {
        proto_fail(s, c, IM_CLOSE_TOO_BIG, "message too big");
        return n;
      }
      /* before authentication only a small message (the auth op) is
       * worth buffering: an anonymous peer gets no max_message buffer */
      uint32_t pre = preauth_limit(s, c);
      if (pre && (h.len > pre || c->msg_len + h.len > pre)) {
        proto_fail(s, c, IM_CLOSE_TOO_BIG, "message too big before authentication");
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

static size_t process_handshake(im_server *s, im_conn *c, uint8_t *p, size_t n) {
  ws_hs_result res;
  /* the parser stops at WS_HS_MAX_REQUEST by itself; a lower
   * max_preauth_input stops it earlier */
  size_t take = n;
  if (s->cfg.max_preauth_input && s->cfg.max_preauth_input - c->hs_fed < take)
    take = s->cfg.max_preauth_input - c->hs_fed;
  int rc = ws_hs_feed(c->hs, p, take, &res);
  if (rc == WS_HS_MORE && take < n) {
    s->st.proto_errors++;
    http_reject(s, c, 431, "request headers too large");
    return n;
  }
  c->hs_fed += (uint32_t)take;
  if (rc == WS_HS_MORE) return n;
  if (rc == WS_HS_FAIL) {
    s->st.proto_errors++;
    http_reject(s, c, res.http_status, res.reason);
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
  send_upgrade(s, c, &res);
  ws_hs_free(c->hs);
  c->hs = NULL;
  c->state = CS_AUTH;
  return res.consumed;
}

/* ---- TCP input -------------------------------------------------------------- */

static size_t process_tcp_frames(im_server *s, im_conn *c, uint8_t *p, size_t n) {
  size_t off = 0;
  while (off < n && c->state < CS_CLOSING && c->state != CS_AUTH_PENDING) {
    const uint8_t *body;
    uint32_t blen;
    uint32_t pre = preauth_limit(s, c);
    uint32_t max = pre && pre < s->cfg.max_message ? pre : s->cfg.max_message;
    long fl = tcp_frame_parse(p + off, n - off, max, &body, &blen);
    if (fl == TCP_FRAME_INCOMPLETE) break;
    if (fl < 0) {
      proto_fail(s, c, fl == TCP_FRAME_E_TOO_BIG ? IM_CLOSE_TOO_BIG : IM_CLOSE_PROTOCOL,
                 fl != TCP_FRAME_E_TOO_BIG ? "empty frame"
                 : max < s->cfg.max_message ? "frame too big before authentication"
                                            : "frame too big");
      return n;
    }
    off += (size_t)fl;
    on_message_bytes(s, c, true, body, blen);
  }
  if (c->state >= CS_CLOSING) return n;
  return off;
}

/* Process as much of p as forms whole units; returns bytes consumed. */
static size_t process(im_server *s, im_conn *c, uint8_t *p, size_t n) {
  size_t off = 0;
  if (c->state == CS_HANDSHAKE) {
    off = process_handshake(s, c, p, n);
    if (c->state != CS_AUTH && c->state != CS_OPEN) return c->state == CS_AUTH_PENDING ? off : n;
  }
  if (c->state == CS_AUTH_PENDING) return off;
  if (c->transport == IM_TRANSPORT_TCP) return off + process_tcp_frames(s, c, p + off, n - off);
  return off + process_ws_frames(s, c, p + off, n - off);
}

/* Largest input held while auth is pending: one maximal frame, or
 * max_preauth_input when that is set. */
static size_t in_limit(const im_server *s) {
  if (s->cfg.max_preauth_input) return s->cfg.max_preauth_input;
  return (size_t)s->cfg.max_message + WS_MAX_HDR;
}

static bool in_append(im_server *s, im_conn *c, const uint8_t *p, size_t n) {
  if (c->in_len + n > c->in_cap) {
    size_t cap = c->in_cap ? c->in_cap : 256;
    while (cap < c->in_len + n) cap *= 2;
    uint8_t *m = im_realloc(s, c->in, cap);
    if (!m) return false;
    c->in = m;
    c->in_cap = (uint32_t)cap;
  }
  memcpy(c->in + c->in_len, p, n);
  c->in_len += (uint32_t)n;
  return true;
}

static void in_drop(im_server *s, im_conn *c, size_t consumed) {
  if (consumed >= c->in_len) {
    im_dealloc(s, c->in);
    c->in = NULL;
    c->in_len = c->in_cap = 0;
    return;
  }
  memmove(c->in, c->in + consumed, c->in_len - consumed);
  c->in_len -= (uint32_t)consumed;
}

/* Re-run buffered input (after a pending auth resolved). */
static void resume_input(im_server *s, im_conn *c) {
  if (!c->in_len) return;
  uint8_t *p = c->in;
  size_t n = c->in_len;
  size_t used = process(s, c, p, n);
  if (c->state != CS_CLOSED && c->in == p) in_drop(s, c, used);
}

int im_server_feed(im_server *s, im_conn_id id, void *buf, size_t len) {
  im_conn *c = conn_live(s, id);
  if (!c) return IM_ENOENT;
  if ((c->flags & CF_FLUSH_CLOSE) || (c->state == CS_CLOSING && c->transport == IM_TRANSPORT_TCP))
    return IM_ECLOSED;
  enter(s);
  s->st.bytes_in += len;
  c->last_rx = (uint32_t)now_tick(s);
  if (c->in_len || c->state == CS_AUTH_PENDING) {
    /* While auth is pending, input is held unprocessed: bound it. Otherwise
     * the carried partial frame is already bounded by the frame checks. */
    if (c->state == CS_AUTH_PENDING && c->in_len + len > in_limit(s)) {
      proto_fail(s, c, IM_CLOSE_TOO_BIG, "input over limit");
    } else if (!in_append(s, c, buf, len)) {
      conn_close(s, c, IM_CLOSE_INTERNAL, "out of memory", false);
    } else if (c->state != CS_AUTH_PENDING) {
      uint8_t *p = c->in;
      size_t used = process(s, c, p, c->in_len);
      if (c->state != CS_CLOSED && c->in == p) in_drop(s, c, used);
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
  leave(s);
  return rc;
}

/* ---- output completion ---------------------------------------------------- */

int im_conn_pending(im_server *s, im_conn_id id, struct iovec *iov, int iovmax) {
  im_conn *c = conn_live(s, id);
  if (!c) return IM_ENOENT;
  int k = 0;
  for (outq_node *n = c->out_head; n && k < iovmax; n = n->next, k++) {
    iov[k].iov_base = n->buf->data + n->off;
    iov[k].iov_len = n->buf->len - n->off;
  }
  return k;
}

int im_conn_sent(im_server *s, im_conn_id id, size_t n) {
  im_conn *c = conn_live(s, id);
  if (!c) return IM_ENOENT;
  enter(s);
  if (outq_consume(s, c, n)) {
    c->flags &= (uint16_t)~(CF_NOTIFIED | CF_HS_UNSENT);
    if (c->flags & CF_FLUSH_CLOSE) conn_finish(s, c);
  }
  leave(s);
  return 0;
}

/* ---- timers --------------------------------------------------------------- */

static void on_timer(tw_entry *e, void *arg) {
  im_server *s = arg;
  im_conn *c = (im_conn *)((char *)e - offsetof(im_conn, timer));
  switch (c->state) {
    case CS_HANDSHAKE:
    case CS_AUTH:
    case CS_AUTH_PENDING:
      s->st.timeouts++;
      if (c->state == CS_HANDSHAKE) {
        c->close_code = IM_CLOSE_AUTH_TIMEOUT;
        c->state = CS_CLOSING;
        conn_finish(s, c);
      } else {
        conn_close(s, c, IM_CLOSE_AUTH_TIMEOUT, "authentication timeout", false);
      }
      break;
    case CS_OPEN: {
      if (c->expire_tick && c->expire_tick <= now_tick(s)) {
        conn_close(s, c, IM_CLOSE_EXPIRED, "session expired", false);
        break;
      }
      uint64_t due = s->idle_ticks ? (uint64_t)c->last_rx + s->idle_ticks : 0;
      if (!due || due > now_tick(s)) {
        open_timer_at(s, c, due);
      } else {
        s->st.timeouts++;
        conn_close(s, c, IM_CLOSE_AUTH_TIMEOUT, "idle timeout", false);
      }
      break;
    }
    case CS_CLOSING:
      /* the peer never answered our close, or never drained its output */
      conn_finish(s, c);
      break;
    default:
      break;
  }
}

void im_server_tick(im_server *s, uint64_t now_ms) {
  if (!s->started) {
    s->started = true;
    s->t0 = now_ms;
  }
  if (now_ms < s->t0) return;
  uint64_t t = now_ms - s->t0;
  if (t < s->now_ms) return;
  enter(s);
  s->now_ms = t;
  tw_advance(&s->wheel, now_tick(s), on_timer, s);
  tw_advance(&s->ack_wheel, now_tick(s), rel_on_timer, s);
  guard_tick(s);
  leave(s);
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
    next_id(s, f->id);
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
   * encoding: if it fits, every form does. */
  if (m->data_len > s->cfg.max_message ||
      imp_json_encode(&f->pkt, NULL, 0) > (size_t)s->cfg.max_message + IM_ENVELOPE_MAX)
    return IM_ETOOBIG;
  return 0;
}

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
  enter(s);
  fanout f;
  int rc = fanout_init(s, &f, m);
  if (rc == 0) rc = fanout_send(s, &f, c);
  fanout_done(s, &f);
  leave(s);
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
  enter(s);
  fanout f;
  int rc = fanout_init(s, &f, m), n = 0;
  for (size_t i = 0; rc == 0 && i < nu; i++) rc = fanout_user(s, &f, uids[i], except, &n);
  fanout_done(s, &f);
  leave(s);
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
  enter(s);
  int rc = s->router.send_users(s, uids, nu, m, s->router.ud);
  leave(s);
  return rc < 0 ? rc : n + rc;
}

int im_send_user(im_server *s, const char *uid, const im_msg *m, im_conn_id except) {
  return im_send_users(s, &uid, 1, m, except);
}

int im_local_room_send(im_server *s, const char *room, const im_msg *m, im_conn_id except) {
  im_room *r = reg_room_find(s, room, strlen(room));
  if (!r) return 0;
  enter(s);
  fanout f;
  int rc = fanout_init(s, &f, m), n = 0;
  f.rated = true;
  for (room_member *mb = r->members, *next; rc == 0 && mb; mb = next) {
    next = mb->r_next;
    if (mb->conn->id == except) continue;
    int x = fanout_send(s, &f, mb->conn);
    if (x == 0)
      n++;
    else if (x == IM_ETOOBIG || x == IM_ENOMEM)
      rc = x;
  }
  fanout_done(s, &f);
  leave(s);
  return rc < 0 ? rc : n;
}

int im_room_send(im_server *s, const char *room, const im_msg *m, im_conn_id except) {
  if (!s->router.room_send) return im_local_room_send(s, room, m, except);
  im_msg routed;
  char id[IM_ID_MAX];
  if (!(m = route_msg_with_id(s, m, &routed, id))) return IM_EINVAL;
  int n = im_local_room_send(s, room, m, except);
  if (n < 0) return n;
  enter(s);
  int rc = s->router.room_send(s, room, m, s->router.ud);
  leave(s);
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

int im_ack(im_server *s, im_conn_id id, const char *cid, const char *msg_id, uint64_t seq) {
  im_conn *c = conn_live(s, id);
  if (!c) return IM_ENOENT;
  if (c->state != CS_OPEN) return IM_ECLOSED;
  enter(s);
  size_t cl = cid ? strlen(cid) : 0;
  dd_entry *dd = cid ? dd_find(s, c, cid, cl) : NULL;
  if (dd && msg_id)
    dd_acked(dd, msg_id, seq);
  else if (dd)
    dd->state = DD_FREE; /* nothing to repeat: a retry is processed again */
  int rc = send_ack(s, c, cid, cl, msg_id, seq);
  leave(s);
  return rc;
}

int im_sync_end(im_server *s, im_conn_id id, uint64_t last, int more, int gap) {
  im_conn *c = conn_live(s, id);
  if (!c) return IM_ENOENT;
  if (c->state != CS_OPEN) return IM_ECLOSED;
  enter(s);
  imp_packet p = {.op = IMP_OP_SYNC_END};
  imp_set_num(&p, IMP_K_LAST, last);
  imp_set_num(&p, IMP_K_MORE, more != 0);
  if (gap) imp_set_num(&p, IMP_K_GAP, 1);
  int rc = send_packet(s, c, &p);
  leave(s);
  return rc;
}

int im_conn_goaway(im_server *s, im_conn_id id, uint32_t reconnect_ms, const char *reason) {
  im_conn *c = conn_live(s, id);
  if (!c) return IM_ENOENT;
  if (c->state != CS_OPEN) return IM_ECLOSED;
  enter(s);
  imp_packet p = {.op = IMP_OP_GOAWAY};
  imp_set_num(&p, IMP_K_RECONNECT_MS, reconnect_ms);
  if (reason && *reason) imp_set_str(&p, IMP_K_REASON, reason, strlen(reason));
  int rc = send_packet(s, c, &p);
  leave(s);
  return rc;
}

int im_reply_error(im_server *s, im_conn_id id, int code, const char *reason, const char *cid) {
  im_conn *c = conn_live(s, id);
  if (!c) return IM_ENOENT;
  if (c->state >= CS_CLOSING) return IM_ECLOSED;
  /* before the 101 there is no WebSocket stream to put an error on */
  if (c->state == CS_HANDSHAKE || (c->flags & CF_UPGRADE_AUTH)) return IM_ESTATE;
  enter(s);
  imp_str cs = {cid, cid ? (uint32_t)strlen(cid) : 0};
  dd_entry *dd = cid ? dd_find(s, c, cid, cs.n) : NULL;
  if (dd && dd->state == DD_PENDING) dd->state = DD_FREE; /* a retry is processed again */
  int rc = send_error(s, c, code, reason ? reason : "", cid ? &cs : NULL);
  leave(s);
  return rc;
}

int im_conn_close(im_server *s, im_conn_id id, int code, const char *reason) {
  if (code != IM_CLOSE_NORMAL && code != IM_CLOSE_GOING_AWAY && (code < 3000 || code > 4999))
    return IM_EINVAL;
  im_conn *c = conn_live(s, id);
  if (!c) return IM_ENOENT;
  if (c->state >= CS_CLOSING) return IM_ECLOSED;
  enter(s);
  conn_close(s, c, code, reason, true);
  leave(s);
  return 0;
}

size_t im_server_close_all(im_server *s, int code, const char *reason) {
  size_t n = 0;
  enter(s);
  for (uint32_t i = 0; i < s->nslots; i++) {
    im_conn *c = s->slots[i];
    if (c && c->state < CS_CLOSING) {
      conn_close(s, c, code, reason, true);
      n++;
    }
  }
  leave(s);
  return n;
}

/* ---- introspection ---------------------------------------------------------- */

int im_conn_get_info_size(const im_server *s, im_conn_id id, im_conn_info *out, size_t size) {
  if (!out || size < IM__CONN_INFO_SIZE_MIN || size > UINT32_MAX) return IM_EINVAL;
  im_conn *c = conn_lookup(s, id);
  if (!c) return IM_ENOENT;
  out->struct_size = (uint32_t)size;
  im_conn_info full, *info = &full;
  memset(info, 0, sizeof(*info));
  if (c->flags & CF_REGISTERED) {
    info->uid = c->ident;
    info->device = info->uid + strlen(info->uid) + 1;
    info->platform = info->device + strlen(info->device) + 1;
  }
  info->peer = c->peer;
  info->transport = (enum im_transport)c->transport;
  info->binary = c->binary;
  info->since_ms = c->since_ms;
  info->secure = (c->flags & CF_SECURE) != 0;
  return im__struct_out(out, IM__CONN_INFO_SIZE_MIN, info, sizeof(*info));
}

int im_conn_set_secure(im_server *s, im_conn_id id, int secure) {
  im_conn *c = conn_lookup(s, id);
  if (!c) return IM_ENOENT;
  if (secure)
    c->flags |= CF_SECURE;
  else
    c->flags &= (uint16_t)~CF_SECURE;
  return 0;
}

int im_conn_set_data(im_server *s, im_conn_id id, void *data) {
  im_conn *c = conn_lookup(s, id);
  if (!c) return IM_ENOENT;
  c->data = data;
  return 0;
}

void *im_conn_get_data(const im_server *s, im_conn_id id) {
  im_conn *c = conn_lookup(s, id);
  return c ? c->data : NULL;
}

size_t im_user_conns(const im_server *s, const char *uid, im_conn_id *ids, size_t max) {
  im_user *u = reg_user_find(s, uid, strlen(uid));
  if (!u) return 0;
  size_t k = 0;
  for (im_conn *c = u->conns; c; c = c->u_next, k++)
    if (k < max) ids[k] = c->id;
  return k;
}

void im_server_stats_size(const im_server *s, im_stats *st, size_t size) {
  if (!st || size < IM__STATS_SIZE_MIN || size > UINT32_MAX) return;
  st->struct_size = (uint32_t)size;
  im__struct_out(st, IM__STATS_SIZE_MIN, &s->st, sizeof(s->st));
}
