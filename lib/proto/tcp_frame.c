/* Length-prefixed framing for raw TCP clients. */
#include "proto/tcp_frame.h"

#include <limits.h>

long tcp_frame_parse(const uint8_t *p, size_t n, uint32_t max, const uint8_t **body,
                     uint32_t *body_len) {
  if (n < TCP_FRAME_HDR)
    return TCP_FRAME_INCOMPLETE;
  uint32_t len = (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
  if (len == 0)
    return TCP_FRAME_E_EMPTY;
  if (len > max)
    return TCP_FRAME_E_TOO_BIG;
#if LONG_MAX - TCP_FRAME_HDR < UINT32_MAX
  /* Where long is 32 bits the total size must still fit the return value. */
  if (len > LONG_MAX - TCP_FRAME_HDR)
    return TCP_FRAME_E_TOO_BIG;
#endif
  if (n - TCP_FRAME_HDR < len)
    return TCP_FRAME_INCOMPLETE;
  *body = p + TCP_FRAME_HDR;
  *body_len = len;
  return (long)len + (long)TCP_FRAME_HDR;
}

void tcp_frame_encode_header(uint8_t out[4], uint32_t body_len) {
  out[0] = (uint8_t)(body_len >> 24);
  out[1] = (uint8_t)(body_len >> 16);
  out[2] = (uint8_t)(body_len >> 8);
  out[3] = (uint8_t)body_len;
}
