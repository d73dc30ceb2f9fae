/* The transport seam under every listener: an im_stream is a socket plus a
 * table of functions. plain_funcs (stream.c) use recv/sendmsg; tls_funcs
 * (tls.c) run an mbedTLS session over the same socket. The public calls of
 * <libim/im_net.h> dispatch through the table, so the libevent driver and
 * imd's HTTP server are written once for both. */
#ifndef LIBIM_EVENT_STREAM_H
#define LIBIM_EVENT_STREAM_H

#include <libim/im_net.h>
#include <stdint.h>

typedef struct im_stream_funcs {
  int (*handshake)(im_stream *s);
  ssize_t (*read)(im_stream *s, void *buf, size_t cap);
  ssize_t (*writev)(im_stream *s, const struct iovec *iov, int n);
  size_t (*pending)(const im_stream *s);
  void (*shutdown)(im_stream *s); /* before shutdown(SHUT_WR) */
  void (*release)(im_stream *s);  /* frees the whole object; fd is closed by the caller */
  const char *(*alpn)(const im_stream *s);
} im_stream_funcs;

struct im_stream {
  const im_stream_funcs *f;
  int fd;
  uint8_t wants; /* IM_WANT_* of the last IM_STREAM_AGAIN */
  uint8_t secure;
};

/* A plain stream over fd in memory of the caller's (a driver's connection
 * record): im_stream_free closes fd and frees nothing. Returns s. */
im_stream *im__stream_plain_init(im_stream *s, int fd);

/* Frees s as im_stream_free() does but leaves its descriptor open, and
 * returns it (for a lingering close: the driver reads the socket dry after
 * the stream is gone). */
int im__stream_detach(im_stream *s);

/* tls.c: a TLS stream over fd, or NULL when memory ran out. */
im_stream *im__tls_stream_new(int fd, im_tls *tls);
/* tls.c: if s is a TLS session between records (handshake done, nothing
 * buffered either way), give the pages of its record buffers back to the
 * kernel; the session goes on as before. Returns the bytes given back (0:
 * not between records, or nothing to give). The read path calls it itself
 * when the socket runs dry, at most once a second per session; exposed for
 * the tests. s must be a TLS stream. */
size_t im__tls_rest(im_stream *s);

#endif
