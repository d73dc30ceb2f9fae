/* IMP binary codec, and its equivalence with the JSON form. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <string.h>

#include "proto/imp.h"

#define LIT(s) s, sizeof(s) - 1
#define BYTES(...) ((const uint8_t[]){__VA_ARGS__}), sizeof((const uint8_t[]){__VA_ARGS__})

static void assert_str(imp_str s, const char *want) {
  assert_int_equal(s.n, strlen(want));
  assert_memory_equal(s.p, want, s.n);
}

static void assert_packets_equal(const imp_packet *a, const imp_packet *b) {
  assert_int_equal(a->op, b->op);
  assert_int_equal(a->has, b->has);
  for (unsigned k = 1; k < IMP_K_MAX_; k++) {
    if (!IMP_HAS(a, k))
      continue;
    char kind = imp_key_kind(k);
    if (kind == 'S' || kind == 'J') {
      assert_int_equal(a->str[k].n, b->str[k].n);
      if (a->str[k].n)
        assert_memory_equal(a->str[k].p, b->str[k].p, a->str[k].n);
    } else {
      assert_true(a->num[k] == b->num[k]);
    }
  }
}

static unsigned count_fields(uint32_t has) {
  unsigned n = 0;
  for (; has != 0; has &= has - 1)
    n++;
  return n;
}

static size_t bin_encode(const imp_packet *p, uint8_t *out, size_t cap) {
  size_t n = imp_bin_encode(p, out, cap);
  assert_true(n > 0 && n <= cap);
  return n;
}

static int bin_decode(const uint8_t *b, size_t n) {
  imp_packet p;
  return imp_bin_decode(b, n, &p);
}

static void test_exact_bytes(void **state) {
  (void)state;
  imp_packet p = {.op = IMP_OP_MSG};
  imp_set_str(&p, IMP_K_ID, LIT("42"));
  imp_set_str(&p, IMP_K_FROM, LIT("alice"));
  imp_set_str(&p, IMP_K_DATA, LIT("{\"t\":\"hi\"}"));
  uint8_t out[64];
  size_t n = bin_encode(&p, out, sizeof out);
  static const uint8_t want[] = {0x03, 0x08, 0x02, '4', '2', 0x09, 0x05, 'a', 'l', 'i', 'c', 'e',
                                 0x0f, 0x0a, '{',  '"', 't', '"', ':',  '"',  'h', 'i', '"', '}'};
  assert_int_equal(n, sizeof want);
  assert_memory_equal(out, want, n);

  imp_packet q;
  assert_int_equal(imp_bin_decode(out, n, &q), IMP_OK);
  assert_packets_equal(&p, &q);
  /* spans point into the input */
  assert_ptr_equal(q.str[IMP_K_FROM].p, (const char *)out + 7);

  imp_packet ping = {.op = IMP_OP_PING};
  assert_int_equal(bin_encode(&ping, out, sizeof out), 1);
  assert_int_equal(out[0], 0x07);
}

/* U fields take the fewest big-endian bytes, at least one; B one byte. */
static void test_uint_and_bool_encoding(void **state) {
  (void)state;
  static const struct {
    uint64_t v;
    uint8_t n;
    uint8_t be[8];
  } cases[] = {
      {0, 1, {0}},
      {1, 1, {1}},
      {255, 1, {0xff}},
      {256, 2, {1, 0}},
      {65535, 2, {0xff, 0xff}},
      {65536, 3, {1, 0, 0}},
      {1700000000000ull, 6, {0x01, 0x8b, 0xcf, 0xe5, 0x68, 0x00}},
      {UINT64_MAX >> 8, 7, {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}},
      {1ull << 56, 8, {1, 0, 0, 0, 0, 0, 0, 0}},
      {UINT64_MAX, 8, {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}},
  };
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
    imp_packet p = {.op = IMP_OP_MSG};
    imp_set_num(&p, IMP_K_SEQ, cases[i].v);
    uint8_t out[16];
    size_t n = bin_encode(&p, out, sizeof out);
    assert_int_equal(n, 3u + cases[i].n);
    assert_int_equal(out[1], IMP_K_SEQ);
    assert_int_equal(out[2], cases[i].n);
    assert_memory_equal(out + 3, cases[i].be, cases[i].n);
    imp_packet q;
    assert_int_equal(imp_bin_decode(out, n, &q), IMP_OK);
    assert_true(q.num[IMP_K_SEQ] == cases[i].v);
  }
  /* non-minimal U is accepted on input */
  imp_packet q;
  assert_int_equal(imp_bin_decode(BYTES(0x03, 0x0e, 0x08, 0, 0, 0, 0, 0, 0, 0, 5), &q), IMP_OK);
  assert_int_equal(q.num[IMP_K_SEQ], 5);

  imp_packet b = {.op = IMP_OP_SYNC_END};
  imp_set_num(&b, IMP_K_MORE, 1);
  imp_set_num(&b, IMP_K_GAP, 0);
  uint8_t out[16];
  size_t n = bin_encode(&b, out, sizeof out);
  static const uint8_t want[] = {0x06, 0x15, 0x01, 0x01, 0x16, 0x01, 0x00};
  assert_int_equal(n, sizeof want);
  assert_memory_equal(out, want, n);
  /* any non-zero num is written as true */
  imp_set_num(&b, IMP_K_MORE, 7);
  bin_encode(&b, out, sizeof out);
  assert_int_equal(out[3], 1);
}

static void test_every_op_and_key_roundtrip(void **state) {
  (void)state;
  for (unsigned op = 1; op < IMP_OP_MAX_; op++) {
    imp_packet p = {.op = (uint8_t)op};
    uint64_t nums[] = {0, 1, 127, 255, 256, 65535, 1700000000000ull, UINT64_MAX};
    for (unsigned k = 1; k < IMP_K_MAX_; k++) {
      switch (imp_key_kind(k)) {
      case 'S':
        imp_set_str(&p, k, imp_key_name(k), strlen(imp_key_name(k)));
        break;
      case 'U':
        imp_set_num(&p, k, nums[(k + op) % 8]);
        break;
      case 'B':
        imp_set_num(&p, k, (k + op) & 1);
        break;
      default:
        imp_set_str(&p, k, LIT("[\"\\ud83d\\ude00\",{\"k\":-1.5e3}]"));
        break;
      }
    }
    uint8_t out[512];
    size_t n = bin_encode(&p, out, sizeof out);
    assert_int_equal(out[0], op);
    imp_packet q;
    assert_int_equal(imp_bin_decode(out, n, &q), IMP_OK);
    assert_packets_equal(&p, &q);

    for (unsigned k = 1; k < IMP_K_MAX_; k++) {
      imp_packet one = {.op = (uint8_t)op, .has = 1u << k};
      one.str[k] = p.str[k];
      one.num[k] = p.num[k];
      n = bin_encode(&one, out, sizeof out);
      assert_int_equal(out[1], k);
      assert_int_equal(imp_bin_decode(out, n, &q), IMP_OK);
      assert_packets_equal(&one, &q);
    }
  }
}

/* uvarint lengths: 7 bits per byte, low group first, high bit = more. */
static void test_uvarint(void **state) {
  (void)state;
  static char big[20000];
  memset(big, 'x', sizeof big);
  static const struct {
    uint32_t n;
    uint8_t len[3];
    uint8_t k;
  } cases[] = {
      {0, {0x00}, 1},          {1, {0x01}, 1},          {127, {0x7f}, 1},
      {128, {0x80, 0x01}, 2},  {300, {0xac, 0x02}, 2},  {16383, {0xff, 0x7f}, 2},
      {16384, {0x80, 0x80, 0x01}, 3},
  };
  static uint8_t out[20100];
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
    imp_packet p = {.op = IMP_OP_ERROR};
    imp_set_str(&p, IMP_K_REASON, big, cases[i].n);
    size_t n = bin_encode(&p, out, sizeof out);
    assert_int_equal(n, 2u + cases[i].k + cases[i].n);
    assert_memory_equal(out + 2, cases[i].len, cases[i].k);
    imp_packet q;
    assert_int_equal(imp_bin_decode(out, n, &q), IMP_OK);
    assert_int_equal(q.str[IMP_K_REASON].n, cases[i].n);
  }

  imp_packet q;
  /* non-minimal lengths are accepted, up to 5 bytes */
  assert_int_equal(imp_bin_decode(BYTES(0x0b, 0x11, 0x82, 0x00, 'o', 'k'), &q), IMP_OK);
  assert_str(q.str[IMP_K_REASON], "ok");
  assert_int_equal(imp_bin_decode(BYTES(0x0b, 0x11, 0x82, 0x80, 0x80, 0x80, 0x00, 'o', 'k'), &q),
                   IMP_OK);
  assert_str(q.str[IMP_K_REASON], "ok");
  /* a sixth byte is never allowed */
  assert_int_equal(bin_decode(BYTES(0x0b, 0x11, 0x82, 0x80, 0x80, 0x80, 0x80, 0x00, 'o', 'k')),
                   IMP_E_SYNTAX);
  /* 5 bytes but above UINT32_MAX */
  assert_int_equal(bin_decode(BYTES(0x0b, 0x11, 0xff, 0xff, 0xff, 0xff, 0x1f)), IMP_E_SYNTAX);
  /* UINT32_MAX itself parses, then the field is truncated */
  assert_int_equal(bin_decode(BYTES(0x0b, 0x11, 0xff, 0xff, 0xff, 0xff, 0x0f, 'a')), IMP_E_SYNTAX);
  /* varint cut off */
  assert_int_equal(bin_decode(BYTES(0x0b, 0x11, 0x82)), IMP_E_SYNTAX);
  assert_int_equal(bin_decode(BYTES(0x0b, 0x11)), IMP_E_SYNTAX);
}

/* Cutting a packet anywhere inside a field is IMP_E_SYNTAX; cutting between
 * fields leaves a shorter valid packet. */
static void test_every_truncation(void **state) {
  (void)state;
  imp_packet p = {.op = IMP_OP_MSG};
  imp_set_str(&p, IMP_K_ID, LIT("1001"));
  imp_set_num(&p, IMP_K_SEQ, 70000);
  imp_set_str(&p, IMP_K_DATA, LIT("{\"t\":\"hi\"}"));
  imp_set_num(&p, IMP_K_MORE, 1);
  uint8_t out[64];
  size_t n = bin_encode(&p, out, sizeof out);
  /* op | 08 04 "1001" | 0e 03 01 11 70 | 0f 0a {...} | 15 01 01 */
  const size_t bounds[] = {1, 7, 12, 24, 27};
  assert_int_equal(n, 27);
  size_t fields = 0;
  for (size_t len = 0; len <= n; len++) {
    imp_packet q;
    int r = imp_bin_decode(out, len, &q);
    if (len == 0) {
      assert_int_equal(r, IMP_E_OP);
      continue;
    }
    bool boundary = false;
    for (size_t i = 0; i < 5; i++)
      if (bounds[i] == len) {
        boundary = true;
        fields = i;
      }
    if (boundary) {
      assert_int_equal(r, IMP_OK);
      assert_int_equal(count_fields(q.has), fields);
    } else {
      assert_int_equal(r, IMP_E_SYNTAX);
    }
  }
}

static void test_op_errors(void **state) {
  (void)state;
  imp_packet q;
  assert_int_equal(imp_bin_decode(NULL, 0, &q), IMP_E_OP);
  assert_int_equal(bin_decode(BYTES(0x00)), IMP_E_OP);
  assert_int_equal(bin_decode(BYTES(0x0d)), IMP_E_OP);
  assert_int_equal(bin_decode(BYTES(0xff, 0x0a, 0x01, 'b')), IMP_E_OP);
  for (unsigned op = 1; op < IMP_OP_MAX_; op++) {
    uint8_t b = (uint8_t)op;
    assert_int_equal(imp_bin_decode(&b, 1, &q), IMP_OK);
    assert_int_equal(q.op, op);
    assert_int_equal(q.has, 0);
  }
  imp_packet bad = {.op = 0};
  uint8_t out[8];
  assert_int_equal(imp_bin_encode(&bad, out, sizeof out), 0);
  bad.op = IMP_OP_MAX_;
  assert_int_equal(imp_bin_encode(&bad, out, sizeof out), 0);
}

static void test_type_errors(void **state) {
  (void)state;
  /* U: 1..8 bytes */
  assert_int_equal(bin_decode(BYTES(0x03, 0x0e, 0x00)), IMP_E_TYPE);
  assert_int_equal(bin_decode(BYTES(0x03, 0x0e, 0x09, 0, 0, 0, 0, 0, 0, 0, 0, 1)), IMP_E_TYPE);
  /* B: exactly one byte, 0 or 1 */
  assert_int_equal(bin_decode(BYTES(0x06, 0x15, 0x00)), IMP_E_TYPE);
  assert_int_equal(bin_decode(BYTES(0x06, 0x15, 0x02, 0x00, 0x01)), IMP_E_TYPE);
  assert_int_equal(bin_decode(BYTES(0x06, 0x16, 0x01, 0x02)), IMP_E_TYPE);
  assert_int_equal(bin_decode(BYTES(0x06, 0x16, 0x01, 0xff)), IMP_E_TYPE);
  /* S: no NUL bytes */
  assert_int_equal(bin_decode(BYTES(0x03, 0x0a, 0x03, 'a', 0x00, 'b')), IMP_E_TYPE);
  assert_int_equal(bin_decode(BYTES(0x03, 0x0a, 0x01, 0x00)), IMP_E_TYPE);
  /* S: valid UTF-8 */
  assert_int_equal(bin_decode(BYTES(0x03, 0x0a, 0x01, 0xff)), IMP_E_UTF8);
  assert_int_equal(bin_decode(BYTES(0x03, 0x0a, 0x01, 0x80)), IMP_E_UTF8);
  assert_int_equal(bin_decode(BYTES(0x03, 0x0a, 0x02, 0xc0, 0x80)), IMP_E_UTF8);
  assert_int_equal(bin_decode(BYTES(0x03, 0x0a, 0x03, 0xe0, 0x9f, 0xbf)), IMP_E_UTF8);
  assert_int_equal(bin_decode(BYTES(0x03, 0x0a, 0x03, 0xed, 0xa0, 0x80)), IMP_E_UTF8);
  assert_int_equal(bin_decode(BYTES(0x03, 0x0a, 0x04, 0xf4, 0x90, 0x80, 0x80)), IMP_E_UTF8);
  assert_int_equal(bin_decode(BYTES(0x03, 0x0a, 0x02, 0xe2, 0x82)), IMP_E_UTF8);
  assert_int_equal(bin_decode(BYTES(0x03, 0x0a, 0x0a, 'a', 'b', 'c', 'd', 'e', 'f', 'g', 'h',
                                    0xf0, 0x9f)),
                   IMP_E_UTF8);
  /* and all good multi-byte forms pass, including the edges */
  imp_packet q;
  assert_int_equal(imp_bin_decode(BYTES(0x03, 0x0a, 0x0d, 0xc2, 0x80, 0xed, 0x9f, 0xbf, 0xee, 0x80,
                                        0x80, 0xf4, 0x8f, 0xbf, 0xbf, 0x7f),
                                  &q),
                   IMP_OK);
  assert_int_equal(q.str[IMP_K_TO].n, 13);
  assert_int_equal(bin_decode(BYTES(0x03, 0x0a, 0x00)), IMP_OK);
  /* J: a valid JSON value */
  assert_int_equal(bin_decode(BYTES(0x03, 0x0f, 0x00)), IMP_E_TYPE);
  assert_int_equal(bin_decode(BYTES(0x03, 0x0f, 0x01, '{')), IMP_E_TYPE);
  assert_int_equal(bin_decode(BYTES(0x03, 0x0f, 0x02, '0', '1')), IMP_E_TYPE);
  assert_int_equal(bin_decode(BYTES(0x03, 0x0f, 0x04, '[', '1', ',', ']')), IMP_E_TYPE);
  assert_int_equal(bin_decode(BYTES(0x03, 0x0f, 0x03, '"', 0xff, '"')), IMP_E_TYPE);
  assert_int_equal(bin_decode(BYTES(0x03, 0x0f, 0x03, '1', ' ', '2')), IMP_E_TYPE);
  /* surrounding whitespace is allowed and left out of the span */
  assert_int_equal(imp_bin_decode(BYTES(0x03, 0x0f, 0x06, ' ', '\n', '[', '7', ']', '\t'), &q),
                   IMP_OK);
  assert_str(q.str[IMP_K_DATA], "[7]");
}

static void test_data_depth(void **state) {
  (void)state;
  uint8_t in[200] = {0x03, 0x0f, 0x80, 0x01};
  memset(in + 4, '[', 64);
  memset(in + 68, ']', 64);
  assert_int_equal(bin_decode(in, 4 + 128), IMP_OK);
  in[2] = 0x82;
  memset(in + 4, '[', 65);
  memset(in + 69, ']', 65);
  assert_int_equal(bin_decode(in, 4 + 130), IMP_E_TYPE);
}

static void test_unknown_and_duplicate_keys(void **state) {
  (void)state;
  imp_packet q;
  assert_int_equal(imp_bin_decode(BYTES(0x04, 0x00, 0x02, 0xff, 0x00,      /* key 0 */
                                        0x18, 0x01, 0x00,                   /* first unknown */
                                        0xff, 0x81, 0x00, 0xee,             /* key 255 */
                                        0x07, 0x02, 'c', '1',               /* cid */
                                        0x80, 0x00,                         /* empty unknown */
                                        0x07, 0x02, 'c', '2'),              /* cid again */
                                  &q),
                   IMP_OK);
  assert_int_equal(q.op, IMP_OP_ACK);
  assert_int_equal(q.has, 1u << IMP_K_CID);
  assert_str(q.str[IMP_K_CID], "c2");
  /* an unknown key's length still has to fit */
  assert_int_equal(bin_decode(BYTES(0x04, 0x30, 0x05, 'a')), IMP_E_SYNTAX);
}

static void test_encode_small_cap(void **state) {
  (void)state;
  imp_packet p = {.op = IMP_OP_AUTH};
  imp_set_str(&p, IMP_K_UID, LIT("alice"));
  imp_set_str(&p, IMP_K_TOKEN, LIT("secret-token"));
  imp_set_num(&p, IMP_K_SINCE, 1234567);
  uint8_t full[64];
  size_t need = imp_bin_encode(&p, full, sizeof full);
  assert_int_equal(need, 1 + 7 + 14 + 5);
  assert_int_equal(imp_bin_encode(&p, NULL, 0), need);
  for (size_t cap = 0; cap <= need + 1; cap++) {
    uint8_t buf[80];
    memset(buf, 0xA5, sizeof buf);
    assert_int_equal(imp_bin_encode(&p, buf, cap), need);
    for (size_t i = cap; i < sizeof buf; i++)
      assert_int_equal(buf[i], 0xA5);
    assert_memory_equal(buf, full, cap < need ? cap : need);
  }
}

/* One packet of every op in canonical JSON (members in key order). Going
 * JSON -> packet -> binary -> packet -> JSON must give back the same text. */
static const char *const canonical[] = {
    "{\"op\":\"auth\",\"uid\":\"alice\",\"token\":\"t0k3n\",\"device\":\"d1\","
    "\"platform\":\"ios\",\"since\":41}",
    "{\"op\":\"auth_ok\",\"conn\":\"c7f2\",\"hb\":30}",
    "{\"op\":\"msg\",\"cid\":\"c1\",\"to\":\"bob\",\"data\":{\"t\":\"hi\"}}",
    "{\"op\":\"ack\",\"cid\":\"c1\",\"id\":\"1001\"}",
    "{\"op\":\"msg\",\"id\":\"1001\",\"from\":\"alice\",\"to\":\"bob\",\"ts\":1700000000000,"
    "\"seq\":42,\"data\":{\"t\":\"hi\"}}",
    "{\"op\":\"msg\",\"id\":\"1002\",\"from\":\"alice\",\"group\":\"g1\",\"ts\":1700000000001,"
    "\"seq\":43,\"data\":[1,\"\\u00e9\\n\",{\"x\":null}]}",
    "{\"op\":\"msg\",\"id\":\"1003\",\"from\":\"alice\",\"room\":\"lobby\",\"data\":\"plain \\\" text\"}",
    "{\"op\":\"ack\",\"id\":\"1001\"}",
    "{\"op\":\"sync\",\"since\":41,\"limit\":100}",
    "{\"op\":\"sync_end\",\"last\":42,\"more\":false,\"gap\":false}",
    "{\"op\":\"ping\"}",
    "{\"op\":\"pong\"}",
    "{\"op\":\"join\",\"cid\":\"j1\",\"room\":\"lobby\"}",
    "{\"op\":\"leave\",\"room\":\"lobby\"}",
    "{\"op\":\"error\",\"cid\":\"c1\",\"code\":403,\"reason\":\"forbidden\"}",
    "{\"op\":\"goaway\",\"code\":1,\"reason\":\"server restart\"}",
    "{\"op\":\"msg\",\"to\":\"\\\"q\\\\\\n\\t\\u0001\xe4\xbd\xa0\",\"seq\":18446744073709551615,"
    "\"data\":-0.5e-7}",
    "{\"op\":\"msg\",\"data\":true}",
    "{\"op\":\"msg\",\"data\":null}",
    "{\"op\":\"msg\",\"data\":12345678901234567890123}",
};

static void test_json_binary_equivalence(void **state) {
  (void)state;
  for (size_t i = 0; i < sizeof canonical / sizeof *canonical; i++) {
    const char *js = canonical[i];
    imp_packet a, b;
    char scratch[256];
    assert_int_equal(imp_json_decode(js, strlen(js), &a, scratch, sizeof scratch), IMP_OK);
    uint8_t bin[256];
    size_t bn = bin_encode(&a, bin, sizeof bin);
    assert_int_equal(imp_bin_decode(bin, bn, &b), IMP_OK);
    assert_packets_equal(&a, &b);
    char back[512];
    size_t jn = imp_json_encode(&b, back, sizeof back);
    assert_true(jn < sizeof back);
    back[jn] = 0;
    assert_string_equal(back, js);
    /* and the binary form is canonical too */
    uint8_t bin2[256];
    assert_int_equal(imp_bin_encode(&b, bin2, sizeof bin2), bn);
    assert_memory_equal(bin, bin2, bn);
  }
  /* every op appears */
  uint32_t seen = 0;
  for (size_t i = 0; i < sizeof canonical / sizeof *canonical; i++) {
    imp_packet a;
    char scratch[256];
    assert_int_equal(
        imp_json_decode(canonical[i], strlen(canonical[i]), &a, scratch, sizeof scratch), IMP_OK);
    seen |= 1u << a.op;
  }
  assert_int_equal(seen, ((1u << IMP_OP_MAX_) - 1) & ~1u);
}

/* The same packet with unescaped strings in JSON and raw UTF-8 in binary. */
static void test_escaped_json_to_binary(void **state) {
  (void)state;
  const char *js = "{\"op\":\"msg\",\"to\":\"\\u4f60\\ud83d\\ude00\"}";
  imp_packet a;
  char scratch[64];
  assert_int_equal(imp_json_decode(js, strlen(js), &a, scratch, sizeof scratch), IMP_OK);
  uint8_t bin[64];
  size_t n = bin_encode(&a, bin, sizeof bin);
  static const uint8_t want[] = {0x03, 0x0a, 0x07, 0xe4, 0xbd, 0xa0, 0xf0, 0x9f, 0x98, 0x80};
  assert_int_equal(n, sizeof want);
  assert_memory_equal(bin, want, n);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_exact_bytes),
      cmocka_unit_test(test_uint_and_bool_encoding),
      cmocka_unit_test(test_every_op_and_key_roundtrip),
      cmocka_unit_test(test_uvarint),
      cmocka_unit_test(test_every_truncation),
      cmocka_unit_test(test_op_errors),
      cmocka_unit_test(test_type_errors),
      cmocka_unit_test(test_data_depth),
      cmocka_unit_test(test_unknown_and_duplicate_keys),
      cmocka_unit_test(test_encode_small_cap),
      cmocka_unit_test(test_json_binary_equivalence),
      cmocka_unit_test(test_escaped_json_to_binary),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
