/* The inside of the SQLite store, shared by its files and by nothing else:
 * store_sqlite.c (schema, batches, appends, marks, groups, reads, commits)
 * and store_retention.c (retention). Not an API: the store's callers use
 * store_sqlite.h. */
#ifndef IMD_STORE_SQLITE_INT_H
#define IMD_STORE_SQLITE_INT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <sqlite3.h>

#include "core/strmap.h"
#include "store_sqlite.h"

#define ERR_MAX 256

enum stmt_id {
  ST_BEGIN,
  ST_COMMIT,
  ST_ROLLBACK,
  ST_SAVEPOINT,
  ST_RELEASE,
  ST_UNDO,
  ST_USER_GET,
  ST_USER_NEW,
  ST_USER_PUT,
  ST_IDEM_PUT,
  ST_IDEM_GET,
  ST_IDEM_DEL,
  ST_MSG_PUT,
  ST_MSG_DEL,
  ST_INBOX_PUT,
  ST_INBOX_DEL,
  ST_MARK,
  ST_SYNC,
  ST_CURSORS,
  ST_TRIM_TODO,
  ST_TRIM_CUT,
  ST_TRIM_DONE,
  ST_TRIM_LEFT,
  ST_TRIM_GONE,
  ST_TRIM_INBOX,
  ST_TRIM_USERS,
  ST_TRIM_OLDEST,
  ST_TRIM_COUNT,
  ST_TRIM_MSGS,
  ST_TRIM_REFS,
  ST_IDEM_SWEEP_END,
  ST_IDEM_SWEEP,
  ST_TRIM_CLEAR_CUT,
  ST_TRIM_CLEAR_GONE,
  ST_TRIM_CLEAR_REFS,
  ST_GROUP_ADD,
  ST_GROUP_DEL,
  ST_GROUP_GET,
  ST_COUNT
};

/* One user's seq counter. last includes the open batch's appends; durable
 * is what the last commit made durable; the users row's last_seq gets
 * durable only at the next flush (users_flush()). uk is the users row's
 * key, which the user's inbox entries and keys are stored under: 0 while
 * the user has no row (a row is made by the first append that needs one,
 * inside its batch). */
typedef struct user_ctr {
  strmap_node node;
  struct user_ctr *dirty_next; /* on s->dirty: last changed in this batch */
  struct user_ctr *flush_next; /* on s->unflushed: durable is ahead of its users row */
  struct user_ctr *flush_prev;
  struct user_ctr *touch_next; /* on the list of the append in progress */
  struct user_ctr *fresh_next; /* on s->fresh: its users row was made in this batch */
  sqlite3_int64 uk;
  uint64_t last;
  uint64_t durable;
  uint64_t next;               /* seq the append in progress gives it */
  uint64_t stamp;              /* append that touched it last: spots a uid listed twice */
  uint64_t first_ts;           /* ts of the first append since the users row was written */
  bool has_first;
  bool dirty;
  bool unflushed;
  bool fresh;                  /* on s->fresh */
  bool ref;                    /* used since the eviction hand last passed it */
  char uid[];
} user_ctr;

#define CTR_OF(np) ((user_ctr *)(void *)((char *)(np) - offsetof(user_ctr, node)))

/* A delivered mark not written yet: the highest seq (uid, device) acked
 * since the marks were last written (sqlstore_marks_write()). */
typedef struct mark_pend {
  strmap_node node;
  struct mark_pend *next;      /* on s->marks_list */
  uint64_t seq;
  char key[];                  /* uid NUL device NUL */
} mark_pend;

/* The users row an evicted counter still owed (sqls_users_flush()). */
typedef struct user_owed {
  sqlite3_int64 uk;
  uint64_t durable;
  uint64_t first_ts;
  bool has_first;
} user_owed;

#define MARK_OF(np) ((mark_pend *)(void *)((char *)(np) - offsetof(mark_pend, node)))

struct sql_store {
  sqlite3 *db;
  sqlite3_stmt *st[ST_COUNT];
  imd_store_opts opts;
  strmap users;         /* uid -> user_ctr */
  user_ctr *dirty;      /* counters the open batch advanced */
  user_ctr *unflushed;  /* counters to write to users at the next flush */
  user_ctr *fresh;      /* counters whose users row the open batch made */
  size_t unflushed_n;   /* on s->unflushed */
  user_owed *owed;      /* rows of counters evicted while unflushed */
  size_t owed_n, owed_cap;
  bool owed_sorted;     /* by uk, one per user (owed_prepare()) */
  uint32_t evict_hand;  /* the bucket of s->users eviction looks at next */
  size_t cache_max;     /* counters kept across commits */
  uint64_t stamp;       /* counts appends, for user_ctr.stamp */
  strmap marks;         /* "uid\0device" -> mark_pend */
  mark_pend *marks_list;
  uint64_t idem_added;  /* keys added since the last pass started */
  uint64_t sweep_left;  /* keys the running pass has still to sweep */
  sqlite3_int64 sweep_cutoff;
  sqlite3_int64 sweep_uk; /* the key the sweep stopped at (0 and NULLs: the start) */
  char *sweep[2];       /* its device and cid */
  bool batch;           /* we issued BEGIN and no COMMIT/ROLLBACK yet */
  bool writes;          /* the batch holds appends or group changes (not only marks) */
  bool lost;            /* SQLite rolled the batch back on its own: the next
                           commit must fail so nothing in it is acknowledged */
  sqlstore_wal_fn wal_fn; /* checkpoints elsewhere (NULL: in the commit) */
  void *wal_ctx;
  uint64_t frame_bytes;   /* a WAL frame: page + header */
  bool ckpt_behind;       /* the last checkpoint here left frames uncopied */
  char err[ERR_MAX];
  char lost_err[ERR_MAX];
};

/* ---- helpers (store_sqlite.c) ---- */

/* Sets the error text; returns rc. */
int sqls_set_err(sql_store *s, int rc, const char *what);
/* Sets the error text to what and SQLite's message; returns IMD_STORE_EIO. */
int sqls_db_fail(sql_store *s, const char *what);
/* Rolls back the transaction a failure left open, if any. */
void sqls_rollback(sql_store *s);
/* Steps statement id (no rows wanted) and resets it: IMD_STORE_OK or
 * IMD_STORE_EIO (the error text set). */
int sqls_run(sql_store *s, enum stmt_id id, const char *what);
/* Binds v without a copy (NULL binds NULL): v must outlive the step. */
void sqls_bind_text(sqlite3_stmt *st, int i, const char *v);
void sqls_bind_u64(sqlite3_stmt *st, int i, uint64_t v);
/* Column i as text, valid until the statement steps again (NULL: NULL or
 * out of memory). */
const char *sqls_column_str(sqlite3_stmt *st, int i);
/* Writes the users rows of the first max counters (SIZE_MAX: all) that
 * commits advanced since their last flush, inside the caller's
 * transaction; sqls_users_flushed() with the same max once it committed. */
int sqls_users_flush(sql_store *s, size_t max);
void sqls_users_flushed(sql_store *s, size_t max);

#endif
