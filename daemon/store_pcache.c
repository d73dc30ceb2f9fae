/* The page cache layer of imd's store (see store_pcache.h). */
#include "store_pcache.h"

#include <stdlib.h>

#include <sqlite3.h>

/* SQLite's pending byte: the page holding it is never a data page. */
#define PENDING_BYTE 0x40000000u

/* One cache: the default cache's, and what this layer knows of its keys. */
typedef struct pcache_layer {
  sqlite3_pcache *real;
  unsigned parking;    /* the pending-byte page's number, where splits park pages */
  unsigned max_key;    /* no page but parked ones has a greater key */
  unsigned parked;     /* pages parked now (an upper bound: a discarded one stays counted) */
} pcache_layer;

static sqlite3_pcache_methods2 base; /* the default cache */

static int x_init(void *arg)
{
  (void)arg;
  return base.xInit(base.pArg);
}

static void x_shutdown(void *arg)
{
  (void)arg;
  if (base.xShutdown != NULL)
    base.xShutdown(base.pArg);
}

static sqlite3_pcache *x_create(int page_size, int extra, int purgeable)
{
  pcache_layer *c = calloc(1, sizeof *c);

  if (c == NULL)
    return NULL;
  c->real = base.xCreate(page_size, extra, purgeable);
  if (c->real == NULL) {
    free(c);
    return NULL;
  }
  c->parking = PENDING_BYTE / (unsigned)page_size + 1;
  return (sqlite3_pcache *)c;
}

static void x_cachesize(sqlite3_pcache *p, int n)
{
  base.xCachesize(((pcache_layer *)p)->real, n);
}

static int x_pagecount(sqlite3_pcache *p)
{
  return base.xPagecount(((pcache_layer *)p)->real);
}

static sqlite3_pcache_page *x_fetch(sqlite3_pcache *p, unsigned key, int create)
{
  pcache_layer *c = (pcache_layer *)p;

  if (create != 0 && key > c->max_key)
    c->max_key = key; /* a lookup (create 0) adds nothing; SQLite looks up the
                         parking number before it parks a page there */
  return base.xFetch(c->real, key, create);
}

static void x_unpin(sqlite3_pcache *p, sqlite3_pcache_page *page, int discard)
{
  base.xUnpin(((pcache_layer *)p)->real, page, discard);
}

static void x_rekey(sqlite3_pcache *p, sqlite3_pcache_page *page, unsigned from, unsigned to)
{
  pcache_layer *c = (pcache_layer *)p;

  if (from == c->parking && c->parked > 0)
    c->parked--;
  if (to == c->parking)
    c->parked++;
  else if (to > c->max_key)
    c->max_key = to;
  base.xRekey(c->real, page, from, to);
}

/* Drops the pages with keys >= limit. None can be there when no page is
 * parked and the bound is below the limit: then the default cache is not
 * asked (it would walk all its pages whenever a page was ever parked). */
static void x_truncate(sqlite3_pcache *p, unsigned limit)
{
  pcache_layer *c = (pcache_layer *)p;

  if (c->parked == 0 && c->max_key < limit)
    return;
  base.xTruncate(c->real, limit);
  if (limit <= c->parking)
    c->parked = 0;
  if (c->max_key >= limit)
    c->max_key = limit > 0 ? limit - 1 : 0;
}

static void x_destroy(sqlite3_pcache *p)
{
  pcache_layer *c = (pcache_layer *)p;

  base.xDestroy(c->real);
  free(c);
}

static void x_shrink(sqlite3_pcache *p)
{
  base.xShrink(((pcache_layer *)p)->real);
}

int storepcache_install(void)
{
  static const sqlite3_pcache_methods2 layer = {
    .iVersion = 1,
    .pArg = NULL,
    .xInit = x_init,
    .xShutdown = x_shutdown,
    .xCreate = x_create,
    .xCachesize = x_cachesize,
    .xPagecount = x_pagecount,
    .xFetch = x_fetch,
    .xUnpin = x_unpin,
    .xRekey = x_rekey,
    .xTruncate = x_truncate,
    .xDestroy = x_destroy,
    .xShrink = x_shrink,
  };

  if (sqlite3_config(SQLITE_CONFIG_GETPCACHE2, &base) != SQLITE_OK || base.xInit == NULL)
    return -1;
  return sqlite3_config(SQLITE_CONFIG_PCACHE2, &layer) == SQLITE_OK ? 0 : -1;
}
