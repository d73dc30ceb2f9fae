#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdbool.h>
#include <string.h>

#include "proto/utf8.h"

/* A plain decoder written differently from the validator (decode, then
 * check the code point), used as the oracle for exhaustive comparisons. */
static bool ref_valid(const uint8_t *p, size_t n) {
  size_t i = 0;
  while (i < n) {
    uint8_t b = p[i];
    size_t len;
    uint32_t cp, min;
    if (b < 0x80) {
      i++;
      continue;
    } else if ((b & 0xe0) == 0xc0) {
      len = 2, cp = b & 0x1f, min = 0x80;
    } else if ((b & 0xf0) == 0xe0) {
      len = 3, cp = b & 0x0f, min = 0x800;
    } else if ((b & 0xf8) == 0xf0) {
      len = 4, cp = b & 0x07, min = 0x10000;
    } else {
      return false;
    }
    if (n - i < len)
      return false;
    for (size_t k = 1; k < len; k++) {
      if ((p[i + k] & 0xc0) != 0x80)
        return false;
      cp = (cp << 6) | (p[i + k] & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
      return false;
    i += len;
  }
  return true;
}

static uint32_t validate(const char *s, size_t n) {
  return utf8_validate(UTF8_ACCEPT, (const uint8_t *)s, n);
}

static const char mixed[] =
    "Hello, \xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5! " /* κόσμε */
    "\xc2\x80\xdf\xbf"                                     /* U+0080, U+07FF */
    "\xe0\xa0\x80\xef\xbf\xbf\xed\x9f\xbf\xee\x80\x80"     /* U+0800, U+FFFF, U+D7FF, U+E000 */
    "\xf0\x90\x80\x80\xf4\x8f\xbf\xbf"                     /* U+10000, U+10FFFF */
    "\xe4\xbd\xa0\xe5\xa5\xbd \xf0\x9f\x98\x80 plain ascii tail";

static void test_ascii_and_empty(void **state) {
  (void)state;
  assert_int_equal(validate("", 0), UTF8_ACCEPT);
  assert_int_equal(validate("hello world, this is ascii", 26), UTF8_ACCEPT);
  assert_int_equal(validate("\0\x7f", 2), UTF8_ACCEPT);
}

static void test_valid_multibyte(void **state) {
  (void)state;
  assert_int_equal(validate(mixed, sizeof mixed - 1), UTF8_ACCEPT);
  assert_true(ref_valid((const uint8_t *)mixed, sizeof mixed - 1));
}

static void test_split_at_every_boundary(void **state) {
  (void)state;
  const uint8_t *p = (const uint8_t *)mixed;
  size_t n = sizeof mixed - 1;
  for (size_t i = 0; i <= n; i++) {
    uint32_t s = utf8_validate(UTF8_ACCEPT, p, i);
    assert_int_not_equal(s, UTF8_REJECT);
    assert_int_equal(utf8_validate(s, p + i, n - i), UTF8_ACCEPT);
    for (size_t j = i; j <= n; j++) {
      uint32_t s2 = utf8_validate(s, p + i, j - i);
      assert_int_not_equal(s2, UTF8_REJECT);
      assert_int_equal(utf8_validate(s2, p + j, n - j), UTF8_ACCEPT);
    }
  }
  uint32_t s = UTF8_ACCEPT;
  for (size_t i = 0; i < n; i++)
    s = utf8_validate(s, p + i, 1);
  assert_int_equal(s, UTF8_ACCEPT);
}

static void test_mid_sequence_state(void **state) {
  (void)state;
  uint32_t s = validate("\xe2\x82", 2);
  assert_int_not_equal(s, UTF8_ACCEPT);
  assert_int_not_equal(s, UTF8_REJECT);
  assert_int_equal(utf8_validate(s, (const uint8_t *)"\xac", 1), UTF8_ACCEPT);
  s = validate("a\xf0\x9f", 3);
  assert_int_not_equal(s, UTF8_ACCEPT);
  assert_int_not_equal(s, UTF8_REJECT);
  s = utf8_validate(s, (const uint8_t *)"\x98", 1);
  assert_int_not_equal(s, UTF8_ACCEPT);
  assert_int_not_equal(s, UTF8_REJECT);
  assert_int_equal(utf8_validate(s, (const uint8_t *)"\x80", 1), UTF8_ACCEPT);
}

struct bad_case {
  const char *bytes;
  size_t len;
  size_t bad_at; /* index of the first byte that makes the input impossible */
};

#define BAD(s, at) {s, sizeof s - 1, at}

static const struct bad_case bad_cases[] = {
    BAD("\x80", 0),             /* lone continuation */
    BAD("ab\xbf", 2),           /* lone continuation after ASCII */
    BAD("\xc0\x80", 0),         /* overlong NUL */
    BAD("\xc1\xbf", 0),         /* overlong 2-byte */
    BAD("\xe0\x80\x80", 1),     /* overlong 3-byte */
    BAD("\xe0\x9f\xbf", 1),     /* overlong 3-byte, top of range */
    BAD("\xf0\x80\x80\x80", 1), /* overlong 4-byte */
    BAD("\xf0\x8f\xbf\xbf", 1), /* overlong 4-byte, top of range */
    BAD("\xed\xa0\x80", 1),     /* U+D800 surrogate */
    BAD("\xed\xbf\xbf", 1),     /* U+DFFF surrogate */
    BAD("\xf4\x90\x80\x80", 1), /* U+110000 */
    BAD("\xf5\x80\x80\x80", 0), /* lead above F4 */
    BAD("\xf8\x88\x80\x80\x80", 0),
    BAD("\xfe", 0),
    BAD("\xff", 0),
    BAD("\xc3" "A", 1),         /* missing continuation */
    BAD("\xe2\x82" "A", 2),     /* truncated 3-byte */
    BAD("\xf0\x9f\x98" "A", 3), /* truncated 4-byte */
    BAD("\xe2\xc3\xa9", 1),     /* new lead inside a sequence */
    BAD("\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80" "edited", 12),
};

static void test_invalid_rejected_at_first_bad_byte(void **state) {
  (void)state;
  for (size_t c = 0; c < sizeof bad_cases / sizeof bad_cases[0]; c++) {
    const struct bad_case *bc = &bad_cases[c];
    const uint8_t *p = (const uint8_t *)bc->bytes;
    assert_false(ref_valid(p, bc->len));
    assert_int_equal(utf8_validate(UTF8_ACCEPT, p, bc->len), UTF8_REJECT);
    assert_int_not_equal(utf8_validate(UTF8_ACCEPT, p, bc->bad_at), UTF8_REJECT);
    assert_int_equal(utf8_validate(UTF8_ACCEPT, p, bc->bad_at + 1), UTF8_REJECT);
  }
}

static void test_truncated_end_is_not_accept(void **state) {
  (void)state;
  assert_int_not_equal(validate("\xc3", 1), UTF8_ACCEPT);
  assert_int_not_equal(validate("abc\xe2\x82", 5), UTF8_ACCEPT);
  assert_int_not_equal(validate("\xf4\x8f\xbf", 3), UTF8_ACCEPT);
}

static void test_reject_is_sticky(void **state) {
  (void)state;
  assert_int_equal(utf8_validate(UTF8_REJECT, (const uint8_t *)"abc", 3), UTF8_REJECT);
  assert_int_equal(utf8_validate(UTF8_REJECT, (const uint8_t *)"", 0), UTF8_REJECT);
}

static void check_against_ref(const uint8_t *p, size_t n) {
  uint32_t s = utf8_validate(UTF8_ACCEPT, p, n);
  if (ref_valid(p, n))
    assert_int_equal(s, UTF8_ACCEPT);
  else
    assert_int_not_equal(s, UTF8_ACCEPT);
}

/* The word-at-a-time ASCII path must not skip a bad or multi-byte byte at any
 * position within or across words. */
static void test_ascii_fast_path_positions(void **state) {
  (void)state;
  uint8_t buf[80];
  for (size_t pos = 0; pos < 64; pos++) {
    memset(buf, 'x', sizeof buf);
    buf[pos] = 0x80;
    assert_int_equal(utf8_validate(UTF8_ACCEPT, buf, sizeof buf), UTF8_REJECT);
    buf[pos] = 0xc3;
    buf[pos + 1] = 0xa9;
    assert_int_equal(utf8_validate(UTF8_ACCEPT, buf, sizeof buf), UTF8_ACCEPT);
    buf[pos + 1] = 'x';
    assert_int_equal(utf8_validate(UTF8_ACCEPT, buf, sizeof buf), UTF8_REJECT);
    for (size_t off = 0; off < 8; off++) {
      memset(buf, 'x', sizeof buf);
      memcpy(buf + pos, "\xf0\x9f\x98\x80", 4);
      check_against_ref(buf + off, sizeof buf - off - 8);
    }
  }
}

static void test_exhaustive_short_sequences(void **state) {
  (void)state;
  uint8_t b[4];
  for (unsigned x = 0; x < 256; x++) {
    b[0] = (uint8_t)x;
    check_against_ref(b, 1);
    for (unsigned y = 0; y < 256; y++) {
      b[1] = (uint8_t)y;
      check_against_ref(b, 2);
    }
  }
  for (unsigned x = 0xe0; x < 0xf0; x++)
    for (unsigned y = 0; y < 256; y++)
      for (unsigned z = 0; z < 256; z++) {
        b[0] = (uint8_t)x, b[1] = (uint8_t)y, b[2] = (uint8_t)z;
        check_against_ref(b, 3);
      }
  static const uint8_t edges[] = {0x00, 0x41, 0x7f, 0x80, 0x8f, 0x90, 0x9f, 0xa0, 0xbf, 0xc0, 0xff};
  for (unsigned x = 0xf0; x < 0x100; x++)
    for (unsigned y = 0; y < 256; y++)
      for (size_t z = 0; z < sizeof edges; z++)
        for (size_t w = 0; w < sizeof edges; w++) {
          b[0] = (uint8_t)x, b[1] = (uint8_t)y, b[2] = edges[z], b[3] = edges[w];
          check_against_ref(b, 4);
        }
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_ascii_and_empty),
      cmocka_unit_test(test_valid_multibyte),
      cmocka_unit_test(test_split_at_every_boundary),
      cmocka_unit_test(test_mid_sequence_state),
      cmocka_unit_test(test_invalid_rejected_at_first_bad_byte),
      cmocka_unit_test(test_truncated_end_is_not_accept),
      cmocka_unit_test(test_reject_is_sticky),
      cmocka_unit_test(test_ascii_fast_path_positions),
      cmocka_unit_test(test_exhaustive_short_sequences),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
