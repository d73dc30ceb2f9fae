/* The WAL write-coalescing VFS of imd's store (see store_vfs.h). */
#include "store_vfs.h"

#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include <sqlite3.h>

#define VFS_NAME "imd-wal"
#define BUF_CAP (1024 * 1024) /* a commit of ~1,000 1 KiB pages at most per flush */
/* the unix VFS writes at most 128 KiB - 1 per call (it masks larger sizes) */
#define CHUNK ((size_t)64 * 1024)

/* Our handle first, the default VFS's handle right after it. */
typedef struct vfs_file {
  sqlite3_file base;
  sqlite3_file *real;
  bool wal;
  unsigned char *buf;  /* WAL bytes not yet written; NULL until the first write */
  sqlite3_int64 off;   /* file offset of buf[0] */
  size_t len;
} vfs_file;

/* sizeof(vfs_file) keeps the real handle 8-byte aligned */
#define REAL_OF(f) ((sqlite3_file *)(void *)((char *)(f) + sizeof(vfs_file)))

static sqlite3_vfs vfs;
static sqlite3_vfs *parent;
static pthread_once_t once = PTHREAD_ONCE_INIT;
static bool registered;

static int flush(vfs_file *f)
{
  int rc = SQLITE_OK;

  for (size_t at = 0; rc == SQLITE_OK && at < f->len; at += CHUNK) {
    size_t n = f->len - at < CHUNK ? f->len - at : CHUNK;
    rc = f->real->pMethods->xWrite(f->real, f->buf + at, (int)n, f->off + (sqlite3_int64)at);
  }
  f->len = 0;
  return rc;
}

static int x_close(sqlite3_file *p)
{
  vfs_file *f = (vfs_file *)p;
  int rc = flush(f), rc2 = f->real->pMethods->xClose(f->real);

  free(f->buf);
  f->buf = NULL;
  return rc != SQLITE_OK ? rc : rc2;
}

static int x_read(sqlite3_file *p, void *out, int amt, sqlite3_int64 ofst)
{
  vfs_file *f = (vfs_file *)p;

  if (f->len > 0 && ofst < f->off + (sqlite3_int64)f->len && ofst + amt > f->off) {
    int rc = flush(f);
    if (rc != SQLITE_OK)
      return rc;
  }
  return f->real->pMethods->xRead(f->real, out, amt, ofst);
}

static int x_write(sqlite3_file *p, const void *data, int amt, sqlite3_int64 ofst)
{
  vfs_file *f = (vfs_file *)p;
  sqlite3_int64 end = f->off + (sqlite3_int64)f->len;
  int rc;

  if (!f->wal || amt <= 0 || (size_t)amt > CHUNK)
    return flush(f) != SQLITE_OK ? SQLITE_IOERR_WRITE
                                 : f->real->pMethods->xWrite(f->real, data, amt, ofst);
  /* a frame rewritten within the buffered range (SQLite rewrites frames of
   * the open transaction in place) */
  if (f->len > 0 && ofst >= f->off && ofst + amt <= end) {
    memcpy(f->buf + (ofst - f->off), data, (size_t)amt);
    return SQLITE_OK;
  }
  if (f->len > 0 && (ofst != end || f->len + (size_t)amt > BUF_CAP)) {
    rc = flush(f);
    if (rc != SQLITE_OK)
      return rc;
  }
  if (f->buf == NULL && (f->buf = malloc(BUF_CAP)) == NULL)
    return f->real->pMethods->xWrite(f->real, data, amt, ofst);
  if (f->len == 0)
    f->off = ofst;
  memcpy(f->buf + f->len, data, (size_t)amt);
  f->len += (size_t)amt;
  return SQLITE_OK;
}

static int x_truncate(sqlite3_file *p, sqlite3_int64 size)
{
  vfs_file *f = (vfs_file *)p;
  int rc = flush(f);

  return rc != SQLITE_OK ? rc : f->real->pMethods->xTruncate(f->real, size);
}

static int x_sync(sqlite3_file *p, int flags)
{
  vfs_file *f = (vfs_file *)p;
  int rc = flush(f);

  return rc != SQLITE_OK ? rc : f->real->pMethods->xSync(f->real, flags);
}

static int x_file_size(sqlite3_file *p, sqlite3_int64 *size)
{
  vfs_file *f = (vfs_file *)p;
  int rc = flush(f);

  return rc != SQLITE_OK ? rc : f->real->pMethods->xFileSize(f->real, size);
}

static int x_lock(sqlite3_file *p, int l)
{
  vfs_file *f = (vfs_file *)p;
  return f->real->pMethods->xLock(f->real, l);
}

static int x_unlock(sqlite3_file *p, int l)
{
  vfs_file *f = (vfs_file *)p;
  return f->real->pMethods->xUnlock(f->real, l);
}

static int x_check_reserved(sqlite3_file *p, int *out)
{
  vfs_file *f = (vfs_file *)p;
  return f->real->pMethods->xCheckReservedLock(f->real, out);
}

static int x_file_control(sqlite3_file *p, int op, void *arg)
{
  vfs_file *f = (vfs_file *)p;
  int rc = flush(f);

  return rc != SQLITE_OK ? rc : f->real->pMethods->xFileControl(f->real, op, arg);
}

static int x_sector_size(sqlite3_file *p)
{
  vfs_file *f = (vfs_file *)p;
  return f->real->pMethods->xSectorSize(f->real);
}

static int x_device_chars(sqlite3_file *p)
{
  vfs_file *f = (vfs_file *)p;
  return f->real->pMethods->xDeviceCharacteristics(f->real);
}

static int x_shm_map(sqlite3_file *p, int pg, int pgsz, int extend, void volatile **out)
{
  vfs_file *f = (vfs_file *)p;
  if (f->real->pMethods->iVersion < 2)
    return SQLITE_IOERR_SHMMAP;
  return f->real->pMethods->xShmMap(f->real, pg, pgsz, extend, out);
}

static int x_shm_lock(sqlite3_file *p, int offset, int n, int flags)
{
  vfs_file *f = (vfs_file *)p;
  if (f->real->pMethods->iVersion < 2)
    return SQLITE_IOERR_SHMLOCK;
  return f->real->pMethods->xShmLock(f->real, offset, n, flags);
}

static void x_shm_barrier(sqlite3_file *p)
{
  vfs_file *f = (vfs_file *)p;
  if (f->real->pMethods->iVersion >= 2)
    f->real->pMethods->xShmBarrier(f->real);
}

static int x_shm_unmap(sqlite3_file *p, int del)
{
  vfs_file *f = (vfs_file *)p;
  if (f->real->pMethods->iVersion < 2)
    return SQLITE_OK;
  return f->real->pMethods->xShmUnmap(f->real, del);
}

static int x_fetch(sqlite3_file *p, sqlite3_int64 ofst, int amt, void **out)
{
  vfs_file *f = (vfs_file *)p;
  int rc = flush(f);

  *out = NULL;
  if (rc != SQLITE_OK || f->real->pMethods->iVersion < 3)
    return rc; /* no mapping: SQLite reads instead */
  return f->real->pMethods->xFetch(f->real, ofst, amt, out);
}

static int x_unfetch(sqlite3_file *p, sqlite3_int64 ofst, void *ptr)
{
  vfs_file *f = (vfs_file *)p;
  if (f->real->pMethods->iVersion < 3)
    return SQLITE_OK;
  return f->real->pMethods->xUnfetch(f->real, ofst, ptr);
}

static const sqlite3_io_methods methods = {
  3, x_close, x_read, x_write, x_truncate, x_sync, x_file_size, x_lock, x_unlock,
  x_check_reserved, x_file_control, x_sector_size, x_device_chars, x_shm_map, x_shm_lock,
  x_shm_barrier, x_shm_unmap, x_fetch, x_unfetch,
};

static int x_open(sqlite3_vfs *v, const char *name, sqlite3_file *p, int flags, int *out_flags)
{
  vfs_file *f = (vfs_file *)p;
  int rc;

  (void)v;
  memset(f, 0, sizeof *f);
  f->real = REAL_OF(f);
  rc = parent->xOpen(parent, name, f->real, flags, out_flags);
  if (rc != SQLITE_OK || f->real->pMethods == NULL) {
    if (rc == SQLITE_OK)
      rc = SQLITE_CANTOPEN;
    if (f->real->pMethods != NULL)
      f->real->pMethods->xClose(f->real);
    return rc; /* base.pMethods stays NULL: SQLite will not close it */
  }
  f->wal = (flags & SQLITE_OPEN_WAL) != 0;
  f->base.pMethods = &methods;
  return SQLITE_OK;
}

static void do_register(void)
{
  parent = sqlite3_vfs_find(NULL);
  if (parent == NULL || parent->szOsFile < 0)
    return;
  vfs = *parent;
  vfs.zName = VFS_NAME;
  vfs.szOsFile = (int)sizeof(vfs_file) + parent->szOsFile;
  vfs.xOpen = x_open;
  vfs.pNext = NULL;
  registered = sqlite3_vfs_register(&vfs, 0) == SQLITE_OK;
}

const char *storevfs_name(void)
{
  pthread_once(&once, do_register);
  return registered ? VFS_NAME : NULL;
}
