/* Engines on several threads joined as one server (include/libim/im_group.h).
 *
 * Which members hold a uid's authenticated connections, and how many, is
 * in the group's im_shared: each member counts its connections in its own
 * slot of the uid's record there (core/shared.c), so the process keeps one
 * entry per online user. Rooms have a table here, a keyed hash under a
 * read-write lock: room -> which members have local members. Senders look
 * up which members hold receivers; opens and closes of rooms take the
 * write lock. A routed
 * operation is copied once per receiving member into one allocation and
 * posted to that member's im_async queue (one wake-up per batch); the
 * member applies it with the im_local_* calls. Presence asks every member
 * holding the uid and answers once all replied.
 *
 * A cluster module chained after the group (im_group_set_outer) gets, on
 * each member's thread, what that member started (connections, sends,
 * kicks, presence with every member's routes), and on one member the rooms
 * as the process gains and loses them; what it brings in from elsewhere it
 * hands back through im_group_local_* (never to itself again). */
#include <libim/im_async.h>
#include <libim/im_group.h>
#include <libim/im_router.h>
#include <libim/im_shared.h>

#include <inttypes.h>
#include <pthread.h>
#include <stdalign.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/msg_copy.h"
#include "core/shared.h"
#include "core/strmap.h"

/* What one presence answer of a member lists at most (as im_presence). */
#define ROUTES_MAX 256
#define QUEUED_DEFAULT 1000000

/* ---- the tables ------------------------------------------------------------------ */

/* A room: which members have local members of it. The key follows. */
typedef struct g_entry {
  strmap_node node;
  uint64_t mask;            /* bit i: member i has */
  char key[];
} g_entry;

typedef struct g_table {
  pthread_rwlock_t lock;
  strmap map;
} g_table;

/* ---- operations between members ---------------------------------------------------- */

enum g_kind { G_USERS, G_ROOM, G_KICK, G_ASK, G_REPLY, G_CALL, G_ROOMCHK };

typedef struct g_pending g_pending;

/* One routed operation; strings, uid pointers and routes live in buf. */
typedef struct g_op {
  enum g_kind kind;
  unsigned from;            /* the member that posted it */
  int code;
  const char *key;          /* room (G_ROOM), uid (G_KICK, G_ASK) */
  const char *reason;       /* G_KICK */
  g_pending *pend;          /* G_ASK, G_REPLY */
  size_t n;                 /* uids (G_USERS) or routes (G_REPLY) */
  const char **uids;
  im_route *routes;
  void (*fn)(im_server *srv, void *arg); /* G_CALL */
  void *arg;
  im_msg m;
  alignas(max_align_t) char buf[];
} g_op;

/* A presence question waiting for the other members' answers (owned by
 * the asking member's thread; its list is freed with the group). */
struct g_pending {
  g_pending *next, *prev;
  im_server *srv;
  im_presence_cb cb;
  void *arg;
  unsigned waiting;         /* answers still to come */
  int status;
  g_op **blocks;            /* the answers (the first: the local routes) */
  size_t nblocks;
  char uid[];
};

typedef struct g_member {
  struct im_group *g;
  unsigned idx;
  im_server *srv;
  im_async *q;
  atomic_size_t queued;
  atomic_uint_fast64_t applied, dropped;
  g_pending *pending;       /* presence questions of this member */
  im_router outer;          /* the router after the group for this member (im_group_set_outer) */
  bool has_outer;
  strmap outer_rooms;       /* rooms the outer room hooks were told of (the room member's
                             * thread only; keys of g_entry) */
} g_member;

struct im_group {
  unsigned members;
  size_t max_queued;
  pthread_mutex_t join_lock;
  atomic_uint joined;
  atomic_bool stopping;
  uint64_t id_clock;        /* im_server_set_id_clock of every member */
  im_shared *shared;        /* im_server_set_shared of every member: process-wide limits,
                             * and who holds each uid (a slot per member) */
  g_table rooms;
  atomic_int room_member;   /* the member whose outer router takes the process's room
                             * opens and closes; -1: none */
  g_member m[IM_GROUP_MAX];
};

static int table_init(g_table *t) {
  if (strmap_init(&t->map, 1024) < 0) return -1;
  pthread_rwlock_init(&t->lock, NULL);
  return 0;
}

/* Free a map of g_entry (malloc'd nodes) and its buckets; it reads as empty. */
static void entries_free(strmap *m) {
  for (uint32_t b = 0; m->buckets && b <= m->mask; b++)
    for (strmap_node *n = m->buckets[b], *next; n; n = next) {
      next = n->next;
      free(n);
    }
  strmap_free(m);
  memset(m, 0, sizeof *m);
}

static void table_free(g_table *t) {
  entries_free(&t->map);
  pthread_rwlock_destroy(&t->lock);
}

/* Member i has key now (add) or no longer. The engine pairs each room's
 * open and close on a member, so one bit per member says it. false: no
 * memory. *changed: the process gained its first or lost its last member
 * of key. */
static bool table_mark(g_table *t, const char *key, unsigned i, bool add, bool *changed) {
  size_t len = strlen(key);
  bool ok = true;
  *changed = false;
  pthread_rwlock_wrlock(&t->lock);
  g_entry *e = (g_entry *)strmap_get(&t->map, key, len);
  if (!e && add) {
    e = calloc(1, sizeof *e + len + 1);
    if (e) {
      memcpy(e->key, key, len + 1);
      e->node.key = e->key;
      e->node.klen = (uint32_t)len;
      strmap_put(&t->map, &e->node);
    }
  }
  if (!e) {
    ok = !add;
  } else if (add) {
    *changed = e->mask == 0;
    e->mask |= 1ull << i;
  } else if (e->mask && (e->mask &= ~(1ull << i)) == 0) {
    *changed = true;
    strmap_del(&t->map, &e->node);
    free(e);
  }
  pthread_rwlock_unlock(&t->lock);
  return ok;
}

/* The other members holding key (caller holds the read lock). */
static uint64_t others(const g_table *t, const char *key, unsigned me) {
  g_entry *e = (g_entry *)strmap_get(&t->map, key, strlen(key));
  return e ? e->mask & ~(1ull << me) : 0;
}

/* The other members holding connections of uid; counts (when not NULL)
 * gets how many each holds. */
static uint64_t user_others(im_group *g, const char *uid, unsigned me, uint32_t *counts) {
  return shared_user_spread(g->shared, uid, strlen(uid), me, counts);
}

/* ---- posting and applying -------------------------------------------------------- */

static size_t slen(const char *s) { return s ? strlen(s) + 1 : 0; }

static g_op *op_new(enum g_kind kind, unsigned from, size_t extra) {
  g_op *op = calloc(1, sizeof *op + extra);
  if (op) {
    op->kind = kind;
    op->from = from;
  }
  return op;
}

/* Queue op for member t; counts it dropped (and frees it) when t's queue
 * is over its bound (bounded: false for presence answers, which a question
 * bounds) or memory ran out. Returns true when queued. */
static bool post(im_group *g, unsigned t, g_op *op, bool bounded) {
  g_member *dst = &g->m[t];
  if (!op) {
    atomic_fetch_add(&dst->dropped, 1);
    return false;
  }
  if (atomic_fetch_add(&dst->queued, 1) >= g->max_queued && bounded) {
    atomic_fetch_sub(&dst->queued, 1);
    atomic_fetch_add(&dst->dropped, 1);
    free(op);
    return false;
  }
  if (im_async_post(dst->q, op) < 0) {
    atomic_fetch_sub(&dst->queued, 1);
    atomic_fetch_add(&dst->dropped, 1);
    free(op);
    return false;
  }
  return true;
}

/* A G_REPLY op carrying copies of n routes (strings included). */
static g_op *op_routes(unsigned from, g_pending *p, const im_route *r, size_t n) {
  size_t extra = n * sizeof(im_route);
  for (size_t i = 0; i < n; i++)
    extra += slen(r[i].node) + slen(r[i].conn) + slen(r[i].device) + slen(r[i].platform) +
             slen(r[i].peer);
  g_op *op = op_new(G_REPLY, from, extra);
  if (!op) return NULL;
  op->pend = p;
  op->n = n;
  op->routes = (im_route *)op->buf;
  char *at = op->buf + n * sizeof(im_route);
  for (size_t i = 0; i < n; i++) {
    op->routes[i] = r[i];
    op->routes[i].node = msgcopy_str(&at, r[i].node);
    op->routes[i].conn = msgcopy_str(&at, r[i].conn);
    op->routes[i].device = msgcopy_str(&at, r[i].device);
    op->routes[i].platform = msgcopy_str(&at, r[i].platform);
    op->routes[i].peer = msgcopy_str(&at, r[i].peer);
  }
  return op;
}

static void pending_free(g_member *me, g_pending *p) {
  if (p->prev)
    p->prev->next = p->next;
  else
    me->pending = p->next;
  if (p->next) p->next->prev = p->prev;
  for (size_t i = 0; i < p->nblocks; i++) free(p->blocks[i]);
  free(p->blocks);
  free(p);
}

/* Every answer is in: call back with all routes (the local ones first). */
static void pending_finish(g_member *me, g_pending *p) {
  size_t total = 0;
  for (size_t i = 0; i < p->nblocks; i++) total += p->blocks[i]->n;
  im_route *all = malloc((total ? total : 1) * sizeof *all);
  if (!all) {
    total = p->blocks[0]->n;
    p->status = IM_ENOMEM;
  }
  im_route *routes = all ? all : p->blocks[0]->routes;
  if (all)
    for (size_t i = 0, k = 0; i < p->nblocks; i++) {
      memcpy(all + k, p->blocks[i]->routes, p->blocks[i]->n * sizeof *all);
      k += p->blocks[i]->n;
    }
  /* the process's routes, as the outer router's local ones: it adds the
   * other nodes' (and calls back) */
  if (!me->has_outer || !me->outer.presence ||
      me->outer.presence(p->srv, p->uid, routes, total, p->cb, p->arg, me->outer.ud) < 0)
    p->cb(p->srv, p->uid, routes, total, p->status, p->arg);
  free(all);
  pending_free(me, p);
}

/* The connections of uid on this member, as routes (conn ids in ids). */
static size_t member_routes(im_server *srv, const char *uid, im_route *out, char (*ids)[24]) {
  im_conn_id conns[ROUTES_MAX];
  size_t n = im_user_conns(srv, uid, conns, ROUTES_MAX), k = 0;
  if (n > ROUTES_MAX) n = ROUTES_MAX;
  for (size_t i = 0; i < n; i++) {
    im_conn_info info;
    if (im_conn_get_info(srv, conns[i], &info) < 0) continue;
    snprintf(ids[k], sizeof ids[k], "%" PRIx64, conns[i]);
    out[k] = (im_route){.node = NULL, .conn = ids[k], .device = info.device,
                        .platform = info.platform, .peer = info.peer,
                        .transport = info.transport,
                        .since_ms = im_server_wall_base(srv) + info.since_ms};
    k++;
  }
  return k;
}

static void answer(g_member *me, const g_op *ask) {
  im_route routes[ROUTES_MAX];
  char ids[ROUTES_MAX][24];
  size_t n = member_routes(me->srv, ask->key, routes, ids);
  post(me->g, ask->from, op_routes(me->idx, ask->pend, routes, n), false);
}

/* An answer arrived on the asking member. */
static void take_answer(g_member *me, g_op *op) {
  g_pending *p = op->pend;
  p->blocks[p->nblocks++] = op;
  if (--p->waiting == 0) pending_finish(me, p);
}

/* On the room member's thread: tell its outer router whether the process
 * has members of room now, against what it was told before (so checks that
 * several members posted, in whatever order they arrive, leave it right:
 * the last one sees the last change). */
static void room_check(g_member *me, const char *room) {
  im_group *g = me->g;
  size_t len = strlen(room);
  if (!me->has_outer || !me->outer_rooms.buckets) return; /* removed meanwhile */
  pthread_rwlock_rdlock(&g->rooms.lock);
  bool has = strmap_get(&g->rooms.map, room, len) != NULL;
  pthread_rwlock_unlock(&g->rooms.lock);
  g_entry *told = (g_entry *)strmap_get(&me->outer_rooms, room, len);
  if (has == (told != NULL)) return;
  if (has) {
    told = calloc(1, sizeof *told + len + 1);
    if (!told) {
      atomic_fetch_add(&me->dropped, 1);
      return;
    }
    memcpy(told->key, room, len + 1);
    told->node.key = told->key;
    told->node.klen = (uint32_t)len;
    strmap_put(&me->outer_rooms, &told->node);
    if (me->outer.room_open) me->outer.room_open(me->srv, room, me->outer.ud);
  } else {
    strmap_del(&me->outer_rooms, &told->node);
    if (me->outer.room_close) me->outer.room_close(me->srv, room, me->outer.ud);
    free(told);
  }
}

static g_op *op_uid(enum g_kind kind, unsigned from, const char *uid, const char *reason);

/* The process gained its first or lost its last member of room: the room
 * member's outer router hears of it on its own thread. */
static void room_changed(g_member *me, const char *room) {
  im_group *g = me->g;
  int rm = atomic_load(&g->room_member);
  if (rm < 0) return;
  if ((unsigned)rm == me->idx)
    room_check(me, room);
  else
    post(g, (unsigned)rm, op_uid(G_ROOMCHK, me->idx, room, NULL), true); /* bounded: clients cause it */
}

/* Runs on the member's loop thread for each operation posted to it. */
static void apply(void *item, void *arg) {
  g_op *op = item;
  g_member *me = arg;
  atomic_fetch_sub(&me->queued, 1);
  if (atomic_load(&me->g->stopping)) {
    free(op);
    return;
  }
  atomic_fetch_add(&me->applied, 1);
  switch (op->kind) {
  case G_USERS:
    im_local_send_users(me->srv, op->uids, op->n, &op->m, 0);
    break;
  case G_ROOM:
    im_local_room_send(me->srv, op->key, &op->m, 0);
    break;
  case G_KICK:
    im_local_kick_user(me->srv, op->key, op->code, op->reason);
    break;
  case G_ASK:
    answer(me, op);
    break;
  case G_REPLY:
    take_answer(me, op);
    return; /* kept by the question until it is answered */
  case G_CALL:
    op->fn(me->srv, op->arg);
    break;
  case G_ROOMCHK:
    room_check(me, op->key);
    break;
  }
  free(op);
}

/* ---- the router hooks (on the calling member's thread) ------------------------------- */

static void h_conn_open(im_server *srv, im_conn_id c, void *ud) {
  g_member *me = ud;
  if (me->has_outer && me->outer.conn_open) me->outer.conn_open(srv, c, me->outer.ud);
}

static void h_conn_close(im_server *srv, im_conn_id c, void *ud) {
  g_member *me = ud;
  if (me->has_outer && me->outer.conn_close) me->outer.conn_close(srv, c, me->outer.ud);
}

static void h_room_open(im_server *srv, const char *room, void *ud) {
  (void)srv;
  g_member *me = ud;
  bool changed;
  if (!table_mark(&me->g->rooms, room, me->idx, true, &changed))
    atomic_fetch_add(&me->dropped, 1);
  else if (changed)
    room_changed(me, room);
}

static void h_room_close(im_server *srv, const char *room, void *ud) {
  (void)srv;
  g_member *me = ud;
  bool changed;
  table_mark(&me->g->rooms, room, me->idx, false, &changed);
  if (changed) room_changed(me, room);
}

/* A G_USERS op for member t with the uids whose mask has t, and m. */
static g_op *op_users(unsigned from, unsigned t, const char *const *uids, const uint64_t *masks,
                      size_t n, const im_msg *m) {
  size_t k = 0, extra = msgcopy_size(m);
  for (size_t i = 0; i < n; i++)
    if (masks[i] & (1ull << t)) {
      k++;
      extra += sizeof(char *) + strlen(uids[i]) + 1;
    }
  g_op *op = op_new(G_USERS, from, extra);
  if (!op) return NULL;
  op->uids = (const char **)op->buf;
  char *at = op->buf + k * sizeof(char *);
  for (size_t i = 0; i < n; i++)
    if (masks[i] & (1ull << t)) op->uids[op->n++] = msgcopy_str(&at, uids[i]);
  msgcopy_put(&op->m, &at, m);
  return op;
}

/* The group's part of a send: a copy to each other member holding
 * receivers. Returns the connections the copies are for. */
static int group_send_users(g_member *me, const char *const *uids, size_t n, const im_msg *m) {
  im_group *g = me->g;
  uint64_t small[16], *masks = n <= 16 ? small : malloc(n * sizeof *masks), any = 0;
  if (!masks) return IM_ENOMEM;
  uint32_t counts[IM_GROUP_MAX], total[IM_GROUP_MAX] = {0};
  for (size_t i = 0; i < n; i++) {
    any |= masks[i] = user_others(g, uids[i], me->idx, counts);
    for (unsigned t = 0; t < g->members; t++)
      if (masks[i] & (1ull << t)) total[t] += counts[t];
  }
  int queued = 0; /* connections the copies are for */
  for (unsigned t = 0; any; t++, any >>= 1)
    if ((any & 1) && post(g, t, op_users(me->idx, t, uids, masks, n, m), true))
      queued += (int)total[t];
  if (masks != small) free(masks);
  return queued;
}

/* What the group could not reach goes to the outer router; its count (or
 * error) joins the group's. */
static int with_outer(int group, int outer) { return outer < 0 ? outer : group + outer; }

static int h_send_users(im_server *srv, const char *const *uids, size_t n, const im_msg *m,
                        void *ud) {
  g_member *me = ud;
  int queued = group_send_users(me, uids, n, m);
  if (me->has_outer && me->outer.send_users)
    return with_outer(queued, me->outer.send_users(srv, uids, n, m, me->outer.ud));
  return queued;
}

static int group_room_send(g_member *me, const char *room, const im_msg *m) {
  im_group *g = me->g;
  pthread_rwlock_rdlock(&g->rooms.lock);
  uint64_t any = others(&g->rooms, room, me->idx);
  pthread_rwlock_unlock(&g->rooms.lock);
  for (unsigned t = 0; any; t++, any >>= 1) {
    if (!(any & 1)) continue;
    g_op *op = op_new(G_ROOM, me->idx, slen(room) + msgcopy_size(m));
    if (op) {
      char *at = op->buf;
      op->key = msgcopy_str(&at, room);
      msgcopy_put(&op->m, &at, m);
    }
    post(g, t, op, true);
  }
  return 0;
}

static int h_room_send(im_server *srv, const char *room, const im_msg *m, void *ud) {
  g_member *me = ud;
  int rc = group_room_send(me, room, m);
  if (me->has_outer && me->outer.room_send)
    return with_outer(rc, me->outer.room_send(srv, room, m, me->outer.ud));
  return rc;
}

/* A G_KICK or G_ASK op naming uid. */
static g_op *op_uid(enum g_kind kind, unsigned from, const char *uid, const char *reason) {
  g_op *op = op_new(kind, from, slen(uid) + slen(reason));
  if (op) {
    char *at = op->buf;
    op->key = msgcopy_str(&at, uid);
    op->reason = msgcopy_str(&at, reason);
  }
  return op;
}

static int group_kick_user(g_member *me, const char *uid, int code, const char *reason) {
  im_group *g = me->g;
  uint32_t counts[IM_GROUP_MAX] = {0};
  uint64_t any = user_others(g, uid, me->idx, counts);
  int closing = 0;
  for (unsigned t = 0; any; t++, any >>= 1) {
    if (!(any & 1)) continue;
    g_op *op = op_uid(G_KICK, me->idx, uid, reason ? reason : "");
    if (op) op->code = code;
    if (post(g, t, op, true)) closing += (int)counts[t];
  }
  return closing;
}

static int h_kick_user(im_server *srv, const char *uid, int code, const char *reason, void *ud) {
  g_member *me = ud;
  int closing = group_kick_user(me, uid, code, reason);
  if (me->has_outer && me->outer.kick_user)
    return with_outer(closing, me->outer.kick_user(srv, uid, code, reason, me->outer.ud));
  return closing;
}

static int h_presence(im_server *srv, const char *uid, const im_route *local, size_t n_local,
                      im_presence_cb cb, void *arg, void *ud) {
  g_member *me = ud;
  im_group *g = me->g;
  uint64_t any = user_others(g, uid, me->idx, NULL);
  if (!any) {
    if (me->has_outer && me->outer.presence)
      return me->outer.presence(srv, uid, local, n_local, cb, arg, me->outer.ud);
    cb(srv, uid, local, n_local, 0, arg);
    return 0;
  }
  size_t len = strlen(uid) + 1;
  g_pending *p = calloc(1, sizeof *p + len);
  g_op *mine = op_routes(me->idx, p, local, n_local);
  if (p) p->blocks = calloc((size_t)__builtin_popcountll(any) + 1, sizeof *p->blocks);
  if (!p || !mine || !p->blocks) {
    if (p) free(p->blocks);
    free(p);
    free(mine);
    return IM_ENOMEM;
  }
  memcpy(p->uid, uid, len);
  p->srv = srv;
  p->cb = cb;
  p->arg = arg;
  p->blocks[p->nblocks++] = mine;
  p->next = me->pending;
  if (me->pending) me->pending->prev = p;
  me->pending = p;
  p->waiting = 1; /* held until every question is posted */
  for (unsigned t = 0; any; t++, any >>= 1) {
    if (!(any & 1)) continue;
    g_op *op = op_uid(G_ASK, me->idx, uid, NULL);
    if (op) op->pend = p;
    if (post(g, t, op, true))
      p->waiting++;
    else
      p->status = IM_ENOMEM; /* that member's connections are missing */
  }
  if (--p->waiting == 0) pending_finish(me, p);
  return 0;
}

/* ---- the group ------------------------------------------------------------------- */

im_group *im_group_new(unsigned members, size_t max_queued) {
  if (members < 1 || members > IM_GROUP_MAX) return NULL;
  im_group *g = calloc(1, sizeof *g);
  if (!g) return NULL;
  g->members = members;
  g->max_queued = max_queued ? max_queued : QUEUED_DEFAULT;
  atomic_init(&g->room_member, -1);
  if (!(g->shared = shared_new_slots(members)) || table_init(&g->rooms) < 0) {
    im_shared_release(g->shared);
    free(g);
    return NULL;
  }
  pthread_mutex_init(&g->join_lock, NULL);
  return g;
}

int im_group_join(im_group *g, struct event_base *base, im_server *srv) {
  pthread_mutex_lock(&g->join_lock);
  unsigned i = atomic_load(&g->joined);
  if (i >= g->members) {
    pthread_mutex_unlock(&g->join_lock);
    return IM_ELIMIT;
  }
  int rc = im_server_set_shared(srv, g->shared);
  if (rc == 0 && (rc = shared_set_slot(srv, i)) < 0) im_server_set_shared(srv, NULL);
  if (rc < 0) {
    pthread_mutex_unlock(&g->join_lock);
    return rc;
  }
  g_member *me = &g->m[i];
  me->g = g;
  me->idx = i;
  me->srv = srv;
  me->q = im_async_new(base, apply, me);
  if (!me->q) {
    im_server_set_shared(srv, NULL);
    pthread_mutex_unlock(&g->join_lock);
    return IM_ESYS;
  }
  atomic_store(&g->joined, i + 1);
  pthread_mutex_unlock(&g->join_lock);
  im_server_set_id_shard(srv, i, g->members);
  im_server_set_id_clock(srv, &g->id_clock);
  im_router r = {.conn_open = h_conn_open, .conn_close = h_conn_close,
                 .room_open = h_room_open, .room_close = h_room_close,
                 .send_users = h_send_users, .room_send = h_room_send,
                 .kick_user = h_kick_user, .presence = h_presence, .ud = me};
  im_server_set_router(srv, &r);
  return (int)i;
}

size_t im_group_run(im_group *g, unsigned member) {
  if (member >= atomic_load(&g->joined)) return 0;
  return im_async_run(g->m[member].q);
}

void im_group_stats(im_group *g, unsigned member, im_group_counters *st) {
  memset(st, 0, sizeof *st);
  if (member >= atomic_load(&g->joined)) return;
  g_member *me = &g->m[member];
  im_async_counts(me->q, &st->posted, &st->wakeups);
  st->applied = atomic_load(&me->applied);
  st->dropped = atomic_load(&me->dropped);
}

size_t im_group_user_conns(im_group *g, const char *uid) {
  return im_shared_user_conns(g->shared, uid);
}

void im_group_totals(im_group *g, size_t *users, size_t *rooms) {
  if (users) *users = shared_users(g->shared);
  if (rooms) {
    pthread_rwlock_rdlock(&g->rooms.lock);
    *rooms = g->rooms.map.count;
    pthread_rwlock_unlock(&g->rooms.lock);
  }
}

unsigned im_group_size(im_group *g) { return atomic_load(&g->joined); }

void im_group_free(im_group *g) {
  if (!g) return;
  atomic_store(&g->stopping, true);
  unsigned n = atomic_load(&g->joined);
  /* the servers outlive the group: closing their connections later (an
   * im_event_free) must not reach the group's hooks */
  for (unsigned i = 0; i < n; i++) im_server_set_router(g->m[i].srv, NULL);
  for (unsigned i = 0; i < n; i++) im_async_free(g->m[i].q); /* drops what is queued */
  for (unsigned i = 0; i < n; i++) {
    while (g->m[i].pending) pending_free(&g->m[i], g->m[i].pending);
    entries_free(&g->m[i].outer_rooms);
  }
  table_free(&g->rooms);
  im_shared_release(g->shared); /* the members keep theirs while they live */
  pthread_mutex_destroy(&g->join_lock);
  free(g);
}

/* ---- an outer router: the cluster after the group ----------------------------------- */

int im_group_member(im_group *g, const im_server *srv) {
  unsigned n = atomic_load(&g->joined);
  for (unsigned i = 0; i < n; i++)
    if (g->m[i].srv == srv) return (int)i;
  return IM_ENOENT;
}

int im_group_set_outer(im_group *g, im_server *srv, const im_router *outer) {
  int i = im_group_member(g, srv);
  if (i < 0) return i;
  g_member *me = &g->m[i];
  if (!outer) {
    me->has_outer = false;
    memset(&me->outer, 0, sizeof me->outer);
    int rm = i;
    atomic_compare_exchange_strong(&g->room_member, &rm, -1);
    entries_free(&me->outer_rooms);
    return 0;
  }
  if ((outer->room_open || outer->room_close) && !me->outer_rooms.buckets &&
      strmap_init(&me->outer_rooms, 64) < 0)
    return IM_ENOMEM;
  me->outer = *outer;
  me->has_outer = true;
  if (outer->room_open || outer->room_close) atomic_store(&g->room_member, i);
  return 0;
}

int im_group_call(im_group *g, unsigned member, void (*fn)(im_server *srv, void *arg), void *arg) {
  if (!fn) return IM_EINVAL;
  if (member >= atomic_load(&g->joined)) return IM_ENOENT;
  if (atomic_load(&g->stopping)) return IM_ECLOSED;
  g_op *op = op_new(G_CALL, member, 0);
  if (!op) return IM_ENOMEM;
  op->fn = fn;
  op->arg = arg;
  return post(g, member, op, false) ? 0 : IM_ENOMEM;
}

/* srv's member for the im_group_local_* calls: NULL when g is (srv alone),
 * else IM_ENOENT in *rc when srv has not joined. */
static g_member *local_member(im_group *g, const im_server *srv, int *rc) {
  *rc = 0;
  if (!g) return NULL;
  int i = im_group_member(g, srv);
  if (i < 0) *rc = i;
  return i < 0 ? NULL : &g->m[i];
}

int im_group_local_send_users(im_group *g, im_server *srv, const char *const *uids, size_t n,
                              const im_msg *m, im_conn_id except) {
  int rc;
  g_member *me = local_member(g, srv, &rc);
  if (rc < 0) return rc;
  int local = im_local_send_users(srv, uids, n, m, except);
  return local < 0 || !me ? local : local + group_send_users(me, uids, n, m);
}

int im_group_local_room_send(im_group *g, im_server *srv, const char *room, const im_msg *m,
                             im_conn_id except) {
  int rc;
  g_member *me = local_member(g, srv, &rc);
  if (rc < 0) return rc;
  int local = im_local_room_send(srv, room, m, except);
  if (local >= 0 && me) group_room_send(me, room, m); /* counts no other member's */
  return local;
}

int im_group_local_kick_user(im_group *g, im_server *srv, const char *uid, int code,
                             const char *reason) {
  int rc;
  g_member *me = local_member(g, srv, &rc);
  if (rc < 0) return rc;
  int local = im_local_kick_user(srv, uid, code, reason);
  return local < 0 || !me ? local : local + group_kick_user(me, uid, code, reason);
}

void im_group_rooms(im_group *g, void (*fn)(const char *room, void *arg), void *arg) {
  pthread_rwlock_rdlock(&g->rooms.lock);
  strmap *m = &g->rooms.map;
  for (uint32_t b = 0; m->buckets && b <= m->mask; b++)
    for (strmap_node *n = m->buckets[b]; n; n = n->next) fn(((g_entry *)n)->key, arg);
  pthread_rwlock_unlock(&g->rooms.lock);
}

size_t im_group_conns(im_group *g) { return im_shared_authed(g->shared); }
