/* libim's libevent driver: listeners, sockets and the tick timer for one
 * im_server on one event_base. Use it, or drive <libim/im.h> yourself. */
#ifndef LIBIM_IM_EVENT_H
#define LIBIM_IM_EVENT_H

#include <libim/im.h>
#include <libim/im_tls.h>

#ifdef __cplusplus
extern "C" {
#endif

struct event_base;
typedef struct im_event im_event;

/* Bind an engine to an event base: takes over the engine's im_io hooks and
 * starts the tick timer. Neither srv nor base is owned. Returns NULL on
 * allocation failure. */
IM_EXTERN im_event *im_event_new(struct event_base *base, im_server *srv);

/* Listen on "HOST:PORT" ("[::1]:PORT" for IPv6; port 0 picks one) for
 * WebSocket or raw TCP clients. Returns 0, IM_EADDR (bad address or bind
 * failed; errno is kept), IM_EINVAL (bad transport, or 8 listeners
 * already). */
IM_EXTERN int im_event_listen(im_event *ev, enum im_transport t, const char *addr);

/* As im_event_listen, with TLS when tls is not NULL: wss:// for
 * IM_TRANSPORT_WS, TLS around the length-prefixed frames for
 * IM_TRANSPORT_TCP. The handshake runs in the loop without blocking; a
 * connection whose handshake fails or does not finish within
 * im_tls_handshake_timeout() is closed (on_close with 1006), others are not
 * affected. im_conn_info.secure is 1 for its connections. tls is borrowed:
 * it must outlive ev (im_tls_reload on it is fine at any time). Returns as
 * im_event_listen. */
IM_EXTERN int im_event_listen_tls(im_event *ev, enum im_transport t, const char *addr,
                                  im_tls *tls);

/* on != 0: the listeners made after this call share their port with
 * other listeners on the same address (SO_REUSEPORT, im_listener_new_shared):
 * one im_event per worker thread, all on the same port. Default off. */
IM_EXTERN void im_event_set_reuseport(im_event *ev, int on);

/* The longest im_event_set_coalesce() delay, in microseconds. */
#define IM_EVENT_COALESCE_MAX 1000u

/* A latency budget that buys fewer wake-ups (default 0: off). When a
 * wake-up of the loop found some connections readable but fewer than a full
 * batch (256), the driver, once the output of that pass is written, sleeps
 * usec microseconds before handing the loop back, so that the next wake-up
 * reads the input of many connections at once: fewer wake-ups, context
 * switches and system calls per message under load, and more requests in
 * each of a store's group commits. The price: anything on this loop (input,
 * timers, other events, im_async posts from other threads) may wait up to
 * usec longer. A loop with nothing to read never sleeps. Suits a busy
 * server whose latency goal is in milliseconds; leave it off where tens of
 * microseconds matter. Any time, on the loop's thread (or before its loop
 * runs). Returns 0, or
 * IM_EINVAL (usec > IM_EVENT_COALESCE_MAX; the setting is unchanged). */
IM_EXTERN int im_event_set_coalesce(im_event *ev, unsigned usec);

/* Wake-ups that found connections ready to read, and the sleeps that
 * im_event_set_coalesce() added, since im_event_new (for metrics: their
 * ratio to messages shows how well input is batched). Either pointer may
 * be NULL. Loop thread. */
IM_EXTERN void im_event_counts(const im_event *ev, uint64_t *wakeups, uint64_t *naps);

/* The port of the n-th listener (0-based, in listen order), or -1. */
IM_EXTERN int im_event_port(const im_event *ev, int n);

/* Catch SIGINT and SIGTERM on the base: on the first one, stop accepting,
 * close every connection with 1001 and leave the loop once they are gone
 * (or after grace_ms). Returns 0 or IM_ENOMEM. */
IM_EXTERN int im_event_handle_signals(im_event *ev, unsigned grace_ms);

/* Start the same graceful shutdown by hand. */
IM_EXTERN void im_event_shutdown(im_event *ev, unsigned grace_ms);

/* Close listeners and sockets and free the driver (not srv, not base).
 * Connections still open are hung up (on_close with 1006). */
IM_EXTERN void im_event_free(im_event *ev);

#ifdef __cplusplus
}
#endif
#endif
