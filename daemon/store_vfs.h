/* A SQLite VFS for imd's store that coalesces the writes to the WAL file.
 *
 * SQLite appends a commit to the WAL as two write() calls per page (frame
 * header, page), so a commit of a few hundred pages costs a few hundred
 * system calls and as many page-cache updates. This VFS wraps the default
 * one and gathers consecutive writes to a WAL file in a buffer, written out
 * with one call before anything can depend on it: before the file is synced,
 * read, truncated, sized, mapped or closed, and when the buffer is full.
 *
 * Only for stores opened with synchronous=FULL: there SQLite syncs the WAL
 * before it publishes a commit to other connections (the wal-index), so no
 * other connection can read a frame still in the buffer. With
 * synchronous=NORMAL it does not sync at commit; open such stores with the
 * default VFS.
 *
 * Every other file, and every other operation, goes to the default VFS
 * unchanged.
 */
#ifndef IMD_STORE_VFS_H
#define IMD_STORE_VFS_H

/* Registers the VFS (once per process, thread-safe; not as the default) and
 * returns its name for sqlite3_open_v2(), or NULL if it could not be
 * registered (then open with the default VFS). */
const char *storevfs_name(void);

#endif
