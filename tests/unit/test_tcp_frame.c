#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <string.h>

#include "proto/tcp_frame.h"

static void test_encode_header_big_endian(void **state) {
  (void)state;
  uint8_t out[4];
  tcp_frame_encode_header(out, 0x01020304u);
  assert_memory_equal(out, "\x01\x02\x03\x04", 4);
  tcp_frame_encode_header(out, 1);
  assert_memory_equal(out, "\x00\x00\x00\x01", 4);
}

static void test_complete_frame(void **state) {
  (void)state;
  uint8_t buf[16];
  tcp_frame_encode_header(buf, 4);
  memcpy(buf + 4, "\x07" "abc", 4);
  memcpy(buf + 8, "\x00\x00\x00\x01\x09", 5); /* a second frame right behind */
  const uint8_t *body = NULL;
  uint32_t body_len = 0;
  assert_int_equal(tcp_frame_parse(buf, 13, 1024, &body, &body_len), 8);
  assert_ptr_equal(body, buf + 4);
  assert_int_equal(body_len, 4);
  assert_int_equal(body[0], 7);
  assert_int_equal(tcp_frame_parse(buf + 8, 5, 1024, &body, &body_len), 5);
  assert_int_equal(body_len, 1);
  assert_int_equal(body[0], 9);
}

static void test_incomplete(void **state) {
  (void)state;
  uint8_t buf[8] = {0, 0, 0, 4, 1, 2, 3, 4};
  const uint8_t *body = NULL;
  uint32_t body_len = 0;
  for (size_t n = 0; n < sizeof buf; n++)
    assert_int_equal(tcp_frame_parse(buf, n, 1024, &body, &body_len), TCP_FRAME_INCOMPLETE);
  assert_null(body);
  assert_int_equal(tcp_frame_parse(buf, sizeof buf, 1024, &body, &body_len), 8);
}

static void test_empty_frame_rejected(void **state) {
  (void)state;
  const uint8_t buf[4] = {0, 0, 0, 0};
  const uint8_t *body;
  uint32_t body_len;
  assert_int_equal(tcp_frame_parse(buf, 4, 1024, &body, &body_len), TCP_FRAME_E_EMPTY);
}

static void test_too_big_from_header_alone(void **state) {
  (void)state;
  uint8_t buf[4];
  const uint8_t *body;
  uint32_t body_len;
  tcp_frame_encode_header(buf, 1025);
  assert_int_equal(tcp_frame_parse(buf, 4, 1024, &body, &body_len), TCP_FRAME_E_TOO_BIG);
  assert_int_equal(tcp_frame_parse(buf, 3, 1024, &body, &body_len), TCP_FRAME_INCOMPLETE);
  tcp_frame_encode_header(buf, 1024);
  assert_int_equal(tcp_frame_parse(buf, 4, 1024, &body, &body_len), TCP_FRAME_INCOMPLETE);
  tcp_frame_encode_header(buf, UINT32_MAX);
  assert_int_equal(tcp_frame_parse(buf, 4, 1024, &body, &body_len), TCP_FRAME_E_TOO_BIG);
}

static void test_largest_length_without_overflow(void **state) {
  (void)state;
  uint8_t buf[4];
  const uint8_t *body;
  uint32_t body_len;
  tcp_frame_encode_header(buf, UINT32_MAX);
  long r = tcp_frame_parse(buf, 4, UINT32_MAX, &body, &body_len);
  if (sizeof(long) > 4)
    assert_int_equal(r, TCP_FRAME_INCOMPLETE);
  else
    assert_int_equal(r, TCP_FRAME_E_TOO_BIG);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_encode_header_big_endian),
      cmocka_unit_test(test_complete_frame),
      cmocka_unit_test(test_incomplete),
      cmocka_unit_test(test_empty_frame_rejected),
      cmocka_unit_test(test_too_big_from_header_alone),
      cmocka_unit_test(test_largest_length_without_overflow),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
