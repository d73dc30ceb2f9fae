/* An intrusive string-keyed hash map (chained, power-of-two buckets,
 * doubling). The map never owns keys or values: each value embeds a
 * strmap_node whose key points at bytes the value owns. */
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

uint32_t strmap_hash(const char *key, size_t len);

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
