/* Ref-counted frame buffers, per-connection output queues and the byte
 * buffers a connection holds input in. */
#include <string.h>
#include <sys/uio.h>

#include "core/engine.h"
#include "proto/tcp_frame.h"
#include "proto/ws_frame.h"

/* A connection's output queue is a list of nodes of OUTQ_CHUNK buffers
 * each (one cache line), so that a connection with many frames queued (a
 * busy room: several messages per loop pass) is read and written a line
 * per OUTQ_CHUNK frames, not one per frame. Nodes come from slabs of
 * NODE_SLAB and go back to a free list: a room message to 10,000 members
 * takes up to 10,000 nodes and gives them back when written, with no
 * allocator call per delivery. The slabs stay until
 * the server is freed (the high-water mark of queued frames, each bounded
 * by max_output). */
#define NODE_SLAB 256u

/* A slab: this header, then NODE_SLAB nodes from the next 64-byte
 * boundary (a node is one cache line, not two halves). */
typedef struct node_slab {
  struct node_slab *next;
} node_slab;

static outq_node *node_get(im_server *s) {
  outq_node *n = s->node_pool;
  if (!n) {
    node_slab *sl = im_alloc(s, sizeof *sl + 64 + NODE_SLAB * sizeof(outq_node));
    if (!sl) return NULL;
    sl->next = s->node_slabs;
    s->node_slabs = sl;
    uintptr_t at = ((uintptr_t)(sl + 1) + 63) & ~(uintptr_t)63;
    outq_node *nodes = (outq_node *)at;
    for (uint32_t i = NODE_SLAB; i-- > 1;) {
      nodes[i].next = s->node_pool;
      s->node_pool = &nodes[i];
    }
    n = &nodes[0];
  } else {
    s->node_pool = n->next;
  }
  return n;
}

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
  outq_node *t = c->out_tail;
  if (!t || t->tail == OUTQ_CHUNK) {
    outq_node *n = node_get(s);
    if (!n) return IM_ENOMEM;
    n->next = NULL;
    n->off = 0;
    n->head = n->tail = 0;
    if (t)
      t->next = n;
    else
      c->out_head = n;
    c->out_tail = t = n;
  }
  t->b[t->tail++] = buf_ref(b);
  c->out_bytes += b->len;
  s->st.out_queued += b->len;
  s->st.bytes_out += b->len;
  return 0;
}

static void node_release(im_server *s, outq_node *n) {
  for (uint32_t i = n->head; i < n->tail; i++) buf_unref(s, n->b[i]);
  n->next = s->node_pool;
  s->node_pool = n;
}

void outq_clear(im_server *s, im_conn *c, bool keep_partial) {
  outq_node *h = c->out_head;
  if (!h) return;
  uint32_t drop = c->out_bytes;
  if (keep_partial && h->off > 0) {
    /* keep the written part's buffer alone, drop the rest */
    drop -= h->b[h->head]->len - h->off;
    for (uint32_t i = h->head + 1u; i < h->tail; i++) buf_unref(s, h->b[i]);
    h->tail = (uint8_t)(h->head + 1u);
    for (outq_node *n = h->next, *next; n; n = next) {
      next = n->next;
      node_release(s, n);
    }
    h->next = NULL;
    c->out_tail = h;
  } else {
    for (outq_node *n = h, *next; n; n = next) {
      next = n->next;
      node_release(s, n);
    }
    c->out_head = c->out_tail = NULL;
  }
  c->out_bytes -= drop;
  s->st.out_queued -= drop;
}

void outq_pool_free(im_server *s) {
  while (s->node_slabs) {
    node_slab *sl = s->node_slabs;
    s->node_slabs = sl->next;
    im_dealloc(s, sl);
  }
  s->node_pool = NULL;
}

int outq_iov(const im_conn *c, struct iovec *iov, int max) {
  int k = 0;
  for (const outq_node *n = c->out_head; n && k < max; n = n->next)
    for (uint32_t i = n->head; i < n->tail && k < max; i++, k++) {
      uint32_t off = i == n->head ? n->off : 0;
      iov[k].iov_base = n->b[i]->data + off;
      iov[k].iov_len = n->b[i]->len - off;
    }
  return k;
}

bool outq_consume(im_server *s, im_conn *c, size_t n) {
  while (n > 0 && c->out_head) {
    outq_node *h = c->out_head;
    im_buf *b = h->b[h->head];
    size_t left = b->len - h->off;
    size_t take = n < left ? n : left;
    h->off += (uint32_t)take;
    c->out_bytes -= (uint32_t)take;
    s->st.out_queued -= take;
    n -= take;
    if (h->off == b->len) {
      buf_unref(s, b);
      h->off = 0;
      if (++h->head == h->tail) {
        c->out_head = h->next;
        if (!c->out_head) c->out_tail = NULL;
        node_release(s, h); /* head == tail: no buffer left in it */
      }
    }
  }
  return c->out_head == NULL;
}

bool bytes_append(im_server *s, im_bytes **bp, const uint8_t *p, size_t n, size_t first_cap,
                  size_t max_cap) {
  im_bytes *b = *bp;
  size_t len = bytes_len(b), need = len + n;
  if (need > (b ? b->cap : 0)) {
    size_t cap = b ? b->cap : first_cap;
    while (cap < need) cap *= 2;
    if (max_cap && cap > max_cap) cap = max_cap < need ? need : max_cap;
    if (cap > UINT32_MAX) return false;
    im_bytes *m = im_realloc(s, b, sizeof *m + cap);
    if (!m) return false;
    if (!b) m->aux = 0;
    m->len = (uint32_t)len;
    m->cap = (uint32_t)cap;
    *bp = b = m;
  }
  memcpy(b->data + len, p, n);
  b->len = (uint32_t)need;
  return true;
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

/* A packet is encoded once into a stack buffer when it fits there (most
 * do: acks, pushes of small messages), and only a larger one is encoded a
 * second time, into its buffer, after a pass that measures it. */
#define FRAME_STACK 1024

im_buf *frame_packet(im_server *s, enum wire_kind w, const imp_packet *pkt) {
  uint8_t tmp[FRAME_STACK];
  size_t plen = w == WIRE_WS_TEXT ? imp_json_encode(pkt, (char *)tmp, sizeof tmp)
                                  : imp_bin_encode(pkt, tmp, sizeof tmp);
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
  if (plen <= sizeof tmp)
    memcpy(b->data + hl, tmp, plen);
  else if (w == WIRE_WS_TEXT)
    imp_json_encode(pkt, (char *)b->data + hl, plen);
  else
    imp_bin_encode(pkt, b->data + hl, plen);
  return b;
}
