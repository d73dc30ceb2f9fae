/* The per-receiver quota: how many messages one sender may store for one
 * receiver (or one group) per minute. Inboxes are trimmed by count
 * (--inbox-max), so without it one sender flooding a user would push every
 * other sender's messages out of that inbox; the per-connection and per-uid
 * rates of the engine bound how fast a sender goes, this bounds how much of
 * one inbox it may take.
 *
 * A fixed one-minute window per (sender, receiver) pair, in a strmap keyed
 * "from" NUL TAG "to" (TAG 'u' for a uid, 'g' for a group id). Pairs whose
 * window is over are swept at most once a second, and only when the map is
 * big; past IMD_QUOTA_PAIRS_MAX live pairs a new pair is let through
 * uncounted (the engine's rates still bound its sender), so the memory is
 * bounded whatever the traffic. */
#include <stdlib.h>
#include <string.h>

#include "core/strmap.h"
#include "imd.h"

#define IMD_QUOTA_WINDOW_MS 60000u
#define IMD_QUOTA_SWEEP_AT 4096u        /* pairs before sweeps start */
#define IMD_QUOTA_PAIRS_MAX 262144u     /* pairs tracked at most */

typedef struct quota_pair {
  strmap_node node;
  uint64_t window_ms;  /* start of the pair's current window */
  uint32_t count;      /* messages in it */
  char key[];          /* from \0 tag to */
} quota_pair;

struct imd_quota {
  strmap map;
  uint32_t per_minute;
  uint64_t swept_ms;
};

imd_quota *imd_quota_new(uint32_t per_minute) {
  imd_quota *q = calloc(1, sizeof *q);
  if (!q || strmap_init(&q->map, 256) < 0) {
    free(q);
    return NULL;
  }
  q->per_minute = per_minute;
  return q;
}

static void sweep(imd_quota *q, uint64_t now_ms, bool all) {
  for (uint32_t b = 0; b <= q->map.mask; b++)
    for (strmap_node *n = q->map.buckets[b], *next; n; n = next) {
      next = n->next;
      quota_pair *p = (quota_pair *)n;
      if (all || now_ms - p->window_ms >= IMD_QUOTA_WINDOW_MS) {
        strmap_del(&q->map, n);
        free(p);
      }
    }
}

void imd_quota_free(imd_quota *q) {
  if (!q) return;
  sweep(q, 0, true);
  strmap_free(&q->map);
  free(q);
}

bool imd_quota_take(imd_quota *q, const char *from, const char *to, bool group, uint64_t now_ms) {
  size_t fl = strlen(from), tl = strlen(to), kl = fl + 2 + tl;
  char stack[2 * IMD_UID_MAX + 8], *key = kl <= sizeof stack ? stack : malloc(kl);
  if (!key) return true;
  memcpy(key, from, fl);
  key[fl] = '\0';
  key[fl + 1] = group ? 'g' : 'u'; /* a uid and a group id may be spelled alike */
  memcpy(key + fl + 2, to, tl);
  quota_pair *p = (quota_pair *)strmap_get(&q->map, key, kl);
  bool ok = true;
  if (!p) {
    if (q->map.count >= IMD_QUOTA_SWEEP_AT && now_ms - q->swept_ms >= 1000) {
      q->swept_ms = now_ms;
      sweep(q, now_ms, false);
    }
    if (q->map.count < IMD_QUOTA_PAIRS_MAX && (p = malloc(sizeof *p + kl))) {
      memcpy(p->key, key, kl);
      p->node.key = p->key;
      p->node.klen = (uint32_t)kl;
      p->window_ms = now_ms;
      p->count = 1;
      strmap_put(&q->map, &p->node);
    }
  } else if (now_ms - p->window_ms >= IMD_QUOTA_WINDOW_MS) {
    p->window_ms = now_ms;
    p->count = 1;
  } else if (p->count >= q->per_minute) {
    ok = false;
  } else {
    p->count++;
  }
  if (key != stack) free(key);
  return ok;
}
