/* libFuzzer harness: imd's HTTP API, from bytes on a socket to the router.
 *
 * An in-memory imd is built once (the engine without listeners, the SQLite
 * store on its thread in a temporary directory, fsync off) with its HTTP server
 * (daemon/http_server.c: llhttp, keep-alive, pipelining, deferred answers)
 * on 127.0.0.1 and daemon/api.c as the handler. Each input is the byte
 * stream of one client connection: it is written to a fresh connection,
 * the client's side is shut down (FIN), and the event loop runs until the
 * server closes the connection.
 *
 * Byte 0 of the input picks a prefix: mode & 3 = 0 none, 1 a valid
 * authorized request line and headers ending in "Content-Length: " (so the
 * fuzzer writes the length and body of a POST /v1/messages), 2 the same
 * for PUT /v1/groups/g/members, 3 "GET /v1/users/" (the fuzzer writes the
 * rest of the target). The rest is sent as is.
 *
 * Invariants:
 *  - the server closes the connection within 5 s of the client's FIN (no
 *    request can wedge it), and never crashes;
 *  - everything it writes is a sequence of well-formed HTTP/1.1 responses:
 *    status 100..599 (only 100 may be informational), Content-Type and
 *    Content-Length (except 204/304), and exactly Content-Length body bytes;
 *    an application/json body is valid JSON, an error one ({4,5}xx) an
 *    object with a string "error"; nothing follows a "Connection: close";
 *  - a 2xx answer other than to GET /healthz is only possible when the
 *    input carries the API key. */
#include <arpa/inet.h>
#include <dirent.h>
#include <cjson/cJSON.h>
#include <errno.h>
#include <event2/event.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include "fuzz_common.h"
#include "imd.h"

#define API_KEY "fuzz-api-key-0123456789"

static imd D;
static int port;

static char dir[] = "/tmp/imd-fuzz-http-XXXXXX";

/* At exit: free the imd and remove its temporary directory. */
static void fuzz_fini(void) {
  imd_delivery_free(&D);
  imd_node_stop(&D);
  imd_bans_free(&D);
  http_server_free(D.http);
  im_server_free(D.srv);
  event_base_free(D.base);
  DIR *dp = opendir(dir);
  for (struct dirent *e; dp && (e = readdir(dp));) {
    char path[sizeof dir + 300];
    if (e->d_name[0] == '.') continue;
    snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
    unlink(path);
  }
  if (dp) closedir(dp);
  rmdir(dir);
}

static void fuzz_init(void) {
  FZ_CHECK(mkdtemp(dir) != NULL);
  atexit(fuzz_fini);
  D.cfg.data_dir = dir;
  memcpy(D.secret, "fuzz-http-secret-0123456789", 27);
  D.secret_len = 27;
  snprintf(D.api_key, sizeof D.api_key, "%s", API_KEY);
  im_callbacks cb;
  imd_chat_callbacks(&cb);
  im_config cfg;
  im_config_init(&cfg);
  cfg.max_message = 4096;
  D.base = event_base_new();
  FZ_CHECK(D.base != NULL);
  D.srv = im_server_new(&cfg, &cb, &D);
  FZ_CHECK(D.srv != NULL);
  D.start_wall_ms = imd_wall_ms();
  imd_store_opts so = {.keep_count = 50, .keep_age_s = 0, .no_fsync = true};
  FZ_CHECK(imd_node_start(&D) == 0);
  FZ_CHECK(imd_bans_init(&D, NULL) == 0);
  FZ_CHECK(imd_delivery_init(&D, &so) == 0);
  http_limits lim = {.max_body = (size_t)cfg.max_message * 4 + 4096, .max_header = 4096,
                     .admit = imd_api_admit};
  D.http = http_server_new(D.base, "127.0.0.1:0", &lim, imd_api_handle, &D);
  FZ_CHECK(D.http != NULL);
  port = http_server_port(D.http);
  FZ_CHECK(port > 0);
}

typedef struct client {
  int fd;
  const uint8_t *out;
  size_t out_len, out_off;
  bool shut;
  char *in;
  size_t in_len, in_cap;
  bool eof, timed_out;
  struct event *ev, *timer;
} client;

static void client_cb(evutil_socket_t fd, short what, void *arg) {
  client *c = arg;
  if (what & EV_TIMEOUT) {
    c->timed_out = true;
    event_base_loopbreak(D.base);
    return;
  }
  if ((what & EV_WRITE) && !c->shut) {
    while (c->out_off < c->out_len) {
      ssize_t n = send(fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
      if (n < 0) break; /* EAGAIN, or the server closed: stop writing */
      c->out_off += (size_t)n;
    }
    if (c->out_off == c->out_len || (errno != EAGAIN && errno != EWOULDBLOCK)) {
      shutdown(fd, SHUT_WR);
      c->shut = true;
      event_del(c->ev);
      event_assign(c->ev, D.base, fd, EV_READ | EV_PERSIST, client_cb, c);
      event_add(c->ev, NULL);
    }
  }
  if (what & EV_READ) {
    for (;;) {
      if (c->in_cap - c->in_len < 4096) {
        c->in_cap = c->in_cap ? c->in_cap * 2 : 16384;
        c->in = realloc(c->in, c->in_cap);
        FZ_CHECK(c->in != NULL);
      }
      ssize_t n = recv(fd, c->in + c->in_len, c->in_cap - c->in_len - 1, 0);
      if (n > 0) {
        c->in_len += (size_t)n;
        continue;
      }
      if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK)) {
        c->eof = true;
        event_base_loopbreak(D.base);
      }
      break;
    }
  }
}

static const char *find_header(const char *head, size_t n, const char *name) {
  size_t nl = strlen(name);
  for (const char *p = head; p && p < head + n;) {
    const char *eol = memmem(p, (size_t)(head + n - p), "\r\n", 2);
    if (!eol) return NULL;
    if ((size_t)(eol - p) > nl && !strncasecmp(p, name, nl) && p[nl] == ':') return p + nl + 1;
    p = eol + 2;
  }
  return NULL;
}

/* Check the server's bytes (n of them at b) against the invariants above. */
static void check_responses(const char *b, size_t n, bool has_key, bool any_healthz,
                            bool has_head) {
  size_t off = 0;
  while (off < n) {
    const char *head = b + off;
    const char *end = memmem(head, n - off, "\r\n\r\n", 4);
    FZ_CHECK(end != NULL);
    size_t hl = (size_t)(end - head) + 4;
    FZ_CHECK(hl > 12 && !memcmp(head, "HTTP/1.1 ", 9));
    int status = atoi(head + 9);
    FZ_CHECK(status >= 100 && status <= 599);
    off += hl;
    if (status == 100) continue;
    FZ_CHECK(status >= 200);
    const char *ct = find_header(head, hl, "Content-Type");
    const char *cl = find_header(head, hl, "Content-Length");
    const char *conn = find_header(head, hl, "Connection");
    FZ_CHECK(conn != NULL);
    size_t body_len = 0;
    if (status != 204 && status != 304) {
      FZ_CHECK(ct != NULL && cl != NULL);
      body_len = strtoul(cl, NULL, 10);
    }
    /* the answer to a HEAD has the headers of a GET and no body; imd's
     * bodies never start like a status line */
    if (has_head && (body_len > n - off || (n - off >= 9 && !memcmp(b + off, "HTTP/1.1 ", 9))))
      body_len = 0;
    FZ_CHECK(body_len <= n - off);
    FZ_CHECK(body_len > 0 || status == 204 || status == 304 || has_head);
    const char *body = b + off;
    off += body_len;
    if (ct && body_len && !strncmp(ct + strspn(ct, " "), "application/json", 16)) {
      cJSON *j = cJSON_ParseWithLength(body, body_len);
      FZ_CHECK(j != NULL);
      if (status >= 400) {
        const cJSON *e = cJSON_GetObjectItemCaseSensitive(j, "error");
        FZ_CHECK(cJSON_IsObject(j) && cJSON_IsString(e));
      }
      cJSON_Delete(j);
    }
    if (status / 100 == 2 && !has_key) FZ_CHECK(any_healthz);
    if (!strncasecmp(conn + strspn(conn, " "), "close", 5)) FZ_CHECK(off == n);
  }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static bool ready;
  if (!ready) {
    fuzz_init();
    ready = true;
  }
  if (size < 1) return 0;
  static const char *prefixes[4] = {
      "",
      "POST /v1/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " API_KEY
      "\r\nContent-Type: application/json\r\nContent-Length: ",
      "PUT /v1/groups/g/members HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " API_KEY
      "\r\nContent-Length: ",
      "GET /v1/users/",
  };
  const char *pre = prefixes[data[0] & 3];
  size_t pl = strlen(pre), n = pl + size - 1;
  uint8_t *msg = malloc(n ? n : 1);
  FZ_CHECK(msg != NULL);
  memcpy(msg, pre, pl);
  memcpy(msg + pl, data + 1, size - 1);

  int fd = socket(AF_INET, SOCK_STREAM, 0);
  FZ_CHECK(fd >= 0);
  struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  FZ_CHECK(connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0);
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
  client c = {.fd = fd, .out = msg, .out_len = n};
  c.ev = event_new(D.base, fd, EV_READ | EV_WRITE | EV_PERSIST, client_cb, &c);
  c.timer = evtimer_new(D.base, client_cb, &c);
  FZ_CHECK(c.ev && c.timer);
  struct timeval five = {5, 0};
  event_add(c.ev, NULL);
  evtimer_add(c.timer, &five);
  while (!c.eof && !c.timed_out) event_base_loop(D.base, EVLOOP_ONCE);
  FZ_CHECK(!c.timed_out);
  /* a 2xx without the key is fine only for /healthz (a HEAD or GET of it) */
  bool has_key = memmem(msg, n, API_KEY, strlen(API_KEY)) != NULL;
  bool healthz = memmem(msg, n, "/healthz", 8) != NULL;
  bool head = memmem(msg, n, "HEAD", 4) != NULL;
  if (getenv("FUZZ_HTTP_VERBOSE"))
    fprintf(stderr, "---- sent %zu bytes, got %zu:\n%.*s\n", n, c.in_len, (int)c.in_len,
            c.in ? c.in : "");
  check_responses(c.in ? c.in : "", c.in_len, has_key, healthz, head);
  event_free(c.ev);
  event_free(c.timer);
  close(fd);
  free(c.in);
  free(msg);
  /* let the server finish its side (the close of the accepted socket) */
  event_base_loop(D.base, EVLOOP_NONBLOCK);
  return 0;
}
