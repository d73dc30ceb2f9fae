/* TLS for libim's listeners, on mbedTLS 2.28: the server contexts of
 * <libim/im_tls.h> and the TLS implementation of the im_stream seam.
 *
 * A reload builds a complete new `tls_conf` (certificate, key, RNG,
 * mbedtls_ssl_config) and swaps it in. Every session holds a reference on
 * the tls_conf it was set up with, since mbedtls_ssl_context points into it
 * for its whole life; the old one is freed when its last session closes. */
#include <errno.h>
#include <mbedtls/ctr_drbg.h>
#include <mbedtls/entropy.h>
#include <mbedtls/error.h>
#include <mbedtls/net_sockets.h>
#include <mbedtls/pk.h>
#include <mbedtls/ssl.h>
#include <mbedtls/ssl_internal.h>
#include <mbedtls/ssl_ticket.h>
#include <mbedtls/version.h>
#include <mbedtls/x509_crt.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "event/stream.h"

/* Resting idle sessions (tls_rest) reads the record-buffer fields of
 * mbedtls_ssl_context, which are public in 2.x and private from 3.0 on
 * (where MBEDTLS_SSL_VARIABLE_BUFFER_LENGTH does the job instead). */
#if MBEDTLS_VERSION_NUMBER >= 0x03000000
#error "lib/event/tls.c is written for mbedTLS 2.x"
#endif

#define DEFAULT_HANDSHAKE_MS 10000u
/* Largest application record: writes are gathered into one record up to
 * this size instead of one record per iovec. */
#define RECORD_MAX 16384
/* Session tickets (RFC 5077) let a client that reconnects skip the key
 * exchange and the signature. Their key is random per loaded certificate
 * (a reload starts over), or one for every context that shares it
 * (im_tls_share_tickets: kept across reloads), and mbedTLS rotates it
 * every TICKET_LIFETIME_S, which is also how long a ticket is accepted.
 * A shared one is used by several threads: mbedTLS locks the ticket
 * context and its random generator (MBEDTLS_THREADING_C). */
#define TICKET_LIFETIME_S 21600
/* An idle session gives its record buffers' pages back at most this often
 * (seconds): a busy connection pays one madvise and a few page faults per
 * interval, an idle one holds one page of each buffer. */
#define REST_INTERVAL_S 1

/* ECDHE only (forward secrecy), AEAD only. */
static const int ciphersuites[] = {
    MBEDTLS_TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    MBEDTLS_TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    MBEDTLS_TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    MBEDTLS_TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    MBEDTLS_TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    MBEDTLS_TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    0,
};

/* The ticket key with the random generator that makes it. */
typedef struct tls_tickets {
  atomic_uint refs;
  mbedtls_entropy_context entropy;
  mbedtls_ctr_drbg_context drbg;
  mbedtls_ssl_ticket_context ticket;
} tls_tickets;

typedef struct tls_conf {
  unsigned refs;
  tls_tickets *tk;
  mbedtls_ssl_config conf;
  mbedtls_x509_crt crt;
  mbedtls_pk_context key;
  mbedtls_entropy_context entropy;
  mbedtls_ctr_drbg_context drbg;
  const char *alpn_list[2];
  char alpn[];
} tls_conf;

struct im_tls {
  tls_conf *cur;
  tls_tickets *shared_tk;  /* im_tls_share_tickets: every conf's, or NULL: one per conf */
  char *cert_file, *key_file, *alpn;
  unsigned handshake_ms;
  unsigned generation;
};

typedef struct tls_stream {
  im_stream base;
  tls_conf *conf;
  size_t wpending; /* length of a write that returned WANT_*, to repeat */
  bool set_up;     /* mbedtls_ssl_setup done: the record buffers exist */
  bool hs_done;
  uint32_t rested_s; /* coarse monotonic second of the last rest; 0: never */
  mbedtls_ssl_context ssl;
} tls_stream;

/* ---- contexts ---------------------------------------------------------------- */

static void tickets_unref(tls_tickets *k) {
  if (!k || atomic_fetch_sub(&k->refs, 1) != 1) return;
  mbedtls_ssl_ticket_free(&k->ticket);
  mbedtls_ctr_drbg_free(&k->drbg);
  mbedtls_entropy_free(&k->entropy);
  free(k);
}

static tls_tickets *tickets_ref(tls_tickets *k) {
  atomic_fetch_add(&k->refs, 1);
  return k;
}

/* A new random ticket key; NULL with the mbedTLS code in *rc. */
static tls_tickets *tickets_new(int *rc) {
  tls_tickets *k = calloc(1, sizeof *k);
  if (!k) {
    *rc = MBEDTLS_ERR_SSL_ALLOC_FAILED;
    return NULL;
  }
  atomic_init(&k->refs, 1);
  mbedtls_entropy_init(&k->entropy);
  mbedtls_ctr_drbg_init(&k->drbg);
  mbedtls_ssl_ticket_init(&k->ticket);
  static const unsigned char pers[] = "libim-tls-tickets";
  if ((*rc = mbedtls_ctr_drbg_seed(&k->drbg, mbedtls_entropy_func, &k->entropy, pers,
                                   sizeof pers - 1)) != 0 ||
      (*rc = mbedtls_ssl_ticket_setup(&k->ticket, mbedtls_ctr_drbg_random, &k->drbg,
                                      MBEDTLS_CIPHER_AES_256_GCM, TICKET_LIFETIME_S)) != 0) {
    tickets_unref(k);
    return NULL;
  }
  return k;
}

static void conf_unref(tls_conf *c) {
  if (!c || --c->refs) return;
  mbedtls_ssl_config_free(&c->conf);
  tickets_unref(c->tk);
  mbedtls_x509_crt_free(&c->crt);
  mbedtls_pk_free(&c->key);
  mbedtls_ctr_drbg_free(&c->drbg);
  mbedtls_entropy_free(&c->entropy);
  free(c);
}

static void set_err(char *err, size_t errlen, const char *what, const char *path, int rc) {
  if (!err || !errlen) return;
  char why[128] = "";
  if (rc) mbedtls_strerror(rc, why, sizeof why);
  snprintf(err, errlen, "%s%s%s%s%s", what, path ? " " : "", path ? path : "", rc ? ": " : "",
           why);
}

static tls_conf *conf_load(const im_tls *t, char *err, size_t errlen) {
  size_t alen = t->alpn ? strlen(t->alpn) + 1 : 0;
  tls_conf *c = calloc(1, sizeof *c + alen);
  if (!c) {
    set_err(err, errlen, "out of memory", NULL, 0);
    return NULL;
  }
  c->refs = 1;
  mbedtls_ssl_config_init(&c->conf);
  mbedtls_x509_crt_init(&c->crt);
  mbedtls_pk_init(&c->key);
  mbedtls_entropy_init(&c->entropy);
  mbedtls_ctr_drbg_init(&c->drbg);
  int rc = 0;
  c->tk = t->shared_tk ? tickets_ref(t->shared_tk) : tickets_new(&rc);
  if (!c->tk) {
    set_err(err, errlen, "cannot set up TLS", NULL, rc);
    goto fail;
  }
  if ((rc = mbedtls_x509_crt_parse_file(&c->crt, t->cert_file)) != 0) {
    set_err(err, errlen, "cannot load certificate", t->cert_file, rc);
    goto fail;
  }
  if ((rc = mbedtls_pk_parse_keyfile(&c->key, t->key_file, NULL)) != 0) {
    set_err(err, errlen, "cannot load key", t->key_file, rc);
    goto fail;
  }
  if ((rc = mbedtls_pk_check_pair(&c->crt.pk, &c->key)) != 0) {
    set_err(err, errlen, "the key does not match the certificate", t->key_file, rc);
    goto fail;
  }
  static const unsigned char pers[] = "libim-tls";
  if ((rc = mbedtls_ctr_drbg_seed(&c->drbg, mbedtls_entropy_func, &c->entropy, pers,
                                  sizeof pers - 1)) != 0 ||
      (rc = mbedtls_ssl_config_defaults(&c->conf, MBEDTLS_SSL_IS_SERVER,
                                        MBEDTLS_SSL_TRANSPORT_STREAM,
                                        MBEDTLS_SSL_PRESET_DEFAULT)) != 0 ||
      (rc = mbedtls_ssl_conf_own_cert(&c->conf, &c->crt, &c->key)) != 0) {
    set_err(err, errlen, "cannot set up TLS", NULL, rc);
    goto fail;
  }
  mbedtls_ssl_conf_session_tickets_cb(&c->conf, mbedtls_ssl_ticket_write, mbedtls_ssl_ticket_parse,
                                      &c->tk->ticket);
  mbedtls_ssl_conf_rng(&c->conf, mbedtls_ctr_drbg_random, &c->drbg);
  mbedtls_ssl_conf_min_version(&c->conf, MBEDTLS_SSL_MAJOR_VERSION_3, MBEDTLS_SSL_MINOR_VERSION_3);
  mbedtls_ssl_conf_ciphersuites(&c->conf, ciphersuites);
  mbedtls_ssl_conf_renegotiation(&c->conf, MBEDTLS_SSL_RENEGOTIATION_DISABLED);
  mbedtls_ssl_conf_authmode(&c->conf, MBEDTLS_SSL_VERIFY_NONE);
  if (alen) {
    memcpy(c->alpn, t->alpn, alen);
    c->alpn_list[0] = c->alpn;
    if ((rc = mbedtls_ssl_conf_alpn_protocols(&c->conf, c->alpn_list)) != 0) {
      set_err(err, errlen, "bad ALPN protocol", t->alpn, rc);
      goto fail;
    }
  }
  return c;
fail:
  conf_unref(c);
  return NULL;
}

static char *dup_or_null(const char *s) {
  if (!s) return NULL;
  size_t n = strlen(s) + 1;
  char *d = malloc(n);
  if (d) memcpy(d, s, n);
  return d;
}

im_tls *im_tls_new(const im_tls_opts *o, char *err, size_t errlen) {
  if (!o || !o->cert_file || !o->key_file) {
    set_err(err, errlen, "a certificate file and a key file are required", NULL, 0);
    return NULL;
  }
  im_tls *t = calloc(1, sizeof *t);
  if (!t) {
    set_err(err, errlen, "out of memory", NULL, 0);
    return NULL;
  }
  t->cert_file = dup_or_null(o->cert_file);
  t->key_file = dup_or_null(o->key_file);
  t->alpn = dup_or_null(o->alpn);
  t->handshake_ms = o->handshake_timeout_ms ? o->handshake_timeout_ms : DEFAULT_HANDSHAKE_MS;
  if (!t->cert_file || !t->key_file || (o->alpn && !t->alpn)) {
    set_err(err, errlen, "out of memory", NULL, 0);
    im_tls_free(t);
    return NULL;
  }
  t->cur = conf_load(t, err, errlen);
  if (!t->cur) {
    im_tls_free(t);
    return NULL;
  }
  t->generation = 1;
  return t;
}

int im_tls_reload(im_tls *t, char *err, size_t errlen) {
  tls_conf *c = conf_load(t, err, errlen);
  if (!c) return IM_EINVAL;
  conf_unref(t->cur);
  t->cur = c;
  t->generation++;
  return 0;
}

void im_tls_share_tickets(im_tls *t, im_tls *from) {
  if (!from->shared_tk) from->shared_tk = tickets_ref(from->cur->tk); /* kept across reloads */
  if (t == from) return;
  tickets_unref(t->shared_tk);
  t->shared_tk = tickets_ref(from->shared_tk);
  tickets_unref(t->cur->tk); /* no connection uses it yet */
  t->cur->tk = tickets_ref(from->shared_tk);
  mbedtls_ssl_conf_session_tickets_cb(&t->cur->conf, mbedtls_ssl_ticket_write,
                                      mbedtls_ssl_ticket_parse, &t->cur->tk->ticket);
}

unsigned im_tls_handshake_timeout(const im_tls *t) { return t->handshake_ms; }

unsigned im_tls_generation(const im_tls *t) { return t->generation; }

void im_tls_free(im_tls *t) {
  if (!t) return;
  conf_unref(t->cur);
  tickets_unref(t->shared_tk);
  free(t->cert_file);
  free(t->key_file);
  free(t->alpn);
  free(t);
}

/* ---- the socket under mbedTLS ------------------------------------------------ */

static int bio_send(void *ctx, const unsigned char *buf, size_t len) {
  tls_stream *t = ctx;
  for (;;) {
    ssize_t n = send(t->base.fd, buf, len, MSG_NOSIGNAL);
    if (n >= 0) return (int)n;
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return MBEDTLS_ERR_SSL_WANT_WRITE;
    return MBEDTLS_ERR_NET_SEND_FAILED;
  }
}

static int bio_recv(void *ctx, unsigned char *buf, size_t len) {
  tls_stream *t = ctx;
  for (;;) {
    ssize_t n = recv(t->base.fd, buf, len, 0);
    if (n >= 0) return (int)n;
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return MBEDTLS_ERR_SSL_WANT_READ;
    return MBEDTLS_ERR_NET_RECV_FAILED;
  }
}

/* ---- the stream functions ---------------------------------------------------- */

/* Maps an mbedTLS result that is not a count: waits set `wants`. */
static int tls_status(tls_stream *t, int rc) {
  if (rc == MBEDTLS_ERR_SSL_WANT_READ) {
    t->base.wants = IM_WANT_READ;
    return IM_STREAM_AGAIN;
  }
  if (rc == MBEDTLS_ERR_SSL_WANT_WRITE) {
    t->base.wants = IM_WANT_WRITE;
    return IM_STREAM_AGAIN;
  }
  if (rc == MBEDTLS_ERR_NET_SEND_FAILED || rc == MBEDTLS_ERR_NET_RECV_FAILED) return IM_ESYS;
  return IM_EPROTO;
}

static int tls_handshake(im_stream *s) {
  tls_stream *t = (tls_stream *)s;
  if (t->hs_done) return 0;
  if (!t->set_up) {
    /* the two ~16 KiB record buffers are allocated here, when the client
     * has sent something, not at accept: idle sockets cost little */
    if (mbedtls_ssl_setup(&t->ssl, &t->conf->conf) != 0) return IM_EPROTO;
    mbedtls_ssl_set_bio(&t->ssl, t, bio_send, bio_recv, NULL);
    t->set_up = true;
  }
  int rc = mbedtls_ssl_handshake(&t->ssl);
  if (rc == 0) {
    t->hs_done = true;
    return 0;
  }
  int st = tls_status(t, rc);
  return st == IM_STREAM_AGAIN ? st : IM_EPROTO;
}

/* ---- resting idle sessions --------------------------------------------------- */

/* mbedTLS 2.28 (as Debian builds it) keeps a ~16.7 KiB input and output
 * record buffer per session for the session's whole life. Between records
 * their bytes are dead: everything mbedTLS needs from them (the record
 * counters and headers) sits before in_msg / out_msg, in the first bytes.
 * So an idle session hands the whole pages after those back to the kernel
 * (MADV_DONTNEED: the next touch gets a zero page). The pages lie inside
 * the buffers' own heap blocks, which stay allocated; nothing else lives
 * in a page wholly inside a block. */
static size_t page_size(void) {
  static size_t pg;
  if (!pg) {
    long v = sysconf(_SC_PAGESIZE);
    pg = v > 0 ? (size_t)v : 4096;
  }
  return pg;
}

static size_t give_back(unsigned char *from, unsigned char *end) {
  size_t pg = page_size();
  uintptr_t a = ((uintptr_t)from + pg - 1) & ~(uintptr_t)(pg - 1);
  uintptr_t b = (uintptr_t)end & ~(uintptr_t)(pg - 1);
  if (b <= a || madvise((void *)a, b - a, MADV_DONTNEED) != 0) return 0;
  return b - a;
}

size_t im__tls_rest(im_stream *s) {
  tls_stream *t = (tls_stream *)s;
  mbedtls_ssl_context *ssl = &t->ssl;
  /* only between records: nothing read ahead or half-read, nothing
   * encrypted and unsent, no handshake message being assembled */
  if (!t->hs_done || t->wpending || ssl->in_left || ssl->out_left || ssl->in_hslen ||
      ssl->keep_current_message || mbedtls_ssl_get_bytes_avail(ssl) || !ssl->in_buf ||
      !ssl->out_buf)
    return 0;
  return give_back(ssl->in_msg, ssl->in_buf + MBEDTLS_SSL_IN_BUFFER_LEN) +
         give_back(ssl->out_msg, ssl->out_buf + MBEDTLS_SSL_OUT_BUFFER_LEN);
}

/* The socket has nothing more to read: rest the session if it has not
 * rested within REST_INTERVAL_S. */
static void maybe_rest(tls_stream *t) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
  uint32_t now = (uint32_t)ts.tv_sec + 1; /* never 0 */
  if (t->rested_s && now - t->rested_s < REST_INTERVAL_S) return;
  if (im__tls_rest(&t->base)) t->rested_s = now;
}

static ssize_t tls_read(im_stream *s, void *buf, size_t cap) {
  tls_stream *t = (tls_stream *)s;
  if (!t->hs_done) {
    int h = tls_handshake(s);
    if (h) return h;
  }
  size_t got = 0;
  while (got < cap) {
    int rc = mbedtls_ssl_read(&t->ssl, (unsigned char *)buf + got, cap - got);
    if (rc > 0) {
      got += (size_t)rc;
      continue;
    }
    if (rc == MBEDTLS_ERR_SSL_WANT_READ) maybe_rest(t); /* the socket ran dry */
    if (got) break; /* report what we have; the rest comes on the next call */
    if (rc == 0 || rc == MBEDTLS_ERR_SSL_PEER_CLOSE_NOTIFY || rc == MBEDTLS_ERR_SSL_CONN_EOF)
      return 0;
    return tls_status(t, rc);
  }
  return (ssize_t)got;
}

static size_t tls_pending(const im_stream *s) {
  const tls_stream *t = (const tls_stream *)s;
  return t->hs_done ? mbedtls_ssl_get_bytes_avail(&t->ssl) : 0;
}

static ssize_t tls_writev(im_stream *s, const struct iovec *iov, int n) {
  tls_stream *t = (tls_stream *)s;
  if (!t->hs_done) {
    int h = tls_handshake(s);
    if (h) return h;
  }
  /* one record from the leading bytes: the first iovec as it is when it is
   * big enough (or alone), else gathered */
  static _Thread_local unsigned char gather[RECORD_MAX];
  size_t want = t->wpending ? t->wpending : RECORD_MAX;
  const unsigned char *p;
  size_t len = 0;
  if (n == 1 || iov[0].iov_len >= want) {
    p = iov[0].iov_base;
    len = iov[0].iov_len < want ? iov[0].iov_len : want;
  } else {
    for (int i = 0; i < n && len < want; i++) {
      size_t k = iov[i].iov_len < want - len ? iov[i].iov_len : want - len;
      memcpy(gather + len, iov[i].iov_base, k);
      len += k;
    }
    p = gather;
  }
  if (!len) return 0;
  /* a repeated write must offer the bytes already encrypted (im_net.h) */
  if (t->wpending && len < t->wpending) return IM_EPROTO;
  int rc = mbedtls_ssl_write(&t->ssl, p, len);
  if (rc >= 0) {
    t->wpending = 0;
    return rc;
  }
  int st = tls_status(t, rc);
  if (st == IM_STREAM_AGAIN) t->wpending = len;
  return st;
}

static void tls_shutdown(im_stream *s) {
  tls_stream *t = (tls_stream *)s;
  if (t->hs_done) mbedtls_ssl_close_notify(&t->ssl);
}

static void tls_release(im_stream *s) {
  tls_stream *t = (tls_stream *)s;
  mbedtls_ssl_free(&t->ssl);
  conf_unref(t->conf);
  free(t);
}

static const char *tls_alpn(const im_stream *s) {
  const tls_stream *t = (const tls_stream *)s;
  return t->hs_done ? mbedtls_ssl_get_alpn_protocol(&t->ssl) : NULL;
}

static const im_stream_funcs tls_funcs = {tls_handshake, tls_read,     tls_writev, tls_pending,
                                          tls_shutdown,  tls_release,  tls_alpn};

im_stream *im__tls_stream_new(int fd, im_tls *tls) {
  tls_stream *t = calloc(1, sizeof *t);
  if (!t) return NULL;
  mbedtls_ssl_init(&t->ssl);
  t->conf = tls->cur; /* the certificate of accept time, even across a reload */
  t->conf->refs++;
  t->base.f = &tls_funcs;
  t->base.fd = fd;
  t->base.secure = 1;
  t->base.wants = IM_WANT_READ;
  return &t->base;
}
