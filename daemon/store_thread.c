/* The SQLite store on a thread of its own (store.h's asynchronous contract
 * over store_sqlite.c's synchronous engine).
 *
 * The loop queues requests; the store thread takes everything queued at
 * once as one batch, runs it in one transaction and commits it with one
 * fsync, then hands the finished batch back and wakes the loop once
 * (eventfd). While the thread commits batch N the loop goes on reading and
 * queues batch N+1: the double buffering that keeps the fsync off the loop.
 *
 * Reads see everything queued before them: a read finds the writes before
 * it in its batch already committed (a read in the middle of a batch
 * commits what precedes it first). Delivered marks wait in memory, one per
 * (uid, device) however many acks come (store_sqlite.c), and are written
 * once they have waited MARK_DELAY_MS (imd_store_opts.marks_delay_ms): with
 * the next write commit, or in a commit of their own; reads of the inbox do
 * not wait for them, reads of the marks see them.
 *
 * Checkpoints (copying the WAL back into the database file) run on a third
 * thread with a connection of its own, at a lower priority, once per quarter
 * of the WAL's bound (imd_store_opts.wal_max_bytes), so that no commit waits
 * for one; the store thread only catches up on the commits made during a pass
 * (so that the WAL can start over). The bound holds however fast the writes
 * come: a commit that leaves the WAL past it waits for the running pass (the
 * writers slow down to what the disk copies) and then copies the rest itself;
 * if the pass, at its low priority, has not ended within CKPT_WAIT_MS, it is
 * stopped and the commit copies everything.
 */
#include <cjson/cJSON.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <libim/im_async.h>

#include "log.h"
#include "store.h"
#include "store_sqlite.h"

/* How long delivered marks gather before they are written. Most devices
 * get far less than a message a second, so a short delay would save few
 * writes; a crash loses at most this much of them, which makes those
 * devices resync a little more (clients sync from their own position) and
 * no message is lost. */
#define MARK_DELAY_MS 10000
#define GATHER_ENOUGH 64     /* a queue this long is committed without a delay */
/* Users rows a retention pass writes before its start, per transaction of
 * their own (~7 us each here): the start then writes only the rest. */
#define USERS_FLUSH_STEP 4096
/* Each pass ends with the store thread copying the tail and syncing the
 * database (CKPT_TAIL_BYTES at most): a few ms in which no commit is made.
 * A 1:1 message writes about 8 KiB of WAL (whole 1 KiB pages of each tree
 * it touches), so a pass per 8 MiB came every ~0.1 s at 10,000 msgs/s; one
 * per 32 MiB (the default bound's quarter) makes it 4x rarer (chat-latency.sh,
 * 2 alternating runs: p99 5.5 against 6.4-7.0 ms at 5,000/s, 11.5-12.5
 * against 12.1-20.4 ms at 10,000/s). */
#define CKPT_LIMIT_BYTES (128u << 20) /* the WAL's bound by default; a pass per quarter */
#define CKPT_TAIL_BYTES (512u << 10) /* the most the store thread copies to catch up */
#define CKPT_NICE 10                 /* the checkpoint thread yields to the others */
#define CKPT_WAIT_MS 100             /* the longest a commit at the WAL's bound waits for it */
#define ERR_MAX 256

enum rq_kind { RQ_APPEND, RQ_MARK, RQ_SYNC, RQ_STATE, RQ_MEMBERS, RQ_GROUP };

/* A result row of a read: the copied strings follow the struct. */
typedef struct row {
  imd_stored st;
  char buf[];
} row;

typedef struct rq {
  struct rq *next;
  im_async *done;          /* the loop its callback runs on */
  enum rq_kind kind;
  int status;
  void *arg;
  imd_store_cb cb;
  /* append (borrowed until the callback) */
  const imd_store_msg *m;
  const char *const *uids;
  size_t n;
  uint64_t *seqs;
  char id[24];
  /* reads and marks: copied arguments */
  uint64_t since, seq;
  uint32_t limit;
  size_t max_bytes;
  char **strs;             /* group_update: add then rm, owned */
  size_t nadd, nrm;
  /* read results */
  row **rows;
  size_t nrows, cap;
  imd_sync_info info;
  uint64_t last, trimmed;
  char key[];              /* uid or gid (and device for marks), NUL-separated */
} rq;

typedef struct thread_store thread_store;

/* A handle on the store (the contract's): the store it queues to and the
 * loop its callbacks run on. The store's own is the first; a worker
 * thread gets a view (imd_store_sqlite_view). */
typedef struct store_handle {
  imd_store base;          /* first */
  thread_store *t;
  im_async *done;          /* finished requests, back to this handle's loop */
} store_handle;

struct thread_store {
  store_handle h;          /* first: the store's own handle */
  sql_store *db;
  pthread_t thread;
  pthread_mutex_t lock;
  pthread_cond_t wake;
  rq *todo, *todo_tail;    /* queued by the loop */
  size_t todo_n;           /* requests in todo */
  bool stop, started;
  uint32_t trim_interval_s;
  uint64_t marks_delay_ms;
  /* checkpoints */
  sql_ckpt *ckpt;
  pthread_t ckpt_thread;
  bool ckpt_started, ckpt_due, ckpt_running, ckpt_stop;
  pthread_cond_t ckpt_wake;          /* under lock */
  pthread_cond_t ckpt_done;          /* under lock: a pass ended */
  uint64_t ckpt_limit;               /* the WAL's bound */
  uint64_t ckpt_every;               /* WAL written between two passes */
  atomic_bool ckpt_passed;           /* a pass finished since the last catch-up */
  _Atomic uint64_t ckpt_copied;      /* WAL bytes in the database file after that pass */
  /* the store thread's side (on_wal) */
  uint64_t ckpt_base;                /* WAL size at the last pass asked for */
  bool ckpt_asked;                   /* a pass was asked for and has not finished */
  bool ckpt_catchup;                 /* after it, copy the tail here */
  imd_store_stats st;
  uint64_t gather_ns;                /* the commit delay (gather()) */
  uint64_t commit_end_ns;            /* store thread: when the last commit ended */
  char err[ERR_MAX];
};

static uint64_t mono_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint64_t mono_ms(void) { return mono_ns() / 1000000u; }

/* A deadline on the monotonic clock, for the timed waits of the store's
 * conditions (made with that clock: imd_store_sqlite_start). */
static struct timespec mono_at(uint64_t ns) {
  return (struct timespec){.tv_sec = (time_t)(ns / 1000000000u),
                           .tv_nsec = (long)(ns % 1000000000u)};
}

static uint64_t wall_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* ---- the loop side ---------------------------------------------------------- */

static rq *rq_new(enum rq_kind kind, const char *k1, const char *k2, void *arg) {
  size_t l1 = k1 ? strlen(k1) : 0, l2 = k2 ? strlen(k2) : 0;
  rq *r = calloc(1, sizeof *r + l1 + l2 + 2);
  if (!r) return NULL;
  r->kind = kind;
  r->arg = arg;
  if (k1) memcpy(r->key, k1, l1);
  if (k2) memcpy(r->key + l1 + 1, k2, l2);
  return r;
}

static const char *rq_key2(const rq *r) { return r->key + strlen(r->key) + 1; }

static int submit(imd_store *s, rq *r) {
  store_handle *h = (store_handle *)s;
  thread_store *t = h->t;
  r->done = h->done;
  pthread_mutex_lock(&t->lock);
  if (t->todo_tail)
    t->todo_tail->next = r;
  else
    t->todo = r;
  t->todo_tail = r;
  /* the thread waits for a first request, or for enough (gather()) */
  if (++t->todo_n == 1 || t->todo_n >= GATHER_ENOUGH) pthread_cond_signal(&t->wake);
  pthread_mutex_unlock(&t->lock);
  return IMD_STORE_OK;
}

static void rq_free(rq *r) {
  for (size_t i = 0; i < r->nrows; i++) free(r->rows[i]);
  free(r->rows);
  if (r->strs)
    for (size_t i = 0; i < r->nadd + r->nrm; i++) free(r->strs[i]);
  free(r->strs);
  free(r->seqs);
  free(r);
}

/* Run one finished request's callback on the loop thread. */
static void complete(rq *r) {
  switch (r->kind) {
  case RQ_APPEND:
    r->cb.append(r->arg, r->status, r->status == IMD_STORE_OK ? r->seqs : NULL,
                 r->status >= 0 ? r->id : NULL);
    break;
  case RQ_SYNC: {
    imd_stored *v = r->status == 0 && r->nrows ? malloc(r->nrows * sizeof *v) : NULL;
    if (r->status == 0 && r->nrows && !v) r->status = IMD_STORE_EIO;
    for (size_t i = 0; v && i < r->nrows; i++) v[i] = r->rows[i]->st;
    r->cb.sync(r->arg, r->status, v, r->status ? 0 : r->nrows, r->status ? NULL : &r->info);
    free(v);
    break;
  }
  case RQ_STATE: {
    imd_device_mark *v = r->status == 0 && r->nrows ? malloc(r->nrows * sizeof *v) : NULL;
    if (r->status == 0 && r->nrows && !v) r->status = IMD_STORE_EIO;
    for (size_t i = 0; v && i < r->nrows; i++)
      v[i] = (imd_device_mark){r->rows[i]->buf, r->rows[i]->st.seq};
    r->cb.state(r->arg, r->status, r->last, r->trimmed, v, r->status ? 0 : r->nrows);
    free(v);
    break;
  }
  case RQ_MEMBERS: {
    const char **v = r->status == 0 && r->nrows ? malloc(r->nrows * sizeof *v) : NULL;
    if (r->status == 0 && r->nrows && !v) r->status = IMD_STORE_EIO;
    for (size_t i = 0; v && i < r->nrows; i++) v[i] = r->rows[i]->buf;
    r->cb.members(r->arg, r->status, r->status ? NULL : v, r->status ? 0 : r->nrows);
    free(v);
    break;
  }
  case RQ_GROUP:
    r->cb.done(r->arg, r->status);
    break;
  case RQ_MARK:
    break;
  }
}

/* A finished batch on the loop thread: its callbacks, in order. */
static void batch_done(void *item, void *arg) {
  (void)arg;
  for (rq *r = item, *next; r; r = next) {
    next = r->next;
    complete(r);
    rq_free(r);
  }
}

/* ---- the store thread --------------------------------------------------------- */

static row *row_new(size_t extra) { return malloc(sizeof(row) + extra); }

static int rows_push(rq *r, row *w) {
  if (!w) return -1;
  if (r->nrows == r->cap) {
    size_t cap = r->cap ? r->cap * 2 : 16;
    row **v = realloc(r->rows, cap * sizeof *v);
    if (!v) {
      free(w);
      return -1;
    }
    r->rows = v;
    r->cap = cap;
  }
  r->rows[r->nrows++] = w;
  return 0;
}

static char *put_str(char **at, const char *s) {
  if (!s) return NULL;
  size_t n = strlen(s) + 1;
  char *d = memcpy(*at, s, n);
  *at += n;
  return d;
}

typedef struct sync_ctx {
  rq *r;
  size_t bytes;
  bool oom;
} sync_ctx;

static int sync_row(void *arg, uint64_t seq, const imd_store_msg *m) {
  sync_ctx *x = arg;
  /* the byte budget: stop before an entry that would go over it, but
   * always return at least one */
  if (x->r->max_bytes && x->r->nrows && x->bytes + m->data_len > x->r->max_bytes) return 1;
  const char *strs[] = {m->id, m->from, m->device, m->cid, m->to, m->group};
  size_t len = m->data_len + 1;
  for (size_t i = 0; i < sizeof strs / sizeof *strs; i++)
    if (strs[i]) len += strlen(strs[i]) + 1;
  row *w = row_new(len);
  if (!w) {
    x->oom = true;
    return 1;
  }
  char *at = w->buf;
  w->st.seq = seq;
  w->st.m = *m;
  w->st.m.id = put_str(&at, m->id);
  w->st.m.from = put_str(&at, m->from);
  w->st.m.device = put_str(&at, m->device);
  w->st.m.cid = put_str(&at, m->cid);
  w->st.m.to = put_str(&at, m->to);
  w->st.m.group = put_str(&at, m->group);
  memcpy(at, m->data, m->data_len);
  at[m->data_len] = '\0';
  w->st.m.data = at;
  if (rows_push(x->r, w) < 0) {
    x->oom = true;
    return 1;
  }
  x->bytes += m->data_len;
  return 0;
}

static void name_row(void *arg, const char *name, uint64_t seq) {
  sync_ctx *x = arg;
  size_t n = strlen(name) + 1;
  row *w = row_new(n);
  if (w) {
    memcpy(w->buf, name, n);
    w->st.seq = seq;
  }
  if (rows_push(x->r, w) < 0) x->oom = true;
}

static void member_row(void *arg, const char *uid) { name_row(arg, uid, 0); }

static void set_err_locked(thread_store *t) {
  pthread_mutex_lock(&t->lock);
  snprintf(t->err, sizeof t->err, "%s", sqlstore_error(t->db));
  t->st.errors++;
  pthread_mutex_unlock(&t->lock);
}

/* Commit the open batch; the writes since the last commit learn its fate. */
static void commit_now(thread_store *t, rq *from, rq *upto) {
  uint64_t start = mono_ns();
  int rc = sqlstore_commit(t->db);
  t->commit_end_ns = mono_ns();
  if (rc < 0) {
    log_error("store commit failed: %s", sqlstore_error(t->db));
    set_err_locked(t);
    for (rq *r = from; r && r != upto; r = r->next)
      if ((r->kind == RQ_APPEND || r->kind == RQ_GROUP) && r->status >= 0) r->status = IMD_STORE_EIO;
  }
  pthread_mutex_lock(&t->lock);
  t->st.commits++;
  t->st.commit_us += (t->commit_end_ns - start) / 1000u;
  pthread_mutex_unlock(&t->lock);
}

static void run_read(thread_store *t, rq *r) {
  sync_ctx x = {r, 0, false};
  switch (r->kind) {
  case RQ_SYNC:
    r->status = sqlstore_sync(t->db, r->key, r->since, r->limit, sync_row, &x, &r->info);
    if (r->status == 0 && r->nrows) r->info.upto = r->rows[r->nrows - 1]->st.seq;
    break;
  case RQ_STATE:
    r->status = sqlstore_user_state(t->db, r->key, &r->last, &r->trimmed, name_row, &x);
    break;
  case RQ_MEMBERS:
    r->status = sqlstore_group_members(t->db, r->key, member_row, &x);
    break;
  default:
    break;
  }
  if (r->status == 0 && x.oom) r->status = IMD_STORE_EIO;
  if (r->status < 0) set_err_locked(t);
}

/* Counts one retention transaction (a pass's start or a step) that
 * dropped `dropped` inbox entries and held the store since t0. */
static void count_trim(thread_store *t, long dropped, uint64_t t0) {
  uint64_t us = (mono_ns() - t0) / 1000u;
  pthread_mutex_lock(&t->lock);
  if (dropped > 0) t->st.trimmed += (uint64_t)dropped;
  t->st.trim_steps++;
  t->st.trim_us += us;
  if (us > t->st.trim_max_us) t->st.trim_max_us = us;
  pthread_mutex_unlock(&t->lock);
}

static void write_marks(thread_store *t) {
  if (sqlstore_marks_write(t->db) < 0) set_err_locked(t);
}

/* Run one batch in order; ride: the pending delivered marks are due, write
 * them with the batch's last commit. */
static void run_batch(thread_store *t, rq *batch, bool ride) {
  rq *since = batch;         /* first request not yet covered by a commit */
  bool writes = false;
  for (rq *r = batch; r; r = r->next) {
    switch (r->kind) {
    case RQ_APPEND:
      r->status = sqlstore_append(t->db, r->m, r->uids, r->n, r->seqs, r->id);
      if (r->status < 0) set_err_locked(t);
      writes = true;
      break;
    case RQ_GROUP:
      r->status = sqlstore_group_update(t->db, r->key, (const char *const *)r->strs, r->nadd,
                                        (const char *const *)r->strs + r->nadd, r->nrm);
      if (r->status < 0) set_err_locked(t);
      writes = true;
      break;
    case RQ_MARK:
      if (sqlstore_mark_delivered(t->db, r->key, rq_key2(r), r->seq) < 0) set_err_locked(t);
      break;
    default:
      /* a read sees every write queued before it: commit those first (marks
       * alone need not be durable for it) */
      if (writes) {
        commit_now(t, since, r);
        since = r;
        writes = false;
      }
      run_read(t, r);
      break;
    }
  }
  if (writes) {
    if (ride) write_marks(t);
    commit_now(t, since, NULL);
  }
}

/* Hand a finished batch back: to each loop the requests it made, in order
 * (one post, so one wake-up, per loop). */
static void hand_back(rq *batch) {
  while (batch) {
    im_async *q = batch->done;
    rq *mine = NULL, **tail = &mine, **rest = &batch;
    for (rq *r = batch, *next; r; r = next) {
      next = r->next;
      if (r->done == q) {
        *rest = next;
        r->next = NULL;
        *tail = r;
        tail = &r->next;
      } else {
        rest = &r->next;
      }
    }
    if (im_async_post(q, mine) < 0) {
      /* cannot happen before close, which joins this thread first */
      log_error("store: cannot hand a batch back");
    }
  }
}

/* Group commit under load (under the lock, which it drops while it
 * waits): when the last commit ended less than the commit delay ago, the
 * requests are coming faster than commits; wait out the rest of the delay
 * so that one commit (one fsync) takes what arrives meanwhile. A commit
 * costs the store thread CPU of its own besides its rows (the WAL write, the
 * fsync's journal and cache flush, the wake-ups): at 5,000 msgs/s without a
 * delay there were 0.9 commits per message. After a quiet spell the first
 * request goes at once, and a queue of GATHER_ENOUGH goes without waiting
 * (submit() wakes the thread for the first request and from then on). */
static void gather(thread_store *t) {
  uint64_t until = t->commit_end_ns + t->gather_ns;
  if (!t->gather_ns || mono_ns() >= until) return;
  struct timespec ts = mono_at(until);
  while (t->todo_n < GATHER_ENOUGH && !t->stop)
    if (pthread_cond_timedwait(&t->wake, &t->lock, &ts) == ETIMEDOUT) break;
}

static void *thread_main(void *arg) {
  thread_store *t = arg;
  uint64_t next_trim =
      t->trim_interval_s ? mono_ms() + (uint64_t)t->trim_interval_s * 1000u : UINT64_MAX;
  uint64_t marks_due = UINT64_MAX;
  bool trimming = false; /* a retention pass has steps left */
  pthread_mutex_lock(&t->lock);
  for (;;) {
    while (!t->todo && !t->stop && !trimming) {
      uint64_t now = mono_ms(), due = next_trim < marks_due ? next_trim : marks_due;
      if (due <= now) break;
      uint64_t wait = due - now > 3600000 ? 3600000 : due - now;
      struct timespec ts = mono_at(mono_ns() + wait * 1000000u);
      pthread_cond_timedwait(&t->wake, &t->lock, &ts);
    }
    if (t->todo && !t->stop && t->todo_n < GATHER_ENOUGH) gather(t);
    rq *batch = t->todo;
    t->todo = t->todo_tail = NULL;
    t->todo_n = 0;
    bool stop = t->stop;
    pthread_mutex_unlock(&t->lock);

    if (batch) run_batch(t, batch, mono_ms() >= marks_due);
    /* marks in memory, or written by a read into a batch of their own */
    bool marks_left = sqlstore_marks_pending(t->db) > 0 || sqlstore_in_batch(t->db);
    uint64_t now = mono_ms();
    if (!marks_left) {
      marks_due = UINT64_MAX;
    } else if (marks_due == UINT64_MAX) {
      marks_due = now + t->marks_delay_ms;
    }
    /* a batch of marks alone (a read of the marks wrote them) is committed
     * for retention too, which needs no batch open (and this loop does not
     * wait while a pass has steps left) */
    bool retain = trimming || now >= next_trim;
    if (marks_left && (now >= marks_due || stop || (retain && sqlstore_in_batch(t->db)))) {
      write_marks(t);
      commit_now(t, NULL, NULL);
      marks_due = UINT64_MAX;
    }
    pthread_mutex_lock(&t->lock); /* before the callbacks run: they may read it */
    t->st.marks_pending = sqlstore_marks_pending(t->db);
    pthread_mutex_unlock(&t->lock);
    hand_back(batch);
    /* retention: a pass every trim_interval_s, in bounded steps, one per
     * turn of this loop, so batches are committed in between */
    if (!stop && retain && !sqlstore_in_batch(t->db)) {
      uint64_t t0 = mono_ns();
      long rc, dropped = 0; /* a start lists users and drops nothing */
      if (now >= next_trim && sqlstore_users_unflushed(t->db) > USERS_FLUSH_STEP) {
        /* the users rows the start would write, a step at a time first */
        rc = sqlstore_users_flush_step(t->db, USERS_FLUSH_STEP);
        if (rc < 0) next_trim = now + (uint64_t)t->trim_interval_s * 1000u;
      } else if (now >= next_trim) {
        rc = sqlstore_trim_start(t->db, wall_ms());
        trimming = rc >= 0;
        next_trim = now + (uint64_t)t->trim_interval_s * 1000u;
      } else {
        rc = dropped = sqlstore_trim_step(t->db, &trimming);
      }
      if (rc < 0) {
        log_error("retention trim failed: %s", sqlstore_error(t->db));
        set_err_locked(t);
        trimming = false;
      }
      count_trim(t, dropped, t0);
    }

    pthread_mutex_lock(&t->lock);
    if (stop && !t->todo) break;
  }
  pthread_mutex_unlock(&t->lock);
  return NULL;
}

/* ---- checkpoints ------------------------------------------------------------- */

/* Asks the checkpoint thread for a pass (store thread). */
static void ckpt_ask(thread_store *t, uint64_t wal_bytes) {
  t->ckpt_base = wal_bytes;
  t->ckpt_asked = true;
  pthread_mutex_lock(&t->lock);
  t->ckpt_due = true;
  pthread_cond_signal(&t->ckpt_wake);
  pthread_mutex_unlock(&t->lock);
}

/* Waits until the checkpoint thread has no pass to run (store thread, the
 * WAL at its bound). The pass runs at the checkpoint thread's lower
 * priority, which on a CPU kept busy by others can take seconds while every
 * commit waits: after CKPT_WAIT_MS the pass is interrupted (or, not started
 * yet, taken back) and the caller copies everything itself at its own
 * priority. */
static void ckpt_wait(thread_store *t) {
  bool waited = false, cut = false;
  struct timespec ts = mono_at(mono_ns() + (uint64_t)CKPT_WAIT_MS * 1000000u);
  pthread_mutex_lock(&t->lock);
  while ((t->ckpt_due || t->ckpt_running) && !t->ckpt_stop) {
    waited = true;
    if (cut) {
      pthread_cond_wait(&t->ckpt_done, &t->lock);
    } else if (pthread_cond_timedwait(&t->ckpt_done, &t->lock, &ts) == ETIMEDOUT) {
      cut = true;
      t->ckpt_due = false; /* not started: it never will be */
      if (t->ckpt_running) sqlstore_ckpt_interrupt(t->ckpt);
    }
  }
  if (waited) t->st.wal_waits++;
  if (cut) t->st.ckpt_cut++;
  pthread_mutex_unlock(&t->lock);
}

/* After each commit, on the store thread (sqlstore_wal_fn); true: the
 * store checkpoints right here. The WAL only starts over at a write after a
 * checkpoint that left nothing to copy, which under steady writes only this
 * thread can do: after each pass it copies the tail committed meanwhile, if
 * the tail is short; else one more pass first. It never competes with a
 * running pass (its checkpoint would find it busy): past the bound it waits
 * for the pass to end, then copies the rest. */
static bool on_wal(void *arg, uint64_t wal_bytes, bool behind) {
  thread_store *t = arg;
  if (t->ckpt_asked && atomic_exchange(&t->ckpt_passed, false)) t->ckpt_asked = false;
  if (t->ckpt_asked) {
    if (wal_bytes < t->ckpt_limit) return false;
    ckpt_wait(t);
    atomic_store(&t->ckpt_passed, false);
    t->ckpt_asked = t->ckpt_catchup = false;
    return true;
  }
  if (t->ckpt_catchup || behind) {
    if (wal_bytes <= atomic_load(&t->ckpt_copied) + CKPT_TAIL_BYTES ||
        wal_bytes >= t->ckpt_limit) {
      t->ckpt_catchup = false;
      return true;
    }
    ckpt_ask(t, wal_bytes);
    return false;
  }
  if (wal_bytes < t->ckpt_base) t->ckpt_base = 0; /* it did restart */
  if (wal_bytes - t->ckpt_base >= t->ckpt_every) {
    ckpt_ask(t, wal_bytes);
    t->ckpt_catchup = true;
  }
  return false;
}

static void *ckpt_main(void *arg) {
  thread_store *t = arg;
  char err[ERR_MAX];
  /* Linux: a thread's nice value is its own */
  setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), CKPT_NICE);
  pthread_mutex_lock(&t->lock);
  for (;;) {
    while (!t->ckpt_due && !t->ckpt_stop) pthread_cond_wait(&t->ckpt_wake, &t->lock);
    if (t->ckpt_stop) break;
    t->ckpt_due = false;
    t->ckpt_running = true;
    pthread_mutex_unlock(&t->lock);
    uint64_t copied = 0;
    if (sqlstore_ckpt_run(t->ckpt, &copied, err, sizeof err) < 0) log_error("store: %s", err);
    atomic_store(&t->ckpt_copied, copied);
    atomic_store(&t->ckpt_passed, true);
    pthread_mutex_lock(&t->lock);
    t->ckpt_running = false;
    pthread_cond_broadcast(&t->ckpt_done);
  }
  pthread_cond_broadcast(&t->ckpt_done); /* stopped: a waiter sees ckpt_stop */
  pthread_mutex_unlock(&t->lock);
  return NULL;
}

/* The checkpoint thread; without it the store checkpoints in its commits. */
static void ckpt_start(thread_store *t, const char *path, const imd_store_opts *o) {
  char err[ERR_MAX];
  t->ckpt = sqlstore_ckpt_open(path, o, err, sizeof err);
  if (!t->ckpt) {
    log_error("store: checkpoints stay in the commits: %s", err);
    return;
  }
  if (pthread_create(&t->ckpt_thread, NULL, ckpt_main, t) != 0) {
    log_error("store: checkpoints stay in the commits: cannot start their thread");
    sqlstore_ckpt_close(t->ckpt);
    t->ckpt = NULL;
    return;
  }
  t->ckpt_started = true;
  sqlstore_set_wal_hook(t->db, on_wal, t);
}

/* Tells one of the store's threads to stop (*stop under the lock, its
 * condition signalled) and waits for it. */
static void thread_end(thread_store *t, bool *stop, pthread_cond_t *wake, pthread_t th) {
  pthread_mutex_lock(&t->lock);
  *stop = true;
  pthread_cond_signal(wake);
  pthread_mutex_unlock(&t->lock);
  pthread_join(th, NULL);
}

static void ckpt_end(thread_store *t) {
  if (t->ckpt_started) thread_end(t, &t->ckpt_stop, &t->ckpt_wake, t->ckpt_thread);
  t->ckpt_started = false;
  sqlstore_ckpt_close(t->ckpt);
  t->ckpt = NULL;
}

/* ---- the ops ------------------------------------------------------------------ */

static int t_append(imd_store *s, const imd_store_msg *m, const char *const *uids, size_t n,
                    imd_append_cb cb, void *arg) {
  if (!m || !uids || n == 0 || !cb) return IMD_STORE_EINVAL;
  rq *r = rq_new(RQ_APPEND, NULL, NULL, arg);
  if (!r || !(r->seqs = calloc(n, sizeof *r->seqs))) {
    free(r);
    return IMD_STORE_EIO;
  }
  r->cb.append = cb;
  r->m = m;
  r->uids = uids;
  r->n = n;
  return submit(s, r);
}

static int t_mark(imd_store *s, const char *uid, const char *device, uint64_t seq) {
  if (!uid || !*uid || !device) return IMD_STORE_EINVAL;
  rq *r = rq_new(RQ_MARK, uid, device, NULL);
  if (!r) return IMD_STORE_EIO;
  r->seq = seq;
  return submit(s, r);
}

static int t_sync(imd_store *s, const char *uid, uint64_t since, uint32_t limit, size_t max_bytes,
                  imd_sync_cb cb, void *arg) {
  if (!uid || !*uid || !cb) return IMD_STORE_EINVAL;
  rq *r = rq_new(RQ_SYNC, uid, NULL, arg);
  if (!r) return IMD_STORE_EIO;
  r->cb.sync = cb;
  r->since = since;
  r->limit = limit;
  r->max_bytes = max_bytes;
  return submit(s, r);
}

static int t_state(imd_store *s, const char *uid, imd_state_cb cb, void *arg) {
  if (!uid || !*uid || !cb) return IMD_STORE_EINVAL;
  rq *r = rq_new(RQ_STATE, uid, NULL, arg);
  if (!r) return IMD_STORE_EIO;
  r->cb.state = cb;
  return submit(s, r);
}

static int t_members(imd_store *s, const char *gid, imd_members_cb cb, void *arg) {
  if (!gid || !*gid || !cb) return IMD_STORE_EINVAL;
  rq *r = rq_new(RQ_MEMBERS, gid, NULL, arg);
  if (!r) return IMD_STORE_EIO;
  r->cb.members = cb;
  return submit(s, r);
}

static int t_group(imd_store *s, const char *gid, const char *const *add, size_t nadd,
                   const char *const *rm, size_t nrm, imd_done_cb cb, void *arg) {
  if (!gid || !*gid || !cb) return IMD_STORE_EINVAL;
  rq *r = rq_new(RQ_GROUP, gid, NULL, arg);
  if (!r) return IMD_STORE_EIO;
  r->cb.done = cb;
  r->strs = calloc(nadd + nrm + 1, sizeof *r->strs);
  r->nadd = nadd;
  r->nrm = nrm;
  bool ok = r->strs != NULL;
  for (size_t i = 0; ok && i < nadd + nrm; i++)
    ok = (r->strs[i] = strdup(i < nadd ? add[i] : rm[i - nadd])) != NULL;
  if (!ok) {
    rq_free(r);
    return IMD_STORE_EIO;
  }
  return submit(s, r);
}

static void t_stats(imd_store *s, imd_store_stats *st) {
  thread_store *t = ((store_handle *)s)->t;
  pthread_mutex_lock(&t->lock);
  *st = t->st;
  pthread_mutex_unlock(&t->lock);
}

static const char *t_error(imd_store *s) { return ((store_handle *)s)->t->err; }

static void t_close(imd_store *s) {
  store_handle *h = (store_handle *)s;
  thread_store *t = h->t;
  if (h != &t->h) { /* a view: after the store itself (no post can race) */
    im_async_free(h->done); /* completes what the thread finished for it */
    free(h);
    return;
  }
  if (t->started) thread_end(t, &t->stop, &t->wake, t->thread);
  ckpt_end(t); /* before the store: its close is the last, and checkpoints the rest */
  im_async_free(t->h.done); /* completes what the thread finished last */
  sqlstore_close(t->db);
  pthread_mutex_destroy(&t->lock);
  pthread_cond_destroy(&t->wake);
  pthread_cond_destroy(&t->ckpt_wake);
  pthread_cond_destroy(&t->ckpt_done);
  free(t);
}

static const imd_store_ops thread_ops = {t_append, t_mark,  t_sync,  t_state, t_members,
                                         t_group,  t_stats, t_error, t_close};

/* ---- start ---------------------------------------------------------------------- */

/* Import the groups of the old groups.json store, once. */
static int import_groups(sql_store *db, const char *path, char *err, size_t errlen) {
  FILE *f = fopen(path, "r");
  if (!f) return errno == ENOENT ? 0 : (snprintf(err, errlen, "%s: %s", path, strerror(errno)), -1);
  fseek(f, 0, SEEK_END);
  long len = ftell(f);
  fseek(f, 0, SEEK_SET);
  char *text = len >= 0 ? malloc((size_t)len + 1) : NULL;
  size_t got = text ? fread(text, 1, (size_t)len, f) : 0;
  fclose(f);
  cJSON *root = text ? cJSON_ParseWithLength(text, got) : NULL;
  free(text);
  int rc = 0;
  if (!cJSON_IsObject(root)) {
    snprintf(err, errlen, "%s is not a JSON object; refusing to start", path);
    rc = -1;
  }
  cJSON *g;
  if (rc == 0) cJSON_ArrayForEach(g, root) {
    if (!cJSON_IsArray(g) || !*g->string) continue;
    cJSON *m;
    cJSON_ArrayForEach(m, g) {
      if (!cJSON_IsString(m) || !*m->valuestring) continue;
      const char *uid = m->valuestring;
      if (sqlstore_group_update(db, g->string, &uid, 1, NULL, 0) < 0) rc = -1;
    }
  }
  cJSON_Delete(root);
  if (rc == 0 && sqlstore_commit(db) < 0) rc = -1;
  if (rc < 0 && !*err) snprintf(err, errlen, "cannot import %s: %s", path, sqlstore_error(db));
  if (rc == 0) {
    char moved[4200];
    snprintf(moved, sizeof moved, "%s.migrated", path);
    if (rename(path, moved) < 0) {
      snprintf(err, errlen, "cannot rename %s: %s", path, strerror(errno));
      rc = -1;
    } else {
      log_info("groups imported from %s (now %s)", path, moved);
    }
  }
  return rc;
}

imd_store *imd_store_sqlite_start(struct event_base *base, const char *path,
                                  const imd_store_opts *o, uint32_t trim_interval_s,
                                  const char *groups_json, char *err, size_t errlen) {
  thread_store *t = calloc(1, sizeof *t);
  if (!t) {
    snprintf(err, errlen, "out of memory");
    return NULL;
  }
  t->h.base.ops = &thread_ops;
  t->h.t = t;
  t->trim_interval_s = trim_interval_s;
  pthread_mutex_init(&t->lock, NULL);
  /* timed waits on the monotonic clock: a step of the wall clock must not
   * stretch a commit delay, a mark's wait or a wait at the WAL's bound */
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_cond_init(&t->wake, &ca);
  pthread_cond_init(&t->ckpt_done, &ca);
  pthread_condattr_destroy(&ca);
  pthread_cond_init(&t->ckpt_wake, NULL);
  t->ckpt_limit = o && o->wal_max_bytes ? o->wal_max_bytes : CKPT_LIMIT_BYTES;
  t->ckpt_every = t->ckpt_limit / 4;
  t->gather_ns = o ? (uint64_t)o->commit_delay_us * 1000u : 0;
  t->marks_delay_ms = o && o->marks_delay_ms ? o->marks_delay_ms : MARK_DELAY_MS;
  atomic_init(&t->ckpt_passed, false);
  atomic_init(&t->ckpt_copied, 0);
  *err = '\0';
  t->db = sqlstore_open(path, o, err, errlen);
  if (!t->db || (groups_json && import_groups(t->db, groups_json, err, errlen) < 0)) {
    t_close(&t->h.base);
    return NULL;
  }
  /* retention at start, before the first request can read */
  if (t->trim_interval_s) { /* the pass at start counts as one hold */
    uint64_t t0 = mono_ns();
    long trimmed = sqlstore_trim(t->db, wall_ms());
    if (trimmed < 0) log_error("retention trim failed: %s", sqlstore_error(t->db));
    count_trim(t, trimmed, t0);
  }
  ckpt_start(t, path, o);
  t->h.done = im_async_new(base, batch_done, t);
  if (!t->h.done || pthread_create(&t->thread, NULL, thread_main, t) != 0) {
    snprintf(err, errlen, "cannot start the store thread");
    t_close(&t->h.base);
    return NULL;
  }
  t->started = true;
  return &t->h.base;
}

imd_store *imd_store_sqlite_view(imd_store *s, struct event_base *base) {
  store_handle *h = calloc(1, sizeof *h);
  if (!h) return NULL;
  h->base.ops = &thread_ops;
  h->t = ((store_handle *)s)->t;
  h->done = im_async_new(base, batch_done, h->t);
  if (!h->done) {
    free(h);
    return NULL;
  }
  return &h->base;
}
