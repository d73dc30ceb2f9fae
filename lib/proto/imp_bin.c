/* IMP binary form: u8 op, then fields as u8 key | uvarint len | len bytes.
 * Decoded spans point into the input; nothing is copied. */
#include <string.h>

#include "proto/imp.h"
#include "proto/writer.h"
#include "proto/json_scan.h"
#include "proto/utf8.h"

/* LEB128, at most 5 bytes and at most UINT32_MAX; non-minimal forms are
 * accepted. Returns bytes consumed, or 0 when truncated or out of range. */
static size_t get_uvarint(const uint8_t *p, size_t avail, uint32_t *v) {
  uint64_t x = 0;
  for (size_t i = 0; i < 5 && i < avail; i++) {
    x |= (uint64_t)(p[i] & 0x7f) << (7 * i);
    if (!(p[i] & 0x80)) {
      if (x > UINT32_MAX)
        return 0;
      *v = (uint32_t)x;
      return i + 1;
    }
  }
  return 0;
}

static int check_field(imp_packet *out, unsigned key, const uint8_t *p, uint32_t n) {
  const char *s = (const char *)p;
  switch (imp_key_kind(key)) {
  case 'S':
    /* NUL is refused because callers hand these on as C strings. */
    if (n > 0 && memchr(s, 0, n) != NULL)
      return IMP_E_TYPE;
    if (utf8_validate(UTF8_ACCEPT, (const uint8_t *)s, n) != UTF8_ACCEPT)
      return IMP_E_UTF8;
    imp_set_str(out, key, s, n);
    return IMP_OK;
  case 'U': {
    if (n == 0 || n > 8)
      return IMP_E_TYPE;
    uint64_t x = 0;
    for (uint32_t i = 0; i < n; i++)
      x = (x << 8) | p[i];
    imp_set_num(out, key, x);
    return IMP_OK;
  }
  case 'B':
    if (n != 1 || p[0] > 1)
      return IMP_E_TYPE;
    imp_set_num(out, key, p[0]);
    return IMP_OK;
  default: { /* 'J': the span excludes surrounding whitespace, as in JSON */
    const char *end = s + n;
    json_tok v;
    const char *q = json_scan_value(json_scan_ws(s, end), end, &v);
    if (q == NULL || json_scan_ws(q, end) != end)
      return IMP_E_TYPE;
    imp_set_str(out, key, v.p, v.n);
    return IMP_OK;
  }
  }
}

int imp_bin_decode(const uint8_t *buf, size_t len, imp_packet *out) {
  memset(out, 0, sizeof *out);
  if (len == 0 || buf[0] == IMP_OP_NONE || buf[0] >= IMP_OP_MAX_)
    return IMP_E_OP;
  out->op = buf[0];
  size_t i = 1;
  while (i < len) {
    unsigned key = buf[i++];
    uint32_t n;
    size_t k = get_uvarint(buf + i, len - i, &n);
    if (k == 0)
      return IMP_E_SYNTAX;
    i += k;
    if (n > len - i)
      return IMP_E_SYNTAX;
    if (key != 0 && key < IMP_K_MAX_) {
      int e = check_field(out, key, buf + i, n);
      if (e != IMP_OK)
        return e;
    }
    i += n;
  }
  return IMP_OK;
}


/* key | uvarint len | payload */
static void put_field(writer *w, unsigned key, const void *p, uint32_t n) {
  uint8_t hdr[6];
  size_t k = 0;
  uint32_t rest = n;
  hdr[k++] = (uint8_t)key;
  do {
    hdr[k] = (uint8_t)(rest & 0x7f);
    rest >>= 7;
    if (rest != 0)
      hdr[k] |= 0x80;
    k++;
  } while (rest != 0);
  put(w, hdr, k);
  put(w, p, n);
}

size_t imp_bin_encode(const imp_packet *pkt, uint8_t *out, size_t cap) {
  if (pkt->op == IMP_OP_NONE || pkt->op >= IMP_OP_MAX_)
    return 0;
  writer w = {out, out ? cap : 0, 0};
  put(&w, &pkt->op, 1);
  for (unsigned k = 1; k < IMP_K_MAX_; k++) {
    if (!IMP_HAS(pkt, k))
      continue;
    uint64_t v = pkt->num[k];
    switch (imp_key_kind(k)) {
    case 'U': {
      uint8_t be[8];
      unsigned nb = 1;
      while (nb < 8 && (v >> (8 * nb)) != 0)
        nb++;
      for (unsigned i = 0; i < nb; i++)
        be[i] = (uint8_t)(v >> (8 * (nb - 1 - i)));
      put_field(&w, k, be, nb);
      break;
    }
    case 'B': {
      uint8_t b = v != 0;
      put_field(&w, k, &b, 1);
      break;
    }
    case 'J': /* empty means null, as in the JSON form */
      if (pkt->str[k].n == 0) {
        put_field(&w, k, "null", 4);
        break;
      }
      put_field(&w, k, pkt->str[k].p, pkt->str[k].n);
      break;
    default:
      put_field(&w, k, pkt->str[k].p, pkt->str[k].n);
      break;
    }
  }
  return w.n;
}
