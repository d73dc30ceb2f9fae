/* libFuzzer harness: the TLS im_stream (lib/event/tls.c over stream.c), the
 * code every TLS listener's bytes go through before the engine or the HTTP
 * server sees them, over a real socket pair against the server context of
 * im_tls_new() with a built-in test certificate (ECDSA P-256, ALPN "imp").
 *
 * Split layout (fuzz_common.h). mode & 1 picks what the stream is:
 *   0  the client's side of a handshake, raw: the fuzzer is the TLS client
 *      from its first byte (ClientHello parsing, extensions, ALPN, session
 *      tickets); after the stream the client half-closes.
 *   1  after a handshake with an in-process mbedTLS client (resumed from a
 *      session ticket; mode & 2: a full handshake), chunks the control
 *      bytes route: no flag, the client encrypts the chunk as application
 *      data; 0x40 the chunk goes onto the wire raw (attacker records);
 *      0x20 the server writes the chunk (as two iovecs) and the client
 *      reads it. 0x80 reads on the server side in pieces of 1..8 bytes.
 *   mode & 4: small socket buffers, so the server's writes stop halfway.
 *
 * Checks: the handshake answers only 0, IM_STREAM_AGAIN or IM_EPROTO, and
 * a client that goes away before finishing is an error, never a wait; a
 * finished handshake reports ALPN "imp"; as long as no raw bytes were
 * injected, every byte the client encrypted is read back in order and at
 * once (reads report no more than asked, pending is bounded by a record),
 * every byte the server wrote reaches the client, nothing fails, and the
 * shutdown's close_notify reaches the client; after raw bytes, failures
 * are IM_EPROTO/IM_ESYS or EOF and the stream is not used again. */
#include <errno.h>
#include <fcntl.h>
#include <mbedtls/ctr_drbg.h>
#include <mbedtls/entropy.h>
#include <mbedtls/ssl.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#include <libim/im_net.h>
#include <libim/im_tls.h>

#include "fuzz_common.h"

/* A throwaway self-signed certificate (CN libim-fuzz) for this harness. */
static const char cert_pem[] =
    "-----BEGIN CERTIFICATE-----\n"
    "MIIBgDCCASegAwIBAgIUZvzQK06uekrv/yOrifkFkQ2KPI8wCgYIKoZIzj0EAwIw\n"
    "FTETMBEGA1UEAwwKbGliaW0tZnV6ejAgFw0yNjExMzAxNjMxMzZaGA8yMTI2MTEw\n"
    "NjE2MzEzNlowFTETMBEGA1UEAwwKbGliaW0tZnV6ejBZMBMGByqGSM49AgEGCCqG\n"
    "SM49AwEHA0IABOE4DB6jBwzwuEibr+HKi44Y0QT2QixJyDJUGzgxfYg3idNXyTHt\n"
    "g4FknN/li0QlpohVGJKxJG0AME/D2thdwG2jUzBRMB0GA1UdDgQWBBRIcPvW6Pq5\n"
    "2B3lTnS4oXxbc+DjkTAfBgNVHSMEGDAWgBRIcPvW6Pq52B3lTnS4oXxbc+DjkTAP\n"
    "BgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0cAMEQCIGu491IgMe/kKP8WeJdB\n"
    "CXFHvGv3HFNhtY3LuzOxuHh7AiByLTbE6CKUZGAFNPeUsYSwcTkWmAdHld/wH/nH\n"
    "0k0QQg==\n"
    "-----END CERTIFICATE-----\n";
static const char key_pem[] =
    "-----BEGIN PRIVATE KEY-----\n"
    "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg5Ya0k3l2l7ttcKu3\n"
    "/fUUruIkNQPu18UoAqFe8rKRhyqhRANCAAThOAweowcM8LhIm6/hyouOGNEE9kIs\n"
    "ScgyVBs4MX2IN4nTV8kx7YOBZJzf5YtEJaaIVRiSsSRtADBPw9rYXcBt\n"
    "-----END PRIVATE KEY-----\n";

#define ALPN "imp"
#define RECORD_MAX 16384

static char dir[] = "/tmp/im-fuzz-tls-XXXXXX";
static char cert[64], key[64];
static im_tls *tls;
static mbedtls_ssl_config cconf;
static mbedtls_entropy_context entropy;
static mbedtls_ctr_drbg_context drbg;
static mbedtls_ssl_session resume;

typedef struct client {
  int fd;
  mbedtls_ssl_context ssl;
} client;

static int c_send(void *ctx, const unsigned char *b, size_t n) {
  ssize_t w = send(*(int *)ctx, b, n, MSG_NOSIGNAL);
  if (w < 0) return errno == EAGAIN ? MBEDTLS_ERR_SSL_WANT_WRITE : MBEDTLS_ERR_SSL_INTERNAL_ERROR;
  return (int)w;
}

static int c_recv(void *ctx, unsigned char *b, size_t n) {
  ssize_t r = recv(*(int *)ctx, b, n, 0);
  if (r < 0) return errno == EAGAIN ? MBEDTLS_ERR_SSL_WANT_READ : MBEDTLS_ERR_SSL_INTERNAL_ERROR;
  return (int)r;
}

static void cleanup(void) {
  im_tls_free(tls);
  unlink(cert);
  unlink(key);
  rmdir(dir);
}

static void write_file(const char *path, const char *text) {
  FILE *f = fopen(path, "w");
  FZ_CHECK(f && fputs(text, f) >= 0 && fclose(f) == 0);
}

static void pair(int sv[2], bool small) {
  FZ_CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
  for (int i = 0; i < 2; i++) {
    if (small) {
      int sz = 4096;
      setsockopt(sv[i], SOL_SOCKET, SO_SNDBUF, &sz, sizeof sz);
      setsockopt(sv[i], SOL_SOCKET, SO_RCVBUF, &sz, sizeof sz);
    }
    FZ_CHECK(fcntl(sv[i], F_SETFL, O_NONBLOCK) == 0);
  }
}

static void client_open(client *c, int fd, bool resumed) {
  c->fd = fd;
  mbedtls_ssl_init(&c->ssl);
  FZ_CHECK(mbedtls_ssl_setup(&c->ssl, &cconf) == 0);
  mbedtls_ssl_set_bio(&c->ssl, &c->fd, c_send, c_recv, NULL);
  if (resumed) FZ_CHECK(mbedtls_ssl_set_session(&c->ssl, &resume) == 0);
}

static void client_close(client *c) {
  mbedtls_ssl_free(&c->ssl);
  close(c->fd);
}

/* Both sides until done; the handshake must neither fail nor stall. */
static void handshake_both(im_stream *s, client *c) {
  int srv = IM_STREAM_AGAIN, cli = MBEDTLS_ERR_SSL_WANT_READ;
  for (int i = 0; i < 1000 && (srv || cli); i++) {
    if (cli) cli = mbedtls_ssl_handshake(&c->ssl);
    FZ_CHECK(cli == 0 || cli == MBEDTLS_ERR_SSL_WANT_READ || cli == MBEDTLS_ERR_SSL_WANT_WRITE);
    if (srv) srv = im_stream_handshake(s);
    FZ_CHECK(srv == 0 || srv == IM_STREAM_AGAIN);
  }
  FZ_CHECK(srv == 0 && cli == 0);
  const char *alpn = im_stream_alpn(s);
  FZ_CHECK(alpn && !strcmp(alpn, ALPN));
}

static void init(void) {
  FZ_CHECK(mkdtemp(dir));
  snprintf(cert, sizeof cert, "%s/c.pem", dir);
  snprintf(key, sizeof key, "%s/k.pem", dir);
  write_file(cert, cert_pem);
  write_file(key, key_pem);
  atexit(cleanup);
  char err[256] = "";
  im_tls_opts o = {.cert_file = cert, .key_file = key, .alpn = ALPN};
  tls = im_tls_new(&o, err, sizeof err);
  if (!tls) fprintf(stderr, "fuzz_tls: %s\n", err);
  FZ_CHECK(tls);
  static const char *protos[] = {ALPN, NULL};
  mbedtls_ssl_config_init(&cconf);
  mbedtls_entropy_init(&entropy);
  mbedtls_ctr_drbg_init(&drbg);
  FZ_CHECK(mbedtls_ctr_drbg_seed(&drbg, mbedtls_entropy_func, &entropy, NULL, 0) == 0);
  FZ_CHECK(mbedtls_ssl_config_defaults(&cconf, MBEDTLS_SSL_IS_CLIENT, MBEDTLS_SSL_TRANSPORT_STREAM,
                                       MBEDTLS_SSL_PRESET_DEFAULT) == 0);
  mbedtls_ssl_conf_authmode(&cconf, MBEDTLS_SSL_VERIFY_NONE);
  mbedtls_ssl_conf_rng(&cconf, mbedtls_ctr_drbg_random, &drbg);
  FZ_CHECK(mbedtls_ssl_conf_alpn_protocols(&cconf, protos) == 0);
  mbedtls_ssl_conf_session_tickets(&cconf, MBEDTLS_SSL_SESSION_TICKETS_ENABLED);
  /* one full handshake for a ticket: later inputs resume (no key exchange) */
  int sv[2];
  pair(sv, false);
  im_stream *s = im_stream_new(sv[0], tls);
  client c;
  client_open(&c, sv[1], false);
  handshake_both(s, &c);
  mbedtls_ssl_session_init(&resume);
  FZ_CHECK(mbedtls_ssl_get_session(&c.ssl, &resume) == 0);
  im_stream_free(s);
  client_close(&c);
}

/* Read what the client sent: in order, nothing lost while untainted. */
typedef struct run {
  im_stream *s;
  client c;
  uint8_t *sent;    /* plaintext the client encrypted, in order */
  size_t nsent, got;
  bool tainted;     /* raw bytes went onto the wire */
  bool dead;        /* the stream failed or ended: not used again */
} run;

static void server_read(run *r, bool tiny) {
  uint8_t buf[RECORD_MAX];
  for (int i = 0; i < 100000 && !r->dead; i++) {
    size_t cap = tiny ? 1 + (size_t)(i % 8) : sizeof buf;
    ssize_t n = im_stream_read(r->s, buf, cap);
    if (n == IM_STREAM_AGAIN) {
      FZ_CHECK(im_stream_wants(r->s) == IM_WANT_READ || im_stream_wants(r->s) == IM_WANT_WRITE);
      FZ_CHECK(im_stream_pending(r->s) == 0);
      break;
    }
    if (n <= 0) {
      FZ_CHECK(n == 0 || n == IM_EPROTO || n == IM_ESYS);
      FZ_CHECK(r->tainted); /* the client neither closed nor sent garbage */
      r->dead = true;
      break;
    }
    FZ_CHECK((size_t)n <= cap);
    FZ_CHECK(im_stream_pending(r->s) <= RECORD_MAX);
    if (!r->tainted) {
      FZ_CHECK(r->got + (size_t)n <= r->nsent);
      FZ_CHECK(!memcmp(buf, r->sent + r->got, (size_t)n));
    }
    r->got += (size_t)n;
  }
  if (!r->tainted) FZ_CHECK(r->got == r->nsent); /* all of it, at once */
}

static void client_write(run *r, const uint8_t *p, size_t n) {
  size_t off = 0;
  for (int i = 0; off < n && i < 1000; i++) {
    int w = mbedtls_ssl_write(&r->c.ssl, p + off, n - off);
    if (w > 0) {
      memcpy(r->sent + r->nsent, p + off, (size_t)w);
      r->nsent += (size_t)w;
      off += (size_t)w;
    } else if (w == MBEDTLS_ERR_SSL_WANT_WRITE || w == MBEDTLS_ERR_SSL_WANT_READ) {
      server_read(r, false); /* make room */
    } else {
      FZ_CHECK(r->tainted); /* the server sent an alert */
      return;
    }
  }
  FZ_CHECK(off == n || r->tainted || r->dead);
}

/* The server writes p (as two iovecs, retried as im_net.h asks: the bytes
 * of an attempt that said IM_STREAM_AGAIN are offered again) and the
 * client reads it. */
static void server_write(run *r, const uint8_t *p, size_t n) {
  uint8_t *back = malloc(n ? n : 1);
  FZ_CHECK(back);
  size_t off = 0, have = 0;
  for (int i = 0; (off < n || have < n) && i < 100000; i++) {
    if (off < n && !r->dead) {
      size_t rest = n - off, a = rest / 2;
      struct iovec iov[2] = {{(void *)(p + off), a ? a : rest}, {(void *)(p + off + a), rest - a}};
      ssize_t w = im_stream_writev(r->s, iov, a ? 2 : 1);
      if (w == IM_STREAM_AGAIN) {
        FZ_CHECK(im_stream_wants(r->s) == IM_WANT_WRITE || im_stream_wants(r->s) == IM_WANT_READ);
      } else if (w > 0) {
        FZ_CHECK((size_t)w <= rest);
        off += (size_t)w;
      } else {
        FZ_CHECK(w == IM_EPROTO || w == IM_ESYS);
        FZ_CHECK(r->tainted);
        r->dead = true;
      }
    }
    int got = mbedtls_ssl_read(&r->c.ssl, back + have, n - have);
    if (got > 0) {
      have += (size_t)got;
    } else if (got != MBEDTLS_ERR_SSL_WANT_READ) {
      FZ_CHECK(r->tainted); /* an alert after garbage */
      break;
    } else if (r->dead || off == n) {
      break; /* nothing more is coming */
    }
  }
  if (!r->tainted) FZ_CHECK(off == n && have == n && !memcmp(back, p, n));
  free(back);
}

static void raw_handshake(fz_input *in, bool small) {
  int sv[2];
  pair(sv, small);
  im_stream *s = im_stream_new(sv[0], tls);
  FZ_CHECK(s && im_stream_secure(s) && im_stream_pending(s) == 0 && !im_stream_alpn(s));
  int rc = IM_STREAM_AGAIN;
  uint8_t ctl, sink[4096];
  size_t n;
  while (rc == IM_STREAM_AGAIN && (n = fz_next_chunk(in, in->stream_len, &in->off, &ctl))) {
    ssize_t w = send(sv[1], in->stream + in->off, n, MSG_NOSIGNAL);
    in->off += n;
    if (w < 0) break; /* the socket buffer is full: the server did not read */
    rc = im_stream_handshake(s);
    FZ_CHECK(rc == 0 || rc == IM_STREAM_AGAIN || rc == IM_EPROTO);
    while (recv(sv[1], sink, sizeof sink, 0) > 0) {
    }
  }
  if (rc == IM_STREAM_AGAIN) {
    /* the client leaves halfway: an error now, not a wait */
    shutdown(sv[1], SHUT_WR);
    rc = im_stream_handshake(s);
    FZ_CHECK(rc == IM_EPROTO || rc == 0);
  }
  if (rc == 0) { /* cannot happen without the keys; if it did, the stream must work */
    FZ_CHECK(im_stream_alpn(s) == NULL || !strcmp(im_stream_alpn(s), ALPN));
    ssize_t r = im_stream_read(s, sink, sizeof sink);
    FZ_CHECK(r >= 0 || r == IM_STREAM_AGAIN || r == IM_EPROTO || r == IM_ESYS);
  }
  im_stream_free(s);
  close(sv[1]);
}

static void established(fz_input *in, bool resumed, bool small) {
  int sv[2];
  pair(sv, small);
  run r = {0};
  r.s = im_stream_new(sv[0], tls);
  r.sent = malloc(in->stream_len ? in->stream_len : 1);
  FZ_CHECK(r.s && r.sent);
  client_open(&r.c, sv[1], resumed);
  handshake_both(r.s, &r.c);
  uint8_t ctl;
  size_t n;
  while (!r.dead && (n = fz_next_chunk(in, in->stream_len, &in->off, &ctl))) {
    const uint8_t *p = in->stream + in->off;
    in->off += n;
    if (ctl & 0x40) {
      r.tainted = true;
      if (send(sv[1], p, n, MSG_NOSIGNAL) < 0) break;
    } else if (ctl & 0x20) {
      server_write(&r, p, n);
    } else {
      client_write(&r, p, n);
    }
    server_read(&r, ctl & 0x80);
  }
  if (!r.dead) {
    im_stream_shutdown(r.s);
    if (!r.tainted) {
      uint8_t buf[256];
      FZ_CHECK(mbedtls_ssl_read(&r.c.ssl, buf, sizeof buf) == MBEDTLS_ERR_SSL_PEER_CLOSE_NOTIFY);
    }
  }
  im_stream_free(r.s);
  client_close(&r.c);
  free(r.sent);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static bool ready;
  if (!ready) {
    init();
    ready = true;
  }
  fz_input in;
  if (!fz_input_init(&in, data, size)) return 0;
  if (in.mode & 1)
    established(&in, !(in.mode & 2), in.mode & 4);
  else
    raw_handshake(&in, in.mode & 4);
  return 0;
}
