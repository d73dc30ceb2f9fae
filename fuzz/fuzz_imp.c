/* libFuzzer harness: the IMP codecs (lib/proto/imp.h).
 *
 * The raw input is decoded as a JSON packet and as a binary packet. Whatever
 * decodes must survive re-encoding: both encodings of a decoded packet
 * (JSON->JSON, JSON->bin, bin->bin, bin->JSON) decode to an equal packet. Encoders are
 * checked for snprintf semantics into exact-size buffers. imp_json_valid()
 * must agree with how both decoders judge the input as a DATA value. */
#include "fuzz_common.h"
#include "proto/imp.h"

static bool str_kind(unsigned k) {
  char kind = imp_key_kind(k);
  return kind == 'S' || kind == 'J';
}

static bool packets_equal(const imp_packet *a, const imp_packet *b) {
  if (a->op != b->op || a->has != b->has) return false;
  for (unsigned k = 1; k < IMP_K_MAX_; k++) {
    if (!IMP_HAS(a, k)) continue;
    if (str_kind(k)) {
      if (a->str[k].n != b->str[k].n) return false;
      if (a->str[k].n && memcmp(a->str[k].p, b->str[k].p, a->str[k].n) != 0) return false;
    } else if (a->num[k] != b->num[k]) {
      return false;
    }
  }
  return true;
}

/* Encode in JSON form into an exact-size heap buffer (*out, to be freed). */
static size_t enc_json(const imp_packet *p, char **out) {
  size_t need = imp_json_encode(p, NULL, 0);
  FZ_CHECK(need > 0);
  /* too small by one: must not write past cap, must report the same need */
  char *shorty = malloc(need - 1 ? need - 1 : 1);
  FZ_CHECK(imp_json_encode(p, shorty, need - 1) == need);
  free(shorty);
  char *b = malloc(need);
  FZ_CHECK(b && imp_json_encode(p, b, need) == need);
  *out = b;
  return need;
}

static size_t enc_bin(const imp_packet *p, uint8_t **out) {
  size_t need = imp_bin_encode(p, NULL, 0);
  FZ_CHECK(need > 0);
  uint8_t *shorty = malloc(need - 1 ? need - 1 : 1);
  FZ_CHECK(imp_bin_encode(p, shorty, need - 1) == need);
  free(shorty);
  uint8_t *b = malloc(need);
  FZ_CHECK(b && imp_bin_encode(p, b, need) == need);
  *out = b;
  return need;
}

/* JSON-decode text that an encoder produced: must succeed and equal want. */
static void expect_json(const char *t, size_t n, const imp_packet *want) {
  imp_packet p;
  char *scratch = malloc(n);
  int rc = imp_json_decode(t, n, &p, scratch, n);
  FZ_CHECK(rc == IMP_OK);
  FZ_CHECK(packets_equal(&p, want));
  free(scratch);
}

static void expect_bin(const uint8_t *b, size_t n, const imp_packet *want) {
  imp_packet p;
  FZ_CHECK(imp_bin_decode(b, n, &p) == IMP_OK);
  FZ_CHECK(packets_equal(&p, want));
}

/* pkt decoded fine from some form: every re-encoding round-trips. */
static void round_trips(const imp_packet *pkt) {
  char *j;
  uint8_t *b;
  size_t jn = enc_json(pkt, &j);
  size_t bn = enc_bin(pkt, &b);
  expect_json(j, jn, pkt);
  expect_bin(b, bn, pkt);
  free(j);
  free(b);
}

static bool is_ws(uint8_t c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  imp_packet pkt;
  char *text = (char *)fz_dup(data, size);
  char *scratch = malloc(size ? size : 1);

  /* JSON form */
  int rc = imp_json_decode(text, size, &pkt, scratch, size);
  FZ_CHECK(rc <= 0 && rc >= IMP_E_UTF8);
  FZ_CHECK(rc != IMP_E_SPACE); /* `len` bytes of scratch are always enough */
  if (rc == IMP_OK) round_trips(&pkt);
  /* a scratch buffer too small may only turn a success or a field type error
   * into IMP_E_SPACE */
  if (size > 0) {
    imp_packet small;
    char *half = malloc(size / 2 ? size / 2 : 1);
    int rc2 = imp_json_decode(text, size, &small, half, size / 2);
    FZ_CHECK(rc2 == rc || (rc2 == IMP_E_SPACE && (rc == IMP_OK || rc == IMP_E_TYPE)));
    if (rc2 == IMP_OK) FZ_CHECK(packets_equal(&small, &pkt));
    free(half);
  }

  /* binary form */
  rc = imp_bin_decode(data, size, &pkt);
  FZ_CHECK(rc <= 0 && rc >= IMP_E_UTF8);
  if (rc == IMP_OK) round_trips(&pkt);

  /* imp_json_valid(input) <=> the input is accepted as a DATA value */
  bool valid = imp_json_valid(text, size);
  size_t lo = 0, hi = size;
  while (lo < hi && is_ws(data[lo])) lo++;
  while (hi > lo && is_ws(data[hi - 1])) hi--;

  static const char head[] = "{\"op\":\"ping\",\"data\":";
  size_t wn = sizeof head - 1 + size + 1;
  char *w = malloc(wn);
  memcpy(w, head, sizeof head - 1);
  memcpy(w + sizeof head - 1, data, size);
  w[wn - 1] = '}';
  char *wscratch = malloc(wn);
  rc = imp_json_decode(w, wn, &pkt, wscratch, wn);
  bool whole = rc == IMP_OK && IMP_HAS(&pkt, IMP_K_DATA) &&
               pkt.str[IMP_K_DATA].p == w + sizeof head - 1 + lo &&
               pkt.str[IMP_K_DATA].n == hi - lo;
  FZ_CHECK(valid == whole);
  free(w);
  free(wscratch);

  if (size < 1u << 20) {
    uint8_t *b = malloc(size + 8);
    size_t n = 0;
    b[n++] = IMP_OP_PING;
    b[n++] = IMP_K_DATA;
    for (uint32_t v = (uint32_t)size;; v >>= 7) {
      b[n++] = (uint8_t)((v & 0x7f) | (v > 0x7f ? 0x80 : 0));
      if (v <= 0x7f) break;
    }
    memcpy(b + n, data, size);
    rc = imp_bin_decode(b, n + size, &pkt);
    FZ_CHECK((rc == IMP_OK) == valid);
    if (valid) {
      FZ_CHECK(pkt.str[IMP_K_DATA].p == (const char *)b + n + lo);
      FZ_CHECK(pkt.str[IMP_K_DATA].n == hi - lo);
    }
    free(b);
  }

  free(scratch);
  free(text);
  return 0;
}
