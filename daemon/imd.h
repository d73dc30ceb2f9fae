/* imd: the reference daemon on libim. Internal header shared by the daemon
 * files: configuration, the daemon state, and the parts' entry points. */
#ifndef IMD_IMD_H
#define IMD_IMD_H

#include <libim/im.h>
#include <libim/im_event.h>
#include <stdbool.h>
#include <stdint.h>

#include "core/strmap.h"
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
  uint32_t max_connections;
} imd_config;

#define IMD_UID_MAX 128         /* as libim: longer uids cannot log in */
#define IMD_SYNC_DEFAULT 200     /* messages per sync answer when the client gives no limit */
#define IMD_SYNC_MAX 1000        /* most messages per sync answer */
#define IMD_TRIM_INTERVAL_S 60   /* retention runs this often */

/* A group: gid -> member uids (a set), kept in memory and in
 * data_dir/groups.json. */
typedef struct imd_group {
  strmap_node node;
  strmap members;   /* of imd_member */
  char gid[];
} imd_group;

typedef struct imd_member {
  strmap_node node;
  char uid[];
} imd_member;

typedef struct imd_metrics {
  char platform[IMD_MAX_PLATFORMS][24];
  uint64_t platform_conns[IMD_MAX_PLATFORMS];
  uint64_t other_platform_conns;
  uint64_t msgs_1to1, msgs_group, msgs_room, msgs_http;
  uint64_t msg_errors;      /* upstream msgs refused (bad target, not a member) */
  uint64_t http_requests;
  uint64_t http_status[6];  /* by class: 1xx..5xx */
  uint64_t auth_expired, auth_invalid;
  uint64_t stored;          /* messages stored and pushed */
  uint64_t duplicates;      /* resends answered with the stored id */
  uint64_t batched;         /* messages settled by commits (stored + duplicates + failed) */
  uint64_t commits, commit_us;
  uint64_t store_errors;
  uint64_t syncs;
  uint64_t trimmed;         /* inbox entries removed by retention */
} imd_metrics;

typedef struct parked parked;

typedef struct imd {
  imd_config cfg;
  struct event_base *base;
  im_server *srv;
  im_event *ev;
  http_server *http;
  uint8_t secret[256];
  size_t secret_len;
  char api_key[256];
  strmap groups;            /* of imd_group */
  uint64_t start_wall_ms;   /* wall clock when the engine started */
  imd_store *store;
  struct event *flush_ev;   /* commits the batch at the end of a loop pass */
  struct event *trim_ev;    /* retention timer */
  parked *parked, *parked_tail; /* messages of the open batch, in order */
  imd_metrics m;
  struct imd_tls *tls;      /* tls.c: NULL when TLS is off */
} imd;

/* chat.c: the libim callbacks (token auth, 1:1 / group / room routing). */
void imd_chat_callbacks(im_callbacks *cb);
uint64_t imd_wall_ms(void);
uint64_t imd_mono_us(void);

/* delivery.c: store, then deliver (group commit). */
int imd_delivery_init(imd *d, const imd_store_opts *o); /* 0, or -1 with a message on stderr */
void imd_delivery_free(imd *d);                          /* flushes what is pending */
/* Append m for the n distinct receivers uids in the open batch; after the
 * commit push it to their connections (except `conn`) with each one's seq,
 * ack it on `conn` (the sender's, 0 = none) and answer HTTP `ticket` (0 =
 * none). A (from, device, cid) stored before is acked with its first id and
 * not delivered again. Returns 0, or an HTTP-like code (400, 500) when it
 * could not be taken (nothing will be sent for it then). */
int imd_store_and_deliver(imd *d, const imd_store_msg *m, const char *const *uids, size_t n,
                          im_conn_id conn, uint64_t ticket);
/* Commit the open batch now and settle it. */
void imd_flush(imd *d);
/* Answer a sync on c for uid: stored messages after since, then sync_end. */
void imd_sync(imd *d, im_conn_id c, const char *uid, uint64_t since, uint32_t limit);
/* Raise (uid, device)'s delivered position to seq (in the next commit). */
void imd_mark_delivered(imd *d, const char *uid, const char *device, uint64_t seq);

/* groups.c */
int imd_groups_load(imd *d);                      /* 0, or -1 with a message on stderr */
void imd_groups_free(imd *d);
imd_group *imd_group_find(imd *d, const char *gid);
bool imd_group_has(const imd_group *g, const char *uid);
/* Apply adds/removes (arrays of n strings) and persist. Returns 0, or -1
 * when the group file could not be written (memory state is applied). */
int imd_group_update(imd *d, const char *gid, const char *const *add, size_t nadd,
                     const char *const *rm, size_t nrm);
/* Members as an array of uid pointers into the group (valid until the next
 * update); *n gets the count. Returns a malloc'd array the caller frees. */
const char **imd_group_members(const imd_group *g, size_t *n);

/* api.c: the HTTP API handler (http_handler, user = imd *). */
void imd_api_handle(void *user, const http_request *req, http_response *resp);
/* {"error": msg} as a malloc'd string (NULL when memory ran out). */
char *imd_error_body(const char *msg);
/* Answer a deferred API request (body: malloc'd JSON or NULL for a 500;
 * ownership passes) and count its status. */
void imd_http_respond(imd *d, uint64_t ticket, int status, char *body);

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

/* metrics.c */
void imd_metrics_open(imd *d, const char *platform);
void imd_metrics_close(imd *d, const char *platform);
/* Prometheus text exposition; malloc'd, length in *len. */
char *imd_metrics_render(imd *d, size_t *len);

#endif
