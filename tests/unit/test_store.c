#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <signal.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <sqlite3.h>

#include "store_sqlite.h"

/* Every test gets a fresh directory holding one store file. */
typedef struct fixture {
  char dir[64];
  char path[96];
  sql_store *s;
} fixture;

#define MAX_GOT 64

/* One inbox entry as the sync callback saw it, copied out of the store. */
typedef struct entry {
  uint64_t seq;
  char id[24];
  char from[32];
  char device[32];
  char cid[32];
  char to[32];
  char group[32];
  bool has_cid, has_to, has_group;
  uint64_t ts;
  char data[256];
  size_t data_len;
} entry;

typedef struct got {
  size_t n;
  size_t stop_after; /* fn returns non-zero after this many; 0 = never */
  entry e[MAX_GOT];
} got;

static void copy_str(char *dst, size_t size, const char *src, bool *present)
{
  if (present != NULL)
    *present = src != NULL;
  if (src == NULL) {
    dst[0] = '\0';
    return;
  }
  assert_true(strlen(src) < size);
  strcpy(dst, src);
}

static int collect(void *ctx, uint64_t seq, const imd_store_msg *m)
{
  got *g = ctx;
  entry *e;

  assert_true(g->n < MAX_GOT);
  e = &g->e[g->n++];
  e->seq = seq;
  copy_str(e->id, sizeof e->id, m->id, NULL);
  copy_str(e->from, sizeof e->from, m->from, NULL);
  copy_str(e->device, sizeof e->device, m->device, NULL);
  copy_str(e->cid, sizeof e->cid, m->cid, &e->has_cid);
  copy_str(e->to, sizeof e->to, m->to, &e->has_to);
  copy_str(e->group, sizeof e->group, m->group, &e->has_group);
  e->ts = m->ts;
  assert_true(m->data_len < sizeof e->data);
  assert_int_equal(m->data[m->data_len], '\0'); /* NUL-terminated as promised */
  memcpy(e->data, m->data, m->data_len);
  e->data_len = m->data_len;
  return g->stop_after != 0 && g->n >= g->stop_after;
}

static int setup(void **state)
{
  fixture *f = calloc(1, sizeof *f);

  assert_non_null(f);
  strcpy(f->dir, "/tmp/test_store.XXXXXX");
  assert_non_null(mkdtemp(f->dir));
  snprintf(f->path, sizeof f->path, "%s/imd.db", f->dir);
  *state = f;
  return 0;
}

/* Removes the store file at path and the files SQLite keeps beside it. */
static void unlink_store(const char *path)
{
  static const char *const suffix[] = {"", "-wal", "-shm", "-journal"};
  char p[192];

  for (size_t i = 0; i < sizeof suffix / sizeof suffix[0]; i++) {
    snprintf(p, sizeof p, "%s%s", path, suffix[i]);
    unlink(p);
  }
}

static int teardown(void **state)
{
  fixture *f = *state;

  sqlstore_close(f->s);
  unlink_store(f->path);
  assert_int_equal(rmdir(f->dir), 0);
  free(f);
  return 0;
}

static sql_store *reopen(fixture *f, uint32_t keep_count, uint32_t keep_age_s)
{
  imd_store_opts o = {.keep_count = keep_count, .keep_age_s = keep_age_s, .no_fsync = true};
  char err[256] = "";

  sqlstore_close(f->s);
  f->s = sqlstore_open(f->path, &o, err, sizeof err);
  if (f->s == NULL)
    fail_msg("open: %s", err);
  return f->s;
}

static imd_store_msg msg(const char *id, const char *from, const char *cid, const char *to,
                         uint64_t ts)
{
  imd_store_msg m = {.id = id, .from = from, .device = "d1", .cid = cid, .to = to,
                     .ts = ts, .data = "{\"text\":\"hi\"}", .data_len = 13};
  return m;
}

/* A 1:1 message from -> to, stored in both inboxes as imd does. */
static int send1(sql_store *s, const char *id, const char *from, const char *to, const char *cid,
                 uint64_t seqs[2], char dup[24])
{
  imd_store_msg m = msg(id, from, cid, to, 1000);
  const char *uids[2] = {to, from};

  return sqlstore_append(s, &m, uids, 2, seqs, dup);
}

/* Appends to one user and returns the seq it got. */
static uint64_t put(sql_store *s, const char *id, const char *uid, uint64_t ts)
{
  imd_store_msg m = msg(id, "system", NULL, uid, ts);
  const char *uids[1] = {uid};
  uint64_t seq = 0;

  assert_int_equal(sqlstore_append(s, &m, uids, 1, &seq, NULL), IMD_STORE_OK);
  return seq;
}

static imd_sync_info sync_all(sql_store *s, const char *uid, uint64_t since, uint32_t limit,
                              got *g)
{
  imd_sync_info info;

  memset(&info, 0xa5, sizeof info);
  g->n = 0;
  assert_int_equal(sqlstore_sync(s, uid, since, limit, collect, g, &info), IMD_STORE_OK);
  return info;
}

static sqlite3 *side_open(const fixture *f)
{
  sqlite3 *db = NULL;

  assert_int_equal(sqlite3_open(f->path, &db), SQLITE_OK);
  sqlite3_busy_timeout(db, 5000);
  return db;
}

static void side_exec(sqlite3 *db, const char *sql)
{
  char *e = NULL;

  if (sqlite3_exec(db, sql, NULL, NULL, &e) != SQLITE_OK)
    fail_msg("%s: %s", sql, e != NULL ? e : "?");
}

/* Closes f's store, runs sql on the file through db (what a crash or an
 * older imd left), and opens the store again. */
static sql_store *reopen_after(fixture *f, sqlite3 *db, const char *sql, uint32_t keep_count,
                               uint32_t keep_age_s)
{
  sqlstore_close(f->s);
  f->s = NULL;
  side_exec(db, sql);
  return reopen(f, keep_count, keep_age_s);
}

static long side_count(sqlite3 *db, const char *sql)
{
  sqlite3_stmt *st = NULL;
  long n;

  assert_int_equal(sqlite3_prepare_v2(db, sql, -1, &st, NULL), SQLITE_OK);
  assert_int_equal(sqlite3_step(st), SQLITE_ROW);
  n = (long)sqlite3_column_int64(st, 0);
  sqlite3_finalize(st);
  return n;
}

/* Asserts that sql answers one row whose first column is the text want. */
static void side_text(sqlite3 *db, const char *sql, const char *want)
{
  sqlite3_stmt *st = NULL;

  assert_int_equal(sqlite3_prepare_v2(db, sql, -1, &st, NULL), SQLITE_OK);
  assert_int_equal(sqlite3_step(st), SQLITE_ROW);
  assert_string_equal((const char *)sqlite3_column_text(st, 0), want);
  sqlite3_finalize(st);
}

static void test_seqs_gap_free_per_user(void **state)
{
  fixture *f = *state;
  sql_store *s = reopen(f, 0, 0);
  uint64_t seqs[2];
  char id[24];
  got g = {0};

  for (int i = 1; i <= 10; i++) {
    snprintf(id, sizeof id, "m%d", i);
    assert_int_equal(send1(s, id, "alice", "bob", NULL, seqs, NULL), IMD_STORE_OK);
    assert_int_equal(seqs[0], i);
    assert_int_equal(seqs[1], i);
    if (i % 3 == 0)
      assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  }
  /* Other users count on their own. */
  assert_int_equal(send1(s, "m11", "alice", "dave", NULL, seqs, NULL), IMD_STORE_OK);
  assert_int_equal(seqs[0], 1);
  assert_int_equal(seqs[1], 11);
  assert_int_equal(put(s, "m12", "carol", 1000), 1);
  assert_int_equal(put(s, "m13", "bob", 1000), 11);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);

  imd_sync_info info = sync_all(s, "alice", 0, 0, &g);
  assert_int_equal(g.n, 11);
  for (size_t i = 0; i < g.n; i++)
    assert_int_equal(g.e[i].seq, i + 1);
  assert_string_equal(g.e[10].id, "m11");
  assert_int_equal(info.last, 11);
  assert_int_equal(info.upto, 11);
  assert_false(info.more);
  assert_false(info.gap);
  assert_int_equal(info.trimmed, 0);
  info = sync_all(s, "bob", 0, 0, &g);
  assert_int_equal(g.n, 11);
  assert_string_equal(g.e[10].id, "m13");
  info = sync_all(s, "dave", 0, 0, &g);
  assert_int_equal(g.n, 1);
  assert_int_equal(info.last, 1);
  /* a new file has no index on msgs (nothing reads a message by its id;
   * files made before keep their UNIQUE one, test_migration_from_v2) */
  sqlite3 *db = side_open(f);
  assert_int_equal(side_count(db, "SELECT count(*) FROM sqlite_schema WHERE type = 'index'"
                                  " AND tbl_name = 'msgs'"), 0);
  sqlite3_close(db);
}

static void test_append_to_many_users(void **state)
{
  fixture *f = *state;
  sql_store *s = reopen(f, 0, 0);
  const char *members[5] = {"u1", "u2", "u3", "u4", "u5"};
  imd_store_msg m = msg("g1", "u1", NULL, NULL, 5000);
  uint64_t seqs[5];
  got g = {0};

  m.group = "team";
  assert_int_equal(sqlstore_append(s, &m, members, 5, seqs, NULL), IMD_STORE_OK);
  for (int i = 0; i < 5; i++)
    assert_int_equal(seqs[i], 1);
  m.id = "g2";
  assert_int_equal(sqlstore_append(s, &m, members + 2, 3, seqs, NULL), IMD_STORE_OK);
  for (int i = 0; i < 3; i++)
    assert_int_equal(seqs[i], 2);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);

  sync_all(s, "u2", 0, 0, &g);
  assert_int_equal(g.n, 1);
  sync_all(s, "u5", 0, 0, &g);
  assert_int_equal(g.n, 2);
  assert_string_equal(g.e[1].id, "g2");
  assert_true(g.e[1].has_group);
  assert_string_equal(g.e[1].group, "team");
  assert_false(g.e[1].has_to);
  assert_int_equal(g.e[1].ts, 5000);

  /* The message is stored once, however many inboxes hold it; the inbox
   * entries wait in memory (fewer than 32 per user) until a flush. */
  sqlite3 *db = side_open(f);
  assert_int_equal(side_count(db, "SELECT count(*) FROM msgs"), 2);
  assert_int_equal(side_count(db, "SELECT count(*) FROM inbox"), 0);
  assert_int_equal(sqlstore_index_pending(s), 8);
  assert_int_equal(sqlstore_index_flush(s), IMD_STORE_OK);
  assert_int_equal(sqlstore_index_pending(s), 0);
  assert_int_equal(side_count(db, "SELECT count(*) FROM inbox"), 8);
  sync_all(s, "u5", 0, 0, &g);
  assert_int_equal(g.n, 2);
  sqlite3_close(db);
}

static void test_dup_within_batch(void **state)
{
  fixture *f = *state;
  sql_store *s = reopen(f, 0, 0);
  uint64_t seqs[2];
  char dup[24] = "";

  assert_int_equal(send1(s, "m1", "alice", "bob", "c1", seqs, dup), IMD_STORE_OK);
  assert_int_equal(send1(s, "m2", "alice", "bob", "c1", seqs, dup), IMD_STORE_DUP);
  assert_string_equal(dup, "m1");
  /* The duplicate took no seq. */
  assert_int_equal(send1(s, "m3", "alice", "bob", "c2", seqs, dup), IMD_STORE_OK);
  assert_int_equal(seqs[0], 2);
  /* The key is (sender, device, cid): other senders and devices are not duplicates. */
  assert_int_equal(send1(s, "m4", "carol", "bob", "c1", seqs, dup), IMD_STORE_OK);
  imd_store_msg m = msg("m5", "alice", "c1", "bob", 1000);
  const char *uids[2] = {"bob", "alice"};
  m.device = "d2";
  assert_int_equal(sqlstore_append(s, &m, uids, 2, seqs, dup), IMD_STORE_OK);
  assert_int_equal(seqs[0], 4);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);

  got g = {0};
  imd_sync_info info = sync_all(s, "bob", 0, 0, &g);
  assert_int_equal(g.n, 4);
  assert_int_equal(info.last, 4);
  assert_string_equal(g.e[0].id, "m1");
  assert_string_equal(g.e[1].id, "m3");
}

static void test_dup_after_commit_and_reopen(void **state)
{
  fixture *f = *state;
  sql_store *s = reopen(f, 0, 0);
  uint64_t seqs[2];
  char dup[24] = "";

  assert_int_equal(send1(s, "m1", "alice", "bob", "c1", seqs, dup), IMD_STORE_OK);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  assert_int_equal(send1(s, "m2", "alice", "bob", "c1", seqs, dup), IMD_STORE_DUP);
  assert_string_equal(dup, "m1");
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);

  s = reopen(f, 0, 0);
  strcpy(dup, "");
  assert_int_equal(send1(s, "m3", "alice", "bob", "c1", seqs, dup), IMD_STORE_DUP);
  assert_string_equal(dup, "m1");
  /* A NULL dup_id is allowed; the answer is the same. */
  assert_int_equal(send1(s, "m3", "alice", "bob", "c1", seqs, NULL), IMD_STORE_DUP);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);

  got g = {0};
  imd_sync_info info = sync_all(s, "bob", 0, 0, &g);
  assert_int_equal(g.n, 1);
  assert_int_equal(info.last, 1);
  sqlite3 *db = side_open(f);
  assert_int_equal(side_count(db, "SELECT count(*) FROM msgs"), 1);
  sqlite3_close(db);
}

static void test_null_cid_never_dedupes(void **state)
{
  fixture *f = *state;
  sql_store *s = reopen(f, 0, 0);
  uint64_t seqs[2];

  for (int i = 0; i < 3; i++) {
    char id[8];
    snprintf(id, sizeof id, "m%d", i);
    assert_int_equal(send1(s, id, "alice", "bob", NULL, seqs, NULL), IMD_STORE_OK);
    assert_int_equal(seqs[0], (uint64_t)i + 1);
  }
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);

  got g = {0};
  sync_all(s, "bob", 0, 0, &g);
  assert_int_equal(g.n, 3);
  assert_false(g.e[0].has_cid);
}

/* Uncommitted appends vanish with close; the seqs they took are reused. */
static void test_close_without_commit(void **state)
{
  fixture *f = *state;
  sql_store *s = reopen(f, 0, 0);
  uint64_t seqs[2];
  char dup[24];

  assert_int_equal(send1(s, "m1", "alice", "bob", "c1", seqs, dup), IMD_STORE_OK);
  assert_int_equal(send1(s, "m2", "alice", "bob", "c2", seqs, dup), IMD_STORE_OK);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  assert_int_equal(send1(s, "m3", "alice", "bob", "c3", seqs, dup), IMD_STORE_OK);
  assert_int_equal(seqs[0], 3);
  assert_int_equal(sqlstore_mark_delivered(s, "bob", "d1", 3), IMD_STORE_OK);
  assert_true(sqlstore_in_batch(s));

  s = reopen(f, 0, 0);
  assert_false(sqlstore_in_batch(s));
  /* c3 was never stored, so it is no duplicate now. */
  assert_int_equal(send1(s, "m4", "alice", "bob", "c3", seqs, dup), IMD_STORE_OK);
  assert_int_equal(seqs[0], 3);
  assert_int_equal(seqs[1], 3);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);

  got g = {0};
  uint64_t last = 0;
  sync_all(s, "bob", 0, 0, &g);
  assert_int_equal(g.n, 3);
  assert_string_equal(g.e[2].id, "m4");
  assert_int_equal(sqlstore_user_state(s, "bob", &last, NULL, NULL, NULL), IMD_STORE_OK);
  assert_int_equal(last, 3);
}

/* A commit that fails rolls the batch back and hands its seqs out again. The
 * failure is a real write error: the file size limit (RLIMIT_FSIZE) is set
 * to the WAL's size, so the commit cannot append its frames (as on a full
 * disk). */
static void test_failed_commit_restores_seqs(void **state)
{
  fixture *f = *state;
  sql_store *s = reopen(f, 0, 0);
  uint64_t seqs[2];
  char dup[24];
  sqlite3 *db;

  assert_int_equal(send1(s, "m1", "alice", "bob", NULL, seqs, NULL), IMD_STORE_OK);
  assert_int_equal(send1(s, "m2", "alice", "bob", NULL, seqs, NULL), IMD_STORE_OK);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);

  char wal[128];
  struct stat wst;
  struct rlimit old, lim;
  snprintf(wal, sizeof wal, "%s-wal", f->path);
  assert_int_equal(stat(wal, &wst), 0);
  assert_int_equal(getrlimit(RLIMIT_FSIZE, &old), 0);
  lim = old;
  lim.rlim_cur = (rlim_t)wst.st_size;
  signal(SIGXFSZ, SIG_IGN);
  assert_int_equal(send1(s, "m3", "alice", "bob", "c3", seqs, dup), IMD_STORE_OK);
  assert_int_equal(seqs[0], 3);
  assert_int_equal(send1(s, "m4", "alice", "bob", NULL, seqs, NULL), IMD_STORE_OK);
  assert_int_equal(seqs[0], 4);
  assert_int_equal(sqlstore_mark_delivered(s, "bob", "d1", 4), IMD_STORE_OK);
  assert_int_equal(setrlimit(RLIMIT_FSIZE, &lim), 0);
  int rc = sqlstore_commit(s);
  assert_int_equal(setrlimit(RLIMIT_FSIZE, &old), 0);
  assert_int_equal(rc, IMD_STORE_EIO);
  assert_true(strlen(sqlstore_error(s)) > 0);
  assert_false(sqlstore_in_batch(s));

  assert_int_equal(send1(s, "m5", "alice", "bob", "c3", seqs, dup), IMD_STORE_OK);
  assert_int_equal(seqs[0], 3);
  assert_int_equal(seqs[1], 3);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);

  got g = {0};
  imd_sync_info info = sync_all(s, "bob", 0, 0, &g);
  assert_int_equal(g.n, 3);
  assert_int_equal(info.last, 3);
  assert_string_equal(g.e[2].id, "m5");
  /* users rows are written lazily: at the latest by a clean close */
  s = reopen(f, 0, 0);
  db = side_open(f);
  assert_int_equal(side_count(db, "SELECT count(*) FROM cursors"), 0);
  assert_int_equal(side_count(db, "SELECT last_seq FROM users WHERE uid = 'alice'"), 3);
  sqlite3_close(db);
}

/* A failing append undoes itself alone: the batch around it survives. */
static void test_failed_append_keeps_batch(void **state)
{
  fixture *f = *state;
  sql_store *s = reopen(f, 0, 0);
  const char *uids[2] = {"alice", "bad"};
  imd_store_msg m = msg("m2", "system", "k2", NULL, 1000);
  uint64_t seqs[2];
  char dup[24];
  sqlite3 *db = side_open(f);

  side_exec(db, "CREATE TRIGGER no_bad BEFORE INSERT ON msgs WHEN NEW.id = 'm2'"
                " BEGIN SELECT RAISE(ABORT, 'bad message'); END");
  side_exec(db, "CREATE TRIGGER no_msg BEFORE INSERT ON msgs WHEN NEW.id = 'refused'"
                " BEGIN SELECT RAISE(ABORT, 'refused message'); END");
  assert_int_equal(put(s, "m1", "alice", 1000), 1);
  assert_int_equal(sqlstore_append(s, &m, uids, 2, seqs, dup), IMD_STORE_EIO);
  assert_non_null(strstr(sqlstore_error(s), "bad message"));
  assert_true(sqlstore_in_batch(s));
  /* The message row refused (after its key was claimed): also undone alone. */
  assert_int_equal(put(s, "m3", "alice", 1000), 2);
  m.id = "refused";
  assert_int_equal(sqlstore_append(s, &m, uids, 1, seqs, dup), IMD_STORE_EIO);
  assert_non_null(strstr(sqlstore_error(s), "refused message"));
  /* Neither failure left its key or seq behind. */
  m.id = "m4";
  assert_int_equal(sqlstore_append(s, &m, uids, 1, seqs, dup), IMD_STORE_OK);
  assert_int_equal(seqs[0], 3);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  side_exec(db, "DROP TRIGGER no_bad");
  side_exec(db, "DROP TRIGGER no_msg");

  got g = {0};
  imd_sync_info info = sync_all(s, "alice", 0, 0, &g);
  assert_int_equal(g.n, 3);
  assert_int_equal(info.last, 3);
  assert_string_equal(g.e[0].id, "m1");
  assert_string_equal(g.e[1].id, "m3");
  assert_string_equal(g.e[2].id, "m4");
  info = sync_all(s, "bad", 0, 0, &g);
  assert_int_equal(g.n, 0);
  assert_int_equal(info.last, 0);
  assert_int_equal(side_count(db, "SELECT count(*) FROM msgs"), 3);
  sqlite3_close(db);
}

/* On some errors (disk full, I/O) SQLite rolls the whole transaction back by
 * itself; a trigger doing RAISE(ROLLBACK) does the same on demand. The batch
 * is then gone, and the caller must hear so at commit. */
static void test_batch_lost_to_sqlite(void **state)
{
  fixture *f = *state;
  sql_store *s = reopen(f, 0, 0);
  const char *boom[1] = {"boom"};
  imd_store_msg m = msg("m3", "system", NULL, NULL, 1000);
  imd_sync_info info;
  uint64_t seq;
  sqlite3 *db = side_open(f);
  got g = {0};

  side_exec(db, "CREATE TRIGGER boom BEFORE INSERT ON msgs WHEN NEW.id = 'm3'"
                " BEGIN SELECT RAISE(ROLLBACK, 'boom'); END");
  assert_int_equal(put(s, "m1", "alice", 1000), 1);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  assert_int_equal(put(s, "m2", "alice", 1000), 2);
  assert_int_equal(sqlstore_append(s, &m, boom, 1, &seq, NULL), IMD_STORE_EIO);
  assert_non_null(strstr(sqlstore_error(s), "boom"));
  /* Still "in a batch" until the failure is reported by commit. */
  assert_true(sqlstore_in_batch(s));
  m.id = "m4";
  m.to = "alice";
  assert_int_equal(sqlstore_append(s, &m, (const char *const[]){"alice"}, 1, &seq, NULL),
                   IMD_STORE_EIO);
  assert_int_equal(sqlstore_mark_delivered(s, "alice", "d1", 1), IMD_STORE_EIO);
  assert_int_equal(sqlstore_sync(s, "alice", 0, 0, NULL, NULL, &info), IMD_STORE_EBATCH);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_EIO);
  assert_non_null(strstr(sqlstore_error(s), "boom"));
  assert_false(sqlstore_in_batch(s));
  side_exec(db, "DROP TRIGGER boom");

  /* m2's seq is handed out again; boom's users row went with the batch
   * that made it, and boom gets a new one */
  assert_int_equal(put(s, "m5", "alice", 1000), 2);
  assert_int_equal(put(s, "b1", "boom", 1000), 1);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  info = sync_all(s, "alice", 0, 0, &g);
  assert_int_equal(g.n, 2);
  assert_string_equal(g.e[1].id, "m5");
  assert_int_equal(info.last, 2);
  info = sync_all(s, "boom", 0, 0, &g);
  assert_int_equal(g.n, 1);
  assert_string_equal(g.e[0].id, "b1");
  assert_int_equal(info.last, 1);
  assert_int_equal(side_count(db, "SELECT count(*) FROM users WHERE uid = 'boom'"), 1);

  /* The same through a delivered mark, which fails when it is written;
   * the marks waiting with it are lost too (a device only resyncs more). */
  side_exec(db, "CREATE TRIGGER boom BEFORE INSERT ON cursors WHEN NEW.device = 'boom'"
                " BEGIN SELECT RAISE(ROLLBACK, 'boom'); END");
  assert_int_equal(put(s, "m6", "alice", 1000), 3);
  assert_int_equal(sqlstore_mark_delivered(s, "alice", "boom", 1), IMD_STORE_OK);
  assert_int_equal(sqlstore_mark_delivered(s, "alice", "d2", 1), IMD_STORE_OK);
  assert_int_equal(sqlstore_marks_pending(s), 2);
  assert_int_equal(sqlstore_marks_write(s), IMD_STORE_EIO);
  assert_int_equal(sqlstore_marks_pending(s), 0);
  assert_true(sqlstore_in_batch(s));
  assert_int_equal(sqlstore_commit(s), IMD_STORE_EIO);
  assert_int_equal(side_count(db, "SELECT count(*) FROM cursors"), 0);
  side_exec(db, "DROP TRIGGER boom");
  assert_int_equal(put(s, "m7", "alice", 1000), 3);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  sqlite3_close(db);
}

static void test_sync_paging(void **state)
{
  fixture *f = *state;
  sql_store *s = reopen(f, 0, 0);
  imd_sync_info info;
  got g = {0};

  for (int i = 1; i <= 25; i++) {
    char id[8];
    snprintf(id, sizeof id, "m%d", i);
    put(s, id, "bob", 1000);
  }
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);

  info = sync_all(s, "bob", 0, 10, &g);
  assert_int_equal(g.n, 10);
  assert_int_equal(g.e[0].seq, 1);
  assert_int_equal(info.upto, 10);
  assert_true(info.more);
  assert_int_equal(info.last, 25);
  info = sync_all(s, "bob", info.upto, 10, &g);
  assert_int_equal(g.n, 10);
  assert_int_equal(g.e[0].seq, 11);
  assert_string_equal(g.e[0].id, "m11");
  assert_int_equal(info.upto, 20);
  assert_true(info.more);
  info = sync_all(s, "bob", info.upto, 10, &g);
  assert_int_equal(g.n, 5);
  assert_int_equal(info.upto, 25);
  assert_false(info.more);
  info = sync_all(s, "bob", 25, 10, &g);
  assert_int_equal(g.n, 0);
  assert_int_equal(info.upto, 25);
  assert_false(info.more);
  /* A limit that ends exactly at the last entry leaves nothing more. */
  info = sync_all(s, "bob", 15, 10, &g);
  assert_int_equal(g.n, 10);
  assert_false(info.more);

  /* The callback stopping early reads like a limit. */
  g.stop_after = 3;
  info = sync_all(s, "bob", 5, 0, &g);
  assert_int_equal(g.n, 3);
  assert_int_equal(info.upto, 8);
  assert_true(info.more);
  g.stop_after = 0;

  /* NULL info and NULL fn are allowed. */
  assert_int_equal(sqlstore_sync(s, "bob", 0, 0, NULL, NULL, NULL), IMD_STORE_OK);
}

static void test_sync_unknown_user(void **state)
{
  fixture *f = *state;
  sql_store *s = reopen(f, 0, 0);
  imd_sync_info info;
  uint64_t last = 9, trimmed = 9;
  got g = {0};

  info = sync_all(s, "nobody", 0, 10, &g);
  assert_int_equal(g.n, 0);
  assert_int_equal(info.last, 0);
  assert_int_equal(info.upto, 0);
  assert_int_equal(info.trimmed, 0);
  assert_false(info.more);
  assert_false(info.gap);
  info = sync_all(s, "nobody", 5, 10, &g);
  assert_int_equal(info.upto, 5);
  assert_int_equal(sqlstore_user_state(s, "nobody", &last, &trimmed, NULL, NULL), IMD_STORE_OK);
  assert_int_equal(last, 0);
  assert_int_equal(trimmed, 0);
}

typedef struct devices {
  size_t n;
  char name[8][16];
  uint64_t seq[8];
} devices;

static void on_device(void *ctx, const char *device, uint64_t seq)
{
  devices *d = ctx;

  assert_true(d->n < 8 && strlen(device) < 16);
  strcpy(d->name[d->n], device);
  d->seq[d->n++] = seq;
}

/* Acks for one device gather into one pending mark, written once; at
 * 65,536 devices waiting, the next mark writes them all first. */
static void test_marks_wait_in_memory(void **state)
{
  fixture *f = *state;
  sql_store *s = reopen(f, 0, 0);
  sqlite3 *db = side_open(f);
  char dev[16];

  for (int i = 1; i <= 3; i++)
    put(s, i == 1 ? "m1" : i == 2 ? "m2" : "m3", "bob", 1000);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  for (uint64_t q = 1; q <= 3; q++)
    assert_int_equal(sqlstore_mark_delivered(s, "bob", "phone", q), IMD_STORE_OK);
  assert_int_equal(sqlstore_mark_delivered(s, "bob", "phone", 2), IMD_STORE_OK);
  assert_int_equal(sqlstore_marks_pending(s), 1);
  assert_false(sqlstore_in_batch(s));
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  assert_int_equal(side_count(db, "SELECT count(*) FROM cursors"), 0);
  assert_int_equal(sqlstore_marks_write(s), IMD_STORE_OK);
  assert_int_equal(sqlstore_marks_pending(s), 0);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  assert_int_equal(side_count(db, "SELECT delivered FROM cursors WHERE uid = 'bob'"), 3);
  assert_int_equal(sqlstore_marks_write(s), IMD_STORE_OK); /* nothing pending: no batch */
  assert_false(sqlstore_in_batch(s));

  for (int i = 0; i < 65536; i++) {
    snprintf(dev, sizeof dev, "d%d", i);
    assert_int_equal(sqlstore_mark_delivered(s, "bob", dev, 1), IMD_STORE_OK);
  }
  assert_int_equal(sqlstore_marks_pending(s), 65536);
  assert_false(sqlstore_in_batch(s));
  assert_int_equal(sqlstore_mark_delivered(s, "bob", "one-more", 2), IMD_STORE_OK);
  assert_int_equal(sqlstore_marks_pending(s), 1);
  assert_true(sqlstore_in_batch(s));
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  assert_int_equal(side_count(db, "SELECT count(*) FROM cursors"), 65537);
  /* the last one is written by a clean close */
  s = reopen(f, 0, 0);
  assert_int_equal(side_count(db, "SELECT delivered FROM cursors WHERE device = 'one-more'"), 2);
  sqlite3_close(db);
}

/* Names longer than the mark's stack key (and one far longer than a
 * thread's stack) are marked and written like short ones. */
static void test_marks_of_long_names(void **state)
{
  fixture *f = *state;
  sql_store *s = reopen(f, 0, 0);
  sqlite3 *db = side_open(f);
  enum { HUGE = 12 << 20 };
  char *uid = malloc(HUGE + 1), dev[300];

  assert_non_null(uid);
  memset(uid, 'u', HUGE);
  uid[HUGE] = '\0';
  memset(dev, 'd', sizeof dev - 1);
  dev[sizeof dev - 1] = '\0';
  put(s, "m1", "bob", 1000);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  assert_int_equal(sqlstore_mark_delivered(s, "bob", dev, 1), IMD_STORE_OK);
  assert_int_equal(sqlstore_mark_delivered(s, "bob", dev, 1), IMD_STORE_OK);
  assert_int_equal(sqlstore_mark_delivered(s, uid, "phone", 5), IMD_STORE_OK);
  assert_int_equal(sqlstore_marks_pending(s), 2);
  assert_int_equal(sqlstore_marks_write(s), IMD_STORE_OK);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  assert_int_equal(side_count(db, "SELECT delivered FROM cursors WHERE length(device) = 299"), 1);
  /* cut to that user's last seq: nothing stored for it */
  assert_int_equal(side_count(db, "SELECT delivered FROM cursors WHERE length(uid) > 1000"), 0);
  assert_int_equal(side_count(db, "SELECT count(*) FROM cursors"), 2);
  free(uid);
  sqlite3_close(db);
}

static void test_reads_refuse_open_batch(void **state)
{
  fixture *f = *state;
  sql_store *s = reopen(f, 10, 0);
  imd_sync_info info;
  uint64_t last;

  assert_false(sqlstore_in_batch(s));
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK); /* nothing to commit */
  put(s, "m1", "bob", 1000);
  assert_true(sqlstore_in_batch(s));
  assert_int_equal(sqlstore_sync(s, "bob", 0, 0, collect, NULL, &info), IMD_STORE_EBATCH);
  assert_true(strlen(sqlstore_error(s)) > 0);
  assert_int_equal(sqlstore_user_state(s, "bob", &last, NULL, NULL, NULL), IMD_STORE_EBATCH);
  assert_int_equal(sqlstore_trim(s, 1000), IMD_STORE_EBATCH);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  assert_false(sqlstore_in_batch(s));

  /* A delivered mark waits in memory: no batch, reads run. A read of the
   * marks writes them into a batch and sees them there; reads need not
   * wait for that batch (marks alone never force a commit). */
  assert_int_equal(sqlstore_mark_delivered(s, "bob", "d1", 1), IMD_STORE_OK);
  assert_false(sqlstore_in_batch(s));
  got g = {0};
  info = sync_all(s, "bob", 0, 0, &g);
  assert_int_equal(g.n, 1);
  devices d = {0};
  assert_int_equal(sqlstore_user_state(s, "bob", &last, NULL, on_device, &d), IMD_STORE_OK);
  assert_int_equal(d.n, 1);
  assert_int_equal(d.seq[0], 1);
  assert_true(sqlstore_in_batch(s));
  assert_int_equal(sqlstore_marks_pending(s), 0);
  info = sync_all(s, "bob", 0, 0, &g);
  assert_int_equal(sqlstore_trim(s, 1000), IMD_STORE_EBATCH);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
}

static void test_user_state_lists_devices(void **state)
{
  fixture *f = *state;
  sql_store *s = reopen(f, 0, 0);
  uint64_t last = 0, trimmed = 9;
  devices d = {0};
  char id[8];

  for (int i = 1; i <= 6; i++) {
    snprintf(id, sizeof id, "m%d", i);
    put(s, id, "bob", 1000);
  }
  assert_int_equal(sqlstore_mark_delivered(s, "bob", "phone", 5), IMD_STORE_OK);
  assert_int_equal(sqlstore_mark_delivered(s, "bob", "phone", 3), IMD_STORE_OK);
  assert_int_equal(sqlstore_mark_delivered(s, "bob", "", 2), IMD_STORE_OK);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  assert_int_equal(sqlstore_mark_delivered(s, "bob", "laptop", 1), IMD_STORE_OK);
  assert_int_equal(sqlstore_mark_delivered(s, "bob", "phone", 4), IMD_STORE_OK);
  assert_int_equal(sqlstore_mark_delivered(s, "alice", "phone", 1), IMD_STORE_OK);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);

  assert_int_equal(sqlstore_user_state(s, "bob", &last, &trimmed, on_device, &d), IMD_STORE_OK);
  assert_int_equal(last, 6);
  assert_int_equal(trimmed, 0);
  assert_int_equal(d.n, 3);
  assert_string_equal(d.name[0], "");
  assert_int_equal(d.seq[0], 2);
  assert_string_equal(d.name[1], "laptop");
  assert_int_equal(d.seq[1], 1);
  assert_string_equal(d.name[2], "phone");
  assert_int_equal(d.seq[2], 5); /* 3 and 4 came later but lower */

  assert_int_equal(sqlstore_mark_delivered(s, "bob", "phone", 6), IMD_STORE_OK);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  s = reopen(f, 0, 0);
  memset(&d, 0, sizeof d);
  assert_int_equal(sqlstore_user_state(s, "bob", NULL, NULL, on_device, &d), IMD_STORE_OK);
  assert_int_equal(d.n, 3);
  assert_int_equal(d.seq[2], 6);

  /* An ack past what was stored moves the device only to the user's last
   * seq, the open batch's appends included; nobody's seq moves with it. */
  assert_int_equal(sqlstore_mark_delivered(s, "bob", "tablet", 100), IMD_STORE_OK);
  assert_int_equal(sqlstore_mark_delivered(s, "nobody", "tablet", 5), IMD_STORE_OK);
  assert_int_equal(put(s, "m7", "bob", 1000), 7);
  assert_int_equal(sqlstore_mark_delivered(s, "bob", "watch", 100), IMD_STORE_OK);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  memset(&d, 0, sizeof d);
  assert_int_equal(sqlstore_user_state(s, "bob", &last, NULL, on_device, &d), IMD_STORE_OK);
  assert_int_equal(last, 7);
  assert_int_equal(d.n, 5);
  assert_string_equal(d.name[3], "tablet");
  assert_int_equal(d.seq[3], 6);
  assert_string_equal(d.name[4], "watch");
  assert_int_equal(d.seq[4], 7);
  memset(&d, 0, sizeof d);
  assert_int_equal(sqlstore_user_state(s, "nobody", &last, NULL, on_device, &d), IMD_STORE_OK);
  assert_int_equal(last, 0);
  assert_int_equal(d.seq[0], 0);
}

static void test_trim_by_count(void **state)
{
  fixture *f = *state;
  sql_store *s = reopen(f, 3, 0);
  uint64_t seqs[2], last, trimmed;
  char id[24], dup[24];
  imd_sync_info info;
  got g = {0};

  for (int i = 1; i <= 10; i++) {
    snprintf(id, sizeof id, "m%d", i);
    if (i <= 2)
      assert_int_equal(send1(s, id, "alice", "bob", id, seqs, dup), IMD_STORE_OK);
    else
      put(s, id, "bob", 1000);
  }
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  /* bob: 10 entries, 7 over the limit; alice: 2, under it. */
  assert_int_equal(sqlstore_trim(s, 5000), 7);
  assert_int_equal(sqlstore_trim(s, 5000), 0);

  info = sync_all(s, "bob", 0, 0, &g);
  assert_true(info.gap);
  assert_int_equal(info.trimmed, 7);
  assert_int_equal(info.last, 10);
  assert_int_equal(info.upto, 10);
  assert_false(info.more);
  assert_int_equal(g.n, 3);
  assert_int_equal(g.e[0].seq, 8);
  assert_string_equal(g.e[0].id, "m8");
  info = sync_all(s, "bob", 7, 2, &g);
  assert_false(info.gap);
  assert_int_equal(g.n, 2);
  assert_true(info.more);
  info = sync_all(s, "bob", 3, 0, &g);
  assert_true(info.gap);
  assert_int_equal(g.n, 3);
  info = sync_all(s, "alice", 0, 0, &g);
  assert_false(info.gap);
  assert_int_equal(g.n, 2);

  assert_int_equal(sqlstore_user_state(s, "bob", &last, &trimmed, NULL, NULL), IMD_STORE_OK);
  assert_int_equal(last, 10);
  assert_int_equal(trimmed, 7);

  /* Only messages no inbox holds are dropped: m1, m2 are in alice's still. */
  sqlite3 *db = side_open(f);
  assert_int_equal(side_count(db, "SELECT count(*) FROM msgs"), 5);
  assert_int_equal(side_count(db, "SELECT count(*) FROM inbox"), 5);

  /* Seqs go on after a trim; and a second trim drops what is over again. */
  assert_int_equal(put(s, "m11", "bob", 1000), 11);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  assert_int_equal(sqlstore_trim(s, 5000), 1);
  info = sync_all(s, "bob", 0, 0, &g);
  assert_int_equal(info.trimmed, 8);
  assert_int_equal(g.n, 3);

  /* A tighter limit after a reopen: bob keeps 11, alice keeps 2. */
  s = reopen(f, 1, 0);
  assert_int_equal(sqlstore_trim(s, 5000), 3);
  info = sync_all(s, "alice", 0, 0, &g);
  assert_int_equal(info.trimmed, 1);
  assert_int_equal(g.n, 1);
  assert_string_equal(g.e[0].id, "m2");
  assert_int_equal(side_count(db, "SELECT count(*) FROM msgs"), 2); /* m2 and m11 */

  /* m1 is gone from every inbox, but without an age limit its
   * idempotency key stays. */
  assert_int_equal(send1(s, "m12", "alice", "bob", "m1", seqs, dup), IMD_STORE_DUP);
  assert_string_equal(dup, "m1");
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  assert_int_equal(side_count(db, "SELECT count(*) FROM msgs"), 2);
  sqlite3_close(db);
}

static void test_trim_by_age(void **state)
{
  fixture *f = *state;
  const uint64_t t0 = 1700000000000;
  sql_store *s = reopen(f, 0, 60);
  uint64_t seqs[2];
  char dup[24];
  imd_sync_info info;
  got g = {0};
  imd_store_msg m;
  const char *bob[1] = {"bob"};

  /* bob's entries at t0, +10 s, +20 s, +100 s; carol's at +5 s and +80 s. */
  static const uint64_t at[4] = {0, 10000, 20000, 100000};
  for (int i = 0; i < 4; i++) {
    char id[8], cid[8];
    snprintf(id, sizeof id, "b%d", i + 1);
    snprintf(cid, sizeof cid, "k%d", i + 1);
    m = msg(id, "alice", cid, "bob", t0 + at[i]);
    assert_int_equal(sqlstore_append(s, &m, bob, 1, seqs, NULL), IMD_STORE_OK);
  }
  put(s, "c1", "carol", t0 + 5000);
  put(s, "c2", "carol", t0 + 80000);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);

  /* now = t0 + 90 s with a 60 s limit: everything before t0 + 30 s goes. */
  assert_int_equal(sqlstore_trim(s, t0 + 90000), 4);
  info = sync_all(s, "bob", 0, 0, &g);
  assert_int_equal(info.trimmed, 3);
  assert_true(info.gap);
  assert_int_equal(g.n, 1);
  assert_string_equal(g.e[0].id, "b4");
  info = sync_all(s, "carol", 0, 0, &g);
  assert_int_equal(info.trimmed, 1);
  assert_int_equal(g.n, 1);

  /* The keys of the expired messages are gone, the younger ones stay. */
  m = msg("b5", "alice", "k1", "bob", t0 + 95000);
  assert_int_equal(sqlstore_append(s, &m, bob, 1, seqs, dup), IMD_STORE_OK);
  assert_int_equal(seqs[0], 5);
  m = msg("b6", "alice", "k4", "bob", t0 + 95000);
  assert_int_equal(sqlstore_append(s, &m, bob, 1, seqs, dup), IMD_STORE_DUP);
  assert_string_equal(dup, "b4");
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);

  /* A clock that stepped back: an older ts after a newer one. Trimming
   * drops a prefix: the expired entry 7 waits for the younger entry 6. */
  assert_int_equal(put(s, "b7", "bob", t0 + 200000), 6);
  assert_int_equal(put(s, "b8", "bob", t0 + 150000), 7);
  assert_int_equal(put(s, "b9", "bob", t0 + 300000), 8);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  /* Cutoff t0 + 150.001 s: bob's 4 and 5 and carol's 2 go. */
  assert_int_equal(sqlstore_trim(s, t0 + 150000 + 60000 + 1), 3);
  info = sync_all(s, "bob", 0, 0, &g);
  assert_int_equal(info.trimmed, 5);
  assert_int_equal(g.n, 3);
  /* Cutoff t0 + 200.001 s: bob's 6 and 7. */
  assert_int_equal(sqlstore_trim(s, t0 + 200000 + 60000 + 1), 2);
  info = sync_all(s, "bob", 0, 0, &g);
  assert_int_equal(info.trimmed, 7);
  assert_int_equal(g.n, 1);
  assert_string_equal(g.e[0].id, "b9");
  /* carol has nothing left: upto is the trimmed mark, not since. */
  info = sync_all(s, "carol", 0, 0, &g);
  assert_int_equal(g.n, 0);
  assert_int_equal(info.last, 2);
  assert_int_equal(info.trimmed, 2);
  assert_int_equal(info.upto, 2);
  assert_true(info.gap);
  assert_false(info.more);

  /* Too early for anything to have expired. */
  assert_int_equal(sqlstore_trim(s, 1000), 0);
}

/* Retention by age finds its users through users.oldest (the ts of the
 * oldest entry held): set when an empty inbox gets an entry, moved by each
 * trim, NULL when the inbox is empty, and rebuilt after a crash. */
static void test_age_queue(void **state)
{
  fixture *f = *state;
  sql_store *s = reopen(f, 0, 60);
  sqlite3 *db = side_open(f);
  const long limit = 60000;

  assert_int_equal(put(s, "b1", "bob", 1000), 1);
  assert_int_equal(put(s, "b2", "bob", 2000), 2);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  assert_int_equal(sqlstore_trim(s, 999 + limit), 0);
  assert_int_equal(side_count(db, "SELECT oldest FROM users WHERE uid = 'bob'"), 1000);
  assert_int_equal(sqlstore_trim(s, 1500 + limit), 1);
  assert_int_equal(side_count(db, "SELECT oldest FROM users WHERE uid = 'bob'"), 2000);
  assert_int_equal(sqlstore_trim(s, 3000 + limit), 1);
  assert_int_equal(side_count(db, "SELECT count(*) FROM users WHERE uid = 'bob'"
                                  " AND oldest IS NULL AND trimmed = 2"), 1);
  /* an emptied inbox gets an entry: queued again at the next pass */
  assert_int_equal(put(s, "b3", "bob", 5000), 3);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  assert_int_equal(sqlstore_trim(s, 4000 + limit), 0);
  assert_int_equal(side_count(db, "SELECT oldest FROM users WHERE uid = 'bob'"), 5000);
  /* more entries keep the oldest */
  assert_int_equal(put(s, "b4", "bob", 7000), 4);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  assert_int_equal(sqlstore_trim(s, 4000 + limit), 0);
  assert_int_equal(side_count(db, "SELECT oldest FROM users WHERE uid = 'bob'"), 5000);

  /* a crash that lost the queue: the next open rebuilds it */
  s = reopen_after(f, db, "UPDATE meta SET v = 0 WHERE k = 'clean'; UPDATE users SET oldest = NULL",
                   0, 60);
  assert_int_equal(side_count(db, "SELECT oldest FROM users WHERE uid = 'bob'"), 5000);
  assert_int_equal(sqlstore_trim(s, 6000 + limit), 1);
  assert_int_equal(side_count(db, "SELECT oldest FROM users WHERE uid = 'bob'"), 7000);
  sqlite3_close(db);
}

/* Expired idempotency keys go by a sweep in key order: per pass, twice the
 * keys added since the last one, at least 4096; it goes round and starts
 * over. Keys not expired stay, and still refuse a repeat. */
static void test_idem_sweep(void **state)
{
  fixture *f = *state;
  sql_store *s = reopen(f, 0, 60);
  sqlite3 *db = side_open(f);
  const char *bob[1] = {"bob"};
  uint64_t seq;
  char id[16], cid[16], dup[24];

  for (int i = 0; i < 10000; i++) {
    snprintf(id, sizeof id, "m%d", i);
    snprintf(cid, sizeof cid, "k%05d", i);
    imd_store_msg m = msg(id, "alice", cid, "bob", 200000);
    assert_int_equal(sqlstore_append(s, &m, bob, 1, &seq, NULL), IMD_STORE_OK);
  }
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  /* nothing expired: the pass looks at all 10,000 (2 x 10,000 asked) */
  assert_int_equal(sqlstore_trim(s, 200000), 0);
  assert_int_equal(side_count(db, "SELECT count(*) FROM idem"), 10000);
  imd_store_msg again = msg("x", "alice", "k09999", "bob", 200001);
  assert_int_equal(sqlstore_append(s, &again, bob, 1, &seq, dup), IMD_STORE_DUP);
  assert_string_equal(dup, "m9999");
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  /* all expired, no key added since: each pass sweeps 4096 keys on from
   * where the last one stopped, and starts over after the last key */
  sqlite3_int64 now = 200000 + 60000 + 1;
  long left = 10000;
  for (int passes = 1; left > 0; passes++) {
    assert_true(passes <= 4);
    assert_true(sqlstore_trim(s, now) >= 0);
    long n = side_count(db, "SELECT count(*) FROM idem");
    assert_true(n < left && left - n <= 4096);
    left = n;
  }
  /* round again: a new key is swept too */
  imd_store_msg late = msg("y", "alice", "k00000", "bob", 300000);
  assert_int_equal(sqlstore_append(s, &late, bob, 1, &seq, NULL), IMD_STORE_OK);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  assert_true(sqlstore_trim(s, 300000 + 60000 + 1) >= 0);
  assert_int_equal(side_count(db, "SELECT count(*) FROM idem"), 0);
  sqlite3_close(db);
}

/* A pass in bounded steps: each drops the entries of at most 1,024 users,
 * at most 64 each; batches go on between the steps. */
static void test_trim_in_steps(void **state)
{
  fixture *f = *state;
  sql_store *s = reopen(f, 1, 0);
  sqlite3 *db = side_open(f);
  char uid[16], id[24];
  uint64_t seq;
  bool more = false;

  /* 1,030 users one over the limit, and zz 99 over */
  for (int u = 0; u <= 1030; u++) {
    if (u < 1030)
      snprintf(uid, sizeof uid, "u%04d", u);
    else
      snprintf(uid, sizeof uid, "zz");
    for (int i = 0; i < (u < 1030 ? 2 : 100); i++) {
      snprintf(id, sizeof id, "%d-%d", u, i);
      imd_store_msg m = msg(id, "system", NULL, uid, 1000);
      const char *to[1] = {uid};
      assert_int_equal(sqlstore_append(s, &m, to, 1, &seq, NULL), IMD_STORE_OK);
    }
  }
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  assert_int_equal(sqlstore_trim_start(s, 5000), 1031);
  assert_int_equal(sqlstore_trim_step(s, &more), 1024); /* u0000..u1023 */
  assert_true(more);
  /* a batch between two steps; a step with it open is refused */
  assert_int_equal(put(s, "late", "u0000", 1000), 3);
  assert_int_equal(sqlstore_trim_step(s, &more), IMD_STORE_EBATCH);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  assert_int_equal(sqlstore_trim_step(s, &more), 6 + 64); /* u1024..u1029, zz's first 64 */
  assert_true(more);
  assert_int_equal(sqlstore_trim_step(s, &more), 35);
  assert_false(more);
  /* (u0000's row still says last 2: users rows are written at a pass's start) */
  assert_int_equal(side_count(db, "SELECT count(*) FROM users WHERE last_seq - trimmed = 1"), 1031);
  assert_int_equal(side_count(db, "SELECT trimmed FROM users WHERE uid = 'zz'"), 99);
  assert_int_equal(side_count(db, "SELECT count(*) FROM msgs"), 1031 + 1);
  /* the next pass finds u0000's one more */
  assert_int_equal(sqlstore_trim(s, 5000), 1);
  sqlite3_close(db);
}

/* A step that fails rolls back alone: nothing of it is kept, the pass
 * can go on once the cause is gone, and batches are not affected. */
static void test_trim_step_fails(void **state)
{
  fixture *f = *state;
  sql_store *s = reopen(f, 1, 0);
  sqlite3 *db = side_open(f);
  bool more = true;

  for (int i = 0; i < 3; i++) {
    char id[8];
    snprintf(id, sizeof id, "b%d", i);
    put(s, id, "bob", 1000);
    snprintf(id, sizeof id, "c%d", i);
    put(s, id, "carol", 1000);
  }
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  side_exec(db, "CREATE TRIGGER boom BEFORE DELETE ON inbox"
                " WHEN OLD.uk = (SELECT uk FROM users WHERE uid = 'carol')"
                " BEGIN SELECT RAISE(ABORT, 'boom'); END");
  assert_int_equal(sqlstore_trim_start(s, 5000), 2);
  assert_int_equal(sqlstore_trim_step(s, &more), IMD_STORE_EIO);
  assert_false(more);
  assert_non_null(strstr(sqlstore_error(s), "boom"));
  assert_int_equal(side_count(db, "SELECT count(*) FROM inbox"), 6); /* bob's went back too */
  /* the store goes on */
  assert_int_equal(put(s, "b3", "bob", 1000), 4);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  side_exec(db, "DROP TRIGGER boom");
  /* the list survived the rollback: the pass goes on where it was */
  assert_int_equal(sqlstore_trim_step(s, &more), 4); /* bob 1-2, carol 1-2 */
  assert_false(more);
  /* the next pass finds bob's one more */
  assert_int_equal(sqlstore_trim(s, 5000), 1);
  assert_int_equal(side_count(db, "SELECT count(*) FROM inbox"), 2);
  sqlite3_close(db);
}

static void test_data_round_trip(void **state)
{
  fixture *f = *state;
  sql_store *s = reopen(f, 0, 0);
  static const char data[] = "{\"text\":\"h\xc3\xa9llo \xe4\xb8\x96\xe7\x95\x8c \xf0\x9f\x8e\x89\","
                             "\"q\":\"it's \\\"quoted\\\" \\\\ '); DROP TABLE msgs;--\"}\0tail";
  const char *uid = "\xc3\xbc" "ser'\"1";
  const char *uids[1] = {uid};
  imd_store_msg m = {.id = "x1", .from = "o'brien", .device = "", .cid = "c'1", .to = uid,
                     .ts = UINT64_C(1) << 50, .data = data, .data_len = sizeof data - 1};
  uint64_t seq;
  got g = {0};

  assert_int_equal(sqlstore_append(s, &m, uids, 1, &seq, NULL), IMD_STORE_OK);
  m.id = "x2";
  m.cid = NULL;
  m.to = NULL;
  m.data = NULL;
  m.data_len = 0;
  assert_int_equal(sqlstore_append(s, &m, uids, 1, &seq, NULL), IMD_STORE_OK);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  s = reopen(f, 0, 0);

  sync_all(s, uid, 0, 0, &g);
  assert_int_equal(g.n, 2);
  assert_int_equal(g.e[0].data_len, sizeof data - 1);
  assert_memory_equal(g.e[0].data, data, sizeof data - 1);
  assert_string_equal(g.e[0].from, "o'brien");
  assert_string_equal(g.e[0].device, "");
  assert_true(g.e[0].has_cid);
  assert_string_equal(g.e[0].cid, "c'1");
  assert_string_equal(g.e[0].to, uid);
  assert_int_equal(g.e[0].ts, UINT64_C(1) << 50);
  assert_int_equal(g.e[1].data_len, 0);
  assert_false(g.e[1].has_cid);
  assert_false(g.e[1].has_to);
  assert_false(g.e[1].has_group);
}

static void test_persistence(void **state)
{
  fixture *f = *state;
  sql_store *s = reopen(f, 0, 0);
  uint64_t seqs[2], last;
  got g = {0};

  assert_int_equal(send1(s, "m1", "alice", "bob", "c1", seqs, NULL), IMD_STORE_OK);
  assert_int_equal(send1(s, "m2", "bob", "alice", "c1", seqs, NULL), IMD_STORE_OK);
  assert_int_equal(sqlstore_mark_delivered(s, "bob", "d1", 2), IMD_STORE_OK);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  sqlstore_close(f->s);
  f->s = NULL;

  /* Default options (NULL): synchronous=FULL. */
  char err[128];
  f->s = s = sqlstore_open(f->path, NULL, err, sizeof err);
  assert_non_null(s);
  sync_all(s, "alice", 0, 0, &g);
  assert_int_equal(g.n, 2);
  assert_string_equal(g.e[1].id, "m2");
  assert_string_equal(g.e[1].from, "bob");
  assert_int_equal(send1(s, "m3", "alice", "bob", NULL, seqs, NULL), IMD_STORE_OK);
  assert_int_equal(seqs[0], 3);
  assert_int_equal(seqs[1], 3);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  devices d = {0};
  assert_int_equal(sqlstore_user_state(s, "bob", &last, NULL, on_device, &d), IMD_STORE_OK);
  assert_int_equal(last, 3);
  assert_int_equal(d.n, 1);
  assert_int_equal(d.seq[0], 2);

  /* The file: WAL mode, small pages, schema version 6: no index on the
   * ts of inbox and idem, both keyed by the users row's integer, and the
   * rows each message has written behind it listed in msgs.idx. */
  sqlite3 *db = side_open(f);
  side_text(db, "PRAGMA journal_mode", "wal");
  assert_int_equal(side_count(db, "PRAGMA page_size"), 1024);
  assert_int_equal(side_count(db, "PRAGMA user_version"), 6);
  assert_int_equal(side_count(db, "SELECT count(*) FROM pragma_table_info('msgs')"
                                  " WHERE name = 'idx' AND type = 'BLOB'"), 1);
  assert_int_equal(side_count(db, "SELECT count(*) FROM sqlite_schema WHERE type = 'index'"
                                  " AND name IN ('inbox_ts', 'idem_ts')"), 0);
  assert_int_equal(side_count(db, "SELECT count(*) FROM pragma_table_info('inbox')"
                                  " WHERE name = 'uk' AND pk = 1 AND type = 'INTEGER'"), 1);
  assert_int_equal(side_count(db, "SELECT count(*) FROM pragma_table_info('idem')"
                                  " WHERE name = 'uk' AND pk = 1 AND type = 'INTEGER'"), 1);
  /* the close wrote m1's and m2's entries; m3's waits in memory */
  assert_int_equal(side_count(db, "SELECT count(*) FROM inbox AS i JOIN users AS u"
                                  " ON u.uk = i.uk WHERE u.uid = 'bob'"), 2);
  assert_int_equal(sqlstore_index_flush(s), IMD_STORE_OK);
  assert_int_equal(side_count(db, "SELECT count(*) FROM inbox AS i JOIN users AS u"
                                  " ON u.uk = i.uk WHERE u.uid = 'bob'"), 3);
  sqlite3_close(db);
}

typedef struct members {
  char v[8][16];
  size_t n;
} members;

static void add_member(void *ctx, const char *uid)
{
  members *m = ctx;
  assert_true(m->n < 8);
  snprintf(m->v[m->n++], 16, "%s", uid);
}

static members group_of(sql_store *s, const char *gid)
{
  members m = {0};
  assert_int_equal(sqlstore_group_members(s, gid, add_member, &m), IMD_STORE_OK);
  return m;
}

/* Group membership: add/remove within a batch, visible to the batch at
 * once, durable only through the commit, all-or-nothing on bad input. */

/* Seqs stay gap-free through failed appends, a failed batch and restarts:
 * every user's inbox reads 1..last with no hole. */
static void test_seqs_gap_free_across_restart_and_failures(void **state)
{
  fixture *f = *state;
  sql_store *s = reopen(f, 0, 0);
  const char *two[2] = {"bob", "bad"};
  imd_store_msg m = msg("x", "alice", NULL, "bob", 1000);
  uint64_t seqs[2];
  sqlite3 *db = side_open(f);
  got g = {0};

  assert_int_equal(send1(s, "m1", "alice", "bob", "c1", seqs, NULL), IMD_STORE_OK);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  /* bob's row goes in before bad's fails: the undo takes it back */
  side_exec(db, "CREATE TRIGGER no_bad BEFORE INSERT ON msgs WHEN NEW.id = 'x'"
                " BEGIN SELECT RAISE(ABORT, 'bad message'); END");
  m.cid = "c2";
  assert_int_equal(sqlstore_append(s, &m, two, 2, seqs, NULL), IMD_STORE_EIO);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  side_exec(db, "DROP TRIGGER no_bad");
  assert_int_equal(send1(s, "m2", "alice", "bob", "c2", seqs, NULL), IMD_STORE_OK);
  assert_int_equal(seqs[0], 2);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  /* a batch SQLite lost: its seqs are handed out again */
  side_exec(db, "CREATE TRIGGER boom BEFORE INSERT ON msgs WHEN NEW.id = 'm4'"
                " BEGIN SELECT RAISE(ROLLBACK, 'boom'); END");
  assert_int_equal(send1(s, "m3", "alice", "bob", NULL, seqs, NULL), IMD_STORE_OK);
  assert_int_equal(send1(s, "m4", "alice", "boom", NULL, seqs, NULL), IMD_STORE_EIO);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_EIO);
  side_exec(db, "DROP TRIGGER boom");
  assert_int_equal(send1(s, "m5", "alice", "bob", NULL, seqs, NULL), IMD_STORE_OK);
  assert_int_equal(seqs[0], 3);
  assert_int_equal(seqs[1], 3);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  /* uncommitted at close: gone, and its seq too */
  assert_int_equal(send1(s, "m6", "alice", "bob", NULL, seqs, NULL), IMD_STORE_OK);
  s = reopen(f, 0, 0);
  assert_int_equal(send1(s, "m7", "alice", "bob", NULL, seqs, NULL), IMD_STORE_OK);
  assert_int_equal(seqs[0], 4);
  assert_int_equal(seqs[1], 4);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  s = reopen(f, 0, 0);
  static const char *const want[4] = {"m1", "m2", "m5", "m7"};
  for (int u = 0; u < 2; u++) {
    imd_sync_info info = sync_all(s, u == 0 ? "bob" : "alice", 0, 0, &g);
    assert_int_equal(info.last, 4);
    assert_int_equal(g.n, 4);
    for (size_t i = 0; i < g.n; i++) {
      assert_int_equal(g.e[i].seq, i + 1);
      assert_string_equal(g.e[i].id, want[i]);
    }
  }
  sync_all(s, "bad", 0, 0, &g);
  assert_int_equal(g.n, 0);
  assert_int_equal(side_count(db, "SELECT count(*) FROM msgs"), 4);
  assert_int_equal(side_count(db, "SELECT count(*) FROM idem"), 2);
  sqlite3_close(db);
}

/* The users rows' last_seq (which count retention reads) is written at
 * retention and at close, not per commit (a row itself is made with the
 * user's first entry). After a crash it may lag: the next open repairs it
 * from the inboxes. A crash is simulated by clearing the clean-close mark
 * and the counts. */
static void test_unclean_close_repairs_users(void **state)
{
  fixture *f = *state;
  sql_store *s = reopen(f, 0, 0);
  uint64_t seqs[2];
  imd_sync_info info;
  got g = {0};
  sqlite3 *db;

  for (int i = 1; i <= 3; i++) {
    char id[8];
    snprintf(id, sizeof id, "m%d", i);
    assert_int_equal(send1(s, id, "alice", "bob", NULL, seqs, NULL), IMD_STORE_OK);
  }
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  db = side_open(f);
  assert_int_equal(side_count(db, "SELECT count(*) FROM users"), 2);
  assert_int_equal(side_count(db, "SELECT count(*) FROM users WHERE last_seq > 0"), 0);
  sqlstore_close(s);
  f->s = NULL;
  assert_int_equal(side_count(db, "SELECT count(*) FROM users WHERE last_seq = 3"), 2);
  assert_int_equal(side_count(db, "SELECT v FROM meta WHERE k = 'clean'"), 1);
  side_exec(db, "UPDATE meta SET v = 0 WHERE k = 'clean'; UPDATE users SET last_seq = 0");

  /* count retention finds the users again */
  s = reopen(f, 1, 0);
  assert_int_equal(side_count(db, "SELECT v FROM meta WHERE k = 'clean'"), 0); /* while open */
  assert_int_equal(sqlstore_trim(s, 5000), 4);
  info = sync_all(s, "bob", 0, 0, &g);
  assert_int_equal(info.trimmed, 2);
  assert_int_equal(info.last, 3);
  assert_int_equal(g.n, 1);
  assert_int_equal(send1(s, "m4", "alice", "bob", NULL, seqs, NULL), IMD_STORE_OK);
  assert_int_equal(seqs[0], 4);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);

  /* an inbox emptied by age before its users row was ever written: the
   * trim writes the row first, so seqs go on from there */
  s = reopen(f, 0, 60);
  assert_int_equal(put(s, "c1", "carol", 1000), 1);
  assert_int_equal(put(s, "c2", "carol", 1000), 2);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  assert_true(sqlstore_trim(s, 1000 + 61000) >= 2);
  info = sync_all(s, "carol", 0, 0, &g);
  assert_int_equal(g.n, 0);
  assert_int_equal(info.last, 2);
  assert_int_equal(info.trimmed, 2);
  s = reopen_after(f, db, "UPDATE meta SET v = 0 WHERE k = 'clean'", 0, 60);
  assert_int_equal(put(s, "c3", "carol", 100000), 3);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  sqlite3_close(db);
}

/* Inbox entries and keys are written behind their messages: they wait in
 * memory until their user has `ripe` of them, reads see them there, a
 * duplicate key is found there or in the table, and a write that fails at
 * commit loses the batch only, never the entries committed before it. */
static void test_rows_written_behind(void **state)
{
  fixture *f = *state;
  sql_store *s = reopen(f, 0, 0);
  sqlite3 *db = side_open(f);
  uint64_t seqs[2];
  imd_sync_info info;
  char dup[24];
  got g = {0};

  sqlstore_set_index_limits(s, 4, 1000);
  for (int i = 1; i <= 3; i++) {
    char id[8];
    snprintf(id, sizeof id, "b%d", i);
    assert_int_equal(put(s, id, "bob", 1000), (uint64_t)i);
  }
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  assert_int_equal(side_count(db, "SELECT count(*) FROM inbox"), 0);
  assert_int_equal(sqlstore_index_pending(s), 3);
  info = sync_all(s, "bob", 0, 0, &g);
  assert_int_equal(g.n, 3);
  assert_int_equal(info.last, 3);
  assert_string_equal(g.e[2].id, "b3");
  /* the fourth makes bob's ripe: the commit writes all four together */
  assert_int_equal(put(s, "b4", "bob", 1000), 4);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  assert_int_equal(side_count(db, "SELECT count(*) FROM inbox"), 4);
  assert_int_equal(sqlstore_index_pending(s), 0);

  /* a read across the table and memory, paged */
  assert_int_equal(put(s, "b5", "bob", 1000), 5);
  assert_int_equal(put(s, "b6", "bob", 1000), 6);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  info = sync_all(s, "bob", 3, 2, &g);
  assert_int_equal(g.n, 2);
  assert_int_equal(g.e[0].seq, 4);
  assert_int_equal(g.e[1].seq, 5);
  assert_string_equal(g.e[1].id, "b5");
  assert_true(info.more);
  assert_int_equal(info.upto, 5);
  assert_int_equal(info.last, 6);
  info = sync_all(s, "bob", 5, 0, &g);
  assert_int_equal(g.n, 1);
  assert_string_equal(g.e[0].id, "b6");
  assert_false(info.more);
  g.stop_after = 2;
  info = sync_all(s, "bob", 3, 0, &g);
  assert_int_equal(g.n, 2);
  assert_true(info.more);
  g.stop_after = 0;
  uint64_t last = 0;
  assert_int_equal(sqlstore_user_state(s, "bob", &last, NULL, NULL, NULL), IMD_STORE_OK);
  assert_int_equal(last, 6);

  /* duplicates: a key waiting in memory (same batch and later), then in
   * the table */
  assert_int_equal(send1(s, "c1", "alice", "carol", "k1", seqs, dup), IMD_STORE_OK);
  assert_int_equal(send1(s, "c2", "alice", "carol", "k1", seqs, dup), IMD_STORE_DUP);
  assert_string_equal(dup, "c1");
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  assert_int_equal(send1(s, "c3", "alice", "carol", "k1", seqs, dup), IMD_STORE_DUP);
  assert_string_equal(dup, "c1");
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  assert_int_equal(side_count(db, "SELECT count(*) FROM idem"), 0);
  assert_int_equal(sqlstore_index_flush(s), IMD_STORE_OK);
  assert_int_equal(side_count(db, "SELECT count(*) FROM idem"), 1);
  memset(dup, 0, sizeof dup);
  assert_int_equal(send1(s, "c4", "alice", "carol", "k1", seqs, dup), IMD_STORE_DUP);
  assert_string_equal(dup, "c1");
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);

  /* the write at commit fails: that batch is lost, the entries committed
   * before it still wait and are read */
  assert_int_equal(put(s, "b7", "bob", 1000), 7);
  assert_int_equal(put(s, "b8", "bob", 1000), 8);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  side_exec(db, "CREATE TRIGGER boom BEFORE INSERT ON inbox"
                " BEGIN SELECT RAISE(ABORT, 'no room'); END");
  assert_int_equal(put(s, "b9", "bob", 1000), 9);
  assert_int_equal(put(s, "b10", "bob", 1000), 10);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_EIO);
  assert_non_null(strstr(sqlstore_error(s), "no room"));
  info = sync_all(s, "bob", 0, 0, &g);
  assert_int_equal(g.n, 8);
  assert_int_equal(info.last, 8);
  assert_string_equal(g.e[7].id, "b8");
  assert_int_equal(sqlstore_index_flush(s), IMD_STORE_EIO);
  side_exec(db, "DROP TRIGGER boom");
  assert_int_equal(put(s, "b9'", "bob", 1000), 9);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  assert_int_equal(side_count(db, "SELECT count(*) FROM msgs WHERE id IN ('b9', 'b10')"), 0);
  assert_int_equal(side_count(db, "SELECT count(*) FROM inbox AS i JOIN users AS u"
                                  " ON u.uk = i.uk WHERE u.uid = 'bob'"), 6);
  assert_int_equal(sqlstore_index_flush(s), IMD_STORE_OK);
  assert_int_equal(side_count(db, "SELECT count(*) FROM inbox AS i JOIN users AS u"
                                  " ON u.uk = i.uk WHERE u.uid = 'bob'"), 9);

  /* a users flush (retention's first step) that fails to write them: they
   * still wait, and a later commit does not take them for written */
  sqlstore_set_index_limits(s, 1000, 1000);
  assert_int_equal(put(s, "c5", "carol", 1000), 2);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  assert_int_equal(put(s, "b10", "bob", 1000), 10);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  /* bob's entries go in, then his users row fails */
  side_exec(db, "CREATE TRIGGER boom BEFORE UPDATE ON users WHEN NEW.uid = 'bob'"
                " BEGIN SELECT RAISE(ABORT, 'no room'); END");
  assert_int_equal(sqlstore_users_flush_step(s, 100), IMD_STORE_EIO);
  side_exec(db, "DROP TRIGGER boom");
  assert_int_equal(put(s, "d1", "dave", 1000), 1);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  info = sync_all(s, "bob", 8, 0, &g);
  assert_int_equal(g.n, 2);
  assert_string_equal(g.e[1].id, "b10");
  assert_int_equal(sqlstore_users_flush_step(s, 100), IMD_STORE_OK);
  assert_int_equal(side_count(db, "SELECT count(*) FROM inbox AS i JOIN users AS u"
                                  " ON u.uk = i.uk WHERE u.uid = 'bob'"), 10);
  sqlite3_close(db);
}

/* Runs steps on the store at f's path in a forked child that exits without
 * closing it (a crash), where no commit writes any waiting inbox entry or
 * key; steps returns nonzero on a failure, which fails the test. */
static void run_in_child(const fixture *f, uint32_t keep_count, int (*steps)(sql_store *c))
{
  int status;
  pid_t pid = fork();

  assert_true(pid >= 0);
  if (pid == 0) {
    imd_store_opts o = {.keep_count = keep_count, .no_fsync = true};
    char err[256];
    sql_store *c = sqlstore_open(f->path, &o, err, sizeof err);

    if (c != NULL)
      sqlstore_set_index_limits(c, 1000, 100000);
    _exit(c == NULL || steps(c) != 0 ? 1 : 0); /* no close */
  }
  assert_int_equal(waitpid(pid, &status, 0), pid);
  assert_true(WIFEXITED(status));
  assert_int_equal(WEXITSTATUS(status), 0);
}

/* A message from "system" to bob alone, with a client id (an HTTP push). */
static int push1(sql_store *s, const char *id, const char *cid, uint64_t seqs[1], char dup[24])
{
  imd_store_msg m = msg(id, "system", cid, "bob", 1000);
  const char *uids[1] = {"bob"};

  return sqlstore_append(s, &m, uids, 1, seqs, dup);
}

/* Two pushes with client ids, then retention by count drops the first. */
static int trim_with_keys_waiting(sql_store *c)
{
  uint64_t seqs[1];
  int bad = 0;

  bad |= push1(c, "m1", "k1", seqs, NULL) != IMD_STORE_OK;
  bad |= push1(c, "m2", "k2", seqs, NULL) != IMD_STORE_OK;
  bad |= sqlstore_commit(c) != IMD_STORE_OK;
  bad |= sqlstore_index_pending(c) != 4;
  bad |= sqlstore_trim(c, 5000) != 1; /* bob keeps m2: m1's row goes */
  return bad;
}

/* A key waits under its sender, and a sender that is none of its message's
 * receivers (an HTTP push "from" a service) has no entry that would make the
 * users flush write it: retention by count then deleted the message, the
 * key's only durable copy, and after a crash the client id was taken again. */
static void test_trim_writes_waiting_keys(void **state)
{
  fixture *f = *state;
  uint64_t seqs[2];
  char dup[24];

  run_in_child(f, 1, trim_with_keys_waiting);
  sql_store *s = reopen(f, 1, 0);
  sqlite3 *db = side_open(f);
  assert_int_equal(side_count(db, "SELECT count(*) FROM msgs"), 1);
  assert_int_equal(side_count(db, "SELECT count(*) FROM idem"), 2);
  assert_int_equal(push1(s, "x1", "k1", seqs, dup), IMD_STORE_DUP);
  assert_string_equal(dup, "m1");
  assert_int_equal(push1(s, "x2", "k2", seqs, dup), IMD_STORE_DUP);
  assert_string_equal(dup, "m2");
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  sqlite3_close(db);
}

/* Appends, a trim and more appends, their rows left waiting. */
static int append_trim_append(sql_store *c)
{
  uint64_t seqs[2];
  int bad = 0;

  /* m0 in bob's and alice's inboxes; bob's 1 will be trimmed */
  bad |= send1(c, "m0", "alice", "bob", "k0", seqs, NULL) != IMD_STORE_OK;
  for (int i = 2; i <= 5; i++) {
    char id[8];
    snprintf(id, sizeof id, "b%d", i);
    imd_store_msg m = msg(id, "system", NULL, "bob", 1000);
    bad |= sqlstore_append(c, &m, (const char *const[]){"bob"}, 1, seqs, NULL) != 0;
  }
  bad |= sqlstore_commit(c) != IMD_STORE_OK;
  bad |= sqlstore_trim(c, 5000) != 3; /* bob keeps 4, 5 */
  bad |= send1(c, "m6", "alice", "bob", "k6", seqs, NULL) != IMD_STORE_OK || seqs[0] != 6;
  bad |= send1(c, "m7", "carol", "dave", "k7", seqs, NULL) != IMD_STORE_OK;
  bad |= sqlstore_commit(c) != IMD_STORE_OK;
  bad |= sqlstore_index_pending(c) != 6; /* 2 entries + a key, twice */
  return bad;
}

/* A crash (the process dies without closing) loses none of the entries and
 * keys that waited in memory: the next open writes them from their
 * messages' rows, but not those retention had trimmed. And message ids in
 * the file only grow, even after retention dropped the newest. */
static void test_crash_keeps_rows_written_behind(void **state)
{
  fixture *f = *state;
  uint64_t seqs[2];
  imd_sync_info info;
  char dup[24];
  got g = {0};

  run_in_child(f, 2, append_trim_append);
  sql_store *s = reopen(f, 2, 0);
  sqlite3 *db = side_open(f);
  info = sync_all(s, "bob", 0, 0, &g);
  assert_int_equal(info.trimmed, 3);
  assert_int_equal(info.last, 6);
  assert_int_equal(g.n, 3);
  assert_string_equal(g.e[0].id, "b4");
  assert_string_equal(g.e[2].id, "m6");
  info = sync_all(s, "alice", 0, 0, &g);
  assert_int_equal(g.n, 2);
  assert_int_equal(info.last, 2);
  info = sync_all(s, "dave", 0, 0, &g);
  assert_int_equal(g.n, 1);
  assert_string_equal(g.e[0].id, "m7");
  assert_int_equal(side_count(db, "SELECT count(*) FROM inbox AS i JOIN users AS u"
                                  " ON u.uk = i.uk WHERE u.uid = 'bob' AND i.seq <= 3"), 0);
  assert_int_equal(sqlstore_index_pending(s), 0);
  assert_int_equal(side_count(db, "SELECT v FROM meta WHERE k = 'indexed'"),
                   side_count(db, "SELECT max(mid) FROM msgs"));
  /* the keys: both still refuse their duplicates */
  assert_int_equal(send1(s, "x", "alice", "bob", "k6", seqs, dup), IMD_STORE_DUP);
  assert_string_equal(dup, "m6");
  assert_int_equal(send1(s, "x", "carol", "dave", "k7", seqs, dup), IMD_STORE_DUP);
  assert_string_equal(dup, "m7");
  assert_int_equal(put(s, "b7", "bob", 1000), 7);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);

  /* every message gone (as retention by age can leave it): the next one
   * still gets a higher mid than any the mark covers */
  long top = side_count(db, "SELECT max(mid) FROM msgs");
  s = reopen_after(f, db, "DELETE FROM msgs; DELETE FROM inbox", 0, 0);
  assert_int_equal(put(s, "b8", "bob", 1000), 8);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  assert_int_equal(side_count(db, "SELECT min(mid) FROM msgs"), top + 1);
  sqlite3_close(db);
}

/* The tables of schemas 2 to 4 that keyed by the uid's text, as those
 * versions created them (msgs had a UNIQUE id until schema 4's new files). */
#define OLD_IDEM_INBOX                                                                          \
  "CREATE TABLE idem(sender TEXT NOT NULL, device TEXT NOT NULL, cid TEXT NOT NULL,"           \
  "  id TEXT NOT NULL, ts INTEGER NOT NULL, PRIMARY KEY(sender, device, cid)) WITHOUT ROWID;" \
  "CREATE TABLE inbox(uid TEXT NOT NULL, seq INTEGER NOT NULL, mid INTEGER NOT NULL,"          \
  "  ts INTEGER NOT NULL, PRIMARY KEY(uid, seq)) WITHOUT ROWID;"
#define OLD_CURSORS_GROUPS                                                                      \
  "CREATE TABLE cursors(uid TEXT NOT NULL, device TEXT NOT NULL, delivered INTEGER NOT NULL,"  \
  "  PRIMARY KEY(uid, device)) WITHOUT ROWID;"                                                 \
  "CREATE TABLE grp_members(gid TEXT NOT NULL, uid TEXT NOT NULL,"                             \
  "  PRIMARY KEY(gid, uid)) WITHOUT ROWID;"
#define OLD_MSGS(unique)                                                                        \
  "CREATE TABLE msgs(mid INTEGER PRIMARY KEY, id TEXT NOT NULL" unique ", sender TEXT NOT NULL," \
  "  device TEXT NOT NULL, cid TEXT, to_uid TEXT, grp TEXT, ts INTEGER NOT NULL,"              \
  "  data TEXT NOT NULL, refs INTEGER NOT NULL);"

/* A store written by the previous schema (version 2, every imd before
 * this one: users rows per commit, no meta table) opens, keeps its data,
 * and goes on: seqs, trimmed marks, keys, marks and groups. The file is
 * made here with version 2's exact schema and the rows it wrote. */
static void test_migration_from_v2(void **state)
{
  fixture *f = *state;
  sqlite3 *db = side_open(f);
  uint64_t seqs[2], last, trimmed;
  char dup[24] = "";
  imd_sync_info info;
  got g = {0};
  devices d = {0};

  side_exec(db,
    "PRAGMA page_size=1024; PRAGMA journal_mode=WAL;"
    OLD_MSGS(" UNIQUE") OLD_IDEM_INBOX OLD_CURSORS_GROUPS
    "CREATE INDEX idem_ts ON idem(ts);"
    "CREATE INDEX inbox_ts ON inbox(ts);"
    "CREATE TABLE users(uid TEXT PRIMARY KEY, last_seq INTEGER NOT NULL,"
    "  trimmed INTEGER NOT NULL) WITHOUT ROWID;"
    "PRAGMA user_version = 2;"
    /* alice -> bob m1 (c1), m2, m3; bob's entry 1 trimmed by count; m1 kept for alice */
    "INSERT INTO msgs VALUES(1, 'm1', 'alice', 'd1', 'c1', 'bob', NULL, 1000,"
    "  '{\"text\":\"hi\"}', 1);"
    "INSERT INTO msgs VALUES(2, 'm2', 'alice', 'd1', NULL, 'bob', NULL, 1001,"
    "  '{\"text\":\"hi\"}', 2);"
    "INSERT INTO msgs VALUES(3, 'm3', 'alice', 'd1', NULL, 'bob', NULL, 1002,"
    "  '{\"text\":\"hi\"}', 2);"
    "INSERT INTO idem VALUES('alice', 'd1', 'c1', 'm1', 1000);"
    "INSERT INTO inbox VALUES('alice', 1, 1, 1000), ('alice', 2, 2, 1001),"
    "  ('alice', 3, 3, 1002), ('bob', 2, 2, 1001), ('bob', 3, 3, 1002);"
    "INSERT INTO users VALUES('alice', 3, 0), ('bob', 3, 1);"
    "INSERT INTO cursors VALUES('bob', 'phone', 2);"
    "INSERT INTO grp_members VALUES('g1', 'alice'), ('g1', 'bob');");

  sql_store *s = reopen(f, 0, 0);
  assert_int_equal(side_count(db, "PRAGMA user_version"), 6);
  assert_int_equal(side_count(db, "SELECT count(*) FROM sqlite_schema WHERE type = 'index'"
                                  " AND name IN ('inbox_ts', 'idem_ts')"), 0);
  /* users.oldest from the inboxes: bob's oldest held entry is 2 */
  assert_int_equal(side_count(db, "SELECT oldest FROM users WHERE uid = 'bob'"), 1001);
  assert_int_equal(side_count(db, "SELECT oldest FROM users WHERE uid = 'alice'"), 1000);
  info = sync_all(s, "bob", 0, 0, &g);
  assert_int_equal(info.trimmed, 1);
  assert_true(info.gap);
  assert_int_equal(info.last, 3);
  assert_int_equal(g.n, 2);
  assert_string_equal(g.e[0].id, "m2");
  assert_int_equal(g.e[0].seq, 2);
  assert_int_equal(sqlstore_user_state(s, "bob", &last, &trimmed, on_device, &d), IMD_STORE_OK);
  assert_int_equal(d.n, 1);
  assert_int_equal(d.seq[0], 2);
  assert_int_equal(group_of(s, "g1").n, 2);
  assert_int_equal(send1(s, "m9", "alice", "bob", "c1", seqs, dup), IMD_STORE_DUP);
  assert_string_equal(dup, "m1");
  assert_int_equal(send1(s, "m4", "alice", "bob", "c4", seqs, dup), IMD_STORE_OK);
  assert_int_equal(seqs[0], 4);
  assert_int_equal(seqs[1], 4);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);

  /* retention by count on the old rows and the new */
  s = reopen(f, 2, 0);
  assert_int_equal(sqlstore_trim(s, 5000), 3); /* bob's 2, alice's 1 and 2 */
  info = sync_all(s, "alice", 0, 0, &g);
  assert_int_equal(info.trimmed, 2);
  assert_int_equal(g.n, 2);
  assert_string_equal(g.e[1].id, "m4");
  assert_int_equal(side_count(db, "SELECT count(*) FROM msgs"), 2); /* m3, m4 */

  /* retention by age on the old rows: the migrated oldest queues them */
  s = reopen(f, 0, 60);
  assert_int_equal(sqlstore_trim(s, 1001 + 60000), 0); /* alice's 3 (ts 1002) holds */
  assert_int_equal(sqlstore_trim(s, 1002 + 60000 + 1), 4); /* 3 and 4 (ts 1000) each */
  info = sync_all(s, "bob", 0, 0, &g);
  assert_int_equal(info.trimmed, 4);
  assert_int_equal(g.n, 0);
  sqlite3_close(db);
}

/* A store of schema 4 (inbox and idem keyed by the uid text) left by a
 * crash: a users row behind its inbox, one missing, a key whose sender has
 * no inbox. It opens as schema 5 with every entry, key, seq and trimmed
 * mark under its user's new row. */
static void test_migration_from_v4(void **state)
{
  fixture *f = *state;
  sqlite3 *db = side_open(f);
  uint64_t seqs[2];
  char dup[24] = "";
  imd_sync_info info;
  got g = {0};

  side_exec(db,
    "PRAGMA page_size=1024; PRAGMA journal_mode=WAL;"
    OLD_MSGS("") OLD_IDEM_INBOX OLD_CURSORS_GROUPS
    "CREATE TABLE users(uid TEXT PRIMARY KEY, last_seq INTEGER NOT NULL,"
    "  trimmed INTEGER NOT NULL, oldest INTEGER) WITHOUT ROWID;"
    "CREATE TABLE meta(k TEXT PRIMARY KEY, v INTEGER NOT NULL) WITHOUT ROWID;"
    "CREATE INDEX users_oldest ON users(oldest);"
    "PRAGMA user_version = 4;"
    "INSERT INTO meta VALUES('clean', 0);"
    /* alice -> bob m1 (c1), m2; system -> carol m3 (k1). bob's row says 1
     * and trimmed 1 (written before m2); alice's and carol's rows were
     * never written. */
    "INSERT INTO msgs VALUES(1, 'm1', 'alice', 'd1', 'c1', 'bob', NULL, 1000, '{}', 1);"
    "INSERT INTO msgs VALUES(2, 'm2', 'alice', 'd1', NULL, 'bob', NULL, 1001, '{}', 2);"
    "INSERT INTO msgs VALUES(3, 'm3', 'system', '', 'k1', 'carol', NULL, 1002, '{}', 1);"
    "INSERT INTO idem VALUES('alice', 'd1', 'c1', 'm1', 1000), ('system', '', 'k1', 'm3', 1002);"
    "INSERT INTO inbox VALUES('alice', 1, 1, 1000), ('alice', 2, 2, 1001),"
    "  ('bob', 2, 2, 1001), ('carol', 1, 3, 1002);"
    "INSERT INTO users VALUES('bob', 1, 1, 1001);");

  sql_store *s = reopen(f, 0, 0);
  assert_int_equal(side_count(db, "PRAGMA user_version"), 6);
  assert_int_equal(side_count(db, "SELECT count(*) FROM users"), 4); /* system too */
  assert_int_equal(side_count(db, "SELECT count(*) FROM inbox AS i JOIN users AS u"
                                  " ON u.uk = i.uk WHERE u.uid = 'alice'"), 2);
  assert_int_equal(side_count(db, "SELECT count(*) FROM sqlite_schema"
                                  " WHERE name IN ('users_v5', 'inbox_v5', 'idem_v5')"), 0);
  info = sync_all(s, "bob", 0, 0, &g);
  assert_int_equal(info.trimmed, 1);
  assert_int_equal(info.last, 2);
  assert_int_equal(g.n, 1);
  assert_string_equal(g.e[0].id, "m2");
  info = sync_all(s, "carol", 0, 0, &g);
  assert_int_equal(info.last, 1);
  assert_string_equal(g.e[0].id, "m3");
  /* the keys, under their senders' rows */
  assert_int_equal(send1(s, "m9", "alice", "bob", "c1", seqs, dup), IMD_STORE_DUP);
  assert_string_equal(dup, "m1");
  imd_store_msg m = msg("m8", "system", "k1", "carol", 2000);
  m.device = "";
  assert_int_equal(sqlstore_append(s, &m, (const char *const[]){"carol"}, 1, seqs, dup),
                   IMD_STORE_DUP);
  assert_string_equal(dup, "m3");
  /* the seqs go on from the inboxes, not the lagging rows */
  m = msg("m4", "alice", "c4", "bob", 2000);
  assert_int_equal(sqlstore_append(s, &m, (const char *const[]){"bob", "alice"}, 2, seqs, dup),
                   IMD_STORE_OK);
  assert_int_equal(seqs[0], 3);
  assert_int_equal(seqs[1], 3);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  /* retention by age finds the migrated rows through users.oldest */
  s = reopen(f, 0, 60);
  assert_int_equal(sqlstore_trim(s, 1003 + 60000), 4); /* alice 1, 2; bob 2; carol 1 */
  info = sync_all(s, "alice", 0, 0, &g);
  assert_int_equal(info.trimmed, 2);
  assert_int_equal(g.n, 1);
  assert_string_equal(g.e[0].id, "m4");
  sqlite3_close(db);
}

/* More users than the counter cache holds: commits past the cap take the
 * least recently used counters out without writing anything; their users
 * rows are owed, written sorted by the flush steps (or retention's start,
 * or close). Seqs go on from the inboxes, and retention by count and by
 * age finds every user. */
static void test_counter_cache_evicts(void **state)
{
  fixture *f = *state;
  sql_store *s = reopen(f, 2, 60);
  char id[16], uid[16];
  imd_sync_info info;
  got g = {0};

  sqlstore_set_cache_max(s, 8);
  sqlstore_set_index_limits(s, 1, 0); /* entries waiting keep their counter cached */
  for (int round = 1; round <= 3; round++) {
    for (int i = 0; i < 40; i++) {
      snprintf(id, sizeof id, "m%d.%d", round, i);
      snprintf(uid, sizeof uid, "u%d", i);
      assert_int_equal(put(s, id, uid, 1000 * (uint64_t)round), (uint64_t)round);
      assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
      assert_true(sqlstore_users_cached(s) <= 9);
    }
  }
  assert_true(sqlstore_users_unflushed(s) >= 40); /* owed rows, a user's several times */
  sqlite3 *db = side_open(f);
  assert_int_equal(side_count(db, "SELECT count(*) FROM users WHERE last_seq > 0"), 0);
  while (sqlstore_users_unflushed(s) > 0)
    assert_int_equal(sqlstore_users_flush_step(s, 16), IMD_STORE_OK);
  assert_int_equal(side_count(db, "SELECT count(*) FROM users WHERE last_seq = 3"
                                  " AND oldest = 1000"), 40);
  /* a flush step with a batch open is refused */
  assert_int_equal(put(s, "x", "u0", 4000), 4);
  assert_int_equal(sqlstore_users_flush_step(s, 16), IMD_STORE_EBATCH);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  /* by age (ts 1000 < 61001 - 60000) one entry of each, then by count
   * (2 kept) u0's second */
  assert_int_equal(sqlstore_trim(s, 1000 + 60000 + 1), 41);
  for (int i = 0; i < 40; i++) {
    snprintf(uid, sizeof uid, "u%d", i);
    info = sync_all(s, uid, 0, 0, &g);
    assert_int_equal(info.last, i == 0 ? 4 : 3);
    assert_int_equal(info.trimmed, i == 0 ? 2 : 1);
    assert_int_equal(g.n, 2);
  }
  sqlite3_close(db);
}

/* With synchronous=FULL the store coalesces its WAL writes (store_vfs.c):
 * every commit must still reach the file before another connection can
 * see it, across checkpoints and WAL restarts (~12 MiB of frames here, the
 * WAL is checkpointed every 4 MiB), and survive a reopen. */
static void test_wal_writes_full_sync(void **state)
{
  fixture *f = *state;
  imd_store_opts o = {0};
  char err[256] = "", data[2048], id[24];
  const char *bob[1] = {"bob"};
  uint64_t seq;
  got g = {0};
  sqlite3 *db;

  f->s = sqlstore_open(f->path, &o, err, sizeof err);
  assert_non_null(f->s);
  db = side_open(f);
  memset(data, 'x', sizeof data);
  for (int b = 0; b < 60; b++) {
    for (int i = 0; i < 100; i++) {
      snprintf(id, sizeof id, "m%d", b * 100 + i + 1);
      snprintf(data, 24, "{\"n\":%d,\"p\":\"", b * 100 + i + 1);
      data[strlen(data)] = 'x';
      data[sizeof data - 2] = '"';
      data[sizeof data - 1] = '}';
      imd_store_msg m = {.id = id, .from = "alice", .device = "d", .to = "bob", .ts = 1000,
                         .data = data, .data_len = sizeof data};
      assert_int_equal(sqlstore_append(f->s, &m, bob, 1, &seq, NULL), IMD_STORE_OK);
      assert_int_equal(seq, (uint64_t)(b * 100 + i + 1));
    }
    assert_int_equal(sqlstore_commit(f->s), IMD_STORE_OK);
    assert_int_equal(side_count(db, "SELECT count(*) FROM msgs"), (b + 1) * 100);
    assert_int_equal(side_count(db, "SELECT max(seq) FROM inbox AS i JOIN users AS u"
                                       " ON u.uk = i.uk WHERE u.uid = 'bob'"),
                     (b + 1) * 100);
  }
  assert_int_equal(side_count(db, "SELECT count(*) FROM msgs WHERE length(data) = 2048"),
                   6000);
  sqlite3_close(db);
  sqlstore_close(f->s);
  f->s = sqlstore_open(f->path, &o, err, sizeof err);
  assert_non_null(f->s);
  g.stop_after = 0;
  imd_sync_info info;
  assert_int_equal(sqlstore_sync(f->s, "bob", 5990, 0, NULL, NULL, &info), IMD_STORE_OK);
  assert_int_equal(info.last, 6000);
  assert_int_equal(info.upto, 6000);
  (void)g;
}

static bool never_checkpoint(void *ctx, uint64_t wal_bytes, bool behind)
{
  (void)ctx;
  (void)wal_bytes;
  (void)behind;
  return false;
}

/* The checkpoint connection: an interrupted pass copies nothing it records
 * (and fails nothing); the next pass copies the whole WAL. */
static void test_checkpoint_interrupt(void **state)
{
  fixture *f = *state;
  imd_store_opts o = {.no_fsync = true};
  char err[256] = "";
  uint64_t copied = 1;
  sql_store *s = reopen(f, 0, 0);

  sqlstore_set_wal_hook(s, never_checkpoint, NULL);
  for (int i = 1; i <= 200; i++) {
    char id[24];
    snprintf(id, sizeof id, "m%d", i);
    assert_int_equal(put(s, id, "alice", 1000), (uint64_t)i);
  }
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  sql_ckpt *c = sqlstore_ckpt_open(f->path, &o, err, sizeof err);
  assert_non_null(c);
  sqlstore_ckpt_interrupt(c);
  assert_int_equal(sqlstore_ckpt_run(c, &copied, err, sizeof err), IMD_STORE_OK);
  assert_int_equal(copied, 0);
  assert_int_equal(sqlstore_ckpt_run(c, &copied, err, sizeof err), IMD_STORE_OK);
  assert_true(copied > 0);
  sqlstore_ckpt_close(c);
  imd_sync_info info;
  assert_int_equal(sqlstore_sync(s, "alice", 190, 0, NULL, NULL, &info), IMD_STORE_OK);
  assert_int_equal(info.last, 200);
}

/* Random inserts into many inboxes split B-tree pages in most commits (and
 * SQLite then parks pages under the pending-byte page: store_pcache.h), and
 * a commit that fails after the file grew must drop the pages it added from
 * the cache. Afterwards the file is intact and every inbox holds exactly
 * what was committed, gap-free. */
#define SPLIT_USERS 1500
static void test_splits_and_failed_commit_keep_pages(void **state)
{
  fixture *f = *state;
  sql_store *s = reopen(f, 0, 0);
  static unsigned held[SPLIT_USERS], pending[SPLIT_USERS];
  char from[16], to[16], id[24], wal[128];
  uint64_t seqs[2], x = 88172645463325252u;
  struct rlimit old, lim;
  struct stat wst;
  got g = {0};

  memset(held, 0, sizeof held);
  snprintf(wal, sizeof wal, "%s-wal", f->path);
  for (int b = 0; b < 40; b++) {
    if (b == 25) /* the WAL starts afresh: batch 27's frames go past its end */
      s = reopen(f, 0, 0);
    memset(pending, 0, sizeof pending);
    for (int i = 0; i < 150; i++) {
      x ^= x << 13, x ^= x >> 7, x ^= x << 17;
      unsigned a = (unsigned)(x % SPLIT_USERS), r = (unsigned)((x >> 20) % SPLIT_USERS);
      if (a == r)
        r = (r + 1) % SPLIT_USERS;
      snprintf(from, sizeof from, "user%u", a);
      snprintf(to, sizeof to, "user%u", r);
      snprintf(id, sizeof id, "m%d-%d", b, i);
      assert_int_equal(send1(s, id, from, to, NULL, seqs, NULL), IMD_STORE_OK);
      pending[a]++, pending[r]++;
      assert_int_equal(seqs[0], held[r] + pending[r]);
      assert_int_equal(seqs[1], held[a] + pending[a]);
    }
    if (b == 27) { /* this batch's commit cannot write its WAL frames */
      assert_int_equal(stat(wal, &wst), 0); /* only grown since the reopen */
      assert_int_equal(getrlimit(RLIMIT_FSIZE, &old), 0);
      lim = old;
      lim.rlim_cur = (rlim_t)wst.st_size;
      signal(SIGXFSZ, SIG_IGN);
      assert_int_equal(setrlimit(RLIMIT_FSIZE, &lim), 0);
      int rc = sqlstore_commit(s);
      assert_int_equal(setrlimit(RLIMIT_FSIZE, &old), 0);
      assert_int_equal(rc, IMD_STORE_EIO);
      continue;
    }
    assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
    for (int u = 0; u < SPLIT_USERS; u++)
      held[u] += pending[u];
  }

  sqlite3 *db = side_open(f);
  side_text(db, "PRAGMA integrity_check", "ok");
  sqlite3_close(db);
  for (int u = 0; u < SPLIT_USERS; u++) {
    snprintf(to, sizeof to, "user%d", u);
    imd_sync_info info = sync_all(s, to, 0, 0, &g);
    assert_int_equal(g.n, held[u]);
    assert_int_equal(info.last, held[u]);
    for (size_t k = 0; k < g.n; k++)
      assert_int_equal(g.e[k].seq, k + 1);
  }
}

static void test_groups(void **state)
{
  fixture *f = *state;
  sql_store *s = reopen(f, 0, 0);
  const char *add[] = {"carol", "alice", "bob"}, *rm[] = {"bob", "nobody"};

  assert_int_equal(sqlstore_group_update(s, "g1", add, 3, NULL, 0), IMD_STORE_OK);
  assert_true(sqlstore_in_batch(s));
  members m = group_of(s, "g1");
  assert_int_equal(m.n, 3);
  assert_string_equal(m.v[0], "alice"); /* uid order */
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  assert_int_equal(sqlstore_group_update(s, "g1", NULL, 0, rm, 2), IMD_STORE_OK);
  /* a bad member undoes that whole change, not the batch */
  const char *bad[] = {"dave", ""};
  assert_int_equal(sqlstore_group_update(s, "g1", bad, 2, NULL, 0), IMD_STORE_EINVAL);
  assert_int_equal(sqlstore_group_update(s, "", add, 1, NULL, 0), IMD_STORE_EINVAL);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  /* a group change is a write: inbox reads wait for its commit */
  assert_int_equal(sqlstore_group_update(s, "g2", add, 1, NULL, 0), IMD_STORE_OK);
  imd_sync_info info;
  assert_int_equal(sqlstore_sync(s, "bob", 0, 0, collect, NULL, &info), IMD_STORE_EBATCH);
  sqlstore_close(s); /* never committed: g2 is gone */
  f->s = NULL;
  s = reopen(f, 0, 0);
  m = group_of(s, "g1");
  assert_int_equal(m.n, 2);
  assert_string_equal(m.v[0], "alice");
  assert_string_equal(m.v[1], "carol");
  assert_int_equal(group_of(s, "g2").n, 0);
  assert_int_equal(group_of(s, "none").n, 0);
}

static void test_invalid_arguments(void **state)
{
  fixture *f = *state;
  sql_store *s = reopen(f, 0, 0);
  const char *twice[2] = {"bob", "bob"};
  const char *empty[2] = {"bob", ""};
  const char *null_uid[1] = {NULL};
  imd_store_msg m = msg("m1", "alice", "c1", "bob", 1000);
  uint64_t seqs[2];
  imd_sync_info info;

  assert_int_equal(sqlstore_append(s, &m, twice, 0, seqs, NULL), IMD_STORE_EINVAL);
  assert_int_equal(sqlstore_append(s, NULL, twice, 1, seqs, NULL), IMD_STORE_EINVAL);
  assert_int_equal(sqlstore_append(s, &m, empty, 2, seqs, NULL), IMD_STORE_EINVAL);
  assert_int_equal(sqlstore_append(s, &m, null_uid, 1, seqs, NULL), IMD_STORE_EINVAL);
  assert_int_equal(sqlstore_append(s, &m, twice, 2, seqs, NULL), IMD_STORE_EINVAL);
  m.id = "123456789012345678901234"; /* 24 characters: no room in dup_id */
  assert_int_equal(sqlstore_append(s, &m, twice, 1, seqs, NULL), IMD_STORE_EINVAL);
  m.id = "";
  assert_int_equal(sqlstore_append(s, &m, twice, 1, seqs, NULL), IMD_STORE_EINVAL);
  m.id = "m1";
  m.ts = UINT64_MAX;
  assert_int_equal(sqlstore_append(s, &m, twice, 1, seqs, NULL), IMD_STORE_EINVAL);
  m.ts = 1000;
  assert_int_equal(sqlstore_mark_delivered(s, "", "d1", 1), IMD_STORE_EINVAL);
  assert_int_equal(sqlstore_mark_delivered(s, "bob", NULL, 1), IMD_STORE_EINVAL);
  assert_true(strlen(sqlstore_error(s)) > 0);

  /* None of it wrote anything: seqs start at 1 and c1 is no duplicate. */
  assert_int_equal(sqlstore_append(s, &m, twice, 1, seqs, NULL), IMD_STORE_OK);
  assert_int_equal(seqs[0], 1);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  assert_int_equal(sqlstore_sync(s, "", 0, 0, NULL, NULL, &info), IMD_STORE_EINVAL);
  assert_int_equal(sqlstore_user_state(s, NULL, NULL, NULL, NULL, NULL), IMD_STORE_EINVAL);
  assert_string_equal(sqlstore_error(NULL), "no store");
  sqlstore_close(NULL);
}

static void test_open_failures(void **state)
{
  fixture *f = *state;
  char err[256] = "";
  char path[160];
  sqlite3 *db;

  snprintf(path, sizeof path, "%s/missing/dir/imd.db", f->dir);
  assert_null(sqlstore_open(path, NULL, err, sizeof err));
  assert_true(strlen(err) > 0);
  assert_null(sqlstore_open(path, NULL, NULL, 0));

  /* A store written by a newer schema is refused, not misread. */
  reopen(f, 0, 0);
  sqlstore_close(f->s);
  f->s = NULL;
  db = side_open(f);
  side_exec(db, "PRAGMA user_version = 7");
  sqlite3_close(db);
  err[0] = '\0';
  assert_null(sqlstore_open(f->path, NULL, err, sizeof err));
  assert_non_null(strstr(err, "newer"));

  /* A damaged row list of a message whose rows an open must write again
   * is named, not reported with an unrelated SQLite message. */
  imd_store_opts o = {.no_fsync = true};
  uint64_t seqs[2];
  snprintf(path, sizeof path, "%s/damaged.db", f->dir);
  sql_store *s = sqlstore_open(path, &o, err, sizeof err);
  assert_non_null(s);
  assert_int_equal(send1(s, "m1", "alice", "bob", "k1", seqs, NULL), IMD_STORE_OK);
  assert_int_equal(sqlstore_commit(s), IMD_STORE_OK);
  sqlstore_close(s);
  assert_int_equal(sqlite3_open(path, &db), SQLITE_OK);
  side_exec(db, "UPDATE meta SET v = 0 WHERE k = 'indexed'; UPDATE msgs SET idx = x'ff'");
  sqlite3_close(db);
  err[0] = '\0';
  assert_null(sqlstore_open(path, &o, err, sizeof err));
  assert_non_null(strstr(err, "msgs.idx) of message 1 is damaged"));
  unlink_store(path);
}

int main(void)
{
  const struct CMUnitTest tests[] = {
    cmocka_unit_test_setup_teardown(test_seqs_gap_free_per_user, setup, teardown),
    cmocka_unit_test_setup_teardown(test_append_to_many_users, setup, teardown),
    cmocka_unit_test_setup_teardown(test_dup_within_batch, setup, teardown),
    cmocka_unit_test_setup_teardown(test_dup_after_commit_and_reopen, setup, teardown),
    cmocka_unit_test_setup_teardown(test_null_cid_never_dedupes, setup, teardown),
    cmocka_unit_test_setup_teardown(test_close_without_commit, setup, teardown),
    cmocka_unit_test_setup_teardown(test_failed_commit_restores_seqs, setup, teardown),
    cmocka_unit_test_setup_teardown(test_failed_append_keeps_batch, setup, teardown),
    cmocka_unit_test_setup_teardown(test_batch_lost_to_sqlite, setup, teardown),
    cmocka_unit_test_setup_teardown(test_sync_paging, setup, teardown),
    cmocka_unit_test_setup_teardown(test_sync_unknown_user, setup, teardown),
    cmocka_unit_test_setup_teardown(test_reads_refuse_open_batch, setup, teardown),
    cmocka_unit_test_setup_teardown(test_marks_wait_in_memory, setup, teardown),
    cmocka_unit_test_setup_teardown(test_marks_of_long_names, setup, teardown),
    cmocka_unit_test_setup_teardown(test_user_state_lists_devices, setup, teardown),
    cmocka_unit_test_setup_teardown(test_trim_by_count, setup, teardown),
    cmocka_unit_test_setup_teardown(test_trim_by_age, setup, teardown),
    cmocka_unit_test_setup_teardown(test_age_queue, setup, teardown),
    cmocka_unit_test_setup_teardown(test_idem_sweep, setup, teardown),
    cmocka_unit_test_setup_teardown(test_trim_in_steps, setup, teardown),
    cmocka_unit_test_setup_teardown(test_trim_step_fails, setup, teardown),
    cmocka_unit_test_setup_teardown(test_data_round_trip, setup, teardown),
    cmocka_unit_test_setup_teardown(test_persistence, setup, teardown),
    cmocka_unit_test_setup_teardown(test_groups, setup, teardown),
    cmocka_unit_test_setup_teardown(test_seqs_gap_free_across_restart_and_failures, setup,
                                    teardown),
    cmocka_unit_test_setup_teardown(test_unclean_close_repairs_users, setup, teardown),
    cmocka_unit_test_setup_teardown(test_rows_written_behind, setup, teardown),
    cmocka_unit_test_setup_teardown(test_crash_keeps_rows_written_behind, setup, teardown),
    cmocka_unit_test_setup_teardown(test_trim_writes_waiting_keys, setup, teardown),
    cmocka_unit_test_setup_teardown(test_migration_from_v2, setup, teardown),
    cmocka_unit_test_setup_teardown(test_migration_from_v4, setup, teardown),
    cmocka_unit_test_setup_teardown(test_counter_cache_evicts, setup, teardown),
    cmocka_unit_test_setup_teardown(test_wal_writes_full_sync, setup, teardown),
    cmocka_unit_test_setup_teardown(test_checkpoint_interrupt, setup, teardown),
    cmocka_unit_test_setup_teardown(test_splits_and_failed_commit_keep_pages, setup, teardown),
    cmocka_unit_test_setup_teardown(test_invalid_arguments, setup, teardown),
    cmocka_unit_test_setup_teardown(test_open_failures, setup, teardown),
  };

  return cmocka_run_group_tests(tests, NULL, NULL);
}
