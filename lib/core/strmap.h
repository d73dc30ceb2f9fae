/* An intrusive string-keyed hash map (chained, power-of-two buckets,
 * doubling). The map never owns keys or values: each value embeds a
 * strmap_node whose key points at bytes the value owns.
 *
 * Keys come from clients (uids, rooms, group ids), so the hash is keyed:
 * SipHash-1-3 under a random key drawn once per process (getrandom), so a
 * peer cannot precompute keys that share a bucket (hash flooding). Hash
 * values, and so iteration order, differ from run to run. */
#ifndef IM_CORE_STRMAP_H
#define IM_CORE_STRMAP_H

#include <stddef.h>
#include <stdint.h>

typedef struct strmap_node {
  struct strmap_node *next;
  const char *key;
  uint32_t klen;
  uint32_t hash;
} strmap_node;

typedef struct strmap {
  strmap_node **buckets;
  uint32_t mask;    /* nbuckets - 1 */
  size_t count;
} strmap;

/* The map's hash of key (len bytes): SipHash-1-3 under the process key,
 * 64 bits folded to 32. Thread-safe; the key is drawn on first use. */
uint32_t strmap_hash(const char *key, size_t len);
/* SipHash-c-d of len bytes of data under the 16-byte key (as the paper
 * defines it: words read little-endian, result as a 64-bit integer).
 * Exposed for the tests (reference vectors of SipHash-2-4). */
uint64_t strmap_siphash(const uint8_t key[16], const void *data, size_t len, unsigned c_rounds,
                        unsigned d_rounds);

/* Returns 0 or -1 on allocation failure. */
int strmap_init(strmap *m, uint32_t initial_buckets);
void strmap_free(strmap *m);   /* frees the bucket array only */

/* Find the node for key; NULL if absent. */
strmap_node *strmap_get(const strmap *m, const char *key, size_t len);
/* Insert n (n->key/klen set by the caller; must not be present).
 * Returns 0, or -1 if growing failed (n is still inserted). */
int strmap_put(strmap *m, strmap_node *n);
/* Remove n (which must be in the map). */
void strmap_del(strmap *m, strmap_node *n);

#endif
