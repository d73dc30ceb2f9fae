/* imd's message store on SQLite (the contract is in store.h).
 *
 * Tables (schema version 6, PRAGMA user_version):
 *   msgs    one row per stored message; refs counts the inbox rows that
 *           point at it, so trimming can find orphans without an index on
 *           inbox(mid). idx lists the inbox entries and the key the
 *           message has written behind it (store_index.c); mid is the
 *           store's own counter, so mids only ever grow. No index on id: nothing reads a message by its id
 *           (ids are unique by construction); files made before 2026-12-01
 *           keep the UNIQUE index they have, which costs them one more
 *           B-tree insert per message and changes nothing else.
 *   idem    (uk, device, cid) -> id, the idempotency keys under their
 *           sender's users row. Kept apart
 *           from msgs because a key must outlive its message (store.h: keys
 *           live for keep_age_s, or forever). Expired keys go by a sweep
 *           in key order, a stretch per retention pass.
 *   inbox   (uk, seq) -> mid: the per-user inboxes. The entries still held
 *           for a user are always exactly trimmed+1 .. last_seq; trimming
 *           only ever drops a prefix.
 *   users   uk -> uid, last_seq, trimmed, oldest, and uid -> uk (unique).
 *           uk is the integer the inbox entries and the keys are stored
 *           under: a uid is any string up to imd's limit (a UUID is 36
 *           bytes), and as the key of every inbox entry and key it made
 *           each append compare and write it several times over
 *           (bench/store-bench -U, 36-byte uids: 35-40 us of CPU and 22 KB
 *           written per append keyed by uid, 25-30 us and 15 KB by uk, as
 *           with short uids). A user's row is made with its
 *           first inbox entry or key, in the same transaction.
 *           last_seq is not written by commits: a user's last seq is also
 *           that of its newest inbox entry. It is written for the users a
 *           commit advanced at the next retention pass (which reads it)
 *           and at close. oldest is the ts of the oldest entry held (NULL:
 *           none), indexed: the queue of retention by age. That write
 *           only ever lowers it (or sets a NULL); retention sets it for the
 *           users it trimmed. It may be
 *           older than the entry (then a pass finds nothing to drop and
 *           corrects it), never younger.
 *   cursors (uid, device) -> delivered. Marks wait in memory, one per
 *           (uid, device), until the caller has them written
 *           (sqlstore_marks_write(); imd: every 10 s).
 *   meta    k -> v; 'clean' is 1 while the store is closed after a clean
 *           close (users rows exact), 0 while it is open; 'indexed' is the
 *           mid up to which every message's entries and key are in their
 *           tables (store_index.c). An open that finds
 *           no clean close raises the users rows' last_seq from the inboxes
 *           (one scan) and sets their oldest (one probe per user).
 *
 * Hot path: an append is one INSERT of its message row (and of a users row
 * for a user seen for the first time) and a lookup of its key; its inbox
 * entries and key wait in memory and are written behind it, 32 of a user
 * at a time (store_index.c); a delivered mark is a hash lookup; a
 * batch is one transaction, one commit, one fsync. There is no savepoint
 * per append: what can refuse an append (arguments, a uid listed twice, a
 * duplicate key) is checked before its first write, and an append that
 * fails halfway takes back what it did, so the batch around it
 * survives. The next seq of each user comes from an in-memory counter
 * loaded once from the database. Commits write
 * their WAL frames in a few large writes (store_vfs.c, with fsync on) and
 * leave the checkpoint to another thread where the caller provides one
 * (sqlstore_set_wal_hook(); imd's store thread does). Retention is in
 * store_retention.c (its statements are here, with the schema); what the
 * two files share is store_sqlite_int.h. */
#include "store_sqlite_int.h"

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <sqlite3.h>

#include "core/strmap.h"
#include "store_pcache.h"
#include "store_vfs.h"

/* 2: group membership (grp_members); 3: users rows written lazily, meta
 * (the clean-close mark); 4: users.oldest, no index on the ts of inbox and
 * idem; 5: inbox and idem keyed by the users row's integer (uk), not the
 * uid; 6: msgs.idx, the rows written behind a message. Older files are
 * upgraded on open. */
#define SCHEMA_VERSION 6
#define STR_(x) #x
#define STR(x) STR_(x)
#define ID_MAX 24                /* dup_id size promised by store.h */
#define BUSY_TIMEOUT_MS 5000     /* another process (sqlite3 shell, backup) holding the lock */
/* The page cache. SQLite's own cache walks all its pages in most commits
 * that follow a B-tree split (store_pcache.h), which made a big cache
 * slower than a small one (16 MiB: 35% of the store's CPU in that walk, so
 * it was 2 MiB); store_pcache.c takes the walk out, and a cache that holds
 * the hot inbox pages saves the reads of pages the WAL holds
 * (bench/store-bench -u 20000: ~2 preads per append fewer). */
#define CACHE_SIZE_KIB 32768
/* Appends insert at random places in idem and inbox (keyed by sender and
 * by receiver), so a commit writes about one whole page per row to the WAL.
 * Small pages cut those bytes: 1 KiB wrote under half the volume of 4 KiB
 * pages with ~20% more appends/s. SQLite's smallest, 512 B, writes a third
 * less again for small messages (bench/store-bench -u 20000: 6.2 against
 * 9.4 KiB of WAL per 1:1 append) but twice the pages for a large one, and
 * the checkpoint thread then fell behind a burst of 10 KiB messages
 * (test_store_thread's checkpoints_on_their_thread, 2 of 5 runs, before a
 * commit at the WAL's bound waited for it: store_thread.c). Measured again
 * once the bound held (imd, 1:1 chat at 10,000 and 20,000/s): no less CPU
 * and a worse tail, so 1 KiB it stays.
 * Without a WAL hook the checkpoint runs inside the commit that crosses
 * WAL_CHECKPOINT_BYTES, so that size trades throughput for the longest
 * commit: 32 MiB measured a little faster but stalled commits for 50-80 ms
 * against ~25 ms at 4 MiB (SQLite's default size in bytes). */
#define PAGE_SIZE 1024           /* only takes effect when the file is created */
#define WAL_CHECKPOINT_BYTES (4 * 1024 * 1024)
#define WAL_LIMIT_BYTES (128 * 1024 * 1024) /* truncate the WAL back to this after checkpoints */
#define CACHE_BUCKETS 1024
#define CACHE_MAX (1u << 18)     /* counters kept across commits (sqlstore_commit) */
#define EVICT_MAX 1024           /* counters one commit takes out of the cache, at most */
#define OWED_MAX (1u << 20)      /* users rows evicted counters owe (24 B each), at most */
#define MARKS_MAX (1u << 16)     /* pending delivered marks; one more writes them all first */
/* Inbox entries and keys written behind their messages (store_index.c): a
 * commit writes the rows of each user that has PEND_RIPE of them (about a
 * page of entries), and the oldest while more than PEND_MAX wait (~60 B
 * each). */
#define PEND_RIPE 32
#define PEND_MAX (1u << 17)

/* Each users row's oldest from its inbox: the ts of the first entry after
 * trimmed (NULL when there is none). For all rows at open, for those a
 * retention step trimmed. */
#define OLDEST_SQL                                                                 \
  "UPDATE users SET oldest = (SELECT i.ts FROM inbox AS i WHERE i.uk = users.uk" \
  " AND i.seq > users.trimmed ORDER BY i.seq LIMIT 1)"

/* Every statement the store runs. Only bound parameters carry caller data. */
static const char *const stmt_sql[ST_COUNT] = {
  [ST_BEGIN] = "BEGIN IMMEDIATE",
  [ST_COMMIT] = "COMMIT",
  [ST_ROLLBACK] = "ROLLBACK",
  [ST_SAVEPOINT] = "SAVEPOINT group_change",
  [ST_RELEASE] = "RELEASE group_change",
  [ST_UNDO] = "ROLLBACK TO group_change",
  /* uk, last = max(users.last_seq, newest inbox entry), trimmed; no row
   * when the user has none. The inbox term makes the counter right even if
   * a users row lagged behind its inbox. */
  [ST_USER_GET] =
    "SELECT uk, max(last_seq, coalesce((SELECT max(i.seq) FROM inbox AS i"
    " WHERE i.uk = users.uk), 0)), trimmed FROM users WHERE uid = ?1",
  [ST_USER_NEW] = "INSERT INTO users(uid, last_seq, trimmed) VALUES(?1, 0, 0)",
  /* ?3: the ts of the first append since the counter's row was last
   * written (NULL if none): its oldest entry's if the inbox was empty
   * before it. The earlier of the two is kept, so that rows written out of
   * order (an evicted counter's owed row after its reloaded successor's)
   * never leave oldest younger than the oldest entry. */
  [ST_USER_PUT] =
    "UPDATE users SET last_seq = max(last_seq, ?2),"
    " oldest = min(coalesce(oldest, ?3), coalesce(?3, oldest)) WHERE uk = ?1",
  /* Keys and inbox entries are written behind their messages
   * (store_index.c); OR IGNORE: after a crash, the open wrote some again. */
  [ST_IDEM_PUT] = "INSERT OR IGNORE INTO idem(uk, device, cid, id, ts) VALUES(?1, ?2, ?3, ?4, ?5)",
  [ST_IDEM_GET] = "SELECT id FROM idem WHERE uk = ?1 AND device = ?2 AND cid = ?3",
  /* mid: the store's own counter, so that mids only grow (store_index.c's
   * 'indexed' mark) */
  [ST_MSG_PUT] =
    "INSERT INTO msgs(id, sender, device, cid, to_uid, grp, ts, data, refs, mid, idx)"
    " VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
  [ST_MSG_DEL] = "DELETE FROM msgs WHERE mid = ?1",
  /* a waiting inbox entry as ST_SYNC reads one (?2: its seq) */
  [ST_MSG_GET] = "SELECT ?2, id, sender, device, cid, to_uid, grp, ts, data FROM msgs WHERE mid = ?1",
  [ST_INBOX_PUT] = "INSERT OR IGNORE INTO inbox(uk, seq, mid, ts) VALUES(?1, ?2, ?3, ?4)",
  /* ?3 is already cut to the user's last seq (sqlstore_mark_delivered) */
  [ST_MARK] =
    "INSERT INTO cursors(uid, device, delivered) VALUES(?1, ?2, ?3)"
    " ON CONFLICT(uid, device) DO UPDATE SET delivered = excluded.delivered"
    " WHERE excluded.delivered > cursors.delivered",
  [ST_SYNC] =
    "SELECT i.seq, m.id, m.sender, m.device, m.cid, m.to_uid, m.grp, m.ts, m.data"
    " FROM inbox AS i JOIN msgs AS m ON m.mid = i.mid"
    " WHERE i.uk = ?1 AND i.seq > ?2 ORDER BY i.seq LIMIT ?3",
  [ST_CURSORS] = "SELECT device, delivered FROM cursors WHERE uid = ?1 ORDER BY device",
  /* Retention, set-based. trim_cut gets each user's new trimmed mark: the
   * larger of the count cut (from users alone, no inbox scan) and the age
   * cut. The age cut looks only at the users whose oldest entry has
   * expired (users_oldest), and walks each inbox from its start to the
   * first entry that has not, so the work is proportional to what expired,
   * without an index on the inboxes' ts (two index entries per 1:1
   * message). An entry that a clock stepped back stamped older than the
   * one before it goes when that one goes: what goes is always a prefix. */
  [ST_TRIM_TODO] =
    "INSERT INTO temp.trim_todo(uk, seq) SELECT uk, max(s) FROM ("
    "  SELECT uk, last_seq - ?1 AS s FROM users WHERE ?1 > 0 AND last_seq - trimmed > ?1"
    "  UNION ALL"
    "  SELECT u.uk, coalesce((SELECT i.seq - 1 FROM inbox AS i WHERE i.uk = u.uk"
    "    AND i.seq > u.trimmed AND i.ts >= ?2 ORDER BY i.seq LIMIT 1), u.last_seq) AS s"
    "  FROM users AS u INDEXED BY users_oldest WHERE u.oldest < ?2"
    ") WHERE true GROUP BY uk ON CONFLICT(uk) DO UPDATE SET seq = max(seq, excluded.seq)",
  /* A step takes the first ?1 users of the pass's list and drops at most ?2
   * entries of each (sqlstore_trim_step()); a user whose cut is reached
   * leaves the list. */
  [ST_TRIM_CUT] =
    "INSERT INTO temp.trim_cut(uk, seq)"
    " SELECT t.uk, min(t.seq, u.trimmed + ?2) FROM"
    " (SELECT uk, seq FROM temp.trim_todo ORDER BY uk LIMIT ?1) AS t"
    " CROSS JOIN users AS u ON u.uk = t.uk",
  [ST_TRIM_DONE] =
    "DELETE FROM temp.trim_todo WHERE uk IN (SELECT c.uk FROM temp.trim_cut AS c"
    " CROSS JOIN temp.trim_todo AS t ON t.uk = c.uk WHERE c.seq >= t.seq)",
  [ST_TRIM_LEFT] = "SELECT EXISTS(SELECT 1 FROM temp.trim_todo)",
  [ST_TRIM_GONE] =
    "INSERT INTO temp.trim_gone(uk, seq, mid)"
    " SELECT i.uk, i.seq, i.mid FROM temp.trim_cut AS c CROSS JOIN inbox AS i"
    " WHERE i.uk = c.uk AND i.seq <= c.seq",
  [ST_TRIM_INBOX] = "DELETE FROM inbox WHERE (uk, seq) IN (SELECT uk, seq FROM temp.trim_gone)",
  [ST_TRIM_USERS] =
    "UPDATE users"
    " SET trimmed = max(trimmed, (SELECT c.seq FROM temp.trim_cut AS c WHERE c.uk = users.uk))"
    " WHERE uk IN (SELECT uk FROM temp.trim_cut)",
  [ST_TRIM_OLDEST] = OLDEST_SQL " WHERE uk IN (SELECT uk FROM temp.trim_cut)",
  /* Messages that lost all their references go at once; only the others
   * get their count lowered (most 1:1 messages lose both entries in the
   * same trim, and an update before the delete would be wasted). */
  [ST_TRIM_COUNT] =
    "INSERT INTO temp.trim_refs(mid, n) SELECT mid, count(*) FROM temp.trim_gone GROUP BY mid",
  [ST_TRIM_MSGS] =
    "DELETE FROM msgs WHERE mid IN (SELECT r.mid FROM temp.trim_refs AS r"
    " CROSS JOIN msgs AS m ON m.mid = r.mid WHERE m.refs <= r.n)",
  [ST_TRIM_REFS] =
    "UPDATE msgs SET refs = refs - (SELECT r.n FROM temp.trim_refs AS r WHERE r.mid = msgs.mid)"
    " WHERE mid IN (SELECT mid FROM temp.trim_refs)",
  /* The idempotency keys expire by a sweep in key order instead of an
   * index on their ts (one more index entry per message): each retention
   * pass looks at the next stretch of keys and drops the expired ones.
   * SWEEP_END finds where a stretch of ?4 keys after (?1, ?2, ?3) ends; a
   * BLOB as ?4 of SWEEP stands for the end of the table (a BLOB sorts after
   * every INTEGER). */
  [ST_IDEM_SWEEP_END] =
    "SELECT uk, device, cid FROM idem WHERE (uk, device, cid) > (?1, ?2, ?3)"
    " ORDER BY uk, device, cid LIMIT 1 OFFSET ?4",
  [ST_IDEM_SWEEP] =
    "DELETE FROM idem WHERE (uk, device, cid) > (?1, ?2, ?3)"
    " AND (uk, device, cid) <= (?4, ?5, ?6) AND ts < ?7",
  [ST_TRIM_CLEAR_CUT] = "DELETE FROM temp.trim_cut",
  [ST_TRIM_CLEAR_GONE] = "DELETE FROM temp.trim_gone",
  [ST_TRIM_CLEAR_REFS] = "DELETE FROM temp.trim_refs",
  [ST_GROUP_ADD] = "INSERT INTO grp_members(gid, uid) VALUES(?1, ?2) ON CONFLICT DO NOTHING",
  [ST_GROUP_DEL] = "DELETE FROM grp_members WHERE gid = ?1 AND uid = ?2",
  [ST_GROUP_GET] = "SELECT uid FROM grp_members WHERE gid = ?1 ORDER BY uid",
  [ST_META_PUT] = "INSERT OR REPLACE INTO meta(k, v) VALUES(?1, ?2)",
};

/* The tables schema 5 changed, under a name: the schema's, or the upgrade's
 * new copy. */
#define IDEM_TABLE(name)                  \
  "CREATE TABLE IF NOT EXISTS " name "(" \
  "  uk INTEGER NOT NULL,"                \
  "  device TEXT NOT NULL,"               \
  "  cid TEXT NOT NULL,"                  \
  "  id TEXT NOT NULL,"                   \
  "  ts INTEGER NOT NULL,"                \
  "  PRIMARY KEY(uk, device, cid)) WITHOUT ROWID;"
#define INBOX_TABLE(name)                 \
  "CREATE TABLE IF NOT EXISTS " name "(" \
  "  uk INTEGER NOT NULL,"                \
  "  seq INTEGER NOT NULL,"               \
  "  mid INTEGER NOT NULL,"               \
  "  ts INTEGER NOT NULL,"                \
  "  PRIMARY KEY(uk, seq)) WITHOUT ROWID;"
#define USERS_TABLE(name)                 \
  "CREATE TABLE IF NOT EXISTS " name "(" \
  "  uk INTEGER PRIMARY KEY,"             \
  "  uid TEXT NOT NULL UNIQUE,"           \
  "  last_seq INTEGER NOT NULL,"          \
  "  trimmed INTEGER NOT NULL,"           \
  "  oldest INTEGER);"

/* IF NOT EXISTS throughout so that opening an existing store is a no-op. */
static const char schema_sql[] =
  "CREATE TABLE IF NOT EXISTS msgs("
  "  mid INTEGER PRIMARY KEY,"
  "  id TEXT NOT NULL,"
  "  sender TEXT NOT NULL,"
  "  device TEXT NOT NULL,"
  "  cid TEXT,"
  "  to_uid TEXT,"
  "  grp TEXT,"
  "  ts INTEGER NOT NULL,"
  "  data TEXT NOT NULL,"
  "  refs INTEGER NOT NULL,"
  "  idx BLOB);"
  IDEM_TABLE("idem")
  INBOX_TABLE("inbox")
  USERS_TABLE("users")
  "CREATE TABLE IF NOT EXISTS cursors("
  "  uid TEXT NOT NULL,"
  "  device TEXT NOT NULL,"
  "  delivered INTEGER NOT NULL,"
  "  PRIMARY KEY(uid, device)) WITHOUT ROWID;"
  "CREATE TABLE IF NOT EXISTS grp_members("
  "  gid TEXT NOT NULL,"
  "  uid TEXT NOT NULL,"
  "  PRIMARY KEY(gid, uid)) WITHOUT ROWID;"
  "CREATE TABLE IF NOT EXISTS meta("
  "  k TEXT PRIMARY KEY,"
  "  v INTEGER NOT NULL) WITHOUT ROWID;";

/* From schema 3: users.oldest, and no index on the ts of inbox and idem. */
static const char upgrade_v4_sql[] =
  "ALTER TABLE users ADD COLUMN oldest INTEGER;"
  "DROP INDEX IF EXISTS inbox_ts;"
  "DROP INDEX IF EXISTS idem_ts;";

/* From schema 4: inbox and idem under the users row's integer. Every uid
 * an inbox entry or a key names gets a row (a crash may have left the
 * users rows behind; users_fix_sql then raises their last_seq), and the
 * rows are copied in key order, so each new B-tree is written once from
 * start to end. Costs a pass over both tables, once. */
static const char upgrade_v5_sql[] =
  USERS_TABLE("users_v5")
  "INSERT INTO users_v5(uid, last_seq, trimmed, oldest)"
  " SELECT uid, max(last_seq), max(trimmed), min(oldest) FROM ("
  "  SELECT uid, last_seq, trimmed, oldest FROM users"
  "  UNION ALL SELECT DISTINCT uid, 0, 0, NULL FROM inbox"
  "  UNION ALL SELECT DISTINCT sender, 0, 0, NULL FROM idem"
  " ) WHERE true GROUP BY uid ORDER BY uid;"
  INBOX_TABLE("inbox_v5")
  "INSERT INTO inbox_v5(uk, seq, mid, ts) SELECT u.uk, i.seq, i.mid, i.ts"
  " FROM inbox AS i CROSS JOIN users_v5 AS u ON u.uid = i.uid ORDER BY u.uk, i.seq;"
  IDEM_TABLE("idem_v5")
  "INSERT INTO idem_v5(uk, device, cid, id, ts) SELECT u.uk, k.device, k.cid, k.id, k.ts"
  " FROM idem AS k CROSS JOIN users_v5 AS u ON u.uid = k.sender"
  " ORDER BY u.uk, k.device, k.cid;"
  "DROP TABLE users; DROP TABLE inbox; DROP TABLE idem;"
  "ALTER TABLE users_v5 RENAME TO users;"
  "ALTER TABLE inbox_v5 RENAME TO inbox;"
  "ALTER TABLE idem_v5 RENAME TO idem;";

/* From schema 5: the rows of a message written behind it (store_index.c)
 * are listed in its row. */
static const char upgrade_v6_sql[] = "ALTER TABLE msgs ADD COLUMN idx BLOB;";

/* After the columns exist (a new file, or upgraded above). */
static const char index_sql[] = "CREATE INDEX IF NOT EXISTS users_oldest ON users(oldest);";

/* users.last_seq is written lazily (at retention and at close), so after a
 * crash it may lag behind the inboxes: raise it from them, one scan, when
 * the store was not closed cleanly. (The rows themselves are made with the
 * first entry, so none is missing.) */
static const char users_fix_sql[] =
  "UPDATE users SET last_seq = i.last FROM (SELECT uk, max(seq) AS last FROM inbox GROUP BY uk)"
  " AS i WHERE users.uk = i.uk AND users.last_seq < i.last;";

/* users.oldest from the inboxes (after users_fix_sql, or an upgrade). */
static const char oldest_fix_sql[] = OLDEST_SQL ";";

/* Per-connection scratch tables of retention: trim_todo is the running
 * pass's list of users (store_retention.c); the others are empty between
 * steps. */
static const char temp_sql[] =
  "CREATE TEMP TABLE IF NOT EXISTS trim_todo(uk INTEGER PRIMARY KEY, seq INTEGER NOT NULL);"
  "CREATE TEMP TABLE IF NOT EXISTS trim_cut(uk INTEGER PRIMARY KEY, seq INTEGER NOT NULL);"
  "CREATE TEMP TABLE IF NOT EXISTS trim_gone(uk INTEGER NOT NULL, seq INTEGER NOT NULL,"
  " mid INTEGER NOT NULL);"
  "CREATE TEMP TABLE IF NOT EXISTS trim_refs(mid INTEGER PRIMARY KEY, n INTEGER NOT NULL);";


static int users_flush_alone(sql_store *s, size_t max, bool prepare);
static void marks_drop(sql_store *s);

static uint64_t column_u64(sqlite3_stmt *st, int i)
{
  sqlite3_int64 v = sqlite3_column_int64(st, i);
  return v < 0 ? 0 : (uint64_t)v;
}


/* ---- seq counter cache ---- */

static void cache_drop(sql_store *s)
{
  sqls_index_free(s);
  for (uint32_t b = 0; s->users.buckets != NULL && b <= s->users.mask; b++) {
    strmap_node *n = s->users.buckets[b];
    while (n != NULL) {
      strmap_node *next = n->next;
      free(CTR_OF(n));
      n = next;
    }
    s->users.buckets[b] = NULL;
  }
  s->users.count = 0;
  s->dirty = NULL;
  s->unflushed = NULL;
  s->unflushed_n = 0;
  s->fresh = NULL;
}

/* The open batch is gone: its counters go back to what is durable, and the
 * users rows it made are gone with it (their users get new ones when they
 * need them). */
static void seqs_forget(sql_store *s)
{
  sqls_index_rolled_back(s, true);
  for (user_ctr *u = s->dirty; u != NULL; u = u->dirty_next) {
    u->last = u->durable;
    u->dirty = false;
  }
  s->dirty = NULL;
  for (user_ctr *u = s->fresh; u != NULL; u = u->fresh_next) {
    u->uk = 0;
    u->fresh = false;
  }
  s->fresh = NULL;
}

/* A user's uk (0: no row), last and trimmed as the database has them now,
 * batch included. */
static int user_load(sql_store *s, const char *uid, sqlite3_int64 *uk, uint64_t *last,
                     uint64_t *trimmed)
{
  sqlite3_stmt *st = s->st[ST_USER_GET];
  int rc;

  sqls_bind_text(st, 1, uid);
  rc = sqlite3_step(st);
  if (rc != SQLITE_ROW && rc != SQLITE_DONE) {
    sqls_db_fail(s, "cannot read the user's seq");
    sqlite3_reset(st);
    return IMD_STORE_EIO;
  }
  *uk = rc == SQLITE_ROW ? sqlite3_column_int64(st, 0) : 0;
  *last = rc == SQLITE_ROW ? column_u64(st, 1) : 0;
  if (trimmed != NULL)
    *trimmed = rc == SQLITE_ROW ? column_u64(st, 2) : 0;
  sqlite3_reset(st);
  return IMD_STORE_OK;
}

/* Gives u a users row, inside the open batch, if it has none yet. */
static int user_row(sql_store *s, user_ctr *u)
{
  sqlite3_stmt *st = s->st[ST_USER_NEW];

  if (u->uk != 0)
    return IMD_STORE_OK;
  sqls_bind_text(st, 1, u->uid);
  if (sqls_run(s, ST_USER_NEW, "cannot store the user") != IMD_STORE_OK)
    return IMD_STORE_EIO;
  u->uk = sqlite3_last_insert_rowid(s->db);
  u->fresh = true;
  u->fresh_next = s->fresh;
  s->fresh = u;
  return IMD_STORE_OK;
}

/* The cached counter of uid, loaded on first use. */
static int user_get(sql_store *s, const char *uid, size_t len, user_ctr **out)
{
  strmap_node *n = strmap_get(&s->users, uid, len);
  sqlite3_int64 uk;
  user_ctr *u;
  uint64_t last;
  int rc;

  if (n != NULL) {
    *out = CTR_OF(n);
    (*out)->ref = true;
    return IMD_STORE_OK;
  }
  rc = user_load(s, uid, &uk, &last, NULL);
  if (rc != IMD_STORE_OK)
    return rc;
  u = calloc(1, sizeof *u + len + 1);
  if (u == NULL)
    return sqls_set_err(s, IMD_STORE_EIO, "out of memory");
  memcpy(u->uid, uid, len + 1);
  u->node.key = u->uid;
  u->node.klen = (uint32_t)len;
  u->uk = uk;
  u->last = u->durable = last;
  strmap_put(&s->users, &u->node); /* a failed grow leaves it inserted, just slower */
  *out = u;
  return IMD_STORE_OK;
}

/* ---- batches ---- */

static int batch_begin(sql_store *s)
{
  if (s->batch)
    return IMD_STORE_OK;
  if (sqls_run(s, ST_BEGIN, "cannot begin a batch") != IMD_STORE_OK)
    return IMD_STORE_EIO;
  s->batch = true;
  s->mid_batch = s->mid_next;
  return IMD_STORE_OK;
}

/* After a failed statement: on SQLITE_FULL, IOERR, NOMEM and the like SQLite
 * may have rolled the whole transaction back itself. The counters then count
 * appends that are gone, and the caller, who still believes in the batch,
 * must learn at commit that it failed. */
static void batch_check_lost(sql_store *s)
{
  if (s->batch && sqlite3_get_autocommit(s->db)) {
    s->batch = false;
    s->lost = true;
    memcpy(s->lost_err, s->err, sizeof s->err);
    seqs_forget(s);
  }
}

/* Ends the batch after a failure: roll back what is left of it and take
 * the counters back to the committed state. */
static void batch_abort(sql_store *s)
{
  sqls_rollback(s);
  s->batch = false;
  s->writes = false;
  seqs_forget(s);
  marks_drop(s); /* they may point at seqs handed out again */
}

static int refuse_lost(sql_store *s)
{
  snprintf(s->err, sizeof s->err,
           "the batch was rolled back by an earlier error (%.160s); commit to start over",
           s->lost_err);
  return IMD_STORE_EIO;
}

/* ---- open / close ---- */

static void report(char *err, size_t errlen, const char *what, const char *why)
{
  if (err != NULL && errlen > 0)
    snprintf(err, errlen, "%s%s%s", what, why != NULL ? ": " : "", why != NULL ? why : "");
}

/* The integer a PRAGMA query answers, or -1. */
static int pragma_int(sqlite3 *db, const char *sql)
{
  sqlite3_stmt *st = NULL;
  int v = -1;

  if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) == SQLITE_OK && sqlite3_step(st) == SQLITE_ROW)
    v = sqlite3_column_int(st, 0);
  sqlite3_finalize(st);
  return v;
}

/* Schema under a write lock, so two imd processes racing on a new file do
 * not both create it; refuses files written by a newer schema. */
static int schema_setup(sql_store *s, char *err, size_t errlen)
{
  sqlite3 *db = s->db;
  int version;

  if (sqlite3_exec(db, "BEGIN IMMEDIATE", NULL, NULL, NULL) != SQLITE_OK) {
    report(err, errlen, "cannot lock the store", sqlite3_errmsg(db));
    return -1;
  }
  version = pragma_int(db, "PRAGMA user_version");
  if (version < 0 || version > SCHEMA_VERSION) {
    if (version < 0)
      report(err, errlen, "cannot read the schema version", sqlite3_errmsg(db));
    else
      report(err, errlen, "the store was written by a newer imd (schema version too high)", NULL);
    sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
    return -1;
  }
  /* the users rows after a crash, and users.oldest then and after an
   * upgrade, come from the inboxes */
  bool upgrade = version > 0 && version < SCHEMA_VERSION;
  bool fix = false;
  int rc = sqlite3_exec(db, schema_sql, NULL, NULL, NULL);
  if (rc == SQLITE_OK && upgrade && version < 4)
    rc = sqlite3_exec(db, upgrade_v4_sql, NULL, NULL, NULL);
  if (rc == SQLITE_OK && upgrade && version < 5)
    rc = sqlite3_exec(db, upgrade_v5_sql, NULL, NULL, NULL);
  if (rc == SQLITE_OK && upgrade && version < 6)
    rc = sqlite3_exec(db, upgrade_v6_sql, NULL, NULL, NULL);
  if (rc == SQLITE_OK)
    rc = sqlite3_exec(db, index_sql, NULL, NULL, NULL);
  /* the rows a crash kept from their tables, before anything reads them */
  if (rc == SQLITE_OK && sqls_index_replay(db, &s->indexed, &s->mid_next, &s->mid_batch, err, errlen) != 0) {
    sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
    return -1;
  }
  if (rc == SQLITE_OK &&
      (upgrade || pragma_int(db, "SELECT v FROM meta WHERE k = 'clean'") != 1)) {
    rc = sqlite3_exec(db, users_fix_sql, NULL, NULL, NULL);
    fix = true;
  }
  if (rc == SQLITE_OK && (fix || upgrade))
    rc = sqlite3_exec(db, oldest_fix_sql, NULL, NULL, NULL);
  if (rc != SQLITE_OK ||
      sqlite3_exec(db, "INSERT OR REPLACE INTO meta(k, v) VALUES('clean', 0)", NULL, NULL, NULL) !=
          SQLITE_OK ||
      sqlite3_exec(db, "PRAGMA user_version = " STR(SCHEMA_VERSION), NULL, NULL, NULL) !=
          SQLITE_OK ||
      sqlite3_exec(db, "COMMIT", NULL, NULL, NULL) != SQLITE_OK) {
    report(err, errlen, "cannot create the schema", sqlite3_errmsg(db));
    sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
    return -1;
  }
  return 0;
}

/* WAL lets a commit be one sequential append plus (FULL) one fsync. The
 * page size must be set before WAL mode writes the first page. */
static int pragmas_setup(sqlite3 *db, bool no_fsync, char *err, size_t errlen)
{
  sqlite3_stmt *st = NULL;
  bool wal = false;
  int page_size;
  char sql[192];

  snprintf(sql, sizeof sql, "PRAGMA page_size=%d", PAGE_SIZE);
  sqlite3_exec(db, sql, NULL, NULL, NULL); /* ignored by an existing file */
  if (sqlite3_prepare_v2(db, "PRAGMA journal_mode=WAL", -1, &st, NULL) == SQLITE_OK &&
      sqlite3_step(st) == SQLITE_ROW) {
    const char *mode = sqls_column_str(st, 0);
    wal = mode != NULL && strcmp(mode, "wal") == 0;
  }
  sqlite3_finalize(st);
  if (!wal) {
    report(err, errlen, "cannot switch the store to WAL mode", sqlite3_errmsg(db));
    return -1;
  }
  page_size = pragma_int(db, "PRAGMA page_size");
  if (page_size <= 0) {
    report(err, errlen, "cannot read the page size", sqlite3_errmsg(db));
    return -1;
  }
  /* Only constants go into this text. */
  snprintf(sql, sizeof sql,
           "PRAGMA synchronous=%s; PRAGMA cache_size=-%d; PRAGMA journal_size_limit=%d;"
           " PRAGMA temp_store=MEMORY;"
           " PRAGMA wal_autocheckpoint=%d",
           no_fsync ? "NORMAL" : "FULL", CACHE_SIZE_KIB, WAL_LIMIT_BYTES,
           WAL_CHECKPOINT_BYTES / (page_size + 24));
  if (sqlite3_exec(db, sql, NULL, NULL, NULL) != SQLITE_OK) {
    report(err, errlen, "cannot configure the store", sqlite3_errmsg(db));
    return -1;
  }
  return 0;
}

static int stmts_prepare(sql_store *s, char *err, size_t errlen)
{
  for (int i = 0; i < ST_COUNT; i++) {
    if (sqlite3_prepare_v3(s->db, stmt_sql[i], -1, SQLITE_PREPARE_PERSISTENT, &s->st[i], NULL) !=
        SQLITE_OK) {
      report(err, errlen, "cannot prepare a statement", sqlite3_errmsg(s->db));
      return -1;
    }
  }
  return 0;
}

static pthread_once_t sqlite_once = PTHREAD_ONCE_INIT;

/* Before SQLite's first use in the process: no allocation statistics, which
 * cost a global mutex per allocation (imd reads none of them), and the page
 * cache without the walk per commit (store_pcache.h). Too late if SQLite was
 * already in use: then nothing changes. */
static void sqlite_setup(void)
{
  sqlite3_config(SQLITE_CONFIG_MEMSTATUS, 0);
  storepcache_install();
}

sql_store *sqlstore_open(const char *path, const imd_store_opts *o, char *err, size_t errlen)
{
  sql_store *s;
  int flags = SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX;

  if (path == NULL || path[0] == '\0') {
    report(err, errlen, "no store path", NULL);
    return NULL;
  }
  s = calloc(1, sizeof *s);
  if (s == NULL || strmap_init(&s->users, CACHE_BUCKETS) != 0 ||
      strmap_init(&s->marks, CACHE_BUCKETS) != 0) {
    if (s != NULL) {
      strmap_free(&s->users);
      strmap_free(&s->marks);
    }
    free(s);
    report(err, errlen, "out of memory", NULL);
    return NULL;
  }
  if (o != NULL)
    s->opts = *o;
  s->cache_max = CACHE_MAX;
  s->pend_ripe = PEND_RIPE;
  s->pend_max = PEND_MAX;
  sqls_set_err(s, 0, "no error");
  pthread_once(&sqlite_once, sqlite_setup);
  /* WAL writes coalesced per commit: only where each commit syncs */
  if (sqlite3_open_v2(path, &s->db, flags, s->opts.no_fsync ? NULL : storevfs_name()) !=
      SQLITE_OK) {
    report(err, errlen, "cannot open the store",
           s->db != NULL ? sqlite3_errmsg(s->db) : "out of memory");
    goto fail;
  }
  sqlite3_busy_timeout(s->db, BUSY_TIMEOUT_MS);
  if (pragmas_setup(s->db, s->opts.no_fsync, err, errlen) != 0 ||
      schema_setup(s, err, errlen) != 0)
    goto fail;
  if (sqlite3_exec(s->db, temp_sql, NULL, NULL, NULL) != SQLITE_OK) {
    report(err, errlen, "cannot create the scratch tables", sqlite3_errmsg(s->db));
    goto fail;
  }
  if (stmts_prepare(s, err, errlen) != 0)
    goto fail;
  return s;
fail:
  sqlstore_close(s);
  return NULL;
}

void sqlstore_close(sql_store *s)
{
  if (s == NULL)
    return;
  if (s->db != NULL && !sqlite3_get_autocommit(s->db))
    sqlite3_exec(s->db, "ROLLBACK", NULL, NULL, NULL);
  seqs_forget(s);
  s->batch = s->writes = s->lost = false;
  /* the pending delivered marks, in a transaction of their own */
  if (s->st[ST_COUNT - 1] != NULL && s->marks_list != NULL &&
      sqlstore_marks_write(s) == IMD_STORE_OK)
    sqlstore_commit(s);
  marks_drop(s);
  /* A clean close: the inbox entries and keys are in their tables and the
   * users rows are exact, the next open trusts them. */
  if (s->st[ST_COUNT - 1] != NULL && sqls_index_flush(s) == IMD_STORE_OK &&
      users_flush_alone(s, SIZE_MAX, true) == IMD_STORE_OK)
    sqlite3_exec(s->db, "INSERT OR REPLACE INTO meta(k, v) VALUES('clean', 1)", NULL, NULL, NULL);
  for (int i = 0; i < ST_COUNT; i++)
    sqlite3_finalize(s->st[i]);
  sqlite3_close(s->db);
  cache_drop(s);
  strmap_free(&s->users);
  strmap_free(&s->marks);
  for (int i = 0; i < 2; i++)
    free(s->sweep[i]);
  free(s->owed);
  free(s);
}

const char *sqlstore_error(const sql_store *s)
{
  return s != NULL ? s->err : "no store";
}

bool sqlstore_in_batch(const sql_store *s)
{
  return s != NULL && (s->batch || s->lost);
}

/* ---- append ---- */

static int check_msg(sql_store *s, const imd_store_msg *m)
{
  if (m == NULL || m->id == NULL || m->id[0] == '\0' || m->from == NULL)
    return sqls_set_err(s, IMD_STORE_EINVAL, "message without id or sender");
  if (strlen(m->id) >= ID_MAX)
    return sqls_set_err(s, IMD_STORE_EINVAL, "message id too long");
  if (m->data == NULL && m->data_len > 0)
    return sqls_set_err(s, IMD_STORE_EINVAL, "message data missing");
  if (m->data_len > INT32_MAX || m->ts > INT64_MAX)
    return sqls_set_err(s, IMD_STORE_EINVAL, "message data too large or ts out of range");
  return IMD_STORE_OK;
}

/* If (from, device, cid) is already stored (waiting to be written, or in
 * idem), copies its id to dup_id and returns IMD_STORE_DUP; otherwise
 * returns 0. sender is the key's users row. */
static int idem_find(sql_store *s, const imd_store_msg *m, const char *device,
                     const user_ctr *sender, char *dup_id)
{
  sqlite3_stmt *st = s->st[ST_IDEM_GET];
  const char *id = sqls_index_find_key(sender, device, m->cid);
  int rc;

  if (id != NULL) {
    if (dup_id != NULL)
      snprintf(dup_id, ID_MAX, "%s", id);
    return IMD_STORE_DUP;
  }
  if (sender->uk == 0) /* no row: no key of it was ever written */
    return IMD_STORE_OK;
  sqlite3_bind_int64(st, 1, sender->uk);
  sqls_bind_text(st, 2, device);
  sqls_bind_text(st, 3, m->cid);
  rc = sqlite3_step(st);
  if (rc == SQLITE_DONE) {
    sqlite3_reset(st);
    return IMD_STORE_OK;
  }
  id = rc == SQLITE_ROW ? sqls_column_str(st, 0) : NULL;
  if (id == NULL) {
    sqls_db_fail(s, "cannot look up the idempotency key");
    sqlite3_reset(st);
    return IMD_STORE_EIO;
  }
  if (dup_id != NULL)
    snprintf(dup_id, ID_MAX, "%s", id);
  sqlite3_reset(st);
  return IMD_STORE_DUP;
}

/* Loads the counters of all receivers and picks their next seqs; touches
 * nothing in the database. *touched lists the counters in uids order. */
static int seqs_pick(sql_store *s, const char *const *uids, size_t n, uint64_t *seqs,
                     user_ctr **touched)
{
  uint64_t stamp = ++s->stamp;
  user_ctr **tail = touched;

  *touched = NULL;
  for (size_t i = 0; i < n; i++) {
    size_t len = uids[i] != NULL ? strlen(uids[i]) : 0;
    user_ctr *u;
    int rc;

    if (len == 0 || len > UINT32_MAX)
      return sqls_set_err(s, IMD_STORE_EINVAL, "empty receiver uid");
    rc = user_get(s, uids[i], len, &u);
    if (rc != IMD_STORE_OK)
      return rc;
    if (u->stamp == stamp)
      return sqls_set_err(s, IMD_STORE_EINVAL, "receiver uid listed twice");
    if (u->last >= INT64_MAX)
      return sqls_set_err(s, IMD_STORE_EIO, "seq overflow");
    u->stamp = stamp;
    u->next = u->last + 1;
    u->touch_next = NULL;
    *tail = u;
    tail = &u->touch_next;
    seqs[i] = u->next;
  }
  return IMD_STORE_OK;
}

/* The message row, with the list of its rows written behind it (idx). */
static int msg_insert(sql_store *s, const imd_store_msg *m, const char *device, size_t refs,
                      const unsigned char *idx, size_t idx_len, sqlite3_int64 *mid)
{
  sqlite3_stmt *st = s->st[ST_MSG_PUT];

  sqls_bind_text(st, 1, m->id);
  sqls_bind_text(st, 2, m->from);
  sqls_bind_text(st, 3, device);
  sqls_bind_text(st, 4, m->cid);
  sqls_bind_text(st, 5, m->to);
  sqls_bind_text(st, 6, m->group);
  sqls_bind_u64(st, 7, m->ts);
  /* Explicit length: the bytes go in and come back unchanged. */
  sqlite3_bind_text(st, 8, m->data_len > 0 ? m->data : "", (int)m->data_len, SQLITE_STATIC);
  sqls_bind_u64(st, 9, refs);
  sqlite3_bind_int64(st, 10, s->mid_next);
  sqlite3_bind_blob(st, 11, idx, (int)idx_len, SQLITE_STATIC);
  if (sqls_run(s, ST_MSG_PUT, "cannot store the message") != IMD_STORE_OK)
    return IMD_STORE_EIO;
  *mid = s->mid_next++;
  return IMD_STORE_OK;
}

/* The append's rows are in: hand its seqs out for good. */
static void seqs_take(sql_store *s, user_ctr *touched, uint64_t ts)
{
  for (user_ctr *u = touched; u != NULL; u = u->touch_next) {
    u->last = u->next;
    if (!u->has_first) {
      u->has_first = true;
      u->first_ts = ts;
    }
    if (!u->dirty) {
      u->dirty = true;
      u->dirty_next = s->dirty;
      s->dirty = u;
    }
  }
}

/* What a failed append did before it failed (users rows it made stay: a
 * row without entries is a user that has none yet). */
typedef struct append_done {
  user_ctr *sender;        /* the key's users row (NULL: no key added) */
  bool msg;
  sqlite3_int64 mid;
  size_t inbox;            /* inbox entries added, in uids order */
} append_done;

/* Takes back what a failed append did: its entries and key wait in memory,
 * its message row is deleted. There is no savepoint around an append (it
 * would copy every page the append touches a second time): the rare
 * failure pays instead. The counters were not advanced yet. If SQLite
 * lost the whole batch, or the delete fails too, the batch is over and the
 * next commit reports it. The append's own error stays in s->err. */
static void append_undo(sql_store *s, user_ctr *touched, const append_done *d)
{
  user_ctr *u = touched;
  char why[ERR_MAX];
  int rc = IMD_STORE_OK;

  if (d->sender != NULL)
    sqls_index_unadd(s, d->sender);
  for (size_t i = 0; i < d->inbox; i++, u = u->touch_next)
    sqls_index_unadd(s, u);
  batch_check_lost(s);
  if (!s->batch)
    return;
  memcpy(why, s->err, sizeof why);
  if (d->msg) {
    sqlite3_bind_int64(s->st[ST_MSG_DEL], 1, d->mid);
    rc = sqls_run(s, ST_MSG_DEL, "cannot undo the append");
    if (rc == IMD_STORE_OK)
      s->mid_next--; /* the mid is free again: mids stay dense */
  }
  if (rc != IMD_STORE_OK) {
    batch_abort(s); /* never leave half an append in a batch that commits */
    s->lost = true;
    memcpy(s->lost_err, s->err, sizeof s->err);
  }
  memcpy(s->err, why, sizeof why);
}

/* The sender of a message with a key, its users row made now if it has
 * none (then no key of it can exist yet); IMD_STORE_DUP when the key is
 * stored already. */
static int key_sender(sql_store *s, const imd_store_msg *m, const char *device, char *dup_id,
                      user_ctr **sender)
{
  size_t len = strlen(m->from);
  int rc;

  if (len == 0 || len > UINT32_MAX)
    return sqls_set_err(s, IMD_STORE_EINVAL, "empty sender uid");
  rc = user_get(s, m->from, len, sender);
  if (rc == IMD_STORE_OK)
    rc = idem_find(s, m, device, *sender, dup_id);
  if (rc == IMD_STORE_OK)
    rc = user_row(s, *sender);
  return rc;
}

/* The writes of one append: the key looked up first (a duplicate writes
 * nothing), the users rows of receivers that had none, the message row,
 * then one inbox entry per receiver (touched, in uids order) and the key,
 * which wait in memory to be written behind it (store_index.c). */
static int append_rows(sql_store *s, const imd_store_msg *m, const char *device,
                       user_ctr *touched, size_t n, const uint64_t *seqs, char *dup_id,
                       append_done *d)
{
  unsigned char small[256], *idx = small;
  user_ctr *sender = NULL;
  size_t idx_len;
  int rc = IMD_STORE_OK;

  if (m->cid != NULL)
    rc = key_sender(s, m, device, dup_id, &sender);
  for (user_ctr *u = touched; rc == IMD_STORE_OK && u != NULL; u = u->touch_next)
    rc = user_row(s, u);
  if (rc != IMD_STORE_OK)
    return rc;
  if (sqls_index_encoded_max(n) > sizeof small && (idx = malloc(sqls_index_encoded_max(n))) == NULL)
    return sqls_set_err(s, IMD_STORE_EIO, "out of memory");
  idx_len = sqls_index_encode(idx, sender != NULL ? sender->uk : 0, touched, seqs);
  rc = msg_insert(s, m, device, n, idx, idx_len, &d->mid);
  if (idx != small)
    free(idx);
  d->msg = rc == IMD_STORE_OK;
  for (user_ctr *u = touched; rc == IMD_STORE_OK && u != NULL; u = u->touch_next) {
    rc = sqls_index_entry(s, u, seqs[d->inbox], d->mid, m->ts);
    if (rc == IMD_STORE_OK)
      d->inbox++;
  }
  if (rc == IMD_STORE_OK && sender != NULL) {
    rc = sqls_index_key(s, sender, device, m->cid, m->id, d->mid, m->ts);
    if (rc == IMD_STORE_OK)
      d->sender = sender;
  }
  return rc;
}

int sqlstore_append(sql_store *s, const imd_store_msg *m, const char *const *uids, size_t n,
                     uint64_t *seqs, char *dup_id)
{
  user_ctr *touched = NULL;
  append_done done = {0};
  const char *device;
  int rc;

  if (s == NULL)
    return IMD_STORE_EINVAL;
  if (uids == NULL || n == 0 || seqs == NULL)
    return sqls_set_err(s, IMD_STORE_EINVAL, "no receivers");
  rc = check_msg(s, m);
  if (rc != IMD_STORE_OK)
    return rc;
  if (s->lost)
    return refuse_lost(s);
  rc = batch_begin(s);
  if (rc != IMD_STORE_OK)
    return rc;
  device = m->device != NULL ? m->device : "";
  /* Everything that can refuse the append without SQLite's help is checked
   * before the first write. */
  rc = seqs_pick(s, uids, n, seqs, &touched);
  if (rc == IMD_STORE_OK)
    rc = append_rows(s, m, device, touched, n, seqs, dup_id, &done);
  if (rc == IMD_STORE_OK) {
    s->writes = true;
    seqs_take(s, touched, m->ts);
  } else if (rc == IMD_STORE_DUP) {
    memset(seqs, 0, n * sizeof *seqs); /* a duplicate takes no seqs */
  } else if (rc == IMD_STORE_EIO) {
    append_undo(s, touched, &done);
  }
  return rc;
}

/* ---- delivered marks ---- */

/* Raises the pending mark of key (klen bytes, "uid NUL device") to seq,
 * or adds it. */
static int mark_raise(sql_store *s, const char *key, size_t klen, uint64_t seq)
{
  strmap_node *n = strmap_get(&s->marks, key, klen);
  mark_pend *p;
  int rc;

  if (n != NULL) {
    p = MARK_OF(n);
    if (seq > p->seq)
      p->seq = seq;
    return IMD_STORE_OK;
  }
  if (s->marks.count >= MARKS_MAX && (rc = sqlstore_marks_write(s)) != IMD_STORE_OK)
    return rc;
  p = malloc(sizeof *p + klen + 1);
  if (p == NULL)
    return sqls_set_err(s, IMD_STORE_EIO, "out of memory");
  memcpy(p->key, key, klen + 1);
  p->seq = seq;
  p->node.key = p->key;
  p->node.klen = (uint32_t)klen;
  p->next = s->marks_list;
  s->marks_list = p;
  strmap_put(&s->marks, &p->node); /* a failed grow leaves it inserted, just slower */
  return IMD_STORE_OK;
}

/* Acks come once per message and device; one UPSERT each was a random
 * B-tree write, and a WAL page, per message (7 of 44 us per append in
 * bench/store-bench -c -m). So a mark only raises its (uid, device) entry
 * in memory, and sqlstore_marks_write() writes each entry once, when the
 * caller decides (imd's store thread: within MARK_DELAY_MS). */
int sqlstore_mark_delivered(sql_store *s, const char *uid, const char *device, uint64_t seq)
{
  user_ctr *u;
  size_t len, dlen, klen;
  int rc;

  if (s == NULL)
    return IMD_STORE_EINVAL;
  len = uid != NULL ? strlen(uid) : 0;
  dlen = device != NULL ? strlen(device) : 0;
  if (len == 0 || len > UINT32_MAX / 4 || device == NULL || dlen > UINT32_MAX / 4 ||
      seq > INT64_MAX)
    return sqls_set_err(s, IMD_STORE_EINVAL, "bad uid, device or seq");
  if (s->lost)
    return refuse_lost(s);
  /* A client's ack cannot move its device past what was stored: the mark
   * is cut to the user's last seq, from the counter (the open batch's
   * appends included; an honest client acks only what it was sent, which
   * was committed first). */
  rc = user_get(s, uid, len, &u);
  if (rc != IMD_STORE_OK) {
    batch_check_lost(s);
    return rc;
  }
  if (seq > u->last)
    seq = u->last;
  klen = len + 1 + dlen;
  /* the key "uid NUL device": imd's names fit the stack buffer; longer
   * ones (the API takes any length) go to the heap, never into a stack
   * array of their size */
  char stack_key[256];
  char *key = klen < sizeof stack_key ? stack_key : malloc(klen + 1);
  if (key == NULL)
    return sqls_set_err(s, IMD_STORE_EIO, "out of memory");
  memcpy(key, uid, len + 1);
  memcpy(key + len + 1, device, dlen + 1);
  rc = mark_raise(s, key, klen, seq);
  if (key != stack_key)
    free(key);
  return rc;
}

size_t sqlstore_marks_pending(const sql_store *s)
{
  return s != NULL ? s->marks.count : 0;
}

/* Forget the pending marks (written, or lost with a failed write). */
static void marks_drop(sql_store *s)
{
  for (mark_pend *p = s->marks_list, *next; p != NULL; p = next) {
    next = p->next;
    strmap_del(&s->marks, &p->node);
    free(p);
  }
  s->marks_list = NULL;
}

int sqlstore_marks_write(sql_store *s)
{
  sqlite3_stmt *st;
  int rc = IMD_STORE_OK;

  if (s == NULL)
    return IMD_STORE_EINVAL;
  if (s->marks_list == NULL)
    return IMD_STORE_OK;
  if (s->lost)
    return refuse_lost(s);
  rc = batch_begin(s);
  st = s->st[ST_MARK];
  for (mark_pend *p = s->marks_list; p != NULL && rc == IMD_STORE_OK; p = p->next) {
    sqls_bind_text(st, 1, p->key);
    sqls_bind_text(st, 2, p->key + strlen(p->key) + 1);
    sqls_bind_u64(st, 3, p->seq);
    rc = sqls_run(s, ST_MARK, "cannot store the delivered marks");
  }
  if (rc != IMD_STORE_OK)
    batch_check_lost(s); /* a single statement undoes itself otherwise */
  marks_drop(s);        /* a mark that failed is lost: its device resyncs more */
  return rc;
}

/* ---- groups ---- */

/* Undoes a failed group change alone (group changes are rare: they keep
 * their savepoint). */
static void group_undo(sql_store *s)
{
  batch_check_lost(s);
  if (!s->batch)
    return;
  if (sqlite3_step(s->st[ST_UNDO]) != SQLITE_DONE) {
    sqlite3_reset(s->st[ST_UNDO]);
    batch_abort(s); /* cannot happen in practice; never leave half a change */
    s->lost = true;
    memcpy(s->lost_err, s->err, sizeof s->err);
    return;
  }
  sqlite3_reset(s->st[ST_UNDO]);
  sqlite3_step(s->st[ST_RELEASE]);
  sqlite3_reset(s->st[ST_RELEASE]);
}

static int group_rows(sql_store *s, enum stmt_id id, const char *gid, const char *const *uids,
                      size_t n)
{
  sqlite3_stmt *st = s->st[id];

  for (size_t i = 0; i < n; i++) {
    if (uids[i] == NULL || uids[i][0] == '\0')
      return sqls_set_err(s, IMD_STORE_EINVAL, "empty member uid");
    sqls_bind_text(st, 1, gid);
    sqls_bind_text(st, 2, uids[i]);
    if (sqls_run(s, id, "cannot change the group") != IMD_STORE_OK)
      return IMD_STORE_EIO;
  }
  return IMD_STORE_OK;
}

int sqlstore_group_update(sql_store *s, const char *gid, const char *const *add, size_t nadd,
                          const char *const *rm, size_t nrm)
{
  int rc;

  if (s == NULL)
    return IMD_STORE_EINVAL;
  if (gid == NULL || gid[0] == '\0')
    return sqls_set_err(s, IMD_STORE_EINVAL, "empty gid");
  if (s->lost)
    return refuse_lost(s);
  rc = batch_begin(s);
  if (rc != IMD_STORE_OK)
    return rc;
  if (sqls_run(s, ST_SAVEPOINT, "cannot begin the group change") != IMD_STORE_OK) {
    batch_check_lost(s);
    return IMD_STORE_EIO;
  }
  rc = group_rows(s, ST_GROUP_ADD, gid, add, nadd);
  if (rc == IMD_STORE_OK)
    rc = group_rows(s, ST_GROUP_DEL, gid, rm, nrm);
  if (rc == IMD_STORE_OK && sqls_run(s, ST_RELEASE, "cannot end the group change") == IMD_STORE_OK) {
    s->writes = true;
    return IMD_STORE_OK;
  }
  if (rc == IMD_STORE_OK)
    rc = IMD_STORE_EIO;
  group_undo(s);
  return rc;
}

int sqlstore_group_members(sql_store *s, const char *gid,
                           void (*fn)(void *ctx, const char *uid), void *ctx)
{
  sqlite3_stmt *st;
  int rc = IMD_STORE_OK, step;

  if (s == NULL || gid == NULL)
    return IMD_STORE_EINVAL;
  st = s->st[ST_GROUP_GET];
  sqls_bind_text(st, 1, gid);
  while ((step = sqlite3_step(st)) == SQLITE_ROW) {
    const char *uid = sqls_column_str(st, 0);
    if (uid == NULL) {
      step = SQLITE_NOMEM;
      break;
    }
    fn(ctx, uid);
  }
  if (step != SQLITE_DONE)
    rc = sqls_db_fail(s, "cannot read the group");
  sqlite3_reset(st);
  return rc;
}

/* ---- checkpoints ---- */

struct sql_ckpt {
  sqlite3 *db;
  uint64_t frame_bytes;
};

/* After each commit, with the WAL's size. Checkpointing here is allowed
 * (SQLite's own autocheckpoint does it from the same hook). */
static int wal_hook(void *arg, sqlite3 *db, const char *name, int frames)
{
  sql_store *s = arg;
  int log = 0, copied = 0, rc;

  if (frames > 0 && s->wal_fn(s->wal_ctx, (uint64_t)frames * s->frame_bytes, s->ckpt_behind)) {
    rc = sqlite3_wal_checkpoint_v2(db, name, SQLITE_CHECKPOINT_PASSIVE, &log, &copied);
    s->ckpt_behind = rc != SQLITE_OK || copied < log; /* busy: the other thread's pass */
  }
  return SQLITE_OK;
}

void sqlstore_set_wal_hook(sql_store *s, sqlstore_wal_fn fn, void *ctx)
{
  int page_size = pragma_int(s->db, "PRAGMA page_size");

  s->wal_fn = fn;
  s->wal_ctx = ctx;
  s->frame_bytes = (uint64_t)(page_size > 0 ? page_size : PAGE_SIZE) + 24;
  if (fn != NULL) {
    sqlite3_wal_hook(s->db, wal_hook, s);
  } else {
    sqlite3_wal_autocheckpoint(s->db, (int)(WAL_CHECKPOINT_BYTES / s->frame_bytes));
  }
}

sql_ckpt *sqlstore_ckpt_open(const char *path, const imd_store_opts *o, char *err, size_t errlen)
{
  bool no_fsync = o != NULL && o->no_fsync;
  sql_ckpt *c = calloc(1, sizeof *c);

  if (c == NULL) {
    report(err, errlen, "out of memory", NULL);
    return NULL;
  }
  if (sqlite3_open_v2(path, &c->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX,
                      no_fsync ? NULL : storevfs_name()) != SQLITE_OK ||
      sqlite3_exec(c->db, no_fsync ? "PRAGMA synchronous=NORMAL" : "PRAGMA synchronous=FULL",
                   NULL, NULL, NULL) != SQLITE_OK) {
    report(err, errlen, "cannot open the store for checkpoints",
           c->db != NULL ? sqlite3_errmsg(c->db) : "out of memory");
    sqlstore_ckpt_close(c);
    return NULL;
  }
  /* this connection only checkpoints: no autocheckpoint of its own */
  sqlite3_wal_autocheckpoint(c->db, 0);
  int page_size = pragma_int(c->db, "PRAGMA page_size");
  c->frame_bytes = (uint64_t)(page_size > 0 ? page_size : PAGE_SIZE) + 24;
  return c;
}

int sqlstore_ckpt_run(sql_ckpt *c, uint64_t *copied_bytes, char *err, size_t errlen)
{
  int log = 0, copied = 0;
  int rc = sqlite3_wal_checkpoint_v2(c->db, NULL, SQLITE_CHECKPOINT_PASSIVE, &log, &copied);

  *copied_bytes = copied > 0 ? (uint64_t)copied * c->frame_bytes : 0;
  /* busy: another checkpoint runs; interrupt: sqlstore_ckpt_interrupt() */
  if (rc == SQLITE_OK || rc == SQLITE_BUSY || rc == SQLITE_INTERRUPT)
    return IMD_STORE_OK;
  report(err, errlen, "checkpoint failed", sqlite3_errmsg(c->db));
  return IMD_STORE_EIO;
}

void sqlstore_ckpt_interrupt(sql_ckpt *c)
{
  if (c != NULL)
    sqlite3_interrupt(c->db);
}

void sqlstore_ckpt_close(sql_ckpt *c)
{
  if (c == NULL)
    return;
  sqlite3_close(c->db);
  free(c);
}

/* ---- commit ---- */

/* A users row (a committed append made it), inside the caller's
 * transaction; only raises last_seq and only lowers oldest (or sets a
 * NULL one), so rows written twice or out of order (an evicted counter's,
 * then its next one's) end the same. */
static int user_put(sql_store *s, sqlite3_int64 uk, uint64_t durable, bool has_first,
                    uint64_t first_ts)
{
  sqlite3_stmt *st = s->st[ST_USER_PUT];

  sqlite3_bind_int64(st, 1, uk);
  sqls_bind_u64(st, 2, durable);
  if (has_first)
    sqls_bind_u64(st, 3, first_ts);
  else
    sqlite3_bind_null(st, 3);
  return sqls_run(s, ST_USER_PUT, "cannot store the user's seq");
}

static void unflushed_unlink(sql_store *s, user_ctr *u)
{
  if (u->flush_prev != NULL)
    u->flush_prev->flush_next = u->flush_next;
  else
    s->unflushed = u->flush_next;
  if (u->flush_next != NULL)
    u->flush_next->flush_prev = u->flush_prev;
  u->flush_next = u->flush_prev = NULL;
  u->unflushed = false;
  u->has_first = false;
  s->unflushed_n--;
}

/* Appends an owed row; false without memory. */
static bool owe(sql_store *s, sqlite3_int64 uk, uint64_t durable, bool has_first, uint64_t first_ts)
{
  if (s->owed_n == s->owed_cap) {
    size_t cap = s->owed_cap ? s->owed_cap * 2 : 1024;
    user_owed *o = realloc(s->owed, cap * sizeof *o);
    if (o == NULL)
      return false;
    s->owed = o;
    s->owed_cap = cap;
  }
  s->owed[s->owed_n++] = (user_owed){uk, durable, first_ts, has_first};
  s->owed_sorted = false;
  return true;
}

/* Counter u's users row becomes an owed one (u is then up to date);
 * false without memory, u unchanged. */
static bool owe_counter(sql_store *s, user_ctr *u)
{
  if (!owe(s, u->uk, u->durable, u->has_first, u->first_ts))
    return false;
  unflushed_unlink(s, u);
  return true;
}

static int owed_cmp(const void *a, const void *b)
{
  sqlite3_int64 x = ((const user_owed *)a)->uk, y = ((const user_owed *)b)->uk;
  return (x > y) - (x < y);
}

/* Before a flush: the unflushed counters' rows join the owed ones, sorted
 * by uk with one row per user, so that a flush step writes neighbouring
 * rows (a few pages) instead of one random page per row (bench/store-bench
 * -u 1000000 -a: retention 52 s unsorted). Without memory the counters stay
 * where they are and are written after the owed rows. */
static void owed_prepare(sql_store *s)
{
  /* a counter with entries waiting stays: users_flush() writes them with
   * its row */
  for (user_ctr *u = s->unflushed, *next; u != NULL; u = next) {
    next = u->flush_next;
    if (u->pend_n == 0 && !owe_counter(s, u))
      break;
  }
  if (s->owed_sorted || s->owed_n < 2) /* (none: owed may be NULL) */
    return;
  qsort(s->owed, s->owed_n, sizeof *s->owed, owed_cmp);
  size_t k = 0;
  for (size_t i = 0; i < s->owed_n; i++) {
    user_owed *o = &s->owed[i], *last = k > 0 ? &s->owed[k - 1] : NULL;
    if (last == NULL || last->uk != o->uk) {
      s->owed[k++] = *o;
      continue;
    }
    if (o->durable > last->durable)
      last->durable = o->durable;
    if (o->has_first && (!last->has_first || o->first_ts < last->first_ts)) {
      last->has_first = true;
      last->first_ts = o->first_ts;
    }
  }
  s->owed_n = k;
  s->owed_sorted = true;
}

/* Writes the users rows that are behind (the first max of them: owed rows,
 * then advanced counters), inside the caller's transaction. Commits do not
 * write users rows: a user's last seq is also its newest inbox entry's,
 * which the commit made durable. Retention reads last_seq, so it flushes
 * first (in steps: sqlstore_users_flush_step()); so does close. */
static int users_flush(sql_store *s, size_t max, bool prepare)
{
  size_t n = 0;

  if (prepare)
    owed_prepare(s);
  for (size_t i = s->owed_n; i > 0 && n < max; i--, n++) {
    const user_owed *o = &s->owed[i - 1];
    if (user_put(s, o->uk, o->durable, o->has_first, o->first_ts) != IMD_STORE_OK)
      return IMD_STORE_EIO;
  }
  /* retention trims up to last_seq: the entries up to it go in first */
  for (user_ctr *u = s->unflushed; u != NULL && n < max; u = u->flush_next, n++)
    if (sqls_index_write_user(s, u) != IMD_STORE_OK ||
        user_put(s, u->uk, u->durable, u->has_first, u->first_ts) != IMD_STORE_OK)
      return IMD_STORE_EIO;
  return IMD_STORE_OK;
}

int sqls_users_flush(sql_store *s, size_t max)
{
  return users_flush(s, max, true);
}

/* The transaction holding sqls_users_flush(s, max) committed. */
void sqls_users_flushed(sql_store *s, size_t max)
{
  size_t n = s->owed_n < max ? s->owed_n : max;

  s->owed_n -= n;
  for (; s->unflushed != NULL && n < max; n++)
    unflushed_unlink(s, s->unflushed);
  sqls_index_written(s);
}

/* A users flush of the first max rows in a transaction of its own (no
 * batch open); prepare: sorted and merged first (owed_prepare()). */
static int users_flush_alone(sql_store *s, size_t max, bool prepare)
{
  if (s->unflushed == NULL && s->owed_n == 0)
    return IMD_STORE_OK;
  if (sqls_run(s, ST_BEGIN, "cannot begin the flush") != IMD_STORE_OK)
    return IMD_STORE_EIO;
  if (users_flush(s, max, prepare) != IMD_STORE_OK ||
      sqls_run(s, ST_COMMIT, "cannot commit the flush") != IMD_STORE_OK) {
    sqls_rollback(s);
    sqls_index_rolled_back(s, false); /* the entries it wrote still wait */
    return IMD_STORE_EIO;
  }
  sqls_users_flushed(s, max);
  return IMD_STORE_OK;
}

void sqlstore_set_cache_max(sql_store *s, size_t max)
{
  if (s != NULL)
    s->cache_max = max;
}

size_t sqlstore_users_cached(const sql_store *s)
{
  return s != NULL ? s->users.count : 0;
}

size_t sqlstore_users_unflushed(const sql_store *s)
{
  return s != NULL ? s->unflushed_n + s->owed_n : 0;
}

size_t sqlstore_index_pending(const sql_store *s)
{
  return s != NULL ? s->pend_total : 0;
}

int sqlstore_index_flush(sql_store *s)
{
  if (s == NULL)
    return IMD_STORE_EINVAL;
  if (s->batch || s->lost)
    return sqls_set_err(s, IMD_STORE_EBATCH, "a batch is open; commit first");
  return sqls_index_flush(s);
}

void sqlstore_set_index_limits(sql_store *s, size_t ripe, size_t max)
{
  if (s != NULL) {
    s->pend_ripe = ripe > 0 ? ripe : 1;
    s->pend_max = max;
  }
}

int sqlstore_users_flush_step(sql_store *s, size_t max)
{
  if (s == NULL)
    return IMD_STORE_EINVAL;
  if (s->batch || s->lost)
    return sqls_set_err(s, IMD_STORE_EBATCH, "a batch is open; commit first");
  return users_flush_alone(s, max, true);
}

/* The batch committed: its counters are durable. */
static void seqs_commit(sql_store *s)
{
  for (user_ctr *u = s->fresh; u != NULL; u = u->fresh_next)
    u->fresh = false; /* their rows are durable */
  s->fresh = NULL;
  for (user_ctr *u = s->dirty; u != NULL; u = u->dirty_next) {
    u->dirty = false;
    u->durable = u->last;
    if (!u->unflushed) {
      u->unflushed = true;
      u->flush_prev = NULL;
      u->flush_next = s->unflushed;
      if (s->unflushed != NULL)
        s->unflushed->flush_prev = u;
      s->unflushed = u;
      s->unflushed_n++;
    }
  }
  s->dirty = NULL;
}

/* Takes counter u out of the cache. A users row it still owes is kept
 * (24 bytes instead of the counter) for the next flush; without room for
 * it, u stays. */
static void evict_one(sql_store *s, user_ctr *u)
{
  if (u->unflushed && !owe_counter(s, u))
    return;
  strmap_del(&s->users, &u->node);
  free(u);
}

/* The counters are a cache of the database, at most CACHE_MAX of them.
 * Past that, each commit takes out as many as are over (at most
 * EVICT_MAX): a clock hand goes round the buckets, skips the counters the
 * open batch uses and gives those used since it last passed a second
 * chance. Nothing is written: an evicted counter's owed users row waits
 * with the others for the next flush (a users row only serves retention;
 * a counter reloaded meanwhile takes its last seq from the inbox). Before,
 * the whole cache was written and dropped at once past the cap
 * (bench/store-bench -u 1000000: a commit of 1.9 s); writing each victim's
 * row in the commit that evicted it cost ~60 % more CPU per append there
 * (a random page each). */
static void evict(sql_store *s)
{
  size_t want = s->users.count - s->cache_max, n = 0, looked = 0;

  if (want > EVICT_MAX)
    want = EVICT_MAX;
  while (n < want && looked < s->users.count) {
    uint32_t b = s->evict_hand++ & s->users.mask;
    for (strmap_node *x = s->users.buckets[b], *next; x != NULL; x = next, looked++) {
      user_ctr *u = CTR_OF(x);
      next = x->next;
      if (u->dirty || u->fresh || u->pend_n > 0) /* (rows waiting: kept till written) */
        continue;
      if (u->ref) {
        u->ref = false;
        continue;
      }
      evict_one(s, u);
      n++;
    }
  }
}

int sqlstore_commit(sql_store *s)
{
  if (s == NULL)
    return IMD_STORE_EINVAL;
  if (s->lost) {
    s->lost = false;
    s->writes = false;
    marks_drop(s);
    return refuse_lost(s);
  }
  if (!s->batch)
    return IMD_STORE_OK;
  if (sqls_index_commit(s) != IMD_STORE_OK ||
      sqls_run(s, ST_COMMIT, "cannot commit") != IMD_STORE_OK) {
    batch_abort(s);
    return IMD_STORE_EIO;
  }
  s->batch = false;
  s->writes = false;
  s->mid_batch = s->mid_next; /* outside a batch the two are equal */
  sqls_index_written(s);
  seqs_commit(s);
  if (s->users.count > s->cache_max)
    evict(s);
  /* owed rows are normally written by retention's flush steps (imd: every
   * 60 s); a caller that never runs them is bounded here */
  if (s->owed_n > OWED_MAX)
    users_flush_alone(s, EVICT_MAX, false); /* the newest, unsorted: no sort per commit */
  return IMD_STORE_OK;
}

/* ---- reads ---- */

static int check_read(sql_store *s, const char *uid)
{
  if (uid == NULL || uid[0] == '\0')
    return sqls_set_err(s, IMD_STORE_EINVAL, "empty uid");
  /* delivered marks alone may stay uncommitted: reads see them, and no
   * message is visible before it is durable */
  if (s->writes || s->lost)
    return sqls_set_err(s, IMD_STORE_EBATCH, "a batch is open; commit first");
  return IMD_STORE_OK;
}

/* Passes one row to fn (its strings live until the statement steps again).
 * Returns 0 to go on, 1 when fn asked to stop, IMD_STORE_EIO when the row
 * could not be read. */
static int sync_row(sql_store *s, sqlite3_stmt *st, imd_store_each fn, void *ctx, uint64_t *upto)
{
  imd_store_msg m;
  uint64_t seq = column_u64(st, 0);
  const char *data = sqls_column_str(st, 8);

  m.id = sqls_column_str(st, 1);
  m.from = sqls_column_str(st, 2);
  m.device = sqls_column_str(st, 3);
  m.cid = sqls_column_str(st, 4);
  m.to = sqls_column_str(st, 5);
  m.group = sqls_column_str(st, 6);
  m.ts = column_u64(st, 7);
  m.data = data != NULL ? data : "";
  m.data_len = (size_t)sqlite3_column_bytes(st, 8);
  /* NULL for a NOT NULL column means SQLite ran out of memory converting it. */
  if (m.id == NULL || m.from == NULL || m.device == NULL || (data == NULL && m.data_len > 0))
    return sqls_set_err(s, IMD_STORE_EIO, "out of memory reading the inbox");
  *upto = seq;
  return fn != NULL && fn(ctx, seq, &m) != 0 ? 1 : 0;
}

/* The counter of uid if it is cached (it is while rows of it wait). */
static const user_ctr *user_cached(const sql_store *s, const char *uid)
{
  strmap_node *n = strmap_get(&s->users, uid, strlen(uid));
  return n != NULL ? CTR_OF(n) : NULL;
}

/* A user's state for a read: the database's, and the counter's last seq
 * (no batch with appends is open) for entries that wait to be written. */
static int user_read(sql_store *s, const char *uid, sqlite3_int64 *uk, uint64_t *last,
                     uint64_t *trimmed, const user_ctr **u)
{
  int rc = user_load(s, uid, uk, last, trimmed);

  *u = user_cached(s, uid);
  if (rc == IMD_STORE_OK && *u != NULL && (*u)->durable > *last)
    *last = (*u)->durable;
  return rc;
}

/* sqlstore_sync() over the entries that wait in memory. */
typedef struct sync_pend {
  sql_store *s;
  imd_store_each fn;
  void *ctx;
  uint64_t *upto;
  sqlite3_int64 left;      /* entries still wanted (-1: no limit) */
} sync_pend;

static int sync_pend_row(void *arg, const pend_row *r)
{
  sync_pend *p = arg;
  sqlite3_stmt *st = p->s->st[ST_MSG_GET];
  int rc, step;

  if (p->left == 0)
    return 1;
  sqlite3_bind_int64(st, 1, r->mid);
  sqls_bind_u64(st, 2, r->seq);
  step = sqlite3_step(st);
  if (step == SQLITE_ROW)
    rc = sync_row(p->s, st, p->fn, p->ctx, p->upto);
  else
    rc = sqls_db_fail(p->s, "cannot read the message of an inbox entry");
  sqlite3_reset(st);
  if (p->left > 0)
    p->left--;
  return rc;
}

int sqlstore_sync(sql_store *s, const char *uid, uint64_t since, uint32_t limit,
                   imd_store_each fn, void *ctx, imd_sync_info *info)
{
  sqlite3_stmt *st;
  sqlite3_int64 uk;
  const user_ctr *u;
  imd_sync_info r = {0};
  sync_pend p = {s, fn, ctx, &r.upto, limit > 0 ? (sqlite3_int64)limit : -1};
  int rc, step;

  if (s == NULL)
    return IMD_STORE_EINVAL;
  rc = check_read(s, uid);
  if (rc == IMD_STORE_OK)
    rc = user_read(s, uid, &uk, &r.last, &r.trimmed, &u);
  if (rc != IMD_STORE_OK)
    return rc;
  if (since > INT64_MAX)
    since = INT64_MAX;
  r.gap = since < r.trimmed;
  r.upto = since > r.trimmed ? since : r.trimmed;

  st = s->st[ST_SYNC];
  sqlite3_bind_int64(st, 1, uk); /* 0: no row, no entries */
  sqls_bind_u64(st, 2, r.upto);
  sqlite3_bind_int64(st, 3, limit > 0 ? (sqlite3_int64)limit : -1);
  while ((step = sqlite3_step(st)) == SQLITE_ROW) {
    if (p.left > 0)
      p.left--;
    rc = sync_row(s, st, fn, ctx, &r.upto);
    if (rc != 0)
      break;
  }
  if (rc == 0 && step != SQLITE_DONE)
    rc = sqls_db_fail(s, "cannot read the inbox");
  sqlite3_reset(st);
  /* then those waiting in memory: all newer than any in the table */
  if (rc == 0 && u != NULL)
    rc = sqls_index_each_entry(u, r.upto, sync_pend_row, &p);
  if (rc < 0)
    return rc;
  /* The entries after trimmed have no holes, so whether more exist needs
   * no extra row: the same answer for a limit and for fn stopping early. */
  r.more = r.upto < r.last;
  if (info != NULL)
    *info = r;
  return IMD_STORE_OK;
}

int sqlstore_user_state(sql_store *s, const char *uid, uint64_t *last, uint64_t *trimmed,
                         void (*fn)(void *ctx, const char *device, uint64_t seq), void *ctx)
{
  sqlite3_stmt *st;
  sqlite3_int64 uk;
  const user_ctr *u;
  uint64_t l, t;
  int rc, step;

  if (s == NULL)
    return IMD_STORE_EINVAL;
  rc = check_read(s, uid);
  if (rc == IMD_STORE_OK)
    rc = user_read(s, uid, &uk, &l, &t, &u);
  if (rc != IMD_STORE_OK)
    return rc;
  if (last != NULL)
    *last = l;
  if (trimmed != NULL)
    *trimmed = t;
  if (fn == NULL)
    return IMD_STORE_OK;
  /* the pending marks into the open batch, which this read sees */
  rc = sqlstore_marks_write(s);
  if (rc != IMD_STORE_OK)
    return rc;
  st = s->st[ST_CURSORS];
  sqls_bind_text(st, 1, uid);
  while ((step = sqlite3_step(st)) == SQLITE_ROW) {
    const char *device = sqls_column_str(st, 0);
    if (device == NULL) {
      step = SQLITE_NOMEM;
      break;
    }
    fn(ctx, device, column_u64(st, 1));
  }
  if (step != SQLITE_DONE)
    rc = sqls_db_fail(s, "cannot read the delivered marks");
  sqlite3_reset(st);
  return rc;
}
