/* Authentication: the auth op (or the upgrade request's credentials) runs
 * on_auth; a pending verdict holds input until im_auth_complete; an auth op
 * on an open connection refreshes its token; max_conns_per_user (process-wide
 * with an im_shared). */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "core/auth.h"
#include "core/conn.h"
#include "core/shared.h"

static uint64_t rng_next(im_server *s) {
  /* xorshift64*: jitter only, not security */
  uint64_t x = s->rng;
  x ^= x >> 12;
  x ^= x << 25;
  x ^= x >> 27;
  s->rng = x;
  return x * 0x2545F4914F6CDD1DULL;
}

static void route_conn_open(im_server *s, im_conn *c) {
  if (s->router.conn_open) s->router.conn_open(s, c->id, s->router.ud);
}

void auth_http_reject(im_server *s, im_conn *c, int status, const char *reason) {
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

static void set_auth_timer_idle(im_server *s, im_conn *c) {
  if (s->idle_ticks == 0) {
    conn_timer_at(s, c, 0);
    return;
  }
  /* first idle deadline jittered by up to 1/8 so a mass reconnect does not
   * time out in lockstep (R8) */
  uint64_t jitter = s->idle_ticks >= 8 ? rng_next(s) % (s->idle_ticks / 8) : 0;
  conn_timer_at(s, c, (uint64_t)c->last_rx + s->idle_ticks + jitter);
}


/* Register c under its uid; sh: its count in the process-wide record
 * (im_shared), or NULL. */
static int conn_open(im_server *s, im_conn *c, const char *uid, const char *device,
                     const char *platform, shared_user *sh) {
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
  if (sh) c->user->sh = sh;
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
  static const char hex[] = "0123456789abcdef";
  char conn[16]; /* c->id in hex, no leading zeros (as PRIx64) */
  size_t n = sizeof conn;
  uint64_t v = c->id;
  do {
    conn[--n] = hex[v & 15];
    v >>= 4;
  } while (v);
  imp_packet p = {.op = IMP_OP_AUTH_OK};
  imp_set_str(&p, IMP_K_CONN, conn + n, sizeof conn - n);
  imp_set_num(&p, IMP_K_HB, s->cfg.heartbeat_s);
  conn_send_packet(s, c, &p);
}

void auth_send_upgrade(im_server *s, im_conn *c, const ws_hs_result *res) {
  char resp[256];
  size_t n = ws_hs_accept_response(res, resp, sizeof resp);
  im_buf *b = n <= sizeof resp ? buf_new(s, n) : NULL;
  if (b) memcpy(b->data, resp, n);
  if (conn_queue_new(s, c, b) == 0) c->flags |= CF_HS_UNSENT;
}

static void auth_deny(im_server *s, im_conn *c, int code, const char *reason) {
  s->st.auth_failures++;
  if (c->flags & CF_UPGRADE_AUTH) {
    auth_http_reject(s, c, 403, reason && *reason ? reason : "authentication failed");
    return;
  }
  conn_send_error(s, c, code ? code : 401, reason && *reason ? reason : "authentication failed", NULL);
  conn_close(s, c, IM_CLOSE_AUTH_FAILED, "authentication failed", false);
}



/* max_conns_per_user: the newest connection is the one refused (those
 * already open keep working, and a client stuck in a reconnect loop cannot
 * push them out). With an im_shared the uid's connections on every
 * attached engine count, and this one is counted now in *sh. Returns 0,
 * IM_ELIMIT or IM_ENOMEM. */
static int user_admit(im_server *s, const char *uid, shared_user **sh) {
  *sh = NULL;
  if (s->shared)
    return shared_user_take(s->shared, uid, strlen(uid), s->cfg.max_conns_per_user,
                            s->shared_slot, sh);
  im_user *u = s->cfg.max_conns_per_user ? reg_user_find(s, uid, strlen(uid)) : NULL;
  return u && u->nconns >= s->cfg.max_conns_per_user ? IM_ELIMIT : 0;
}

/* The verdict is in (from on_auth or im_auth_complete). `a` holds the
 * credentials that were checked. */
static void auth_finish(im_server *s, im_conn *c, const im_auth *a, bool ok, int code,
                        const char *reason) {
  bool upgrade = c->flags & CF_UPGRADE_AUTH;
  if (!ok) {
    auth_deny(s, c, code, reason);
    return;
  }
  shared_user *sh;
  int admit = user_admit(s, a->uid, &sh);
  if (admit == IM_ENOMEM) {
    conn_close(s, c, IM_CLOSE_INTERNAL, "out of memory", false);
    return;
  }
  if (admit == IM_ELIMIT) {
    s->st.auth_failures++;
    if (upgrade) {
      auth_http_reject(s, c, 403, "too many connections for this user");
    } else {
      conn_send_error(s, c, 429, "too many connections for this user", NULL);
      conn_close(s, c, IM_CLOSE_POLICY, "too many connections for this user", false);
    }
    return;
  }
  if (upgrade) {
    /* the finished handshake repeats its verdict (accept key, protocol) */
    ws_hs_result res;
    ws_hs_feed(c->hs, NULL, 0, &res);
    auth_send_upgrade(s, c, &res);
    c->flags &= (uint16_t)~CF_UPGRADE_AUTH;
  }
  if (conn_open(s, c, a->uid, a->device, a->platform, sh) < 0) {
    if (sh) shared_user_put(s->shared, sh, s->shared_slot);
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
      s->cb.on_sync(s, c->id, a->since, 0, s->user);
    else
      conn_send_error(s, c, 501, "sync not supported", NULL);
  }
}

static bool auth_default(const im_auth *a) { return *a->uid && *a->token; }

/* Run on_auth for credentials `a`; returns false when input must pause. */
bool auth_start(im_server *s, im_conn *c, im_auth *a) {
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
  conn_send_error(s, c, code ? code : 401, reason && *reason ? reason : "authentication failed", NULL);
}

int auth_complete(im_server *s, im_conn *c, int accept, int code, const char *reason,
                  bool *resume) {
  *resume = false;
  if (c->state == CS_OPEN && (c->flags & CF_REFRESH_PENDING)) {
    refresh_finish(s, c, accept != 0, code, reason);
    return 0;
  }
  if (c->state != CS_AUTH_PENDING) return IM_ESTATE;
  /* The credentials were parked in c->ident by auth_park. */
  im_auth a = {0};
  a.uid = c->ident;
  a.device = a.uid + strlen(a.uid) + 1;
  a.platform = a.device + strlen(a.device) + 1;
  memcpy(&a.since, a.platform + strlen(a.platform) + 1, sizeof a.since);
  a.has_since = (c->flags & CF_SYNC_ON_OPEN) != 0;
  a.token = "";
  a.peer = c->peer;
  char *parked = c->ident;
  c->ident = NULL;
  c->state = CS_AUTH;
  auth_finish(s, c, &a, accept != 0, code, reason);
  im_dealloc(s, parked);
  *resume = c->state == CS_OPEN;
  return 0;
}

/* Keep a pending auth's uid/device/platform and since on the connection
 * (the input they came from is gone by the time im_auth_complete is
 * called). */
int auth_park(im_server *s, im_conn *c, const im_auth *a) {
  size_t ul = strlen(a->uid) + 1, dl = strlen(a->device) + 1, pl = strlen(a->platform) + 1;
  char *p = im_alloc(s, ul + dl + pl + sizeof a->since);
  if (!p) return IM_ENOMEM;
  memcpy(p, a->uid, ul);
  memcpy(p + ul, a->device, dl);
  memcpy(p + ul + dl, a->platform, pl);
  memcpy(p + ul + dl + pl, &a->since, sizeof a->since);
  im_dealloc(s, c->ident);
  c->ident = p;
  return 0;
}

/* An auth op on an open connection: new credentials for the same uid and
 * device (a token about to expire is replaced without reconnecting). */
static void auth_refresh(im_server *s, im_conn *c, const imp_packet *p) {
  const imp_str *cid = IMP_HAS(p, IMP_K_CID) ? &p->str[IMP_K_CID] : NULL;
  if (c->flags & CF_REFRESH_PENDING) {
    conn_send_error(s, c, 409, "a refresh is already pending", cid);
    return;
  }
  const char *uid = c->ident, *device = uid + strlen(uid) + 1;
  size_t used = 0;
  im_auth a = {0};
  a.uid = srv_field(s, p, IMP_K_UID, &used);
  a.token = srv_field(s, p, IMP_K_TOKEN, &used);
  a.device = srv_field(s, p, IMP_K_DEVICE, &used);
  if (!a.uid) a.uid = uid;
  if (!a.device) a.device = device;
  if (!a.token) a.token = "";
  if (strcmp(a.uid, uid) || strcmp(a.device, device)) {
    s->st.auth_failures++;
    conn_send_error(s, c, 403, "a refresh cannot change uid or device", cid);
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

void auth_on_op(im_server *s, im_conn *c, const imp_packet *p) {
  if (c->state == CS_OPEN) {
    auth_refresh(s, c, p);
    return;
  }
  if (c->state != CS_AUTH) {
    conn_send_error(s, c, 409, "already authenticated", IMP_HAS(p, IMP_K_CID) ? &p->str[IMP_K_CID] : NULL);
    return;
  }
  size_t used = 0;
  im_auth a = {0};
  a.uid = srv_field(s, p, IMP_K_UID, &used);
  a.token = srv_field(s, p, IMP_K_TOKEN, &used);
  a.device = srv_field(s, p, IMP_K_DEVICE, &used);
  a.platform = srv_field(s, p, IMP_K_PLATFORM, &used);
  if (!a.uid) a.uid = "";
  if (!a.token) a.token = "";
  if (!a.device) a.device = "";
  if (!a.platform) a.platform = "";
  a.peer = c->peer;
  if (IMP_HAS(p, IMP_K_SINCE)) {
    a.has_since = 1;
    a.since = p->num[IMP_K_SINCE];
    c->flags |= CF_SYNC_ON_OPEN;
  }
  if (!auth_start(s, c, &a) && auth_park(s, c, &a) < 0)
    conn_close(s, c, IM_CLOSE_INTERNAL, "out of memory", false);
}

