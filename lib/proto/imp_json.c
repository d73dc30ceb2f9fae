/* IMP JSON form: one object per frame. Decoding walks the top-level members
 * once with json_scan and keeps spans into the input; only strings with
 * escapes are copied (unescaped) into the caller's scratch buffer. */
#include <string.h>

#include "proto/imp.h"
#include "proto/writer.h"
#include "proto/json_scan.h"

/* Longest member or op name worth unescaping: longer ones are unknown. */
#define NAME_MAX_ 16

/* Digits only (JSON_F_UINT), so the sole failure left is overflow. */
static bool parse_u64(const char *p, size_t n, uint64_t *v) {
  uint64_t x = 0;
  for (size_t i = 0; i < n; i++) {
    unsigned d = (unsigned)(p[i] - '0');
    if (x > (UINT64_MAX - d) / 10)
      return false;
    x = x * 10 + d;
  }
  *v = x;
  return true;
}

/* The name a string token spells, unescaped into tmp when needed. Returns
 * its length, or SIZE_MAX when it cannot be a name we know. */
static size_t name_of(const json_tok *t, char tmp[NAME_MAX_], const char **s) {
  *s = t->p + 1;
  if (!(t->flags & JSON_F_ESC))
    return t->n - 2;
  *s = tmp;
  return json_scan_unescape(t->p + 1, t->n - 2, tmp, NAME_MAX_);
}

/* Checks one known member's value against its kind and stores it. Returns
 * IMP_OK or the error that the value alone causes. */
static int take_field(imp_packet *out, unsigned key, const json_tok *v, char *scratch,
                      size_t scratch_cap, size_t *used) {
  switch (imp_key_kind(key)) {
  case 'S': {
    if (v->kind != JSON_STRING || (v->flags & JSON_F_NUL))
      return IMP_E_TYPE;
    const char *s = v->p + 1;
    size_t n = v->n - 2;
    if (v->flags & JSON_F_ESC) {
      char *dst = scratch ? scratch + *used : NULL;
      n = json_scan_unescape(s, n, dst, scratch_cap - *used);
      if (n == SIZE_MAX)
        return IMP_E_SPACE;
      s = dst;
      *used += n;
    }
    imp_set_str(out, key, s, n);
    return IMP_OK;
  }
  case 'U': {
    uint64_t x;
    if (v->kind != JSON_NUMBER || !(v->flags & JSON_F_UINT) || !parse_u64(v->p, v->n, &x))
      return IMP_E_TYPE;
    imp_set_num(out, key, x);
    return IMP_OK;
  }
  case 'B':
    if (v->kind != JSON_TRUE && v->kind != JSON_FALSE)
      return IMP_E_TYPE;
    imp_set_num(out, key, v->kind == JSON_TRUE);
    return IMP_OK;
  default: /* 'J': any value, kept as its exact text */
    imp_set_str(out, key, v->p, v->n);
    return IMP_OK;
  }
}

int imp_json_decode(const char *buf, size_t len, imp_packet *out, char *scratch,
                    size_t scratch_cap) {
  memset(out, 0, sizeof *out);
  if (len == 0 || (uint64_t)len > UINT32_MAX)
    return IMP_E_SYNTAX; /* spans are 32-bit; no frame is ever this large */
  json_obj_iter it;
  if (json_scan_obj_open(&it, buf, len) != 0)
    return IMP_E_SYNTAX;
  if (scratch == NULL)
    scratch_cap = 0;
  size_t used = 0;
  int field_err = IMP_OK;
  bool op_seen = false;
  json_tok k, v;
  int r;
  while ((r = json_scan_obj_next(&it, &k, &v)) == 1) {
    char tmp[NAME_MAX_];
    const char *name;
    size_t n = name_of(&k, tmp, &name);
    if (n == 2 && name[0] == 'o' && name[1] == 'p') {
      op_seen = true;
      out->op = IMP_OP_NONE;
      if (v.kind == JSON_STRING) {
        char vtmp[NAME_MAX_];
        const char *opname;
        size_t on = name_of(&v, vtmp, &opname);
        if (on != SIZE_MAX)
          out->op = imp_op_from_name(opname, on);
      }
      continue;
    }
    unsigned key = n == SIZE_MAX ? 0 : imp_key_from_name(name, n);
    if (key == 0)
      continue; /* unknown member: already validated by the scanner */
    int e = take_field(out, key, &v, scratch, scratch_cap, &used);
    if (field_err == IMP_OK)
      field_err = e;
  }
  if (r < 0 || json_scan_ws(it.p, it.end) != it.end)
    return IMP_E_SYNTAX;
  if (!op_seen || out->op == IMP_OP_NONE)
    return IMP_E_OP;
  return field_err;
}

static inline void put_c(writer *w, char c) {
  if (w->n < w->cap)
    ((char *)w->out)[w->n] = c;
  w->n++;
}

static inline bool needs_escape(unsigned char c) {
  return c < 0x20 || c == '"' || c == '\\';
}

static void put_json_string(writer *w, const char *s, size_t n) {
  static const char hex[] = "0123456789abcdef";
  put_c(w, '"');
  const char *e = n > 0 ? s + n : s;
  while (s != e) {
    const char *run = s;
    while (s < e && !needs_escape((unsigned char)*s))
      s++;
    put(w, run, (size_t)(s - run));
    if (s == e)
      break;
    unsigned char c = (unsigned char)*s++;
    char esc[6] = {'\\', 0, '0', '0', 0, 0};
    size_t k = 2;
    switch (c) {
    case '"': esc[1] = '"'; break;
    case '\\': esc[1] = '\\'; break;
    case '\n': esc[1] = 'n'; break;
    case '\r': esc[1] = 'r'; break;
    case '\t': esc[1] = 't'; break;
    case '\b': esc[1] = 'b'; break;
    case '\f': esc[1] = 'f'; break;
    default:
      esc[1] = 'u';
      esc[4] = hex[c >> 4];
      esc[5] = hex[c & 0xf];
      k = 6;
      break;
    }
    put(w, esc, k);
  }
  put_c(w, '"');
}

size_t imp_json_encode(const imp_packet *pkt, char *out, size_t cap) {
  const char *opname = imp_op_name(pkt->op);
  if (opname == NULL)
    return 0;
  writer w = {out, out ? cap : 0, 0};
  put(&w, "{\"op\":\"", 7);
  put(&w, opname, strlen(opname));
  put_c(&w, '"');
  for (unsigned k = 1; k < IMP_K_MAX_; k++) {
    if (!IMP_HAS(pkt, k))
      continue;
    const char *name = imp_key_name(k);
    put(&w, ",\"", 2);
    put(&w, name, strlen(name));
    put(&w, "\":", 2);
    const imp_str *s = &pkt->str[k];
    switch (imp_key_kind(k)) {
    case 'S':
      put_json_string(&w, s->p, s->n);
      break;
    case 'U':
      put_u64(&w, pkt->num[k]);
      break;
    case 'B':
      if (pkt->num[k])
        put(&w, "true", 4);
      else
        put(&w, "false", 5);
      break;
    default: /* 'J': the caller's JSON text, as is; empty means null */
      if (s->n == 0)
        put(&w, "null", 4);
      else
        put(&w, s->p, s->n);
      break;
    }
  }
  put_c(&w, '}');
  return w.n;
}
