/* The upstream de-duplication window of a connection: the last
 * dedupe_window cids it sent (a ring, oldest replaced first), each pending
 * or with the ack it got, so a client retransmit is answered like the
 * original and not delivered twice. Kept in the connection's reliable state
 * (reliable.c allocates and frees it). */
#include <string.h>

#include "core/dedupe.h"
#include "core/reliable.h"

/* FNV-1a, 64 bits, never 0 (0 marks a free slot). A collision can only make
 * a connection drop its own message, and at 64 bits over a window of a few
 * dozen cids it is not a practical concern. */
static uint64_t cid_hash(const char *p, size_t n) {
  uint64_t h = 0xcbf29ce484222325ULL;
  for (size_t i = 0; i < n; i++) {
    h ^= (unsigned char)p[i];
    h *= 0x100000001b3ULL;
  }
  return h ? h : 1;
}

dd_entry *dd_find(const im_server *s, const im_conn *c, const char *cid, size_t n) {
  if (!c->rel || !c->rel->dd) return NULL;
  uint64_t h = cid_hash(cid, n);
  dd_entry *dd = c->rel->dd;
  for (uint32_t i = 0; i < s->cfg.dedupe_window; i++)
    if (dd[i].hash == h && dd[i].state != DD_FREE) return &dd[i];
  return NULL;
}

dd_entry *dd_add(im_server *s, im_conn *c, const char *cid, size_t n) {
  if (s->cfg.dedupe_window == 0) return NULL;
  im_rel *r = rel_get(s, c);
  if (!r) return NULL;
  if (!r->dd && !(r->dd = im_zalloc(s, s->cfg.dedupe_window * sizeof(dd_entry)))) return NULL;
  dd_entry *e = &r->dd[r->dd_next];
  r->dd_next = (r->dd_next + 1) % s->cfg.dedupe_window;
  e->hash = cid_hash(cid, n);
  e->state = DD_PENDING;
  e->seq = 0;
  e->id[0] = '\0';
  return e;
}

void dd_acked(dd_entry *dd, const char *id, uint64_t seq) {
  size_t n = strlen(id);
  if (n >= IM_ID_MAX) n = IM_ID_MAX - 1;
  memcpy(dd->id, id, n);
  dd->id[n] = '\0';
  dd->seq = seq;
  dd->state = DD_ACKED;
}
