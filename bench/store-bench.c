/* Append throughput of imd's SQLite store: 1:1 messages, each stored in the
 * inboxes of its sender and its receiver, committed in groups as imd's
 * group commit does; then one retention pass.
 *
 *   store-bench [-n messages] [-b appends per commit] [-u users]
 *               [-k keep_count] [-a] [-N] [-c] [-m] [-U] FILE
 *
 * Prints appends/s (wall clock, fsyncs included) and the CPU time (user +
 * system) per append. -N: synchronous=NORMAL instead of FULL. -m: the
 * receiver's device marks each message delivered right after it (as its
 * ack does in imd); the marks are written with the first commit after
 * MARKS_EVERY_S and with the last, as imd's store thread does. -c: give
 * every message a client id (idempotency key). -U: uids shaped like UUIDs
 * (36 characters, differing from the first byte) instead of "user123",
 * as many applications' are. -a: then one retention pass
 * by age that removes the older half (the messages are 1 ms apart), in
 * bounded steps. FILE must not exist; it and its -wal/-shm are
 * removed at the end. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "store_sqlite.h"

typedef struct bench_opts {
  unsigned long messages;
  unsigned long batch;
  unsigned long users;
  uint32_t keep_count;
  int age_half;
  int no_fsync;
  int with_cid;
  int marks;
  int uuid_uids;
  const char *path;
} bench_opts;

static double now_s(void)
{
  struct timespec ts;

  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* CPU seconds (user + system) this process has used so far. */
static double cpu_s(void)
{
  struct rusage ru;

  getrusage(RUSAGE_SELF, &ru);
  return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
         (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

/* xorshift64: a fixed, cheap sequence of user pairs. */
static uint64_t next_rand(uint64_t *x)
{
  *x ^= *x << 13;
  *x ^= *x >> 7;
  *x ^= *x << 17;
  return *x;
}

static int parse_args(int argc, char **argv, bench_opts *o)
{
  int c;

  *o = (bench_opts){.messages = 200000, .batch = 100, .users = 10000};
  while ((c = getopt(argc, argv, "n:b:u:k:aNcmU")) != -1) {
    switch (c) {
    case 'n': o->messages = strtoul(optarg, NULL, 10); break;
    case 'b': o->batch = strtoul(optarg, NULL, 10); break;
    case 'u': o->users = strtoul(optarg, NULL, 10); break;
    case 'k': o->keep_count = (uint32_t)strtoul(optarg, NULL, 10); break;
    case 'a': o->age_half = 1; break;
    case 'N': o->no_fsync = 1; break;
    case 'c': o->with_cid = 1; break;
    case 'm': o->marks = 1; break;
    case 'U': o->uuid_uids = 1; break;
    default: return -1;
    }
  }
  if (optind != argc - 1 || o->batch == 0 || o->users < 2)
    return -1;
  o->path = argv[optind];
  return 0;
}

static void remove_store(const char *path)
{
  static const char *const suffix[] = {"", "-wal", "-shm"};
  char p[4096];

  for (size_t i = 0; i < sizeof suffix / sizeof suffix[0]; i++) {
    snprintf(p, sizeof p, "%s%s", path, suffix[i]);
    unlink(p);
  }
}

#define MARKS_EVERY_S 10.0 /* store_thread.c's MARK_DELAY_MS */
#define USERS_FLUSH_STEP 4096 /* store_thread.c's */

/* User n's uid: "user<n>", or with -U 36 characters shaped like a UUID
 * whose first 8 differ between users. */
static void uid_of(const bench_opts *o, uint64_t n, char *out, size_t cap)
{
  if (o->uuid_uids)
    snprintf(out, cap, "%08llx-5c1d-4e2a-9b7f-%012llx",
             (unsigned long long)((n * 2654435761u) & 0xffffffffu), (unsigned long long)n);
  else
    snprintf(out, cap, "user%llu", (unsigned long long)n);
}

/* Appends o->messages messages; returns the seconds taken or -1. */
static double run_appends(sql_store *s, const bench_opts *o, double *max_commit_s)
{
  static const char data[] = "{\"text\":\"hello, this is a chat message of typical length\"}";
  uint64_t rnd = 0x9e3779b97f4a7c15u;
  double t0 = now_s(), marks_at = t0 + MARKS_EVERY_S;

  *max_commit_s = 0;
  for (unsigned long i = 0; i < o->messages; i++) {
    char id[24], cid[24], from[48], to[48];
    const char *uids[2] = {to, from};
    uint64_t a = next_rand(&rnd) % o->users;
    uint64_t b = (a + 1 + next_rand(&rnd) % (o->users - 1)) % o->users;
    uint64_t seqs[2];

    /* ids of imd's shape: snowflakes, same width, so they grow in text order too */
    snprintf(id, sizeof id, "%lu", 100000000000000000ul + i);
    snprintf(cid, sizeof cid, "c%lu", i + 1);
    uid_of(o, a, from, sizeof from);
    uid_of(o, b, to, sizeof to);
    imd_store_msg m = {.id = id, .from = from, .device = "phone",
                       .cid = o->with_cid ? cid : NULL, .to = to, .ts = 1700000000000 + i,
                       .data = data, .data_len = sizeof data - 1};
    if (sqlstore_append(s, &m, uids, 2, seqs, NULL) != IMD_STORE_OK) {
      fprintf(stderr, "append: %s\n", sqlstore_error(s));
      return -1;
    }
    if (o->marks && sqlstore_mark_delivered(s, to, "phone", seqs[0]) != IMD_STORE_OK) {
      fprintf(stderr, "mark: %s\n", sqlstore_error(s));
      return -1;
    }
    if ((i + 1) % o->batch == 0 || i + 1 == o->messages) {
      double c0 = now_s();
      if ((c0 >= marks_at || i + 1 == o->messages) && sqlstore_marks_write(s) != IMD_STORE_OK) {
        fprintf(stderr, "marks: %s\n", sqlstore_error(s));
        return -1;
      }
      if (c0 >= marks_at)
        marks_at = c0 + MARKS_EVERY_S;
      if (sqlstore_commit(s) != IMD_STORE_OK) {
        fprintf(stderr, "commit: %s\n", sqlstore_error(s));
        return -1;
      }
      if (now_s() - c0 > *max_commit_s)
        *max_commit_s = now_s() - c0;
    }
  }
  return now_s() - t0;
}

int main(int argc, char **argv)
{
  bench_opts o;
  imd_store_opts so = {0};
  sql_store *s;
  char err[256];
  double secs, max_commit, t0, cpu0;
  long trimmed;

  if (parse_args(argc, argv, &o) != 0) {
    fprintf(stderr,
            "usage: %s [-n messages] [-b batch] [-u users] [-k keep_count] [-a] [-N] [-c] [-m]"
            " [-U] FILE\n",
            argv[0]);
    return 2;
  }
  if (access(o.path, F_OK) == 0) {
    fprintf(stderr, "%s exists; give a new file\n", o.path);
    return 2;
  }
  so.no_fsync = o.no_fsync != 0;
  so.keep_count = o.keep_count;
  so.keep_age_s = o.age_half ? 1 : 0;
  s = sqlstore_open(o.path, &so, err, sizeof err);
  if (s == NULL) {
    fprintf(stderr, "open: %s\n", err);
    return 1;
  }
  cpu0 = cpu_s();
  secs = run_appends(s, &o, &max_commit);
  cpu0 = cpu_s() - cpu0;
  if (secs < 0) {
    sqlstore_close(s);
    remove_store(o.path);
    return 1;
  }
  printf("synchronous=%s cid=%s marks=%s users=%lu%s: %lu appends (2 inboxes each), commit every %lu: "
         "%.0f appends/s, %.2f us CPU/append, slowest commit %.1f ms\n",
         o.no_fsync ? "NORMAL" : "FULL", o.with_cid ? "yes" : "no", o.marks ? "yes" : "no", o.users,
         o.uuid_uids ? " (UUID-shaped)" : "",
         o.messages, o.batch,
         (double)o.messages / secs, cpu0 * 1e6 / (double)o.messages, max_commit * 1e3);
  if (o.keep_count > 0) {
    t0 = now_s();
    trimmed = sqlstore_trim(s, 1700000000000 + o.messages);
    printf("trim to %u per user: %ld entries in %.0f ms\n", o.keep_count, trimmed,
           (now_s() - t0) * 1e3);
  }
  if (o.age_half) {
    double longest, t1;
    bool more = true;
    int steps = 0;
    long n;

    t0 = now_s();
    cpu0 = cpu_s();
    longest = 0;
    /* the users rows first, in steps, as imd's store thread writes them */
    for (n = 0; n >= 0 && sqlstore_users_unflushed(s) > USERS_FLUSH_STEP; steps++) {
      t1 = now_s();
      n = sqlstore_users_flush_step(s, USERS_FLUSH_STEP);
      if (now_s() - t1 > longest)
        longest = now_s() - t1;
    }
    t1 = now_s();
    n = sqlstore_trim_start(s, 1700000000000 + o.messages / 2 + 1000);
    if (now_s() - t1 > longest)
      longest = now_s() - t1;
    for (trimmed = 0; n >= 0 && more; steps++) {
      t1 = now_s();
      n = sqlstore_trim_step(s, &more);
      trimmed += n > 0 ? n : 0;
      if (now_s() - t1 > longest)
        longest = now_s() - t1;
    }
    if (n < 0)
      fprintf(stderr, "trim: %s\n", sqlstore_error(s));
    printf("trim by age, the older half: %ld entries in %.0f ms (%.0f ms CPU), flush steps + start + %d steps,"
           " the longest %.1f ms\n", trimmed, (now_s() - t0) * 1e3, (cpu_s() - cpu0) * 1e3, steps,
           longest * 1e3);
  }
  sqlstore_close(s);
  remove_store(o.path);
  return 0;
}
