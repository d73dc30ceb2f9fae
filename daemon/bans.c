/* Who may not come in: imd's side of abuse protection (R25). Address bans
 * and the per-source rate limit live in libim's guard (im_guard.h); uid
 * bans live here, checked at every authentication. Both are node-local. */
#include <libim/im_guard.h>
#include <libim/im_router.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "imd.h"

typedef struct uid_ban {
  strmap_node node;
  uint64_t until_ms;        /* wall clock; 0 = until lifted */
  char uid[];
} uid_ban;

/* The table: the main thread's, under the shared lock (workers.c). */
static strmap *table(imd *d) { return &(d->main ? d->main : d)->uid_bans; }

static uid_ban *uid_find(strmap *m, const char *uid) {
  return m->buckets ? (uid_ban *)strmap_get(m, uid, strlen(uid)) : NULL;
}

bool imd_uid_banned(imd *d, const char *uid) {
  strmap *m = table(d);
  imd_shared_lock();
  uid_ban *b = uid_find(m, uid);
  if (b && b->until_ms && b->until_ms <= imd_wall_ms()) {
    strmap_del(m, &b->node);
    free(b);
    b = NULL;
  }
  imd_shared_unlock();
  return b != NULL;
}

int imd_ban_uid(imd *d, const char *uid, uint32_t ttl_s) {
  size_t n = strlen(uid);
  if (n == 0 || n > IMD_UID_MAX) return -1;
  strmap *m = table(d);
  imd_shared_lock();
  uid_ban *b = uid_find(m, uid);
  if (!b && m->count < IMD_UID_BANS_MAX && (b = malloc(sizeof *b + n + 1))) {
    memcpy(b->uid, uid, n + 1);
    b->node.key = b->uid;
    b->node.klen = (uint32_t)n;
    strmap_put(m, &b->node);
  }
  if (b) b->until_ms = ttl_s ? imd_wall_ms() + (uint64_t)ttl_s * 1000u : 0;
  imd_shared_unlock();
  if (!b) return -1;
  /* live sessions end now, on every worker and node */
  im_kick_user(d->srv, uid, IM_CLOSE_KICKED, "banned");
  return 0;
}

int imd_unban_uid(imd *d, const char *uid) {
  strmap *m = table(d);
  imd_shared_lock();
  uid_ban *b = uid_find(m, uid);
  if (b) strmap_del(m, &b->node);
  imd_shared_unlock();
  free(b);
  return b ? 0 : -1;
}

void imd_uid_bans(imd *d, void (*fn)(const char *uid, uint64_t until_ms, void *arg), void *arg) {
  strmap *m = table(d);
  imd_shared_lock();
  uint64_t now = imd_wall_ms();
  for (uint32_t k = 0; m->buckets && k <= m->mask; k++)
    for (strmap_node *n = m->buckets[k]; n; n = n->next) {
      uid_ban *b = (uid_ban *)n;
      if (!b->until_ms || b->until_ms > now) fn(b->uid, b->until_ms, arg);
    }
  imd_shared_unlock();
}

/* "--ban 10.0.0.0/8,uid:mallory,::1": permanent entries. */
int imd_bans_init(imd *d, const char *list) {
  if (strmap_init(&d->uid_bans, 64) < 0) return -1;
  if (!list || !*list || !strcmp(list, "none")) return 0;
  char *copy = strdup(list), *save = NULL;
  int rc = copy ? 0 : -1;
  for (char *t = copy ? strtok_r(copy, ",", &save) : NULL; t && rc == 0;
       t = strtok_r(NULL, ",", &save)) {
    while (*t == ' ') t++;
    if (!strncmp(t, "uid:", 4))
      rc = imd_ban_uid(d, t + 4, 0);
    else
      rc = im_guard_ban(d->srv, t, 0) == 0 ? 0 : -1;
    if (rc < 0) fprintf(stderr, "imd: ban: '%s' is not an address, range or uid:NAME\n", t);
  }
  free(copy);
  return rc;
}

void imd_bans_free(imd *d) {
  strmap *m = &d->uid_bans;
  for (uint32_t k = 0; m->buckets && k <= m->mask; k++)
    for (strmap_node *n = m->buckets[k], *next; n; n = next) {
      next = n->next;
      free(n);
    }
  strmap_free(m);
}
