/* libim client: the libevent driver. It opens the sockets the client core
 * asks for (non-blocking connect), moves bytes both ways, runs the core's
 * timers (heartbeat, timeouts, reconnect backoff) and fetches the gateway
 * list over HTTP. Use it, or drive <libim/im_client.h> from your own loop
 * (docs/CLIENT.md shows how). */
#ifndef LIBIM_IM_CLIENT_EVENT_H
#define LIBIM_IM_CLIENT_EVENT_H

#include <libim/im_client.h>

#ifdef __cplusplus
extern "C" {
#endif

struct event_base;
typedef struct im_client_event im_client_event;

/* Bind a client to an event base: installs the client's im_client_io
 * hooks. Neither cl nor base is owned. Host names are resolved with
 * getaddrinfo(), which blocks: give numeric addresses where that matters.
 * Returns NULL on allocation failure. */
IM_EXTERN im_client_event *im_client_event_new(struct event_base *base, im_client *cl);

/* im_client_start() with the driver's monotonic clock, and arm the timer.
 * Returns what im_client_start returns (0 or IM_ESTATE). */
IM_EXTERN int im_client_event_start(im_client_event *ev);

/* Close the socket and any gateway fetch, and free the driver (not the
 * client, not the base). Call im_client_stop() first for a clean close. */
IM_EXTERN void im_client_event_free(im_client_event *ev);

/* The driver's monotonic clock in milliseconds, as passed to the client. */
IM_EXTERN uint64_t im_client_event_now(void);

#ifdef __cplusplus
}
#endif
#endif
