/* The struct_size rule (docs/EMBEDDING.md, "ABI and versions"): structs laid
 * out by an older release (shorter, garbage after them) and by a newer one
 * (longer), as a program built against another release passes them. The
 * library reads no byte past struct_size and defaults what it did not read,
 * fills no byte past it, and refuses a struct_size below the oldest layout. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>
#include <libim/im.h>
#include <libim/im_async.h>
#include <libim/im_router.h>

#include "core/abi.h"
#include "engine_fixture.h"

#define GARBAGE 0xA5
#define GUARD 64

/* im_config as libim 0.2.0 laid it out, behind struct_size: what a program
 * built against a release that had only these fields passes. */
typedef struct old_config {
  uint32_t struct_size;
  uint32_t max_message, max_output, max_connections, auth_timeout_ms, heartbeat_s,
      idle_timeout_ms, close_timeout_ms, tick_ms;
  uint16_t node_id;
  uint32_t ack_timeout_ms, ack_retries, max_inflight, dedupe_window;
  const char *ws_path;
  const im_allocator *alloc;
  uint32_t max_rooms, max_preauth_input, max_conns_per_user;
} old_config;

/* im_stats of 0.2.0 likewise: 18 counters. */
typedef struct old_stats {
  uint32_t struct_size;
  uint64_t counters[18];
} old_stats;

/* A caller's struct of `size` bytes followed by guard bytes. */
typedef struct guarded {
  unsigned char bytes[sizeof(im_config) + sizeof(im_stats) + GUARD];
} guarded;

static bool untouched(const guarded *g, size_t from, size_t to) {
  for (size_t i = from; i < to; i++)
    if (g->bytes[i] != GARBAGE) return false;
  return true;
}

static void test_layouts(void **st) {
  (void)st;
  /* the test's copies of the old layouts are the ones the library knows */
  assert_int_equal(IM__CONFIG_SIZE_MIN, IM__END(old_config, max_conns_per_user));
  assert_int_equal(IM__STATS_SIZE_MIN, sizeof(old_stats));
  assert_true(sizeof(old_config) < sizeof(im_config));
  assert_true(sizeof(old_stats) < sizeof(im_stats));
}

static void test_config_init_writes_within_size(void **st) {
  (void)st;
  guarded g;
  memset(&g, GARBAGE, sizeof g);
  im_config *cfg = (im_config *)g.bytes;
  /* older: only the old bytes are written, with the defaults */
  assert_int_equal(im_config_init_size(cfg, sizeof(old_config)), 0);
  assert_true(untouched(&g, sizeof(old_config), sizeof g.bytes));
  const old_config *old = (const old_config *)g.bytes;
  assert_int_equal(old->struct_size, sizeof(old_config));
  assert_int_equal(old->max_message, 65536);
  assert_int_equal(old->max_conns_per_user, 32);
  /* too small: refused, nothing written */
  memset(&g, GARBAGE, sizeof g);
  assert_int_equal(im_config_init_size(cfg, IM__CONFIG_SIZE_MIN - 1), IM_EINVAL);
  assert_true(untouched(&g, 0, sizeof g.bytes));
  /* newer: the library's fields get defaults, the rest of the caller's struct
   * zeros (the defaults of fields it does not know), nothing past it */
  size_t newer = sizeof(im_config) + 16;
  assert_int_equal(im_config_init_size(cfg, newer), 0);
  assert_int_equal(cfg->struct_size, newer);
  assert_int_equal(cfg->max_inflight, 128);
  for (size_t i = sizeof(im_config); i < newer; i++) assert_int_equal(g.bytes[i], 0);
  assert_true(untouched(&g, newer, sizeof g.bytes));
  /* the inline im_config_init passes this header's sizeof */
  im_config c;
  memset(&c, GARBAGE, sizeof c);
  im_config_init(&c);
  assert_int_equal(c.struct_size, sizeof(im_config));
  assert_int_equal(c.max_rate_strikes, 0);
}

static void test_server_reads_old_config(void **st) {
  (void)st;
  struct {
    old_config c;
    unsigned char after[sizeof(im_config)];
  } x;
  memset(&x, GARBAGE, sizeof x);
  im_config_init_size((im_config *)&x.c, sizeof x.c);
  x.c.max_rooms = 7;
  im_server *s = im_server_new((const im_config *)&x.c, NULL, NULL);
  assert_non_null(s);
  const im_config *in = im_server_config(s);
  assert_int_equal(in->struct_size, sizeof(im_config));
  assert_int_equal(in->max_rooms, 7);            /* read */
  assert_int_equal(in->max_push_rate, 0);        /* past the old layout: defaults, */
  assert_int_equal(in->max_msg_rate, 0);         /* not the garbage behind it */
  assert_int_equal(in->max_user_msg_rate, 0);
  assert_int_equal(in->max_rate_strikes, 0);
  im_server_free(s);
  /* the same bytes without struct_size 0.2 would be read whole: garbage */
  x.c.struct_size = IM__CONFIG_SIZE_MIN - 1;
  assert_null(im_server_new((const im_config *)&x.c, NULL, NULL));
}

static void test_server_reads_new_config_and_callbacks(void **st) {
  (void)st;
  struct {
    im_config c;
    unsigned char later_fields[32];
  } x;
  memset(&x, GARBAGE, sizeof x);
  im_config_init_size(&x.c, sizeof x);
  x.c.max_rate_strikes = 5;
  struct {
    im_callbacks cb;
    void (*later_callback)(void);
  } y;
  memset(&y, GARBAGE, sizeof y); /* a callback this library does not know: never called */
  y.cb = (im_callbacks){.struct_size = sizeof y, .on_auth = on_auth, .on_open = on_open,
                        .on_message = on_message, .on_ack = on_ack, .on_close = on_close};
  fake f;
  memset(&f, 0, sizeof f);
  im_server *s = im_server_new(&x.c, &y.cb, &f);
  assert_non_null(s);
  assert_int_equal(im_server_config(s)->max_rate_strikes, 5);
  assert_int_equal(im_server_config(s)->struct_size, sizeof(im_config));
  im_io io = {want_write, io_close, &f};
  im_server_set_io(s, &io);
  im_server_tick(s, 1000000);
  ws_open(s, &f, "alice");
  assert_int_equal(f.opens, 1);
  im_server_free(s);
  /* callbacks below the oldest layout: refused */
  y.cb.struct_size = IM__CALLBACKS_SIZE_MIN - 1;
  assert_null(im_server_new(&x.c, &y.cb, &f));
}

/* A message from a newer release (longer, unknown bytes after it) is sent;
 * one with a struct_size below the oldest layout is refused by every send. */
static void test_sends_check_msg_size(void **st) {
  (void)st;
  fake f;
  im_server *s = new_server(&f, NULL);
  im_conn_id c = ws_open(s, &f, "alice");
  assert_int_equal(im_room_join(s, c, "r"), 0);
  uint8_t out[4096];
  drain(s, c, out, sizeof out);
  struct {
    im_msg m;
    unsigned char later_fields[32];
  } x;
  memset(&x, GARBAGE, sizeof x);
  x.m = (im_msg){.struct_size = sizeof x, .id = "m1", .data = "1", .data_len = 1};
  assert_int_equal(im_send_conn(s, c, &x.m), 0);
  assert_int_equal(im_send_user(s, "alice", &x.m, 0), 1);
  assert_int_equal(im_room_send(s, "r", &x.m, 0), 1);
  size_t n = drain(s, c, out, sizeof out);
  sframe fr[4];
  assert_int_equal(parse_frames(out, n, fr, 4), 3);
  for (int i = 0; i < 3; i++) assert_non_null(memmem(fr[i].pl, fr[i].len, "\"id\":\"m1\"", 9));
  /* 0: this release's layout */
  im_msg zero = {.data = "2", .data_len = 1};
  assert_int_equal(im_send_conn(s, c, &zero), 0);
  drain(s, c, out, sizeof out);
  x.m.struct_size = IM__MSG_SIZE_MIN - 1;
  const char *uids[] = {"alice"};
  assert_int_equal(im_send_conn(s, c, &x.m), IM_EINVAL);
  assert_int_equal(im_send_user(s, "alice", &x.m, 0), IM_EINVAL);
  assert_int_equal(im_send_users(s, uids, 1, &x.m, 0), IM_EINVAL);
  assert_int_equal(im_room_send(s, "r", &x.m, 0), IM_EINVAL);
  assert_int_equal(im_local_send_users(s, uids, 1, &x.m, 0), IM_EINVAL);
  assert_int_equal(im_local_room_send(s, "r", &x.m, 0), IM_EINVAL);
  assert_int_equal(drain(s, c, out, sizeof out), 0); /* nothing was queued */
  struct event_base *base = event_base_new();
  im_mailbox *mb = im_mailbox_new(base, s);
  assert_non_null(mb);
  assert_int_equal(im_mailbox_send_conn(mb, c, &x.m), IM_EINVAL);
  assert_int_equal(im_mailbox_send_user(mb, "alice", &x.m), IM_EINVAL);
  assert_int_equal(im_mailbox_room_send(mb, "r", &x.m), IM_EINVAL);
  x.m.struct_size = sizeof x; /* newer: copied and sent on the loop */
  assert_int_equal(im_mailbox_send_conn(mb, c, &x.m), 0);
  event_base_loop(base, EVLOOP_NONBLOCK);
  n = drain(s, c, out, sizeof out);
  assert_int_equal(parse_frames(out, n, fr, 4), 1);
  assert_non_null(memmem(fr[0].pl, fr[0].len, "\"id\":\"m1\"", 9));
  im_mailbox_free(mb);
  event_base_free(base);
  im_server_free(s);
}

static void test_stats_fill_within_size(void **st) {
  (void)st;
  fake f;
  im_server *s = new_server(&f, NULL);
  ws_open(s, &f, "alice");
  guarded g;
  /* older: its 18 counters, not a byte more */
  memset(&g, GARBAGE, sizeof g);
  old_stats *old = (old_stats *)g.bytes;
  im_server_stats_size(s, (im_stats *)g.bytes, sizeof *old);
  assert_int_equal(old->struct_size, sizeof *old);
  assert_int_equal(old->counters[0], 1); /* conns */
  assert_int_equal(old->counters[1], 1); /* conns_authed */
  assert_true(untouched(&g, sizeof *old, sizeof g.bytes));
  /* newer: this release's counters; struct_size says how many bytes */
  memset(&g, GARBAGE, sizeof g);
  im_stats *now = (im_stats *)g.bytes;
  im_server_stats_size(s, now, sizeof(im_stats) + 24);
  assert_int_equal(now->struct_size, sizeof(im_stats));
  assert_int_equal(now->users, 1);
  assert_int_equal(now->rate_closed, 0);
  assert_true(untouched(&g, sizeof(im_stats), sizeof g.bytes));
  /* too small: left alone */
  memset(&g, GARBAGE, sizeof g);
  im_server_stats_size(s, now, IM__STATS_SIZE_MIN - 1);
  assert_true(untouched(&g, 0, sizeof g.bytes));
  /* the inline wrapper: this release's sizeof, whatever struct_size held */
  im_stats zero;
  memset(&zero, GARBAGE, sizeof zero);
  im_server_stats(s, &zero);
  assert_int_equal(zero.struct_size, sizeof(im_stats));
  assert_int_equal(zero.conns, 1);
  im_server_free(s);
}

static void test_conn_info_fill_within_size(void **st) {
  (void)st;
  fake f;
  im_server *s = new_server(&f, NULL);
  im_conn_id c = ws_open(s, &f, "alice");
  guarded g;
  memset(&g, GARBAGE, sizeof g);
  im_conn_info *info = (im_conn_info *)g.bytes;
  assert_int_equal(im_conn_get_info_size(s, c, info, sizeof(im_conn_info) + 8), 0);
  assert_int_equal(info->struct_size, sizeof(im_conn_info));
  assert_string_equal(info->uid, "alice");
  assert_true(untouched(&g, sizeof(im_conn_info), sizeof g.bytes));
  memset(&g, GARBAGE, sizeof g);
  assert_int_equal(im_conn_get_info_size(s, c, info, IM__CONN_INFO_SIZE_MIN - 1), IM_EINVAL);
  assert_true(untouched(&g, 0, sizeof g.bytes));
  /* the inline wrapper passes sizeof: garbage in struct_size does not matter */
  im_conn_info plain;
  memset(&plain, GARBAGE, sizeof plain);
  assert_int_equal(im_conn_get_info(s, c, &plain), 0);
  assert_int_equal(plain.struct_size, sizeof plain);
  assert_string_equal(plain.uid, "alice");
  im_server_free(s);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_layouts),
      cmocka_unit_test(test_config_init_writes_within_size),
      cmocka_unit_test(test_server_reads_old_config),
      cmocka_unit_test(test_server_reads_new_config_and_callbacks),
      cmocka_unit_test(test_sends_check_msg_size),
      cmocka_unit_test(test_stats_fill_within_size),
      cmocka_unit_test(test_conn_info_fill_within_size),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
