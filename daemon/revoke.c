/* Revoked uids: POST /v1/users/{uid}/revoke refuses every token of the uid
 * issued at or before that moment. Kept in memory (a strmap) and in one
 * small file, DATA/revoked, of lines "AT_MS UID", rewritten whole on each
 * revocation (write, fsync, rename), so a restart remembers them. An entry
 * is forgotten once no token it refuses can still be valid (at + the
 * longest token lifetime), so the file stays small.
 *
 * In a cluster the revocation is also written to Redis (a hash PREFIX
 * "revoked", uid -> at, raised only, and a version counter PREFIX
 * "revoked:v"); every node polls the counter each second and merges the
 * hash when it moved, so a revocation made through any node is refused by
 * all of them within about a second. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <hiredis/hiredis.h>

#include "core/strmap.h"
#include "imd.h"

typedef struct revoked_uid {
  strmap_node node;
  int64_t at_ms;
  char uid[];
} revoked_uid;

struct imd_revocations {
  strmap map;
  char *path;
  long long version;   /* of the Redis hash last merged (-1: none yet) */
  bool polling;        /* a poll is out */
};

static revoked_uid *find(const imd_revocations *r, const char *uid) {
  strmap_node *n = strmap_get(&r->map, uid, strlen(uid));
  return n ? (revoked_uid *)n : NULL;
}

/* Record (or raise) uid's revocation time in memory. */
static int put(imd_revocations *r, const char *uid, int64_t at_ms) {
  revoked_uid *e = find(r, uid);
  if (e) {
    if (at_ms > e->at_ms) e->at_ms = at_ms;
    return 0;
  }
  size_t n = strlen(uid);
  e = malloc(sizeof *e + n + 1);
  if (!e) return -1;
  memcpy(e->uid, uid, n + 1);
  e->at_ms = at_ms;
  e->node.key = e->uid;
  e->node.klen = (uint32_t)n;
  strmap_put(&r->map, &e->node);
  return 0;
}

imd_revocations *imd_revoke_open(const char *path, char *err, size_t errlen) {
  imd_revocations *r = calloc(1, sizeof *r);
  if (r) r->version = -1;
  if (!r || strmap_init(&r->map, 64) < 0 || !(r->path = strdup(path))) {
    snprintf(err, errlen, "out of memory");
    imd_revoke_free(r);
    return NULL;
  }
  FILE *f = fopen(path, "r");
  if (!f) {
    if (errno == ENOENT) return r;
    snprintf(err, errlen, "%s: %s", path, strerror(errno));
    imd_revoke_free(r);
    return NULL;
  }
  char line[IMD_UID_MAX + 64];
  int lineno = 0;
  while (fgets(line, sizeof line, f)) {
    lineno++;
    char *sp = strchr(line, ' '), *nl = strchr(line, '\n');
    int64_t at = 0;
    if (nl) *nl = '\0';
    if (!sp || !nl || sp[1] == '\0' || sscanf(line, "%" SCNd64, &at) != 1 || at <= 0 ||
        put(r, sp + 1, at) < 0) {
      snprintf(err, errlen, "%s:%d: expected \"AT_MS UID\"", path, lineno);
      fclose(f);
      imd_revoke_free(r);
      return NULL;
    }
  }
  fclose(f);
  return r;
}

void imd_revoke_free(imd_revocations *r) {
  if (!r) return;
  for (uint32_t b = 0; r->map.buckets && b <= r->map.mask; b++)
    for (strmap_node *n = r->map.buckets[b], *next; n; n = next) {
      next = n->next;
      free(n);
    }
  strmap_free(&r->map);
  free(r->path);
  free(r);
}

/* Write every entry still worth keeping to path.tmp, fsync, rename. */
static int save(imd_revocations *r, int64_t forget_before_ms) {
  size_t pl = strlen(r->path);
  char *tmp = malloc(pl + 5);
  if (!tmp) return -1;
  memcpy(tmp, r->path, pl);
  memcpy(tmp + pl, ".tmp", 5);
  int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0600);
  FILE *f = fd >= 0 ? fdopen(fd, "w") : NULL;
  int rc = f ? 0 : -1;
  if (!f && fd >= 0) close(fd);
  for (uint32_t b = 0; f && b <= r->map.mask; b++)
    for (strmap_node *n = r->map.buckets[b], *next; n; n = next) {
      next = n->next;
      revoked_uid *e = (revoked_uid *)n;
      if (e->at_ms < forget_before_ms) {
        strmap_del(&r->map, n);
        free(e);
        continue;
      }
      if (fprintf(f, "%" PRId64 " %s\n", e->at_ms, e->uid) < 0) rc = -1;
    }
  if (f) {
    if (fflush(f) != 0 || fsync(fileno(f)) != 0) rc = -1;
    if (fclose(f) != 0) rc = -1;
  }
  if (rc == 0 && rename(tmp, r->path) < 0) rc = -1;
  if (rc < 0) {
    int e = errno;
    unlink(tmp);
    errno = e;
  }
  free(tmp);
  return rc;
}

int imd_revoke_add(imd_revocations *r, const char *uid, int64_t at_ms, uint32_t max_ttl_s) {
  if (!r) {
    errno = EINVAL;
    return -1;
  }
  revoked_uid *e = find(r, uid);
  int64_t before = e ? e->at_ms : 0;
  if (put(r, uid, at_ms) < 0) {
    errno = ENOMEM;
    return -1;
  }
  if (save(r, at_ms - (int64_t)max_ttl_s * 1000) < 0) {
    int err = errno;
    /* nothing changed: undo in memory what the file does not hold */
    e = find(r, uid);
    if (e && before) {
      e->at_ms = before;
    } else if (e) {
      strmap_del(&r->map, &e->node);
      free(e);
    }
    errno = err;
    return -1;
  }
  return 0;
}

bool imd_revoked(const imd_revocations *r, const char *uid, int64_t issued_ms, int64_t exp_s,
                 uint32_t max_ttl_s) {
  const revoked_uid *e = r ? find(r, uid) : NULL;
  if (!e) return false;
  if (issued_ms > 0) return issued_ms <= e->at_ms;
  /* a v1 token carries no issue time: it was issued no earlier than its
   * expiry minus the longest lifetime accepted */
  return exp_s * 1000 - (int64_t)max_ttl_s * 1000 <= e->at_ms;
}

/* ---- the cluster's copy, in Redis -------------------------------------------- */

/* Raise KEYS[1][ARGV[1]] to ARGV[2] and bump the version KEYS[2]. */
static const char lua_revoke[] =
    "local v = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0') or 0\n"
    "if tonumber(ARGV[2]) > v then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end\n"
    "return redis.call('INCR', KEYS[2])\n";

static void ignore_reply(void *arg, const redisReply *reply) {
  (void)arg;
  (void)reply;
}

static void revoke_keys(const imd *d, char *hash, char *ver, size_t cap) {
  snprintf(hash, cap, "%srevoked", d->cfg.redis_prefix ? d->cfg.redis_prefix : "");
  snprintf(ver, cap, "%srevoked:v", d->cfg.redis_prefix ? d->cfg.redis_prefix : "");
}

int imd_revoke_publish(imd *d, const char *uid, int64_t at_ms) {
  if (!d->redis) return 0;
  char hash[256], ver[256], at[24];
  revoke_keys(d, hash, ver, sizeof hash);
  snprintf(at, sizeof at, "%" PRId64, at_ms);
  const char *argv[] = {"EVAL", lua_revoke, "2", hash, ver, uid, at};
  size_t lens[7];
  for (int i = 0; i < 7; i++) lens[i] = strlen(argv[i]);
  return im_redis_command(d->redis, 7, argv, lens, ignore_reply, NULL) == 0 ? 0 : -1;
}

static void merged(void *arg, const redisReply *reply) {
  imd *d = arg;
  imd_revocations *r = d->revoked;
  r->polling = false;
  if (!reply || reply->type != REDIS_REPLY_ARRAY || reply->elements != 2) return;
  const redisReply *v = reply->element[0], *all = reply->element[1];
  if (all->type != REDIS_REPLY_ARRAY) return;
  int64_t forget = (int64_t)imd_wall_ms() - (int64_t)d->cfg.max_token_ttl_s * 1000;
  imd_shared_lock(); /* the workers check tokens against the table */
  for (size_t i = 0; i + 1 < all->elements; i += 2) {
    const redisReply *u = all->element[i], *at = all->element[i + 1];
    if (u->type != REDIS_REPLY_STRING || at->type != REDIS_REPLY_STRING || !u->len ||
        strlen(u->str) != u->len)
      continue;
    int64_t ms = strtoll(at->str, NULL, 10);
    if (ms > forget && put(r, u->str, ms) < 0) { /* no memory: try again next poll */
      imd_shared_unlock();
      return;
    }
  }
  imd_shared_unlock();
  r->version = v->type == REDIS_REPLY_STRING ? strtoll(v->str, NULL, 10) : 0;
}

static void version_known(void *arg, const redisReply *reply) {
  imd *d = arg;
  imd_revocations *r = d->revoked;
  long long v = reply && reply->type == REDIS_REPLY_STRING ? strtoll(reply->str, NULL, 10)
              : reply && reply->type == REDIS_REPLY_NIL ? 0 : -2;
  if (v == -2 || v == r->version) {
    r->polling = false;
    return;
  }
  /* one MULTI-free read of both: the version first, so a revocation made
   * in between is merged now or on the next poll, never lost */
  char hash[256], ver[256];
  revoke_keys(d, hash, ver, sizeof hash);
  const char *argv[] = {"EVAL",
                        "return {redis.call('GET', KEYS[2]) or '0', redis.call('HGETALL', KEYS[1])}",
                        "2", hash, ver};
  size_t lens[5];
  for (int i = 0; i < 5; i++) lens[i] = strlen(argv[i]);
  if (im_redis_command(d->redis, 5, argv, lens, merged, d) != 0) r->polling = false;
}

void imd_revoke_poll(imd *d) {
  imd_revocations *r = d->revoked;
  if (!d->redis || !r || r->polling) return;
  char hash[256], ver[256];
  revoke_keys(d, hash, ver, sizeof hash);
  const char *argv[] = {"GET", ver};
  size_t lens[2] = {3, strlen(ver)};
  r->polling = im_redis_command(d->redis, 2, argv, lens, version_known, d) == 0;
}
