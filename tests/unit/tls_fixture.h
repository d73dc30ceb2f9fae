/* For the TLS unit tests (test_event_tls.c, test_tls_stream.c): a
 * throwaway ECDSA P-256 certificate made by openssl in a temporary
 * directory at setup and removed at teardown, and the socket callbacks of
 * their mbedTLS test clients (ctx points at the fd). */
#ifndef TESTS_TLS_FIXTURE_H
#define TESTS_TLS_FIXTURE_H

#include <errno.h>
#include <mbedtls/ssl.h>
#include <stdio.h>
#include <sys/socket.h>
#include <stdlib.h>
#include <unistd.h>

static char dir[] = "/tmp/im-tls-test-XXXXXX";
static char cert[64], key[64];

static int setup(void **st) {
  (void)st;
  if (!mkdtemp(dir)) return -1;
  snprintf(cert, sizeof cert, "%s/c.pem", dir);
  snprintf(key, sizeof key, "%s/k.pem", dir);
  char cmd[512];
  snprintf(cmd, sizeof cmd,
           "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout %s "
           "-out %s -days 1 -subj /CN=localhost >/dev/null 2>&1",
           key, cert);
  return system(cmd) == 0 ? 0 : -1;
}

static int teardown(void **st) {
  (void)st;
  unlink(cert);
  unlink(key);
  rmdir(dir);
  return 0;
}

static int c_send(void *ctx, const unsigned char *b, size_t n) {
  ssize_t w = send(*(int *)ctx, b, n, MSG_NOSIGNAL);
  if (w < 0) return errno == EAGAIN ? MBEDTLS_ERR_SSL_WANT_WRITE : -1;
  return (int)w;
}

static int c_recv(void *ctx, unsigned char *b, size_t n) {
  ssize_t r = recv(*(int *)ctx, b, n, 0);
  if (r < 0) return errno == EAGAIN ? MBEDTLS_ERR_SSL_WANT_READ : -1;
  return (int)r;
}

#endif
