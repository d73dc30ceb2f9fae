/* libim's socket layer (<libim/im_net.h>, <libim/im_tls.h>): the one
 * address syntax every listener takes, the plain im_stream over a real
 * socket pair, TLS context errors, and im_conn_info.secure. TLS sessions
 * themselves are tested with real clients in tests/integration/test_tls.py. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <fcntl.h>
#include <arpa/inet.h>
#include <event2/event.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <libim/im.h>
#include <libim/im_net.h>
#include <libim/im_tls.h>

static void test_addr_parse(void **st) {
  (void)st;
  struct sockaddr_storage ss;
  socklen_t len;
  char out[64];
  assert_int_equal(im_addr_parse("127.0.0.1:8080", &ss, &len), 0);
  assert_int_equal(ss.ss_family, AF_INET);
  im_addr_format((struct sockaddr *)&ss, out, sizeof out);
  assert_string_equal(out, "127.0.0.1:8080");
  assert_int_equal(im_addr_parse("255.255.255.255:65535", &ss, &len), 0);
  im_addr_format((struct sockaddr *)&ss, out, sizeof out);
  assert_string_equal(out, "255.255.255.255:65535");
  assert_int_equal(im_addr_parse("0.0.0.0:0", &ss, &len), 0);
  im_addr_format((struct sockaddr *)&ss, out, sizeof out);
  assert_string_equal(out, "0.0.0.0:0");
  im_addr_format((struct sockaddr *)&ss, out, 4); /* cut as snprintf cuts */
  assert_string_equal(out, "0.0");
  im_addr_format((struct sockaddr *)&ss, out, 0); /* writes nothing */
  assert_string_equal(out, "0.0");
  assert_int_equal(im_addr_parse("[::1]:0", &ss, &len), 0);
  assert_int_equal(ss.ss_family, AF_INET6);
  assert_int_equal(len, sizeof(struct sockaddr_in6));
  im_addr_format((struct sockaddr *)&ss, out, sizeof out);
  assert_string_equal(out, "[::1]:0");
  assert_int_equal(im_addr_parse("[::]:65535", &ss, &len), 0);
  const char *bad[] = {NULL,         "",           "127.0.0.1",    "127.0.0.1:",  "1.2.3.4:65536",
                       "::1:80",     "[::1]80",    "[127.0.0.1]:1", "[::1:80",     "host:80",
                       "1.2.3.4:-1", "1.2.3.4:8x", "[]:80"};
  for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
    assert_int_equal(im_addr_parse(bad[i], &ss, &len), IM_EADDR);
}

static void test_plain_stream(void **st) {
  (void)st;
  int sv[2];
  assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
  fcntl(sv[0], F_SETFL, O_NONBLOCK);
  im_stream *s = im_stream_new(sv[0], NULL);
  assert_non_null(s);
  assert_int_equal(im_stream_secure(s), 0);
  assert_null(im_stream_alpn(s));
  assert_int_equal(im_stream_handshake(s), 0);
  assert_int_equal(im_stream_fd(s), sv[0]);
  char buf[64];
  assert_int_equal(im_stream_read(s, buf, sizeof buf), IM_STREAM_AGAIN);
  assert_int_equal(im_stream_wants(s), IM_WANT_READ);
  struct iovec iov[2] = {{"hel", 3}, {"lo", 2}};
  assert_int_equal(im_stream_writev(s, iov, 2), 5);
  assert_int_equal(read(sv[1], buf, sizeof buf), 5);
  assert_memory_equal(buf, "hello", 5);
  assert_int_equal(write(sv[1], "abc", 3), 3);
  assert_int_equal(im_stream_read(s, buf, sizeof buf), 3);
  assert_int_equal(im_stream_pending(s), 0);
  /* fill the socket: writev must say AGAIN and want write */
  static char big[1 << 16];
  struct iovec b = {big, sizeof big};
  ssize_t w;
  while ((w = im_stream_writev(s, &b, 1)) > 0) {
  }
  assert_int_equal(w, IM_STREAM_AGAIN);
  assert_int_equal(im_stream_wants(s), IM_WANT_WRITE);
  /* shutdown: the peer sees EOF after the data; we read its EOF as 0 */
  im_stream_shutdown(s);
  fcntl(sv[1], F_SETFL, O_NONBLOCK);
  while (read(sv[1], big, sizeof big) > 0) {
  }
  close(sv[1]);
  assert_int_equal(im_stream_read(s, buf, sizeof buf), 0);
  im_stream_free(s); /* closes sv[0] */
  assert_int_equal(fcntl(sv[0], F_GETFD), -1);
  im_stream_free(NULL);
}

static void test_tls_context_errors(void **st) {
  (void)st;
  char err[256] = "";
  im_tls_opts o = {.cert_file = "/nonexistent/cert.pem", .key_file = "/nonexistent/key.pem"};
  assert_null(im_tls_new(&o, err, sizeof err));
  assert_non_null(strstr(err, "cannot load certificate /nonexistent/cert.pem"));
  im_tls_opts none = {0};
  assert_null(im_tls_new(&none, err, sizeof err));
  assert_non_null(strstr(err, "required"));
  assert_null(im_tls_new(NULL, NULL, 0));
  im_tls_free(NULL);
}

static void test_listener_bad_addr(void **st) {
  (void)st;
  assert_null(im_listener_new(NULL, "127.0.0.1:0", 16, NULL, NULL));
  assert_int_equal(im_listener_port(NULL), -1);
  im_listener_free(NULL);
}

/* Every accepted socket has TCP_NODELAY, as im_accept_fn says: the first
 * one (when the listener learns whether Linux copied it from the listening
 * socket) and the ones after it. */
typedef struct accepted {
  struct event_base *base;
  int n, nodelay;
} accepted;

static void on_accept(int fd, const char *peer, void *arg) {
  accepted *a = arg;
  int on = 0;
  socklen_t len = sizeof on;
  assert_int_equal(getsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, &len), 0);
  assert_non_null(peer);
  if (on) a->nodelay++;
  close(fd);
  if (++a->n == 3) event_base_loopbreak(a->base);
}

static void test_listener_nodelay(void **st) {
  (void)st;
  accepted a = {event_base_new(), 0, 0};
  assert_non_null(a.base);
  im_listener *l = im_listener_new(a.base, "127.0.0.1:0", 16, on_accept, &a);
  assert_non_null(l);
  struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)im_listener_port(l))};
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  int c[3];
  for (int i = 0; i < 3; i++) {
    c[i] = socket(AF_INET, SOCK_STREAM, 0);
    assert_int_equal(connect(c[i], (struct sockaddr *)&sa, sizeof sa), 0);
  }
  while (a.n < 3) assert_int_equal(event_base_loop(a.base, EVLOOP_ONCE), 0);
  assert_int_equal(a.nodelay, 3);
  for (int i = 0; i < 3; i++) close(c[i]);
  im_listener_free(l);
  event_base_free(a.base);
}

static void nop_want(im_server *s, im_conn_id c, void *ctx, void *u) {
  (void)s, (void)c, (void)ctx, (void)u;
}

static void test_conn_secure_flag(void **st) {
  (void)st;
  im_server *srv = im_server_new(NULL, NULL, NULL);
  im_io io = {nop_want, nop_want, NULL};
  im_server_set_io(srv, &io);
  im_conn_id a = im_server_accept(srv, IM_TRANSPORT_WS, "[::1]:1", NULL);
  im_conn_id b = im_server_accept(srv, IM_TRANSPORT_TCP, "127.0.0.1:2", NULL);
  assert_int_equal(im_conn_set_secure(srv, b, 1), 0);
  im_conn_info ia, ib;
  assert_int_equal(im_conn_get_info(srv, a, &ia), 0);
  assert_int_equal(im_conn_get_info(srv, b, &ib), 0);
  assert_int_equal(ia.secure, 0);
  assert_int_equal(ib.secure, 1);
  assert_int_equal(im_conn_set_secure(srv, b, 0), 0);
  assert_int_equal(im_conn_get_info(srv, b, &ib), 0);
  assert_int_equal(ib.secure, 0);
  assert_int_equal(im_conn_set_secure(srv, 12345, 1), IM_ENOENT);
  im_server_free(srv);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_addr_parse),
      cmocka_unit_test(test_plain_stream),
      cmocka_unit_test(test_tls_context_errors),
      cmocka_unit_test(test_listener_bad_addr),
      cmocka_unit_test(test_listener_nodelay),
      cmocka_unit_test(test_conn_secure_flag),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
