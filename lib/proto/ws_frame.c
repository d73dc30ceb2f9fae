/* RFC 6455 §5.2 frame header codec and payload unmasking. */
#include "proto/ws_frame.h"

#include <string.h>

#define WS_FIN 0x80u
#define WS_RSV_MASK 0x70u
#define WS_OPCODE_MASK 0x0fu
#define WS_MASK_BIT 0x80u
#define WS_LEN_MASK 0x7fu
#define WS_LEN_16 126u
#define WS_LEN_64 127u
#define WS_CONTROL_MAX 125u

static bool opcode_known(uint8_t op) {
  return op <= WS_OP_BINARY || (op >= WS_OP_CLOSE && op <= WS_OP_PONG);
}

static uint64_t read_be(const uint8_t *p, size_t bytes) {
  uint64_t v = 0;
  for (size_t i = 0; i < bytes; i++)
    v = (v << 8) | p[i];
  return v;
}

/* Checks run as soon as the bytes they need have arrived, so a bad frame is
 * refused without waiting for the rest of its header. */
int ws_frame_parse_header(const uint8_t *p, size_t n, bool require_mask, ws_frame_hdr *h) {
  if (n < 1)
    return WS_FRAME_INCOMPLETE;
  uint8_t b0 = p[0];
  uint8_t opcode = b0 & WS_OPCODE_MASK;
  bool fin = (b0 & WS_FIN) != 0;
  bool control = (opcode & 0x8u) != 0;
  if (b0 & WS_RSV_MASK)
    return WS_FRAME_E_RSV;
  if (!opcode_known(opcode))
    return WS_FRAME_E_OPCODE;
  if (control && !fin)
    return WS_FRAME_E_CONTROL;
  if (n < 2)
    return WS_FRAME_INCOMPLETE;

  uint8_t b1 = p[1];
  bool masked = (b1 & WS_MASK_BIT) != 0;
  uint8_t len7 = b1 & WS_LEN_MASK;
  if (require_mask && !masked)
    return WS_FRAME_E_UNMASKED;
  if (control && len7 > WS_CONTROL_MAX)
    return WS_FRAME_E_CONTROL;

  size_t ext = len7 == WS_LEN_16 ? 2 : len7 == WS_LEN_64 ? 8 : 0;
  size_t hdr_len = 2 + ext + (masked ? 4 : 0);
  uint64_t len = len7;
  if (ext) {
    if (n < 2 + ext)
      return WS_FRAME_INCOMPLETE;
    len = read_be(p + 2, ext);
    /* RFC 6455 §5.2: the minimal number of bytes MUST be used, and the
     * most significant bit of a 64-bit length MUST be 0. */
    if (ext == 2 && len < WS_LEN_16)
      return WS_FRAME_E_LENGTH;
    if (ext == 8 && (len >> 63 || len <= 0xffffu))
      return WS_FRAME_E_LENGTH;
  }
  if (n < hdr_len)
    return WS_FRAME_INCOMPLETE;

  h->fin = fin;
  h->rsv = (uint8_t)((b0 & WS_RSV_MASK) >> 4);
  h->opcode = opcode;
  h->masked = masked;
  h->mask = 0;
  if (masked)
    memcpy(&h->mask, p + 2 + ext, 4);
  h->len = len;
  h->hdr_len = (uint8_t)hdr_len;
  return (int)hdr_len;
}

size_t ws_frame_encode_header(uint8_t out[10], uint8_t opcode, bool fin, uint64_t len) {
  out[0] = (uint8_t)((fin ? WS_FIN : 0u) | (opcode & WS_OPCODE_MASK));
  if (len <= WS_CONTROL_MAX) {
    out[1] = (uint8_t)len;
    return 2;
  }
  size_t ext = len <= 0xffffu ? 2 : 8;
  out[1] = (uint8_t)(ext == 2 ? WS_LEN_16 : WS_LEN_64);
  for (size_t i = 0; i < ext; i++)
    out[2 + i] = (uint8_t)(len >> (8 * (ext - 1 - i)));
  return 2 + ext;
}

size_t ws_frame_encode_masked_header(uint8_t out[14], uint8_t opcode, bool fin, uint64_t len,
                                     uint32_t mask) {
  size_t n = ws_frame_encode_header(out, opcode, fin, len);
  out[1] |= WS_MASK_BIT;
  memcpy(out + n, &mask, 4);
  return n + 4;
}

void ws_unmask(uint8_t *p, size_t n, uint32_t mask, uint64_t offset) {
  uint8_t key[8];
  uint8_t wire[4];
  memcpy(wire, &mask, 4);
  /* key[i] is the mask byte for p[i]; a period of 4 means the same 8-byte
   * key lines up with every following word. */
  for (size_t i = 0; i < 8; i++)
    key[i] = wire[(offset + i) & 3u];

  size_t i = 0;
  if (n >= 8) {
    uint64_t k;
    memcpy(&k, key, 8);
    for (; n - i >= 8; i += 8) {
      uint64_t w;
      memcpy(&w, p + i, 8);
      w ^= k;
      memcpy(p + i, &w, 8);
    }
  }
  for (; i < n; i++)
    p[i] ^= key[i & 7u];
}

bool ws_close_code_valid(unsigned code) {
  if (code >= 1000 && code <= 1003)
    return true;
  /* 1012-1014 are IANA-registered (service restart, try again later, bad
   * gateway); Autobahn 7.7/7.9 accept them. 1004-1006 and 1015 are reserved. */
  if (code >= 1007 && code <= 1014)
    return true;
  return code >= 3000 && code <= 4999;
}
