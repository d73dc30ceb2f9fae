/* A SQLite page cache for imd's store that spares commits a walk of the
 * whole cache.
 *
 * When a B-tree split reorders its new pages, SQLite swaps page numbers and
 * parks one page for a moment under the number of the pending-byte page
 * (page 1,048,577 with the store's 1 KiB pages), which no data page ever
 * has. Its default page cache then remembers that number as the highest
 * key it holds, and the commit that follows truncates the cache to the
 * file's size: with the highest key far past the end, that truncation
 * walks every page in the cache. With random inserts into the inboxes most commits
 * split somewhere, so the walk costs in proportion to the cache's size
 * (measured: 35 % of the store's CPU with a 16 MiB cache).
 *
 * This cache is SQLite's default one behind a thin layer that keeps its own
 * bound on the keys in the cache, leaving the pending-byte page out of it
 * (it counts the pages parked there instead), and passes a truncation on
 * only when a page at or past the limit can be there. Every other call
 * goes to the default cache unchanged.
 */
#ifndef IMD_STORE_PCACHE_H
#define IMD_STORE_PCACHE_H

/* Installs the cache process-wide. SQLite takes it only before its first
 * use in the process (sqlite3_initialize()), so call this first.
 * Returns 0 when installed, -1 when SQLite refused (already in use; then it
 * keeps its default cache, which is correct, only slower). */
int storepcache_install(void);

#endif
