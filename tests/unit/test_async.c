/* Cross-thread hand-off (im_async.h): posts from several threads arrive in
 * order per thread, a burst costs one wake-up, and a mailbox sends to a
 * server's connections from another thread. Driven by a real libevent
 * loop and real threads. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <event2/event.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libim/im.h>
#include <libim/im_async.h>

#include "proto/imp.h"
#include "proto/tcp_frame.h"

#define THREADS 4
#define PER_THREAD 20000

typedef struct sink {
  uint64_t next[THREADS];   /* next sequence number expected per thread */
  uint64_t got;
  int out_of_order;
  pthread_t loop_thread;
  int wrong_thread;
} sink;

static void take(void *item, void *arg) {
  sink *s = arg;
  uintptr_t v = (uintptr_t)item;
  unsigned t = (unsigned)(v >> 24);
  uint64_t seq = v & 0xffffff;
  if (seq != s->next[t]) s->out_of_order++;
  s->next[t] = seq + 1;
  s->got++;
  if (!pthread_equal(pthread_self(), s->loop_thread)) s->wrong_thread++;
}

typedef struct poster {
  im_async *a;
  unsigned t;
} poster;

static void *post_all(void *arg) {
  poster *p = arg;
  for (uintptr_t i = 0; i < PER_THREAD; i++)
    while (im_async_post(p->a, (void *)(((uintptr_t)p->t << 24) | i)) != 0) {
    }
  return NULL;
}

static void run_until(struct event_base *base, const uint64_t *counter, uint64_t want) {
  for (int i = 0; i < 2000 && *counter < want; i++) event_base_loop(base, EVLOOP_ONCE | EVLOOP_NONBLOCK);
  for (int i = 0; i < 500 && *counter < want; i++) {
    struct timeval tv = {0, 10000};
    event_base_loopexit(base, &tv);
    event_base_dispatch(base);
  }
}

static void posts_from_threads_arrive_in_order(void **state) {
  (void)state;
  struct event_base *base = event_base_new();
  sink s = {.loop_thread = pthread_self()};
  im_async *a = im_async_new(base, take, &s);
  assert_non_null(a);
  pthread_t th[THREADS];
  poster p[THREADS];
  for (unsigned t = 0; t < THREADS; t++) {
    p[t] = (poster){a, t};
    assert_int_equal(pthread_create(&th[t], NULL, post_all, &p[t]), 0);
  }
  run_until(base, &s.got, (uint64_t)THREADS * PER_THREAD);
  for (unsigned t = 0; t < THREADS; t++) pthread_join(th[t], NULL);
  run_until(base, &s.got, (uint64_t)THREADS * PER_THREAD);
  assert_int_equal(s.got, THREADS * PER_THREAD);
  assert_int_equal(s.out_of_order, 0);
  assert_int_equal(s.wrong_thread, 0);
  uint64_t posted, wakeups;
  im_async_counts(a, &posted, &wakeups);
  assert_int_equal(posted, THREADS * PER_THREAD);
  assert_true(wakeups >= 1 && wakeups <= posted);
  print_message("      %llu posts, %llu wake-ups\n", (unsigned long long)posted,
                (unsigned long long)wakeups);
  im_async_free(a);
  event_base_free(base);
}

static void a_burst_is_one_wakeup(void **state) {
  (void)state;
  struct event_base *base = event_base_new();
  sink s = {.loop_thread = pthread_self()};
  im_async *a = im_async_new(base, take, &s);
  poster p = {a, 0};
  pthread_t th;
  /* the loop does not run while the thread posts: one wake-up for all */
  assert_int_equal(pthread_create(&th, NULL, post_all, &p), 0);
  pthread_join(th, NULL);
  uint64_t posted, wakeups;
  im_async_counts(a, &posted, &wakeups);
  assert_int_equal(posted, PER_THREAD);
  assert_int_equal(wakeups, 1);
  assert_int_equal(s.got, 0); /* nothing runs before the loop does */
  run_until(base, &s.got, PER_THREAD);
  assert_int_equal(s.got, PER_THREAD);
  /* free delivers what is queued and refuses what comes after */
  assert_int_equal(im_async_post(a, (void *)(uintptr_t)PER_THREAD), 0);
  im_async_free(a);
  assert_int_equal(s.got, PER_THREAD + 1);
  assert_int_equal(s.out_of_order, 0);
  event_base_free(base);
}

/* ---- the mailbox ---- */

static void io_want(im_server *s, im_conn_id c, void *ctx, void *u) { (void)s, (void)c, (void)ctx, (void)u; }
static void io_close(im_server *s, im_conn_id c, void *ctx, void *u) { (void)s, (void)c, (void)ctx, (void)u; }

static size_t output(im_server *srv, im_conn_id c, uint8_t *buf, size_t cap) {
  struct iovec iov[16];
  size_t len = 0;
  int k;
  while ((k = im_conn_pending(srv, c, iov, 16)) > 0) {
    size_t got = 0;
    for (int i = 0; i < k; i++) {
      assert_true(len + iov[i].iov_len <= cap);
      memcpy(buf + len, iov[i].iov_base, iov[i].iov_len);
      len += iov[i].iov_len;
      got += iov[i].iov_len;
    }
    im_conn_sent(srv, c, got);
  }
  return len;
}

typedef struct game {
  im_mailbox *mb;
  int n;
} game;

/* A game thread that sends to a user it does not own. */
static void *game_thread(void *arg) {
  game *g = arg;
  char data[32];
  for (int i = 0; i < g->n; i++) {
    int n = snprintf(data, sizeof data, "%d", i);
    im_msg m = {.from = "game", .data = data, .data_len = (size_t)n};
    assert_int_equal(im_mailbox_send_user(g->mb, "bob", &m), 0);
  }
  return NULL;
}

static int calls;
static void on_loop(im_server *srv, void *arg) {
  (void)srv;
  assert_true(pthread_equal(pthread_self(), *(pthread_t *)arg));
  calls++;
}

static void mailbox_sends_from_another_thread(void **state) {
  (void)state;
  struct event_base *base = event_base_new();
  im_server *srv = im_server_new(NULL, NULL, NULL);
  im_io io = {io_want, io_close, NULL};
  im_server_set_io(srv, &io);
  im_server_tick(srv, 1000);
  im_conn_id bob = im_server_accept(srv, IM_TRANSPORT_TCP, "127.0.0.1:1", NULL);
  uint8_t frame[256];
  imp_packet auth = {.op = IMP_OP_AUTH};
  imp_set_str(&auth, IMP_K_UID, "bob", 3);
  imp_set_str(&auth, IMP_K_TOKEN, "t", 1);
  size_t n = imp_bin_encode(&auth, frame + 4, sizeof frame - 4);
  tcp_frame_encode_header(frame, (uint32_t)n);
  assert_int_equal(im_server_feed(srv, bob, frame, n + 4), 0);
  static uint8_t out[1 << 20];
  output(srv, bob, out, sizeof out); /* auth_ok */

  im_mailbox *mb = im_mailbox_new(base, srv);
  assert_non_null(mb);
  game g = {mb, 500};
  pthread_t th;
  assert_int_equal(pthread_create(&th, NULL, game_thread, &g), 0);
  pthread_join(th, NULL);
  pthread_t me = pthread_self();
  assert_int_equal(im_mailbox_call(mb, on_loop, &me), 0);
  uint64_t posted = 0;
  for (int i = 0; i < 100 && calls == 0; i++) {
    struct timeval tv = {0, 10000};
    event_base_loopexit(base, &tv);
    event_base_dispatch(base);
  }
  im_async_counts(im_mailbox_async(mb), &posted, NULL);
  assert_int_equal(posted, 501);
  assert_int_equal(calls, 1);
  /* every message reached bob, in order */
  size_t len = output(srv, bob, out, sizeof out);
  int next = 0;
  for (size_t off = 0; off < len;) {
    const uint8_t *body;
    uint32_t blen;
    long used = tcp_frame_parse(out + off, len - off, 1 << 20, &body, &blen);
    assert_true(used > 0);
    imp_packet p;
    assert_int_equal(imp_bin_decode(body, blen, &p), 0);
    assert_int_equal(p.op, IMP_OP_MSG);
    char want[32];
    int wl = snprintf(want, sizeof want, "%d", next++);
    assert_int_equal(p.str[IMP_K_DATA].n, (uint32_t)wl);
    assert_memory_equal(p.str[IMP_K_DATA].p, want, (size_t)wl);
    off += (size_t)used;
  }
  assert_int_equal(next, 500);
  /* close from another thread too */
  assert_int_equal(im_mailbox_close(mb, bob, IM_CLOSE_KICKED, "bye"), 0);
  im_mailbox_free(mb); /* delivers the close */
  im_stats st = {IM_STRUCT_SIZE(im_stats)};
  im_server_stats(srv, &st);
  assert_int_equal(im_conn_close(srv, bob, 1000, ""), IM_ECLOSED);
  assert_int_equal(im_mailbox_send_user(NULL, NULL, NULL), IM_EINVAL);
  im_server_free(srv);
  event_base_free(base);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(posts_from_threads_arrive_in_order),
      cmocka_unit_test(a_burst_is_one_wakeup),
      cmocka_unit_test(mailbox_sends_from_another_thread),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
