/* imd's message store on Redis (the contract is in store.h, the schema and
 * the scripts in docs/CLUSTER-STORE.md).
 *
 * Keys (P = the prefix; a variable part has '%', ':', '{' and '}' escaped
 * as %XX, so that key names cannot collide and hash tags are exact):
 *   P inbox:{uid}   Stream, one entry per message, id "<seq>-1", fields
 *                   i id, f from, d device, c cid, t to, g group, s ts, b data
 *                   (c, t, g only when set).
 *   P user:{uid}    Hash: last (highest seq), trimmed (highest seq dropped),
 *                   d:<device> (delivered position), q (1: the user was put
 *                   on trimq once; it stays there while its inbox holds
 *                   entries).
 *   P idem:{sender}:<device>:<cid>  String: the first append's id; PX the
 *                   retention age, no expiry without an age limit.
 *   P group:{gid}   Set of member uids (an empty group is no key).
 *   P trimq         Sorted set: uid -> ts of its oldest entry not yet
 *                   examined by the age retention (only with an age limit).
 *
 * Why a Stream for the inbox: its ids are the seqs, so XRANGE "(<since>-1"
 * COUNT n pages by seq in O(log n) without a second index, XADD MINID /
 * XTRIM MINID drop exactly a prefix (what retention must do), and entries
 * are field maps that need no serialisation in Lua. A sorted set would need
 * an encoded blob per member, a list would need index arithmetic against
 * trimmed and could not trim by age without decoding.
 *
 * Every command is the EVALSHA of one script, so that an append (the
 * idempotency check-and-set, each receiver's seq, inbox entry and count
 * retention) is atomic in Redis and in its AOF: no crash leaves a claimed
 * cid without its message. Scripts touch keys of several users, so the
 * store needs one Redis primary, not Redis Cluster.
 *
 * Order: requests wait in one FIFO and complete from its head, so callbacks
 * run in request order even when an answer had to be fetched twice (after
 * NOSCRIPT). While NOSCRIPT answers are being resent as EVAL, new requests
 * are held back, so that Redis also runs everything in request order. */
#include "store_redis.h"

#include <hiredis/hiredis.h>
#include <inttypes.h>
#include <mbedtls/sha1.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/strmap.h"

#define ERR_MAX 256
#define ID_MAX 24              /* store.h: ids fit a 24-byte dup buffer */
#define SYNC_DEFAULT 1000      /* entries of a sync with limit 0 */
#define MARKS_PER_APPEND 16    /* delivered marks riding along with an append */
#define MARKS_PER_CMD 256      /* marks per marks-only command */
#define MARKS_MAX 4096         /* pending marks before they are sent at once */
#define TRIM_USERS 100         /* users per age-retention step */
#define TRIM_WINDOW 128        /* entries examined per user and step */
#define TRIM_INTERVAL_MS 60000
#define SEQ_MAX (UINT64_C(1) << 53) /* seqs are Lua numbers (doubles) in the scripts */

/* ---- the scripts ---------------------------------------------------------- */

/* Raises delivered marks, never lowers them: KEYS[k0 + j] gets field
 * ARGV[a0 + 2j] = seq ARGV[a0 + 2j + 1] for j < n. A seq is a whole
 * number, cut to the user's last seq (a client cannot claim to have
 * received what was never stored); anything else is ignored. */
#define LUA_MARKS                                                               \
  "local function marks(k0, a0, n)\n"                                           \
  "  for j = 0, n - 1 do\n"                                                     \
  "    local key, f = KEYS[k0 + j], ARGV[a0 + 2 * j]\n"                         \
  "    local v = tonumber(ARGV[a0 + 2 * j + 1])\n"                              \
  "    if v and v >= 1 and v == math.floor(v) then\n"                          \
  "      local last = tonumber(redis.call('HGET', key, 'last') or '0') or 0\n"  \
  "      if v > last then v = last end\n"                                       \
  "      if v > (tonumber(redis.call('HGET', key, f) or '0') or 0) then\n"      \
  "        redis.call('HSET', key, f, string.format('%d', v))\n"                \
  "      end\n"                                                                 \
  "    end\n"                                                                   \
  "  end\n"                                                                     \
  "end\n"

/* KEYS: 1 trim queue, 2 idem key (if ARGV[5] == '1'), then inbox and user
 * per receiver, then a user key per mark. ARGV: 1 receivers, 2 keep_count,
 * 3 idem ttl ms (0: none), 4 trim queue on, 5 has cid, 6 marks, 7 ts, 8 id,
 * 9 nf, 10.. nf XADD field/value arguments, then a trim-queue member per
 * receiver (if ARGV[4] == '1'), then field, seq per mark.
 * A receiver goes onto the trim queue only when it is not known to be
 * there: never queued (no q field) or its inbox was empty (the trim step
 * drops a user from the queue only then), so a steady stream costs no
 * ZADD.
 * Returns {0, entries dropped, seq...} or {1, id of the first append}. The
 * idempotency key is read first and written last: a failing command in
 * between (only possible if the keys were tampered with) leaves no claimed
 * cid without its message.
 * With a push io (store_redis.h) the script is the push variant: ARGV has,
 * after the marks, self, prefix, maxlen, the record head and the receivers'
 * uids, and once stored the message goes to the receivers' other nodes
 * (im_push, from libim's im_redis_push_lua() in front of the script). */
#define LUA_APPEND_BODY \
  "local nrecv, keep, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])\n" \
  "local aged, hascid, nf = ARGV[4] == '1', ARGV[5] == '1', tonumber(ARGV[9])\n" \
  "local k = hascid and 3 or 2\n" \
  "marks(k + 2 * nrecv, 10 + nf + (aged and nrecv or 0), tonumber(ARGV[6]))\n" \
  "if hascid then\n" \
  "  local first = redis.call('GET', KEYS[2])\n" \
  "  if first then return {1, first} end\n" \
  "end\n" \
  "local fields = {}\n" \
  "for i = 1, nf do fields[i] = ARGV[9 + i] end\n" \
  "local out, dropped = {0, 0}, 0\n" \
  "for i = 0, nrecv - 1 do\n" \
  "  local inbox, user = KEYS[k + 2 * i], KEYS[k + 2 * i + 1]\n" \
  "  local seq = redis.call('HINCRBY', user, 'last', 1)\n" \
  "  local id = string.format('%d-1', seq)\n" \
  "  local trimmed, queued = 0, true\n" \
  "  if keep > 0 or aged then\n" \
  "    local h = redis.call('HMGET', user, 'trimmed', 'q')\n" \
  "    trimmed, queued = tonumber(h[1] or '0') or 0, h[2] ~= false\n" \
  "  end\n" \
  "  if keep > 0 and seq - trimmed > keep then\n" \
  "    local cut = seq - keep\n" \
  "    redis.call('XADD', inbox, 'MINID', string.format('%d-0', cut + 1), id, unpack(fields))\n" \
  "    redis.call('HSET', user, 'trimmed', string.format('%d', cut))\n" \
  "    dropped = dropped + cut - trimmed\n" \
  "  else\n" \
  "    redis.call('XADD', inbox, id, unpack(fields))\n" \
  "  end\n" \
  "  if aged and (not queued or seq - 1 <= trimmed) then\n" \
  "    redis.call('ZADD', KEYS[1], 'NX', ARGV[7], ARGV[10 + nf + i])\n" \
  "    if not queued then redis.call('HSET', user, 'q', '1') end\n" \
  "  end\n" \
  "  out[i + 3] = seq\n" \
  "end\n" \
  "if hascid then\n" \
  "  if ttl > 0 then redis.call('SET', KEYS[2], ARGV[8], 'PX', ttl)\n" \
  "  else redis.call('SET', KEYS[2], ARGV[8]) end\n" \
  "end\n" \
  "out[2] = dropped\n"

static const char lua_append[] = "#!lua\n" LUA_MARKS LUA_APPEND_BODY "return out\n";

/* The push variant's part after LUA_APPEND_BODY; its source is built at
 * run time (push_script()). */
#define LUA_APPEND_PUSH_TAIL                                                          \
  "local pa = 10 + nf + (aged and nrecv or 0) + 2 * tonumber(ARGV[6])\n"              \
  "local uids, seqs = {}, {}\n"                                                       \
  "for i = 1, nrecv do uids[i] = ARGV[pa + 3 + i] seqs[i] = out[i + 2] end\n"         \
  "im_push(ARGV[pa], ARGV[pa + 1], ARGV[pa + 2], ARGV[pa + 3], uids, seqs)\n"         \
  "return out\n"

/* Marks alone: KEYS user keys, ARGV field, seq per key. */
static const char lua_marks[] =
  "#!lua\n" LUA_MARKS
  "marks(1, 1, #KEYS)\n"
  "return 0\n";

/* KEYS: inbox, user. ARGV: since, limit, max_bytes (0: none). Returns
 * {last, trimmed, entry...}: the entries after max(since, trimmed), at
 * most limit, cut before the one whose data would pass max_bytes (never
 * before the first). */
static const char lua_sync[] =
  "#!lua flags=no-writes\n"
  "local h = redis.call('HMGET', KEYS[2], 'last', 'trimmed')\n"
  "local last, trimmed = tonumber(h[1] or '0'), tonumber(h[2] or '0')\n"
  "local since, budget = tonumber(ARGV[1]), tonumber(ARGV[3])\n"
  "local from = since > trimmed and since or trimmed\n"
  "local out, bytes = {last, trimmed}, 0\n"
  "local es = redis.call('XRANGE', KEYS[1], string.format('(%d-1', from), '+',\n"
  "                      'COUNT', ARGV[2])\n"
  "for i, e in ipairs(es) do\n"
  "  local f, n = e[2], 0\n"
  "  for j = 1, #f, 2 do if f[j] == 'b' then n = #f[j + 1] end end\n"
  "  if budget > 0 and i > 1 and bytes + n > budget then break end\n"
  "  bytes = bytes + n\n"
  "  out[i + 2] = e\n"
  "end\n"
  "return out\n";

static const char lua_state[] =
  "#!lua flags=no-writes\n"
  "return redis.call('HGETALL', KEYS[1])\n";

static const char lua_members[] =
  "#!lua flags=no-writes\n"
  "return redis.call('SMEMBERS', KEYS[1])\n";

/* KEYS: the group. ARGV: 1 number of members to add, the adds, the removes. */
static const char lua_group[] =
  "#!lua\n"
  "local nadd = tonumber(ARGV[1])\n"
  "for i = 2, 1 + nadd do redis.call('SADD', KEYS[1], ARGV[i]) end\n"
  "for i = 2 + nadd, #ARGV do redis.call('SREM', KEYS[1], ARGV[i]) end\n"
  "return 0\n";

/* Age retention, one bounded step. KEYS: the trim queue. ARGV: 1 prefix,
 * 2 cutoff (entries with ts below it are expired), 3 users, 4 window.
 * Per user whose queued ts is expired: cut at the newest expired entry
 * among its first `window` entries (a prefix goes, so an entry written
 * under a clock that stepped back goes with an expired one after it),
 * raise trimmed, requeue the user under its new oldest entry's ts. The
 * inbox and user keys are derived from the queue's members, so this one
 * script is not cluster-ready (neither is the queue). Returns {dropped,
 * 1 if more users are due}. */
static const char lua_trim[] =
  "#!lua\n"
  "local q, p, cutoff = KEYS[1], ARGV[1], tonumber(ARGV[2])\n"
  "local function ts_of(e)\n"
  "  local f = e[2]\n"
  "  for j = 1, #f, 2 do if f[j] == 's' then return tonumber(f[j + 1]) end end\n"
  "  return 0\n"
  "end\n"
  "local dropped = 0\n"
  "local users = redis.call('ZRANGEBYSCORE', q, '-inf', '(' .. ARGV[2], 'LIMIT', 0, ARGV[3])\n"
  "for _, u in ipairs(users) do\n"
  "  local inbox, user = p .. 'inbox:{' .. u .. '}', p .. 'user:{' .. u .. '}'\n"
  "  local cut\n"
  "  for _, e in ipairs(redis.call('XRANGE', inbox, '-', '+', 'COUNT', ARGV[4])) do\n"
  "    if ts_of(e) < cutoff then cut = e[1] end\n"
  "  end\n"
  "  if cut then\n"
  "    local seq = tonumber(string.match(cut, '^(%d+)'))\n"
  "    dropped = dropped + redis.call('XTRIM', inbox, 'MINID', string.format('%d-0', seq + 1))\n"
  "    if seq > tonumber(redis.call('HGET', user, 'trimmed') or '0') then\n"
  "      redis.call('HSET', user, 'trimmed', string.format('%d', seq))\n"
  "    end\n"
  "  end\n"
  "  local head = redis.call('XRANGE', inbox, '-', '+', 'COUNT', 1)\n"
  "  if head[1] then redis.call('ZADD', q, 'XX', string.format('%d', ts_of(head[1])), u)\n"
  "  else redis.call('ZREM', q, u) end\n"
  "end\n"
  "local more = redis.call('ZRANGEBYSCORE', q, '-inf', '(' .. ARGV[2], 'LIMIT', 0, 1)\n"
  "return {dropped, #more}\n";

enum script { SC_APPEND, SC_MARKS, SC_SYNC, SC_STATE, SC_MEMBERS, SC_GROUP, SC_TRIM, SC_COUNT };

static const char *const script_src[SC_COUNT] = {
  [SC_APPEND] = lua_append, [SC_MARKS] = lua_marks,     [SC_SYNC] = lua_sync,
  [SC_STATE] = lua_state,   [SC_MEMBERS] = lua_members, [SC_GROUP] = lua_group,
  [SC_TRIM] = lua_trim,
};

/* ---- types ------------------------------------------------------------------ */

enum rq_kind { RQ_APPEND, RQ_MARKS, RQ_SYNC, RQ_STATE, RQ_MEMBERS, RQ_GROUP, RQ_TRIM };

enum rq_state {
  RQ_HELD,   /* not sent yet: NOSCRIPT answers are being resent */
  RQ_SENT,   /* first attempt in flight */
  RQ_RETRY,  /* resent as EVAL after NOSCRIPT */
  RQ_DONE    /* answered; waits for the requests before it */
};

typedef struct redis_store redis_store;

typedef struct rq {
  struct rq *next;
  redis_store *s;          /* NULL once the store closed: the answer is only freed */
  enum rq_kind kind;
  enum rq_state state;
  enum script script;
  int status;              /* the result when there is no answer to read */
  void *arg;
  imd_store_cb cb;
  int argc;
  const char **argv;
  size_t *argvlen;
  char *buf;               /* the bytes of the arguments built for it */
  redisReply *saved;       /* its answer, copied while an earlier request is out */
  uint64_t sent_us;
  size_t n;                /* append: receivers */
  bool pushed;             /* append: the script pushes to other nodes too */
  uint64_t since;          /* sync */
} rq;

/* A pending delivered mark; key is uid '\0' device. */
typedef struct mark {
  strmap_node node;
  struct mark *prev, *next;
  uint64_t seq;
  size_t uid_len;
  char key[];
} mark;

struct redis_store {
  imd_store base;          /* first: the contract's handle */
  imd_redis_io io;
  imd_store_opts o;
  char *prefix;
  const char *src[SC_COUNT]; /* script_src, but the append's is push_src with a push io */
  char *push_src;
  char sha[SC_COUNT][41];
  rq *head, *tail;         /* outstanding requests, in request order */
  int first_out;           /* first attempts in flight */
  bool stalled;            /* NOSCRIPT seen: hold new requests back */
  strmap marks;
  mark *marks_head, *marks_tail;
  bool trim_out, trim_more;
  uint64_t next_trim_ms;   /* monotonic */
  int depth;               /* callbacks running */
  bool closed;
  imd_store_stats st;
  char err[ERR_MAX];
};

static uint64_t mono_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static int set_err(redis_store *s, int rc, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(s->err, sizeof s->err, fmt, ap);
  va_end(ap);
  return rc;
}

/* ---- command arguments ------------------------------------------------------ */

/* Builds a command: arguments are borrowed pointers or bytes in buf
 * (recorded as offsets while buf may still move). */
typedef struct argb {
  int argc, cap;
  const char **argv;
  size_t *len;
  size_t *off;             /* SIZE_MAX: borrowed */
  char *buf;
  size_t used, size, start;
  bool oom;
} argb;

static bool ab_room(argb *b) {
  if (b->oom) return false;
  if (b->argc < b->cap) return true;
  int cap = b->cap ? b->cap * 2 : 32;
  const char **v = realloc(b->argv, (size_t)cap * sizeof *v);
  if (v) b->argv = v;
  size_t *l = realloc(b->len, (size_t)cap * sizeof *l);
  if (l) b->len = l;
  size_t *o = realloc(b->off, (size_t)cap * sizeof *o);
  if (o) b->off = o;
  if (!v || !l || !o) return !(b->oom = true);
  b->cap = cap;
  return true;
}

static void ab_ref(argb *b, const char *p, size_t len) {
  if (!ab_room(b)) return;
  b->argv[b->argc] = p;
  b->len[b->argc] = len;
  b->off[b->argc++] = SIZE_MAX;
}

static void ab_put(argb *b, const char *p, size_t len) {
  if (b->oom) return;
  if (b->size - b->used < len) {
    size_t size = b->size ? b->size : 256;
    while (size - b->used < len) size *= 2;
    char *nb = realloc(b->buf, size);
    if (!nb) {
      b->oom = true;
      return;
    }
    b->buf = nb;
    b->size = size;
  }
  memcpy(b->buf + b->used, p, len);
  b->used += len;
}

/* A variable key part: '%', ':', '{', '}' become %XX. */
static void ab_put_esc(argb *b, const char *p) {
  static const char hex[] = "0123456789ABCDEF";
  for (const char *q = p;; q++) {
    if (*q && !strchr("%:{}", *q)) continue;
    ab_put(b, p, (size_t)(q - p));
    if (!*q) return;
    char e[3] = {'%', hex[(unsigned char)*q >> 4], hex[*q & 15]};
    ab_put(b, e, 3);
    p = q + 1;
  }
}

static void ab_begin(argb *b) { b->start = b->used; }

static void ab_end(argb *b) {
  if (!ab_room(b)) return;
  b->argv[b->argc] = NULL;
  b->len[b->argc] = b->used - b->start;
  b->off[b->argc++] = b->start;
}

static void ab_str(argb *b, const char *p) {
  ab_begin(b);
  ab_put(b, p, strlen(p));
  ab_end(b);
}

static void ab_u64(argb *b, uint64_t v) {
  char t[24];
  int n = snprintf(t, sizeof t, "%" PRIu64, v);
  ab_begin(b);
  ab_put(b, t, (size_t)n);
  ab_end(b);
}

/* P <kind>:{<id>} */
static void ab_key(argb *b, const redis_store *s, const char *kind, const char *id) {
  ab_begin(b);
  ab_put(b, s->prefix, strlen(s->prefix));
  ab_put(b, kind, strlen(kind));
  ab_put(b, ":{", 2);
  ab_put_esc(b, id);
  ab_put(b, "}", 1);
  ab_end(b);
}

/* P trimq: one key for all users (not cluster-ready, like the trim script) */
static void ab_trimq(argb *b, const redis_store *s) {
  ab_begin(b);
  ab_put(b, s->prefix, strlen(s->prefix));
  ab_put(b, "trimq", 5);
  ab_end(b);
}

static void ab_free(argb *b) {
  free(b->argv);
  free(b->len);
  free(b->off);
  free(b->buf);
}

/* EVALSHA <sha> <numkeys> begin every command. */
static void ab_script(argb *b, const redis_store *s, enum script sc, size_t numkeys) {
  ab_ref(b, "EVALSHA", 7);
  ab_ref(b, s->sha[sc], 40);
  ab_u64(b, numkeys);
}

/* ---- requests ---------------------------------------------------------------- */

static void reply_free(redisReply *r) {
  if (!r) return;
  for (size_t i = 0; i < r->elements; i++) reply_free(r->element[i]);
  free(r->element);
  free(r->str);
  free(r);
}

static redisReply *reply_clone(const redisReply *r) {
  redisReply *c = calloc(1, sizeof *c);
  if (!c) return NULL;
  c->type = r->type;
  c->integer = r->integer;
  if (r->str) {
    c->str = malloc(r->len + 1);
    if (!c->str) goto fail;
    memcpy(c->str, r->str, r->len);
    c->str[r->len] = '\0';
    c->len = r->len;
  }
  if (r->elements) {
    c->element = calloc(r->elements, sizeof *c->element);
    if (!c->element) goto fail;
    c->elements = r->elements;
    for (size_t i = 0; i < r->elements; i++)
      if (!(c->element[i] = reply_clone(r->element[i]))) goto fail;
  }
  return c;
fail:
  reply_free(c);
  return NULL;
}

/* Takes b's arrays into a new request. NULL when out of memory. */
static rq *rq_new(redis_store *s, enum rq_kind kind, enum script sc, argb *b, void *arg) {
  rq *r = b->oom ? NULL : calloc(1, sizeof *r);
  if (!r) {
    ab_free(b);
    set_err(s, 0, "out of memory");
    return NULL;
  }
  for (int i = 0; i < b->argc; i++)
    if (b->off[i] != SIZE_MAX) b->argv[i] = b->buf + b->off[i];
  r->s = s;
  r->kind = kind;
  r->script = sc;
  r->arg = arg;
  r->argc = b->argc;
  r->argv = b->argv;
  r->argvlen = b->len;
  r->buf = b->buf;
  free(b->off);
  memset(b, 0, sizeof *b);
  return r;
}

static void rq_free(rq *r) {
  free(r->argv);
  free(r->argvlen);
  free(r->buf);
  reply_free(r->saved);
  free(r);
}

static void on_reply(void *arg, const redisReply *reply);

static int rq_send(redis_store *s, rq *r) {
  r->sent_us = mono_us();
  return s->io.command(s->io.ctx, r->argc, r->argv, r->argvlen, on_reply, r);
}

/* Sends r (or holds it back during a NOSCRIPT resend) and queues it.
 * Returns 0, or IMD_STORE_EDOWN with r freed. */
static int submit(redis_store *s, rq *r) {
  if (s->stalled) {
    r->state = RQ_HELD;
  } else if (rq_send(s, r) == 0) {
    r->state = RQ_SENT;
    s->first_out++;
  } else {
    rq_free(r);
    return set_err(s, IMD_STORE_EDOWN, "redis is unreachable");
  }
  if (s->tail)
    s->tail->next = r;
  else
    s->head = r;
  s->tail = r;
  return IMD_STORE_OK;
}

/* ---- answers --------------------------------------------------------------------- */

static bool is_int(const redisReply *r) { return r && r->type == REDIS_REPLY_INTEGER; }
static bool is_str(const redisReply *r) { return r && r->type == REDIS_REPLY_STRING; }

static uint64_t u64_of(const char *p) { return p ? strtoull(p, NULL, 10) : 0; }

static int cmp_bytes(const void *a, const void *b) {
  const char *x = *(const char *const *)a, *y = *(const char *const *)b;
  return strcmp(x, y);
}

/* One inbox entry: [id, [field, value, ...]]. */
static bool parse_entry(const redisReply *e, imd_stored *out) {
  if (!e || e->type != REDIS_REPLY_ARRAY || e->elements != 2 || !is_str(e->element[0]) ||
      !e->element[1] || e->element[1]->type != REDIS_REPLY_ARRAY)
    return false;
  memset(out, 0, sizeof *out);
  out->seq = u64_of(e->element[0]->str);
  out->m.device = "";
  out->m.data = "";
  const redisReply *f = e->element[1];
  for (size_t j = 0; j + 1 < f->elements; j += 2) {
    const redisReply *k = f->element[j], *v = f->element[j + 1];
    if (!is_str(k) || !is_str(v) || k->len != 1) continue;
    switch (k->str[0]) {
    case 'i': out->m.id = v->str; break;
    case 'f': out->m.from = v->str; break;
    case 'd': out->m.device = v->str; break;
    case 'c': out->m.cid = v->str; break;
    case 't': out->m.to = v->str; break;
    case 'g': out->m.group = v->str; break;
    case 's': out->m.ts = u64_of(v->str); break;
    case 'b':
      out->m.data = v->str;
      out->m.data_len = v->len;
      break;
    default: break;
    }
  }
  return out->m.id && out->m.from && out->seq > 0;
}

static int done_append(redis_store *s, rq *r, const redisReply *a) {
  if (a->type != REDIS_REPLY_ARRAY || a->elements < 2 || !is_int(a->element[0])) return -1;
  if (a->element[0]->integer == 1) {
    if (!is_str(a->element[1])) return -1;
    r->cb.append(r->arg, IMD_STORE_DUP, NULL, a->element[1]->str);
    return 0;
  }
  if (a->elements != r->n + 2 || !is_int(a->element[1])) return -1;
  uint64_t *seqs = malloc(r->n * sizeof *seqs);
  if (!seqs) return -1;
  for (size_t i = 0; i < r->n; i++) {
    if (!is_int(a->element[i + 2])) {
      free(seqs);
      return -1;
    }
    seqs[i] = (uint64_t)a->element[i + 2]->integer;
  }
  s->st.trimmed += (uint64_t)a->element[1]->integer;
  r->cb.append(r->arg, r->pushed ? IMD_STORE_PUSHED : IMD_STORE_OK, seqs, NULL);
  free(seqs);
  return 0;
}

static int done_sync(rq *r, const redisReply *a) {
  if (a->type != REDIS_REPLY_ARRAY || a->elements < 2 || !is_int(a->element[0]) ||
      !is_int(a->element[1]))
    return -1;
  size_t n = a->elements - 2;
  imd_stored *v = n ? malloc(n * sizeof *v) : NULL;
  if (n && !v) return -1;
  for (size_t i = 0; i < n; i++)
    if (!parse_entry(a->element[i + 2], &v[i])) {
      free(v);
      return -1;
    }
  imd_sync_info info = {.last = (uint64_t)a->element[0]->integer,
                        .trimmed = (uint64_t)a->element[1]->integer};
  info.gap = r->since < info.trimmed;
  info.upto = n ? v[n - 1].seq : r->since > info.trimmed ? r->since : info.trimmed;
  info.more = info.upto < info.last;
  r->cb.sync(r->arg, IMD_STORE_OK, v, n, &info);
  free(v);
  return 0;
}

static int cmp_mark(const void *a, const void *b) {
  return strcmp(((const imd_device_mark *)a)->device, ((const imd_device_mark *)b)->device);
}

static int done_state(rq *r, const redisReply *a) {
  if (a->type != REDIS_REPLY_ARRAY) return -1;
  uint64_t last = 0, trimmed = 0;
  imd_device_mark *v = a->elements ? malloc(a->elements / 2 * sizeof *v + 1) : NULL;
  size_t n = 0;
  if (a->elements && !v) return -1;
  for (size_t j = 0; j + 1 < a->elements; j += 2) {
    const redisReply *k = a->element[j], *x = a->element[j + 1];
    if (!is_str(k) || !is_str(x)) continue;
    if (!strcmp(k->str, "last"))
      last = u64_of(x->str);
    else if (!strcmp(k->str, "trimmed"))
      trimmed = u64_of(x->str);
    else if (!strncmp(k->str, "d:", 2))
      v[n++] = (imd_device_mark){k->str + 2, u64_of(x->str)};
  }
  if (n > 1) qsort(v, n, sizeof *v, cmp_mark);
  r->cb.state(r->arg, IMD_STORE_OK, last, trimmed, v, n);
  free(v);
  return 0;
}

static int done_members(rq *r, const redisReply *a) {
  if (a->type != REDIS_REPLY_ARRAY) return -1;
  const char **v = a->elements ? malloc(a->elements * sizeof *v) : NULL;
  if (a->elements && !v) return -1;
  for (size_t i = 0; i < a->elements; i++) {
    if (!is_str(a->element[i])) {
      free(v);
      return -1;
    }
    v[i] = a->element[i]->str;
  }
  if (a->elements > 1) qsort(v, a->elements, sizeof *v, cmp_bytes);
  r->cb.members(r->arg, IMD_STORE_OK, v, a->elements);
  free(v);
  return 0;
}

static void fail_cb(rq *r, int status) {
  switch (r->kind) {
  case RQ_APPEND: r->cb.append(r->arg, status, NULL, NULL); break;
  case RQ_SYNC: r->cb.sync(r->arg, status, NULL, 0, NULL); break;
  case RQ_STATE: r->cb.state(r->arg, status, 0, 0, NULL, 0); break;
  case RQ_MEMBERS: r->cb.members(r->arg, status, NULL, 0); break;
  case RQ_GROUP: r->cb.done(r->arg, status); break;
  case RQ_MARKS:
  case RQ_TRIM: break;
  }
}

static bool is_write(const rq *r) { return r->kind == RQ_APPEND || r->kind == RQ_GROUP ||
                                           r->kind == RQ_MARKS || r->kind == RQ_TRIM; }

/* Runs r's callback with its answer a (NULL: r->status says why). */
static void complete(redis_store *s, rq *r, const redisReply *a) {
  int status = r->status;
  if (a && a->type == REDIS_REPLY_ERROR) {
    set_err(s, 0, "redis: %.200s", a->str ? a->str : "error");
    status = IMD_STORE_EIO;
  } else if (a) {
    int rc = 0;
    switch (r->kind) {
    case RQ_APPEND: rc = done_append(s, r, a); break;
    case RQ_SYNC: rc = done_sync(r, a); break;
    case RQ_STATE: rc = done_state(r, a); break;
    case RQ_MEMBERS: rc = done_members(r, a); break;
    case RQ_GROUP:
      r->cb.done(r->arg, IMD_STORE_OK);
      break;
    case RQ_MARKS: break;
    case RQ_TRIM:
      if (a->type == REDIS_REPLY_ARRAY && a->elements == 2 && is_int(a->element[0]) &&
          is_int(a->element[1])) {
        uint64_t took = mono_us() - r->sent_us;
        s->st.trimmed += (uint64_t)a->element[0]->integer;
        s->trim_more = a->element[1]->integer > 0;
        s->st.trim_steps++;
        s->st.trim_us += took;
        if (took > s->st.trim_max_us) s->st.trim_max_us = took;
      } else {
        rc = -1;
      }
      break;
    }
    if (rc == 0) {
      if (is_write(r)) {
        s->st.commits++;
        s->st.commit_us += mono_us() - r->sent_us;
      }
      return;
    }
    set_err(s, 0, "unexpected answer from redis (or out of memory)");
    status = IMD_STORE_EIO;
  } else if (status == IMD_STORE_OK) {
    status = IMD_STORE_EIO;
  }
  if (r->kind == RQ_TRIM) s->trim_more = false;
  s->st.errors++;
  fail_cb(r, status);
}

/* Completes the answered requests at the head of the queue, in order. */
static void drain(redis_store *s) {
  while (!s->closed && s->head && s->head->state == RQ_DONE) {
    rq *r = s->head;
    s->head = r->next;
    if (!s->head) s->tail = NULL;
    if (r->kind == RQ_TRIM) s->trim_out = false;
    complete(s, r, r->saved);
    rq_free(r);
  }
}

static void script_loaded(void *arg, const redisReply *reply) {
  (void)arg;
  (void)reply;
}

static int load_scripts(redis_store *s) {
  for (int i = 0; i < SC_COUNT; i++) {
    const char *argv[3] = {"SCRIPT", "LOAD", s->src[i]};
    size_t len[3] = {6, 4, strlen(s->src[i])};
    if (s->io.command(s->io.ctx, 3, argv, len, script_loaded, NULL) < 0)
      return set_err(s, IMD_STORE_EDOWN, "redis is unreachable");
  }
  return IMD_STORE_OK;
}

/* Every first attempt from before the NOSCRIPT was answered (and resent):
 * reload the scripts, then send what was held back, in order. */
static void unstall(redis_store *s) {
  if (!s->stalled || s->first_out > 0 || s->closed) return;
  s->stalled = false;
  load_scripts(s);
  for (rq *r = s->head; r; r = r->next) {
    if (r->state != RQ_HELD) continue;
    if (rq_send(s, r) == 0) {
      r->state = RQ_SENT;
      s->first_out++;
    } else {
      r->state = RQ_DONE;
      r->status = IMD_STORE_EDOWN;
      set_err(s, 0, "redis is unreachable");
    }
  }
}

static void store_free(redis_store *s);

static void on_reply(void *arg, const redisReply *reply) {
  rq *r = arg;
  redis_store *s = r->s;
  if (!s) { /* the store closed; its callback already ran */
    rq_free(r);
    return;
  }
  bool first = r->state == RQ_SENT;
  if (first) s->first_out--;
  s->depth++;
  if (first && reply && reply->type == REDIS_REPLY_ERROR && reply->str &&
      !strncmp(reply->str, "NOSCRIPT", 8)) {
    /* the script cache is empty (restart, SCRIPT FLUSH): send the text */
    s->stalled = true;
    r->argv[0] = "EVAL";
    r->argv[1] = s->src[r->script];
    r->argvlen[0] = 4;
    r->argvlen[1] = strlen(s->src[r->script]);
    if (rq_send(s, r) == 0) {
      r->state = RQ_RETRY;
    } else {
      r->state = RQ_DONE;
      r->status = IMD_STORE_EDOWN;
    }
  } else {
    r->state = RQ_DONE;
    if (!reply) {
      r->status = IMD_STORE_EDOWN;
      set_err(s, 0, "the connection to redis failed");
    } else if (r == s->head) {
      /* the usual case: no copy of the answer */
      s->head = r->next;
      if (!s->head) s->tail = NULL;
      if (r->kind == RQ_TRIM) s->trim_out = false;
      complete(s, r, reply);
      rq_free(r);
    } else if (!(r->saved = reply_clone(reply))) {
      r->status = IMD_STORE_EIO;
      set_err(s, 0, "out of memory");
    }
  }
  unstall(s);
  drain(s);
  if (--s->depth == 0 && s->closed) store_free(s);
}

/* ---- delivered marks ---------------------------------------------------------- */

static void mark_unlink(redis_store *s, mark *k) {
  strmap_del(&s->marks, &k->node);
  if (k->prev) k->prev->next = k->next; else s->marks_head = k->next;
  if (k->next) k->next->prev = k->prev; else s->marks_tail = k->prev;
}

/* The first n pending marks go to b: their user keys (marks_keys) and
 * their field, seq pairs (marks_args). They stay pending until the command
 * is sent (marks_drop); a mark lost with a command that failed later only
 * makes a device resync more. */
static size_t marks_count(const redis_store *s, size_t max) {
  size_t n = 0;
  for (const mark *k = s->marks_head; k && n < max; k = k->next) n++;
  return n;
}

static void marks_keys(redis_store *s, argb *b, size_t n) {
  const mark *k = s->marks_head;
  for (size_t i = 0; i < n; i++, k = k->next) ab_key(b, s, "user", k->key);
}

static void marks_args(redis_store *s, argb *b, size_t n) {
  const mark *k = s->marks_head;
  for (size_t i = 0; i < n; i++, k = k->next) {
    const char *device = k->key + k->uid_len + 1;
    ab_begin(b);
    ab_put(b, "d:", 2);
    ab_put(b, device, strlen(device));
    ab_end(b);
    ab_u64(b, k->seq);
  }
}

static void marks_drop(redis_store *s, size_t n) {
  for (size_t i = 0; i < n && s->marks_head; i++) {
    mark *k = s->marks_head;
    mark_unlink(s, k);
    free(k);
  }
}

/* Sends every pending mark (in commands of MARKS_PER_CMD). */
static int marks_flush(redis_store *s) {
  while (s->marks_head) {
    argb b = {0};
    size_t n = marks_count(s, MARKS_PER_CMD);
    ab_script(&b, s, SC_MARKS, n);
    marks_keys(s, &b, n);
    marks_args(s, &b, n);
    rq *r = rq_new(s, RQ_MARKS, SC_MARKS, &b, NULL);
    if (!r) return IMD_STORE_EIO;
    int rc = submit(s, r);
    if (rc < 0) return rc;
    marks_drop(s, n);
  }
  return IMD_STORE_OK;
}

static int r_mark(imd_store *base, const char *uid, const char *device, uint64_t seq) {
  redis_store *s = (redis_store *)base;
  if (s->closed) return IMD_STORE_EIO;
  if (!uid || !*uid || !device || seq > INT64_MAX)
    return set_err(s, IMD_STORE_EINVAL, "bad uid, device or seq");
  size_t ul = strlen(uid), dl = strlen(device);
  char stack[256], *key = ul + dl + 2 <= sizeof stack ? stack : malloc(ul + dl + 2);
  if (!key) return set_err(s, IMD_STORE_EIO, "out of memory");
  memcpy(key, uid, ul + 1);
  memcpy(key + ul + 1, device, dl + 1);
  strmap_node *n = strmap_get(&s->marks, key, ul + dl + 1);
  int rc = IMD_STORE_OK;
  if (n) {
    mark *k = (mark *)n; /* node is the first member */
    if (seq > k->seq) k->seq = seq;
  } else {
    mark *k = malloc(sizeof *k + ul + dl + 2);
    if (!k) {
      rc = set_err(s, IMD_STORE_EIO, "out of memory");
    } else {
      memcpy(k->key, key, ul + dl + 2);
      k->node.key = k->key;
      k->node.klen = (uint32_t)(ul + dl + 1);
      k->seq = seq;
      k->uid_len = ul;
      k->next = NULL;
      k->prev = s->marks_tail;
      if (s->marks_tail) s->marks_tail->next = k; else s->marks_head = k;
      s->marks_tail = k;
      strmap_put(&s->marks, &k->node);
      if (s->marks.count >= MARKS_MAX) rc = marks_flush(s);
    }
  }
  if (key != stack) free(key);
  return rc;
}

/* ---- the ops -------------------------------------------------------------------- */

static int check_msg(redis_store *s, const imd_store_msg *m, const char *const *uids, size_t n) {
  if (!m || !m->id || !*m->id || !m->from)
    return set_err(s, IMD_STORE_EINVAL, "message without id or sender");
  if (strlen(m->id) >= ID_MAX) return set_err(s, IMD_STORE_EINVAL, "message id too long");
  if (!m->data && m->data_len > 0) return set_err(s, IMD_STORE_EINVAL, "message data missing");
  if (m->ts > INT64_MAX) return set_err(s, IMD_STORE_EINVAL, "ts out of range");
  if (!uids || n == 0) return set_err(s, IMD_STORE_EINVAL, "no receivers");
  if (n <= 2) { /* the common cases (1:1, HTTP API) without a sort */
    if (!uids[0] || !*uids[0] || (n == 2 && (!uids[1] || !*uids[1])))
      return set_err(s, IMD_STORE_EINVAL, "empty receiver uid");
    if (n == 2 && !strcmp(uids[0], uids[1]))
      return set_err(s, IMD_STORE_EINVAL, "receiver uid listed twice");
    return IMD_STORE_OK;
  }
  const char **v = malloc(n * sizeof *v);
  if (!v) return set_err(s, IMD_STORE_EIO, "out of memory");
  int rc = IMD_STORE_OK;
  for (size_t i = 0; i < n && rc == 0; i++) {
    if (!uids[i] || !*uids[i]) rc = set_err(s, IMD_STORE_EINVAL, "empty receiver uid");
    v[i] = uids[i];
  }
  if (rc == 0 && n > 1) {
    qsort(v, n, sizeof *v, cmp_bytes);
    for (size_t i = 1; i < n && rc == 0; i++)
      if (!strcmp(v[i - 1], v[i])) rc = set_err(s, IMD_STORE_EINVAL, "receiver uid listed twice");
  }
  free(v);
  return rc;
}

static void ab_field(argb *b, const char *name, const char *v) {
  ab_ref(b, name, 1);
  ab_ref(b, v, strlen(v));
}

static int r_append(imd_store *base, const imd_store_msg *m, const char *const *uids, size_t n,
                    imd_append_cb cb, void *arg) {
  redis_store *s = (redis_store *)base;
  if (s->closed) return IMD_STORE_EIO;
  if (!cb) return set_err(s, IMD_STORE_EINVAL, "no callback");
  int rc = check_msg(s, m, uids, n);
  if (rc < 0) return rc;
  const char *device = m->device ? m->device : "";
  bool aged = s->o.keep_age_s > 0;
  size_t nmarks = marks_count(s, MARKS_PER_APPEND);

  argb b = {0};
  ab_script(&b, s, SC_APPEND, 1 + (m->cid != NULL) + 2 * n + nmarks);
  ab_trimq(&b, s);
  if (m->cid) {
    ab_begin(&b);
    ab_put(&b, s->prefix, strlen(s->prefix));
    ab_put(&b, "idem:{", 6);
    ab_put_esc(&b, m->from);
    ab_put(&b, "}:", 2);
    ab_put_esc(&b, device);
    ab_put(&b, ":", 1);
    ab_put(&b, m->cid, strlen(m->cid));
    ab_end(&b);
  }
  for (size_t i = 0; i < n; i++) {
    ab_key(&b, s, "inbox", uids[i]);
    ab_key(&b, s, "user", uids[i]);
  }
  marks_keys(s, &b, nmarks);
  ab_u64(&b, n);
  ab_u64(&b, s->o.keep_count);
  ab_u64(&b, (uint64_t)s->o.keep_age_s * 1000u);
  ab_ref(&b, aged ? "1" : "0", 1);
  ab_ref(&b, m->cid ? "1" : "0", 1);
  ab_u64(&b, nmarks);
  ab_u64(&b, m->ts);
  ab_ref(&b, m->id, strlen(m->id));
  size_t nf = 2 * (5 + (m->cid != NULL) + (m->to != NULL) + (m->group != NULL));
  ab_u64(&b, nf);
  ab_field(&b, "i", m->id);
  ab_field(&b, "f", m->from);
  ab_field(&b, "d", device);
  if (m->cid) ab_field(&b, "c", m->cid);
  if (m->to) ab_field(&b, "t", m->to);
  if (m->group) ab_field(&b, "g", m->group);
  ab_ref(&b, "s", 1);
  ab_u64(&b, m->ts);
  ab_ref(&b, "b", 1);
  ab_ref(&b, m->data_len ? m->data : "", m->data_len);
  for (size_t i = 0; aged && i < n; i++) {
    ab_begin(&b);
    ab_put_esc(&b, uids[i]);
    ab_end(&b);
  }
  marks_args(s, &b, nmarks);
  /* the push variant pushes only when given its arguments: without them
   * (no lease right now) it stores and the caller routes */
  const char *pargs[4];
  size_t plens[4];
  void *owned = NULL;
  bool push = s->io.push_args && s->io.push_args(s->io.ctx, m, pargs, plens, &owned) == 0;
  for (int i = 0; push && i < 4; i++) {
    ab_begin(&b);
    ab_put(&b, pargs[i], plens[i]);
    ab_end(&b);
  }
  for (size_t i = 0; push && i < n; i++) ab_ref(&b, uids[i], strlen(uids[i]));
  free(owned);
  rq *r = rq_new(s, RQ_APPEND, SC_APPEND, &b, arg);
  if (!r) return IMD_STORE_EIO;
  r->cb.append = cb;
  r->n = n;
  r->pushed = push;
  rc = submit(s, r);
  if (rc == IMD_STORE_OK) marks_drop(s, nmarks);
  return rc;
}

static int r_sync(imd_store *base, const char *uid, uint64_t since, uint32_t limit,
                  size_t max_bytes, imd_sync_cb cb, void *arg) {
  redis_store *s = (redis_store *)base;
  if (s->closed) return IMD_STORE_EIO;
  if (!uid || !*uid || !cb) return set_err(s, IMD_STORE_EINVAL, "empty uid or no callback");
  if (since > INT64_MAX) since = INT64_MAX;
  argb b = {0};
  ab_script(&b, s, SC_SYNC, 2);
  ab_key(&b, s, "inbox", uid);
  ab_key(&b, s, "user", uid);
  ab_u64(&b, since < SEQ_MAX ? since : SEQ_MAX);
  ab_u64(&b, limit ? limit : SYNC_DEFAULT);
  ab_u64(&b, max_bytes);
  rq *r = rq_new(s, RQ_SYNC, SC_SYNC, &b, arg);
  if (!r) return IMD_STORE_EIO;
  r->cb.sync = cb;
  r->since = since;
  return submit(s, r);
}

static int r_state(imd_store *base, const char *uid, imd_state_cb cb, void *arg) {
  redis_store *s = (redis_store *)base;
  if (s->closed) return IMD_STORE_EIO;
  if (!uid || !*uid || !cb) return set_err(s, IMD_STORE_EINVAL, "empty uid or no callback");
  /* the read must see the marks made before it */
  int rc = marks_flush(s);
  if (rc < 0) return rc;
  argb b = {0};
  ab_script(&b, s, SC_STATE, 1);
  ab_key(&b, s, "user", uid);
  rq *r = rq_new(s, RQ_STATE, SC_STATE, &b, arg);
  if (!r) return IMD_STORE_EIO;
  r->cb.state = cb;
  return submit(s, r);
}

static int r_members(imd_store *base, const char *gid, imd_members_cb cb, void *arg) {
  redis_store *s = (redis_store *)base;
  if (s->closed) return IMD_STORE_EIO;
  if (!gid || !*gid || !cb) return set_err(s, IMD_STORE_EINVAL, "empty gid or no callback");
  argb b = {0};
  ab_script(&b, s, SC_MEMBERS, 1);
  ab_key(&b, s, "group", gid);
  rq *r = rq_new(s, RQ_MEMBERS, SC_MEMBERS, &b, arg);
  if (!r) return IMD_STORE_EIO;
  r->cb.members = cb;
  return submit(s, r);
}

static int r_group(imd_store *base, const char *gid, const char *const *add, size_t nadd,
                   const char *const *rm, size_t nrm, imd_done_cb cb, void *arg) {
  redis_store *s = (redis_store *)base;
  if (s->closed) return IMD_STORE_EIO;
  if (!gid || !*gid || !cb) return set_err(s, IMD_STORE_EINVAL, "empty gid or no callback");
  if ((nadd && !add) || (nrm && !rm)) return set_err(s, IMD_STORE_EINVAL, "no member list");
  for (size_t i = 0; i < nadd + nrm; i++) {
    const char *u = i < nadd ? add[i] : rm[i - nadd];
    if (!u || !*u) return set_err(s, IMD_STORE_EINVAL, "empty member uid");
  }
  argb b = {0};
  ab_script(&b, s, SC_GROUP, 1);
  ab_key(&b, s, "group", gid);
  ab_u64(&b, nadd);
  /* copied: the lists need not outlive this call */
  for (size_t i = 0; i < nadd + nrm; i++) ab_str(&b, i < nadd ? add[i] : rm[i - nadd]);
  rq *r = rq_new(s, RQ_GROUP, SC_GROUP, &b, arg);
  if (!r) return IMD_STORE_EIO;
  r->cb.done = cb;
  return submit(s, r);
}

static void r_stats(imd_store *base, imd_store_stats *st) { *st = ((redis_store *)base)->st; }

static const char *r_error(imd_store *base) { return ((redis_store *)base)->err; }

static void store_free(redis_store *s) {
  while (s->marks_head) {
    mark *k = s->marks_head;
    mark_unlink(s, k);
    free(k);
  }
  strmap_free(&s->marks);
  free(s->prefix);
  free(s->push_src);
  free(s);
}

static void r_close(imd_store *base) {
  redis_store *s = (redis_store *)base;
  if (s->closed) return;
  marks_flush(s); /* best effort: they are not waited for */
  s->closed = true;
  /* complete in order: answered ones with their answer, the rest with EIO */
  while (s->head) {
    rq *r = s->head;
    s->head = r->next;
    if (r->state != RQ_DONE && r->status == IMD_STORE_OK) {
      r->status = IMD_STORE_EIO;
      set_err(s, 0, "the store closed before redis answered");
    }
    complete(s, r, r->state == RQ_DONE ? r->saved : NULL);
    if (r->state == RQ_SENT || r->state == RQ_RETRY)
      r->s = NULL; /* on_reply frees it */
    else
      rq_free(r);
  }
  s->tail = NULL;
  if (s->depth == 0) store_free(s);
}

static const imd_store_ops redis_ops = {r_append, r_mark,  r_sync,  r_state, r_members,
                                        r_group,  r_stats, r_error, r_close};

/* ---- the extras ------------------------------------------------------------------ */

int imd_store_redis_load_scripts(imd_store *base) {
  redis_store *s = (redis_store *)base;
  return s->closed ? IMD_STORE_EIO : load_scripts(s);
}

int imd_store_redis_trim(imd_store *base, uint64_t now_ms) {
  redis_store *s = (redis_store *)base;
  uint64_t age_ms = (uint64_t)s->o.keep_age_s * 1000u;
  if (s->closed) return IMD_STORE_EIO;
  if (!age_ms || now_ms <= age_ms) return IMD_STORE_OK;
  argb b = {0};
  ab_script(&b, s, SC_TRIM, 1);
  ab_trimq(&b, s);
  ab_str(&b, s->prefix);
  ab_u64(&b, now_ms - age_ms);
  ab_u64(&b, TRIM_USERS);
  ab_u64(&b, TRIM_WINDOW);
  rq *r = rq_new(s, RQ_TRIM, SC_TRIM, &b, NULL);
  if (!r) return IMD_STORE_EIO;
  int rc = submit(s, r);
  if (rc == 0) {
    s->trim_out = true;
    s->trim_more = false;
  }
  return rc;
}

void imd_store_redis_tick(imd_store *base, uint64_t now_ms, bool trim) {
  redis_store *s = (redis_store *)base;
  if (!s || s->closed) return;
  marks_flush(s);
  uint64_t mono = mono_us() / 1000u;
  if (trim && s->o.keep_age_s && !s->trim_out && (s->trim_more || mono >= s->next_trim_ms) &&
      imd_store_redis_trim(base, now_ms) == IMD_STORE_OK)
    s->next_trim_ms = mono + TRIM_INTERVAL_MS;
}

imd_store *imd_store_redis_new(const imd_redis_io *io, const char *prefix,
                               const imd_store_opts *o, char *err, size_t errlen) {
  if (!io || !io->command) {
    snprintf(err, errlen, "no redis io");
    return NULL;
  }
  redis_store *s = calloc(1, sizeof *s);
  if (!s || strmap_init(&s->marks, 64) != 0 || !(s->prefix = strdup(prefix ? prefix : ""))) {
    if (s) strmap_free(&s->marks);
    free(s);
    snprintf(err, errlen, "out of memory");
    return NULL;
  }
  s->base.ops = &redis_ops;
  s->io = *io;
  if (o) s->o = *o;
  memcpy(s->src, script_src, sizeof s->src);
  if (io->push_lua && io->push_args) {
    static const char head[] = "#!lua\n", tail[] = LUA_MARKS LUA_APPEND_BODY LUA_APPEND_PUSH_TAIL;
    size_t n = strlen(head) + strlen(io->push_lua) + strlen(tail) + 1;
    if (!(s->push_src = malloc(n))) {
      snprintf(err, errlen, "out of memory");
      store_free(s);
      return NULL;
    }
    snprintf(s->push_src, n, "%s%s%s", head, io->push_lua, tail);
    s->src[SC_APPEND] = s->push_src;
  } else {
    s->io.push_lua = NULL;
    s->io.push_args = NULL;
  }
  for (int i = 0; i < SC_COUNT; i++) {
    unsigned char d[20];
    if (mbedtls_sha1_ret((const unsigned char *)s->src[i], strlen(s->src[i]), d) != 0) {
      snprintf(err, errlen, "cannot hash the scripts");
      store_free(s);
      return NULL;
    }
    for (int j = 0; j < 20; j++) snprintf(s->sha[i] + 2 * j, 3, "%02x", d[j]);
  }
  snprintf(s->err, sizeof s->err, "no error");
  load_scripts(s); /* while down, the NOSCRIPT path loads them later */
  return &s->base;
}
