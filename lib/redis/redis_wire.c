/* Node-to-node records (redis_wire.h). */
#include "redis/redis_wire.h"

#include <stdlib.h>
#include <string.h>

void rbuf_free(rbuf *b) {
  free(b->p);
  memset(b, 0, sizeof *b);
}

static int reserve(rbuf *b, size_t more) {
  if (b->len + more <= b->cap) return 0;
  size_t cap = b->cap ? b->cap : 256;
  while (cap < b->len + more) cap *= 2;
  uint8_t *p = realloc(b->p, cap);
  if (!p) return -1;
  b->p = p;
  b->cap = cap;
  return 0;
}

static void put_u32(uint8_t **at, uint32_t v) {
  for (int i = 0; i < 4; i++) *(*at)++ = (uint8_t)(v >> (8 * i));
}

static void put_u64(uint8_t **at, uint64_t v) {
  for (int i = 0; i < 8; i++) *(*at)++ = (uint8_t)(v >> (8 * i));
}

static size_t str_size(const char *s) { return 4 + (s ? strlen(s) + 1 : 0); }

static void put_str(uint8_t **at, const char *s) {
  if (!s) {
    put_u32(at, 0);
    return;
  }
  size_t n = strlen(s) + 1;
  put_u32(at, (uint32_t)n);
  memcpy(*at, s, n);
  *at += n;
}

int rwire_put_msg_head(rbuf *b, int kind, const im_msg *m) {
  size_t need = 1 + 4 + 8 + 8 + str_size(m->id) + str_size(m->from) + str_size(m->to) +
                str_size(m->group) + str_size(m->room) + 4 + m->data_len + 1;
  if (reserve(b, need) < 0) return -1;
  uint8_t *at = b->p + b->len;
  *at++ = (uint8_t)kind;
  put_u32(&at, m->flags);
  put_u64(&at, m->seq);
  put_u64(&at, m->ts);
  put_str(&at, m->id);
  put_str(&at, m->from);
  put_str(&at, m->to);
  put_str(&at, m->group);
  put_str(&at, m->room);
  put_u32(&at, (uint32_t)m->data_len);
  if (m->data_len) memcpy(at, m->data, m->data_len);
  at += m->data_len;
  *at++ = 0;
  b->len = (size_t)(at - b->p);
  return 0;
}

int rwire_put_kick_head(rbuf *b, int code, const char *reason) {
  if (reserve(b, 1 + 4 + str_size(reason)) < 0) return -1;
  uint8_t *at = b->p + b->len;
  *at++ = RWIRE_KICK;
  put_u32(&at, (uint32_t)code);
  put_str(&at, reason);
  b->len = (size_t)(at - b->p);
  return 0;
}

int rwire_put_bytes(rbuf *b, const void *p, size_t n) {
  if (n == 0) return 0; /* p may be NULL (an empty buffer): memcpy must not see it */
  if (reserve(b, n) < 0) return -1;
  memcpy(b->p + b->len, p, n);
  b->len += n;
  return 0;
}

int rwire_put_uids(rbuf *b, const char *const *uids, size_t n) {
  size_t need = 4;
  for (size_t i = 0; i < n; i++) need += str_size(uids[i]);
  if (reserve(b, need) < 0) return -1;
  uint8_t *at = b->p + b->len;
  put_u32(&at, (uint32_t)n);
  for (size_t i = 0; i < n; i++) put_str(&at, uids[i]);
  b->len = (size_t)(at - b->p);
  return 0;
}

/* ---- decoding ---- */

typedef struct rd {
  const uint8_t *p, *end;
  int bad;
} rd;

static uint64_t get_n(rd *r, int bytes) {
  if (r->end - r->p < bytes) {
    r->bad = 1;
    return 0;
  }
  uint64_t v = 0;
  for (int i = 0; i < bytes; i++) v |= (uint64_t)r->p[i] << (8 * i);
  r->p += bytes;
  return v;
}

static const char *get_str(rd *r) {
  uint32_t n = (uint32_t)get_n(r, 4);
  if (r->bad || n == 0) return NULL;
  if ((size_t)(r->end - r->p) < n || r->p[n - 1] != 0) {
    r->bad = 1;
    return NULL;
  }
  const char *s = (const char *)r->p;
  r->p += n;
  return s;
}

static void skip_uids(rd *r, uint32_t n) {
  for (uint32_t i = 0; i < n && !r->bad; i++)
    if (!get_str(r)) r->bad = 1;
}

int rwire_next(const uint8_t **p, const uint8_t *end, rwire_rec *out) {
  if (*p >= end) return 0;
  rd r = {*p, end, 0};
  memset(out, 0, sizeof *out);
  out->kind = (int)get_n(&r, 1);
  if (out->kind == RWIRE_MSG || out->kind == RWIRE_ROOM) {
    out->m.flags = (unsigned)get_n(&r, 4);
    out->m.seq = get_n(&r, 8);
    out->m.ts = get_n(&r, 8);
    out->m.id = get_str(&r);
    out->m.from = get_str(&r);
    out->m.to = get_str(&r);
    out->m.group = get_str(&r);
    out->m.room = get_str(&r);
    uint32_t dl = (uint32_t)get_n(&r, 4);
    if (!r.bad && (size_t)(r.end - r.p) < (size_t)dl + 1) r.bad = 1;
    if (!r.bad) {
      out->m.data = (const char *)r.p;
      out->m.data_len = dl;
      r.p += dl + 1;
    }
  } else if (out->kind == RWIRE_KICK) {
    out->code = (int)get_n(&r, 4);
    out->reason = get_str(&r);
  } else {
    return -1;
  }
  out->n = (uint32_t)get_n(&r, 4);
  out->uids = r.p;
  skip_uids(&r, out->n);
  if (r.bad || (out->kind != RWIRE_KICK && !out->m.id)) return -1;
  *p = r.p;
  return 1;
}

const char *rwire_uid(const uint8_t **at) {
  uint32_t n = (uint32_t)((*at)[0] | (*at)[1] << 8 | (*at)[2] << 16 | (uint32_t)(*at)[3] << 24);
  const char *s = (const char *)(*at + 4);
  *at += 4 + n;
  return s;
}
