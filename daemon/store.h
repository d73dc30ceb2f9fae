/* imd's message store: a durable per-user inbox with gap-free sequence
 * numbers, idempotent appends and delivered marks.
 *
 * The interface is small so another backend (the Redis Streams store of the
 * scale-out work) can implement it. This file documents the contract; the
 * SQLite implementation lives in store_sqlite.c.
 *
 * Batches (group commit): imd_store_append() and imd_store_mark_delivered()
 * write into the current batch, begun on demand; imd_store_commit() makes the
 * whole batch durable with one fsync. Nothing appended is visible to
 * imd_store_sync() callers as "stored" before the commit returns 0; the
 * caller must therefore commit before it syncs (imd_store_sync() refuses to
 * run with a batch open: IMD_STORE_EBATCH).
 *
 * Sequence numbers: each user's inbox numbers its entries 1, 2, 3, ... with
 * no gaps. A failed commit rolls the batch back and the numbers it handed out
 * are handed out again (nothing using them was acknowledged).
 *
 * Not thread-safe: one thread uses a store.
 */
#ifndef IMD_STORE_H
#define IMD_STORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct imd_store imd_store;

enum imd_store_err {
  IMD_STORE_OK = 0,
  IMD_STORE_EIO = -1,     /* the database failed (message in imd_store_error()) */
  IMD_STORE_EINVAL = -2,  /* bad argument (empty uid, n == 0, ...) */
  IMD_STORE_EBATCH = -3,  /* not allowed while a batch is open */
  IMD_STORE_DUP = 1       /* imd_store_append: (from, device, cid) already stored */
};

typedef struct imd_store_opts {
  uint32_t keep_count;    /* inbox entries kept per user; 0 = no count limit */
  uint32_t keep_age_s;    /* entries older than this are trimmed; 0 = no age limit */
  bool no_fsync;          /* true: PRAGMA synchronous=NORMAL (survives a process
                             crash, not a power cut); default FULL */
} imd_store_opts;

/* One message, as appended and as read back. Strings are NUL-terminated.
 * On append every pointer is borrowed for the call. On read (sync callback)
 * they point into the store and are valid only during the callback. */
typedef struct imd_store_msg {
  const char *id;         /* server message id (unique; 1..23 bytes, so that
                             it fits dup_id) */
  const char *from;       /* sender uid ("system" etc. for the HTTP API) */
  const char *device;     /* sender device; "" when none (NULL reads as "") */
  const char *cid;        /* client message id; NULL = no idempotency key */
  const char *to;         /* 1:1 receiver, or NULL */
  const char *group;      /* group id, or NULL */
  uint64_t ts;            /* wall-clock ms */
  const char *data;       /* JSON text of the payload, data_len bytes */
  size_t data_len;
} imd_store_msg;

/* Open (creating if needed) the store at `path` (a file name). WAL mode.
 * Returns the store, or NULL with a reason in err (errlen bytes, NUL-terminated). */
imd_store *imd_store_open(const char *path, const imd_store_opts *o, char *err, size_t errlen);
/* Roll back an open batch and close. NULL is a no-op. */
void imd_store_close(imd_store *s);
/* Text of the last error (never NULL; valid until the next store call). */
const char *imd_store_error(const imd_store *s);

/* Append m to the inboxes of the n users in uids (distinct, non-empty) in
 * the current batch; seqs[i] gets the new seq of uids[i].
 * If m->cid is not NULL and (m->from, m->device, m->cid) is already stored
 * (committed or earlier in this batch), nothing is written: the stored id is
 * copied into dup_id (at least 24 bytes; may be NULL) and IMD_STORE_DUP is
 * returned, with seqs all 0.
 * A failed append (EINVAL, EIO) writes nothing and leaves the batch's earlier
 * appends in place; only if the database itself lost the whole batch (disk
 * full, I/O error) do later appends and marks fail too, until the next
 * imd_store_commit() reports the loss with IMD_STORE_EIO.
 * Returns IMD_STORE_OK, IMD_STORE_DUP, IMD_STORE_EINVAL or IMD_STORE_EIO. */
int imd_store_append(imd_store *s, const imd_store_msg *m, const char *const *uids, size_t n,
                     uint64_t *seqs, char *dup_id);

/* Raise the delivered position of (uid, device) to seq within the current
 * batch; never lowers it. Returns 0, IMD_STORE_EINVAL or IMD_STORE_EIO. */
int imd_store_mark_delivered(imd_store *s, const char *uid, const char *device, uint64_t seq);

/* True when a batch is open (something was appended or marked since the
 * last commit), including a batch the database lost, until the commit that
 * reports it. */
bool imd_store_in_batch(const imd_store *s);

/* Make the batch durable (one COMMIT; one fsync with synchronous=FULL).
 * No batch open: returns 0 at once. On failure the batch is rolled back,
 * the seq counters are restored, and IMD_STORE_EIO is returned. */
int imd_store_commit(imd_store *s);

typedef struct imd_sync_info {
  uint64_t last;     /* the user's highest seq (0: empty inbox, never written) */
  uint64_t upto;     /* seq of the last entry passed to the callback, or
                        max(since, trimmed) when none was */
  uint64_t trimmed;  /* highest seq removed by retention (0: none) */
  bool more;         /* entries after `upto` exist (the limit cut the answer) */
  bool gap;          /* since < trimmed: entries since+1..trimmed are gone */
} imd_sync_info;

/* Called once per entry, in seq order. Return 0 to go on, non-zero to stop
 * (more is then set as if the limit had been reached). It must not call
 * into the store. */
typedef int (*imd_store_each)(void *ctx, uint64_t seq, const imd_store_msg *m);

/* Read uid's inbox entries with seq > since (and > trimmed), at most limit
 * (limit 0 = none) of them, in seq order. Fills *info. Returns 0,
 * IMD_STORE_EBATCH (commit first), IMD_STORE_EINVAL or IMD_STORE_EIO. */
int imd_store_sync(imd_store *s, const char *uid, uint64_t since, uint32_t limit,
                   imd_store_each fn, void *ctx, imd_sync_info *info);

/* The delivered position of each known device of uid: fn(ctx, device,
 * seq) per device, in device order. *last gets the user's highest seq and
 * *trimmed the highest trimmed seq. Returns 0, EBATCH, EINVAL or EIO. */
int imd_store_user_state(imd_store *s, const char *uid, uint64_t *last, uint64_t *trimmed,
                         void (*fn)(void *ctx, const char *device, uint64_t seq), void *ctx);

/* Apply retention at wall-clock time now_ms: per user, drop entries beyond
 * keep_count (oldest first) and entries older than keep_age_s; raise each
 * user's trimmed mark to the highest seq dropped; drop messages no inbox
 * refers to any more, but keep their idempotency keys while they are younger
 * than keep_age_s (or forever without an age limit). What goes is always a
 * prefix of the inbox, so that seqs after trimmed stay gap-free: if the
 * clock stepped back, a younger entry before an expired one goes with it.
 * Runs in its own transaction, so its time grows with the entries dropped
 * (call it often rather than rarely). Returns the number of inbox entries
 * dropped (>= 0), IMD_STORE_EBATCH or IMD_STORE_EIO. */
long imd_store_trim(imd_store *s, uint64_t now_ms);

#endif
