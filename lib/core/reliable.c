/* Reliable delivery on one connection: the in-flight window of unACKed
 * downstream messages with retransmission. It sends through the connection
 * API (conn.h). The state also holds the upstream cid window (dedupe.c).
 *
 * In-flight entries are kept in the order they were (re)sent. Every entry
 * waits the same ack_timeout, so that order is also deadline order and one
 * timer per connection (due of the head) is enough: O(1) per send, O(1) per
 * in-order ACK, O(window) worst case for an ACK out of order. */
#include <string.h>

#include "core/conn.h"
#include "core/reliable.h"

im_rel *rel_get(im_server *s, im_conn *c) {
  if (c->rel) return c->rel;
  im_rel *r = im_zalloc(s, sizeof(*r));
  if (!r) return NULL;
  tw_entry_init(&r->timer);
  r->conn = c;
  c->rel = r;
  return r;
}

/* Now for im_ack_rtt_us: the application's clock, else engine time. */
static uint64_t rel_stamp_us(const im_server *s) {
  return s->clock_us ? s->clock_us(s->clock_ud) : s->now_ms * 1000u;
}

void im_server_set_clock(im_server *s, uint64_t (*now_us)(void *ud), void *ud) {
  s->clock_us = now_us;
  s->clock_ud = ud;
}

int64_t im_ack_rtt_us(const im_server *s) { return s->ack_rtt ? *s->ack_rtt : -1; }

static rel_entry *entry_new(im_server *s, im_buf *b, const char *id, size_t idlen, uint64_t seq) {
  if (idlen >= IM_ID_MAX) idlen = IM_ID_MAX - 1;
  rel_entry *e = im_alloc(s, sizeof(*e));
  if (!e) return NULL;
  e->next = NULL;
  e->buf = buf_ref(b);
  e->seq = seq;
  e->due = 0;
  e->tries = 0;
  e->queued_us = rel_stamp_us(s);
  memcpy(e->id, id, idlen);
  e->id[idlen] = '\0';
  return e;
}

static void entry_free(im_server *s, rel_entry *e) {
  buf_unref(s, e->buf);
  im_dealloc(s, e);
}

static void arm(im_server *s, im_rel *r) {
  if (r->head)
    tw_schedule(&s->ack_wheel, &r->timer, r->head->due);
  else
    tw_cancel(&s->ack_wheel, &r->timer);
}

/* (Re)send e and append it to the in-flight list. */
static int transmit(im_server *s, im_rel *r, rel_entry *e) {
  e->tries++;
  /* +1: now_tick is rounded down, so a deadline is never early */
  e->due = now_tick(s) + s->ack_ticks + 1;
  e->next = NULL;
  if (r->tail)
    r->tail->next = e;
  else
    r->head = e;
  r->tail = e;
  r->inflight++;
  return conn_queue(s, r->conn, e->buf);
}

int rel_send(im_server *s, im_conn *c, im_buf *b, const char *id, size_t idlen, uint64_t seq) {
  im_rel *r = rel_get(s, c);
  rel_entry *e = r ? entry_new(s, b, id, idlen, seq) : NULL;
  if (!e) return IM_ENOMEM;
  s->st.inflight++;
  if (r->inflight < s->cfg.max_inflight) {
    bool was_idle = r->head == NULL;
    int rc = transmit(s, r, e);
    if (was_idle && r->head) arm(s, r);
    return rc;
  }
  /* window full: hold it in order; its bytes count like queued output */
  if (conn_over_bound(s, c, b->len)) {
    entry_free(s, e);
    s->st.inflight--;
    conn_shed(s, c);
    return IM_EFULL;
  }
  if (r->wait_tail)
    r->wait_tail->next = e;
  else
    r->wait_head = e;
  r->wait_tail = e;
  r->waiting++;
  r->wait_bytes += b->len;
  return 0;
}

bool rel_ack(im_server *s, im_conn *c, const char *id, size_t idlen, uint64_t *seq,
             int64_t *rtt_us) {
  im_rel *r = c->rel;
  if (!r || idlen >= IM_ID_MAX) return false;
  rel_entry *prev = NULL, *e = r->head;
  while (e && !(strncmp(e->id, id, idlen) == 0 && e->id[idlen] == '\0')) {
    prev = e;
    e = e->next;
  }
  if (!e) return false;
  *seq = e->seq;
  uint64_t now = rel_stamp_us(s);
  *rtt_us = now > e->queued_us ? (int64_t)(now - e->queued_us) : 0;
  if (prev)
    prev->next = e->next;
  else
    r->head = e->next;
  if (r->tail == e) r->tail = prev;
  r->inflight--;
  s->st.inflight--;
  entry_free(s, e);
  /* the window has room again: send what waits, in order */
  while (c->state == CS_OPEN && r->wait_head && r->inflight < s->cfg.max_inflight) {
    rel_entry *w = r->wait_head;
    r->wait_head = w->next;
    if (!r->wait_head) r->wait_tail = NULL;
    r->waiting--;
    r->wait_bytes -= w->buf->len;
    if (transmit(s, r, w) < 0) break; /* shed: the rest is reported undelivered */
  }
  arm(s, r);
  return true;
}

void rel_on_timer(tw_entry *te, void *arg) {
  im_server *s = arg;
  im_rel *r = (im_rel *)((char *)te - offsetof(im_rel, timer));
  im_conn *c = r->conn;
  if (c->state != CS_OPEN) return; /* closing: what is unACKed gets reported */
  uint64_t now = now_tick(s);
  while (r->head && r->head->due <= now) {
    rel_entry *e = r->head;
    if (e->tries > s->cfg.ack_retries) {
      s->st.ack_timeouts++;
      conn_close(s, c, IM_CLOSE_ACK_TIMEOUT, "ack timeout", false);
      return;
    }
    r->head = e->next;
    if (!r->head) r->tail = NULL;
    r->inflight--;
    s->st.retransmits++;
    /* shed: c is closing and what is unACKed gets reported; a failed
     * allocation leaves e in flight, to be resent at its next deadline */
    if (transmit(s, r, e) < 0 && c->state != CS_OPEN) return;
  }
  arm(s, r);
}

static void report(im_server *s, im_conn *c, rel_entry *e) {
  for (; e; e = e->next) {
    s->st.undelivered++;
    if (s->cb.on_undelivered) s->cb.on_undelivered(s, c->id, e->id, e->seq, s->user);
  }
}

void rel_undelivered(im_server *s, im_conn *c) {
  if (!c->rel) return;
  report(s, c, c->rel->head);
  report(s, c, c->rel->wait_head);
}

static void free_list(im_server *s, rel_entry *e) {
  while (e) {
    rel_entry *n = e->next;
    s->st.inflight--;
    entry_free(s, e);
    e = n;
  }
}

void rel_free(im_server *s, im_conn *c) {
  im_rel *r = c->rel;
  if (!r) return;
  tw_cancel(&s->ack_wheel, &r->timer);
  free_list(s, r->head);
  free_list(s, r->wait_head);
  im_dealloc(s, r->dd);
  im_dealloc(s, r);
  c->rel = NULL;
}
