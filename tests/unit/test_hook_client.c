/* hook_client tests: the client and a scripted HTTP server on 127.0.0.1
 * (port 0) share one event base on the test thread; each test runs the loop
 * until the outcomes it expects are in (a 5 s guard timer fails it
 * otherwise). The server reads one request at a time and does what the
 * test's script says for the Nth request it sees. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/listener.h>
#include <netinet/in.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "hook_client.h"

enum act { ANSWER, SILENT, CLOSE, GARBAGE, HUGE };

typedef struct world {
  struct event_base *base;
  struct evconnlistener *lis;
  int port;
  enum act script[16];     /* what to do with request i (past the end: ANSWER) */
  int requests, accepted;
  char last_request[4096];
  struct bufferevent *open[16];
  int nopen;
  /* outcomes */
  int done, want;
  int status[16];
  char body[16][128];
  bool timed_out;
} world;

static world W;

static void srv_read(struct bufferevent *bev, void *arg) {
  (void)arg;
  struct evbuffer *in = bufferevent_get_input(bev);
  for (;;) {
    struct evbuffer_ptr end = evbuffer_search(in, "\r\n\r\n", 4, NULL);
    if (end.pos < 0) return;
    size_t head = (size_t)end.pos + 4;
    char h[4096];
    size_t hl = head < sizeof h - 1 ? head : sizeof h - 1;
    evbuffer_copyout(in, h, hl);
    h[hl] = '\0';
    const char *cl = strstr(h, "Content-Length: ");
    size_t blen = cl ? strtoul(cl + 16, NULL, 10) : 0;
    if (evbuffer_get_length(in) < head + blen) return;
    size_t total = head + blen;
    size_t keep = total < sizeof W.last_request - 1 ? total : sizeof W.last_request - 1;
    evbuffer_remove(in, W.last_request, keep);
    W.last_request[keep] = '\0';
    evbuffer_drain(in, total - keep);
    int i = W.requests++;
    enum act a = i < 16 ? W.script[i] : ANSWER;
    struct evbuffer *out = bufferevent_get_output(bev);
    if (a == SILENT) return;
    if (a == CLOSE) {
      bufferevent_free(bev);
      for (int k = 0; k < W.nopen; k++)
        if (W.open[k] == bev) W.open[k] = NULL;
      return;
    }
    if (a == GARBAGE) {
      evbuffer_add_printf(out, "SMTP ready\r\n\r\n");
      return;
    }
    if (a == HUGE) {
      evbuffer_add_printf(out, "HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n");
      for (int k = 0; k < 50; k++) evbuffer_add_printf(out, "%0100d", k);
      return;
    }
    evbuffer_add_printf(out, "HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{\"n\":%03d}", i);
  }
}

static void srv_event(struct bufferevent *bev, short what, void *arg) {
  (void)what;
  (void)arg;
  for (int k = 0; k < W.nopen; k++)
    if (W.open[k] == bev) W.open[k] = NULL;
  bufferevent_free(bev);
}

static void srv_accept(struct evconnlistener *l, evutil_socket_t fd, struct sockaddr *sa,
                       int salen, void *arg) {
  (void)l;
  (void)sa;
  (void)salen;
  (void)arg;
  struct bufferevent *bev = bufferevent_socket_new(W.base, fd, BEV_OPT_CLOSE_ON_FREE);
  bufferevent_setcb(bev, srv_read, NULL, srv_event, NULL);
  bufferevent_enable(bev, EV_READ);
  W.accepted++;
  if (W.nopen < 16) W.open[W.nopen++] = bev;
}

static void guard(evutil_socket_t fd, short what, void *arg) {
  (void)fd;
  (void)what;
  (void)arg;
  W.timed_out = true;
  event_base_loopbreak(W.base);
}

static void on_done(void *arg, int status, const char *body, size_t len, uint64_t us) {
  (void)us;
  int i = (int)(intptr_t)arg;
  W.status[i] = status;
  snprintf(W.body[i], sizeof W.body[i], "%.*s", (int)len, body ? body : "");
  if (++W.done >= W.want) event_base_loopbreak(W.base);
}

/* Run the loop until `want` outcomes are in. */
static void run_until(int want) {
  W.want = want;
  struct event *g = evtimer_new(W.base, guard, NULL);
  struct timeval tv = {5, 0};
  evtimer_add(g, &tv);
  if (W.done < want) event_base_dispatch(W.base);
  event_free(g);
  assert_false(W.timed_out);
}

static int setup(void **state) {
  (void)state;
  memset(&W, 0, sizeof W);
  W.base = event_base_new();
  struct sockaddr_in sin = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  W.lis = evconnlistener_new_bind(W.base, srv_accept, NULL, LEV_OPT_CLOSE_ON_FREE | LEV_OPT_REUSEABLE,
                                  16, (struct sockaddr *)&sin, sizeof sin);
  assert_non_null(W.lis);
  struct sockaddr_in got;
  socklen_t gl = sizeof got;
  getsockname(evconnlistener_get_fd(W.lis), (struct sockaddr *)&got, &gl);
  W.port = ntohs(got.sin_port);
  return 0;
}

static int teardown(void **state) {
  (void)state;
  for (int k = 0; k < W.nopen; k++)
    if (W.open[k]) bufferevent_free(W.open[k]);
  evconnlistener_free(W.lis);
  event_base_free(W.base);
  return 0;
}

static hook_client *client(uint32_t conns, uint32_t queue) {
  char url[64], err[128];
  snprintf(url, sizeof url, "http://127.0.0.1:%d/hook/path", W.port);
  hook_client_opts o = {.max_conns = conns, .max_queue = queue, .max_response = 1024,
                        .idle_ms = 30000};
  hook_client *hc = hook_client_new(W.base, url, &o, err, sizeof err);
  assert_non_null(hc);
  return hc;
}

static void test_bad_urls(void **state) {
  (void)state;
  hook_client_opts o = {.max_conns = 1, .max_queue = 1, .max_response = 64, .idle_ms = 1000};
  const char *bad[] = {"https://127.0.0.1/", "ftp://x/", "http://", "http:///x",
                       "http://127.0.0.1:/", "http://127.0.0.1:99999999/", "http://[::1/",
                       "http://u@127.0.0.1/", "http://127.0.0.1/a b"};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    char err[128] = "";
    assert_null(hook_client_new(W.base, bad[i], &o, err, sizeof err));
    assert_true(err[0] != '\0');
  }
  char err[128];
  hook_client *hc = hook_client_new(W.base, "http://[::1]:8/x", &o, err, sizeof err);
  assert_non_null(hc);
  hook_client_free(hc);
}

static void test_post_and_keep_alive(void **state) {
  (void)state;
  hook_client *hc = client(1, 8);
  for (int i = 0; i < 3; i++)
    assert_int_equal(hook_client_post(hc, "X-Test: yes\r\n", "{\"a\":1}", 7, 2000, on_done,
                                      (void *)(intptr_t)i), 0);
  assert_int_equal(hook_client_pending(hc), 3);
  run_until(3);
  for (int i = 0; i < 3; i++) {
    assert_int_equal(W.status[i], 200);
    char want[16];
    snprintf(want, sizeof want, "{\"n\":%03d}", i); /* answered in order, one connection */
    assert_string_equal(W.body[i], want);
  }
  assert_int_equal(W.accepted, 1); /* kept alive */
  assert_non_null(strstr(W.last_request, "POST /hook/path HTTP/1.1\r\n"));
  assert_non_null(strstr(W.last_request, "Host: 127.0.0.1:"));
  assert_non_null(strstr(W.last_request, "Content-Length: 7\r\n"));
  assert_non_null(strstr(W.last_request, "X-Test: yes\r\n\r\n{\"a\":1}"));
  assert_int_equal(hook_client_pending(hc), 0);
  hook_client_free(hc);
}

static void test_timeout_and_queue_bound(void **state) {
  (void)state;
  W.script[0] = SILENT;
  hook_client *hc = client(1, 2);
  assert_int_equal(hook_client_post(hc, NULL, "{}", 2, 100, on_done, (void *)0), 0);
  assert_int_equal(hook_client_post(hc, NULL, "{}", 2, 2000, on_done, (void *)1), 0);
  /* both wait in the queue until the kick: the bound counts waiting requests */
  assert_int_equal(hook_client_post(hc, NULL, "{}", 2, 2000, on_done, (void *)2), HOOK_EFULL);
  run_until(2);
  assert_int_equal(W.status[0], HOOK_ETIMEOUT);
  /* the timed-out request's connection is dropped; the next one gets a new one */
  assert_int_equal(W.status[1], 200);
  assert_int_equal(W.accepted, 2);
  hook_client_free(hc);
}

static void test_stale_keep_alive_is_resent_once(void **state) {
  (void)state;
  W.script[1] = CLOSE; /* the server drops the kept-alive connection on the 2nd request */
  hook_client *hc = client(1, 8);
  assert_int_equal(hook_client_post(hc, NULL, "{}", 2, 2000, on_done, (void *)0), 0);
  run_until(1);
  assert_int_equal(hook_client_post(hc, NULL, "{}", 2, 2000, on_done, (void *)1), 0);
  run_until(2);
  assert_int_equal(W.status[0], 200);
  assert_int_equal(W.status[1], 200);
  assert_string_equal(W.body[1], "{\"n\":002}");
  assert_int_equal(W.accepted, 2);
  /* on a fresh connection a close before the answer is an error, not resent */
  W.script[3] = CLOSE;
  hook_client_free(hc);
  hc = client(1, 8);
  assert_int_equal(hook_client_post(hc, NULL, "{}", 2, 2000, on_done, (void *)2), 0);
  run_until(3);
  assert_int_equal(W.status[2], HOOK_EIO);
  hook_client_free(hc);
}

static void test_refused_bad_answers_and_cancel(void **state) {
  (void)state;
  W.script[0] = GARBAGE;
  W.script[1] = HUGE;
  W.script[2] = SILENT;
  hook_client *hc = client(4, 8);
  assert_int_equal(hook_client_post(hc, NULL, "{}", 2, 2000, on_done, (void *)0), 0);
  run_until(1);
  assert_int_equal(hook_client_post(hc, NULL, "{}", 2, 2000, on_done, (void *)1), 0);
  run_until(2);
  assert_int_equal(W.status[0], HOOK_EPROTO);
  assert_int_equal(W.status[1], HOOK_EPROTO); /* over max_response */
  assert_int_equal(hook_client_post(hc, NULL, "{}", 2, 2000, on_done, (void *)2), 0);
  assert_int_equal(hook_client_post(hc, NULL, "{}", 2, 2000, on_done, (void *)3), 0);
  hook_client_free(hc); /* both pending: canceled now */
  assert_int_equal(W.done, 4);
  assert_int_equal(W.status[2], HOOK_ECANCELED);
  assert_int_equal(W.status[3], HOOK_ECANCELED);
  /* nothing listens: refused */
  char url[64], err[128];
  evconnlistener_free(W.lis);
  W.lis = NULL;
  snprintf(url, sizeof url, "http://127.0.0.1:%d/", W.port);
  hook_client_opts o = {.max_conns = 2, .max_queue = 8, .max_response = 64, .idle_ms = 1000};
  hc = hook_client_new(W.base, url, &o, err, sizeof err);
  assert_non_null(hc);
  assert_int_equal(hook_client_post(hc, NULL, "{}", 2, 2000, on_done, (void *)4), 0);
  run_until(5);
  assert_int_equal(W.status[4], HOOK_ECONNECT);
  hook_client_free(hc);
  struct sockaddr_in sin = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  W.lis = evconnlistener_new_bind(W.base, srv_accept, NULL, LEV_OPT_CLOSE_ON_FREE | LEV_OPT_REUSEABLE,
                                  16, (struct sockaddr *)&sin, sizeof sin);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test_setup_teardown(test_bad_urls, setup, teardown),
      cmocka_unit_test_setup_teardown(test_post_and_keep_alive, setup, teardown),
      cmocka_unit_test_setup_teardown(test_timeout_and_queue_bound, setup, teardown),
      cmocka_unit_test_setup_teardown(test_stale_keep_alive_is_resent_once, setup, teardown),
      cmocka_unit_test_setup_teardown(test_refused_bad_answers_and_cancel, setup, teardown),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
