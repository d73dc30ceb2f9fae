/* im_stream: the dispatch through the function table, and the plain-socket
 * implementation (recv / sendmsg, nothing buffered inside). */
#include "event/stream.h"

#include <errno.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

static int plain_handshake(im_stream *s) {
  (void)s;
  return 0;
}

static ssize_t plain_read(im_stream *s, void *buf, size_t cap) {
  for (;;) {
    ssize_t n = recv(s->fd, buf, cap, 0);
    if (n >= 0) return n;
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      s->wants = IM_WANT_READ;
      return IM_STREAM_AGAIN;
    }
    return IM_ESYS;
  }
}

static ssize_t plain_writev(im_stream *s, const struct iovec *iov, int n) {
  struct msghdr mh = {0};
  mh.msg_iov = (struct iovec *)iov;
  mh.msg_iovlen = (size_t)n;
  for (;;) {
    ssize_t w = sendmsg(s->fd, &mh, MSG_NOSIGNAL);
    if (w >= 0) return w;
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      s->wants = IM_WANT_WRITE;
      return IM_STREAM_AGAIN;
    }
    return IM_ESYS;
  }
}

static size_t plain_pending(const im_stream *s) {
  (void)s;
  return 0;
}

static void plain_shutdown(im_stream *s) { (void)s; }

static void plain_release(im_stream *s) { free(s); }
static void plain_keep(im_stream *s) { (void)s; } /* its memory is its owner's */

static const char *plain_alpn(const im_stream *s) {
  (void)s;
  return NULL;
}

static const im_stream_funcs plain_funcs = {plain_handshake, plain_read,     plain_writev,
                                            plain_pending,   plain_shutdown, plain_release,
                                            plain_alpn};

static const im_stream_funcs plain_inside_funcs = {plain_handshake, plain_read,     plain_writev,
                                                   plain_pending,   plain_shutdown, plain_keep,
                                                   plain_alpn};

im_stream *im__stream_plain_init(im_stream *s, int fd) {
  *s = (im_stream){.f = &plain_inside_funcs, .fd = fd};
  return s;
}

im_stream *im_stream_new(int fd, im_tls *tls) {
  if (tls) return im__tls_stream_new(fd, tls);
  im_stream *s = calloc(1, sizeof *s);
  if (!s) return NULL;
  s->f = &plain_funcs;
  s->fd = fd;
  return s;
}

int im_stream_handshake(im_stream *s) { return s->f->handshake(s); }

ssize_t im_stream_read(im_stream *s, void *buf, size_t cap) { return s->f->read(s, buf, cap); }

size_t im_stream_pending(const im_stream *s) { return s->f->pending(s); }

ssize_t im_stream_writev(im_stream *s, const struct iovec *iov, int n) {
  return s->f->writev(s, iov, n);
}

int im_stream_wants(const im_stream *s) { return s->wants; }

void im_stream_shutdown(im_stream *s) {
  s->f->shutdown(s);
  shutdown(s->fd, SHUT_WR);
}

int im__stream_detach(im_stream *s) {
  int fd = s->fd;
  s->f->release(s);
  return fd;
}

void im_stream_free(im_stream *s) {
  if (s) close(im__stream_detach(s));
}

int im_stream_fd(const im_stream *s) { return s->fd; }

int im_stream_secure(const im_stream *s) { return s->secure; }

const char *im_stream_alpn(const im_stream *s) { return s->f->alpn(s); }
