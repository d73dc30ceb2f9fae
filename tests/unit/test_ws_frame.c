#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <string.h>

#include "proto/ws_frame.h"

static const uint8_t wire_mask[4] = {0x37, 0xfa, 0x21, 0x3d};

/* Builds a client frame header with the given 7-bit length code and
 * extended length bytes, masked with wire_mask. Returns its size. */
static size_t client_hdr(uint8_t *out, uint8_t b0, uint8_t len7, const uint8_t *ext, size_t ext_len) {
  out[0] = b0;
  out[1] = (uint8_t)(0x80 | len7);
  memcpy(out + 2, ext, ext_len);
  memcpy(out + 2 + ext_len, wire_mask, 4);
  return 2 + ext_len + 4;
}

static void test_rfc_examples(void **state) {
  (void)state;
  /* RFC 6455 §5.7: unmasked "Hello" and masked "Hello" from a client. */
  static const uint8_t unmasked[] = {0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f};
  uint8_t masked[] = {0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58};
  ws_frame_hdr h;
  assert_int_equal(ws_frame_parse_header(unmasked, sizeof unmasked, false, &h), 2);
  assert_true(h.fin);
  assert_int_equal(h.opcode, WS_OP_TEXT);
  assert_false(h.masked);
  assert_int_equal(h.len, 5);
  assert_int_equal(h.hdr_len, 2);
  assert_int_equal(ws_frame_parse_header(unmasked, sizeof unmasked, true, &h), WS_FRAME_E_UNMASKED);

  assert_int_equal(ws_frame_parse_header(masked, sizeof masked, true, &h), 6);
  assert_true(h.masked);
  assert_int_equal(h.rsv, 0);
  assert_memory_equal(&h.mask, wire_mask, 4); /* raw wire bytes */
  ws_unmask(masked + 6, 5, h.mask, 0);
  assert_memory_equal(masked + 6, "Hello", 5);

  /* §5.7 fragmented "Hel" + "lo", and a masked ping. */
  static const uint8_t frag1[] = {0x01, 0x03, 0x48, 0x65, 0x6c};
  static const uint8_t frag2[] = {0x80, 0x02, 0x6c, 0x6f};
  assert_int_equal(ws_frame_parse_header(frag1, sizeof frag1, false, &h), 2);
  assert_false(h.fin);
  assert_int_equal(h.opcode, WS_OP_TEXT);
  assert_int_equal(ws_frame_parse_header(frag2, sizeof frag2, false, &h), 2);
  assert_true(h.fin);
  assert_int_equal(h.opcode, WS_OP_CONT);
}

static void test_lengths_7_16_64(void **state) {
  (void)state;
  static const struct {
    uint64_t len;
    size_t ext;
  } cases[] = {{0, 0},     {1, 0},      {125, 0},         {126, 2},          {127, 2},
               {65535, 2}, {65536, 8},  {0x100000000u, 8}, {INT64_MAX, 8}};
  for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
    uint8_t buf[14], ext[8];
    for (size_t i = 0; i < cases[c].ext; i++)
      ext[i] = (uint8_t)(cases[c].len >> (8 * (cases[c].ext - 1 - i)));
    uint8_t len7 = cases[c].ext == 0 ? (uint8_t)cases[c].len : cases[c].ext == 2 ? 126 : 127;
    size_t n = client_hdr(buf, 0x82, len7, ext, cases[c].ext);
    ws_frame_hdr h;
    assert_int_equal(ws_frame_parse_header(buf, n, true, &h), (int)n);
    assert_int_equal(h.len, cases[c].len);
    assert_int_equal(h.hdr_len, n);
    assert_int_equal(h.opcode, WS_OP_BINARY);
    assert_memory_equal(&h.mask, wire_mask, 4);
    for (size_t k = 0; k < n; k++)
      assert_int_equal(ws_frame_parse_header(buf, k, true, &h), WS_FRAME_INCOMPLETE);
  }
}

static void test_non_minimal_lengths_rejected(void **state) {
  (void)state;
  uint8_t buf[14];
  ws_frame_hdr h;
  static const uint8_t e16_125[] = {0x00, 0x7d}, e16_0[] = {0x00, 0x00};
  static const uint8_t e64_65535[] = {0, 0, 0, 0, 0, 0, 0xff, 0xff};
  static const uint8_t e64_126[] = {0, 0, 0, 0, 0, 0, 0, 0x7e};
  static const uint8_t e64_msb[] = {0x80, 0, 0, 0, 0, 0, 0, 0};
  static const uint8_t e64_max[] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
  size_t n = client_hdr(buf, 0x82, 126, e16_125, 2);
  assert_int_equal(ws_frame_parse_header(buf, n, true, &h), WS_FRAME_E_LENGTH);
  /* Refused as soon as the length bytes are in, before the mask. */
  assert_int_equal(ws_frame_parse_header(buf, 4, true, &h), WS_FRAME_E_LENGTH);
  n = client_hdr(buf, 0x82, 126, e16_0, 2);
  assert_int_equal(ws_frame_parse_header(buf, n, true, &h), WS_FRAME_E_LENGTH);
  n = client_hdr(buf, 0x82, 127, e64_65535, 8);
  assert_int_equal(ws_frame_parse_header(buf, n, true, &h), WS_FRAME_E_LENGTH);
  n = client_hdr(buf, 0x82, 127, e64_126, 8);
  assert_int_equal(ws_frame_parse_header(buf, n, true, &h), WS_FRAME_E_LENGTH);
  n = client_hdr(buf, 0x82, 127, e64_msb, 8);
  assert_int_equal(ws_frame_parse_header(buf, n, true, &h), WS_FRAME_E_LENGTH);
  n = client_hdr(buf, 0x82, 127, e64_max, 8);
  assert_int_equal(ws_frame_parse_header(buf, n, true, &h), WS_FRAME_E_LENGTH);
  assert_int_equal(ws_frame_parse_header(buf, 10, true, &h), WS_FRAME_E_LENGTH);
}

static void test_rsv_bits_rejected(void **state) {
  (void)state;
  ws_frame_hdr h;
  for (unsigned rsv = 1; rsv < 8; rsv++) {
    uint8_t buf[6] = {(uint8_t)(0x81 | rsv << 4), 0x80, 1, 2, 3, 4};
    assert_int_equal(ws_frame_parse_header(buf, sizeof buf, true, &h), WS_FRAME_E_RSV);
    assert_int_equal(ws_frame_parse_header(buf, 1, true, &h), WS_FRAME_E_RSV);
  }
}

static void test_opcodes(void **state) {
  (void)state;
  ws_frame_hdr h;
  for (unsigned op = 0; op < 16; op++) {
    uint8_t buf[6] = {(uint8_t)(0x80 | op), 0x80, 1, 2, 3, 4};
    int r = ws_frame_parse_header(buf, sizeof buf, true, &h);
    if ((op >= 3 && op <= 7) || op >= 0xb) {
      assert_int_equal(r, WS_FRAME_E_OPCODE);
      assert_int_equal(ws_frame_parse_header(buf, 1, true, &h), WS_FRAME_E_OPCODE);
    } else {
      assert_int_equal(r, 6);
      assert_int_equal(h.opcode, op);
    }
  }
}

static void test_control_frames(void **state) {
  (void)state;
  ws_frame_hdr h;
  static const uint8_t ctl[] = {WS_OP_CLOSE, WS_OP_PING, WS_OP_PONG};
  for (size_t i = 0; i < sizeof ctl; i++) {
    uint8_t frag[6] = {ctl[i], 0x80, 1, 2, 3, 4}; /* FIN=0 */
    assert_int_equal(ws_frame_parse_header(frag, sizeof frag, true, &h), WS_FRAME_E_CONTROL);
    assert_int_equal(ws_frame_parse_header(frag, 1, true, &h), WS_FRAME_E_CONTROL);
    uint8_t ok[6] = {(uint8_t)(0x80 | ctl[i]), 0x80 | 125, 1, 2, 3, 4};
    assert_int_equal(ws_frame_parse_header(ok, sizeof ok, true, &h), 6);
    assert_int_equal(h.len, 125);
    uint8_t big16[8] = {(uint8_t)(0x80 | ctl[i]), 0x80 | 126, 0, 126, 1, 2, 3, 4};
    assert_int_equal(ws_frame_parse_header(big16, 2, true, &h), WS_FRAME_E_CONTROL);
    uint8_t big64[14] = {(uint8_t)(0x80 | ctl[i]), 0x80 | 127, 0, 0, 0, 0, 0, 1, 0, 0};
    assert_int_equal(ws_frame_parse_header(big64, sizeof big64, true, &h), WS_FRAME_E_CONTROL);
  }
}

static void test_unmasked(void **state) {
  (void)state;
  ws_frame_hdr h;
  uint8_t buf[4] = {0x82, 126, 0x01, 0x00};
  assert_int_equal(ws_frame_parse_header(buf, 2, true, &h), WS_FRAME_E_UNMASKED);
  assert_int_equal(ws_frame_parse_header(buf, 4, false, &h), 4);
  assert_false(h.masked);
  assert_int_equal(h.mask, 0);
  assert_int_equal(h.len, 256);
}

static void test_encode_header(void **state) {
  (void)state;
  uint8_t out[10];
  ws_frame_hdr h;
  assert_int_equal(ws_frame_encode_header(out, WS_OP_TEXT, true, 5), 2);
  assert_memory_equal(out, "\x81\x05", 2);
  assert_int_equal(ws_frame_encode_header(out, WS_OP_BINARY, false, 125), 2);
  assert_memory_equal(out, "\x02\x7d", 2);
  assert_int_equal(ws_frame_encode_header(out, WS_OP_BINARY, true, 126), 4);
  assert_memory_equal(out, "\x82\x7e\x00\x7e", 4);
  assert_int_equal(ws_frame_encode_header(out, WS_OP_BINARY, true, 65535), 4);
  assert_memory_equal(out, "\x82\x7e\xff\xff", 4);
  assert_int_equal(ws_frame_encode_header(out, WS_OP_BINARY, true, 65536), 10);
  assert_memory_equal(out, "\x82\x7f\x00\x00\x00\x00\x00\x01\x00\x00", 10);
  assert_int_equal(ws_frame_encode_header(out, WS_OP_CLOSE, true, 2), 2);
  assert_memory_equal(out, "\x88\x02", 2);

  static const uint64_t lens[] = {0, 125, 126, 65535, 65536, 0x123456789au};
  for (size_t i = 0; i < sizeof lens / sizeof lens[0]; i++) {
    size_t n = ws_frame_encode_header(out, WS_OP_TEXT, true, lens[i]);
    assert_int_equal(ws_frame_parse_header(out, n, false, &h), (int)n);
    assert_int_equal(h.len, lens[i]);
    assert_true(h.fin);
    assert_false(h.masked);
  }
}

static void naive_unmask(uint8_t *p, size_t n, const uint8_t key[4], uint64_t offset) {
  for (size_t i = 0; i < n; i++)
    p[i] ^= key[(offset + i) % 4];
}

static void test_unmask_matches_naive(void **state) {
  (void)state;
  uint32_t mask;
  memcpy(&mask, wire_mask, 4);
  uint8_t base[64], fast[64], slow[64];
  for (size_t i = 0; i < sizeof base; i++)
    base[i] = (uint8_t)(i * 37 + 11);
  for (uint64_t offset = 0; offset < 8; offset++)
    for (size_t len = 0; len <= 40; len++)
      for (size_t start = 0; start < 8; start++) { /* unaligned buffers too */
        memcpy(fast, base, sizeof base);
        memcpy(slow, base, sizeof base);
        ws_unmask(fast + start, len, mask, offset);
        naive_unmask(slow + start, len, wire_mask, offset);
        assert_memory_equal(fast, slow, sizeof fast);
      }
}

static void test_unmask_in_pieces(void **state) {
  (void)state;
  uint32_t mask;
  memcpy(&mask, wire_mask, 4);
  uint8_t whole[100], pieces[100];
  for (size_t i = 0; i < sizeof whole; i++)
    whole[i] = (uint8_t)(i ^ 0x5a);
  memcpy(pieces, whole, sizeof whole);
  ws_unmask(whole, sizeof whole, mask, 0);
  static const size_t cuts[] = {0, 1, 3, 4, 9, 17, 18, 40, 63, 99, 100};
  for (size_t c = 0; c + 1 < sizeof cuts / sizeof cuts[0]; c++)
    ws_unmask(pieces + cuts[c], cuts[c + 1] - cuts[c], mask, cuts[c]);
  assert_memory_equal(whole, pieces, sizeof whole);
  /* Unmasking twice restores the input. */
  ws_unmask(whole, sizeof whole, mask, 0);
  for (size_t i = 0; i < sizeof whole; i++)
    assert_int_equal(whole[i], (uint8_t)(i ^ 0x5a));
}

static void test_close_codes(void **state) {
  (void)state;
  static const unsigned valid[] = {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010,
                                   1011, 1012, 1013, 1014, 3000, 3999, 4000, 4999};
  static const unsigned invalid[] = {0,    999,  1004, 1005, 1006, 1015, 1016, 1100,
                                     2000, 2999, 5000, 65535, 65536};
  for (size_t i = 0; i < sizeof valid / sizeof valid[0]; i++)
    assert_true(ws_close_code_valid(valid[i]));
  for (size_t i = 0; i < sizeof invalid / sizeof invalid[0]; i++)
    assert_false(ws_close_code_valid(invalid[i]));
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_rfc_examples),
      cmocka_unit_test(test_lengths_7_16_64),
      cmocka_unit_test(test_non_minimal_lengths_rejected),
      cmocka_unit_test(test_rsv_bits_rejected),
      cmocka_unit_test(test_opcodes),
      cmocka_unit_test(test_control_frames),
      cmocka_unit_test(test_unmasked),
      cmocka_unit_test(test_encode_header),
      cmocka_unit_test(test_unmask_matches_naive),
      cmocka_unit_test(test_unmask_in_pieces),
      cmocka_unit_test(test_close_codes),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
