/* The client's window of recently delivered message ids: a ring, so the
 * memory is bounded and the oldest id is forgotten first. */
#include <stdlib.h>
#include <string.h>

#include "client/client.h"

static uint64_t fnv1a(const char *s, size_t n) {
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < n; i++) {
    h ^= (uint8_t)s[i];
    h *= 1099511628211ull;
  }
  return h;
}

int idw_init(id_window *w, unsigned cap) {
  memset(w, 0, sizeof *w);
  if (cap == 0)
    return 0;
  w->ids = calloc(cap, sizeof *w->ids);
  w->hash = calloc(cap, sizeof *w->hash);
  if (!w->ids || !w->hash) {
    idw_free(w);
    return -1;
  }
  w->cap = cap;
  return 0;
}

void idw_free(id_window *w) {
  for (unsigned i = 0; w->ids && i < w->cap; i++)
    free(w->ids[i]);
  free(w->ids);
  free(w->hash);
  memset(w, 0, sizeof *w);
}

bool idw_has(const id_window *w, const char *id, size_t n) {
  uint64_t h = fnv1a(id, n);
  for (unsigned i = 0; i < w->count; i++)
    if (w->hash[i] == h && strlen(w->ids[i]) == n && memcmp(w->ids[i], id, n) == 0)
      return true;
  return false;
}

int idw_add(id_window *w, const char *id, size_t n) {
  if (w->cap == 0)
    return 0;
  char *copy = malloc(n + 1);
  if (!copy)
    return -1;
  memcpy(copy, id, n);
  copy[n] = '\0';
  free(w->ids[w->next]);
  w->ids[w->next] = copy;
  w->hash[w->next] = fnv1a(id, n);
  w->next = (w->next + 1) % w->cap;
  if (w->count < w->cap)
    w->count++;
  return 0;
}
