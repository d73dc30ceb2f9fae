/* Back-end hooks: the events of docs/HOOKS.md, their answers, and what imd
 * does with them. HTTP is hook_client.c's; this file builds the JSON, signs
 * it, keeps each connection's messages in order while their asks are out,
 * batches and retries presence events, and counts.
 *
 * Message order: every ask of a connection joins that connection's FIFO
 * (a map keyed by connection id). Asks run in parallel, but a verdict is
 * applied only when it is at the head of its FIFO, so one connection's
 * messages reach the store in the order they were sent whatever order the
 * answers come back in. A connection that closes with asks out keeps its
 * FIFO until they are answered; their verdicts are then dropped (the client
 * never got an ack: it resends after reconnecting). */
#include "hooks.h"

#include <cJSON.h>
#include <event2/event.h>
#include <mbedtls/md.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/strmap.h"
#include "histogram.h"
#include "hook_client.h"
#include "imd.h"

#define BATCH_DELAY_MS 50      /* presence events wait this long to share a POST */
#define BATCH_NOW 500          /* this many events waiting are sent without the delay */
#define ASKS_PER_CONN 64       /* message asks one connection may have out; more: 429 */
#define RETRY_FIRST_MS 100     /* presence retry backoff: doubled per attempt ... */
#define RETRY_MAX_MS 10000     /* ... up to this */
#define RETRY_ATTEMPTS 8       /* a batch is dropped after this many failed POSTs */
#define REASON_MAX 200

enum { EV_CONNECT, EV_MESSAGE, EV_ONLINE, EV_OFFLINE, EV_N };
static const char *const ev_names[EV_N] = {"connect", "message", "online", "offline"};
enum { R_ALLOW, R_REJECT, R_REPLACE, R_OK, R_TIMEOUT, R_ERROR, R_FULL, R_N };
static const char *const res_names[R_N] = {"allow", "reject", "replace", "ok",
                                           "timeout", "error", "full"};
/* latency histogram bounds, microseconds */
static const uint64_t lat_bounds[] = {500,    1000,   2500,   5000,    10000,   25000,  50000,
                                      100000, 250000, 500000, 1000000, 2500000, 5000000};
#define LAT_N (sizeof lat_bounds / sizeof lat_bounds[0])

typedef struct sbuf {
  char *p;
  size_t len, cap;
  bool failed;
} sbuf;

typedef struct conn_q conn_q;
typedef struct imd_hooks imd_hooks;

enum { V_ALLOW, V_REJECT, V_REPLACE, V_FAIL, V_DROP };

/* One message waiting for its verdict; the message lives in buf. */
typedef struct ask {
  struct ask *next;
  conn_q *q;
  imd_hooks *h;
  bool done;
  int verdict, code, status;
  char reason[REASON_MAX + 1];
  char *data;               /* replacement (malloc'd) */
  size_t data_len;
  imd_route_fn route;
  im_msg m;
  char buf[];
} ask;

struct conn_q {
  strmap_node node;
  uint64_t key;             /* the connection id: the node's key bytes */
  ask *head, *tail;
  size_t n;                 /* asks in the FIFO */
};

/* One connect ask. */
typedef struct auth_ask {
  imd_hooks *h;
  im_conn_id c;
} auth_ask;

struct imd_hooks {
  imd *d;
  imd_hooks_config cfg;
  hook_client *hc;
  strmap fifos;
  bool closing;
  /* presence: `next` collects events; `flight` is the batch being POSTed
   * (one at a time, so a user's online/offline stay in order) */
  sbuf next, flight;
  size_t next_n, flight_n;
  size_t next_kind[EV_N], flight_kind[EV_N];
  uint32_t attempt;
  bool in_flight;
  struct event *flush_ev;
  /* metrics */
  uint64_t req[EV_N][R_N];
  imd_hist lat;
  uint64_t dropped;
};

/* ---- text ------------------------------------------------------------------------ */

static void sb_add(sbuf *b, const char *s, size_t n) {
  if (b->failed) return;
  if (b->len + n + 1 > b->cap) {
    size_t cap = (b->len + n + 1) * 2;
    char *p = realloc(b->p, cap);
    if (!p) {
      b->failed = true;
      return;
    }
    b->p = p;
    b->cap = cap;
  }
  memcpy(b->p + b->len, s, n);
  b->len += n;
  b->p[b->len] = '\0';
}

static void sb_printf(sbuf *b, const char *fmt, ...) {
  char tmp[512];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
  va_end(ap);
  if (n > 0) sb_add(b, tmp, (size_t)n < sizeof tmp ? (size_t)n : sizeof tmp - 1);
}

static void sb_reset(sbuf *b) {
  free(b->p);
  *b = (sbuf){0};
}

/* "name":"value" with JSON escapes (value NULL: nothing). */
static void sb_str(sbuf *b, const char *name, const char *v) {
  if (!v) return;
  sb_printf(b, ",\"%s\":\"", name);
  for (const unsigned char *s = (const unsigned char *)v; *s; s++) {
    if (*s == '"' || *s == '\\') {
      char e[2] = {'\\', (char)*s};
      sb_add(b, e, 2);
    } else if (*s < 0x20) {
      sb_printf(b, "\\u%04x", *s);
    } else {
      sb_add(b, (const char *)s, 1);
    }
  }
  sb_add(b, "\"", 1);
}

/* {"event":E,"uid":U,"ts":MS (then the caller's members, then "}") */
static void sb_event(sbuf *b, int ev, const char *uid) {
  sb_printf(b, "{\"event\":\"%s\"", ev_names[ev]);
  sb_str(b, "uid", uid);
  sb_printf(b, ",\"ts\":%llu", (unsigned long long)imd_wall_ms());
}

/* Extra request headers: the signature of the body when a secret is set. */
static void sign(const imd_hooks *h, const char *body, size_t len, char *out, size_t cap) {
  out[0] = '\0';
  if (!h->cfg.secret) return;
  unsigned char mac[32];
  if (mbedtls_md_hmac(mbedtls_md_info_from_type(MBEDTLS_MD_SHA256),
                      (const unsigned char *)h->cfg.secret, strlen(h->cfg.secret),
                      (const unsigned char *)body, len, mac) != 0)
    return;
  char hex[65];
  for (int i = 0; i < 32; i++) snprintf(hex + 2 * i, 3, "%02x", mac[i]);
  snprintf(out, cap, "X-Imd-Signature: sha256=%s\r\n", hex);
}

static int post(imd_hooks *h, const sbuf *b, hook_done_fn fn, void *arg) {
  if (b->failed || !b->p) return HOOK_ENOMEM;
  char hdr[128];
  sign(h, b->p, b->len, hdr, sizeof hdr);
  return hook_client_post(h->hc, hdr, b->p, b->len, h->cfg.timeout_ms, fn, arg);
}

/* ---- metrics ---------------------------------------------------------------------- */

static int result_of(int status) {
  if (status == HOOK_ETIMEOUT) return R_TIMEOUT;
  if (status == HOOK_EFULL) return R_FULL;
  return R_ERROR;
}

static void observe(imd_hooks *h, int status, uint64_t us) {
  if (status == HOOK_ECANCELED || status == HOOK_EFULL) return;
  imd_hist_observe(&h->lat, lat_bounds, LAT_N, us);
}

_Static_assert(EV_N == 4 && R_N == 7, "imd_hook_counts is sized for these");

void imd_hooks_count(imd *d, imd_hook_counts *c) {
  imd_hooks *h = d->hooks;
  if (!h) return;
  c->on = true;
  for (int e = 0; e < EV_N; e++)
    for (int r = 0; r < R_N; r++) c->req[e][r] += h->req[e][r];
  imd_hist_add(&c->lat, &h->lat);
  c->dropped += h->dropped;
  c->pending += hook_client_pending(h->hc);
}

char *imd_hooks_metrics(imd *d, size_t *len) {
  imd_hook_counts c = {0};
  imd_hooks_count(d, &c);
  return imd_hooks_metrics_of(&c, len);
}

char *imd_hooks_metrics_of(const imd_hook_counts *h, size_t *len) {
  if (!h->on) return NULL;
  sbuf b = {0};
  sb_printf(&b, "# HELP imd_hook_requests_total Hook events sent to the back end by outcome\n"
                "# TYPE imd_hook_requests_total counter\n");
  for (int e = 0; e < EV_N; e++)
    for (int r = 0; r < R_N; r++)
      if (h->req[e][r])
        sb_printf(&b, "imd_hook_requests_total{event=\"%s\",result=\"%s\"} %llu\n", ev_names[e],
                  res_names[r], (unsigned long long)h->req[e][r]);
  char lat[IMD_HIST_TEXT_MAX];
  imd_hist_format(&h->lat, lat_bounds, LAT_N, "imd_hook_latency_seconds",
                  "Time from a hook POST to its answer", lat, sizeof lat);
  sb_add(&b, lat, strlen(lat)); /* sb_printf cuts at 512 bytes */
  sb_printf(&b, "# HELP imd_hook_dropped_total Presence events dropped (queue full or out of "
                "retries)\n# TYPE imd_hook_dropped_total counter\nimd_hook_dropped_total %llu\n",
            (unsigned long long)h->dropped);
  sb_printf(&b, "# HELP imd_hook_pending Hook requests queued or in flight\n"
                "# TYPE imd_hook_pending gauge\nimd_hook_pending %llu\n",
            (unsigned long long)h->pending);
  if (b.failed) {
    sb_reset(&b);
    return NULL;
  }
  *len = b.len;
  return b.p;
}

/* ---- answers ---------------------------------------------------------------------- */

/* Skip one JSON value starting at s (already validated by cJSON): the end. */
static const char *skip_value(const char *s, const char *end) {
  int depth = 0;
  while (s < end) {
    char ch = *s;
    if (ch == '"') {
      for (s++; s < end && *s != '"'; s++)
        if (*s == '\\') s++;
      s++;
      if (!depth) return s;
      continue;
    }
    if (ch == '{' || ch == '[') {
      depth++;
    } else if (ch == '}' || ch == ']') {
      if (!depth) return s;
      if (--depth == 0) return s + 1;
    } else if (!depth && (ch == ',' || ch == ' ' || ch == '\t' || ch == '\r' || ch == '\n')) {
      return s;
    }
    s++;
  }
  return end;
}

static const char *skip_ws(const char *s, const char *end) {
  while (s < end && (*s == ' ' || *s == '\t' || *s == '\r' || *s == '\n')) s++;
  return s;
}

/* The exact text of the top-level member "data" of a valid JSON object, so
 * a replacement passes byte for byte (no number reformatted). */
static bool raw_member(const char *body, size_t len, const char **out, size_t *out_len) {
  const char *s = skip_ws(body, body + len), *end = body + len;
  if (s >= end || *s != '{') return false;
  s++;
  for (;;) {
    s = skip_ws(s, end);
    if (s >= end || *s != '"') return false;
    const char *k = s + 1, *v = skip_value(s, end);
    bool is_data = v - k == 5 && !memcmp(k, "data\"", 5);
    s = skip_ws(v, end);
    if (s >= end || *s != ':') return false;
    s = skip_ws(s + 1, end);
    v = skip_value(s, end);
    if (is_data) {
      *out = s;
      *out_len = (size_t)(v - s);
      return v > s;
    }
    s = skip_ws(v, end);
    if (s >= end || *s != ',') return false;
    s++;
  }
}

/* Read a back end's answer to an ask: V_ALLOW, V_REJECT (code, reason),
 * V_REPLACE (a->data) or V_FAIL (not 2xx, not a JSON object, bad data). */
static int verdict_of(imd_hooks *h, int status, const char *body, size_t len, int *code,
                      char *reason, char **data, size_t *data_len) {
  if (status < 200 || status > 299) return V_FAIL;
  const char *s = skip_ws(body, body + len);
  if (s == body + len) return V_ALLOW; /* an empty 2xx allows, as {} */
  cJSON *j = cJSON_ParseWithLength(body, len);
  if (!cJSON_IsObject(j)) {
    cJSON_Delete(j);
    return V_FAIL;
  }
  int v = V_ALLOW;
  cJSON *rej = cJSON_GetObjectItemCaseSensitive(j, "reject");
  cJSON *dat = cJSON_GetObjectItemCaseSensitive(j, "data");
  if (rej && !cJSON_IsNull(rej) && !cJSON_IsFalse(rej)) {
    cJSON *c = cJSON_GetObjectItemCaseSensitive(rej, "code");
    cJSON *r = cJSON_GetObjectItemCaseSensitive(rej, "reason");
    *code = cJSON_IsNumber(c) && c->valuedouble >= 400 && c->valuedouble <= 599
                ? (int)c->valuedouble : 403;
    snprintf(reason, REASON_MAX + 1, "%s", cJSON_IsString(r) ? r->valuestring : "rejected");
    v = V_REJECT;
  } else if (dat && data) {
    const char *raw;
    size_t rl;
    char *copy = NULL;
    if (raw_member(body, len, &raw, &rl)) {
      copy = malloc(rl + 1);
      if (copy) {
        memcpy(copy, raw, rl);
        copy[rl] = '\0';
      }
    } else {
      copy = cJSON_PrintUnformatted(dat); /* an escaped key: cJSON's text of it */
      rl = copy ? strlen(copy) : 0;
    }
    if (!copy || rl > im_server_config(h->d->srv)->max_message) {
      free(copy);
      v = V_FAIL;
    } else {
      *data = copy;
      *data_len = rl;
      v = V_REPLACE;
    }
  }
  cJSON_Delete(j);
  return v;
}

/* ---- message asks -------------------------------------------------------------------- */

static conn_q *fifo_of(imd_hooks *h, im_conn_id c, bool make) {
  strmap_node *n = strmap_get(&h->fifos, (const char *)&c, sizeof c);
  if (n || !make) return n ? (conn_q *)((char *)n - offsetof(conn_q, node)) : NULL;
  conn_q *q = calloc(1, sizeof *q);
  if (!q) return NULL;
  q->key = c;
  q->node.key = (const char *)&q->key;
  q->node.klen = sizeof q->key;
  strmap_put(&h->fifos, &q->node);
  return q;
}

static void apply(imd_hooks *h, ask *a) {
  imd *d = h->d;
  im_conn_id c = a->q->key;
  im_conn_info info = {IM_STRUCT_SIZE(im_conn_info)};
  if (a->verdict == V_DROP || im_conn_get_info(d->srv, c, &info) < 0 || !info.uid) return;
  switch (a->verdict) {
  case V_ALLOW:
    a->route(d, c, &a->m);
    break;
  case V_REPLACE: {
    im_msg m = a->m;
    m.data = a->data;
    m.data_len = a->data_len;
    a->route(d, c, &m);
    break;
  }
  case V_REJECT:
    d->m.msg_errors++;
    im_reply_error(d->srv, c, a->code, a->reason, a->m.cid);
    break;
  default: /* V_FAIL */
    if (h->cfg.fail_open) {
      a->route(d, c, &a->m);
    } else {
      d->m.msg_errors++;
      im_reply_error(d->srv, c, 503,
                     a->status == HOOK_ETIMEOUT ? "message hook timed out"
                                                : "message hook unavailable",
                     a->m.cid);
    }
  }
}

/* Apply the verdicts at the head of q that are in, in order. */
static void drain(imd_hooks *h, conn_q *q) {
  while (q->head && q->head->done) {
    ask *a = q->head;
    q->head = a->next;
    q->n--;
    if (!q->head) q->tail = NULL;
    apply(h, a);
    free(a->data);
    free(a);
  }
  if (!q->head) {
    strmap_del(&h->fifos, &q->node);
    free(q);
  }
}

static void ask_answered(void *arg, int status, const char *body, size_t len, uint64_t us) {
  ask *a = arg;
  imd_hooks *h = a->h;
  observe(h, status, us);
  a->status = status;
  if (status == HOOK_ECANCELED) {
    a->verdict = V_DROP;
  } else {
    a->verdict = status >= 0 ? verdict_of(h, status, body, len, &a->code, a->reason, &a->data,
                                          &a->data_len)
                             : V_FAIL;
    int r = a->verdict == V_ALLOW     ? R_ALLOW
            : a->verdict == V_REJECT  ? R_REJECT
            : a->verdict == V_REPLACE ? R_REPLACE
            : status >= 0             ? R_ERROR
                                      : result_of(status);
    h->req[EV_MESSAGE][r]++;
  }
  a->done = true;
  drain(h, a->q);
}

static ask *ask_new(const im_msg *m) {
  const char *strs[] = {m->id, m->cid, m->to, m->group}, *out[4];
  ask *a = calloc(1, sizeof(ask) + imd_strs_size(strs, 4) + m->data_len + 1);
  if (!a) return NULL;
  char *at = a->buf;
  imd_strs_copy(&at, strs, out, 4);
  memcpy(at, m->data, m->data_len);
  at[m->data_len] = '\0';
  a->m = (im_msg){.id = out[0], .cid = out[1], .to = out[2], .group = out[3], .data = at,
                  .data_len = m->data_len};
  return a;
}

bool imd_hooks_message(imd *d, im_conn_id c, const im_msg *m, imd_route_fn route) {
  imd_hooks *h = d->hooks;
  if (!h || !h->cfg.message || h->closing) return false;
  im_conn_info info = {IM_STRUCT_SIZE(im_conn_info)};
  if (im_conn_get_info(d->srv, c, &info) < 0 || !info.uid) return false;
  conn_q *q = fifo_of(h, c, false);
  if (q && q->n >= ASKS_PER_CONN) { /* one client cannot take the whole queue */
    d->m.msg_errors++;
    im_reply_error(d->srv, c, 429, "too many messages waiting for the back end", m->cid);
    return true;
  }
  ask *a = ask_new(m);
  q = a ? fifo_of(h, c, true) : NULL;
  if (!q) {
    free(a);
    d->m.msg_errors++;
    im_reply_error(d->srv, c, 500, "out of memory", m->cid);
    return true;
  }
  a->h = h;
  a->q = q;
  a->route = route;
  if (q->tail) q->tail->next = a;
  else q->head = a;
  q->tail = a;
  q->n++;
  sbuf b = {0};
  sb_event(&b, EV_MESSAGE, info.uid);
  sb_str(&b, "device", info.device);
  sb_str(&b, "to", a->m.to);
  sb_str(&b, "group", a->m.group);
  sb_str(&b, "cid", a->m.cid);
  sb_str(&b, "id", a->m.id);
  sb_add(&b, ",\"data\":", 8);
  sb_add(&b, a->m.data, a->m.data_len);
  sb_add(&b, "}", 1);
  int rc = post(h, &b, ask_answered, a);
  sb_reset(&b);
  if (rc < 0) { /* not even queued: the policy answers now (in order) */
    a->status = rc;
    a->verdict = V_FAIL;
    a->done = true;
    h->req[EV_MESSAGE][result_of(rc)]++;
    drain(h, q);
  }
  return true;
}

/* ---- connect asks ---------------------------------------------------------------------- */

int imd_hooks_connect_mode(const imd *d) {
  return d->hooks ? d->hooks->cfg.connect : IMD_HOOK_CONNECT_OFF;
}

/* A failed connect ask: `instead` has no other credential check, so it
 * always refuses; `also` (the token was good) follows --hook-fail. */
static bool connect_fail_accepts(const imd_hooks *h) {
  return h->cfg.connect == IMD_HOOK_CONNECT_ALSO && h->cfg.fail_open;
}

static void auth_answered(void *arg, int status, const char *body, size_t len, uint64_t us) {
  auth_ask *x = arg;
  imd_hooks *h = x->h;
  observe(h, status, us);
  if (status == HOOK_ECANCELED) {
    free(x);
    return;
  }
  int code = 0;
  char reason[REASON_MAX + 1];
  int v = status >= 0 ? verdict_of(h, status, body, len, &code, reason, NULL, NULL) : V_FAIL;
  h->req[EV_CONNECT][v == V_ALLOW ? R_ALLOW : v == V_REJECT ? R_REJECT
                     : status >= 0 ? R_ERROR : result_of(status)]++;
  if (v == V_ALLOW || (v == V_FAIL && connect_fail_accepts(h))) {
    im_auth_complete(h->d->srv, x->c, 1, 0, NULL);
  } else if (v == V_REJECT) {
    im_auth_complete(h->d->srv, x->c, 0, code, reason);
  } else {
    im_auth_complete(h->d->srv, x->c, 0, 503,
                     status == HOOK_ETIMEOUT ? "auth hook timed out" : "auth hook unavailable");
  }
  free(x);
}

int imd_hooks_auth(imd *d, im_conn_id c, im_auth *a) {
  imd_hooks *h = d->hooks;
  auth_ask *x = malloc(sizeof *x);
  int rc = HOOK_ENOMEM;
  if (x) {
    *x = (auth_ask){h, c};
    sbuf b = {0};
    sb_event(&b, EV_CONNECT, a->uid);
    sb_str(&b, "device", a->device);
    sb_str(&b, "platform", a->platform);
    sb_str(&b, "peer", a->peer);
    sb_str(&b, "token", a->token);
    sb_add(&b, "}", 1);
    rc = post(h, &b, auth_answered, x);
    sb_reset(&b);
    if (rc == 0) return IM_AUTH_PENDING;
    free(x);
  }
  h->req[EV_CONNECT][result_of(rc)]++;
  if (connect_fail_accepts(h)) return IM_AUTH_ACCEPT;
  a->code = 503;
  a->reason = "auth hook unavailable";
  return IM_AUTH_DENY;
}

/* ---- presence ----------------------------------------------------------------------------- */

static void flush(imd_hooks *h);

/* Presence events held (collected or in flight): at most max_queue, over
 * every worker's hooks when they share a budget. */
static bool held_take(imd_hooks *h) {
  if (h->cfg.budget) return hook_budget_hold(h->cfg.budget, 1);
  return h->next_n + h->flight_n < h->cfg.max_queue;
}

static void held_release(imd_hooks *h, size_t n) {
  if (h->cfg.budget && n) hook_budget_hold(h->cfg.budget, -(long)n);
}

static void batch_answered(void *arg, int status, const char *body, size_t len, uint64_t us) {
  (void)body;
  (void)len;
  imd_hooks *h = arg;
  observe(h, status, us);
  if (status == HOOK_ECANCELED) return;
  bool ok = status >= 200 && status <= 299;
  int r = ok ? R_OK : status >= 0 ? R_ERROR : result_of(status);
  for (int e = 0; e < EV_N; e++) h->req[e][r] += h->flight_kind[e];
  h->in_flight = false;
  if (ok || ++h->attempt >= RETRY_ATTEMPTS) {
    if (!ok) h->dropped += h->flight_n;
    held_release(h, h->flight_n);
    sb_reset(&h->flight);
    h->flight_n = 0;
    memset(h->flight_kind, 0, sizeof h->flight_kind);
    h->attempt = 0;
    if (h->next_n) {
      struct timeval now = {0, 0};
      event_add(h->flush_ev, &now);
    }
    return;
  }
  uint64_t ms = (uint64_t)RETRY_FIRST_MS << (h->attempt - 1);
  if (ms > RETRY_MAX_MS) ms = RETRY_MAX_MS;
  struct timeval tv = {(time_t)(ms / 1000), (suseconds_t)(ms % 1000) * 1000};
  event_add(h->flush_ev, &tv);
}

/* POST the batch in flight (a retry) or the next one. */
static void flush(imd_hooks *h) {
  if (h->in_flight || h->closing) return;
  if (!h->flight_n) {
    if (!h->next_n) return;
    h->flight = (sbuf){0};
    sb_add(&h->flight, "{\"events\":[", 11);
    sb_add(&h->flight, h->next.p, h->next.len);
    sb_add(&h->flight, "]}", 2);
    h->flight_n = h->next_n;
    memcpy(h->flight_kind, h->next_kind, sizeof h->flight_kind);
    sb_reset(&h->next);
    h->next_n = 0;
    memset(h->next_kind, 0, sizeof h->next_kind);
  }
  h->in_flight = true;
  int rc = post(h, &h->flight, batch_answered, h);
  if (rc < 0) { /* counted as a failed attempt; retried after the backoff */
    h->in_flight = true; /* batch_answered clears it */
    batch_answered(h, rc, NULL, 0, 0);
  }
}

static void on_flush(evutil_socket_t fd, short what, void *arg) {
  (void)fd;
  (void)what;
  flush(arg);
}

static void presence(imd_hooks *h, int ev, const im_conn_info *info) {
  if (!held_take(h)) {
    h->dropped++;
    return;
  }
  sbuf *b = &h->next;
  if (h->next_n) sb_add(b, ",", 1);
  sb_event(b, ev, info->uid);
  sb_str(b, "device", info->device);
  sb_str(b, "platform", info->platform);
  sb_add(b, "}", 1);
  if (b->failed) { /* out of memory: what was collected is lost */
    h->dropped += h->next_n + 1;
    held_release(h, h->next_n + 1);
    sb_reset(b);
    h->next_n = 0;
    memset(h->next_kind, 0, sizeof h->next_kind);
    return;
  }
  h->next_n++;
  h->next_kind[ev]++;
  if (!h->in_flight && !h->flight_n && !event_pending(h->flush_ev, EV_TIMEOUT, NULL)) {
    struct timeval tv = {0, h->next_n >= BATCH_NOW ? 0 : BATCH_DELAY_MS * 1000};
    event_add(h->flush_ev, &tv);
  }
}

void imd_hooks_opened(imd *d, im_conn_id c) {
  imd_hooks *h = d->hooks;
  im_conn_info info = {IM_STRUCT_SIZE(im_conn_info)};
  if (!h || !h->cfg.presence || im_conn_get_info(d->srv, c, &info) < 0 || !info.uid) return;
  if (imd_user_conns(d, info.uid) == 1) presence(h, EV_ONLINE, &info);
}

void imd_hooks_closed(imd *d, im_conn_id c) {
  imd_hooks *h = d->hooks;
  im_conn_info info = {IM_STRUCT_SIZE(im_conn_info)};
  if (!h || !h->cfg.presence || h->closing || im_conn_get_info(d->srv, c, &info) < 0 ||
      !info.uid)
    return;
  /* c is already out of the registry: none left means it was the last */
  if (imd_user_conns(d, info.uid) == 0) presence(h, EV_OFFLINE, &info);
}

/* ---- lifecycle ----------------------------------------------------------------------------- */

/* Another worker's hooks client closed a connection of the budget or
 * needs one: d's looks again, on d's loop. */
static void wake_here(im_server *srv, void *arg) {
  (void)arg;
  imd *d = im_server_user(srv);
  if (d->hooks) hook_client_kick(d->hooks->hc);
}

static void wake(void *ud) {
  imd *d = ud;
  if (d->mb) im_mailbox_call(d->mb, wake_here, NULL);
}

int imd_hooks_start(imd *d, const imd_hooks_config *cfg) {
  if (!cfg->url) return 0;
  imd_hooks *h = calloc(1, sizeof *h);
  if (!h || strmap_init(&h->fifos, 64) < 0) {
    free(h);
    fprintf(stderr, "imd: hooks: out of memory\n");
    return -1;
  }
  h->d = d;
  h->cfg = *cfg;
  /* an answer may carry a replacement of up to max_message bytes, escaped */
  hook_client_opts o = {.max_conns = cfg->max_conns, .max_queue = cfg->max_queue,
                        .max_response = (size_t)im_server_config(d->srv)->max_message * 2 + 4096,
                        .idle_ms = 30000, .budget = cfg->budget, .wake = wake, .wake_ud = d};
  char err[256];
  h->hc = hook_client_new(d->base, cfg->url, &o, err, sizeof err);
  h->flush_ev = evtimer_new(d->base, on_flush, h);
  if (!h->hc || !h->flush_ev) {
    fprintf(stderr, "imd: --hook-url %s: %s\n", cfg->url, h->hc ? "out of memory" : err);
    hook_client_free(h->hc);
    if (h->flush_ev) event_free(h->flush_ev);
    strmap_free(&h->fifos);
    free(h);
    return -1;
  }
  d->hooks = h;
  printf("imd: hooks to %s (connect %s, message %s, presence %s, fail %s, timeout %u ms)\n",
         cfg->url, cfg->connect == IMD_HOOK_CONNECT_INSTEAD ? "instead of tokens"
                   : cfg->connect == IMD_HOOK_CONNECT_ALSO  ? "after tokens"
                                                            : "off",
         cfg->message ? "on" : "off", cfg->presence ? "on" : "off",
         cfg->fail_open ? "open" : "closed", cfg->timeout_ms);
  return 0;
}

void imd_hooks_stop(imd *d) {
  imd_hooks *h = d->hooks;
  if (!h) return;
  h->closing = true;
  hook_client_free(h->hc); /* every ask is answered ECANCELED: dropped */
  held_release(h, h->next_n + h->flight_n);
  event_free(h->flush_ev);
  sb_reset(&h->next);
  sb_reset(&h->flight);
  strmap_free(&h->fifos);
  free(h);
  d->hooks = NULL;
}
