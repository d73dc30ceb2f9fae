/* RFC 6455 §4 server handshake: an HTTP/1.1 upgrade request parsed with
 * llhttp, and the 101 / error responses. Sans-I/O: feed bytes, read the
 * verdict, write the response into a caller buffer. */
#ifndef IM_PROTO_WS_HANDSHAKE_H
#define IM_PROTO_WS_HANDSHAKE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define WS_HS_MAX_REQUEST 8192   /* request line + headers */

enum ws_hs_status {
  WS_HS_MORE = 0,        /* need more bytes */
  WS_HS_DONE = 1,        /* a valid upgrade request; fields are filled */
  WS_HS_FAIL = -1        /* reject: send ws_hs_error_response(http_status) */
};

enum ws_subproto { WS_SUB_JSON = 0, WS_SUB_BIN = 1 };

typedef struct ws_handshake ws_handshake;  /* opaque, ~200 bytes + llhttp_t */

typedef struct ws_hs_result {
  int http_status;          /* on WS_HS_FAIL: 400, 404, 405, 426, 431 ... */
  const char *reason;       /* static text for logs/body */
  char accept[29];          /* Sec-WebSocket-Accept value, NUL-terminated */
  uint8_t subproto;         /* enum ws_subproto chosen ("imp.json" when none offered) */
  bool subproto_offered;    /* the client offered `subproto` in Sec-WebSocket-Protocol, so the
                               101 echoes it; false when it offered none or only unknown ones */
  /* Query parameters from the request target (percent-decoded, NUL-terminated,
   * NULL when absent). Point into the handshake object; valid until ws_hs_free. */
  const char *uid, *token, *device, *platform;
  const char *path;          /* request path without query */
  size_t consumed;           /* bytes of the fed input that belong to the request */
} ws_hs_result;

/* Create a handshake parser. `path` is the required request path, copied
 * (NULL: any path). Returns NULL on allocation failure. */
ws_handshake *ws_hs_new(const char *path);
void ws_hs_free(ws_handshake *hs);

/* Feed request bytes. May be called repeatedly with successive pieces.
 * Returns WS_HS_MORE, WS_HS_DONE or WS_HS_FAIL; *res is filled on DONE/FAIL.
 * On DONE, res->consumed is the number of bytes of *this* piece that
 * belonged to the request; the rest are WebSocket frames.
 * Rules: method GET (405 otherwise), HTTP/1.1 or later, exactly one Host,
 * Upgrade: websocket and Connection containing "upgrade" (400),
 * Sec-WebSocket-Key decoding to 16 bytes (400), Sec-WebSocket-Version 13
 * (426 otherwise), path match (404), request > WS_HS_MAX_REQUEST (431),
 * no body (400), valid %-escapes and no repeated uid/token/device/platform
 * in the query (400); out of memory gives 503. On FAIL only http_status and
 * reason are set. Once DONE or FAIL, later calls repeat it with consumed 0. */
int ws_hs_feed(ws_handshake *hs, const uint8_t *p, size_t n, ws_hs_result *res);

/* Compute Sec-WebSocket-Accept for a key (SHA-1 via mbedTLS, then base64).
 * `out` gets 28 chars + NUL. Returns 0, or -1 if key_len is over 64. */
int ws_hs_accept_key(const char *key, size_t key_len, char out[29]);

/* Write the 101 response for res into out. Returns the length needed
 * (like snprintf). */
size_t ws_hs_accept_response(const ws_hs_result *res, char *out, size_t cap);

/* Write an error response: status line, Content-Type: text/plain,
 * Content-Length, Connection: close, for 426 "Sec-WebSocket-Version: 13",
 * for 405 "Allow: GET" (RFC 9110 §15.5.6), and the body "<reason>\n"
 * (reason NULL: the reason phrase). Returns the length needed (like snprintf). */
size_t ws_hs_error_response(int http_status, const char *reason, char *out, size_t cap);

/* ---- client side (lib/client) ------------------------------------------ */

/* The Sec-WebSocket-Key for a 16-byte random nonce: 24 base64 chars + NUL.
 * Returns 0, or -1 (never with a 25-byte key buffer). */
int ws_hs_client_key(const uint8_t nonce[16], char key[25]);

/* Write the client's upgrade request: GET target, Host, Upgrade,
 * Connection, Sec-WebSocket-Key, Sec-WebSocket-Protocol (when protocol is
 * not NULL) and Sec-WebSocket-Version 13. Returns the length needed (like
 * snprintf). */
size_t ws_hs_client_request(const char *host, const char *target, const char *key,
                            const char *protocol, char *out, size_t cap);

typedef struct ws_hs_reply {
  int http_status;      /* the server's status (0 when the head is malformed) */
  const char *reason;   /* static text on WS_HS_FAIL */
  uint8_t subproto;     /* enum ws_subproto the server chose */
  bool subproto_set;    /* the server sent Sec-WebSocket-Protocol */
} ws_hs_reply;

/* Check the server's answer to a request sent with `key` (NUL-terminated);
 * p[0..n) is everything received so far. Returns the length of the
 * response head (> 0) when it accepts the upgrade (bytes after it are
 * frames); WS_HS_MORE (0) when more bytes are needed; WS_HS_FAIL (-1) when
 * the status is not 101, Upgrade/Connection are missing, the
 * Sec-WebSocket-Accept is not base64(SHA-1(key + GUID)), the subprotocol is
 * not imp.json/imp.bin, or no complete head arrives within
 * WS_HS_MAX_REQUEST bytes (r->http_status and r->reason say which). */
long ws_hs_client_response(const char *p, size_t n, const char *key, ws_hs_reply *r);

#endif
