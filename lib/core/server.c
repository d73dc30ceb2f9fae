/* The engine's lifecycle: configuration, creating and freeing the server,
 * accepting and releasing connections (srv_enter/srv_leave), timers, message
 * ids, the driver's output completion and introspection. No I/O: bytes come
 * in through im_server_feed() (input.c) and leave through im_conn_pending()
 * and the im_io hooks. The rest of the engine: conn.c (table, output,
 * closing), auth.c, input.c with ws_input.c and tcp_input.c, dispatch.c,
 * fanout.c, reliable.c, dedupe.c, registry.c, guard.c. */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <libim/im_guard.h>

#include "core/abi.h"
#include "core/conn.h"
#include "core/reliable.h"
#include "core/shared.h"
#include "proto/writer.h"
#include "proto/ws_handshake.h"

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

/* Admission at accept: the process-wide connection cap of an attached
 * im_shared, then the guard; conn_unadmit undoes both. */
static bool conn_admit(im_server *s, const char *peer) {
  if (s->shared && !shared_conn_take(s->shared, s->cfg.max_connections)) return false;
  if (guard_admit(s, peer)) return true;
  if (s->shared) shared_conn_put(s->shared);
  return false;
}

static void conn_unadmit(im_server *s, const char *peer) {
  if (s->shared) shared_conn_put(s->shared);
  guard_release(s, peer);
}

static void conn_free(im_server *s, im_conn *c) {
  conn_detach(s, c);
  tw_cancel(&s->wheel, &c->timer);
  conn_unadmit(s, c->peer);
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
  im_shared_release(s->shared);
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


void srv_enter(im_server *s) { s->depth++; }

void srv_leave(im_server *s) {
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
void im_new_id(im_server *s, char out[IM_ID_MAX]) {
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
  writer w = {out, IM_ID_MAX, 0}; /* at most 20 digits: no printf per message */
  put_u64(&w, id);
  put_end(&w);
}

/* ---- accept / hangup ----------------------------------------------------- */

im_conn_id im_server_accept(im_server *s, enum im_transport t, const char *peer, void *io_ctx) {
  if (t != IM_TRANSPORT_WS && t != IM_TRANSPORT_TCP) return 0;
  if (s->cfg.max_connections && s->st.conns >= s->cfg.max_connections) return 0;
  if (!conn_admit(s, peer)) return 0;
  size_t pl = peer ? strlen(peer) : 0;
  if (pl >= PEER_MAX) pl = PEER_MAX - 1;
  im_conn *c = im_zalloc(s, sizeof(*c) + pl + 1);
  if (c && t == IM_TRANSPORT_WS && !(c->hs = ws_hs_new(s->cfg.ws_path))) {
    im_dealloc(s, c);
    c = NULL;
  }
  if (c && conn_attach(s, c) < 0) {
    if (c->hs) ws_hs_free(c->hs);
    im_dealloc(s, c);
    c = NULL;
  }
  if (!c) {
    conn_unadmit(s, peer);
    return 0;
  }
  c->transport = (uint8_t)t;
  c->binary = t == IM_TRANSPORT_TCP;
  c->state = t == IM_TRANSPORT_WS ? CS_HANDSHAKE : CS_AUTH;
  c->io_ctx = io_ctx;
  c->since_ms = s->now_ms;
  c->last_rx = (uint32_t)now_tick(s);
  if (pl) memcpy(c->peer, peer, pl); /* the NUL: zeroed */
  tw_entry_init(&c->timer);
  tw_schedule(&s->wheel, &c->timer, now_tick(s) + ms_to_ticks(s, s->cfg.auth_timeout_ms));
  s->st.conns++;
  return c->id;
}

int im_server_hangup(im_server *s, im_conn_id id) {
  im_conn *c = conn_live(s, id);
  if (!c) return IM_ENOENT;
  srv_enter(s);
  if (!c->close_code) c->close_code = 1006;
  conn_release(s, c);
  srv_leave(s);
  return 0;
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
    conn_timer_at(s, c, s->idle_ticks ? (uint64_t)c->last_rx + s->idle_ticks : 0);
  return 0;
}

const char *srv_field(im_server *s, const imp_packet *p, unsigned key, size_t *used) {
  if (!IMP_HAS(p, key)) return NULL;
  const imp_str *v = &p->str[key];
  if (*used + v->n + 1 > s->fields_cap) return NULL;
  char *d = s->fields + *used;
  memcpy(d, v->p, v->n);
  d[v->n] = '\0';
  *used += v->n + 1;
  return d;
}

/* ---- output completion ---------------------------------------------------- */

int im_conn_pending(im_server *s, im_conn_id id, struct iovec *iov, int iovmax) {
  im_conn *c = conn_live(s, id);
  if (!c) return IM_ENOENT;
  return outq_iov(c, iov, iovmax);
}

int im_conn_sent(im_server *s, im_conn_id id, size_t n) {
  im_conn *c = conn_live(s, id);
  if (!c) return IM_ENOENT;
  srv_enter(s);
  if (outq_consume(s, c, n)) {
    c->flags &= (uint16_t)~(CF_NOTIFIED | CF_HS_UNSENT);
    if (c->flags & CF_FLUSH_CLOSE) conn_finish(s, c);
  }
  srv_leave(s);
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
        conn_timer_at(s, c, due);
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
  srv_enter(s);
  s->now_ms = t;
  tw_advance(&s->wheel, now_tick(s), on_timer, s);
  tw_advance(&s->ack_wheel, now_tick(s), rel_on_timer, s);
  guard_tick(s);
  srv_leave(s);
}

int im_conn_close(im_server *s, im_conn_id id, int code, const char *reason) {
  if (code != IM_CLOSE_NORMAL && code != IM_CLOSE_GOING_AWAY && (code < 3000 || code > 4999))
    return IM_EINVAL;
  im_conn *c = conn_live(s, id);
  if (!c) return IM_ENOENT;
  if (c->state >= CS_CLOSING) return IM_ECLOSED;
  srv_enter(s);
  conn_close(s, c, code, reason, true);
  srv_leave(s);
  return 0;
}

size_t im_server_close_all(im_server *s, int code, const char *reason) {
  size_t n = 0;
  srv_enter(s);
  for (uint32_t i = 0; i < s->nslots; i++) {
    im_conn *c = s->slots[i];
    if (c && c->state < CS_CLOSING) {
      conn_close(s, c, code, reason, true);
      n++;
    }
  }
  srv_leave(s);
  return n;
}

/* im_guard.h: closing what a guard range holds is the engine's part; the
 * guard only says what is inside a range. */
int im_guard_kick(im_server *s, const char *cidr, int code, const char *reason) {
  guard_range r;
  if (!cidr || !guard_range_parse(cidr, &r)) return IM_EINVAL;
  int n = 0;
  for (uint32_t i = 0; i < s->nslots; i++) {
    im_conn *c = s->slots[i];
    if (c && c->state < CS_CLOSING && guard_peer_in(c->peer, &r) &&
        im_conn_close(s, c->id, code, reason) == 0)
      n++;
  }
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
