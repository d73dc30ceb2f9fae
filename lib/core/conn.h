/* The connection API of the engine's inner modules (reliable.c, auth.c,
 * dispatch.c, the input parsers, fan-out and server.c): finding a
 * connection by id, queueing output on it with the max_output bound, and
 * closing it. Implemented in conn.c, which calls none of its users. */
#ifndef IM_CORE_CONN_H
#define IM_CORE_CONN_H

#include "core/engine.h"

/* ---- the table: id = gen << 32 | (slot + 1) ---- */

/* The connection of id (closed or not), or NULL. */
im_conn *conn_lookup(const im_server *s, im_conn_id id);
/* A live connection: known and not yet released; else NULL. */
im_conn *conn_live(const im_server *s, im_conn_id id);
/* Give c a slot and an id. Returns 0 or IM_ENOMEM. */
int conn_attach(im_server *s, im_conn *c);
/* Free c's slot (c is being freed). */
void conn_detach(im_server *s, im_conn *c);

/* ---- output ---- */

/* The wire format c's packets are framed in. */
static inline enum wire_kind conn_wire(const im_conn *c) {
  if (c->transport == IM_TRANSPORT_TCP) return WIRE_TCP;
  return c->binary ? WIRE_WS_BIN : WIRE_WS_TEXT;
}
/* Would len more bytes take c's queued and held output over max_output? */
bool conn_over_bound(const im_server *s, const im_conn *c, size_t len);
/* Queue b on c (a new reference), notify the driver, shed over the bound.
 * Returns 0, IM_ECLOSED, IM_EFULL (c was shed), IM_ENOMEM. */
int conn_queue(im_server *s, im_conn *c, im_buf *b);
/* conn_queue for a new buffer (refs 1, or NULL: IM_ENOMEM), dropping the
 * caller's reference. */
int conn_queue_new(im_server *s, im_conn *c, im_buf *b);
/* Frame p for c's wire and queue it. Returns like conn_queue. */
int conn_send_packet(im_server *s, im_conn *c, const imp_packet *p);
/* Queue an IMP error op (code, reason, the cid of the op it answers or
 * NULL). Returns like conn_queue. */
int conn_send_error(im_server *s, im_conn *c, int code, const char *reason, const imp_str *cid);

/* ---- closing ---- */

/* Start closing c with code. For WebSocket a close frame is queued; for TCP
 * an IMP error op. When `wait_peer`, a WebSocket waits (close_timeout) for
 * the peer's close frame; otherwise the transport closes once flushed. */
void conn_close(im_server *s, im_conn *c, int code, const char *reason, bool wait_peer);
/* A protocol error by the peer: counted, and c closes with code. */
void conn_proto_fail(im_server *s, im_conn *c, int code, const char *reason);
/* A slow reader hit max_output: drop what is queued (keeping a partially
 * written frame so the stream stays well-formed) and close. */
void conn_shed(im_server *s, im_conn *c);
/* Output is flushed on a closing connection: have the driver close it. */
void conn_finish(im_server *s, im_conn *c);
/* Mark c closed: unregister now (it must not receive more sends) and queue
 * its release on s->dead (srv_leave frees it). */
void conn_release(im_server *s, im_conn *c);

/* ---- timers ---- */

/* Schedule an open connection's timer at `due` (its idle deadline; 0 =
 * none), or at its expiry deadline when that comes first. */
void conn_timer_at(im_server *s, im_conn *c, uint64_t due);
/* The preauth input limit for c in its current state (0: none). */
static inline uint32_t conn_preauth_limit(const im_server *s, const im_conn *c) {
  return c->state < CS_OPEN ? s->cfg.max_preauth_input : 0;
}

#endif
