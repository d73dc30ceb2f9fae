/* Append throughput of imd's Redis store: 1:1 messages with a client id,
 * each stored in the inboxes of its sender and its receiver, with `window`
 * appends in flight on one hiredis async connection (as imd pipelines
 * them); then INFO commandstats: client commands and the commands Redis ran
 * per message.
 *
 *   redis-store-bench [-n messages] [-w window] [-u users] [-k keep_count]
 *                     [-a keep_age_s] [-m] [-p port] [-P prefix]
 *
 * Against a redis-server you started (default 127.0.0.1:6379), e.g.
 *   redis-server --port 7777 --save '' --appendonly yes --appendfsync always
 * -m: a delivered mark after every append. Resets the server's command
 * statistics (CONFIG RESETSTAT) and writes keys under the prefix
 * (default "bench:"); flush them yourself. */
#include <event2/event.h>
#include <hiredis/adapters/libevent.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "store_redis.h"

typedef struct bench {
  struct event_base *base;
  redisAsyncContext *ac;
  imd_store *s;
  unsigned long messages, window, users, sent, done, failed;
  int marks;
  uint64_t rnd;
  char (*ids)[24];
  imd_store_msg *msgs;
  const char *(*uids)[2];
  char (*names)[32];
} bench;

typedef struct pend {
  imd_redis_reply_fn fn;
  void *arg;
} pend;

static void io_reply(redisAsyncContext *c, void *reply, void *priv) {
  (void)c;
  pend *p = priv;
  p->fn(p->arg, reply);
  free(p);
}

static int io_command(void *ctx, int argc, const char **argv, const size_t *len,
                      imd_redis_reply_fn fn, void *arg) {
  bench *b = ctx;
  pend *p = malloc(sizeof *p);
  if (!p || !b->ac) {
    free(p);
    return -1;
  }
  *p = (pend){fn, arg};
  if (redisAsyncCommandArgv(b->ac, io_reply, p, argc, argv, len) != REDIS_OK) {
    free(p);
    return -1;
  }
  return 0;
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static uint64_t next_rand(uint64_t *x) {
  *x ^= *x << 13;
  *x ^= *x >> 7;
  *x ^= *x << 17;
  return *x;
}

static void send_more(bench *b);

static void appended(void *arg, int status, const uint64_t *seqs, const char *id) {
  bench *b = arg;
  (void)id;
  b->done++;
  if (status < 0) b->failed++;
  if (b->marks && seqs) {
    const char *const *u = b->uids[(b->done - 1) % b->window];
    imd_store_mark(b->s, u[0], "phone", seqs[0]);
  }
  if (b->done == b->messages)
    event_base_loopbreak(b->base);
  else
    send_more(b);
}

/* Keeps `window` appends in flight; slot i of the buffers is reused once
 * its append completed (completions come in order). */
static void send_more(bench *b) {
  while (b->sent < b->messages && b->sent - b->done < b->window) {
    unsigned long slot = b->sent % b->window;
    unsigned long from = next_rand(&b->rnd) % b->users, to = next_rand(&b->rnd) % b->users;
    if (to == from) to = (to + 1) % b->users;
    snprintf(b->ids[slot], 24, "b%lu", b->sent);
    b->uids[slot][0] = b->names[to];
    b->uids[slot][1] = b->names[from];
    b->msgs[slot] = (imd_store_msg){.id = b->ids[slot], .from = b->names[from], .device = "d1",
                                    .cid = b->ids[slot], .to = b->names[to],
                                    .ts = (uint64_t)time(NULL) * 1000u,
                                    .data = "{\"text\":\"hello there\"}", .data_len = 22};
    if (imd_store_append(b->s, &b->msgs[slot], b->uids[slot], 2, appended, b) != 0) {
      fprintf(stderr, "append: %s\n", b->s->ops->error(b->s));
      exit(1);
    }
    b->sent++;
  }
}

static long stat_of(const char *info, const char *cmd) {
  char key[64];
  snprintf(key, sizeof key, "cmdstat_%s:calls=", cmd);
  const char *p = strstr(info, key);
  return p ? strtol(p + strlen(key), NULL, 10) : 0;
}

int main(int argc, char **argv) {
  bench b = {.messages = 100000, .window = 256, .users = 10000, .rnd = 88172645463325252u};
  imd_store_opts o = {0};
  int port = 6379, c;
  const char *prefix = "bench:";
  while ((c = getopt(argc, argv, "n:w:u:k:a:mp:P:")) != -1) {
    switch (c) {
    case 'n': b.messages = strtoul(optarg, NULL, 10); break;
    case 'w': b.window = strtoul(optarg, NULL, 10); break;
    case 'u': b.users = strtoul(optarg, NULL, 10); break;
    case 'k': o.keep_count = (uint32_t)strtoul(optarg, NULL, 10); break;
    case 'a': o.keep_age_s = (uint32_t)strtoul(optarg, NULL, 10); break;
    case 'm': b.marks = 1; break;
    case 'p': port = atoi(optarg); break;
    case 'P': prefix = optarg; break;
    default:
      fprintf(stderr, "usage: redis-store-bench [-n messages] [-w window] [-u users]"
                      " [-k keep_count] [-a keep_age_s] [-m] [-p port] [-P prefix]\n");
      return 2;
    }
  }
  if (!b.messages || !b.window || b.users < 2) return 2;
  b.ids = calloc(b.window, sizeof *b.ids);
  b.msgs = calloc(b.window, sizeof *b.msgs);
  b.uids = calloc(b.window, sizeof *b.uids);
  b.names = calloc(b.users, sizeof *b.names);
  if (!b.ids || !b.msgs || !b.uids || !b.names) return 1;
  for (unsigned long i = 0; i < b.users; i++) snprintf(b.names[i], 32, "user%lu", i);

  redisContext *side = redisConnect("127.0.0.1", port);
  if (!side || side->err) {
    fprintf(stderr, "cannot connect to 127.0.0.1:%d\n", port);
    return 1;
  }
  b.base = event_base_new();
  b.ac = redisAsyncConnect("127.0.0.1", port);
  if (!b.base || !b.ac || b.ac->err || redisLibeventAttach(b.ac, b.base) != REDIS_OK) return 1;
  imd_redis_io io = {.command = io_command, .ctx = &b};
  char err[256];
  b.s = imd_store_redis_new(&io, prefix, &o, err, sizeof err);
  if (!b.s) {
    fprintf(stderr, "%s\n", err);
    return 1;
  }
  freeReplyObject(redisCommand(side, "CONFIG RESETSTAT"));
  double t0 = now_s();
  send_more(&b);
  event_base_dispatch(b.base);
  double t = now_s() - t0;
  redisReply *r = redisCommand(side, "INFO commandstats");
  long evalsha = r ? stat_of(r->str, "evalsha") : 0, inside = 0;
  for (const char *p = r ? r->str : ""; (p = strstr(p, "calls=")); p++)
    inside += strtol(p + 6, NULL, 10);
  inside -= evalsha + stat_of(r ? r->str : "", "script|load") +
            stat_of(r ? r->str : "", "config|resetstat");
  printf("%lu appends (%lu failed) in %.2f s: %.0f appends/s, window %lu\n", b.messages,
         b.failed, t, (double)b.messages / t, b.window);
  printf("EVALSHA per message %.2f, commands run inside the scripts per message %.2f\n",
         (double)evalsha / (double)b.messages, (double)inside / (double)b.messages);
  if (r) freeReplyObject(r);
  b.s->ops->close(b.s);
  redisAsyncFree(b.ac);
  redisFree(side);
  event_base_free(b.base);
  return b.failed ? 1 : 0;
}
