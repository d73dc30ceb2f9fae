/* A reconnecting hiredis async connection on libevent. Backoff doubles
 * from 50 ms to 2 s with full jitter, so that a fleet of nodes does not hit
 * a restarted Redis in lockstep. */
#include "redis/redis_link.h"

#include <event2/event.h>
#include <hiredis/adapters/libevent.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BACKOFF_MIN_MS 50u
#define BACKOFF_MAX_MS 2000u

static void schedule_retry(rlink *l);

static void on_connect(const redisAsyncContext *ac, int status) {
  rlink *l = ac->data;
  if (status != REDIS_OK) {
    /* hiredis frees ac after this callback */
    l->ac = NULL;
    schedule_retry(l);
    return;
  }
  l->up = true;
  l->backoff_ms = 0;
  /* named, so that an operator (or a test) can tell the links apart in
   * CLIENT LIST */
  if (l->client_name[0])
    redisAsyncCommand(l->ac, NULL, NULL, "CLIENT SETNAME %s", l->client_name);
  if (l->on_state) l->on_state(l, true, l->ud);
}

static void on_disconnect(const redisAsyncContext *ac, int status) {
  (void)status;
  rlink *l = ac->data;
  bool was_up = l->up;
  l->ac = NULL;
  l->up = false;
  if (l->closing) return;
  if (was_up) {
    fprintf(stderr, "libim: redis %s link to %s:%d lost\n", l->name, l->host, l->port);
    if (l->on_state) l->on_state(l, false, l->ud);
  }
  schedule_retry(l);
}

static void connect_now(rlink *l) {
  if (l->closing || l->ac) return;
  redisAsyncContext *ac = redisAsyncConnect(l->host, l->port);
  if (!ac || ac->err) {
    if (ac) redisAsyncFree(ac);
    schedule_retry(l);
    return;
  }
  ac->data = l;
  l->ac = ac;
  redisLibeventAttach(ac, l->base);
  redisAsyncSetConnectCallback(ac, on_connect);
  redisAsyncSetDisconnectCallback(ac, on_disconnect);
}

static void on_retry(evutil_socket_t fd, short what, void *arg) {
  (void)fd;
  (void)what;
  connect_now(arg);
}

static void schedule_retry(rlink *l) {
  if (l->closing) return;
  l->backoff_ms = l->backoff_ms ? l->backoff_ms * 2 : BACKOFF_MIN_MS;
  if (l->backoff_ms > BACKOFF_MAX_MS) l->backoff_ms = BACKOFF_MAX_MS;
  l->rng ^= l->rng << 13;
  l->rng ^= l->rng >> 7;
  l->rng ^= l->rng << 17;
  uint32_t wait = 1 + (uint32_t)(l->rng % l->backoff_ms); /* full jitter */
  struct timeval tv = {wait / 1000, (wait % 1000) * 1000};
  event_add(l->retry_ev, &tv);
}

int rlink_init(rlink *l, struct event_base *base, const char *host, int port, const char *name,
               rlink_state_fn on_state, void *ud) {
  memset(l, 0, sizeof *l);
  l->base = base;
  l->host = host;
  l->port = port;
  l->name = name;
  l->on_state = on_state;
  l->ud = ud;
  l->rng = ((uint64_t)(uintptr_t)l * 0x9E3779B97F4A7C15ULL) | 1;
  l->retry_ev = evtimer_new(base, on_retry, l);
  return l->retry_ev ? 0 : -1;
}

void rlink_start(rlink *l) { connect_now(l); }

void rlink_close(rlink *l) {
  l->closing = true;
  if (l->retry_ev) {
    event_free(l->retry_ev);
    l->retry_ev = NULL;
  }
  if (l->ac) {
    redisAsyncContext *ac = l->ac;
    l->ac = NULL;
    l->up = false;
    redisAsyncFree(ac); /* pending callbacks get NULL replies */
  }
}

int rlink_cmd(rlink *l, redisCallbackFn *fn, void *priv, int argc, const char **argv,
              const size_t *lens) {
  if (!l->up || !l->ac) return -1;
  return redisAsyncCommandArgv(l->ac, fn, priv, argc, argv, lens) == REDIS_OK ? 0 : -1;
}

int rlink_cmdf(rlink *l, redisCallbackFn *fn, void *priv, const char *fmt, ...) {
  if (!l->up || !l->ac) return -1;
  va_list ap;
  va_start(ap, fmt);
  int rc = redisvAsyncCommand(l->ac, fn, priv, fmt, ap);
  va_end(ap);
  return rc == REDIS_OK ? 0 : -1;
}
