/* libFuzzer harness: a raw TCP connection (binary IMP in u32-length-prefixed
 * frames) through the engine.
 *
 * Input: see fuzz_common.h. mode & 3 picks a valid prefix sent before the
 * stream: 0 none, 1 an auth frame, 2 an auth the application decides later
 * (IM_AUTH_PENDING), 3 an auth frame and a join of room "r1". */
#include "fuzz_engine.h"

/* Append one TCP frame holding a binary IMP packet. */
static void tcp_frame(fz_buf *b, const uint8_t *body, size_t n) {
  uint8_t hdr[4];
  tcp_frame_encode_header(hdr, (uint32_t)n);
  fz_buf_add(b, hdr, 4);
  fz_buf_add(b, body, n);
}

static const uint8_t auth[] = {IMP_OP_AUTH, IMP_K_UID, 5, 'a', 'l', 'i', 'c', 'e',
                               IMP_K_TOKEN, 2, 't', '1', IMP_K_DEVICE, 2, 'd', '1'};
static const uint8_t auth_pending[] = {IMP_OP_AUTH, IMP_K_UID, 3, 'b', 'o', 'b',
                                       IMP_K_TOKEN, 2, 'p', 'a'};
static const uint8_t join[] = {IMP_OP_JOIN, IMP_K_CID, 2, 'j', '1', IMP_K_ROOM, 2, 'r', '1'};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  fz_input in;
  if (!fz_input_init(&in, data, size)) return 0;
  fz_buf pre = {0};
  switch (in.mode & 3) {
    case 0:
      break;
    case 1:
      tcp_frame(&pre, auth, sizeof auth);
      break;
    case 2:
      tcp_frame(&pre, auth_pending, sizeof auth_pending);
      break;
    case 3:
      tcp_frame(&pre, auth, sizeof auth);
      tcp_frame(&pre, join, sizeof join);
      break;
  }
  fz_engine_run(IM_TRANSPORT_TCP, "/ws", pre.p, pre.n, &in);
  fz_buf_free(&pre);
  return 0;
}
