/* im-bench: a load client for im-echo, imd and their peers, built on the
 * libim client library (<libim/im_client.h> and its libevent driver
 * <libim/im_client_event.h>): the bench's connections run the same client
 * code as an application's, so what the client costs shows here too. One
 * thread and one event base per process; run several processes for more
 * connections or more client CPU (room mode forks its own).
 * Modes: hold (idle connections), echo (closed-loop round trips), chat (paced
 * 1:1 messages between sender/receiver pairs, open loop), recv (receivers
 * that count what they are pushed) and room (subscribers of one room and a
 * paced HTTP publisher, against imd or the nchan peer: bench/run-peers.sh).
 * Only nchan's subscribers, which speak no IMP, are plain WebSocket readers
 * written here. mbedTLS's HMAC mints imd tokens (docs/TOKENS.md). */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* memmem, memrchr, getopt_long, IP_BIND_ADDRESS_NO_PORT */
#endif
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
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
#include <sys/prctl.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>
#include <libim/im_client.h>
#include <libim/im_client_event.h>
#include <mbedtls/md.h>

#include "proto/base64.h"

#define FD_CEILING 20000       /* hard per-process open-file limit on the test hosts */
#define FD_RESERVE 16          /* stdio, event base, pipes */
#define MAX_SRC 64
#define NS_PER_S INT64_C(1000000000)
#define SETUP_TIMEOUT_MS 10000
#define TOKEN_MAX 128
#define TOKEN_TTL_S 86400
#define DATA_MAX 8192           /* a bench message's data; --payload is capped below */
#define CHAT_MAX_MSGS INT64_C(200000000) /* warm-up + measured; bounds the bitmaps */
#define ROOM_MAX_BITS (INT64_C(1) << 33) /* subscribers x messages per process: 1 GiB of bits */
#define PROBE_TIMEOUT_NS (20 * NS_PER_S)
#define PUB_CONNS_MAX 64
#define HTTP_IN_MAX 16384
#define WS_IN_MAX 65536

enum bench_mode { MODE_HOLD, MODE_ECHO, MODE_CHAT, MODE_RECV, MODE_ROOM };
enum room_peer { PEER_IMD, PEER_NCHAN };

/* chat: connections [0, pairs) send as <prefix>s<i>, [pairs, 2*pairs)
 * receive as <prefix>r<i>. Other modes: <prefix><index>. */
enum conn_role { ROLE_PLAIN, ROLE_SENDER, ROLE_RECEIVER, ROLE_SUB };

/* An HTTP or WebSocket address: --publish, and nchan's --url. */
typedef struct endpoint {
  char host[256], port[16], path[256];
  struct sockaddr_storage addr;
  socklen_t addr_len;
} endpoint;

static struct {
  enum bench_mode mode;
  enum room_peer peer;
  char url[600], recv_url[600]; /* the client library's gateway URLs */
  endpoint sub_ep, pub_ep;      /* room: nchan's subscriber URL, the publisher */
  int nconns, duration_s, hold_s, ping_s, window, payload;
  int pairs, rate, warmup_s, drain_s, idle_exit_s, procs, pub_conns;
  long server_pid;
  char uid_prefix[64], room[129];
  char api_key[256];
  unsigned char secret[256]; /* HMAC key for imd tokens: the secret's own bytes */
  size_t secret_len;         /* 0: send the placeholder token "t" */
  char src[MAX_SRC][INET_ADDRSTRLEN];
  int nsrc;
  FILE *dump;                /* chat: --dump FILE, one line per measured delivery */
} opt = { .nconns = 100, .duration_s = 10, .hold_s = 30, .ping_s = 20,
          .window = 500, .payload = 16, .pairs = 100, .rate = 10000, .warmup_s = 3,
          .drain_s = 5, .pub_conns = 4, .room = "bench" };

/* One IMP connection: a client of the library and its libevent driver. */
typedef struct conn {
  im_client *cl;
  im_client_event *ev;
  uint32_t idx;      /* connection number (uid suffix); room: subscriber number in this process */
  uint8_t role;
  bool connected;    /* the transport opened once */
  bool authed;       /* reached open once */
  bool done;         /* failed or dropped; stopped, not reconnected */
  bool waiting;      /* echo: a round trip in flight */
  int64_t t_start;   /* echo: round-trip start */
  struct sent_ring *ring; /* chat senders: outstanding cid -> message number */
} conn;

/* chat senders: the cids of messages not yet acked, oldest first. Acks come
 * nearly in order, so the lookup stops near the head. */
typedef struct sent_entry {
  char cid[IM_CLIENT_CID_MAX];
  int64_t k;
  bool acked;
} sent_entry;
typedef struct sent_ring {
  sent_entry *v;
  size_t cap, head, n;
} sent_ring;

/* A plain WebSocket subscriber (nchan). */
typedef struct wsub {
  int fd;
  uint32_t idx;
  bool upgraded, done;
  struct event *ev;
  unsigned char *in;
  size_t len;
} wsub;

/* chat: message k is due at sched(k) = t_begin + k / rate and goes from
 * sender k % pairs to its receiver. Messages [0, k_warm) warm up; [k_warm,
 * k_end) are measured. Latency counts from the due time, not the time the
 * client got round to sending, so a stall anywhere is not hidden by the
 * sender waiting for it (no coordinated omission). room: the same schedule
 * for the publisher. */
static struct {
  struct event *timer;
  int64_t t_begin, k_next, k_warm, k_end;
  int64_t sent_total, recv_total, acked_total; /* unique, warm-up included */
  int64_t sent, received, acked;                /* measured messages only */
  int64_t dups, ack_dups, foreign, unexpected, unsendable;
  int64_t t_first_send, t_last_send, t_first_recv, t_last_recv, t_sent_all;
  unsigned char *recv_seen, *ack_seen;          /* one bit per message number */
  struct rusage ru0, ru1;
  int64_t cpu_t0, cpu_t1, srv_ticks0, srv_ticks1;
  char first_error[200];
} C = { .srv_ticks0 = -1, .srv_ticks1 = -1 };

/* recv: what the receivers got. */
static struct {
  int64_t received, t_last;
} R;

static struct {
  struct event_base *base;
  struct event *tick, *end; /* every 100 ms; the end of the echo or hold phase */
  conn *conns;
  wsub *wsubs;
  int started, in_setup, connected, authed, failed, dropped;
  long errors;
  bool settled, finished;
  bool publisher;  /* room: the parent process, which only publishes */
  int64_t t0, phase_start, deadline, next_report;
  char first_failure[160];
  char fill[DATA_MAX]; /* --payload bytes of filler */
} B;

static volatile sig_atomic_t stop_requested;

/* Latency histogram: exact below 128 ns, then 128 linear sub-buckets per power
 * of two (under 0.8 % error); fixed size however long the run, and merged
 * across processes by adding counts. */
#define HIST_SUB_BITS 7
#define HIST_SUB (1u << HIST_SUB_BITS)
#define HIST_BUCKETS (HIST_SUB + (64 - HIST_SUB_BITS) * HIST_SUB)
typedef struct histogram {
  uint64_t counts[HIST_BUCKETS];
  uint64_t total, max;
} histogram;
static histogram hist;       /* echo round trips; chat one-way latency; room due -> delivered */
static histogram hist_ack;   /* chat: due time -> the sender's ack */
static histogram hist_lag;   /* chat, room: due time -> the client starts writing it (its own lateness) */
static histogram hist_write; /* chat: the client starts writing -> received */

/* A member value of a JSON object: strings without their quotes (escapes
 * left as they are), anything else as its raw text. */
typedef struct span {
  const char *p; /* NULL: absent */
  size_t n;
  bool str;
} span;

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
  b64_encode(mac, sizeof mac, out + o, true);
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

static double cpu_secs(const struct rusage *ru)
{
  return (double)ru->ru_utime.tv_sec + (double)ru->ru_utime.tv_usec / 1e6 +
         (double)ru->ru_stime.tv_sec + (double)ru->ru_stime.tv_usec / 1e6;
}


/* ---- IMP connections on the client library ---------------------------- */

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

static void note_failure(const char *what, unsigned code, const char *reason)
{
  if (B.first_failure[0] == '\0')
    snprintf(B.first_failure, sizeof B.first_failure, "%s %u%s%s", what, code,
             *reason ? ": " : "", reason);
}

static void chat_error(const char *p, size_t n)
{
  B.errors++;
  if (C.first_error[0] == '\0')
    snprintf(C.first_error, sizeof C.first_error, "%.*s", (int)(n < 180 ? n : 180), p);
}

static void setups_pump(void);
static void on_open(conn *c);
static void on_imp_message(conn *c, const im_client_msg *m);
static void on_imp_ack(conn *c, const char *cid);

/* Each connection is counted once: open (authed), or failed before that,
 * or dropped after. A failed or dropped one is stopped, not reconnected:
 * the bench reports a drop rather than hiding it behind a reconnect. */
static void cb_state(im_client *cl, enum im_client_state from, enum im_client_state to, void *user)
{
  conn *c = user;
  if (from == IM_CLIENT_CONNECTING && to > IM_CLIENT_CONNECTING && !c->connected) {
    c->connected = true;
    B.connected++;
  }
  if (to == IM_CLIENT_OPEN && !c->authed && !c->done) {
    c->authed = true;
    B.authed++;
    B.in_setup--;
    on_open(c);
    setups_pump();
    return;
  }
  if ((to == IM_CLIENT_WAITING || to == IM_CLIENT_STOPPED) && !c->done && !B.finished) {
    c->done = true;
    if (c->authed) {
      B.dropped++;
    } else {
      B.failed++;
      B.in_setup--;
      note_failure("setup failed in state", (unsigned)from, im_client_state_name(from));
    }
    if (to == IM_CLIENT_WAITING)
      im_client_stop(cl);
    setups_pump();
  }
}

static void cb_message(im_client *cl, const im_client_msg *m, void *user)
{
  (void)cl;
  on_imp_message(user, m);
}

static void cb_ack(im_client *cl, const char *cid, const char *id, uint64_t seq, void *user)
{
  (void)cl;
  (void)id;
  (void)seq;
  on_imp_ack(user, cid);
}

static void cb_error(im_client *cl, unsigned code, const char *reason, const char *cid, void *user)
{
  (void)cl;
  (void)cid;
  conn *c = user;
  char line[200];
  int n = snprintf(line, sizeof line, "error %u %s", code, reason);
  if (!c->authed)
    note_failure("error", code, reason);
  chat_error(line, n < 0 ? 0 : (size_t)n);
}

static void cb_close(im_client *cl, unsigned code, const char *reason, void *user)
{
  (void)cl;
  conn *c = user;
  if (!c->authed && !B.finished)
    note_failure("closed", code, reason);
}

/* Create and start connection c. What a load client needs of each is small:
 * messages of DATA_MAX bytes at most, a short window of ids, no sync (the
 * servers start with empty inboxes; im-echo and the peers know no sync). */
static void conn_start(conn *c)
{
  static const im_client_callbacks cb = {
    .on_state = cb_state, .on_message = cb_message, .on_ack = cb_ack, .on_error = cb_error,
    .on_close = cb_close,
  };
  char uid[96], tok[TOKEN_MAX];
  const char *url = c->role == ROLE_RECEIVER && opt.recv_url[0] ? opt.recv_url : opt.url;
  im_client_config cfg;

  conn_uid(c, uid, sizeof uid);
  conn_token(uid, tok);
  im_client_config_init(&cfg);
  cfg.uid = uid;
  cfg.token = tok;
  cfg.device = "d1";
  cfg.platform = "bench";
  cfg.urls = &url;
  cfg.n_urls = 1;
  cfg.no_sync = true;
  cfg.connect_timeout_ms = SETUP_TIMEOUT_MS;
  cfg.ping_ms = (unsigned)opt.ping_s * 1000u;
  cfg.ping_bg_ms = cfg.ping_ms;
  cfg.max_message = DATA_MAX + 512;
  cfg.dedupe_window = 64;
  cfg.no_room_acks = true; /* as nchan's subscribers: room messages are not acked */
  cfg.outbox_max = 65536;
  cfg.outbox_max_bytes = 64u << 20;
  B.started++;
  B.in_setup++;
  c->cl = im_client_new(&cfg, &cb, c);
  c->ev = c->cl ? im_client_event_new(B.base, c->cl) : NULL;
  if (c->ev == NULL)
    die("cannot create a client (bad --url '%s', or out of memory)", url);
  if (opt.nsrc > 0 && im_client_event_set_source(c->ev, opt.src[c->idx % (uint32_t)opt.nsrc]) != 0)
    die("bad --src address");
  if (c->role == ROLE_SUB && im_client_join(c->cl, opt.room) != 0)
    die("bad --room '%s'", opt.room);
  im_client_event_start(c->ev);
}

/* ---- chat ------------------------------------------------------------------ */

static int64_t sched(int64_t k)
{
  return C.t_begin + k * NS_PER_S / opt.rate;
}

static void ring_push(conn *c, const char *cid, int64_t k)
{
  sent_ring *r = c->ring;
  if (r == NULL && (r = c->ring = calloc(1, sizeof *r)) == NULL)
    die("out of memory");
  if (r->n == r->cap) {
    size_t cap = r->cap ? 2 * r->cap : 64;
    sent_entry *v = malloc(cap * sizeof *v);
    if (v == NULL)
      die("out of memory");
    for (size_t i = 0; i < r->n; i++)
      v[i] = r->v[(r->head + i) % r->cap];
    free(r->v);
    r->v = v;
    r->cap = cap;
    r->head = 0;
  }
  sent_entry *e = &r->v[(r->head + r->n++) % r->cap];
  snprintf(e->cid, sizeof e->cid, "%s", cid);
  e->k = k;
  e->acked = false;
}

/* The message number of an outstanding cid (marked acked), or -1. */
static int64_t ring_take(conn *c, const char *cid)
{
  sent_ring *r = c->ring;
  int64_t k = -1;
  for (size_t i = 0; r != NULL && i < r->n; i++) {
    sent_entry *e = &r->v[(r->head + i) % r->cap];
    if (!e->acked && strcmp(e->cid, cid) == 0) {
      e->acked = true;
      k = e->k;
      break;
    }
  }
  while (r != NULL && r->n > 0 && r->v[r->head].acked) {
    r->head = (r->head + 1) % r->cap;
    r->n--;
  }
  return k;
}

/* Message k's data: {"t":DUE_NS,"s":WRITE_NS,"n":k,"p":"<payload>"}. */
static int bench_data(char *out, size_t cap, int64_t due, int64_t t, int64_t k)
{
  return snprintf(out, cap, "{\"t\":%lld,\"s\":%lld,\"n\":%lld,\"p\":\"%.*s\"}", (long long)due,
                  (long long)t, (long long)k, opt.payload, B.fill);
}

/* Parses a bench message's data: t (due), n (number) and s (write time,
 * -1 when absent). */
static bool parse_data(const char *p, size_t n, int64_t *t, int64_t *k, int64_t *s)
{
  static const char *const names[] = { "t", "n", "s" };
  span d[3];
  if (!json_members(p, n, names, d, 3) || !span_i64(d[0], t) || !span_i64(d[1], k))
    return false;
  if (!span_i64(d[2], s))
    *s = -1;
  return true;
}

static void cpu_snapshot(struct rusage *ru, int64_t *t, int64_t *srv)
{
  getrusage(RUSAGE_SELF, ru);
  *t = now_ns();
  *srv = opt.server_pid > 0 ? proc_ticks(opt.server_pid) : -1;
}

/* Message k to receiver k % pairs, as {"to":"<prefix>r<i>","data":DATA}. */
static void chat_send(int64_t k)
{
  int pair = (int)(k % opt.pairs);
  conn *c = &B.conns[pair];
  int64_t due = sched(k), t = now_ns();
  char to[96], data[DATA_MAX + 128], cid[IM_CLIENT_CID_MAX];
  if (im_client_state(c->cl) != IM_CLIENT_OPEN) {
    C.unsendable++;
    return;
  }
  snprintf(to, sizeof to, "%sr%d", opt.uid_prefix, pair);
  int n = bench_data(data, sizeof data, due, t, k);
  int rc = im_client_send(c->cl, IM_CLIENT_TO_USER, to, data, (size_t)n, cid);
  if (rc != 0) {
    C.unsendable++;
    return;
  }
  ring_push(c, cid, k);
  C.sent_total++;
  if (k >= C.k_warm) {
    C.sent++;
    hist_record(&hist_lag, (uint64_t)(t > due ? t - due : 0));
    if (C.t_first_send == 0)
      C.t_first_send = t;
    C.t_last_send = t;
  }
}

static void arm_at(struct event *ev, int64_t due)
{
  int64_t d = due - now_ns();
  struct timeval tv = { 0, 0 };
  if (d > 0) {
    tv.tv_sec = d / NS_PER_S;
    tv.tv_usec = (d % NS_PER_S) / 1000;
  }
  evtimer_add(ev, &tv);
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
  if (C.k_next < C.k_end)
    arm_at(C.timer, sched(C.k_next));
}

static void chat_timer_cb(evutil_socket_t fd, short what, void *arg)
{
  (void)fd;
  (void)what;
  (void)arg;
  chat_pump();
}

static void schedule_alloc(void)
{
  C.k_warm = (int64_t)opt.warmup_s * opt.rate;
  C.k_end = C.k_warm + (int64_t)opt.duration_s * opt.rate;
  if (C.k_end > CHAT_MAX_MSGS)
    die("--rate x (--warmup + -d) is over %lld messages", (long long)CHAT_MAX_MSGS);
}

static void chat_begin(int64_t t)
{
  schedule_alloc();
  C.recv_seen = calloc((size_t)(C.k_end / 8 + 1), 1);
  C.ack_seen = calloc((size_t)(C.k_end / 8 + 1), 1);
  if (C.recv_seen == NULL || C.ack_seen == NULL)
    die("out of memory");
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

static void chat_received(const im_client_msg *m, int64_t t)
{
  int64_t ts, k, tw;
  if (!parse_data(m->data, m->data_len, &ts, &k, &tw) || k < 0 || k >= C.k_next) {
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
    if (tw >= 0)
      hist_record(&hist_write, (uint64_t)(t > tw ? t - tw : 0));
    if (opt.dump)
      fprintf(opt.dump, "%lld %lld %lld\n", (long long)k, (long long)ts, (long long)(t - ts));
    if (C.t_first_recv == 0)
      C.t_first_recv = t;
    C.t_last_recv = t;
  }
}

static void on_imp_ack(conn *c, const char *cid)
{
  int64_t t = now_ns(), k;
  if (opt.mode != MODE_CHAT || c->role != ROLE_SENDER)
    return;
  if ((k = ring_take(c, cid)) < 0) {
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

/* ---- echo --------------------------------------------------------------------- */

static void echo_send(conn *c)
{
  char uid[96];
  size_t n = (size_t)opt.payload;
  char data[DATA_MAX + 16];
  conn_uid(c, uid, sizeof uid);
  int len = snprintf(data, sizeof data, "{\"p\":\"%.*s\"}", (int)n, B.fill);
  c->t_start = now_ns();
  c->waiting = im_client_send(c->cl, IM_CLIENT_TO_USER, uid, data, (size_t)len, NULL) == 0;
  if (!c->waiting)
    B.errors++;
}


/* ---- room: subscribers (each process) -------------------------------------- */

/* What a room subscriber process tells the parent: first when its
 * subscribers are settled, then its counts when the run is over. */
typedef struct room_ready {
  int32_t authed, failed;
  char first_failure[160];
} room_ready;
typedef struct room_pub {
  int64_t ok, ok_measured; /* messages the server took, all and measured */
} room_pub;
typedef struct room_result {
  int64_t recv_total, received, dups, foreign, unexpected, t_first_recv, t_last_recv;
  int32_t authed, dropped;
  histogram h;
} room_result;

static struct {
  uint32_t first;          /* global number of this process's first subscriber */
  unsigned char *seen;     /* subscriber x message bits */
  int ctl_fd, res_fd;      /* from and to the parent */
  struct event *ctl_ev;
  bool pub_done;
  int64_t t_pub_done;
  room_pub pub;
} S = { .ctl_fd = -1, .res_fd = -1 };

static void write_all(int fd, const void *p, size_t n)
{
  const char *c = p;
  while (n > 0) {
    ssize_t w = write(fd, c, n);
    if (w < 0 && errno == EINTR)
      continue;
    if (w <= 0)
      die("write to the %s: %s", S.res_fd == fd ? "parent" : "child", strerror(errno));
    c += w;
    n -= (size_t)w;
  }
}

static bool read_all(int fd, void *p, size_t n)
{
  char *c = p;
  while (n > 0) {
    ssize_t r = read(fd, c, n);
    if (r < 0 && errno == EINTR)
      continue;
    if (r <= 0)
      return false;
    c += r;
    n -= (size_t)r;
  }
  return true;
}

/* A room message to subscriber sub of this process. Probes (n < 0) only
 * prove the subscription and are not counted. */
static void room_deliver(uint32_t sub, const char *p, size_t n)
{
  int64_t t = now_ns(), ts, k, s;
  if (!parse_data(p, n, &ts, &k, &s) || k >= C.k_end) {
    C.foreign++;
    return;
  }
  if (k < 0)
    return;
  if (bit_test_set(S.seen, (int64_t)sub * C.k_end + k)) {
    C.dups++;
    return;
  }
  C.recv_total++;
  if (k >= C.k_warm) {
    C.received++;
    hist_record(&hist, (uint64_t)(t > ts ? t - ts : 0));
    if (C.t_first_recv == 0)
      C.t_first_recv = t;
    C.t_last_recv = t;
  }
}

static void ctl_cb(evutil_socket_t fd, short what, void *arg)
{
  (void)what;
  (void)arg;
  if (!read_all(fd, &S.pub, sizeof S.pub))
    stop_requested = 1; /* the parent is gone */
  S.pub_done = true;
  S.t_pub_done = now_ns();
  event_del(S.ctl_ev);
}

static bool room_child_done(int64_t t)
{
  return S.pub_done && (C.recv_total >= S.pub.ok * B.authed ||
                        t - S.t_pub_done >= (int64_t)opt.drain_s * NS_PER_S);
}

/* ---- room: nchan's plain WebSocket subscribers ------------------------------ */

static void wsub_close(wsub *w, const char *why, int err)
{
  if (w->done)
    return;
  w->done = true;
  if (w->upgraded) {
    B.dropped++;
  } else {
    B.failed++;
    B.in_setup--;
    if (B.first_failure[0] == '\0')
      snprintf(B.first_failure, sizeof B.first_failure, "%s%s%s", why, err ? ": " : "",
               err ? strerror(err) : "");
  }
  event_free(w->ev);
  w->ev = NULL;
  close(w->fd);
  free(w->in);
  w->in = NULL;
  setups_pump();
}

/* A masked client frame (pong or close), written at once: a few bytes. */
static void wsub_send(wsub *w, unsigned opcode, const unsigned char *p, size_t n)
{
  unsigned char f[6 + 125];
  uint32_t mask = (uint32_t)random();
  if (n > 125)
    n = 125;
  f[0] = (unsigned char)(0x80 | opcode);
  f[1] = (unsigned char)(0x80 | n);
  memcpy(f + 2, &mask, 4);
  for (size_t i = 0; i < n; i++)
    f[6 + i] = p[i] ^ f[2 + (i & 3)];
  if (send(w->fd, f, 6 + n, MSG_NOSIGNAL) < 0 && errno != EAGAIN)
    wsub_close(w, "send", errno);
}

/* Consumes the 101 and then every complete frame in w->in. */
static void wsub_input(wsub *w)
{
  size_t off = 0;
  if (!w->upgraded) {
    const unsigned char *e = memmem(w->in, w->len, "\r\n\r\n", 4);
    if (e == NULL) {
      if (w->len > 8192)
        wsub_close(w, "oversized upgrade response", 0);
      return;
    }
    if (w->len < 13 || memcmp(w->in, "HTTP/1.", 7) != 0 || memcmp(w->in + 8, " 101 ", 5) != 0) {
      wsub_close(w, "upgrade refused (status not 101)", 0);
      return;
    }
    off = (size_t)(e - w->in) + 4;
    w->upgraded = true;
    event_add(w->ev, NULL); /* no setup timeout any more */
    B.authed++;
    B.in_setup--;
    setups_pump();
  }
  while (!w->done && w->len - off >= 2) {
    unsigned char *p = w->in + off;
    size_t avail = w->len - off, h = 2;
    uint64_t n = p[1] & 0x7f;
    if (n == 126)
      h = 4;
    else if (n == 127)
      h = 10;
    if (avail < h)
      break;
    if (h > 2)
      n = 0;
    for (size_t i = 2; i < h; i++)
      n = n << 8 | p[i];
    if ((p[1] & 0x80) || !(p[0] & 0x80) || n > WS_IN_MAX) {
      wsub_close(w, "ws frame: masked, fragmented or oversized", 0);
      return;
    }
    if (avail < h + n)
      break;
    unsigned op = p[0] & 0x0f;
    if (op == 1 || op == 2)
      room_deliver(w->idx, (const char *)p + h, (size_t)n);
    else if (op == 9)
      wsub_send(w, 10, p + h, (size_t)n);
    else if (op == 8)
      wsub_close(w, "closed by server", 0);
    off += h + (size_t)n;
  }
  if (!w->done && off > 0) {
    memmove(w->in, w->in + off, w->len - off);
    w->len -= off;
  }
}

static void wsub_cb(evutil_socket_t fd, short what, void *arg)
{
  wsub *w = arg;
  if (what & EV_TIMEOUT) {
    wsub_close(w, "setup timed out", 0);
    return;
  }
  if (what & EV_WRITE) { /* the connect finished: send the upgrade */
    int err = 0;
    socklen_t len = sizeof err;
    char req[1024], key64[32];
    uint64_t key[2] = { (uint64_t)random() << 31 ^ (uint64_t)random(), (uint64_t)random() };
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0 || err != 0) {
      wsub_close(w, "connect", err ? err : errno);
      return;
    }
    B.connected++;
    b64_encode((const unsigned char *)key, sizeof key, key64, false);
    int n = snprintf(req, sizeof req,
                     "GET %s HTTP/1.1\r\nHost: %s:%s\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
                     "Sec-WebSocket-Version: 13\r\n\r\n",
                     opt.sub_ep.path, opt.sub_ep.host, opt.sub_ep.port, key64);
    if (send(fd, req, (size_t)n, MSG_NOSIGNAL) != n) {
      wsub_close(w, "send", errno);
      return;
    }
    event_del(w->ev);
    event_assign(w->ev, B.base, fd, EV_READ | EV_PERSIST, wsub_cb, w);
    struct timeval tv = { SETUP_TIMEOUT_MS / 1000, 0 };
    event_add(w->ev, &tv);
    return;
  }
  for (;;) {
    unsigned char buf[16384];
    ssize_t n = recv(fd, buf, sizeof buf, 0);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0) {
      if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK))
        wsub_close(w, n == 0 ? "closed by server" : "recv", n == 0 ? 0 : errno);
      return;
    }
    unsigned char *in = realloc(w->in, w->len + (size_t)n);
    if (in == NULL)
      die("out of memory");
    w->in = in;
    memcpy(w->in + w->len, buf, (size_t)n);
    w->len += (size_t)n;
    wsub_input(w);
    if (w->done || (size_t)n < sizeof buf)
      return;
  }
}

/* A non-blocking socket connecting to ep from source address number src
 * (-1: none); -1 with errno on failure. */
static int connect_to(const endpoint *ep, int src)
{
  int one = 1;
  int fd = socket(ep->addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0)
    return -1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  if (src >= 0) {
    struct sockaddr_in sa = { .sin_family = AF_INET };
    inet_pton(AF_INET, opt.src[src], &sa.sin_addr);
#ifdef IP_BIND_ADDRESS_NO_PORT
    setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
#endif
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
      int e = errno;
      close(fd);
      errno = e;
      return -1;
    }
  }
  if (connect(fd, (const struct sockaddr *)&ep->addr, ep->addr_len) < 0 && errno != EINPROGRESS) {
    int e = errno;
    close(fd);
    errno = e;
    return -1;
  }
  return fd;
}

static void wsub_start(wsub *w)
{
  B.started++;
  B.in_setup++;
  w->fd = connect_to(&opt.sub_ep, opt.nsrc ? (int)((S.first + w->idx) % (uint32_t)opt.nsrc) : -1);
  if (w->fd < 0) {
    w->done = true;
    B.failed++;
    B.in_setup--;
    if (B.first_failure[0] == '\0')
      snprintf(B.first_failure, sizeof B.first_failure, "connect: %s", strerror(errno));
    return;
  }
  w->ev = event_new(B.base, w->fd, EV_WRITE, wsub_cb, w);
  struct timeval tv = { SETUP_TIMEOUT_MS / 1000, 0 };
  if (w->ev == NULL || event_add(w->ev, &tv) < 0)
    die("out of memory");
}

/* ---- room: the paced HTTP publisher (the parent process) -------------------- */

/* One keep-alive HTTP/1.1 connection with at most one request in flight. */
typedef struct pubconn {
  int fd;
  bool busy;
  int64_t k; /* the message in flight; -1: a probe */
  struct event *ev;
  char in[HTTP_IN_MAX];
  size_t len;
  char out[DATA_MAX + 1024];
  size_t out_len, out_off;
} pubconn;

static struct {
  pubconn pc[PUB_CONNS_MAX];
  int64_t ok, ok_measured, failed, count_measured; /* count: the server's own delivery count */
  int64_t last_count, need;    /* probing: the last count seen, and the subscribers to see */
  bool probing;
  int64_t probe_start;
  struct event *probe_timer;
  char first_error[200];
} P;

static void pub_pump(void);
static void pub_cb(evutil_socket_t fd, short what, void *arg);

static void pub_arm(pubconn *pc, bool writing)
{
  event_del(pc->ev);
  event_assign(pc->ev, B.base, pc->fd, EV_READ | EV_PERSIST | (writing ? EV_WRITE : 0), pub_cb,
               pc);
  event_add(pc->ev, NULL);
}

static void pub_flush(pubconn *pc)
{
  while (pc->out_off < pc->out_len) {
    ssize_t n = send(pc->fd, pc->out + pc->out_off, pc->out_len - pc->out_off, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR)
      continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOTCONN)) {
      pub_arm(pc, true); /* full, or still connecting */
      return;
    }
    if (n < 0)
      die("publisher: send: %s", strerror(errno));
    pc->out_off += (size_t)n;
  }
  pub_arm(pc, false);
}

/* POST message k (due at `due`; k < 0: a probe) on pc. imd: its room push,
 * {"from":"bench","room":ROOM,"data":DATA} to /v1/messages with the API key
 * (docs/HTTP_API.md); nchan: DATA itself to the publisher location. */
static void pub_send(pubconn *pc, int64_t k, int64_t due)
{
  char data[DATA_MAX + 128], body[DATA_MAX + 512], auth[300] = "";
  int64_t t = now_ns();
  int dn = bench_data(data, sizeof data, due, t, k), bn;
  if (opt.peer == PEER_IMD) {
    bn = snprintf(body, sizeof body, "{\"from\":\"bench\",\"room\":\"%s\",\"data\":%.*s}", opt.room,
                  dn, data);
    snprintf(auth, sizeof auth, "Authorization: Bearer %s\r\n", opt.api_key);
  } else {
    bn = snprintf(body, sizeof body, "%.*s", dn, data);
  }
  pc->out_len = (size_t)snprintf(pc->out, sizeof pc->out,
                                 "POST %s HTTP/1.1\r\nHost: %s:%s\r\n%sAccept: application/json\r\n"
                                 "Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s",
                                 opt.pub_ep.path, opt.pub_ep.host, opt.pub_ep.port, auth, bn, body);
  pc->out_off = 0;
  pc->busy = true;
  pc->k = k;
  if (k >= C.k_warm)
    hist_record(&hist_lag, (uint64_t)(t > due ? t - due : 0));
  pub_flush(pc);
}

/* The integer after "name": in a JSON body, -1 if absent. */
static int64_t body_count(const char *body, size_t n, const char *name)
{
  char key[40];
  snprintf(key, sizeof key, "\"%s\"", name);
  const char *p = memmem(body, n, key, strlen(key));
  if (p == NULL)
    return -1;
  p += strlen(key);
  while (p < body + n && (*p == ':' || *p == ' '))
    p++;
  return p < body + n && *p >= '0' && *p <= '9' ? strtoll(p, NULL, 10) : -1;
}

/* One answer: imd says {"id":..,"delivered":N}, nchan (Accept: json)
 * {"messages":..,"subscribers":N,...}. */
static void pub_answer(pubconn *pc, int status, const char *body, size_t n)
{
  int64_t count = body_count(body, n, opt.peer == PEER_IMD ? "delivered" : "subscribers");
  pc->busy = false;
  if (pc->k < 0) {
    P.last_count = count;
    return;
  }
  if (status >= 200 && status < 300) {
    P.ok++;
    if (pc->k >= C.k_warm) {
      P.ok_measured++;
      P.count_measured += count > 0 ? count : 0;
    }
  } else {
    P.failed++;
    if (P.first_error[0] == '\0')
      snprintf(P.first_error, sizeof P.first_error, "HTTP %d: %.*s", status,
               (int)(n < 150 ? n : 150), body);
  }
}

/* Takes every complete answer in pc->in; false when one is malformed. */
static bool pub_parse(pubconn *pc)
{
  for (;;) {
    const char *end = memmem(pc->in, pc->len, "\r\n\r\n", 4);
    if (end == NULL)
      return pc->len < sizeof pc->in;
    size_t head = (size_t)(end - pc->in) + 4, body_len;
    const char *body = pc->in + head;
    int status = pc->len > 12 && memcmp(pc->in, "HTTP/1.", 7) == 0 ? atoi(pc->in + 9) : 0;
    char saved = pc->in[head - 1];
    pc->in[head - 1] = '\0'; /* strcasestr over the head only */
    const char *cl = strcasestr(pc->in, "\ncontent-length:");
    bool chunked = strcasestr(pc->in, "\ntransfer-encoding: chunked") != NULL;
    pc->in[head - 1] = saved;
    if (status == 0)
      return false;
    size_t total;
    if (chunked) { /* small answers: one chunk, then the last */
      const char *last = memmem(body, pc->len - head, "\r\n0\r\n\r\n", 7);
      if (last == NULL)
        return pc->len < sizeof pc->in;
      const char *data = memmem(body, (size_t)(last - body), "\r\n", 2);
      body = data ? data + 2 : last;
      body_len = (size_t)(last - body);
      total = (size_t)(last + 7 - pc->in);
    } else {
      body_len = cl ? (size_t)strtoul(cl + 16, NULL, 10) : 0;
      if (pc->len - head < body_len)
        return pc->len < sizeof pc->in;
      total = head + body_len;
    }
    pub_answer(pc, status, body, body_len);
    memmove(pc->in, pc->in + total, pc->len - total);
    pc->len -= total;
  }
}

static void pub_cb(evutil_socket_t fd, short what, void *arg)
{
  pubconn *pc = arg;
  if (what & EV_WRITE)
    pub_flush(pc);
  if (!(what & EV_READ))
    return;
  ssize_t n = recv(fd, pc->in + pc->len, sizeof pc->in - pc->len, 0);
  if (n < 0 && (errno == EAGAIN || errno == EINTR))
    return;
  if (n <= 0)
    die("publisher: the server closed the connection%s%s", n < 0 ? ": " : "",
        n < 0 ? strerror(errno) : "");
  pc->len += (size_t)n;
  if (!pub_parse(pc))
    die("publisher: bad HTTP answer: %.*s", (int)(pc->len < 200 ? pc->len : 200), pc->in);
  if (!P.probing)
    pub_pump();
}

static pubconn *pub_idle(void)
{
  for (int i = 0; i < opt.pub_conns; i++)
    if (!P.pc[i].busy)
      return &P.pc[i];
  return NULL;
}

static bool pub_all_idle(void)
{
  for (int i = 0; i < opt.pub_conns; i++)
    if (P.pc[i].busy)
      return false;
  return true;
}

/* Sends what is due on idle connections (late if none was idle: the
 * latency counts from the due time), then waits for the next due time. */
static void pub_pump(void)
{
  pubconn *pc;
  while (C.k_next < C.k_end && sched(C.k_next) <= now_ns() && (pc = pub_idle()) != NULL) {
    if (C.k_next == C.k_warm)
      cpu_snapshot(&C.ru0, &C.cpu_t0, &C.srv_ticks0);
    pub_send(pc, C.k_next, sched(C.k_next));
    C.k_next++;
  }
  if (C.k_next == C.k_end && C.t_sent_all == 0) {
    cpu_snapshot(&C.ru1, &C.cpu_t1, &C.srv_ticks1);
    C.t_sent_all = C.cpu_t1;
  }
  if (C.k_next < C.k_end && pub_idle() != NULL)
    arm_at(C.timer, sched(C.k_next));
}

static void pub_timer_cb(evutil_socket_t fd, short what, void *arg)
{
  (void)fd;
  (void)what;
  (void)arg;
  pub_pump();
}

/* Before the run: probes until the server counts every subscriber in the
 * room (imd's join and nchan's subscription are asynchronous to the
 * connection being open), every 20 ms. */
static void probe_cb(evutil_socket_t fd, short what, void *arg)
{
  (void)fd;
  (void)what;
  (void)arg;
  int64_t t = now_ns();
  struct timeval tv = { 0, 20000 };
  if (P.last_count >= P.need) {
    P.probing = false;
    C.t_begin = t + NS_PER_S / 10;
    pub_pump();
    return;
  }
  if (t - P.probe_start > PROBE_TIMEOUT_NS)
    die("the server counted %lld of %lld subscribers after %lld s", (long long)P.last_count,
        (long long)P.need, (long long)(PROBE_TIMEOUT_NS / NS_PER_S));
  if (P.pc[0].busy == false)
    pub_send(&P.pc[0], -1, t);
  evtimer_add(P.probe_timer, &tv);
}

static void pub_connect(void)
{
  for (int i = 0; i < opt.pub_conns; i++) {
    pubconn *pc = &P.pc[i];
    pc->fd = connect_to(&opt.pub_ep, -1);
    if (pc->fd < 0)
      die("publisher: connect to %s:%s: %s", opt.pub_ep.host, opt.pub_ep.port, strerror(errno));
    pc->ev = event_new(B.base, pc->fd, EV_READ | EV_PERSIST, pub_cb, pc);
    if (pc->ev == NULL || event_add(pc->ev, NULL) < 0)
      die("out of memory");
  }
}

/* ---- settling, the clock, the end --------------------------------------------- */

static void on_settled(void);

static void setups_pump(void)
{
  while (B.started < opt.nconns && B.in_setup < opt.window && !B.finished) {
    if (opt.mode == MODE_ROOM && opt.peer == PEER_NCHAN)
      wsub_start(&B.wsubs[B.started]);
    else
      conn_start(&B.conns[B.started]);
  }
  if (!B.settled && B.started == opt.nconns && B.in_setup == 0)
    on_settled();
}

static void on_open(conn *c)
{
  if (B.settled && opt.mode == MODE_ECHO)
    echo_send(c);
}

static void on_imp_message(conn *c, const im_client_msg *m)
{
  int64_t t = now_ns();
  switch (opt.mode) {
  case MODE_ECHO:
    /* the ack carries no payload; the round trip ends with the echoed msg */
    if (!c->waiting)
      return;
    hist_record(&hist, (uint64_t)(t - c->t_start));
    c->waiting = false;
    if (t < B.deadline && !stop_requested)
      echo_send(c);
    return;
  case MODE_RECV:
    R.received++;
    R.t_last = t;
    return;
  case MODE_CHAT:
    if (c->role != ROLE_RECEIVER)
      C.unexpected++;
    else
      chat_received(m, t);
    return;
  case MODE_ROOM:
    if (strcmp(m->room, opt.room) != 0)
      C.unexpected++;
    else
      room_deliver(c->idx, m->data, m->data_len);
    return;
  case MODE_HOLD:
    return;
  }
}

static void finish(void)
{
  B.finished = true;
  event_base_loopbreak(B.base);
}

static void end_cb(evutil_socket_t fd, short what, void *arg)
{
  (void)fd;
  (void)what;
  (void)arg;
  finish();
}

static void on_settled(void)
{
  int64_t t = now_ns();
  B.settled = true;
  B.phase_start = t;
  B.deadline = t + opt.duration_s * NS_PER_S;
  if (opt.mode == MODE_ROOM) { /* a subscriber process: tell the parent */
    room_ready r = { .authed = B.authed, .failed = B.failed };
    snprintf(r.first_failure, sizeof r.first_failure, "%s", B.first_failure);
    write_all(S.res_fd, &r, sizeof r);
    return;
  }
  printf("connected %d authed %d failed %d\n", B.connected, B.authed, B.failed);
  fflush(stdout);
  if (B.first_failure[0] != '\0')
    fprintf(stderr, "first failure: %s\n", B.first_failure);
  if (opt.mode == MODE_ECHO || opt.mode == MODE_HOLD) { /* the phase ends on time, not at a tick */
    if ((B.end = evtimer_new(B.base, end_cb, NULL)) == NULL)
      die("out of memory");
    arm_at(B.end, t + (opt.mode == MODE_ECHO ? opt.duration_s : opt.hold_s) * NS_PER_S);
  }
  for (int i = 0; opt.mode == MODE_ECHO && i < opt.nconns; i++)
    if (B.conns[i].authed && !B.conns[i].done)
      echo_send(&B.conns[i]);
  if (opt.mode == MODE_CHAT) {
    if (B.authed != opt.nconns)
      die("chat needs every connection authenticated (%d of %d; first failure: %s)", B.authed,
          opt.nconns, B.first_failure);
    chat_begin(t);
  }
}

/* Every 100 ms: the end of the phase, and progress once a second. */
static void tick_cb(evutil_socket_t fd, short what, void *arg)
{
  (void)fd;
  (void)what;
  (void)arg;
  int64_t t = now_ns();
  if (stop_requested) {
    finish();
    return;
  }
  if (B.publisher)
    return;
  setups_pump();
  if (B.settled) {
    switch (opt.mode) {
    case MODE_CHAT:
      if (chat_done(t))
        finish();
      break;
    case MODE_RECV:
      if ((opt.idle_exit_s > 0 && R.received > 0 &&
           t - R.t_last >= (int64_t)opt.idle_exit_s * NS_PER_S) ||
          t - B.phase_start >= opt.hold_s * NS_PER_S)
        finish();
      break;
    case MODE_ROOM:
      if (room_child_done(t))
        finish();
      break;
    default:
      if (t - B.phase_start >= (opt.mode == MODE_ECHO ? opt.duration_s : opt.hold_s) * NS_PER_S)
        finish();
    }
  }
  if (t < B.next_report || B.finished)
    return;
  B.next_report = t + NS_PER_S;
  if (!B.settled)
    fprintf(stderr, "[%5.1fs] started %d connected %d authed %d failed %d\n",
            (double)(t - B.t0) / 1e9, B.started, B.connected, B.authed, B.failed);
  else if (opt.mode == MODE_CHAT && (t - B.phase_start) / NS_PER_S % 5 == 0)
    fprintf(stderr, "[%5.1fs] sent %lld received %lld acked %lld errors %ld\n",
            (double)(t - B.t0) / 1e9, (long long)C.sent_total, (long long)C.recv_total,
            (long long)C.acked_total, B.errors);
}

static void on_signal(int sig)
{
  (void)sig;
  stop_requested = 1;
}

/* The event base (precise timers: the send schedule must not round to
 * milliseconds) and the 100 ms tick. */
static void base_init(void)
{
  struct event_config *cfg = event_config_new();
  struct timeval tv = { 0, 100000 };
  if (cfg == NULL)
    die("out of memory");
  event_config_set_flag(cfg, EVENT_BASE_FLAG_PRECISE_TIMER);
  B.base = event_base_new_with_config(cfg);
  event_config_free(cfg);
  if (B.base == NULL)
    die("cannot create an event base");
  B.tick = event_new(B.base, -1, EV_PERSIST, tick_cb, NULL);
  C.timer = evtimer_new(B.base, opt.mode == MODE_ROOM ? pub_timer_cb : chat_timer_cb, NULL);
  if (B.tick == NULL || C.timer == NULL || event_add(B.tick, &tv) < 0)
    die("out of memory");
  B.t0 = now_ns();
  /* the default 50 us timer slack would make every paced send that much late */
  prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);
}

/* The open-file limit, raised to the hard limit; dies if n connections do
 * not fit. */
static void fd_limit(int n)
{
  struct rlimit rl = { .rlim_cur = FD_CEILING, .rlim_max = FD_CEILING };
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    getrlimit(RLIMIT_NOFILE, &rl);
  }
  int limit = rl.rlim_cur < FD_CEILING ? (int)rl.rlim_cur : FD_CEILING;
  if (n > limit - FD_RESERVE)
    die("%d connections need more than the %d open files allowed per process; "
        "run several processes (room: --procs) with at most %d each", n, limit,
        limit - FD_RESERVE);
}

/* ---- room: the processes ------------------------------------------------------ */

/* A subscriber process: subscribers [first, first + n) of the room. */
static void room_child(uint32_t first, int n, int ctl_fd, int res_fd)
{
  S.first = first;
  S.ctl_fd = ctl_fd;
  S.res_fd = res_fd;
  opt.nconns = n;
  fd_limit(n);
  if ((uint64_t)n * (uint64_t)C.k_end > (uint64_t)ROOM_MAX_BITS)
    die("%d subscribers x %lld messages per process: use more --procs or fewer messages", n,
        (long long)C.k_end);
  S.seen = calloc((size_t)((int64_t)n * C.k_end / 8 + 1), 1);
  if (opt.peer == PEER_NCHAN)
    B.wsubs = calloc((size_t)n, sizeof *B.wsubs);
  else
    B.conns = calloc((size_t)n, sizeof *B.conns);
  if (S.seen == NULL || (B.wsubs == NULL && B.conns == NULL))
    die("out of memory");
  for (int i = 0; i < n; i++) {
    if (opt.peer == PEER_NCHAN) {
      B.wsubs[i].idx = (uint32_t)i;
      B.wsubs[i].fd = -1;
    } else {
      B.conns[i].idx = (uint32_t)i;
      B.conns[i].role = ROLE_SUB;
    }
  }
  base_init();
  S.ctl_ev = event_new(B.base, ctl_fd, EV_READ | EV_PERSIST, ctl_cb, NULL);
  if (S.ctl_ev == NULL || event_add(S.ctl_ev, NULL) < 0)
    die("out of memory");
  setups_pump();
  event_base_dispatch(B.base);
  room_result r = {
    .recv_total = C.recv_total, .received = C.received, .dups = C.dups, .foreign = C.foreign,
    .unexpected = C.unexpected, .t_first_recv = C.t_first_recv, .t_last_recv = C.t_last_recv,
    .authed = B.authed, .dropped = B.dropped,
  };
  r.h = hist;
  write_all(res_fd, &r, sizeof r);
  _exit(0);
}

/* sub_cpu: CPU seconds of the subscriber processes, setup included. */
static void print_room(const room_result *sum, int procs, double sub_cpu)
{
  int64_t subs = sum->authed;
  int64_t expected = P.ok_measured * subs, expected_all = P.ok * subs;
  int64_t unanswered;
  double span_s = (double)(sum->t_last_recv - sum->t_first_recv) / 1e9;
  double rate = sum->received > 1 && span_s > 0 ? (double)sum->received / span_s : 0;
  double wall = (double)(C.cpu_t1 - C.cpu_t0) / 1e9;
  double srv_cpu = -1;
  if (C.srv_ticks0 >= 0 && C.srv_ticks1 >= 0 && wall > 0)
    srv_cpu = 100 * (double)(C.srv_ticks1 - C.srv_ticks0) / (double)sysconf(_SC_CLK_TCK) / wall;
  double q50 = (double)hist_quantile(&sum->h, 0.50) / 1e3, q90 = (double)hist_quantile(&sum->h, 0.90) / 1e3;
  double q99 = (double)hist_quantile(&sum->h, 0.99) / 1e3, q999 = (double)hist_quantile(&sum->h, 0.999) / 1e3;
  double qmax = (double)sum->h.max / 1e3;
  double l50 = (double)hist_quantile(&hist_lag, 0.50) / 1e3, l99 = (double)hist_quantile(&hist_lag, 0.99) / 1e3;
  const char *peer = opt.peer == PEER_IMD ? "imd" : "nchan";

  unanswered = (C.k_end - C.k_warm) - P.ok_measured - P.failed;
  printf("room: %s, %lld subscribers in %d processes, %d msgs/s published, %d s warm-up + %d s "
         "measured\n", peer, (long long)subs, procs, opt.rate, opt.warmup_s, opt.duration_s);
  printf("published %lld measured messages, taken %lld (HTTP errors %lld, not taken or "
         "unanswered %lld); the server counted %lld deliveries\n", (long long)(C.k_end - C.k_warm),
         (long long)P.ok_measured, (long long)P.failed, (long long)unanswered,
         (long long)P.count_measured);
  printf("delivered %lld of %lld expected (lost %lld; all messages: %lld of %lld), dups %lld, "
         "unparsable %lld, other rooms %lld: %.0f deliveries/s\n", (long long)sum->received,
         (long long)expected, (long long)(expected - sum->received), (long long)sum->recv_total,
         (long long)expected_all, (long long)sum->dups, (long long)sum->foreign,
         (long long)sum->unexpected, rate);
  printf("latency us (due -> delivered): p50 %.1f  p90 %.1f  p99 %.1f  p99.9 %.1f  max %.1f  (n=%llu)\n",
         q50, q90, q99, q999, qmax, (unsigned long long)sum->h.total);
  printf("publish lag us (due -> written): p50 %.1f  p99 %.1f  max %.1f\n", l50, l99,
         (double)hist_lag.max / 1e3);
  printf("subscriber processes: %.2f s CPU in all, setup included", sub_cpu);
  if (srv_cpu >= 0)
    printf("; server CPU %.1f%% over the measured %.1f s", srv_cpu, wall);
  printf("\n");
  if (P.first_error[0] != '\0')
    printf("first publish error: %s\n", P.first_error);
  printf("RESULT mode=room peer=%s subs=%lld procs=%d rate=%d secs=%d published=%lld taken=%lld "
         "pub_errors=%lld server_count=%lld expected=%lld delivered=%lld lost=%lld dups=%lld "
         "deliveries_per_s=%.0f p50_us=%.1f p90_us=%.1f p99_us=%.1f p999_us=%.1f max_us=%.1f "
         "lag_p99_us=%.1f srv_cpu_pct=%.1f sub_cpu_s=%.2f failed=%d dropped=%d\n",
         peer, (long long)subs, procs, opt.rate, opt.duration_s, (long long)(C.k_end - C.k_warm),
         (long long)P.ok_measured, (long long)P.failed, (long long)P.count_measured,
         (long long)expected, (long long)sum->received, (long long)(expected - sum->received),
         (long long)sum->dups, rate, q50, q90, q99, q999, qmax, l99, srv_cpu, sub_cpu, B.failed,
         sum->dropped);
}

/* The parent: forks the subscriber processes, waits until every subscriber
 * is in, publishes, tells each process how many messages the server took,
 * and adds up what they counted. */
static int room_main(void)
{
  int procs = opt.procs > 0 ? opt.procs : (opt.nconns + 9999) / 10000;
  int ctl[PUB_CONNS_MAX], res[PUB_CONNS_MAX];
  pid_t pids[PUB_CONNS_MAX];
  if (procs > opt.nconns)
    procs = opt.nconns;
  if (procs > PUB_CONNS_MAX)
    die("at most %d processes", PUB_CONNS_MAX);
  schedule_alloc();
  fflush(stdout);
  for (int i = 0, first = 0; i < procs; i++) {
    int n = opt.nconns / procs + (i < opt.nconns % procs), c[2], r[2];
    if (pipe(c) < 0 || pipe(r) < 0)
      die("pipe: %s", strerror(errno));
    pid_t pid = fork();
    if (pid < 0)
      die("fork: %s", strerror(errno));
    if (pid == 0) {
      close(c[1]);
      close(r[0]);
      for (int j = 0; j < i; j++) {
        close(ctl[j]);
        close(res[j]);
      }
      srandom((unsigned)getpid());
      room_child((uint32_t)first, n, c[0], r[1]);
    }
    close(c[0]);
    close(r[1]);
    ctl[i] = c[1];
    res[i] = r[0];
    pids[i] = pid;
    first += n;
  }
  int authed = 0;
  for (int i = 0; i < procs; i++) {
    room_ready r;
    if (!read_all(res[i], &r, sizeof r))
      die("subscriber process %d died during setup", i);
    authed += r.authed;
    B.failed += r.failed;
    if (B.first_failure[0] == '\0' && r.first_failure[0] != '\0')
      snprintf(B.first_failure, sizeof B.first_failure, "%s", r.first_failure);
  }
  printf("connected %d authed %d failed %d\n", authed + B.failed, authed, B.failed);
  fflush(stdout);
  if (authed != opt.nconns) {
    for (int i = 0; i < procs; i++)
      kill(pids[i], SIGTERM);
    die("room needs every subscriber in (%d of %d; first failure: %s)", authed, opt.nconns,
        B.first_failure);
  }
  B.publisher = true;
  base_init();
  pub_connect();
  P.probing = true;
  P.need = authed;
  P.last_count = -1;
  P.probe_start = now_ns();
  P.probe_timer = evtimer_new(B.base, probe_cb, NULL);
  struct timeval tv = { 0, 20000 };
  evtimer_add(P.probe_timer, &tv);
  /* publish, then wait for the last answers (at most --drain s) */
  while (!stop_requested) {
    event_base_loop(B.base, EVLOOP_ONCE);
    if (C.t_sent_all != 0 && (pub_all_idle() || now_ns() - C.t_sent_all >= opt.drain_s * NS_PER_S))
      break;
  }
  room_pub pub = { .ok = P.ok, .ok_measured = P.ok_measured };
  room_result sum = { .t_first_recv = INT64_MAX };
  for (int i = 0; i < procs; i++)
    write_all(ctl[i], &pub, sizeof pub);
  static room_result r;
  for (int i = 0; i < procs; i++) {
    if (!read_all(res[i], &r, sizeof r))
      die("subscriber process %d died", i);
    sum.recv_total += r.recv_total;
    sum.received += r.received;
    sum.dups += r.dups;
    sum.foreign += r.foreign;
    sum.unexpected += r.unexpected;
    sum.authed += r.authed;
    sum.dropped += r.dropped;
    if (r.t_first_recv != 0 && r.t_first_recv < sum.t_first_recv)
      sum.t_first_recv = r.t_first_recv;
    if (r.t_last_recv > sum.t_last_recv)
      sum.t_last_recv = r.t_last_recv;
    for (uint32_t b = 0; b < HIST_BUCKETS; b++)
      sum.h.counts[b] += r.h.counts[b];
    sum.h.total += r.h.total;
    if (r.h.max > sum.h.max)
      sum.h.max = r.h.max;
    waitpid(pids[i], NULL, 0);
  }
  if (sum.t_first_recv == INT64_MAX)
    sum.t_first_recv = 0;
  struct rusage ru;
  getrusage(RUSAGE_CHILDREN, &ru);
  print_room(&sum, procs, cpu_secs(&ru));
  return 0;
}

/* ---- output --------------------------------------------------------------- */

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
         opt.rate, opt.warmup_s, opt.duration_s, "on");
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
    open_now += B.conns[i].cl != NULL && im_client_state(B.conns[i].cl) == IM_CLIENT_OPEN;
  if (opt.mode == MODE_CHAT) {
    print_chat(open_now);
    if (opt.dump && fclose(opt.dump) != 0)
      fprintf(stderr, "im-bench: --dump: %s\n", strerror(errno));
    opt.dump = NULL;
    return;
  }
  if (opt.mode == MODE_RECV) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("received %lld msgs on %d connections, acks sent %lld, errors %ld, CPU %.2f s\n",
           (long long)R.received, open_now, (long long)R.received, B.errors, cpu_secs(&ru));
    if (C.first_error[0] != '\0')
      printf("first error: %s\n", C.first_error);
    printf("RESULT mode=recv conns=%d authed=%d failed=%d dropped=%d open=%d received=%lld "
           "acks=%lld errors=%ld secs=%.1f cpu_s=%.2f\n", opt.nconns, B.authed, B.failed, B.dropped,
           open_now, (long long)R.received, (long long)R.received, B.errors, secs, cpu_secs(&ru));
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
  const char *transport = strncmp(opt.url, "tcp://", 6) == 0 ? "tcp" : "ws";

  printf("round trips %llu in %.2f s: %.0f rt/s over %d connections (%s)\n",
         (unsigned long long)hist.total, secs, rtps, open_now, transport);
  printf("latency us: p50 %.1f  p90 %.1f  p99 %.1f  p99.9 %.1f  max %.1f\n", p50, p90, p99, p999, max);
  printf("RESULT mode=echo transport=%s conns=%d rts=%llu secs=%.3f rtps=%.0f p50_us=%.1f "
         "p90_us=%.1f p99_us=%.1f p999_us=%.1f max_us=%.1f failed=%d dropped=%d errors=%ld\n",
         transport, B.authed, (unsigned long long)hist.total, secs, rtps, p50, p90, p99, p999, max,
         B.failed, B.dropped, B.errors);
}

static void usage(FILE *f)
{
  fputs("usage:\n"
        "  im-bench hold --url ws://HOST:PORT/ws -n N [--src IP,IP,...] [--hold-seconds S]\n"
        "  im-bench echo --url ws://HOST:PORT/ws -c N [-d SECONDS] [--tcp HOST:PORT]\n"
        "  im-bench chat --url ws://HOST:PORT/ws [--recv-url ws://HOST:PORT/ws] [--pairs P]\n"
        "                [--rate R] [-d SECONDS] [--warmup S] [--secret-file F | --secret S]\n"
        "  im-bench recv --url ws://HOST:PORT/ws [-n N] [--idle-exit S] [--secret-file F]\n"
        "  im-bench room --url ws://HOST:PORT/ws --publish http://HOST:PORT/v1/messages\n"
        "                --api-key-file F [--secret-file F] -n N [--procs P] [--rate R] [-d S]\n"
        "  im-bench room --peer nchan --url ws://HOST:PORT/sub/ROOM\n"
        "                --publish http://HOST:PORT/pub/ROOM -n N [--procs P] [--rate R] [-d S]\n"
        "\n"
        "Every IMP connection is a client of the libim client library (auth message,\n"
        "an ack for every message delivered, pings every --ping-seconds); one that\n"
        "fails or drops is counted and not reconnected.\n"
        "\n"
        "hold: open N connections, authenticate, keep them idle (pings every\n"
        "      --ping-seconds), print 'connected N authed N failed N' once all are\n"
        "      settled, then hold them S seconds (default 30) or until SIGTERM/SIGINT.\n"
        "echo: N connections each sending msg and waiting for its echo, in a closed\n"
        "      loop for D seconds (default 10) counted once all are authenticated;\n"
        "      prints round trips/s, latency percentiles and a 'RESULT k=v ...' line.\n"
        "chat: P senders <prefix>s<i> and P receivers <prefix>r<i> (2P connections);\n"
        "      message k is due at k/R s after the start and goes from sender k%P to\n"
        "      receiver k%P as {\"op\":\"msg\",\"cid\":CID,\"to\":\"r<i>\",\"data\":\n"
        "      {\"t\":DUE_NS,\"s\":WRITE_NS,\"n\":k,\"p\":PAYLOAD}} (CLOCK_MONOTONIC ns; open\n"
        "      loop: latency counts from the due time, so stalls are not hidden).\n"
        "      --warmup S unmeasured, then -d D measured; then up\n"
        "      to --drain S for stragglers. Receivers ack every message (the library).\n"
        "      Prints one-way latency (due -> received), ack latency (due -> the\n"
        "      sender's ack), the client's own send lag, CPU, and a RESULT line.\n"
        "recv: N receivers <prefix><i> (default prefix r) that count and ack every\n"
        "      msg pushed to them; exits after --hold-seconds, on SIGTERM/SIGINT, or\n"
        "      --idle-exit S seconds after the last msg; prints a RESULT line.\n"
        "room: N subscribers of --room (default bench) in P processes (default: one per\n"
        "      10,000), each at most ~19,980; imd: IMP clients <prefix><i> that join\n"
        "      the room; nchan: plain WebSocket subscribers of --url. Once all are in\n"
        "      (probe messages until the server's own count, imd's \"delivered\" or\n"
        "      nchan's \"subscribers\", reaches N), one process publishes message k\n"
        "      at k/R s over --pub-conns keep-alive HTTP connections: imd: POST\n"
        "      {\"from\":\"bench\",\"room\":ROOM,\"data\":DATA} with the API key;\n"
        "      nchan: POST DATA; DATA = {\"t\":DUE_NS,\"s\":WRITE_NS,\"n\":k,\"p\":..}.\n"
        "      Each subscriber counts each message once; expected = messages the\n"
        "      server took (2xx) x subscribers, so a lost delivery shows as lost.\n"
        "      Prints deliveries/s, latency (due -> delivered) and a RESULT line.\n"
        "\n"
        "  --url URL         WebSocket endpoint (ws://HOST:PORT/PATH, imp.json), or\n"
        "                    tcp://HOST:PORT (raw TCP, binary IMP)\n"
        "  --recv-url URL    chat: receivers connect here, senders to --url (e.g. two\n"
        "                    nodes of an imd cluster; default: --url)\n"
        "  --dump FILE       chat: a line per measured delivery: message number, due\n"
        "                    time (ns, CLOCK_MONOTONIC), latency (ns); to find when\n"
        "                    the slow ones happened\n"
        "  --tcp HOST:PORT   raw TCP binary framing instead of WebSocket\n"
        "  -n, -c N          connections in this process (at most ~19,980); room: in all\n"
        "  --src IP[,IP...]  source addresses used round-robin (more ports per target)\n"
        "  --window N        connection setups in flight at once (default 500)\n"
        "  --hold-seconds S  hold: time to hold after setup (default 30)\n"
        "  --ping-seconds S  hold: keepalive interval (default 20)\n"
        "  -d SECONDS        echo, chat, room: measured duration (default 10)\n"
        "  --payload BYTES   echo, chat, room: length of the data string (default 16)\n"
        "  --ack, --auth-frame  accepted for old scripts: the client library always\n"
        "                    acks and always authenticates with an auth message\n"
        "  --uid-prefix P    uids are P<index> (default u<pid>-; chat: P s<i> / P r<i>,\n"
        "                    default empty; recv: default r); [A-Za-z0-9._-]\n"
        "  --secret S        mint real imd tokens (docs/TOKENS.md) with this secret\n"
        "  --secret-file F   the same, the secret read from F (e.g. DATA/secret)\n"
        "                    (without either, the token is \"t\": im-echo and peers)\n"
        "  --pairs P         chat: sender/receiver pairs (default 100)\n"
        "  --rate R          chat: messages/s from this process, all pairs; room: messages\n"
        "                    published per second (default 10000)\n"
        "  --warmup S        chat, room: unmeasured seconds first (default 3)\n"
        "  --drain S         chat, room: longest wait for outstanding messages (default 5)\n"

        "  --idle-exit S     recv: exit S seconds after the last msg (0: never)\n"
        "  --server-pid PID  chat, room: also report this process's CPU over the measured part\n"
        "  --peer imd|nchan  room: the server (default imd)\n"
        "  --publish URL     room: the publisher's http://HOST:PORT/PATH\n"
        "  --api-key K, --api-key-file F  room, imd: the HTTP API key (DATA/api-key)\n"
        "  --room NAME       room: the room (default bench)\n"
        "  --procs P         room: subscriber processes\n"
        "  --pub-conns C     room: publisher connections (default 4)\n",
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

/* ws://HOST:PORT/PATH or http://HOST:PORT/PATH into ep, resolved (IPv4). */
static void parse_url(endpoint *ep, const char *url)
{
  struct addrinfo hints = { .ai_family = AF_INET, .ai_socktype = SOCK_STREAM }, *ai;
  size_t skip = strncmp(url, "ws://", 5) == 0 ? 5 : strncmp(url, "http://", 7) == 0 ? 7 : 0;
  const char *rest = url + skip, *slash;
  int rc;
  if (skip == 0)
    die("expected a ws:// or http:// URL: '%s'", url);
  slash = strchr(rest, '/');
  parse_hostport(ep, rest, slash ? (size_t)(slash - rest) : strlen(rest), "80");
  if (snprintf(ep->path, sizeof ep->path, "%s", slash ? slash : "/") >= (int)sizeof ep->path)
    die("URL path too long");
  if ((rc = getaddrinfo(ep->host, ep->port, &hints, &ai)) != 0)
    die("resolve %s:%s: %s", ep->host, ep->port, gai_strerror(rc));
  memcpy(&ep->addr, ai->ai_addr, ai->ai_addrlen);
  ep->addr_len = ai->ai_addrlen;
  freeaddrinfo(ai);
}

static void parse_src(char *list)
{
  for (char *save = NULL, *tok = strtok_r(list, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
    struct in_addr a;
    if (opt.nsrc == MAX_SRC)
      die("too many --src addresses (max %d)", MAX_SRC);
    if (inet_pton(AF_INET, tok, &a) != 1)
      die("bad --src address '%s' (IPv4)", tok);
    snprintf(opt.src[opt.nsrc++], sizeof opt.src[0], "%s", tok);
  }
}

/* The first line of file f, blanks and the line end dropped (as imd reads
 * DATA/secret and DATA/api-key). */
static void read_line(const char *f, char *out, size_t cap)
{
  FILE *fp = fopen(f, "r");
  if (fp == NULL || fgets(out, (int)cap, fp) == NULL)
    die("cannot read %s", f);
  fclose(fp);
  size_t n = strlen(out);
  while (n > 0 && strchr(" \t\r\n", out[n - 1]) != NULL)
    out[--n] = '\0';
  size_t lead = strspn(out, " \t");
  memmove(out, out + lead, n - lead + 1);
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
    {"peer", 1, NULL, 'e'}, {"publish", 1, NULL, 'b'}, {"api-key", 1, NULL, 'k'},
    {"api-key-file", 1, NULL, 'K'}, {"room", 1, NULL, 'o'}, {"procs", 1, NULL, 'j'},
    {"pub-conns", 1, NULL, 'C'}, {"dump", 1, NULL, 'Y'},
    {NULL, 0, NULL, 0},
  };
  static const char *const modes[] = { "hold", "echo", "chat", "recv", "room" };
  const char *url = NULL, *recv_url = NULL, *tcp = NULL, *secret = NULL, *secret_file = NULL;
  const char *publish = NULL;
  char secret_buf[sizeof opt.secret + 2];
  bool have_prefix = false, have_conns = false;
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
    die("unknown mode '%s' (hold, echo, chat, recv or room; --help for usage)", argv[1]);

  /* The mode word plays argv[0] for getopt. */
  while ((ch = getopt_long(argc - 1, argv + 1, "n:c:d:h", longopts, NULL)) != -1) {
    switch (ch) {
    case 'u': url = optarg; break;
    case 'R': recv_url = optarg; break;
    case 'Y':
      if (!(opt.dump = fopen(optarg, "w")))
        die("--dump %s: %s", optarg, strerror(errno));
      break;
    case 't': tcp = optarg; break;
    case 's': parse_src(optarg); break;
    case 'n': case 'c':
      opt.nconns = parse_int(optarg, 1, 1000000, "connection count"); /* fd_limit() checks per process */
      have_conns = true;
      break;
    case 'w': opt.window = parse_int(optarg, 1, FD_CEILING, "window"); break;
    case 'H': opt.hold_s = parse_int(optarg, 0, 7 * 86400, "hold seconds"); break;
    case 'P': opt.ping_s = parse_int(optarg, 1, 86400, "ping seconds"); break;
    case 'd': opt.duration_s = parse_int(optarg, 1, 86400, "duration"); break;
    case 'p': opt.payload = parse_int(optarg, 0, DATA_MAX - 128, "payload"); break;
    case 'U':
      if (strlen(optarg) > 40 || strspn(optarg, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                                 "0123456789._-") != strlen(optarg))
        die("bad --uid-prefix '%s' (at most 40 of [A-Za-z0-9._-])", optarg);
      snprintf(opt.uid_prefix, sizeof opt.uid_prefix, "%s", optarg);
      have_prefix = true;
      break;
    case 'a': break; /* always */
    case 'S': secret = optarg; break;
    case 'F': secret_file = optarg; break;
    case 'q': opt.pairs = parse_int(optarg, 1, (FD_CEILING - FD_RESERVE) / 2, "pairs"); break;
    case 'r': opt.rate = parse_int(optarg, 1, 10000000, "rate"); break;
    case 'W': opt.warmup_s = parse_int(optarg, 0, 3600, "warm-up seconds"); break;
    case 'D': opt.drain_s = parse_int(optarg, 0, 3600, "drain seconds"); break;
    case 'N': die("--no-ack is gone: the client library acknowledges every message"); break;
    case 'I': opt.idle_exit_s = parse_int(optarg, 0, 86400, "idle-exit seconds"); break;
    case 'x': opt.server_pid = parse_int(optarg, 1, 0x7fffffff, "server pid"); break;
    case 'A': break; /* always */
    case 'e':
      if (strcmp(optarg, "imd") != 0 && strcmp(optarg, "nchan") != 0)
        die("bad --peer '%s' (imd or nchan)", optarg);
      opt.peer = strcmp(optarg, "imd") == 0 ? PEER_IMD : PEER_NCHAN;
      break;
    case 'b': publish = optarg; break;
    case 'k': snprintf(opt.api_key, sizeof opt.api_key, "%s", optarg); break;
    case 'K': read_line(optarg, opt.api_key, sizeof opt.api_key); break;
    case 'o':
      if (strlen(optarg) == 0 || strlen(optarg) > 128 ||
          strspn(optarg, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-") !=
              strlen(optarg))
        die("bad --room '%s' (1 to 128 of [A-Za-z0-9._-])", optarg);
      snprintf(opt.room, sizeof opt.room, "%s", optarg);
      break;
    case 'j': opt.procs = parse_int(optarg, 1, PUB_CONNS_MAX, "processes"); break;
    case 'C': opt.pub_conns = parse_int(optarg, 1, PUB_CONNS_MAX, "publisher connections"); break;
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
  if (secret_file != NULL) {
    read_line(secret_file, secret_buf, sizeof secret_buf);
    secret = secret_buf;
  }
  if (secret != NULL) {
    opt.secret_len = strlen(secret);
    if (opt.secret_len < 16 || opt.secret_len > sizeof opt.secret)
      die("the secret must be 16 to %zu bytes", sizeof opt.secret);
    memcpy(opt.secret, secret, opt.secret_len);
    token_selftest();
  }
  /* --tcp selects the transport even next to --url */
  if (tcp != NULL && opt.mode >= MODE_CHAT)
    die("chat, recv and room speak WebSocket JSON only (--url)");
  if (tcp != NULL)
    snprintf(opt.url, sizeof opt.url, "tcp://%s", tcp);
  else if (url != NULL)
    snprintf(opt.url, sizeof opt.url, "%s", url);
  else
    die("--url or --tcp is required");
  if (recv_url != NULL && opt.mode != MODE_CHAT)
    die("--recv-url is for chat only");
  if (recv_url != NULL)
    snprintf(opt.recv_url, sizeof opt.recv_url, "%s", recv_url);
  if (opt.mode == MODE_ROOM) {
    if (publish == NULL)
      die("room needs --publish URL");
    parse_url(&opt.pub_ep, publish);
    if (opt.peer == PEER_NCHAN)
      parse_url(&opt.sub_ep, opt.url);
    else if (opt.api_key[0] == '\0')
      die("room with imd needs --api-key or --api-key-file");
  } else if (publish != NULL || opt.peer == PEER_NCHAN) {
    die("--publish and --peer are for room only");
  }
}

int main(int argc, char **argv)
{
  struct sigaction sa = { .sa_handler = on_signal };

  parse_args(argc, argv);
  for (int i = 0; i < opt.payload; i++)
    B.fill[i] = (char)('a' + i % 26);
  sigemptyset(&sa.sa_mask);
  sigaction(SIGTERM, &sa, NULL);
  sigaction(SIGINT, &sa, NULL);
  signal(SIGPIPE, SIG_IGN);
  srandom((unsigned)getpid() ^ (unsigned)now_ns());
  if (opt.mode == MODE_ROOM)
    return room_main();

  fd_limit(opt.nconns);
  if ((B.conns = calloc((size_t)opt.nconns, sizeof *B.conns)) == NULL)
    die("out of memory");
  for (int i = 0; i < opt.nconns; i++) {
    B.conns[i].idx = (uint32_t)i;
    B.conns[i].role = opt.mode != MODE_CHAT ? ROLE_PLAIN : i < opt.pairs ? ROLE_SENDER : ROLE_RECEIVER;
  }
  base_init();
  setups_pump();
  event_base_dispatch(B.base);
  B.finished = true;
  if (!B.settled)
    printf("connected %d authed %d failed %d\n", B.connected, B.authed, B.failed);
  print_results(B.settled ? now_ns() - B.phase_start : 0);
  return 0;
}
