/* im_event with a TLS listener and a plain one, driven by real sockets in
 * this thread: an in-process mbedTLS client authenticates over TLS and the
 * engine reports im_conn_info.secure = 1 (0 for the plain [::1] listener);
 * a client that never starts its handshake is closed at the handshake
 * timeout, long before the auth timeout; im_event_free hangs up a live TLS
 * connection. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <arpa/inet.h>
#include <errno.h>
#include <event2/event.h>
#include <fcntl.h>
#include <mbedtls/ctr_drbg.h>
#include <mbedtls/entropy.h>
#include <mbedtls/ssl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <libim/im_event.h>
#include <libim/im_tls.h>

#include "tls_fixture.h"

typedef struct seen {
  int opens, closes;
  int secure[4];
  int close_code[4];
} seen;

static void on_open(im_server *srv, im_conn_id c, void *user) {
  seen *s = user;
  im_conn_info info = {IM_STRUCT_SIZE(im_conn_info)};
  assert_int_equal(im_conn_get_info(srv, c, &info), 0);
  if (s->opens < 4) s->secure[s->opens] = info.secure;
  s->opens++;
}

static void on_close(im_server *srv, im_conn_id c, int code, void *user) {
  (void)srv;
  (void)c;
  seen *s = user;
  if (s->closes < 4) s->close_code[s->closes] = code;
  s->closes++;
}

static int connect_to(int family, int port) {
  int fd = socket(family, SOCK_STREAM, 0);
  struct sockaddr_storage ss = {0};
  socklen_t len;
  if (family == AF_INET) {
    struct sockaddr_in *in = (struct sockaddr_in *)&ss;
    in->sin_family = AF_INET;
    in->sin_port = htons((uint16_t)port);
    inet_pton(AF_INET, "127.0.0.1", &in->sin_addr);
    len = sizeof *in;
  } else {
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&ss;
    in6->sin6_family = AF_INET6;
    in6->sin6_port = htons((uint16_t)port);
    inet_pton(AF_INET6, "::1", &in6->sin6_addr);
    len = sizeof *in6;
  }
  assert_int_equal(connect(fd, (struct sockaddr *)&ss, len), 0);
  fcntl(fd, F_SETFL, O_NONBLOCK);
  return fd;
}

static uint64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* Runs the loop until *flag reaches want, or fails after 5 s. */
static void loop_until(struct event_base *base, const int *flag, int want) {
  uint64_t end = now_ms() + 5000;
  while (*flag < want) {
    assert_true(now_ms() < end);
    event_base_loop(base, EVLOOP_ONCE | EVLOOP_NONBLOCK);
    poll(NULL, 0, 1);
  }
}

/* IMP binary auth {uid:"u", token:"t"} in a TCP frame. */
static const unsigned char auth_frame[] = {0, 0, 0, 7, 1, 1, 1, 'u', 2, 1, 't'};

static void test_tls_listener(void **st) {
  (void)st;
  seen s = {0};
  im_callbacks cb = {.on_open = on_open, .on_close = on_close};
  im_server *srv = im_server_new(NULL, &cb, &s);
  struct event_base *base = event_base_new();
  im_event *ev = im_event_new(base, srv);
  char err[256];
  im_tls_opts o = {.cert_file = cert, .key_file = key, .handshake_timeout_ms = 300};
  im_tls *tls = im_tls_new(&o, err, sizeof err);
  assert_non_null(tls);
  assert_int_equal(im_event_listen_tls(ev, IM_TRANSPORT_TCP, "127.0.0.1:0", tls), 0);
  assert_int_equal(im_event_listen(ev, IM_TRANSPORT_TCP, "[::1]:0"), 0);
  int tls_port = im_event_port(ev, 0), plain_port = im_event_port(ev, 1);
  assert_true(tls_port > 0 && plain_port > 0);

  /* a TLS client: handshake, auth, auth_ok */
  int fd = connect_to(AF_INET, tls_port);
  mbedtls_entropy_context entropy;
  mbedtls_ctr_drbg_context drbg;
  mbedtls_ssl_config conf;
  mbedtls_ssl_context ssl;
  mbedtls_entropy_init(&entropy);
  mbedtls_ctr_drbg_init(&drbg);
  mbedtls_ssl_config_init(&conf);
  mbedtls_ssl_init(&ssl);
  assert_int_equal(mbedtls_ctr_drbg_seed(&drbg, mbedtls_entropy_func, &entropy, NULL, 0), 0);
  assert_int_equal(mbedtls_ssl_config_defaults(&conf, MBEDTLS_SSL_IS_CLIENT,
                                               MBEDTLS_SSL_TRANSPORT_STREAM,
                                               MBEDTLS_SSL_PRESET_DEFAULT),
                   0);
  mbedtls_ssl_conf_authmode(&conf, MBEDTLS_SSL_VERIFY_NONE);
  mbedtls_ssl_conf_rng(&conf, mbedtls_ctr_drbg_random, &drbg);
  assert_int_equal(mbedtls_ssl_setup(&ssl, &conf), 0);
  mbedtls_ssl_set_bio(&ssl, &fd, c_send, c_recv, NULL);
  uint64_t end = now_ms() + 5000;
  int rc;
  while ((rc = mbedtls_ssl_handshake(&ssl)) != 0) {
    assert_true(rc == MBEDTLS_ERR_SSL_WANT_READ || rc == MBEDTLS_ERR_SSL_WANT_WRITE);
    assert_true(now_ms() < end);
    event_base_loop(base, EVLOOP_ONCE | EVLOOP_NONBLOCK);
  }
  assert_int_equal(mbedtls_ssl_write(&ssl, auth_frame, sizeof auth_frame), sizeof auth_frame);
  loop_until(base, &s.opens, 1);
  assert_int_equal(s.secure[0], 1);
  unsigned char reply[64];
  int r;
  end = now_ms() + 5000;
  while ((r = mbedtls_ssl_read(&ssl, reply, sizeof reply)) == MBEDTLS_ERR_SSL_WANT_READ) {
    assert_true(now_ms() < end);
    event_base_loop(base, EVLOOP_ONCE | EVLOOP_NONBLOCK);
  }
  assert_true(r > 5);
  assert_int_equal(reply[4], 2); /* auth_ok */

  /* a plain client on [::1] */
  int pfd = connect_to(AF_INET6, plain_port);
  assert_int_equal(write(pfd, auth_frame, sizeof auth_frame), sizeof auth_frame);
  loop_until(base, &s.opens, 2);
  assert_int_equal(s.secure[1], 0);

  /* a TLS client that never starts: closed at the handshake timeout (the
   * auth timeout is 10 s) while the others stay */
  int sfd = connect_to(AF_INET, tls_port);
  uint64_t t0 = now_ms();
  loop_until(base, &s.closes, 1);
  assert_true(now_ms() - t0 < 3000);
  assert_int_equal(s.close_code[0], 1006);
  assert_int_equal(s.opens, 2);
  char b;
  assert_int_equal(read(sfd, &b, 1), 0); /* EOF */

  /* free with the TLS and plain connections open: both hung up */
  im_event_free(ev);
  assert_int_equal(s.closes, 3);
  im_tls_free(tls);
  im_server_free(srv);
  event_base_free(base);
  mbedtls_ssl_free(&ssl);
  mbedtls_ssl_config_free(&conf);
  mbedtls_ctr_drbg_free(&drbg);
  mbedtls_entropy_free(&entropy);
  close(fd);
  close(pfd);
  close(sfd);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_tls_listener),
  };
  return cmocka_run_group_tests(tests, setup, teardown);
}
