/* Internal pieces of the client core (lib/client), shared by its files. */
#ifndef IM_CLIENT_CLIENT_H
#define IM_CLIENT_CLIENT_H

#include <libim/im_client.h>
#include <stdbool.h>

/* ---- gateways (client_gateways.c): URLs and the gateway list ---------- */

typedef struct gw_addr {
  im_client_addr a;
  char *mem; /* host and path live here */
} gw_addr;

typedef struct gw_list {
  gw_addr *v;
  size_t n;
} gw_list;

/* Parse "ws://HOST:PORT/PATH" or "tcp://HOST:PORT" (also "HOST:PORT" as
 * tcp). Returns 0 or -1 (bad URL, no memory). */
int gw_parse_url(const char *url, size_t len, gw_addr *out);
void gw_list_clear(gw_list *l);
/* Append a parsed URL; returns 0 or -1. */
int gw_list_add(gw_list *l, const char *url, size_t len);
/* Parse a GET /v1/gateways answer into l (cleared first), taking each
 * entry's "ws" (or "tcp" when prefer_tcp and present). Returns the number
 * of gateways taken (0: none usable or not the expected JSON). */
size_t gw_list_from_json(gw_list *l, const char *body, size_t len, bool prefer_tcp);

/* ---- id window (client_dedupe.c): the last N delivered message ids --- */

typedef struct id_window {
  char **ids;
  uint64_t *hash;
  unsigned cap, next, count;
} id_window;

int idw_init(id_window *w, unsigned cap);
void idw_free(id_window *w);
bool idw_has(const id_window *w, const char *id, size_t n);
/* Remember id (forgetting the oldest when full). Returns 0 or -1 (no memory). */
int idw_add(id_window *w, const char *id, size_t n);

/* ---- outbox (client_outbox.c): upstream msgs until acked ------------- */

typedef struct ob_entry {
  struct ob_entry *next;
  uint64_t retry_at;  /* after a 5xx: not before this time; 0: now */
  bool sent;          /* sent on the current connection */
  uint8_t kind;       /* enum im_client_target */
  char cid[IM_CLIENT_CID_MAX];
  size_t target_len, data_len;
  char bytes[];       /* target, NUL, data, NUL: encoded at send time, so a
                         reconnect may use another transport or encoding */
} ob_entry;

typedef struct outbox {
  ob_entry *head, *tail;
  size_t count, bytes; /* bytes: target + data of every entry */
} outbox;

ob_entry *ob_push(outbox *o, const char *cid, uint8_t kind, const char *target, size_t tn,
                  const char *data, size_t dn);
static inline const char *ob_data(const ob_entry *e) { return e->bytes + e->target_len + 1; }
/* Remove and return the entry with this cid (caller frees), NULL if none. */
ob_entry *ob_take(outbox *o, const char *cid, size_t n);
ob_entry *ob_find(outbox *o, const char *cid, size_t n);
void ob_clear(outbox *o);
/* Mark every entry unsent (a new connection). */
void ob_reset_sent(outbox *o);

/* ---- full-jitter backoff (client.c) ------------------------------------ */

/* Delay before attempt number `attempt` (0-based): uniform in
 * [0, min(cap, base * 2^attempt)], r a uniform random 32-bit value. */
uint64_t client_backoff_ms(unsigned base, unsigned cap, unsigned attempt, uint32_t r);

#endif
