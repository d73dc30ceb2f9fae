/* The guard at the door (include/libim/im_guard.h): per-source token
 * buckets, escalating automatic bans, a per-source connection cap and a
 * blacklist of ranges. Sources live in a keyed hash map (SipHash strmap),
 * bounded by max_sources, and idle ones are swept a few buckets per tick.
 *
 * An engine's guard is its own, or the one of the im_shared it is attached
 * to (include/libim/im_shared.h), used by several engines on several
 * threads: every guard has a mutex, taken by each call (uncontended for an
 * engine's own), and its own allocator (the C library's for a shared one).
 * A shared guard counts time on the driver's clock (engine ms + t0), which
 * all engines of a process share; an own guard on engine ms. (The count of
 * a process's open connections against max_connections is the im_shared's,
 * taken by the engine next to guard_admit / guard_release.) */
#include <arpa/inet.h>
#include <libim/im_guard.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/engine.h"

#define BLACKLIST_MAX 1024
#define FORGIVE_MS (3600u * 1000u) /* offences forgotten after this long */
#define IDLE_MS 60000u             /* a quiet source with a full bucket is dropped */
#define SWEEP_BUCKETS 64           /* per tick */
#define OFFENCE_WINDOW_MS 10000u   /* refusals are counted over this long */

typedef struct source {
  strmap_node node;
  uint8_t ip[16];
  uint64_t last_ms;        /* last refill (engine ms) */
  uint64_t ban_until;      /* engine ms; 0 = not banned */
  uint64_t offence_ms;     /* last automatic ban */
  uint64_t window_ms;      /* start of the refusal count */
  double tokens;
  uint32_t refusals;       /* over the rate, within the current window */
  uint32_t level;          /* automatic bans so far (decays) */
  uint32_t conns;
} source;

typedef guard_range range;

typedef struct im_guard {
  pthread_mutex_t lock;
  im_allocator alloc;
  bool on;
  im_guard_config cfg;
  strmap sources;
  uint32_t sweep_at;
  range blacklist[BLACKLIST_MAX];
  uint32_t nblack;
  im_guard_stats st;
} im_guard;

void im_guard_config_init(im_guard_config *g) {
  memset(g, 0, sizeof *g);
  g->conn_rate = 20;
  g->conn_burst = 40;
  g->ban_first_s = 10;
  g->ban_max_s = 3600;
  g->max_sources = 65536;
}

/* ---- addresses ---------------------------------------------------------------- */

/* "1.2.3.4", "::1" -> 16 bytes (IPv4 mapped into ::ffff:0:0/96). */
static bool parse_ip(const char *s, size_t n, uint8_t out[16], bool *v4) {
  char buf[64];
  if (n == 0 || n >= sizeof buf) return false;
  memcpy(buf, s, n);
  buf[n] = '\0';
  struct in_addr a4;
  if (inet_pton(AF_INET, buf, &a4) == 1) {
    memset(out, 0, 10);
    out[10] = out[11] = 0xff;
    memcpy(out + 12, &a4, 4);
    *v4 = true;
    return true;
  }
  *v4 = false;
  return inet_pton(AF_INET6, buf, out) == 1;
}

/* The source address of a peer string: "1.2.3.4:5" or "[::1]:5". */
static bool peer_ip(const char *peer, uint8_t out[16]) {
  bool v4;
  if (!peer || !*peer) return false;
  if (peer[0] == '[') {
    const char *end = strchr(peer, ']');
    return end && parse_ip(peer + 1, (size_t)(end - peer - 1), out, &v4);
  }
  const char *colon = strrchr(peer, ':');
  return parse_ip(peer, colon ? (size_t)(colon - peer) : strlen(peer), out, &v4);
}

static bool parse_cidr(const char *s, uint8_t ip[16], uint8_t *bits) {
  const char *slash = strchr(s, '/');
  bool v4;
  if (!parse_ip(s, slash ? (size_t)(slash - s) : strlen(s), ip, &v4)) return false;
  unsigned max = v4 ? 32 : 128, b = max;
  if (slash) {
    char *end;
    unsigned long v = strtoul(slash + 1, &end, 10);
    if (!slash[1] || *end || v > max) return false;
    b = (unsigned)v;
  }
  *bits = (uint8_t)(b + (v4 ? 96 : 0));
  for (unsigned i = *bits; i < 128; i++) ip[i / 8] &= (uint8_t)~(0x80u >> (i % 8)); /* canonical */
  return true;
}

static bool in_range(const uint8_t ip[16], const range *r) {
  unsigned full = r->bits / 8, rest = r->bits % 8;
  if (memcmp(ip, r->ip, full)) return false;
  if (!rest) return true;
  uint8_t mask = (uint8_t)(0xff00u >> rest);
  return (ip[full] & mask) == (r->ip[full] & mask);
}

bool guard_range_parse(const char *cidr, guard_range *r) {
  r->until = 0;
  return parse_cidr(cidr, r->ip, &r->bits);
}

bool guard_peer_in(const char *peer, const guard_range *r) {
  uint8_t ip[16];
  return peer_ip(peer, ip) && in_range(ip, r);
}

static void format_range(const uint8_t ip[16], unsigned bits, char *out, size_t cap) {
  char a[INET6_ADDRSTRLEN];
  static const uint8_t v4map[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
  if (bits >= 96 && !memcmp(ip, v4map, 12)) {
    inet_ntop(AF_INET, ip + 12, a, sizeof a);
    snprintf(out, cap, "%s/%u", a, bits - 96);
  } else {
    inet_ntop(AF_INET6, ip, a, sizeof a);
    snprintf(out, cap, "%s/%u", a, bits);
  }
}

/* ---- setup ------------------------------------------------------------------------ */

static void *g_alloc(im_guard *g, size_t n) { return g->alloc.calloc(1, n, g->alloc.ud); }
static void g_free(im_guard *g, void *p) { g->alloc.free(p, g->alloc.ud); }

static im_guard *guard_new(const im_allocator *a) {
  im_guard *g = a->calloc(1, sizeof *g, a->ud);
  if (!g) return NULL;
  g->alloc = *a;
  if (strmap_init(&g->sources, 256) < 0) {
    a->free(g, a->ud);
    return NULL;
  }
  pthread_mutex_init(&g->lock, NULL);
  return g;
}

static void *libc_malloc(size_t n, void *ud) { (void)ud; return malloc(n); }
static void *libc_calloc(size_t n, size_t k, void *ud) { (void)ud; return calloc(n, k); }
static void *libc_realloc(void *p, size_t n, void *ud) { (void)ud; return realloc(p, n); }
static void libc_free(void *p, void *ud) { (void)ud; free(p); }

im_guard *guard_new_shared(void) {
  static const im_allocator libc = {libc_malloc, libc_calloc, libc_realloc, libc_free, NULL};
  return guard_new(&libc);
}

static im_guard *guard_get(im_server *s) {
  if (!s->guard) s->guard = guard_new(&s->alloc);
  return s->guard;
}

/* The guard's clock (see the top). */
static uint64_t guard_now(const im_server *s) { return s->shared ? s->t0 + s->now_ms : s->now_ms; }
/* Wall-clock ms of a guard time. */
static uint64_t guard_wall(const im_server *s, uint64_t t) {
  uint64_t base = s->shared ? s->t0 : 0;
  return s->id_wall0 + (t > base ? t - base : 0);
}

static void guard_configure(im_guard *gd, const im_guard_config *g) {
  gd->on = g != NULL;
  if (g) gd->cfg = *g;
  if (gd->on && !gd->cfg.max_sources) gd->cfg.max_sources = 65536;
}

int im_server_set_guard(im_server *s, const im_guard_config *g) {
  if (g && g->conn_rate && !g->conn_burst) return IM_EINVAL;
  im_guard *gd = guard_get(s);
  if (!gd) return IM_ENOMEM;
  pthread_mutex_lock(&gd->lock);
  guard_configure(gd, g);
  pthread_mutex_unlock(&gd->lock);
  return 0;
}

static void source_drop(im_guard *g, source *src) {
  strmap_del(&g->sources, &src->node);
  g_free(g, src);
  g->st.sources--;
}

void guard_destroy(im_guard *g) {
  if (!g) return;
  strmap *m = &g->sources;
  for (uint32_t b = 0; m->buckets && b <= m->mask; b++)
    for (strmap_node *n = m->buckets[b], *next; n; n = next) {
      next = n->next;
      g_free(g, n);
    }
  strmap_free(m);
  pthread_mutex_destroy(&g->lock);
  g_free(g, g);
}

void guard_free(im_server *s) {
  if (!s->shared) guard_destroy(s->guard); /* a shared one is the im_shared's */
  s->guard = NULL;
}

static int blacklist_add(im_guard *g, const uint8_t ip[16], uint8_t bits, uint64_t until);

void guard_share(im_server *s, im_guard *sg) {
  im_guard *own = s->shared ? NULL : s->guard;
  if (own) {
    pthread_mutex_lock(&sg->lock);
    if (!sg->on && own->on) guard_configure(sg, &own->cfg);
    for (uint32_t i = 0; i < own->nblack; i++) {
      const range *r = &own->blacklist[i];
      if (r->until && r->until <= s->now_ms) continue;
      (void)blacklist_add(sg, r->ip, r->bits, r->until ? r->until + s->t0 : 0);
    }
    pthread_mutex_unlock(&sg->lock);
    guard_destroy(own);
  }
  s->guard = sg;
}

/* ---- admission ---------------------------------------------------------------------- */

static bool blacklisted(im_guard *g, const uint8_t ip[16], uint64_t now) {
  for (uint32_t i = 0; i < g->nblack; i++) {
    range *r = &g->blacklist[i];
    if (r->until && r->until <= now) { /* expired: swap-remove */
      *r = g->blacklist[--g->nblack];
      i--;
      continue;
    }
    if (in_range(ip, r)) return true;
  }
  return false;
}

static source *source_find(im_guard *g, const uint8_t ip[16]) {
  return (source *)strmap_get(&g->sources, (const char *)ip, 16);
}

static source *source_add(im_guard *g, const uint8_t ip[16], uint64_t now) {
  if (g->st.sources >= g->cfg.max_sources) return NULL;
  source *src = g_alloc(g, sizeof *src);
  if (!src) return NULL;
  memcpy(src->ip, ip, 16);
  src->node.key = (const char *)src->ip;
  src->node.klen = 16;
  src->tokens = g->cfg.conn_burst;
  src->last_ms = now;
  strmap_put(&g->sources, &src->node);
  g->st.sources++;
  return src;
}

static void refill(const im_guard *g, source *src, uint64_t now) {
  if (now > src->last_ms) {
    src->tokens += (double)(now - src->last_ms) * g->cfg.conn_rate / 1000.0;
    if (src->tokens > g->cfg.conn_burst) src->tokens = g->cfg.conn_burst;
    src->last_ms = now;
  }
}

/* Over the rate once more: ban a source refused conn_burst times within
 * the window, even if it gets a connection in now and then (the rate
 * refilling its bucket must not reset its record). */
static void offend(im_guard *g, source *src, uint64_t now) {
  if (now - src->window_ms > OFFENCE_WINDOW_MS) {
    src->window_ms = now;
    src->refusals = 0;
  }
  if (++src->refusals < g->cfg.conn_burst) return;
  if (src->offence_ms && now - src->offence_ms > FORGIVE_MS) src->level = 0;
  uint64_t secs = g->cfg.ban_first_s ? g->cfg.ban_first_s : 10;
  for (uint32_t i = 0; i < src->level && secs < g->cfg.ban_max_s; i++) secs *= 6;
  if (g->cfg.ban_max_s && secs > g->cfg.ban_max_s) secs = g->cfg.ban_max_s;
  src->ban_until = now + secs * 1000u;
  src->offence_ms = now;
  src->level++;
  src->refusals = 0;
  g->st.bans++;
}

static bool admit(im_guard *g, const uint8_t ip[16], uint64_t now) {
  if (g->nblack && blacklisted(g, ip, now)) {
    g->st.refused_banned++;
    return false;
  }
  if (!g->on) return true;
  source *src = source_find(g, ip);
  if (!src && !(src = source_add(g, ip, now))) return true; /* full: untracked */
  if (src->ban_until) {
    if (now < src->ban_until) {
      g->st.refused_banned++;
      return false;
    }
    src->ban_until = 0;
  }
  if (g->cfg.max_conns_per_source && src->conns >= g->cfg.max_conns_per_source) {
    g->st.refused_cap++;
    return false;
  }
  if (g->cfg.conn_rate) {
    refill(g, src, now);
    if (src->tokens < 1.0) {
      g->st.refused_rate++;
      offend(g, src, now);
      return false;
    }
    src->tokens -= 1.0;
  }
  src->conns++;
  return true;
}

bool guard_admit(im_server *s, const char *peer) {
  im_guard *g = s->guard;
  uint8_t ip[16];
  if (!g || !peer_ip(peer, ip)) return true;
  pthread_mutex_lock(&g->lock);
  bool ok = admit(g, ip, guard_now(s));
  pthread_mutex_unlock(&g->lock);
  return ok;
}

void guard_release(im_server *s, const char *peer) {
  im_guard *g = s->guard;
  uint8_t ip[16];
  if (!g || !peer_ip(peer, ip)) return;
  pthread_mutex_lock(&g->lock);
  source *src = source_find(g, ip);
  if (src && src->conns) src->conns--;
  pthread_mutex_unlock(&g->lock);
}

/* Drop sources that are idle, unbanned, connection-free and forgiven. */
void guard_tick(im_server *s) {
  im_guard *g = s->guard;
  if (!g) return;
  pthread_mutex_lock(&g->lock);
  uint64_t now = guard_now(s);
  strmap *m = &g->sources;
  for (int k = 0; k < SWEEP_BUCKETS; k++) {
    uint32_t b = g->sweep_at++ & m->mask;
    for (strmap_node *n = m->buckets[b], *next; n; n = next) {
      next = n->next;
      source *src = (source *)n;
      refill(g, src, now);
      bool quiet = now - src->last_ms >= IDLE_MS || src->tokens >= g->cfg.conn_burst;
      if (!src->conns && src->ban_until <= now && quiet &&
          (!src->offence_ms || now - src->offence_ms > FORGIVE_MS))
        source_drop(g, src);
    }
  }
  pthread_mutex_unlock(&g->lock);
}

/* ---- the blacklist ---------------------------------------------------------------------- */

/* Add or renew a blacklist entry; the caller holds g's lock. */
static int blacklist_add(im_guard *g, const uint8_t ip[16], uint8_t bits, uint64_t until) {
  for (uint32_t i = 0; i < g->nblack; i++)
    if (g->blacklist[i].bits == bits && !memcmp(g->blacklist[i].ip, ip, 16)) {
      g->blacklist[i].until = until;
      return 0;
    }
  if (g->nblack == BLACKLIST_MAX) return IM_ELIMIT;
  range *r = &g->blacklist[g->nblack++];
  memcpy(r->ip, ip, 16);
  r->bits = bits;
  r->until = until;
  return 0;
}

int im_guard_ban(im_server *s, const char *cidr, uint32_t ttl_s) {
  uint8_t ip[16], bits;
  if (!cidr || !parse_cidr(cidr, ip, &bits)) return IM_EINVAL;
  im_guard *g = guard_get(s);
  if (!g) return IM_ENOMEM;
  pthread_mutex_lock(&g->lock);
  int rc = blacklist_add(g, ip, bits, ttl_s ? guard_now(s) + (uint64_t)ttl_s * 1000u : 0);
  pthread_mutex_unlock(&g->lock);
  return rc;
}

static int unban(im_guard *g, const uint8_t ip[16], uint8_t bits, uint64_t now) {
  for (uint32_t i = 0; i < g->nblack; i++)
    if (g->blacklist[i].bits == bits && !memcmp(g->blacklist[i].ip, ip, 16)) {
      g->blacklist[i] = g->blacklist[--g->nblack];
      return 0;
    }
  source *src = bits == 128 ? source_find(g, ip) : NULL;
  if (src && src->ban_until > now) {
    src->ban_until = 0;
    src->refusals = 0;
    return 0;
  }
  return IM_ENOENT;
}

int im_guard_canon(const char *cidr, char *out, size_t cap) {
  uint8_t ip[16], bits;
  char text[INET6_ADDRSTRLEN + 8];
  if (cap) *out = '\0';
  if (!cidr || !parse_cidr(cidr, ip, &bits)) return IM_EINVAL;
  format_range(ip, bits, text, sizeof text);
  size_t n = strlen(text);
  if (n >= cap) return IM_EINVAL;
  memcpy(out, text, n + 1);
  return 0;
}

int im_guard_unban(im_server *s, const char *cidr) {
  uint8_t ip[16], bits;
  im_guard *g = s->guard;
  if (!cidr || !parse_cidr(cidr, ip, &bits)) return IM_EINVAL;
  if (!g) return IM_ENOENT;
  pthread_mutex_lock(&g->lock);
  int rc = unban(g, ip, bits, guard_now(s));
  pthread_mutex_unlock(&g->lock);
  return rc;
}

size_t im_guard_bans(im_server *s, void (*fn)(const im_ban *b, void *arg), void *arg) {
  im_guard *g = s->guard;
  if (!g) return 0;
  uint64_t now = guard_now(s);
  char text[INET6_ADDRSTRLEN + 8];
  size_t n = 0;
  /* fn runs under the lock: it must not call the guard (documented) */
  pthread_mutex_lock(&g->lock);
  for (uint32_t i = 0; i < g->nblack; i++) {
    range *r = &g->blacklist[i];
    if (r->until && r->until <= now) continue;
    format_range(r->ip, r->bits, text, sizeof text);
    im_ban b = {text, r->until ? guard_wall(s, r->until) : 0, 0, 0};
    fn(&b, arg);
    n++;
  }
  strmap *m = &g->sources;
  for (uint32_t k = 0; m->buckets && k <= m->mask; k++)
    for (strmap_node *nd = m->buckets[k]; nd; nd = nd->next) {
      source *src = (source *)nd;
      if (src->ban_until <= now) continue;
      format_range(src->ip, 128, text, sizeof text);
      im_ban b = {text, guard_wall(s, src->ban_until), 1, src->level};
      fn(&b, arg);
      n++;
    }
  pthread_mutex_unlock(&g->lock);
  return n;
}

void im_guard_get_stats(const im_server *s, im_guard_stats *st) {
  im_guard *g = s->guard;
  memset(st, 0, sizeof *st);
  if (!g) return;
  pthread_mutex_lock(&g->lock);
  *st = g->st;
  pthread_mutex_unlock(&g->lock);
}
