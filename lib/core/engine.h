/* Internal structures of the engine, shared by the lib/core files. */
#ifndef IM_CORE_ENGINE_H
#define IM_CORE_ENGINE_H

#include <libim/im.h>
#include <libim/im_router.h>
#include <stdbool.h>

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

/* One queued buffer on a connection's output. */
typedef struct outq_node {
  struct outq_node *next;
  im_buf *buf;
  uint32_t off;   /* bytes of buf already written */
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

typedef struct im_conn {
  im_conn_id id;
  void *io_ctx;
  void *data;
  uint8_t state;
  uint8_t transport;
  uint8_t binary;          /* replies in binary IMP */
  uint8_t frag_op;         /* opcode of the WebSocket message being assembled, 0 = none */
  uint16_t flags;
  uint16_t close_code;
  uint32_t utf8;           /* UTF-8 validator state across text fragments */
  uint32_t last_rx;        /* engine tick of the last read */
  uint32_t push_tokens;    /* max_push_rate bucket, in thousandths of a message */
  uint32_t push_at;        /* engine ms (low 32 bits) of its last refill */
  uint8_t *in;             /* partial frame carried between feeds (NULL when none) */
  uint32_t in_len, in_cap;
  uint8_t *msg;            /* fragmented message being assembled */
  uint32_t msg_len, msg_cap;
  ws_handshake *hs;
  outq_node *out_head, *out_tail;
  uint32_t out_bytes;
  tw_entry timer;
  im_user *user;
  struct im_conn *u_next, *u_prev;
  room_member *rooms;
  char *ident;             /* "uid\0device\0platform\0": parked while auth is pending,
                              then kept (valid in on_close too) */
  uint64_t since_ms;
  uint64_t sync_since;     /* since of the auth op (CF_SYNC_ON_OPEN) */
  im_rel *rel;             /* reliable-delivery state, allocated on first use */
  char peer[56];   /* "[v6-mapped address]:port" fits */
  uint32_t hs_fed;         /* bytes of the upgrade request read (max_preauth_input) */
  uint64_t expire_tick;    /* im_conn_set_expiry deadline (engine tick), 0 = none */
  uint64_t rate_tat;       /* max_msg_rate: GCRA theoretical arrival time, engine us */
  uint64_t strike_ms;      /* start of the current 10 s strike window (engine ms) */
  uint32_t strikes;        /* msgs refused in that window */
} im_conn;

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

struct im_rel {
  tw_entry timer;          /* on im_server.ack_wheel: due of `head` */
  im_conn *conn;
  rel_entry *head, *tail;  /* sent and unACKed, in due order */
  rel_entry *wait_head, *wait_tail; /* beyond max_inflight, not sent yet */
  uint32_t inflight, waiting;
  uint64_t wait_bytes;
  dd_entry *dd;            /* dedupe_window entries, or NULL */
  uint32_t dd_next;        /* slot the next cid takes (oldest) */
};

struct im_user {
  strmap_node node;
  im_conn *conns;
  uint32_t nconns;
  uint64_t rate_tat;       /* max_user_msg_rate: GCRA theoretical arrival time, engine us */
  char uid[];
};

typedef struct im_room {
  strmap_node node;
  room_member *members;
  uint32_t n;
  char name[];
} im_room;

struct room_member {
  im_room *room;
  im_conn *conn;
  room_member *r_next, *r_prev;  /* in the room */
  room_member *c_next;           /* in the connection's list */
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
  outq_node *node_pool;    /* free outq nodes */
  uint32_t pool_len;
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
/* Advance c's output by n written bytes; true when it is now empty. */
bool outq_consume(im_server *s, im_conn *c, size_t n);
/* Frame an encoded packet for a wire format into a new buffer (refs = 1). */
im_buf *frame_packet(im_server *s, enum wire_kind w, const imp_packet *pkt);
/* Frame raw bytes as one WebSocket frame of the given opcode. */
im_buf *frame_ws(im_server *s, uint8_t opcode, const void *payload, size_t len);

/* server.c */
im_conn *conn_lookup(const im_server *s, im_conn_id id);
/* Queue b on c (a new reference), notify the driver, shed over the bound.
 * Returns 0, IM_ECLOSED, IM_EFULL (c was shed), IM_ENOMEM. */
int conn_queue(im_server *s, im_conn *c, im_buf *b);
/* Would len more bytes take c's queued and held output over max_output? */
bool conn_over_bound(const im_server *s, const im_conn *c, size_t len);
/* Start closing c (see server.c). */
void conn_close(im_server *s, im_conn *c, int code, const char *reason, bool wait_peer);
void conn_shed(im_server *s, im_conn *c);
uint64_t now_tick(const im_server *s);

/* reliable.c */
/* Send b on c as reliable message id/seq: queued now when the window has
 * room, else held in order. Returns 0, IM_EFULL (c was shed), IM_ENOMEM,
 * IM_ECLOSED. */
int rel_send(im_server *s, im_conn *c, im_buf *b, const char *id, size_t idlen, uint64_t seq);
/* The client ACKed id: forget it and send what waits. Returns true when it
 * was in flight, with its seq in *seq and the microseconds since it was
 * queued in *rtt_us. */
bool rel_ack(im_server *s, im_conn *c, const char *id, size_t idlen, uint64_t *seq,
             int64_t *rtt_us);
/* Retransmit timer (tw_advance callback on ack_wheel). */
void rel_on_timer(tw_entry *e, void *arg);
/* Report c's unACKed messages to on_undelivered (c is being released). */
void rel_undelivered(im_server *s, im_conn *c);
/* Stop timers and free everything reliable about c. */
void rel_free(im_server *s, im_conn *c);
/* The de-duplication slot of cid on c, or NULL. */
dd_entry *dd_find(const im_server *s, const im_conn *c, const char *cid, size_t n);
/* Remember cid as pending (evicting the oldest). NULL when the window is
 * off or memory ran out (the message is then processed undeduplicated). */
dd_entry *dd_add(im_server *s, im_conn *c, const char *cid, size_t n);

/* guard.c: admission at accept (true: admit), its undo at release, and
 * the sweep of idle sources (each tick) */
bool guard_admit(im_server *s, const char *peer);
void guard_release(im_server *s, const char *peer);
void guard_tick(im_server *s);
void guard_free(im_server *s);

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

#endif
