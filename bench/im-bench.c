/* im-bench: a load client for the im-echo example server. Plain C11 + POSIX +
 * epoll on one thread with no libim dependency: it speaks WebSocket/JSON and
 * the raw TCP binary framing itself, so it measures the server, not a shared
 * codec. Run several processes for more connections or more client CPU. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* memmem, IP_BIND_ADDRESS_NO_PORT */
#endif
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define FD_CEILING 20000          /* hard per-process open-file limit on the test hosts */
#define FD_RESERVE 16             /* stdio, epoll, resolver */
#define MAX_SRC 64
#define RBUF_INIT 512
#define RBUF_MAX (1u << 20)
#define SCRATCH_MAX (1u << 18)    /* largest frame we build: payload is capped below it */
#define NS_PER_S INT64_C(1000000000)
#define SETUP_TIMEOUT_NS (10 * NS_PER_S)

enum mode { MODE_HOLD, MODE_ECHO };

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
  bool out_armed;          /* EPOLLOUT registered */
  uint32_t idx;
  uint32_t seq;            /* next cid */
  unsigned char *rbuf;
  uint32_t rlen, rcap;
  unsigned char *wbuf;     /* bytes the socket did not take yet */
  uint32_t wlen, wcap;
  int64_t t_start;         /* setup start, then round-trip start */
  int64_t next_ping;
} conn;

static struct {
  enum mode mode;
  bool tcp;
  char host[256], port[16], path[512];
  int nconns;
  int duration_s;
  int hold_s, ping_s, window, payload;
  bool auth_frame, send_ack;
  char uid_prefix[64];
  struct sockaddr_storage src[MAX_SRC];
  socklen_t src_len[MAX_SRC];
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
  char data_json[SCRATCH_MAX / 2];
  int data_len;
} B;

static volatile sig_atomic_t stop_requested;

/* Latency histogram: exact below 128 ns, then 128 linear sub-buckets per power
 * of two (under 0.8 % error), fixed size whatever the run length. */
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

/* xorshift64*: WebSocket keys and masks only need to be unpredictable to
 * caches and proxies, not cryptographically strong. */
static uint64_t rng_next(void)
{
  B.rng ^= B.rng >> 12;
  B.rng ^= B.rng << 25;
  B.rng ^= B.rng >> 27;
  return B.rng * UINT64_C(2685821657736338717);
}

static void rng_seed(void)
{
  int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
  if (fd < 0 || read(fd, &B.rng, sizeof B.rng) != (ssize_t)sizeof B.rng)
    B.rng = (uint64_t)now_ns() ^ ((uint64_t)getpid() << 32);
  if (fd >= 0)
    close(fd);
  if (B.rng == 0)
    B.rng = 1;
}

static void hist_record(uint64_t v)
{
  uint32_t idx = (uint32_t)v;
  if (v >= HIST_SUB) {
    unsigned e = 63u - (unsigned)__builtin_clzll(v);
    uint64_t sub = (v >> (e - HIST_SUB_BITS)) - HIST_SUB;
    idx = HIST_SUB + (e - HIST_SUB_BITS) * HIST_SUB + (uint32_t)sub;
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
    if (seen >= want && hist.counts[i] > 0) {
      uint64_t v = i;
      if (i >= HIST_SUB) {
        unsigned shift = (i - HIST_SUB) / HIST_SUB;
        uint64_t sub = (i - HIST_SUB) % HIST_SUB;
        v = ((HIST_SUB + sub) << shift) + ((UINT64_C(1) << shift) >> 1);
      }
      return v < hist.max ? v : hist.max;
    }
  }
  return hist.max;
}

static size_t base64(const unsigned char *in, size_t n, char *out)
{
  static const char tab[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  size_t o = 0;
  for (size_t i = 0; i < n; i += 3) {
    uint32_t v = (uint32_t)in[i] << 16;
    if (i + 1 < n) v |= (uint32_t)in[i + 1] << 8;
    if (i + 2 < n) v |= in[i + 2];
    out[o++] = tab[v >> 18];
    out[o++] = tab[(v >> 12) & 63];
    out[o++] = i + 1 < n ? tab[(v >> 6) & 63] : '=';
    out[o++] = i + 2 < n ? tab[v & 63] : '=';
  }
  out[o] = '\0';
  return o;
}

/* ---- connection plumbing ---- */

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
  c->rlen = c->rcap = c->wlen = c->wcap = 0;
}

static void conn_flush(conn *c)
{
  while (c->wlen > 0) {
    ssize_t n = send(c->fd, c->wbuf, c->wlen, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR)
        continue;
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

/* ---- WebSocket (client side: masked frames out, unmasked frames in) ---- */

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
  if (h + 4 + len > sizeof B.scratch)
    die("frame too large");
  memcpy(f + h, &mask, 4);
  for (size_t i = 0; i < len; i++)
    f[h + 4 + i] = ((const unsigned char *)payload)[i] ^ f[h + (i & 3)];
  conn_send(c, f, h + 4 + len);
}

static void ws_send_upgrade(conn *c)
{
  unsigned char key[16];
  char key64[32], req[1024];
  int n;

  for (int i = 0; i < 16; i += 8) {
    uint64_t r = rng_next();
    memcpy(key + i, &r, 8);
  }
  base64(key, sizeof key, key64);
  if (opt.auth_frame)
    n = snprintf(req, sizeof req, "GET %s HTTP/1.1\r\n", opt.path);
  else
    n = snprintf(req, sizeof req,
                 "GET %s%cuid=%s%u&token=t&device=d1&platform=bench HTTP/1.1\r\n",
                 opt.path, strchr(opt.path, '?') ? '&' : '?', opt.uid_prefix, c->idx);
  n += snprintf(req + n, sizeof req - (size_t)n,
                "Host: %s:%s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n"
                "Sec-WebSocket-Protocol: imp.json\r\n\r\n",
                opt.host, opt.port, key64);
  conn_send(c, req, (size_t)n);
}

/* Extract the string value of "name" from a flat JSON object. Good enough for
 * the server's replies: the echoed data is ours and carries no such keys. */
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
    const char *v = ++p;
    while (p < end && *p != '"')
      p++;
    if (p >= end)
      return NULL;
    *vlen = (size_t)(p - v);
    return v;
  }
  return NULL;
}

static enum msg_op json_op(const char *s, size_t len)
{
  size_t n;
  const char *v = json_str(s, len, "op", &n);
  static const struct { const char *name; enum msg_op op; } ops[] = {
    {"auth_ok", OP_AUTH_OK}, {"ack", OP_ACK}, {"msg", OP_MSG},
    {"pong", OP_PONG}, {"error", OP_ERROR},
  };
  for (size_t i = 0; v != NULL && i < sizeof ops / sizeof ops[0]; i++)
    if (strlen(ops[i].name) == n && memcmp(ops[i].name, v, n) == 0)
      return ops[i].op;
  return OP_OTHER;
}

/* ---- raw TCP: u32 BE length | u8 op | fields (u8 key | uvarint len | bytes) ---- */

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
    memmove(f + 5, fields, len);
  conn_send(c, f, len + 5);
}

/* Finds field `key` in a binary IMP payload; NULL if absent or malformed. */
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

/* ---- protocol actions ---- */

static void send_auth(conn *c)
{
  char uid[96];
  int ul = snprintf(uid, sizeof uid, "%s%u", opt.uid_prefix, c->idx);
  if (opt.tcp) {
    unsigned char f[256];
    size_t n = put_field(f, BKEY_UID, uid, (size_t)ul);
    n += put_field(f + n, BKEY_TOKEN, "t", 1);
    n += put_field(f + n, BKEY_DEVICE, "d1", 2);
    n += put_field(f + n, BKEY_PLATFORM, "bench", 5);
    tcp_send(c, BOP_AUTH, f, n);
  } else {
    char j[256];
    int n = snprintf(j, sizeof j,
                     "{\"op\":\"auth\",\"uid\":\"%s\",\"token\":\"t\",\"device\":\"d1\",\"platform\":\"bench\"}",
                     uid);
    ws_send(c, 1, j, (size_t)n);
  }
}

static void send_ping(conn *c)
{
  if (opt.tcp)
    tcp_send(c, BOP_PING, NULL, 0);
  else
    ws_send(c, 1, "{\"op\":\"ping\"}", 13);
}

static void send_msg(conn *c)
{
  char cid[16];
  int cl = snprintf(cid, sizeof cid, "c%u", c->seq++);
  static unsigned char body[SCRATCH_MAX / 2 + 64];
  size_t n;

  if (opt.tcp) {
    n = put_field(body, BKEY_CID, cid, (size_t)cl);
    n += put_field(body + n, BKEY_DATA, B.data_json, (size_t)B.data_len);
    tcp_send(c, BOP_MSG, body, n);
  } else {
    n = (size_t)snprintf((char *)body, sizeof body, "{\"op\":\"msg\",\"cid\":\"%s\",\"data\":%s}",
                         cid, B.data_json);
    ws_send(c, 1, body, n);
  }
  c->state = ST_WAITING;
  c->t_start = now_ns();
}

static void send_ack(conn *c, const void *id, size_t idlen)
{
  if (idlen > 256)
    return;
  if (opt.tcp) {
    unsigned char f[300];
    tcp_send(c, BOP_ACK, f, put_field(f, BKEY_ID, id, idlen));
  } else {
    char j[320];
    int n = snprintf(j, sizeof j, "{\"op\":\"ack\",\"id\":\"%.*s\"}", (int)idlen, (const char *)id);
    ws_send(c, 1, j, (size_t)n);
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
  if (op != OP_MSG || c->state != ST_WAITING)
    return;
  int64_t t = now_ns();
  hist_record((uint64_t)(t - c->t_start));
  if (opt.send_ack && id != NULL)
    send_ack(c, id, idlen);
  c->state = ST_READY;
  if (deadline != 0 && t < deadline && !stop_requested)
    send_msg(c);
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
    if (c->rlen < 12 || memcmp(c->rbuf, "HTTP/1.", 7) != 0 || memcmp(c->rbuf + 8, " 101", 4) != 0) {
      conn_close(c, "upgrade refused (status not 101)", 0);
      return;
    }
    off = (size_t)(end - c->rbuf) + 4;
    c->state = ST_AUTHING;
    if (opt.auth_frame)
      send_auth(c);
  }

  while (c->state != ST_CLOSED && off < c->rlen) {
    unsigned char *p = c->rbuf + off;
    size_t avail = c->rlen - off, need;
    if (opt.tcp) {
      if (avail < 4)
        break;
      uint32_t flen = (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
      if (flen == 0 || flen > RBUF_MAX - 4) {
        conn_close(c, "bad tcp frame length", 0);
        return;
      }
      need = 4 + (size_t)flen;
      if (avail < need)
        break;
      static const enum msg_op map[256] = {
        [BOP_AUTH_OK] = OP_AUTH_OK, [BOP_MSG] = OP_MSG, [BOP_ACK] = OP_ACK,
        [BOP_PONG] = OP_PONG, [BOP_ERROR] = OP_ERROR,
      };
      size_t idlen = 0;
      const unsigned char *id = bin_field(p + 5, flen - 1, BKEY_ID, &idlen);
      off += need;
      on_message(c, map[p[4]], id, idlen, deadline);
    } else {
      if (avail < 2)
        break;
      unsigned opcode = p[0] & 0x0f;
      bool masked = p[1] & 0x80;
      uint64_t plen = p[1] & 0x7f;
      size_t h = 2;
      if (plen == 126) {
        if (avail < 4)
          break;
        plen = (uint64_t)p[2] << 8 | p[3];
        h = 4;
      } else if (plen == 127) {
        if (avail < 10)
          break;
        plen = 0;
        for (int i = 0; i < 8; i++)
          plen = plen << 8 | p[2 + i];
        h = 10;
      }
      if (masked)
        h += 4;
      if (plen > RBUF_MAX - h) {
        conn_close(c, "oversized ws frame", 0);
        return;
      }
      need = h + (size_t)plen;
      if (avail < need)
        break;
      unsigned char *pl = p + h;
      if (masked)
        for (size_t i = 0; i < plen; i++)
          pl[i] ^= p[h - 4 + (i & 3)];
      off += need;
      if (!(p[0] & 0x80) || opcode == 0) {
        conn_close(c, "fragmented ws message (unsupported)", 0);
        return;
      }
      if (opcode == 8) {
        conn_close(c, "ws close from server", 0);
        return;
      }
      if (opcode == 9) {
        ws_send(c, 10, pl, (size_t)plen);
      } else if (opcode == 1 || opcode == 2) {
        size_t idlen = 0;
        const char *id = json_str((const char *)pl, (size_t)plen, "id", &idlen);
        on_message(c, json_op((const char *)pl, (size_t)plen), id, idlen, deadline);
      }
    }
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
      unsigned char *p;
      if (cap > RBUF_MAX) {
        conn_close(c, "input buffer overflow", 0);
        return;
      }
      if ((p = realloc(c->rbuf, cap)) == NULL)
        die("out of memory");
      c->rbuf = p;
      c->rcap = cap;
    }
    ssize_t n = recv(c->fd, c->rbuf + c->rlen, c->rcap - c->rlen, 0);
    if (n == 0) {
      conn_close(c, "closed by server", 0);
      return;
    }
    if (n < 0) {
      if (errno == EINTR)
        continue;
      if (errno != EAGAIN && errno != EWOULDBLOCK)
        conn_close(c, "recv", errno);
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
    if (bind(c->fd, (struct sockaddr *)&opt.src[s], opt.src_len[s]) < 0) {
      conn_close(c, "bind", errno);
      return;
    }
  }
  if (connect(c->fd, (struct sockaddr *)&B.dst, B.dst_len) < 0 && errno != EINPROGRESS) {
    conn_close(c, "connect", errno);
    return;
  }
  if (epoll_ctl(B.epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0) {
    conn_close(c, "epoll_ctl", errno);
    return;
  }
  c->out_armed = true;
}

/* ---- options ---- */

static void usage(FILE *f)
{
  fputs("usage:\n"
        "  im-bench hold --url ws://HOST:PORT/ws -n N [--src IP,IP,...] [--hold-seconds S]\n"
        "  im-bench echo --url ws://HOST:PORT/ws -c N [-d SECONDS] [--tcp HOST:PORT]\n"
        "\n"
        "hold: open N connections, authenticate, keep them idle (an {\"op\":\"ping\"}\n"
        "      every --ping-seconds), print 'connected N authed N failed N' once all\n"
        "      are settled, then hold for S seconds (default 30) or until SIGTERM.\n"
        "echo: N connections each sending msg and waiting for its echo, for D\n"
        "      seconds (default 10) after all are authenticated; prints round trips/s\n"
        "      and latency percentiles, and a 'RESULT key=value ...' line.\n"
        "\n"
        "options:\n"
        "  --url URL          WebSocket endpoint (ws:// only)\n"
        "  --tcp HOST:PORT    use the raw TCP binary framing instead of WebSocket\n"
        "  -n, -c N           connections (this process; at most ~19,980)\n"
        "  --src IP[,IP...]   source addresses, used round-robin (more ports per target)\n"
        "  --window N         connection setups in flight at once (default 500)\n"
        "  --hold-seconds S   hold time after setup (hold, default 30)\n"
        "  --ping-seconds S   keepalive interval (hold, default 20)\n"
        "  -d SECONDS         measured duration (echo, default 10)\n"
        "  --payload BYTES    size of the echoed data string (echo, default 16)\n"
        "  --ack              acknowledge each downstream msg\n"
        "  --auth-frame       authenticate with an auth message, not the upgrade URL\n"
        "  --uid-prefix P     uids are P<index> (default u<pid>-)\n",
        f);
}

static void parse_hostport(const char *s, const char *default_port)
{
  const char *colon;
  size_t hl;

  const char *h = s;

  if (s[0] == '[') {
    const char *rb = strchr(s, ']');
    if (rb == NULL)
      die("bad address '%s'", s);
    h = s + 1;
    hl = (size_t)(rb - h);
    colon = rb[1] == ':' ? rb + 1 : NULL;
  } else {
    colon = strrchr(s, ':');
    hl = colon ? (size_t)(colon - s) : strlen(s);
  }
  if (hl == 0 || hl >= sizeof opt.host)
    die("bad address '%s'", s);
  memcpy(opt.host, h, hl);
  opt.host[hl] = '\0';
  snprintf(opt.port, sizeof opt.port, "%s", colon ? colon + 1 : default_port);
}

static void parse_url(const char *url)
{
  char hp[300];
  const char *rest, *slash;

  if (strncmp(url, "ws://", 5) != 0)
    die("only ws:// URLs are supported: '%s'", url);
  rest = url + 5;
  slash = strchr(rest, '/');
  size_t hl = slash ? (size_t)(slash - rest) : strlen(rest);
  if (hl >= sizeof hp)
    die("bad URL '%s'", url);
  memcpy(hp, rest, hl);
  hp[hl] = '\0';
  parse_hostport(hp, "80");
  snprintf(opt.path, sizeof opt.path, "%s", slash ? slash : "/");
}

static void parse_src(const char *list)
{
  char buf[1024];
  snprintf(buf, sizeof buf, "%s", list);
  for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
    struct sockaddr_in *a4 = (struct sockaddr_in *)&opt.src[opt.nsrc];
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&opt.src[opt.nsrc];
    if (opt.nsrc == MAX_SRC)
      die("too many --src addresses (max %d)", MAX_SRC);
    memset(&opt.src[opt.nsrc], 0, sizeof opt.src[0]);
    if (inet_pton(AF_INET, tok, &a4->sin_addr) == 1) {
      a4->sin_family = AF_INET;
      opt.src_len[opt.nsrc] = sizeof *a4;
    } else if (inet_pton(AF_INET6, tok, &a6->sin6_addr) == 1) {
      a6->sin6_family = AF_INET6;
      opt.src_len[opt.nsrc] = sizeof *a6;
    } else {
      die("bad --src address '%s'", tok);
    }
    opt.nsrc++;
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
  const char *url = NULL, *tcp = NULL;

  if (argc < 2 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0) {
    usage(argc < 2 ? stderr : stdout);
    exit(argc < 2 ? 2 : 0);
  }
  if (strcmp(argv[1], "hold") == 0)
    opt.mode = MODE_HOLD;
  else if (strcmp(argv[1], "echo") == 0)
    opt.mode = MODE_ECHO;
  else
    die("unknown mode '%s' (hold or echo; --help for usage)", argv[1]);
  snprintf(opt.uid_prefix, sizeof opt.uid_prefix, "u%ld-", (long)getpid());

  for (int i = 2; i < argc; i++) {
    const char *a = argv[i];
    bool flag = strcmp(a, "--ack") == 0 || strcmp(a, "--auth-frame") == 0 ||
                strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0;
    const char *v = !flag && i + 1 < argc ? argv[++i] : NULL;
    if (!flag && v == NULL)
      die("option %s needs a value", a);
    if (strcmp(a, "--url") == 0) {
      url = v;
    } else if (strcmp(a, "--tcp") == 0) {
      tcp = v;
    } else if (strcmp(a, "-n") == 0 || strcmp(a, "-c") == 0) {
      opt.nconns = parse_int(v, 1, FD_CEILING, "connection count");
    } else if (strcmp(a, "--src") == 0) {
      parse_src(v);
    } else if (strcmp(a, "--window") == 0) {
      opt.window = parse_int(v, 1, FD_CEILING, "window");
    } else if (strcmp(a, "--hold-seconds") == 0) {
      opt.hold_s = parse_int(v, 0, 86400 * 7, "hold seconds");
    } else if (strcmp(a, "--ping-seconds") == 0) {
      opt.ping_s = parse_int(v, 1, 86400, "ping seconds");
    } else if (strcmp(a, "-d") == 0) {
      opt.duration_s = parse_int(v, 1, 86400, "duration");
    } else if (strcmp(a, "--payload") == 0) {
      opt.payload = parse_int(v, 0, SCRATCH_MAX / 2 - 64, "payload");
    } else if (strcmp(a, "--uid-prefix") == 0) {
      snprintf(opt.uid_prefix, sizeof opt.uid_prefix, "%s", v);
    } else if (strcmp(a, "--ack") == 0) {
      opt.send_ack = true;
    } else if (strcmp(a, "--auth-frame") == 0) {
      opt.auth_frame = true;
    } else if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
      usage(stdout);
      exit(0);
    } else {
      die("unknown option '%s' (--help for usage)", a);
    }
  }
  /* --tcp selects the transport even when a --url is given as well. */
  if (tcp != NULL) {
    opt.tcp = true;
    parse_hostport(tcp, "");
    if (opt.port[0] == '\0')
      die("--tcp needs HOST:PORT");
  } else if (url != NULL) {
    parse_url(url);
  } else {
    die("--url or --tcp is required");
  }
}

/* ---- main loop ---- */

static void on_signal(int sig)
{
  (void)sig;
  stop_requested = 1;
}

static void setup(void)
{
  struct rlimit rl = { .rlim_cur = FD_CEILING, .rlim_max = FD_CEILING };
  struct addrinfo hints = { .ai_socktype = SOCK_STREAM }, *ai;
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

  rc = getaddrinfo(opt.host, opt.port, &hints, &ai);
  if (rc != 0)
    die("resolve %s:%s: %s", opt.host, opt.port, gai_strerror(rc));
  memcpy(&B.dst, ai->ai_addr, ai->ai_addrlen);
  B.dst_len = ai->ai_addrlen;
  freeaddrinfo(ai);
  for (int i = 0; i < opt.nsrc; i++)
    if (opt.src[i].ss_family != B.dst.ss_family)
      die("--src addresses must be the target's address family");

  memcpy(B.data_json, "{\"p\":\"", 6);
  for (int i = 0; i < opt.payload; i++)
    B.data_json[6 + i] = (char)('a' + i % 26);
  memcpy(B.data_json + 6 + opt.payload, "\"}", 3);
  B.data_len = 6 + opt.payload + 2;

  B.conns = calloc((size_t)opt.nconns, sizeof *B.conns);
  if (B.conns == NULL)
    die("out of memory");
  for (int i = 0; i < opt.nconns; i++) {
    B.conns[i].fd = -1;
    B.conns[i].idx = (uint32_t)i;
  }
  B.epfd = epoll_create1(EPOLL_CLOEXEC);
  if (B.epfd < 0)
    die("epoll_create1: %s", strerror(errno));

  struct sigaction sa = { .sa_handler = on_signal };
  sigemptyset(&sa.sa_mask);
  sigaction(SIGTERM, &sa, NULL);
  sigaction(SIGINT, &sa, NULL);
  signal(SIGPIPE, SIG_IGN);
}

/* Once a second: time out stuck setups and send keepalives that are due. */
static void housekeeping(int64_t t)
{
  for (int i = 0; i < opt.nconns; i++) {
    conn *c = &B.conns[i];
    if (c->state >= ST_CONNECTING && c->state <= ST_AUTHING && t - c->t_start > SETUP_TIMEOUT_NS)
      conn_close(c, "setup timed out", 0);
    else if (opt.mode == MODE_HOLD && c->state == ST_READY && t >= c->next_ping) {
      send_ping(c);
      c->next_ping = t + opt.ping_s * NS_PER_S;
    }
  }
}

static void print_result(int64_t measured_ns)
{
  double secs = (double)measured_ns / 1e9;
  double rtps = secs > 0 ? (double)hist.total / secs : 0;
  const char *transport = opt.tcp ? "tcp" : "ws";
  double p50 = hist_quantile(0.50) / 1e3, p90 = hist_quantile(0.90) / 1e3;
  double p99 = hist_quantile(0.99) / 1e3, p999 = hist_quantile(0.999) / 1e3;
  double max = hist.max / 1e3;

  printf("round trips %llu in %.2f s: %.0f rt/s over %d connections (%s)\n",
         (unsigned long long)hist.total, secs, rtps, B.authed - B.dropped, transport);
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

    while (B.started < opt.nconns && B.in_setup < opt.window)
      conn_start(&B.conns[B.started]);

    if (!settled && B.started == opt.nconns && B.in_setup == 0) {
      settled = true;
      phase_start = t;
      printf("connected %d authed %d failed %d\n", B.connected, B.authed, B.failed);
      if (B.first_failure[0] != '\0')
        fprintf(stderr, "first failure: %s\n", B.first_failure);
      fflush(stdout);
      if (opt.mode == MODE_ECHO) {
        deadline = t + opt.duration_s * NS_PER_S;
        for (int i = 0; i < opt.nconns; i++)
          if (B.conns[i].state == ST_READY)
            send_msg(&B.conns[i]);
      }
    }
    if (settled && opt.mode == MODE_HOLD && t - phase_start >= opt.hold_s * NS_PER_S)
      break;
    if (settled && opt.mode == MODE_ECHO && t >= deadline)
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
      if (c->state == ST_CLOSED)
        continue;
      if (c->state == ST_CONNECTING) {
        on_connected(c);
        continue;
      }
      if (evs[i].events & EPOLLOUT)
        conn_flush(c);
      if (c->state != ST_CLOSED && (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)))
        on_readable(c, deadline);
    }
  }

  if (opt.mode == MODE_ECHO) {
    if (!settled)
      printf("connected %d authed %d failed %d\n", B.connected, B.authed, B.failed);
    print_result(settled ? now_ns() - phase_start : 0);
  } else {
    int open_now = 0;
    for (int i = 0; i < opt.nconns; i++)
      open_now += B.conns[i].state == ST_READY || B.conns[i].state == ST_WAITING;
    printf("RESULT mode=hold conns=%d connected=%d authed=%d failed=%d dropped=%d open=%d "
           "held_s=%.1f errors=%ld\n", opt.nconns, B.connected, B.authed, B.failed, B.dropped,
           open_now, settled ? (double)(now_ns() - phase_start) / 1e9 : 0.0, B.errors);
  }
  return 0;
}
