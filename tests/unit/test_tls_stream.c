/* The TLS im_stream against an in-process mbedTLS client over a socket pair
 * with small buffers, so that writes stop halfway (IM_STREAM_AGAIN with an
 * encrypted record pending) and reads stop with decrypted bytes left over
 * (im_stream_pending): the two rules of <libim/im_net.h> the drivers rely
 * on. The certificate is made with `openssl req` in a temporary directory. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <errno.h>
#include <fcntl.h>
#include <mbedtls/ctr_drbg.h>
#include <mbedtls/entropy.h>
#include <mbedtls/ssl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <libim/im_net.h>
#include <libim/im_tls.h>

#include "event/stream.h"
#include "tls_fixture.h"

typedef struct client {
  int fd;
  mbedtls_ssl_context ssl;
  mbedtls_ssl_config conf;
  mbedtls_entropy_context entropy;
  mbedtls_ctr_drbg_context drbg;
} client;

static void client_init(client *c, int fd, const char *alpn) {
  static const char *protos[2];
  c->fd = fd;
  mbedtls_ssl_init(&c->ssl);
  mbedtls_ssl_config_init(&c->conf);
  mbedtls_entropy_init(&c->entropy);
  mbedtls_ctr_drbg_init(&c->drbg);
  assert_int_equal(mbedtls_ctr_drbg_seed(&c->drbg, mbedtls_entropy_func, &c->entropy, NULL, 0), 0);
  assert_int_equal(mbedtls_ssl_config_defaults(&c->conf, MBEDTLS_SSL_IS_CLIENT,
                                               MBEDTLS_SSL_TRANSPORT_STREAM,
                                               MBEDTLS_SSL_PRESET_DEFAULT),
                   0);
  mbedtls_ssl_conf_authmode(&c->conf, MBEDTLS_SSL_VERIFY_NONE);
  mbedtls_ssl_conf_rng(&c->conf, mbedtls_ctr_drbg_random, &c->drbg);
  if (alpn) {
    protos[0] = alpn;
    mbedtls_ssl_conf_alpn_protocols(&c->conf, protos);
  }
  assert_int_equal(mbedtls_ssl_setup(&c->ssl, &c->conf), 0);
  mbedtls_ssl_set_bio(&c->ssl, &c->fd, c_send, c_recv, NULL);
}

static void client_free(client *c) {
  mbedtls_ssl_free(&c->ssl);
  mbedtls_ssl_config_free(&c->conf);
  mbedtls_ctr_drbg_free(&c->drbg);
  mbedtls_entropy_free(&c->entropy);
  close(c->fd);
}

/* A socket pair with small buffers, both ends non-blocking. */
static void small_pair(int sv[2]) {
  assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
  int small = 4096;
  for (int i = 0; i < 2; i++) {
    setsockopt(sv[i], SOL_SOCKET, SO_SNDBUF, &small, sizeof small);
    setsockopt(sv[i], SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
    fcntl(sv[i], F_SETFL, O_NONBLOCK);
  }
}

static void handshake_both(im_stream *s, client *c) {
  int srv_rc = IM_STREAM_AGAIN, cli_rc = MBEDTLS_ERR_SSL_WANT_READ;
  for (int i = 0; i < 1000 && (srv_rc || cli_rc); i++) {
    if (cli_rc) cli_rc = mbedtls_ssl_handshake(&c->ssl);
    if (cli_rc)
      assert_true(cli_rc == MBEDTLS_ERR_SSL_WANT_READ || cli_rc == MBEDTLS_ERR_SSL_WANT_WRITE);
    if (srv_rc) srv_rc = im_stream_handshake(s);
    if (srv_rc) assert_int_equal(srv_rc, IM_STREAM_AGAIN);
  }
  assert_int_equal(srv_rc, 0);
  assert_int_equal(cli_rc, 0);
}

static void test_partial_writes_and_pending_reads(void **st) {
  (void)st;
  im_tls_opts o = {.cert_file = cert, .key_file = key, .alpn = "http/1.1"};
  char err[256];
  im_tls *tls = im_tls_new(&o, err, sizeof err);
  assert_non_null(tls);
  int sv[2];
  small_pair(sv);
  im_stream *s = im_stream_new(sv[0], tls);
  assert_non_null(s);
  assert_int_equal(im_stream_secure(s), 1);
  client c;
  client_init(&c, sv[1], "http/1.1");
  handshake_both(s, &c);
  assert_string_equal(im_stream_alpn(s), "http/1.1");

  /* server -> client: 300 KB offered as a queue of uneven iovecs that only
   * drops bytes once they are reported written, as the engine's does, and
   * grows at its tail meanwhile */
  enum { TOTAL = 300000 };
  static unsigned char out[TOTAL], in[TOTAL];
  for (size_t i = 0; i < TOTAL; i++) out[i] = (unsigned char)(i * 7 + i / 251);
  size_t off = 0, got = 0, queued = 0;
  int agains = 0;
  for (long iter = 0; got < TOTAL; iter++) {
    assert_true(iter < 100000); /* bytes lost: the reader would wait forever */
    /* the queue grows while a write waits: a retry is offered more bytes
     * than the attempt that said IM_STREAM_AGAIN */
    queued = queued + 3000 < TOTAL ? queued + 3000 : TOTAL;
    if (off < queued) {
      struct iovec iov[3];
      size_t rest = queued - off, a = rest < 7 ? rest : 7;
      size_t b = rest - a < 5000 ? rest - a : 5000;
      iov[0] = (struct iovec){out + off, a};
      iov[1] = (struct iovec){out + off + a, b};
      iov[2] = (struct iovec){out + off + a + b, rest - a - b};
      ssize_t w = im_stream_writev(s, iov, rest - a - b ? 3 : b ? 2 : 1);
      if (w == IM_STREAM_AGAIN) {
        agains++;
        assert_int_equal(im_stream_wants(s), IM_WANT_WRITE);
      } else {
        assert_true(w > 0);
        off += (size_t)w;
      }
    }
    /* a slow reader: the writer must hit full buffers */
    int r = mbedtls_ssl_read(&c.ssl, in + got, TOTAL - got < 1500 ? TOTAL - got : 1500);
    if (r > 0) got += (size_t)r;
    else assert_int_equal(r, MBEDTLS_ERR_SSL_WANT_READ);
  }
  assert_true(agains > 0); /* the small buffers did stop the writer */
  assert_memory_equal(in, out, TOTAL);

  /* client -> server: one 5000-byte record read 100 bytes at a time; the
   * rest waits inside the stream, not in the socket */
  static unsigned char msg[5000], back[5000];
  for (size_t i = 0; i < sizeof msg; i++) msg[i] = (unsigned char)(i % 253);
  size_t sent = 0, have = 0;
  int pending_seen = 0;
  while (have < sizeof msg) {
    if (sent < sizeof msg) {
      int w = mbedtls_ssl_write(&c.ssl, msg + sent, sizeof msg - sent);
      if (w > 0) sent += (size_t)w;
      else assert_int_equal(w, MBEDTLS_ERR_SSL_WANT_WRITE);
    }
    ssize_t n = im_stream_read(s, back + have, 100);
    if (n == IM_STREAM_AGAIN) continue;
    assert_true(n > 0 && n <= 100);
    have += (size_t)n;
    if (im_stream_pending(s)) pending_seen = 1;
  }
  assert_true(pending_seen);
  assert_memory_equal(back, msg, sizeof msg);

  /* a graceful end: close_notify reaches the client */
  im_stream_shutdown(s);
  int r;
  do r = mbedtls_ssl_read(&c.ssl, in, sizeof in);
  while (r == MBEDTLS_ERR_SSL_WANT_READ);
  assert_int_equal(r, MBEDTLS_ERR_SSL_PEER_CLOSE_NOTIFY);
  im_stream_free(s);
  client_free(&c);
  im_tls_free(tls);
}

static void test_garbage_and_eof(void **st) {
  (void)st;
  im_tls_opts o = {.cert_file = cert, .key_file = key};
  im_tls *tls = im_tls_new(&o, NULL, 0);
  assert_non_null(tls);
  int sv[2];
  small_pair(sv);
  im_stream *s = im_stream_new(sv[0], tls);
  assert_int_equal(im_stream_handshake(s), IM_STREAM_AGAIN); /* nothing sent yet */
  assert_int_equal(im_stream_pending(s), 0);
  assert_int_equal(write(sv[1], "GET / HTTP/1.1\r\nHost: x\r\n\r\n", 27), 27);
  assert_int_equal(im_stream_handshake(s), IM_EPROTO);
  im_stream_free(s);
  close(sv[1]);

  small_pair(sv);
  s = im_stream_new(sv[0], tls);
  close(sv[1]); /* EOF before any byte */
  assert_int_equal(im_stream_handshake(s), IM_EPROTO);
  im_stream_free(s);
  im_tls_free(tls);
}

static void test_reload_keeps_old_sessions(void **st) {
  (void)st;
  im_tls_opts o = {.cert_file = cert, .key_file = key};
  im_tls *tls = im_tls_new(&o, NULL, 0);
  assert_int_equal(im_tls_generation(tls), 1);
  int sv[2];
  small_pair(sv);
  im_stream *s = im_stream_new(sv[0], tls);
  client c;
  client_init(&c, sv[1], NULL);
  assert_int_equal(im_tls_reload(tls, NULL, 0), 0);
  assert_int_equal(im_tls_generation(tls), 2);
  im_tls_free(tls); /* the session keeps its settings alive */
  handshake_both(s, &c);
  assert_null(im_stream_alpn(s));
  struct iovec iov = {"ping", 4};
  assert_int_equal(im_stream_writev(s, &iov, 1), 4);
  unsigned char b[8];
  int r;
  do r = mbedtls_ssl_read(&c.ssl, b, sizeof b);
  while (r == MBEDTLS_ERR_SSL_WANT_READ);
  assert_int_equal(r, 4);
  im_stream_free(s);
  client_free(&c);
}

/* Sends len bytes one way and reads them back on the other side. */
static void server_to_client(im_stream *s, client *c, const unsigned char *out, size_t len) {
  static unsigned char in[70000];
  size_t off = 0, got = 0;
  for (long iter = 0; got < len; iter++) {
    assert_true(iter < 100000);
    if (off < len) {
      struct iovec iov = {(void *)(out + off), len - off};
      ssize_t w = im_stream_writev(s, &iov, 1);
      if (w > 0) off += (size_t)w;
      else assert_int_equal(w, IM_STREAM_AGAIN);
    }
    int r = mbedtls_ssl_read(&c->ssl, in + got, len - got);
    if (r > 0) got += (size_t)r;
    else assert_int_equal(r, MBEDTLS_ERR_SSL_WANT_READ);
  }
  assert_memory_equal(in, out, len);
}

static void client_to_server(im_stream *s, client *c, const unsigned char *out, size_t len,
                             size_t chunk) {
  static unsigned char in[70000];
  size_t off = 0, got = 0;
  for (long iter = 0; got < len; iter++) {
    assert_true(iter < 100000);
    if (off < len) {
      int w = mbedtls_ssl_write(&c->ssl, out + off, len - off);
      if (w > 0) off += (size_t)w;
      else assert_int_equal(w, MBEDTLS_ERR_SSL_WANT_WRITE);
    }
    ssize_t n = im_stream_read(s, in + got, len - got < chunk ? len - got : chunk);
    if (n > 0) got += (size_t)n;
    else assert_int_equal(n, IM_STREAM_AGAIN);
  }
  assert_memory_equal(in, out, len);
}

/* An idle session gives its record buffers' pages back (im__tls_rest) and
 * goes on exactly as before: records of every size both ways, many rests
 * in between. It refuses while decrypted bytes wait in the stream. */
static void test_idle_session_rests(void **st) {
  (void)st;
  im_tls_opts o = {.cert_file = cert, .key_file = key};
  im_tls *tls = im_tls_new(&o, NULL, 0);
  assert_non_null(tls);
  int sv[2];
  small_pair(sv);
  im_stream *s = im_stream_new(sv[0], tls);
  assert_int_equal(im__tls_rest(s), 0); /* no session yet */
  client c;
  client_init(&c, sv[1], NULL);
  handshake_both(s, &c);
  static unsigned char data[65536 + 16]; /* sizes[k] bytes from data + k */
  for (size_t i = 0; i < sizeof data; i++) data[i] = (unsigned char)(i * 13 + i / 509);
  static const size_t sizes[] = {1, 100, 4095, 4096, 4097, 16384, 16385, 65536};
  size_t min_back = 2 * (size_t)(16384 / sysconf(_SC_PAGESIZE) - 1) * (size_t)sysconf(_SC_PAGESIZE);
  for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
    server_to_client(s, &c, data + k, sizes[k]);
    client_to_server(s, &c, data + 2 * k, sizes[k], 70000);
    /* between records: at least all but one page of each 16 KiB buffer */
    assert_true(im__tls_rest(s) >= min_back);
  }
  /* a record read halfway: its rest is in the input buffer, no rest */
  int w;
  do w = mbedtls_ssl_write(&c.ssl, data, 3000);
  while (w == MBEDTLS_ERR_SSL_WANT_WRITE);
  assert_int_equal(w, 3000);
  unsigned char part[1000];
  ssize_t n;
  do n = im_stream_read(s, part, sizeof part);
  while (n == IM_STREAM_AGAIN);
  assert_int_equal(n, (ssize_t)sizeof part);
  assert_true(im_stream_pending(s) > 0);
  assert_int_equal(im__tls_rest(s), 0);
  assert_memory_equal(part, data, sizeof part);
  static unsigned char rest[2000];
  size_t have = 0;
  while (have < sizeof rest) {
    n = im_stream_read(s, rest + have, sizeof rest - have);
    assert_true(n > 0);
    have += (size_t)n;
  }
  assert_memory_equal(rest, data + 1000, sizeof rest);
  assert_true(im__tls_rest(s) > 0);
  server_to_client(s, &c, data, 20000);
  im_stream_free(s);
  client_free(&c);
  im_tls_free(tls);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_partial_writes_and_pending_reads),
      cmocka_unit_test(test_garbage_and_eof),
      cmocka_unit_test(test_reload_keeps_old_sessions),
      cmocka_unit_test(test_idle_session_rests),
  };
  return cmocka_run_group_tests(tests, setup, teardown);
}
