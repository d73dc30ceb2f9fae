/* The input parsers of a connection's byte stream: the WebSocket upgrade
 * and frames (ws_input.c) and IMP/TCP frames (tcp_input.c). Each takes
 * what forms whole units and returns the bytes consumed. */
#ifndef IM_CORE_WIRE_IN_H
#define IM_CORE_WIRE_IN_H

#include "core/engine.h"

size_t ws_in_handshake(im_server *s, im_conn *c, uint8_t *p, size_t n);
size_t ws_in_frames(im_server *s, im_conn *c, uint8_t *p, size_t n);
size_t tcp_in_frames(im_server *s, im_conn *c, uint8_t *p, size_t n);

#endif
