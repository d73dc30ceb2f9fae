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

/* Connect from this local address from the next connect on: ip is a
 * numeric IPv4 or IPv6 address (copied), the port is left to the kernel
 * (IP_BIND_ADDRESS_NO_PORT, so ports are unique per destination, not per
 * source). Only gateways of the same address family are then reached.
 * Spreading many clients over several local addresses (127.0.0.x) opens
 * more connections to one server than one address has ports. NULL: no
 * binding (the default). Returns 0, or IM_EADDR when ip is not a numeric
 * address (the binding is then cleared). */
IM_EXTERN int im_client_event_set_source(im_client_event *ev, const char *ip);

/* Close the socket and any gateway fetch, and free the driver (not the
 * client, not the base). Call im_client_stop() first for a clean close. */
IM_EXTERN void im_client_event_free(im_client_event *ev);

/* The driver's monotonic clock in milliseconds, as passed to the client. */
IM_EXTERN uint64_t im_client_event_now(void);

#ifdef __cplusplus
}
#endif
#endif
