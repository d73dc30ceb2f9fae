/* Reliable downstream delivery on one connection (reliable.c): the
 * in-flight window of unACKed messages with retransmission. */
#ifndef IM_CORE_RELIABLE_H
#define IM_CORE_RELIABLE_H

#include "core/engine.h"

/* c's reliable state, allocated on first use; NULL when out of memory. */
im_rel *rel_get(im_server *s, im_conn *c);
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
/* Stop timers and free everything reliable about c (the de-duplication
 * window included). */
void rel_free(im_server *s, im_conn *c);

#endif
