/* Internal structures of the engine, shared by the lib/core files. */
#ifndef IM_CORE_ENGINE_H
#define IM_CORE_ENGINE_H

#include <libim/im.h>
#include <libim/im_router.h>
#include <stdbool.h>
#include <sys/uio.h>

#include "core/strmap.h"
#include "core/timer_wheel.h"
#include "proto/imp.h"

typedef struct ws_handshake ws_handshake;

/* A ref-counted, immutable byte buffer: one encoded frame shared by every
 * receiver of a fan-out (R16). */
typedef struct im_buf {
  uint32_t refs;
  uint32_t len;
  uint8_t data[];
} im_buf;

/* Bytes a connection holds for a while (partial input, a fragmented
 * message), allocated only while there are some. */
typedef struct im_bytes {
  uint32_t len, cap;
  uint32_t aux;            /* msg: the UTF-8 validator state of the text so far */
  uint8_t data[];
} im_bytes;
static inline uint32_t bytes_len(const im_bytes *b) { return b ? b->len : 0; }

/* A piece of a connection's output queue (buf.c): up to OUTQ_CHUNK queued
 * buffers, b[head..tail), in one cache line. */
#define OUTQ_CHUNK 6
typedef struct outq_node {
  struct outq_node *next;
  uint32_t off;            /* bytes of b[head] already written */
  uint8_t head, tail;
  im_buf *b[OUTQ_CHUNK];
} outq_node;

enum conn_state {
  CS_HANDSHAKE,     /* WebSocket upgrade request in progress */
  CS_AUTH,          /* waiting for an auth op */
  CS_AUTH_PENDING,  /* on_auth returned PENDING; input is held */
  CS_OPEN,          /* authenticated */
  CS_CLOSING,       /* close sent or being sent; waiting for flush / peer close */
  CS_CLOSED         /* released at the end of the current engine call */
};

enum conn_flag {
  CF_FLUSH_CLOSE = 1u << 0,  /* close the transport once output is flushed */
  CF_CLOSE_RCVD = 1u << 1,   /* the peer's close frame arrived */
  CF_NOTIFIED = 1u << 2,     /* want_write was called and output not yet drained */
  CF_UPGRADE_AUTH = 1u << 3, /* pending auth came from the upgrade query */
  CF_REGISTERED = 1u << 5,   /* counted in stats.conns_authed / in a user */
  CF_HS_UNSENT = 1u << 6,    /* the 101 response may not have been fully written */
  CF_SYNC_ON_OPEN = 1u << 7, /* the auth op carried since: call on_sync after on_open */
  CF_SECURE = 1u << 8,       /* the driver said the transport is TLS */
  CF_REFRESH_PENDING = 1u << 9 /* a refresh auth (on an open connection) awaits im_auth_complete */
};

/* Headroom for a downstream message's envelope (id, from, to, ts, ...)
 * beyond max_message bytes of data. */
#define IM_ENVELOPE_MAX 4096u

/* Wire formats a packet may be framed in. */
enum wire_kind { WIRE_WS_TEXT, WIRE_WS_BIN, WIRE_TCP, WIRE_N };

typedef struct im_user im_user;
typedef struct room_member room_member;
typedef struct im_rel im_rel;

/* A connection. The first 64 bytes are what a fan-out and the driver's
 * flush touch per member (id, state, output queue, push-rate bucket, driver
 * context, reliable state): one cache line per delivery. What an idle
 * authenticated connection does not use lives elsewhere: rate limits and
 * strikes in the lazily allocated im_rel, partial input in `in`
 * and `msg` (NULL when none; a text message's UTF-8 state with it), the
 * peer string sized to fit. */
typedef struct im_conn {
  im_conn_id id;
  outq_node *out_head, *out_tail;
  void *io_ctx;
  im_rel *rel;             /* reliable delivery, cid window, rates: on first use */
  uint32_t out_bytes;
  uint8_t state;
  uint8_t transport;
  uint8_t binary;          /* replies in binary IMP */
  uint8_t frag_op;         /* opcode of the WebSocket message being assembled, 0 = none */
  uint16_t flags;
  uint16_t close_code;
  union {
    uint32_t push_tokens;  /* open: max_push_rate bucket, in thousandths of a message */
    uint32_t hs_fed;       /* handshake: bytes of the upgrade request read (max_preauth_input) */
  };
  uint32_t push_at;        /* engine ms (low 32 bits) of its last refill */
  uint32_t last_rx;        /* engine tick of the last read */
  /* end of the first cache line */
  tw_entry timer;
  im_user *user;
  struct im_conn *u_next, *u_prev;
  room_member *rooms;
  void *data;
  char *ident;             /* "uid\0device\0platform\0": parked while auth is pending
                              (then followed by the since of the auth op), then kept
                              (valid in on_close too) */
  uint64_t since_ms;
  uint64_t expire_tick;    /* im_conn_set_expiry deadline (engine tick), 0 = none: kept
                              here, as imd sets one on every connection */
  im_bytes *in;            /* partial frame carried between feeds (NULL when none) */
  im_bytes *msg;           /* fragmented message being assembled (NULL when none) */
  ws_handshake *hs;
  char peer[];             /* "[v6-mapped address]:port", at most PEER_MAX - 1 bytes */
} im_conn;

/* Longest peer string kept (with its NUL). */
#define PEER_MAX 56u

/* A reliable downstream message on one connection (reliable.c). */
typedef struct rel_entry {
  struct rel_entry *next;
  im_buf *buf;             /* the framed message, resent as is */
  uint64_t seq;
  uint64_t due;            /* tick of the next retransmit (sent entries) */
  uint32_t tries;          /* times sent */
  uint64_t queued_us;      /* im_send_* queued it (rel_stamp_us), for im_ack_rtt_us */
  char id[IM_ID_MAX];
} rel_entry;

/* A remembered upstream cid (the de-duplication window). */
enum { DD_FREE, DD_PENDING, DD_ACKED };
typedef struct dd_entry {
  uint64_t hash;           /* of the cid; 0 = free slot */
  uint64_t seq;            /* the ack's seq */
  uint8_t state;
  char id[IM_ID_MAX];      /* the ack's id */
} dd_entry;

/* The state of a connection that an idle one does not need, allocated on
 * first use (rel_get): reliable delivery (reliable.c), the cid window
 * (dedupe.c), its message rate and strikes (dispatch.c). */
struct im_rel {
  tw_entry timer;          /* on im_server.ack_wheel: due of `head` */
  im_conn *conn;
  rel_entry *head, *tail;  /* sent and unACKed, in due order */
  rel_entry *wait_head, *wait_tail; /* beyond max_inflight, not sent yet */
  uint32_t inflight, waiting;
  uint64_t wait_bytes;
  dd_entry *dd;            /* dedupe_window entries, or NULL */
  uint32_t dd_next;        /* slot the next cid takes (oldest) */
  uint32_t strikes;        /* msgs refused in the current strike window */
  uint64_t strike_ms;      /* start of the current 10 s strike window (engine ms) */
  uint64_t rate_tat;       /* max_msg_rate: GCRA theoretical arrival time, engine us */
};

struct im_user {
  strmap_node node;
  im_conn *conns;
  uint32_t nconns;
  uint64_t rate_tat;       /* max_user_msg_rate: GCRA theoretical arrival time, engine us */
  struct shared_user *sh;  /* im_server_set_shared: the uid's process-wide record, else NULL */
  char uid[];
};

/* One member in a room's array: what a fan-out reads, side by side. */
typedef struct room_slot {
  im_conn *conn;
  room_member *mb;               /* its membership record */
} room_slot;

/* A room: its members in an array (a fan-out walks it in order and can
 * prefetch the connections ahead), in no particular order: a leave moves
 * the last member into the hole. */
typedef struct im_room {
  strmap_node node;
  room_slot *m;
  uint32_t n, cap;
  uint32_t walks;                /* fan-outs walking m (reg_room_walk_*) */
  char name[];
} im_room;

/* c's membership of a room, on c's list. */
struct room_member {
  im_room *room;
  room_member *c_next;           /* in the connection's list */
  uint32_t at;                   /* index in room->m */
};

struct im_server {
  im_config cfg;
  im_callbacks cb;
  im_io io;
  im_allocator alloc;
  void *user;
  /* connection table: id = gen << 32 | (slot + 1) */
  im_conn **slots;
  uint32_t *gens;
  uint32_t *free_slots;
  uint32_t nslots, cap, nfree;
  strmap users;
  strmap rooms;
  tw_wheel wheel;
  tw_wheel ack_wheel;      /* reliable-send retransmit deadlines */
  uint32_t ack_ticks;
  uint64_t now_ms;         /* engine time: driver time - t0 */
  uint64_t t0;
  bool started;
  uint32_t depth;          /* nesting of public entry points */
  im_conn *dead;           /* closed connections released when depth returns to 0 (via u_next) */
  outq_node *node_pool;    /* free outq nodes (buf.c) */
  struct node_slab *node_slabs; /* where they live */
  char *scratch;           /* JSON unescape space, max_message bytes */
  char *fields;            /* NUL-terminated copies of packet fields for callbacks */
  size_t fields_cap;
  uint64_t rng;
  uint64_t id_wall0;       /* wall-clock ms at creation, base of message ids */
  uint64_t id_last_ms;
  uint32_t id_counter;
  uint32_t id_shard, id_shards; /* im_server_set_id_shard: counters = shard mod shards */
  uint64_t *id_clock;      /* im_server_set_id_clock: the highest id minted by the sharers */
  uint32_t idle_ticks;
  im_router router;        /* all NULL: a single island */
  const char *op_cid;      /* cid of the join/leave op during on_room (im_op_cid) */
  const int64_t *ack_rtt;  /* during on_ack: what im_ack_rtt_us answers; NULL elsewhere */
  uint64_t (*clock_us)(void *ud); /* im_server_set_clock; NULL: engine time */
  void *clock_ud;
  struct im_guard *guard;  /* guard.c: NULL until configured or a ban is set */
  struct im_shared *shared; /* shared.c: limits shared with other engines, or NULL */
  unsigned shared_slot;      /* shared.c: where this engine counts in the users' records */
  im_stats st;
};

/* allocation through the configured hooks */
static inline void *im_alloc(im_server *s, size_t n) { return s->alloc.malloc(n, s->alloc.ud); }
static inline void *im_zalloc(im_server *s, size_t n) { return s->alloc.calloc(1, n, s->alloc.ud); }
static inline void *im_realloc(im_server *s, void *p, size_t n) {
  return s->alloc.realloc(p, n, s->alloc.ud);
}
static inline void im_dealloc(im_server *s, void *p) { s->alloc.free(p, s->alloc.ud); }

/* buf.c */
im_buf *buf_new(im_server *s, size_t len);
static inline im_buf *buf_ref(im_buf *b) { b->refs++; return b; }
void buf_unref(im_server *s, im_buf *b);
/* Append b (a new reference is taken) to c's output. Returns 0, or
 * IM_ENOMEM. Does not check bounds or notify. */
int outq_push(im_server *s, im_conn *c, im_buf *b);
/* Drop queued output; a partially written head buffer is kept when
 * keep_partial (its remaining bytes are needed to keep the stream framed). */
void outq_clear(im_server *s, im_conn *c, bool keep_partial);
void outq_pool_free(im_server *s);
/* Fill up to max iovecs with c's queued output, in order; returns how many. */
int outq_iov(const im_conn *c, struct iovec *iov, int max);
/* Advance c's output by n written bytes; true when it is now empty. */
bool outq_consume(im_server *s, im_conn *c, size_t n);
/* Append n bytes to *bp, allocating it (first_cap bytes) or doubling it as
 * needed, never beyond max_cap when that is not 0 (the caller has bounded
 * the total). Returns false when memory ran out (*bp unchanged). */
bool bytes_append(im_server *s, im_bytes **bp, const uint8_t *p, size_t n, size_t first_cap,
                  size_t max_cap);
/* Frame an encoded packet for a wire format into a new buffer (refs = 1). */
im_buf *frame_packet(im_server *s, enum wire_kind w, const imp_packet *pkt);
/* Frame raw bytes as one WebSocket frame of the given opcode. */
im_buf *frame_ws(im_server *s, uint8_t opcode, const void *payload, size_t len);

/* Engine time in ticks, and a duration in whole ticks (rounded up). */
static inline uint64_t now_tick(const im_server *s) { return s->now_ms / s->cfg.tick_ms; }
static inline uint64_t ms_to_ticks(const im_server *s, uint64_t ms) {
  return (ms + s->cfg.tick_ms - 1) / s->cfg.tick_ms;
}

/* Longest uid and room name a client may use (bytes). */
#define UID_MAX 128u
#define ROOM_MAX 128u

/* server.c: every public entry point runs between srv_enter and srv_leave;
 * connections closed inside are released (rel_undelivered, on_close, then
 * freed) only when the outermost call returns, so no callback ever sees
 * its connection's memory disappear under it. */
void srv_enter(im_server *s);
void srv_leave(im_server *s);
/* Copy a packet string field into s->fields as a C string (valid until the
 * next packet); NULL if absent. *used: bytes of s->fields taken so far. */
const char *srv_field(im_server *s, const imp_packet *p, unsigned key, size_t *used);

/* guard.c: admission at accept (true: admit), its undo at release, and
 * the sweep of idle sources (each tick) */
bool guard_admit(im_server *s, const char *peer);
void guard_release(im_server *s, const char *peer);
void guard_tick(im_server *s);
void guard_free(im_server *s);
/* shared.c attaches s to an im_shared whose guard is sg: s's guard is
 * merged into sg and dropped, and s uses sg from now on. guard_new_shared
 * makes an im_shared's guard (C library memory; NULL when out of it),
 * guard_destroy frees it. */
void guard_share(im_server *s, struct im_guard *sg);
struct im_guard *guard_new_shared(void);
void guard_destroy(struct im_guard *g);
/* An address range of im_guard_kick / im_guard_ban. */
typedef struct guard_range {
  uint8_t ip[16];
  uint8_t bits;            /* prefix length over the 16-byte (v4-mapped) form */
  uint64_t until;          /* engine ms; 0 = forever (blacklist entries) */
} guard_range;
/* Parse "addr" or "addr/bits" into r; false when it is not one. */
bool guard_range_parse(const char *cidr, guard_range *r);
/* Is the connection peer "addr:port" inside r? */
bool guard_peer_in(const char *peer, const guard_range *r);

/* registry.c */
int reg_user_add(im_server *s, im_conn *c, const char *uid, size_t len);
void reg_user_del(im_server *s, im_conn *c);
im_user *reg_user_find(const im_server *s, const char *uid, size_t len);
/* Returns 0 (joined or already a member), IM_ELIMIT (c is in max_rooms
 * rooms already) or IM_ENOMEM. */
int reg_room_join(im_server *s, im_conn *c, const char *room, size_t len);
/* Returns 1 if c was a member and left, 0 if it was not. */
int reg_room_leave(im_server *s, im_conn *c, const char *room, size_t len);
void reg_room_leave_all(im_server *s, im_conn *c);
im_room *reg_room_find(const im_server *s, const char *room, size_t len);
/* A fan-out walks r->m from index 0 while sending may remove members (a
 * shed connection leaves its rooms: the last member moves into its slot;
 * see fanout.c): between begin and end r stays allocated even when its
 * last member leaves, and is released (router told) at end. */
static inline void reg_room_walk_begin(im_room *r) { r->walks++; }
void reg_room_walk_end(im_server *s, im_room *r);

#endif
