/* The guard at the door (include/libim/im_guard.h): per-source token
 * buckets, escalating automatic bans, a per-source connection cap and a
 * blacklist of ranges. Sources live in a keyed hash map (SipHash strmap),
 * bounded by max_sources, and idle ones are swept a few buckets per tick. */
#include <arpa/inet.h>
#include <libim/im_guard.h>
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

static im_guard *guard_get(im_server *s) {
  if (!s->guard) {
    s->guard = im_zalloc(s, sizeof *s->guard);
    if (s->guard && strmap_init(&s->guard->sources, 256) < 0) {
      im_dealloc(s, s->guard);
      s->guard = NULL;
    }
  }
  return s->guard;
}

int im_server_set_guard(im_server *s, const im_guard_config *g) {
  if (g && g->conn_rate && !g->conn_burst) return IM_EINVAL;
  im_guard *gd = guard_get(s);
  if (!gd) return IM_ENOMEM;
  gd->on = g != NULL;
  if (g) gd->cfg = *g;
  if (gd->on && !gd->cfg.max_sources) gd->cfg.max_sources = 65536;
  return 0;
}

static void source_drop(im_server *s, source *src) {
  strmap_del(&s->guard->sources, &src->node);
  im_dealloc(s, src);
  s->guard->st.sources--;
}

void guard_free(im_server *s) {
  im_guard *g = s->guard;
  if (!g) return;
  strmap *m = &g->sources;
  for (uint32_t b = 0; m->buckets && b <= m->mask; b++)
    for (strmap_node *n = m->buckets[b], *next; n; n = next) {
      next = n->next;
      im_dealloc(s, n);
    }
  strmap_free(m);
  im_dealloc(s, g);
  s->guard = NULL;
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

static source *source_add(im_server *s, const uint8_t ip[16], uint64_t now) {
  im_guard *g = s->guard;
  if (g->st.sources >= g->cfg.max_sources) return NULL;
  source *src = im_zalloc(s, sizeof *src);
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

bool guard_admit(im_server *s, const char *peer) {
  im_guard *g = s->guard;
  uint8_t ip[16];
  if (!g || !peer_ip(peer, ip)) return true;
  uint64_t now = s->now_ms;
  if (g->nblack && blacklisted(g, ip, now)) {
    g->st.refused_banned++;
    return false;
  }
  if (!g->on) return true;
  source *src = source_find(g, ip);
  if (!src && !(src = source_add(s, ip, now))) return true; /* full: untracked */
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

void guard_release(im_server *s, const char *peer) {
  im_guard *g = s->guard;
  uint8_t ip[16];
  if (!g || !peer_ip(peer, ip)) return;
  source *src = source_find(g, ip);
  if (src && src->conns) src->conns--;
}

/* Drop sources that are idle, unbanned, connection-free and forgiven. */
void guard_tick(im_server *s) {
  im_guard *g = s->guard;
  if (!g || !g->sources.buckets) return;
  uint64_t now = s->now_ms;
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
        source_drop(s, src);
    }
  }
}

/* ---- the blacklist ---------------------------------------------------------------------- */

int im_guard_ban(im_server *s, const char *cidr, uint32_t ttl_s) {
  uint8_t ip[16], bits;
  if (!cidr || !parse_cidr(cidr, ip, &bits)) return IM_EINVAL;
  im_guard *g = guard_get(s);
  if (!g) return IM_ENOMEM;
  uint64_t until = ttl_s ? s->now_ms + (uint64_t)ttl_s * 1000u : 0;
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

int im_guard_unban(im_server *s, const char *cidr) {
  uint8_t ip[16], bits;
  im_guard *g = s->guard;
  if (!cidr || !parse_cidr(cidr, ip, &bits)) return IM_EINVAL;
  if (!g) return IM_ENOENT;
  for (uint32_t i = 0; i < g->nblack; i++)
    if (g->blacklist[i].bits == bits && !memcmp(g->blacklist[i].ip, ip, 16)) {
      g->blacklist[i] = g->blacklist[--g->nblack];
      return 0;
    }
  source *src = bits == 128 ? source_find(g, ip) : NULL;
  if (src && src->ban_until > s->now_ms) {
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

size_t im_guard_bans(im_server *s, void (*fn)(const im_ban *b, void *arg), void *arg) {
  im_guard *g = s->guard;
  if (!g) return 0;
  uint64_t now = s->now_ms, wall = s->id_wall0;
  char text[INET6_ADDRSTRLEN + 8];
  size_t n = 0;
  for (uint32_t i = 0; i < g->nblack; i++) {
    range *r = &g->blacklist[i];
    if (r->until && r->until <= now) continue;
    format_range(r->ip, r->bits, text, sizeof text);
    im_ban b = {text, r->until ? wall + r->until : 0, 0, 0};
    fn(&b, arg);
    n++;
  }
  strmap *m = &g->sources;
  for (uint32_t k = 0; m->buckets && k <= m->mask; k++)
    for (strmap_node *nd = m->buckets[k]; nd; nd = nd->next) {
      source *src = (source *)nd;
      if (src->ban_until <= now) continue;
      format_range(src->ip, 128, text, sizeof text);
      im_ban b = {text, wall + src->ban_until, 1, src->level};
      fn(&b, arg);
      n++;
    }
  return n;
}

void im_guard_get_stats(const im_server *s, im_guard_stats *st) {
  if (s->guard)
    *st = s->guard->st;
  else
    memset(st, 0, sizeof *st);
}
