/* Ref-counted frame buffers and per-connection output queues. */
#include <string.h>

#include "core/engine.h"
#include "proto/tcp_frame.h"
#include "proto/ws_frame.h"

/* Queue nodes are recycled: a busy server queues and drains thousands per
 * second, and the pool keeps that off the allocator. */
#define NODE_POOL_MAX 4096u

im_buf *buf_new(im_server *s, size_t len) {
  if (len > UINT32_MAX - sizeof(im_buf)) return NULL;
  im_buf *b = im_alloc(s, sizeof(im_buf) + len);
  if (!b) return NULL;
  b->refs = 1;
  b->len = (uint32_t)len;
  return b;
}

void buf_unref(im_server *s, im_buf *b) {
  if (b && --b->refs == 0) im_dealloc(s, b);
}

int outq_push(im_server *s, im_conn *c, im_buf *b) {
  outq_node *n = s->node_pool;
  if (n) {
    s->node_pool = n->next;
    s->pool_len--;
  } else if (!(n = im_alloc(s, sizeof(*n)))) {
    return IM_ENOMEM;
  }
  n->next = NULL;
  n->buf = buf_ref(b);
  n->off = 0;
  if (c->out_tail)
    c->out_tail->next = n;
  else
    c->out_head = n;
  c->out_tail = n;
  c->out_bytes += b->len;
  s->st.out_queued += b->len;
  s->st.bytes_out += b->len;
  return 0;
}

static void node_release(im_server *s, outq_node *n) {
  buf_unref(s, n->buf);
  if (s->pool_len < NODE_POOL_MAX) {
    n->next = s->node_pool;
    s->node_pool = n;
    s->pool_len++;
  } else {
    im_dealloc(s, n);
  }
}

void outq_clear(im_server *s, im_conn *c, bool keep_partial) {
  outq_node *n = c->out_head, *keep = NULL;
  if (keep_partial && n && n->off > 0) {
    keep = n;
    n = n->next;
    keep->next = NULL;
  }
  while (n) {
    outq_node *next = n->next;
    c->out_bytes -= n->buf->len - n->off;
    s->st.out_queued -= n->buf->len - n->off;
    node_release(s, n);
    n = next;
  }
  c->out_head = c->out_tail = keep;
}

void outq_pool_free(im_server *s) {
  while (s->node_pool) {
    outq_node *n = s->node_pool;
    s->node_pool = n->next;
    im_dealloc(s, n);
  }
  s->pool_len = 0;
}

/* Advance the queue by n written bytes; returns true when it is now empty. */
bool outq_consume(im_server *s, im_conn *c, size_t n) {
  while (n > 0 && c->out_head) {
    outq_node *h = c->out_head;
    size_t left = h->buf->len - h->off;
    size_t take = n < left ? n : left;
    h->off += (uint32_t)take;
    c->out_bytes -= (uint32_t)take;
    s->st.out_queued -= take;
    n -= take;
    if (h->off == h->buf->len) {
      c->out_head = h->next;
      if (!c->out_head) c->out_tail = NULL;
      node_release(s, h);
    }
  }
  return c->out_head == NULL;
}

im_buf *frame_ws(im_server *s, uint8_t opcode, const void *payload, size_t len) {
  uint8_t hdr[10];
  size_t hl = ws_frame_encode_header(hdr, opcode, true, len);
  im_buf *b = buf_new(s, hl + len);
  if (!b) return NULL;
  memcpy(b->data, hdr, hl);
  if (len) memcpy(b->data + hl, payload, len);
  return b;
}

im_buf *frame_packet(im_server *s, enum wire_kind w, const imp_packet *pkt) {
  size_t plen = w == WIRE_WS_TEXT ? imp_json_encode(pkt, NULL, 0) : imp_bin_encode(pkt, NULL, 0);
  uint8_t hdr[10];
  size_t hl;
  if (w == WIRE_TCP) {
    tcp_frame_encode_header(hdr, (uint32_t)plen);
    hl = TCP_FRAME_HDR;
  } else {
    hl = ws_frame_encode_header(hdr, w == WIRE_WS_TEXT ? WS_OP_TEXT : WS_OP_BINARY, true, plen);
  }
  im_buf *b = buf_new(s, hl + plen);
  if (!b) return NULL;
  memcpy(b->data, hdr, hl);
  if (w == WIRE_WS_TEXT)
    imp_json_encode(pkt, (char *)b->data + hl, plen);
  else
    imp_bin_encode(pkt, b->data + hl, plen);
  return b;
}
