/* The WebSocket upgrade request of the engine benches (room-flood,
 * room-fanout): uid u<i>, any token (the engine's default on_auth accepts
 * it), auth in the query, IMP JSON. Public API only. */
#ifndef BENCH_WS_UPGRADE_H
#define BENCH_WS_UPGRADE_H

#include <libim/im.h>
#include <stdio.h>
#include <string.h>

/* Accept a WebSocket connection with io_ctx and feed it the upgrade of user
 * u<i>: authenticated once this returns. 0 when the engine refused it. */
static im_conn_id bench_ws_open(im_server *srv, size_t i, void *io_ctx) {
  char req[256];
  int n = snprintf(req, sizeof req,
                   "GET /ws?uid=u%zu&token=t HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                   "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                   "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: imp.json\r\n\r\n",
                   i);
  im_conn_id c = im_server_accept(srv, IM_TRANSPORT_WS, "127.0.0.1:1", io_ctx);
  if (!c || im_server_feed(srv, c, req, (size_t)n) != 0) return 0;
  return c;
}

#endif
