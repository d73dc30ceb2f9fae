/* The routing seam (include/libim/im_router.h): the engine's send paths
 * serve local connections and hand the rest to the installed router; the
 * router applies what comes from elsewhere through the im_local_* calls. */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "core/engine.h"

static void route_room_open(im_server *s, const char *room) {
  if (s->router.room_open) s->router.room_open(s, room, s->router.ud);
}

static void announce_room(const char *room, size_t members, void *arg) {
  (void)members;
  im_server *s = arg;
  route_room_open(s, room);
}

size_t im_server_announce(im_server *s) {
  size_t n = 0;
  for (uint32_t i = 0; i < s->nslots; i++) {
    im_conn *c = s->slots[i];
    if (c && c->state == CS_OPEN && (c->flags & CF_REGISTERED)) {
      if (s->router.conn_open) s->router.conn_open(s, c->id, s->router.ud);
      n++;
    }
  }
  im_server_rooms(s, announce_room, s);
  return n;
}

size_t im_server_each_conn(im_server *s, void (*fn)(im_server *s, im_conn_id c, void *arg),
                           void *arg) {
  size_t n = 0;
  /* ids first: fn may close connections (their slots stay until released) */
  for (uint32_t i = 0; i < s->nslots; i++) {
    im_conn *c = s->slots[i];
    if (c && c->state == CS_OPEN && (c->flags & CF_REGISTERED)) {
      fn(s, c->id, arg);
      n++;
    }
  }
  return n;
}

int im_server_set_router(im_server *s, const im_router *r) {
  if (r)
    s->router = *r;
  else
    memset(&s->router, 0, sizeof s->router);
  if (r) im_server_announce(s);
  return 0;
}

void im_server_rooms(const im_server *s, void (*fn)(const char *room, size_t members, void *arg),
                     void *arg) {
  const strmap *m = &s->rooms;
  for (uint32_t b = 0; m->buckets && b <= m->mask; b++)
    for (strmap_node *n = m->buckets[b], *next; n; n = next) {
      next = n->next;
      im_room *r = (im_room *)n;
      fn(r->name, r->n, arg);
    }
}

uint64_t im_server_wall_base(const im_server *s) { return s->id_wall0; }

int im_server_set_node_id(im_server *s, uint16_t node_id) {
  if (node_id > 1023) return IM_EINVAL;
  s->cfg.node_id = node_id;
  return 0;
}

int im_server_set_id_shard(im_server *s, uint32_t shard, uint32_t shards) {
  if (shards < 1 || shards > 4096 || shard >= shards) return IM_EINVAL;
  s->id_shard = shard;
  s->id_shards = shards;
  s->id_counter = shard;
  return 0;
}

void im_server_set_id_clock(im_server *s, uint64_t *clock) { s->id_clock = clock; }

int im_local_kick_user(im_server *s, const char *uid, int code, const char *reason) {
  if (code != IM_CLOSE_NORMAL && code != IM_CLOSE_GOING_AWAY && (code < 3000 || code > 4999))
    return IM_EINVAL;
  im_user *u = reg_user_find(s, uid, strlen(uid));
  int n = 0;
  /* a closing connection stays registered until it is released, so the
   * list does not change under us */
  for (im_conn *c = u ? u->conns : NULL; c; c = c->u_next)
    if (im_conn_close(s, c->id, code, reason) == 0) n++;
  return n;
}

int im_kick_user(im_server *s, const char *uid, int code, const char *reason) {
  int n = im_local_kick_user(s, uid, code, reason);
  if (n < 0 || !s->router.kick_user) return n;
  int rc = s->router.kick_user(s, uid, code, reason, s->router.ud);
  return rc < 0 ? rc : n + rc;
}

/* The local connections of uid as routes; hex ids are kept in idbuf. */
static size_t local_routes(const im_server *s, const char *uid, im_route *out, char (*idbuf)[24],
                           size_t max) {
  im_user *u = reg_user_find(s, uid, strlen(uid));
  size_t k = 0;
  for (im_conn *c = u ? u->conns : NULL; c && k < max; c = c->u_next) {
    im_conn_info info = {IM_STRUCT_SIZE(im_conn_info)};
    im_conn_get_info(s, c->id, &info);
    snprintf(idbuf[k], sizeof idbuf[k], "%" PRIx64, c->id);
    out[k] = (im_route){.node = NULL, .conn = idbuf[k], .device = info.device,
                        .platform = info.platform, .peer = info.peer,
                        .transport = info.transport, .since_ms = s->id_wall0 + info.since_ms};
    k++;
  }
  return k;
}

/* The most local connections of one user presence reports. */
#define PRESENCE_LOCAL_MAX 256

int im_presence(im_server *s, const char *uid, im_presence_cb cb, void *arg) {
  im_route routes[PRESENCE_LOCAL_MAX];
  char ids[PRESENCE_LOCAL_MAX][24];
  size_t n = local_routes(s, uid, routes, ids, PRESENCE_LOCAL_MAX);
  if (s->router.presence) return s->router.presence(s, uid, routes, n, cb, arg, s->router.ud);
  cb(s, uid, routes, n, 0, arg);
  return 0;
}
