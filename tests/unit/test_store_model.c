/* A randomized model check of the SQLite store (store_sqlite.h). Each test
 * runs a fixed seed through thousands of random steps, done both to the
 * store and to a model of what it must hold: appends to one to three
 * receivers (the sender among them or not; "system" only sends) with client
 * ids from a small space, so that duplicates are common; commits; appends
 * and commits that a trigger makes fail; users and index flushes; retention
 * by count; clean reopens; and crashes (a copy of the database and its WAL,
 * opened by a store that never closed it). It proves that a sync with any
 * since and limit returns exactly the committed entries above since, gap-free
 * and in order, that entries retention dropped never come back (after a
 * crash either), that a failed commit leaves nothing behind and hands its
 * seqs out again, and that a client id stored once answers IMD_STORE_DUP
 * with its first message's id in the same batch, after commit, after a
 * reopen and after a crash, even once retention dropped that message.
 * A failure names its seed and step. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <sqlite3.h>

#include "store_sqlite.h"

#define USERS 8
#define SERVICE (USERS - 1)  /* user_name[SERVICE] only sends */
#define DEVICES 2
#define MAX_CIDS 256
#define KEYS (USERS * DEVICES * MAX_CIDS)
#define MAX_SEQ 4096         /* entries per inbox the model holds */
#define PROBES 4             /* known keys tried again after a reopen or a crash */

static const char *const user_name[USERS] = {"ann", "bob", "cat", "dan",
                                             "eve", "fay", "gus", "system"};
static const char *const device_name[DEVICES] = {"d1", "d2"};

/* One test's run. */
typedef struct model_case {
  unsigned seed;
  int steps;
  uint32_t keep_count; /* retention by count; no age limit, so keys live forever */
  uint32_t cids;       /* client ids are c0 .. c<cids - 1> */
  size_t cache_max;    /* counters the store keeps across commits */
} model_case;

/* What one user's inbox must hold. */
typedef struct model_user {
  uint64_t durable;          /* last seq committed */
  uint64_t last;             /* last seq, the open batch's appends included */
  uint64_t trimmed;          /* highest seq retention dropped */
  uint32_t msg[MAX_SEQ + 1]; /* message number at each seq */
} model_user;

/* A key (sender, device, cid) is numbered (sender * DEVICES + device) *
 * MAX_CIDS + cid. */
typedef struct model {
  model_user user[USERS];
  uint32_t key_msg[KEYS];      /* message number of each key (0: none), the batch's included */
  uint32_t batch_keys[KEYS];   /* the keys the open batch added */
  size_t batch_keys_n;
  uint32_t durable_keys[KEYS]; /* the keys committed, for probes */
  size_t durable_keys_n;
  uint8_t *msg_from;           /* sender of each message number */
  size_t msg_max;
} model;

/* What a sync returned. */
typedef struct sync_seen {
  size_t n;
  bool overflow;
  uint64_t seq[MAX_SEQ];
  char id[MAX_SEQ][24];
  char from[MAX_SEQ][8];
} sync_seen;

typedef struct fixture {
  char dir[64];
  char path[96];       /* the store file; each crash moves on to a copy */
  unsigned generation; /* copies made */
  sql_store *s;
  const model_case *mc;
  uint64_t rng;
  int step;
  const char *op;      /* what the step does, for failure messages */
  uint32_t next_msg;
  uint64_t clock_ms;
  bool trigger;        /* a trigger named boom makes some writes fail */
  /* how often what the run is for happened (each must, or it proves little) */
  struct {
    int dups, refused_appends, failed_commits, trims, crashes, reopens;
  } count;
  model m;
  sync_seen seen;
} fixture;

static const char *const file_suffix[] = {"", "-wal", "-shm", "-journal"};

/* Fails the test, naming the seed and step to replay. */
static void model_fail(const fixture *f, const char *fmt, ...)
  __attribute__((format(printf, 2, 3)));
static void model_fail(const fixture *f, const char *fmt, ...)
{
  char what[512];
  va_list ap;

  va_start(ap, fmt);
  vsnprintf(what, sizeof what, fmt, ap);
  va_end(ap);
  fail_msg("seed %u step %d (%s): %s", f->mc->seed, f->step, f->op, what);
}

/* A number in [0, n) from the run's generator (xorshift64). */
static uint32_t draw(fixture *f, uint32_t n)
{
  f->rng ^= f->rng << 13;
  f->rng ^= f->rng >> 7;
  f->rng ^= f->rng << 17;
  return (uint32_t)((f->rng >> 11) % n);
}

static void unlink_store(const char *path)
{
  char p[128];

  for (size_t i = 0; i < sizeof file_suffix / sizeof file_suffix[0]; i++) {
    snprintf(p, sizeof p, "%s%s", path, file_suffix[i]);
    unlink(p);
  }
}

static int setup(void **state)
{
  const model_case *mc = *state;
  fixture *f = calloc(1, sizeof *f);

  assert_non_null(f);
  assert_true(mc->cids > 0 && mc->cids <= MAX_CIDS);
  f->mc = mc;
  f->rng = (uint64_t)mc->seed * 0x9e3779b97f4a7c15u | 1;
  f->clock_ms = 1000000;
  f->op = "setup";
  /* at most one append per step, PROBES after each reopen or crash, and
   * one per key at the end, twice */
  f->m.msg_max = (size_t)mc->steps * (PROBES + 1) + PROBES + 2 * KEYS + 2;
  f->m.msg_from = calloc(f->m.msg_max, 1);
  assert_non_null(f->m.msg_from);
  strcpy(f->dir, "/tmp/test_store_model.XXXXXX");
  assert_non_null(mkdtemp(f->dir));
  snprintf(f->path, sizeof f->path, "%s/imd-0.db", f->dir);
  *state = f;
  return 0;
}

static int teardown(void **state)
{
  fixture *f = *state;

  sqlstore_close(f->s);
  unlink_store(f->path);
  assert_int_equal(rmdir(f->dir), 0);
  free(f->m.msg_from);
  free(f);
  return 0;
}

/* Opens the store at f->path with the case's options and random limits for
 * the inbox entries and keys written behind (small: they wait often). */
static void open_store(fixture *f)
{
  imd_store_opts o = {.keep_count = f->mc->keep_count, .no_fsync = true};
  char err[256] = "";

  f->s = sqlstore_open(f->path, &o, err, sizeof err);
  if (f->s == NULL)
    model_fail(f, "open %s: %s", f->path, err);
  sqlstore_set_index_limits(f->s, 2 + draw(f, 12), 8 + draw(f, 200));
  sqlstore_set_cache_max(f->s, f->mc->cache_max);
}

/* Runs sql on a connection of its own to the store file. */
static void side_exec(const fixture *f, const char *sql)
{
  sqlite3 *db = NULL;
  char *e = NULL;

  if (sqlite3_open(f->path, &db) != SQLITE_OK)
    model_fail(f, "side open: %s", sqlite3_errmsg(db));
  sqlite3_busy_timeout(db, 5000);
  if (sqlite3_exec(db, sql, NULL, NULL, &e) != SQLITE_OK) {
    char what[256];
    snprintf(what, sizeof what, "%s", e != NULL ? e : "?");
    sqlite3_free(e);
    sqlite3_close(db);
    model_fail(f, "%s: %s", sql, what);
  }
  sqlite3_close(db);
}

/* ---- the model ---- */

static uint32_t key_of(int sender, int device, uint32_t cid)
{
  return ((uint32_t)sender * DEVICES + (uint32_t)device) * MAX_CIDS + cid;
}

/* The open batch committed. */
static void model_commit(model *m)
{
  for (int u = 0; u < USERS; u++)
    m->user[u].durable = m->user[u].last;
  for (size_t i = 0; i < m->batch_keys_n; i++)
    m->durable_keys[m->durable_keys_n++] = m->batch_keys[i];
  m->batch_keys_n = 0;
}

/* The open batch is gone (a failed commit, a close, a crash). */
static void model_rollback(model *m)
{
  for (int u = 0; u < USERS; u++)
    m->user[u].last = m->user[u].durable;
  for (size_t i = 0; i < m->batch_keys_n; i++)
    m->key_msg[m->batch_keys[i]] = 0;
  m->batch_keys_n = 0;
}

/* Retention by count: each user keeps its newest keep entries. Returns how
 * many entries go. */
static long model_trim(model *m, uint32_t keep)
{
  long dropped = 0;

  for (int u = 0; keep > 0 && u < USERS; u++) {
    model_user *mu = &m->user[u];
    if (mu->durable > mu->trimmed + keep) {
      dropped += (long)(mu->durable - keep - mu->trimmed);
      mu->trimmed = mu->durable - keep;
    }
  }
  return dropped;
}

/* ---- checks ---- */

static int collect(void *ctx, uint64_t seq, const imd_store_msg *msg)
{
  sync_seen *seen = ctx;

  if (seen->n == MAX_SEQ || strlen(msg->id) >= sizeof seen->id[0] ||
      strlen(msg->from) >= sizeof seen->from[0]) {
    seen->overflow = true;
    return 1;
  }
  seen->seq[seen->n] = seq;
  strcpy(seen->id[seen->n], msg->id);
  strcpy(seen->from[seen->n], msg->from);
  seen->n++;
  return 0;
}

/* A sync of user u with a random since and limit answers exactly what the
 * model holds above since and above what was trimmed; user_state agrees. */
static void check_user(fixture *f, int u)
{
  const model_user *mu = &f->m.user[u];
  sync_seen *seen = &f->seen;
  uint64_t since = draw(f, 3) == 0 ? 0 : draw(f, (uint32_t)mu->durable + 2);
  uint32_t limit = draw(f, 2) == 0 ? 0 : 1 + draw(f, 6);
  uint64_t from = since > mu->trimmed ? since : mu->trimmed;
  uint64_t want = mu->durable > from ? mu->durable - from : 0;
  uint64_t last = 0, trimmed = 0;
  imd_sync_info info;
  int rc;

  if (limit > 0 && want > limit)
    want = limit;
  seen->n = 0;
  seen->overflow = false;
  memset(&info, 0xa5, sizeof info);
  rc = sqlstore_sync(f->s, user_name[u], since, limit, collect, seen, &info);
  if (rc != IMD_STORE_OK)
    model_fail(f, "sync %s: rc %d (%s)", user_name[u], rc, sqlstore_error(f->s));
  if (seen->overflow)
    model_fail(f, "sync %s: too many entries or names too long", user_name[u]);
  if (info.last != mu->durable || info.trimmed != mu->trimmed || seen->n != want)
    model_fail(f, "sync %s since %llu limit %u: last %llu trimmed %llu, %zu entries from %llu;"
               " model: last %llu trimmed %llu, %llu entries",
               user_name[u], (unsigned long long)since, limit, (unsigned long long)info.last,
               (unsigned long long)info.trimmed, seen->n,
               (unsigned long long)(seen->n > 0 ? seen->seq[0] : 0),
               (unsigned long long)mu->durable, (unsigned long long)mu->trimmed,
               (unsigned long long)want);
  for (size_t i = 0; i < seen->n; i++) {
    uint64_t seq = from + 1 + i;
    char id[24];
    snprintf(id, sizeof id, "m%u", mu->msg[seq]);
    if (seen->seq[i] != seq || strcmp(seen->id[i], id) != 0 ||
        strcmp(seen->from[i], user_name[f->m.msg_from[mu->msg[seq]]]) != 0)
      model_fail(f, "sync %s since %llu: entry %zu is %llu %s from %s, model %llu %s from %s",
                 user_name[u], (unsigned long long)since, i, (unsigned long long)seen->seq[i],
                 seen->id[i], seen->from[i], (unsigned long long)seq, id,
                 user_name[f->m.msg_from[mu->msg[seq]]]);
  }
  if (info.upto != from + want || info.more != (from + want < mu->durable) ||
      info.gap != (since < mu->trimmed))
    model_fail(f, "sync %s since %llu limit %u: upto %llu more %d gap %d", user_name[u],
               (unsigned long long)since, limit, (unsigned long long)info.upto, info.more,
               info.gap);
  rc = sqlstore_user_state(f->s, user_name[u], &last, &trimmed, NULL, NULL);
  if (rc != IMD_STORE_OK || last != mu->durable || trimmed != mu->trimmed)
    model_fail(f, "user_state %s: rc %d last %llu trimmed %llu", user_name[u], rc,
               (unsigned long long)last, (unsigned long long)trimmed);
}

static void check_all_users(fixture *f)
{
  for (int u = 0; u < USERS; u++)
    check_user(f, u);
}

/* ---- steps ---- */

/* Appends a message from a random sender with a random client id (or
 * none), or under the committed key *reuse (it must come back a duplicate),
 * to random receivers, and checks the answer. */
static void step_append(fixture *f, const uint32_t *reuse)
{
  model *m = &f->m;
  int sender = (int)draw(f, USERS), device = (int)draw(f, DEVICES), to[3] = {0}, n = 0;
  int want_n = 1 + (int)draw(f, 3);
  bool has_cid = draw(f, 3) != 0;
  uint32_t cid = draw(f, f->mc->cids), key, first, number;
  const char *uids[3];
  char id[24], cid_text[16], dup[24] = "";
  uint64_t seqs[3] = {0};
  int rc;

  if (reuse != NULL) {
    key = *reuse;
    sender = (int)(key / MAX_CIDS / DEVICES);
    device = (int)(key / MAX_CIDS % DEVICES);
    cid = key % MAX_CIDS;
    has_cid = true;
  }
  /* the sender is a receiver half of the time (never the service) */
  if (sender != SERVICE && draw(f, 2) == 0)
    to[n++] = sender;
  while (n < want_n) {
    int u = (int)draw(f, SERVICE);
    bool taken = false;
    for (int j = 0; j < n; j++)
      taken |= to[j] == u;
    if (!taken)
      to[n++] = u;
  }
  for (int j = 0; j < n; j++)
    uids[j] = user_name[to[j]];
  key = key_of(sender, device, cid);
  first = has_cid ? m->key_msg[key] : 0;
  number = ++f->next_msg;
  assert_true(number < m->msg_max);
  snprintf(id, sizeof id, "m%u", number);
  snprintf(cid_text, sizeof cid_text, "c%u", cid);
  f->clock_ms += draw(f, 40);
  if (draw(f, 300) == 0)
    f->clock_ms -= draw(f, 8000); /* a clock stepped back */

  imd_store_msg msg = {.id = id, .from = user_name[sender], .device = device_name[device],
                       .cid = has_cid ? cid_text : NULL, .to = n == 1 ? uids[0] : NULL,
                       .ts = f->clock_ms, .data = "{}", .data_len = 2};
  rc = sqlstore_append(f->s, &msg, uids, (size_t)n, seqs, dup);
  if (rc == IMD_STORE_EIO && f->trigger) {
    f->count.refused_appends++;
    return; /* refused alone, or the batch is lost: the commit will tell */
  }
  if (first != 0) {
    char want[24];
    snprintf(want, sizeof want, "m%u", first);
    if (rc != IMD_STORE_DUP || strcmp(dup, want) != 0)
      model_fail(f, "append %s %s/%s/%s: rc %d dup '%s', model: a duplicate of %s", id,
                 msg.from, msg.device, cid_text, rc, dup, want);
    for (int j = 0; j < n; j++)
      if (seqs[j] != 0)
        model_fail(f, "duplicate %s: seq %llu for %s", id, (unsigned long long)seqs[j], uids[j]);
    f->count.dups++;
    return;
  }
  if (rc != IMD_STORE_OK)
    model_fail(f, "append %s %s/%s/%s: rc %d '%s' (%s)", id, msg.from, msg.device,
               has_cid ? cid_text : "-", rc, dup, sqlstore_error(f->s));
  for (int j = 0; j < n; j++) {
    model_user *mu = &m->user[to[j]];
    if (seqs[j] != mu->last + 1)
      model_fail(f, "append %s: %s got seq %llu, model %llu", id, uids[j],
                 (unsigned long long)seqs[j], (unsigned long long)mu->last + 1);
    assert_true(mu->last < MAX_SEQ);
    mu->msg[++mu->last] = number;
  }
  m->msg_from[number] = (uint8_t)sender;
  if (has_cid) {
    m->key_msg[key] = number;
    m->batch_keys[m->batch_keys_n++] = key;
  }
}

static void step_commit(fixture *f)
{
  int rc = sqlstore_commit(f->s);

  if (rc == IMD_STORE_OK) {
    model_commit(&f->m);
    return;
  }
  if (!f->trigger)
    model_fail(f, "commit: rc %d (%s)", rc, sqlstore_error(f->s));
  if (sqlstore_in_batch(f->s))
    model_fail(f, "a failed commit left the batch open");
  f->count.failed_commits++;
  model_rollback(&f->m);
}

static void trigger_drop(fixture *f)
{
  if (f->trigger)
    side_exec(f, "DROP TRIGGER boom");
  f->trigger = false;
}

/* Creates a trigger that makes some writes fail: inbox entries of one user
 * (commits and flushes that write them), keys of some client ids, or some
 * message rows (the append fails alone with ABORT; with ROLLBACK SQLite
 * drops the whole batch), or the users row of one user (flushes and
 * retention). */
static void trigger_create(fixture *f)
{
  const char *who = user_name[draw(f, SERVICE)];
  char sql[320];

  switch (draw(f, 5)) {
  case 0:
    snprintf(sql, sizeof sql, "CREATE TRIGGER boom BEFORE INSERT ON inbox"
             " WHEN NEW.uk = (SELECT uk FROM users WHERE uid = '%s')"
             " BEGIN SELECT RAISE(ABORT, 'boom'); END", who);
    break;
  case 1:
    snprintf(sql, sizeof sql, "CREATE TRIGGER boom BEFORE INSERT ON idem"
             " WHEN NEW.cid LIKE 'c1%%' BEGIN SELECT RAISE(ABORT, 'boom'); END");
    break;
  case 2:
    snprintf(sql, sizeof sql, "CREATE TRIGGER boom BEFORE INSERT ON msgs"
             " WHEN NEW.id LIKE '%%7' BEGIN SELECT RAISE(ABORT, 'boom'); END");
    break;
  case 3:
    snprintf(sql, sizeof sql, "CREATE TRIGGER boom BEFORE INSERT ON msgs"
             " WHEN NEW.id LIKE '%%3' BEGIN SELECT RAISE(ROLLBACK, 'boom'); END");
    break;
  default:
    snprintf(sql, sizeof sql, "CREATE TRIGGER boom BEFORE UPDATE ON users"
             " WHEN NEW.uid = '%s' BEGIN SELECT RAISE(ABORT, 'boom'); END", who);
    break;
  }
  side_exec(f, sql);
  f->trigger = true;
}

/* Retention by count; with a batch open it must refuse. */
static void step_trim(fixture *f, bool batch)
{
  long dropped = sqlstore_trim(f->s, f->clock_ms), want;

  if (batch) {
    if (dropped != IMD_STORE_EBATCH)
      model_fail(f, "trim with a batch open: %ld", dropped);
    return;
  }
  if (dropped < 0) {
    if (!f->trigger)
      model_fail(f, "trim: %ld (%s)", dropped, sqlstore_error(f->s));
    return;
  }
  want = model_trim(&f->m, f->mc->keep_count);
  if (dropped != want)
    model_fail(f, "trim dropped %ld entries, model %ld", dropped, want);
  f->count.trims += dropped > 0;
  if (f->mc->keep_count > 0 && sqlstore_index_pending(f->s) != 0)
    model_fail(f, "trim left %zu rows waiting", sqlstore_index_pending(f->s));
  check_all_users(f);
}

/* A flush of the rows written behind or of some users rows; with a batch
 * open each must refuse. */
static void step_flush(fixture *f, bool batch, bool index)
{
  int rc = index ? sqlstore_index_flush(f->s) : sqlstore_users_flush_step(f->s, 1 + draw(f, 4));

  if (batch) {
    if (rc != IMD_STORE_EBATCH)
      model_fail(f, "flush with a batch open: %d", rc);
    return;
  }
  if (rc != IMD_STORE_OK && !f->trigger)
    model_fail(f, "flush: rc %d (%s)", rc, sqlstore_error(f->s));
  if (rc == IMD_STORE_OK && index && sqlstore_index_pending(f->s) != 0)
    model_fail(f, "index flush left %zu rows waiting", sqlstore_index_pending(f->s));
}

/* An append under a random committed key, if there is one. */
static void append_known_key(fixture *f)
{
  const model *m = &f->m;

  if (m->durable_keys_n > 0)
    step_append(f, &m->durable_keys[draw(f, (uint32_t)m->durable_keys_n)]);
  else
    step_append(f, NULL);
}

/* After an open: every user as the model has it, and known keys are still
 * taken. */
static void check_reopened(fixture *f)
{
  check_all_users(f);
  for (int i = 0; i < PROBES; i++)
    append_known_key(f);
}

/* Every committed key answers IMD_STORE_DUP with its first message's id. */
static void check_all_keys(fixture *f)
{
  for (size_t i = 0; i < f->m.durable_keys_n; i++)
    step_append(f, &f->m.durable_keys[i]);
  step_commit(f);
}

/* A clean close (which rolls back an open batch) and an open. */
static void step_reopen(fixture *f)
{
  trigger_drop(f);
  sqlstore_close(f->s);
  f->s = NULL;
  model_rollback(&f->m);
  open_store(f);
  f->count.reopens++;
  check_reopened(f);
}

/* Copies file from + suffix to to + suffix, if there is one. */
static void copy_file(const fixture *f, const char *from, const char *to, const char *suffix)
{
  char src[128], dst[128], buf[65536];
  int in, out;
  ssize_t n;

  snprintf(src, sizeof src, "%s%s", from, suffix);
  snprintf(dst, sizeof dst, "%s%s", to, suffix);
  in = open(src, O_RDONLY);
  if (in < 0)
    return;
  out = open(dst, O_WRONLY | O_CREAT | O_EXCL, 0600);
  if (out < 0)
    model_fail(f, "cannot create %s", dst);
  while ((n = read(in, buf, sizeof buf)) > 0)
    if (write(out, buf, (size_t)n) != n)
      model_fail(f, "cannot write %s", dst);
  close(in);
  close(out);
}

/* A crash: the database and its WAL as they are on disk now (no write is
 * under way: the store is single-threaded; an open batch's frames have no
 * commit mark) are copied to a new name, which is opened as a store that was
 * never closed. The old store is closed, but what that writes goes to the
 * old files, which go. */
static void step_crash(fixture *f)
{
  char copy[96];

  snprintf(copy, sizeof copy, "%s/imd-%u.db", f->dir, ++f->generation);
  copy_file(f, f->path, copy, "");
  copy_file(f, f->path, copy, "-wal");
  sqlstore_close(f->s);
  f->s = NULL;
  unlink_store(f->path);
  strcpy(f->path, copy);
  model_rollback(&f->m);
  open_store(f);
  f->count.crashes++;
  check_reopened(f);
}

static void run_model(fixture *f)
{
  open_store(f);
  for (f->step = 0; f->step < f->mc->steps; f->step++) {
    uint32_t op = draw(f, 100);
    bool batch = sqlstore_in_batch(f->s);

    if (op < 50) {
      f->op = "append";
      if (draw(f, 10) == 0)
        append_known_key(f);
      else
        step_append(f, NULL);
    } else if (op < 64) {
      f->op = "commit";
      step_commit(f);
    } else if (op < 70) {
      f->op = "trigger";
      if (batch)
        continue; /* the side connection would wait for the batch */
      if (f->trigger)
        trigger_drop(f);
      else
        trigger_create(f);
    } else if (op < 74) {
      f->op = "users flush";
      step_flush(f, batch, false);
    } else if (op < 77) {
      f->op = "index flush";
      step_flush(f, batch, true);
    } else if (op < 85) {
      f->op = "trim";
      step_trim(f, batch);
      /* a crash right after retention: what it deleted stays deleted, and
       * what it kept, all of it, stays too */
      if (!batch && draw(f, 4) == 0) {
        f->op = "crash after trim";
        trigger_drop(f);
        step_crash(f);
      }
    } else if (op < 88) {
      f->op = "reopen";
      if (batch && f->trigger)
        continue; /* close would write through the trigger */
      step_reopen(f);
    } else if (op < 92) {
      f->op = "crash";
      if (batch && f->trigger)
        continue; /* the trigger can only go between batches */
      trigger_drop(f);
      step_crash(f);
    } else {
      f->op = "check";
    }
    if (!sqlstore_in_batch(f->s))
      check_user(f, (int)draw(f, USERS));
  }
  f->op = "end";
  step_commit(f);
  trigger_drop(f);
  step_commit(f);
  check_all_users(f);
  check_all_keys(f);
  f->op = "end crash";
  step_crash(f);
  step_commit(f);
  check_all_users(f);
  check_all_keys(f);
  if (f->count.dups == 0 || f->count.refused_appends == 0 || f->count.failed_commits == 0 ||
      f->count.trims == 0 || f->count.crashes < 2 || f->count.reopens == 0)
    model_fail(f, "too little happened: %d duplicates, %d appends refused, %d commits failed,"
               " %d trims, %d crashes, %d reopens", f->count.dups, f->count.refused_appends,
               f->count.failed_commits, f->count.trims, f->count.crashes, f->count.reopens);
}

static void test_model(void **state)
{
  run_model(*state);
}

/* Retention keeps few entries, so that messages whose keys still wait
 * go; small counter caches make commits evict counters. */
static const model_case cases[] = {
  {.seed = 1, .steps = 4000, .keep_count = 2, .cids = 96, .cache_max = 100000},
  {.seed = 2, .steps = 4000, .keep_count = 1, .cids = 40, .cache_max = 3},
  {.seed = 3, .steps = 4000, .keep_count = 4, .cids = 200, .cache_max = 100000},
  {.seed = 4, .steps = 4000, .keep_count = 3, .cids = 64, .cache_max = 2},
};

int main(void)
{
  const struct CMUnitTest tests[] = {
    {"model_seed_1", test_model, setup, teardown, (void *)&cases[0]},
    {"model_seed_2", test_model, setup, teardown, (void *)&cases[1]},
    {"model_seed_3", test_model, setup, teardown, (void *)&cases[2]},
    {"model_seed_4", test_model, setup, teardown, (void *)&cases[3]},
  };

  return cmocka_run_group_tests(tests, NULL, NULL);
}
