#include "core/strmap.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#define STRMAP_MAX_BUCKETS (UINT32_C(1) << 31)

/* ---- SipHash (Aumasson & Bernstein, "SipHash: a fast short-input PRF") ----
 * Keys such as room names, uids and group ids come from clients. With an
 * unkeyed hash a client can precompute names that share a bucket and turn
 * every lookup into a walk of one long chain (hash flooding). SipHash keyed
 * with a per-process random secret makes the bucket of a name unpredictable
 * from outside. The map uses SipHash-1-3 (one compression round per word,
 * three finalization rounds): ample for a table index, about twice as fast
 * as SipHash-2-4 on short keys. */

static uint64_t rotl64(uint64_t x, unsigned r) { return (x << r) | (x >> (64 - r)); }

/* Little-endian 8-byte load, whatever the host's byte order (memcpy keeps
 * it alignment-safe and compiles to one load on little-endian hosts). */
static uint64_t load_le64(const unsigned char *p)
{
  uint64_t w;

  memcpy(&w, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
  w = __builtin_bswap64(w);
#endif
  return w;
}

typedef struct sip_state {
  uint64_t v0, v1, v2, v3;
} sip_state;

static void sip_round(sip_state *s)
{
  s->v0 += s->v1;
  s->v1 = rotl64(s->v1, 13);
  s->v1 ^= s->v0;
  s->v0 = rotl64(s->v0, 32);
  s->v2 += s->v3;
  s->v3 = rotl64(s->v3, 16);
  s->v3 ^= s->v2;
  s->v0 += s->v3;
  s->v3 = rotl64(s->v3, 21);
  s->v3 ^= s->v0;
  s->v2 += s->v1;
  s->v1 = rotl64(s->v1, 17);
  s->v1 ^= s->v2;
  s->v2 = rotl64(s->v2, 32);
}

static void sip_compress(sip_state *s, uint64_t m, unsigned rounds)
{
  s->v3 ^= m;
  for (unsigned i = 0; i < rounds; i++)
    sip_round(s);
  s->v0 ^= m;
}

uint64_t strmap_siphash(const uint8_t key[16], const void *data, size_t len, unsigned c_rounds,
                        unsigned d_rounds)
{
  const unsigned char *p = data;
  uint64_t k0 = load_le64(key), k1 = load_le64(key + 8);
  /* the initialization constants spell "somepseudorandomlygeneratedbytes" */
  sip_state s = {k0 ^ UINT64_C(0x736f6d6570736575), k1 ^ UINT64_C(0x646f72616e646f6d),
                 k0 ^ UINT64_C(0x6c7967656e657261), k1 ^ UINT64_C(0x7465646279746573)};
  uint64_t last = (uint64_t)(len & 0xff) << 56;
  size_t tail = len & 7;

  for (const unsigned char *end = p + (len - tail); p < end; p += 8)
    sip_compress(&s, load_le64(p), c_rounds);
  /* the final word: the 0..7 remaining bytes, the length mod 256 on top */
  for (size_t i = 0; i < tail; i++)
    last |= (uint64_t)p[i] << (8 * i);
  sip_compress(&s, last, c_rounds);
  s.v2 ^= 0xff;
  for (unsigned i = 0; i < d_rounds; i++)
    sip_round(&s);
  return s.v0 ^ s.v1 ^ s.v2 ^ s.v3;
}

/* ---- the per-process key ---------------------------------------------- */

static uint8_t hash_key[16];
static pthread_once_t hash_key_once = PTHREAD_ONCE_INIT;

/* Fill buf from the kernel's generator: getrandom(2), else /dev/urandom.
 * Returns false when neither works. */
static bool os_random(uint8_t *buf, size_t n)
{
  size_t got = 0;

  while (got < n) {
    ssize_t r = getrandom(buf + got, n - got, 0);
    if (r < 0 && errno == EINTR)
      continue;
    if (r <= 0)
      break;
    got += (size_t)r;
  }
  if (got == n)
    return true;
  int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return false;
  got = 0;
  while (got < n) {
    ssize_t r = read(fd, buf + got, n - got);
    if (r < 0 && errno == EINTR)
      continue;
    if (r <= 0)
      break;
    got += (size_t)r;
  }
  close(fd);
  return got == n;
}

static void hash_key_init(void)
{
  if (os_random(hash_key, sizeof hash_key))
    return;
  /* No kernel randomness (a sandbox without getrandom or /dev): a key from
   * clocks and addresses is still unknown to a remote peer, if weaker. */
  struct timespec a, b;
  clock_gettime(CLOCK_REALTIME, &a);
  clock_gettime(CLOCK_MONOTONIC, &b);
  uint64_t k0 = (uint64_t)a.tv_sec * 1000000000u + (uint64_t)a.tv_nsec;
  uint64_t k1 = ((uint64_t)b.tv_sec * 1000000000u + (uint64_t)b.tv_nsec) ^
                (uint64_t)(uintptr_t)&a ^ ((uint64_t)getpid() << 32);
  for (int i = 0; i < 8; i++) {
    hash_key[i] = (uint8_t)(k0 >> (8 * i));
    hash_key[8 + i] = (uint8_t)(k1 >> (8 * i));
  }
}

/* SipHash-1-3 under the process key, folded to the 32 bits the map keeps. */
uint32_t strmap_hash(const char *key, size_t len)
{
  pthread_once(&hash_key_once, hash_key_init);
  uint64_t h = strmap_siphash(hash_key, key, len, 1, 3);
  return (uint32_t)(h ^ (h >> 32));
}

int strmap_init(strmap *m, uint32_t initial_buckets)
{
  uint32_t n = 1;

  if (initial_buckets > STRMAP_MAX_BUCKETS)
    initial_buckets = STRMAP_MAX_BUCKETS;
  while (n < initial_buckets)
    n <<= 1;
  m->buckets = calloc(n, sizeof *m->buckets);
  if (m->buckets == NULL)
    return -1;
  m->mask = n - 1;
  m->count = 0;
  return 0;
}

void strmap_free(strmap *m)
{
  free(m->buckets);
  m->buckets = NULL;
  m->mask = 0;
  m->count = 0;
}

static bool node_matches(const strmap_node *n, uint32_t hash, const char *key, size_t len)
{
  return n->hash == hash && n->klen == len && (len == 0 || memcmp(n->key, key, len) == 0);
}

strmap_node *strmap_get(const strmap *m, const char *key, size_t len)
{
  uint32_t hash;

  if (len > UINT32_MAX)
    return NULL;
  hash = strmap_hash(key, len);
  for (strmap_node *n = m->buckets[hash & m->mask]; n != NULL; n = n->next)
    if (node_matches(n, hash, key, len))
      return n;
  return NULL;
}

/* Rehash into twice the buckets; stored hashes make this a pointer relink. */
static int grow(strmap *m)
{
  uint32_t old_n = m->mask + 1;
  uint32_t new_mask;
  strmap_node **nb;

  if (old_n >= STRMAP_MAX_BUCKETS)
    return 0;
  nb = calloc((size_t)old_n * 2, sizeof *nb);
  if (nb == NULL)
    return -1;
  new_mask = old_n * 2 - 1;
  for (uint32_t i = 0; i < old_n; i++) {
    for (strmap_node *n = m->buckets[i], *next; n != NULL; n = next) {
      next = n->next;
      n->next = nb[n->hash & new_mask];
      nb[n->hash & new_mask] = n;
    }
  }
  free(m->buckets);
  m->buckets = nb;
  m->mask = new_mask;
  return 0;
}

/* Maximum load factor 1: the table doubles as soon as count exceeds the
 * bucket count, so chains average at most one node (half after growing). */
int strmap_put(strmap *m, strmap_node *n)
{
  strmap_node **b;

  n->hash = strmap_hash(n->key, n->klen);
  b = &m->buckets[n->hash & m->mask];
  n->next = *b;
  *b = n;
  m->count++;
  if (m->count > (size_t)m->mask + 1)
    return grow(m);
  return 0;
}

void strmap_del(strmap *m, strmap_node *n)
{
  for (strmap_node **pp = &m->buckets[n->hash & m->mask]; *pp != NULL; pp = &(*pp)->next) {
    if (*pp == n) {
      *pp = n->next;
      n->next = NULL;
      m->count--;
      return;
    }
  }
}
