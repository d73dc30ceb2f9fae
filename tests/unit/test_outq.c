/* A connection's output queue as a driver sees it (im_conn_pending /
 * im_conn_sent): frames leave in the order they were queued, whatever the
 * write sizes; many queued frames come out as one batch of iovecs; the
 * max_output bound sheds without breaking a partly written frame; a
 * reliable retransmit is the same bytes; a member shed in the middle of a
 * room fan-out does not cost another member its copy. Run under ASan, the
 * same tests show that queue nodes and shared buffers are not leaked. */
#include "engine_fixture.h"

/* Everything pending on c, written `step` bytes at a time through at most
 * `iovmax` iovecs per call; returns the bytes (NUL-terminated). */
static size_t drain_by(im_server *s, im_conn_id c, uint8_t *out, size_t cap, size_t step,
                       int iovmax, int *max_batch) {
  struct iovec iov[64];
  size_t total = 0;
  int n;
  while ((n = im_conn_pending(s, c, iov, iovmax)) > 0) {
    if (max_batch && n > *max_batch) *max_batch = n;
    size_t w = 0;
    for (int i = 0; i < n && w < step; i++) {
      size_t k = iov[i].iov_len < step - w ? iov[i].iov_len : step - w;
      assert_true(total + k < cap);
      memcpy(out + total, iov[i].iov_base, k);
      total += k;
      w += k;
    }
    assert_int_equal(im_conn_sent(s, c, w), 0);
  }
  out[total] = 0;
  return total;
}

static im_msg text_msg(char *buf, size_t cap, int i) {
  int n = snprintf(buf, cap, "\"m%d\"", i);
  im_msg m = {.from = "sys", .data = buf, .data_len = (size_t)n};
  return m;
}

/* The data field of frame fr is "m<i>". */
static void assert_frame_is(const sframe *fr, int i) {
  char want[32];
  int n = snprintf(want, sizeof want, "\"data\":\"m%d\"", i);
  assert_int_equal(fr->op, 1);
  assert_non_null(memmem(fr->pl, fr->len, want, (size_t)n));
}

static void test_order_across_write_sizes(void **st) {
  (void)st;
  fake f;
  im_server *s = new_server(&f, NULL);
  im_conn_id c = ws_open(s, &f, "alice");
  enum { N = 40 }; /* several queue nodes' worth */
  static const size_t steps[] = {1, 7, 64, 100000};
  static const int iovmaxes[] = {1, 3, 64, 64};
  for (size_t t = 0; t < sizeof steps / sizeof *steps; t++) {
    for (int i = 0; i < N; i++) {
      char d[16];
      im_msg m = text_msg(d, sizeof d, i);
      assert_int_equal(im_send_conn(s, c, &m), 0);
    }
    static uint8_t out[65536];
    int batch = 0;
    size_t n = drain_by(s, c, out, sizeof out, steps[t], iovmaxes[t], &batch);
    sframe fr[N];
    assert_int_equal(parse_frames(out, n, fr, N), N);
    for (int i = 0; i < N; i++) assert_frame_is(&fr[i], i);
    /* the queue hands out as many as asked, across its nodes */
    assert_int_equal(batch, iovmaxes[t] < N ? iovmaxes[t] : N);
    struct iovec iov[4];
    assert_int_equal(im_conn_pending(s, c, iov, 4), 0);
  }
  im_stats stt;
  im_server_stats(s, &stt);
  assert_int_equal(stt.out_queued, 0);
  im_server_free(s);
}

static void test_room_messages_batch_per_member(void **st) {
  (void)st;
  fake f;
  im_server *s = new_server(&f, NULL);
  im_conn_id c[3] = {ws_open(s, &f, "a"), ws_open(s, &f, "b"), ws_open(s, &f, "c")};
  for (int i = 0; i < 3; i++) assert_int_equal(im_room_join(s, c[i], "r"), 0);
  enum { N = 20 };
  for (int i = 0; i < N; i++) {
    char d[16];
    im_msg m = text_msg(d, sizeof d, i);
    m.room = "r";
    assert_int_equal(im_room_send(s, "r", &m, 0), 3);
  }
  for (int k = 0; k < 3; k++) {
    /* one loop pass of a driver: all 20 frames in one call */
    struct iovec iov[64];
    assert_int_equal(im_conn_pending(s, c[k], iov, 64), N);
    static uint8_t out[16384];
    size_t n = drain_by(s, c[k], out, sizeof out, 100000, 64, NULL);
    sframe fr[N];
    assert_int_equal(parse_frames(out, n, fr, N), N);
    for (int i = 0; i < N; i++) assert_frame_is(&fr[i], i);
  }
  im_server_free(s);
}

static void test_shed_keeps_partial_frame(void **st) {
  (void)st;
  fake f;
  im_config cfg;
  im_config_init(&cfg);
  cfg.max_output = 4096;
  im_server *s = new_server(&f, &cfg);
  im_conn_id c = ws_open(s, &f, "slow");
  char data[802];
  memset(data, 'x', sizeof data);
  data[0] = data[sizeof data - 1] = '"';
  im_msg m = {.data = data, .data_len = sizeof data};
  assert_int_equal(im_send_conn(s, c, &m), 0);
  assert_int_equal(im_send_conn(s, c, &m), 0);
  /* the driver wrote 10 bytes of the first frame */
  struct iovec iov[8];
  assert_int_equal(im_conn_pending(s, c, iov, 8), 2);
  uint8_t out[8192];
  size_t first = iov[0].iov_len;
  memcpy(out, iov[0].iov_base, 10);
  assert_int_equal(im_conn_sent(s, c, 10), 0);
  int rc;
  while ((rc = im_send_conn(s, c, &m)) == 0) {
  }
  assert_int_equal(rc, IM_EFULL);
  /* what is left: the rest of the first frame, then the close frame */
  size_t n = 10 + drain(s, c, out + 10, sizeof out - 10);
  sframe fr[4];
  assert_int_equal(parse_frames(out, n, fr, 4), 2);
  assert_int_equal(fr[0].op, 1);
  assert_int_equal((size_t)(fr[0].pl - out) + fr[0].len, first);
  assert_int_equal(close_code_of(&fr[1]), 4429);
  assert_true(f.nclosed == 1 && f.closed[0] == c);
  im_stats stt;
  im_server_stats(s, &stt);
  assert_int_equal(stt.shed, 1);
  assert_int_equal(stt.out_queued, 0);
  im_server_free(s);
}

static void test_reliable_retransmit_same_bytes(void **st) {
  (void)st;
  fake f;
  im_config cfg;
  im_config_init(&cfg);
  cfg.ack_timeout_ms = 1000;
  cfg.heartbeat_s = 0;
  im_server *s = new_server(&f, &cfg);
  im_conn_id c = ws_open(s, &f, "bob");
  im_msg m = {.id = "m1", .seq = 9, .data = "\"hi\"", .data_len = 4, .flags = IM_SEND_RELIABLE};
  assert_int_equal(im_send_conn(s, c, &m), 0);
  static uint8_t a[4096], b[4096];
  size_t na = drain_by(s, c, a, sizeof a, 3, 2, NULL);
  assert_true(na > 0);
  im_server_tick(s, 1000000 + 1100);
  size_t nb = drain(s, c, b, sizeof b);
  assert_int_equal(nb, na);
  assert_memory_equal(a, b, na);
  im_stats stt;
  im_server_stats(s, &stt);
  assert_int_equal(stt.retransmits, 1);
  im_server_free(s);
}

/* A member released in the middle of a room walk leaves the room (the
 * last member takes its slot): everyone else still gets the message, once.
 * A member whose 101 response is still unwritten when it is shed is
 * released at once (no close frame can follow a cut upgrade). */
static void test_member_released_during_room_send(void **st) {
  (void)st;
  fake f;
  im_config cfg;
  im_config_init(&cfg);
  cfg.max_output = 2048;
  im_server *s = new_server(&f, &cfg);
  enum { M = 6 };
  im_conn_id c[M];
  char uid[8];
  for (int i = 0; i < M; i++) {
    snprintf(uid, sizeof uid, "u%d", i);
    if (i == 0 || i == 3) {
      char q[32];
      snprintf(q, sizeof q, "?uid=%s&token=t", uid);
      c[i] = ws_accept(s, q, NULL); /* opened; its 101 and auth_ok not written */
    } else {
      c[i] = ws_open(s, &f, uid);
    }
    assert_int_equal(im_room_join(s, c[i], "r"), 0);
  }
  char big[1950];
  memset(big, 'y', sizeof big);
  big[0] = big[sizeof big - 1] = '"';
  im_msg m = {.room = "r", .data = big, .data_len = sizeof big};
  assert_int_equal(im_room_send(s, "r", &m, 0), M - 2);
  assert_int_equal(im_room_size(s, "r"), M - 2);
  assert_int_equal(f.nclosed, 2);
  for (int i = 0; i < M; i++) {
    if (i == 0 || i == 3) {
      assert_int_equal(im_room_member(s, c[i], "r"), 0);
      continue;
    }
    static uint8_t out[8192];
    size_t n = drain(s, c[i], out, sizeof out);
    sframe fr[4];
    assert_int_equal(parse_frames(out, n, fr, 4), 1);
    assert_int_equal(fr[0].op, 1);
    assert_int_equal(fr[0].len, n - 4); /* the one frame, a 16-bit length header */
  }
  /* a room whose only member is released by the send goes away after it */
  im_conn_id lone = ws_accept(s, "?uid=lone&token=t", NULL);
  assert_int_equal(im_room_join(s, lone, "solo"), 0);
  m.room = "solo";
  assert_int_equal(im_room_send(s, "solo", &m, 0), 0);
  assert_int_equal(im_room_size(s, "solo"), 0);
  assert_true(f.closed[f.nclosed - 1] == lone);
  im_stats stt;
  im_server_stats(s, &stt);
  assert_int_equal(stt.shed, 3);
  assert_int_equal(stt.rooms, 1);
  /* the room can be joined again */
  im_conn_id again = ws_open(s, &f, "again");
  assert_int_equal(im_room_join(s, again, "solo"), 0);
  assert_int_equal(im_room_size(s, "solo"), 1);
  (void)expect_closed_with; /* the fixture's; not needed here */
  im_server_free(s);
}

/* Leaving in any order keeps every other member in the room's array. */
static void test_room_leave_any_order(void **st) {
  (void)st;
  fake f;
  im_server *s = new_server(&f, NULL);
  enum { M = 9 };
  im_conn_id c[M];
  char uid[8];
  for (int i = 0; i < M; i++) {
    snprintf(uid, sizeof uid, "u%d", i);
    c[i] = ws_open(s, &f, uid);
    assert_int_equal(im_room_join(s, c[i], "r"), 0);
  }
  static const int order[M] = {4, 0, 8, 1, 7, 2, 6, 3, 5};
  im_msg m = {.room = "r", .data = "1", .data_len = 1};
  for (int k = 0; k < M; k++) {
    assert_int_equal(im_room_leave(s, c[order[k]], "r"), 0);
    assert_int_equal(im_room_member(s, c[order[k]], "r"), 0);
    assert_int_equal(im_room_size(s, "r"), (size_t)(M - k - 1));
    for (int j = k + 1; j < M; j++) assert_int_equal(im_room_member(s, c[order[j]], "r"), 1);
    assert_int_equal(im_room_send(s, "r", &m, 0), M - k - 1);
  }
  im_stats stt;
  im_server_stats(s, &stt);
  assert_int_equal(stt.rooms, 0);
  im_server_free(s);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_order_across_write_sizes),
      cmocka_unit_test(test_room_messages_batch_per_member),
      cmocka_unit_test(test_shed_keeps_partial_frame),
      cmocka_unit_test(test_reliable_retransmit_same_bytes),
      cmocka_unit_test(test_member_released_during_room_send),
      cmocka_unit_test(test_room_leave_any_order),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
