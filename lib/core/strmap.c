#include "core/strmap.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#define STRMAP_MAX_BUCKETS (UINT32_C(1) << 31)

#define MUL1 UINT64_C(0x9e3779b97f4a7c15) /* 2^64 / golden ratio, odd */
#define MUL2 UINT64_C(0xc2b2ae3d27d4eb4f) /* odd constant with mixed bit pattern */

static uint64_t rotl64(uint64_t x, unsigned r) { return (x << r) | (x >> (64 - r)); }

/* Full-avalanche finalizer: xor-shift / multiply rounds so every input bit
 * reaches the low bits that select the bucket. */
static uint64_t mix64(uint64_t x)
{
  x ^= x >> 32;
  x *= MUL2;
  x ^= x >> 29;
  x *= MUL1;
  x ^= x >> 32;
  return x;
}

/* Eight bytes per multiply; memcpy keeps the loads alignment-safe. The length
 * is folded in first so keys differing only by trailing zero bytes differ. */
uint32_t strmap_hash(const char *key, size_t len)
{
  const unsigned char *p = (const unsigned char *)key;
  uint64_t h = MUL1 ^ ((uint64_t)len * MUL2);
  uint64_t w;

  for (; len >= 8; p += 8, len -= 8) {
    memcpy(&w, p, 8);
    h = rotl64(h ^ (w * MUL2), 27) * MUL1;
  }
  if (len > 0) {
    w = 0;
    memcpy(&w, p, len);
    h = rotl64(h ^ (w * MUL2), 27) * MUL1;
  }
  h = mix64(h);
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
