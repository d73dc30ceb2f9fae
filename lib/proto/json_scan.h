/* Allocation-free, single-pass JSON scanner (RFC 8259, strict): validates
 * values and hands back their raw spans, never builds a tree. IMP needs only
 * the envelope's members; everything below them is checked and skipped. */
#ifndef IM_PROTO_JSON_SCAN_H
#define IM_PROTO_JSON_SCAN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Deepest nesting of objects/arrays accepted in one value ([[1]] is 2). */
#define JSON_SCAN_MAX_DEPTH 64

enum json_kind {
  JSON_NONE = 0,
  JSON_OBJECT,
  JSON_ARRAY,
  JSON_STRING,
  JSON_NUMBER,
  JSON_TRUE,
  JSON_FALSE,
  JSON_NULL
};

/* json_tok.flags */
#define JSON_F_ESC 0x1u  /* string: contains at least one escape */
#define JSON_F_NUL 0x2u  /* string: contains \u0000 */
#define JSON_F_UINT 0x4u /* number: digits only (no sign, fraction, exponent) */

/* A scanned value: p/n is its exact text (strings include their quotes). */
typedef struct json_tok {
  const char *p;
  size_t n;
  uint8_t kind;  /* enum json_kind */
  uint8_t flags; /* JSON_F_* for the top-level value only */
} json_tok;

/* Members of one object, read in order. */
typedef struct json_obj_iter {
  const char *p;
  const char *end;
  bool first;
} json_obj_iter;

/* First byte at or after p that is not JSON whitespace (or end). */
const char *json_scan_ws(const char *p, const char *end);

/* Scan exactly one value starting at p (no leading whitespace), nesting at
 * most JSON_SCAN_MAX_DEPTH. Returns the byte after it, or NULL when the text
 * is not a valid value; *tok is filled on success only. */
const char *json_scan_value(const char *p, const char *end, json_tok *tok);

/* Start reading buf[0..len) as an object: skips whitespace, consumes '{'.
 * Returns 0, or -1 when the text does not start with '{'. */
int json_scan_obj_open(json_obj_iter *it, const char *buf, size_t len);

/* Next member: *key is the name (a JSON_STRING token), *val its value.
 * Returns 1 for a member, 0 after the closing '}' (it->p then points past
 * it), -1 on malformed input. */
int json_scan_obj_next(json_obj_iter *it, json_tok *key, json_tok *val);

/* Unescape the contents of a scanned string (the bytes between the quotes)
 * into out as UTF-8. Never writes past cap; the result is never longer than
 * n. Returns the length written, or SIZE_MAX when it would exceed cap. */
size_t json_scan_unescape(const char *p, size_t n, char *out, size_t cap);


#endif
