/* Strict RFC 8259 scanner. Containers are tracked with a 64-bit stack (one
 * bit per level: array or object) instead of recursion, so depth costs
 * nothing and malicious nesting cannot exhaust the C stack. */
#include "proto/json_scan.h"

#include <string.h>

#include "proto/imp.h"

#define ONES 0x0101010101010101ull
#define HIGHS 0x8080808080808080ull

static inline bool is_ws(unsigned char c) {
  return c == ' ' || c == '\n' || c == '\r' || c == '\t';
}

static inline bool is_digit(unsigned char c) {
  return c >= '0' && c <= '9';
}

/* Bytes a string may hold as they are: printable ASCII except '"' and '\'. */
static inline bool is_plain(unsigned char c) {
  return c >= 0x20 && c < 0x80 && c != '"' && c != '\\';
}

/* True when any of the 8 bytes in w is not plain. Exact as an "any" test:
 * the subtraction borrows only out of a byte that already matched. */
static inline bool word_has_special(uint64_t w) {
  uint64_t q = w ^ (ONES * '"');
  uint64_t b = w ^ (ONES * '\\');
  uint64_t m = ((w - ONES * 0x20) & ~w) | ((q - ONES) & ~q) | ((b - ONES) & ~b) | w;
  return (m & HIGHS) != 0;
}

static inline int hex_val(unsigned char c) {
  if (c >= '0' && c <= '9')
    return c - '0';
  c |= 0x20;
  if (c >= 'a' && c <= 'f')
    return c - 'a' + 10;
  return -1;
}

/* Four hex digits at s, or -1. */
static long hex4(const unsigned char *s) {
  long v = 0;
  for (int i = 0; i < 4; i++) {
    int d = hex_val(s[i]);
    if (d < 0)
      return -1;
    v = (v << 4) | d;
  }
  return v;
}

/* Length of the valid UTF-8 sequence whose lead byte (>= 0x80) is at s,
 * or 0. The second-byte ranges exclude overlongs, surrogates and > U+10FFFF. */
static size_t utf8_seq(const unsigned char *s, const unsigned char *e) {
  unsigned c = s[0];
  unsigned lo = 0x80, hi = 0xbf;
  size_t n;
  if (c >= 0xc2 && c <= 0xdf) {
    n = 2;
  } else if (c >= 0xe0 && c <= 0xef) {
    n = 3;
    if (c == 0xe0)
      lo = 0xa0;
    else if (c == 0xed)
      hi = 0x9f;
  } else if (c >= 0xf0 && c <= 0xf4) {
    n = 4;
    if (c == 0xf0)
      lo = 0x90;
    else if (c == 0xf4)
      hi = 0x8f;
  } else {
    return 0;
  }
  if ((size_t)(e - s) < n || s[1] < lo || s[1] > hi)
    return 0;
  for (size_t i = 2; i < n; i++)
    if ((s[i] & 0xc0) != 0x80)
      return 0;
  return n;
}

/* s is at a backslash. Returns the byte after the escape, or NULL. A \u
 * high surrogate must be followed by a \u low surrogate; lone ones fail. */
static const unsigned char *scan_escape(const unsigned char *s, const unsigned char *e,
                                        unsigned *flags) {
  if (e - s < 2)
    return NULL;
  *flags |= JSON_F_ESC;
  switch (s[1]) {
  case '"': case '\\': case '/': case 'b': case 'f': case 'n': case 'r': case 't':
    return s + 2;
  case 'u':
    break;
  default:
    return NULL;
  }
  if (e - s < 6)
    return NULL;
  long cp = hex4(s + 2);
  if (cp < 0 || (cp >= 0xdc00 && cp <= 0xdfff))
    return NULL;
  if (cp == 0)
    *flags |= JSON_F_NUL;
  if (cp < 0xd800 || cp > 0xdbff)
    return s + 6;
  if (e - s < 12 || s[6] != '\\' || s[7] != 'u')
    return NULL;
  long lo = hex4(s + 8);
  if (lo < 0xdc00 || lo > 0xdfff)
    return NULL;
  return s + 12;
}

/* p is at the opening quote. Returns the byte after the closing quote. */
static const char *scan_string(const char *p, const char *end, unsigned *flags) {
  const unsigned char *s = (const unsigned char *)p + 1, *e = (const unsigned char *)end;
  unsigned f = 0;
  for (;;) {
    while (e - s >= 8) {
      uint64_t w;
      memcpy(&w, s, 8);
      if (word_has_special(w))
        break;
      s += 8;
    }
    while (s < e && is_plain(*s))
      s++;
    if (s == e)
      return NULL;
    if (*s == '"') {
      *flags = f;
      return (const char *)s + 1;
    }
    if (*s == '\\') {
      s = scan_escape(s, e, &f);
      if (s == NULL)
        return NULL;
    } else if (*s >= 0x80) {
      size_t k = utf8_seq(s, e);
      if (k == 0)
        return NULL;
      s += k;
    } else {
      return NULL; /* raw control character */
    }
  }
}

/* -? (0 | [1-9][0-9]*) (.[0-9]+)? ([eE][+-]?[0-9]+)? ; what follows is
 * checked by the caller, which is how "01" and "1x" are rejected. */
static const char *scan_number(const char *p, const char *end, unsigned *flags) {
  const unsigned char *s = (const unsigned char *)p, *e = (const unsigned char *)end;
  unsigned f = JSON_F_UINT;
  if (*s == '-') {
    f = 0;
    s++;
  }
  if (s == e || !is_digit(*s))
    return NULL;
  if (*s++ != '0')
    while (s < e && is_digit(*s))
      s++;
  if (s < e && *s == '.') {
    f = 0;
    if (++s == e || !is_digit(*s))
      return NULL;
    while (s < e && is_digit(*s))
      s++;
  }
  if (s < e && (*s == 'e' || *s == 'E')) {
    f = 0;
    if (++s < e && (*s == '+' || *s == '-'))
      s++;
    if (s == e || !is_digit(*s))
      return NULL;
    while (s < e && is_digit(*s))
      s++;
  }
  *flags = f;
  return (const char *)s;
}

static const char *scan_literal(const char *p, const char *end, const char *lit, size_t n) {
  if ((size_t)(end - p) < n || memcmp(p, lit, n) != 0)
    return NULL;
  return p + n;
}

const char *json_scan_ws(const char *p, const char *end) {
  while (p < end && is_ws((unsigned char)*p))
    p++;
  return p;
}

/* p at a member name; returns the first byte of its value. */
static const char *scan_member_name(const char *p, const char *end) {
  unsigned f;
  if (p == end || *p != '"')
    return NULL;
  p = scan_string(p, end, &f);
  if (p == NULL)
    return NULL;
  p = json_scan_ws(p, end);
  if (p == end || *p != ':')
    return NULL;
  return json_scan_ws(p + 1, end);
}

const char *json_scan_value(const char *p, const char *end, json_tok *tok) {
  const char *start = p;
  uint64_t arrays = 0; /* bit d: the container at depth d is an array */
  unsigned depth = 0, flags = 0, f = 0;
  for (;;) {
    if (p == end)
      return NULL;
    switch (*p) {
    case '{':
    case '[': {
      bool array = *p == '[';
      if (depth == JSON_SCAN_MAX_DEPTH)
        return NULL;
      arrays = array ? arrays | (1ull << depth) : arrays & ~(1ull << depth);
      depth++;
      p = json_scan_ws(p + 1, end);
      if (p < end && *p == (array ? ']' : '}')) {
        p++;
        depth--;
        break;
      }
      if (!array && (p = scan_member_name(p, end)) == NULL)
        return NULL;
      continue;
    }
    case '"':
      p = scan_string(p, end, &f);
      break;
    case 't':
      p = scan_literal(p, end, "true", 4);
      break;
    case 'f':
      p = scan_literal(p, end, "false", 5);
      break;
    case 'n':
      p = scan_literal(p, end, "null", 4);
      break;
    default:
      p = scan_number(p, end, &f);
      break;
    }
    if (p == NULL)
      return NULL;
    if (depth == 0)
      flags = f;
    /* After a value: close finished containers, or step to the next item. */
    for (;;) {
      if (depth == 0) {
        static const uint8_t kinds[256] = {
            ['{'] = JSON_OBJECT, ['['] = JSON_ARRAY, ['"'] = JSON_STRING,
            ['t'] = JSON_TRUE,   ['f'] = JSON_FALSE, ['n'] = JSON_NULL,
        };
        tok->p = start;
        tok->n = (size_t)(p - start);
        tok->kind = kinds[(unsigned char)*start] ? kinds[(unsigned char)*start] : JSON_NUMBER;
        tok->flags = (uint8_t)flags;
        return p;
      }
      p = json_scan_ws(p, end);
      if (p == end)
        return NULL;
      bool in_array = (arrays >> (depth - 1)) & 1;
      if (*p == ',') {
        p = json_scan_ws(p + 1, end);
        if (!in_array && (p = scan_member_name(p, end)) == NULL)
          return NULL;
        break;
      }
      if (*p != (in_array ? ']' : '}'))
        return NULL;
      p++;
      depth--;
    }
  }
}

int json_scan_obj_open(json_obj_iter *it, const char *buf, size_t len) {
  it->end = buf + len;
  it->p = json_scan_ws(buf, it->end);
  it->first = true;
  if (it->p == it->end || *it->p != '{')
    return -1;
  it->p++;
  return 0;
}

int json_scan_obj_next(json_obj_iter *it, json_tok *key, json_tok *val) {
  const char *p = json_scan_ws(it->p, it->end), *end = it->end;
  if (p == end)
    return -1;
  if (*p == '}') {
    it->p = p + 1;
    return 0;
  }
  if (!it->first) {
    if (*p != ',')
      return -1;
    p = json_scan_ws(p + 1, end);
  }
  it->first = false;
  if (p == end || *p != '"')
    return -1;
  const char *q = json_scan_value(p, end, key);
  if (q == NULL)
    return -1;
  q = json_scan_ws(q, end);
  if (q == end || *q != ':')
    return -1;
  q = json_scan_value(json_scan_ws(q + 1, end), end, val);
  if (q == NULL)
    return -1;
  it->p = q;
  return 1;
}

static size_t put_utf8(char *o, unsigned long cp) {
  if (cp < 0x80) {
    o[0] = (char)cp;
    return 1;
  }
  if (cp < 0x800) {
    o[0] = (char)(0xc0 | (cp >> 6));
    o[1] = (char)(0x80 | (cp & 0x3f));
    return 2;
  }
  if (cp < 0x10000) {
    o[0] = (char)(0xe0 | (cp >> 12));
    o[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
    o[2] = (char)(0x80 | (cp & 0x3f));
    return 3;
  }
  o[0] = (char)(0xf0 | (cp >> 18));
  o[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
  o[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
  o[3] = (char)(0x80 | (cp & 0x3f));
  return 4;
}

/* The input was validated by scan_string, so escapes are well-formed here. */
size_t json_scan_unescape(const char *p, size_t n, char *out, size_t cap) {
  const char *e = p + n;
  size_t o = 0;
  while (p < e) {
    const char *bs = memchr(p, '\\', (size_t)(e - p));
    size_t run = (size_t)((bs ? bs : e) - p);
    if (run > cap - o)
      return SIZE_MAX;
    if (run > 0)
      memcpy(out + o, p, run);
    o += run;
    if (bs == NULL)
      break;
    char tmp[4];
    size_t k = 1;
    p = bs + 2;
    switch (bs[1]) {
    case 'b': tmp[0] = '\b'; break;
    case 'f': tmp[0] = '\f'; break;
    case 'n': tmp[0] = '\n'; break;
    case 'r': tmp[0] = '\r'; break;
    case 't': tmp[0] = '\t'; break;
    case 'u': {
      unsigned long cp = (unsigned long)hex4((const unsigned char *)bs + 2);
      p = bs + 6;
      if (cp >= 0xd800 && cp <= 0xdbff) {
        unsigned long lo = (unsigned long)hex4((const unsigned char *)bs + 8);
        cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
        p = bs + 12;
      }
      k = put_utf8(tmp, cp);
      break;
    }
    default: tmp[0] = bs[1]; break; /* " \ / */
    }
    if (k > cap - o)
      return SIZE_MAX;
    memcpy(out + o, tmp, k);
    o += k;
  }
  return o;
}

bool imp_json_valid(const char *buf, size_t len) {
  if (len == 0)
    return false;
  const char *end = buf + len;
  json_tok tok;
  const char *p = json_scan_value(json_scan_ws(buf, end), end, &tok);
  return p != NULL && json_scan_ws(p, end) == end;
}
