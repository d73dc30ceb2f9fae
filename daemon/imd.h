/* imd: the reference daemon on libim. Internal header shared by the daemon
 * files: configuration, the daemon state, and the parts' entry points. */
#ifndef IMD_IMD_H
#define IMD_IMD_H

#include <libim/im.h>
#include <libim/im_async.h>
#include <libim/im_event.h>
#include <libim/im_group.h>
#include <libim/im_guard.h>
#include <libim/im_redis.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "core/strmap.h"
#include "histogram.h"
#include "http_server.h"
#include "store.h"

#define IMD_MAX_PLATFORMS 16

typedef struct imd_config {
  const char *ws_addr, *tcp_addr, *http_addr;
  const char *secret;       /* NULL: generated and kept in data_dir/secret */
  const char *api_key;      /* NULL: generated and kept in data_dir/api-key */
  const char *data_dir;
  const char *config_file;
  uint32_t max_message;     /* bytes, also the HTTP body limit's base */
  uint32_t heartbeat_s;
  uint32_t auth_timeout_ms;
  uint32_t max_connections; /* the process's limit (auto resolved); 0 = none */
  const char *redis_addr;   /* HOST:PORT, NULL: single node */
  const char *node;         /* NULL: HOSTNAME-WSPORT */
  const char *redis_prefix;
  uint32_t lease_ttl_s;
  const char *advertise_ws, *advertise_tcp;
  uint32_t coalesce_us;     /* --coalesce: im_event_set_coalesce() of every worker's loop */
  uint32_t drain_rate;      /* connections closed per second while draining (the process's) */
  uint32_t max_token_ttl_s; /* tokens expiring later than now + this are refused */
  uint32_t rate_receiver;   /* msgs one sender may store for one receiver (or group) per
                               minute; 0 = no quota */
  bool rooms_members;       /* --rooms members: join only rooms that are groups one is in */
  const char *static_dir;   /* --static: files served at / of the HTTP listener; NULL: off */
} imd_config;

#define IMD_UID_MAX 128         /* as libim: longer uids cannot log in */
#define IMD_SYNC_DEFAULT 200     /* messages per sync answer when the client gives no limit */
#define IMD_SYNC_MAX 1000        /* most messages per sync answer */
#define IMD_TRIM_INTERVAL_S 60   /* retention runs this often */

typedef struct imd_metrics {
  char platform[IMD_MAX_PLATFORMS][24];
  uint64_t platform_conns[IMD_MAX_PLATFORMS];
  uint64_t other_platform_conns;
  uint64_t msgs_1to1, msgs_group, msgs_room, msgs_http;
  uint64_t msg_errors;      /* upstream msgs refused (bad target, not a member) */
  uint64_t http_requests;
  uint64_t http_status[6];  /* by class: 1xx..5xx */
  uint64_t auth_expired, auth_invalid, auth_banned;
  uint64_t stored;          /* messages stored and pushed */
  uint64_t duplicates;      /* resends answered with the stored id */
  uint64_t batched;         /* messages the store answered for (stored + duplicates + failed) */
  uint64_t store_errors;
  uint64_t syncs;
  uint64_t auth_revoked, auth_too_long; /* tokens refused: revoked uid, lifetime over the max */
  uint64_t quota_refused;   /* msgs refused over the per-receiver quota */
  uint64_t revocations;     /* POST /v1/users/{uid}/revoke answered */
  uint64_t rooms_refused;   /* joins refused by --rooms members */
  imd_hist ack_latency;     /* reliable push queued -> the device's ACK (im_ack_rtt_us) */
} imd_metrics;

typedef struct imd {
  imd_config cfg;
  struct event_base *base;
  im_server *srv;
  im_event *ev;
  http_server *http;
  uint8_t secret[256];
  size_t secret_len;
  char api_key[256];
  uint64_t start_wall_ms;   /* wall clock when the engine started */
  imd_store *store;         /* messages, marks and groups (store.h) */
  int ports[2];             /* bound ws and tcp ports (0: off) */
  im_redis *redis;          /* the cluster link (node.c); NULL: single node */
  char node_name[160];
  bool draining;
  uint64_t drain_credit;    /* node.c: closes owed, in thousandths (a share of --drain-rate) */
  strmap uid_bans;          /* bans.c */
  strmap shared_bans;       /* bans.c: the cluster's bans as applied here (--redis) */
  long long shared_version; /* bans.c: of the Redis hash last merged (-1: none) */
  uint64_t shared_gen;      /* bans.c: bans this node shared (reads sent before are stale) */
  bool shared_polling;      /* bans.c: a poll is out */
  imd_store_opts store_opts; /* delivery.c: worker 0's, for the workers' Redis stores */
  struct event *drain_ev, *usr1_ev, *hup_ev, *trim_ev;
  struct imd_hooks *hooks;  /* back-end hooks (hooks.h); NULL: none */
  imd_metrics m;
  struct imd_revocations *revoked; /* revoke.c */
  struct imd_quota *quota;         /* quota.c; NULL: no per-receiver quota */
  struct imd_tls *tls;      /* tls.c: NULL when TLS is off */
  /* --threads (workers.c): each worker thread has an imd of its own (its
   * loop, engine, listeners, HTTP server, hooks, metrics, store view); the
   * rest is shared, through the main thread's */
  struct imd *main;         /* worker 0's imd (the uid bans live there) */
  unsigned worker;          /* this worker's index; 0: the main thread's */
  struct imd_workers *workers; /* NULL: one thread */
  im_group *group;          /* the workers' router; NULL: one thread */
  im_mailbox *mb;           /* calls onto this worker's loop; NULL: one thread */
} imd;

/* Worker 0's imd (d itself with one thread): where what the workers share lives. */
static inline imd *imd_worker0(imd *d) { return d->main ? d->main : d; }

/* Copy the n strings of in (NULL entries stay NULL) one after the other
 * from *at, NUL-terminated, setting out[i]; *at moves past them. The
 * caller sized the space with imd_strs_size(). */
static inline size_t imd_strs_size(const char *const *in, size_t n) {
  size_t len = 0;
  for (size_t i = 0; i < n; i++) len += in[i] ? strlen(in[i]) + 1 : 0;
  return len;
}
static inline void imd_strs_copy(char **at, const char *const *in, const char **out, size_t n) {
  for (size_t i = 0; i < n; i++) {
    out[i] = NULL;
    if (!in[i]) continue;
    size_t len = strlen(in[i]) + 1;
    out[i] = memcpy(*at, in[i], len);
    *at += len;
  }
}

/* chat.c: the libim callbacks (token auth, 1:1 / group / room routing). */
void imd_chat_callbacks(im_callbacks *cb);
/* Clocks: wall-clock ms, monotonic µs. */
static inline uint64_t imd_wall_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}
static inline uint64_t imd_mono_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

/* delivery.c: store, then deliver. */
int imd_delivery_init(imd *d, const imd_store_opts *o); /* 0, or -1 with a message on stderr */
/* Worker w's store (its view of worker 0's SQLite store, or a Redis store
 * of its own on its cluster handle). 0, or -1 with a message on stderr. */
int imd_delivery_worker(imd *w, imd *d);
void imd_delivery_free(imd *d);                          /* completes what is outstanding */
/* The cluster link is back (Redis may have restarted): reload the store's scripts. */
void imd_delivery_reconnected(imd *d);

/* The outcome of imd_deliver(). */
typedef struct imd_delivery {
  int status;               /* IMD_STORE_OK, IMD_STORE_DUP (stored before: id is the first
                               one's, nothing pushed) or a negative IMD_STORE_* code */
  const char *id;           /* the message id */
  const char *cid;          /* the client's id of it (NULL: none) */
  uint64_t sender_seq;      /* the seq in the sender's own inbox (0: none) */
  int reached;              /* local connections it was queued on */
  size_t stored;            /* inboxes it was appended to */
} imd_delivery;
/* Called once per imd_deliver() that returned 0, with the caller's tag. */
typedef void (*imd_delivered_cb)(imd *d, uint64_t tag, const imd_delivery *res);
/* Append m (copied) for the n distinct receivers uids; once it is durable
 * push it to their connections (except `except`, the sender's; 0 = none)
 * with each one's seq, then call cb. A (from, device, cid) stored before is
 * reported as IMD_STORE_DUP with its first id and not delivered again.
 * Returns 0 (cb will be called) or a negative IMD_STORE_* code (it will
 * not). */
int imd_deliver(imd *d, const imd_store_msg *m, const char *const *uids, size_t n,
                im_conn_id except, imd_delivered_cb cb, uint64_t tag);
/* Answer a sync on c for uid: stored messages after since, then sync_end. */
void imd_sync(imd *d, im_conn_id c, const char *uid, uint64_t since, uint32_t limit);
/* Raise (uid, device)'s delivered position to seq (durable with the next write). */
void imd_mark_delivered(imd *d, const char *uid, const char *device, uint64_t seq);

/* Push uid's stored messages after c's device's delivered position to c
 * again (after a gap in cross-node notifications); the client drops what
 * it has by id. */
void imd_repair(imd *d, im_conn_id c);

/* bans.c: uid bans (address bans are libim's guard). Node-local, except
 * that with --redis the API's bans are shared through Redis (below). */
#define IMD_UID_BANS_MAX 100000
int imd_bans_init(imd *d, const char *list); /* --ban entries; 0 or -1 (message printed) */
void imd_bans_free(imd *d);
bool imd_uid_banned(imd *d, const char *uid);
/* Ban uid for ttl_s seconds (0: until lifted) and close its sessions on
 * every node. Returns 0, or -1 (bad uid, table full, no memory). */
int imd_ban_uid(imd *d, const char *uid, uint32_t ttl_s);
int imd_unban_uid(imd *d, const char *uid); /* 0, or -1 when not banned */
void imd_uid_bans(imd *d, void (*fn)(const char *uid, uint64_t until_ms, void *arg), void *arg);
/* The cluster's bans (--redis). Outcomes passed to imd_bans_done: */
enum { IMD_BANS_ENOENT = -1, IMD_BANS_EDOWN = -2, IMD_BANS_EFULL = -3 };
typedef void (*imd_bans_done)(imd *d, void *arg, int status);
/* Write a ban of uid or of cidr (canonical, im_guard_canon; exactly one
 * non-NULL) until until_ms (0: until lifted), or lift it, in Redis; the
 * caller applied it on this node already. cb(status) later: 0 (for a
 * lift: there was such a ban), IMD_BANS_ENOENT (lift: none),
 * IMD_BANS_EFULL, IMD_BANS_EDOWN (Redis failed). Returns 0, or -1 (no
 * Redis configured or reachable, no memory: cb is not called). */
int imd_bans_share(imd *d, const char *uid, const char *cidr, uint64_t until_ms, bool lifted,
                   imd_bans_done cb, void *arg);
/* Read the cluster's bans and apply them here now; cb(0 or IMD_BANS_EDOWN).
 * Returns 0, or -1 (cb is not called). */
int imd_bans_refresh(imd *d, imd_bans_done cb, void *arg);
/* Each second: merge the cluster's bans when their version moved. */
void imd_bans_poll(imd *d);
/* The cluster link is (back) up: read all the bans again. */
void imd_bans_reconnected(imd *d);

/* node.c: this process as a node: the cluster link (libim's Redis module),
 * graceful drain, gateway lists, health. */
int imd_node_start(imd *d);   /* 0, or -1 with a message on stderr */
void imd_node_stop(imd *d);
/* The node's part of worker w > 0, a copy of worker 0 d: its drain timer
 * and, in a cluster, its handle on d's link (its own Redis connection).
 * 0, or -1 with a message on stderr. */
int imd_node_worker(imd *w, imd *d);
/* Start draining (idempotent): leave gateway lists, goaway to every client,
 * close them at cfg.drain_rate per second, exit 0 when none is left.
 * Returns the connections to drain. */
size_t imd_drain(imd *d);
/* A connection opened: a draining node sends it on at once. */
void imd_node_opened(imd *d, im_conn_id c);
/* "up", "down", or NULL for a single node. */
const char *imd_redis_state(const imd *d);
/* Answer cb with the gateways for uid (this node alone without Redis). */
typedef void (*imd_gateways_cb)(void *arg, int status, const im_gateway *gw, size_t n);
int imd_gateways(imd *d, const char *uid, imd_gateways_cb cb, void *arg);

/* api.c: the HTTP API handler (http_handler, user = imd *). */
void imd_api_handle(void *user, const http_request *req, http_response *resp);
/* http_done_fn (user = imd *): counts the answered request by status class
 * and writes the access log line, with the status given (deferred ones too). */
void imd_api_done(void *user, const http_done *r);
/* http_limits.admit (user = imd *): true when authorization carries the
 * API key, so only such requests get their bodies buffered. */
bool imd_api_admit(void *user, const char *authorization);

/* revoke.c: revoked uids (refused tokens issued before a moment), in
 * memory and in DATA/revoked. */
typedef struct imd_revocations imd_revocations;
/* Load path (missing: none yet). NULL with a reason in err. */
imd_revocations *imd_revoke_open(const char *path, char *err, size_t errlen);
void imd_revoke_free(imd_revocations *r);
/* Refuse uid's tokens issued at or before at_ms (Unix ms) and persist it
 * (the file is rewritten, fsynced and renamed into place). Entries whose
 * tokens have all expired (older than max_ttl_s) are forgotten. Returns 0,
 * or -1 with errno set (memory or the file; nothing changed). */
int imd_revoke_add(imd_revocations *r, const char *uid, int64_t at_ms, uint32_t max_ttl_s);
/* true when a genuine token of uid is revoked: v2 (issued_ms > 0) when
 * issued at or before the revocation; v1 (issued_ms 0, issue time unknown)
 * when it could have been: exp_s - max_ttl_s at or before it. */
bool imd_revoked(const imd_revocations *r, const char *uid, int64_t issued_ms, int64_t exp_s,
                 uint32_t max_ttl_s);

/* In a cluster: write the revocation to Redis too (no-op without Redis);
 * 0, or -1 when Redis is down (the local revocation stands). */
int imd_revoke_publish(imd *d, const char *uid, int64_t at_ms);
/* In a cluster: merge the revocations other nodes wrote (called every
 * second; reads the whole set only when its version moved). */
void imd_revoke_poll(imd *d);

/* quota.c: msgs one sender may store for one receiver per minute. */
typedef struct imd_quota imd_quota;
imd_quota *imd_quota_new(uint32_t per_minute); /* NULL: no memory */
void imd_quota_free(imd_quota *q);
/* Count one msg from `from` to `to` (a uid, or a group id with group set)
 * at now_ms; false (nothing counted) when the pair is over its quota. */
bool imd_quota_take(imd_quota *q, const char *from, const char *to, bool group, uint64_t now_ms);
/* tls.c: --tls-cert/--tls-key/--tls-plain. Loads the certificate (with
 * handshake_ms as the handshake timeout) and catches SIGHUP to reload it.
 * cert and key both NULL: TLS stays off. plain is a comma-separated list of
 * listeners ("ws", "tcp", "http") kept plain, or "none"/NULL. Returns 0, or
 * -1 with a message on stderr. */
int imd_tls_init(imd *d, const char *cert, const char *key, const char *plain,
                 unsigned handshake_ms);
/* The TLS context for listener `name` ("ws", "tcp", "http"), or NULL when
 * that listener is plain. */
im_tls *imd_tls_for(const imd *d, const char *name);
void imd_tls_free(imd *d);
/* Worker w (a copy of worker 0) gets TLS contexts of its own, loaded from
 * the same files (worker 0's SIGHUP reloads every worker's). 0 or -1. */
int imd_tls_worker(imd *w);

/* workers.c: --threads. */
/* The thread group of n workers with worker 0 d as its first member
 * (before the cluster link, which chains after it). 0, or -1 with a
 * message on stderr. */
int imd_workers_group(imd *d, unsigned n);
/* Start workers 1..n-1 (n > 1) as copies of the ready worker 0 d, on the
 * ports d listens on, each joining d's group. Returns 0, or -1 with a
 * message on stderr. */
struct imd_hooks_config;
int imd_workers_start(imd *d, unsigned n, const im_guard_config *guard,
                      const struct imd_hooks_config *hooks);
/* After worker 0's loop ended: end the others' loops (a graceful shutdown,
 * unless they are draining) and wait for their threads. */
void imd_workers_stop(imd *d);
/* After worker 0's store is closed: free the other workers and the group. */
void imd_workers_free(imd *d);
/* worker_calls.c: calls across the workers. */
/* Run fn(w, s, n) on every other worker's loop (s copied; NULL is passed
 * as ""). */
void imd_workers_broadcast(imd *d, void (*fn)(imd *w, const char *s, uint32_t n), const char *s,
                           uint32_t n);
/* Run fn(w, arg) on every worker's loop (d's too), then, on d's loop,
 * done(d, sum, err, arg): the sum of fn's non-negative returns and the
 * first negative one (0: none). arg must live until done. Returns 0, or
 * -1 (no memory: nothing runs). */
int imd_workers_gather(imd *d, int (*fn)(imd *w, void *arg),
                       void (*done)(imd *d, long sum, int err, void *arg), void *arg);
/* The lock over what the workers share: uid bans, revocations, quota. */
void imd_shared_lock(void);
void imd_shared_unlock(void);

/* Authenticated connections of uid on every worker of this process. */
static inline size_t imd_user_conns(imd *d, const char *uid) {
  return d->group ? im_group_user_conns(d->group, uid) : im_user_conns(d->srv, uid, NULL, 0);
}
/* Apply what the other workers sent here before a send of this worker, so
 * that their earlier sends go out first. */
static inline void imd_catch_up(imd *d) {
  if (d->group) im_group_run(d->group, d->worker);
}

/* metrics.c */
void imd_metrics_open(imd *d, const char *platform);
void imd_metrics_close(imd *d, const char *platform);
/* Give the engine imd's monotonic clock, so ACK latencies are measured in
 * microseconds rather than ticks. */
void imd_metrics_start(imd *d);
/* on_ack: count the ACK latency of a tracked reliable push (libim's
 * im_ack_rtt_us; -1, an ack of nothing in flight, is not counted). */
void imd_metrics_ack(imd *d, int64_t rtt_us);
/* Prometheus text exposition; malloc'd, length in *len. */
char *imd_metrics_render(imd *d, size_t *len);
/* One worker's numbers, and their sum over workers. */
typedef struct imd_tally {
  im_stats st;
  im_guard_stats gs;
  imd_metrics m;
  unsigned workers;                 /* summed so far */
  uint64_t loop_wakeups, loop_naps; /* im_event_counts */
  uint64_t worker_conns[64];        /* authenticated connections per worker */
  uint64_t links_up;                /* workers whose cluster link is up (--redis) */
  imd_store_stats ss;               /* the store's; each worker's own with --redis */
} imd_tally;
void imd_metrics_tally(imd *d, imd_tally *t);      /* zeroes t, then d's numbers */
void imd_metrics_add(imd_tally *sum, const imd_tally *t);
/* hooks: the hooks' counters summed over workers (NULL: d's own). */
struct imd_hook_counts;
char *imd_metrics_render_tally(imd *d, const imd_tally *t, const struct imd_hook_counts *hooks,
                               size_t *len);
/* With workers: answer ticket (a deferred GET /metrics on d) with every
 * worker's sums. */
void imd_metrics_respond(imd *d, uint64_t ticket);

#endif
