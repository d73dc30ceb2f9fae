/* Who may not come in: imd's side of abuse protection (R25). Address bans
 * and the per-source rate limit live in libim's guard (im_guard.h); uid
 * bans live here, checked at every authentication.
 *
 * Alone, a node's bans are its own. With --redis the bans made through the
 * API are the cluster's: a hash PREFIX{bans} (field "uid:NAME" or
 * "ip:CIDR", value the wall-clock ms it ends, 0 = until lifted; the hash
 * expires with its last entry) and a version counter PREFIX{bans}:v, both
 * written by one script. Every node reads the version each second and,
 * when it moved (or after the link came back), the whole hash, and makes
 * its own bans match: new entries are applied and the matching live
 * sessions closed (4403 "banned"), entries gone from the hash are lifted.
 * The automatic bans of the rate limit, the rate limit itself and the
 * --ban entries stay node-local. With worker threads the table of what
 * was applied is worker 0's, under its own lock (any worker may share a
 * ban, worker 0 polls), and a merge closes the sessions of every worker. */
#include <hiredis/hiredis.h>
#include <inttypes.h>
#include <libim/im_guard.h>
#include <libim/im_router.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "imd.h"

/* Most shared bans (the uid table and the guard's 1024 ranges). */
#define SHARED_MAX (IMD_UID_BANS_MAX + 1024)

typedef struct uid_ban {
  strmap_node node;
  uint64_t until_ms;        /* wall clock; 0 = until lifted */
  char uid[];
} uid_ban;

/* The table: the main thread's, under the shared lock (worker_calls.c). */
static strmap *table(imd *d) { return &imd_worker0(d)->uid_bans; }

static uid_ban *uid_find(strmap *m, const char *uid) {
  return m->buckets ? (uid_ban *)strmap_get(m, uid, strlen(uid)) : NULL;
}

bool imd_uid_banned(imd *d, const char *uid) {
  strmap *m = table(d);
  imd_shared_lock();
  uid_ban *b = uid_find(m, uid);
  if (b && b->until_ms && b->until_ms <= imd_wall_ms()) {
    strmap_del(m, &b->node);
    free(b);
    b = NULL;
  }
  imd_shared_unlock();
  return b != NULL;
}

/* Ban uid until until_ms (0: until lifted) on this node; no session closed. */
static int uid_ban_until(imd *d, const char *uid, uint64_t until_ms) {
  size_t n = strlen(uid);
  if (n == 0 || n > IMD_UID_MAX) return -1;
  strmap *m = table(d);
  imd_shared_lock();
  uid_ban *b = uid_find(m, uid);
  if (!b && m->count < IMD_UID_BANS_MAX && (b = malloc(sizeof *b + n + 1))) {
    memcpy(b->uid, uid, n + 1);
    b->node.key = b->uid;
    b->node.klen = (uint32_t)n;
    strmap_put(m, &b->node);
  }
  if (b) b->until_ms = until_ms;
  imd_shared_unlock();
  return b ? 0 : -1;
}

int imd_ban_uid(imd *d, const char *uid, uint32_t ttl_s) {
  if (uid_ban_until(d, uid, ttl_s ? imd_wall_ms() + (uint64_t)ttl_s * 1000u : 0) < 0) return -1;
  /* live sessions end now, on every worker and node */
  im_kick_user(d->srv, uid, IM_CLOSE_KICKED, "banned");
  return 0;
}

int imd_unban_uid(imd *d, const char *uid) {
  strmap *m = table(d);
  imd_shared_lock();
  uid_ban *b = uid_find(m, uid);
  if (b) strmap_del(m, &b->node);
  imd_shared_unlock();
  free(b);
  return b ? 0 : -1;
}

void imd_uid_bans(imd *d, void (*fn)(const char *uid, uint64_t until_ms, void *arg), void *arg) {
  strmap *m = table(d);
  imd_shared_lock();
  uint64_t now = imd_wall_ms();
  for (uint32_t k = 0; m->buckets && k <= m->mask; k++)
    for (strmap_node *n = m->buckets[k]; n; n = n->next) {
      uid_ban *b = (uid_ban *)n;
      if (!b->until_ms || b->until_ms > now) fn(b->uid, b->until_ms, arg);
    }
  imd_shared_unlock();
}

/* "--ban 10.0.0.0/8,uid:mallory,::1": permanent entries. */
int imd_bans_init(imd *d, const char *list) {
  if (strmap_init(&d->uid_bans, 64) < 0 || strmap_init(&d->shared_bans, 64) < 0) return -1;
  d->shared_version = -1;
  if (!list || !*list || !strcmp(list, "none")) return 0;
  char *copy = strdup(list), *save = NULL;
  int rc = copy ? 0 : -1;
  for (char *t = copy ? strtok_r(copy, ",", &save) : NULL; t && rc == 0;
       t = strtok_r(NULL, ",", &save)) {
    while (*t == ' ') t++;
    if (!strncmp(t, "uid:", 4))
      rc = imd_ban_uid(d, t + 4, 0);
    else
      rc = im_guard_ban(d->srv, t, 0) == 0 ? 0 : -1;
    if (rc < 0) fprintf(stderr, "imd: ban: '%s' is not an address, range or uid:NAME\n", t);
  }
  free(copy);
  return rc;
}

static void free_all(strmap *m) {
  for (uint32_t k = 0; m->buckets && k <= m->mask; k++)
    for (strmap_node *n = m->buckets[k], *next; n; n = next) {
      next = n->next;
      free(n);
    }
  strmap_free(m);
}

void imd_bans_free(imd *d) {
  free_all(&d->uid_bans);
  free_all(&d->shared_bans);
}


/* ---- the cluster's bans (--redis) ------------------------------------------------ */

/* A shared ban as this node last applied it; key "uid:NAME" or "ip:CIDR". */
typedef struct shared_ban {
  strmap_node node;
  uint64_t until_ms;
  bool seen; /* in the hash being merged */
  char key[];
} shared_ban;

/* KEYS[1] the hash, KEYS[2] the version; ARGV[1] the field, ARGV[2] its
 * end in ms ("" lifts it), ARGV[3] now in ms, ARGV[4] the most entries.
 * Drops what ended, sets the hash's expiry to its last entry's end (none
 * while one is permanent), bumps the version. Returns 1 when the field
 * was a live ban before, 0 when not, -1 when the hash is full. */
static const char lua_ban[] =
    "local now = tonumber(ARGV[3])\n"
    "local old = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '-1')\n"
    "local had = (old == 0 or (old ~= nil and old > now)) and 1 or 0\n"
    "if ARGV[2] == '' then redis.call('HDEL', KEYS[1], ARGV[1])\n"
    "elseif had == 0 and redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[4]) then return -1\n"
    "else redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end\n"
    "local all, last, forever = redis.call('HGETALL', KEYS[1]), 0, false\n"
    "for i = 1, #all, 2 do\n"
    "  local u = tonumber(all[i + 1]) or 0\n"
    "  if u == 0 then forever = true\n"
    "  elseif u <= now then redis.call('HDEL', KEYS[1], all[i])\n"
    "  elseif u > last then last = u end\n"
    "end\n"
    "if forever then redis.call('PERSIST', KEYS[1])\n"
    "elseif last > 0 then redis.call('PEXPIREAT', KEYS[1], last) end\n"
    "redis.call('INCR', KEYS[2])\n"
    "return had\n";

/* The version and, when it is not ARGV[1], the whole hash. */
static const char lua_read[] =
    "local v = redis.call('GET', KEYS[2]) or '0'\n"
    "if v == ARGV[1] then return {v} end\n"
    "return {v, redis.call('HGETALL', KEYS[1])}\n";

static void shared_keys(const imd *d, char *hash, char *ver, size_t cap) {
  const char *p = d->cfg.redis_prefix ? d->cfg.redis_prefix : "";
  snprintf(hash, cap, "%s{bans}", p);
  snprintf(ver, cap, "%s{bans}:v", p);
}

/* The table of the cluster's bans as applied, its version and generation
 * are worker 0's (every worker's with threads), under cluster_lock. */
static pthread_mutex_t cluster_lock = PTHREAD_MUTEX_INITIALIZER;

static shared_ban *shared_find(imd *d, const char *key) {
  return (shared_ban *)strmap_get(&imd_worker0(d)->shared_bans, key, strlen(key));
}

/* Remember key as applied until until_ms. */
static shared_ban *shared_put(imd *d, const char *key, uint64_t until_ms) {
  shared_ban *e = shared_find(d, key);
  if (!e) {
    size_t n = strlen(key);
    if (!(e = malloc(sizeof *e + n + 1))) return NULL;
    memcpy(e->key, key, n + 1);
    e->node.key = e->key;
    e->node.klen = (uint32_t)n;
    strmap_put(&imd_worker0(d)->shared_bans, &e->node);
  }
  e->until_ms = until_ms;
  return e;
}

static void shared_forget(imd *d, const char *key) {
  shared_ban *e = shared_find(d, key);
  if (!e) return;
  strmap_del(&imd_worker0(d)->shared_bans, &e->node);
  free(e);
}

/* Close the sessions from an address on every worker. */
static void kick_ip_here(imd *w, const char *cidr, uint32_t n) {
  (void)n;
  im_guard_kick(w->srv, cidr, IM_CLOSE_KICKED, "banned");
}

/* Apply a ban another node made: refuse and close here only (its node
 * closed the sessions it saw). */
static void apply(imd *d, const char *key, uint64_t until_ms, uint64_t now) {
  if (!strncmp(key, "uid:", 4)) {
    if (uid_ban_until(d, key + 4, until_ms) == 0) /* this process's workers, not the other nodes */
      im_group_local_kick_user(d->group, d->srv, key + 4, IM_CLOSE_KICKED, "banned");
  } else if (!strncmp(key, "ip:", 3)) {
    uint32_t ttl_s = until_ms ? (uint32_t)((until_ms - now + 999) / 1000) : 0;
    if (im_guard_ban(d->srv, key + 3, ttl_s) < 0) return; /* the guard is every worker's */
    kick_ip_here(d, key + 3, 0);
    imd_workers_broadcast(d, kick_ip_here, key + 3, 0);
  }
}

static void lift(imd *d, const char *key) {
  if (!strncmp(key, "uid:", 4))
    imd_unban_uid(d, key + 4);
  else if (!strncmp(key, "ip:", 3))
    im_guard_unban(d->srv, key + 3);
}

/* Make this node's shared bans those of the hash (field, value pairs). */
static void merge(imd *d, const redisReply *all) {
  strmap *m = &imd_worker0(d)->shared_bans;
  uint64_t now = imd_wall_ms();
  for (uint32_t k = 0; m->buckets && k <= m->mask; k++)
    for (strmap_node *n = m->buckets[k]; n; n = n->next) ((shared_ban *)n)->seen = false;
  for (size_t i = 0; i + 1 < all->elements; i += 2) {
    const redisReply *f = all->element[i], *v = all->element[i + 1];
    if (f->type != REDIS_REPLY_STRING || v->type != REDIS_REPLY_STRING ||
        strlen(f->str) != f->len)
      continue;
    uint64_t until = strtoull(v->str, NULL, 10);
    if (until && until <= now) continue;
    shared_ban *e = shared_find(d, f->str);
    if (!e || e->until_ms != until) {
      if (!(e = shared_put(d, f->str, until))) continue;
      apply(d, f->str, until, now);
    }
    e->seen = true;
  }
  for (uint32_t k = 0; m->buckets && k <= m->mask; k++)
    for (strmap_node *n = m->buckets[k], *next; n; n = next) {
      next = n->next;
      shared_ban *e = (shared_ban *)n;
      if (e->seen) continue;
      lift(d, e->key);
      strmap_del(m, n);
      free(e);
    }
}

typedef struct bans_call {
  imd *d;
  imd_bans_done cb; /* NULL: the poll */
  void *arg;
  uint64_t gen;     /* d->shared_gen when sent */
  bool ban;         /* imd_bans_share of a ban (not a lift) */
  char key[];       /* imd_bans_share: the field */
} bans_call;

static void read_done(void *arg, const redisReply *reply) {
  bans_call *c = arg;
  imd *d = c->d;
  int status = IMD_BANS_EDOWN;
  imd *h = imd_worker0(d);
  pthread_mutex_lock(&cluster_lock);
  if (!c->cb) h->shared_polling = false;
  if (reply && reply->type == REDIS_REPLY_ARRAY && reply->elements >= 1 &&
      reply->element[0]->type == REDIS_REPLY_STRING) {
    status = 0;
    long long v = strtoll(reply->element[0]->str, NULL, 10);
    if (c->gen != h->shared_gen)
      h->shared_version = -1; /* this node changed a ban since: read again */
    else if (reply->elements == 2 && reply->element[1]->type == REDIS_REPLY_ARRAY) {
      merge(d, reply->element[1]);
      h->shared_version = v;
    }
  }
  pthread_mutex_unlock(&cluster_lock);
  if (c->cb) c->cb(d, c->arg, status);
  free(c);
}

static int send_read(imd *d, imd_bans_done cb, void *arg, bool all) {
  bans_call *c = malloc(sizeof *c);
  if (!c) return -1;
  char hash[256], ver[256], have[24];
  pthread_mutex_lock(&cluster_lock);
  *c = (bans_call){d, cb, arg, imd_worker0(d)->shared_gen, false};
  snprintf(have, sizeof have, "%lld", all ? -1 : imd_worker0(d)->shared_version);
  pthread_mutex_unlock(&cluster_lock);
  shared_keys(d, hash, ver, sizeof hash);
  const char *argv[] = {"EVAL", lua_read, "2", hash, ver, have};
  size_t lens[6];
  for (int i = 0; i < 6; i++) lens[i] = strlen(argv[i]);
  if (im_redis_command(d->redis, 6, argv, lens, read_done, c) != 0) {
    free(c);
    return -1;
  }
  return 0;
}

/* Worker 0 polls (shared_polling is its alone). */
void imd_bans_poll(imd *d) {
  if (!d->redis || d->shared_polling) return;
  d->shared_polling = send_read(d, NULL, NULL, false) == 0;
}

void imd_bans_reconnected(imd *d) {
  pthread_mutex_lock(&cluster_lock);
  d->shared_version = -1; /* Redis may have restarted, bans lapsed meanwhile */
  pthread_mutex_unlock(&cluster_lock);
  imd_bans_poll(d);
}

int imd_bans_refresh(imd *d, imd_bans_done cb, void *arg) {
  return d->redis ? send_read(d, cb, arg, true) : -1;
}

static void share_done(void *arg, const redisReply *reply) {
  bans_call *c = arg;
  imd *d = c->d;
  int status = IMD_BANS_EDOWN;
  if (reply && reply->type == REDIS_REPLY_INTEGER)
    status = reply->integer < 0 ? IMD_BANS_EFULL : reply->integer ? 0 : IMD_BANS_ENOENT;
  /* a ban Redis did not take stays this node's own (no merge lifts it) */
  if (c->ban && (status == IMD_BANS_EDOWN || status == IMD_BANS_EFULL)) {
    pthread_mutex_lock(&cluster_lock);
    shared_forget(d, c->key);
    pthread_mutex_unlock(&cluster_lock);
  }
  c->cb(d, c->arg, status);
  free(c);
}

int imd_bans_share(imd *d, const char *uid, const char *cidr, uint64_t until_ms, bool lifted,
                   imd_bans_done cb, void *arg) {
  if (!d->redis) return -1;
  const char *what = uid ? uid : cidr;
  size_t n = strlen(what) + 5;
  bans_call *c = malloc(sizeof *c + n);
  if (!c) return -1;
  *c = (bans_call){d, cb, arg, 0, !lifted};
  snprintf(c->key, n, "%s%s", uid ? "uid:" : "ip:", what);
  char hash[256], ver[256], until[24] = "", now[24], max[24];
  shared_keys(d, hash, ver, sizeof hash);
  if (!lifted) snprintf(until, sizeof until, "%" PRIu64, until_ms);
  snprintf(now, sizeof now, "%" PRIu64, imd_wall_ms());
  snprintf(max, sizeof max, "%d", SHARED_MAX);
  const char *argv[] = {"EVAL", lua_ban, "2", hash, ver, c->key, until, now, max};
  size_t lens[9];
  for (int i = 0; i < 9; i++) lens[i] = strlen(argv[i]);
  if (im_redis_command(d->redis, 9, argv, lens, share_done, c) != 0) {
    free(c);
    return -1;
  }
  /* this node applied it already: a merge must neither undo nor repeat it,
   * and a read sent before this write is out of date */
  pthread_mutex_lock(&cluster_lock);
  imd_worker0(d)->shared_gen++;
  if (lifted)
    shared_forget(d, c->key);
  else
    shared_put(d, c->key, until_ms);
  pthread_mutex_unlock(&cluster_lock);
  return 0;
}
