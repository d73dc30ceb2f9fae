/* A small HTTP/1.1 server for imd's business API, on one libevent base.
 *
 * Requests are parsed with llhttp and handed, complete and in arrival order,
 * to one handler, which answers at once or defers its answer (see
 * http_response_defer); answers are queued and written (through libim's
 * im_stream: a plain socket or TLS) in request order. Keep-alive and
 * pipelining are supported; upgrades, trailers and response streaming are
 * not. Every response carries Content-Type, Content-Length (except 204 and
 * 304) and Connection, plus the handler's extra headers
 * (http_response.headers). Failures the server
 * detects itself are answered with a JSON body {"error":"..."} and the
 * connection is closed after it:
 *   400 malformed request ("bad request: <llhttp's reason>"),
 *   413 body over max_body (refused from Content-Length or, for a chunked
 *       body, as soon as the received size passes it),
 *   417 an Expect other than 100-continue,
 *   431 request line and headers over max_header.
 *
 * Not thread-safe: every function, and the handler, runs on the thread that
 * runs the event base.
 */
#ifndef IMD_HTTP_SERVER_H
#define IMD_HTTP_SERVER_H

#include <stdbool.h>
#include <libim/im_tls.h>
#include <stddef.h>
#include <stdint.h>

struct event_base;

typedef struct http_server http_server;

/* One request, as the handler sees it. Every pointer is owned by the server
 * and valid only during the handler call; copy what must outlive it. */
typedef struct http_request {
  int method;                /* llhttp_method_t: HTTP_GET, HTTP_POST, ...;
                                HEAD is passed as HTTP_HEAD (see below) */
  const char *path;          /* request target up to '?' or '#', not
                                percent-decoded, not NUL-terminated */
  size_t path_len;
  const char *query;         /* after '?' up to '#', not NUL-terminated; NULL
                                when the target has no '?' */
  size_t query_len;
  const char *authorization; /* Authorization value, NUL-terminated, without
                                surrounding whitespace; NULL if absent */
  const char *content_type;  /* likewise for Content-Type */
  const char *if_none_match; /* likewise for If-None-Match */
  const char *body;          /* the whole (de-chunked) body followed by a
                                NUL; "" when there is none, never NULL */
  size_t body_len;
  const char *peer;          /* "ip:port", "[ipv6]:port" */
} http_request;

/* The handler's answer. The server zeroes it before the call. Ignored (and
 * a body set in it freed) once the handler called http_response_defer(). */
typedef struct http_response {
  int status;               /* 200..599; anything else becomes a 500 with
                               the body replaced by {"error":"internal error"} */
  const char *content_type; /* NULL: "application/json". Borrowed: must stay
                               valid after the handler returns (use a string
                               literal); one containing CR or LF is replaced
                               by the default */
  char *body;               /* NULL or malloc()ed by the handler; ownership
                               passes to the server, which free()s it once
                               written (or on close) */
  size_t body_len;
  char headers[256];        /* extra header lines written by the handler,
                               each "Name: value\r\n" (ETag, say); "" for
                               none. Sent only if every line has that form
                               (a token name, no other CR or LF), else all
                               are dropped. Not used by deferred answers */
} http_response;

/* Called once per complete request, in the order requests arrive on each
 * connection. Must not block. It may call http_server_free() on its own
 * server: the server is then destroyed once the handler returns and this
 * response is never sent.
 *
 * For HEAD, the server sends the status line and headers the handler asks
 * for (Content-Length of its body included) and drops the body, so a handler
 * that serves HEAD like GET gives a correct answer. This holds for deferred
 * answers too, as do the rules on status and content_type above. */
typedef void (*http_handler)(void *user, const http_request *req, http_response *resp);

/* ---- deferred answers ----
 *
 * A handler that cannot answer before it returns (imd answers POST
 * /v1/messages after a group commit) takes a ticket instead, returns, and
 * later answers with http_server_respond() from the event-loop thread, while
 * the server goes on serving this and other connections.
 *
 * Order: answers go out in request order on each connection. Later
 * pipelined requests are still parsed and handed to the handler; their
 * answers, deferred or not, are held until every earlier one is sent (a
 * 100 Continue for a later request too).
 * Back-pressure: at http_limits.max_deferred unanswered tickets on one
 * connection the server stops reading from it, and reads on once an answer
 * comes; this is no error.
 * Idle timeout: it does not run while a connection has a ticket outstanding;
 * it starts again, from zero, when the last one is answered.
 * Connection end: a connection that fails (reset by the client, a socket
 * error, the server out of memory) voids its tickets at once. A client
 * that only shuts down its sending side (FIN) still gets the answers to the
 * requests it sent, as with synchronous answers, so its tickets stay valid
 * until answered; the connection is closed after the last one. A request
 * with "Connection: close" (or HTTP/1.0 without keep-alive) is the last one
 * read; the connection closes after its deferred answer is sent.
 * http_server_free() voids every ticket. */

/* Call only from the handler, with the resp it was passed. Takes a ticket
 * for the request being handled: the fields of resp are then ignored (a body
 * set in it is freed) and the request is answered by http_server_respond().
 * Calling it again in the same handler call returns the same ticket.
 *
 * Returns the ticket, never 0; or 0 when memory ran out (or the server holds
 * 2^24 tickets already): nothing is deferred then and the handler answers
 * through resp as usual (503, say). */
uint64_t http_response_defer(http_response *resp);

/* Answers the request of ticket, on the event-loop thread, inside or outside
 * a handler. status, content_type, body and body_len follow the rules of
 * http_response: status outside 200..599 gives a 500 {"error":"internal
 * error"}; content_type NULL or with CR or LF gives "application/json", and is
 * borrowed for the call only; body is NULL or malloc()ed, and ownership passes
 * to the server in every case: it is freed, unsent, when the ticket is stale.
 * Nothing is written and the handler is never called from inside this call:
 * the answer is queued, and the connection is served from the event loop
 * once the current callback returns.
 *
 * Returns 0 when the answer was taken (it is sent unless the connection fails
 * first); -1, having freed body, when the ticket is unknown: 0, already
 * answered, its connection gone, or s NULL or being freed from inside the
 * handler. A ticket is never confused with another, even of a connection
 * that took over its memory, until its internal slot has been reused 2^40
 * times.
 *
 * s must be live: after http_server_free(s) the application must drop its
 * tickets and not call this with s. */
int http_server_respond(http_server *s, uint64_t ticket, int status, const char *content_type,
                        char *body, size_t body_len);

/* Per-server limits; a field left 0 takes its default. */
typedef struct http_limits {
  size_t max_body;          /* bytes of (de-chunked) body; default 1 MiB */
  size_t max_header;        /* bytes of request line and headers, about as
                               sent; default 16 KiB */
  unsigned idle_timeout_ms; /* a connection with no byte read or written for
                               this long is closed; default 60000 */
  unsigned header_timeout_ms; /* a request's line and headers must be in this
                               long after its first byte, however slowly
                               bytes trickle in (slowloris); default 10000 */
  unsigned body_timeout_ms; /* and its body this long after the headers;
                               default 30000 */
  unsigned max_conns;       /* connections beyond this are accepted and closed
                               at once; default 10000 */
  unsigned max_deferred;    /* unanswered tickets per connection at which the
                               server stops reading from it until one is
                               answered; default 64 */
  /* Optional, called (with the server's user pointer) once a request's
   * headers are in, with its Authorization value (NULL when absent). When
   * it returns false the body is read and thrown away instead of buffered,
   * and the handler gets the request with an empty body (to refuse it): a
   * client without credentials cannot make the server hold max_body bytes
   * per connection. NULL: every body is buffered. */
  bool (*admit)(void *user, const char *authorization);
  /* true: listen with SO_REUSEPORT (im_listener_new_shared), so that one
   * server per worker thread shares the port. */
  bool reuseport;
} http_limits;

#define HTTP_DEFAULT_MAX_BODY ((size_t)1 << 20)
#define HTTP_DEFAULT_MAX_HEADER ((size_t)16 << 10)
#define HTTP_DEFAULT_IDLE_TIMEOUT_MS 60000u
#define HTTP_DEFAULT_HEADER_TIMEOUT_MS 10000u
#define HTTP_DEFAULT_BODY_TIMEOUT_MS 30000u
#define HTTP_DEFAULT_MAX_CONNS 10000u
#define HTTP_DEFAULT_MAX_DEFERRED 64u

/* Listens on addr and serves requests on base with h.
 *
 * base: borrowed; must outlive the server.
 * addr: "IPV4:PORT" or "[IPV6]:PORT", numeric; port 0 lets the kernel pick
 *   (see http_server_port). "0.0.0.0:PORT" or "[::]:PORT" for every address.
 *   Borrowed for the call.
 * lim: copied; NULL for all defaults.
 * h: required. user: passed to h as is, never freed.
 *
 * Returns the server, or NULL when base or h is NULL, addr does not parse,
 * the bind or listen failed (errno is kept), or memory ran out. */
http_server *http_server_new(struct event_base *base, const char *addr, const http_limits *lim,
                             http_handler h, void *user);

/* As http_server_new, serving HTTPS when tls is not NULL (borrowed: it must
 * outlive the server; im_tls_reload on it is fine at any time). Each
 * connection's TLS handshake runs in the loop without blocking; one that
 * fails or does not finish within im_tls_handshake_timeout() costs that
 * connection only (no HTTP answer: there is no channel for one). Sockets,
 * addresses and TLS come from libim's <libim/im_net.h>, shared with the
 * WebSocket and TCP listeners. */
http_server *http_server_new_tls(struct event_base *base, const char *addr,
                                 const http_limits *lim, im_tls *tls, http_handler h,
                                 void *user);

/* ---- answered requests ----
 *
 * What the server reports once a request the handler saw has its answer:
 * right after the handler returns, or when http_server_respond() gives a
 * deferred one (a ticket voided by a failed connection is not reported).
 * method and path are as in http_request, the path of a deferred request cut
 * to its first HTTP_DONE_PATH_MAX bytes; peer is the client's address;
 * status is the one queued (500 for a status outside 200..599). Pointers are
 * valid during the call only. Failures the server answers itself (400, 413,
 * 417, 431) are not reported. imd counts statuses and writes its access log
 * here, so a deferred answer is logged with the status it got. */
#define HTTP_DONE_PATH_MAX 128

typedef struct http_done {
  int method;
  const char *path; /* not NUL-terminated */
  size_t path_len;
  const char *peer;
  int status;
} http_done;

typedef void (*http_done_fn)(void *user, const http_done *d);

/* Sets the function (NULL: none) called, with the handler's user, for each
 * answered request. */
void http_server_set_done(http_server *s, http_done_fn fn);

/* Returns the port the server listens on, or -1 if it cannot be read. */
int http_server_port(const http_server *s);

/* Closes the listener and every connection at once (queued responses are
 * dropped, outstanding tickets voided) and frees the server, including the
 * response bodies it owns. NULL is a no-op. Called from inside the handler,
 * the teardown is deferred until the handler returns; http_server_respond()
 * returns -1 meanwhile. Afterwards s is gone: do not pass it to
 * http_server_respond() (drop the tickets). */
void http_server_free(http_server *s);

/* v in decimal, NUL-terminated, written at the end of buf (21 bytes hold
 * any uint64_t); returns where it starts in buf. For answers built without
 * printf on hot paths. */
const char *http_fmt_uint(char buf[static 21], uint64_t v);

#endif
