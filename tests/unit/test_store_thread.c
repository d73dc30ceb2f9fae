/* The asynchronous store contract (store.h) over the SQLite engine on its
 * thread: callbacks on the loop in request order, reads after writes,
 * groups, marks that need no commit of their own, close with requests
 * outstanding, views for other loops. Driven by real libevent loops. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <event2/event.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <sqlite3.h>

#include "store.h"

typedef struct fx {
  char dir[64], path[96];
  struct event_base *base;
  imd_store *s;
  int order[128];     /* completion order of tagged requests */
  int done;
  uint64_t seqs[128][2];
  char ids[128][24];
  int status[128];
} fx;

static fx *F;

static int setup(void **state) {
  fx *f = calloc(1, sizeof *f);
  snprintf(f->dir, sizeof f->dir, "/tmp/imd-st-XXXXXX");
  assert_non_null(mkdtemp(f->dir));
  snprintf(f->path, sizeof f->path, "%s/imd.db", f->dir);
  f->base = event_base_new();
  char err[256];
  imd_store_opts o = {.no_fsync = true};
  f->s = imd_store_sqlite_start(f->base, f->path, &o, 0, NULL, err, sizeof err);
  assert_non_null(f->s);
  F = f;
  *state = f;
  return 0;
}

static int teardown(void **state) {
  fx *f = *state;
  if (f->s) f->s->ops->close(f->s);
  event_base_free(f->base);
  char cmd[128];
  snprintf(cmd, sizeof cmd, "rm -rf %s", f->dir);
  assert_int_equal(system(cmd), 0);
  free(f);
  return 0;
}

/* Run the loop until `want` requests completed (or 5 s). */
static void wait_done(fx *f, int want) {
  for (int i = 0; i < 500 && f->done < want; i++) {
    struct timeval tv = {0, 10000};
    event_base_loopexit(f->base, &tv);
    event_base_dispatch(f->base);
  }
  assert_int_equal(f->done, want);
}

static void appended(void *arg, int status, const uint64_t *seqs, const char *id) {
  int k = (int)(intptr_t)arg;
  F->order[F->done++] = k;
  F->status[k] = status;
  if (seqs) memcpy(F->seqs[k], seqs, 2 * sizeof *seqs);
  if (id) snprintf(F->ids[k], 24, "%s", id);
}

static imd_store_msg msgs[128];
static char idbuf[128][24], cidbuf[128][24];
static const char *const pair[] = {"bob", "alice"};

static int append(fx *f, int k, const char *cid) {
  snprintf(idbuf[k], 24, "%d", 1000 + k);
  msgs[k] = (imd_store_msg){.id = idbuf[k], .from = "alice", .device = "d", .to = "bob",
                            .ts = 1, .data = "1", .data_len = 1};
  if (cid) {
    snprintf(cidbuf[k], 24, "%s", cid);
    msgs[k].cid = cidbuf[k];
  }
  return imd_store_append(f->s, &msgs[k], pair, 2, appended, (void *)(intptr_t)k);
}

static size_t synced_n;
static imd_sync_info synced_info;
static uint64_t synced_first;

static void synced(void *arg, int status, const imd_stored *m, size_t n, const imd_sync_info *info) {
  F->order[F->done++] = (int)(intptr_t)arg;
  assert_int_equal(status, 0);
  synced_n = n;
  synced_info = *info;
  synced_first = n ? m[0].seq : 0;
  for (size_t i = 0; i < n; i++) assert_string_equal(m[i].m.data, "1");
}

static void callbacks_in_order_and_reads_after_writes(void **state) {
  fx *f = *state;
  for (int k = 0; k < 10; k++) assert_int_equal(append(f, k, NULL), 0);
  assert_int_equal(f->done, 0); /* never before the request returned */
  assert_int_equal(imd_store_sync(f->s, "bob", 0, 0, 0, synced, (void *)(intptr_t)10), 0);
  wait_done(f, 11);
  for (int k = 0; k <= 10; k++) assert_int_equal(f->order[k], k);
  for (int k = 0; k < 10; k++) {
    assert_int_equal(f->status[k], IMD_STORE_OK);
    assert_int_equal(f->seqs[k][0], (uint64_t)k + 1); /* bob */
    assert_int_equal(f->seqs[k][1], (uint64_t)k + 1); /* alice */
  }
  assert_int_equal(synced_n, 10);
  assert_int_equal(synced_info.last, 10);
  /* the byte budget cuts a sync (at least one entry) and says more */
  assert_int_equal(imd_store_sync(f->s, "bob", 2, 0, 3, synced, (void *)(intptr_t)11), 0);
  wait_done(f, 12);
  assert_int_equal(synced_n, 3);
  assert_int_equal(synced_first, 3);
  assert_true(synced_info.more);
  assert_int_equal(synced_info.upto, 5);
  assert_int_equal(imd_store_sync(f->s, "bob", 0, 0, 0, NULL, NULL), IMD_STORE_EINVAL);
}

static void duplicates_answer_the_first_id(void **state) {
  fx *f = *state;
  assert_int_equal(append(f, 0, "c1"), 0);
  assert_int_equal(append(f, 1, "c1"), 0); /* same batch */
  wait_done(f, 2);
  assert_int_equal(append(f, 2, "c1"), 0); /* after the commit */
  wait_done(f, 3);
  assert_int_equal(f->status[0], IMD_STORE_OK);
  assert_int_equal(f->status[1], IMD_STORE_DUP);
  assert_int_equal(f->status[2], IMD_STORE_DUP);
  assert_string_equal(f->ids[1], "1000");
  assert_string_equal(f->ids[2], "1000");
}

static uint64_t state_last;
static size_t state_devs;
static uint64_t state_mark;

static void state_known(void *arg, int status, uint64_t last, uint64_t trimmed,
                        const imd_device_mark *devs, size_t n) {
  (void)trimmed;
  F->order[F->done++] = (int)(intptr_t)arg;
  assert_int_equal(status, 0);
  state_last = last;
  state_devs = n;
  state_mark = n ? devs[0].delivered : 0;
}

static void marks_ride_along(void **state) {
  fx *f = *state;
  assert_int_equal(append(f, 0, NULL), 0);
  wait_done(f, 1);
  imd_store_stats st0, st1;
  f->s->ops->stats(f->s, &st0);
  /* a mark then a read: the read sees the mark without a commit for it */
  assert_int_equal(imd_store_mark(f->s, "bob", "phone", 1), 0);
  assert_int_equal(f->s->ops->user_state(f->s, "bob", state_known, (void *)(intptr_t)1), 0);
  wait_done(f, 2);
  f->s->ops->stats(f->s, &st1);
  assert_int_equal(st1.commits, st0.commits);
  assert_int_equal(state_last, 1);
  assert_int_equal(state_devs, 1);
  assert_int_equal(state_mark, 1);
  /* the mark is durable after close */
  f->s->ops->close(f->s);
  char err[256];
  imd_store_opts o = {.no_fsync = true};
  f->s = imd_store_sqlite_start(f->base, f->path, &o, 0, NULL, err, sizeof err);
  assert_non_null(f->s);
  assert_int_equal(f->s->ops->user_state(f->s, "bob", state_known, (void *)(intptr_t)2), 0);
  wait_done(f, 3);
  assert_int_equal(state_mark, 1);
}

static int bulk_done, bulk_failed;

static void bulk_appended(void *arg, int status, const uint64_t *seqs, const char *id) {
  (void)arg, (void)seqs, (void)id;
  bulk_done++;
  if (status != 0) bulk_failed++;
}

/* Retention runs on the store thread every trim_interval_s, in bounded
 * steps (sqlstore_trim_step()) with batches committed in between: 300
 * inboxes 50 over the count limit take two steps. */
static void retention_runs_in_steps(void **state) {
  fx *f = *state;
  enum { USERS = 300, EACH = 60, KEEP = 10 };
  static char uids[USERS][8], ids[USERS * EACH + 1][12];
  static const char *to[USERS][1];
  static imd_store_msg m[USERS * EACH + 1];
  f->s->ops->close(f->s);
  char err[256];
  imd_store_opts o = {.no_fsync = true, .keep_count = KEEP};
  f->s = imd_store_sqlite_start(f->base, f->path, &o, 1, NULL, err, sizeof err);
  assert_non_null(f->s);
  bulk_done = bulk_failed = 0;
  for (int u = 0; u < USERS; u++) {
    snprintf(uids[u], sizeof uids[u], "u%03d", u);
    to[u][0] = uids[u];
    for (int i = 0; i < EACH; i++) {
      int k = u * EACH + i;
      snprintf(ids[k], sizeof ids[k], "%d", k);
      m[k] = (imd_store_msg){.id = ids[k], .from = "system", .device = "d", .to = uids[u],
                             .ts = 1, .data = "1", .data_len = 1};
      assert_int_equal(imd_store_append(f->s, &m[k], to[u], 1, bulk_appended, NULL), 0);
    }
  }
  imd_store_stats st = {0};
  for (int i = 0; i < 1000 && st.trimmed < USERS * (EACH - KEEP); i++) {
    struct timeval tv = {0, 10000};
    event_base_loopexit(f->base, &tv);
    event_base_dispatch(f->base);
    f->s->ops->stats(f->s, &st);
  }
  assert_int_equal(bulk_done, USERS * EACH);
  assert_int_equal(bulk_failed, 0);
  assert_int_equal(st.trimmed, USERS * (EACH - KEEP));
  /* and the store goes on */
  int k = USERS * EACH;
  snprintf(ids[k], sizeof ids[k], "%d", k);
  m[k] = (imd_store_msg){.id = ids[k], .from = "system", .device = "d", .to = uids[0],
                         .ts = 1, .data = "1", .data_len = 1};
  assert_int_equal(imd_store_append(f->s, &m[k], to[0], 1, bulk_appended, NULL), 0);
  for (int i = 0; i < 500 && bulk_done == USERS * EACH; i++) {
    struct timeval tv = {0, 10000};
    event_base_loopexit(f->base, &tv);
    event_base_dispatch(f->base);
  }
  assert_int_equal(bulk_done, USERS * EACH + 1);
  assert_int_equal(imd_store_sync(f->s, "u000", 0, 0, 0, synced, (void *)(intptr_t)0), 0);
  wait_done(f, 1);
  /* (the next pass, a second later, may have trimmed the one more) */
  assert_true(synced_info.trimmed == EACH - KEEP || synced_info.trimmed == EACH - KEEP + 1);
  assert_int_equal(synced_info.last, EACH + 1);
}

/* With no read of the marks and no write to ride with, a mark is written
 * in a commit of its own once it has waited marks_delay_ms. */
static void marks_written_after_their_delay(void **state) {
  fx *f = *state;
  f->s->ops->close(f->s);
  char err[256];
  imd_store_opts o = {.no_fsync = true, .marks_delay_ms = 1000};
  f->s = imd_store_sqlite_start(f->base, f->path, &o, 0, NULL, err, sizeof err);
  assert_non_null(f->s);
  assert_int_equal(append(f, 0, NULL), 0);
  wait_done(f, 1);
  assert_int_equal(imd_store_mark(f->s, "bob", "phone", 1), 0);
  assert_int_equal(append(f, 1, NULL), 0); /* done: the mark was taken before it */
  wait_done(f, 2);
  sqlite3 *db = NULL;
  assert_int_equal(sqlite3_open_v2(f->path, &db, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
  sqlite3_busy_timeout(db, 5000);
  const char *q = "SELECT count(*) FROM cursors WHERE uid = 'bob' AND delivered = 1";
  sqlite3_stmt *st = NULL;
  assert_int_equal(sqlite3_prepare_v2(db, q, -1, &st, NULL), SQLITE_OK);
  assert_int_equal(sqlite3_step(st), SQLITE_ROW);
  assert_int_equal(sqlite3_column_int(st, 0), 0); /* in memory */
  sqlite3_reset(st);
  imd_store_stats ss;
  f->s->ops->stats(f->s, &ss);
  assert_int_equal(ss.marks_pending, 1);
  int n = 0;
  for (int i = 0; i < 500 && n == 0; i++) {
    struct timeval tv = {0, 10000};
    event_base_loopexit(f->base, &tv);
    event_base_dispatch(f->base);
    assert_int_equal(sqlite3_step(st), SQLITE_ROW);
    n = sqlite3_column_int(st, 0);
    sqlite3_reset(st);
  }
  assert_int_equal(n, 1);
  sqlite3_finalize(st);
  sqlite3_close(db);
}

static char members_seen[256];

static void members_known(void *arg, int status, const char *const *uids, size_t n) {
  F->order[F->done++] = (int)(intptr_t)arg;
  assert_int_equal(status, 0);
  members_seen[0] = '\0';
  for (size_t i = 0; i < n; i++) {
    strcat(members_seen, uids[i]);
    strcat(members_seen, ",");
  }
}

static void updated(void *arg, int status) {
  F->order[F->done++] = (int)(intptr_t)arg;
  F->status[(intptr_t)arg] = status;
}

static void groups(void **state) {
  fx *f = *state;
  const char *add[] = {"b", "a"}, *rm[] = {"b"}, *bad[] = {""};
  assert_int_equal(f->s->ops->group_update(f->s, "g", add, 2, NULL, 0, updated, (void *)0), 0);
  assert_int_equal(f->s->ops->group_members(f->s, "g", members_known, (void *)1), 0);
  assert_int_equal(f->s->ops->group_update(f->s, "g", bad, 1, NULL, 0, updated, (void *)2), 0);
  assert_int_equal(f->s->ops->group_update(f->s, "g", NULL, 0, rm, 1, updated, (void *)3), 0);
  wait_done(f, 4);
  assert_int_equal(f->status[0], 0);
  assert_int_equal(f->status[2], IMD_STORE_EINVAL);
  assert_int_equal(f->status[3], 0);
  assert_string_equal(members_seen, "a,b,");
  assert_int_equal(f->s->ops->group_members(f->s, "g", members_known, (void *)4), 0);
  wait_done(f, 5);
  assert_string_equal(members_seen, "a,");
}

static void close_completes_outstanding(void **state) {
  fx *f = *state;
  for (int k = 0; k < 20; k++) assert_int_equal(append(f, k, NULL), 0);
  f->s->ops->close(f->s); /* no loop pass: close itself completes them */
  f->s = NULL;
  assert_int_equal(f->done, 20);
  for (int k = 0; k < 20; k++) assert_int_equal(f->status[k], IMD_STORE_OK);
}

/* A view (a worker thread's handle): its requests complete on its own
 * loop, in order, and never on the store's loop; seqs follow the order of
 * the requests across both handles. */
static int view_base_done(struct event_base *b, fx *f, int want) {
  for (int i = 0; i < 500 && f->done < want; i++) {
    struct timeval tv = {0, 10000};
    event_base_loopexit(b, &tv);
    event_base_dispatch(b);
  }
  return f->done;
}

static void a_view_completes_on_its_own_loop(void **state) {
  fx *f = *state;
  struct event_base *b2 = event_base_new();
  imd_store *view = imd_store_sqlite_view(f->s, b2);
  assert_non_null(view);
  imd_store *main_store = f->s;
  for (int k = 0; k < 10; k++) {
    f->s = k % 2 ? view : main_store; /* odd requests through the view */
    assert_int_equal(append(f, k, NULL), 0);
  }
  f->s = main_store;
  wait_done(f, 5); /* the store's loop: only its own five */
  for (int i = 0; i < 5; i++) assert_int_equal(f->order[i], 2 * i);
  assert_int_equal(view_base_done(b2, f, 10), 10);
  for (int i = 5; i < 10; i++) assert_int_equal(f->order[i], 2 * (i - 5) + 1);
  for (int k = 0; k < 10; k++) assert_int_equal(f->seqs[k][0], (uint64_t)k + 1);
  /* close: the store first (its thread stops), then the view completes
   * what is left for it */
  f->s = view;
  assert_int_equal(append(f, 10, NULL), 0);
  main_store->ops->close(main_store);
  view->ops->close(view);
  f->s = NULL;
  assert_int_equal(f->done, 11);
  assert_int_equal(f->status[10], IMD_STORE_OK);
  event_base_free(b2);
}

static int big_done, big_ok;

static void big_appended(void *arg, int status, const uint64_t *seqs, const char *id) {
  (void)arg;
  (void)seqs;
  (void)id;
  big_done++;
  if (status == IMD_STORE_OK) big_ok++;
}

static void synced_any(void *arg, int status, const imd_stored *m, size_t n,
                       const imd_sync_info *info) {
  (void)arg;
  (void)m;
  assert_int_equal(status, 0);
  assert_int_equal(n, 10);
  assert_int_equal(info->last, 10000);
  big_done = 1;
}

/* A thread that keeps a CPU busy until told to stop: with one per CPU the
 * checkpoint thread (nice 10) gets little time, as on a busy machine. */
static atomic_bool hog_stop;

static void *hog(void *arg) {
  (void)arg;
  while (!atomic_load_explicit(&hog_stop, memory_order_relaxed)) {
  }
  return NULL;
}

static long long file_size(const char *path, const char *suffix) {
  char p[128];
  struct stat st;
  snprintf(p, sizeof p, "%s%s", path, suffix);
  return stat(p, &st) == 0 ? (long long)st.st_size : -1;
}

/* Checkpoints run on a thread of their own once per quarter of the WAL's
 * bound, not in the commit that crosses 4 MiB, and the bound holds however
 * fast the disk takes the writes (a commit past it waits for the pass): with
 * fsync on and a 32 MiB bound, ~100 MiB of messages leave a WAL file that
 * grew past 4 MiB (no commit checkpointed) but never past the bound plus the
 * last commit (one round of 200 messages, ~2.2 MiB), and the database file
 * holds what the WAL could not, before the store is closed. Two threads keep
 * the CPUs busy meanwhile, so that the checkpoint thread (at a lower
 * priority) falls behind: the bound must still hold. */
static void checkpoints_on_their_thread(void **state) {
  fx *f = *state;
  static char data[10240];
  static imd_store_msg m[200];
  static char ids[200][24];
  imd_store_opts o = {.wal_max_bytes = 32u << 20}; /* fsync on */
  char err[256];
  f->s->ops->close(f->s);
  f->s = imd_store_sqlite_start(f->base, f->path, &o, 0, NULL, err, sizeof err);
  assert_non_null(f->s);
  memset(data, 'x', sizeof data);
  long long wal_max = 0;
  pthread_t hogs[2];
  atomic_store(&hog_stop, false);
  for (int i = 0; i < 2; i++) assert_int_equal(pthread_create(&hogs[i], NULL, hog, NULL), 0);
  for (int r = 0; r < 50; r++) {
    big_done = 0;
    for (int i = 0; i < 200; i++) {
      snprintf(ids[i], sizeof ids[i], "r%di%d", r, i);
      m[i] = (imd_store_msg){.id = ids[i], .from = "alice", .device = "d", .to = "bob",
                             .ts = 1, .data = data, .data_len = sizeof data};
      assert_int_equal(imd_store_append(f->s, &m[i], pair, 2, big_appended, NULL), 0);
    }
    for (int w = 0; w < 1000 && big_done < 200; w++) {
      struct timeval tv = {0, 10000};
      event_base_loopexit(f->base, &tv);
      event_base_dispatch(f->base);
    }
    assert_int_equal(big_done, 200);
    long long wal = file_size(f->path, "-wal");
    if (wal > wal_max) wal_max = wal;
  }
  atomic_store(&hog_stop, true);
  for (int i = 0; i < 2; i++) pthread_join(hogs[i], NULL);
  assert_int_equal(big_ok, 10000);
  long long db = file_size(f->path, "");
  assert_true(wal_max > (9LL << 19));
  assert_true(wal_max < (32LL << 20) + (4LL << 20));
  imd_store_stats st;
  f->s->ops->stats(f->s, &st);
  /* a commit waits only when the WAL reached the bound, and cuts a wait
   * short only when it waited */
  assert_true(st.wal_waits == 0 || wal_max >= (32LL << 20));
  assert_true(st.ckpt_cut <= st.wal_waits);
  assert_true(db > (60LL << 20));
  assert_int_equal(imd_store_sync(f->s, "bob", 9990, 0, 0, synced_any, NULL), 0);
  big_done = 0;
  for (int w = 0; w < 500 && !big_done; w++) {
    struct timeval tv = {0, 10000};
    event_base_loopexit(f->base, &tv);
    event_base_dispatch(f->base);
  }
  assert_int_equal(big_done, 1);
}

static uint64_t commits(fx *f) {
  imd_store_stats st;
  f->s->ops->stats(f->s, &st);
  return st.commits;
}

/* Runs the loop for ms milliseconds. */
static void run_for(fx *f, int ms) {
  struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
  event_base_loopexit(f->base, &tv);
  event_base_dispatch(f->base);
}

/* Group commit: with a commit delay, appends that come right after a commit
 * wait for the rest of the delay and share one commit; one after a quiet
 * spell, or a queue of 64, is committed at once. The delay (0.5 s) is long
 * against the steps that must fit in it (a few ms). */
static void commit_delay_gathers(void **state) {
  fx *f = *state;
  imd_store_opts o = {.no_fsync = true, .commit_delay_us = 500000};
  char err[256];
  f->s->ops->close(f->s);
  f->s = imd_store_sqlite_start(f->base, f->path, &o, 0, NULL, err, sizeof err);
  assert_non_null(f->s);
  assert_int_equal(append(f, 0, NULL), 0);
  wait_done(f, 1); /* nothing came before: at once */
  uint64_t c0 = commits(f);
  assert_int_equal(append(f, 1, NULL), 0);
  run_for(f, 50);
  assert_int_equal(f->done, 1); /* waits out the delay */
  for (int k = 2; k < 10; k++) assert_int_equal(append(f, k, NULL), 0);
  wait_done(f, 10);
  assert_int_equal(commits(f), c0 + 1); /* one commit for the nine */
  for (int k = 1; k < 10; k++) assert_int_equal(f->seqs[k][0], (uint64_t)k + 1);
  /* 64 queued: no delay */
  for (int k = 10; k < 74; k++) assert_int_equal(append(f, k, NULL), 0);
  for (int i = 0; i < 25 && f->done < 74; i++) run_for(f, 10);
  assert_int_equal(f->done, 74);
  /* a quiet spell longer than the delay: the next goes at once */
  run_for(f, 600);
  assert_int_equal(append(f, 74, NULL), 0);
  for (int i = 0; i < 25 && f->done < 75; i++) run_for(f, 10);
  assert_int_equal(f->done, 75);
  assert_int_equal(f->seqs[74][0], 75);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test_setup_teardown(callbacks_in_order_and_reads_after_writes, setup, teardown),
      cmocka_unit_test_setup_teardown(duplicates_answer_the_first_id, setup, teardown),
      cmocka_unit_test_setup_teardown(marks_ride_along, setup, teardown),
      cmocka_unit_test_setup_teardown(retention_runs_in_steps, setup, teardown),
      cmocka_unit_test_setup_teardown(marks_written_after_their_delay, setup, teardown),
      cmocka_unit_test_setup_teardown(groups, setup, teardown),
      cmocka_unit_test_setup_teardown(close_completes_outstanding, setup, teardown),
      cmocka_unit_test_setup_teardown(a_view_completes_on_its_own_loop, setup, teardown),
      cmocka_unit_test_setup_teardown(checkpoints_on_their_thread, setup, teardown),
      cmocka_unit_test_setup_teardown(commit_delay_gathers, setup, teardown),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
