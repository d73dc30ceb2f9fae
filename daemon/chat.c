/* Chat semantics on libim: token auth, 1:1 with multi-device copies,
 * groups (stored membership) and rooms (ephemeral, joined by clients). */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "hooks.h"
#include "imd.h"
#include "token.h"

/* A genuine, unexpired token may still be refused: a lifetime over
 * --max-token-ttl, or issued before its uid was revoked. Returns the
 * reason, or NULL when it is fine. */
static const char *token_policy(imd *d, const im_auth *a, const imd_token_claims *cl,
                                int64_t now_s) {
  if (cl->expiry - now_s > (int64_t)d->cfg.max_token_ttl_s) {
    d->m.auth_too_long++;
    return "token lifetime too long";
  }
  imd_shared_lock();
  bool revoked = imd_revoked(d->revoked, a->uid, cl->issued_ms, cl->expiry, d->cfg.max_token_ttl_s);
  imd_shared_unlock();
  if (revoked) {
    d->m.auth_revoked++;
    return "token revoked";
  }
  return NULL;
}

static int on_auth(im_server *srv, im_conn_id c, im_auth *a, void *user) {
  imd *d = user;
  if (imd_uid_banned(d, a->uid)) {
    d->m.auth_banned++;
    a->code = 403;
    a->reason = "banned";
    return IM_AUTH_DENY;
  }
  int hook = imd_hooks_connect_mode(d);
  if (hook == IMD_HOOK_CONNECT_INSTEAD) return imd_hooks_auth(d, c, a);
  uint64_t now_ms = imd_wall_ms();
  imd_token_claims cl;
  int v = imd_token_check(d->secret, d->secret_len, a->uid, a->device, a->token,
                          (int64_t)(now_ms / 1000), &cl);
  const char *why = v == IMD_TOKEN_OK ? token_policy(d, a, &cl, (int64_t)(now_ms / 1000)) : NULL;
  if (v == IMD_TOKEN_OK && !why) {
    /* the session ends when its token does (4410), unless refreshed */
    im_conn_set_expiry(srv, c, (uint64_t)cl.expiry * 1000u - now_ms);
    /* a refresh only renews the token of a connection the connect hook
     * already let in: it is not asked again */
    return hook == IMD_HOOK_CONNECT_ALSO && !a->refresh ? imd_hooks_auth(d, c, a)
                                                         : IM_AUTH_ACCEPT;
  }
  a->code = 401;
  if (why) {
    a->reason = why;
  } else if (v == IMD_TOKEN_EXPIRED) {
    d->m.auth_expired++;
    a->reason = "token expired";
  } else {
    d->m.auth_invalid++;
    a->reason = "invalid token";
  }
  return IM_AUTH_DENY;
}

static void on_open(im_server *srv, im_conn_id c, void *user) {
  im_conn_info info = {IM_STRUCT_SIZE(im_conn_info)};
  if (im_conn_get_info(srv, c, &info) == 0) imd_metrics_open(user, info.platform);
  imd_node_opened(user, c);
  imd_hooks_opened(user, c);
}

static void on_close(im_server *srv, im_conn_id c, int code, void *user) {
  (void)code;
  im_conn_info info = {IM_STRUCT_SIZE(im_conn_info)};
  if (im_conn_get_info(srv, c, &info) == 0 && info.uid) imd_metrics_close(user, info.platform);
  imd_hooks_closed(user, c);
}

static int refuse(imd *d, im_server *srv, im_conn_id c, const im_msg *m, int code,
                  const char *reason) {
  d->m.msg_errors++;
  im_reply_error(srv, c, code, reason, m->cid);
  return IM_MSG_DEFER;
}

/* The store answered for a client's message: ack it (with the sender's own
 * seq) or tell the client it failed, so that it resends. */
static void acked(imd *d, uint64_t conn, const imd_delivery *res) {
  im_conn_info info = {IM_STRUCT_SIZE(im_conn_info)};
  if (im_conn_get_info(d->srv, conn, &info) < 0) return; /* the sender left; it resends */
  if (res->status >= 0) {
    im_ack(d->srv, conn, res->cid, res->id, res->sender_seq);
    return;
  }
  d->m.msg_errors++;
  im_reply_error(d->srv, conn, res->status == IMD_STORE_EDOWN ? 503 : 500,
                 res->status == IMD_STORE_EDOWN ? "store unavailable" : "store failed", res->cid);
}

/* Store a 1:1 or group message for its receivers (the sender included, for
 * its other devices and its own history) and deliver it once durable; the
 * ack follows (acked). */
static int store(imd *d, im_server *srv, im_conn_id c, const im_msg *m, const char *uid,
                 const char *device, const char *const *uids, size_t n) {
  imd_store_msg sm = {.id = m->id, .from = uid, .device = device, .cid = m->cid,
                      .to = m->to, .group = m->group, .ts = imd_wall_ms(), .data = m->data,
                      .data_len = m->data_len};
  int rc = imd_deliver(d, &sm, uids, n, c, acked, c);
  if (rc < 0)
    return refuse(d, srv, c, m, rc == IMD_STORE_EINVAL ? 400 : rc == IMD_STORE_EDOWN ? 503 : 500,
                  rc == IMD_STORE_EDOWN ? "store unavailable" : "store failed");
  return IM_MSG_DEFER;
}

/* A group message waits for the group's members (a store read): its fields
 * are copied here. */
typedef struct group_msg {
  imd *d;
  im_conn_id c;
  im_msg m;
  const char *uid, *device;
  char buf[];
} group_msg;

static group_msg *group_msg_new(imd *d, im_conn_id c, const im_msg *m, const im_conn_info *info) {
  const char *strs[] = {m->id, m->cid, m->group, info->uid, info->device}, *out[5];
  group_msg *g = malloc(sizeof(group_msg) + imd_strs_size(strs, 5) + m->data_len + 1);
  if (!g) return NULL;
  char *at = g->buf;
  imd_strs_copy(&at, strs, out, 5);
  memcpy(at, m->data, m->data_len);
  at[m->data_len] = '\0';
  g->d = d;
  g->c = c;
  g->m = (im_msg){.id = out[0], .cid = out[1], .group = out[2], .data = at,
                  .data_len = m->data_len};
  g->uid = out[3];
  g->device = out[4];
  return g;
}

static void group_members_known(void *arg, int status, const char *const *uids, size_t n) {
  group_msg *g = arg;
  imd *d = g->d;
  if (im_conn_get_info(d->srv, g->c, &(im_conn_info){0}) == 0) {
    bool member = false;
    for (size_t i = 0; i < n && !member; i++) member = !strcmp(uids[i], g->uid);
    if (status < 0)
      refuse(d, d->srv, g->c, &g->m, status == IMD_STORE_EDOWN ? 503 : 500,
             status == IMD_STORE_EDOWN ? "store unavailable" : "store failed");
    else if (!member)
      refuse(d, d->srv, g->c, &g->m, 403, "not a member of the group");
    else {
      d->m.msgs_group++;
      store(d, d->srv, g->c, &g->m, g->uid, g->device, uids, n);
    }
  }
  free(g);
}

/* The per-receiver quota (quota.c): false when from has stored its
 * share for `to` this minute. */
static bool quota_ok(imd *d, const char *from, const char *to, bool group) {
  if (!d->quota) return true;
  imd_shared_lock();
  bool ok = imd_quota_take(d->quota, from, to, group, imd_wall_ms());
  imd_shared_unlock();
  if (ok) return true;
  d->m.quota_refused++;
  return false;
}

/* Route a 1:1 or group msg of c (checked, and allowed by the message hook
 * when there is one): stored, then acked once durable. */
static int route_stored(imd *d, im_conn_id c, const im_msg *m) {
  im_server *srv = d->srv;
  im_conn_info info = {IM_STRUCT_SIZE(im_conn_info)};
  if (im_conn_get_info(srv, c, &info) < 0 || !info.uid) return IM_MSG_DEFER;
  if (m->to) {
    d->m.msgs_1to1++;
    /* the receiver's devices, then the sender's other devices (R7) */
    const char *users[2] = {m->to, info.uid};
    return store(d, srv, c, m, info.uid, info.device, users, strcmp(m->to, info.uid) ? 2 : 1);
  }
  /* membership is the store's: the message waits for it */
  group_msg *g = group_msg_new(d, c, m, &info);
  if (!g) return refuse(d, srv, c, m, 500, "out of memory");
  if (d->store->ops->group_members(d->store, m->group, group_members_known, g) < 0) {
    free(g);
    return refuse(d, srv, c, m, 500, "store failed");
  }
  return IM_MSG_DEFER;
}

/* Route one upstream msg: 1:1 and group messages are stored and acked once
 * durable (after the back end's verdict with --hook-message on); room
 * messages are ephemeral and acked once queued. */
static int on_message(im_server *srv, im_conn_id c, const im_msg *m, void *user) {
  imd *d = user;
  int targets = (m->to != NULL) + (m->group != NULL) + (m->room != NULL);
  if (targets != 1)
    return refuse(d, srv, c, m, 400, targets ? "give only one of to, group, room"
                                             : "missing to, group or room");
  if (m->to && !*m->to) return refuse(d, srv, c, m, 400, "empty to");
  if (m->to && strlen(m->to) > IMD_UID_MAX) return refuse(d, srv, c, m, 400, "to too long");
  if (!m->room) {
    im_conn_info info = {IM_STRUCT_SIZE(im_conn_info)};
    if (im_conn_get_info(srv, c, &info) < 0 || !info.uid) return IM_MSG_DEFER;
    if (!quota_ok(d, info.uid, m->to ? m->to : m->group, m->group != NULL))
      return refuse(d, srv, c, m, 429, "receiver quota exceeded");
    if (imd_hooks_message(d, c, m, route_stored)) return IM_MSG_DEFER;
    return route_stored(d, c, m);
  }
  im_conn_info info = {IM_STRUCT_SIZE(im_conn_info)};
  im_conn_get_info(srv, c, &info);
  if (!im_room_member(srv, c, m->room)) return refuse(d, srv, c, m, 403, "join the room first");
  im_msg out = {.id = m->id, .from = info.uid, .room = m->room, .ts = imd_wall_ms(),
                .data = m->data, .data_len = m->data_len};
  int rc = im_room_send(srv, m->room, &out, c);
  d->m.msgs_room++;
  if (rc < 0) return refuse(d, srv, c, m, rc == IM_ETOOBIG ? 413 : 500, im_strerror(rc));
  im_ack(srv, c, m->cid, m->id, 0);
  return IM_MSG_DEFER;
}

/* A device ACKed a message: its delivered position moves up to that seq. */
static void on_ack(im_server *srv, im_conn_id c, const char *id, uint64_t seq, void *user) {
  (void)id;
  imd_metrics_ack(user, im_ack_rtt_us(srv));
  im_conn_info info = {IM_STRUCT_SIZE(im_conn_info)};
  if (seq && im_conn_get_info(srv, c, &info) == 0 && info.uid)
    imd_mark_delivered(user, info.uid, info.device, seq);
}

/* --rooms members: a join waits for the store's members of the group
 * named like the room. */
typedef struct room_join {
  imd *d;
  im_conn_id c;
  char *cid;  /* NULL: the join had none */
  char buf[]; /* room, then cid */
} room_join;

static void room_members_known(void *arg, int status, const char *const *uids, size_t n) {
  room_join *j = arg;
  imd *d = j->d;
  im_conn_info info = {IM_STRUCT_SIZE(im_conn_info)};
  if (im_conn_get_info(d->srv, j->c, &info) == 0 && info.uid) {
    bool member = false;
    for (size_t i = 0; status == 0 && i < n && !member; i++) member = !strcmp(uids[i], info.uid);
    int rc = member ? im_room_join(d->srv, j->c, j->buf) : 0;
    if (status < 0) {
      im_reply_error(d->srv, j->c, status == IMD_STORE_EDOWN ? 503 : 500,
                     status == IMD_STORE_EDOWN ? "store unavailable" : "store failed", j->cid);
    } else if (!member) {
      d->m.rooms_refused++;
      im_reply_error(d->srv, j->c, 403, "not a member of the group", j->cid);
    } else if (rc < 0) {
      im_reply_error(d->srv, j->c, rc == IM_ELIMIT ? 429 : 500,
                     rc == IM_ELIMIT ? "too many rooms" : im_strerror(rc), j->cid);
    } else if (j->cid) {
      im_ack(d->srv, j->c, j->cid, NULL, 0);
    }
  }
  free(j);
}

static int on_room(im_server *srv, im_conn_id c, const char *room, int join, void *user) {
  imd *d = user;
  if (!d->cfg.rooms_members || !join) return 0; /* leaving is always allowed */
  const char *cid = im_op_cid(srv);
  size_t rl = strlen(room) + 1, cl = cid ? strlen(cid) + 1 : 0;
  room_join *j = malloc(sizeof *j + rl + cl);
  if (!j) return 500;
  j->d = d;
  j->c = c;
  memcpy(j->buf, room, rl);
  j->cid = cid ? memcpy(j->buf + rl, cid, cl) : NULL;
  if (d->store->ops->group_members(d->store, j->buf, room_members_known, j) < 0) {
    free(j);
    return 500;
  }
  return IM_ROOM_DEFER;
}

static void on_sync(im_server *srv, im_conn_id c, uint64_t since, uint32_t limit, void *user) {
  im_conn_info info = {IM_STRUCT_SIZE(im_conn_info)};
  if (im_conn_get_info(srv, c, &info) == 0 && info.uid) imd_sync(user, c, info.uid, since, limit);
}

void imd_chat_callbacks(im_callbacks *cb) {
  memset(cb, 0, sizeof(*cb));
  cb->on_auth = on_auth;
  cb->on_open = on_open;
  cb->on_close = on_close;
  cb->on_message = on_message;
  cb->on_ack = on_ack;
  cb->on_room = on_room;
  /* no on_undelivered: an unACKed push stays in the inbox for the next sync
   * (the library counts them; an offline-push hook would go there) */
  cb->on_sync = on_sync;
}
