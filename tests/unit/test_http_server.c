/* http_server tests: a real server on 127.0.0.1, port 0, its event base
 * run by a second thread; the test body is a plain blocking-socket client
 * (every recv bounded by SO_RCVTIMEO, nothing sleeps) that checks the bytes
 * on the wire. Deferred answers are given by the loop thread, on commands
 * the test sends it through a pipe (each acknowledged once carried out). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <event2/event.h>
#include <llhttp.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <poll.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "http_server.h"

#define BIG_BODY (256 * 1024)
#define MAX_PEND 256

/* ---- the server under test ------------------------------------------------ */

/* A deferred request, to be answered with status and body. */
typedef struct pend {
  uint64_t ticket;
  int status;
  const char *ctype;
  char body[64];
} pend;

typedef struct seen {
  pthread_mutex_t mu;
  pthread_cond_t cv; /* on every request and every command done */
  int requests;
  int peer_changes;
  char peer[64];
  char auth[256];
  bool auth_null;
  char ctype[128];
  bool ctype_null;
  char path[256];
  char query[256];
  bool query_null;
  int method;
  /* deferred requests not answered yet, in arrival order */
  pend pend[MAX_PEND];
  int npend;
  unsigned bound;  /* a deferring request that finds this many pending */
  int violations; /* counts here */
  int errors;     /* what the loop thread found wrong */
  int rc[MAX_PEND]; /* what http_server_respond returned, last command */
  int nrc;
  int now_rc[2]; /* the two answers given from inside the handler */
  uint64_t last_ticket;
  int acks; /* commands carried out */
} seen;

typedef struct fixture {
  struct event_base *base;
  http_server *srv;
  struct event *stop_ev;
  int stop_pipe[2];
  struct event *ctl_ev;   /* commands from the test */
  int ctl_pipe[2];
  struct event *later_ev; /* answers /later requests */
  pthread_t loop;
  bool running;
  int port;
  seen seen;
} fixture;

static fixture *current;

static char *dup_mem(const char *p, size_t n) {
  char *d = malloc(n + 1);
  if (!d) return NULL;
  memcpy(d, p, n);
  d[n] = '\0';
  return d;
}

static void copy_str(char *dst, size_t cap, const char *p, size_t n) {
  if (n >= cap) n = cap - 1;
  memcpy(dst, p, n);
  dst[n] = '\0';
}

static bool path_is(const http_request *rq, const char *p) {
  return rq->path_len == strlen(p) && memcmp(rq->path, p, rq->path_len) == 0;
}

static bool has_prefix(const http_request *rq, const char *p) {
  return rq->path_len > strlen(p) && memcmp(rq->path, p, strlen(p)) == 0;
}

/* Deferring routes, with TEXT the query:
 *   /defer/N?TEXT       deferred; answered on command with status N, body TEXT
 *   /defer-crlf/N?TEXT  likewise, with a content type holding CR LF
 *   /later/N?TEXT       likewise, answered by a timer 50 ms on
 *   /now/N?TEXT         deferred and answered (twice) inside the handler
 * Returns false for other paths. Called with s->mu held. */
static bool defer_route(fixture *f, const http_request *rq, http_response *rs) {
  seen *s = &f->seen;
  const char *ctype = "text/plain";
  size_t k;
  if (has_prefix(rq, "/defer/"))
    k = 7;
  else if (has_prefix(rq, "/later/"))
    k = 7;
  else if (has_prefix(rq, "/now/"))
    k = 5;
  else if (has_prefix(rq, "/defer-crlf/")) {
    k = 12;
    ctype = "text/plain\r\nX-Injected: 1";
  } else
    return false;
  int status = atoi(rq->path + k);
  if (s->bound && (unsigned)s->npend >= s->bound) s->violations++;
  /* no cmocka asserts on the loop thread: errors are counted, and
   * teardown fails the test if any */
  uint64_t t = http_response_defer(rs);
  if (!t || http_response_defer(rs) != t) s->errors++; /* same ticket again */
  s->last_ticket = t;
  /* ignored once deferred, and freed */
  rs->status = 204;
  rs->body = dup_mem("ignored", 7);
  rs->body_len = 7;
  if (has_prefix(rq, "/now/")) {
    s->now_rc[0] = http_server_respond(f->srv, t, status, ctype,
                                       dup_mem(rq->query ? rq->query : "", rq->query_len),
                                       rq->query_len);
    s->now_rc[1] = http_server_respond(f->srv, t, 200, NULL, dup_mem("again", 5), 5);
    return true;
  }
  if (s->npend == MAX_PEND) {
    s->errors++;
    return true;
  }
  pend *p = &s->pend[s->npend++];
  p->ticket = t;
  p->status = status;
  p->ctype = ctype;
  copy_str(p->body, sizeof p->body, rq->query ? rq->query : "", rq->query_len);
  if (has_prefix(rq, "/later/")) {
    struct timeval tv = {0, 50 * 1000};
    evtimer_add(f->later_ev, &tv);
  }
  return true;
}

/* Routes:
 *   /echo        200 text/plain, body = request body
 *   /status/N    status N, body "{}"
 *   /big?C       200, BIG_BODY bytes of the character C
 *   /noct        200, no body, no content type set
 *   /hdrs?V      200, extra headers of variant V (ok, nocrlf, nocolon, bare-lf,
 *                space-name, 304), body = the If-None-Match value or "-"
 *   /quit        frees the server from inside the handler
 *   deferring    see defer_route
 *   anything     200 {"ok":true}
 */
static void handler(void *user, const http_request *rq, http_response *rs) {
  fixture *f = user;
  seen *s = &f->seen;
  pthread_mutex_lock(&s->mu);
  s->requests++;
  pthread_cond_broadcast(&s->cv);
  if (strcmp(s->peer, rq->peer) != 0) s->peer_changes++;
  snprintf(s->peer, sizeof s->peer, "%s", rq->peer);
  s->auth_null = rq->authorization == NULL;
  snprintf(s->auth, sizeof s->auth, "%s", rq->authorization ? rq->authorization : "");
  s->ctype_null = rq->content_type == NULL;
  snprintf(s->ctype, sizeof s->ctype, "%s", rq->content_type ? rq->content_type : "");
  copy_str(s->path, sizeof s->path, rq->path, rq->path_len);
  s->query_null = rq->query == NULL;
  copy_str(s->query, sizeof s->query, rq->query ? rq->query : "", rq->query_len);
  s->method = rq->method;
  bool deferred = defer_route(f, rq, rs);
  pthread_mutex_unlock(&s->mu);

  if (deferred) {
    /* answered later */
  } else if (path_is(rq, "/echo")) {
    rs->status = 200;
    rs->content_type = "text/plain";
    rs->body = dup_mem(rq->body, rq->body_len);
    rs->body_len = rq->body_len;
    /* the copy must be NUL-terminated for handlers that parse it as text */
    if (rq->body[rq->body_len] != '\0') rs->status = 599;
  } else if (rq->path_len > 8 && memcmp(rq->path, "/status/", 8) == 0) {
    rs->status = atoi(rq->path + 8);
    rs->body = dup_mem("{}", 2);
    rs->body_len = 2;
  } else if (path_is(rq, "/big")) {
    rs->status = 200;
    rs->content_type = "application/octet-stream";
    rs->body = malloc(BIG_BODY);
    if (rs->body) {
      memset(rs->body, rq->query_len ? rq->query[0] : 'x', BIG_BODY);
      rs->body_len = BIG_BODY;
    }
  } else if (path_is(rq, "/noct")) {
    rs->status = 200;
  } else if (path_is(rq, "/hdrs")) {
    static const char *const variants[][2] = {
        {"ok", "ETag: \"1-2\"\r\nCache-Control: no-cache\r\n"},
        {"304", "ETag: \"1-2\"\r\n"},
        {"nocrlf", "ETag: \"1\"\r\nX-Evil: 1"},
        {"nocolon", "ETag: \"1\"\r\nX-Evil\r\n"},
        {"bare-lf", "ETag: \"1\"\nX-Evil: 1\r\n"},
        {"space-name", "X Evil: 1\r\n"},
    };
    rs->status = 200;
    for (size_t i = 0; i < sizeof variants / sizeof variants[0]; i++)
      if (rq->query_len == strlen(variants[i][0]) &&
          !memcmp(rq->query, variants[i][0], rq->query_len)) {
        snprintf(rs->headers, sizeof rs->headers, "%s", variants[i][1]);
        if (i == 1) rs->status = 304;
      }
    const char *inm = rq->if_none_match ? rq->if_none_match : "-";
    rs->body = dup_mem(inm, strlen(inm));
    rs->body_len = strlen(inm);
  } else if (path_is(rq, "/quit")) {
    http_server_free(f->srv);
    f->srv = NULL;
    rs->status = 200;
  } else {
    rs->status = 200;
    rs->body = dup_mem("{\"ok\":true}", 11);
    rs->body_len = 11;
  }
}

static void stop_cb(evutil_socket_t fd, short what, void *arg) {
  (void)fd;
  (void)what;
  event_base_loopbreak(arg);
}

/* Answers every pending request, oldest first or newest first, recording
 * what http_server_respond returned. Loop thread only. */
static void answer_all(fixture *f, bool newest_first) {
  seen *s = &f->seen;
  pthread_mutex_lock(&s->mu);
  s->nrc = s->npend;
  for (int i = 0; i < s->npend; i++) {
    pend *p = &s->pend[newest_first ? s->npend - 1 - i : i];
    size_t n = strlen(p->body);
    /* respond never calls back into the handler, so the lock may be held */
    s->rc[i] = http_server_respond(f->srv, p->ticket, p->status, p->ctype, dup_mem(p->body, n), n);
  }
  s->npend = 0;
  pthread_mutex_unlock(&s->mu);
}

static void later_cb(evutil_socket_t fd, short what, void *arg) {
  (void)fd;
  (void)what;
  answer_all(arg, false);
}

/* Answers the newest pending request only. Loop thread only. */
static void answer_newest(fixture *f) {
  seen *s = &f->seen;
  pthread_mutex_lock(&s->mu);
  s->nrc = 0;
  if (s->npend) {
    pend *p = &s->pend[--s->npend];
    size_t n = strlen(p->body);
    s->rc[s->nrc++] =
        http_server_respond(f->srv, p->ticket, p->status, p->ctype, dup_mem(p->body, n), n);
  }
  pthread_mutex_unlock(&s->mu);
}

/* Commands: 'p' nothing (a round trip through the loop), 'a' answer all
 * oldest first, 'r' newest first, 'n' answer the newest only, 'f' free the
 * server. */
static void ctl_cb(evutil_socket_t fd, short what, void *arg) {
  (void)what;
  fixture *f = arg;
  char cmd;
  if (read(fd, &cmd, 1) != 1) return;
  if (cmd == 'a' || cmd == 'r') answer_all(f, cmd == 'r');
  if (cmd == 'n') answer_newest(f);
  if (cmd == 'f') {
    http_server_free(f->srv);
    f->srv = NULL;
  }
  pthread_mutex_lock(&f->seen.mu);
  f->seen.acks++;
  pthread_cond_broadcast(&f->seen.cv);
  pthread_mutex_unlock(&f->seen.mu);
}

static void *loop_main(void *arg) {
  fixture *f = arg;
  event_base_dispatch(f->base);
  return NULL;
}

/* Returns false, with nothing started, when addr cannot be bound. */
static bool start_at(const char *addr, const http_limits *lim) {
  fixture *f = current;
  f->base = event_base_new();
  assert_non_null(f->base);
  f->srv = http_server_new(f->base, addr, lim, handler, f);
  if (!f->srv) return false;
  f->port = http_server_port(f->srv);
  assert_true(f->port > 0);
  assert_int_equal(pipe(f->stop_pipe), 0);
  f->stop_ev = event_new(f->base, f->stop_pipe[0], EV_READ, stop_cb, f->base);
  assert_non_null(f->stop_ev);
  assert_int_equal(event_add(f->stop_ev, NULL), 0);
  assert_int_equal(pipe(f->ctl_pipe), 0);
  f->ctl_ev = event_new(f->base, f->ctl_pipe[0], EV_READ | EV_PERSIST, ctl_cb, f);
  assert_non_null(f->ctl_ev);
  assert_int_equal(event_add(f->ctl_ev, NULL), 0);
  f->later_ev = evtimer_new(f->base, later_cb, f);
  assert_non_null(f->later_ev);
  /* from here on only the loop thread touches the base, until teardown */
  assert_int_equal(pthread_create(&f->loop, NULL, loop_main, f), 0);
  f->running = true;
  return true;
}

static void start(const http_limits *lim) { assert_true(start_at("127.0.0.1:0", lim)); }

static int setup(void **state) {
  fixture *f = calloc(1, sizeof *f);
  if (!f) return -1;
  pthread_mutex_init(&f->seen.mu, NULL);
  pthread_cond_init(&f->seen.cv, NULL);
  f->stop_pipe[0] = f->stop_pipe[1] = -1;
  f->ctl_pipe[0] = f->ctl_pipe[1] = -1;
  current = f;
  *state = f;
  return 0;
}

static int teardown(void **state) {
  fixture *f = *state;
  if (f->running) {
    ssize_t w = write(f->stop_pipe[1], "x", 1);
    (void)w;
    pthread_join(f->loop, NULL);
  }
  /* tickets still pending are voided here; the fixture just drops them */
  http_server_free(f->srv);
  if (f->stop_ev) event_free(f->stop_ev);
  if (f->ctl_ev) event_free(f->ctl_ev);
  if (f->later_ev) event_free(f->later_ev);
  if (f->stop_pipe[0] >= 0) close(f->stop_pipe[0]);
  if (f->stop_pipe[1] >= 0) close(f->stop_pipe[1]);
  if (f->ctl_pipe[0] >= 0) close(f->ctl_pipe[0]);
  if (f->ctl_pipe[1] >= 0) close(f->ctl_pipe[1]);
  if (f->base) event_base_free(f->base);
  pthread_cond_destroy(&f->seen.cv);
  pthread_mutex_destroy(&f->seen.mu);
  int errors = f->seen.errors;
  free(f);
  current = NULL;
  if (errors) fprintf(stderr, "%d errors on the loop thread\n", errors);
  return errors ? -1 : 0;
}

static seen snapshot(void) {
  seen s;
  pthread_mutex_lock(&current->seen.mu);
  s = current->seen;
  pthread_mutex_unlock(&current->seen.mu);
  return s;
}

static void deadline_in(struct timespec *ts, int sec) {
  clock_gettime(CLOCK_REALTIME, ts);
  ts->tv_sec += sec;
}

/* Waits (5 s at most) until the handler has seen n requests in all. */
static void wait_requests(int n) {
  seen *s = &current->seen;
  struct timespec ts;
  deadline_in(&ts, 5);
  pthread_mutex_lock(&s->mu);
  while (s->requests < n)
    if (pthread_cond_timedwait(&s->cv, &s->mu, &ts) != 0) break;
  int got = s->requests;
  pthread_mutex_unlock(&s->mu);
  if (got < n) fail_msg("%d requests seen, waited for %d", got, n);
}

/* Has the loop thread carry out cmd (see ctl_cb) and waits until it has.
 * Every callback the loop was running, or had ready, when cmd was sent has
 * returned by then. */
static void cmd(char c) {
  fixture *f = current;
  seen *s = &f->seen;
  pthread_mutex_lock(&s->mu);
  int want = s->acks + 1;
  pthread_mutex_unlock(&s->mu);
  assert_int_equal(write(f->ctl_pipe[1], &c, 1), 1);
  struct timespec ts;
  deadline_in(&ts, 5);
  pthread_mutex_lock(&s->mu);
  while (s->acks < want)
    if (pthread_cond_timedwait(&s->cv, &s->mu, &ts) != 0) break;
  int got = s->acks;
  pthread_mutex_unlock(&s->mu);
  if (got < want) fail_msg("command %c not carried out", c);
}

/* ---- a blocking client -------------------------------------------------------- */

typedef struct client {
  int fd;
  char *buf; /* received, not yet consumed */
  size_t len, cap;
} client;

typedef struct response {
  int status;
  char reason[64];
  char ctype[128];
  char connection[32];
  bool has_length;
  size_t length;
  char *body;
  size_t body_len;
  char head[1024];  /* the status line and headers, cut to fit */
} response;

static client cli_open(void) {
  client c = {0};
  c.fd = socket(AF_INET, SOCK_STREAM, 0);
  assert_true(c.fd >= 0);
  struct timeval tv = {5, 0};
  setsockopt(c.fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  setsockopt(c.fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  int one = 1;
  setsockopt(c.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  struct sockaddr_in sa = {0};
  sa.sin_family = AF_INET;
  sa.sin_port = htons((uint16_t)current->port);
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  assert_int_equal(connect(c.fd, (struct sockaddr *)&sa, sizeof sa), 0);
  return c;
}

static void cli_close(client *c) {
  if (c->fd >= 0) close(c->fd);
  c->fd = -1;
  free(c->buf);
  c->buf = NULL;
  c->len = c->cap = 0;
}

static void cli_send(client *c, const void *p, size_t n) {
  const char *b = p;
  while (n) {
    ssize_t w = send(c->fd, b, n, MSG_NOSIGNAL);
    assert_true(w > 0);
    b += w;
    n -= (size_t)w;
  }
}

static void cli_sends(client *c, const char *s) { cli_send(c, s, strlen(s)); }

/* Reads more; returns what recv returned (0 at EOF). */
static ssize_t cli_fill(client *c) {
  if (c->cap - c->len < 65536) {
    c->cap = c->cap * 2 + 65536;
    c->buf = realloc(c->buf, c->cap);
    assert_non_null(c->buf);
  }
  ssize_t n = recv(c->fd, c->buf + c->len, c->cap - c->len, 0);
  if (n > 0) c->len += (size_t)n;
  return n;
}

static void cli_consume(client *c, size_t n) {
  memmove(c->buf, c->buf + n, c->len - n);
  c->len -= n;
}

static const char *find_crlf2(const client *c) {
  for (size_t i = 0; i + 3 < c->len; i++)
    if (memcmp(c->buf + i, "\r\n\r\n", 4) == 0) return c->buf + i;
  return NULL;
}

static void header_value(const char *head, const char *name, char *out, size_t cap) {
  out[0] = '\0';
  size_t nl = strlen(name);
  for (const char *line = strstr(head, "\r\n"); line && line[2]; line = strstr(line + 2, "\r\n")) {
    const char *l = line + 2;
    if (strncasecmp(l, name, nl) == 0 && l[nl] == ':') {
      const char *v = l + nl + 1;
      while (*v == ' ') v++;
      const char *e = strstr(v, "\r\n");
      copy_str(out, cap, v, e ? (size_t)(e - v) : strlen(v));
      return;
    }
  }
}

/* Reads one response; with head_only, its body is not expected. */
static response cli_read_ex(client *c, bool head_only) {
  response r = {0};
  const char *end;
  while (!(end = find_crlf2(c))) assert_true(cli_fill(c) > 0);
  size_t hlen = (size_t)(end - c->buf) + 4;
  char *head = dup_mem(c->buf, hlen);
  assert_non_null(head);
  assert_int_equal(strncmp(head, "HTTP/1.1 ", 9), 0);
  r.status = atoi(head + 9);
  const char *sp = strchr(head + 9, ' ');
  assert_non_null(sp);
  const char *eol = strstr(sp, "\r\n");
  copy_str(r.reason, sizeof r.reason, sp + 1, (size_t)(eol - sp - 1));
  copy_str(r.head, sizeof r.head, head, hlen);
  header_value(head, "Content-Type", r.ctype, sizeof r.ctype);
  header_value(head, "Connection", r.connection, sizeof r.connection);
  char cl[32];
  header_value(head, "Content-Length", cl, sizeof cl);
  r.has_length = cl[0] != '\0';
  r.length = r.has_length ? strtoul(cl, NULL, 10) : 0;
  free(head);
  cli_consume(c, hlen);
  r.body_len = head_only ? 0 : r.length;
  while (c->len < r.body_len) assert_true(cli_fill(c) > 0);
  r.body = dup_mem(c->buf, r.body_len);
  assert_non_null(r.body);
  cli_consume(c, r.body_len);
  return r;
}

static response cli_read(client *c) { return cli_read_ex(c, false); }

static void resp_free(response *r) {
  free(r->body);
  r->body = NULL;
}

/* Nothing has arrived, and the connection is still open. */
static void cli_expect_nothing(client *c) {
  assert_int_equal(c->len, 0);
  char b;
  ssize_t n = recv(c->fd, &b, 1, MSG_DONTWAIT);
  if (n >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK))
    fail_msg("expected nothing, recv returned %zd (errno %d)", n, errno);
}

/* Closes with a reset, as a client that crashed or gave up. */
static void cli_abort(client *c) {
  struct linger lg = {1, 0};
  setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
  cli_close(c);
}

/* The server closed (or shut down) its side and sent nothing more. */
static void cli_expect_eof(client *c) {
  assert_int_equal(c->len, 0);
  ssize_t n = cli_fill(c);
  if (n != 0) fail_msg("expected EOF, recv returned %zd (errno %d)", n, errno);
}

static void expect_json_error(client *c, int status, const char *prefix) {
  response r = cli_read(c);
  assert_int_equal(r.status, status);
  assert_string_equal(r.ctype, "application/json");
  assert_string_equal(r.connection, "close");
  assert_true(r.has_length);
  char want[128];
  snprintf(want, sizeof want, "{\"error\":\"%s", prefix);
  if (strncmp(r.body, want, strlen(want)) != 0) fail_msg("body %s, wanted prefix %s", r.body, want);
  assert_int_equal(r.body[r.body_len - 1], '}');
  resp_free(&r);
  cli_expect_eof(c);
}

static const char *GET_ROOT = "GET / HTTP/1.1\r\nHost: t\r\n\r\n";

/* ---- tests ------------------------------------------------------------------- */

static void test_simple_get(void **state) {
  (void)state;
  start(NULL);
  client c = cli_open();
  cli_sends(&c, "GET /status/201?a=1&b=2 HTTP/1.1\r\nHost: t\r\n\r\n");
  response r = cli_read(&c);
  assert_int_equal(r.status, 201);
  assert_string_equal(r.reason, "Created");
  assert_string_equal(r.ctype, "application/json");
  assert_string_equal(r.connection, "keep-alive");
  assert_true(r.has_length);
  assert_string_equal(r.body, "{}");
  resp_free(&r);
  seen s = snapshot();
  assert_int_equal(s.method, HTTP_GET);
  assert_string_equal(s.path, "/status/201");
  assert_false(s.query_null);
  assert_string_equal(s.query, "a=1&b=2");
  assert_true(s.auth_null);
  assert_true(s.ctype_null);
  char local[64];
  struct sockaddr_in sa;
  socklen_t sl = sizeof sa;
  getsockname(c.fd, (struct sockaddr *)&sa, &sl);
  snprintf(local, sizeof local, "127.0.0.1:%u", (unsigned)ntohs(sa.sin_port));
  assert_string_equal(s.peer, local);

  cli_sends(&c, GET_ROOT);
  r = cli_read(&c);
  assert_int_equal(r.status, 200);
  assert_string_equal(r.body, "{\"ok\":true}");
  assert_true(snapshot().query_null);
  resp_free(&r);
  cli_close(&c);
}

static void test_status_handling(void **state) {
  (void)state;
  start(NULL);
  client c = cli_open();
  cli_sends(&c, "GET /status/404 HTTP/1.1\r\n\r\n");
  response r = cli_read(&c);
  assert_int_equal(r.status, 404);
  assert_string_equal(r.reason, "Not Found");
  resp_free(&r);
  /* 204 carries neither a body nor Content-Length */
  cli_sends(&c, "GET /status/204 HTTP/1.1\r\n\r\n");
  r = cli_read(&c);
  assert_int_equal(r.status, 204);
  assert_false(r.has_length);
  assert_string_equal(r.connection, "keep-alive");
  resp_free(&r);
  /* a status outside 200..599 is the handler's bug: 500 */
  cli_sends(&c, "GET /status/42 HTTP/1.1\r\n\r\n");
  r = cli_read(&c);
  assert_int_equal(r.status, 500);
  assert_string_equal(r.body, "{\"error\":\"internal error\"}");
  resp_free(&r);
  cli_sends(&c, "GET /status/599 HTTP/1.1\r\n\r\n");
  r = cli_read(&c);
  assert_int_equal(r.status, 599);
  assert_string_equal(r.reason, "Server Error");
  resp_free(&r);
  /* no body and no content type: the defaults */
  cli_sends(&c, "GET /noct HTTP/1.1\r\n\r\n");
  r = cli_read(&c);
  assert_int_equal(r.status, 200);
  assert_string_equal(r.ctype, "application/json");
  assert_true(r.has_length);
  assert_int_equal(r.length, 0);
  resp_free(&r);
  cli_close(&c);
}

static void test_post_body(void **state) {
  (void)state;
  start(NULL);
  client c = cli_open();
  size_t n = 300 * 1000;
  char *body = malloc(n);
  assert_non_null(body);
  for (size_t i = 0; i < n; i++) body[i] = (char)(i * 7 + 3); /* NULs included */
  char head[256];
  snprintf(head, sizeof head,
           "POST /echo HTTP/1.1\r\nContent-Type: application/octet-stream\r\n"
           "Content-Length: %zu\r\n\r\n",
           n);
  cli_sends(&c, head);
  cli_send(&c, body, n);
  response r = cli_read(&c);
  assert_int_equal(r.status, 200);
  assert_string_equal(r.ctype, "text/plain");
  assert_int_equal(r.body_len, n);
  assert_memory_equal(r.body, body, n);
  resp_free(&r);
  seen s = snapshot();
  assert_int_equal(s.method, HTTP_POST);
  assert_string_equal(s.ctype, "application/octet-stream");
  free(body);
  cli_close(&c);
}

static void test_pipelined(void **state) {
  (void)state;
  start(NULL);
  client c = cli_open();
  cli_sends(&c, "GET /status/201 HTTP/1.1\r\n\r\nGET /status/202 HTTP/1.1\r\n\r\n");
  for (int st = 201; st <= 202; st++) {
    response r = cli_read(&c);
    assert_int_equal(r.status, st);
    resp_free(&r);
  }
  cli_sends(&c,
            "POST /echo HTTP/1.1\r\nContent-Length: 3\r\n\r\none"
            "GET /status/404 HTTP/1.1\r\n\r\n"
            "POST /echo HTTP/1.1\r\nContent-Length: 5\r\n\r\nthree");
  response r = cli_read(&c);
  assert_string_equal(r.body, "one");
  resp_free(&r);
  r = cli_read(&c);
  assert_int_equal(r.status, 404);
  resp_free(&r);
  r = cli_read(&c);
  assert_string_equal(r.body, "three");
  resp_free(&r);
  assert_int_equal(snapshot().requests, 5);
  cli_close(&c);
}

/* The next response on c is /echo's 200 with body want (599: the body the
 * handler got had no NUL after it). */
static void expect_echo(client *c, const char *want) {
  response r = cli_read(c);
  assert_int_equal(r.status, 200);
  assert_string_equal(r.body, want);
  resp_free(&r);
}

/* Requests that arrive in pieces on two connections while a third sends
 * whole ones: what each partial one read before the others ran (target,
 * headers, the start of its body) is still its own when it completes (the
 * server gathers a request that arrives whole in one shared buffer, and a
 * body that arrives whole stays in the input). */
static void test_interleaved_partial_requests(void **state) {
  (void)state;
  start(NULL);
  client a = cli_open(), h = cli_open(), b = cli_open();
  /* a: head and half its body; h: its head only */
  cli_sends(&a,
            "POST /echo?a HTTP/1.1\r\nAuthorization: Bearer aaa\r\n"
            "Content-Type: text/a\r\nContent-Length: 10\r\n\r\nhello");
  cli_sends(&h, "POST /echo?h HTTP/1.1\r\nAuthorization: Bearer hhh\r\nContent-Length: 4\r\n\r\n");
  for (int i = 0; i < 2; i++) { /* b: whole requests, answered in between */
    cli_sends(&b,
              "POST /echo?b HTTP/1.1\r\nAuthorization: Bearer bbb\r\n"
              "Content-Type: text/b\r\nContent-Length: 3\r\n\r\nbee");
    expect_echo(&b, "bee");
    seen s = snapshot();
    assert_string_equal(s.auth, "Bearer bbb");
    assert_string_equal(s.query, "b");
  }
  cli_sends(&h, "body");
  expect_echo(&h, "body");
  seen s = snapshot();
  assert_string_equal(s.auth, "Bearer hhh");
  assert_true(s.ctype_null);
  assert_string_equal(s.query, "h");
  cli_sends(&a, "world");
  expect_echo(&a, "helloworld");
  s = snapshot();
  assert_string_equal(s.auth, "Bearer aaa");
  assert_string_equal(s.ctype, "text/a");
  assert_string_equal(s.path, "/echo");
  assert_string_equal(s.query, "a");
  assert_int_equal(s.requests, 4);
  cli_close(&a);
  cli_close(&h);
  cli_close(&b);
}

static void test_byte_by_byte(void **state) {
  (void)state;
  start(NULL);
  client c = cli_open();
  const char *req =
      "POST /echo?q HTTP/1.1\r\nAuthorization: Basic Zm9vOmJhcg==\r\n"
      "Content-Type: text/x-split\r\nContent-Length: 11\r\n\r\nhello world";
  for (const char *p = req; *p; p++) cli_send(&c, p, 1);
  response r = cli_read(&c);
  assert_int_equal(r.status, 200);
  assert_string_equal(r.body, "hello world");
  resp_free(&r);
  seen s = snapshot();
  assert_string_equal(s.auth, "Basic Zm9vOmJhcg==");
  assert_string_equal(s.ctype, "text/x-split");
  assert_string_equal(s.path, "/echo");
  assert_string_equal(s.query, "q");
  cli_close(&c);
}

static void test_chunked(void **state) {
  (void)state;
  start(NULL);
  client c = cli_open();
  cli_sends(&c,
            "POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            "5\r\nhello\r\n1;ext=1\r\n \r\n");
  cli_sends(&c, "5\r\nworld\r\n0\r\nX-Trailer: t\r\nContent-Type: trailing\r\n\r\n");
  response r = cli_read(&c);
  assert_int_equal(r.status, 200);
  assert_string_equal(r.body, "hello world");
  resp_free(&r);
  /* trailers are not headers */
  assert_true(snapshot().ctype_null);
  cli_sends(&c, GET_ROOT);
  r = cli_read(&c);
  assert_int_equal(r.status, 200);
  resp_free(&r);
  cli_close(&c);
}

static void test_keepalive_100(void **state) {
  (void)state;
  start(NULL);
  client c = cli_open();
  for (int i = 0; i < 100; i++) {
    char req[128];
    snprintf(req, sizeof req, "POST /echo HTTP/1.1\r\nContent-Length: %d\r\n\r\n%03d",
             3, i);
    cli_sends(&c, req);
    response r = cli_read(&c);
    assert_int_equal(r.status, 200);
    assert_string_equal(r.connection, "keep-alive");
    char want[8];
    snprintf(want, sizeof want, "%03d", i);
    assert_string_equal(r.body, want);
    resp_free(&r);
  }
  seen s = snapshot();
  assert_int_equal(s.requests, 100);
  assert_int_equal(s.peer_changes, 1);
  cli_close(&c);
}

static void test_connection_close(void **state) {
  (void)state;
  start(NULL);
  client c = cli_open();
  /* the second request comes after "close" and must be ignored */
  cli_sends(&c,
            "GET /status/202 HTTP/1.1\r\nConnection: close\r\n\r\n"
            "GET /status/203 HTTP/1.1\r\n\r\n");
  response r = cli_read(&c);
  assert_int_equal(r.status, 202);
  assert_string_equal(r.connection, "close");
  resp_free(&r);
  cli_expect_eof(&c);
  assert_int_equal(snapshot().requests, 1);
  cli_close(&c);
}

static void test_http10(void **state) {
  (void)state;
  start(NULL);
  client c = cli_open();
  cli_sends(&c, "GET /status/200 HTTP/1.0\r\n\r\n");
  response r = cli_read(&c);
  assert_int_equal(r.status, 200);
  assert_string_equal(r.connection, "close");
  resp_free(&r);
  cli_expect_eof(&c);
  cli_close(&c);

  c = cli_open();
  for (int i = 0; i < 2; i++) {
    cli_sends(&c, "GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    r = cli_read(&c);
    assert_int_equal(r.status, 200);
    assert_string_equal(r.connection, "keep-alive");
    resp_free(&r);
  }
  cli_close(&c);
}

static void test_malformed(void **state) {
  (void)state;
  start(NULL);
  client c = cli_open();
  cli_sends(&c, "BREW /pot HTTP/1.1\r\n\r\n");
  expect_json_error(&c, 400, "bad request: ");
  cli_close(&c);

  c = cli_open();
  cli_sends(&c, "GET / HTTP/1.1\r\nBad Header: x\r\n\r\n");
  expect_json_error(&c, 400, "bad request: invalid character in header name");
  cli_close(&c);

  c = cli_open();
  cli_sends(&c, "POST /echo HTTP/1.1\r\nContent-Length : 3\r\n\r\nabc");
  expect_json_error(&c, 400, "bad request: ");
  cli_close(&c);

  c = cli_open();
  cli_sends(&c, "POST /echo HTTP/1.1\r\nContent-Length: 3x\r\n\r\nabc");
  expect_json_error(&c, 400, "bad request: Invalid character in Content-Length");
  cli_close(&c);

  /* both framings at once is how requests get smuggled */
  c = cli_open();
  cli_sends(&c,
            "POST /echo HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
            "0\r\n\r\n");
  expect_json_error(&c, 400, "bad request: ");
  cli_close(&c);

  /* the good request before the bad one is still answered, in order */
  c = cli_open();
  cli_sends(&c, "GET /status/202 HTTP/1.1\r\n\r\nGET / HTTP/9.9\r\n\r\n");
  response r = cli_read(&c);
  assert_int_equal(r.status, 202);
  resp_free(&r);
  expect_json_error(&c, 400, "bad request: ");
  cli_close(&c);
  assert_int_equal(snapshot().requests, 1);
}

static void test_body_too_large(void **state) {
  (void)state;
  start(NULL);
  client c = cli_open();
  cli_sends(&c, "POST /echo HTTP/1.1\r\nContent-Length: 1048577\r\n\r\n");
  expect_json_error(&c, 413, "request body too large");
  cli_close(&c);

  /* with 100-continue: refused, and no 100 before the refusal */
  c = cli_open();
  cli_sends(&c, "PUT /echo HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 99999999\r\n\r\n");
  expect_json_error(&c, 413, "request body too large");
  cli_close(&c);

  /* exactly the limit is fine */
  c = cli_open();
  size_t n = HTTP_DEFAULT_MAX_BODY;
  char *body = calloc(1, n);
  assert_non_null(body);
  cli_sends(&c, "POST /echo HTTP/1.1\r\nContent-Length: 1048576\r\n\r\n");
  cli_send(&c, body, n);
  response r = cli_read(&c);
  assert_int_equal(r.status, 200);
  assert_int_equal(r.body_len, n);
  resp_free(&r);
  free(body);
  cli_close(&c);
  assert_int_equal(snapshot().requests, 1);
}

static void test_chunked_too_large(void **state) {
  (void)state;
  http_limits lim = {.max_body = 1000};
  start(&lim);
  /* one chunk that announces more than the limit: refused from its header */
  client c = cli_open();
  cli_sends(&c, "POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n7d1\r\n");
  expect_json_error(&c, 413, "request body too large");
  cli_close(&c);

  /* many small chunks that add up past it */
  c = cli_open();
  cli_sends(&c, "POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
  char chunk[128];
  memset(chunk, 'a', sizeof chunk);
  for (int i = 0; i < 7; i++) {
    cli_sends(&c, "64\r\n");
    cli_send(&c, chunk, 100);
    cli_sends(&c, "\r\n");
  }
  cli_sends(&c, "12d\r\n"); /* 700 + 301 > 1000 */
  expect_json_error(&c, 413, "request body too large");
  cli_close(&c);
  assert_int_equal(snapshot().requests, 0);
}

static void test_headers_too_large(void **state) {
  (void)state;
  start(NULL);
  client c = cli_open();
  /* far more than the server reads before refusing: the lingering close
   * must keep the unread rest from resetting the connection */
  static const char line[] = "GET / HTTP/1.1\r\nX-Big: ";
  size_t k = sizeof line - 1, n = 256 * 1024;
  char *big = malloc(k + n + 4);
  assert_non_null(big);
  memcpy(big, line, k);
  memset(big + k, 'a', n);
  memcpy(big + k + n, "\r\n\r\n", 4);
  cli_send(&c, big, k + n + 4);
  expect_json_error(&c, 431, "request header fields too large");
  cli_close(&c);

  /* many small headers count too */
  c = cli_open();
  cli_sends(&c, "GET / HTTP/1.1\r\n");
  for (int i = 0; i < 3000; i++) cli_sends(&c, "X-A: b\r\n");
  cli_sends(&c, "\r\n");
  expect_json_error(&c, 431, "request header fields too large");
  cli_close(&c);

  /* just under the limit passes */
  c = cli_open();
  memset(big + k, 'a', 15000);
  memcpy(big + k + 15000, "\r\n\r\n", 4);
  cli_send(&c, big, k + 15000 + 4);
  response r = cli_read(&c);
  assert_int_equal(r.status, 200);
  resp_free(&r);
  cli_close(&c);
  free(big);
}

static void test_authorization(void **state) {
  (void)state;
  start(NULL);
  client c = cli_open();
  cli_sends(&c,
            "GET / HTTP/1.1\r\nX-Other: 1\r\nauthorization:   Bearer abc.def  \r\n"
            "CONTENT-TYPE: application/json; charset=utf-8\r\n\r\n");
  response r = cli_read(&c);
  assert_int_equal(r.status, 200);
  resp_free(&r);
  seen s = snapshot();
  assert_false(s.auth_null);
  assert_string_equal(s.auth, "Bearer abc.def");
  assert_string_equal(s.ctype, "application/json; charset=utf-8");
  /* the next request on the connection starts clean */
  cli_sends(&c, GET_ROOT);
  r = cli_read(&c);
  resp_free(&r);
  s = snapshot();
  assert_true(s.auth_null);
  assert_true(s.ctype_null);
  cli_close(&c);

  c = cli_open();
  cli_sends(&c, "GET / HTTP/1.1\r\nAuthorization: Bearer a\r\nAuthorization: Bearer b\r\n\r\n");
  expect_json_error(&c, 400, "bad request: duplicate header");
  cli_close(&c);
}

static void test_expect_continue(void **state) {
  (void)state;
  start(NULL);
  client c = cli_open();
  cli_sends(&c, "POST /echo HTTP/1.1\r\nExpect: 100-Continue\r\nContent-Length: 5\r\n\r\n");
  const char *cont = "HTTP/1.1 100 Continue\r\n\r\n";
  while (c.len < strlen(cont)) assert_true(cli_fill(&c) > 0);
  assert_memory_equal(c.buf, cont, strlen(cont));
  cli_consume(&c, strlen(cont));
  cli_sends(&c, "hello");
  response r = cli_read(&c);
  assert_int_equal(r.status, 200);
  assert_string_equal(r.body, "hello");
  assert_string_equal(r.connection, "keep-alive");
  resp_free(&r);

  /* no body, nothing to continue */
  cli_sends(&c, "GET / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n");
  r = cli_read(&c);
  assert_int_equal(r.status, 200);
  resp_free(&r);
  cli_close(&c);

  c = cli_open();
  cli_sends(&c, "POST /echo HTTP/1.1\r\nExpect: teapot\r\nContent-Length: 5\r\n\r\n");
  expect_json_error(&c, 417, "expectation failed");
  cli_close(&c);
}

/* The handler's extra headers go out as given, only when well-formed; the
 * request's If-None-Match reaches it. */
static void test_extra_headers(void **state) {
  (void)state;
  start(NULL);
  client c = cli_open();
  cli_sends(&c, "GET /hdrs?ok HTTP/1.1\r\nIf-None-Match: W/\"a\", \"b\"\r\n\r\n");
  response r = cli_read(&c);
  assert_int_equal(r.status, 200);
  assert_non_null(strstr(r.head, "\r\nETag: \"1-2\"\r\nCache-Control: no-cache\r\nConnection: "));
  assert_int_equal(r.body_len, strlen("W/\"a\", \"b\""));
  assert_memory_equal(r.body, "W/\"a\", \"b\"", r.body_len);
  resp_free(&r);
  cli_sends(&c, "GET /hdrs?304 HTTP/1.1\r\n\r\n");
  r = cli_read(&c);
  assert_int_equal(r.status, 304);
  assert_false(r.has_length);
  assert_non_null(strstr(r.head, "\r\nETag: \"1-2\"\r\n"));
  assert_memory_equal(r.body, "", 0);
  resp_free(&r);
  static const char *const bad[] = {"nocrlf", "nocolon", "bare-lf", "space-name"};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    char req[128];
    snprintf(req, sizeof req, "GET /hdrs?%s HTTP/1.1\r\n\r\n", bad[i]);
    cli_sends(&c, req);
    r = cli_read(&c);
    assert_int_equal(r.status, 200);
    if (strstr(r.head, "ETag") || strstr(r.head, "Evil")) fail_msg("%s sent: %s", bad[i], r.head);
    assert_memory_equal(r.body, "-", 1); /* no If-None-Match: NULL */
    resp_free(&r);
  }
  /* two If-None-Match are ambiguous, like two Authorization */
  cli_sends(&c, "GET /hdrs HTTP/1.1\r\nIf-None-Match: \"a\"\r\nIf-None-Match: \"b\"\r\n\r\n");
  expect_json_error(&c, 400, "bad request: duplicate header");
  cli_close(&c);
}

static void test_head(void **state) {
  (void)state;
  start(NULL);
  client c = cli_open();
  cli_sends(&c, "HEAD /big?z HTTP/1.1\r\n\r\n");
  response r = cli_read_ex(&c, true);
  assert_int_equal(r.status, 200);
  assert_true(r.has_length);
  assert_int_equal(r.length, BIG_BODY);
  resp_free(&r);
  assert_int_equal(snapshot().method, HTTP_HEAD);
  cli_sends(&c, "GET /status/202 HTTP/1.1\r\n\r\n");
  r = cli_read(&c); /* would start with body bytes if HEAD had sent any */
  assert_int_equal(r.status, 202);
  resp_free(&r);
  cli_close(&c);
}

static void test_half_close(void **state) {
  (void)state;
  start(NULL);
  client c = cli_open();
  cli_sends(&c, "GET /status/202 HTTP/1.1\r\n\r\nGET /status/203 HTTP/1.1\r\n\r\n");
  shutdown(c.fd, SHUT_WR);
  response r = cli_read(&c);
  assert_int_equal(r.status, 202);
  resp_free(&r);
  r = cli_read(&c);
  assert_int_equal(r.status, 203);
  resp_free(&r);
  cli_expect_eof(&c);
  cli_close(&c);
}

/* Half-closed while its answers are still queued: they all go out. */
static void test_half_close_blocked(void **state) {
  (void)state;
  start(NULL);
  client c = {0};
  c.fd = socket(AF_INET, SOCK_STREAM, 0);
  assert_true(c.fd >= 0);
  int small = 16 * 1024;
  setsockopt(c.fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
  struct timeval tv = {5, 0};
  setsockopt(c.fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  struct sockaddr_in sa = {0};
  sa.sin_family = AF_INET;
  sa.sin_port = htons((uint16_t)current->port);
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  assert_int_equal(connect(c.fd, (struct sockaddr *)&sa, sizeof sa), 0);
  cli_sends(&c,
            "GET /big?p HTTP/1.1\r\n\r\nGET /big?q HTTP/1.1\r\n\r\n"
            "GET /big?r HTTP/1.1\r\n\r\n");
  shutdown(c.fd, SHUT_WR);
  for (int i = 0; i < 3; i++) {
    response r = cli_read(&c);
    assert_int_equal(r.status, 200);
    assert_int_equal(r.body_len, BIG_BODY);
    assert_int_equal(r.body[BIG_BODY - 1], 'p' + i);
    resp_free(&r);
  }
  cli_expect_eof(&c);
  cli_close(&c);
}

static void test_ipv6(void **state) {
  (void)state;
  if (!start_at("[::1]:0", NULL)) skip();
  client c = {0};
  c.fd = socket(AF_INET6, SOCK_STREAM, 0);
  assert_true(c.fd >= 0);
  struct timeval tv = {5, 0};
  setsockopt(c.fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  struct sockaddr_in6 sa = {0};
  sa.sin6_family = AF_INET6;
  sa.sin6_port = htons((uint16_t)current->port);
  sa.sin6_addr = in6addr_loopback;
  assert_int_equal(connect(c.fd, (struct sockaddr *)&sa, sizeof sa), 0);
  cli_sends(&c, GET_ROOT);
  response r = cli_read(&c);
  assert_int_equal(r.status, 200);
  resp_free(&r);
  socklen_t sl = sizeof sa;
  getsockname(c.fd, (struct sockaddr *)&sa, &sl);
  char want[64];
  snprintf(want, sizeof want, "[::1]:%u", (unsigned)ntohs(sa.sin6_port));
  assert_string_equal(snapshot().peer, want);
  cli_close(&c);
}

static void test_pipelined_large_responses(void **state) {
  (void)state;
  start(NULL);
  client c = cli_open();
  /* 24 x 256 KiB asked for at once: the server holds back parsing once
   * about 1 MiB is queued and resumes as the client reads */
  char reqs[24 * 40];
  size_t k = 0;
  for (int i = 0; i < 24; i++)
    k += (size_t)sprintf(reqs + k, "GET /big?%c HTTP/1.1\r\n\r\n", 'a' + i);
  cli_send(&c, reqs, k);
  for (int i = 0; i < 24; i++) {
    response r = cli_read(&c);
    assert_int_equal(r.status, 200);
    assert_int_equal(r.body_len, BIG_BODY);
    assert_int_equal(r.body[0], 'a' + i);
    assert_int_equal(r.body[BIG_BODY - 1], 'a' + i);
    resp_free(&r);
  }
  cli_sends(&c, GET_ROOT);
  response r = cli_read(&c);
  assert_int_equal(r.status, 200);
  resp_free(&r);
  assert_int_equal(snapshot().requests, 25);
  cli_close(&c);
}

static void test_slow_reader_bounded(void **state) {
  (void)state;
  http_limits lim = {.idle_timeout_ms = 300};
  start(&lim);
  client c = {0};
  c.fd = socket(AF_INET, SOCK_STREAM, 0);
  assert_true(c.fd >= 0);
  int small = 16 * 1024;
  setsockopt(c.fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
  struct sockaddr_in sa = {0};
  sa.sin_family = AF_INET;
  sa.sin_port = htons((uint16_t)current->port);
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  assert_int_equal(connect(c.fd, (struct sockaddr *)&sa, sizeof sa), 0);
  /* 200 x 256 KiB asked for, nothing read */
  char reqs[200 * 32];
  size_t k = 0;
  for (int i = 0; i < 200; i++) k += (size_t)sprintf(reqs + k, "GET /big HTTP/1.1\r\n\r\n");
  cli_send(&c, reqs, k);
  /* wait out the idle timeout on a second, silent connection */
  client quiet = cli_open();
  cli_expect_eof(&quiet);
  cli_close(&quiet);
  int answered = snapshot().requests;
  assert_true(answered > 0);
  if (answered >= 100) fail_msg("%d requests answered for a client that reads nothing", answered);
  cli_close(&c);
}

static uint64_t mono_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static void test_idle_timeout(void **state) {
  (void)state;
  http_limits lim = {.idle_timeout_ms = 200};
  start(&lim);
  client c = cli_open();
  cli_sends(&c, GET_ROOT);
  response r = cli_read(&c);
  resp_free(&r);
  uint64_t t0 = mono_ms();
  client quiet = cli_open();
  cli_expect_eof(&c);
  cli_expect_eof(&quiet);
  uint64_t dt = mono_ms() - t0;
  assert_true(dt >= 150);
  assert_true(dt < 3000);
  cli_close(&c);
  cli_close(&quiet);
}

/* Sends `prefix`, then one byte of `drip` every 50 ms, well inside the idle
 * timeout, until the server closes; returns how long that took (ms). */
static uint64_t trickle_until_closed(const char *prefix, const char *drip) {
  client c = cli_open();
  cli_sends(&c, prefix);
  uint64_t t0 = mono_ms();
  for (size_t i = 0; mono_ms() - t0 < 4000; i++) {
    if (send(c.fd, drip + i % strlen(drip), 1, MSG_NOSIGNAL) < 0) break;
    struct pollfd pf = {c.fd, POLLIN, 0};
    if (poll(&pf, 1, 50) > 0) {
      char b[512];
      if (recv(c.fd, b, sizeof b, 0) <= 0) break;
    }
  }
  uint64_t dt = mono_ms() - t0;
  cli_close(&c);
  return dt;
}

/* Slowloris: a request's headers and body have deadlines of their own that
 * bytes trickling in do not push back; a connection between requests keeps
 * only the idle timeout. */
static void test_header_and_body_deadlines(void **state) {
  (void)state;
  http_limits lim = {.idle_timeout_ms = 60000, .header_timeout_ms = 400, .body_timeout_ms = 600};
  start(&lim);
  uint64_t dt = trickle_until_closed("GET / HTTP/1.1\r\n", "X-Slow: 1\r\n");
  if (dt < 300 || dt > 2500) fail_msg("headers: closed after %llu ms", (unsigned long long)dt);
  dt = trickle_until_closed("POST /echo HTTP/1.1\r\nContent-Length: 100000\r\n\r\n", "x");
  if (dt < 500 || dt > 2500) fail_msg("body: closed after %llu ms", (unsigned long long)dt);
  /* after a whole request, waiting for the next one is idle time, not a
   * request's: the connection outlives the header deadline */
  client c = cli_open();
  cli_sends(&c, GET_ROOT);
  response r = cli_read(&c);
  resp_free(&r);
  struct pollfd pf = {c.fd, POLLIN, 0};
  assert_int_equal(poll(&pf, 1, 900), 0); /* no EOF */
  cli_sends(&c, GET_ROOT);
  r = cli_read(&c);
  assert_int_equal(r.status, 200);
  resp_free(&r);
  cli_close(&c);
}

/* A slot freed by a close is reused; the close is noticed asynchronously,
 * so a few attempts may still be refused. */
static bool try_request(void) {
  client c = cli_open();
  bool ok = false;
  if (send(c.fd, GET_ROOT, strlen(GET_ROOT), MSG_NOSIGNAL) > 0) {
    char buf[256];
    ssize_t n = recv(c.fd, buf, sizeof buf - 1, 0);
    ok = n > 12 && memcmp(buf, "HTTP/1.1 200", 12) == 0;
  }
  cli_close(&c);
  return ok;
}

static void test_max_conns(void **state) {
  (void)state;
  http_limits lim = {.max_conns = 2};
  start(&lim);
  client ab[2] = {cli_open(), cli_open()};
  for (int i = 0; i < 2; i++) {
    cli_sends(&ab[i], GET_ROOT);
    response r = cli_read(&ab[i]);
    assert_int_equal(r.status, 200);
    resp_free(&r);
  }
  client x = cli_open();
  ssize_t n = cli_fill(&x);
  assert_true(n == 0 || (n < 0 && errno == ECONNRESET));
  cli_close(&x);
  cli_close(&ab[0]);
  bool ok = false;
  for (int i = 0; i < 200 && !ok; i++) ok = try_request();
  assert_true(ok);
  cli_close(&ab[1]);
}

static void test_free_from_handler(void **state) {
  (void)state;
  start(NULL);
  client other = cli_open();
  cli_sends(&other, GET_ROOT);
  response r = cli_read(&other);
  resp_free(&r);
  client c = cli_open();
  cli_sends(&c, "GET /quit HTTP/1.1\r\n\r\n");
  /* no response: the server is gone, and so are its connections */
  ssize_t n = cli_fill(&c);
  assert_true(n == 0 || (n < 0 && errno == ECONNRESET));
  n = cli_fill(&other);
  assert_true(n == 0 || (n < 0 && errno == ECONNRESET));
  cli_close(&c);
  cli_close(&other);
}

/* ---- deferred answers ---------------------------------------------------------- */

/* Opens a connection and has it answered once, retrying while the server
 * still refuses it (max_conns, with an old connection not yet gone). */
static client cli_open_served(void) {
  for (int i = 0; i < 200; i++) {
    client c = cli_open();
    cli_sends(&c, GET_ROOT);
    ssize_t n = cli_fill(&c);
    if (n > 12 && memcmp(c.buf, "HTTP/1.1 200", 12) == 0) {
      response r = cli_read(&c);
      resp_free(&r);
      return c;
    }
    cli_close(&c);
  }
  fail_msg("no connection served");
  return (client){.fd = -1};
}

static void test_deferred_basic(void **state) {
  (void)state;
  start(NULL);
  client c = cli_open();
  cli_sends(&c, "GET /defer/201?hello HTTP/1.1\r\n\r\n");
  wait_requests(1);
  cmd('p');
  cli_expect_nothing(&c);
  uint64_t t = snapshot().last_ticket;
  assert_true(t != 0);
  cmd('a');
  seen s = snapshot();
  assert_int_equal(s.nrc, 1);
  assert_int_equal(s.rc[0], 0);
  response r = cli_read(&c);
  assert_int_equal(r.status, 201);
  assert_string_equal(r.ctype, "text/plain");
  assert_string_equal(r.connection, "keep-alive");
  assert_string_equal(r.body, "hello");
  resp_free(&r);
  /* the connection goes on, synchronous and deferred */
  cli_sends(&c, GET_ROOT);
  r = cli_read(&c);
  assert_int_equal(r.status, 200);
  resp_free(&r);
  cli_sends(&c, "POST /defer/200?again HTTP/1.1\r\nContent-Length: 2\r\n\r\nxy");
  wait_requests(3);
  assert_true(snapshot().last_ticket != t);
  cmd('a');
  r = cli_read(&c);
  assert_int_equal(r.status, 200);
  assert_string_equal(r.body, "again");
  resp_free(&r);
  /* answered tickets are stale */
  assert_int_equal(snapshot().rc[0], 0);
  cli_close(&c);
}

static void test_deferred_inside_handler(void **state) {
  (void)state;
  start(NULL);
  client c = cli_open();
  cli_sends(&c, "GET /now/202?at%20once HTTP/1.1\r\n\r\nGET /status/203 HTTP/1.1\r\n\r\n");
  response r = cli_read(&c);
  assert_int_equal(r.status, 202);
  assert_string_equal(r.body, "at%20once");
  resp_free(&r);
  r = cli_read(&c);
  assert_int_equal(r.status, 203);
  resp_free(&r);
  seen s = snapshot();
  assert_int_equal(s.now_rc[0], 0);
  assert_int_equal(s.now_rc[1], -1); /* already answered */
  cli_close(&c);
}

static uint64_t mono_ms(void);

static void test_deferred_timer(void **state) {
  (void)state;
  start(NULL);
  client c = cli_open();
  uint64_t t0 = mono_ms();
  cli_sends(&c, "GET /later/202?late HTTP/1.1\r\n\r\n");
  wait_requests(1);
  /* meanwhile the loop serves others */
  client d = cli_open();
  cli_sends(&d, GET_ROOT);
  response r = cli_read(&d);
  assert_int_equal(r.status, 200);
  resp_free(&r);
  cli_close(&d);
  r = cli_read(&c);
  assert_true(mono_ms() - t0 >= 40);
  assert_int_equal(r.status, 202);
  assert_string_equal(r.body, "late");
  resp_free(&r);
  assert_int_equal(snapshot().rc[0], 0);
  cli_close(&c);
}

static void test_deferred_then_sync_order(void **state) {
  (void)state;
  start(NULL);
  client c = cli_open();
  cli_sends(&c,
            "GET /defer/201?first HTTP/1.1\r\n\r\n"
            "GET /status/202 HTTP/1.1\r\n\r\n"
            "POST /echo HTTP/1.1\r\nContent-Length: 5\r\n\r\nthird");
  /* the later ones are handled, and their answers held */
  wait_requests(3);
  cmd('p');
  cli_expect_nothing(&c);
  cmd('a');
  response r = cli_read(&c);
  assert_int_equal(r.status, 201);
  assert_string_equal(r.body, "first");
  resp_free(&r);
  r = cli_read(&c);
  assert_int_equal(r.status, 202);
  resp_free(&r);
  r = cli_read(&c);
  assert_int_equal(r.status, 200);
  assert_string_equal(r.body, "third");
  resp_free(&r);
  cli_close(&c);
}

static void test_deferred_reverse_answers(void **state) {
  (void)state;
  start(NULL);
  client c = cli_open();
  cli_sends(&c,
            "GET /defer/201?one HTTP/1.1\r\n\r\nGET /status/204 HTTP/1.1\r\n\r\n"
            "GET /defer/202?two HTTP/1.1\r\n\r\nGET /defer/203?three HTTP/1.1\r\n\r\n");
  wait_requests(4);
  cmd('r');
  seen s = snapshot();
  assert_int_equal(s.nrc, 3);
  for (int i = 0; i < 3; i++) assert_int_equal(s.rc[i], 0);
  static const char *const bodies[] = {"one", NULL, "two", "three"};
  static const int statuses[] = {201, 204, 202, 203};
  for (int i = 0; i < 4; i++) {
    response r = cli_read(&c);
    assert_int_equal(r.status, statuses[i]);
    if (bodies[i]) assert_string_equal(r.body, bodies[i]);
    resp_free(&r);
  }
  cli_close(&c);
}

static void test_deferred_client_gone(void **state) {
  (void)state;
  /* one connection at most: once another is served, the first is gone */
  http_limits lim = {.max_conns = 1};
  start(&lim);
  client c = cli_open();
  cli_sends(&c, "GET /defer/201?lost HTTP/1.1\r\n\r\nGET /status/202 HTTP/1.1\r\n\r\n");
  wait_requests(2);
  cli_abort(&c);
  client d = cli_open_served();
  cmd('a');
  seen s = snapshot();
  assert_int_equal(s.nrc, 1);
  assert_int_equal(s.rc[0], -1);
  cli_sends(&d, GET_ROOT);
  response r = cli_read(&d);
  assert_int_equal(r.status, 200);
  resp_free(&r);
  cli_close(&d);
}

static void test_deferred_stale_ticket(void **state) {
  (void)state;
  http_limits lim = {.max_conns = 1};
  start(&lim);
  client c = cli_open();
  cli_sends(&c, "GET /defer/201?old HTTP/1.1\r\n\r\n");
  wait_requests(1);
  uint64_t old = snapshot().last_ticket;
  cli_abort(&c);
  /* a new connection, likely in the old one's memory, with a ticket likely
   * in the old one's slot */
  client d = cli_open_served();
  int n = snapshot().requests;
  cli_sends(&d, "GET /defer/202?new HTTP/1.1\r\n\r\n");
  wait_requests(n + 1);
  assert_true(snapshot().last_ticket != old);
  cmd('a'); /* the old ticket first */
  seen s = snapshot();
  assert_int_equal(s.nrc, 2);
  assert_int_equal(s.rc[0], -1);
  assert_int_equal(s.rc[1], 0);
  response r = cli_read(&d);
  assert_int_equal(r.status, 202);
  assert_string_equal(r.body, "new");
  resp_free(&r);
  cmd('p');
  cli_expect_nothing(&d);
  cli_close(&d);
}

/* Sends n deferred requests at once on a server that stops reading at
 * bound outstanding; answers them in batches and reads them all, in order. */
static void run_backpressure(unsigned bound, int n) {
  current->seen.bound = bound;
  client c = cli_open();
  size_t cap = (size_t)n * 48, k = 0;
  char *reqs = malloc(cap);
  assert_non_null(reqs);
  for (int i = 0; i < n; i++)
    k += (size_t)snprintf(reqs + k, cap - k, "GET /defer/200?%03d HTTP/1.1\r\n\r\n", i);
  cli_send(&c, reqs, k);
  free(reqs);
  int seen_n = 0;
  while (seen_n < n) {
    int want = seen_n + (int)bound < n ? seen_n + (int)bound : n;
    wait_requests(want);
    cmd('p');
    /* not one more until answers come */
    assert_int_equal(snapshot().requests, want);
    cmd('a');
    seen_n = want;
  }
  for (int i = 0; i < n; i++) {
    response r = cli_read(&c);
    assert_int_equal(r.status, 200);
    char want[8];
    snprintf(want, sizeof want, "%03d", i);
    assert_string_equal(r.body, want);
    resp_free(&r);
  }
  seen s = snapshot();
  assert_int_equal(s.violations, 0);
  assert_int_equal(s.requests, n);
  /* the connection reads again */
  cli_sends(&c, GET_ROOT);
  response r = cli_read(&c);
  assert_int_equal(r.status, 200);
  resp_free(&r);
  cli_close(&c);
}

static void test_deferred_backpressure(void **state) {
  (void)state;
  http_limits lim = {.max_deferred = 8};
  start(&lim);
  run_backpressure(8, 21);
}

static void test_deferred_backpressure_default(void **state) {
  (void)state;
  start(NULL);
  run_backpressure(HTTP_DEFAULT_MAX_DEFERRED, 150);
}

/* Under the bound again, reading resumes though the oldest answer, and so
 * every response, is still held. */
static void test_deferred_backpressure_resume(void **state) {
  (void)state;
  http_limits lim = {.max_deferred = 2};
  start(&lim);
  current->seen.bound = 2;
  client c = cli_open();
  cli_sends(&c,
            "GET /defer/201?1 HTTP/1.1\r\n\r\nGET /defer/202?2 HTTP/1.1\r\n\r\n"
            "GET /defer/203?3 HTTP/1.1\r\n\r\nGET /status/204 HTTP/1.1\r\n\r\n"
            "GET /defer/205?5 HTTP/1.1\r\n\r\n");
  wait_requests(2);
  cmd('p');
  assert_int_equal(snapshot().requests, 2);
  cmd('n'); /* answers 2: 3 is read, and makes two outstanding again */
  assert_int_equal(snapshot().rc[0], 0);
  wait_requests(3);
  cmd('p');
  assert_int_equal(snapshot().requests, 3);
  cmd('n'); /* answers 3: 204 and 5 are read */
  wait_requests(5);
  cmd('p');
  cli_expect_nothing(&c);
  cmd('r'); /* 5, then 1 */
  for (int st = 201; st <= 205; st++) {
    response r = cli_read(&c);
    assert_int_equal(r.status, st);
    resp_free(&r);
  }
  assert_int_equal(snapshot().violations, 0);
  cli_close(&c);
}

static void test_deferred_head(void **state) {
  (void)state;
  start(NULL);
  client c = cli_open();
  cli_sends(&c, "HEAD /defer/200?abcd HTTP/1.1\r\n\r\nHEAD /defer/42?x HTTP/1.1\r\n\r\n");
  wait_requests(2);
  cmd('a');
  response r = cli_read_ex(&c, true);
  assert_int_equal(r.status, 200);
  assert_true(r.has_length);
  assert_int_equal(r.length, 4);
  resp_free(&r);
  /* the 500 for a bad status drops its body for HEAD too */
  r = cli_read_ex(&c, true);
  assert_int_equal(r.status, 500);
  assert_int_equal(r.length, strlen("{\"error\":\"internal error\"}"));
  resp_free(&r);
  cli_sends(&c, "GET /status/202 HTTP/1.1\r\n\r\n");
  r = cli_read(&c); /* would start with body bytes if HEAD had sent any */
  assert_int_equal(r.status, 202);
  resp_free(&r);
  assert_int_equal(snapshot().method, HTTP_GET);
  cli_close(&c);
}

static void test_deferred_invalid(void **state) {
  (void)state;
  start(NULL);
  client c = cli_open();
  cli_sends(&c,
            "GET /defer/42?x HTTP/1.1\r\n\r\nGET /defer/600?y HTTP/1.1\r\n\r\n"
            "GET /defer-crlf/201?z HTTP/1.1\r\n\r\n");
  wait_requests(3);
  cmd('a');
  for (int i = 0; i < 2; i++) {
    response r = cli_read(&c);
    assert_int_equal(r.status, 500);
    assert_string_equal(r.ctype, "application/json");
    assert_string_equal(r.connection, "keep-alive");
    assert_string_equal(r.body, "{\"error\":\"internal error\"}");
    resp_free(&r);
  }
  response r = cli_read(&c);
  assert_int_equal(r.status, 201);
  assert_string_equal(r.ctype, "application/json");
  assert_string_equal(r.body, "z");
  resp_free(&r);
  cli_close(&c);
}

static void test_deferred_connection_close(void **state) {
  (void)state;
  start(NULL);
  client c = cli_open();
  cli_sends(&c,
            "GET /defer/202?bye HTTP/1.1\r\nConnection: close\r\n\r\n"
            "GET /status/203 HTTP/1.1\r\n\r\n");
  wait_requests(1);
  cmd('a');
  response r = cli_read(&c);
  assert_int_equal(r.status, 202);
  assert_string_equal(r.connection, "close");
  assert_string_equal(r.body, "bye");
  resp_free(&r);
  cli_expect_eof(&c);
  assert_int_equal(snapshot().requests, 1);
  cli_close(&c);
}

static void test_deferred_half_close(void **state) {
  (void)state;
  start(NULL);
  client c = cli_open();
  cli_sends(&c, "GET /defer/201?still HTTP/1.1\r\n\r\nGET /status/202 HTTP/1.1\r\n\r\n");
  shutdown(c.fd, SHUT_WR);
  wait_requests(2);
  cmd('p');
  cmd('a');
  assert_int_equal(snapshot().rc[0], 0);
  response r = cli_read(&c);
  assert_int_equal(r.status, 201);
  assert_string_equal(r.body, "still");
  resp_free(&r);
  r = cli_read(&c);
  assert_int_equal(r.status, 202);
  resp_free(&r);
  cli_expect_eof(&c);
  cli_close(&c);
}

/* A 100 Continue is an answer too: it waits for the earlier ones. */
static void test_deferred_expect_continue(void **state) {
  (void)state;
  start(NULL);
  client c = cli_open();
  cli_sends(&c,
            "GET /defer/201?a HTTP/1.1\r\n\r\n"
            "POST /echo HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n");
  wait_requests(1);
  cmd('p');
  cli_expect_nothing(&c);
  cmd('a');
  response r = cli_read(&c);
  assert_int_equal(r.status, 201);
  resp_free(&r);
  const char *cont = "HTTP/1.1 100 Continue\r\n\r\n";
  while (c.len < strlen(cont)) assert_true(cli_fill(&c) > 0);
  assert_memory_equal(c.buf, cont, strlen(cont));
  cli_consume(&c, strlen(cont));
  cli_sends(&c, "hello");
  r = cli_read(&c);
  assert_int_equal(r.status, 200);
  assert_string_equal(r.body, "hello");
  resp_free(&r);
  cli_close(&c);
}

static void test_deferred_idle_timeout(void **state) {
  (void)state;
  http_limits lim = {.idle_timeout_ms = 200};
  start(&lim);
  client c = cli_open();
  cli_sends(&c, "GET /defer/200?patience HTTP/1.1\r\n\r\n");
  wait_requests(1);
  /* a connection opened later times out; the waiting one does not */
  client quiet = cli_open();
  cli_expect_eof(&quiet);
  cli_close(&quiet);
  cmd('p');
  cli_expect_nothing(&c);
  cmd('a');
  response r = cli_read(&c);
  assert_int_equal(r.status, 200);
  assert_string_equal(r.body, "patience");
  resp_free(&r);
  /* answered: the idle clock runs again */
  uint64_t t0 = mono_ms();
  cli_expect_eof(&c);
  uint64_t dt = mono_ms() - t0;
  assert_true(dt >= 150);
  assert_true(dt < 3000);
  cli_close(&c);
}

/* Answering lets the held-back input be read; a request in it frees the
 * server from inside the handler. */
static void test_deferred_resume_then_quit(void **state) {
  (void)state;
  http_limits lim = {.max_deferred = 1};
  start(&lim);
  client c = cli_open();
  cli_sends(&c, "GET /defer/201?a HTTP/1.1\r\n\r\nGET /quit HTTP/1.1\r\n\r\n");
  wait_requests(1);
  cmd('p');
  assert_int_equal(snapshot().requests, 1);
  cmd('a');
  wait_requests(2);
  response r = cli_read(&c);
  assert_int_equal(r.status, 201);
  resp_free(&r);
  ssize_t n = cli_fill(&c);
  assert_true(n == 0 || (n < 0 && errno == ECONNRESET));
  cmd('p');
  assert_null(current->srv);
  cli_close(&c);
}

static void test_deferred_free_outstanding(void **state) {
  (void)state;
  start(NULL);
  client a = cli_open(), b = cli_open();
  cli_sends(&a, "GET /defer/201?a HTTP/1.1\r\n\r\nGET /status/202 HTTP/1.1\r\n\r\n");
  cli_sends(&b, "POST /defer/201?b HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc");
  wait_requests(3);
  cmd('f'); /* the tickets are voided; the fixture drops them */
  assert_null(current->srv);
  client *cs[2] = {&a, &b};
  for (int i = 0; i < 2; i++) {
    ssize_t n = cli_fill(cs[i]);
    assert_true(n == 0 || (n < 0 && errno == ECONNRESET));
    cli_close(cs[i]);
  }
}

static void respond_any_handler(void *user, const http_request *rq, http_response *rs) {
  (void)user;
  (void)rq;
  rs->status = 200;
}

static void test_respond_bad_tickets(void **state) {
  (void)state;
  struct event_base *base = event_base_new();
  assert_non_null(base);
  http_server *s = http_server_new(base, "127.0.0.1:0", NULL, respond_any_handler, NULL);
  assert_non_null(s);
  /* the body is freed each time (ASan would tell) */
  assert_int_equal(http_server_respond(NULL, 1, 200, NULL, dup_mem("x", 1), 1), -1);
  assert_int_equal(http_server_respond(s, 0, 200, NULL, dup_mem("x", 1), 1), -1);
  assert_int_equal(http_server_respond(s, 1, 200, NULL, dup_mem("x", 1), 1), -1);
  assert_int_equal(http_server_respond(s, (uint64_t)1 << 24, 200, NULL, NULL, 0), -1);
  assert_int_equal(http_server_respond(s, UINT64_MAX, 200, NULL, dup_mem("x", 1), 1), -1);
  assert_int_equal(http_response_defer(NULL), 0);
  http_server_free(s);
  event_base_free(base);
}

static void test_bad_args(void **state) {
  (void)state;
  struct event_base *base = event_base_new();
  assert_non_null(base);
  assert_null(http_server_new(base, "127.0.0.1", NULL, handler, NULL));
  assert_null(http_server_new(base, "localhost:80", NULL, handler, NULL));
  assert_null(http_server_new(base, "127.0.0.1:70000", NULL, handler, NULL));
  assert_null(http_server_new(base, "::1:80", NULL, handler, NULL));
  assert_null(http_server_new(base, "127.0.0.1:0", NULL, NULL, NULL));
  assert_null(http_server_new(NULL, "127.0.0.1:0", NULL, handler, NULL));
  http_server *s = http_server_new(base, "[::1]:0", NULL, handler, NULL);
  if (s) { /* hosts without IPv6 loopback cannot bind it */
    assert_true(http_server_port(s) > 0);
    /* the same port again: bind fails */
    char addr[32];
    snprintf(addr, sizeof addr, "[::1]:%d", http_server_port(s));
    http_server *t = http_server_new(base, addr, NULL, handler, NULL);
    assert_null(t);
    http_server_free(s);
  }
  http_server_free(NULL);
  event_base_free(base);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test_setup_teardown(test_simple_get, setup, teardown),
      cmocka_unit_test_setup_teardown(test_status_handling, setup, teardown),
      cmocka_unit_test_setup_teardown(test_post_body, setup, teardown),
      cmocka_unit_test_setup_teardown(test_pipelined, setup, teardown),
      cmocka_unit_test_setup_teardown(test_interleaved_partial_requests, setup, teardown),
      cmocka_unit_test_setup_teardown(test_byte_by_byte, setup, teardown),
      cmocka_unit_test_setup_teardown(test_chunked, setup, teardown),
      cmocka_unit_test_setup_teardown(test_keepalive_100, setup, teardown),
      cmocka_unit_test_setup_teardown(test_connection_close, setup, teardown),
      cmocka_unit_test_setup_teardown(test_http10, setup, teardown),
      cmocka_unit_test_setup_teardown(test_malformed, setup, teardown),
      cmocka_unit_test_setup_teardown(test_body_too_large, setup, teardown),
      cmocka_unit_test_setup_teardown(test_chunked_too_large, setup, teardown),
      cmocka_unit_test_setup_teardown(test_headers_too_large, setup, teardown),
      cmocka_unit_test_setup_teardown(test_authorization, setup, teardown),
      cmocka_unit_test_setup_teardown(test_expect_continue, setup, teardown),
      cmocka_unit_test_setup_teardown(test_head, setup, teardown),
      cmocka_unit_test_setup_teardown(test_extra_headers, setup, teardown),
      cmocka_unit_test_setup_teardown(test_half_close, setup, teardown),
      cmocka_unit_test_setup_teardown(test_half_close_blocked, setup, teardown),
      cmocka_unit_test_setup_teardown(test_ipv6, setup, teardown),
      cmocka_unit_test_setup_teardown(test_pipelined_large_responses, setup, teardown),
      cmocka_unit_test_setup_teardown(test_slow_reader_bounded, setup, teardown),
      cmocka_unit_test_setup_teardown(test_idle_timeout, setup, teardown),
      cmocka_unit_test_setup_teardown(test_header_and_body_deadlines, setup, teardown),
      cmocka_unit_test_setup_teardown(test_max_conns, setup, teardown),
      cmocka_unit_test_setup_teardown(test_free_from_handler, setup, teardown),
      cmocka_unit_test_setup_teardown(test_deferred_basic, setup, teardown),
      cmocka_unit_test_setup_teardown(test_deferred_inside_handler, setup, teardown),
      cmocka_unit_test_setup_teardown(test_deferred_timer, setup, teardown),
      cmocka_unit_test_setup_teardown(test_deferred_then_sync_order, setup, teardown),
      cmocka_unit_test_setup_teardown(test_deferred_reverse_answers, setup, teardown),
      cmocka_unit_test_setup_teardown(test_deferred_client_gone, setup, teardown),
      cmocka_unit_test_setup_teardown(test_deferred_stale_ticket, setup, teardown),
      cmocka_unit_test_setup_teardown(test_deferred_backpressure, setup, teardown),
      cmocka_unit_test_setup_teardown(test_deferred_backpressure_default, setup, teardown),
      cmocka_unit_test_setup_teardown(test_deferred_backpressure_resume, setup, teardown),
      cmocka_unit_test_setup_teardown(test_deferred_head, setup, teardown),
      cmocka_unit_test_setup_teardown(test_deferred_invalid, setup, teardown),
      cmocka_unit_test_setup_teardown(test_deferred_connection_close, setup, teardown),
      cmocka_unit_test_setup_teardown(test_deferred_half_close, setup, teardown),
      cmocka_unit_test_setup_teardown(test_deferred_expect_continue, setup, teardown),
      cmocka_unit_test_setup_teardown(test_deferred_idle_timeout, setup, teardown),
      cmocka_unit_test_setup_teardown(test_deferred_resume_then_quit, setup, teardown),
      cmocka_unit_test_setup_teardown(test_deferred_free_outstanding, setup, teardown),
      cmocka_unit_test(test_respond_bad_tickets),
      cmocka_unit_test(test_bad_args),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
