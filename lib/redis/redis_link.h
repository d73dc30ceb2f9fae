/* One hiredis async connection that reconnects with backoff (internal to
 * the Redis cluster module). */
#ifndef IM_REDIS_LINK_H
#define IM_REDIS_LINK_H

#include <hiredis/async.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct event_base;
struct event;
typedef struct rlink rlink;

/* The link came up (up) or went down (!up; it reconnects by itself). */
typedef void (*rlink_state_fn)(rlink *l, bool up, void *ud);

struct rlink {
  struct event_base *base;
  const char *host;         /* borrowed from the owner */
  int port;
  const char *name;         /* for logs: "commands", "stream", "rooms" */
  char client_name[160];    /* CLIENT SETNAME on connect ("" = none) */
  redisAsyncContext *ac;    /* NULL while down */
  bool up;                  /* connected (connect callback said OK) */
  bool closing;             /* rlink_close(): no reconnect */
  struct event *retry_ev;
  uint32_t backoff_ms;
  uint64_t rng;
  rlink_state_fn on_state;
  void *ud;
};

/* Set up (no I/O yet). Returns 0 or -1 (memory). */
int rlink_init(rlink *l, struct event_base *base, const char *host, int port, const char *name,
               rlink_state_fn on_state, void *ud);
/* Connect now (and keep reconnecting). */
void rlink_start(rlink *l);
/* Disconnect for good: pending callbacks get NULL replies. */
void rlink_close(rlink *l);
/* Send a command. Returns 0 (fn is called once, later, reply NULL if the
 * link fails first) or -1 when the link is down (fn is not called). */
int rlink_cmd(rlink *l, redisCallbackFn *fn, void *priv, int argc, const char **argv,
              const size_t *lens);
/* The same with a printf-like format (hiredis' %s/%b). */
int rlink_cmdf(rlink *l, redisCallbackFn *fn, void *priv, const char *fmt, ...);

#endif
