/* The Redis store (store_redis.c) against a real redis-server that each
 * test starts on a free port in a temp dir (AOF, appendfsync always),
 * driven through a real hiredis async connection on a libevent loop: the
 * test's imd_redis_io is what imd's connection would be. Covers what
 * test_store.c and test_store_thread.c cover where it applies, plus
 * EDOWN, NOSCRIPT, SIGKILL + restart from the AOF, and commands per message
 * (INFO commandstats). Skipped when redis-server is not on PATH. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <event2/event.h>
#include <fcntl.h>
#include <inttypes.h>
#include <hiredis/adapters/libevent.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "store_redis.h"

#define MAXK 1024

typedef struct entry {
  uint64_t seq;
  char id[24], from[64], device[32], cid[32], to[64], group[32];
  bool has_cid, has_to, has_group;
  uint64_t ts;
  char data[256];
  size_t data_len;
} entry;

typedef struct fx {
  char dir[64];
  int port;
  pid_t pid;
  struct event_base *base;
  redisAsyncContext *ac;
  redisContext *side;      /* blocking connection for checks */
  bool down;               /* the io says the connection is down */
  int null_next;           /* answer this many commands with NULL, unsent */
  int out;                 /* commands sent and not answered */
  void (*after_noscript)(struct fx *f); /* once, after a NOSCRIPT answer reached the store */
  imd_store *s;
  imd_store_opts o;
  /* what the callbacks saw, by request tag */
  int order[MAXK], done;
  int status[MAXK];
  int nrecv[MAXK];         /* receivers of append k (0 reads as 1) */
  uint64_t seqs[MAXK][8];
  char ids[MAXK][24];
  /* the last sync, user_state and members answer */
  entry got[64];
  size_t ngot;
  imd_sync_info info;
  uint64_t last, trimmed;
  char devs[8][16];
  uint64_t marks[8];
  size_t ndevs;
  char members[256];
} fx;

static fx *F;
static bool have_redis;

/* ---- redis-server ------------------------------------------------------------ */

static int free_port(void) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t len = sizeof a;
  assert_true(fd >= 0);
  assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
  assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &len), 0);
  close(fd);
  return ntohs(a.sin_port);
}

static void nap_ms(long ms) {
  struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
  nanosleep(&ts, NULL);
}

/* Starts redis-server on f->dir (its AOF there) and waits until PING
 * answers; a new port when the chosen one was taken meanwhile. */
static void redis_start(fx *f) {
  for (int attempt = 0; attempt < 5; attempt++) {
    if (!f->port) f->port = free_port();
    char port[16], log[96];
    snprintf(port, sizeof port, "%d", f->port);
    snprintf(log, sizeof log, "%s/redis.log", f->dir);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL); /* no server outlives a crashed test */
      int fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0644);
      if (fd >= 0) {
        dup2(fd, 1);
        dup2(fd, 2);
      }
      execlp("redis-server", "redis-server", "--port", port, "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", f->dir, (char *)NULL);
      _exit(127);
    }
    f->pid = pid;
    for (int i = 0; i < 1000; i++) { /* up to 10 s */
      int st;
      if (waitpid(pid, &st, WNOHANG) == pid) {
        f->pid = 0;
        break;
      }
      redisContext *c = redisConnect("127.0.0.1", f->port);
      redisReply *r = c && !c->err ? redisCommand(c, "PING") : NULL;
      bool up = r && r->type == REDIS_REPLY_STATUS && !strcmp(r->str, "PONG");
      if (r) freeReplyObject(r);
      if (up) {
        f->side = c;
        return;
      }
      if (c) redisFree(c);
      nap_ms(10);
    }
    if (f->pid) {
      kill(f->pid, SIGKILL);
      waitpid(f->pid, NULL, 0);
      f->pid = 0;
    }
    f->port = 0;
  }
  fail_msg("redis-server did not start (see %s/redis.log)", f->dir);
}

static void redis_stop(fx *f, int sig) {
  if (f->side) redisFree(f->side);
  f->side = NULL;
  if (f->pid) {
    kill(f->pid, sig);
    waitpid(f->pid, NULL, 0);
  }
  f->pid = 0;
}

/* A command on the blocking side connection; the caller frees the reply. */
static redisReply *side(fx *f, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  redisReply *r = redisvCommand(f->side, fmt, ap);
  va_end(ap);
  assert_non_null(r);
  return r;
}

static long long side_int(fx *f, const char *fmt, const char *arg) {
  redisReply *r = side(f, fmt, arg);
  assert_int_equal(r->type, REDIS_REPLY_INTEGER);
  long long v = r->integer;
  freeReplyObject(r);
  return v;
}

/* calls= of one command in INFO commandstats (0 when never run). */
static long cmd_calls(fx *f, const char *cmd) {
  redisReply *r = side(f, "INFO commandstats");
  char key[64];
  snprintf(key, sizeof key, "cmdstat_%s:calls=", cmd);
  const char *p = strstr(r->str, key);
  long v = p ? strtol(p + strlen(key), NULL, 10) : 0;
  freeReplyObject(r);
  return v;
}

/* ---- the io: a hiredis async connection ------------------------------------------ */

typedef struct pend {
  fx *f;
  imd_redis_reply_fn fn;
  void *arg;
} pend;

static void io_reply(redisAsyncContext *c, void *reply, void *priv) {
  (void)c;
  pend *p = priv;
  fx *f = p->f;
  redisReply *r = reply;
  f->out--;
  p->fn(p->arg, reply);
  free(p);
  if (f->after_noscript && r && r->type == REDIS_REPLY_ERROR && !strncmp(r->str, "NOSCRIPT", 8)) {
    void (*hook)(fx *) = f->after_noscript;
    f->after_noscript = NULL;
    hook(f);
  }
}

static void io_null(evutil_socket_t fd, short what, void *priv) {
  (void)fd;
  (void)what;
  io_reply(NULL, NULL, priv);
}

static int io_command(void *ctx, int argc, const char **argv, const size_t *len,
                      imd_redis_reply_fn fn, void *arg) {
  fx *f = ctx;
  if (f->down || !f->ac) return -1;
  pend *p = malloc(sizeof *p);
  assert_non_null(p);
  *p = (pend){f, fn, arg};
  if (f->null_next > 0) { /* a connection that died: answered NULL, later */
    f->null_next--;
    f->out++;
    struct timeval now = {0, 0};
    assert_int_equal(event_base_once(f->base, -1, EV_TIMEOUT, io_null, p, &now), 0);
    return 0;
  }
  if (redisAsyncCommandArgv(f->ac, io_reply, p, argc, argv, len) != REDIS_OK) {
    free(p);
    return -1;
  }
  f->out++;
  return 0;
}

static void on_disconnect(const redisAsyncContext *c, int status) {
  (void)status;
  if (F && F->ac == c) F->ac = NULL;
}

static void on_connect(const redisAsyncContext *c, int status) {
  if (status != REDIS_OK && F && F->ac == c) F->ac = NULL;
}

static void io_connect(fx *f) {
  f->ac = redisAsyncConnect("127.0.0.1", f->port);
  assert_non_null(f->ac);
  assert_int_equal(f->ac->err, 0);
  assert_int_equal(redisLibeventAttach(f->ac, f->base), REDIS_OK);
  redisAsyncSetConnectCallback(f->ac, on_connect);
  redisAsyncSetDisconnectCallback(f->ac, on_disconnect);
}

/* Drops the connection at once: hiredis answers what is pending with NULL. */
static void io_drop(fx *f) {
  redisAsyncContext *ac = f->ac;
  f->ac = NULL;
  if (ac) redisAsyncFree(ac);
}

static const imd_redis_io test_io = {.command = io_command};

static imd_store *store_open(fx *f) {
  imd_redis_io io = test_io;
  io.ctx = f;
  char err[256] = "";
  imd_store *s = imd_store_redis_new(&io, "t:", &f->o, err, sizeof err);
  if (!s) fail_msg("imd_store_redis_new: %s", err);
  return s;
}

static void reopen(fx *f, uint32_t keep_count, uint32_t keep_age_s) {
  if (f->s) f->s->ops->close(f->s);
  f->o = (imd_store_opts){.keep_count = keep_count, .keep_age_s = keep_age_s};
  f->s = store_open(f);
}

/* ---- fixture ------------------------------------------------------------------------ */

static int group_setup(void **state) {
  (void)state;
  have_redis = system("command -v redis-server >/dev/null 2>&1") == 0;
  signal(SIGPIPE, SIG_IGN);
  return 0;
}

static int setup(void **state) {
  fx *f = calloc(1, sizeof *f);
  assert_non_null(f);
  F = f;
  *state = f;
  if (!have_redis) return 0;
  snprintf(f->dir, sizeof f->dir, "/tmp/imd-redis-XXXXXX");
  assert_non_null(mkdtemp(f->dir));
  f->base = event_base_new();
  redis_start(f);
  io_connect(f);
  reopen(f, 0, 0);
  return 0;
}

/* Run the loop until cond() holds (or 10 s); returns whether it does. */
static bool loop_until(fx *f, bool (*cond)(fx *f, long v), long v) {
  for (int i = 0; i < 1000 && !cond(f, v); i++) {
    struct timeval tv = {0, 10000};
    event_base_loopexit(f->base, &tv);
    if (event_base_dispatch(f->base) < 0) break; /* a failed test left it running */
  }
  return cond(f, v);
}

static void run_until(fx *f, bool (*cond)(fx *f, long v), long v) {
  assert_true(loop_until(f, cond, v));
}

static bool done_at_least(fx *f, long want) { return f->done >= want; }
static bool all_answered(fx *f, long v) { (void)v; return f->out == 0; }

static void wait_done(fx *f, int want) {
  run_until(f, done_at_least, want);
  assert_int_equal(f->done, want);
}

static int teardown(void **state) {
  fx *f = *state;
  if (have_redis) {
    if (f->s) f->s->ops->close(f->s);
    if (f->ac) loop_until(f, all_answered, 0); /* the closed store's last answers */
    io_drop(f);
    redis_stop(f, SIGTERM);
    event_base_free(f->base);
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", f->dir);
    if (system(cmd) != 0) fprintf(stderr, "cannot remove %s\n", f->dir);
  }
  free(f);
  F = NULL;
  return 0;
}

#define NEED_REDIS()          \
  do {                        \
    if (!have_redis) skip();  \
  } while (0)

/* ---- requests and their callbacks ------------------------------------------------------- */

static void appended(void *arg, int status, const uint64_t *seqs, const char *id) {
  int k = (int)(intptr_t)arg;
  F->order[F->done++] = k;
  F->status[k] = status;
  int n = F->nrecv[k] ? F->nrecv[k] : 1;
  for (int i = 0; seqs && i < n; i++) F->seqs[k][i] = seqs[i];
  if (id) snprintf(F->ids[k], 24, "%s", id);
  assert_true(status != IMD_STORE_OK || (seqs && !id));
  assert_true(status != IMD_STORE_DUP || (!seqs && id));
  assert_true(status >= 0 || (!seqs && !id));
}

/* Messages live until their callback: a ring of them, by tag. */
static imd_store_msg msgs[MAXK];
static char idbuf[MAXK][24], cidbuf[MAXK][24];

static const char *const *uidv(const char *a, const char *b) {
  static const char *v[MAXK][2];
  static int at;
  const char **p = v[at++ % MAXK];
  p[0] = a;
  p[1] = b;
  return p;
}

/* Appends message k (id "m<k>") from `from` to the receivers to and from
 * (a 1:1 message, stored in both inboxes) or to `to` alone (from NULL:
 * sent by "system"). */
static int append(fx *f, int k, const char *from, const char *to, const char *cid, uint64_t ts) {
  snprintf(idbuf[k], 24, "m%d", k);
  msgs[k] = (imd_store_msg){.id = idbuf[k], .from = from ? from : "system", .device = "d1",
                            .to = to, .ts = ts, .data = "{\"text\":\"hi\"}", .data_len = 13};
  if (cid) {
    snprintf(cidbuf[k], 24, "%s", cid);
    msgs[k].cid = cidbuf[k];
  }
  f->nrecv[k] = from ? 2 : 1;
  return imd_store_append(f->s, &msgs[k], uidv(to, from), from ? 2 : 1, appended,
                          (void *)(intptr_t)k);
}

static void copy_str(char *dst, size_t size, const char *src, bool *present) {
  if (present) *present = src != NULL;
  assert_true(!src || strlen(src) < size);
  snprintf(dst, size, "%s", src ? src : "");
}

static void synced(void *arg, int status, const imd_stored *m, size_t n,
                   const imd_sync_info *info) {
  int k = (int)(intptr_t)arg;
  F->order[F->done++] = k;
  F->status[k] = status;
  F->ngot = n;
  if (status != 0) {
    assert_null(info);
    return;
  }
  F->info = *info;
  assert_true(n <= 64);
  for (size_t i = 0; i < n; i++) {
    entry *e = &F->got[i];
    e->seq = m[i].seq;
    copy_str(e->id, sizeof e->id, m[i].m.id, NULL);
    copy_str(e->from, sizeof e->from, m[i].m.from, NULL);
    copy_str(e->device, sizeof e->device, m[i].m.device, NULL);
    copy_str(e->cid, sizeof e->cid, m[i].m.cid, &e->has_cid);
    copy_str(e->to, sizeof e->to, m[i].m.to, &e->has_to);
    copy_str(e->group, sizeof e->group, m[i].m.group, &e->has_group);
    e->ts = m[i].m.ts;
    assert_true(m[i].m.data_len < sizeof e->data);
    assert_int_equal(m[i].m.data[m[i].m.data_len], '\0');
    memcpy(e->data, m[i].m.data, m[i].m.data_len);
    e->data_len = m[i].m.data_len;
  }
}

/* A sync, waited for. */
static imd_sync_info sync_wait(fx *f, const char *uid, uint64_t since, uint32_t limit,
                               size_t max_bytes) {
  int k = 900 + f->done % 100; /* tags above every append's */
  memset(&f->info, 0xa5, sizeof f->info);
  assert_int_equal(imd_store_sync(f->s, uid, since, limit, max_bytes, synced, (void *)(intptr_t)k),
                   0);
  wait_done(f, f->done + 1);
  assert_int_equal(f->status[k], 0);
  return f->info;
}

static void state_known(void *arg, int status, uint64_t last, uint64_t trimmed,
                        const imd_device_mark *devs, size_t n) {
  int k = (int)(intptr_t)arg;
  F->order[F->done++] = k;
  F->status[k] = status;
  F->last = last;
  F->trimmed = trimmed;
  F->ndevs = n;
  assert_true(n <= 8);
  for (size_t i = 0; i < n; i++) {
    copy_str(F->devs[i], sizeof F->devs[i], devs[i].device, NULL);
    F->marks[i] = devs[i].delivered;
  }
}

static void state_wait(fx *f, const char *uid) {
  int k = 800 + f->done % 100;
  assert_int_equal(f->s->ops->user_state(f->s, uid, state_known, (void *)(intptr_t)k), 0);
  wait_done(f, f->done + 1);
  assert_int_equal(f->status[k], 0);
}

static void members_known(void *arg, int status, const char *const *uids, size_t n) {
  int k = (int)(intptr_t)arg;
  F->order[F->done++] = k;
  F->status[k] = status;
  F->members[0] = '\0';
  for (size_t i = 0; i < n; i++) {
    strcat(F->members, uids[i]);
    strcat(F->members, ",");
  }
}

static void updated(void *arg, int status) {
  int k = (int)(intptr_t)arg;
  F->order[F->done++] = k;
  F->status[k] = status;
}

/* ---- tests ------------------------------------------------------------------------------- */

static void seqs_gap_free_and_callbacks_in_order(void **state) {
  NEED_REDIS();
  fx *f = *state;
  for (int k = 0; k < 10; k++) assert_int_equal(append(f, k, "alice", "bob", NULL, 1000), 0);
  assert_int_equal(append(f, 10, "alice", "dave", NULL, 1000), 0);
  assert_int_equal(append(f, 11, NULL, "carol", NULL, 1000), 0);
  assert_int_equal(append(f, 12, NULL, "bob", NULL, 1000), 0);
  assert_int_equal(imd_store_sync(f->s, "alice", 0, 0, 0, synced, (void *)13), 0);
  assert_int_equal(f->done, 0); /* never before the request returned */
  wait_done(f, 14);
  for (int k = 0; k < 14; k++) assert_int_equal(f->order[k], k);
  for (int k = 0; k < 10; k++) {
    assert_int_equal(f->status[k], IMD_STORE_OK);
    assert_int_equal(f->seqs[k][0], (uint64_t)k + 1); /* bob */
    assert_int_equal(f->seqs[k][1], (uint64_t)k + 1); /* alice */
  }
  assert_int_equal(f->seqs[10][0], 1);  /* dave */
  assert_int_equal(f->seqs[10][1], 11); /* alice */
  assert_int_equal(f->seqs[11][0], 1);  /* carol */
  assert_int_equal(f->seqs[12][0], 11); /* bob */
  /* the sync sent after the appends sees them all */
  assert_int_equal(f->ngot, 11);
  for (size_t i = 0; i < f->ngot; i++) assert_int_equal(f->got[i].seq, i + 1);
  assert_string_equal(f->got[10].id, "m10");
  assert_int_equal(f->info.last, 11);
  assert_int_equal(f->info.upto, 11);
  assert_false(f->info.more);
  assert_false(f->info.gap);
  assert_int_equal(f->info.trimmed, 0);
  imd_sync_info info = sync_wait(f, "bob", 0, 0, 0);
  assert_int_equal(f->ngot, 11);
  assert_string_equal(f->got[10].id, "m12");
  assert_string_equal(f->got[10].from, "system");
  assert_int_equal(info.last, 11);
  imd_store_stats st;
  f->s->ops->stats(f->s, &st);
  assert_int_equal(st.commits, 13);
  assert_int_equal(st.errors, 0);
}

static uint64_t big_seqs[300];

static void big_appended(void *arg, int status, const uint64_t *seqs, const char *id) {
  (void)id;
  F->order[F->done++] = (int)(intptr_t)arg;
  F->status[(intptr_t)arg] = status;
  if (seqs) memcpy(big_seqs, seqs, sizeof big_seqs);
}

static void append_to_many_users(void **state) {
  NEED_REDIS();
  fx *f = *state;
  static const char *const members[5] = {"u1", "u2", "u3", "u4", "u5"};
  imd_store_msg m = {.id = "g1", .from = "u1", .device = "d1", .group = "team", .ts = 5000,
                     .data = "{}", .data_len = 2};
  f->nrecv[0] = 5;
  f->nrecv[1] = 3;
  assert_int_equal(imd_store_append(f->s, &m, members, 5, appended, (void *)0), 0);
  wait_done(f, 1);
  for (int i = 0; i < 5; i++) assert_int_equal(f->seqs[0][i], 1);
  m.id = "g2";
  assert_int_equal(imd_store_append(f->s, &m, members + 2, 3, appended, (void *)1), 0);
  wait_done(f, 2);
  for (int i = 0; i < 3; i++) assert_int_equal(f->seqs[1][i], 2);
  /* a big group: one command still, every member's seq from its own counter */
  static char names[300][8];
  static const char *many[300];
  for (int i = 0; i < 300; i++) {
    snprintf(names[i], sizeof names[i], "u%d", i + 1);
    many[i] = names[i];
  }
  m.id = "g3";
  assert_int_equal(imd_store_append(f->s, &m, many, 300, big_appended, (void *)2), 0);
  wait_done(f, 3);
  assert_int_equal(f->status[2], IMD_STORE_OK);
  sync_wait(f, "u2", 0, 0, 0);
  assert_int_equal(f->ngot, 2);
  sync_wait(f, "u5", 0, 0, 0);
  assert_int_equal(f->ngot, 3);
  assert_string_equal(f->got[1].id, "g2");
  assert_true(f->got[1].has_group);
  assert_string_equal(f->got[1].group, "team");
  assert_false(f->got[1].has_to);
  assert_false(f->got[1].has_cid);
  assert_int_equal(f->got[1].ts, 5000);
  for (int i = 0; i < 300; i++) assert_int_equal(big_seqs[i], i < 2 ? 2 : i < 5 ? 3 : 1);
}

static void duplicates_answer_the_first_id(void **state) {
  NEED_REDIS();
  fx *f = *state;
  /* within one pipeline: the second is sent before the first is answered */
  assert_int_equal(append(f, 0, "alice", "bob", "c1", 1000), 0);
  assert_int_equal(append(f, 1, "alice", "bob", "c1", 1000), 0);
  wait_done(f, 2);
  assert_int_equal(append(f, 2, "alice", "bob", "c1", 1000), 0); /* after the answer */
  assert_int_equal(append(f, 3, "alice", "bob", "c2", 1000), 0);
  assert_int_equal(append(f, 4, "carol", "bob", "c1", 1000), 0); /* another sender */
  msgs[5] = (imd_store_msg){.id = "m5", .from = "alice", .device = "d2", .cid = "c1",
                            .to = "bob", .ts = 1000, .data = "1", .data_len = 1};
  f->nrecv[5] = 2;
  assert_int_equal(
      imd_store_append(f->s, &msgs[5], uidv("bob", "alice"), 2, appended, (void *)5), 0);
  assert_int_equal(append(f, 6, "alice", "bob", NULL, 1000), 0); /* no cid: never a dup */
  assert_int_equal(append(f, 7, "alice", "bob", NULL, 1000), 0);
  wait_done(f, 8);
  assert_int_equal(f->status[0], IMD_STORE_OK);
  assert_int_equal(f->status[1], IMD_STORE_DUP);
  assert_string_equal(f->ids[1], "m0");
  assert_int_equal(f->status[2], IMD_STORE_DUP);
  assert_string_equal(f->ids[2], "m0");
  /* the duplicates took no seq */
  assert_int_equal(f->status[3], IMD_STORE_OK);
  assert_int_equal(f->seqs[3][0], 2);
  assert_int_equal(f->seqs[4][0], 3);
  assert_int_equal(f->seqs[5][0], 4);
  assert_int_equal(f->seqs[6][0], 5);
  assert_int_equal(f->seqs[7][0], 6);
  /* without an age limit the key never expires */
  assert_int_equal(side_int(f, "PTTL %s", "t:idem:{alice}:d1:c1"), -1);

  /* after a reconnection, and with a new store on it */
  io_drop(f);
  io_connect(f);
  reopen(f, 0, 0);
  assert_int_equal(append(f, 8, "alice", "bob", "c1", 1000), 0);
  wait_done(f, 9);
  assert_int_equal(f->status[8], IMD_STORE_DUP);
  assert_string_equal(f->ids[8], "m0");
  imd_sync_info info = sync_wait(f, "bob", 0, 0, 0);
  assert_int_equal(f->ngot, 6);
  assert_int_equal(info.last, 6);
  assert_string_equal(f->got[0].id, "m0");
  assert_true(f->got[0].has_cid);
  assert_string_equal(f->got[0].cid, "c1");
  assert_false(f->got[4].has_cid);
}

static bool key_gone(fx *f, long v) {
  (void)v;
  return side_int(f, "EXISTS %s", "t:idem:{alice}:d1:k") == 0;
}

/* With an age limit the idempotency key lives that long (PX), then the
 * same cid is a new message. */
static void dup_until_the_key_expires(void **state) {
  NEED_REDIS();
  fx *f = *state;
  reopen(f, 0, 1);
  assert_int_equal(append(f, 0, "alice", "bob", "k", 1000), 0);
  assert_int_equal(append(f, 1, "alice", "bob", "k", 1000), 0);
  wait_done(f, 2);
  assert_int_equal(f->status[1], IMD_STORE_DUP);
  long long ttl = side_int(f, "PTTL %s", "t:idem:{alice}:d1:k");
  assert_true(ttl > 0 && ttl <= 1000);
  run_until(f, key_gone, 0); /* about a second */
  assert_int_equal(append(f, 2, "alice", "bob", "k", 1000), 0);
  wait_done(f, 3);
  assert_int_equal(f->status[2], IMD_STORE_OK);
  assert_int_equal(f->seqs[2][0], 2);
}

static void sync_paging_budget_and_ahead(void **state) {
  NEED_REDIS();
  fx *f = *state;
  for (int k = 0; k < 25; k++) assert_int_equal(append(f, k, NULL, "bob", NULL, 1000), 0);
  wait_done(f, 25);
  imd_sync_info info = sync_wait(f, "bob", 0, 10, 0);
  assert_int_equal(f->ngot, 10);
  assert_int_equal(f->got[0].seq, 1);
  assert_int_equal(info.upto, 10);
  assert_true(info.more);
  assert_int_equal(info.last, 25);
  info = sync_wait(f, "bob", info.upto, 10, 0);
  assert_int_equal(f->ngot, 10);
  assert_int_equal(f->got[0].seq, 11);
  assert_string_equal(f->got[0].id, "m10");
  assert_int_equal(info.upto, 20);
  assert_true(info.more);
  info = sync_wait(f, "bob", info.upto, 10, 0);
  assert_int_equal(f->ngot, 5);
  assert_int_equal(info.upto, 25);
  assert_false(info.more);
  info = sync_wait(f, "bob", 25, 10, 0);
  assert_int_equal(f->ngot, 0);
  assert_int_equal(info.upto, 25);
  assert_false(info.more);
  /* a limit that ends exactly at the last entry leaves nothing more */
  info = sync_wait(f, "bob", 15, 10, 0);
  assert_int_equal(f->ngot, 10);
  assert_false(info.more);
  /* the byte budget (13 bytes an entry): stops before passing it, says more */
  info = sync_wait(f, "bob", 2, 0, 39);
  assert_int_equal(f->ngot, 3);
  assert_int_equal(f->got[0].seq, 3);
  assert_true(info.more);
  assert_int_equal(info.upto, 5);
  /* ... and returns at least one entry */
  info = sync_wait(f, "bob", 2, 0, 1);
  assert_int_equal(f->ngot, 1);
  assert_int_equal(info.upto, 3);
  assert_true(info.more);
  /* a client ahead of the inbox: nothing, upto its since, last says where
   * the inbox ends */
  info = sync_wait(f, "bob", 30, 10, 0);
  assert_int_equal(f->ngot, 0);
  assert_int_equal(info.last, 25);
  assert_int_equal(info.upto, 30);
  assert_false(info.more);
  assert_false(info.gap);
  /* an unknown user */
  info = sync_wait(f, "nobody", 0, 10, 0);
  assert_int_equal(f->ngot, 0);
  assert_int_equal(info.last, 0);
  assert_int_equal(info.upto, 0);
  assert_int_equal(info.trimmed, 0);
  assert_false(info.more);
  assert_false(info.gap);
  info = sync_wait(f, "nobody", 5, 10, 0);
  assert_int_equal(info.upto, 5);
  state_wait(f, "nobody");
  assert_int_equal(f->last, 0);
  assert_int_equal(f->trimmed, 0);
  assert_int_equal(f->ndevs, 0);
}

static void trim_by_count(void **state) {
  NEED_REDIS();
  fx *f = *state;
  reopen(f, 3, 0);
  for (int k = 0; k < 10; k++) {
    char cid[8];
    snprintf(cid, sizeof cid, "k%d", k);
    if (k < 2)
      assert_int_equal(append(f, k, "alice", "bob", cid, 1000), 0);
    else
      assert_int_equal(append(f, k, NULL, "bob", NULL, 1000), 0);
  }
  wait_done(f, 10);
  /* bob: 10 entries, the first 7 went as they passed the limit; alice: 2 */
  imd_sync_info info = sync_wait(f, "bob", 0, 0, 0);
  assert_true(info.gap);
  assert_int_equal(info.trimmed, 7);
  assert_int_equal(info.last, 10);
  assert_int_equal(info.upto, 10);
  assert_false(info.more);
  assert_int_equal(f->ngot, 3);
  assert_int_equal(f->got[0].seq, 8);
  assert_string_equal(f->got[0].id, "m7");
  info = sync_wait(f, "bob", 7, 2, 0);
  assert_false(info.gap);
  assert_int_equal(f->ngot, 2);
  assert_true(info.more);
  info = sync_wait(f, "bob", 3, 0, 0);
  assert_true(info.gap);
  assert_int_equal(f->ngot, 3);
  /* nothing left to return: upto is the trimmed mark */
  info = sync_wait(f, "alice", 0, 0, 0);
  assert_false(info.gap);
  assert_int_equal(f->ngot, 2);
  state_wait(f, "bob");
  assert_int_equal(f->last, 10);
  assert_int_equal(f->trimmed, 7);
  assert_int_equal(side_int(f, "XLEN %s", "t:inbox:{bob}"), 3);
  imd_store_stats st;
  f->s->ops->stats(f->s, &st);
  assert_int_equal(st.trimmed, 7);
  /* seqs go on after a trim */
  assert_int_equal(append(f, 10, NULL, "bob", NULL, 1000), 0);
  wait_done(f, f->done + 1);
  assert_int_equal(f->seqs[10][0], 11);
  info = sync_wait(f, "bob", 0, 0, 0);
  assert_int_equal(info.trimmed, 8);
  assert_int_equal(f->ngot, 3);
  /* k0's message is gone from bob's inbox; without an age limit its key stays */
  assert_int_equal(append(f, 11, "alice", "bob", "k0", 1000), 0);
  wait_done(f, f->done + 1);
  assert_int_equal(f->status[11], IMD_STORE_DUP);
  assert_string_equal(f->ids[11], "m0");
}

static void trim_by_age(void **state) {
  NEED_REDIS();
  fx *f = *state;
  const uint64_t t0 = 1700000000000;
  reopen(f, 0, 60);
  /* bob's entries at t0, +10 s, +20 s, +100 s; carol's at +5 s and +80 s */
  static const uint64_t at[4] = {0, 10000, 20000, 100000};
  for (int k = 0; k < 4; k++) assert_int_equal(append(f, k, NULL, "bob", NULL, t0 + at[k]), 0);
  assert_int_equal(append(f, 4, NULL, "carol", NULL, t0 + 5000), 0);
  assert_int_equal(append(f, 5, NULL, "carol", NULL, t0 + 80000), 0);
  wait_done(f, 6);
  /* too early for anything to have expired */
  assert_int_equal(imd_store_redis_trim(f->s, t0 + 30000), 0);
  imd_sync_info info = sync_wait(f, "bob", 0, 0, 0);
  assert_int_equal(f->ngot, 4);
  /* now = t0 + 90 s with a 60 s limit: everything before t0 + 30 s goes */
  assert_int_equal(imd_store_redis_trim(f->s, t0 + 90000), 0);
  info = sync_wait(f, "bob", 0, 0, 0); /* answered after the trim: same connection */
  assert_int_equal(info.trimmed, 3);
  assert_true(info.gap);
  assert_int_equal(f->ngot, 1);
  assert_string_equal(f->got[0].id, "m3");
  info = sync_wait(f, "carol", 0, 0, 0);
  assert_int_equal(info.trimmed, 1);
  assert_int_equal(f->ngot, 1);
  imd_store_stats st;
  f->s->ops->stats(f->s, &st);
  assert_int_equal(st.trimmed, 4);

  /* a clock that stepped back: an older ts after a newer one. Retention
   * drops a prefix, so the young entry 6 goes with the expired entry 7 */
  assert_int_equal(append(f, 6, NULL, "bob", NULL, t0 + 95000), 0);
  assert_int_equal(append(f, 7, NULL, "bob", NULL, t0 + 200000), 0);
  assert_int_equal(append(f, 8, NULL, "bob", NULL, t0 + 150000), 0);
  assert_int_equal(append(f, 9, NULL, "bob", NULL, t0 + 300000), 0);
  wait_done(f, f->done + 4);
  assert_int_equal(f->seqs[9][0], 8);
  /* cutoff t0 + 150.001 s: bob's 4..7 and carol's 2 go */
  assert_int_equal(imd_store_redis_trim(f->s, t0 + 150000 + 60000 + 1), 0);
  info = sync_wait(f, "bob", 0, 0, 0);
  assert_int_equal(info.trimmed, 7);
  assert_int_equal(f->ngot, 1);
  assert_string_equal(f->got[0].id, "m9");
  info = sync_wait(f, "carol", 0, 0, 0);
  assert_int_equal(f->ngot, 0);
  assert_int_equal(info.last, 2);
  assert_int_equal(info.trimmed, 2);
  assert_int_equal(info.upto, 2);
  assert_true(info.gap);
  assert_false(info.more);
  f->s->ops->stats(f->s, &st);
  assert_int_equal(st.trimmed, 9);
  /* carol's inbox is empty: she left the trim queue; bob waits under m9's ts */
  assert_int_equal(side_int(f, "ZCARD %s", "t:trimq"), 1);
  redisReply *r = side(f, "ZSCORE t:trimq bob");
  assert_int_equal(r->type, REDIS_REPLY_STRING);
  assert_int_equal(strtoull(r->str, NULL, 10), t0 + 300000);
  freeReplyObject(r);
  /* a tick without trim (imd's workers but the first) runs no step ... */
  uint64_t steps = st.trim_steps;
  assert_true(steps > 0);
  imd_store_redis_tick(f->s, t0 + 400000, false);
  info = sync_wait(f, "bob", 0, 0, 0);
  assert_int_equal(info.trimmed, 7);
  f->s->ops->stats(f->s, &st);
  assert_int_equal(st.trim_steps, steps);
  /* ... the tick with it runs a step at once, then waits 60 s */
  imd_store_redis_tick(f->s, t0 + 400000, true);
  info = sync_wait(f, "bob", 0, 0, 0);
  assert_int_equal(info.trimmed, 8);
  f->s->ops->stats(f->s, &st);
  assert_int_equal(st.trim_steps, steps + 1);
  assert_true(st.trim_us > 0 && st.trim_max_us <= st.trim_us);
  assert_int_equal(f->ngot, 0);
  assert_int_equal(side_int(f, "ZCARD %s", "t:trimq"), 0);
  /* an emptied inbox left the queue: the next append queues the user again,
   * and the appends after it leave the queue alone */
  assert_int_equal(append(f, 10, NULL, "carol", NULL, t0 + 500000), 0);
  wait_done(f, f->done + 1);
  r = side(f, "ZSCORE t:trimq carol");
  assert_int_equal(r->type, REDIS_REPLY_STRING);
  assert_int_equal(strtoull(r->str, NULL, 10), t0 + 500000);
  freeReplyObject(r);
  freeReplyObject(side(f, "CONFIG RESETSTAT"));
  assert_int_equal(append(f, 11, NULL, "carol", NULL, t0 + 600000), 0);
  wait_done(f, f->done + 1);
  assert_int_equal(cmd_calls(f, "zadd"), 0);
  assert_int_equal(imd_store_redis_trim(f->s, t0 + 600000 + 60000 + 1), 0);
  info = sync_wait(f, "carol", 0, 0, 0);
  assert_int_equal(info.trimmed, 4);
  assert_int_equal(side_int(f, "ZCARD %s", "t:trimq"), 0);
}

/* An age limit set on a store that ran without one: users whose inboxes
 * already hold entries join the queue at their next append. */
static void age_limit_set_later(void **state) {
  NEED_REDIS();
  fx *f = *state;
  const uint64_t t0 = 1700000000000;
  reopen(f, 0, 0);
  assert_int_equal(append(f, 0, NULL, "dave", NULL, t0), 0);
  wait_done(f, 1);
  assert_int_equal(side_int(f, "EXISTS %s", "t:trimq"), 0);
  reopen(f, 0, 60);
  assert_int_equal(append(f, 1, NULL, "dave", NULL, t0 + 1000), 0);
  wait_done(f, f->done + 1);
  redisReply *r = side(f, "ZSCORE t:trimq dave");
  assert_int_equal(r->type, REDIS_REPLY_STRING);
  assert_int_equal(strtoull(r->str, NULL, 10), t0 + 1000);
  freeReplyObject(r);
  assert_int_equal(imd_store_redis_trim(f->s, t0 + 1000 + 60000 + 1), 0);
  imd_sync_info info = sync_wait(f, "dave", 0, 0, 0);
  assert_int_equal(info.trimmed, 2);
  assert_int_equal(f->ngot, 0);
  assert_int_equal(side_int(f, "ZCARD %s", "t:trimq"), 0);
}

static void data_round_trip(void **state) {
  NEED_REDIS();
  fx *f = *state;
  static const char data[] = "{\"text\":\"h\xc3\xa9llo \xe4\xb8\x96\xe7\x95\x8c\","
                             "\"q\":\"it's \\\"quoted\\\" '); --\"}\0tail";
  const char *uid = "\xc3\xbc" "ser'\"1:{x}%2";
  const char *uids[1] = {uid};
  imd_store_msg m = {.id = "x1", .from = "o'brien}:", .device = "", .cid = "c'1:2",
                     .to = uid, .ts = UINT64_C(1) << 50, .data = data, .data_len = sizeof data - 1};
  imd_store_msg m2 = {.id = "x2", .from = "o'brien}:", .ts = 7};
  assert_int_equal(imd_store_append(f->s, &m, uids, 1, appended, (void *)0), 0);
  assert_int_equal(imd_store_append(f->s, &m2, uids, 1, appended, (void *)1), 0);
  assert_int_equal(imd_store_append(f->s, &m, uids, 1, appended, (void *)2), 0);
  wait_done(f, 3);
  assert_int_equal(f->status[2], IMD_STORE_DUP);
  sync_wait(f, uid, 0, 0, 0);
  assert_int_equal(f->ngot, 2);
  assert_int_equal(f->got[0].data_len, sizeof data - 1);
  assert_memory_equal(f->got[0].data, data, sizeof data - 1);
  assert_string_equal(f->got[0].from, "o'brien}:");
  assert_string_equal(f->got[0].device, "");
  assert_true(f->got[0].has_cid);
  assert_string_equal(f->got[0].cid, "c'1:2");
  assert_string_equal(f->got[0].to, uid);
  assert_int_equal(f->got[0].ts, UINT64_C(1) << 50);
  assert_int_equal(f->got[1].data_len, 0);
  assert_string_equal(f->got[1].device, "");
  assert_false(f->got[1].has_cid);
  assert_false(f->got[1].has_to);
  assert_false(f->got[1].has_group);
  /* the key names escape what would make them ambiguous or split a tag */
  assert_int_equal(side_int(f, "EXISTS %s", "t:inbox:{\xc3\xbc" "ser'\"1%3A%7Bx%7D%252}"), 1);
  assert_int_equal(side_int(f, "EXISTS %s", "t:idem:{o'brien%7D%3A}::c'1:2"), 1);
}

static void marks_never_lower_and_are_coalesced(void **state) {
  NEED_REDIS();
  fx *f = *state;
  for (int k = 0; k < 6; k++) assert_int_equal(append(f, k, NULL, "bob", NULL, 1000), 0);
  wait_done(f, 6);
  long evalsha0 = cmd_calls(f, "evalsha"), hset0 = cmd_calls(f, "hset");
  assert_int_equal(imd_store_mark(f->s, "bob", "phone", 5), 0);
  assert_int_equal(imd_store_mark(f->s, "bob", "phone", 3), 0);
  assert_int_equal(imd_store_mark(f->s, "bob", "", 2), 0);
  for (uint64_t i = 1; i <= 100; i++) assert_int_equal(imd_store_mark(f->s, "alice", "pc", i), 0);
  /* coalesced: nothing sent yet; they ride with the next append */
  assert_int_equal(cmd_calls(f, "evalsha"), evalsha0);
  assert_int_equal(append(f, 6, NULL, "carol", NULL, 1000), 0);
  wait_done(f, 7);
  assert_int_equal(cmd_calls(f, "evalsha"), evalsha0 + 1);
  /* one per (uid, device) that moves: alice has no message, so her marks
   * are cut to her last seq, 0, and write nothing */
  assert_int_equal(cmd_calls(f, "hset"), hset0 + 2);
  state_wait(f, "bob");
  assert_int_equal(f->last, 6);
  assert_int_equal(f->ndevs, 2);
  assert_string_equal(f->devs[0], "");
  assert_int_equal(f->marks[0], 2);
  assert_string_equal(f->devs[1], "phone");
  assert_int_equal(f->marks[1], 5);
  /* lower marks later, alone (the tick sends them), change nothing;
   * higher ones count; a read sends the marks before it */
  assert_int_equal(imd_store_mark(f->s, "bob", "phone", 4), 0);
  assert_int_equal(imd_store_mark(f->s, "bob", "laptop", 1), 0);
  imd_store_redis_tick(f->s, 1000, true);
  run_until(f, all_answered, 0);
  assert_int_equal(cmd_calls(f, "evalsha"), evalsha0 + 3); /* + the user_state */
  assert_int_equal(imd_store_mark(f->s, "bob", "laptop", 3), 0);
  state_wait(f, "bob");
  assert_int_equal(f->ndevs, 3);
  assert_string_equal(f->devs[1], "laptop");
  assert_int_equal(f->marks[1], 3);
  assert_int_equal(f->marks[2], 5); /* 4 came later but lower */
  state_wait(f, "alice");
  assert_int_equal(f->ndevs, 0);
  /* marks pending at close are sent by it */
  assert_int_equal(imd_store_mark(f->s, "bob", "phone", 6), 0);
  f->s->ops->close(f->s);
  f->s = NULL;
  run_until(f, all_answered, 0);
  reopen(f, 0, 0);
  state_wait(f, "bob");
  assert_int_equal(f->marks[2], 6);
  /* a mark past the user's last seq is cut to it */
  assert_int_equal(imd_store_mark(f->s, "bob", "laptop", 1000), 0);
  state_wait(f, "bob");
  assert_string_equal(f->devs[1], "laptop");
  assert_int_equal(f->marks[1], 6);
  /* bad marks */
  assert_int_equal(imd_store_mark(f->s, "", "d", 1), IMD_STORE_EINVAL);
  assert_int_equal(imd_store_mark(f->s, "bob", NULL, 1), IMD_STORE_EINVAL);
}

/* Pending marks are bounded: at MARKS_MAX (4096) distinct (uid, device)
 * they are sent at once, 256 to a command. */
static void marks_are_bounded(void **state) {
  NEED_REDIS();
  fx *f = *state;
  /* bob has 7 messages, so marks up to 7 are kept as they are */
  for (int k = 0; k < 7; k++) assert_int_equal(append(f, k, NULL, "bob", NULL, 1000), 0);
  wait_done(f, 7);
  run_until(f, all_answered, 0);
  long evalsha0 = cmd_calls(f, "evalsha");
  char dev[16];
  for (int i = 0; i < 4095; i++) {
    snprintf(dev, sizeof dev, "d%d", i);
    assert_int_equal(imd_store_mark(f->s, "bob", dev, 7), 0);
  }
  run_until(f, all_answered, 0);
  assert_int_equal(cmd_calls(f, "evalsha"), evalsha0);
  assert_int_equal(imd_store_mark(f->s, "bob", "last", 7), 0);
  run_until(f, all_answered, 0);
  assert_int_equal(cmd_calls(f, "evalsha"), evalsha0 + 16);
  assert_int_equal(side_int(f, "HLEN %s", "t:user:{bob}"), 4096 + 1); /* and "last" */
}

static void groups(void **state) {
  NEED_REDIS();
  fx *f = *state;
  const char *add[] = {"carol", "alice", "bob"}, *rm[] = {"bob", "nobody"}, *bad[] = {"d", ""};
  imd_store *s = f->s;
  assert_int_equal(s->ops->group_update(s, "g1", add, 3, NULL, 0, updated, (void *)0), 0);
  assert_int_equal(s->ops->group_members(s, "g1", members_known, (void *)1), 0);
  assert_int_equal(s->ops->group_update(s, "g1", bad, 2, NULL, 0, updated, (void *)9),
                   IMD_STORE_EINVAL);
  assert_int_equal(s->ops->group_update(s, "", add, 1, NULL, 0, updated, (void *)9),
                   IMD_STORE_EINVAL);
  assert_int_equal(s->ops->group_update(s, "g1", NULL, 0, rm, 2, updated, (void *)2), 0);
  wait_done(f, 3);
  assert_int_equal(f->status[0], 0);
  assert_int_equal(f->status[2], 0);
  assert_string_equal(f->members, "alice,bob,carol,"); /* uid order */
  assert_int_equal(s->ops->group_members(s, "g1", members_known, (void *)3), 0);
  wait_done(f, 4);
  assert_string_equal(f->members, "alice,carol,");
  /* a group with no member is no key */
  assert_int_equal(s->ops->group_update(s, "g1", NULL, 0, add, 3, updated, (void *)4), 0);
  assert_int_equal(s->ops->group_members(s, "g1", members_known, (void *)5), 0);
  assert_int_equal(s->ops->group_members(s, "none", members_known, (void *)6), 0);
  wait_done(f, 7);
  assert_string_equal(f->members, "");
  assert_int_equal(f->status[5], 0);
  assert_int_equal(side_int(f, "EXISTS %s", "t:group:{g1}"), 0);
  for (int k = 0; k < 7; k++) assert_int_equal(f->order[k], k);
  /* Redis answering an error (here: a key of another type) is EIO */
  freeReplyObject(side(f, "SET t:group:{bad} x"));
  assert_int_equal(s->ops->group_update(s, "bad", add, 1, NULL, 0, updated, (void *)7), 0);
  assert_int_equal(s->ops->group_members(s, "bad", members_known, (void *)8), 0);
  wait_done(f, 9);
  assert_int_equal(f->status[7], IMD_STORE_EIO);
  assert_int_equal(f->status[8], IMD_STORE_EIO);
  assert_non_null(strstr(s->ops->error(s), "WRONGTYPE"));
}

/* The io says down: every request fails at once with EDOWN, no callback.
 * A connection lost with commands out: they complete with EDOWN. */
static void edown(void **state) {
  NEED_REDIS();
  fx *f = *state;
  imd_store *s = f->s;
  f->down = true;
  assert_int_equal(append(f, 0, "alice", "bob", "c1", 1000), IMD_STORE_EDOWN);
  assert_int_equal(imd_store_sync(s, "bob", 0, 0, 0, synced, (void *)1), IMD_STORE_EDOWN);
  assert_int_equal(s->ops->user_state(s, "bob", state_known, (void *)1), IMD_STORE_EDOWN);
  assert_int_equal(s->ops->group_members(s, "g", members_known, (void *)1), IMD_STORE_EDOWN);
  const char *add[] = {"a"};
  assert_int_equal(s->ops->group_update(s, "g", add, 1, NULL, 0, updated, (void *)1),
                   IMD_STORE_EDOWN);
  assert_int_equal(imd_store_redis_trim(s, 1000), 0); /* no age limit: nothing to send */
  assert_int_equal(imd_store_mark(s, "bob", "phone", 1), 0); /* kept for later */
  assert_non_null(strstr(s->ops->error(s), "unreachable"));
  f->down = false;
  long evalsha0 = cmd_calls(f, "evalsha");
  imd_store_redis_tick(s, 1000, true); /* sends the mark */
  run_until(f, all_answered, 0);
  assert_int_equal(cmd_calls(f, "evalsha"), evalsha0 + 1);
  assert_int_equal(f->done, 0);

  /* answered NULL (the connection died with them out) */
  f->null_next = 2;
  assert_int_equal(append(f, 2, "alice", "bob", "c1", 1000), 0);
  assert_int_equal(imd_store_sync(s, "bob", 0, 0, 0, synced, (void *)3), 0);
  assert_int_equal(append(f, 4, "alice", "bob", "c1", 1000), 0);
  wait_done(f, 3);
  assert_int_equal(f->status[2], IMD_STORE_EDOWN);
  assert_int_equal(f->status[3], IMD_STORE_EDOWN);
  assert_int_equal(f->status[4], IMD_STORE_OK); /* nothing was stored by 2 */
  assert_int_equal(f->seqs[4][0], 1);
  for (int k = 0; k < 3; k++) assert_int_equal(f->order[k], k + 2);

  /* a real connection dropped with commands out: answered NULL by hiredis */
  for (int k = 5; k < 10; k++) assert_int_equal(append(f, k, "alice", "bob", NULL, 1000), 0);
  io_drop(f);
  wait_done(f, 8);
  for (int k = 5; k < 10; k++) assert_int_equal(f->status[k], IMD_STORE_EDOWN);
  assert_int_equal(append(f, 10, "alice", "bob", NULL, 1000), IMD_STORE_EDOWN);
  io_connect(f);
  assert_int_equal(append(f, 11, "alice", "bob", NULL, 1000), 0);
  wait_done(f, 9);
  assert_int_equal(f->status[11], IMD_STORE_OK);
  assert_int_equal(f->seqs[11][0], 2); /* the dropped ones were never sent */
  /* the mark made while down went out later (above), cut to bob's last seq
   * then: 0, nothing stored yet, so no device row */
  state_wait(f, "bob");
  assert_int_equal(f->ndevs, 0);
  imd_store_stats st;
  s->ops->stats(s, &st);
  assert_int_equal(st.errors, 7);
}

/* Scripts flushed from Redis (as after a restart): the first commands get
 * NOSCRIPT and are resent as EVAL; later requests are held back meanwhile,
 * so Redis still runs everything in request order and callbacks come in
 * order. */
/* Made while the store resends NOSCRIPT answers: held back, then sent
 * after the resends. */
static void requests_while_stalled(fx *f) {
  assert_int_equal(imd_store_sync(f->s, "bob", 0, 0, 0, synced, (void *)15), 0);
  assert_int_equal(append(f, 16, NULL, "bob", NULL, 1000), 0);
}

static void noscript_keeps_order(void **state) {
  NEED_REDIS();
  fx *f = *state;
  run_until(f, all_answered, 0); /* the store's own SCRIPT LOADs first */
  freeReplyObject(side(f, "SCRIPT FLUSH"));
  long eval0 = cmd_calls(f, "eval"), load0 = cmd_calls(f, "script|load");
  f->after_noscript = requests_while_stalled;
  int k = 0;
  for (int round = 0; round < 5; round++) {
    assert_int_equal(append(f, k, "alice", "bob", NULL, 1000), 0);
    k++;
    assert_int_equal(imd_store_sync(f->s, "bob", 0, 0, 0, synced, (void *)(intptr_t)k), 0);
    k++;
    assert_int_equal(append(f, k, NULL, "bob", NULL, 1000), 0);
    k++;
  }
  k += 2; /* and the two requests_while_stalled made */
  wait_done(f, k);
  assert_null(f->after_noscript);
  for (int i = 0; i < k; i++) assert_int_equal(f->order[i], i);
  for (int round = 0; round < 5; round++) {
    assert_int_equal(f->status[3 * round], IMD_STORE_OK);
    assert_int_equal(f->seqs[3 * round][0], (uint64_t)2 * round + 1);
    assert_int_equal(f->seqs[3 * round + 2][0], (uint64_t)2 * round + 2);
  }
  /* the held sync saw all 10 appends sent before it, the held append came next */
  assert_int_equal(f->status[15], 0);
  assert_int_equal(f->ngot, 10);
  assert_int_equal(f->seqs[16][0], 11);
  assert_int_equal(cmd_calls(f, "eval"), eval0 + 15); /* each first attempt once */
  assert_int_equal(cmd_calls(f, "script|load"), load0 + 7); /* before the held ones */
  /* the scripts are back: no more EVAL */
  long eval1 = cmd_calls(f, "eval");
  assert_int_equal(append(f, k, NULL, "bob", NULL, 1000), 0);
  wait_done(f, k + 1);
  assert_int_equal(cmd_calls(f, "eval"), eval1);
  /* load_scripts after a flush avoids the detour */
  freeReplyObject(side(f, "SCRIPT FLUSH"));
  assert_int_equal(imd_store_redis_load_scripts(f->s), 0);
  assert_int_equal(append(f, k + 1, NULL, "bob", NULL, 1000), 0);
  wait_done(f, k + 2);
  assert_int_equal(cmd_calls(f, "eval"), eval1);
  assert_int_equal(f->seqs[k + 1][0], 13);
}

#define KILL_N 600 /* appends sent at once before the SIGKILL */

static int acked_before_kill;

static void appended_then_kill(void *arg, int status, const uint64_t *seqs, const char *id) {
  appended(arg, status, seqs, id);
  if (status == IMD_STORE_OK && ++acked_before_kill == 20) redis_stop(F, SIGKILL);
}

/* SIGKILL with appends in flight, restart on the same AOF: every append
 * acked before the kill is there, seqs go on, and the empty script cache
 * is met by the NOSCRIPT path. */
static void acked_appends_survive_sigkill(void **state) {
  NEED_REDIS();
  fx *f = *state;
  acked_before_kill = 0;
  static const char *const bob[1] = {"bob"};
  for (int k = 0; k < KILL_N; k++) {
    snprintf(idbuf[k], 24, "m%d", k);
    snprintf(cidbuf[k], 24, "c%d", k);
    msgs[k] = (imd_store_msg){.id = idbuf[k], .from = "alice", .device = "d1", .cid = cidbuf[k],
                              .to = "bob", .ts = 1000, .data = "{}", .data_len = 2};
    assert_int_equal(imd_store_append(f->s, &msgs[k], bob, 1, appended_then_kill,
                                      (void *)(intptr_t)k), 0);
  }
  wait_done(f, KILL_N);
  int acked = 0;
  uint64_t top = 0;
  for (int k = 0; k < KILL_N; k++) {
    if (f->status[k] == IMD_STORE_OK) {
      acked++;
      assert_int_equal(f->seqs[k][0], (uint64_t)acked);
      top = f->seqs[k][0];
    } else {
      assert_int_equal(f->status[k], IMD_STORE_EDOWN);
    }
  }
  assert_true(acked >= 20); /* the rest were in flight (all of them, usually) */
  assert_null(f->ac);

  redis_start(f); /* same port and dir: loads the AOF */
  io_connect(f);
  /* read the whole inbox back, page by page */
  static char stored[KILL_N + 1][24];
  memset(stored, 0, sizeof stored);
  imd_sync_info info = {0};
  uint64_t since = 0;
  do {
    info = sync_wait(f, "bob", since, 64, 0);
    for (size_t i = 0; i < f->ngot; i++) {
      assert_true(f->got[i].seq <= KILL_N);
      snprintf(stored[f->got[i].seq], 24, "%s", f->got[i].id);
    }
    since = info.upto;
  } while (info.more);
  assert_true(info.last >= top); /* unacked ones may have been stored too */
  printf("SIGKILL with %d appends out: %d acked, all read back after the restart;"
         " %" PRIu64 " stored in all\n", KILL_N, acked, info.last);
  for (int k = 0; k < KILL_N; k++)
    if (f->status[k] == IMD_STORE_OK) assert_string_equal(stored[f->seqs[k][0]], idbuf[k]);
  assert_true(cmd_calls(f, "eval") >= 1); /* the sync came back by EVAL */
  /* a retried cid: DUP if it was stored, else stored with the next seq */
  int last_k = KILL_N - 1;
  assert_int_equal(append(f, KILL_N, "alice", "bob", msgs[last_k].cid, 1000), 0);
  wait_done(f, f->done + 1);
  if (info.last > (uint64_t)acked) {
    assert_true(f->status[KILL_N] == IMD_STORE_OK || f->status[KILL_N] == IMD_STORE_DUP);
  } else {
    assert_int_equal(f->status[KILL_N], IMD_STORE_OK);
    assert_int_equal(f->seqs[KILL_N][0], info.last + 1);
  }
}

static void close_completes_outstanding(void **state) {
  NEED_REDIS();
  fx *f = *state;
  for (int k = 0; k < 20; k++) assert_int_equal(append(f, k, "alice", "bob", NULL, 1000), 0);
  f->s->ops->close(f->s); /* no loop pass: close itself completes them */
  f->s = NULL;
  assert_int_equal(f->done, 20);
  for (int k = 0; k < 20; k++) {
    assert_int_equal(f->order[k], k);
    assert_int_equal(f->status[k], IMD_STORE_EIO);
  }
  run_until(f, all_answered, 0); /* the answers still come, and are only freed */
  assert_int_equal(f->done, 20);
}

/* One EVALSHA per stored 1:1 message, marks included; what runs inside. */
static void commands_per_message(void **state) {
  NEED_REDIS();
  fx *f = *state;
  reopen(f, 1000, 3600);
  freeReplyObject(side(f, "CONFIG RESETSTAT"));
  for (int k = 0; k < 100; k++) {
    char cid[8];
    snprintf(cid, sizeof cid, "c%d", k);
    assert_int_equal(append(f, k, "alice", "bob", cid, 1000), 0);
    assert_int_equal(imd_store_mark(f->s, "bob", "phone", (uint64_t)k), 0);
  }
  wait_done(f, 100);
  redisReply *r = side(f, "INFO commandstats");
  long calls = 0;
  for (const char *p = r->str; (p = strstr(p, "calls=")); p++) calls += strtol(p + 6, NULL, 10);
  printf("commandstats for 100 1:1 appends with cid and marks (keep_count, keep_age_s set):\n%s",
         r->str);
  freeReplyObject(r);
  long info_calls = cmd_calls(f, "info");
  assert_int_equal(cmd_calls(f, "evalsha"), 100);
  assert_int_equal(cmd_calls(f, "eval"), 0);
  /* inside the script: GET idem, 2x (HINCRBY, HMGET trimmed q, XADD), SET, + marks;
   * each user goes onto the trim queue once (ZADD, HSET q), not per message */
  assert_int_equal(cmd_calls(f, "xadd"), 200);
  assert_int_equal(cmd_calls(f, "hincrby"), 200);
  assert_int_equal(cmd_calls(f, "hmget"), 200);
  assert_int_equal(cmd_calls(f, "zadd"), 2);
  printf("client commands per message: 1 (EVALSHA); commands run by Redis per message: %.2f\n",
         (double)(calls - info_calls - 100) / 100.0);
}

static void invalid_arguments(void **state) {
  NEED_REDIS();
  fx *f = *state;
  imd_store *s = f->s;
  const char *twice[2] = {"bob", "bob"}, *empty[2] = {"bob", ""}, *null_uid[1] = {NULL};
  imd_store_msg m = {.id = "m1", .from = "alice", .device = "d", .cid = "c1", .ts = 1000};
  assert_int_equal(imd_store_append(s, &m, twice, 0, appended, NULL), IMD_STORE_EINVAL);
  assert_int_equal(imd_store_append(s, NULL, twice, 1, appended, NULL), IMD_STORE_EINVAL);
  assert_int_equal(imd_store_append(s, &m, empty, 2, appended, NULL), IMD_STORE_EINVAL);
  assert_int_equal(imd_store_append(s, &m, null_uid, 1, appended, NULL), IMD_STORE_EINVAL);
  assert_int_equal(imd_store_append(s, &m, twice, 2, appended, NULL), IMD_STORE_EINVAL);
  const char *three[3] = {"a", "b", "a"}, *three_empty[3] = {"a", "b", ""};
  assert_int_equal(imd_store_append(s, &m, three, 3, appended, NULL), IMD_STORE_EINVAL);
  assert_int_equal(imd_store_append(s, &m, three_empty, 3, appended, NULL), IMD_STORE_EINVAL);
  m.id = "123456789012345678901234";
  assert_int_equal(imd_store_append(s, &m, twice, 1, appended, NULL), IMD_STORE_EINVAL);
  m.id = "";
  assert_int_equal(imd_store_append(s, &m, twice, 1, appended, NULL), IMD_STORE_EINVAL);
  m.id = "m1";
  m.ts = UINT64_MAX;
  assert_int_equal(imd_store_append(s, &m, twice, 1, appended, NULL), IMD_STORE_EINVAL);
  m.ts = 1000;
  m.data_len = 3;
  assert_int_equal(imd_store_append(s, &m, twice, 1, appended, NULL), IMD_STORE_EINVAL);
  m.data_len = 0;
  assert_int_equal(imd_store_sync(s, "", 0, 0, 0, synced, NULL), IMD_STORE_EINVAL);
  assert_int_equal(imd_store_sync(s, "bob", 0, 0, 0, NULL, NULL), IMD_STORE_EINVAL);
  assert_int_equal(s->ops->user_state(s, NULL, state_known, NULL), IMD_STORE_EINVAL);
  assert_int_equal(s->ops->group_members(s, "", members_known, NULL), IMD_STORE_EINVAL);
  assert_true(strlen(s->ops->error(s)) > 0);
  /* none of it wrote anything: seqs start at 1 and c1 is no duplicate */
  assert_int_equal(imd_store_append(s, &m, twice, 1, appended, (void *)0), 0);
  wait_done(f, 1);
  assert_int_equal(f->status[0], IMD_STORE_OK);
  assert_int_equal(f->seqs[0][0], 1);
  char err[64];
  assert_null(imd_store_redis_new(NULL, "t:", NULL, err, sizeof err));
  imd_store_redis_tick(NULL, 0, true);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test_setup_teardown(seqs_gap_free_and_callbacks_in_order, setup, teardown),
      cmocka_unit_test_setup_teardown(append_to_many_users, setup, teardown),
      cmocka_unit_test_setup_teardown(duplicates_answer_the_first_id, setup, teardown),
      cmocka_unit_test_setup_teardown(dup_until_the_key_expires, setup, teardown),
      cmocka_unit_test_setup_teardown(sync_paging_budget_and_ahead, setup, teardown),
      cmocka_unit_test_setup_teardown(trim_by_count, setup, teardown),
      cmocka_unit_test_setup_teardown(trim_by_age, setup, teardown),
      cmocka_unit_test_setup_teardown(age_limit_set_later, setup, teardown),
      cmocka_unit_test_setup_teardown(data_round_trip, setup, teardown),
      cmocka_unit_test_setup_teardown(marks_never_lower_and_are_coalesced, setup, teardown),
      cmocka_unit_test_setup_teardown(marks_are_bounded, setup, teardown),
      cmocka_unit_test_setup_teardown(groups, setup, teardown),
      cmocka_unit_test_setup_teardown(edown, setup, teardown),
      cmocka_unit_test_setup_teardown(noscript_keeps_order, setup, teardown),
      cmocka_unit_test_setup_teardown(acked_appends_survive_sigkill, setup, teardown),
      cmocka_unit_test_setup_teardown(close_completes_outstanding, setup, teardown),
      cmocka_unit_test_setup_teardown(commands_per_message, setup, teardown),
      cmocka_unit_test_setup_teardown(invalid_arguments, setup, teardown),
  };
  return cmocka_run_group_tests(tests, group_setup, NULL);
}
