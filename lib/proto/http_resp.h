/* The head of an HTTP/1.x response (status line + header lines), read
 * without allocation. Used by the client side: the WebSocket upgrade answer
 * (ws_handshake.c) and the gateway-list fetch (lib/client). */
#ifndef IM_PROTO_HTTP_RESP_H
#define IM_PROTO_HTTP_RESP_H

#include <stdbool.h>
#include <stddef.h>
#include <string.h>

typedef struct http_hdr {
  const char *name, *value; /* value without surrounding spaces/tabs */
  size_t name_len, value_len;
} http_hdr;

/* Look at p[0..n), everything received so far. Returns the length of the
 * head, blank line included, when it is complete; 0 when more bytes are
 * needed; -1 when it is not "HTTP/1.x NNN ..." or no blank line comes
 * within max bytes. *status gets the status code when complete. */
long http_resp_head(const char *p, size_t n, size_t max, int *status);

/* Header lines of a complete head of length head_len: start with
 * *cur = p (the head's first byte); each call fills *h with the next
 * header and returns true, or returns false after the last one. Lines
 * without a colon are skipped. */
bool http_resp_next_header(const char **cur, const char *p, size_t head_len, http_hdr *h);

/* Case-insensitive compare of s[0..len) with a lower-case name of
 * lower_len bytes (use http_name_is). */
bool http_name_eq(const char *s, size_t len, const char *lower, size_t lower_len);

/* Case-insensitive compare of s[0..len) with a lower-case NUL-terminated
 * name. Inline so that the name's length is known where it is a literal
 * and names of another length cost no loop (several headers share the
 * 14 bytes of "sec-websocket-"). */
static inline bool http_name_is(const char *s, size_t len, const char *lower) {
  size_t n = strlen(lower);
  return len == n && http_name_eq(s, len, lower, n);
}

#endif
