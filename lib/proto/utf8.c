/* Incremental UTF-8 validator built on explicit range checks.
 *
 * A state other than UTF8_ACCEPT / UTF8_REJECT records what the next byte
 * must be: bits 16..17 hold how many continuation bytes are still due, bits
 * 8..15 the lowest and bits 0..7 the highest allowed value of the next one.
 * Narrowing the range of the first continuation byte (RFC 3629 §4) is what
 * rejects overlongs, surrogates and code points above U+10FFFF at the first
 * offending byte rather than at the end of the sequence. */
#include "proto/utf8.h"

#include <string.h>

#define PENDING(need, lo, hi) (((uint32_t)(need) << 16) | ((uint32_t)(lo) << 8) | (uint32_t)(hi))

static uint32_t lead_state(uint8_t b) {
  if (b < 0xc2)
    return UTF8_REJECT; /* stray continuation byte or overlong 2-byte lead */
  if (b < 0xe0)
    return PENDING(1, 0x80, 0xbf);
  if (b == 0xe0)
    return PENDING(2, 0xa0, 0xbf); /* below A0 would be an overlong 3-byte form */
  if (b == 0xed)
    return PENDING(2, 0x80, 0x9f); /* A0..BF would encode surrogates D800..DFFF */
  if (b < 0xf0)
    return PENDING(2, 0x80, 0xbf);
  if (b == 0xf0)
    return PENDING(3, 0x90, 0xbf); /* below 90 would be an overlong 4-byte form */
  if (b < 0xf4)
    return PENDING(3, 0x80, 0xbf);
  if (b == 0xf4)
    return PENDING(3, 0x80, 0x8f); /* above 8F would exceed U+10FFFF */
  return UTF8_REJECT;
}

static uint32_t step(uint32_t state, uint8_t b) {
  if (state == UTF8_ACCEPT)
    return b < 0x80 ? UTF8_ACCEPT : lead_state(b);
  uint8_t lo = (uint8_t)(state >> 8), hi = (uint8_t)state;
  if (b < lo || b > hi)
    return UTF8_REJECT;
  uint32_t need = (state >> 16) - 1;
  return need == 0 ? UTF8_ACCEPT : PENDING(need, 0x80, 0xbf);
}

uint32_t utf8_validate(uint32_t state, const uint8_t *p, size_t n) {
  const uint64_t high_bits = 0x8080808080808080u;
  size_t i = 0;
  while (i < n) {
    if (state == UTF8_REJECT)
      return UTF8_REJECT;
    if (state == UTF8_ACCEPT) {
      /* Chat text is mostly ASCII: skip it a word at a time. */
      while (n - i >= 8) {
        uint64_t w;
        memcpy(&w, p + i, sizeof w);
        if (w & high_bits)
          break;
        i += 8;
      }
      if (i == n)
        break;
    }
    state = step(state, p[i++]);
  }
  return state;
}
