/* The asynchronous HTTP/1.1 client of the hooks (see hook_client.h).
 *
 * One connection carries one request at a time (no pipelining: a slow
 * answer must not hold the ones behind it); up to max_conns connections
 * work in parallel, and an answered one stays open for the next request
 * when the server allows keep-alive. Every socket is a bufferevent with
 * deferred callbacks, so nothing here runs inside a libevent callback of
 * another connection, and a request is handed to a connection only from the
 * loop (a "kick" event), never inside hook_client_post(). */
#include "hook_client.h"

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <llhttp.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#define HOST_MAX 256
#define PATH_MAX_LEN 1024
#define BUDGET_CLIENTS 64

typedef struct hconn hconn;

typedef struct hreq {
  struct hreq *prev, *next; /* the queue while waiting for a connection */
  hook_client *hc;
  hconn *conn;              /* the connection carrying it, or NULL */
  struct event *timer;
  hook_done_fn done;
  void *arg;
  uint64_t t0_us;
  bool retried;             /* already resent once after a stale keep-alive */
  size_t len;
  char bytes[];             /* the whole request: head and body */
} hreq;

struct hconn {
  hconn *prev, *next;
  hook_client *hc;
  struct bufferevent *bev;
  llhttp_t parser;
  hreq *req;                /* in flight on it; NULL: idle */
  struct event *idle_timer;
  bool connected, reused, got_bytes, complete, keep_alive, too_big;
  char *body;
  size_t body_len, body_cap;
};

struct hook_client {
  struct event_base *base;
  hook_client_opts o;
  struct sockaddr_storage addr;
  socklen_t addr_len;
  char host[HOST_MAX + 8];  /* Host header value */
  char path[PATH_MAX_LEN];
  hreq *q_head, *q_tail;
  size_t queued, pending;
  hconn *conns;
  uint32_t nconns;
  struct event *kick;
  bool closing;
  bool starving;            /* budget: requests wait and no connection is left (its lock) */
};

/* ---- the budget shared by several clients ----------------------------------------- */

struct hook_budget {
  pthread_mutex_t lock;
  uint32_t max_conns, max_queue;
  uint32_t conns, queued, starving;
  long events;
  hook_client *c[BUDGET_CLIENTS];
};

hook_budget *hook_budget_new(uint32_t max_conns, uint32_t max_queue) {
  hook_budget *b = calloc(1, sizeof *b);
  if (!b) return NULL;
  pthread_mutex_init(&b->lock, NULL);
  b->max_conns = max_conns ? max_conns : 1;
  b->max_queue = max_queue;
  return b;
}

void hook_budget_free(hook_budget *b) {
  if (!b) return;
  pthread_mutex_destroy(&b->lock);
  free(b);
}

bool hook_budget_hold(hook_budget *b, long n) {
  pthread_mutex_lock(&b->lock);
  bool ok = n < 0 || b->events + n <= (long)b->max_queue;
  if (ok) b->events += n;
  pthread_mutex_unlock(&b->lock);
  return ok;
}

/* Wake every starving client (lock held), e.g. to take a connection
 * just closed: the first to get there takes it. */
static void wake_starving(hook_budget *b, const hook_client *except) {
  for (unsigned i = 0; i < BUDGET_CLIENTS && b->starving; i++) {
    hook_client *o = b->c[i];
    if (!o || o == except || !o->starving) continue;
    o->starving = false;
    b->starving--;
    o->o.wake(o->o.wake_ud);
  }
}

/* One more connection for hc, if the budget has one; else hc starves and
 * the clients with idle connections are asked to close them. */
static bool budget_conn_take(hook_client *hc) {
  hook_budget *b = hc->o.budget;
  if (!b) return hc->nconns < hc->o.max_conns;
  pthread_mutex_lock(&b->lock);
  bool ok = b->conns < b->max_conns;
  if (ok) {
    b->conns++;
  } else if (!hc->starving) {
    hc->starving = true;
    b->starving++;
    for (unsigned i = 0; i < BUDGET_CLIENTS; i++)
      if (b->c[i] && b->c[i] != hc) b->c[i]->o.wake(b->c[i]->o.wake_ud);
  }
  pthread_mutex_unlock(&b->lock);
  return ok;
}

static void budget_conn_put(hook_client *hc) {
  hook_budget *b = hc->o.budget;
  if (!b) return;
  pthread_mutex_lock(&b->lock);
  b->conns--;
  wake_starving(b, NULL);
  pthread_mutex_unlock(&b->lock);
}

/* Another client needs a connection: hc's idle ones go (with nothing
 * queued here, which would take them at once). */
static bool budget_wanted(hook_client *hc) {
  hook_budget *b = hc->o.budget;
  if (!b || hc->q_head) return false;
  pthread_mutex_lock(&b->lock);
  bool wanted = b->starving > 0;
  pthread_mutex_unlock(&b->lock);
  return wanted;
}

/* Room in the queue for one more request: reserved when true. */
static bool budget_queue_take(hook_client *hc) {
  hook_budget *b = hc->o.budget;
  if (!b) return hc->queued < hc->o.max_queue;
  pthread_mutex_lock(&b->lock);
  bool ok = b->queued < b->max_queue;
  if (ok) b->queued++;
  pthread_mutex_unlock(&b->lock);
  return ok;
}

static void budget_queue_add(hook_client *hc, int n) {
  hook_budget *b = hc->o.budget;
  if (!b) return;
  pthread_mutex_lock(&b->lock);
  b->queued = (uint32_t)((int)b->queued + n);
  pthread_mutex_unlock(&b->lock);
}

static bool budget_join(hook_client *hc) {
  hook_budget *b = hc->o.budget;
  if (!b) return true;
  pthread_mutex_lock(&b->lock);
  unsigned i = 0;
  while (i < BUDGET_CLIENTS && b->c[i]) i++;
  if (i < BUDGET_CLIENTS) b->c[i] = hc;
  pthread_mutex_unlock(&b->lock);
  return i < BUDGET_CLIENTS;
}

static void budget_leave(hook_client *hc) {
  hook_budget *b = hc->o.budget;
  if (!b) return;
  pthread_mutex_lock(&b->lock);
  for (unsigned i = 0; i < BUDGET_CLIENTS; i++)
    if (b->c[i] == hc) b->c[i] = NULL;
  if (hc->starving) b->starving--;
  hc->starving = false;
  pthread_mutex_unlock(&b->lock);
}

static uint64_t mono_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

const char *hook_strerror(int status) {
  switch (status) {
  case HOOK_ETIMEOUT: return "timed out";
  case HOOK_ECONNECT: return "cannot connect";
  case HOOK_EIO: return "connection lost";
  case HOOK_EPROTO: return "bad HTTP answer";
  case HOOK_EFULL: return "queue full";
  case HOOK_ENOMEM: return "out of memory";
  case HOOK_ECANCELED: return "canceled";
  default: return status >= 100 ? "HTTP status" : "unknown error";
  }
}

/* ---- the queue ------------------------------------------------------------------ */

/* reserved: its room in a budget's queue is taken already (a new post). */
static void q_push(hook_client *hc, hreq *r, bool front, bool reserved) {
  if (!reserved) budget_queue_add(hc, 1);
  r->prev = r->next = NULL;
  if (!hc->q_head) {
    hc->q_head = hc->q_tail = r;
  } else if (front) {
    r->next = hc->q_head;
    hc->q_head->prev = r;
    hc->q_head = r;
  } else {
    r->prev = hc->q_tail;
    hc->q_tail->next = r;
    hc->q_tail = r;
  }
  hc->queued++;
}

static void q_unlink(hook_client *hc, hreq *r) {
  if (r->prev) r->prev->next = r->next;
  else hc->q_head = r->next;
  if (r->next) r->next->prev = r->prev;
  else hc->q_tail = r->prev;
  r->prev = r->next = NULL;
  hc->queued--;
  budget_queue_add(hc, -1);
}

/* The request's outcome (it is on no connection and in no queue). */
static void finish(hreq *r, int status, const char *body, size_t len) {
  hook_client *hc = r->hc;
  event_free(r->timer);
  hc->pending--;
  r->done(r->arg, status, status >= 0 ? body : NULL, status >= 0 ? len : 0,
          mono_us() - r->t0_us);
  free(r);
}

/* ---- connections --------------------------------------------------------------- */

static void dispatch(hook_client *hc);

static void conn_free(hconn *k) {
  hook_client *hc = k->hc;
  if (k->prev) k->prev->next = k->next;
  else hc->conns = k->next;
  if (k->next) k->next->prev = k->prev;
  hc->nconns--;
  budget_conn_put(hc);
  if (k->req) k->req->conn = NULL;
  bufferevent_free(k->bev);
  event_free(k->idle_timer);
  free(k->body);
  free(k);
}

/* The connection failed with its request in flight: resend a request that
 * met a stale keep-alive connection (no byte of the answer came), else
 * report the failure. The connection is gone either way. */
static void conn_fail(hconn *k, int status) {
  hook_client *hc = k->hc;
  hreq *r = k->req;
  bool stale = k->reused && !k->got_bytes;
  conn_free(k);
  if (r) {
    if (stale && !r->retried) {
      r->retried = true;
      q_push(hc, r, true, false);
    } else {
      finish(r, status, NULL, 0);
    }
  }
  if (!hc->closing) dispatch(hc);
}

/* A whole answer arrived: report it; keep the connection for the next
 * request when both sides allow it. */
static void conn_answered(hconn *k, bool reusable) {
  hook_client *hc = k->hc;
  hreq *r = k->req;
  k->req = NULL;
  r->conn = NULL;
  int status = k->too_big ? HOOK_EPROTO : k->parser.status_code;
  if (!k->body) k->body = calloc(1, 1);
  if (!k->body && status >= 0) status = HOOK_EPROTO;
  if (reusable && status >= 0 && !budget_wanted(hc)) {
    k->reused = true;
    struct timeval tv = {hc->o.idle_ms / 1000, (hc->o.idle_ms % 1000) * 1000};
    event_add(k->idle_timer, &tv);
    finish(r, status, k->body, k->body_len);
  } else {
    /* the body lives in k: report first, then close */
    k->req = NULL;
    finish(r, status, k->body, k->body_len);
    conn_free(k);
  }
  if (!hc->closing) dispatch(hc);
}

static int on_msg_begin(llhttp_t *p) {
  hconn *k = p->data;
  k->body_len = 0;
  k->complete = k->too_big = false;
  return 0;
}

static int on_body(llhttp_t *p, const char *at, size_t n) {
  hconn *k = p->data;
  if (k->body_len + n > k->hc->o.max_response) {
    k->too_big = true;
    return -1;
  }
  if (k->body_len + n + 1 > k->body_cap) {
    size_t cap = (k->body_len + n + 1) * 2;
    if (cap > k->hc->o.max_response + 1) cap = k->hc->o.max_response + 1;
    char *b = realloc(k->body, cap);
    if (!b) return -1;
    k->body = b;
    k->body_cap = cap;
  }
  memcpy(k->body + k->body_len, at, n);
  k->body_len += n;
  k->body[k->body_len] = '\0';
  return 0;
}

static int on_msg_complete(llhttp_t *p) {
  hconn *k = p->data;
  if (p->status_code < 200) return 0; /* an interim answer (100 Continue): wait for the real one */
  k->complete = true;
  k->keep_alive = llhttp_should_keep_alive(p);
  if (k->body && k->body_len < k->body_cap) k->body[k->body_len] = '\0';
  return HPE_PAUSED;
}

static llhttp_settings_t parser_settings;

static void conn_read(struct bufferevent *bev, void *arg) {
  hconn *k = arg;
  struct evbuffer *in = bufferevent_get_input(bev);
  char buf[16384];
  int n;
  while ((n = evbuffer_remove(in, buf, sizeof buf)) > 0) {
    if (!k->req) { /* nothing asked: an answer to nothing */
      conn_free(k);
      return;
    }
    k->got_bytes = true;
    llhttp_errno_t e = llhttp_execute(&k->parser, buf, (size_t)n);
    if (e == HPE_PAUSED && k->complete) {
      size_t used = (size_t)(llhttp_get_error_pos(&k->parser) - buf);
      bool extra = used < (size_t)n || evbuffer_get_length(in) > 0;
      llhttp_resume(&k->parser);
      conn_answered(k, k->keep_alive && !extra);
      return;
    }
    if (e != HPE_OK) {
      conn_fail(k, HOOK_EPROTO);
      return;
    }
  }
}

static void conn_event(struct bufferevent *bev, short what, void *arg) {
  (void)bev;
  hconn *k = arg;
  if (what & BEV_EVENT_CONNECTED) {
    k->connected = true;
    return;
  }
  if (!k->req) { /* an idle connection closed by the server */
    conn_free(k);
    return;
  }
  if ((what & BEV_EVENT_EOF) && k->got_bytes) {
    /* an answer delimited by the end of the connection */
    llhttp_errno_t e = llhttp_finish(&k->parser);
    if ((e == HPE_OK || e == HPE_PAUSED) && k->complete) {
      conn_answered(k, false);
      return;
    }
    conn_fail(k, k->too_big ? HOOK_EPROTO : HOOK_EIO);
    return;
  }
  conn_fail(k, k->connected ? HOOK_EIO : HOOK_ECONNECT);
}

static void conn_idle_timeout(evutil_socket_t fd, short what, void *arg) {
  (void)fd;
  (void)what;
  hconn *k = arg;
  if (!k->req) conn_free(k);
}

static hconn *conn_open(hook_client *hc) {
  hconn *k = calloc(1, sizeof *k);
  if (!k) return NULL;
  k->hc = hc;
  k->bev = bufferevent_socket_new(hc->base, -1, BEV_OPT_CLOSE_ON_FREE | BEV_OPT_DEFER_CALLBACKS);
  k->idle_timer = evtimer_new(hc->base, conn_idle_timeout, k);
  if (!k->bev || !k->idle_timer) {
    if (k->bev) bufferevent_free(k->bev);
    if (k->idle_timer) event_free(k->idle_timer);
    free(k);
    return NULL;
  }
  llhttp_init(&k->parser, HTTP_RESPONSE, &parser_settings);
  k->parser.data = k;
  bufferevent_setcb(k->bev, conn_read, NULL, conn_event, k);
  k->next = hc->conns;
  if (hc->conns) hc->conns->prev = k;
  hc->conns = k;
  hc->nconns++;
  /* a failure to even start is reported through conn_event (deferred) */
  if (bufferevent_socket_connect(k->bev, (struct sockaddr *)&hc->addr, (int)hc->addr_len) == 0) {
    evutil_socket_t fd = bufferevent_getfd(k->bev);
    int one = 1;
    if (fd >= 0) setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  }
  bufferevent_enable(k->bev, EV_READ);
  return k;
}

/* Hand queued requests to idle connections, opening new ones up to the bound. */
static void dispatch(hook_client *hc) {
  while (hc->q_head) {
    hconn *k = hc->conns;
    while (k && k->req) k = k->next;
    if (!k) {
      if (!budget_conn_take(hc)) return;
      k = conn_open(hc);
      if (!k) { /* no memory: the requests wait (their deadlines still run) */
        budget_conn_put(hc);
        return;
      }
    }
    hreq *r = hc->q_head;
    q_unlink(hc, r);
    event_del(k->idle_timer);
    k->req = r;
    r->conn = k;
    k->got_bytes = k->complete = k->too_big = false;
    k->body_len = 0;
    if (bufferevent_write(k->bev, r->bytes, r->len) < 0) conn_fail(k, HOOK_EIO);
  }
}

static void kick(evutil_socket_t fd, short what, void *arg) {
  (void)fd;
  (void)what;
  hook_client *hc = arg;
  dispatch(hc);
  if (budget_wanted(hc)) /* another client needs the idle connections more */
    for (hconn *k = hc->conns, *next; k; k = next) {
      next = k->next;
      if (!k->req) conn_free(k);
    }
}

void hook_client_kick(hook_client *hc) { event_active(hc->kick, EV_TIMEOUT, 1); }

static void req_timeout(evutil_socket_t fd, short what, void *arg) {
  (void)fd;
  (void)what;
  hreq *r = arg;
  hook_client *hc = r->hc;
  if (r->conn) {
    /* the answer may still come: the connection cannot carry another request */
    r->conn->req = NULL;
    conn_free(r->conn);
  } else {
    q_unlink(hc, r);
  }
  finish(r, HOOK_ETIMEOUT, NULL, 0);
  dispatch(hc);
}

int hook_client_post(hook_client *hc, const char *headers, const char *body, size_t len,
                     uint32_t timeout_ms, hook_done_fn done, void *arg) {
  if (hc->closing || !budget_queue_take(hc)) return HOOK_EFULL;
  char head[HOST_MAX + PATH_MAX_LEN + 160];
  int hl = snprintf(head, sizeof head,
                    "POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                    "Content-Length: %zu\r\nUser-Agent: imd\r\n",
                    hc->path, hc->host, len);
  size_t xl = headers ? strlen(headers) : 0;
  hreq *r = malloc(sizeof *r + (size_t)hl + xl + 2 + len);
  if (r) {
    memset(r, 0, sizeof *r);
    r->timer = evtimer_new(hc->base, req_timeout, r);
  }
  if (!r || !r->timer) {
    free(r);
    budget_queue_add(hc, -1); /* the room reserved */
    return HOOK_ENOMEM;
  }
  memcpy(r->bytes, head, (size_t)hl);
  if (xl) memcpy(r->bytes + hl, headers, xl);
  memcpy(r->bytes + hl + xl, "\r\n", 2);
  memcpy(r->bytes + hl + xl + 2, body, len);
  r->len = (size_t)hl + xl + 2 + len;
  r->hc = hc;
  r->done = done;
  r->arg = arg;
  r->t0_us = mono_us();
  struct timeval tv = {timeout_ms / 1000, (timeout_ms % 1000) * 1000};
  event_add(r->timer, &tv);
  q_push(hc, r, false, true);
  hc->pending++;
  event_active(hc->kick, EV_TIMEOUT, 1);
  return 0;
}

size_t hook_client_pending(const hook_client *hc) { return hc->pending; }

/* ---- lifecycle ------------------------------------------------------------------- */

static int parse_url(hook_client *hc, const char *url, char *host, char *port, char *err,
                     size_t errlen) {
  if (!strncmp(url, "https://", 8)) {
    snprintf(err, errlen, "https:// is not supported; use http:// (a local proxy can add TLS)");
    return -1;
  }
  if (strncmp(url, "http://", 7)) {
    snprintf(err, errlen, "the URL must start with http://");
    return -1;
  }
  const char *h = url + 7, *slash = strchr(h, '/');
  size_t auth_len = slash ? (size_t)(slash - h) : strlen(h);
  if (!auth_len || auth_len >= HOST_MAX || memchr(h, '@', auth_len)) {
    snprintf(err, errlen, "bad host in the URL");
    return -1;
  }
  const char *path = slash ? slash : "/";
  if (strlen(path) >= PATH_MAX_LEN || strpbrk(path, " \r\n\t")) {
    snprintf(err, errlen, "bad path in the URL");
    return -1;
  }
  snprintf(hc->path, sizeof hc->path, "%s", path);
  snprintf(hc->host, sizeof hc->host, "%.*s", (int)auth_len, h);
  const char *colon;
  if (h[0] == '[') {
    const char *close = memchr(h, ']', auth_len);
    if (!close) {
      snprintf(err, errlen, "bad IPv6 literal in the URL");
      return -1;
    }
    snprintf(host, HOST_MAX, "%.*s", (int)(close - h - 1), h + 1);
    colon = close + 1 < h + auth_len && close[1] == ':' ? close + 1 : NULL;
  } else {
    colon = memchr(h, ':', auth_len);
    snprintf(host, HOST_MAX, "%.*s", (int)(colon ? (size_t)(colon - h) : auth_len), h);
  }
  if (colon) {
    size_t pl = (size_t)(h + auth_len - colon - 1);
    if (!pl || pl > 5 || strspn(colon + 1, "0123456789") < pl) {
      snprintf(err, errlen, "bad port in the URL");
      return -1;
    }
    snprintf(port, 8, "%.*s", (int)pl, colon + 1);
  } else {
    snprintf(port, 8, "80");
  }
  return *host ? 0 : (snprintf(err, errlen, "no host in the URL"), -1);
}

hook_client *hook_client_new(struct event_base *base, const char *url,
                             const hook_client_opts *o, char *err, size_t errlen) {
  if (!parser_settings.on_message_complete) {
    llhttp_settings_init(&parser_settings);
    parser_settings.on_message_begin = on_msg_begin;
    parser_settings.on_body = on_body;
    parser_settings.on_message_complete = on_msg_complete;
  }
  hook_client *hc = calloc(1, sizeof *hc);
  if (!hc) {
    snprintf(err, errlen, "out of memory");
    return NULL;
  }
  char host[HOST_MAX], port[8];
  if (parse_url(hc, url, host, port, err, errlen) < 0) {
    free(hc);
    return NULL;
  }
  struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *ai = NULL;
  int gr = getaddrinfo(host, port, &hints, &ai);
  if (gr != 0 || !ai) {
    snprintf(err, errlen, "cannot resolve %s: %s", host, gai_strerror(gr));
    free(hc);
    return NULL;
  }
  memcpy(&hc->addr, ai->ai_addr, ai->ai_addrlen);
  hc->addr_len = ai->ai_addrlen;
  freeaddrinfo(ai);
  hc->base = base;
  hc->o = *o;
  if (!hc->o.max_conns) hc->o.max_conns = 1;
  hc->kick = event_new(base, -1, 0, kick, hc);
  if (!hc->kick || !budget_join(hc)) {
    snprintf(err, errlen, hc->kick ? "more than %d clients on one budget" : "out of memory",
             BUDGET_CLIENTS);
    if (hc->kick) event_free(hc->kick);
    free(hc);
    return NULL;
  }
  return hc;
}

void hook_client_free(hook_client *hc) {
  if (!hc) return;
  hc->closing = true;
  budget_leave(hc); /* no one wakes it any more; its connections still go back */
  while (hc->conns) {
    hconn *k = hc->conns;
    hreq *r = k->req;
    k->req = NULL;
    conn_free(k);
    if (r) finish(r, HOOK_ECANCELED, NULL, 0);
  }
  while (hc->q_head) {
    hreq *r = hc->q_head;
    q_unlink(hc, r);
    finish(r, HOOK_ECANCELED, NULL, 0);
  }
  event_free(hc->kick);
  free(hc);
}
