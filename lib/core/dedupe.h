/* The upstream de-duplication window (dedupe.c): the last dedupe_window
 * cids a connection sent, so a client retransmit is answered like the
 * original and delivered once. */
#ifndef IM_CORE_DEDUPE_H
#define IM_CORE_DEDUPE_H

#include "core/engine.h"

/* The de-duplication slot of cid on c, or NULL. */
dd_entry *dd_find(const im_server *s, const im_conn *c, const char *cid, size_t n);
/* Remember cid as pending (evicting the oldest). NULL when the window is
 * off or memory ran out (the message is then processed undeduplicated). */
dd_entry *dd_add(im_server *s, im_conn *c, const char *cid, size_t n);
/* The message of dd was accepted as id/seq: a retransmit gets this ack. */
void dd_acked(dd_entry *dd, const char *id, uint64_t seq);

#endif
