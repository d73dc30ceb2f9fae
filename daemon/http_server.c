/* HTTP/1.1 for the business API: llhttp parses, one handler answers (now or
 * later), responses are queued per connection and written through libim's
 * im_stream (a plain socket or TLS: <libim/im_net.h>).
 *
 * Each complete request pauses the parser (on_message_complete returns
 * HPE_PAUSED), so the handler runs outside llhttp and pipelined requests are
 * answered strictly in order. Idle and lingering connections sit on two
 * lists ordered by deadline, served by one timer for the whole server.
 *
 * A deferred answer is a placeholder segment in the connection's output
 * queue: writing stops in front of it until http_server_respond() swaps in
 * the real response. Tickets name a slot in a server-wide table plus the
 * slot's generation, so a stale ticket is recognised without touching the
 * (possibly freed) connection. respond() only queues and puts the connection
 * on a "kick" list that a server event serves from the loop, so it never
 * re-enters the handler or the connection code. Connections waiting for the
 * application sit on a third list without a deadline. */
#include "http_server.h"

#include <errno.h>
#include <event2/event.h>
#include <event2/util.h>
#include <libim/im_net.h>
#include <llhttp.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#define READ_CHUNK (64 * 1024)
#define SCRATCH_KEEP (64 * 1024)
#define IOV_BATCH 64
/* Past this much unsent output, stop parsing further pipelined requests
 * until the client has read it all: a client that never reads cannot make
 * the server hold more than this plus one response. */
#define OUT_HIGH ((size_t)1 << 20)
/* After the last response of a closing connection, keep reading (and
 * discarding) this long so that unread input does not turn our close into
 * a reset that could destroy the response in flight. */
#define LINGER_MS 2000u
/* Request line overhead (method, version, spaces, CRLF) and per-header
 * overhead (": ", CRLF) counted against max_header. */
#define REQ_LINE_OVERHEAD 16
#define HEADER_OVERHEAD 4
#define HNAME_MAX 16
#define ABSENT SIZE_MAX
/* A ticket is (generation << SLOT_BITS) | slot index; generations start at 1
 * and wrap within GEN_BITS, so no ticket is 0. */
#define SLOT_BITS 24
#define GEN_BITS 40
#define SLOT_MAX ((uint32_t)1 << SLOT_BITS)
#define GEN_MAX (((uint64_t)1 << GEN_BITS) - 1)
#define NO_SLOT UINT32_MAX

enum hdr_kind { H_OTHER = -1, H_AUTH, H_CTYPE, H_EXPECT, H_INM, H_COUNT };

static const char *const hdr_names[H_COUNT] = {"authorization", "content-type", "expect",
                                                "if-none-match"};

/* One queued response (or interim 100 Continue): its head, then its body.
 * Or, with `waiting`, the place of a deferred answer: no head, no body. */
typedef struct out_seg {
  struct out_seg *next, *prev;
  char *body; /* owned; NULL when none is sent */
  size_t body_len;
  size_t sent; /* bytes of head + body already written */
  size_t head_len;
  bool waiting;   /* deferred answer not given yet */
  bool head_only; /* of a waiting one: HEAD request */
  bool keep_alive;
  uint32_t slot; /* of a waiting one: its ticket slot */
  char head[];
} out_seg;

typedef struct http_conn http_conn;

/* A request being read runs against its own deadlines, which bytes that
 * trickle in do not push back (slowloris). */
enum { PHASE_NONE, PHASE_HEADERS, PHASE_BODY };

typedef struct conn_list {
  http_conn *head, *tail;
} conn_list;

struct http_conn {
  http_server *srv;
  http_conn *prev, *next; /* on srv->idle, srv->linger or srv->hs, by deadline */
  conn_list *list;
  uint64_t deadline_ms;
  im_stream *st; /* the socket, plain or TLS (libim's transport seam) */
  short events; /* what conn_event() is armed for */
  bool handshaking;  /* TLS handshake not done yet: nothing parsed */
  bool keep_alive;   /* of the message just completed */
  bool closing;      /* send what is queued, then close */
  bool lingering;    /* write side shut; draining input until EOF */
  bool throttled;    /* too much output queued or too many answers
                        outstanding; input held in `in` */
  bool kicked;       /* on srv's kick list */
  bool peer_eof;
  bool dead;         /* fatal (out of memory): drop without a response */
  uint8_t phase;     /* a request coming in: PHASE_HEADERS, PHASE_BODY (own deadline) */
  bool in_body;      /* headers done: later header callbacks are trailers */
  bool discard_body; /* not admitted (http_limits.admit): body read, not kept */
  http_conn *kprev, *knext; /* on srv's kick list */
  unsigned nwait;            /* waiting segments in the output queue */
  llhttp_t parser;
  out_seg *out_head, *out_tail;
  size_t out_bytes;
  /* The request being received: target, then the values of the headers
   * we keep, then the body, each followed by a NUL; one allocation, freed
   * after every request. */
  char *req;
  size_t req_len, req_cap;
  size_t url_len;
  size_t hoff[H_COUNT]; /* where each kept header's value starts, or ABSENT */
  size_t body_off, body_len;
  bool req_shared;      /* req is the server's scratch (srv->scratch), lent
                           while the request arrives within one read */
  const char *body_at;  /* the body, left in the input buffer where it
                           arrived whole (not copied to req); NULL: in req */
  uint64_t body_decl;   /* Content-Length of the request being read */
  size_t head_bytes;
  int cur_hdr;
  unsigned hname_len; /* HNAME_MAX + 1: too long to be one we keep */
  char hname[HNAME_MAX];
  int err_status;     /* set by a callback that refuses the request */
  const char *err_msg;
  char *in; /* unparsed input held while throttled */
  size_t in_len;
  char peer[64];
  /* the struct event follows, event_get_struct_event_size() bytes */
  _Alignas(max_align_t) unsigned char ev[];
};

/* A ticket's slot: in use while seg is set. */
typedef struct defer_slot {
  uint64_t gen;
  out_seg *seg; /* the waiting segment */
  http_conn *conn;
  uint32_t next_free;
  /* for http_done when it is answered */
  int method;
  uint8_t path_len;
  char path[HTTP_DONE_PATH_MAX];
} defer_slot;

struct http_server {
  struct event_base *base;
  im_listener *listener;
  im_tls *tls; /* NULL: plain HTTP */
  struct event *timer;
  struct event *kick; /* serves kick_head..kick_tail */
  http_limits lim;
  http_handler handler;
  http_done_fn done;
  void *user;
  int port;
  unsigned nconns;
  conn_list idle, linger;
  conn_list hs;   /* TLS handshakes in progress (handshake timeout) */
  conn_list busy; /* waiting for the application: no deadline */
  conn_list hdr, body; /* a request's headers / body being read */
  http_conn *kick_head, *kick_tail;
  defer_slot *slots;
  uint32_t nslots, slots_cap, free_slot;
  uint64_t timer_at; /* when `timer` fires; 0 when not armed */
  unsigned depth;    /* > 0 while inside a connection callback */
  bool free_pending; /* http_server_free() was called from the handler */
  uint64_t now;      /* now_ms() when the current callback began (depth > 0) */
  /* A request that starts and ends within one read is gathered here rather
   * than in an allocation of its connection's own; kept between requests
   * while no larger than SCRATCH_KEEP. */
  char *scratch;
  size_t scratch_cap;
  bool scratch_lent;
  /* one byte more than is ever read into it: the NUL after a body left in
   * place (see dispatch) */
  char rbuf[READ_CHUNK + 1];
};

static struct event *conn_event(http_conn *c) { return (struct event *)c->ev; }

static uint64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* ---- deadline lists and the timer ------------------------------------------- */

static void list_unlink(http_conn *c) {
  conn_list *l = c->list;
  if (!l) return;
  if (c->prev)
    c->prev->next = c->next;
  else
    l->head = c->next;
  if (c->next)
    c->next->prev = c->prev;
  else
    l->tail = c->prev;
  c->prev = c->next = NULL;
  c->list = NULL;
}

/* Every connection on one list gets the same timeout, so appending keeps the
 * list sorted by deadline and the timer only ever looks at the heads. */
static void list_append(conn_list *l, http_conn *c) {
  c->prev = l->tail;
  c->next = NULL;
  if (l->tail)
    l->tail->next = c;
  else
    l->head = c;
  l->tail = c;
  c->list = l;
}

/* The clock read once per callback: a request's deadlines are set several
 * times while it is read and answered, and milliseconds do not move much
 * within one pass. */
static uint64_t srv_now(const http_server *s) { return s->depth ? s->now : now_ms(); }

/* Marks the start of a callback into the server. */
static void srv_enter(http_server *s) {
  if (s->depth++ == 0) s->now = now_ms();
}

static void timer_want(http_server *s, uint64_t at) {
  if (s->timer_at && s->timer_at <= at) return;
  uint64_t now = srv_now(s);
  /* at least 1 ms, so a coarse event-loop clock cannot make it spin */
  uint64_t wait = at > now ? at - now : 1;
  struct timeval tv = {(time_t)(wait / 1000), (suseconds_t)(wait % 1000) * 1000};
  if (evtimer_add(s->timer, &tv) == 0) s->timer_at = at;
}

static void set_deadline(http_conn *c, conn_list *l, unsigned ms) {
  list_unlink(c);
  c->deadline_ms = srv_now(c->srv) + ms;
  list_append(l, c);
  timer_want(c->srv, c->deadline_ms);
}

/* Bytes moved: the idle clock starts again, unless an answer is awaited
 * from the application, which stops it. */
static void conn_touch(http_conn *c) {
  if (c->lingering || c->phase != PHASE_NONE) return;
  http_server *s = c->srv;
  if (!c->nwait) {
    set_deadline(c, &s->idle, s->lim.idle_timeout_ms);
  } else if (c->list != &s->busy) {
    list_unlink(c);
    list_append(&s->busy, c);
  }
}

static void conn_destroy(http_conn *c);

static void timer_cb(evutil_socket_t fd, short what, void *arg) {
  (void)fd;
  (void)what;
  http_server *s = arg;
  s->timer_at = 0;
  uint64_t now = now_ms();
  conn_list *lists[5] = {&s->idle, &s->linger, &s->hs, &s->hdr, &s->body};
  uint64_t next = 0;
  for (int i = 0; i < 5; i++) {
    while (lists[i]->head && lists[i]->head->deadline_ms <= now) conn_destroy(lists[i]->head);
    if (lists[i]->head && (!next || lists[i]->head->deadline_ms < next))
      next = lists[i]->head->deadline_ms;
  }
  if (next) timer_want(s, next);
}

/* ---- connection lifetime -------------------------------------------------- */

static void conn_io_cb(evutil_socket_t fd, short what, void *arg);

static void conn_set_events(http_conn *c, short want) {
  if (c->events == want) return;
  struct event *ev = conn_event(c);
  if (c->events) event_del(ev);
  c->events = 0;
  if (!want) return;
  event_assign(ev, c->srv->base, im_stream_fd(c->st), want | EV_PERSIST, conn_io_cb, c);
  if (event_add(ev, NULL) == 0) c->events = want;
}

/* Reading stops while input is throttled and once the last request is
 * read; it resumes, to discard, while lingering. Writing is awaited only
 * after a write said IM_STREAM_AGAIN, which is when sendable output stays
 * queued (not a deferred answer the application has yet to give). */
static void conn_update_events(http_conn *c) {
  short want = 0;
  if (c->handshaking) {
    want = im_stream_wants(c->st) & IM_WANT_WRITE ? EV_WRITE : EV_READ;
    conn_set_events(c, want);
    return;
  }
  if (c->lingering || (!c->closing && !c->throttled)) want |= EV_READ;
  if (c->out_head && !c->out_head->waiting) want |= EV_WRITE;
  conn_set_events(c, want);
  /* TLS may hold decrypted input that no readiness event will announce */
  if ((c->events & EV_READ) && im_stream_pending(c->st)) event_active(conn_event(c), EV_READ, 0);
}

/* ---- tickets and kicks ------------------------------------------------------ */

/* Takes a free slot, growing the table; false when out of memory or full. */
static bool slot_take(http_server *s, uint32_t *idx) {
  if (s->free_slot != NO_SLOT) {
    *idx = s->free_slot;
    s->free_slot = s->slots[*idx].next_free;
    return true;
  }
  if (s->nslots == SLOT_MAX) return false;
  if (s->nslots == s->slots_cap) {
    uint32_t cap = s->slots_cap ? s->slots_cap * 2 : 16;
    if (cap > SLOT_MAX) cap = SLOT_MAX;
    defer_slot *t = realloc(s->slots, cap * sizeof *t);
    if (!t) return false;
    s->slots = t;
    s->slots_cap = cap;
  }
  *idx = s->nslots++;
  s->slots[*idx].gen = 1;
  return true;
}

/* Frees the slot; its ticket goes stale at once. */
static void slot_release(http_server *s, uint32_t idx) {
  defer_slot *d = &s->slots[idx];
  d->seg = NULL;
  d->conn = NULL;
  d->gen = d->gen == GEN_MAX ? 1 : d->gen + 1;
  d->next_free = s->free_slot;
  s->free_slot = idx;
}

static void kick_unlink(http_conn *c) {
  http_server *s = c->srv;
  if (!c->kicked) return;
  if (c->kprev)
    c->kprev->knext = c->knext;
  else
    s->kick_head = c->knext;
  if (c->knext)
    c->knext->kprev = c->kprev;
  else
    s->kick_tail = c->kprev;
  c->kprev = c->knext = NULL;
  c->kicked = false;
}

/* Has the loop run c (write, resume reading, close) once the current
 * callback returns. */
static void kick_add(http_conn *c) {
  http_server *s = c->srv;
  if (c->kicked) return;
  c->kicked = true;
  c->knext = NULL;
  c->kprev = s->kick_tail;
  if (s->kick_tail)
    s->kick_tail->knext = c;
  else
    s->kick_head = c;
  s->kick_tail = c;
  event_active(s->kick, EV_TIMEOUT, 0);
}

static void out_free_all(http_conn *c) {
  while (c->out_head) {
    out_seg *o = c->out_head;
    c->out_head = o->next;
    if (o->waiting) slot_release(c->srv, o->slot);
    free(o->body);
    free(o);
  }
  c->out_tail = NULL;
  c->out_bytes = 0;
  c->nwait = 0;
}

/* Lets go of the request's buffer: gives the scratch back to the server,
 * or frees the connection's own. */
static void req_drop(http_conn *c) {
  http_server *s = c->srv;
  if (c->req_shared) {
    s->scratch_lent = false;
    if (s->scratch_cap > SCRATCH_KEEP) {
      free(s->scratch);
      s->scratch = NULL;
      s->scratch_cap = 0;
    }
  } else {
    free(c->req);
  }
  c->req = NULL;
  c->req_len = c->req_cap = 0;
  c->req_shared = false;
  c->body_at = NULL;
}

static void conn_destroy(http_conn *c) {
  http_server *s = c->srv;
  conn_set_events(c, 0);
  im_stream_free(c->st);
  list_unlink(c);
  kick_unlink(c);
  out_free_all(c);
  req_drop(c);
  free(c->in);
  s->nconns--;
  free(c);
}

static void conn_start_linger(http_conn *c) {
  im_stream_shutdown(c->st); /* TLS close_notify, then FIN */
  c->lingering = true;
  unsigned ms = c->srv->lim.idle_timeout_ms < LINGER_MS ? c->srv->lim.idle_timeout_ms : LINGER_MS;
  set_deadline(c, &c->srv->linger, ms);
}

/* ---- output ------------------------------------------------------------------ */

static const char *reason_phrase(int status) {
  switch (status) {
    case 100: return "Continue";
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 203: return "Non-Authoritative Information";
    case 204: return "No Content";
    case 205: return "Reset Content";
    case 206: return "Partial Content";
    case 300: return "Multiple Choices";
    case 301: return "Moved Permanently";
    case 302: return "Found";
    case 303: return "See Other";
    case 304: return "Not Modified";
    case 307: return "Temporary Redirect";
    case 308: return "Permanent Redirect";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 402: return "Payment Required";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 406: return "Not Acceptable";
    case 407: return "Proxy Authentication Required";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 410: return "Gone";
    case 411: return "Length Required";
    case 412: return "Precondition Failed";
    case 413: return "Content Too Large";
    case 414: return "URI Too Long";
    case 415: return "Unsupported Media Type";
    case 416: return "Range Not Satisfiable";
    case 417: return "Expectation Failed";
    case 421: return "Misdirected Request";
    case 422: return "Unprocessable Content";
    case 425: return "Too Early";
    case 426: return "Upgrade Required";
    case 428: return "Precondition Required";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 451: return "Unavailable For Legal Reasons";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    case 505: return "HTTP Version Not Supported";
    case 507: return "Insufficient Storage";
    case 511: return "Network Authentication Required";
    default: break;
  }
  /* the phrase carries no meaning (RFC 9110 15), so a class name will do */
  switch (status / 100) {
    case 2: return "Success";
    case 3: return "Redirection";
    case 4: return "Client Error";
    default: return "Server Error";
  }
}

static void out_push(http_conn *c, out_seg *o) {
  o->next = NULL;
  o->prev = c->out_tail;
  if (c->out_tail)
    c->out_tail->next = o;
  else
    c->out_head = o;
  c->out_tail = o;
  c->out_bytes += o->head_len + o->body_len;
}

/* Takes o (unsent) out of the queue, without freeing it. */
static void out_unlink(http_conn *c, out_seg *o) {
  if (o->prev)
    o->prev->next = o->next;
  else
    c->out_head = o->next;
  if (o->next)
    o->next->prev = o->prev;
  else
    c->out_tail = o->prev;
  c->out_bytes -= o->head_len + o->body_len;
}

/* Puts n (not queued) where old is; old is unlinked, not freed. */
static void out_replace(http_conn *c, out_seg *old, out_seg *n) {
  n->prev = old->prev;
  n->next = old->next;
  if (n->prev)
    n->prev->next = n;
  else
    c->out_head = n;
  if (n->next)
    n->next->prev = n;
  else
    c->out_tail = n;
  c->out_bytes += n->head_len + n->body_len;
  c->out_bytes -= old->head_len + old->body_len;
}

static bool out_push_raw(http_conn *c, const char *head, size_t len) {
  out_seg *o = calloc(1, sizeof *o + len);
  if (!o) return false;
  memcpy(o->head, head, len);
  o->head_len = len;
  out_push(c, o);
  return true;
}

static char *json_error(const char *msg, size_t *len);
static bool is_tchar(unsigned char ch);

/* Extra header lines are sent only when every one is "Name: value\r\n"
 * with a token name and no other CR or LF (no header injection). */
static bool extra_valid(const char *e) {
  if (!e) return false;
  while (*e) {
    const char *colon = e;
    while (is_tchar((unsigned char)*colon)) colon++;
    if (colon == e || *colon != ':') return false;
    const char *cr = strpbrk(colon, "\r\n");
    if (!cr || cr[0] != '\r' || cr[1] != '\n') return false;
    e = cr + 2;
  }
  return true;
}

/* Copies s to h; returns the end. */
static char *mem_put(char *h, const char *s) {
  size_t n = strlen(s);
  memcpy(h, s, n);
  return h + n;
}

const char *http_fmt_uint(char buf[static 21], uint64_t v) {
  char *p = buf + 20;
  *p = '\0';
  do *--p = (char)('0' + v % 10);
  while (v /= 10);
  return p;
}

/* A status a handler may answer with; any other goes out as a 500. */
static bool status_valid(int status) { return status >= 200 && status <= 599; }

/* Builds one response; body (malloc()ed or NULL) is owned from here on,
 * even on failure, which returns NULL (out of memory). A status outside
 * 200..599 becomes a 500 {"error":"internal error"}; a NULL content type or
 * one with CR or LF, the default. */
static out_seg *make_response(int status, const char *ctype, const char *extra, char *body,
                              size_t body_len, bool head_only, bool keep_alive) {
  if (!ctype || strpbrk(ctype, "\r\n")) ctype = "application/json";
  if (!extra_valid(extra)) extra = "";
  if (!status_valid(status)) {
    free(body);
    status = 500;
    ctype = "application/json";
    body = json_error("internal error", &body_len);
  }
  if (!body) body_len = 0;
  bool no_length = status == 204 || status == 304;
  if (no_length || head_only) {
    free(body);
    body = NULL;
  }
  if (no_length) body_len = 0;
  size_t cap = 200 + strlen(ctype) + strlen(extra);
  out_seg *o = calloc(1, sizeof *o + cap);
  if (!o) {
    free(body);
    return NULL;
  }
  /* one response per request: built with copies, not snprintf */
  char *h = o->head;
  char num[24];
  h = mem_put(h, "HTTP/1.1 ");
  h = mem_put(h, http_fmt_uint(num, (unsigned)status));
  *h++ = ' ';
  h = mem_put(h, reason_phrase(status));
  h = mem_put(h, "\r\nContent-Type: ");
  h = mem_put(h, ctype);
  if (!no_length) {
    h = mem_put(h, "\r\nContent-Length: ");
    h = mem_put(h, http_fmt_uint(num, body_len));
  }
  h = mem_put(h, "\r\n");
  h = mem_put(h, extra);
  h = mem_put(h, keep_alive ? "Connection: keep-alive\r\n\r\n" : "Connection: close\r\n\r\n");
  size_t n = (size_t)(h - o->head);
  o->head_len = n;
  o->body = body;
  o->body_len = body ? body_len : 0;
  return o;
}

/* Queues one response (see make_response); running out of memory marks
 * the connection dead. */
static void queue_response(http_conn *c, int status, const char *ctype, const char *extra,
                           char *body, size_t body_len, bool head_only, bool keep_alive) {
  out_seg *o = make_response(status, ctype, extra, body, body_len, head_only, keep_alive);
  if (o)
    out_push(c, o);
  else
    c->dead = true;
}

/* {"error":"<msg>"} with msg escaped as a JSON string; NULL on ENOMEM. */
static char *json_error(const char *msg, size_t *len) {
  size_t n = strlen(msg);
  char *b = malloc(16 + 6 * n);
  if (!b) return NULL;
  size_t k = (size_t)sprintf(b, "{\"error\":\"");
  for (const unsigned char *p = (const unsigned char *)msg; *p; p++) {
    if (*p == '"' || *p == '\\') {
      b[k++] = '\\';
      b[k++] = (char)*p;
    } else if (*p < 0x20) {
      k += (size_t)sprintf(b + k, "\\u%04x", *p);
    } else {
      b[k++] = (char)*p;
    }
  }
  memcpy(b + k, "\"}", 3);
  *len = k + 2;
  return b;
}

/* Answers with a JSON error and closes after it; nothing more is parsed. */
static void conn_fail(http_conn *c, int status, const char *msg) {
  size_t len = 0;
  char *body = json_error(msg, &len);
  if (!body) {
    c->dead = true;
    return;
  }
  queue_response(c, status, "application/json", "", body, len, false, false);
  c->closing = true;
}

/* Writes what is queued until done, EAGAIN or a deferred answer not given
 * yet. Returns false on a socket error (the connection must go). */
static bool conn_flush(http_conn *c) {
  while (c->out_head && !c->out_head->waiting) {
    struct iovec iov[IOV_BATCH];
    int n = 0;
    for (out_seg *o = c->out_head; o && !o->waiting && n <= IOV_BATCH - 2; o = o->next) {
      if (o->sent < o->head_len) {
        iov[n].iov_base = o->head + o->sent;
        iov[n++].iov_len = o->head_len - o->sent;
        if (o->body_len) {
          iov[n].iov_base = o->body;
          iov[n++].iov_len = o->body_len;
        }
      } else {
        iov[n].iov_base = o->body + (o->sent - o->head_len);
        iov[n++].iov_len = o->head_len + o->body_len - o->sent;
      }
    }
    ssize_t w = im_stream_writev(c->st, iov, n);
    if (w < 0) return w == IM_STREAM_AGAIN;
    conn_touch(c);
    size_t left = (size_t)w;
    c->out_bytes -= left;
    while (left) {
      out_seg *o = c->out_head;
      size_t rest = o->head_len + o->body_len - o->sent;
      if (left < rest) {
        o->sent += left;
        break;
      }
      left -= rest;
      c->out_head = o->next;
      if (c->out_head)
        c->out_head->prev = NULL;
      else
        c->out_tail = NULL;
      free(o->body);
      free(o);
    }
  }
  return true;
}

/* ---- llhttp callbacks ----------------------------------------------------------- */

/* Records why the request is refused; llhttp then stops with an error. */
static int refuse(http_conn *c, int status, const char *msg) {
  c->err_status = status;
  c->err_msg = msg;
  return HPE_USER;
}

static int req_reserve(http_conn *c, size_t more) {
  if (c->req_cap - c->req_len >= more) return 0;
  if (more > SIZE_MAX / 4 - c->req_len) return -1;
  size_t cap = c->req_cap ? c->req_cap : 256;
  while (cap - c->req_len < more) cap *= 2;
  char *p = realloc(c->req, cap);
  if (!p) return -1;
  c->req = p;
  c->req_cap = cap;
  if (c->req_shared) {
    c->srv->scratch = p;
    c->srv->scratch_cap = cap;
  }
  return 0;
}

static int req_put(http_conn *c, const char *at, size_t n) {
  if (req_reserve(c, n + 1) < 0) return refuse(c, 500, "out of memory");
  memcpy(c->req + c->req_len, at, n);
  c->req_len += n;
  return 0;
}

static int req_nul(http_conn *c) {
  if (req_reserve(c, 1) < 0) return refuse(c, 500, "out of memory");
  c->req[c->req_len++] = '\0';
  return 0;
}

static int head_add(http_conn *c, size_t n) {
  c->head_bytes += n;
  if (c->head_bytes > c->srv->lim.max_header)
    return refuse(c, 431, "request header fields too large");
  return 0;
}

static int on_message_begin(llhttp_t *p) {
  http_conn *c = p->data;
  http_server *s = c->srv;
  if (!c->req && !s->scratch_lent) { /* given back, or copied, before the input goes */
    c->req = s->scratch;
    c->req_cap = s->scratch_cap;
    c->req_shared = s->scratch_lent = true;
  }
  c->req_len = 0;
  c->body_at = NULL;
  c->body_decl = 0;
  c->url_len = 0;
  for (int i = 0; i < H_COUNT; i++) c->hoff[i] = ABSENT;
  c->body_off = 0;
  c->body_len = 0;
  c->head_bytes = REQ_LINE_OVERHEAD;
  c->cur_hdr = H_OTHER;
  c->hname_len = 0;
  c->in_body = false;
  c->discard_body = false;
  c->err_status = 0;
  c->err_msg = NULL;
  c->phase = PHASE_HEADERS;
  set_deadline(c, &c->srv->hdr, c->srv->lim.header_timeout_ms);
  return 0;
}

static int on_url(llhttp_t *p, const char *at, size_t n) {
  http_conn *c = p->data;
  int r = head_add(c, n);
  if (r) return r;
  c->url_len += n;
  return req_put(c, at, n);
}

static int on_url_complete(llhttp_t *p) { return req_nul(p->data); }

/* RFC 9110 5.6.2 token characters. */
static bool is_tchar(unsigned char ch) {
  return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
         (ch && strchr("!#$%&'*+-.^_`|~", ch));
}

static int on_header_field(llhttp_t *p, const char *at, size_t n) {
  http_conn *c = p->data;
  int r = head_add(c, n);
  if (r) return r;
  /* llhttp 8 lets spaces into names; "Content-Length :" read differently
   * by a proxy in front of us is a request-smuggling vector (RFC 9112 5.1) */
  for (size_t i = 0; i < n; i++)
    if (!is_tchar((unsigned char)at[i]))
      return refuse(c, 400, "bad request: invalid character in header name");
  if (c->in_body) return 0;
  if (c->hname_len + n > HNAME_MAX) {
    c->hname_len = HNAME_MAX + 1;
  } else {
    memcpy(c->hname + c->hname_len, at, n);
    c->hname_len += (unsigned)n;
  }
  return 0;
}

static int on_header_field_complete(llhttp_t *p) {
  http_conn *c = p->data;
  c->cur_hdr = H_OTHER;
  /* trailers are counted against max_header but not kept */
  if (c->in_body) return 0;
  for (int i = 0; i < H_COUNT; i++) {
    if (c->hname_len == strlen(hdr_names[i]) &&
        strncasecmp(c->hname, hdr_names[i], c->hname_len) == 0) {
      c->cur_hdr = i;
      break;
    }
  }
  c->hname_len = 0;
  if (c->cur_hdr == H_OTHER) return 0;
  /* a second Authorization, Content-Type or If-None-Match is ambiguous: which counts? */
  if (c->hoff[c->cur_hdr] != ABSENT) return refuse(c, 400, "bad request: duplicate header");
  c->hoff[c->cur_hdr] = c->req_len;
  return 0;
}

static int on_header_value(llhttp_t *p, const char *at, size_t n) {
  http_conn *c = p->data;
  int r = head_add(c, n);
  if (r) return r;
  return c->cur_hdr == H_OTHER ? 0 : req_put(c, at, n);
}

static int on_header_value_complete(llhttp_t *p) {
  http_conn *c = p->data;
  int r = head_add(c, HEADER_OVERHEAD);
  if (r || c->cur_hdr == H_OTHER) return r;
  /* llhttp drops leading whitespace but keeps trailing */
  size_t off = c->hoff[c->cur_hdr];
  while (c->req_len > off && (c->req[c->req_len - 1] == ' ' || c->req[c->req_len - 1] == '\t'))
    c->req_len--;
  c->cur_hdr = H_OTHER;
  return req_nul(c);
}

static int on_headers_complete(llhttp_t *p) {
  http_conn *c = p->data;
  const http_limits *lim = &c->srv->lim;
  bool has_body = (p->flags & F_CHUNKED) || p->content_length > 0;
  bool send_continue = false;
  /* RFC 9110 10.1.1: an HTTP/1.0 client cannot expect 100 Continue, so its
   * Expect is ignored */
  if (c->hoff[H_EXPECT] != ABSENT && (p->http_major > 1 || p->http_minor > 0)) {
    if (strcasecmp(c->req + c->hoff[H_EXPECT], "100-continue") != 0)
      return refuse(c, 417, "expectation failed");
    send_continue = has_body;
  }
  if (!(p->flags & F_CHUNKED) && p->content_length > lim->max_body)
    return refuse(c, 413, "request body too large");
  if (send_continue && !out_push_raw(c, "HTTP/1.1 100 Continue\r\n\r\n", 25))
    return refuse(c, 500, "out of memory");
  if (has_body && lim->admit)
    c->discard_body = !lim->admit(c->srv->user,
                                  c->hoff[H_AUTH] != ABSENT ? c->req + c->hoff[H_AUTH] : NULL);
  if (!(p->flags & F_CHUNKED)) c->body_decl = p->content_length;
  c->body_off = c->req_len;
  c->in_body = true;
  c->phase = PHASE_BODY;
  set_deadline(c, &c->srv->body, c->srv->lim.body_timeout_ms);
  return 0;
}

static int on_chunk_header(llhttp_t *p) {
  http_conn *c = p->data;
  /* refuse before the chunk arrives, not after buffering it */
  if (p->content_length > c->srv->lim.max_body - c->body_len)
    return refuse(c, 413, "request body too large");
  return 0;
}

static int on_body(llhttp_t *p, const char *at, size_t n) {
  http_conn *c = p->data;
  if (n > c->srv->lim.max_body - c->body_len) return refuse(c, 413, "request body too large");
  if (c->discard_body) {
    c->body_len += n;
    return 0;
  }
  if (!c->body_len && n == c->body_decl) {
    /* arrived whole: it stays where it is (see dispatch) */
    c->body_at = at;
    c->body_len = n;
    return 0;
  }
  /* a declared length is allocated once; chunked grows as it comes */
  if (!c->body_len && c->body_decl && req_reserve(c, (size_t)c->body_decl + 1) < 0)
    return refuse(c, 500, "out of memory");
  c->body_len += n;
  return req_put(c, at, n);
}

static int on_message_complete(llhttp_t *p) {
  http_conn *c = p->data;
  int r = c->body_at ? 0 : req_nul(c);
  if (r) return r;
  /* an upgrade or CONNECT would switch protocols, which we do not */
  c->keep_alive = llhttp_should_keep_alive(p) && !p->upgrade;
  c->phase = PHASE_NONE;
  conn_touch(c); /* back to the idle (or busy) clock */
  return HPE_PAUSED;
}

static const llhttp_settings_t parser_settings = {
    .on_message_begin = on_message_begin,
    .on_url = on_url,
    .on_url_complete = on_url_complete,
    .on_header_field = on_header_field,
    .on_header_field_complete = on_header_field_complete,
    .on_header_value = on_header_value,
    .on_header_value_complete = on_header_value_complete,
    .on_headers_complete = on_headers_complete,
    .on_chunk_header = on_chunk_header,
    .on_body = on_body,
    .on_message_complete = on_message_complete,
};

/* ---- requests ------------------------------------------------------------------ */

/* What the handler gets as its http_response: http_response_defer() finds
 * the connection through it. */
typedef struct resp_box {
  http_response pub; /* first: a pointer to it is a pointer to the box */
  const http_request *req;
  http_conn *conn;
  bool head_only;
  uint64_t ticket;
} resp_box;

uint64_t http_response_defer(http_response *resp) {
  if (!resp) return 0;
  resp_box *b = (resp_box *)resp;
  if (b->ticket) return b->ticket;
  http_conn *c = b->conn;
  http_server *s = c->srv;
  out_seg *o = calloc(1, sizeof *o);
  uint32_t idx;
  if (!o) return 0;
  if (!slot_take(s, &idx)) {
    free(o);
    return 0;
  }
  o->waiting = true;
  o->head_only = b->head_only;
  o->keep_alive = c->keep_alive;
  o->slot = idx;
  defer_slot *d = &s->slots[idx];
  d->seg = o;
  d->conn = c;
  d->method = b->req->method;
  d->path_len = (uint8_t)(b->req->path_len < sizeof d->path ? b->req->path_len : sizeof d->path);
  memcpy(d->path, b->req->path, d->path_len);
  out_push(c, o);
  c->nwait++;
  conn_touch(c); /* onto the busy list: no idle deadline while waiting */
  b->ticket = (s->slots[idx].gen << SLOT_BITS) | idx;
  return b->ticket;
}

/* http_done for one answered request (status as make_response sends it). */
static void report_done(http_server *s, int method, const char *path, size_t path_len,
                        const char *peer, int status) {
  http_done d = {method, path, path_len, peer, status_valid(status) ? status : 500};
  s->done(s->user, &d);
}

static void dispatch(http_conn *c) {
  http_server *s = c->srv;
  http_request rq = {0};
  rq.method = c->parser.method;
  const char *url = c->req;
  size_t ulen = c->url_len;
  const char *hash = memchr(url, '#', ulen);
  if (hash) ulen = (size_t)(hash - url);
  const char *q = memchr(url, '?', ulen);
  rq.path = url;
  rq.path_len = q ? (size_t)(q - url) : ulen;
  if (q) {
    rq.query = q + 1;
    rq.query_len = ulen - rq.path_len - 1;
  }
  if (c->hoff[H_AUTH] != ABSENT) rq.authorization = c->req + c->hoff[H_AUTH];
  if (c->hoff[H_CTYPE] != ABSENT) rq.content_type = c->req + c->hoff[H_CTYPE];
  if (c->hoff[H_INM] != ABSENT) rq.if_none_match = c->req + c->hoff[H_INM];
  rq.body = c->req + c->body_off;
  rq.body_len = c->discard_body ? 0 : c->body_len;
  rq.peer = c->peer;
  /* A body left in the input buffer gets its NUL in the byte after it
   * (the next request's first, or the spare byte every input buffer has),
   * put back before the parser reads on. */
  char *nul = NULL, saved = 0;
  if (c->body_at) {
    nul = (char *)c->body_at + c->body_len;
    saved = *nul;
    *nul = '\0';
    rq.body = c->body_at;
  }

  resp_box b = {.req = &rq, .conn = c, .head_only = rq.method == HTTP_HEAD};
  s->handler(s->user, &rq, &b.pub);
  if (nul) *nul = saved;

  bool keep = c->keep_alive && !s->free_pending;
  const http_response *rs = &b.pub;
  if (b.ticket) { /* its place is queued; resp does not count */
    free(rs->body);
  } else {
    queue_response(c, rs->status, rs->content_type, rs->headers, rs->body, rs->body_len,
                   b.head_only, keep);
    if (s->done && !s->free_pending)
      report_done(s, rq.method, rq.path, rq.path_len, c->peer, rs->status);
  }
  if (!keep) c->closing = true;
  /* keep nothing of the request while the connection waits for the next */
  req_drop(c);
}

/* Keeps the unparsed rest of the input until output drains (with the spare
 * byte at the end that every input buffer has: see dispatch). */
static void stash_input(http_conn *c, const char *data, size_t len) {
  if (!len) return;
  c->in = malloc(len + 1);
  if (!c->in) {
    c->dead = true;
    return;
  }
  memcpy(c->in, data, len);
  c->in_len = len;
}

/* Whether more requests may be parsed: output and the answers awaited from
 * the application are under their bounds. */
static bool conn_can_parse(const http_conn *c) {
  return c->out_bytes <= OUT_HIGH && c->nwait < c->srv->lim.max_deferred;
}

/* Before the input buffer is reused: a request still coming takes its own
 * copy of what it has (out of the scratch, the body out of the input). */
static void req_keep(http_conn *c) {
  http_server *s = c->srv;
  const char *body = c->body_at;
  if (c->closing || c->dead || c->phase == PHASE_NONE) {
    req_drop(c); /* nothing more of it is parsed (or it is done) */
    return;
  }
  c->body_at = NULL;
  if (c->req_shared) {
    size_t cap = c->req_len + (body ? c->body_len : 0) + 1;
    char *own = malloc(cap);
    if (!own) {
      c->dead = true;
      return;
    }
    if (c->req_len) memcpy(own, c->req, c->req_len);
    s->scratch_lent = c->req_shared = false;
    c->req = own;
    c->req_cap = cap;
  }
  if (body && req_put(c, body, c->body_len)) c->dead = true;
}

static bool conn_feed_(http_conn *c, const char *data, size_t len);

/* Parses input and answers each complete request in turn. Returns false
 * only when the handler asked for the server to be freed. data has a spare
 * writable byte after len (see dispatch). */
static bool conn_feed(http_conn *c, const char *data, size_t len) {
  bool go_on = conn_feed_(c, data, len);
  if (go_on && (c->req_shared || c->body_at)) req_keep(c);
  return go_on;
}

static bool conn_feed_(http_conn *c, const char *data, size_t len) {
  while (len && !c->closing && !c->dead) {
    if (!conn_can_parse(c)) {
      c->throttled = true;
      stash_input(c, data, len);
      return true;
    }
    llhttp_errno_t e = llhttp_execute(&c->parser, data, len);
    if (e == HPE_OK) return true;
    if (e != HPE_PAUSED) {
      if (c->err_status == 500) /* out of memory: no room for an answer either */
        c->dead = true;
      else if (c->err_status)
        conn_fail(c, c->err_status, c->err_msg);
      else {
        char msg[160];
        const char *why = llhttp_get_error_reason(&c->parser);
        snprintf(msg, sizeof msg, "bad request: %s", why ? why : "malformed");
        conn_fail(c, 400, msg);
      }
      return true;
    }
    size_t used = (size_t)(llhttp_get_error_pos(&c->parser) - data);
    data += used;
    len -= used;
    llhttp_resume(&c->parser);
    dispatch(c);
    if (c->srv->free_pending) return false;
  }
  return true;
}

/* Moves c on after input, writability or an answer: writes, resumes
 * throttled input once output has drained (or, with answers outstanding,
 * once back under the bounds), and closes when done. Returns false when c
 * is gone or the server is being freed. */
static bool conn_run(http_conn *c) {
  for (;;) {
    if (c->dead || !conn_flush(c)) {
      conn_destroy(c);
      return false;
    }
    if (c->out_head) {
      if (!c->throttled || !c->nwait || !conn_can_parse(c)) break;
    } else if (c->closing) {
      if (c->peer_eof) {
        conn_destroy(c);
        return false;
      }
      if (!c->lingering) conn_start_linger(c);
      break;
    } else if (!c->throttled) {
      break;
    }
    c->throttled = false;
    char *buf = c->in;
    size_t n = c->in_len;
    c->in = NULL;
    c->in_len = 0;
    bool go_on = conn_feed(c, buf, n);
    free(buf);
    if (!go_on) return false;
  }
  conn_update_events(c);
  return true;
}

/* One step of a TLS handshake; a failed one costs only this connection. */
static void conn_handshake(http_conn *c) {
  int r = im_stream_handshake(c->st);
  if (r == IM_STREAM_AGAIN) {
    conn_update_events(c);
    return;
  }
  if (r < 0) {
    conn_destroy(c);
    return;
  }
  c->handshaking = false;
  conn_touch(c); /* from the handshake deadline to the idle one */
  conn_update_events(c);
}

static void conn_io(http_conn *c, short what) {
  http_server *s = c->srv;
  if (c->handshaking) {
    conn_handshake(c);
    return;
  }
  if ((what & EV_WRITE) && !conn_run(c)) return;
  if (!(what & EV_READ) || !(c->events & EV_READ)) return;
  ssize_t n = im_stream_read(c->st, s->rbuf, READ_CHUNK);
  if (n == IM_STREAM_AGAIN) return;
  if (n < 0) {
    conn_destroy(c);
    return;
  }
  if (n == 0) {
    /* the client is done sending; answers already queued still go out */
    if (c->lingering || !c->out_head) {
      conn_destroy(c);
      return;
    }
    c->peer_eof = true;
    c->closing = true;
    conn_run(c);
    return;
  }
  if (c->lingering) return;
  conn_touch(c);
  if (conn_feed(c, s->rbuf, (size_t)n)) conn_run(c);
}

static void server_destroy(http_server *s);

static void conn_io_cb(evutil_socket_t fd, short what, void *arg) {
  (void)fd;
  http_conn *c = arg;
  http_server *s = c->srv;
  srv_enter(s);
  conn_io(c, what);
  s->depth--;
  if (s->free_pending && s->depth == 0) server_destroy(s);
}

/* Serves the connections that got answers. */
static void kick_cb(evutil_socket_t fd, short what, void *arg) {
  (void)fd;
  (void)what;
  http_server *s = arg;
  srv_enter(s);
  while (s->kick_head && !s->free_pending) {
    http_conn *c = s->kick_head;
    kick_unlink(c);
    if (!c->nwait) conn_touch(c);
    conn_run(c);
  }
  s->depth--;
  if (s->free_pending && s->depth == 0) server_destroy(s);
}

int http_server_respond(http_server *s, uint64_t ticket, int status, const char *content_type,
                        char *body, size_t body_len) {
  uint64_t idx = ticket & (SLOT_MAX - 1);
  if (!s || s->free_pending || idx >= s->nslots || !s->slots[idx].seg ||
      s->slots[idx].gen != ticket >> SLOT_BITS) {
    free(body);
    return -1;
  }
  defer_slot *d = &s->slots[idx];
  http_conn *c = d->conn;
  out_seg *w = d->seg;
  if (s->done) report_done(s, d->method, d->path, d->path_len, c->peer, status);
  slot_release(s, (uint32_t)idx);
  out_seg *o = make_response(status, content_type, "", body, body_len, w->head_only,
                             w->keep_alive);
  if (o) {
    out_replace(c, w, o);
  } else {
    /* no memory for the answer: the connection goes, as for a synchronous
     * one */
    out_unlink(c, w);
    c->dead = true;
  }
  free(w);
  c->nwait--; /* the loop puts c back on the idle clock when none is left (kick_cb) */
  kick_add(c);
  return 0;
}

/* ---- listener ------------------------------------------------------------------ */

static void accept_cb(int fd, const char *peer, void *arg) {
  http_server *s = arg;
  if (s->nconns >= s->lim.max_conns) {
    close(fd);
    return;
  }
  http_conn *c = calloc(1, sizeof *c + event_get_struct_event_size());
  im_stream *st = c ? im_stream_new(fd, s->tls) : NULL;
  if (!st) {
    free(c);
    close(fd);
    return;
  }
  c->srv = s;
  c->st = st;
  snprintf(c->peer, sizeof c->peer, "%s", peer);
  llhttp_init(&c->parser, HTTP_REQUEST, &parser_settings);
  c->parser.data = c;
  s->nconns++;
  if (s->tls) {
    c->handshaking = true;
    set_deadline(c, &s->hs, im_tls_handshake_timeout(s->tls));
  } else {
    conn_touch(c);
  }
  conn_update_events(c);
  if (!c->events) conn_destroy(c);
}

/* ---- server ---------------------------------------------------------------------- */

http_server *http_server_new(struct event_base *base, const char *addr, const http_limits *lim,
                             http_handler h, void *user) {
  return http_server_new_tls(base, addr, lim, NULL, h, user);
}

http_server *http_server_new_tls(struct event_base *base, const char *addr,
                                 const http_limits *lim, im_tls *tls, http_handler h,
                                 void *user) {
  if (!base || !addr || !h) {
    errno = EINVAL;
    return NULL;
  }
  /* a bad address: the listener below fails with EINVAL */
  http_server *s = calloc(1, sizeof *s);
  if (!s) return NULL;
  s->base = base;
  s->tls = tls;
  s->handler = h;
  s->user = user;
  if (lim) s->lim = *lim;
  if (!s->lim.max_body) s->lim.max_body = HTTP_DEFAULT_MAX_BODY;
  if (!s->lim.max_header) s->lim.max_header = HTTP_DEFAULT_MAX_HEADER;
  if (!s->lim.idle_timeout_ms) s->lim.idle_timeout_ms = HTTP_DEFAULT_IDLE_TIMEOUT_MS;
  if (!s->lim.header_timeout_ms) s->lim.header_timeout_ms = HTTP_DEFAULT_HEADER_TIMEOUT_MS;
  if (!s->lim.body_timeout_ms) s->lim.body_timeout_ms = HTTP_DEFAULT_BODY_TIMEOUT_MS;
  if (!s->lim.max_conns) s->lim.max_conns = HTTP_DEFAULT_MAX_CONNS;
  s->port = -1;
  if (!s->lim.max_deferred) s->lim.max_deferred = HTTP_DEFAULT_MAX_DEFERRED;
  s->free_slot = NO_SLOT;
  s->timer = evtimer_new(base, timer_cb, s);
  s->kick = event_new(base, -1, 0, kick_cb, s);
  if (!s->timer || !s->kick) goto fail;
  s->listener = s->lim.reuseport ? im_listener_new_shared(base, addr, 1024, accept_cb, s)
                                 : im_listener_new(base, addr, 1024, accept_cb, s);
  if (!s->listener) goto fail;
  s->port = im_listener_port(s->listener);
  return s;
fail:;
  int err = errno;
  server_destroy(s);
  errno = err;
  return NULL;
}

void http_server_set_done(http_server *s, http_done_fn fn) { s->done = fn; }

int http_server_port(const http_server *s) { return s ? s->port : -1; }

static void server_destroy(http_server *s) {
  im_listener_free(s->listener);
  while (s->idle.head) conn_destroy(s->idle.head);
  while (s->linger.head) conn_destroy(s->linger.head);
  while (s->hs.head) conn_destroy(s->hs.head);
  while (s->busy.head) conn_destroy(s->busy.head);
  while (s->hdr.head) conn_destroy(s->hdr.head);
  while (s->body.head) conn_destroy(s->body.head);
  if (s->timer) event_free(s->timer);
  if (s->kick) event_free(s->kick);
  free(s->slots);
  free(s->scratch);
  free(s);
}

void http_server_free(http_server *s) {
  if (!s) return;
  if (s->depth) {
    /* inside the handler: the connection code above us still runs */
    s->free_pending = true;
    im_listener_enable(s->listener, 0);
    return;
  }
  server_destroy(s);
}
