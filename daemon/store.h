/* imd's message store, as the event loop sees it: an asynchronous contract
 * that every backend implements (store_thread.c runs the SQLite engine on a
 * thread of its own; store_redis.c is the clustered one).
 *
 * What a backend keeps: a durable inbox per user with gap-free sequence
 * numbers (1, 2, 3, ...) that the backend assigns, idempotency keys
 * (sender, device, cid), each device's delivered position, retention by
 * count and age, and group membership.
 *
 * Every request completes through its callback, on the loop thread, never
 * before the request function returned, exactly once (also when the store
 * is closed with requests outstanding: they complete with IMD_STORE_EIO or
 * their result first). A request function that returns an error never
 * calls its callback.
 *
 * Order: requests complete in the order they were made. A read (sync,
 * user_state, group_members) sees every write made before it that
 * completed with success. An append completes only once it is durable by
 * the backend's standard (the SQLite commit with its fsync; Redis's answer
 * under appendfsync always), so an ack may follow the callback.
 *
 * Pointers handed to a request (message, uids, gid) must stay valid and
 * unchanged until its callback runs; pointers handed to a callback are
 * valid only during it.
 */
#ifndef IMD_STORE_H
#define IMD_STORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum imd_store_err {
  IMD_STORE_OK = 0,
  IMD_STORE_EIO = -1,     /* the backend failed (see imd_store_error()) */
  IMD_STORE_EINVAL = -2,  /* bad argument (empty uid, n == 0, ...) */
  IMD_STORE_EBATCH = -3,  /* (SQLite engine) not allowed while a batch is open */
  IMD_STORE_EDOWN = -4,   /* the backend is unreachable (Redis down): nothing was done */
  IMD_STORE_DUP = 1,      /* append: (from, device, cid) was stored before */
  IMD_STORE_PUSHED = 2    /* append (Redis store with a push io, store_redis.h): stored, and
                             the same script pushed it to the receivers' other nodes */
};

typedef struct imd_store_opts {
  uint32_t keep_count;    /* inbox entries kept per user; 0 = no count limit */
  uint32_t keep_age_s;    /* entries older than this are trimmed; 0 = no age limit */
  bool no_fsync;          /* true: PRAGMA synchronous=NORMAL (survives a process
                             crash, not a power cut); default FULL */
  uint64_t wal_max_bytes; /* SQLite: the WAL's bound. Checkpoint passes start
                             every quarter of it; a commit that finds the WAL
                             past it waits for the running pass and copies the
                             rest itself. 0 = 128 MiB */
  uint32_t commit_delay_us; /* SQLite: a commit that follows the last one by
                             less than this waits out the rest, so that one
                             commit takes more requests; 0 = commit at once */
  uint32_t marks_delay_ms; /* SQLite: how long delivered marks gather in memory
                             before they are written; 0 = 10 s */
} imd_store_opts;

/* One message, as appended and as read back. Strings are NUL-terminated. */
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

typedef struct imd_sync_info {
  uint64_t last;     /* the user's highest seq (0: empty inbox, never written) */
  uint64_t upto;     /* seq of the last entry returned, or max(since, trimmed)
                        when none was */
  uint64_t trimmed;  /* highest seq removed by retention (0: none) */
  bool more;         /* entries after `upto` exist (a limit cut the answer) */
  bool gap;          /* since < trimmed: entries since+1..trimmed are gone */
} imd_sync_info;

/* A stored entry of a sync answer. */
typedef struct imd_stored {
  uint64_t seq;
  imd_store_msg m;
} imd_stored;

typedef struct imd_device_mark {
  const char *device;
  uint64_t delivered;
} imd_device_mark;

/* status: IMD_STORE_OK (seqs[i] is the new seq of uids[i]), IMD_STORE_PUSHED
 * (the same, and other nodes have it already: deliver locally only), IMD_STORE_DUP
 * (nothing written; id is the first append's id, seqs NULL), or a negative
 * code (nothing written; seqs and id NULL). */
typedef void (*imd_append_cb)(void *arg, int status, const uint64_t *seqs, const char *id);
/* status 0: msgs[0..n) in seq order and *info; else msgs NULL, info NULL. */
typedef void (*imd_sync_cb)(void *arg, int status, const imd_stored *msgs, size_t n,
                            const imd_sync_info *info);
typedef void (*imd_state_cb)(void *arg, int status, uint64_t last, uint64_t trimmed,
                             const imd_device_mark *devs, size_t n);
/* status 0: the members (n == 0: no such group); else uids NULL. */
typedef void (*imd_members_cb)(void *arg, int status, const char *const *uids, size_t n);
typedef void (*imd_done_cb)(void *arg, int status);

/* The callback of a request, whichever kind (for backends that queue
 * requests of every kind together). */
typedef union imd_store_cb {
  imd_append_cb append;
  imd_sync_cb sync;
  imd_state_cb state;
  imd_members_cb members;
  imd_done_cb done;
} imd_store_cb;

typedef struct imd_store_stats {
  uint64_t commits;       /* durable writes (SQLite commits, Redis round trips) */
  uint64_t commit_us;     /* time they took */
  uint64_t trimmed;       /* inbox entries removed by retention */
  uint64_t errors;        /* failed requests */
  uint64_t wal_waits;     /* SQLite: commits that waited for a checkpoint pass at
                             the WAL's bound (the disk copies more slowly than
                             messages arrive) */
  uint64_t ckpt_cut;      /* SQLite: of those, waits cut short: the pass, slowed by
                             its low priority, was stopped and the commit copied
                             the WAL itself */
  uint64_t trim_steps;    /* retention transactions (SQLite: a pass's start and steps;
                             Redis: script calls) */
  uint64_t trim_us;       /* time they held the database (SQLite: no commit meanwhile;
                             Redis: the round trip) */
  uint64_t trim_max_us;   /* the longest of them */
  uint64_t marks_pending; /* SQLite: delivered marks waiting in memory (a gauge) */
} imd_store_stats;

typedef struct imd_store imd_store;

typedef struct imd_store_ops {
  /* Append m to the inboxes of the n distinct, non-empty uids. If m->cid is
   * set and (m->from, m->device, m->cid) was appended before (within the
   * retention age), nothing is written and cb gets IMD_STORE_DUP. */
  int (*append)(imd_store *s, const imd_store_msg *m, const char *const *uids, size_t n,
                imd_append_cb cb, void *arg);
  /* Raise (uid, device)'s delivered position to seq; never lowers it. No
   * callback: a mark rides along with the next durable write (a lost mark
   * only makes a device resync more). */
  int (*mark_delivered)(imd_store *s, const char *uid, const char *device, uint64_t seq);
  /* uid's entries after since (and after what was trimmed), at most limit
   * (0 = backend default) and about max_bytes of data (0 = no byte bound;
   * at least one entry is always returned), in seq order. */
  int (*sync)(imd_store *s, const char *uid, uint64_t since, uint32_t limit, size_t max_bytes,
              imd_sync_cb cb, void *arg);
  /* uid's last and trimmed seqs and each device's delivered position. */
  int (*user_state)(imd_store *s, const char *uid, imd_state_cb cb, void *arg);
  int (*group_members)(imd_store *s, const char *gid, imd_members_cb cb, void *arg);
  /* Add, then remove members; a group with no member is gone. Durable
   * before cb(arg, 0): a failed update changes nothing. */
  int (*group_update)(imd_store *s, const char *gid, const char *const *add, size_t nadd,
                      const char *const *rm, size_t nrm, imd_done_cb cb, void *arg);
  void (*stats)(imd_store *s, imd_store_stats *st);
  /* Text of the last error (never NULL). */
  const char *(*error)(imd_store *s);
  /* Finish what is outstanding (callbacks run), then free. */
  void (*close)(imd_store *s);
} imd_store_ops;

/* Every backend's handle starts with this. */
struct imd_store {
  const imd_store_ops *ops;
};

/* Shorthands: each returns the op's result (0 or a negative IMD_STORE_*). */
static inline int imd_store_append(imd_store *s, const imd_store_msg *m, const char *const *uids,
                                   size_t n, imd_append_cb cb, void *arg) {
  return s->ops->append(s, m, uids, n, cb, arg);
}
static inline int imd_store_mark(imd_store *s, const char *uid, const char *device, uint64_t seq) {
  return s->ops->mark_delivered(s, uid, device, seq);
}
static inline int imd_store_sync(imd_store *s, const char *uid, uint64_t since, uint32_t limit,
                                 size_t max_bytes, imd_sync_cb cb, void *arg) {
  return s->ops->sync(s, uid, since, limit, max_bytes, cb, arg);
}

/* store_thread.c: the SQLite engine (store_sqlite.c) at `path` on a thread
 * of its own, with retention every trim_interval_s seconds; the loop is
 * woken once per finished batch through `base`. Returns NULL with a reason
 * in err. If groups_json names an existing file (the old groups store), its
 * groups are imported on first start and the file renamed to
 * groups_json.migrated. */
struct event_base;
imd_store *imd_store_sqlite_start(struct event_base *base, const char *path,
                                  const imd_store_opts *o, uint32_t trim_interval_s,
                                  const char *groups_json, char *err, size_t errlen);
/* Another handle on the store s started above, for another thread's loop:
 * requests made through it complete (callbacks run) on base's loop. Close
 * it (ops->close) after s itself. NULL: no memory or descriptors. */
imd_store *imd_store_sqlite_view(imd_store *s, struct event_base *base);

#endif
