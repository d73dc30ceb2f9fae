/* Incremental UTF-8 validation (RFC 3629: no overlongs, no surrogates,
 * nothing above U+10FFFF), usable across WebSocket fragments. */
#ifndef IM_PROTO_UTF8_H
#define IM_PROTO_UTF8_H

#include <stddef.h>
#include <stdint.h>

#define UTF8_ACCEPT 0u
#define UTF8_REJECT 1u

/* Feed n bytes with the state carried over from the previous piece
 * (start with UTF8_ACCEPT). Returns the new state: UTF8_REJECT as soon as
 * the input cannot be valid (fail fast), UTF8_ACCEPT when the bytes so far
 * end on a character boundary, another value in the middle of a sequence. */
uint32_t utf8_validate(uint32_t state, const uint8_t *p, size_t n);

#endif
