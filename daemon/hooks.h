/* imd's back-end hooks (docs/HOOKS.md): JSON events POSTed to the business
 * back end through hook_client.h, some of which it answers before imd acts:
 *   connect   an auth proxy (libim's IM_AUTH_PENDING, im_auth_complete)
 *   message   allow / reject / replace data before a 1:1 or group message
 *             is stored (IM_MSG_DEFER; answered in the sender's order)
 *   online, offline  first device of a uid opened / last one gone, batched,
 *             fire-and-forget with retries
 * Counters go to /metrics through imd_hooks_metrics(). */
#ifndef IMD_HOOKS_H
#define IMD_HOOKS_H

#include <libim/im.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "histogram.h"

struct imd;

enum { IMD_HOOK_CONNECT_OFF = 0, IMD_HOOK_CONNECT_INSTEAD, IMD_HOOK_CONNECT_ALSO };

typedef struct imd_hooks_config {
  const char *url;          /* http://HOST[:PORT]/PATH; NULL: no hooks at all */
  const char *secret;       /* HMAC-SHA256 key of X-Imd-Signature; NULL: unsigned */
  int connect;              /* IMD_HOOK_CONNECT_* */
  bool message;             /* ask before storing 1:1 and group messages */
  bool presence;            /* online / offline events */
  bool fail_open;           /* a failed ask (timeout, error, queue full) allows */
  uint32_t timeout_ms;      /* per request, queueing included */
  uint32_t max_conns;       /* HTTP connections to the back end */
  uint32_t max_queue;       /* asks waiting for a connection; presence events held */
  /* worker threads: max_conns and max_queue counted over every worker's
   * hooks (hook_client.h), or NULL (one thread) */
  struct hook_budget *budget;
} imd_hooks_config;

/* Start the hooks on d (d->hooks); a NULL cfg->url leaves them off.
 * Returns 0, or -1 with a message on stderr. */
int imd_hooks_start(struct imd *d, const imd_hooks_config *cfg);
/* Stop: pending asks are dropped unanswered (their clients resend),
 * unsent presence events are lost. */
void imd_hooks_stop(struct imd *d);

/* IMD_HOOK_CONNECT_* in force. */
int imd_hooks_connect_mode(const struct imd *d);
/* Ask the back end about the authentication a on c (the token, if any, is
 * for the back end to check). Returns IM_AUTH_PENDING (im_auth_complete
 * follows), or IM_AUTH_DENY with a->code / a->reason set (static text)
 * when the ask could not even be queued and the policy refuses. */
int imd_hooks_auth(struct imd *d, im_conn_id c, im_auth *a);

/* Routes a message once the back end allowed it (m->data possibly
 * replaced); answers c itself (im_ack / im_reply_error). */
typedef int (*imd_route_fn)(struct imd *d, im_conn_id c, const im_msg *m);
/* With the message hook on: ask about m (a 1:1 or group msg from c,
 * copied) and return true; route(d, c, m') or an error to c follows, in c's
 * order of messages. False when the hook is off: the caller routes now. */
bool imd_hooks_message(struct imd *d, im_conn_id c, const im_msg *m, imd_route_fn route);

/* c was opened / is closing (call from on_open / on_close): online /
 * offline events for its uid's first / last connection on this node. */
void imd_hooks_opened(struct imd *d, im_conn_id c);
void imd_hooks_closed(struct imd *d, im_conn_id c);

/* The hooks' Prometheus text (malloc'd, *len bytes; NULL when off). */
char *imd_hooks_metrics(struct imd *d, size_t *len);

/* The hooks' counters, summed over worker threads (each has its own hook
 * client): imd_hooks_count adds d's to sum (start from zeros), then
 * imd_hooks_metrics_of renders them as imd_hooks_metrics does. */
typedef struct imd_hook_counts {
  bool on;
  uint64_t req[4][7];       /* by event, by result */
  imd_hist lat;              /* hook latency */
  uint64_t dropped, pending;
} imd_hook_counts;
void imd_hooks_count(struct imd *d, imd_hook_counts *sum);
char *imd_hooks_metrics_of(const imd_hook_counts *c, size_t *len);

#endif
