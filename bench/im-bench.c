/* im-bench: a load client for the im-echo example server. Plain C11 + POSIX +
 * epoll on one thread with no libim dependency: it speaks WebSocket/JSON and
 * the raw TCP binary framing itself, so it measures the server, not a shared
 * codec. Run several processes for more connections or more client CPU. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* memmem, getopt_long, IP_BIND_ADDRESS_NO_PORT */
#endif
#include <errno.h>
#include <getopt.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define FD_CEILING 20000       /* hard per-process open-file limit on the test hosts */
#define FD_RESERVE 16          /* stdio, epoll, resolver */
#define MAX_SRC 64
#define RBUF_INIT 512
#define RBUF_MAX (1u << 20)
#define SCRATCH_MAX (1u << 18) /* largest frame built; --payload is capped well below */
#define NS_PER_S INT64_C(1000000000)
#define SETUP_TIMEOUT_NS (10 * NS_PER_S)

enum conn_state {
  ST_NEW,        /* not started */
  ST_CONNECTING, /* TCP connect in flight */
  ST_UPGRADING,  /* WebSocket upgrade sent, waiting for 101 */
  ST_AUTHING,    /* waiting for auth_ok */
  ST_READY,      /* authenticated and idle */
  ST_WAITING,    /* echo: msg sent, waiting for the downstream msg */
  ST_CLOSED,
};

/* Server messages the bench reacts to, from either wire format. */
enum msg_op { OP_OTHER, OP_AUTH_OK, OP_ACK, OP_MSG, OP_PONG, OP_ERROR };

/* Binary IMP (raw TCP) op codes and field keys. */
enum { BOP_AUTH = 0x01, BOP_AUTH_OK = 0x02, BOP_MSG = 0x03, BOP_ACK = 0x04,
       BOP_PING = 0x07, BOP_PONG = 0x08, BOP_ERROR = 0x0b };
enum { BKEY_UID = 0x01, BKEY_TOKEN = 0x02, BKEY_DEVICE = 0x03, BKEY_PLATFORM = 0x04,
       BKEY_CID = 0x07, BKEY_ID = 0x08, BKEY_DATA = 0x0f };

typedef struct conn {
  int fd;
  uint8_t state;
  bool authed;
  bool out_armed;      /* EPOLLOUT registered */
  uint32_t idx, seq;   /* connection number (uid suffix), next cid */
  unsigned char *rbuf; /* unparsed input, grown on demand */
  uint32_t rlen, rcap;
  unsigned char *wbuf; /* bytes the socket did not take yet */
  uint32_t wlen, wcap;
  int64_t t_start;     /* setup start, then round-trip start */
  int64_t next_ping;
} conn;

static struct {
  bool echo, tcp, auth_frame, send_ack;
  char host[256], port[16], path[256];
  int nconns, duration_s, hold_s, ping_s, window, payload;
  char uid_prefix[64];
  struct sockaddr_in src[MAX_SRC];
  int nsrc;
} opt = { .nconns = 100, .duration_s = 10, .hold_s = 30, .ping_s = 20,
          .window = 500, .payload = 16 };

static struct {
  int epfd;
  conn *conns;
  struct sockaddr_storage dst;
  socklen_t dst_len;
  int started, in_setup, connected, authed, failed, dropped;
  long errors;
  char first_failure[160];
  uint64_t rng;
  unsigned char scratch[SCRATCH_MAX];
  unsigned char body[SCRATCH_MAX / 2];
  char data_json[SCRATCH_MAX / 4];
  size_t data_len;
} B;

static volatile sig_atomic_t stop_requested;

/* Latency histogram: exact below 128 ns, then 128 linear sub-buckets per power
 * of two (under 0.8 % error); fixed size however long the run. */
#define HIST_SUB_BITS 7
#define HIST_SUB (1u << HIST_SUB_BITS)
#define HIST_BUCKETS (HIST_SUB + (64 - HIST_SUB_BITS) * HIST_SUB)
static struct {
  uint64_t counts[HIST_BUCKETS];
  uint64_t total, max;
} hist;

static int64_t now_ns(void)
{
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * NS_PER_S + ts.tv_nsec;
}

static void die(const char *fmt, ...)
{
  va_list ap;
  va_start(ap, fmt);
  fputs("im-bench: ", stderr);
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
  exit(2);
}

/* xorshift64*: WebSocket keys and masks need only defeat caching proxies,
 * not attackers. */
static uint64_t rng_next(void)
{
  B.rng ^= B.rng >> 12;
  B.rng ^= B.rng << 25;
  B.rng ^= B.rng >> 27;
  return B.rng * UINT64_C(2685821657736338717);
}

static void rng_seed(void)
{
  if (getrandom(&B.rng, sizeof B.rng, 0) != (ssize_t)sizeof B.rng)
    B.rng = (uint64_t)now_ns() ^ ((uint64_t)getpid() << 32);
  B.rng |= 1;
}

static void hist_record(uint64_t v)
{
  uint32_t idx = (uint32_t)v;
  if (v >= HIST_SUB) {
    unsigned e = 63u - (unsigned)__builtin_clzll(v);
    idx = HIST_SUB + (e - HIST_SUB_BITS) * HIST_SUB + (uint32_t)((v >> (e - HIST_SUB_BITS)) - HIST_SUB);
  }
  hist.counts[idx]++;
  hist.total++;
  if (v > hist.max)
    hist.max = v;
}

/* Value at quantile q: the midpoint of the bucket holding it, capped at max. */
static uint64_t hist_quantile(double q)
{
  double rank = q * (double)hist.total;
  uint64_t want = (uint64_t)rank, seen = 0;
  if ((double)want < rank || want == 0)
    want++;
  for (uint32_t i = 0; i < HIST_BUCKETS; i++) {
    seen += hist.counts[i];
    if (seen < want || hist.counts[i] == 0)
      continue;
    uint64_t v = i;
    if (i >= HIST_SUB) {
      unsigned shift = (i - HIST_SUB) / HIST_SUB;
      v = ((uint64_t)(HIST_SUB + (i - HIST_SUB) % HIST_SUB) << shift) + ((UINT64_C(1) << shift) >> 1);
    }
    return v < hist.max ? v : hist.max;
  }
  return hist.max;
}

static void base64(const unsigned char *in, size_t n, char *out)
{
  static const char tab[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  for (size_t i = 0; i < n; i += 3) {
    uint32_t v = (uint32_t)in[i] << 16 | (i + 1 < n ? (uint32_t)in[i + 1] << 8 : 0) |
                 (i + 2 < n ? in[i + 2] : 0);
    *out++ = tab[v >> 18];
    *out++ = tab[(v >> 12) & 63];
    *out++ = i + 1 < n ? tab[(v >> 6) & 63] : '=';
    *out++ = i + 2 < n ? tab[v & 63] : '=';
  }
  *out = '\0';
}

static void conn_arm(conn *c, bool want_out)
{
  struct epoll_event ev = { .events = EPOLLIN | (want_out ? EPOLLOUT : 0), .data.ptr = c };
  if (want_out != c->out_armed && epoll_ctl(B.epfd, EPOLL_CTL_MOD, c->fd, &ev) == 0)
    c->out_armed = want_out;
}

static void conn_close(conn *c, const char *what, int err)
{
  if (c->state == ST_CLOSED)
    return;
  if (c->authed) {
    B.dropped++;
  } else {
    B.failed++;
    B.in_setup--;
    if (B.first_failure[0] == '\0')
      snprintf(B.first_failure, sizeof B.first_failure, "%s%s%s", what,
               err ? ": " : "", err ? strerror(err) : "");
  }
  if (c->fd >= 0)
    close(c->fd);
  c->fd = -1;
  c->state = ST_CLOSED;
  free(c->rbuf);
  free(c->wbuf);
  c->rbuf = c->wbuf = NULL;
}

static void conn_flush(conn *c)
{
  while (c->wlen > 0) {
    ssize_t n = send(c->fd, c->wbuf, c->wlen, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR)
      continue;
    if (n < 0) {
      if (errno != EAGAIN && errno != EWOULDBLOCK)
        conn_close(c, "send", errno);
      break;
    }
    memmove(c->wbuf, c->wbuf + n, c->wlen - (size_t)n);
    c->wlen -= (uint32_t)n;
  }
  if (c->state != ST_CLOSED)
    conn_arm(c, c->wlen > 0);
}

/* Write now if nothing is queued; keep what the socket refuses for EPOLLOUT. */
static void conn_send(conn *c, const void *data, size_t len)
{
  size_t off = 0;
  if (c->state == ST_CLOSED)
    return;
  if (c->wlen == 0) {
    ssize_t n = send(c->fd, data, len, MSG_NOSIGNAL);
    if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
      conn_close(c, "send", errno);
      return;
    }
    off = n > 0 ? (size_t)n : 0;
    if (off == len)
      return;
  }
  if (c->wlen + (len - off) > c->wcap) {
    uint32_t cap = (uint32_t)(c->wlen + (len - off)) * 2;
    unsigned char *p = realloc(c->wbuf, cap);
    if (p == NULL)
      die("out of memory");
    c->wbuf = p;
    c->wcap = cap;
  }
  memcpy(c->wbuf + c->wlen, (const unsigned char *)data + off, len - off);
  c->wlen += (uint32_t)(len - off);
  conn_arm(c, true);
}

/* One unfragmented client frame: always masked, as RFC 6455 requires of clients. */
static void ws_send(conn *c, unsigned opcode, const void *payload, size_t len)
{
  unsigned char *f = B.scratch;
  size_t h = 2;
  uint32_t mask = (uint32_t)rng_next();

  f[0] = (unsigned char)(0x80 | opcode);
  if (len < 126) {
    f[1] = (unsigned char)(0x80 | len);
  } else if (len <= 0xffff) {
    f[1] = 0x80 | 126;
    f[2] = (unsigned char)(len >> 8);
    f[3] = (unsigned char)len;
    h = 4;
  } else {
    f[1] = 0x80 | 127;
    for (int i = 0; i < 8; i++)
      f[2 + i] = (unsigned char)((uint64_t)len >> (56 - 8 * i));
    h = 10;
  }
  memcpy(f + h, &mask, 4);
  for (size_t i = 0; i < len; i++)
    f[h + 4 + i] = ((const unsigned char *)payload)[i] ^ f[h + (i & 3)];
  conn_send(c, f, h + 4 + len);
}

static void ws_send_upgrade(conn *c)
{
  uint64_t key[2] = { rng_next(), rng_next() };
  char key64[32], req[1024];
  int n = snprintf(req, sizeof req, "GET %s", opt.path);

  /* Authenticating in the URL saves a round trip per connection. */
  if (!opt.auth_frame)
    n += snprintf(req + n, sizeof req - (size_t)n, "%cuid=%s%u&token=t&device=d1&platform=bench",
                  strchr(opt.path, '?') ? '&' : '?', opt.uid_prefix, c->idx);
  base64((const unsigned char *)key, sizeof key, key64);
  n += snprintf(req + n, sizeof req - (size_t)n,
                " HTTP/1.1\r\nHost: %s:%s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n"
                "Sec-WebSocket-Protocol: imp.json\r\n\r\n",
                opt.host, opt.port, key64);
  conn_send(c, req, (size_t)n);
}

/* The string value of "name" in a flat JSON object. Enough for the server's
 * replies: the echoed data is ours and carries no such keys. */
static const char *json_str(const char *s, size_t len, const char *name, size_t *vlen)
{
  size_t nl = strlen(name);
  const char *end = s + len;
  for (const char *p = s; p + nl + 2 < end; p++) {
    if (p[0] != '"' || memcmp(p + 1, name, nl) != 0 || p[nl + 1] != '"')
      continue;
    p += nl + 2;
    while (p < end && (*p == ' ' || *p == ':' || *p == '\t'))
      p++;
    if (p >= end || *p != '"')
      return NULL;
    const char *v = ++p, *q = memchr(v, '"', (size_t)(end - v));
    if (q == NULL)
      return NULL;
    *vlen = (size_t)(q - v);
    return v;
  }
  return NULL;
}

static enum msg_op json_op(const char *s, size_t len)
{
  static const struct { const char *name; enum msg_op op; } ops[] = {
    {"auth_ok", OP_AUTH_OK}, {"ack", OP_ACK}, {"msg", OP_MSG}, {"pong", OP_PONG}, {"error", OP_ERROR},
  };
  size_t n;
  const char *v = json_str(s, len, "op", &n);
  for (size_t i = 0; v != NULL && i < sizeof ops / sizeof ops[0]; i++)
    if (strlen(ops[i].name) == n && memcmp(ops[i].name, v, n) == 0)
      return ops[i].op;
  return OP_OTHER;
}

/* Raw TCP frames are u32 BE length | u8 op | fields; a field is u8 key |
 * uvarint (LEB128) length | bytes. */
static size_t put_field(unsigned char *p, unsigned key, const void *v, size_t len)
{
  size_t o = 0;
  p[o++] = (unsigned char)key;
  for (size_t l = len;; l >>= 7) {
    p[o++] = (unsigned char)((l & 0x7f) | (l > 0x7f ? 0x80 : 0));
    if (l <= 0x7f)
      break;
  }
  memcpy(p + o, v, len);
  return o + len;
}

static void tcp_send(conn *c, unsigned op, const unsigned char *fields, size_t len)
{
  unsigned char *f = B.scratch;
  uint32_t flen = (uint32_t)(len + 1);
  f[0] = (unsigned char)(flen >> 24);
  f[1] = (unsigned char)(flen >> 16);
  f[2] = (unsigned char)(flen >> 8);
  f[3] = (unsigned char)flen;
  f[4] = (unsigned char)op;
  if (len > 0)
    memcpy(f + 5, fields, len);
  conn_send(c, f, len + 5);
}

/* Field `key` of a binary IMP payload; NULL if absent or malformed. */
static const unsigned char *bin_field(const unsigned char *p, size_t len, unsigned key, size_t *vlen)
{
  size_t i = 0;
  while (i < len) {
    unsigned k = p[i++];
    uint64_t l = 0;
    for (unsigned shift = 0;; shift += 7) {
      if (i >= len || shift > 28)
        return NULL;
      l |= (uint64_t)(p[i] & 0x7f) << shift;
      if (!(p[i++] & 0x80))
        break;
    }
    if (l > len - i)
      return NULL;
    if (k == key) {
      *vlen = (size_t)l;
      return p + i;
    }
    i += (size_t)l;
  }
  return NULL;
}

static void send_auth(conn *c)
{
  char uid[96];
  int ul = snprintf(uid, sizeof uid, "%s%u", opt.uid_prefix, c->idx);
  if (opt.tcp) {
    size_t n = put_field(B.body, BKEY_UID, uid, (size_t)ul);
    n += put_field(B.body + n, BKEY_TOKEN, "t", 1);
    n += put_field(B.body + n, BKEY_DEVICE, "d1", 2);
    n += put_field(B.body + n, BKEY_PLATFORM, "bench", 5);
    tcp_send(c, BOP_AUTH, B.body, n);
  } else {
    int n = snprintf((char *)B.body, sizeof B.body, "{\"op\":\"auth\",\"uid\":\"%s\",\"token\":\"t\","
                     "\"device\":\"d1\",\"platform\":\"bench\"}", uid);
    ws_send(c, 1, B.body, (size_t)n);
  }
}

static void send_msg(conn *c)
{
  char cid[16];
  int cl = snprintf(cid, sizeof cid, "c%u", c->seq++);
  if (opt.tcp) {
    size_t n = put_field(B.body, BKEY_CID, cid, (size_t)cl);
    n += put_field(B.body + n, BKEY_DATA, B.data_json, B.data_len);
    tcp_send(c, BOP_MSG, B.body, n);
  } else {
    int n = snprintf((char *)B.body, sizeof B.body, "{\"op\":\"msg\",\"cid\":\"%s\",\"data\":%s}",
                     cid, B.data_json);
    ws_send(c, 1, B.body, (size_t)n);
  }
  c->state = ST_WAITING;
  c->t_start = now_ns();
}

static void send_ack(conn *c, const void *id, size_t idlen)
{
  if (idlen > 256)
    return;
  if (opt.tcp) {
    tcp_send(c, BOP_ACK, B.body, put_field(B.body, BKEY_ID, id, idlen));
  } else {
    int n = snprintf((char *)B.body, sizeof B.body, "{\"op\":\"ack\",\"id\":\"%.*s\"}", (int)idlen,
                     (const char *)id);
    ws_send(c, 1, B.body, (size_t)n);
  }
}

static void on_message(conn *c, enum msg_op op, const void *id, size_t idlen, int64_t deadline)
{
  if (op == OP_ERROR)
    B.errors++;
  if (c->state == ST_AUTHING) {
    if (op != OP_AUTH_OK) {
      conn_close(c, "auth rejected", 0);
      return;
    }
    c->authed = true;
    c->state = ST_READY;
    c->next_ping = now_ns() + opt.ping_s * NS_PER_S;
    B.authed++;
    B.in_setup--;
    return;
  }
  /* The ack carries no payload; the round trip ends with the echoed msg. */
  if (op != OP_MSG || c->state != ST_WAITING)
    return;
  int64_t t = now_ns();
  hist_record((uint64_t)(t - c->t_start));
  if (opt.send_ack && id != NULL)
    send_ack(c, id, idlen);
  c->state = ST_READY;
  if (t < deadline && !stop_requested)
    send_msg(c);
}

/* Length of the complete TCP frame at p, 0 if incomplete, -1 if invalid. */
static long tcp_frame(conn *c, unsigned char *p, size_t avail, int64_t deadline)
{
  static const enum msg_op ops[256] = {
    [BOP_AUTH_OK] = OP_AUTH_OK, [BOP_MSG] = OP_MSG, [BOP_ACK] = OP_ACK,
    [BOP_PONG] = OP_PONG, [BOP_ERROR] = OP_ERROR,
  };
  if (avail < 4)
    return 0;
  uint32_t flen = (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
  if (flen == 0 || flen > RBUF_MAX - 4)
    return -1;
  if (avail < 4 + (size_t)flen)
    return 0;
  size_t idlen = 0;
  const unsigned char *id = bin_field(p + 5, flen - 1, BKEY_ID, &idlen);
  on_message(c, ops[p[4]], id, idlen, deadline);
  return 4 + (long)flen;
}

/* Length of the complete WebSocket frame at p, 0 if incomplete, -1 if invalid.
 * Servers do not mask, but unmasking costs nothing and tolerates one that does. */
static long ws_frame(conn *c, unsigned char *p, size_t avail, int64_t deadline)
{
  unsigned opcode = p[0] & 0x0f;
  uint64_t plen = avail >= 2 ? p[1] & 0x7f : 0;
  size_t h = plen == 126 ? 4 : plen == 127 ? 10 : 2;

  if (avail < 2 || avail < h)
    return 0;
  if (h > 2)
    plen = 0;
  for (size_t i = 2; i < h; i++)
    plen = plen << 8 | p[i];
  h += p[1] & 0x80 ? 4 : 0;
  if (plen > RBUF_MAX - h || !(p[0] & 0x80) || opcode == 0 || opcode == 8)
    return -1; /* oversized, fragmented (unused by im-echo), or close */
  if (avail < h + plen)
    return 0;
  unsigned char *pl = p + h;
  for (size_t i = 0; (p[1] & 0x80) && i < plen; i++)
    pl[i] ^= p[h - 4 + (i & 3)];
  if (opcode == 9) {
    ws_send(c, 10, pl, (size_t)plen);
  } else if (opcode == 1 || opcode == 2) {
    size_t idlen = 0;
    const char *id = json_str((const char *)pl, (size_t)plen, "id", &idlen);
    on_message(c, json_op((const char *)pl, (size_t)plen), id, idlen, deadline);
  }
  return (long)(h + plen);
}

/* Consumes every complete unit in rbuf: the HTTP 101 response, then frames. */
static void process_input(conn *c, int64_t deadline)
{
  size_t off = 0;

  if (c->state == ST_UPGRADING) {
    const unsigned char *end = memmem(c->rbuf, c->rlen, "\r\n\r\n", 4);
    if (end == NULL) {
      if (c->rlen >= 8192)
        conn_close(c, "oversized upgrade response", 0);
      return;
    }
    if (memcmp(c->rbuf, "HTTP/1.", 7) != 0 || memcmp(c->rbuf + 8, " 101 ", 5) != 0) {
      conn_close(c, "upgrade refused (status not 101)", 0);
      return;
    }
    off = (size_t)(end - c->rbuf) + 4;
    c->state = ST_AUTHING;
    if (opt.auth_frame)
      send_auth(c);
  }
  while (c->state != ST_CLOSED && off < c->rlen) {
    long n = (opt.tcp ? tcp_frame : ws_frame)(c, c->rbuf + off, c->rlen - off, deadline);
    if (n < 0)
      conn_close(c, opt.tcp ? "bad tcp frame" : "ws frame: close, fragmented or oversized", 0);
    if (n <= 0)
      break;
    off += (size_t)n;
  }
  if (c->state != ST_CLOSED && off > 0) {
    memmove(c->rbuf, c->rbuf + off, c->rlen - off);
    c->rlen -= (uint32_t)off;
  }
}

static void on_readable(conn *c, int64_t deadline)
{
  for (;;) {
    if (c->rlen == c->rcap) {
      uint32_t cap = c->rcap ? c->rcap * 2 : RBUF_INIT;
      unsigned char *p = cap <= RBUF_MAX ? realloc(c->rbuf, cap) : NULL;
      if (p == NULL) {
        conn_close(c, "input buffer overflow", 0);
        return;
      }
      c->rbuf = p;
      c->rcap = cap;
    }
    ssize_t n = recv(c->fd, c->rbuf + c->rlen, c->rcap - c->rlen, 0);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0) {
      if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK))
        conn_close(c, n == 0 ? "closed by server" : "recv", n == 0 ? 0 : errno);
      return;
    }
    c->rlen += (uint32_t)n;
    bool filled = c->rlen == c->rcap;
    process_input(c, deadline);
    /* A short read drained the socket; level-triggered epoll covers the rest. */
    if (c->state == ST_CLOSED || !filled)
      return;
  }
}

static void on_connected(conn *c)
{
  int err = 0;
  socklen_t len = sizeof err;
  if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
    err = errno;
  if (err != 0) {
    conn_close(c, "connect", err);
    return;
  }
  B.connected++;
  c->state = opt.tcp ? ST_AUTHING : ST_UPGRADING;
  conn_arm(c, false);
  if (opt.tcp)
    send_auth(c);
  else
    ws_send_upgrade(c);
}

static void conn_start(conn *c)
{
  int one = 1;
  struct epoll_event ev = { .events = EPOLLIN | EPOLLOUT, .data.ptr = c };

  B.started++;
  B.in_setup++;
  c->t_start = now_ns();
  c->state = ST_CONNECTING;
  c->fd = socket(B.dst.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (c->fd < 0) {
    conn_close(c, "socket", errno);
    return;
  }
  setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  if (opt.nsrc > 0) {
    int s = (int)(c->idx % (uint32_t)opt.nsrc);
#ifdef IP_BIND_ADDRESS_NO_PORT
    /* Defer the port choice to connect() so ports are unique per 4-tuple,
     * not per source address: that is what lifts the ~28k ceiling. */
    setsockopt(c->fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
#endif
    if (bind(c->fd, (struct sockaddr *)&opt.src[s], sizeof opt.src[s]) < 0) {
      conn_close(c, "bind", errno);
      return;
    }
  }
  if (connect(c->fd, (struct sockaddr *)&B.dst, B.dst_len) < 0 && errno != EINPROGRESS)
    conn_close(c, "connect", errno);
  else if (epoll_ctl(B.epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0)
    conn_close(c, "epoll_ctl", errno);
  else
    c->out_armed = true;
}

static void usage(FILE *f)
{
  fputs("usage:\n"
        "  im-bench hold --url ws://HOST:PORT/ws -n N [--src IP,IP,...] [--hold-seconds S]\n"
        "  im-bench echo --url ws://HOST:PORT/ws -c N [-d SECONDS] [--tcp HOST:PORT]\n"
        "\n"
        "hold: open N connections, authenticate, keep them idle with an {\"op\":\"ping\"}\n"
        "      every --ping-seconds, print 'connected N authed N failed N' once all are\n"
        "      settled, then hold them S seconds (default 30) or until SIGTERM/SIGINT.\n"
        "echo: N connections each sending msg and waiting for its echo, in a closed\n"
        "      loop for D seconds (default 10) counted once all are authenticated;\n"
        "      prints round trips/s, latency percentiles and a 'RESULT k=v ...' line.\n"
        "\n"
        "  --url URL         WebSocket endpoint (ws://IPV4-OR-NAME:PORT/PATH, imp.json)\n"
        "  --tcp HOST:PORT   raw TCP binary framing instead of WebSocket\n"
        "  -n, -c N          connections in this process (at most ~19,980)\n"
        "  --src IP[,IP...]  IPv4 source addresses used round-robin (more ports per target)\n"
        "  --window N        connection setups in flight at once (default 500)\n"
        "  --hold-seconds S  hold: time to hold after setup (default 30)\n"
        "  --ping-seconds S  hold: keepalive interval (default 20)\n"
        "  -d SECONDS        echo: measured duration (default 10)\n"
        "  --payload BYTES   echo: length of the echoed data string (default 16)\n"
        "  --ack             echo: acknowledge each downstream msg\n"
        "  --auth-frame      WebSocket: authenticate with an auth message, not the URL\n"
        "  --uid-prefix P    uids are P<index> (default u<pid>-)\n",
        f);
}

/* HOST:PORT, or HOST with default_port, into opt.host / opt.port. */
static void parse_hostport(const char *s, size_t len, const char *default_port)
{
  const char *colon = memrchr(s, ':', len);
  size_t hl = colon ? (size_t)(colon - s) : len;
  int pl = (int)(colon ? len - hl - 1 : strlen(default_port));

  if (hl == 0 || hl >= sizeof opt.host || pl == 0 || pl >= (int)sizeof opt.port)
    die("bad address '%.*s' (HOST:PORT)", (int)len, s);
  memcpy(opt.host, s, hl);
  opt.host[hl] = '\0';
  snprintf(opt.port, sizeof opt.port, "%.*s", pl, colon ? colon + 1 : default_port);
}

static void parse_url(const char *url)
{
  const char *rest = url + 5, *slash;
  if (strncmp(url, "ws://", 5) != 0)
    die("only ws:// URLs are supported: '%s'", url);
  slash = strchr(rest, '/');
  parse_hostport(rest, slash ? (size_t)(slash - rest) : strlen(rest), "80");
  if (snprintf(opt.path, sizeof opt.path, "%s", slash ? slash : "/") >= (int)sizeof opt.path)
    die("URL path too long");
}

static void parse_src(char *list)
{
  for (char *save = NULL, *tok = strtok_r(list, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
    if (opt.nsrc == MAX_SRC)
      die("too many --src addresses (max %d)", MAX_SRC);
    opt.src[opt.nsrc].sin_family = AF_INET;
    if (inet_pton(AF_INET, tok, &opt.src[opt.nsrc++].sin_addr) != 1)
      die("bad --src address '%s' (IPv4)", tok);
  }
}

static int parse_int(const char *s, int lo, int hi, const char *what)
{
  char *end;
  long v = strtol(s, &end, 10);
  if (*s == '\0' || *end != '\0' || v < lo || v > hi)
    die("bad %s '%s' (%d..%d)", what, s, lo, hi);
  return (int)v;
}

static void parse_args(int argc, char **argv)
{
  static const struct option longopts[] = {
    {"url", 1, NULL, 'u'}, {"tcp", 1, NULL, 't'}, {"src", 1, NULL, 's'},
    {"window", 1, NULL, 'w'}, {"hold-seconds", 1, NULL, 'H'}, {"ping-seconds", 1, NULL, 'P'},
    {"payload", 1, NULL, 'p'}, {"uid-prefix", 1, NULL, 'U'}, {"ack", 0, NULL, 'a'},
    {"auth-frame", 0, NULL, 'A'}, {"help", 0, NULL, 'h'}, {NULL, 0, NULL, 0},
  };
  const char *url = NULL, *tcp = NULL;
  int ch;

  if (argc < 2 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0) {
    usage(argc < 2 ? stderr : stdout);
    exit(argc < 2 ? 2 : 0);
  }
  if (strcmp(argv[1], "hold") != 0 && strcmp(argv[1], "echo") != 0)
    die("unknown mode '%s' (hold or echo; --help for usage)", argv[1]);
  opt.echo = strcmp(argv[1], "echo") == 0;
  snprintf(opt.uid_prefix, sizeof opt.uid_prefix, "u%ld-", (long)getpid());

  /* The mode word plays argv[0] for getopt. */
  while ((ch = getopt_long(argc - 1, argv + 1, "n:c:d:h", longopts, NULL)) != -1) {
    switch (ch) {
    case 'u': url = optarg; break;
    case 't': tcp = optarg; break;
    case 's': parse_src(optarg); break;
    case 'n': case 'c': opt.nconns = parse_int(optarg, 1, FD_CEILING, "connection count"); break;
    case 'w': opt.window = parse_int(optarg, 1, FD_CEILING, "window"); break;
    case 'H': opt.hold_s = parse_int(optarg, 0, 7 * 86400, "hold seconds"); break;
    case 'P': opt.ping_s = parse_int(optarg, 1, 86400, "ping seconds"); break;
    case 'd': opt.duration_s = parse_int(optarg, 1, 86400, "duration"); break;
    case 'p': opt.payload = parse_int(optarg, 0, (int)sizeof B.data_json - 16, "payload"); break;
    case 'U': snprintf(opt.uid_prefix, sizeof opt.uid_prefix, "%s", optarg); break;
    case 'a': opt.send_ack = true; break;
    case 'A': opt.auth_frame = true; break;
    case 'h': usage(stdout); exit(0);
    default: die("bad option (--help for usage)");
    }
  }
  if (optind < argc - 1)
    die("unexpected argument '%s'", argv[optind + 1]);
  opt.tcp = tcp != NULL; /* --tcp selects the transport even next to --url */
  if (tcp != NULL)
    parse_hostport(tcp, strlen(tcp), "");
  else if (url != NULL)
    parse_url(url);
  else
    die("--url or --tcp is required");
}

static void on_signal(int sig)
{
  (void)sig;
  stop_requested = 1;
}

static void setup(void)
{
  struct rlimit rl = { .rlim_cur = FD_CEILING, .rlim_max = FD_CEILING };
  struct addrinfo hints = { .ai_family = AF_INET, .ai_socktype = SOCK_STREAM }, *ai;
  struct sigaction sa = { .sa_handler = on_signal };
  int rc, limit;

  if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    getrlimit(RLIMIT_NOFILE, &rl);
  }
  limit = rl.rlim_cur < FD_CEILING ? (int)rl.rlim_cur : FD_CEILING;
  if (opt.nconns > limit - FD_RESERVE)
    die("%d connections need more than the %d open files allowed per process; "
        "run several processes with at most %d each", opt.nconns, limit, limit - FD_RESERVE);

  if ((rc = getaddrinfo(opt.host, opt.port, &hints, &ai)) != 0)
    die("resolve %s:%s: %s", opt.host, opt.port, gai_strerror(rc));
  memcpy(&B.dst, ai->ai_addr, ai->ai_addrlen);
  B.dst_len = ai->ai_addrlen;
  freeaddrinfo(ai);

  memcpy(B.data_json, "{\"p\":\"", 6);
  for (int i = 0; i < opt.payload; i++)
    B.data_json[6 + i] = (char)('a' + i % 26);
  memcpy(B.data_json + 6 + opt.payload, "\"}", 3);
  B.data_len = 6 + (size_t)opt.payload + 2;

  if ((B.conns = calloc((size_t)opt.nconns, sizeof *B.conns)) == NULL)
    die("out of memory");
  for (int i = 0; i < opt.nconns; i++) {
    B.conns[i].fd = -1;
    B.conns[i].idx = (uint32_t)i;
  }
  if ((B.epfd = epoll_create1(EPOLL_CLOEXEC)) < 0)
    die("epoll_create1: %s", strerror(errno));
  sigemptyset(&sa.sa_mask);
  sigaction(SIGTERM, &sa, NULL);
  sigaction(SIGINT, &sa, NULL);
  signal(SIGPIPE, SIG_IGN);
}

/* Once a second: time out stuck setups and send the keepalives that are due. */
static void housekeeping(int64_t t)
{
  for (int i = 0; i < opt.nconns; i++) {
    conn *c = &B.conns[i];
    if (c->state >= ST_CONNECTING && c->state <= ST_AUTHING && t - c->t_start > SETUP_TIMEOUT_NS) {
      conn_close(c, "setup timed out", 0);
    } else if (!opt.echo && c->state == ST_READY && t >= c->next_ping) {
      /* An application ping, which surely counts as activity for the idle timer. */
      if (opt.tcp)
        tcp_send(c, BOP_PING, NULL, 0);
      else
        ws_send(c, 1, "{\"op\":\"ping\"}", 13);
      c->next_ping = t + opt.ping_s * NS_PER_S;
    }
  }
}

static void print_results(int64_t phase_ns)
{
  double secs = (double)phase_ns / 1e9;
  int open_now = 0;

  for (int i = 0; i < opt.nconns; i++)
    open_now += B.conns[i].state == ST_READY || B.conns[i].state == ST_WAITING;
  if (!opt.echo) {
    printf("RESULT mode=hold conns=%d connected=%d authed=%d failed=%d dropped=%d open=%d "
           "held_s=%.1f errors=%ld\n", opt.nconns, B.connected, B.authed, B.failed, B.dropped,
           open_now, secs, B.errors);
    return;
  }
  double rtps = secs > 0 ? (double)hist.total / secs : 0;
  double p50 = (double)hist_quantile(0.50) / 1e3, p90 = (double)hist_quantile(0.90) / 1e3;
  double p99 = (double)hist_quantile(0.99) / 1e3, p999 = (double)hist_quantile(0.999) / 1e3;
  double max = (double)hist.max / 1e3;
  const char *transport = opt.tcp ? "tcp" : "ws";

  printf("round trips %llu in %.2f s: %.0f rt/s over %d connections (%s)\n",
         (unsigned long long)hist.total, secs, rtps, open_now, transport);
  printf("latency us: p50 %.1f  p90 %.1f  p99 %.1f  p99.9 %.1f  max %.1f\n", p50, p90, p99, p999, max);
  printf("RESULT mode=echo transport=%s conns=%d rts=%llu secs=%.3f rtps=%.0f p50_us=%.1f "
         "p90_us=%.1f p99_us=%.1f p999_us=%.1f max_us=%.1f failed=%d dropped=%d errors=%ld\n",
         transport, B.authed, (unsigned long long)hist.total, secs, rtps, p50, p90, p99, p999, max,
         B.failed, B.dropped, B.errors);
}

int main(int argc, char **argv)
{
  static struct epoll_event evs[1024];
  int64_t t0 = now_ns(), next_tick = t0, phase_start = 0, deadline = 0;
  bool settled = false;

  parse_args(argc, argv);
  rng_seed();
  setup();

  while (!stop_requested) {
    int64_t t = now_ns();

    /* Setups run in a sliding window so a slow accept queue is not flooded. */
    while (B.started < opt.nconns && B.in_setup < opt.window)
      conn_start(&B.conns[B.started]);
    if (!settled && B.started == opt.nconns && B.in_setup == 0) {
      settled = true;
      phase_start = t;
      printf("connected %d authed %d failed %d\n", B.connected, B.authed, B.failed);
      fflush(stdout);
      if (B.first_failure[0] != '\0')
        fprintf(stderr, "first failure: %s\n", B.first_failure);
      deadline = t + opt.duration_s * NS_PER_S;
      for (int i = 0; opt.echo && i < opt.nconns; i++)
        if (B.conns[i].state == ST_READY)
          send_msg(&B.conns[i]);
    }
    if (settled && t - phase_start >= (opt.echo ? opt.duration_s : opt.hold_s) * NS_PER_S)
      break;
    if (t >= next_tick) {
      housekeeping(t);
      if (!settled)
        fprintf(stderr, "[%5.1fs] started %d connected %d authed %d failed %d\n",
                (double)(t - t0) / 1e9, B.started, B.connected, B.authed, B.failed);
      next_tick = t + NS_PER_S;
    }

    int n = epoll_wait(B.epfd, evs, (int)(sizeof evs / sizeof evs[0]), 100);
    if (n < 0 && errno != EINTR)
      die("epoll_wait: %s", strerror(errno));
    for (int i = 0; i < n; i++) {
      conn *c = evs[i].data.ptr;
      if (c->state == ST_CONNECTING) {
        on_connected(c);
        continue;
      }
      if (c->state != ST_CLOSED && (evs[i].events & EPOLLOUT))
        conn_flush(c);
      if (c->state != ST_CLOSED && (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)))
        on_readable(c, settled && opt.echo ? deadline : 0);
    }
  }
  if (!settled)
    printf("connected %d authed %d failed %d\n", B.connected, B.authed, B.failed);
  print_results(settled ? now_ns() - phase_start : 0);
  return 0;
}
