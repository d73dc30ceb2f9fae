/* An asynchronous HTTP/1.1 client for imd's back-end hooks: POSTs to one
 * http:// URL over a bounded pool of keep-alive connections, on the libevent
 * loop, never blocking it (non-blocking connect, llhttp for the answers).
 *
 * Requests wait in one bounded FIFO queue for a free connection; each has
 * its own deadline, queue time included. A request whose connection was
 * reused and dies before any byte of the answer (the server closed an idle
 * keep-alive connection as we wrote) is sent again once on a fresh
 * connection; no other request is ever retried here (hooks.c decides).
 * Callbacks always run from the loop, never inside hook_client_post(). */
#ifndef IMD_HOOK_CLIENT_H
#define IMD_HOOK_CLIENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct event_base;

typedef struct hook_client hook_client;

/* A budget shared by the clients of several loops (threads), e.g. one per
 * worker thread of a process: max_conns connections open and max_queue
 * requests waiting, counted over all of them together, and max_events
 * presence events held (hook_budget_hold). A client with requests waiting
 * and no connection left in the budget asks the others to close their idle
 * ones (through their wake function) and is woken when one is closed, so
 * keep-alive connections follow the load. The lock inside is taken when a
 * request is queued or leaves the queue and when a connection opens or
 * closes. */
typedef struct hook_budget hook_budget;
/* NULL when out of memory. */
hook_budget *hook_budget_new(uint32_t max_conns, uint32_t max_queue);
/* After every client that used it is freed. NULL is a no-op. */
void hook_budget_free(hook_budget *b);
/* Hold n more (n > 0) presence events if the held ones stay within
 * max_queue (true), or let n go (n < 0). */
bool hook_budget_hold(hook_budget *b, long n);

typedef struct hook_client_opts {
  uint32_t max_conns;    /* connections open at once (>= 1); with a budget: the budget's */
  uint32_t max_queue;    /* requests waiting for a connection; over it: HOOK_EFULL; ditto */
  size_t max_response;   /* largest answer body; over it: HOOK_EPROTO */
  uint32_t idle_ms;      /* an idle keep-alive connection is closed after this long */
  hook_budget *budget;   /* shared with clients on other loops, or NULL: the bounds are this one's */
  /* With a budget: run hook_client_kick(this client) on its own loop soon
   * (called from any thread; e.g. through a mailbox). */
  void (*wake)(void *ud);
  void *wake_ud;
} hook_client_opts;

/* Outcomes below 0 passed to hook_done_fn (status >= 100 is an HTTP status). */
enum {
  HOOK_ETIMEOUT = -1,   /* the deadline passed (queued, connecting or waiting for the answer) */
  HOOK_ECONNECT = -2,   /* the connection could not be made (refused, unreachable) */
  HOOK_EIO = -3,        /* the connection died before the whole answer */
  HOOK_EPROTO = -4,     /* the answer was not HTTP/1.x, or over max_response */
  HOOK_EFULL = -5,      /* only returned by hook_client_post: the queue is full */
  HOOK_ENOMEM = -6,     /* only returned by hook_client_post */
  HOOK_ECANCELED = -7   /* the client is being freed */
};

/* The answer to one request: status (an HTTP status, or a HOOK_E* code)
 * and the body (NUL-terminated, len bytes; NULL when status < 0), valid
 * during the call only; latency_us from the post to the outcome. */
typedef void (*hook_done_fn)(void *arg, int status, const char *body, size_t len,
                             uint64_t latency_us);

/* Parse url ("http://HOST[:PORT][/PATH]", HOST a name or an IPv4/IPv6
 * literal in brackets) and resolve HOST once, now (getaddrinfo: the only
 * blocking call, made at startup). Returns the client, or NULL with the
 * reason in err. https:// is refused. */
hook_client *hook_client_new(struct event_base *base, const char *url,
                             const hook_client_opts *o, char *err, size_t errlen);

/* POST body (len bytes, copied) with Content-Type: application/json and
 * the extra header lines `headers` (each ending in CRLF, copied; NULL: none),
 * answered through done(arg, ...) exactly once, within timeout_ms.
 * Returns 0, HOOK_EFULL (queue full) or HOOK_ENOMEM; done is not called
 * then. */
int hook_client_post(hook_client *hc, const char *headers, const char *body, size_t len,
                     uint32_t timeout_ms, hook_done_fn done, void *arg);

/* Another client of the budget closed a connection or needs one: look
 * again (hc's loop thread). */
void hook_client_kick(hook_client *hc);

/* Requests queued or in flight right now. */
size_t hook_client_pending(const hook_client *hc);

/* Close every connection; every request still pending gets HOOK_ECANCELED
 * before this returns. NULL is a no-op. */
void hook_client_free(hook_client *hc);

/* Static text for a HOOK_E* code. */
const char *hook_strerror(int status);

#endif
