/* IMP, the libim application protocol: one packet model, two encodings.
 *
 * JSON form (WebSocket text frames, subprotocol "imp.json"): one object per
 * frame, e.g. {"op":"msg","cid":"c1","to":"bob","data":{...}}.
 * Binary form (WebSocket binary frames, subprotocol "imp.bin", and the raw
 * TCP framing): u8 op, then fields as  u8 key | uvarint len | len bytes.
 * docs/PROTOCOL.md is the normative description of both.
 *
 * Sans-I/O: decoders read a caller buffer and never allocate; encoders write
 * into a caller buffer. */
#ifndef IM_PROTO_IMP_H
#define IM_PROTO_IMP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Ops: the byte value is the binary op; imp_op_name() gives the JSON name. */
enum imp_op {
  IMP_OP_NONE = 0x00,
  IMP_OP_AUTH = 0x01,
  IMP_OP_AUTH_OK = 0x02,
  IMP_OP_MSG = 0x03,
  IMP_OP_ACK = 0x04,
  IMP_OP_SYNC = 0x05,
  IMP_OP_SYNC_END = 0x06,
  IMP_OP_PING = 0x07,
  IMP_OP_PONG = 0x08,
  IMP_OP_JOIN = 0x09,
  IMP_OP_LEAVE = 0x0a,
  IMP_OP_ERROR = 0x0b,
  IMP_OP_GOAWAY = 0x0c,
  IMP_OP_MAX_ = 0x0d
};

/* Field keys of the binary form. Each is also a bit in imp_packet.has
 * (bit = 1u << key). Kind S = string (UTF-8), U = unsigned integer (binary:
 * big-endian, 1..8 bytes), B = boolean (binary: one byte 0/1),
 * J = a JSON value (binary: its UTF-8 JSON text). */
enum imp_key {
  IMP_K_UID = 0x01,      /* S */
  IMP_K_TOKEN = 0x02,    /* S */
  IMP_K_DEVICE = 0x03,   /* S */
  IMP_K_PLATFORM = 0x04, /* S */
  IMP_K_CONN = 0x05,     /* S */
  IMP_K_HB = 0x06,       /* U */
  IMP_K_CID = 0x07,      /* S */
  IMP_K_ID = 0x08,       /* S */
  IMP_K_FROM = 0x09,     /* S */
  IMP_K_TO = 0x0a,       /* S */
  IMP_K_GROUP = 0x0b,    /* S */
  IMP_K_ROOM = 0x0c,     /* S */
  IMP_K_TS = 0x0d,       /* U */
  IMP_K_SEQ = 0x0e,      /* U */
  IMP_K_DATA = 0x0f,     /* J */
  IMP_K_CODE = 0x10,     /* U */
  IMP_K_REASON = 0x11,   /* S */
  IMP_K_SINCE = 0x12,    /* U */
  IMP_K_LIMIT = 0x13,    /* U */
  IMP_K_LAST = 0x14,     /* U */
  IMP_K_MORE = 0x15,     /* B */
  IMP_K_GAP = 0x16,      /* B */
  IMP_K_RECONNECT_MS = 0x17, /* U: goaway: reconnect (elsewhere) after this many ms */
  IMP_K_MAX_ = 0x18
};

#define IMP_HAS(pkt, key) (((pkt)->has >> (key)) & 1u)
#define IMP_SET(pkt, key) ((pkt)->has |= 1u << (key))

/* A byte span. In a decoded packet it points into the input buffer or the
 * scratch buffer given to the decoder; it is NOT NUL-terminated. */
typedef struct imp_str {
  const char *p;
  uint32_t n;
} imp_str;

/* One packet. str[k] / num[k] are indexed by enum imp_key; only the slots
 * whose bit is set in `has` are meaningful. Booleans live in num[] as 0/1.
 * For IMP_K_DATA, str[IMP_K_DATA] is the raw, validated JSON text of the
 * value (byte-identical to the input in the JSON form). */
typedef struct imp_packet {
  uint8_t op;        /* enum imp_op */
  uint32_t has;      /* bit (1u << key) per present field */
  imp_str str[IMP_K_MAX_];
  uint64_t num[IMP_K_MAX_];
} imp_packet;

/* Decoder results. */
enum imp_err {
  IMP_OK = 0,
  IMP_E_SYNTAX = -1,  /* not well-formed (bad JSON, truncated field, ...) */
  IMP_E_OP = -2,      /* missing or unknown op */
  IMP_E_TYPE = -3,    /* a known field has the wrong type */
  IMP_E_SPACE = -4,   /* scratch / output buffer too small */
  IMP_E_UTF8 = -5     /* a string field is not valid UTF-8 */
};

/* The kind of a key: 'S', 'U', 'B', 'J', or 0 for an unknown key. */
char imp_key_kind(unsigned key);
/* JSON member name of a key ("uid", "token", ...), NULL if unknown. */
const char *imp_key_name(unsigned key);
/* JSON name of an op ("auth", ...), NULL if unknown. */
const char *imp_op_name(unsigned op);
/* Op for a JSON name of length n; IMP_OP_NONE if unknown. */
uint8_t imp_op_from_name(const char *s, size_t n);
/* Key for a JSON member name of length n; 0 if unknown. */
unsigned imp_key_from_name(const char *s, size_t n);

/* Decode one JSON packet (the whole text of one frame).
 * Unknown members are validated and ignored; a repeated member: the last one
 * wins. String values without escapes point into `buf`; values with escapes
 * are unescaped into `scratch` (capacity `scratch_cap`; `len` bytes is always
 * enough; NULL/0 is fine when no string has escapes). DATA is the exact
 * value text, without surrounding whitespace; it may nest 64 deep.
 * *out is zeroed first and holds partial results on error.
 * Returns, checked in this order:
 *   IMP_E_SYNTAX  not one well-formed JSON object (invalid UTF-8 included)
 *   IMP_E_OP      "op" missing, not a string, or not a known op name
 *   IMP_E_TYPE    a known member of the wrong kind, an S value containing
 *                 \u0000, or a U value above UINT64_MAX
 *   IMP_E_SPACE   scratch too small for the unescaped strings
 *                 (of these two, the one from the earliest member)
 *   IMP_OK */
int imp_json_decode(const char *buf, size_t len, imp_packet *out, char *scratch,
                    size_t scratch_cap);

/* Encode a packet as one JSON object, members in key order, "op" first,
 * strings escaped, DATA emitted raw (an empty DATA span as null). Writes at
 * most `cap` bytes to `out` (out may be NULL when cap is 0).
 * Returns the full length the encoding needs (like snprintf); when that is
 * > cap, the contents of out are unspecified and the caller retries.
 * Returns 0 when pkt->op is not a known op. */
size_t imp_json_encode(const imp_packet *pkt, char *out, size_t cap);

/* Decode one binary packet: op byte then fields. Unknown keys are skipped;
 * a repeated key: the last one wins. Spans point into `buf`; DATA's span
 * leaves out whitespace around the value. Checks the op, then each field in
 * order, and returns the first failure:
 *   IMP_E_OP      empty, or op byte not 0x01..0x0c
 *   IMP_E_SYNTAX  field length truncated, over 5 bytes, > UINT32_MAX, or
 *                 running past the end
 *   IMP_E_UTF8    an S field is not valid UTF-8
 *   IMP_E_TYPE    an S field holds a NUL byte; a U field is not 1..8 bytes;
 *                 a B field is not one byte 0/1; DATA is not one JSON value
 *   IMP_OK */
int imp_bin_decode(const uint8_t *buf, size_t len, imp_packet *out);

/* Encode a packet in binary form (op byte + fields in key order; U in the
 * fewest big-endian bytes, at least one; an empty DATA span as null).
 * Returns the full length needed, or 0 for an unknown op; see
 * imp_json_encode for `cap`. */
size_t imp_bin_encode(const imp_packet *pkt, uint8_t *out, size_t cap);

/* Validate that buf[0..len) is exactly one JSON value (RFC 8259, with
 * surrounding whitespace allowed), nesting at most 64 deep.
 * Returns true when valid. */
bool imp_json_valid(const char *buf, size_t len);

/* Helpers used by codecs and by callers that build packets. */
static inline void imp_set_str(imp_packet *p, unsigned key, const char *s, size_t n) {
  p->str[key].p = s;
  p->str[key].n = (uint32_t)n;
  IMP_SET(p, key);
}
static inline void imp_set_num(imp_packet *p, unsigned key, uint64_t v) {
  p->num[key] = v;
  IMP_SET(p, key);
}

#endif
