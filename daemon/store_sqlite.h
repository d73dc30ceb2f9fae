/* The SQLite store engine: a durable per-user inbox with gap-free sequence
 * numbers, idempotent appends, delivered marks and group membership, in one
 * SQLite database (WAL). Synchronous and single-threaded: imd runs it on
 * its store thread (store_thread.c), which gives the loop the asynchronous
 * contract of store.h. The value types and error codes are store.h's.
 *
 * Batches (group commit): sqlstore_append(), sqlstore_marks_write() and
 * sqlstore_group_update() write into the current batch, begun on demand;
 * sqlstore_commit() makes the whole batch durable with one fsync. Nothing
 * appended is visible to sqlstore_sync() callers as "stored" before the
 * commit returns 0; the caller must therefore commit before it syncs
 * (sqlstore_sync() refuses to run with a batch open: IMD_STORE_EBATCH).
 *
 * Sequence numbers: each user's inbox numbers its entries 1, 2, 3, ... with
 * no gaps. A failed commit rolls the batch back and the numbers it handed out
 * are handed out again (nothing using them was acknowledged).
 *
 * Not thread-safe: one thread uses a store.
 */
#ifndef IMD_STORE_SQLITE_H
#define IMD_STORE_SQLITE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "store.h"

typedef struct sql_store sql_store;


/* Open (creating if needed) the store at `path` (a file name). WAL mode.
 * A file of an older schema is upgraded; one that was not closed cleanly
 * (a crash) has its per-user counters repaired from the inboxes first.
 * Returns the store, or NULL with a reason in err (errlen bytes, NUL-terminated). */
sql_store *sqlstore_open(const char *path, const imd_store_opts *o, char *err, size_t errlen);
/* Roll back an open batch, write the pending delivered marks and the users
 * rows still due (see sqlstore_trim()) and mark the close clean, then
 * close. NULL is a no-op. */
void sqlstore_close(sql_store *s);
/* Text of the last error (never NULL; valid until the next store call). */
const char *sqlstore_error(const sql_store *s);

/* Append m to the inboxes of the n users in uids (distinct, non-empty) in
 * the current batch; seqs[i] gets the new seq of uids[i].
 * If m->cid is not NULL and (m->from, m->device, m->cid) is already stored
 * (committed or earlier in this batch), nothing is written: the stored id is
 * copied into dup_id (at least 24 bytes; may be NULL) and IMD_STORE_DUP is
 * returned, with seqs all 0.
 * A failed append (EINVAL, EIO) writes nothing and leaves the batch's earlier
 * appends in place; only if the database itself lost the whole batch (disk
 * full, I/O error) do later appends and marks fail too, until the next
 * sqlstore_commit() reports the loss with IMD_STORE_EIO.
 * Returns IMD_STORE_OK, IMD_STORE_DUP, IMD_STORE_EINVAL or IMD_STORE_EIO. */
int sqlstore_append(sql_store *s, const imd_store_msg *m, const char *const *uids, size_t n,
                     uint64_t *seqs, char *dup_id);

/* Raise the delivered position of (uid, device) to seq (cut to uid's last
 * seq); never lowers it. The mark waits in memory, one entry per (uid,
 * device) however many marks it gets, until sqlstore_marks_write() (called
 * by sqlstore_user_state() and sqlstore_close() too, and by this function
 * before it adds a 65,537th entry). Returns 0, IMD_STORE_EINVAL or
 * IMD_STORE_EIO (out of memory; the database lost the open batch). */
int sqlstore_mark_delivered(sql_store *s, const char *uid, const char *device, uint64_t seq);

/* Write the pending delivered marks into the current batch (begun on
 * demand; the next sqlstore_commit() makes them durable) and forget them,
 * also when the write fails (a lost mark only makes a device resync more).
 * Returns 0 or IMD_STORE_EIO (then, as for a failed append, the batch may
 * be lost: sqlstore_commit() tells). */
int sqlstore_marks_write(sql_store *s);
/* How many (uid, device) marks wait for sqlstore_marks_write(). */
size_t sqlstore_marks_pending(const sql_store *s);

/* True when a batch is open (something was appended, or marks written,
 * since the last commit), including a batch the database lost, until the
 * commit that reports it. */
bool sqlstore_in_batch(const sql_store *s);

/* Add the uids of add, then remove those of rm, from group gid within the
 * current batch (a group is the set of its member rows: with none left it
 * is gone). All or nothing. Returns 0, IMD_STORE_EINVAL or IMD_STORE_EIO. */
int sqlstore_group_update(sql_store *s, const char *gid, const char *const *add, size_t nadd,
                          const char *const *rm, size_t nrm);
/* fn(ctx, uid) per member of gid, in uid order (the open batch's changes
 * included). Returns 0, IMD_STORE_EINVAL or IMD_STORE_EIO. */
int sqlstore_group_members(sql_store *s, const char *gid,
                           void (*fn)(void *ctx, const char *uid), void *ctx);

/* Make the batch durable (one COMMIT; one fsync with synchronous=FULL).
 * No batch open: returns 0 at once. On failure the batch is rolled back,
 * the seq counters are restored, and IMD_STORE_EIO is returned. */
int sqlstore_commit(sql_store *s);


/* Checkpoints (copying the WAL back into the database file) on a thread of
 * the caller's. By default the store checkpoints inside the commit that
 * leaves 4 MiB in the WAL, which stalls that commit. After
 * sqlstore_set_wal_hook(s, fn, ctx), fn(ctx, wal_bytes, behind) runs after
 * each commit instead, on the store's thread, with the WAL's size; it
 * returns true to have the store checkpoint right there (passive: it copies
 * only what no one copied yet, and never waits). The WAL starts over from
 * its beginning only at a write after a checkpoint that left nothing to
 * copy, so fn returns true once a pass of the other thread finished: that
 * catch-up copies only the commits made during the pass. behind: the last
 * such checkpoint did not copy everything (the other thread's next pass
 * held it off), so the catch-up is still due. fn NULL: back to the
 * default. fn must not call into the store. */
typedef bool (*sqlstore_wal_fn)(void *ctx, uint64_t wal_bytes, bool behind);
void sqlstore_set_wal_hook(sql_store *s, sqlstore_wal_fn fn, void *ctx);

/* A connection of its own to the store at path, for checkpoints only, to
 * be used by one other thread. NULL with a reason in err. */
typedef struct sql_ckpt sql_ckpt;
sql_ckpt *sqlstore_ckpt_open(const char *path, const imd_store_opts *o, char *err,
                             size_t errlen);
/* One passive checkpoint: copies the committed frames not yet copied,
 * without blocking the store's writes. *copied_bytes gets how much of the
 * WAL (from its start) is now in the database file. Returns 0 (also when
 * another checkpoint was running) or IMD_STORE_EIO with a reason in err. */
int sqlstore_ckpt_run(sql_ckpt *c, uint64_t *copied_bytes, char *err, size_t errlen);
/* From any thread: makes a running sqlstore_ckpt_run() stop soon (it
 * returns 0; what it copied is not recorded, so the next checkpoint copies
 * it again). A call while none runs may stop the next one at once instead. */
void sqlstore_ckpt_interrupt(sql_ckpt *c);
/* NULL is a no-op. */
void sqlstore_ckpt_close(sql_ckpt *c);

/* Called once per entry, in seq order. Return 0 to go on, non-zero to stop
 * (more is then set as if the limit had been reached). It must not call
 * into the store. */
typedef int (*imd_store_each)(void *ctx, uint64_t seq, const imd_store_msg *m);

/* Read uid's inbox entries with seq > since (and > trimmed), at most limit
 * (limit 0 = none) of them, in seq order. Fills *info. Returns 0,
 * IMD_STORE_EBATCH (commit first), IMD_STORE_EINVAL or IMD_STORE_EIO. */
int sqlstore_sync(sql_store *s, const char *uid, uint64_t since, uint32_t limit,
                   imd_store_each fn, void *ctx, imd_sync_info *info);

/* The delivered position of each known device of uid: fn(ctx, device,
 * seq) per device, in device order (with fn, the pending marks are written
 * into the current batch first, and read from it). *last gets the user's
 * highest seq and *trimmed the highest trimmed seq. Returns 0, EBATCH,
 * EINVAL or EIO. */
int sqlstore_user_state(sql_store *s, const char *uid, uint64_t *last, uint64_t *trimmed,
                         void (*fn)(void *ctx, const char *device, uint64_t seq), void *ctx);

/* Retention at wall-clock time now_ms: per user, drop entries beyond
 * keep_count (oldest first) and entries older than keep_age_s; raise each
 * user's trimmed mark to the highest seq dropped; drop messages no inbox
 * refers to any more, but keep their idempotency keys while they are younger
 * than keep_age_s (or forever without an age limit). What goes is always a
 * prefix of the inbox, so that seqs after trimmed stay gap-free: an entry
 * that a clock stepped back stamped older than the one before it goes when
 * that one goes.
 *
 * A pass is sqlstore_trim_start(), then sqlstore_trim_step() until *more is
 * false, each in a transaction of its own, with batches in between as the
 * caller likes (no batch may be open during a call: IMD_STORE_EBATCH).
 * start writes the last seq of every user that commits advanced since the
 * last pass (users.last_seq, which the count limit reads; commits do not
 * write it) and lists the users to trim and how far; its work grows with the
 * number of users that have expired entries (and with all users when
 * keep_count is set). Each step drops the entries of at most 1,024 of them,
 * at most 64 each, and sweeps a stretch of idempotency keys, so that no step
 * holds the database long (~0.3 s at most here). A start during a pass adds
 * to its list. start returns the number of users listed (>= 0), step the
 * number of inbox entries dropped (>= 0); both may return IMD_STORE_EBATCH
 * or IMD_STORE_EIO. */
long sqlstore_trim_start(sql_store *s, uint64_t now_ms);
/* The users rows start writes, ahead of it in steps: unflushed() counts
 * them (the users whose counters commits advanced since their row was last
 * written), flush_step() writes the first max in a transaction of its own
 * (IMD_STORE_OK, IMD_STORE_EBATCH with a batch open, IMD_STORE_EIO). A
 * caller that runs them until unflushed() is small keeps start short. */
size_t sqlstore_users_unflushed(const sql_store *s);
/* The per-user counters kept in memory across commits: how many there are
 * now, and the most (default 262,144; each commit past it takes out up to
 * 1,024 of the least recently used, writing nothing). For tests and
 * benchmarks. */
size_t sqlstore_users_cached(const sql_store *s);
void sqlstore_set_cache_max(sql_store *s, size_t max);
int sqlstore_users_flush_step(sql_store *s, size_t max);
/* Inbox entries and idempotency keys are written behind their messages
 * (store_index.c): an append's wait in memory, as durable as the message
 * (its row lists them), until their user has gathered `ripe` of them
 * (default 32) or more than `max` wait (default 131,072), when a commit
 * writes them next to each other. Reads see them. pending() counts them;
 * flush() writes them all in a transaction of its own (no batch may be
 * open: IMD_STORE_EBATCH; IMD_STORE_EIO), as close does; set_index_limits()
 * is for tests and benchmarks (ripe 1: each commit writes its own). */
size_t sqlstore_index_pending(const sql_store *s);
int sqlstore_index_flush(sql_store *s);
void sqlstore_set_index_limits(sql_store *s, size_t ripe, size_t max);
long sqlstore_trim_step(sql_store *s, bool *more);
/* A whole pass in two transactions (start, then one step without bounds:
 * for when nothing else waits, as at open); returns the inbox entries
 * dropped, IMD_STORE_EBATCH or IMD_STORE_EIO. */
long sqlstore_trim(sql_store *s, uint64_t now_ms);

#endif
