/* libim: an embeddable instant-messaging gateway engine.
 *
 * This header is the I/O-free engine. It speaks WebSocket (RFC 6455) and
 * raw TCP framing, the IMP application protocol (docs/PROTOCOL.md), keeps
 * a registry uid -> connections and a room registry, runs read-idle and
 * auth timeouts on one timer wheel, and bounds every per-connection queue.
 *
 * It does no I/O and reads no clock. A driver moves bytes:
 *   im_server_accept()   a transport connection was accepted
 *   im_server_feed()     bytes arrived
 *   im_conn_pending()    bytes to send (as iovecs) / im_conn_sent()
 *   im_server_hangup()   the transport died (EOF, error)
 *   im_server_tick()     time passed
 * and is told through im_io hooks when a connection has output or must be
 * closed. <libim/im_event.h> is the ready-made libevent driver;
 * examples/epoll-echo.c drives the engine from a hand-written epoll loop.
 *
 * Conventions:
 *  - im_config, im_callbacks, im_msg, im_conn_info and im_stats start with
 *    `uint32_t struct_size`: sizeof the caller's struct, or 0 for the
 *    layout of the library's own release. The library reads (or, for the
 *    structs it fills, writes) only the first struct_size bytes, so a field
 *    added in a later release never breaks a program built earlier: see
 *    "ABI and versions" in docs/EMBEDDING.md. A program that should keep
 *    running against newer libraries of its soname sets struct_size =
 *    sizeof (IM_STRUCT_SIZE) or starts from im_config_init().
 *  - Functions returning int return 0 (or a count) on success and a negative
 *    IM_E* code on failure; im_strerror() names it.
 *  - Every pointer passed in is borrowed for the duration of the call only,
 *    unless the comment says otherwise. Pointers passed to a callback are
 *    valid only during that callback.
 *  - Callbacks may call any function of this header, for any connection,
 *    including closing the connection they are about. Memory of a closed
 *    connection is released only after on_close has returned.
 *  - One im_server is used by one thread at a time.
 */
#ifndef LIBIM_IM_H
#define LIBIM_IM_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(IM_BUILDING)
#define IM_EXTERN __attribute__((visibility("default")))
#else
#define IM_EXTERN
#endif

/* ---- errors ------------------------------------------------------------ */

enum im_error {
  IM_OK = 0,
  IM_EINVAL = -1,     /* an argument is invalid */
  IM_ENOENT = -2,     /* no such connection, user or room */
  IM_ECLOSED = -3,    /* the connection is closing or closed */
  IM_EFULL = -4,      /* output bound reached: the connection was shed */
  IM_ETOOBIG = -5,    /* message over the configured maximum */
  IM_ESTATE = -6,     /* not valid in the connection's state (e.g. not authenticated) */
  IM_EPROTO = -7,     /* the peer broke the protocol */
  IM_ELIMIT = -8,     /* a configured limit (connections, rooms) is reached */
  IM_EADDR = -9,      /* an address could not be parsed or bound */
  IM_ESYS = -10,      /* a system call failed; errno has the reason */
  IM_ENOMEM = -11,    /* an allocation failed; the engine stays usable */
  IM_EFATAL = -100    /* below this line only im_server_free() is allowed
                         (no function returns one today) */
};

/* Static English text for an IM_E* code (never NULL). */
IM_EXTERN const char *im_strerror(int err);

/* ---- values ------------------------------------------------------------ */

typedef struct im_server im_server;

/* A connection handle: never 0, never reused for another connection during
 * the server's lifetime (slot index + generation). */
typedef uint64_t im_conn_id;

enum im_transport { IM_TRANSPORT_WS = 1, IM_TRANSPORT_TCP = 2 };

/* Close codes of libim (WebSocket close codes; TCP clients get an IMP
 * `error` op with the code before the socket closes). */
enum im_close_code {
  IM_CLOSE_NORMAL = 1000,
  IM_CLOSE_GOING_AWAY = 1001,   /* server shutdown */
  IM_CLOSE_PROTOCOL = 1002,
  IM_CLOSE_BAD_DATA = 1007,
  IM_CLOSE_POLICY = 1008,
  IM_CLOSE_TOO_BIG = 1009,
  IM_CLOSE_INTERNAL = 1011,
  IM_CLOSE_AUTH_FAILED = 4401,
  IM_CLOSE_KICKED = 4403,
  IM_CLOSE_AUTH_TIMEOUT = 4408, /* also: idle (no heartbeat) and ACK timeout */
  IM_CLOSE_ACK_TIMEOUT = 4408,  /* a reliable message stayed unACKed after the last retry */
  IM_CLOSE_RATE = 4290,         /* the client kept sending over its message rate
                                   (max_rate_strikes refusals within 10 s) */
  IM_CLOSE_EXPIRED = 4410,      /* the session's deadline passed (im_conn_set_expiry):
                                   its credentials expired */
  IM_CLOSE_REVOKED = 4411,      /* not used by the engine: for applications that
                                   revoke a user's credentials (imd) */
  IM_CLOSE_SHED = 4429          /* output bound exceeded (slow reader) */
};

/* Memory hooks; NULL fields use the C library. All four or none. */
typedef struct im_allocator {
  void *(*malloc)(size_t size, void *ud);
  void *(*calloc)(size_t n, size_t size, void *ud);
  void *(*realloc)(void *p, size_t size, void *ud);
  void (*free)(void *p, void *ud);
  void *ud;
} im_allocator;

/* struct_size of a public struct as this header lays it out: use it in an
 * initializer, e.g. im_msg m = {IM_STRUCT_SIZE(im_msg), .to = "bob"}. */
#define IM_STRUCT_SIZE(type) .struct_size = (uint32_t)sizeof(type)

typedef struct im_config {
  uint32_t struct_size;      /* sizeof(im_config) (set by im_config_init), or 0: this release's
                                layout. Fields past struct_size get their defaults */
  uint32_t max_message;      /* largest message (WS message / TCP frame body) accepted, bytes. 65536 */
  uint32_t max_output;       /* per-connection queued output before the connection is shed, bytes. 1 MiB */
  uint32_t max_connections;  /* 0 = unlimited */
  uint32_t auth_timeout_ms;  /* handshake + auth must finish within. 10000 */
  uint32_t heartbeat_s;      /* interval advertised in auth_ok ("hb"). 30 */
  uint32_t idle_timeout_ms;  /* close after this long with nothing read. 0 = 2.5 x heartbeat
                                (both 0: no idle timeout) */
  uint32_t close_timeout_ms; /* wait this long for the peer's close frame. 3000 */
  uint32_t tick_ms;          /* timer granularity the driver ticks at. 100 */
  uint16_t node_id;          /* 0..1023, part of generated message ids. 0 */
  uint32_t ack_timeout_ms;   /* reliable sends: retransmit when unACKed this long. 18000 */
  uint32_t ack_retries;      /* retransmits before the connection is closed (4408). 3 */
  uint32_t max_inflight;     /* reliable messages sent and unACKed per connection; more wait
                                in order (their bytes count against max_output). 128 */
  uint32_t dedupe_window;    /* upstream cids remembered per connection to drop client
                                retransmits; 0 = no de-duplication. 32 */
  const char *ws_path;       /* request path of the WebSocket endpoint (copied); NULL = any. "/ws" */
  const im_allocator *alloc; /* NULL = malloc/free. Used for connections, buffers, queues and
                                registry entries; the handshake parser, hash buckets and the
                                timer wheel still use malloc directly */
  uint32_t max_rooms;        /* rooms one connection may be in at once; a join over it is refused
                                (IM_ELIMIT; IMP error 429 "too many rooms"). 0 = unlimited. 64 */
  uint32_t max_preauth_input; /* bytes a connection may send before it is authenticated: the
                                upgrade request (over it: HTTP 431), one frame or message (close
                                1009), input held while auth is pending (close 1009). 0 = only
                                the other limits. 8192 */
  uint32_t max_conns_per_user; /* authenticated connections of one uid; the auth that would
                                exceed it is refused (IMP error 429 and close 1008, or HTTP 403
                                for upgrade-query auth). 0 = unlimited. 32 */
  uint32_t max_push_rate;    /* messages per second queued to one connection by fan-outs that are
                                not reliable (room messages), with a burst of max_push_burst:
                                beyond it they are dropped for that connection (counted in
                                im_stats.push_dropped), so one busy room cannot starve a slow
                                phone. Reliable (stored) sends are not dropped: they wait in
                                the in-flight window and max_output. 0 = no limit. 0 */
  uint32_t max_push_burst;   /* bucket size of max_push_rate; 0 = 2 x the rate */
  uint32_t max_msg_rate;     /* upstream msg ops per second per connection, bursts of twice as
                                many; one over it is refused with IMP error 429 "rate limit
                                exceeded" (with its cid) and never reaches on_message.
                                0 = unlimited (the default) */
  uint32_t max_user_msg_rate; /* the same for all connections of one uid on this server
                                together. 0 = unlimited (the default) */
  uint32_t max_rate_strikes; /* a connection refused more than this many msgs within 10 s is
                                closed with IM_CLOSE_RATE (4290). 0 = never closed. 0 */
} im_config;

/* Fill the first `size` bytes of cfg (a caller's im_config of that size)
 * with the defaults above, zeros for fields of a newer release the library
 * does not know, and set cfg->struct_size = size; no byte past size is
 * written. Returns 0, or IM_EINVAL when size is smaller than the oldest
 * layout the library knows (nothing is written). Use im_config_init(),
 * which passes this header's sizeof. */
IM_EXTERN int im_config_init_size(im_config *cfg, size_t size);
/* Fill cfg with the defaults above, struct_size included. */
static inline void im_config_init(im_config *cfg) { im_config_init_size(cfg, sizeof(*cfg)); }

/* Longest device and platform accepted in an auth, bytes; a longer one is
 * refused (error 400 "device too long" / "platform too long", or HTTP 403
 * for upgrade-query auth) before on_auth runs. */
#define IM_DEVICE_MAX 64

/* Credentials of an authentication attempt (from an IMP auth op or the
 * ?uid=&token=&device=&platform= query of the WebSocket upgrade).
 * Strings are NUL-terminated; device and platform are "" when absent
 * and at most IM_DEVICE_MAX bytes. */
typedef struct im_auth {
  const char *uid;
  const char *token;
  const char *device;
  const char *platform;
  const char *peer;          /* remote address as given to im_server_accept */
  int via_upgrade;           /* 1: from the upgrade query (failure -> HTTP 403) */
  int has_since;             /* the auth op carried "since": on_sync follows on_open */
  uint64_t since;
  /* Set by on_auth when it returns IM_AUTH_DENY: the error code (default
   * 401) and reason sent to the client. The reason is encoded right after
   * on_auth returns, so it must outlive the call (a string literal, or
   * memory the application keeps). */
  int code;
  const char *reason;
  /* 1: an auth op on a connection that is already open (a credentials
   * refresh); uid and device are the connection's (the engine refuses one
   * for another uid or device with error 403 before on_auth). Whatever the
   * verdict, the connection stays open as it was: ACCEPT answers auth_ok,
   * DENY an error with code/reason. */
  int refresh;
} im_auth;

/* A message, up- or downstream. Strings are NUL-terminated or NULL when
 * absent. `data` is the JSON text of the payload value (data_len bytes, not
 * NUL-terminated); it is passed through byte for byte. seq/ts are 0 when
 * absent. In on_message, `id` holds a fresh server id (a decimal string)
 * assigned by the library; the application may keep or replace it when it
 * sends copies on. */
typedef struct im_msg {
  uint32_t struct_size;    /* sizeof(im_msg), or 0: this release's layout. Messages the library
                              hands to callbacks carry the library's sizeof */
  const char *id;
  const char *cid;
  const char *from;
  const char *to;
  const char *group;
  const char *room;
  uint64_t seq;
  uint64_t ts;
  const char *data;
  size_t data_len;
  unsigned flags;          /* downstream: IM_SEND_* bits; 0 upstream */
} im_msg;

/* im_msg.flags of a downstream message. */
enum {
  /* Track the message per receiving connection until the client ACKs its
   * id: retransmit the same bytes every ack_timeout_ms, close the
   * connection with 4408 after ack_retries retransmits, and report it to
   * on_undelivered if the connection closes first. Needs an id the client
   * can echo (m->id, or the generated one). */
  IM_SEND_RELIABLE = 1u << 0
};

/* Return values of on_auth. */
enum { IM_AUTH_ACCEPT = 0, IM_AUTH_DENY = 1, IM_AUTH_PENDING = 2 };
/* on_room may return this: the application answers itself, later: it
 * calls im_room_join()/im_room_leave() and then im_ack() with the op's cid
 * (im_op_cid(), copied during on_room) and no id, or im_reply_error() with
 * that cid. */
enum { IM_ROOM_DEFER = -1 };
/* Return values of on_message. */
enum { IM_MSG_ACK = 0, IM_MSG_DEFER = 1 };

typedef struct im_callbacks {
  uint32_t struct_size;  /* sizeof(im_callbacks), or 0: this release's layout. Callbacks past
                            struct_size are NULL */
  /* Decide an authentication. Return IM_AUTH_ACCEPT, IM_AUTH_DENY, or
   * IM_AUTH_PENDING and later call im_auth_complete(). NULL accepts any
   * non-empty uid and token. */
  int (*on_auth)(im_server *srv, im_conn_id c, im_auth *a, void *user);
  /* The connection is authenticated and registered under its uid. */
  void (*on_open)(im_server *srv, im_conn_id c, void *user);
  /* An upstream msg. Return IM_MSG_ACK to have the library answer
   * {"op":"ack","cid":..,"id":m->id} now, or IM_MSG_DEFER when the
   * application will answer with im_ack() or im_reply_error() itself
   * (e.g. after storing the message). NULL acks and drops. */
  int (*on_message)(im_server *srv, im_conn_id c, const im_msg *m, void *user);
  /* A client asked to join (join != 0) or leave a room. Return 0 to allow
   * (the library updates membership and acks), an error code (HTTP-like,
   * e.g. 403) to refuse with an IMP error, or IM_ROOM_DEFER to decide later
   * (see there). NULL allows everything. */
  int (*on_room)(im_server *srv, im_conn_id c, const char *room, int join, void *user);
  /* The client ACKed a downstream message id. seq is the seq the message
   * was sent with when it was a reliable send still in flight on c, else
   * the seq the client put in its ack (0 when none). Called for every ack,
   * tracked or not (a repeated ack is reported again). im_ack_rtt_us()
   * tells how long a tracked one took. */
  void (*on_ack)(im_server *srv, im_conn_id c, const char *id, uint64_t seq, void *user);
  /* c is closing with reliable messages it never ACKed (sent or still
   * waiting for window space): called once per message, right before
   * on_close; sent ones first, in the order they were last (re)sent, then
   * the waiting ones in order. */
  void (*on_undelivered)(im_server *srv, im_conn_id c, const char *id, uint64_t seq, void *user);
  /* The client asked for the messages after `since` (a sync op, or an auth
   * op carrying since: then right after on_open). limit is the client's
   * (0: none given). The application sends them with im_send_conn() and
   * finishes with im_sync_end(). NULL answers a sync op with error 501. */
  void (*on_sync)(im_server *srv, im_conn_id c, uint64_t since, uint32_t limit, void *user);
  /* The connection is gone (code: the close code sent or received, 1006
   * when the transport died). Called once for every accepted connection,
   * authenticated or not. After it returns the id is invalid. */
  void (*on_close)(im_server *srv, im_conn_id c, int code, void *user);
} im_callbacks;

/* Hooks of the driver that moves bytes (set by im_event for libevent). */
typedef struct im_io {
  /* Output became pending on c (it was empty). The driver should write
   * what im_conn_pending() gives, now or when the socket is writable. */
  void (*want_write)(im_server *srv, im_conn_id c, void *io_ctx, void *io_user);
  /* The engine is done with c: its output is flushed (or abandoned) and the
   * transport must be closed. The engine releases c right after this hook
   * returns (calling on_close); the driver must not use c afterwards. */
  void (*close)(im_server *srv, im_conn_id c, void *io_ctx, void *io_user);
  void *io_user;
} im_io;

/* ---- server lifecycle ---------------------------------------------------- */

/* Create an engine. cfg may be NULL (defaults); cb may be NULL; both are
 * copied. `user` is passed to every callback. Returns NULL on allocation
 * failure or invalid cfg (a struct_size of cfg or cb below the oldest
 * layout included). */
IM_EXTERN im_server *im_server_new(const im_config *cfg, const im_callbacks *cb, void *user);
/* Set the driver hooks (copied). Must be called before the first accept. */
IM_EXTERN void im_server_set_io(im_server *srv, const im_io *io);
/* Free the engine. Connections still open are released without on_close
 * and without I/O; close them first for a clean shutdown. */
IM_EXTERN void im_server_free(im_server *srv);
IM_EXTERN void *im_server_user(const im_server *srv);
/* The configuration in force (defaults filled in); valid until free. */
IM_EXTERN const im_config *im_server_config(const im_server *srv);

/* ---- driving the engine (for custom event loops) ------------------------- */

/* A transport connection was accepted. `peer` (e.g. "127.0.0.1:5555") is
 * copied; io_ctx is the driver's own pointer, handed back in im_io hooks.
 * Returns the new id, or 0 when max_connections is reached or memory ran
 * out (the driver then closes the socket). */
IM_EXTERN im_conn_id im_server_accept(im_server *srv, enum im_transport t, const char *peer,
                                      void *io_ctx);

/* Bytes arrived on c. The engine may modify buf in place (it unmasks
 * WebSocket payloads there); buf is borrowed for the call. Leftover partial
 * frames are copied. Returns 0 (keep reading; a closing WebSocket still
 * reads to find the peer's close frame), IM_ENOENT for an unknown id, or
 * IM_ECLOSED when c no longer wants input (the bytes were discarded; the
 * driver can stop reading and wait for io.close). */
IM_EXTERN int im_server_feed(im_server *srv, im_conn_id c, void *buf, size_t len);

/* The transport of c died or reached EOF. The engine releases c (calling
 * on_close with 1006 unless a close code was exchanged) and does not call
 * io.close. Returns 0 or IM_ENOENT. */
IM_EXTERN int im_server_hangup(im_server *srv, im_conn_id c);

/* Fill up to iovmax iovecs with queued output of c, in order. Returns the
 * number filled (0: nothing pending) or IM_ENOENT. The memory stays valid
 * until the next im_conn_sent() or engine call that closes c. */
IM_EXTERN int im_conn_pending(im_server *srv, im_conn_id c, struct iovec *iov, int iovmax);
/* n bytes of the pending output were written. When the output empties on
 * a closing connection, io.close is called. Returns 0 or IM_ENOENT. */
IM_EXTERN int im_conn_sent(im_server *srv, im_conn_id c, size_t n);

/* Advance time to now_ms (any monotonic clock, never going back). Runs
 * auth / idle / close timeouts. Call it every cfg.tick_ms. */
IM_EXTERN void im_server_tick(im_server *srv, uint64_t now_ms);

/* ---- application API -------------------------------------------------- */

/* Finish an IM_AUTH_PENDING authentication. accept != 0 registers and
 * opens c; otherwise c gets error `code` (e.g. 401) with `reason` and is
 * closed with 4401 (or HTTP 403 when authenticating through the upgrade
 * request). For a pending refresh (im_auth.refresh) c stays open either
 * way: accept answers auth_ok, a refusal error `code` / `reason`.
 * Returns 0, IM_ENOENT (c is gone: the auth is void) or IM_ESTATE (no auth
 * pending on c). */
IM_EXTERN int im_auth_complete(im_server *srv, im_conn_id c, int accept, int code,
                               const char *reason);

/* Close c with IM_CLOSE_EXPIRED (4410, reason "session expired") once
 * after_ms milliseconds of engine time have passed (rounded up to the next
 * tick); after_ms 0 removes the deadline. A later call replaces the
 * deadline (e.g. after a refresh). Costs no timer of its own: the deadline
 * rides on the connection's idle timer, O(1). May be called from on_auth
 * (before the connection opens) or any time after. Returns 0, IM_ENOENT or
 * IM_ECLOSED (c is closing). */
IM_EXTERN int im_conn_set_expiry(im_server *srv, im_conn_id c, uint64_t after_ms);

/* During on_ack: microseconds from the im_send_* call that queued the
 * acked reliable message on c to this ack (waits for window space and
 * retransmits included), or -1 when the ack matched no reliable message in
 * flight on c (an untracked id, a repeated ack). -1 outside on_ack. Measured
 * with the clock of im_server_set_clock(), else in engine time (whole
 * ticks of tick_ms). */
IM_EXTERN int64_t im_ack_rtt_us(const im_server *srv);

/* A monotonic clock in microseconds for measurements (im_ack_rtt_us); it is
 * called once per reliable message queued and once per ACK of one. NULL:
 * engine time. The engine's timeouts still run on im_server_tick(). */
IM_EXTERN void im_server_set_clock(im_server *srv, uint64_t (*now_us)(void *ud), void *ud);

/* During on_room: the cid of the join/leave op (NUL-terminated, valid
 * until on_room returns), or NULL when it has none. NULL elsewhere. */
IM_EXTERN const char *im_op_cid(const im_server *srv);

/* Longest message id, with its NUL. */
#define IM_ID_MAX 24

/* Write a fresh server-unique message id (decimal digits, NUL-terminated)
 * into out: the same generator im_send_* use for a NULL m->id. */
IM_EXTERN void im_new_id(im_server *srv, char out[IM_ID_MAX]);

/* Send one message to a connection. m->id NULL: the library generates one.
 * Returns 0, IM_ENOENT, IM_ESTATE (c not authenticated), IM_ECLOSED,
 * IM_ETOOBIG, IM_EFULL (c exceeded max_output and is being shed), IM_ENOMEM,
 * IM_EINVAL (IM_SEND_RELIABLE with an id of IM_ID_MAX bytes or more, or
 * m->struct_size below the oldest layout; the same for every send). */
IM_EXTERN int im_send_conn(im_server *srv, im_conn_id c, const im_msg *m);

/* Send to every connection of uid except `except` (0: none). The message is
 * encoded once per wire format and shared. Returns the number of
 * connections it was queued on (>= 0), or IM_ETOOBIG / IM_ENOMEM /
 * IM_EINVAL (as im_send_conn). */
IM_EXTERN int im_send_user(im_server *srv, const char *uid, const im_msg *m, im_conn_id except);

/* Send to every connection of each of n users (duplicates in uids are
 * sent once per occurrence), except connection `except`; encoded once for
 * all of them. Returns the number of connections reached, or IM_ETOOBIG /
 * IM_ENOMEM / IM_EINVAL (as im_send_conn). */
IM_EXTERN int im_send_users(im_server *srv, const char *const *uids, size_t n, const im_msg *m,
                            im_conn_id except);

/* Join / leave a room (created on first join, freed when empty).
 * Returns 0 (also when already a member / not a member), IM_ENOENT,
 * IM_ESTATE (not authenticated), IM_EINVAL (room name empty or over 128
 * bytes; join only), IM_ELIMIT (join only: c is already in max_rooms
 * rooms), IM_ENOMEM. */
IM_EXTERN int im_room_join(im_server *srv, im_conn_id c, const char *room);
IM_EXTERN int im_room_leave(im_server *srv, im_conn_id c, const char *room);
/* Send to every connection in the room except `except`; encoded once.
 * Returns the number of connections reached or a negative code. */
IM_EXTERN int im_room_send(im_server *srv, const char *room, const im_msg *m, im_conn_id except);
/* 1 if connection c is in the room, 0 if not (or c is unknown). */
IM_EXTERN int im_room_member(const im_server *srv, im_conn_id c, const char *room);
/* Members of a room on this server (0 if none). */
IM_EXTERN size_t im_room_size(const im_server *srv, const char *room);

/* Acknowledge an upstream message whose on_message returned IM_MSG_DEFER:
 * {"op":"ack","cid":cid,"id":id,"seq":seq} (seq omitted when 0; cid/id
 * omitted when NULL). A later client retransmit of the same cid on c is
 * answered with this ack again instead of reaching on_message (within
 * dedupe_window). Returns 0, IM_ENOENT, IM_ECLOSED (c is closing or not
 * authenticated), IM_EFULL, IM_ENOMEM. */
IM_EXTERN int im_ack(im_server *srv, im_conn_id c, const char *cid, const char *id,
                     uint64_t seq);
/* Tell c to reconnect elsewhere: {"op":"goaway","reconnect_ms":N,"reason":..}
 * (binary op 0x0c; reason omitted when NULL or ""). The connection stays
 * open; close it later (1001) if the client does not leave. Returns 0,
 * IM_ENOENT, IM_ECLOSED (not open: closing, or not authenticated),
 * IM_EFULL, IM_ENOMEM. */
IM_EXTERN int im_conn_goaway(im_server *srv, im_conn_id c, uint32_t reconnect_ms,
                             const char *reason);

/* Send {"op":"error","code":code,"reason":reason,"cid":cid} (cid may be
 * NULL). The connection stays open. An error for a cid forgets it in the
 * de-duplication window, so a retransmit is processed again. Returns 0, IM_ENOENT, IM_ECLOSED,
 * IM_ESTATE (a WebSocket whose upgrade is not answered yet), IM_EFULL,
 * IM_ENOMEM. */
IM_EXTERN int im_reply_error(im_server *srv, im_conn_id c, int code, const char *reason,
                             const char *cid);

/* Finish a sync: {"op":"sync_end","last":last,"more":more,"gap":true}
 * (gap only when non-zero). last is the seq of the last message sent for
 * this sync (or the position the client is now at); more != 0 tells the
 * client to sync again from last; gap != 0 that history after the client's
 * since was trimmed. Returns 0, IM_ENOENT, IM_ECLOSED, IM_EFULL, IM_ENOMEM. */
IM_EXTERN int im_sync_end(im_server *srv, im_conn_id c, uint64_t last, int more, int gap);

/* Close c: WebSocket gets a close frame with code/reason, TCP an error op
 * then FIN, after queued output is flushed. A WebSocket then waits up to
 * close_timeout_ms for the peer's close frame. on_close follows later.
 * code must be 1000, 1001 or 3000-4999; reason is cut to 123 bytes on a
 * UTF-8 boundary. Returns 0, IM_EINVAL (code), IM_ENOENT, IM_ECLOSED
 * (already closing). */
IM_EXTERN int im_conn_close(im_server *srv, im_conn_id c, int code, const char *reason);
/* Close every connection with code (shutdown: 1001). Returns the count. */
IM_EXTERN size_t im_server_close_all(im_server *srv, int code, const char *reason);

/* ---- introspection -------------------------------------------------------- */

typedef struct im_conn_info {
  uint32_t struct_size;        /* in: sizeof(im_conn_info), or 0: this release's layout; the
                                  library fills no byte past it. out: the bytes it filled */
  const char *uid, *device, *platform; /* NULL before authentication; valid in on_close */
  const char *peer;
  enum im_transport transport;
  int binary;                  /* speaks binary IMP */
  uint64_t since_ms;           /* engine time of accept */
  int secure;                  /* 1: the transport is TLS (wss://, TLS over TCP), as the driver
                                  said with im_conn_set_secure */
} im_conn_info;

/* Fill info, which is `size` bytes long (the caller's sizeof: the library
 * writes no further, and sets info->struct_size to what it wrote); pointers
 * stay valid until c closes. Returns 0, IM_ENOENT, or IM_EINVAL when size is
 * below the oldest layout or info is NULL (info is left alone). Call it
 * through im_conn_get_info(), which passes sizeof for you. */
IM_EXTERN int im_conn_get_info_size(const im_server *srv, im_conn_id c, im_conn_info *info,
                                    size_t size);
static inline int im_conn_get_info(const im_server *srv, im_conn_id c, im_conn_info *info) {
  return im_conn_get_info_size(srv, c, info, sizeof(*info));
}
/* Drivers: record whether c's transport is encrypted (TLS), reported in
 * im_conn_info.secure. im_event calls it for its TLS listeners right after
 * im_server_accept. Returns 0 or IM_ENOENT. */
IM_EXTERN int im_conn_set_secure(im_server *srv, im_conn_id c, int secure);
/* Per-connection user pointer (NULL initially). */
IM_EXTERN int im_conn_set_data(im_server *srv, im_conn_id c, void *data);
IM_EXTERN void *im_conn_get_data(const im_server *srv, im_conn_id c);

/* Connections of uid: fills up to max ids, returns the total count. */
IM_EXTERN size_t im_user_conns(const im_server *srv, const char *uid, im_conn_id *ids, size_t max);

typedef struct im_stats {
  uint32_t struct_size;      /* in: sizeof(im_stats), or 0: this release's layout; the library
                                fills no byte past it. out: the bytes it filled */
  uint64_t conns;            /* open transport connections */
  uint64_t conns_authed;     /* of which authenticated */
  uint64_t users;            /* distinct uids online */
  uint64_t rooms;
  uint64_t msgs_in;          /* upstream msg ops */
  uint64_t msgs_out;         /* downstream messages queued (per connection) */
  uint64_t bytes_in, bytes_out;
  uint64_t shed;             /* connections closed for exceeding max_output */
  uint64_t proto_errors;     /* connections closed for protocol violations */
  uint64_t auth_failures;
  uint64_t timeouts;         /* auth + idle timeouts */
  uint64_t out_queued;       /* bytes queued right now, all connections */
  uint64_t inflight;         /* reliable messages unACKed right now (sent or waiting) */
  uint64_t retransmits;      /* reliable messages sent again after ack_timeout_ms */
  uint64_t ack_timeouts;     /* connections closed (4408) after the last retransmit */
  uint64_t undelivered;      /* reliable messages reported to on_undelivered */
  uint64_t dups;             /* client retransmits (repeated cid) not delivered again */
  uint64_t push_dropped;     /* room messages not queued to a connection over max_push_rate */
  uint64_t rate_limited;     /* msg ops refused (429) over max_msg_rate / max_user_msg_rate */
  uint64_t rate_closed;      /* connections closed (4290) after max_rate_strikes refusals */
} im_stats;

/* Fill st, which is `size` bytes long (the caller's sizeof), with the
 * counters; st->struct_size is set to what was written. A size below the
 * oldest layout, or a NULL st, leaves st alone. Call it through
 * im_server_stats(), which passes sizeof for you. */
IM_EXTERN void im_server_stats_size(const im_server *srv, im_stats *st, size_t size);
static inline void im_server_stats(const im_server *srv, im_stats *st) {
  im_server_stats_size(srv, st, sizeof(*st));
}

#ifdef __cplusplus
}
#endif
#endif
