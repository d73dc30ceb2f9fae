/* Raw TCP framing for native clients: u32 big-endian length | u8 op | payload.
 * `length` counts the op byte and the payload (so it is >= 1). */
#ifndef IM_PROTO_TCP_FRAME_H
#define IM_PROTO_TCP_FRAME_H

#include <stddef.h>
#include <stdint.h>

#define TCP_FRAME_HDR 4u

enum tcp_frame_err {
  TCP_FRAME_INCOMPLETE = 0,
  TCP_FRAME_E_EMPTY = -1,   /* length 0: no op byte */
  TCP_FRAME_E_TOO_BIG = -2  /* length > max: refused before buffering */
};

/* Look at p[0..n). On a complete frame returns its total size
 * (4 + length) and sets *body / *body_len to the op+payload bytes.
 * Returns TCP_FRAME_INCOMPLETE when more bytes are needed, or a negative
 * enum tcp_frame_err, which the caller treats as fatal for the connection.
 * The too-big check needs only the 4 header bytes. */
long tcp_frame_parse(const uint8_t *p, size_t n, uint32_t max, const uint8_t **body,
                     uint32_t *body_len);

/* Write the 4-byte header for a body (op + payload) of body_len bytes. */
void tcp_frame_encode_header(uint8_t out[4], uint32_t body_len);

#endif
