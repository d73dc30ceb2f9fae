/* The inside of the SQLite store, shared by its files and by nothing else:
 * store_sqlite.c (schema, batches, appends, marks, groups, reads, commits),
 * store_index.c (inbox entries and keys written behind their messages),
 * store_sql.c (statement helpers)
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
  ST_MSG_PUT,
  ST_MSG_DEL,
  ST_INBOX_PUT,
  ST_MSG_GET,
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
  ST_META_PUT,
  ST_COUNT
};

/* An inbox entry or an idempotency key of a stored message that waits in
 * memory to be written to its table with its user's others (store_index.c).
 * The message row holds it too (msgs.idx), so a crash loses none. */
typedef struct pend_row {
  sqlite3_int64 mid;           /* the message */
  uint64_t ts;
  uint64_t seq;                /* an inbox entry's (0 in a key) */
  char *key;                   /* a key's device NUL cid NUL id NUL (owned); NULL: an entry */
} pend_row;

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
  bool in_pbatch;              /* on s->pbatch */
  bool in_pwritten;            /* on s->pwritten */
  uint32_t pend_n;             /* rows on pend (store_index.c) */
  uint32_t pend_ok;            /* the first of them, committed */
  uint32_t pend_cap;           /* rows pend has room for */
  uint64_t key_bits[2];        /* a filter of the keys on pend (store_index.c) */
  pend_row *pend;              /* its entries and keys waiting to be written, oldest first */
  struct user_ctr *pq_next;    /* on s->pq_head while pend_n > 0, by its oldest row */
  struct user_ctr *pq_prev;
  struct user_ctr *pb_next;    /* on s->pbatch */
  struct user_ctr *pw_next;    /* on s->pwritten */
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
  /* rows written behind (store_index.c) */
  user_ctr *pq_head, *pq_tail; /* the users that have some, by their oldest */
  user_ctr *pbatch;     /* users the open batch gave rows */
  user_ctr *pwritten;   /* users whose rows the open transaction wrote */
  size_t pend_total;    /* rows waiting */
  size_t pend_written;  /* of them, on users on pwritten */
  uint64_t pend_newest_ts; /* ts of the last row added */
  sqlite3_int64 mid_next; /* msgs.mid of the next message: mids only grow */
  sqlite3_int64 mid_batch; /* mid_next when the open batch began (no batch: equal) */
  sqlite3_int64 indexed;  /* meta 'indexed' as committed */
  sqlite3_int64 indexed_due; /* as the open transaction writes it (0: not) */
  size_t pend_ripe;     /* rows of one user that have it written at a commit */
  size_t pend_max;      /* rows waiting, at most, before the oldest are written */
  sqlstore_wal_fn wal_fn; /* checkpoints elsewhere (NULL: in the commit) */
  void *wal_ctx;
  uint64_t frame_bytes;   /* a WAL frame: page + header */
  bool ckpt_behind;       /* the last checkpoint here left frames uncopied */
  char err[ERR_MAX];
  char lost_err[ERR_MAX];
};

/* ---- helpers (store_sql.c) ---- */

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

/* ---- rows written behind (store_index.c) ----
 * An append puts its message row in the batch and its inbox entries and key
 * in memory, under their users' counters; the message row also lists them
 * (msgs.idx: sqls_index_encode()). Commits write the rows of the users that
 * have gathered pending_ripe of them (so one commit writes a user's rows
 * next to each other, on a page or two, where one row per commit wrote a
 * page each) and of the users whose rows waited longest, while there are
 * more than pend_max or the oldest is PEND_AGE_MS older than the newest (by
 * the messages' ts; checked by each commit). The meta row
 * 'indexed' is the mid up to which every message's rows are in their
 * tables: an open after a crash writes the rows of the messages after it
 * again from msgs.idx (sqls_index_replay()). */

/* Adds u's inbox entry seq of message mid (ts) to the open batch; IMD_STORE_OK
 * or IMD_STORE_EIO (out of memory). */
int sqls_index_entry(sql_store *s, user_ctr *u, uint64_t seq, sqlite3_int64 mid, uint64_t ts);
/* Adds sender's key (device, cid) -> id of message mid to the open batch. */
int sqls_index_key(sql_store *s, user_ctr *sender, const char *device, const char *cid,
                   const char *id, sqlite3_int64 mid, uint64_t ts);
/* Takes back the last row the open batch added to u (a failed append). */
void sqls_index_unadd(sql_store *s, user_ctr *u);
/* The id of sender's waiting key (device, cid), or NULL. */
const char *sqls_index_find_key(const user_ctr *sender, const char *device, const char *cid);
/* The inbox entries of u waiting with seq > since, oldest first: fn(ctx,
 * row) until it returns non-zero (returned) or none is left (0). */
int sqls_index_each_entry(const user_ctr *u, uint64_t since,
                          int (*fn)(void *ctx, const pend_row *r), void *ctx);
/* msgs.idx of a message: the sender's users row if it has a key (else 0),
 * then each receiver's users row and seq, as varints, into buf (at least
 * sqls_index_encoded_max(n) bytes); returns the length. */
size_t sqls_index_encoded_max(size_t n);
size_t sqls_index_encode(unsigned char *buf, sqlite3_int64 sender_uk, const user_ctr *touched,
                         const uint64_t *seqs);
/* Writes u's rows into the open transaction (u goes on pwritten, its rows
 * are freed by sqls_index_written()). */
int sqls_index_write_user(sql_store *s, user_ctr *u);
/* Before a batch's COMMIT: writes the rows due (see above) and, every so
 * often, the new 'indexed'. */
int sqls_index_commit(sql_store *s);
/* The transaction that wrote pwritten committed: their rows are gone from
 * memory; the batch's rows are committed ones. */
void sqls_index_written(sql_store *s);
/* The open transaction rolled back: the users on pwritten keep their rows
 * (nothing was written); with batch, the open batch's rows go. */
void sqls_index_rolled_back(sql_store *s, bool batch);
/* Writes every waiting row, and 'indexed' up to the last message, into the
 * open transaction (then as sqls_index_commit()). Retention calls it before
 * it deletes anything: a message row is the only durable copy of its rows
 * while they wait, and a key outlives its message. */
int sqls_index_write_all(sql_store *s);
/* The same in a transaction of its own (none may be open). */
int sqls_index_flush(sql_store *s);
/* Frees every row (close). */
void sqls_index_free(sql_store *s);
/* At open, inside its transaction: the rows of the messages after 'indexed'
 * into their tables (INSERT OR IGNORE: some are there; entries at or below
 * their user's trimmed mark stay out), then 'indexed' and *mid_next set
 * from the last message. 0, or -1 with err set. */
int sqls_index_replay(sqlite3 *db, sqlite3_int64 *indexed, sqlite3_int64 *mid_next,
                      sqlite3_int64 *mid_batch, char *err, size_t errlen);

#endif
