/* imd's TLS: one certificate for every listener unless --tls-plain keeps
 * some plain, and SIGHUP to load the certificate again. The WebSocket and
 * HTTP listeners share a context offering ALPN "http/1.1" (both speak
 * HTTP/1.1 first); the raw TCP listener has its own without ALPN. */
#include <event2/event.h>
#include <libim/im_tls.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "imd.h"
#include "log.h"

enum { L_WS, L_TCP, L_HTTP, L_N };
static const char *const names[L_N] = {"ws", "tcp", "http"};

typedef struct imd_tls {
  im_tls *http;     /* ws and http */
  im_tls *raw;      /* tcp */
  bool plain[L_N];
  struct event *hup; /* worker 0's only */
  imd *d;
  const char *cert, *key; /* the option values (they live until exit) */
  unsigned handshake_ms;
} imd_tls;

static int reload(imd_tls *t) {
  char err[256];
  im_tls *ctx[2] = {t->http, t->raw};
  for (int i = 0; i < 2; i++) {
    if (im_tls_reload(ctx[i], err, sizeof err) < 0) {
      log_error("SIGHUP: %s; keeping the old certificate", err);
      return -1;
    }
  }
  return 0;
}

static void reloaded(const imd_tls *t) {
  printf("imd: SIGHUP: TLS certificate reloaded (generation %u)\n", im_tls_generation(t->http));
  fflush(stdout);
}

/* With worker threads every worker reloads its own contexts (an im_tls is
 * used by one thread); the line is printed once all have. */
static int reload_here(imd *w, void *arg) {
  (void)arg;
  return reload(w->tls);
}

static void reload_done(imd *d, long sum, int err, void *arg) {
  (void)sum;
  (void)arg;
  if (!err) reloaded(d->tls);
}

static void hup_cb(evutil_socket_t sig, short what, void *arg) {
  (void)sig;
  (void)what;
  imd_tls *t = arg;
  if (t->d->workers) {
    if (imd_workers_gather(t->d, reload_here, reload_done, NULL) < 0)
      log_error("SIGHUP: out of memory; keeping the old certificate");
    return;
  }
  if (reload(t) == 0) reloaded(t);
}

/* The two contexts from t's files. */
static int contexts(imd_tls *t, char *err, size_t errlen) {
  im_tls_opts o = {.cert_file = t->cert, .key_file = t->key, .alpn = "http/1.1",
                   .handshake_timeout_ms = t->handshake_ms};
  t->http = im_tls_new(&o, err, errlen);
  o.alpn = NULL;
  t->raw = t->http ? im_tls_new(&o, err, errlen) : NULL;
  return t->raw ? 0 : -1;
}

static int parse_plain(const char *list, bool plain[L_N]) {
  if (!list || !strcmp(list, "none")) return 0;
  const char *p = list;
  while (*p) {
    size_t n = strcspn(p, ",");
    int k = 0;
    while (k < L_N && (strlen(names[k]) != n || strncmp(names[k], p, n))) k++;
    if (k == L_N) {
      fprintf(stderr, "imd: tls-plain: '%.*s' is not ws, tcp, http or none\n", (int)n, p);
      return -1;
    }
    plain[k] = true;
    p += n;
    if (*p == ',') p++;
  }
  return 0;
}

int imd_tls_init(imd *d, const char *cert, const char *key, const char *plain,
                 unsigned handshake_ms) {
  bool check[L_N] = {false};
  if (parse_plain(plain, check) < 0) return -1; /* a typo is an error even with TLS off */
  if (!cert && !key) return 0;
  if (!cert || !key) {
    fprintf(stderr, "imd: TLS needs both --tls-cert and --tls-key\n");
    return -1;
  }
  imd_tls *t = calloc(1, sizeof *t);
  if (!t) return -1;
  d->tls = t;
  if (parse_plain(plain, t->plain) < 0) return -1;
  char err[256];
  t->d = d;
  t->cert = cert;
  t->key = key;
  t->handshake_ms = handshake_ms;
  if (contexts(t, err, sizeof err) < 0) {
    fprintf(stderr, "imd: TLS: %s\n", err);
    return -1;
  }
  t->hup = evsignal_new(d->base, SIGHUP, hup_cb, t);
  if (!t->hup || event_add(t->hup, NULL) < 0) {
    fprintf(stderr, "imd: cannot catch SIGHUP\n");
    return -1;
  }
  return 0;
}

int imd_tls_worker(imd *w) {
  const imd_tls *t0 = w->tls; /* worker 0's, copied with the rest */
  w->tls = NULL;
  if (!t0) return 0;
  imd_tls *t = calloc(1, sizeof *t);
  if (!t) return -1;
  *t = *t0;
  t->hup = NULL;
  t->d = w;
  w->tls = t;
  char err[256];
  if (contexts(t, err, sizeof err) < 0) {
    fprintf(stderr, "imd: worker %u: TLS: %s\n", w->worker, err);
    return -1;
  }
  /* a client resumes its session on whichever worker it lands */
  im_tls_share_tickets(t->http, t0->http);
  im_tls_share_tickets(t->raw, t0->raw);
  return 0;
}

im_tls *imd_tls_for(const imd *d, const char *name) {
  const imd_tls *t = d->tls;
  if (!t) return NULL;
  for (int k = 0; k < L_N; k++)
    if (!strcmp(names[k], name)) return t->plain[k] ? NULL : k == L_TCP ? t->raw : t->http;
  return NULL;
}

void imd_tls_free(imd *d) {
  imd_tls *t = d->tls;
  if (!t) return;
  if (t->hup) event_free(t->hup);
  im_tls_free(t->http);
  im_tls_free(t->raw);
  free(t);
  d->tls = NULL;
}
