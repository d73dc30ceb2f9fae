/* libim's cluster module on Redis (include/libim/im_redis.h): node lease,
 * owned routes, cross-node delivery through per-node streams, room
 * channels, presence, kick and gateway lists, installed as the server's
 * router (include/libim/im_router.h).
 *
 * With a thread group (im_redis_new_group) the module is the group's
 * outer router: the instance im_redis_new made (the home) holds the lease,
 * reads the node's stream and keeps the room subscriptions, and applies
 * what arrives to every member (im_group_local_*); each other member has a
 * handle (im_redis_join) with a command connection of its own, on its own
 * thread, for its connections' routes and its cross-node sends, which
 * reads the lease (epoch, up or not) from the home's atomics. */
#include <libim/im_group.h>
#include <libim/im_redis.h>
#include <libim/im_router.h>

#include <event2/event.h>
#include <hiredis/hiredis.h>
#include <inttypes.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "redis/redis_link.h"
#include "redis/redis_scripts.h"
#include "redis/redis_wire.h"

#define KEY_MAX 512
#define IM_REDIS_NODE_MAX 128    /* bytes of a node name */
#define PREFIX_MAX 64            /* bytes of the key prefix */
#define ROUTE_KEY_MAX 256        /* prefix + "route:{" + a uid of up to 128 bytes + "}" */
#define LOOKUP_MAX 256            /* uids per ROUTE_PUSH call */
#define PENDING_MAX_BYTES (64u << 20) /* forwarded bytes kept while Redis is away */
#define XREAD_COUNT "512"

/* A send (or kick) waiting for the end of the loop pass (ROUTE_PUSH). */
typedef struct pending {
  struct pending *next;
  rbuf head;                /* the record without its uid list */
  size_t n;
  char **uids;
} pending;


struct im_redis {
  struct event_base *base;
  im_server *srv;
  im_group *group;          /* NULL: the router of srv alone */
  im_redis *home;           /* a member's handle (im_redis_join): the instance with the lease */
  im_redis *handles[IM_GROUP_MAX]; /* the home's: each member's handle (its own is NULL) */
  im_redis_config cfg;      /* strings point at the copies below */
  char *host, *prefix, *node, *adv_ws, *adv_tcp;
  rlink cmd, stream, sub;     /* a handle has cmd only */
  atomic_bool leased;       /* read by the handles on their threads */
  bool acquiring, freeing, draining;
  bool stream_was_up, stream_reading;
  _Atomic uint64_t epoch;   /* read by the handles */
  atomic_int node_id;
  char last_id[64];         /* last delivery-stream entry read */
  char maxlen_arg[24];      /* cfg.stream_max as a string (ROUTE_PUSH, im_redis_push_argv) */
  struct event *renew_ev, *flush_ev, *xread_retry_ev;
  pending *pend, *pend_tail;
  size_t pend_bytes;
  atomic_uint_fast64_t dropped; /* forwards given up; a handle counts on its home's */
};

/* The instance that holds the lease: r itself, or a handle's home. */
static im_redis *home_of(const im_redis *r) { return r->home ? r->home : (im_redis *)r; }

static void count_drop(im_redis *r) { atomic_fetch_add(&home_of(r)->dropped, 1); }

/* ---- the whole process: the server alone, or every member of its group ----------- */

static void flush_soon(im_redis *r);

/* The lease is (again) ours: the member's routes are written again and
 * the sends it held back go out. */
static void member_announce(im_server *srv, void *arg) {
  im_redis *home = arg;
  im_server_announce(srv);
  int i = home->group ? im_group_member(home->group, srv) : -1;
  im_redis *r = i >= 0 && home->handles[i] ? home->handles[i] : home;
  if (r->pend) flush_soon(r);
}

static void member_node_id(im_server *srv, void *arg) {
  im_server_set_node_id(srv, (uint16_t)atomic_load(&((im_redis *)arg)->node_id));
}

/* fn on every member's thread (the others through their queues), or on
 * srv alone. */
static void each_member(im_redis *r, void (*fn)(im_server *srv, void *arg)) {
  fn(r->srv, r);
  if (!r->group) return;
  int self = im_group_member(r->group, r->srv);
  for (unsigned i = 0, n = im_group_size(r->group); i < n; i++)
    if ((int)i != self) im_group_call(r->group, i, fn, r);
}

static uint64_t process_conns(im_redis *r) {
  if (r->group) return im_group_conns(r->group);
  im_stats st = {IM_STRUCT_SIZE(im_stats)};
  im_server_stats(r->srv, &st);
  return st.conns_authed;
}

/* ---- small helpers ---------------------------------------------------------- */

static char *dup_or_null(const char *s) { return s ? strdup(s) : NULL; }

static void key(const im_redis *r, char out[KEY_MAX], const char *fmt, const char *a) {
  snprintf(out, KEY_MAX, "%s", r->prefix);
  size_t n = strlen(out);
  snprintf(out + n, KEY_MAX - n, fmt, a);
}

static void emit(im_redis *r, enum im_redis_event ev) {
  if (r->cfg.on_event && !r->freeing) r->cfg.on_event(r, ev, r->cfg.ud);
}

static uint64_t fnv(const char *a, const char *b) {
  uint64_t h = 1469598103934665603ULL;
  for (const char *s = a; s && *s; s++) h = (h ^ (uint8_t)*s) * 1099511628211ULL;
  h = (h ^ '|') * 1099511628211ULL;
  for (const char *s = b; s && *s; s++) h = (h ^ (uint8_t)*s) * 1099511628211ULL;
  return h;
}

/* EVAL script with nkeys keys then args (all NUL-terminated strings). */
static int eval(im_redis *r, redisCallbackFn *fn, void *priv, const char *script, int nkeys,
                const char *const *keys, int nargs, const char *const *args) {
  const char *argv[LOOKUP_MAX + 16];
  size_t lens[LOOKUP_MAX + 16];
  char nk[16];
  if (3 + nkeys + nargs > (int)(sizeof argv / sizeof *argv)) return -1;
  snprintf(nk, sizeof nk, "%d", nkeys);
  int k = 0;
  argv[k++] = "EVAL";
  argv[k++] = script;
  argv[k++] = nk;
  for (int i = 0; i < nkeys; i++) argv[k++] = keys[i];
  for (int i = 0; i < nargs; i++) argv[k++] = args[i];
  for (int i = 0; i < k; i++) lens[i] = strlen(argv[i]);
  return rlink_cmd(&r->cmd, fn, priv, k, argv, lens);
}

static void fmt_u64(char out[24], uint64_t v) { snprintf(out, 24, "%" PRIu64, v); }

/* ---- lease -------------------------------------------------------------------- */

static void lease_acquire(im_redis *r);
static void stream_read(im_redis *r);

static void lease_args(im_redis *r, char ttl[24], char conns[24], char ep[24]) {
  fmt_u64(ttl, r->cfg.lease_ttl_ms);
  fmt_u64(conns, process_conns(r));
  fmt_u64(ep, r->epoch);
}

/* The lease is ours (again): routes and rooms are (re)announced after the
 * stream position is known, so nothing sent to us after a route exists
 * is missed. */
static void on_stream_pos(redisAsyncContext *ac, void *rep, void *priv) {
  (void)ac;
  im_redis *r = priv;
  redisReply *rp = rep;
  if (!rp || r->freeing) return;
  if (!r->last_id[0]) {
    snprintf(r->last_id, sizeof r->last_id, "0-0");
    if (rp->type == REDIS_REPLY_ARRAY && rp->elements > 0 &&
        rp->element[0]->type == REDIS_REPLY_ARRAY && rp->element[0]->elements > 0 &&
        rp->element[0]->element[0]->type == REDIS_REPLY_STRING)
      snprintf(r->last_id, sizeof r->last_id, "%s", rp->element[0]->element[0]->str);
  }
  r->leased = true;
  each_member(r, member_announce);
  stream_read(r);
  emit(r, IM_REDIS_UP);
}

static void leased(im_redis *r) {
  char k[KEY_MAX];
  key(r, k, "deliver:{%s}", r->node);
  if (rlink_cmdf(&r->cmd, on_stream_pos, r, "XREVRANGE %s + - COUNT 1", k) < 0) r->acquiring = false;
}

static void on_acquired(redisAsyncContext *ac, void *rep, void *priv) {
  (void)ac;
  im_redis *r = priv;
  redisReply *rp = rep;
  if (r->freeing) return;
  r->acquiring = false;
  if (!rp) return; /* the link went down: acquired again when it comes back */
  if (rp->type != REDIS_REPLY_INTEGER || rp->integer < 0) {
    fprintf(stderr, "libim: cannot lease node name '%s': %s\n", r->node,
            rp->type == REDIS_REPLY_INTEGER && rp->integer == -1 ? "a live node holds it"
            : rp->type == REDIS_REPLY_ERROR                       ? rp->str
                                                                  : "no free node id");
    return; /* the renew timer tries again */
  }
  atomic_store(&r->node_id, (int)rp->integer);
  each_member(r, member_node_id);
  leased(r);
}

static void on_epoch(redisAsyncContext *ac, void *rep, void *priv) {
  (void)ac;
  im_redis *r = priv;
  redisReply *rp = rep;
  if (r->freeing) return;
  if (!rp || rp->type != REDIS_REPLY_INTEGER) {
    r->acquiring = false;
    return;
  }
  r->epoch = (uint64_t)rp->integer;
  char knode[KEY_MAX], kids[KEY_MAX], kleases[KEY_MAX], ttl[24], conns[24], ep[24], slot[24];
  key(r, knode, "node:%s", r->node);
  key(r, kids, "%s", "nodeids");
  key(r, kleases, "%s", "leases");
  lease_args(r, ttl, conns, ep);
  fmt_u64(slot, fnv(r->node, NULL) % 1024);
  const char *keys[] = {knode, kids, kleases};
  const char *args[] = {r->node, ep, ttl, r->adv_ws ? r->adv_ws : "", r->adv_tcp ? r->adv_tcp : "",
                        conns, r->draining ? "1" : "0", slot};
  if (eval(r, on_acquired, r, LUA_LEASE_ACQUIRE, 3, keys, 8, args) < 0) r->acquiring = false;
}

/* Take a new epoch and lease the name with it. */
static void lease_acquire(im_redis *r) {
  if (r->acquiring || !r->cmd.up) return;
  char k[KEY_MAX];
  key(r, k, "%s", "epoch");
  r->acquiring = rlink_cmdf(&r->cmd, on_epoch, r, "INCR %s", k) == 0;
}

static void on_purged(redisAsyncContext *ac, void *rep, void *priv) {
  (void)ac;
  (void)priv;
  redisReply *rp = rep;
  for (size_t i = 0; rp && rp->type == REDIS_REPLY_ARRAY && i < rp->elements; i++)
    if (rp->element[i]->type == REDIS_REPLY_STRING)
      fprintf(stderr, "libim: purged the routes of lapsed node lease %s\n", rp->element[i]->str);
}

static void purge_dead(im_redis *r) {
  char kleases[KEY_MAX], me[KEY_MAX];
  key(r, kleases, "%s", "leases");
  snprintf(me, sizeof me, "%s|%" PRIu64, r->node, r->epoch);
  const char *keys[] = {kleases};
  const char *args[] = {r->prefix, me};
  eval(r, on_purged, r, LUA_PURGE, 1, keys, 2, args);
}

static void on_renewed(redisAsyncContext *ac, void *rep, void *priv) {
  (void)ac;
  im_redis *r = priv;
  redisReply *rp = rep;
  if (!rp || r->freeing) return;
  if (rp->type == REDIS_REPLY_INTEGER && rp->integer == 1) {
    if (!r->leased) leased(r); /* kept across a reconnect */
    purge_dead(r);
    return;
  }
  /* lost: paused past the TTL, or Redis forgot it. Routes written under the
   * old epoch are purged by the survivors; ours are rewritten under the new
   * one. */
  fprintf(stderr, "libim: node %s lost its lease (epoch %" PRIu64 "); taking a new one\n", r->node,
          r->epoch);
  r->leased = false;
  emit(r, IM_REDIS_LEASE_LOST);
  lease_acquire(r);
}

static void lease_renew(im_redis *r) {
  if (!r->cmd.up || r->acquiring) return;
  if (!r->epoch) {
    lease_acquire(r);
    return;
  }
  char knode[KEY_MAX], kids[KEY_MAX], ttl[24], conns[24], ep[24], id[24];
  key(r, knode, "node:%s", r->node);
  key(r, kids, "%s", "nodeids");
  lease_args(r, ttl, conns, ep);
  fmt_u64(id, (uint64_t)(r->node_id < 0 ? 0 : r->node_id));
  const char *keys[] = {knode, kids};
  const char *args[] = {r->node, ep, ttl, conns, r->draining ? "1" : "0", id};
  eval(r, on_renewed, r, LUA_LEASE_RENEW, 2, keys, 6, args);
}

static void on_renew_timer(evutil_socket_t fd, short what, void *arg) {
  (void)fd;
  (void)what;
  lease_renew(arg);
}

/* ---- routes (router hooks) ------------------------------------------------------ */

static void ignore_reply(redisAsyncContext *ac, void *rep, void *priv) {
  (void)ac;
  (void)rep;
  (void)priv;
}

/* Route values are '|'-separated: a platform or device (chosen by the
 * client) has its '|' and '%' percent-encoded, and is decoded in place. */
static void field_escape(char *out, size_t cap, const char *s) {
  size_t o = 0;
  for (; *s && o + 4 < cap; s++) {
    if (*s == '|' || *s == '%')
      o += (size_t)snprintf(out + o, cap - o, "%%%02X", (unsigned char)*s);
    else
      out[o++] = *s;
  }
  out[o] = '\0';
}

static void field_unescape(char *s) {
  char *w = s;
  for (; *s; s++) {
    if (s[0] == '%' && s[1] && s[2]) {
      char hex[3] = {s[1], s[2], 0};
      *w++ = (char)strtol(hex, NULL, 16);
      s += 2;
    } else {
      *w++ = *s;
    }
  }
  *w = '\0';
}

static void conn_field(const im_redis *r, im_conn_id c, char out[KEY_MAX]) {
  snprintf(out, KEY_MAX, "%s/%" PRIx64, r->node, c);
}

static void h_conn_open(im_server *srv, im_conn_id c, void *ud) {
  im_redis *r = ud;
  im_conn_info info = {IM_STRUCT_SIZE(im_conn_info)};
  uint64_t epoch = home_of(r)->epoch;
  if (!home_of(r)->leased || im_conn_get_info(srv, c, &info) < 0 || !info.uid) return;
  char kroute[KEY_MAX], kidx[KEY_MAX], field[KEY_MAX], value[1024], ep[24], reg[200];
  key(r, kroute, "route:{%s}", info.uid);
  snprintf(reg, sizeof reg, "%s|%" PRIu64, r->node, epoch);
  key(r, kidx, "noderoutes:%s", reg);
  conn_field(r, c, field);
  char platform[200], device[200];
  field_escape(platform, sizeof platform, info.platform);
  field_escape(device, sizeof device, info.device);
  snprintf(value, sizeof value, "%s|%" PRIu64 "|%s|%s|%s|%" PRIu64 "|%s", r->node, epoch,
           platform, device, info.peer, im_server_wall_base(srv) + info.since_ms,
           info.transport == IM_TRANSPORT_TCP ? "tcp" : "ws");
  fmt_u64(ep, epoch);
  const char *keys[] = {kroute, kidx};
  const char *args[] = {field, value, ep, info.uid};
  eval(r, ignore_reply, NULL, LUA_ROUTE_PUT, 2, keys, 4, args);
}

static void h_conn_close(im_server *srv, im_conn_id c, void *ud) {
  im_redis *r = ud;
  im_conn_info info = {IM_STRUCT_SIZE(im_conn_info)};
  uint64_t epoch = home_of(r)->epoch;
  if (!epoch || im_conn_get_info(srv, c, &info) < 0 || !info.uid) return;
  char kroute[KEY_MAX], kidx[KEY_MAX], field[KEY_MAX], ep[24], reg[200];
  key(r, kroute, "route:{%s}", info.uid);
  snprintf(reg, sizeof reg, "%s|%" PRIu64, r->node, epoch);
  key(r, kidx, "noderoutes:%s", reg);
  conn_field(r, c, field);
  fmt_u64(ep, epoch);
  /* whether the uid leaves the node's route index is the script's to
   * decide (this node's other routes of the uid are in the hash) */
  const char *keys[] = {kroute, kidx};
  const char *args[] = {field, ep, info.uid, reg};
  eval(r, ignore_reply, NULL, LUA_ROUTE_DEL, 2, keys, 4, args);
}

/* ---- rooms ---------------------------------------------------------------------- */

static void on_room_message(redisAsyncContext *ac, void *rep, void *priv);

static void subscribe(im_redis *r, const char *room, bool on) {
  if (!r->sub.up) return; /* every local room is subscribed when the link comes up */
  char ch[KEY_MAX];
  key(r, ch, "room:{%s}", room);
  rlink_cmdf(&r->sub, on ? on_room_message : NULL, r, on ? "SUBSCRIBE %s" : "UNSUBSCRIBE %s", ch);
}

static void h_room_open(im_server *srv, const char *room, void *ud) {
  (void)srv;
  subscribe(ud, room, true);
}

static void h_room_close(im_server *srv, const char *room, void *ud) {
  (void)srv;
  subscribe(ud, room, false);
}

static void on_room_message(redisAsyncContext *ac, void *rep, void *priv) {
  (void)ac;
  im_redis *r = priv;
  redisReply *rp = rep;
  if (!rp || r->freeing || rp->type != REDIS_REPLY_ARRAY || rp->elements != 3) return;
  if (rp->element[0]->type != REDIS_REPLY_STRING || strcmp(rp->element[0]->str, "message") != 0)
    return;
  redisReply *payload = rp->element[2];
  if (payload->type != REDIS_REPLY_STRING) return;
  /* origin node name, NUL, record */
  const char *origin = payload->str;
  size_t ol = strnlen(origin, payload->len);
  if (ol == payload->len || !strcmp(origin, r->node)) return; /* ours: served locally */
  const uint8_t *p = (const uint8_t *)payload->str + ol + 1, *end = (const uint8_t *)payload->str + payload->len;
  rwire_rec rec;
  while (rwire_next(&p, end, &rec) == 1)
    if (rec.kind == RWIRE_ROOM && rec.m.room)
      im_group_local_room_send(r->group, r->srv, rec.m.room, &rec.m, 0);
}

static int h_room_send(im_server *srv, const char *room, const im_msg *m, void *ud) {
  (void)srv;
  im_redis *r = ud;
  rbuf b = {0};
  char ch[KEY_MAX];
  key(r, ch, "room:{%s}", room);
  im_msg rm = *m;
  rm.room = room;
  int rc = 0;
  if (rwire_put_bytes(&b, r->node, strlen(r->node) + 1) < 0 ||
      rwire_put_msg_head(&b, RWIRE_ROOM, &rm) < 0 || rwire_put_uids(&b, NULL, 0) < 0) {
    rc = IM_ENOMEM;
  } else {
    const char *argv[] = {"PUBLISH", ch, (const char *)b.p};
    size_t lens[] = {7, strlen(ch), b.len};
    /* Redis away: the local members had it; the other nodes' miss it
     * (rooms are ephemeral) */
    if (rlink_cmd(&r->cmd, ignore_reply, NULL, 3, argv, lens) < 0) count_drop(r);
  }
  rbuf_free(&b);
  return rc;
}

/* ---- cross-node delivery: one ROUTE_PUSH call per loop pass ------------------------- */

static void flush_soon(im_redis *r) { event_active(r->flush_ev, EV_TIMEOUT, 0); }

static void pending_free(pending *p) {
  for (size_t i = 0; i < p->n; i++) free(p->uids[i]);
  free(p->uids);
  rbuf_free(&p->head);
  free(p);
}

static int enqueue(im_redis *r, pending *p, const char *const *uids, size_t n) {
  p->uids = calloc(n ? n : 1, sizeof *p->uids);
  bool ok = p->uids != NULL;
  for (size_t i = 0; ok && i < n; i++) ok = (p->uids[p->n++] = strdup(uids[i])) != NULL;
  if (!ok || r->pend_bytes + p->head.len > PENDING_MAX_BYTES) {
    pending_free(p);
    count_drop(r);
    return IM_ENOMEM;
  }
  r->pend_bytes += p->head.len;
  if (r->pend_tail)
    r->pend_tail->next = p;
  else
    r->pend = p;
  r->pend_tail = p;
  flush_soon(r);
  return 0;
}

static int h_send_users(im_server *srv, const char *const *uids, size_t n, const im_msg *m,
                        void *ud) {
  (void)srv;
  im_redis *r = ud;
  pending *p = calloc(1, sizeof *p);
  if (!p || rwire_put_msg_head(&p->head, RWIRE_MSG, m) < 0) {
    if (p) rbuf_free(&p->head);
    free(p);
    return IM_ENOMEM;
  }
  return enqueue(r, p, uids, n);
}

static int h_kick_user(im_server *srv, const char *uid, int code, const char *reason, void *ud) {
  (void)srv;
  im_redis *r = ud;
  pending *p = calloc(1, sizeof *p);
  if (!p || rwire_put_kick_head(&p->head, code, reason) < 0) {
    if (p) rbuf_free(&p->head);
    free(p);
    return IM_ENOMEM;
  }
  return enqueue(r, p, &uid, 1);
}


/* The sends of one loop pass, handed to Redis as one script call. */
typedef struct push {
  im_redis *r;
  pending *list;
} push;

static void requeue(im_redis *r, pending *list) {
  /* the call was lost with the link: try again when it is back (at least
   * once: a receiver drops what it has by id) */
  pending *tail = list;
  while (tail->next) tail = tail->next;
  tail->next = r->pend;
  r->pend = list;
  if (!r->pend_tail) r->pend_tail = tail;
}

static void drop_list(im_redis *r, pending *list) {
  for (pending *p = list, *next; p; p = next) {
    next = p->next;
    r->pend_bytes -= p->head.len;
    pending_free(p);
  }
}

static void on_pushed(redisAsyncContext *ac, void *rep, void *priv) {
  (void)ac;
  push *x = priv;
  im_redis *r = x->r;
  redisReply *rp = rep;
  if (!r->freeing && !rp) {
    requeue(r, x->list);
  } else {
    if (rp && rp->type == REDIS_REPLY_ERROR) {
      fprintf(stderr, "libim: cross-node send failed: %s\n", rp->str);
      count_drop(r);
    }
    drop_list(r, x->list);
  }
  free(x);
}

/* One EVAL of ROUTE_PUSH for the sends from `list` on: KEYS the distinct
 * route keys, then the sends (head, n, key indexes, uids). Takes sends while
 * their uids fit LOOKUP_MAX; returns the first send not taken. */
static pending *push_some(im_redis *r, pending *list, int *rc) {
  size_t nk = 0, nu = 0, nsend = 0;
  pending *p = list;
  for (; p && nu + p->n <= LOOKUP_MAX; p = p->next) {
    nu += p->n;
    nsend++;
  }
  size_t max_args = 3 + LOOKUP_MAX + 4 + 2 * nsend + 2 * nu;
  const char **argv = calloc(max_args, sizeof *argv);
  size_t *lens = calloc(max_args, sizeof *lens);
  char (*keys)[ROUTE_KEY_MAX] = calloc(LOOKUP_MAX, sizeof *keys);
  char (*nums)[12] = calloc(2 + nsend + nu, sizeof *nums);
  *rc = -1;
  if (!argv || !lens || !keys || !nums || nsend == 0) goto out;
  /* keys first: one per distinct uid */
  uint16_t key_of[LOOKUP_MAX];
  size_t u = 0;
  for (pending *q = list; q != p; q = q->next)
    for (size_t i = 0; i < q->n; i++, u++) {
      char k[ROUTE_KEY_MAX];
      snprintf(k, sizeof k, "%sroute:{%s}", r->prefix, q->uids[i]);
      size_t j = 0;
      while (j < nk && strcmp(keys[j], k)) j++;
      if (j == nk) memcpy(keys[nk++], k, sizeof k);
      key_of[u] = (uint16_t)j;
    }
  size_t k = 0, nn = 0;
  char nkeys[16], nrec[24];
  snprintf(nkeys, sizeof nkeys, "%zu", nk);
  fmt_u64(nrec, nsend);
#define ARG(s, n) (argv[k] = (s), lens[k++] = (n))
#define SARG(s) ARG((s), strlen(s))
  SARG("EVAL");
  SARG(LUA_ROUTE_PUSH);
  SARG(nkeys);
  for (size_t j = 0; j < nk; j++) SARG(keys[j]);
  SARG(r->node);
  SARG(r->prefix);
  SARG(r->maxlen_arg);
  SARG(nrec);
  u = 0;
  for (pending *q = list; q != p; q = q->next) {
    ARG((const char *)q->head.p, q->head.len);
    snprintf(nums[nn], sizeof nums[nn], "%zu", q->n);
    SARG(nums[nn]);
    nn++;
    for (size_t i = 0; i < q->n; i++) {
      snprintf(nums[nn], sizeof nums[nn], "%u", (unsigned)key_of[u + i] + 1);
      SARG(nums[nn]);
      nn++;
    }
    for (size_t i = 0; i < q->n; i++) SARG(q->uids[i]);
    u += q->n;
  }
#undef SARG
#undef ARG
  push *x = malloc(sizeof *x);
  if (!x) goto out;
  *x = (push){r, list};
  if (rlink_cmd(&r->cmd, on_pushed, x, (int)k, argv, lens) < 0) {
    free(x);
    goto out;
  }
  *rc = 0;
out:
  free(argv);
  free(lens);
  free(keys);
  free(nums);
  return p;
}

/* End of a loop pass: the pass's cross-node sends go to Redis in one call
 * (LOOKUP_MAX uids at a time), which finds their nodes and appends to those
 * nodes' streams. */
static void flush(im_redis *r) {
  while (r->pend && r->cmd.up && home_of(r)->leased) {
    pending *list = r->pend;
    if (list->n > LOOKUP_MAX) { /* one send with more uids than a call takes: split it */
      r->pend = list->next;
      if (!r->pend) r->pend_tail = NULL;
      for (size_t off = 0; off < list->n; off += LOOKUP_MAX) {
        pending *q = calloc(1, sizeof *q);
        size_t cnt = list->n - off < LOOKUP_MAX ? list->n - off : LOOKUP_MAX;
        if (!q || rwire_put_bytes(&q->head, list->head.p, list->head.len) < 0) {
          free(q);
          count_drop(r);
          continue;
        }
        r->pend_bytes += q->head.len;
        enqueue(r, q, (const char *const *)list->uids + off, cnt);
        r->pend_bytes -= q->head.len;
      }
      r->pend_bytes -= list->head.len;
      pending_free(list);
      continue;
    }
    int rc;
    pending *rest = push_some(r, list, &rc);
    if (rc < 0) return; /* kept for the next pass or the reconnect */
    /* detach what was sent: it is the call's now */
    pending *last = list;
    while (last->next != rest) last = last->next;
    last->next = NULL;
    r->pend = rest;
    if (!rest) r->pend_tail = NULL;
  }
}

static void on_flush(evutil_socket_t fd, short what, void *arg) {
  (void)fd;
  (void)what;
  flush(arg);
}

/* ---- the delivery stream of this node ------------------------------------------------ */

static void apply_entry(im_redis *r, const redisReply *fields) {
  for (size_t i = 0; i + 1 < fields->elements; i += 2) {
    const redisReply *v = fields->element[i + 1];
    if (v->type != REDIS_REPLY_STRING) continue;
    const uint8_t *p = (const uint8_t *)v->str, *end = p + v->len;
    rwire_rec rec;
    while (rwire_next(&p, end, &rec) == 1) {
      const uint8_t *at = rec.uids;
      const char *uids[LOOKUP_MAX];
      size_t k = 0;
      for (uint32_t u = 0; u < rec.n; u++) {
        uids[k++] = rwire_uid(&at);
        if (k == LOOKUP_MAX || u + 1 == rec.n) {
          if (rec.kind == RWIRE_MSG)
            im_group_local_send_users(r->group, r->srv, uids, k, &rec.m, 0);
          else if (rec.kind == RWIRE_KICK)
            for (size_t x = 0; x < k; x++)
              im_group_local_kick_user(r->group, r->srv, uids[x], rec.code,
                                       rec.reason ? rec.reason : "");
          k = 0;
        }
      }
    }
  }
}

static void on_xread(redisAsyncContext *ac, void *rep, void *priv) {
  (void)ac;
  im_redis *r = priv;
  redisReply *rp = rep;
  r->stream_reading = false;
  if (!rp || r->freeing) return; /* the link is down: read again when it is back */
  if (rp->type == REDIS_REPLY_ARRAY) {
    for (size_t s = 0; s < rp->elements; s++) {
      redisReply *st = rp->element[s];
      if (st->type != REDIS_REPLY_ARRAY || st->elements != 2) continue;
      redisReply *entries = st->element[1];
      for (size_t e = 0; entries->type == REDIS_REPLY_ARRAY && e < entries->elements; e++) {
        redisReply *en = entries->element[e];
        if (en->type != REDIS_REPLY_ARRAY || en->elements != 2) continue;
        snprintf(r->last_id, sizeof r->last_id, "%s", en->element[0]->str);
        if (en->element[1]->type == REDIS_REPLY_ARRAY) apply_entry(r, en->element[1]);
      }
    }
  } else if (rp->type == REDIS_REPLY_ERROR) {
    /* not a stream (yet), loading, out of clients...: try again in a moment */
    fprintf(stderr, "libim: XREAD failed: %s\n", rp->str);
    struct timeval tv = {1, 0};
    event_add(r->xread_retry_ev, &tv);
    return;
  }
  stream_read(r);
}

static void on_xread_retry(evutil_socket_t fd, short what, void *arg) {
  (void)fd;
  (void)what;
  stream_read(arg);
}

static void stream_read(im_redis *r) {
  if (r->stream_reading || !r->stream.up || !r->leased || !r->last_id[0]) return;
  char k[KEY_MAX];
  key(r, k, "deliver:{%s}", r->node);
  const char *argv[] = {"XREAD", "COUNT", XREAD_COUNT, "BLOCK", "0", "STREAMS", k, r->last_id};
  size_t lens[8];
  for (int i = 0; i < 8; i++) lens[i] = strlen(argv[i]);
  r->stream_reading = rlink_cmd(&r->stream, on_xread, r, 8, argv, lens) == 0;
}

/* ---- presence and gateways ------------------------------------------------------------ */

typedef struct presence_req {
  im_redis *r;
  im_presence_cb cb;
  void *arg;
  size_t n_local;
  im_route *local;          /* copies of the local routes */
  char *strs;
  char uid[];
} presence_req;

static void on_routes(redisAsyncContext *ac, void *rep, void *priv) {
  (void)ac;
  presence_req *q = priv;
  im_redis *r = q->r;
  redisReply *rp = rep;
  size_t nr = rp && rp->type == REDIS_REPLY_ARRAY ? rp->elements / 2 : 0;
  im_route *all = calloc(q->n_local + nr + 1, sizeof *all);
  char (*bufs)[1024] = nr ? calloc(nr, sizeof *bufs) : NULL;
  size_t n = 0;
  if (all) memcpy(all, q->local, q->n_local * sizeof *all);
  n = all ? q->n_local : 0;
  for (size_t i = 0; all && bufs && i < nr; i++) {
    const char *field = rp->element[2 * i]->str, *val = rp->element[2 * i + 1]->str;
    if (!field || !val) continue;
    snprintf(bufs[i], sizeof bufs[i], "%s", val);
    char *parts[7] = {0}, *s = bufs[i];
    for (int k = 0; k < 7; k++) parts[k] = strsep(&s, "|");
    if (!parts[6] || !strcmp(parts[0], r->node)) continue; /* ours are the local ones */
    field_unescape(parts[2]);
    field_unescape(parts[3]);
    const char *slash = strchr(field, '/');
    all[n++] = (im_route){.node = parts[0], .conn = slash ? slash + 1 : field, .platform = parts[2],
                          .device = parts[3], .peer = parts[4],
                          .transport = !strcmp(parts[6], "tcp") ? IM_TRANSPORT_TCP : IM_TRANSPORT_WS,
                          .since_ms = strtoull(parts[5], NULL, 10)};
  }
  if (!r->freeing)
    q->cb(r->srv, q->uid, all ? all : q->local, all ? n : q->n_local, rp ? 0 : IM_ECLOSED, q->arg);
  free(bufs);
  free(all);
  free(q->local);
  free(q->strs);
  free(q);
}

static int h_presence(im_server *srv, const char *uid, const im_route *local, size_t n_local,
                      im_presence_cb cb, void *arg, void *ud) {
  (void)srv;
  im_redis *r = ud;
  size_t ul = strlen(uid) + 1, sl = 0;
  for (size_t i = 0; i < n_local; i++)
    sl += strlen(local[i].conn) + strlen(local[i].device) + strlen(local[i].platform) +
          strlen(local[i].peer) + 4;
  presence_req *q = calloc(1, sizeof *q + ul);
  if (!q) return IM_ENOMEM;
  q->local = calloc(n_local + 1, sizeof *q->local);
  q->strs = malloc(sl + 1);
  if (!q->local || !q->strs) {
    free(q->local);
    free(q->strs);
    free(q);
    return IM_ENOMEM;
  }
  char *at = q->strs;
  for (size_t i = 0; i < n_local; i++) {
    q->local[i] = local[i];
    const char **f[] = {&q->local[i].conn, &q->local[i].device, &q->local[i].platform,
                        &q->local[i].peer};
    for (int k = 0; k < 4; k++) {
      size_t n = strlen(*f[k]) + 1;
      memcpy(at, *f[k], n);
      *f[k] = at;
      at += n;
    }
  }
  q->r = r;
  q->cb = cb;
  q->arg = arg;
  q->n_local = n_local;
  memcpy(q->uid, uid, ul);
  char k[KEY_MAX];
  key(r, k, "route:{%s}", uid);
  if (rlink_cmdf(&r->cmd, on_routes, q, "HGETALL %s", k) < 0) {
    /* Redis away: the local connections are all we know */
    free(q->local);
    free(q->strs);
    free(q);
    cb(srv, uid, local, n_local, IM_ECLOSED, arg);
  }
  return 0;
}

typedef struct gw_req {
  im_redis *r;
  im_gateways_cb cb;
  void *arg;
  char uid[];
} gw_req;

typedef struct gw_sort {
  im_gateway g;
  uint64_t tie;
} gw_sort;

static int gw_cmp(const void *a, const void *b) {
  const gw_sort *x = a, *y = b;
  if (x->g.conns != y->g.conns) return x->g.conns < y->g.conns ? -1 : 1;
  return x->tie < y->tie ? -1 : x->tie > y->tie;
}

static void on_nodes(redisAsyncContext *ac, void *rep, void *priv) {
  (void)ac;
  gw_req *q = priv;
  redisReply *rp = rep;
  if (q->r->freeing) {
    free(q);
    return;
  }
  if (!rp || rp->type != REDIS_REPLY_ARRAY) {
    q->cb(q->arg, IM_ECLOSED, NULL, 0);
    free(q);
    return;
  }
  gw_sort *v = calloc(rp->elements + 1, sizeof *v);
  size_t n = 0;
  for (size_t i = 0; v && i < rp->elements; i++) {
    redisReply *e = rp->element[i];
    if (e->type != REDIS_REPLY_ARRAY || e->elements != 5) continue;
    if (!strcmp(e->element[4]->str, "1")) continue; /* draining */
    v[n].g = (im_gateway){e->element[0]->str, e->element[1]->str, e->element[2]->str,
                          strtoull(e->element[3]->str, NULL, 10)};
    v[n].tie = fnv(q->uid, e->element[0]->str);
    n++;
  }
  if (v) qsort(v, n, sizeof *v, gw_cmp);
  im_gateway *out = v ? calloc(n + 1, sizeof *out) : NULL;
  for (size_t i = 0; out && i < n; i++) out[i] = v[i].g;
  q->cb(q->arg, out ? 0 : IM_ENOMEM, out, out ? n : 0);
  free(out);
  free(v);
  free(q);
}

int im_redis_gateways(im_redis *r, const char *uid, im_gateways_cb cb, void *arg) {
  size_t ul = strlen(uid ? uid : "") + 1;
  gw_req *q = malloc(sizeof *q + ul);
  if (!q) return IM_ENOMEM;
  *q = (gw_req){r, cb, arg};
  memcpy(q->uid, uid ? uid : "", ul);
  char kleases[KEY_MAX];
  key(r, kleases, "%s", "leases");
  const char *keys[] = {kleases};
  const char *args[] = {r->prefix};
  if (eval(r, on_nodes, q, LUA_NODES, 1, keys, 1, args) < 0) {
    free(q);
    return IM_ECLOSED;
  }
  return 0;
}

/* ---- links up and down -------------------------------------------------------------- */

static void subscribe_room(const char *room, size_t members, void *arg) {
  (void)members;
  subscribe(arg, room, true);
}

static void subscribe_process_room(const char *room, void *arg) { subscribe(arg, room, true); }

static void on_link(rlink *l, bool up, void *ud) {
  im_redis *r = ud;
  if (r->freeing) return;
  if (r->home) { /* a member's handle: its routes again (the lease is the home's) */
    if (up && home_of(r)->leased) im_server_announce(r->srv);
    if (up) flush(r);
    return;
  }
  if (l == &r->cmd) {
    if (up) {
      lease_renew(r); /* keeps the lease when it survived, else takes a new one */
      flush(r);
    } else {
      r->leased = false;
      r->acquiring = false;
      emit(r, IM_REDIS_DOWN);
    }
  } else if (l == &r->stream) {
    if (up) {
      if (r->stream_was_up) emit(r, IM_REDIS_RESYNC);
      r->stream_was_up = true;
      stream_read(r);
    } else {
      r->stream_reading = false;
    }
  } else if (l == &r->sub && up) {
    if (r->group)
      im_group_rooms(r->group, subscribe_process_room, r);
    else
      im_server_rooms(r->srv, subscribe_room, r);
  }
}

/* ---- lifecycle ---------------------------------------------------------------------- */

void im_redis_config_init(im_redis_config *cfg) {
  memset(cfg, 0, sizeof *cfg);
  cfg->host = "127.0.0.1";
  cfg->port = 6379;
  cfg->prefix = "im:";
  cfg->lease_ttl_ms = 10000;
  cfg->stream_max = 100000;
}

im_redis *im_redis_new(struct event_base *base, im_server *srv, const im_redis_config *cfg) {
  return im_redis_new_group(base, srv, NULL, cfg);
}

im_redis *im_redis_new_group(struct event_base *base, im_server *srv, im_group *g,
                             const im_redis_config *cfg) {
  if (!cfg || !cfg->node || !*cfg->node || strlen(cfg->node) > IM_REDIS_NODE_MAX ||
      (cfg->prefix && strlen(cfg->prefix) > PREFIX_MAX) ||
      strchr(cfg->node, '|') || strchr(cfg->node, '/') ||
      cfg->lease_ttl_ms < 300)
    return NULL;
  im_redis *r = calloc(1, sizeof *r);
  if (!r) return NULL;
  r->base = base;
  r->srv = srv;
  r->group = g;
  r->cfg = *cfg;
  atomic_init(&r->node_id, -1);
  r->host = dup_or_null(cfg->host ? cfg->host : "127.0.0.1");
  r->prefix = dup_or_null(cfg->prefix ? cfg->prefix : "im:");
  r->node = dup_or_null(cfg->node);
  r->adv_ws = dup_or_null(cfg->advertise_ws);
  r->adv_tcp = dup_or_null(cfg->advertise_tcp);
  if (!r->cfg.stream_max) r->cfg.stream_max = 100000;
  fmt_u64(r->maxlen_arg, r->cfg.stream_max);
  r->renew_ev = event_new(base, -1, EV_PERSIST, on_renew_timer, r);
  r->flush_ev = event_new(base, -1, 0, on_flush, r);
  r->xread_retry_ev = evtimer_new(base, on_xread_retry, r);
  if (!r->host || !r->prefix || !r->node || (cfg->advertise_ws && !r->adv_ws) ||
      (cfg->advertise_tcp && !r->adv_tcp) || !r->renew_ev || !r->flush_ev || !r->xread_retry_ev ||
      rlink_init(&r->cmd, base, r->host, cfg->port, "commands", on_link, r) < 0 ||
      rlink_init(&r->stream, base, r->host, cfg->port, "stream", on_link, r) < 0 ||
      rlink_init(&r->sub, base, r->host, cfg->port, "rooms", on_link, r) < 0) {
    r->freeing = true;
    im_redis_free(r);
    return NULL;
  }
  /* CLIENT SETNAME takes no spaces: such a node's links stay unnamed */
  if (!strpbrk(r->node, " \t\r\n")) {
    snprintf(r->cmd.client_name, sizeof r->cmd.client_name, "im:%s:commands", r->node);
    snprintf(r->stream.client_name, sizeof r->stream.client_name, "im:%s:stream", r->node);
    snprintf(r->sub.client_name, sizeof r->sub.client_name, "im:%s:rooms", r->node);
  }
  uint32_t every = r->cfg.lease_ttl_ms / 3;
  struct timeval tv = {every / 1000, (every % 1000) * 1000};
  event_add(r->renew_ev, &tv);
  im_router rt = {.conn_open = h_conn_open, .conn_close = h_conn_close,
                  .room_open = h_room_open, .room_close = h_room_close,
                  .send_users = h_send_users, .room_send = h_room_send,
                  .kick_user = h_kick_user, .presence = h_presence, .ud = r};
  if (r->group ? im_group_set_outer(r->group, srv, &rt) < 0 : im_server_set_router(srv, &rt) < 0) {
    r->freeing = true;
    r->srv = NULL; /* nothing installed */
    im_redis_free(r);
    return NULL;
  }
  rlink_start(&r->cmd);
  rlink_start(&r->stream);
  rlink_start(&r->sub);
  return r;
}

im_redis *im_redis_join(im_redis *home, struct event_base *base, im_server *srv) {
  if (!home || home->home || !home->group || !base || !srv) return NULL;
  im_redis *r = calloc(1, sizeof *r);
  if (!r) return NULL;
  r->base = base;
  r->srv = srv;
  r->group = home->group;
  r->home = home;
  r->cfg = home->cfg;
  r->cfg.on_event = NULL;
  /* the home's strings: it outlives its handles */
  r->host = home->host;
  r->prefix = home->prefix;
  r->node = home->node;
  memcpy(r->maxlen_arg, home->maxlen_arg, sizeof r->maxlen_arg);
  r->flush_ev = event_new(base, -1, 0, on_flush, r);
  im_router rt = {.conn_open = h_conn_open, .conn_close = h_conn_close,
                  .send_users = h_send_users, .room_send = h_room_send,
                  .kick_user = h_kick_user, .presence = h_presence, .ud = r};
  if (!r->flush_ev ||
      rlink_init(&r->cmd, base, r->host, home->cfg.port, "commands", on_link, r) < 0 ||
      im_group_set_outer(r->group, srv, &rt) < 0) {
    if (r->flush_ev) event_free(r->flush_ev);
    if (r->cmd.base) rlink_close(&r->cmd);
    free(r);
    return NULL;
  }
  int member = im_group_member(r->group, srv); /* >= 0: set_outer found it */
  home->handles[member] = r;
  if (home->cmd.client_name[0])
    snprintf(r->cmd.client_name, sizeof r->cmd.client_name, "%.*s:%d",
             (int)sizeof r->cmd.client_name - 8, home->cmd.client_name, member);
  rlink_start(&r->cmd);
  return r;
}

static void release_lease(im_redis *r) {
  if (!r->cmd.up || !r->epoch) return;
  char knode[KEY_MAX], kids[KEY_MAX], kleases[KEY_MAX], ep[24], id[24];
  key(r, knode, "node:%s", r->node);
  key(r, kids, "%s", "nodeids");
  key(r, kleases, "%s", "leases");
  fmt_u64(ep, r->epoch);
  fmt_u64(id, (uint64_t)(r->node_id < 0 ? 0 : r->node_id));
  const char *keys[] = {knode, kids, kleases};
  const char *args[] = {r->node, ep, id};
  eval(r, ignore_reply, NULL, LUA_LEASE_RELEASE, 3, keys, 3, args);
}

void im_redis_free(im_redis *r) {
  if (!r) return;
  if (r->srv && r->group)
    im_group_set_outer(r->group, r->srv, NULL);
  else if (r->srv)
    im_server_set_router(r->srv, NULL);
  /* what is still queued goes out first (best effort), then the lease:
   * survivors purge our routes at once */
  if (!r->freeing) {
    flush(r);
    if (!r->home) release_lease(r);
  }
  r->freeing = true;
  if (r->renew_ev) event_free(r->renew_ev);
  if (r->flush_ev) event_free(r->flush_ev);
  if (r->xread_retry_ev) event_free(r->xread_retry_ev);
  rlink_close(&r->sub);
  rlink_close(&r->stream);
  rlink_close(&r->cmd);
  while (r->pend) {
    pending *p = r->pend;
    r->pend = p->next;
    pending_free(p);
  }
  if (r->home) { /* the strings are the home's */
    int i = im_group_member(r->group, r->srv);
    if (i >= 0) r->home->handles[i] = NULL;
    free(r);
    return;
  }
  free(r->host);
  free(r->prefix);
  free(r->node);
  free(r->adv_ws);
  free(r->adv_tcp);
  free(r);
}

int im_redis_up(const im_redis *r) { return r->cmd.up && home_of(r)->leased; }
uint64_t im_redis_epoch(const im_redis *r) { return home_of(r)->epoch; }
const char *im_redis_node(const im_redis *r) { return r->node; }
uint64_t im_redis_dropped(const im_redis *r) { return atomic_load(&home_of(r)->dropped); }

const char *im_redis_push_lua(void) { return LUA_PUSH_FNS; }

int im_redis_push_argv(im_redis *r, const char *argv[3]) {
  if (!r || !argv) return IM_EINVAL;
  if (!im_redis_up(r)) return IM_ECLOSED;
  argv[0] = r->node;
  argv[1] = r->prefix;
  argv[2] = r->maxlen_arg;
  return 0;
}

int im_redis_encode_head(const im_msg *m, void **head, size_t *len) {
  if (!m || !head || !len) return IM_EINVAL;
  rbuf b = {0};
  if (rwire_put_msg_head(&b, RWIRE_MSG, m) < 0) {
    rbuf_free(&b);
    return IM_ENOMEM;
  }
  *head = b.p;
  *len = b.len;
  return 0;
}

int im_redis_set_draining(im_redis *r, int draining) {
  if (r->home) return IM_EINVAL;
  r->draining = draining != 0;
  if (!r->cmd.up || !r->epoch) return IM_ECLOSED;
  char k[KEY_MAX];
  key(r, k, "node:%s", r->node);
  rlink_cmdf(&r->cmd, ignore_reply, NULL, "HSET %s draining %s", k, r->draining ? "1" : "0");
  return 0;
}

/* A command of the application, with its own callback and argument. */
typedef struct app_cmd {
  im_redis_reply_cb cb;
  void *arg;
} app_cmd;

static void on_app_reply(redisAsyncContext *ac, void *rep, void *priv) {
  (void)ac;
  app_cmd *c = priv;
  c->cb(c->arg, rep);
  free(c);
}

int im_redis_command(im_redis *r, int argc, const char **argv, const size_t *argvlen,
                     im_redis_reply_cb cb, void *arg) {
  if (!r->cmd.up) return IM_ECLOSED;
  app_cmd *c = malloc(sizeof *c);
  if (!c) return IM_ENOMEM;
  *c = (app_cmd){cb, arg};
  if (rlink_cmd(&r->cmd, on_app_reply, c, argc, argv, argvlen) < 0) {
    free(c);
    return IM_ECLOSED;
  }
  return 0;
}
