/* im-bench: a load client for im-echo, imd and their peers. Plain C11 + POSIX +
 * epoll on one thread with no libim dependency: it speaks WebSocket/JSON and
 * the raw TCP binary framing itself, so it measures the server, not a shared
 * codec. Run several processes for more connections or more client CPU.
 * Modes: hold (idle connections), echo (closed-loop round trips), chat (paced
 * 1:1 messages between sender/receiver pairs, open loop) and recv (receivers
 * that count and acknowledge what they are pushed). The only library is
 * mbedTLS's HMAC, for minting imd tokens (docs/TOKENS.md). */
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
#include <sys/prctl.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#include <mbedtls/md.h>

#define FD_CEILING 20000       /* hard per-process open-file limit on the test hosts */
#define FD_RESERVE 16          /* stdio, epoll, resolver */
#define MAX_SRC 64
#define RBUF_INIT 512
#define RBUF_MAX (1u << 20)
#define SCRATCH_MAX (1u << 18) /* largest frame built; --payload is capped well below */
#define NS_PER_S INT64_C(1000000000)
#define SETUP_TIMEOUT_NS (10 * NS_PER_S)
#define TOKEN_MAX 128
#define TOKEN_TTL_S 86400
#define CHAT_MAX_MSGS INT64_C(200000000) /* warm-up + measured; bounds the bitmaps */

enum conn_state {
  ST_NEW,        /* not started */
  ST_CONNECTING, /* TCP connect in flight */
  ST_UPGRADING,  /* WebSocket upgrade sent, waiting for 101 */
  ST_AUTHING,    /* waiting for auth_ok */
  ST_READY,      /* authenticated and idle */
  ST_WAITING,    /* echo: msg sent, waiting for the downstream msg */
  ST_CLOSED,
};

enum bench_mode { MODE_HOLD, MODE_ECHO, MODE_CHAT, MODE_RECV };

/* chat: connections [0, pairs) send as <prefix>s<i>, [pairs, 2*pairs)
 * receive as <prefix>r<i>. Other modes: <prefix><index>. */
enum conn_role { ROLE_PLAIN, ROLE_SENDER, ROLE_RECEIVER };

/* Server messages the bench reacts to, from either wire format. */
enum msg_op { OP_OTHER, OP_AUTH_OK, OP_ACK, OP_MSG, OP_PONG, OP_ERROR };

/* Binary IMP (raw TCP) op codes and field keys. */
enum { BOP_AUTH = 0x01, BOP_AUTH_OK = 0x02, BOP_MSG = 0x03, BOP_ACK = 0x04,
       BOP_PING = 0x07, BOP_PONG = 0x08, BOP_ERROR = 0x0b };
enum { BKEY_UID = 0x01, BKEY_TOKEN = 0x02, BKEY_DEVICE = 0x03, BKEY_PLATFORM = 0x04,
       BKEY_CID = 0x07, BKEY_ID = 0x08, BKEY_DATA = 0x0f };

/* Where connections go: --url (or --tcp), and for chat receivers --recv-url
 * when given (e.g. another node of an imd cluster). */
typedef struct endpoint {
  char host[256], port[16], path[256];
  struct sockaddr_storage addr;
  socklen_t addr_len;
} endpoint;
enum { EP_MAIN, EP_RECV, EP_N };

typedef struct conn {
  int fd;
  uint8_t state;
  uint8_t role;
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
  enum bench_mode mode;
  bool tcp, auth_frame, send_ack;
  endpoint ep[EP_N]; /* EP_RECV: a copy of EP_MAIN unless --recv-url */
  int nconns, duration_s, hold_s, ping_s, window, payload;
  int pairs, rate, warmup_s, drain_s, idle_exit_s;
  long server_pid;
  char uid_prefix[64];
  unsigned char secret[256]; /* HMAC key for imd tokens: the secret's own bytes */
  size_t secret_len;         /* 0: send the placeholder token "t" */
  struct sockaddr_in src[MAX_SRC];
  int nsrc;
} opt = { .nconns = 100, .duration_s = 10, .hold_s = 30, .ping_s = 20,
          .window = 500, .payload = 16, .pairs = 100, .rate = 10000, .warmup_s = 3,
          .drain_s = 5 };

/* chat: message k is due at sched(k) = t_begin + k / rate and goes from
 * sender k % pairs to its receiver. Messages [0, k_warm) warm up; [k_warm,
 * k_end) are measured. Latency counts from the due time, not the time the
 * client got round to sending, so a stall anywhere is not hidden by the
 * sender waiting for it (no coordinated omission). */
static struct {
  int timerfd;
  int64_t t_begin, k_next, k_warm, k_end, timer_armed_for;
  int64_t cid_base; /* message k has cid cid_base + k: unique per run, as imd's
                     * idempotency key (uid, device, cid) outlives connections */
  int64_t sent_total, recv_total, acked_total; /* unique, warm-up included */
  int64_t sent, received, acked;                /* measured messages only */
  int64_t dups, ack_dups, foreign, unexpected, unsendable;
  int64_t t_first_send, t_last_send, t_first_recv, t_last_recv, t_sent_all;
  unsigned char *recv_seen, *ack_seen;          /* one bit per message number */
  struct rusage ru0, ru1;
  int64_t cpu_t0, cpu_t1, srv_ticks0, srv_ticks1;
  char first_error[200];
} C = { .timerfd = -1, .srv_ticks0 = -1, .srv_ticks1 = -1 };

/* recv: what the receivers got. */
static struct {
  int64_t received, acks_sent, t_last;
} R;

static struct {
  int epfd;
  conn *conns;
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
typedef struct histogram {
  uint64_t counts[HIST_BUCKETS];
  uint64_t total, max;
} histogram;
static histogram hist;     /* echo round trips; chat one-way latency */
static histogram hist_ack;   /* chat: due time -> the sender's ack */
static histogram hist_lag;   /* chat: due time -> the client starts writing it (its own lateness) */
static histogram hist_write; /* chat: the client starts writing -> received */

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

static void hist_record(histogram *h, uint64_t v)
{
  uint32_t idx = (uint32_t)v;
  if (v >= HIST_SUB) {
    unsigned e = 63u - (unsigned)__builtin_clzll(v);
    idx = HIST_SUB + (e - HIST_SUB_BITS) * HIST_SUB + (uint32_t)((v >> (e - HIST_SUB_BITS)) - HIST_SUB);
  }
  h->counts[idx]++;
  h->total++;
  if (v > h->max)
    h->max = v;
}

/* Value at quantile q: the midpoint of the bucket holding it, capped at max. */
static uint64_t hist_quantile(const histogram *h, double q)
{
  double rank = q * (double)h->total;
  uint64_t want = (uint64_t)rank, seen = 0;
  if ((double)want < rank || want == 0)
    want++;
  for (uint32_t i = 0; i < HIST_BUCKETS; i++) {
    seen += h->counts[i];
    if (seen < want || h->counts[i] == 0)
      continue;
    uint64_t v = i;
    if (i >= HIST_SUB) {
      unsigned shift = (i - HIST_SUB) / HIST_SUB;
      v = ((uint64_t)(HIST_SUB + (i - HIST_SUB) % HIST_SUB) << shift) + ((UINT64_C(1) << shift) >> 1);
    }
    return v < h->max ? v : h->max;
  }
  return h->max;
}

/* Standard base64 with padding, or (url) base64url without padding. */
static void base64_enc(const unsigned char *in, size_t n, char *out, bool url)
{
  static const char tab[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  static const char tab_url[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
  const char *t = url ? tab_url : tab;
  for (size_t i = 0; i < n; i += 3) {
    uint32_t v = (uint32_t)in[i] << 16 | (i + 1 < n ? (uint32_t)in[i + 1] << 8 : 0) |
                 (i + 2 < n ? in[i + 2] : 0);
    *out++ = t[v >> 18];
    *out++ = t[(v >> 12) & 63];
    if (i + 1 < n || !url)
      *out++ = i + 1 < n ? t[(v >> 6) & 63] : '=';
    if (i + 2 < n || !url)
      *out++ = i + 2 < n ? t[v & 63] : '=';
  }
  *out = '\0';
}

static void base64(const unsigned char *in, size_t n, char *out)
{
  base64_enc(in, n, out, false);
}

/* An imd token (docs/TOKENS.md): "1." EXP "." SCOPE "." base64url_nopad(
 * HMAC-SHA256(secret, "imd-token-v1\n" uid "\n" DEV "\n" EXP)); device ""
 * means any device (SCOPE and DEV "*"). Returns false if mbedTLS fails. */
static bool token_mint(const unsigned char *key, size_t keylen, const char *uid, const char *device,
                       long long exp, char out[TOKEN_MAX])
{
  const mbedtls_md_info_t *md = mbedtls_md_info_from_type(MBEDTLS_MD_SHA256);
  unsigned char mac[32];
  char msg[512];
  int n = snprintf(msg, sizeof msg, "imd-token-v1\n%s\n%s\n%lld", uid, *device ? device : "*", exp);
  if (md == NULL || mbedtls_md_get_size(md) != sizeof mac || n < 0 || (size_t)n >= sizeof msg ||
      mbedtls_md_hmac(md, key, keylen, (const unsigned char *)msg, (size_t)n, mac) != 0)
    return false;
  int o = snprintf(out, TOKEN_MAX, "1.%lld.%c.", exp, *device ? 'd' : '*');
  base64_enc(mac, sizeof mac, out + o, true);
  return true;
}

/* The first known-answer vector of docs/TOKENS.md, checked before any use. */
static void token_selftest(void)
{
  static const char key[] = "0123456789abcdef0123456789abcdef";
  static const char want[] = "1.2000000000.d.nWYijPbBCXOLeBCsFGQCqqdNNEFKndCwCp59-NNkUFg";
  char tok[TOKEN_MAX] = "";
  if (!token_mint((const unsigned char *)key, sizeof key - 1, "alice", "d1", 2000000000LL, tok) ||
      strcmp(tok, want) != 0)
    die("token self-test failed: got '%s', want '%s'", tok, want);
}

/* The uid of connection c, see enum conn_role. */
static void conn_uid(const conn *c, char *out, size_t cap)
{
  if (c->role == ROLE_SENDER)
    snprintf(out, cap, "%ss%u", opt.uid_prefix, c->idx);
  else if (c->role == ROLE_RECEIVER)
    snprintf(out, cap, "%sr%u", opt.uid_prefix, c->idx - (uint32_t)opt.pairs);
  else
    snprintf(out, cap, "%s%u", opt.uid_prefix, c->idx);
}

/* A real token bound to device d1 when a secret was given, else "t" (im-echo
 * and the peers accept any token). */
static void conn_token(const char *uid, char out[TOKEN_MAX])
{
  if (opt.secret_len == 0) {
    strcpy(out, "t");
  } else if (!token_mint(opt.secret, opt.secret_len, uid, "d1", (long long)time(NULL) + TOKEN_TTL_S,
                         out)) {
    die("cannot mint a token for '%s' (mbedTLS)", uid);
  }
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

/* Chat receivers use --recv-url; everything else --url. */
static const endpoint *conn_endpoint(const conn *c)
{
  return &opt.ep[c->role == ROLE_RECEIVER ? EP_RECV : EP_MAIN];
}

static void ws_send_upgrade(conn *c)
{
  const endpoint *ep = conn_endpoint(c);
  uint64_t key[2] = { rng_next(), rng_next() };
  char key64[32], req[1024], uid[96], tok[TOKEN_MAX];
  int n = snprintf(req, sizeof req, "GET %s", ep->path);

  /* Authenticating in the URL saves a round trip per connection. uids and
   * tokens need no percent-encoding (--uid-prefix is checked). */
  if (!opt.auth_frame) {
    conn_uid(c, uid, sizeof uid);
    conn_token(uid, tok);
    n += snprintf(req + n, sizeof req - (size_t)n, "%cuid=%s&token=%s&device=d1&platform=bench",
                  strchr(ep->path, '?') ? '&' : '?', uid, tok);
  }
  base64((const unsigned char *)key, sizeof key, key64);
  n += snprintf(req + n, sizeof req - (size_t)n,
                " HTTP/1.1\r\nHost: %s:%s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n"
                "Sec-WebSocket-Protocol: imp.json\r\n\r\n",
                ep->host, ep->port, key64);
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
  char uid[96], tok[TOKEN_MAX];
  conn_uid(c, uid, sizeof uid);
  conn_token(uid, tok);
  if (opt.tcp) {
    size_t n = put_field(B.body, BKEY_UID, uid, strlen(uid));
    n += put_field(B.body + n, BKEY_TOKEN, tok, strlen(tok));
    n += put_field(B.body + n, BKEY_DEVICE, "d1", 2);
    n += put_field(B.body + n, BKEY_PLATFORM, "bench", 5);
    tcp_send(c, BOP_AUTH, B.body, n);
  } else {
    int n = snprintf((char *)B.body, sizeof B.body, "{\"op\":\"auth\",\"uid\":\"%s\",\"token\":\"%s\","
                     "\"device\":\"d1\",\"platform\":\"bench\"}", uid, tok);
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

/* ---- chat and recv ------------------------------------------------------ */

/* A member value of a JSON object: strings without their quotes (escapes
 * left as they are), anything else as its raw text. */
typedef struct span {
  const char *p; /* NULL: absent */
  size_t n;
  bool str;
} span;

static const char *json_ws(const char *p, const char *end)
{
  while (p < end && (*p == ' ' || *p == '\t' || *p == '\r' || *p == '\n'))
    p++;
  return p;
}

/* End of the JSON value that starts at p, or NULL. Strings honour escapes;
 * objects and arrays end at the bracket that closes them, strings inside
 * skipped whole. Validating is the server's job: this only has to find the
 * end of what a server sent, so it tolerates members it does not know. */
static const char *json_value_end(const char *p, const char *end)
{
  int depth = 0;
  if (p >= end)
    return NULL;
  if (*p != '"' && *p != '{' && *p != '[') {
    while (p < end && *p != ',' && *p != '}' && *p != ']' && *p != ' ' && *p != '\t' &&
           *p != '\r' && *p != '\n')
      p++;
    return p;
  }
  do {
    if (*p == '"') {
      for (p++; p < end && *p != '"'; p++)
        if (*p == '\\' && ++p == end)
          return NULL;
      if (p == end)
        return NULL;
    } else if (*p == '{' || *p == '[') {
      depth++;
    } else if (*p == '}' || *p == ']') {
      depth--;
    }
    p++;
  } while (depth > 0 && p < end);
  return depth == 0 ? p : NULL;
}

/* Sets out[i] to the top-level member names[i] of the object in s (the
 * last one if repeated), {NULL} when absent. False if s is not an object. */
static bool json_members(const char *s, size_t len, const char *const *names, span *out, int count)
{
  const char *p, *end = s + len;
  for (int i = 0; i < count; i++)
    out[i] = (span){ NULL, 0, false };
  p = json_ws(s, end);
  if (p == end || *p != '{')
    return false;
  p = json_ws(p + 1, end);
  if (p < end && *p == '}')
    return true;
  for (;;) {
    if (p == end || *p != '"')
      return false;
    const char *key = p + 1, *key_end = json_value_end(p, end);
    if (key_end == NULL)
      return false;
    size_t kn = (size_t)(key_end - 1 - key);
    p = json_ws(key_end, end);
    if (p == end || *p != ':')
      return false;
    p = json_ws(p + 1, end);
    const char *v_end = json_value_end(p, end);
    if (v_end == NULL || v_end == p)
      return false;
    for (int i = 0; i < count; i++) {
      if (strlen(names[i]) != kn || memcmp(names[i], key, kn) != 0)
        continue;
      if (*p == '"')
        out[i] = (span){ p + 1, (size_t)(v_end - p - 2), true };
      else
        out[i] = (span){ p, (size_t)(v_end - p), false };
    }
    p = json_ws(v_end, end);
    if (p < end && *p == ',') {
      p = json_ws(p + 1, end);
      continue;
    }
    return p < end && *p == '}';
  }
}

static bool span_is(span v, const char *s)
{
  return v.p != NULL && v.n == strlen(s) && memcmp(v.p, s, v.n) == 0;
}

/* A decimal integer, quoted or not. */
static bool span_i64(span v, int64_t *out)
{
  int64_t x = 0;
  size_t i = v.n > 0 && v.p[0] == '-';
  if (v.p == NULL || i == v.n || v.n - i > 18)
    return false;
  for (; i < v.n; i++) {
    if (v.p[i] < '0' || v.p[i] > '9')
      return false;
    x = x * 10 + (v.p[i] - '0');
  }
  *out = v.p[0] == '-' ? -x : x;
  return true;
}

static int64_t sched(int64_t k)
{
  return C.t_begin + k * NS_PER_S / opt.rate;
}

/* Returns the bit's old value. */
static bool bit_test_set(unsigned char *bits, int64_t k)
{
  unsigned char m = (unsigned char)(1u << (k & 7));
  bool was = (bits[k >> 3] & m) != 0;
  bits[k >> 3] |= m;
  return was;
}

/* utime + stime of a process in clock ticks, -1 if unreadable. */
static int64_t proc_ticks(long pid)
{
  char path[64], buf[1024];
  snprintf(path, sizeof path, "/proc/%ld/stat", pid);
  FILE *f = fopen(path, "r");
  if (f == NULL)
    return -1;
  size_t n = fread(buf, 1, sizeof buf - 1, f);
  fclose(f);
  buf[n] = '\0';
  const char *p = strrchr(buf, ')'); /* the command name may hold spaces */
  unsigned long long ut, st;
  if (p == NULL ||
      sscanf(p + 1, " %*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st) != 2)
    return -1;
  return (int64_t)(ut + st);
}

static void cpu_snapshot(struct rusage *ru, int64_t *t, int64_t *srv)
{
  getrusage(RUSAGE_SELF, ru);
  *t = now_ns();
  *srv = opt.server_pid > 0 ? proc_ticks(opt.server_pid) : -1;
}

static void chat_error(const char *p, size_t n)
{
  B.errors++;
  if (C.first_error[0] == '\0')
    snprintf(C.first_error, sizeof C.first_error, "%.*s", (int)(n < 180 ? n : 180), p);
}

/* {"op":"ack","id":ID} plus the message's seq when it has one. */
static void send_ack_json(conn *c, span id, span seq)
{
  int n;
  if (id.n > 200 || seq.n > 40)
    return;
  if (seq.p != NULL)
    n = snprintf((char *)B.body, sizeof B.body, "{\"op\":\"ack\",\"id\":\"%.*s\",\"seq\":%s%.*s%s}",
                 (int)id.n, id.p, seq.str ? "\"" : "", (int)seq.n, seq.p, seq.str ? "\"" : "");
  else
    n = snprintf((char *)B.body, sizeof B.body, "{\"op\":\"ack\",\"id\":\"%.*s\"}", (int)id.n, id.p);
  ws_send(c, 1, B.body, (size_t)n);
  R.acks_sent++;
}

/* A JSON message on an authenticated connection in chat or recv mode. */
static void on_json_ready(conn *c, const char *p, size_t n)
{
  static const char *const names[] = { "op", "id", "cid", "seq", "data" };
  static const char *const data_names[] = { "t", "n", "s" };
  enum { F_OP, F_ID, F_CID, F_SEQ, F_DATA, F_N };
  span f[F_N], d[3];
  int64_t t = now_ns(), ts, k, tw;

  if (!json_members(p, n, names, f, F_N) || f[F_OP].p == NULL) {
    chat_error(p, n);
    return;
  }
  if (span_is(f[F_OP], "error")) {
    chat_error(p, n);
    return;
  }
  if (span_is(f[F_OP], "msg")) {
    /* Every downstream msg with an id is acknowledged, whoever it is for. */
    if (opt.send_ack && f[F_ID].p != NULL)
      send_ack_json(c, f[F_ID], f[F_SEQ]);
    if (opt.mode == MODE_RECV) {
      R.received++;
      R.t_last = t;
      return;
    }
    if (c->role != ROLE_RECEIVER) {
      C.unexpected++;
      return;
    }
    if (f[F_DATA].p == NULL || f[F_DATA].str ||
        !json_members(f[F_DATA].p, f[F_DATA].n, data_names, d, 3) || !span_i64(d[0], &ts) ||
        !span_i64(d[1], &k) || k < 0 || k >= C.k_next) {
      C.foreign++;
      return;
    }
    if (bit_test_set(C.recv_seen, k)) {
      C.dups += k >= C.k_warm;
      return;
    }
    C.recv_total++;
    if (k >= C.k_warm) {
      C.received++;
      hist_record(&hist, (uint64_t)(t > ts ? t - ts : 0));
      if (span_i64(d[2], &tw))
        hist_record(&hist_write, (uint64_t)(t > tw ? t - tw : 0));
      if (C.t_first_recv == 0)
        C.t_first_recv = t;
      C.t_last_recv = t;
    }
    return;
  }
  if (span_is(f[F_OP], "ack") && c->role == ROLE_SENDER) {
    if (!span_i64(f[F_CID], &k) || (k -= C.cid_base) < 0 || k >= C.k_next) {
      C.foreign++;
      return;
    }
    if (bit_test_set(C.ack_seen, k)) {
      C.ack_dups += k >= C.k_warm;
      return;
    }
    C.acked_total++;
    if (k >= C.k_warm) {
      C.acked++;
      int64_t due = sched(k);
      hist_record(&hist_ack, (uint64_t)(t > due ? t - due : 0));
    }
  }
}

/* Message k to receiver k % pairs: {"op":"msg","cid":"<cid_base + k>",
 * "to":"<prefix>r<i>","data":{"t":DUE_NS,"s":WRITE_NS,"n":k,"p":"<payload>"}}. */
static void chat_send(int64_t k)
{
  int pair = (int)(k % opt.pairs);
  conn *c = &B.conns[pair];
  int64_t due = sched(k), t = now_ns();
  if (c->state != ST_READY) {
    C.unsendable++;
    return;
  }
  int n = snprintf((char *)B.body, sizeof B.body,
                   "{\"op\":\"msg\",\"cid\":\"%lld\",\"to\":\"%sr%d\",\"data\":{\"t\":%lld,\"s\":%lld,"
                   "\"n\":%lld,\"p\":\"%.*s\"}}", (long long)(C.cid_base + k), opt.uid_prefix, pair,
                   (long long)due, (long long)t, (long long)k, opt.payload, B.data_json + 6);
  ws_send(c, 1, B.body, (size_t)n);
  C.sent_total++;
  if (k >= C.k_warm) {
    C.sent++;
    hist_record(&hist_lag, (uint64_t)(t > due ? t - due : 0));
    if (C.t_first_send == 0)
      C.t_first_send = t;
    C.t_last_send = t;
  }
}

/* Sends everything due (all at once if the client fell behind: open loop),
 * then sets the timer for the next due time. */
static void chat_pump(void)
{
  while (C.k_next < C.k_end && sched(C.k_next) <= now_ns()) {
    if (C.k_next == C.k_warm)
      cpu_snapshot(&C.ru0, &C.cpu_t0, &C.srv_ticks0);
    chat_send(C.k_next++);
  }
  if (C.k_next == C.k_end && C.t_sent_all == 0) {
    cpu_snapshot(&C.ru1, &C.cpu_t1, &C.srv_ticks1);
    C.t_sent_all = C.cpu_t1;
  }
  if (C.k_next < C.k_end && sched(C.k_next) != C.timer_armed_for) {
    int64_t due = sched(C.k_next);
    struct itimerspec its = { .it_value = { .tv_sec = due / NS_PER_S, .tv_nsec = due % NS_PER_S } };
    if (timerfd_settime(C.timerfd, TFD_TIMER_ABSTIME, &its, NULL) < 0)
      die("timerfd_settime: %s", strerror(errno));
    C.timer_armed_for = due;
  }
}

static void chat_begin(int64_t t)
{
  C.k_warm = (int64_t)opt.warmup_s * opt.rate;
  C.k_end = C.k_warm + (int64_t)opt.duration_s * opt.rate;
  if (C.k_end > CHAT_MAX_MSGS)
    die("--rate x (--warmup + -d) is over %lld messages", (long long)CHAT_MAX_MSGS);
  C.recv_seen = calloc((size_t)(C.k_end / 8 + 1), 1);
  C.ack_seen = calloc((size_t)(C.k_end / 8 + 1), 1);
  if (C.recv_seen == NULL || C.ack_seen == NULL)
    die("out of memory");
  C.cid_base = (int64_t)(rng_next() % 100000000u) * INT64_C(1000000000);
  C.t_begin = t + NS_PER_S / 10;
  chat_pump();
}

/* Every message sent has arrived and been acked, or the drain time is up. */
static bool chat_done(int64_t t)
{
  if (C.k_next < C.k_end)
    return false;
  return (C.recv_total >= C.sent_total && C.acked_total >= C.sent_total) ||
         t - C.t_sent_all >= (int64_t)opt.drain_s * NS_PER_S;
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
  hist_record(&hist, (uint64_t)(t - c->t_start));
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
  } else if ((opcode == 1 || opcode == 2) && opt.mode >= MODE_CHAT && c->state == ST_READY) {
    on_json_ready(c, (const char *)pl, (size_t)plen);
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
  const endpoint *ep = conn_endpoint(c);

  B.started++;
  B.in_setup++;
  c->t_start = now_ns();
  c->state = ST_CONNECTING;
  c->fd = socket(ep->addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
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
  if (connect(c->fd, (const struct sockaddr *)&ep->addr, ep->addr_len) < 0 && errno != EINPROGRESS)
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
        "  im-bench chat --url ws://HOST:PORT/ws [--recv-url ws://HOST:PORT/ws] [--pairs P]\n"
        "                [--rate R] [-d SECONDS] [--warmup S] [--secret-file F | --secret S]\n"
        "  im-bench recv --url ws://HOST:PORT/ws [-n N] [--idle-exit S] [--secret-file F]\n"
        "\n"
        "hold: open N connections, authenticate, keep them idle with an {\"op\":\"ping\"}\n"
        "      every --ping-seconds, print 'connected N authed N failed N' once all are\n"
        "      settled, then hold them S seconds (default 30) or until SIGTERM/SIGINT.\n"
        "echo: N connections each sending msg and waiting for its echo, in a closed\n"
        "      loop for D seconds (default 10) counted once all are authenticated;\n"
        "      prints round trips/s, latency percentiles and a 'RESULT k=v ...' line.\n"
        "chat: P senders <prefix>s<i> and P receivers <prefix>r<i> (2P connections);\n"
        "      message k is due at k/R s after the start and goes from sender k%P to\n"
        "      receiver k%P as {\"op\":\"msg\",\"cid\":\"<run base + k>\",\"to\":\"r<i>\",\"data\":\n"
        "      {\"t\":DUE_NS,\"s\":WRITE_NS,\"n\":k,\"p\":PAYLOAD}} (CLOCK_MONOTONIC ns; open\n"
        "      loop: latency counts from the due time, so stalls are not hidden).\n"
        "      --warmup S unmeasured, then -d D measured; then up\n"
        "      to --drain S for stragglers. Receivers ack every downstream msg that has\n"
        "      an id ({\"op\":\"ack\",\"id\":..,\"seq\":..}, seq when the msg has one).\n"
        "      Prints one-way latency (due -> received), ack latency (due -> the\n"
        "      sender's ack), the client's own send lag, CPU, and a RESULT line.\n"
        "recv: N receivers <prefix><i> (default prefix r) that count and ack every\n"
        "      msg pushed to them; exits after --hold-seconds, on SIGTERM/SIGINT, or\n"
        "      --idle-exit S seconds after the last msg; prints a RESULT line.\n"
        "\n"
        "  --url URL         WebSocket endpoint (ws://IPV4-OR-NAME:PORT/PATH, imp.json)\n"
        "  --recv-url URL    chat: receivers connect here, senders to --url (e.g. two\n"
        "                    nodes of an imd cluster; default: --url)\n"
        "  --tcp HOST:PORT   raw TCP binary framing instead of WebSocket\n"
        "  -n, -c N          connections in this process (at most ~19,980)\n"
        "  --src IP[,IP...]  IPv4 source addresses used round-robin (more ports per target)\n"
        "  --window N        connection setups in flight at once (default 500)\n"
        "  --hold-seconds S  hold: time to hold after setup (default 30)\n"
        "  --ping-seconds S  hold: keepalive interval (default 20)\n"
        "  -d SECONDS        echo, chat: measured duration (default 10)\n"
        "  --payload BYTES   echo, chat: length of the data string (default 16)\n"
        "  --ack             echo: acknowledge each downstream msg\n"
        "  --auth-frame      WebSocket: authenticate with an auth message, not the URL\n"
        "  --uid-prefix P    uids are P<index> (default u<pid>-; chat: P s<i> / P r<i>,\n"
        "                    default empty; recv: default r); [A-Za-z0-9._-]\n"
        "  --secret S        mint real imd tokens (docs/TOKENS.md) with this secret\n"
        "  --secret-file F   the same, the secret read from F (e.g. DATA/secret)\n"
        "                    (without either, the token is \"t\": im-echo and peers)\n"
        "  --pairs P         chat: sender/receiver pairs (default 100)\n"
        "  --rate R          chat: messages/s from this process, all pairs (default 10000)\n"
        "  --warmup S        chat: unmeasured seconds first (default 3)\n"
        "  --drain S         chat: longest wait for outstanding messages (default 5)\n"
        "  --no-ack          chat, recv: do not ack downstream messages\n"
        "  --idle-exit S     recv: exit S seconds after the last msg (0: never)\n"
        "  --server-pid PID  chat: also report this process's CPU over the measured part\n",
        f);
}

/* HOST:PORT, or HOST with default_port, into ep->host / ep->port. */
static void parse_hostport(endpoint *ep, const char *s, size_t len, const char *default_port)
{
  const char *colon = memrchr(s, ':', len);
  size_t hl = colon ? (size_t)(colon - s) : len;
  int pl = (int)(colon ? len - hl - 1 : strlen(default_port));

  if (hl == 0 || hl >= sizeof ep->host || pl == 0 || pl >= (int)sizeof ep->port)
    die("bad address '%.*s' (HOST:PORT)", (int)len, s);
  memcpy(ep->host, s, hl);
  ep->host[hl] = '\0';
  snprintf(ep->port, sizeof ep->port, "%.*s", pl, colon ? colon + 1 : default_port);
}

static void parse_url(endpoint *ep, const char *url)
{
  const char *rest = url + 5, *slash;
  if (strncmp(url, "ws://", 5) != 0)
    die("only ws:// URLs are supported: '%s'", url);
  slash = strchr(rest, '/');
  parse_hostport(ep, rest, slash ? (size_t)(slash - rest) : strlen(rest), "80");
  if (snprintf(ep->path, sizeof ep->path, "%s", slash ? slash : "/") >= (int)sizeof ep->path)
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
    {"auth-frame", 0, NULL, 'A'}, {"help", 0, NULL, 'h'}, {"secret", 1, NULL, 'S'},
    {"secret-file", 1, NULL, 'F'}, {"pairs", 1, NULL, 'q'}, {"rate", 1, NULL, 'r'},
    {"warmup", 1, NULL, 'W'}, {"drain", 1, NULL, 'D'}, {"no-ack", 0, NULL, 'N'},
    {"idle-exit", 1, NULL, 'I'}, {"server-pid", 1, NULL, 'x'}, {"recv-url", 1, NULL, 'R'},
    {NULL, 0, NULL, 0},
  };
  static const char *const modes[] = { "hold", "echo", "chat", "recv" };
  const char *url = NULL, *recv_url = NULL, *tcp = NULL, *secret = NULL, *secret_file = NULL;
  char secret_buf[sizeof opt.secret + 2];
  bool no_ack = false, have_prefix = false, have_conns = false;
  int ch;

  if (argc < 2 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0) {
    usage(argc < 2 ? stderr : stdout);
    exit(argc < 2 ? 2 : 0);
  }
  opt.mode = (enum bench_mode)-1;
  for (size_t i = 0; i < sizeof modes / sizeof modes[0]; i++)
    if (strcmp(argv[1], modes[i]) == 0)
      opt.mode = (enum bench_mode)i;
  if ((int)opt.mode < 0)
    die("unknown mode '%s' (hold, echo, chat or recv; --help for usage)", argv[1]);

  /* The mode word plays argv[0] for getopt. */
  while ((ch = getopt_long(argc - 1, argv + 1, "n:c:d:h", longopts, NULL)) != -1) {
    switch (ch) {
    case 'u': url = optarg; break;
    case 'R': recv_url = optarg; break;
    case 't': tcp = optarg; break;
    case 's': parse_src(optarg); break;
    case 'n': case 'c':
      opt.nconns = parse_int(optarg, 1, FD_CEILING, "connection count");
      have_conns = true;
      break;
    case 'w': opt.window = parse_int(optarg, 1, FD_CEILING, "window"); break;
    case 'H': opt.hold_s = parse_int(optarg, 0, 7 * 86400, "hold seconds"); break;
    case 'P': opt.ping_s = parse_int(optarg, 1, 86400, "ping seconds"); break;
    case 'd': opt.duration_s = parse_int(optarg, 1, 86400, "duration"); break;
    case 'p': opt.payload = parse_int(optarg, 0, (int)sizeof B.data_json - 16, "payload"); break;
    case 'U':
      if (strlen(optarg) > 40 || strspn(optarg, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                                 "0123456789._-") != strlen(optarg))
        die("bad --uid-prefix '%s' (at most 40 of [A-Za-z0-9._-])", optarg);
      snprintf(opt.uid_prefix, sizeof opt.uid_prefix, "%s", optarg);
      have_prefix = true;
      break;
    case 'a': opt.send_ack = true; break;
    case 'S': secret = optarg; break;
    case 'F': secret_file = optarg; break;
    case 'q': opt.pairs = parse_int(optarg, 1, (FD_CEILING - FD_RESERVE) / 2, "pairs"); break;
    case 'r': opt.rate = parse_int(optarg, 1, 10000000, "rate"); break;
    case 'W': opt.warmup_s = parse_int(optarg, 0, 3600, "warm-up seconds"); break;
    case 'D': opt.drain_s = parse_int(optarg, 0, 3600, "drain seconds"); break;
    case 'N': no_ack = true; break;
    case 'I': opt.idle_exit_s = parse_int(optarg, 0, 86400, "idle-exit seconds"); break;
    case 'x': opt.server_pid = parse_int(optarg, 1, 0x7fffffff, "server pid"); break;
    case 'A': opt.auth_frame = true; break;
    case 'h': usage(stdout); exit(0);
    default: die("bad option (--help for usage)");
    }
  }
  if (optind < argc - 1)
    die("unexpected argument '%s'", argv[optind + 1]);
  if (!have_prefix && opt.mode == MODE_RECV)
    strcpy(opt.uid_prefix, "r");
  else if (!have_prefix && opt.mode != MODE_CHAT)
    snprintf(opt.uid_prefix, sizeof opt.uid_prefix, "u%ld-", (long)getpid());
  if (opt.mode == MODE_CHAT)
    opt.nconns = 2 * opt.pairs; /* senders first, then receivers */
  else if (opt.mode == MODE_RECV && !have_conns)
    opt.nconns = 1;
  if (opt.mode >= MODE_CHAT)
    opt.send_ack = !no_ack;
  if (secret_file != NULL) {
    FILE *f = fopen(secret_file, "r");
    if (f == NULL || fgets(secret_buf, sizeof secret_buf, f) == NULL)
      die("cannot read the secret from %s", secret_file);
    fclose(f);
    /* as imd reads DATA/secret: surrounding blanks and the line end dropped */
    size_t n = strlen(secret_buf);
    while (n > 0 && strchr(" \t\r\n", secret_buf[n - 1]) != NULL)
      secret_buf[--n] = '\0';
    secret = secret_buf + strspn(secret_buf, " \t");
  }
  if (secret != NULL) {
    opt.secret_len = strlen(secret);
    if (opt.secret_len < 16 || opt.secret_len > sizeof opt.secret)
      die("the secret must be 16 to %zu bytes", sizeof opt.secret);
    memcpy(opt.secret, secret, opt.secret_len);
    token_selftest();
  }
  opt.tcp = tcp != NULL; /* --tcp selects the transport even next to --url */
  if (opt.tcp && opt.mode >= MODE_CHAT)
    die("chat and recv speak WebSocket JSON only (--url)");
  if (tcp != NULL)
    parse_hostport(&opt.ep[EP_MAIN], tcp, strlen(tcp), "");
  else if (url != NULL)
    parse_url(&opt.ep[EP_MAIN], url);
  else
    die("--url or --tcp is required");
  if (recv_url != NULL && opt.mode != MODE_CHAT)
    die("--recv-url is for chat only");
  if (recv_url != NULL)
    parse_url(&opt.ep[EP_RECV], recv_url);
  else
    opt.ep[EP_RECV] = opt.ep[EP_MAIN];
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

  for (int e = 0; e < EP_N; e++) {
    endpoint *ep = &opt.ep[e];
    if ((rc = getaddrinfo(ep->host, ep->port, &hints, &ai)) != 0)
      die("resolve %s:%s: %s", ep->host, ep->port, gai_strerror(rc));
    memcpy(&ep->addr, ai->ai_addr, ai->ai_addrlen);
    ep->addr_len = ai->ai_addrlen;
    freeaddrinfo(ai);
  }

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
    B.conns[i].role = opt.mode != MODE_CHAT ? ROLE_PLAIN : i < opt.pairs ? ROLE_SENDER : ROLE_RECEIVER;
  }
  if ((B.epfd = epoll_create1(EPOLL_CLOEXEC)) < 0)
    die("epoll_create1: %s", strerror(errno));
  if (opt.mode == MODE_CHAT) {
    /* The send schedule runs on an absolute timerfd; the default 50 us timer
     * slack would make every send that much late. */
    struct epoll_event ev = { .events = EPOLLIN, .data.ptr = &C };
    prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);
    C.timerfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (C.timerfd < 0 || epoll_ctl(B.epfd, EPOLL_CTL_ADD, C.timerfd, &ev) < 0)
      die("timerfd: %s", strerror(errno));
  }
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
    } else if (opt.mode != MODE_ECHO && c->state == ST_READY && t >= c->next_ping) {
      /* An application ping, which surely counts as activity for the idle timer. */
      if (opt.tcp)
        tcp_send(c, BOP_PING, NULL, 0);
      else
        ws_send(c, 1, "{\"op\":\"ping\"}", 13);
      c->next_ping = t + opt.ping_s * NS_PER_S;
    }
  }
}

static double cpu_secs(const struct rusage *ru)
{
  return (double)ru->ru_utime.tv_sec + (double)ru->ru_utime.tv_usec / 1e6 +
         (double)ru->ru_stime.tv_sec + (double)ru->ru_stime.tv_usec / 1e6;
}

static void print_chat(int open_now)
{
  const histogram *hs[4] = { &hist, &hist_ack, &hist_lag, &hist_write };
  static const char *const label[4] = { "one-way", "ack", "send lag", "write->rx" };
  double q[4][5];
  double span_s = (double)(C.t_last_send - C.t_first_send) / 1e9;
  double rspan_s = (double)(C.t_last_recv - C.t_first_recv) / 1e9;
  double sent_rate = C.sent > 1 && span_s > 0 ? (double)(C.sent - 1) / span_s : 0;
  double recv_rate = C.received > 1 && rspan_s > 0 ? (double)(C.received - 1) / rspan_s : 0;
  double wall = (double)(C.cpu_t1 - C.cpu_t0) / 1e9;
  double cpu = wall > 0 ? 100 * (cpu_secs(&C.ru1) - cpu_secs(&C.ru0)) / wall : 0;
  double user = (double)(C.ru1.ru_utime.tv_sec - C.ru0.ru_utime.tv_sec) +
                (double)(C.ru1.ru_utime.tv_usec - C.ru0.ru_utime.tv_usec) / 1e6;
  user = wall > 0 ? 100 * user / wall : 0;
  double srv_cpu = -1;
  if (C.srv_ticks0 >= 0 && C.srv_ticks1 >= 0 && wall > 0)
    srv_cpu = 100 * (double)(C.srv_ticks1 - C.srv_ticks0) / (double)sysconf(_SC_CLK_TCK) / wall;

  for (int h = 0; h < 4; h++) {
    q[h][0] = (double)hist_quantile(hs[h], 0.50) / 1e3;
    q[h][1] = (double)hist_quantile(hs[h], 0.90) / 1e3;
    q[h][2] = (double)hist_quantile(hs[h], 0.99) / 1e3;
    q[h][3] = (double)hist_quantile(hs[h], 0.999) / 1e3;
    q[h][4] = (double)hs[h]->max / 1e3;
  }
  printf("chat: %d pairs, %d msgs/s scheduled, %d s warm-up + %d s measured, acks %s\n", opt.pairs,
         opt.rate, opt.warmup_s, opt.duration_s, opt.send_ack ? "on" : "off");
  printf("measured: sent %lld (%.0f/s), received %lld (%.0f/s), acked %lld, lost %lld, "
         "unacked %lld, dups %lld, errors %ld\n", (long long)C.sent, sent_rate,
         (long long)C.received, recv_rate, (long long)C.acked, (long long)(C.sent - C.received),
         (long long)(C.sent - C.acked), (long long)C.dups, B.errors);
  for (int h = 0; h < 4; h++)
    printf("%-9s us: p50 %.1f  p90 %.1f  p99 %.1f  p99.9 %.1f  max %.1f  (n=%llu)\n", label[h],
           q[h][0], q[h][1], q[h][2], q[h][3], q[h][4], (unsigned long long)hs[h]->total);
  printf("client CPU %.1f%% of one core (user space %.1f%%)", cpu, user);
  if (srv_cpu >= 0)
    printf(", server CPU %.1f%%", srv_cpu);
  printf(" over the measured %.1f s\n", wall);
  if (C.first_error[0] != '\0')
    printf("first error: %s\n", C.first_error);
  if (C.unexpected || C.foreign || C.ack_dups || C.unsendable || B.dropped || B.failed)
    printf("also: unexpected msgs at senders %lld, unparsable %lld, duplicate acks %lld, "
           "unsendable %lld, dropped conns %d, failed conns %d\n", (long long)C.unexpected,
           (long long)C.foreign, (long long)C.ack_dups, (long long)C.unsendable, B.dropped, B.failed);
  printf("RESULT mode=chat pairs=%d rate=%d secs=%d sent=%lld received=%lld acked=%lld "
         "lost=%lld dups=%lld errors=%ld sent_rate=%.0f recv_rate=%.0f "
         "p50_us=%.1f p90_us=%.1f p99_us=%.1f p999_us=%.1f max_us=%.1f "
         "ack_p50_us=%.1f ack_p90_us=%.1f ack_p99_us=%.1f ack_max_us=%.1f "
         "lag_p50_us=%.1f lag_p99_us=%.1f lag_max_us=%.1f w_p50_us=%.1f w_p99_us=%.1f "
         "cpu_pct=%.1f srv_cpu_pct=%.1f open=%d dropped=%d\n",
         opt.pairs, opt.rate, opt.duration_s, (long long)C.sent, (long long)C.received,
         (long long)C.acked, (long long)(C.sent - C.received), (long long)C.dups, B.errors,
         sent_rate, recv_rate, q[0][0], q[0][1], q[0][2], q[0][3], q[0][4], q[1][0], q[1][1],
         q[1][2], q[1][4], q[2][0], q[2][2], q[2][4], q[3][0], q[3][2], cpu, srv_cpu, open_now,
         B.dropped);
}

static void print_results(int64_t phase_ns)
{
  double secs = (double)phase_ns / 1e9;
  int open_now = 0;

  for (int i = 0; i < opt.nconns; i++)
    open_now += B.conns[i].state == ST_READY || B.conns[i].state == ST_WAITING;
  if (opt.mode == MODE_CHAT) {
    print_chat(open_now);
    return;
  }
  if (opt.mode == MODE_RECV) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("received %lld msgs on %d connections, acks sent %lld, errors %ld, CPU %.2f s\n",
           (long long)R.received, open_now, (long long)R.acks_sent, B.errors, cpu_secs(&ru));
    if (C.first_error[0] != '\0')
      printf("first error: %s\n", C.first_error);
    printf("RESULT mode=recv conns=%d authed=%d failed=%d dropped=%d open=%d received=%lld "
           "acks=%lld errors=%ld secs=%.1f cpu_s=%.2f\n", opt.nconns, B.authed, B.failed, B.dropped,
           open_now, (long long)R.received, (long long)R.acks_sent, B.errors, secs, cpu_secs(&ru));
    return;
  }
  if (opt.mode == MODE_HOLD) {
    printf("RESULT mode=hold conns=%d connected=%d authed=%d failed=%d dropped=%d open=%d "
           "held_s=%.1f errors=%ld\n", opt.nconns, B.connected, B.authed, B.failed, B.dropped,
           open_now, secs, B.errors);
    return;
  }
  double rtps = secs > 0 ? (double)hist.total / secs : 0;
  double p50 = (double)hist_quantile(&hist, 0.50) / 1e3, p90 = (double)hist_quantile(&hist, 0.90) / 1e3;
  double p99 = (double)hist_quantile(&hist, 0.99) / 1e3, p999 = (double)hist_quantile(&hist, 0.999) / 1e3;
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
      for (int i = 0; opt.mode == MODE_ECHO && i < opt.nconns; i++)
        if (B.conns[i].state == ST_READY)
          send_msg(&B.conns[i]);
      if (opt.mode == MODE_CHAT) {
        if (B.authed != opt.nconns)
          die("chat needs every connection authenticated (%d of %d; first failure: %s)",
              B.authed, opt.nconns, B.first_failure);
        chat_begin(t);
      }
    }
    if (settled && opt.mode == MODE_CHAT) {
      chat_pump();
      if (chat_done(now_ns()))
        break;
    } else if (settled && opt.mode == MODE_RECV && opt.idle_exit_s > 0 && R.received > 0 &&
               t - R.t_last >= (int64_t)opt.idle_exit_s * NS_PER_S) {
      break;
    } else if (settled && opt.mode != MODE_CHAT &&
               t - phase_start >= (opt.mode == MODE_ECHO ? opt.duration_s : opt.hold_s) * NS_PER_S) {
      break;
    }
    if (t >= next_tick) {
      housekeeping(t);
      if (!settled)
        fprintf(stderr, "[%5.1fs] started %d connected %d authed %d failed %d\n",
                (double)(t - t0) / 1e9, B.started, B.connected, B.authed, B.failed);
      else if (opt.mode == MODE_CHAT && (t - phase_start) / NS_PER_S % 5 == 0)
        fprintf(stderr, "[%5.1fs] sent %lld received %lld acked %lld errors %ld\n",
                (double)(t - t0) / 1e9, (long long)C.sent_total, (long long)C.recv_total,
                (long long)C.acked_total, B.errors);
      next_tick = t + NS_PER_S;
    }

    int n = epoll_wait(B.epfd, evs, (int)(sizeof evs / sizeof evs[0]), 100);
    if (n < 0 && errno != EINTR)
      die("epoll_wait: %s", strerror(errno));
    for (int i = 0; i < n; i++) {
      conn *c = evs[i].data.ptr;
      if (evs[i].data.ptr == (void *)&C) {
        uint64_t expirations;
        if (read(C.timerfd, &expirations, sizeof expirations) < 0 && errno != EAGAIN)
          die("timerfd read: %s", strerror(errno));
        continue;
      }
      if (c->state == ST_CONNECTING) {
        on_connected(c);
        continue;
      }
      if (c->state != ST_CLOSED && (evs[i].events & EPOLLOUT))
        conn_flush(c);
      if (c->state != ST_CLOSED && (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)))
        on_readable(c, settled && opt.mode == MODE_ECHO ? deadline : 0);
    }
  }
  if (!settled)
    printf("connected %d authed %d failed %d\n", B.connected, B.authed, B.failed);
  print_results(settled ? now_ns() - phase_start : 0);
  return 0;
}
