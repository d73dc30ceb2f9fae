/* IMP JSON codec and the JSON scanner under it. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <string.h>

#include "proto/imp.h"
#include "proto/json_scan.h"

#define LIT(s) s, sizeof(s) - 1

static int decode(const char *s, imp_packet *p, char *scratch, size_t cap) {
  return imp_json_decode(s, strlen(s), p, scratch, cap);
}

static int decode_err(const char *s) {
  imp_packet p;
  char scratch[512];
  return decode(s, &p, scratch, sizeof scratch);
}

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

/* Encode into a fresh buffer, checking the returned length fits. */
static size_t encode(const imp_packet *p, char *out, size_t cap) {
  size_t n = imp_json_encode(p, out, cap);
  assert_true(n > 0 && n < cap);
  out[n] = 0;
  return n;
}

static void test_names_and_kinds(void **state) {
  (void)state;
  static const char *ops[] = {NULL,   "auth", "auth_ok", "msg",  "ack",   "sync",  "sync_end",
                              "ping", "pong", "join",    "leave", "error", "goaway"};
  for (unsigned op = 1; op < IMP_OP_MAX_; op++) {
    assert_string_equal(imp_op_name(op), ops[op]);
    assert_int_equal(imp_op_from_name(ops[op], strlen(ops[op])), op);
  }
  assert_null(imp_op_name(0));
  assert_null(imp_op_name(IMP_OP_MAX_));
  assert_null(imp_op_name(255));
  assert_int_equal(imp_op_from_name(LIT("")), IMP_OP_NONE);
  assert_int_equal(imp_op_from_name(LIT("MSG")), IMP_OP_NONE);
  assert_int_equal(imp_op_from_name(LIT("auth_o")), IMP_OP_NONE);
  assert_int_equal(imp_op_from_name(LIT("auth_okk")), IMP_OP_NONE);

  static const char *keys[] = {NULL,   "uid",  "token", "device", "platform", "conn",
                               "hb",   "cid",  "id",    "from",   "to",       "group",
                               "room", "ts",   "seq",   "data",   "code",     "reason",
                               "since", "limit", "last", "more",  "gap", "reconnect_ms"};
  static const char kinds[] = "?SSSSSUSSSSSSUUJUSUUUBBU";
  for (unsigned k = 1; k < IMP_K_MAX_; k++) {
    assert_string_equal(imp_key_name(k), keys[k]);
    assert_int_equal(imp_key_kind(k), kinds[k]);
    assert_int_equal(imp_key_from_name(keys[k], strlen(keys[k])), k);
  }
  assert_null(imp_key_name(0));
  assert_null(imp_key_name(IMP_K_MAX_));
  assert_int_equal(imp_key_kind(0), 0);
  assert_int_equal(imp_key_kind(IMP_K_MAX_), 0);
  assert_int_equal(imp_key_kind(1000), 0);
  assert_int_equal(imp_key_from_name(LIT("op")), 0);
  assert_int_equal(imp_key_from_name(LIT("tok")), 0);
}

static void test_example_exact(void **state) {
  (void)state;
  const char *in = "{\"op\":\"msg\",\"id\":\"42\",\"from\":\"alice\",\"data\":{\"t\":\"hi\"}}";
  imp_packet p;
  assert_int_equal(decode(in, &p, NULL, 0), IMP_OK);
  assert_int_equal(p.op, IMP_OP_MSG);
  assert_int_equal(p.has, (1u << IMP_K_ID) | (1u << IMP_K_FROM) | (1u << IMP_K_DATA));
  assert_str(p.str[IMP_K_ID], "42");
  assert_str(p.str[IMP_K_FROM], "alice");
  assert_str(p.str[IMP_K_DATA], "{\"t\":\"hi\"}");
  /* unescaped strings and data point into the input, not a copy */
  assert_ptr_equal(p.str[IMP_K_FROM].p, strstr(in, "alice"));
  assert_ptr_equal(p.str[IMP_K_DATA].p, strstr(in, "{\"t\""));

  char out[128];
  encode(&p, out, sizeof out);
  assert_string_equal(out, in);
}

/* Packets with every key set (once per op) round-trip exactly. */
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
        imp_set_str(&p, k, LIT("{\"a\":[1,2.5e-3,\"x\\u00e9\",null,true]}"));
        break;
      }
    }
    char out[1024];
    size_t n = encode(&p, out, sizeof out);
    imp_packet q;
    char scratch[1024];
    assert_int_equal(imp_json_decode(out, n, &q, scratch, sizeof scratch), IMP_OK);
    assert_packets_equal(&p, &q);

    /* and one key at a time, so no key depends on its neighbours */
    for (unsigned k = 1; k < IMP_K_MAX_; k++) {
      imp_packet one = {.op = (uint8_t)op, .has = 1u << k};
      one.str[k] = p.str[k];
      one.num[k] = p.num[k];
      n = encode(&one, out, sizeof out);
      assert_int_equal(imp_json_decode(out, n, &q, scratch, sizeof scratch), IMP_OK);
      assert_packets_equal(&one, &q);
    }
  }
}

static void test_encode_format(void **state) {
  (void)state;
  imp_packet p = {.op = IMP_OP_SYNC_END};
  imp_set_num(&p, IMP_K_GAP, 1);
  imp_set_num(&p, IMP_K_LAST, 0);
  imp_set_num(&p, IMP_K_MORE, 0);
  char out[256];
  encode(&p, out, sizeof out);
  assert_string_equal(out, "{\"op\":\"sync_end\",\"last\":0,\"more\":false,\"gap\":true}");

  imp_packet q = {.op = IMP_OP_PING};
  encode(&q, out, sizeof out);
  assert_string_equal(out, "{\"op\":\"ping\"}");

  /* bits outside the key range are not fields */
  q.has |= 1u << 0 | 1u << IMP_K_MAX_ | 1u << 31;
  encode(&q, out, sizeof out);
  assert_string_equal(out, "{\"op\":\"ping\"}");

  /* an empty data span is written as null rather than as broken JSON */
  imp_packet d = {.op = IMP_OP_MSG};
  imp_set_str(&d, IMP_K_DATA, NULL, 0);
  imp_set_str(&d, IMP_K_TO, NULL, 0);
  encode(&d, out, sizeof out);
  assert_string_equal(out, "{\"op\":\"msg\",\"to\":\"\",\"data\":null}");

  imp_packet bad = {.op = 0};
  assert_int_equal(imp_json_encode(&bad, out, sizeof out), 0);
  bad.op = IMP_OP_MAX_;
  assert_int_equal(imp_json_encode(&bad, out, sizeof out), 0);
}

static void test_encode_escapes(void **state) {
  (void)state;
  static const char raw[] = "q\"b\\s/\n\r\t\b\f\x01\x1f\x7f \xc3\xa9\xf0\x9f\x98\x80.";
  imp_packet p = {.op = IMP_OP_ERROR};
  imp_set_str(&p, IMP_K_REASON, raw, sizeof raw - 1);
  char out[256];
  size_t n = encode(&p, out, sizeof out);
  assert_string_equal(out, "{\"op\":\"error\",\"reason\":\"q\\\"b\\\\s/\\n\\r\\t\\b\\f\\u0001\\u001f"
                           "\x7f \xc3\xa9\xf0\x9f\x98\x80.\"}");
  imp_packet q;
  char scratch[256];
  assert_int_equal(imp_json_decode(out, n, &q, scratch, sizeof scratch), IMP_OK);
  assert_packets_equal(&p, &q);

  /* every control byte escapes and comes back */
  char all[32];
  for (int i = 0; i < 32; i++)
    all[i] = (char)(i == 0 ? ' ' : i);
  imp_set_str(&p, IMP_K_REASON, all, sizeof all);
  n = encode(&p, out, sizeof out);
  for (size_t i = 0; i < n; i++)
    assert_true((unsigned char)out[i] >= 0x20);
  assert_int_equal(imp_json_decode(out, n, &q, scratch, sizeof scratch), IMP_OK);
  assert_packets_equal(&p, &q);
}

static void test_encode_small_cap(void **state) {
  (void)state;
  imp_packet p = {.op = IMP_OP_MSG};
  imp_set_str(&p, IMP_K_ID, LIT("1001"));
  imp_set_str(&p, IMP_K_FROM, LIT("al\"ice\n"));
  imp_set_num(&p, IMP_K_SEQ, 12345678901234ull);
  imp_set_num(&p, IMP_K_MORE, 1);
  imp_set_str(&p, IMP_K_DATA, LIT("{\"t\":\"hi\"}"));
  char full[256];
  size_t need = imp_json_encode(&p, full, sizeof full);
  assert_int_equal(need, strlen("{\"op\":\"msg\",\"id\":\"1001\",\"from\":\"al\\\"ice\\n\","
                                "\"seq\":12345678901234,\"data\":{\"t\":\"hi\"},\"more\":true}"));
  assert_int_equal(imp_json_encode(&p, NULL, 0), need);

  for (size_t cap = 0; cap <= need + 1; cap++) {
    char buf[300];
    memset(buf, 0xA5, sizeof buf);
    assert_int_equal(imp_json_encode(&p, buf, cap), need);
    for (size_t i = cap; i < sizeof buf; i++)
      assert_int_equal((unsigned char)buf[i], 0xA5);
    size_t wrote = cap < need ? cap : need;
    assert_memory_equal(buf, full, wrote);
  }
}

/* The data span is the exact input text, whatever the value. */
static void test_data_spans(void **state) {
  (void)state;
  static const char *values[] = {
      "{}",
      "[]",
      "{\"t\":\"hi\",\"n\":[1,-2,3.5,-0.0e+1,1E-9],\"o\":{\"x\":null}}",
      "[ 1 , { \"a\" : [ ] } , \"\\\"\" ]",
      "\"plain\"",
      "\"esc \\\" \\\\ \\/ \\b \\f \\n \\r \\t \\u0041 \\ud83d\\ude00 \\u0000\"",
      "\"\xe4\xbd\xa0\xe5\xa5\xbd\"",
      "0",
      "-0",
      "42",
      "-17.25",
      "6.02e23",
      "1E+2",
      "18446744073709551616",
      "true",
      "false",
      "null",
  };
  for (size_t i = 0; i < sizeof values / sizeof *values; i++) {
    char in[512];
    snprintf(in, sizeof in, "{\"op\":\"msg\",\"data\":  %s  ,\"to\":\"b\"}", values[i]);
    imp_packet p;
    char scratch[8];
    assert_int_equal(decode(in, &p, scratch, sizeof scratch), IMP_OK);
    assert_true(IMP_HAS(&p, IMP_K_DATA));
    assert_str(p.str[IMP_K_DATA], values[i]);
    assert_ptr_equal(p.str[IMP_K_DATA].p, in + strlen("{\"op\":\"msg\",\"data\":  "));
    assert_true(imp_json_valid(values[i], strlen(values[i])));
  }
}

/* [[[...]]] n deep, or {"a":{"a":...}} n deep, as the data of a packet. */
static void nested(char *out, size_t cap, unsigned n, bool objects) {
  size_t o = (size_t)snprintf(out, cap, "{\"op\":\"msg\",\"data\":");
  for (unsigned i = 0; i < n; i++)
    o += (size_t)snprintf(out + o, cap - o, objects ? "{\"a\":" : "[");
  o += (size_t)snprintf(out + o, cap - o, "1");
  for (unsigned i = 0; i < n; i++)
    o += (size_t)snprintf(out + o, cap - o, objects ? "}" : "]");
  snprintf(out + o, cap - o, "}");
}

static void test_depth_limit(void **state) {
  (void)state;
  char in[1024];
  for (int objects = 0; objects < 2; objects++) {
    nested(in, sizeof in, 64, objects);
    assert_int_equal(decode_err(in), IMP_OK);
    nested(in, sizeof in, 65, objects);
    assert_int_equal(decode_err(in), IMP_E_SYNTAX);
  }
  /* imp_json_valid counts the value's own levels */
  char v[200];
  memset(v, '[', 64);
  memset(v + 64, ']', 64);
  assert_true(imp_json_valid(v, 128));
  memset(v, '[', 65);
  memset(v + 65, ']', 65);
  assert_false(imp_json_valid(v, 130));
  /* deep but closed again: depth is the live nesting, not a total */
  char wide[800];
  size_t o = 0;
  wide[o++] = '[';
  for (int i = 0; i < 100; i++) {
    if (i)
      wide[o++] = ',';
    memcpy(wide + o, "[[[]]]", 6);
    o += 6;
  }
  wide[o++] = ']';
  assert_true(imp_json_valid(wide, o));
}

static void test_json_valid(void **state) {
  (void)state;
  static const char *ok[] = {
      " {} ", "\t\r\n[]\n", "0", "-0", "0.5", "1e5", "1E-5", "-1.0e+10", "\"\"", "\"\\u12aB\"",
      "[1,[2,[3]],{\"a\":{}}]", "{\"\":0}", "{\"a\":1,\"a\":2}", "\"\x7f\"",
  };
  static const char *bad[] = {
      "", " ", "{", "}", "[", "]", "[1,]", "{\"a\":1,}", "{,}", "[,1]", "{\"a\"}", "{\"a\" 1}",
      "{a:1}", "{'a':1}", "'a'", "01", "-01", "00", "1.", ".5", "+1", "-", "1e", "1e+", "0x10",
      "NaN", "Infinity", "-Infinity", "nul", "tru", "True", "nulll", "[1 2]", "{} {}", "1 2",
      "\"abc", "\"\\\"", "\"\\x\"", "\"\\u12\"", "\"\\u12G4\"", "\"\\ud800\"", "\"\\udc00\"",
      "\"\\ud800\\u0041\"", "\"\\ud800\\n\"", "\"\\udbff\\udbff\"", "\"\\ud800x\"", "\"\\\"",
      "\"\t\"", "\"\n\"", "\"\x01\"", "\"\x1f\"", "\"\xff\"", "\"\xc0\x80\"", "\"\xc1\xbf\"",
      "\"\xe0\x80\x80\"", "\"\xed\xa0\x80\"", "\"\xf4\x90\x80\x80\"", "\"\xf5\x80\x80\x80\"",
      "\"\xe2\x82\"", "\"\x80\"", "\"\xf0\x9f\x98\"",
  };
  for (size_t i = 0; i < sizeof ok / sizeof *ok; i++)
    assert_true(imp_json_valid(ok[i], strlen(ok[i])));
  for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
    if (imp_json_valid(bad[i], strlen(bad[i])))
      fail_msg("accepted: %s", bad[i]);
  }
  /* a NUL byte inside the text is not JSON either */
  assert_false(imp_json_valid("\"a\0b\"", 5));
  assert_false(imp_json_valid("1\0", 2));
}

/* Long strings exercise the 8-byte fast path: a special byte must be seen
 * at every offset. */
static void test_string_fast_path(void **state) {
  (void)state;
  for (size_t at = 0; at < 40; at++) {
    char s[64];
    memset(s, 'a', sizeof s);
    s[0] = '"';
    s[41] = '"';
    s[1 + at] = '\x01';
    assert_false(imp_json_valid(s, 42));
    s[1 + at] = '"';
    assert_false(imp_json_valid(s, 42));
    s[1 + at] = '\xff';
    assert_false(imp_json_valid(s, 42));
    s[1 + at] = 'z';
    assert_true(imp_json_valid(s, 42));
    if (at < 39) {
      memcpy(s + 1 + at, "\xc3\xa9", 2);
      assert_true(imp_json_valid(s, 42));
      memcpy(s + 1 + at, "\\n", 2);
      assert_true(imp_json_valid(s, 42));
    }
  }
}

static void test_unescape_into_scratch(void **state) {
  (void)state;
  const char *in = "{\"op\":\"msg\",\"to\":\"a\\\"b\\\\c\\/d\\b\\f\\n\\r\\t\\u0041\\u00e9\\u20AC"
                   "\\ud83d\\ude00z\",\"from\":\"plain\",\"cid\":\"x\\u4f60\"}";
  static const char want_to[] = "a\"b\\c/d\b\f\n\r\tA\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80z";
  char scratch[256];
  imp_packet p;
  assert_int_equal(decode(in, &p, scratch, sizeof scratch), IMP_OK);
  assert_int_equal(p.str[IMP_K_TO].n, sizeof want_to - 1);
  assert_memory_equal(p.str[IMP_K_TO].p, want_to, sizeof want_to - 1);
  assert_ptr_equal(p.str[IMP_K_TO].p, scratch);
  assert_str(p.str[IMP_K_CID], "x\xe4\xbd\xa0");
  assert_ptr_equal(p.str[IMP_K_CID].p, scratch + sizeof want_to - 1);
  assert_str(p.str[IMP_K_FROM], "plain");
  assert_true(p.str[IMP_K_FROM].p > in && p.str[IMP_K_FROM].p < in + strlen(in));

  /* exactly enough scratch is enough; one byte less is IMP_E_SPACE */
  size_t need = sizeof want_to - 1 + 4;
  assert_int_equal(decode(in, &p, scratch, need), IMP_OK);
  assert_int_equal(decode(in, &p, scratch, need - 1), IMP_E_SPACE);
  assert_int_equal(decode(in, &p, NULL, 0), IMP_E_SPACE);
  /* cap = len always suffices */
  assert_int_equal(decode(in, &p, scratch, strlen(in)), IMP_OK);

  /* a field error and a space error: the earlier member decides */
  assert_int_equal(decode("{\"op\":\"msg\",\"to\":\"a\\n\",\"seq\":\"x\"}", &p, NULL, 0),
                   IMP_E_SPACE);
  assert_int_equal(decode("{\"op\":\"msg\",\"seq\":\"x\",\"to\":\"a\\n\"}", &p, NULL, 0),
                   IMP_E_TYPE);

  /* without escapes no scratch is needed at all */
  assert_int_equal(decode("{\"op\":\"ack\",\"id\":\"9\"}", &p, NULL, 0), IMP_OK);
  assert_str(p.str[IMP_K_ID], "9");

  /* scratch is not overrun by a string that does not fit */
  char small[8];
  memset(small, 0x5A, sizeof small);
  assert_int_equal(decode("{\"op\":\"msg\",\"to\":\"\\u00e9\\u00e9\\u00e9\"}", &p, small, 5),
                   IMP_E_SPACE);
  assert_int_equal((unsigned char)small[5], 0x5A);
}

/* Names may be spelled with escapes too; they are compared unescaped. */
static void test_escaped_names(void **state) {
  (void)state;
  imp_packet p;
  assert_int_equal(decode("{\"\\u006fp\":\"m\\u0073g\",\"t\\u006f\":\"x\"}", &p, NULL, 0), IMP_OK);
  assert_int_equal(p.op, IMP_OP_MSG);
  assert_str(p.str[IMP_K_TO], "x");
  /* a long escaped name is simply unknown */
  assert_int_equal(
      decode_err("{\"op\":\"msg\",\"\\u0074\\u0074\\u0074\\u0074\\u0074\\u0074\\u0074\\u0074"
                 "\\u0074\\u0074\\u0074\\u0074\\u0074\\u0074\\u0074\\u0074\\u0074\":1}"),
      IMP_OK);
  assert_int_equal(decode_err("{\"op\":\"\\u006d\\u0073\\u0067\\u0067\\u0067\\u0067\\u0067"
                              "\\u0067\\u0067\\u0067\\u0067\\u0067\\u0067\\u0067\\u0067\\u0067"
                              "\\u0067\"}"),
                   IMP_E_OP);
}

static void test_duplicates_last_wins(void **state) {
  (void)state;
  imp_packet p;
  char scratch[64];
  assert_int_equal(decode("{\"op\":\"ack\",\"to\":\"a\",\"seq\":1,\"op\":\"msg\",\"to\":\"b\\n\","
                          "\"seq\":2,\"more\":true,\"more\":false}",
                          &p, scratch, sizeof scratch),
                   IMP_OK);
  assert_int_equal(p.op, IMP_OP_MSG);
  assert_str(p.str[IMP_K_TO], "b\n");
  assert_int_equal(p.num[IMP_K_SEQ], 2);
  assert_int_equal(p.num[IMP_K_MORE], 0);
}

static void test_unknown_members(void **state) {
  (void)state;
  imp_packet p;
  assert_int_equal(decode("{\"x\":{\"op\":\"bad\",\"to\":1},\"op\":\"pong\",\"y\":[1,{\"z\":null}],"
                          "\"OP\":\"nope\",\"\":\"\",\"hb2\":\"s\"}",
                          &p, NULL, 0),
                   IMP_OK);
  assert_int_equal(p.op, IMP_OP_PONG);
  assert_int_equal(p.has, 0);
  /* unknown members are still validated */
  assert_int_equal(decode_err("{\"op\":\"pong\",\"x\":[1,]}"), IMP_E_SYNTAX);
  assert_int_equal(decode_err("{\"op\":\"pong\",\"x\":\"\\ud800\"}"), IMP_E_SYNTAX);
}

static void test_uint_fields(void **state) {
  (void)state;
  imp_packet p;
  assert_int_equal(decode("{\"op\":\"msg\",\"seq\":18446744073709551615,\"ts\":0,\"hb\":007}", &p,
                          NULL, 0),
                   IMP_E_SYNTAX);
  assert_int_equal(decode("{\"op\":\"msg\",\"seq\":18446744073709551615,\"ts\":0,\"hb\":7}", &p,
                          NULL, 0),
                   IMP_OK);
  assert_true(p.num[IMP_K_SEQ] == UINT64_MAX);
  assert_int_equal(p.num[IMP_K_TS], 0);
  assert_int_equal(p.num[IMP_K_HB], 7);
  assert_int_equal(decode_err("{\"op\":\"msg\",\"seq\":18446744073709551616}"), IMP_E_TYPE);
  assert_int_equal(decode_err("{\"op\":\"msg\",\"seq\":99999999999999999999}"), IMP_E_TYPE);
  assert_int_equal(decode_err("{\"op\":\"msg\",\"seq\":184467440737095516150}"), IMP_E_TYPE);
}

struct bad_case {
  const char *in;
  int want;
};

static void test_errors(void **state) {
  (void)state;
  static const struct bad_case cases[] = {
      /* truncated */
      {"", IMP_E_SYNTAX},
      {"   ", IMP_E_SYNTAX},
      {"{", IMP_E_SYNTAX},
      {"{\"op\"", IMP_E_SYNTAX},
      {"{\"op\":", IMP_E_SYNTAX},
      {"{\"op\":\"ms", IMP_E_SYNTAX},
      {"{\"op\":\"msg\"", IMP_E_SYNTAX},
      {"{\"op\":\"msg\",", IMP_E_SYNTAX},
      {"{\"op\":\"msg\",\"data\":{\"a\":[1,2]", IMP_E_SYNTAX},
      {"{\"op\":\"msg\",\"seq\":1", IMP_E_SYNTAX},
      {"{\"op\":\"msg\",\"more\":tr", IMP_E_SYNTAX},
      /* not an object at the top */
      {"[]", IMP_E_SYNTAX},
      {"\"op\"", IMP_E_SYNTAX},
      {"null", IMP_E_SYNTAX},
      /* trailing garbage and commas */
      {"{\"op\":\"msg\"}x", IMP_E_SYNTAX},
      {"{\"op\":\"msg\"}{}", IMP_E_SYNTAX},
      {"{\"op\":\"msg\"},", IMP_E_SYNTAX},
      {"{\"op\":\"msg\",}", IMP_E_SYNTAX},
      {"{,\"op\":\"msg\"}", IMP_E_SYNTAX},
      {"{\"op\":\"msg\",,\"to\":\"a\"}", IMP_E_SYNTAX},
      {"{\"op\":\"msg\" \"to\":\"a\"}", IMP_E_SYNTAX},
      {"{\"op\" \"msg\"}", IMP_E_SYNTAX},
      {"{op:\"msg\"}", IMP_E_SYNTAX},
      {"{'op':'msg'}", IMP_E_SYNTAX},
      {"{\"op\":\"msg\",\"data\":[1,]}", IMP_E_SYNTAX},
      /* numbers */
      {"{\"op\":\"msg\",\"seq\":01}", IMP_E_SYNTAX},
      {"{\"op\":\"msg\",\"data\":-01}", IMP_E_SYNTAX},
      {"{\"op\":\"msg\",\"data\":00}", IMP_E_SYNTAX},
      {"{\"op\":\"msg\",\"data\":NaN}", IMP_E_SYNTAX},
      {"{\"op\":\"msg\",\"data\":1.}", IMP_E_SYNTAX},
      {"{\"op\":\"msg\",\"data\":+1}", IMP_E_SYNTAX},
      /* escapes and surrogates */
      {"{\"op\":\"msg\",\"to\":\"\\x\"}", IMP_E_SYNTAX},
      {"{\"op\":\"msg\",\"to\":\"\\u00G0\"}", IMP_E_SYNTAX},
      {"{\"op\":\"msg\",\"to\":\"\\u00\"}", IMP_E_SYNTAX},
      {"{\"op\":\"msg\",\"to\":\"\\ud83d\"}", IMP_E_SYNTAX},
      {"{\"op\":\"msg\",\"to\":\"\\ude00\"}", IMP_E_SYNTAX},
      {"{\"op\":\"msg\",\"to\":\"\\ud83d\\ud83d\"}", IMP_E_SYNTAX},
      {"{\"op\":\"msg\",\"data\":\"\\ud83dx\"}", IMP_E_SYNTAX},
      /* raw control characters and invalid UTF-8 inside strings */
      {"{\"op\":\"msg\",\"to\":\"a\nb\"}", IMP_E_SYNTAX},
      {"{\"op\":\"msg\",\"to\":\"a\x7f\xff\"}", IMP_E_SYNTAX},
      {"{\"op\":\"msg\",\"to\":\"\xc0\xaf\"}", IMP_E_SYNTAX},
      {"{\"op\":\"msg\",\"to\":\"\xed\xb2\x80\"}", IMP_E_SYNTAX},
      {"{\"op\":\"msg\",\"data\":\"\xf8\x88\x80\x80\x80\"}", IMP_E_SYNTAX},
      {"{\"op\":\"msg\",\"x\xff\":1}", IMP_E_SYNTAX},
      /* op */
      {"{}", IMP_E_OP},
      {"{\"to\":\"bob\"}", IMP_E_OP},
      {"{\"op\":\"nope\"}", IMP_E_OP},
      {"{\"op\":\"\"}", IMP_E_OP},
      {"{\"op\":\"Msg\"}", IMP_E_OP},
      {"{\"op\":\"msg \"}", IMP_E_OP},
      {"{\"op\":3}", IMP_E_OP},
      {"{\"op\":null}", IMP_E_OP},
      {"{\"op\":[\"msg\"]}", IMP_E_OP},
      {"{\"op\":\"msg\",\"op\":\"bad\"}", IMP_E_OP},
      {"{\"op\":\"m\\u0000sg\"}", IMP_E_OP},
      /* kinds */
      {"{\"op\":\"msg\",\"to\":1}", IMP_E_TYPE},
      {"{\"op\":\"msg\",\"to\":null}", IMP_E_TYPE},
      {"{\"op\":\"msg\",\"to\":[\"a\"]}", IMP_E_TYPE},
      {"{\"op\":\"msg\",\"to\":\"a\\u0000b\"}", IMP_E_TYPE},
      {"{\"op\":\"msg\",\"seq\":\"1\"}", IMP_E_TYPE},
      {"{\"op\":\"msg\",\"seq\":-1}", IMP_E_TYPE},
      {"{\"op\":\"msg\",\"seq\":-0}", IMP_E_TYPE},
      {"{\"op\":\"msg\",\"seq\":1.0}", IMP_E_TYPE},
      {"{\"op\":\"msg\",\"seq\":1e3}", IMP_E_TYPE},
      {"{\"op\":\"msg\",\"seq\":true}", IMP_E_TYPE},
      {"{\"op\":\"msg\",\"ts\":18446744073709551616}", IMP_E_TYPE},
      {"{\"op\":\"msg\",\"more\":1}", IMP_E_TYPE},
      {"{\"op\":\"msg\",\"gap\":\"true\"}", IMP_E_TYPE},
      {"{\"op\":\"msg\",\"more\":null}", IMP_E_TYPE},
      /* precedence: syntax, then op, then the first bad field */
      {"{\"to\":1,\"op\":\"msg\",\"x\":01}", IMP_E_SYNTAX},
      {"{\"to\":1,\"op\":\"nope\"}", IMP_E_OP},
      {"{\"to\":1,\"seq\":\"x\",\"op\":\"msg\"}", IMP_E_TYPE},
  };
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
    imp_packet p;
    char scratch[256];
    int r = decode(cases[i].in, &p, scratch, sizeof scratch);
    if (r != cases[i].want)
      fail_msg("case %zu %s: got %d want %d", i, cases[i].in, r, cases[i].want);
  }
  imp_packet p;
  assert_int_equal(imp_json_decode(NULL, 0, &p, NULL, 0), IMP_E_SYNTAX);
  assert_false(imp_json_valid(NULL, 0));
  /* a NUL byte after the object is trailing garbage */
  assert_int_equal(imp_json_decode("{\"op\":\"msg\"}\0", 13, &p, NULL, 0), IMP_E_SYNTAX);
  /* surrounding whitespace is fine */
  assert_int_equal(decode(" \t\r\n{ \"op\" : \"msg\" } \n", &p, NULL, 0), IMP_OK);
  assert_int_equal(p.op, IMP_OP_MSG);
}

/* Every strict prefix of a valid packet is malformed. */
static void test_every_truncation(void **state) {
  (void)state;
  const char *in = "{\"op\":\"msg\",\"id\":\"1\\n\",\"seq\":12,\"more\":true,"
                   "\"data\":{\"a\":[1,\"\\ud83d\\ude00\",null]}}";
  size_t len = strlen(in);
  for (size_t n = 0; n < len; n++) {
    imp_packet p;
    char scratch[128];
    assert_int_equal(imp_json_decode(in, n, &p, scratch, sizeof scratch), IMP_E_SYNTAX);
  }
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_names_and_kinds),
      cmocka_unit_test(test_example_exact),
      cmocka_unit_test(test_every_op_and_key_roundtrip),
      cmocka_unit_test(test_encode_format),
      cmocka_unit_test(test_encode_escapes),
      cmocka_unit_test(test_encode_small_cap),
      cmocka_unit_test(test_data_spans),
      cmocka_unit_test(test_depth_limit),
      cmocka_unit_test(test_json_valid),
      cmocka_unit_test(test_string_fast_path),
      cmocka_unit_test(test_unescape_into_scratch),
      cmocka_unit_test(test_escaped_names),
      cmocka_unit_test(test_duplicates_last_wins),
      cmocka_unit_test(test_unknown_members),
      cmocka_unit_test(test_uint_fields),
      cmocka_unit_test(test_errors),
      cmocka_unit_test(test_every_truncation),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
