/* The records nodes send each other through Redis (delivery streams and
 * room channels), sans-I/O. A record:
 *   u8 kind ('M' message to users, 'R' room message, 'K' kick)
 *   'M'/'R': u32 flags, u64 seq, u64 ts, str id, str from, str to,
 *            str group, str room, blob data, u32 n, n x str uid
 *   'K':     u32 code, str reason, u32 n, n x str uid
 * Integers little-endian; str = u32 length including a NUL (0 = NULL) then
 * the bytes with their NUL, so decoded strings point into the buffer;
 * blob = u32 length then the bytes and a NUL. */
#ifndef IM_REDIS_WIRE_H
#define IM_REDIS_WIRE_H

#include <libim/im.h>
#include <stddef.h>
#include <stdint.h>

enum { RWIRE_MSG = 'M', RWIRE_ROOM = 'R', RWIRE_KICK = 'K' };

/* A growable byte buffer. */
typedef struct rbuf {
  uint8_t *p;
  size_t len, cap;
} rbuf;

void rbuf_free(rbuf *b);

/* A record is a head (everything before the uid list), then the uids.
 * Each returns 0, or -1 when memory ran out (b unchanged). */
int rwire_put_msg_head(rbuf *b, int kind, const im_msg *m);
int rwire_put_kick_head(rbuf *b, int code, const char *reason);
int rwire_put_uids(rbuf *b, const char *const *uids, size_t n);
int rwire_put_bytes(rbuf *b, const void *p, size_t n);

/* A decoded record; pointers into the buffer. uids are read with
 * rwire_uid(). */
typedef struct rwire_rec {
  int kind;
  im_msg m;
  int code;
  const char *reason;
  uint32_t n;
  const uint8_t *uids;      /* n encoded strings */
} rwire_rec;

/* Decode the record at *p (advanced past it). Returns 1, 0 at the end, or
 * -1 for a malformed buffer (the rest is ignored). */
int rwire_next(const uint8_t **p, const uint8_t *end, rwire_rec *r);
/* The next uid of a record's list (*at starts at r->uids). */
const char *rwire_uid(const uint8_t **at);

#endif
