/* The IMP dispatcher (dispatch.c): one decoded op of a connection to its
 * handler or callback. */
#ifndef IM_CORE_DISPATCH_H
#define IM_CORE_DISPATCH_H

#include "core/engine.h"

/* One complete application message (a WebSocket message or TCP frame body):
 * decode it (binary IMP or JSON) and dispatch the op. */
void dispatch_message(im_server *s, im_conn *c, bool binary, const uint8_t *p, size_t n);

#endif
