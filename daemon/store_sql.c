/* The SQLite store's statement helpers (store_sqlite_int.h): errors,
 * running a prepared statement, binding. Shared by store_sqlite.c,
 * store_index.c and store_retention.c; they call nothing of the store's. */
#include <stdio.h>

#include "store_sqlite_int.h"

/* ---- errors ---- */

int sqls_set_err(sql_store *s, int rc, const char *what)
{
  snprintf(s->err, sizeof s->err, "%s", what);
  return rc;
}

/* Records SQLite's message at the point of failure: the rollback that
 * usually follows would replace it. */
int sqls_db_fail(sql_store *s, const char *what)
{
  snprintf(s->err, sizeof s->err, "%s: %s", what, sqlite3_errmsg(s->db));
  return IMD_STORE_EIO;
}

/* ---- statements ---- */

/* Rolls back the transaction a failure left open, if any. */
void sqls_rollback(sql_store *s)
{
  if (!sqlite3_get_autocommit(s->db)) {
    sqlite3_step(s->st[ST_ROLLBACK]);
    sqlite3_reset(s->st[ST_ROLLBACK]);
  }
}

/* Steps a statement that returns no rows and resets it for its next use. */
int sqls_run(sql_store *s, enum stmt_id id, const char *what)
{
  sqlite3_stmt *st = s->st[id];
  int rc = sqlite3_step(st);

  if (rc != SQLITE_DONE && rc != SQLITE_ROW) {
    sqls_db_fail(s, what);
    sqlite3_reset(st);
    return IMD_STORE_EIO;
  }
  sqlite3_reset(st);
  return IMD_STORE_OK;
}

/* Borrowed text: every pointer outlives the statement's step, and
 * SQLITE_STATIC spares a copy per column on the hot path. */
void sqls_bind_text(sqlite3_stmt *st, int i, const char *v)
{
  if (v == NULL)
    sqlite3_bind_null(st, i);
  else
    sqlite3_bind_text(st, i, v, -1, SQLITE_STATIC);
}

void sqls_bind_u64(sqlite3_stmt *st, int i, uint64_t v)
{
  sqlite3_bind_int64(st, i, (sqlite3_int64)v); /* callers keep v <= INT64_MAX */
}


const char *sqls_column_str(sqlite3_stmt *st, int i)
{
  return (const char *)sqlite3_column_text(st, i);
}
