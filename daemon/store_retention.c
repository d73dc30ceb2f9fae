/* Retention of the SQLite store (store_sqlite.h: sqlstore_trim_start(),
 * sqlstore_trim_step(), sqlstore_trim()): per user, entries beyond the
 * count limit and older than the age limit go, oldest first; messages no
 * inbox holds any more go with their last entry; expired idempotency keys
 * go by a sweep in key order. A pass lists the users to trim and how far
 * (the temp table trim_todo); bounded steps, each a transaction of its own,
 * work through it, so that commits go on between them. The statements are
 * in store_sqlite.c's table, with the schema they depend on. */
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "store_sqlite_int.h"

#define SWEEP_MIN 4096           /* idempotency keys looked at per retention pass, at least */
/* A retention step (one transaction, during which no commit is made)
 * drops the entries of at most TRIM_STEP_USERS users, at most
 * TRIM_STEP_ENTRIES of each, and looks at SWEEP_STEP idempotency keys.
 * Smaller steps hold commits up for less time but cost more in all: a step
 * rewrites the pages of the messages it drops, which lie anywhere in the
 * pass's range, and the next step rewrites many of them again
 * (bench/store-bench -n 200000 -c -a: one transaction 1.5 s of CPU; steps of
 * 256 users 2.8 s, the longest 0.12 s; of 1,024 users 2.0-2.5 s, the
 * longest 0.24-0.29 s; of 4,096 1.6-1.7 s, the longest 0.6 s). */
#define TRIM_STEP_USERS 1024
#define TRIM_STEP_ENTRIES 64
#define SWEEP_STEP 16384

/* A stretch of n keys of the sweep of expired idempotency keys, from the
 * key after s->sweep, which then moves on (to the start after the last
 * key). A pass sweeps twice as many keys as were added since the last pass
 * (at least SWEEP_MIN), so the sweep goes round the table faster than keys
 * come: a key lives keep_age_s and is gone within about as long again.
 * Key order is the B-tree's own, so a stretch reads its pages in sequence. */
/* Binds the key the sweep stopped at as ?1, ?2, ?3 of st: (0, '', '')
 * before the first key (uks start at 1). */
static void sweep_bind_from(const sql_store *s, sqlite3_stmt *st)
{
  sqlite3_bind_int64(st, 1, s->sweep_uk);
  for (int i = 0; i < 2; i++)
    sqls_bind_text(st, i + 2, s->sweep[i] != NULL ? s->sweep[i] : "");
}

static int idem_sweep(sql_store *s, uint64_t n, sqlite3_int64 cutoff)
{
  sqlite3_stmt *end = s->st[ST_IDEM_SWEEP_END], *del = s->st[ST_IDEM_SWEEP];
  sqlite3_int64 next_uk = 0;
  char *next[2] = {NULL, NULL};
  int step, rc = IMD_STORE_OK;

  sweep_bind_from(s, end);
  sqlite3_bind_int64(end, 4, n > INT64_MAX ? INT64_MAX : (sqlite3_int64)n - 1);
  step = sqlite3_step(end);
  if (step == SQLITE_ROW)
    next_uk = sqlite3_column_int64(end, 0);
  for (int i = 0; step == SQLITE_ROW && i < 2; i++) {
    const char *v = sqls_column_str(end, i + 1);
    if (v == NULL || (next[i] = strdup(v)) == NULL)
      rc = sqls_set_err(s, IMD_STORE_EIO, "out of memory");
  }
  if (step != SQLITE_ROW && step != SQLITE_DONE)
    rc = sqls_db_fail(s, "cannot sweep the idempotency keys");
  sqlite3_reset(end);
  if (rc == IMD_STORE_OK) {
    sweep_bind_from(s, del);
    if (step == SQLITE_ROW) {
      sqlite3_bind_int64(del, 4, next_uk);
      sqls_bind_text(del, 5, next[0]);
      sqls_bind_text(del, 6, next[1]);
    } else { /* the rest of the table; the next stretch starts over */
      sqlite3_bind_blob(del, 4, "\xff", 1, SQLITE_STATIC);
      sqls_bind_text(del, 5, "");
      sqls_bind_text(del, 6, "");
    }
    sqlite3_bind_int64(del, 7, cutoff);
    rc = sqls_run(s, ST_IDEM_SWEEP, "cannot trim the idempotency keys");
  }
  if (rc == IMD_STORE_OK) {
    s->sweep_uk = next_uk;
    for (int i = 0; i < 2; i++) {
      free(s->sweep[i]);
      s->sweep[i] = next[i];
      next[i] = NULL;
    }
  }
  for (int i = 0; i < 2; i++)
    free(next[i]);
  return rc;
}

/* The steps of a trim, inside its transaction. Returns the inbox entries
 * dropped or IMD_STORE_EIO. */
static long trim_steps(sql_store *s, sqlite3_int64 users, sqlite3_int64 entries,
                       uint64_t stretch)
{
  sqlite3_stmt *st = s->st[ST_TRIM_CUT];
  long dropped;

  sqlite3_bind_int64(st, 1, users);
  sqlite3_bind_int64(st, 2, entries);
  if (sqls_run(s, ST_TRIM_CUT, "cannot find what to trim") != IMD_STORE_OK ||
      sqls_run(s, ST_TRIM_DONE, "cannot find what to trim") != IMD_STORE_OK ||
      sqls_run(s, ST_TRIM_GONE, "cannot collect the trimmed entries") != IMD_STORE_OK ||
      sqls_run(s, ST_TRIM_INBOX, "cannot trim the inboxes") != IMD_STORE_OK)
    return IMD_STORE_EIO;
  dropped = (long)sqlite3_changes(s->db);
  if (sqls_run(s, ST_TRIM_USERS, "cannot raise the trimmed marks") != IMD_STORE_OK ||
      sqls_run(s, ST_TRIM_OLDEST, "cannot find the oldest entries") != IMD_STORE_OK ||
      sqls_run(s, ST_TRIM_COUNT, "cannot count the message references") != IMD_STORE_OK ||
      sqls_run(s, ST_TRIM_MSGS, "cannot drop unreferenced messages") != IMD_STORE_OK ||
      sqls_run(s, ST_TRIM_REFS, "cannot lower the message references") != IMD_STORE_OK)
    return IMD_STORE_EIO;
  if (stretch > 0 && idem_sweep(s, stretch, s->sweep_cutoff) != IMD_STORE_OK)
    return IMD_STORE_EIO;
  /* Empty the scratch tables inside the transaction: they stay empty
   * whether it commits or rolls back. */
  if (sqls_run(s, ST_TRIM_CLEAR_CUT, "cannot clear the scratch tables") != IMD_STORE_OK ||
      sqls_run(s, ST_TRIM_CLEAR_GONE, "cannot clear the scratch tables") != IMD_STORE_OK ||
      sqls_run(s, ST_TRIM_CLEAR_REFS, "cannot clear the scratch tables") != IMD_STORE_OK)
    return IMD_STORE_EIO;
  return dropped;
}

/* Entries with ts below this are past the age limit; below every ts when
 * there is no age limit or it reaches back before the epoch. */
static sqlite3_int64 age_cutoff(const sql_store *s, uint64_t now_ms)
{
  uint64_t age_ms = (uint64_t)s->opts.keep_age_s * 1000;

  if (s->opts.keep_age_s == 0 || now_ms <= age_ms)
    return -1;
  now_ms -= age_ms;
  return now_ms > INT64_MAX ? INT64_MAX : (sqlite3_int64)now_ms;
}

static int trim_check(sql_store *s)
{
  if (s->batch || s->lost)
    return sqls_set_err(s, IMD_STORE_EBATCH, "a batch is open; commit first");
  return IMD_STORE_OK;
}

long sqlstore_trim_start(sql_store *s, uint64_t now_ms)
{
  sqlite3_int64 cutoff;
  sqlite3_stmt *st;
  long users = 0;
  int rc;

  if (s == NULL)
    return IMD_STORE_EINVAL;
  if ((rc = trim_check(s)) != IMD_STORE_OK)
    return rc;
  if (s->opts.keep_count == 0 && s->opts.keep_age_s == 0)
    return 0;
  cutoff = age_cutoff(s, now_ms);
  st = s->st[ST_TRIM_TODO];
  sqlite3_bind_int64(st, 1, (sqlite3_int64)s->opts.keep_count);
  sqlite3_bind_int64(st, 2, cutoff);
  rc = sqls_run(s, ST_BEGIN, "cannot begin the trim");
  if (rc == IMD_STORE_OK)
    rc = sqls_users_flush(s, SIZE_MAX);
  /* every waiting row too: the pass may delete the messages that hold the
   * only durable copy of a key whose sender is none of their receivers
   * (whose counter the users flush does not visit); the steps after it
   * delete no message appended since (their entries are above trim_todo) */
  if (rc == IMD_STORE_OK)
    rc = sqls_index_write_all(s);
  if (rc == IMD_STORE_OK)
    rc = sqls_run(s, ST_TRIM_TODO, "cannot find what to trim");
  if (rc == IMD_STORE_OK)
    users = (long)sqlite3_changes(s->db);
  if (rc == IMD_STORE_OK)
    rc = sqls_run(s, ST_COMMIT, "cannot commit the trim");
  if (rc != IMD_STORE_OK) {
    sqls_rollback(s);
    sqls_index_rolled_back(s, false); /* the entries the flush wrote still wait */
    return IMD_STORE_EIO;
  }
  sqls_users_flushed(s, SIZE_MAX);
  if (s->opts.keep_age_s > 0) {
    s->sweep_left = s->idem_added > SWEEP_MIN / 2 ? s->idem_added * 2 : SWEEP_MIN;
    s->sweep_cutoff = cutoff;
    s->idem_added = 0;
  }
  return users;
}

/* A step of at most users users, entries entries of each, and a stretch
 * of at most sweep_max idempotency keys. */
static long trim_step_sized(sql_store *s, bool *more, sqlite3_int64 users, sqlite3_int64 entries,
                            uint64_t sweep_max)
{
  sqlite3_stmt *st = s != NULL ? s->st[ST_TRIM_LEFT] : NULL;
  uint64_t stretch;
  long dropped;
  int rc;

  if (more != NULL)
    *more = false;
  if (s == NULL)
    return IMD_STORE_EINVAL;
  if ((rc = trim_check(s)) != IMD_STORE_OK)
    return rc;
  stretch = s->sweep_left < sweep_max ? s->sweep_left : sweep_max;
  if (sqls_run(s, ST_BEGIN, "cannot begin the trim") != IMD_STORE_OK)
    return IMD_STORE_EIO;
  dropped = trim_steps(s, users, entries, stretch);
  if (dropped >= 0 && sqlite3_step(st) != SQLITE_ROW)
    dropped = sqls_db_fail(s, "cannot count what is left to trim");
  if (dropped >= 0 && more != NULL)
    *more = sqlite3_column_int64(st, 0) > 0 || s->sweep_left > stretch;
  sqlite3_reset(st);
  if (dropped >= 0 && sqls_run(s, ST_COMMIT, "cannot commit the trim") != IMD_STORE_OK)
    dropped = IMD_STORE_EIO;
  if (dropped < 0) {
    sqls_rollback(s);
    return IMD_STORE_EIO;
  }
  s->sweep_left -= stretch;
  return dropped;
}

long sqlstore_trim_step(sql_store *s, bool *more)
{
  return trim_step_sized(s, more, TRIM_STEP_USERS, TRIM_STEP_ENTRIES, SWEEP_STEP);
}

long sqlstore_trim(sql_store *s, uint64_t now_ms)
{
  long dropped = 0, n;
  bool more = true;

  n = sqlstore_trim_start(s, now_ms);
  if (n < 0)
    return n;
  if (s->opts.keep_count == 0 && s->opts.keep_age_s == 0)
    return 0;
  /* one step without bounds: nobody waits meanwhile, and fewer steps
   * cost less in all (see TRIM_STEP_USERS) */
  while (more) {
    n = trim_step_sized(s, &more, INT64_MAX, INT64_MAX / 2, UINT64_MAX);
    if (n < 0)
      return n;
    dropped += n;
  }
  return dropped;
}
