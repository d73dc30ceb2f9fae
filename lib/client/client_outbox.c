/* The client's outbox: upstream messages in send order, kept (encoded)
 * until the server acknowledges their cid. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "client/client.h"

ob_entry *ob_push(outbox *o, const char *cid, uint8_t kind, const char *target, size_t tn,
                  const char *data, size_t dn) {
  ob_entry *e = malloc(sizeof *e + tn + dn + 2);
  if (!e)
    return NULL;
  memset(e, 0, sizeof *e);
  snprintf(e->cid, sizeof e->cid, "%s", cid);
  e->kind = kind;
  e->target_len = tn;
  e->data_len = dn;
  memcpy(e->bytes, target, tn);
  e->bytes[tn] = '\0';
  memcpy(e->bytes + tn + 1, data, dn);
  e->bytes[tn + 1 + dn] = '\0';
  if (o->tail)
    o->tail->next = e;
  else
    o->head = e;
  o->tail = e;
  o->count++;
  o->bytes += tn + dn;
  return e;
}

static bool cid_is(const ob_entry *e, const char *cid, size_t n) {
  return strlen(e->cid) == n && memcmp(e->cid, cid, n) == 0;
}

ob_entry *ob_find(outbox *o, const char *cid, size_t n) {
  for (ob_entry *e = o->head; e; e = e->next)
    if (cid_is(e, cid, n))
      return e;
  return NULL;
}

ob_entry *ob_take(outbox *o, const char *cid, size_t n) {
  ob_entry *prev = NULL;
  for (ob_entry *e = o->head; e; prev = e, e = e->next) {
    if (!cid_is(e, cid, n))
      continue;
    if (prev)
      prev->next = e->next;
    else
      o->head = e->next;
    if (o->tail == e)
      o->tail = prev;
    o->count--;
    o->bytes -= e->target_len + e->data_len;
    e->next = NULL;
    return e;
  }
  return NULL;
}

void ob_clear(outbox *o) {
  while (o->head) {
    ob_entry *e = o->head;
    o->head = e->next;
    free(e);
  }
  memset(o, 0, sizeof *o);
}

void ob_reset_sent(outbox *o) {
  for (ob_entry *e = o->head; e; e = e->next)
    e->sent = false;
}
