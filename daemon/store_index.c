/* The SQLite store's inbox entries and idempotency keys, written behind
 * their messages (the contract is in store_sqlite_int.h).
 *
 * Why: inbox rows are keyed by their receiver and keys by their sender, so
 * a commit of a few dozen 1:1 messages put each of its ~3 rows per message
 * on a page of its own, and wrote (and later checkpointed) a whole page per
 * row: bench/store-bench -u 200 -b 54 -c -m spent 23.5 us of CPU per append,
 * against 3.8 us for the message rows alone, and 10.8 us when a commit held
 * 32 times as many appends (its rows then share pages). Here a user's rows
 * wait in memory until it has gathered a page's worth, and one commit writes
 * them next to each other. The message row carries them as well (msgs.idx),
 * so they are as durable as before, with the commit of their message; an
 * open after a crash writes again those of the messages the meta row
 * 'indexed' does not cover. Reads merge the waiting rows (sqlstore_sync()),
 * retention writes them before it trims (users_flush() in store_sqlite.c),
 * and duplicate keys are found among them before the table is asked. */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "store_sqlite_int.h"

/* How old (ms, by the messages' ts) the oldest waiting row may get before a
 * commit writes its user's rows; with pend_max, this bounds the memory and
 * what an open after a crash writes again. */
#define PEND_AGE_MS 5000
/* A commit writes 'indexed' when it has moved this many messages on: the
 * messages an open after a crash looks at again, beyond those waiting. */
#define INDEXED_EVERY 16384
/* Rows a user's array starts with (it doubles from there). */
#define PEND_FIRST 8

/* ---- the users with waiting rows, by their oldest ---- */

static void pq_push(sql_store *s, user_ctr *u)
{
  u->pq_next = NULL;
  u->pq_prev = s->pq_tail;
  if (s->pq_tail != NULL)
    s->pq_tail->pq_next = u;
  else
    s->pq_head = u;
  s->pq_tail = u;
}

static void pq_unlink(sql_store *s, user_ctr *u)
{
  if (u->pq_prev != NULL)
    u->pq_prev->pq_next = u->pq_next;
  else
    s->pq_head = u->pq_next;
  if (u->pq_next != NULL)
    u->pq_next->pq_prev = u->pq_prev;
  else
    s->pq_tail = u->pq_prev;
  u->pq_next = u->pq_prev = NULL;
}

/* Keeps the first keep rows of u and frees the others (all: the array too). */
static void pend_cut(sql_store *s, user_ctr *u, uint32_t keep)
{
  if (keep >= u->pend_n)
    return;
  for (uint32_t i = keep; i < u->pend_n; i++)
    free(u->pend[i].key);
  s->pend_total -= u->pend_n - keep;
  u->pend_n = keep;
  if (u->pend_ok > keep)
    u->pend_ok = keep;
  if (keep == 0) {
    pq_unlink(s, u);
    u->key_bits[0] = u->key_bits[1] = 0;
    free(u->pend);
    u->pend = NULL;
    u->pend_cap = 0;
  }
}

/* A new last row of u (its fields to fill), or NULL when out of memory. A
 * user's rows are one array: a commit writes them in one sweep of memory
 * (they were a list, a cache miss per row: 80 % of sqls_index_write_user). */
static pend_row *pend_add(sql_store *s, user_ctr *u, uint64_t ts)
{
  if (u->pend_n == u->pend_cap) {
    uint32_t cap = u->pend_cap == 0 ? PEND_FIRST : u->pend_cap * 2;
    pend_row *more = realloc(u->pend, cap * sizeof *more);
    if (more == NULL)
      return NULL;
    u->pend = more;
    u->pend_cap = cap;
  }
  if (u->pend_n == 0)
    pq_push(s, u);
  u->pend_n++;
  s->pend_total++;
  /* the last, not the largest: after the wall clock steps back, the rows
   * from before wait for their user's page or pend_max (the largest would
   * have every commit write every waiting row until the clock caught up) */
  s->pend_newest_ts = ts;
  if (!u->in_pbatch) {
    u->in_pbatch = true;
    u->pb_next = s->pbatch;
    s->pbatch = u;
  }
  return &u->pend[u->pend_n - 1];
}

int sqls_index_entry(sql_store *s, user_ctr *u, uint64_t seq, sqlite3_int64 mid, uint64_t ts)
{
  pend_row *r = pend_add(s, u, ts);

  if (r == NULL)
    return sqls_set_err(s, IMD_STORE_EIO, "out of memory");
  *r = (pend_row){.mid = mid, .ts = ts, .seq = seq, .key = NULL};
  return IMD_STORE_OK;
}

/* Two bits of a 128-bit filter per key: a lookup walks the user's list
 * only when both are set (with 32 keys waiting, ~1 in 6 misses does; the
 * walk of every sender's list for every message was 2 % of imd's CPU). */
static uint64_t key_hash(const char *device, const char *cid)
{
  uint64_t h = 0xcbf29ce484222325u;

  for (const char *p = device; *p != '\0'; p++)
    h = (h ^ (unsigned char)*p) * 0x100000001b3u;
  h = (h ^ 0xffu) * 0x100000001b3u;
  for (const char *p = cid; *p != '\0'; p++)
    h = (h ^ (unsigned char)*p) * 0x100000001b3u;
  return h ^ (h >> 29);
}

static void key_bits_set(user_ctr *u, uint64_t h)
{
  unsigned a = (unsigned)(h & 127), b = (unsigned)((h >> 7) & 127);

  u->key_bits[a >> 6] |= (uint64_t)1 << (a & 63);
  u->key_bits[b >> 6] |= (uint64_t)1 << (b & 63);
}

static bool key_bits_have(const user_ctr *u, uint64_t h)
{
  unsigned a = (unsigned)(h & 127), b = (unsigned)((h >> 7) & 127);

  return (u->key_bits[a >> 6] >> (a & 63) & 1) && (u->key_bits[b >> 6] >> (b & 63) & 1);
}

int sqls_index_key(sql_store *s, user_ctr *sender, const char *device, const char *cid,
                   const char *id, sqlite3_int64 mid, uint64_t ts)
{
  size_t dl = strlen(device) + 1, cl = strlen(cid) + 1, il = strlen(id) + 1;
  char *key = malloc(dl + cl + il);
  pend_row *r = key != NULL ? pend_add(s, sender, ts) : NULL;

  if (r == NULL) {
    free(key);
    return sqls_set_err(s, IMD_STORE_EIO, "out of memory");
  }
  memcpy(key, device, dl);
  memcpy(key + dl, cid, cl);
  memcpy(key + dl + cl, id, il);
  *r = (pend_row){.mid = mid, .ts = ts, .seq = 0, .key = key};
  key_bits_set(sender, key_hash(device, cid));
  return IMD_STORE_OK;
}

void sqls_index_unadd(sql_store *s, user_ctr *u)
{
  if (u->pend_n > u->pend_ok)
    pend_cut(s, u, u->pend_n - 1);
}

const char *sqls_index_find_key(const user_ctr *u, const char *device, const char *cid)
{
  if (u->pend_n == 0 || !key_bits_have(u, key_hash(device, cid)))
    return NULL;
  for (const pend_row *r = u->pend, *end = r + u->pend_n; r < end; r++) {
    if (r->key == NULL || strcmp(r->key, device) != 0)
      continue;
    const char *c = r->key + strlen(r->key) + 1;
    if (strcmp(c, cid) == 0)
      return c + strlen(c) + 1;
  }
  return NULL;
}

int sqls_index_each_entry(const user_ctr *u, uint64_t since,
                          int (*fn)(void *ctx, const pend_row *r), void *ctx)
{
  for (const pend_row *r = u->pend, *end = r + u->pend_n; r < end; r++) {
    int rc = r->key == NULL && r->seq > since ? fn(ctx, r) : 0;
    if (rc != 0)
      return rc;
  }
  return 0;
}

/* ---- msgs.idx ---- */

static size_t varint_put(unsigned char *p, uint64_t v)
{
  size_t n = 0;

  while (v >= 0x80) {
    p[n++] = (unsigned char)(v | 0x80);
    v >>= 7;
  }
  p[n++] = (unsigned char)v;
  return n;
}

/* The varint at *p (end: one past the last byte) into *v; false when it
 * runs past end or over 64 bits. */
static bool varint_get(const unsigned char **p, const unsigned char *end, uint64_t *v)
{
  uint64_t x = 0;

  for (unsigned shift = 0; *p < end && shift < 64; shift += 7) {
    unsigned char b = *(*p)++;
    x |= (uint64_t)(b & 0x7f) << shift;
    if (b < 0x80) {
      *v = x;
      return true;
    }
  }
  return false;
}

size_t sqls_index_encoded_max(size_t n)
{
  return 10 * (1 + 2 * n);
}

size_t sqls_index_encode(unsigned char *buf, sqlite3_int64 sender_uk, const user_ctr *touched,
                         const uint64_t *seqs)
{
  size_t len = varint_put(buf, (uint64_t)sender_uk);
  size_t i = 0;

  for (const user_ctr *u = touched; u != NULL; u = u->touch_next, i++) {
    len += varint_put(buf + len, (uint64_t)u->uk);
    len += varint_put(buf + len, seqs[i]);
  }
  return len;
}

/* ---- writing ---- */

static int put_entry(sql_store *s, sqlite3_int64 uk, const pend_row *r)
{
  sqlite3_stmt *st = s->st[ST_INBOX_PUT];

  sqlite3_bind_int64(st, 1, uk);
  sqls_bind_u64(st, 2, r->seq);
  sqlite3_bind_int64(st, 3, r->mid);
  sqls_bind_u64(st, 4, r->ts);
  return sqls_run(s, ST_INBOX_PUT, "cannot store the inbox entry");
}

static int put_key(sql_store *s, sqlite3_int64 uk, const pend_row *r)
{
  sqlite3_stmt *st = s->st[ST_IDEM_PUT];
  const char *cid = r->key + strlen(r->key) + 1;

  sqlite3_bind_int64(st, 1, uk);
  sqls_bind_text(st, 2, r->key);
  sqls_bind_text(st, 3, cid);
  sqls_bind_text(st, 4, cid + strlen(cid) + 1);
  sqls_bind_u64(st, 5, r->ts);
  if (sqls_run(s, ST_IDEM_PUT, "cannot store the idempotency key") != IMD_STORE_OK)
    return IMD_STORE_EIO;
  s->idem_added++;
  return IMD_STORE_OK;
}

/* Entries first, in seq order (their B-tree's order), then the keys. */
int sqls_index_write_user(sql_store *s, user_ctr *u)
{
  if (u->in_pwritten || u->pend_n == 0)
    return IMD_STORE_OK;
  const pend_row *end = u->pend + u->pend_n;

  for (const pend_row *r = u->pend; r < end; r++)
    if (r->key == NULL && put_entry(s, u->uk, r) != IMD_STORE_OK)
      return IMD_STORE_EIO;
  for (const pend_row *r = u->pend; r < end; r++)
    if (r->key != NULL && put_key(s, u->uk, r) != IMD_STORE_OK)
      return IMD_STORE_EIO;
  u->in_pwritten = true;
  u->pw_next = s->pwritten;
  s->pwritten = u;
  s->pend_written += u->pend_n;
  return IMD_STORE_OK;
}

static int meta_indexed(sql_store *s, sqlite3_int64 mid)
{
  sqlite3_stmt *st = s->st[ST_META_PUT];

  sqlite3_bind_text(st, 1, "indexed", -1, SQLITE_STATIC);
  sqlite3_bind_int64(st, 2, mid);
  return sqls_run(s, ST_META_PUT, "cannot store the indexed mark");
}

/* The mid up to which every message's rows are in their tables once the
 * open transaction commits. */
static sqlite3_int64 indexed_now(const sql_store *s)
{
  for (const user_ctr *u = s->pq_head; u != NULL; u = u->pq_next)
    if (!u->in_pwritten)
      return u->pend->mid - 1; /* the oldest row of the oldest user */
  return s->mid_next - 1;
}

int sqls_index_commit(sql_store *s)
{
  user_ctr *u;

  for (u = s->pbatch; u != NULL; u = u->pb_next)
    if (u->pend_n >= s->pend_ripe && sqls_index_write_user(s, u) != IMD_STORE_OK)
      return IMD_STORE_EIO;
  /* the oldest, while too many wait or they waited too long */
  u = s->pq_head;
  while (u != NULL && (s->pend_total - s->pend_written > s->pend_max ||
                       u->pend->ts + PEND_AGE_MS < s->pend_newest_ts)) {
    if (sqls_index_write_user(s, u) != IMD_STORE_OK)
      return IMD_STORE_EIO;
    u = u->pq_next;
  }
  sqlite3_int64 mark = indexed_now(s);
  if (mark - s->indexed >= INDEXED_EVERY) {
    if (meta_indexed(s, mark) != IMD_STORE_OK)
      return IMD_STORE_EIO;
    s->indexed_due = mark;
  }
  return IMD_STORE_OK;
}

void sqls_index_written(sql_store *s)
{
  for (user_ctr *u = s->pwritten, *next; u != NULL; u = next) {
    next = u->pw_next;
    u->in_pwritten = false;
    u->pw_next = NULL;
    pend_cut(s, u, 0);
  }
  s->pwritten = NULL;
  s->pend_written = 0;
  if (s->indexed_due > s->indexed)
    s->indexed = s->indexed_due;
  s->indexed_due = 0;
  for (user_ctr *u = s->pbatch, *next; u != NULL; u = next) {
    next = u->pb_next;
    u->in_pbatch = false;
    u->pb_next = NULL;
    u->pend_ok = u->pend_n;
  }
  s->pbatch = NULL;
}

void sqls_index_rolled_back(sql_store *s, bool batch)
{
  for (user_ctr *u = s->pwritten, *next; u != NULL; u = next) {
    next = u->pw_next;
    u->in_pwritten = false;
    u->pw_next = NULL;
  }
  s->pwritten = NULL;
  s->pend_written = 0;
  s->indexed_due = 0;
  if (!batch)
    return;
  for (user_ctr *u = s->pbatch, *next; u != NULL; u = next) {
    next = u->pb_next;
    u->in_pbatch = false;
    u->pb_next = NULL;
    pend_cut(s, u, u->pend_ok);
  }
  s->pbatch = NULL;
  s->mid_next = s->mid_batch;
}

int sqls_index_write_all(sql_store *s)
{
  sqlite3_int64 mark;

  for (user_ctr *u = s->pq_head; u != NULL; u = u->pq_next)
    if (sqls_index_write_user(s, u) != IMD_STORE_OK)
      return IMD_STORE_EIO;
  mark = indexed_now(s);
  if (mark == s->indexed)
    return IMD_STORE_OK;
  if (meta_indexed(s, mark) != IMD_STORE_OK)
    return IMD_STORE_EIO;
  s->indexed_due = mark;
  return IMD_STORE_OK;
}

int sqls_index_flush(sql_store *s)
{
  int rc;

  if (s->pend_total == 0 && s->indexed == s->mid_next - 1)
    return IMD_STORE_OK;
  rc = sqls_run(s, ST_BEGIN, "cannot begin writing the inbox entries");
  if (rc == IMD_STORE_OK)
    rc = sqls_index_write_all(s);
  if (rc == IMD_STORE_OK)
    rc = sqls_run(s, ST_COMMIT, "cannot commit the inbox entries");
  if (rc != IMD_STORE_OK) {
    sqls_rollback(s);
    sqls_index_rolled_back(s, false);
    return IMD_STORE_EIO;
  }
  sqls_index_written(s);
  return IMD_STORE_OK;
}

void sqls_index_free(sql_store *s)
{
  while (s->pq_head != NULL)
    pend_cut(s, s->pq_head, 0);
  s->pbatch = s->pwritten = NULL;
  s->pend_written = 0;
}

/* ---- replay at open ---- */

static int replay_fail(sqlite3 *db, char *err, size_t errlen, const char *what)
{
  snprintf(err, errlen, "%s: %s", what, sqlite3_errmsg(db));
  return -1;
}

/* One message's rows from its idx (INSERT OR IGNORE); SQLITE_FORMAT when
 * idx is not a list of rows. msg's columns: mid, device, cid, id, ts, idx. */
static int replay_one(sqlite3_stmt *msg, sqlite3_stmt *entry, sqlite3_stmt *key)
{
  const unsigned char *p = sqlite3_column_blob(msg, 5);
  const unsigned char *end = p + sqlite3_column_bytes(msg, 5);
  sqlite3_int64 mid = sqlite3_column_int64(msg, 0);
  sqlite3_int64 ts = sqlite3_column_int64(msg, 4);
  uint64_t sender, uk, seq;
  int rc;

  if (p == NULL || !varint_get(&p, end, &sender) || sender > INT64_MAX)
    return SQLITE_FORMAT;
  if (sender != 0 && sqlite3_column_type(msg, 2) != SQLITE_NULL) {
    sqlite3_bind_int64(key, 1, (sqlite3_int64)sender);
    for (int i = 1; i <= 3; i++)
      sqlite3_bind_value(key, i + 1, sqlite3_column_value(msg, i));
    sqlite3_bind_int64(key, 5, ts);
    rc = sqlite3_step(key);
    sqlite3_reset(key);
    if (rc != SQLITE_DONE)
      return rc;
  }
  while (p < end) {
    if (!varint_get(&p, end, &uk) || !varint_get(&p, end, &seq) || uk > INT64_MAX ||
        seq > INT64_MAX)
      return SQLITE_FORMAT;
    sqlite3_bind_int64(entry, 1, (sqlite3_int64)uk);
    sqlite3_bind_int64(entry, 2, (sqlite3_int64)seq);
    sqlite3_bind_int64(entry, 3, mid);
    sqlite3_bind_int64(entry, 4, ts);
    rc = sqlite3_step(entry);
    sqlite3_reset(entry);
    if (rc != SQLITE_DONE)
      return rc;
  }
  return SQLITE_DONE;
}

int sqls_index_replay(sqlite3 *db, sqlite3_int64 *indexed, sqlite3_int64 *mid_next,
                      sqlite3_int64 *mid_batch, char *err, size_t errlen)
{
  sqlite3_stmt *msg = NULL, *entry = NULL, *key = NULL, *last = NULL;
  sqlite3_int64 from = 0, top = 0, bad = 0;
  int rc = SQLITE_OK;

  /* a file without the mark (new, or just upgraded) has nothing behind */
  if (sqlite3_prepare_v2(db,
                         "SELECT (SELECT v FROM meta WHERE k = 'indexed'),"
                         " coalesce((SELECT max(mid) FROM msgs), 0)",
                         -1, &last, NULL) != SQLITE_OK ||
      sqlite3_step(last) != SQLITE_ROW) {
    sqlite3_finalize(last);
    return replay_fail(db, err, errlen, "cannot read the indexed mark");
  }
  top = sqlite3_column_int64(last, 1);
  from = sqlite3_column_type(last, 0) == SQLITE_NULL ? top : sqlite3_column_int64(last, 0);
  sqlite3_finalize(last);
  if (from > top)
    top = from; /* retention dropped the last messages: mids go on after the mark */
  else if (from < top) {
    if (sqlite3_prepare_v2(db,
                           "SELECT mid, device, cid, id, ts, idx FROM msgs"
                           " WHERE mid > ?1 AND idx IS NOT NULL ORDER BY mid",
                           -1, &msg, NULL) != SQLITE_OK ||
        sqlite3_prepare_v2(db,
                           "INSERT OR IGNORE INTO inbox(uk, seq, mid, ts) SELECT ?1, ?2, ?3, ?4"
                           " WHERE ?2 > coalesce((SELECT trimmed FROM users WHERE uk = ?1), 0)",
                           -1, &entry, NULL) != SQLITE_OK ||
        sqlite3_prepare_v2(db,
                           "INSERT OR IGNORE INTO idem(uk, device, cid, id, ts)"
                           " VALUES(?1, ?2, ?3, ?4, ?5)",
                           -1, &key, NULL) != SQLITE_OK)
      rc = SQLITE_ERROR;
    if (rc == SQLITE_OK)
      sqlite3_bind_int64(msg, 1, from);
    while (rc == SQLITE_OK && (rc = sqlite3_step(msg)) == SQLITE_ROW) {
      int one = replay_one(msg, entry, key);
      if (one == SQLITE_FORMAT)
        bad = sqlite3_column_int64(msg, 0);
      rc = one == SQLITE_DONE ? SQLITE_OK : SQLITE_ERROR;
    }
    sqlite3_finalize(msg);
    sqlite3_finalize(entry);
    sqlite3_finalize(key);
    if (bad != 0) {
      snprintf(err, errlen,
               "the row list (msgs.idx) of message %lld is damaged:"
               " restore the store from a backup",
               (long long)bad);
      return -1;
    }
    if (rc != SQLITE_DONE)
      return replay_fail(db, err, errlen, "cannot write the inbox entries of the last messages");
  }
  if (sqlite3_prepare_v2(db, "INSERT OR REPLACE INTO meta(k, v) VALUES('indexed', ?1)", -1, &last,
                         NULL) != SQLITE_OK) {
    return replay_fail(db, err, errlen, "cannot store the indexed mark");
  }
  sqlite3_bind_int64(last, 1, top);
  rc = sqlite3_step(last);
  sqlite3_finalize(last);
  if (rc != SQLITE_DONE)
    return replay_fail(db, err, errlen, "cannot store the indexed mark");
  *indexed = top;
  *mid_next = top + 1;
  *mid_batch = top + 1;
  return 0;
}
