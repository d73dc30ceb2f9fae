/* RFC 6455 §5 frame codec, sans-I/O: header parse/encode and unmasking.
 * No allocation; the engine (lib/core) owns buffering and message assembly. */
#ifndef IM_PROTO_WS_FRAME_H
#define IM_PROTO_WS_FRAME_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum ws_opcode {
  WS_OP_CONT = 0x0,
  WS_OP_TEXT = 0x1,
  WS_OP_BINARY = 0x2,
  WS_OP_CLOSE = 0x8,
  WS_OP_PING = 0x9,
  WS_OP_PONG = 0xa
};

/* Close codes used by libim (RFC 6455 §7.4.1 and libim's 4xxx). */
enum ws_close_code {
  WS_CLOSE_NORMAL = 1000,
  WS_CLOSE_GOING_AWAY = 1001,
  WS_CLOSE_PROTOCOL = 1002,
  WS_CLOSE_UNSUPPORTED = 1003,
  WS_CLOSE_NO_STATUS = 1005,  /* never sent on the wire */
  WS_CLOSE_ABNORMAL = 1006,   /* never sent on the wire */
  WS_CLOSE_BAD_DATA = 1007,
  WS_CLOSE_POLICY = 1008,
  WS_CLOSE_TOO_BIG = 1009,
  WS_CLOSE_INTERNAL = 1011
};

typedef struct ws_frame_hdr {
  bool fin;
  uint8_t rsv;        /* the three RSV bits, as bits 2..0 */
  uint8_t opcode;
  bool masked;
  uint32_t mask;      /* the 4 masking-key bytes memcpy'd raw from the wire (not byte-swapped);
                         pass as-is to ws_unmask. 0 when !masked. */
  uint64_t len;       /* payload length */
  uint8_t hdr_len;    /* 2..14 */
} ws_frame_hdr;

enum ws_frame_err {
  WS_FRAME_INCOMPLETE = 0,     /* need more bytes */
  WS_FRAME_E_RSV = -1,         /* RSV bits set without an extension */
  WS_FRAME_E_OPCODE = -2,      /* reserved opcode */
  WS_FRAME_E_CONTROL = -3,     /* control frame fragmented or > 125 bytes */
  WS_FRAME_E_UNMASKED = -4,    /* client frame without mask (when required) */
  WS_FRAME_E_LENGTH = -5       /* non-minimal length encoding or 64-bit length with MSB set */
};

/* Parse a frame header from p[0..n). require_mask: reject unmasked frames
 * (servers must). Returns the header length (2..14) when complete and valid,
 * WS_FRAME_INCOMPLETE (0) when more bytes are needed, or a negative
 * enum ws_frame_err. All failures are protocol errors (close 1002). */
int ws_frame_parse_header(const uint8_t *p, size_t n, bool require_mask, ws_frame_hdr *h);

/* Encode a server (unmasked) frame header for a payload of `len` bytes.
 * `out` must hold 10 bytes. Returns the header length (2, 4 or 10). */
size_t ws_frame_encode_header(uint8_t out[10], uint8_t opcode, bool fin, uint64_t len);

/* Encode a client (masked) frame header: the server form plus the MASK bit
 * and the 4 masking-key bytes `mask` (wire order, as ws_frame_hdr.mask).
 * `out` must hold 14 bytes. Returns the header length (6, 8 or 14). Mask
 * the payload with ws_unmask (XOR is its own inverse). */
size_t ws_frame_encode_masked_header(uint8_t out[14], uint8_t opcode, bool fin, uint64_t len,
                                     uint32_t mask);

/* Unmask n payload bytes in place (or mask them: the same XOR). `offset` is the position of p[0] within
 * the frame's payload (so a payload may be unmasked in pieces). Works a
 * machine word at a time. */
void ws_unmask(uint8_t *p, size_t n, uint32_t mask, uint64_t offset);

/* True if `code` may appear in a close frame received from a peer
 * (1000-1003, 1007-1014, 3000-4999; 1012-1014 are IANA-registered). */
bool ws_close_code_valid(unsigned code);

#endif
