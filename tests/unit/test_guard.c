/* The guard at the door (im_guard.h): rate limit per source, escalating
 * automatic bans, per-source cap, CIDR blacklist with TTL, bounded memory. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <stdio.h>
#include <string.h>

#include <libim/im.h>
#include <libim/im_guard.h>

static void io_want(im_server *s, im_conn_id c, void *ctx, void *u) { (void)s, (void)c, (void)ctx, (void)u; }
static void io_close(im_server *s, im_conn_id c, void *ctx, void *u) { (void)s, (void)c, (void)ctx, (void)u; }

static uint64_t now;

static im_server *server(const im_guard_config *g) {
  im_server *s = im_server_new(NULL, NULL, NULL);
  im_io io = {io_want, io_close, NULL};
  im_server_set_io(s, &io);
  now = 1000;
  im_server_tick(s, now);
  if (g) assert_int_equal(im_server_set_guard(s, g), 0);
  return s;
}

static void advance(im_server *s, uint64_t ms) {
  for (uint64_t t = 0; t < ms; t += 100) im_server_tick(s, now += 100);
}

static im_conn_id try(im_server *s, const char *peer) {
  return im_server_accept(s, IM_TRANSPORT_TCP, peer, NULL);
}

/* Accepts from peer until one is refused; returns how many got in. */
static int accept_until_refused(im_server *s, const char *peer, int max) {
  for (int i = 0; i < max; i++)
    if (!try(s, peer)) return i;
  return max;
}

static void rate_limit_per_source(void **st) {
  (void)st;
  im_guard_config g;
  im_guard_config_init(&g);
  im_server *s = server(&g);
  assert_int_equal(accept_until_refused(s, "10.0.0.1:1000", 100), 40); /* the burst */
  assert_true(try(s, "10.0.0.2:1000") != 0);                           /* others unaffected */
  assert_true(try(s, "[2001:db8::1]:5") != 0);
  advance(s, 500);                                                      /* 20/s: 10 tokens */
  assert_int_equal(accept_until_refused(s, "10.0.0.1:1001", 100), 10);
  im_guard_stats gs;
  im_guard_get_stats(s, &gs);
  assert_int_equal(gs.refused_rate, 2);
  assert_int_equal(gs.bans, 0);
  assert_int_equal(gs.sources, 3);
  im_server_free(s);
}

static int count_auto(const im_ban *b, void *arg) { (void)b; (void)arg; return 0; }
typedef struct seen {
  char cidr[64];
  int automatic;
  uint32_t level;
  uint64_t until;
  int n;
} seen;
static void collect(const im_ban *b, void *arg) {
  seen *x = arg;
  snprintf(x->cidr, sizeof x->cidr, "%s", b->cidr);
  x->automatic = b->automatic;
  x->level = b->level;
  x->until = b->until_ms;
  x->n++;
}

static void escalating_bans(void **st) {
  (void)st;
  (void)count_auto;
  im_guard_config g;
  im_guard_config_init(&g);
  im_server *s = server(&g);
  const char *bad = "10.9.9.9:1";
  /* the burst, then conn_burst refusals while over the rate: banned */
  assert_int_equal(accept_until_refused(s, bad, 100), 40);
  for (int i = 1; i < 40; i++) assert_int_equal(try(s, bad), 0);
  im_guard_stats gs;
  im_guard_get_stats(s, &gs);
  assert_int_equal(gs.bans, 1);
  seen x = {0};
  assert_int_equal(im_guard_bans(s, collect, &x), 1);
  assert_string_equal(x.cidr, "10.9.9.9/32");
  assert_int_equal(x.automatic, 1);
  assert_int_equal(x.level, 1);
  /* banned: even after the bucket refilled */
  advance(s, 5000);
  assert_int_equal(try(s, bad), 0);
  im_guard_get_stats(s, &gs);
  assert_true(gs.refused_banned >= 1);
  assert_true(try(s, "10.9.9.10:1") != 0); /* the neighbour connects meanwhile */
  /* after 10 s it may connect again; the next offence costs 60 s */
  advance(s, 5100);
  assert_true(try(s, bad) != 0);
  advance(s, 3000);
  assert_int_equal(accept_until_refused(s, bad, 100), 40);
  for (int i = 1; i < 40; i++) try(s, bad);
  x.n = 0;
  im_guard_bans(s, collect, &x);
  assert_int_equal(x.level, 2);
  advance(s, 30000);
  assert_int_equal(try(s, bad), 0); /* still banned at 30 s */
  advance(s, 31000);
  assert_true(try(s, bad) != 0);   /* over after 60 s */
  /* lifted by hand */
  advance(s, 3000);
  accept_until_refused(s, bad, 100);
  for (int i = 1; i < 40; i++) try(s, bad);
  assert_int_equal(try(s, bad), 0);
  assert_int_equal(im_guard_unban(s, "10.9.9.9"), 0);
  advance(s, 200);
  assert_true(try(s, bad) != 0);
  im_server_free(s);
}

static void cap_per_source(void **st) {
  (void)st;
  im_guard_config g;
  im_guard_config_init(&g);
  g.conn_rate = 0;
  g.max_conns_per_source = 3;
  im_server *s = server(&g);
  im_conn_id c[3];
  for (int i = 0; i < 3; i++) assert_true((c[i] = try(s, "[::1]:7")) != 0);
  assert_int_equal(try(s, "[::1]:8"), 0);
  assert_int_equal(im_server_hangup(s, c[1]), 0);
  assert_true(try(s, "[::1]:9") != 0);
  im_guard_stats gs;
  im_guard_get_stats(s, &gs);
  assert_int_equal(gs.refused_cap, 1);
  im_server_free(s);
}

static void blacklist_ranges(void **st) {
  (void)st;
  im_server *s = server(NULL); /* the blacklist works without the rate guard */
  im_conn_id open = try(s, "192.168.1.20:5");
  assert_true(open != 0);
  assert_int_equal(im_guard_ban(s, "192.168.1.0/24", 5), 0);
  assert_int_equal(im_guard_ban(s, "2001:db8::/32", 0), 0);
  assert_int_equal(im_guard_ban(s, "not-an-ip", 5), IM_EINVAL);
  assert_int_equal(im_guard_ban(s, "10.0.0.0/33", 5), IM_EINVAL);
  assert_int_equal(try(s, "192.168.1.77:1"), 0);
  assert_true(try(s, "192.168.2.1:1") != 0);
  assert_int_equal(try(s, "[2001:db8:1::5]:1"), 0);
  assert_true(try(s, "[2001:db9::5]:1") != 0);
  assert_int_equal(try(s, "[::ffff:192.168.1.9]:1"), 0); /* v4-mapped is the same source */
  /* open connections are the caller's: kick closes them */
  assert_int_equal(im_guard_kick(s, "192.168.1.0/24", IM_CLOSE_KICKED, "banned"), 1);
  seen x = {0};
  assert_int_equal(im_guard_bans(s, collect, &x), 2);
  advance(s, 5100); /* the TTL ran out */
  assert_true(try(s, "192.168.1.77:1") != 0);
  assert_int_equal(im_guard_unban(s, "2001:db8::/32"), 0);
  assert_int_equal(im_guard_unban(s, "2001:db8::/32"), IM_ENOENT);
  assert_true(try(s, "[2001:db8:1::5]:1") != 0);
  im_server_free(s);
}

static void memory_is_bounded(void **st) {
  (void)st;
  im_guard_config g;
  im_guard_config_init(&g);
  g.max_sources = 2;
  im_server *s = server(&g);
  assert_true(try(s, "1.1.1.1:1") != 0);
  assert_true(try(s, "1.1.1.2:1") != 0);
  for (int i = 0; i < 100; i++) assert_true(try(s, "1.1.1.3:1") != 0); /* untracked */
  im_guard_stats gs;
  im_guard_get_stats(s, &gs);
  assert_int_equal(gs.sources, 2);
  /* idle sources without connections are swept */
  im_server_free(s);
  s = server(&g);
  im_conn_id c = try(s, "1.1.1.1:1");
  assert_int_equal(im_server_hangup(s, c), 0);
  advance(s, 61000);
  im_guard_get_stats(s, &gs);
  assert_int_equal(gs.sources, 0);
  im_server_free(s);
}

/* One spelling per range, as the ban list shows it: what a cluster keys
 * its shared bans by. */
static void canonical_ranges(void **st) {
  (void)st;
  char out[64];
  assert_int_equal(im_guard_canon("10.1.2.3", out, sizeof out), 0);
  assert_string_equal(out, "10.1.2.3/32");
  assert_int_equal(im_guard_canon("10.1.2.3/8", out, sizeof out), 0);
  assert_string_equal(out, "10.0.0.0/8");
  assert_int_equal(im_guard_canon("2001:DB8::1/32", out, sizeof out), 0);
  assert_string_equal(out, "2001:db8::/32");
  assert_int_equal(im_guard_canon("::1", out, sizeof out), 0);
  assert_string_equal(out, "::1/128");
  assert_int_equal(im_guard_canon("10.0.0.0/33", out, sizeof out), IM_EINVAL);
  assert_string_equal(out, "");
  assert_int_equal(im_guard_canon("bob", out, sizeof out), IM_EINVAL);
  assert_int_equal(im_guard_canon("10.1.2.3", out, 11), IM_EINVAL); /* "10.1.2.3/32" needs 12 */
  assert_string_equal(out, "");
  assert_int_equal(im_guard_canon("10.1.2.3", out, 12), 0);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(rate_limit_per_source), cmocka_unit_test(escalating_bans),
      cmocka_unit_test(cap_per_source),        cmocka_unit_test(blacklist_ranges),
      cmocka_unit_test(memory_is_bounded),     cmocka_unit_test(canonical_ranges),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
