/* Group membership: gid -> set of uids, in memory for routing and in
 * DATA/groups.json (rewritten atomically on every change) for restarts. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "imd.h"

imd_group *imd_group_find(imd *d, const char *gid) {
  return (imd_group *)strmap_get(&d->groups, gid, strlen(gid));
}

bool imd_group_has(const imd_group *g, const char *uid) {
  return strmap_get(&g->members, uid, strlen(uid)) != NULL;
}

static imd_group *group_get_or_add(imd *d, const char *gid) {
  imd_group *g = imd_group_find(d, gid);
  if (g) return g;
  size_t n = strlen(gid);
  g = calloc(1, sizeof(*g) + n + 1);
  if (!g || strmap_init(&g->members, 8) < 0) {
    free(g);
    return NULL;
  }
  memcpy(g->gid, gid, n + 1);
  g->node.key = g->gid;
  g->node.klen = (uint32_t)n;
  strmap_put(&d->groups, &g->node);
  return g;
}

static void member_add(imd_group *g, const char *uid) {
  if (imd_group_has(g, uid)) return;
  size_t n = strlen(uid);
  imd_member *m = malloc(sizeof(*m) + n + 1);
  if (!m) return;
  memcpy(m->uid, uid, n + 1);
  m->node.key = m->uid;
  m->node.klen = (uint32_t)n;
  strmap_put(&g->members, &m->node);
}

static void member_del(imd_group *g, const char *uid) {
  strmap_node *n = strmap_get(&g->members, uid, strlen(uid));
  if (!n) return;
  strmap_del(&g->members, n);
  free(n);
}

/* Visit every node of a map (no iterator in strmap: walk the buckets). */
#define STRMAP_FOREACH(map, var)                                      \
  for (uint32_t b_ = 0; (map)->buckets && b_ <= (map)->mask; b_++)    \
    for (strmap_node *var = (map)->buckets[b_], *nx_ = var ? var->next : NULL; var; \
         var = nx_, nx_ = var ? var->next : NULL)

static void group_free(imd *d, imd_group *g) {
  STRMAP_FOREACH(&g->members, n) free(n);
  strmap_free(&g->members);
  strmap_del(&d->groups, &g->node);
  free(g);
}

const char **imd_group_members(const imd_group *g, size_t *count) {
  const char **v = malloc((g->members.count + 1) * sizeof(*v));
  if (!v) return NULL;
  size_t k = 0;
  STRMAP_FOREACH(&g->members, n) v[k++] = ((imd_member *)n)->uid;
  *count = k;
  return v;
}

static char *groups_path(imd *d, const char *suffix) {
  size_t n = strlen(d->cfg.data_dir) + 32;
  char *p = malloc(n);
  if (p) snprintf(p, n, "%s/groups.json%s", d->cfg.data_dir, suffix);
  return p;
}

static int groups_save(imd *d) {
  cJSON *root = cJSON_CreateObject();
  STRMAP_FOREACH(&d->groups, gn) {
    imd_group *g = (imd_group *)gn;
    cJSON *arr = cJSON_AddArrayToObject(root, g->gid);
    STRMAP_FOREACH(&g->members, mn) cJSON_AddItemToArray(arr, cJSON_CreateString(((imd_member *)mn)->uid));
  }
  char *text = cJSON_PrintUnformatted(root);
  cJSON_Delete(root);
  char *tmp = groups_path(d, ".tmp"), *path = groups_path(d, "");
  int rc = -1;
  FILE *f = text && tmp ? fopen(tmp, "w") : NULL;
  if (f) {
    bool ok = fputs(text, f) >= 0 && fflush(f) == 0 && fsync(fileno(f)) == 0;
    ok = fclose(f) == 0 && ok;
    if (ok && rename(tmp, path) == 0) rc = 0;
  }
  if (rc < 0) fprintf(stderr, "imd: cannot write %s: %s\n", path ? path : "groups", strerror(errno));
  free(text);
  free(tmp);
  free(path);
  return rc;
}

int imd_group_update(imd *d, const char *gid, const char *const *add, size_t nadd,
                     const char *const *rm, size_t nrm) {
  imd_group *g = group_get_or_add(d, gid);
  if (!g) return -1;
  for (size_t i = 0; i < nadd; i++) member_add(g, add[i]);
  for (size_t i = 0; i < nrm; i++) member_del(g, rm[i]);
  if (g->members.count == 0) group_free(d, g);
  return groups_save(d);
}

int imd_groups_load(imd *d) {
  if (strmap_init(&d->groups, 64) < 0) return -1;
  char *path = groups_path(d, "");
  FILE *f = path ? fopen(path, "r") : NULL;
  if (!f) {
    free(path);
    return 0; /* no groups yet */
  }
  fseek(f, 0, SEEK_END);
  long len = ftell(f);
  fseek(f, 0, SEEK_SET);
  char *text = len >= 0 ? malloc((size_t)len + 1) : NULL;
  size_t got = text ? fread(text, 1, (size_t)len, f) : 0;
  fclose(f);
  cJSON *root = text ? cJSON_ParseWithLength(text, got) : NULL;
  free(text);
  if (!cJSON_IsObject(root)) {
    fprintf(stderr, "imd: %s is not a JSON object; refusing to start\n", path);
    cJSON_Delete(root);
    free(path);
    return -1;
  }
  free(path);
  cJSON *g;
  cJSON_ArrayForEach(g, root) {
    imd_group *grp = cJSON_IsArray(g) ? group_get_or_add(d, g->string) : NULL;
    cJSON *m;
    if (grp) cJSON_ArrayForEach(m, g) if (cJSON_IsString(m)) member_add(grp, m->valuestring);
    if (grp && grp->members.count == 0) group_free(d, grp);
  }
  cJSON_Delete(root);
  return 0;
}

void imd_groups_free(imd *d) {
  STRMAP_FOREACH(&d->groups, gn) group_free(d, (imd_group *)gn);
  strmap_free(&d->groups);
}
