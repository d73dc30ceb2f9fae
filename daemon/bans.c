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

static uid_ban *uid_find(imd *d, const char *uid) {
  return (uid_ban *)strmap_get(&d->uid_bans, uid, strlen(uid));
}

bool imd_uid_banned(imd *d, const char *uid) {
  uid_ban *b = d->uid_bans.buckets ? uid_find(d, uid) : NULL;
  if (!b) return false;
  if (b->until_ms && b->until_ms <= imd_wall_ms()) {
    strmap_del(&d->uid_bans, &b->node);
    free(b);
    return false;
  }
  return true;
}

int imd_ban_uid(imd *d, const char *uid, uint32_t ttl_s) {
  size_t n = strlen(uid);
  if (n == 0 || n > IMD_UID_MAX) return -1;
  uid_ban *b = uid_find(d, uid);
  if (!b) {
    if (d->uid_bans.count >= IMD_UID_BANS_MAX || !(b = malloc(sizeof *b + n + 1))) return -1;
    memcpy(b->uid, uid, n + 1);
    b->node.key = b->uid;
    b->node.klen = (uint32_t)n;
    strmap_put(&d->uid_bans, &b->node);
  }
  b->until_ms = ttl_s ? imd_wall_ms() + (uint64_t)ttl_s * 1000u : 0;
  /* live sessions end now, on every node */
  im_kick_user(d->srv, uid, IM_CLOSE_KICKED, "banned");
  return 0;
}

int imd_unban_uid(imd *d, const char *uid) {
  uid_ban *b = uid_find(d, uid);
  if (!b) return -1;
  strmap_del(&d->uid_bans, &b->node);
  free(b);
  return 0;
}

void imd_uid_bans(imd *d, void (*fn)(const char *uid, uint64_t until_ms, void *arg), void *arg) {
  strmap *m = &d->uid_bans;
  uint64_t now = imd_wall_ms();
  for (uint32_t k = 0; m->buckets && k <= m->mask; k++)
    for (strmap_node *n = m->buckets[k]; n; n = n->next) {
      uid_ban *b = (uid_ban *)n;
      if (!b->until_ms || b->until_ms > now) fn(b->uid, b->until_ms, arg);
    }
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
