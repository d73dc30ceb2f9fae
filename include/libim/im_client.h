/* libim client: a reliable IMP client (docs/CLIENT.md, docs/PROTOCOL.md §17).
 *
 * Like the server engine in <libim/im.h>, the client core does no I/O and
 * reads no clock. A driver moves bytes and time:
 *   io.connect()            the core asks for a transport to an address;
 *   im_client_connected()   ... it is open (or im_client_disconnected()),
 *   im_client_feed()        bytes arrived,
 *   im_client_pending()     bytes to send (as iovecs) / im_client_sent(),
 *   im_client_disconnected() the transport died (EOF, error, refused),
 *   im_client_tick()        time passed (call again by im_client_timeout()),
 *   io.close()              the core wants the transport closed.
 * <libim/im_client_event.h> is the ready-made libevent driver.
 *
 * What the core does by itself: the WebSocket client handshake (random
 * Sec-WebSocket-Key, Sec-WebSocket-Accept verified) with every frame masked
 * by a fresh random key, or raw TCP framing; JSON or binary IMP; auth; an
 * ACK for every delivered message; de-duplication by seq and message id;
 * in-order delivery of stored messages with sync paging after every
 * (re)connect; an outbox of upstream messages resent with the same cid
 * after a reconnect until acknowledged; heartbeat pings (foreground and
 * background intervals) and a read-idle timeout; reconnects with
 * exponential backoff and full jitter through a gateway list; goaway.
 *
 * Conventions are those of <libim/im.h>: negative IM_E* codes, pointers
 * borrowed for the call only unless said otherwise, pointers given to a
 * callback valid only during it. Callbacks may call any function of this
 * header except im_client_free(). One im_client is used by one thread at a
 * time. */
#ifndef LIBIM_IM_CLIENT_H
#define LIBIM_IM_CLIENT_H

#include <libim/im.h>
#include <stdbool.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct im_client im_client;

enum im_client_state {
  IM_CLIENT_STOPPED = 0,     /* not started, stopped, or authentication refused */
  IM_CLIENT_WAITING,         /* waiting before the next connect (backoff or goaway) */
  IM_CLIENT_RESOLVING,       /* waiting for the gateway list (io.fetch_gateways) */
  IM_CLIENT_CONNECTING,      /* io.connect was called; waiting for im_client_connected */
  IM_CLIENT_HANDSHAKE,       /* WebSocket upgrade request sent */
  IM_CLIENT_AUTHENTICATING,  /* auth sent */
  IM_CLIENT_SYNCING,         /* auth_ok received; catching up (sync pages) */
  IM_CLIENT_OPEN             /* authenticated and caught up */
};

/* Longest cid the client generates, NUL included. */
#define IM_CLIENT_CID_MAX 40

/* Where a message goes. */
enum im_client_target { IM_CLIENT_TO_USER = 1, IM_CLIENT_TO_GROUP, IM_CLIENT_TO_ROOM };

/* A delivered message. Strings are NUL-terminated, "" when absent; the
 * numbers are 0 when absent. `data` is the exact JSON text of the message's
 * data (NUL-terminated, data_len bytes). */
typedef struct im_client_msg {
  const char *id, *from, *to, *group, *room;
  uint64_t ts, seq;
  const char *data;
  size_t data_len;
} im_client_msg;

/* What the application hears. Every member may be NULL. */
typedef struct im_client_callbacks {
  /* The state changed (see enum im_client_state). */
  void (*on_state)(im_client *cl, enum im_client_state from, enum im_client_state to, void *user);
  /* auth_ok: conn is the server's connection id, hb_s its heartbeat. */
  void (*on_auth_ok)(im_client *cl, const char *conn, unsigned hb_s, void *user);
  /* A message, once: never a duplicate, stored messages in seq order.
   * It is ACKed when the callback returns. */
  void (*on_message)(im_client *cl, const im_client_msg *m, void *user);
  /* The server acknowledged a message of the outbox: it left the outbox.
   * id is the server's message id, seq its place in our own inbox (0: none). */
  void (*on_ack)(im_client *cl, const char *cid, const char *id, uint64_t seq, void *user);
  /* An error op. cid is NULL, or names the outbox message it refers to:
   * on a 4xx the message was dropped from the outbox; on a 5xx it stays and
   * is sent again later. */
  void (*on_error)(im_client *cl, unsigned code, const char *reason, const char *cid, void *user);
  /* A connection ended: code is the WebSocket close code (or the TCP close
   * notice's), 1006 when the transport just died. A reconnect follows unless
   * the state went to IM_CLIENT_STOPPED. */
  void (*on_close)(im_client *cl, unsigned code, const char *reason, void *user);
} im_client_callbacks;

/* An address to connect to, parsed from a URL. Strings are NUL-terminated
 * and valid until the core calls io.connect again or is freed. */
typedef struct im_client_addr {
  enum im_transport transport; /* IM_TRANSPORT_WS or IM_TRANSPORT_TCP */
  const char *host;            /* name or numeric address, no brackets */
  uint16_t port;
  const char *path;            /* WebSocket request path ("/ws"); "" for TCP */
} im_client_addr;

/* The driver's hooks (see the top of this file). */
typedef struct im_client_io {
  /* Open a transport to addr, without blocking. Report the outcome with
   * im_client_connected() or im_client_disconnected(), not from inside this
   * hook. Return 0, or a negative value when no attempt could be started
   * (the core then counts a failed attempt). */
  int (*connect)(im_client *cl, const im_client_addr *addr, void *io_user);
  /* Output is queued: call im_client_pending() when writable. */
  void (*want_write)(im_client *cl, void *io_user);
  /* Close the transport. Write what im_client_pending() still returns if
   * that is possible without blocking (a close frame), then close. The
   * core already treats the transport as gone: do not call
   * im_client_disconnected() for it, and drop its later input. */
  void (*close)(im_client *cl, void *io_user);
  /* Fetch url (GET, with "Authorization: Bearer <api_key>" when api_key is
   * not NULL) and hand the answer to im_client_gateways_result(). May be
   * NULL: the configured URLs are then used. */
  void (*fetch_gateways)(im_client *cl, const char *url, const char *api_key, void *io_user);
} im_client_io;

typedef struct im_client_config {
  /* Identity (copied). uid and token are required. */
  const char *uid, *token, *device, *platform;
  /* Gateways, tried in order and rotated through on failures (copied):
   * "ws://HOST:PORT/PATH" (WebSocket) or "tcp://HOST:PORT" (raw TCP). At
   * least one unless gateways_url is set. IPv6 hosts go in brackets. */
  const char *const *urls;
  size_t n_urls;
  /* Optional: "http://HOST:PORT/v1/gateways?uid=U" (the client adds
   * ?uid=<uid> when the URL has no query), fetched before connecting when
   * the cached list is older than gateways_ttl_ms or after a whole round of
   * failures. Its gateways replace `urls` while the cache is valid; a
   * failed fetch falls back to `urls`. */
  const char *gateways_url, *api_key;
  unsigned gateways_ttl_ms;        /* default 300000 */
  bool prefer_tcp;                 /* from a fetched list: use "tcp" rather than "ws" */
  bool binary;                     /* WebSocket: imp.bin instead of imp.json (TCP is binary) */
  bool no_sync;                    /* do not sync on connect (default: sync) */
  uint64_t since;                  /* the highest contiguous seq already held (0: none) */
  unsigned sync_limit;             /* sync page size; 0 = the server's default */
  unsigned backoff_base_ms;        /* default 500 */
  unsigned backoff_cap_ms;         /* default 30000 */
  unsigned connect_timeout_ms;     /* connect + handshake + auth; default 10000 */
  unsigned ping_ms;                /* foreground ping interval; 0 = the server's hb */
  unsigned ping_bg_ms;             /* background interval; 0 = 2 x hb */
  unsigned pong_timeout_ms;        /* silence after a ping before reconnecting; default 10000 */
  unsigned dedupe_window;          /* message ids remembered; default 1024 */
  unsigned outbox_max;             /* messages; default 1024 */
  size_t outbox_max_bytes;         /* bytes of encoded messages; default 4 MiB */
  size_t max_message;              /* largest packet accepted or sent; default 65536 */
  /* Random numbers for WebSocket keys and masks and for jitter. NULL: the
   * system's (getrandom). Tests pass a deterministic one. */
  uint32_t (*rand)(void *rand_user);
  void *rand_user;
  /* Do not ACK room messages (a msg with a room and no seq). imd sends
   * rooms best-effort and never retransmits them, so an ACK only costs its
   * server an upstream frame per member and message; leave it false
   * (ACK everything) for a server that sends rooms reliably
   * (IM_SEND_RELIABLE), which closes a connection that does not ACK. */
  bool no_room_acks;
} im_client_config;

/* Fill cfg with the defaults above (no identity, no URLs). */
IM_EXTERN void im_client_config_init(im_client_config *cfg);

/* Create a client. cfg's strings and URLs are copied; cb is copied; user is
 * passed to every callback. Returns NULL when cfg is invalid (no uid or
 * token, no URL and no gateways_url, a URL that does not parse) or on
 * allocation failure. */
IM_EXTERN im_client *im_client_new(const im_client_config *cfg, const im_client_callbacks *cb,
                                   void *user);

/* Free the client, its outbox and buffers. Does not call io.close. */
IM_EXTERN void im_client_free(im_client *cl);

/* Install the driver's hooks (copied). Call before im_client_start. */
IM_EXTERN void im_client_set_io(im_client *cl, const im_client_io *io, void *io_user);

/* Start connecting (first connect now, at the next im_client_tick at the
 * latest). now_ms is the driver's monotonic clock. Returns 0, or IM_ESTATE
 * when already started. */
IM_EXTERN int im_client_start(im_client *cl, uint64_t now_ms);

/* Stop: close the connection (WebSocket close 1000) and do not reconnect.
 * The outbox is kept; im_client_start() resumes. Returns 0. */
IM_EXTERN int im_client_stop(im_client *cl);

/* Replace the token (copied) for the next auth, e.g. after a refusal.
 * Returns 0 or IM_ENOMEM. */
IM_EXTERN int im_client_set_token(im_client *cl, const char *token);

/* Queue a message for target (user, group or room) with data, one JSON
 * value of data_len bytes (validated). It is sent now when authenticated,
 * else after the next auth_ok, and again after every reconnect until acked.
 * Its generated cid (unique per process and client) is written to cid_out
 * when not NULL. Returns 0, IM_EINVAL (bad target or data not one JSON
 * value), IM_ETOOBIG (over max_message), IM_EFULL (outbox full: count or
 * bytes), IM_ENOMEM. */
IM_EXTERN int im_client_send(im_client *cl, enum im_client_target kind, const char *target,
                             const char *data, size_t data_len, char cid_out[IM_CLIENT_CID_MAX]);

/* Join room (the name is copied): a join op is sent now when authenticated,
 * and again after every later auth_ok (rooms belong to a connection, so a
 * reconnect re-joins them) until im_client_leave(). Room messages then
 * arrive through on_message with m->room set. The server refuses with an
 * error op without cid, seen by on_error: 429 "too many rooms", 403 "join
 * refused" or "not a member of the group", 400 "missing or bad room"; the
 * room stays on the client's list (leave it to stop the retries). Returns
 * 0 (also when already joined), IM_EINVAL (room NULL, empty or over 128
 * bytes) or IM_ENOMEM. */
IM_EXTERN int im_client_join(im_client *cl, const char *room);

/* Leave room: it is dropped from the list and a leave op is sent when
 * authenticated. Returns 0, or IM_ENOENT when room was not joined. */
IM_EXTERN int im_client_leave(im_client *cl, const char *room);

/* Background mode: ping every ping_bg_ms instead of ping_ms. */
IM_EXTERN void im_client_set_background(im_client *cl, int on);

/* ---- driver side -------------------------------------------------------- */

/* The transport asked for by io.connect is open. Returns 0, or IM_ESTATE
 * when no connect was pending (ignored). */
IM_EXTERN int im_client_connected(im_client *cl);

/* The transport died, or the connect failed: EOF, error, refused. A
 * reconnect is scheduled. Returns 0, or IM_ESTATE when there is none. */
IM_EXTERN int im_client_disconnected(im_client *cl);

/* Bytes arrived on the transport. They are processed now; callbacks run
 * from inside. The bytes are copied as needed; data is not kept. Returns
 * 0, IM_ESTATE (no transport: dropped), IM_EPROTO when the server broke the
 * protocol or the handshake failed, or IM_ENOMEM; in those two cases the
 * connection was closed through io.close and a reconnect scheduled. */
IM_EXTERN int im_client_feed(im_client *cl, const void *data, size_t len);

/* Bytes to send: fills up to max iovecs pointing into the client's buffer,
 * valid until the next call into the client. Returns the count (0: nothing
 * to send). */
IM_EXTERN int im_client_pending(im_client *cl, struct iovec *iov, int max);

/* n bytes of what im_client_pending() returned were written. */
IM_EXTERN void im_client_sent(im_client *cl, size_t n);

/* Time passed: heartbeats, timeouts, reconnects. now_ms is monotonic.
 * Every other call uses the time of the last tick (or of start). */
IM_EXTERN void im_client_tick(im_client *cl, uint64_t now_ms);

/* Milliseconds from now_ms until im_client_tick() has something to do
 * (0: now), or -1 when nothing is scheduled. */
IM_EXTERN long im_client_timeout(const im_client *cl, uint64_t now_ms);

/* Hand over the answer to io.fetch_gateways: the HTTP status (0 when the
 * fetch failed) and the body. A 200 whose body is {"gateways":[{"ws":...,
 * "tcp":...},...]} with at least one usable entry replaces the list;
 * anything else falls back to the configured URLs. Returns 0 when the list
 * was taken, IM_EINVAL when it fell back, IM_ESTATE when no fetch was
 * pending. */
IM_EXTERN int im_client_gateways_result(im_client *cl, int http_status, const char *body,
                                        size_t len);

/* ---- state ---------------------------------------------------------------- */

IM_EXTERN enum im_client_state im_client_state(const im_client *cl);
/* Static name of a state ("open", ...). */
IM_EXTERN const char *im_client_state_name(enum im_client_state s);
/* The highest seq N such that every stored message 1..N was delivered or
 * sent by us: persist it and pass it back as cfg.since after a restart. */
IM_EXTERN uint64_t im_client_contiguous(const im_client *cl);
/* Messages in the outbox (sent or not, not yet acked). */
IM_EXTERN size_t im_client_outbox_count(const im_client *cl);
/* The address in use or last tried (valid until the next connect). */
IM_EXTERN const im_client_addr *im_client_address(const im_client *cl);

#ifdef __cplusplus
}
#endif
#endif
