/* libim's socket layer, for libim's own driver (<libim/im_event.h>) and for
 * embedders that run another server on the same event base (imd's HTTP API
 * does): one address syntax, one listener, and one stream interface over a
 * plain socket or a TLS session.
 *
 *   im_listener  binds "HOST:PORT" / "[V6]:PORT" on an event base and hands
 *                each accepted socket (non-blocking, TCP_NODELAY) to a
 *                callback; pauses itself while the process is out of
 *                descriptors instead of spinning.
 *   im_stream    one connection: read / writev / handshake / close, plus
 *                which readiness (read or write) it waits for. Behind it a
 *                small table of functions, one for plain sockets and one
 *                for mbedTLS (<libim/im_tls.h>); the caller's code is the
 *                same for both.
 *
 * Not thread-safe: use everything from the thread running the event base.
 */
#ifndef LIBIM_IM_NET_H
#define LIBIM_IM_NET_H

#include <libim/im.h>
#include <libim/im_tls.h>
#include <sys/socket.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

struct event_base;

/* ---- addresses ---------------------------------------------------------- */

/* Parse "IPV4:PORT" or "[IPV6]:PORT" (numeric hosts only; port 0..65535,
 * 0 letting the kernel pick) into ss / *len. An IPv6 address must be in
 * brackets. Returns 0 or IM_EADDR. */
IM_EXTERN int im_addr_parse(const char *addr, struct sockaddr_storage *ss, socklen_t *len);

/* Write "ip:port" or "[ipv6]:port" for sa into out (cut to cap, always
 * NUL-terminated; "?" for other families). */
IM_EXTERN void im_addr_format(const struct sockaddr *sa, char *out, size_t cap);

/* ---- listeners ---------------------------------------------------------- */

typedef struct im_listener im_listener;

/* A socket was accepted: fd is non-blocking, close-on-exec, TCP_NODELAY
 * and now owned by the callback. peer is its "ip:port", valid for the
 * call. */
typedef void (*im_accept_fn)(int fd, const char *peer, void *arg);

/* Bind and listen on addr (im_addr_parse syntax) on base, calling fn for
 * each connection. base must outlive the listener. Returns NULL with errno
 * set: EINVAL (addr does not parse), the bind/listen error, or ENOMEM. */
IM_EXTERN im_listener *im_listener_new(struct event_base *base, const char *addr, int backlog,
                                       im_accept_fn fn, void *arg);
/* As im_listener_new, with SO_REUSEPORT: listeners of the same user bound
 * to the same address share the port and the kernel spreads new
 * connections over them (one per worker thread, <libim/im_group.h>).
 * Every listener sharing a port must be made with this call. */
IM_EXTERN im_listener *im_listener_new_shared(struct event_base *base, const char *addr,
                                              int backlog, im_accept_fn fn, void *arg);
/* The bound port, or -1. */
IM_EXTERN int im_listener_port(const im_listener *l);
/* Stop (on = 0) or resume (on != 0) accepting. */
IM_EXTERN void im_listener_enable(im_listener *l, int on);
/* Close the listening socket. NULL is a no-op. */
IM_EXTERN void im_listener_free(im_listener *l);

/* ---- streams ------------------------------------------------------------ */

typedef struct im_stream im_stream;

/* im_stream_read/writev/handshake: the operation must wait for readiness
 * (see im_stream_wants). Not an error. */
#define IM_STREAM_AGAIN (-200)

/* Readiness bits of im_stream_wants. */
enum { IM_WANT_READ = 1, IM_WANT_WRITE = 2 };

/* Wrap an accepted, non-blocking socket. tls NULL: a plain stream; else a
 * TLS server session whose handshake runs in im_stream_handshake (the
 * session takes a reference on tls's current certificate, so
 * im_tls_reload does not affect it). On success the stream owns fd.
 * Returns NULL when memory ran out (fd is then still the caller's). */
IM_EXTERN im_stream *im_stream_new(int fd, im_tls *tls);

/* Advance the handshake. Returns 0 (done: read and write may be used;
 * always 0 for plain streams), IM_STREAM_AGAIN (wait for im_stream_wants,
 * then call again), or IM_EPROTO (the peer is not speaking TLS, or the
 * handshake failed: close the stream). */
IM_EXTERN int im_stream_handshake(im_stream *s);

/* Read up to cap bytes into buf. Returns the count (> 0), 0 at end of
 * stream (FIN, or a TLS close_notify), IM_STREAM_AGAIN, IM_ESYS (socket
 * error, errno kept) or IM_EPROTO (TLS failure). */
IM_EXTERN ssize_t im_stream_read(im_stream *s, void *buf, size_t cap);

/* Decrypted bytes already buffered inside the stream: call im_stream_read
 * again without waiting for readiness while this is non-zero (the socket
 * may not become readable again for them). Always 0 for plain streams. */
IM_EXTERN size_t im_stream_pending(const im_stream *s);

/* Write from n iovecs, in order. Returns the bytes taken (> 0; maybe fewer
 * than offered), IM_STREAM_AGAIN, IM_ESYS or IM_EPROTO. After
 * IM_STREAM_AGAIN the next call must offer at least the same leading bytes
 * again (TLS may already have encrypted a record of them); bytes taken are
 * never offered again. */
IM_EXTERN ssize_t im_stream_writev(im_stream *s, const struct iovec *iov, int n);

/* What the last IM_STREAM_AGAIN waits for: IM_WANT_READ and/or
 * IM_WANT_WRITE. */
IM_EXTERN int im_stream_wants(const im_stream *s);

/* End the sending side: a TLS close_notify (best effort, never blocks),
 * then shutdown(SHUT_WR). Reading goes on. */
IM_EXTERN void im_stream_shutdown(im_stream *s);

/* Close the socket and free the stream (no close_notify: call
 * im_stream_shutdown first for a graceful end). NULL is a no-op. */
IM_EXTERN void im_stream_free(im_stream *s);

/* The socket (owned by the stream). */
IM_EXTERN int im_stream_fd(const im_stream *s);
/* 1 for a TLS stream, 0 for a plain one. */
IM_EXTERN int im_stream_secure(const im_stream *s);
/* The ALPN protocol agreed in the handshake, or NULL. */
IM_EXTERN const char *im_stream_alpn(const im_stream *s);

#ifdef __cplusplus
}
#endif
#endif
