/* Chat semantics on libim: token auth, 1:1 with multi-device copies,
 * groups (stored membership) and rooms (ephemeral, joined by clients). */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "imd.h"
#include "token.h"

uint64_t imd_wall_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

uint64_t imd_mono_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static int on_auth(im_server *srv, im_conn_id c, im_auth *a, void *user) {
  (void)srv;
  (void)c;
  imd *d = user;
  int v = imd_token_verify(d->secret, d->secret_len, a->uid, a->device, a->token,
                           (int64_t)(imd_wall_ms() / 1000));
  if (v == IMD_TOKEN_OK) return IM_AUTH_ACCEPT;
  a->code = 401;
  if (v == IMD_TOKEN_EXPIRED) {
    d->m.auth_expired++;
    a->reason = "token expired";
  } else {
    d->m.auth_invalid++;
    a->reason = "invalid token";
  }
  return IM_AUTH_DENY;
}

static void on_open(im_server *srv, im_conn_id c, void *user) {
  im_conn_info info;
  if (im_conn_get_info(srv, c, &info) == 0) imd_metrics_open(user, info.platform);
}

static void on_close(im_server *srv, im_conn_id c, int code, void *user) {
  (void)code;
  im_conn_info info;
  if (im_conn_get_info(srv, c, &info) == 0 && info.uid) imd_metrics_close(user, info.platform);
}

static int refuse(imd *d, im_server *srv, im_conn_id c, const im_msg *m, int code,
                  const char *reason) {
  d->m.msg_errors++;
  im_reply_error(srv, c, code, reason, m->cid);
  return IM_MSG_DEFER;
}

/* Store a 1:1 or group message for its receivers (the sender included, for
 * its other devices and its own history) and deliver it after the commit;
 * the ack follows the commit too (delivery.c). */
static int store(imd *d, im_server *srv, im_conn_id c, const im_msg *m, const im_conn_info *info,
                 const char *const *uids, size_t n) {
  imd_store_msg sm = {.id = m->id, .from = info->uid, .device = info->device, .cid = m->cid,
                      .to = m->to, .group = m->group, .ts = imd_wall_ms(), .data = m->data,
                      .data_len = m->data_len};
  int code = imd_store_and_deliver(d, &sm, uids, n, c, 0);
  if (code) return refuse(d, srv, c, m, code, "store failed");
  return IM_MSG_DEFER;
}

/* Route one upstream msg: 1:1 and group messages are stored and acked after
 * the commit; room messages are ephemeral and acked once queued. */
static int on_message(im_server *srv, im_conn_id c, const im_msg *m, void *user) {
  imd *d = user;
  int targets = (m->to != NULL) + (m->group != NULL) + (m->room != NULL);
  if (targets != 1)
    return refuse(d, srv, c, m, 400, targets ? "give only one of to, group, room"
                                             : "missing to, group or room");
  im_conn_info info;
  im_conn_get_info(srv, c, &info);
  if (m->to) {
    if (!*m->to) return refuse(d, srv, c, m, 400, "empty to");
    if (strlen(m->to) > IMD_UID_MAX) return refuse(d, srv, c, m, 400, "to too long");
    d->m.msgs_1to1++;
    /* the receiver's devices, then the sender's other devices (R7) */
    const char *users[2] = {m->to, info.uid};
    return store(d, srv, c, m, &info, users, strcmp(m->to, info.uid) ? 2 : 1);
  }
  if (m->group) {
    imd_group *g = imd_group_find(d, m->group);
    if (!g || !imd_group_has(g, info.uid)) return refuse(d, srv, c, m, 403, "not a member of the group");
    size_t n;
    const char **members = imd_group_members(g, &n);
    if (!members) return refuse(d, srv, c, m, 500, "out of memory");
    d->m.msgs_group++;
    int v = store(d, srv, c, m, &info, members, n);
    free((void *)members);
    return v;
  }
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
  im_conn_info info;
  if (seq && im_conn_get_info(srv, c, &info) == 0 && info.uid)
    imd_mark_delivered(user, info.uid, info.device, seq);
}

static void on_sync(im_server *srv, im_conn_id c, uint64_t since, uint32_t limit, void *user) {
  im_conn_info info;
  if (im_conn_get_info(srv, c, &info) == 0 && info.uid) imd_sync(user, c, info.uid, since, limit);
}

void imd_chat_callbacks(im_callbacks *cb) {
  memset(cb, 0, sizeof(*cb));
  cb->on_auth = on_auth;
  cb->on_open = on_open;
  cb->on_close = on_close;
  cb->on_message = on_message;
  cb->on_ack = on_ack;
  /* no on_undelivered: an unACKed push stays in the inbox for the next sync
   * (the library counts them; an offline-push hook would go there) */
  cb->on_sync = on_sync;
}
