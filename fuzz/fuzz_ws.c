/* libFuzzer harness: a WebSocket connection through the engine.
 *
 * Input: see fuzz_common.h. mode & 7 picks a valid prefix sent before the
 * stream (0: none, so the upgrade request itself is fuzzed), mode & 8 makes
 * the server accept any request path. Stream bytes after the upgrade are
 * client frames, which must be masked to be accepted. */
#include "fuzz_engine.h"

#define UPGRADE_HEAD                    \
  "Host: example.com\r\n"               \
  "Upgrade: websocket\r\n"              \
  "Connection: Upgrade\r\n"             \
  "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n" \
  "Sec-WebSocket-Version: 13\r\n"

static const char up_json[] = "GET /ws HTTP/1.1\r\n" UPGRADE_HEAD "\r\n";
static const char up_bin[] =
    "GET /ws HTTP/1.1\r\n" UPGRADE_HEAD "Sec-WebSocket-Protocol: imp.bin\r\n\r\n";
static const char up_query[] =
    "GET /ws?uid=alice&token=t1&device=d1&platform=web HTTP/1.1\r\n" UPGRADE_HEAD "\r\n";
static const char up_query_pending[] =
    "GET /ws?uid=bob&token=pa HTTP/1.1\r\n" UPGRADE_HEAD
    "Sec-WebSocket-Protocol: imp.bin, imp.json\r\n\r\n";

static const char auth_json[] = "{\"op\":\"auth\",\"uid\":\"alice\",\"token\":\"t1\"}";
static const char auth_json_pending[] = "{\"op\":\"auth\",\"uid\":\"bob\",\"token\":\"pa\"}";
static const uint8_t auth_bin[] = {0x01, 0x01, 5, 'a', 'l', 'i', 'c', 'e', 0x02, 2, 't', '1'};

/* Append one masked client frame. */
static void client_frame(fz_buf *b, uint8_t op, const void *payload, size_t n) {
  static const uint8_t key[4] = {0x37, 0xfa, 0x21, 0x3d};
  uint8_t hdr[8] = {(uint8_t)(0x80 | op), 0};
  size_t hl = 2;
  if (n < 126) {
    hdr[1] = (uint8_t)(0x80 | n);
  } else {
    hdr[1] = 0x80 | 126;
    hdr[2] = (uint8_t)(n >> 8);
    hdr[3] = (uint8_t)n;
    hl = 4;
  }
  fz_buf_add(b, hdr, hl);
  fz_buf_add(b, key, 4);
  for (size_t i = 0; i < n; i++) {
    uint8_t x = ((const uint8_t *)payload)[i] ^ key[i & 3];
    fz_buf_add(b, &x, 1);
  }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  fz_input in;
  if (!fz_input_init(&in, data, size)) return 0;
  fz_buf pre = {0};
  switch (in.mode & 7) {
    case 0:
      break;
    case 1:
      fz_buf_add(&pre, up_json, sizeof up_json - 1);
      break;
    case 2:
      fz_buf_add(&pre, up_bin, sizeof up_bin - 1);
      break;
    case 3:
      fz_buf_add(&pre, up_query, sizeof up_query - 1);
      break;
    case 4:
      fz_buf_add(&pre, up_json, sizeof up_json - 1);
      client_frame(&pre, WS_OP_TEXT, auth_json, sizeof auth_json - 1);
      break;
    case 5:
      fz_buf_add(&pre, up_bin, sizeof up_bin - 1);
      client_frame(&pre, WS_OP_BINARY, auth_bin, sizeof auth_bin);
      break;
    case 6:
      fz_buf_add(&pre, up_query_pending, sizeof up_query_pending - 1);
      break;
    case 7:
      fz_buf_add(&pre, up_json, sizeof up_json - 1);
      client_frame(&pre, WS_OP_TEXT, auth_json_pending, sizeof auth_json_pending - 1);
      break;
  }
  fz_engine_run(IM_TRANSPORT_WS, (in.mode & 8) ? NULL : "/ws", pre.p, pre.n, &in);
  fz_buf_free(&pre);
  return 0;
}
