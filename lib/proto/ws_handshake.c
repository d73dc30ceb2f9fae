/* RFC 6455 §4.2 server handshake: llhttp does the HTTP/1.1 syntax, this file
 * keeps only the request target and the few header values the handshake
 * needs, then judges them once the headers are complete. */
#include "proto/ws_handshake.h"
#include "proto/base64.h"
#include "proto/writer.h"

#include "proto/http_resp.h"

#include <llhttp.h>
#include <mbedtls/sha1.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define WS_GUID "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#define WS_GUID_LEN (sizeof WS_GUID - 1)
#define WS_KEY_B64_LEN 24 /* base64 of the 16-byte nonce */
#define WS_KEY_MAX 64     /* longest key ws_hs_accept_key hashes */
#define HDR_NAME_MAX 24   /* longer than any header name we look for */

enum hdr_id { H_OTHER, H_HOST, H_UPGRADE, H_CONNECTION, H_KEY, H_VERSION, H_PROTOCOL };

struct ws_handshake {
  llhttp_t parser;
  ws_hs_result res; /* the verdict, kept so that later feeds repeat it */
  int status;       /* enum ws_hs_status */
  size_t fed;       /* bytes handed to llhttp so far */
  /* The request target, followed while a wanted header is being read by
   * that header's value; the query is later decoded in place. */
  char *buf;
  size_t buf_len, buf_cap, url_len;
  char name[HDR_NAME_MAX];
  uint8_t name_len;
  uint8_t cur; /* enum hdr_id of the header being read */
  uint8_t hosts, keys, versions;
  int8_t subproto; /* enum ws_subproto, -1 until the client offers one we speak */
  bool name_too_long, upgrade_ws, conn_upgrade, version_ok, key_ok, has_body, oom;
  bool any_path;
  char path[]; /* the required path */
};

static bool is_ows(char c) { return c == ' ' || c == '\t'; }

static void trim_ows(const char **a, const char **b) {
  while (*a < *b && is_ows(**a))
    (*a)++;
  while (*b > *a && is_ows((*b)[-1]))
    (*b)--;
}

/* Next non-empty element of an HTTP comma list (RFC 7230 §7), OWS trimmed. */
static bool list_next(const char **cur, const char *end, const char **tok, size_t *len) {
  while (*cur < end) {
    const char *sep = memchr(*cur, ',', (size_t)(end - *cur));
    const char *a = *cur, *b = sep ? sep : end;
    *cur = sep ? sep + 1 : end;
    trim_ows(&a, &b);
    if (a < b) {
      *tok = a;
      *len = (size_t)(b - a);
      return true;
    }
  }
  return false;
}

/* Keeps one spare byte so the target can be NUL-terminated without growing. */
static int buf_append(ws_handshake *hs, const char *at, size_t len) {
  if (hs->buf_cap - hs->buf_len <= len) {
    size_t cap = hs->buf_cap ? hs->buf_cap * 2 : 256;
    while (cap - hs->buf_len <= len)
      cap *= 2;
    char *nb = realloc(hs->buf, cap);
    if (!nb) {
      hs->oom = true;
      return -1;
    }
    hs->buf = nb;
    hs->buf_cap = cap;
  }
  memcpy(hs->buf + hs->buf_len, at, len);
  hs->buf_len += len;
  return 0;
}

static int on_url(llhttp_t *p, const char *at, size_t len) {
  return buf_append(p->data, at, len);
}

static int on_url_complete(llhttp_t *p) {
  ws_handshake *hs = p->data;
  if (!hs->buf && buf_append(hs, "", 0) != 0)
    return -1;
  hs->url_len = hs->buf_len;
  return 0;
}

static int on_header_field(llhttp_t *p, const char *at, size_t len) {
  ws_handshake *hs = p->data;
  if (hs->name_too_long || len > sizeof hs->name - hs->name_len) {
    hs->name_too_long = true;
    return 0;
  }
  memcpy(hs->name + hs->name_len, at, len);
  hs->name_len = (uint8_t)(hs->name_len + len);
  return 0;
}

static int on_header_field_complete(llhttp_t *p) {
  ws_handshake *hs = p->data;
  const char *n = hs->name;
  size_t len = hs->name_too_long ? 0 : hs->name_len;
  hs->cur = H_OTHER;
  if (http_name_is(n, len, "host")) {
    hs->cur = H_HOST;
    hs->hosts++;
  } else if (http_name_is(n, len, "upgrade")) {
    hs->cur = H_UPGRADE;
  } else if (http_name_is(n, len, "connection")) {
    hs->cur = H_CONNECTION;
  } else if (http_name_is(n, len, "sec-websocket-key")) {
    hs->cur = H_KEY;
    hs->keys++;
  } else if (http_name_is(n, len, "sec-websocket-version")) {
    hs->cur = H_VERSION;
    hs->versions++;
  } else if (http_name_is(n, len, "sec-websocket-protocol")) {
    hs->cur = H_PROTOCOL;
  }
  hs->name_len = 0;
  hs->name_too_long = false;
  return 0;
}

static int on_header_value(llhttp_t *p, const char *at, size_t len) {
  ws_handshake *hs = p->data;
  if (hs->cur == H_OTHER || hs->cur == H_HOST)
    return 0;
  return buf_append(hs, at, len);
}

static bool is_b64(char c) {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '+' ||
         c == '/';
}

/* The key must be the base64 of 16 bytes (RFC 6455 4.2.1): 22 characters
 * of the alphabet and "==". */
static void take_key(ws_handshake *hs, const char *v, size_t len) {
  bool ok = len == WS_KEY_B64_LEN && v[22] == '=' && v[23] == '=';
  for (size_t i = 0; ok && i < 22; i++) ok = is_b64(v[i]);
  hs->key_ok = ok && ws_hs_accept_key(v, len, hs->res.accept) == 0;
}

static void take_protocols(ws_handshake *hs, const char *v, const char *end) {
  const char *tok;
  size_t len;
  while (hs->subproto < 0 && list_next(&v, end, &tok, &len)) {
    /* Subprotocol names are compared exactly (RFC 6455 §4.1). */
    if (len == 8 && memcmp(tok, "imp.json", 8) == 0)
      hs->subproto = WS_SUB_JSON;
    else if (len == 7 && memcmp(tok, "imp.bin", 7) == 0)
      hs->subproto = WS_SUB_BIN;
  }
}

static bool list_has(const char *v, const char *end, const char *lower) {
  const char *tok;
  size_t len;
  while (list_next(&v, end, &tok, &len))
    if (http_name_is(tok, len, lower))
      return true;
  return false;
}

static int on_header_value_complete(llhttp_t *p) {
  ws_handshake *hs = p->data;
  const char *v = hs->buf ? hs->buf + hs->url_len : "";
  const char *end = hs->buf ? hs->buf + hs->buf_len : v;
  trim_ows(&v, &end);
  size_t len = (size_t)(end - v);
  switch (hs->cur) {
  case H_UPGRADE:
    hs->upgrade_ws = hs->upgrade_ws || list_has(v, end, "websocket");
    break;
  case H_CONNECTION:
    hs->conn_upgrade = hs->conn_upgrade || list_has(v, end, "upgrade");
    break;
  case H_KEY:
    take_key(hs, v, len);
    break;
  case H_VERSION:
    hs->version_ok = len == 2 && memcmp(v, "13", 2) == 0;
    break;
  case H_PROTOCOL:
    take_protocols(hs, v, end);
    break;
  default:
    break;
  }
  hs->buf_len = hs->url_len;
  hs->cur = H_OTHER;
  return 0;
}

static int hex_digit(char c) {
  if (c >= '0' && c <= '9')
    return c - '0';
  if (c >= 'a' && c <= 'f')
    return c - 'a' + 10;
  if (c >= 'A' && c <= 'F')
    return c - 'A' + 10;
  return -1;
}

/* Form-decodes s[0..len) in place and NUL-terminates it. %00 is refused so
 * that a value cannot carry a hidden tail past its C-string end. */
static bool form_decode(char *s, size_t len) {
  size_t o = 0;
  for (size_t i = 0; i < len; i++) {
    char c = s[i];
    if (c == '+') {
      c = ' ';
    } else if (c == '%') {
      int hi = len - i >= 3 ? hex_digit(s[i + 1]) : -1;
      int lo = len - i >= 3 ? hex_digit(s[i + 2]) : -1;
      if (hi < 0 || lo < 0 || (hi | lo) == 0)
        return false;
      c = (char)(hi << 4 | lo);
      i += 2;
    }
    s[o++] = c;
  }
  s[o] = '\0';
  return true;
}

static const char **query_slot(ws_hs_result *r, const char *key) {
  if (strcmp(key, "uid") == 0)
    return &r->uid;
  if (strcmp(key, "token") == 0)
    return &r->token;
  if (strcmp(key, "device") == 0)
    return &r->device;
  if (strcmp(key, "platform") == 0)
    return &r->platform;
  return NULL;
}

/* q[0..len) is the query after '?'. A repeated parameter is refused rather
 * than letting a proxy and libim each pick a different copy. */
static bool parse_query(ws_hs_result *r, char *q, size_t len) {
  char *end = q + len;
  while (q < end) {
    char *amp = memchr(q, '&', (size_t)(end - q));
    char *seg_end = amp ? amp : end;
    char *eq = memchr(q, '=', (size_t)(seg_end - q));
    char *key = q, *val = eq ? eq + 1 : seg_end;
    size_t klen = (size_t)((eq ? eq : seg_end) - key);
    size_t vlen = (size_t)(seg_end - val);
    q = amp ? amp + 1 : end;
    if (klen == 0 && vlen == 0)
      continue;
    if (!form_decode(val, vlen) || !form_decode(key, klen))
      return false;
    const char **slot = query_slot(r, key);
    if (!slot)
      continue;
    if (*slot)
      return false;
    *slot = val;
  }
  return true;
}

static void fail(ws_handshake *hs, int http_status, const char *reason) {
  hs->status = WS_HS_FAIL;
  memset(&hs->res, 0, sizeof hs->res);
  hs->res.http_status = http_status;
  hs->res.reason = reason;
}

/* Returns 0 when the request is a valid upgrade, else the HTTP status to
 * refuse it with (and *reason). Fills the query fields of hs->res. */
static int judge(ws_handshake *hs, const char **reason) {
  llhttp_t *p = &hs->parser;
  if (p->method != HTTP_GET)
    return *reason = "only GET can open a WebSocket", 405;
  if (p->http_major < 1 || (p->http_major == 1 && p->http_minor < 1))
    return *reason = "HTTP/1.1 or later required", 400;
  if (hs->has_body)
    return *reason = "a handshake request has no body", 400;
  char *target = hs->buf;
  if (hs->url_len == 0 || target[0] != '/')
    return *reason = "request target must be an absolute path", 400;
  target[hs->url_len] = '\0';
  char *query = memchr(target, '?', hs->url_len);
  size_t path_len = query ? (size_t)(query - target) : hs->url_len;
  if (query)
    *query++ = '\0';
  if (!hs->any_path && (path_len != strlen(hs->path) || memcmp(target, hs->path, path_len) != 0))
    return *reason = "no WebSocket endpoint at this path", 404;
  if (hs->hosts != 1)
    return *reason = "exactly one Host header required", 400;
  if (!hs->upgrade_ws)
    return *reason = "Upgrade: websocket required", 400;
  if (!hs->conn_upgrade)
    return *reason = "Connection: Upgrade required", 400;
  if (hs->versions != 1 || !hs->version_ok)
    return *reason = "Sec-WebSocket-Version 13 required", 426;
  if (hs->keys != 1 || !hs->key_ok)
    return *reason = "bad Sec-WebSocket-Key", 400;
  if (query && !parse_query(&hs->res, query, hs->url_len - path_len - 1))
    return *reason = "bad query string", 400;
  hs->res.path = target;
  return 0;
}

static int on_headers_complete(llhttp_t *p) {
  ws_handshake *hs = p->data;
  const char *reason = NULL;
  hs->has_body = (p->flags & (F_CHUNKED | F_TRANSFER_ENCODING)) ||
                 ((p->flags & F_CONTENT_LENGTH) && p->content_length > 0);
  int refuse = judge(hs, &reason);
  if (refuse) {
    fail(hs, refuse, reason);
  } else {
    hs->status = WS_HS_DONE;
    hs->res.http_status = 101;
    hs->res.reason = "Switching Protocols";
    hs->res.subproto = hs->subproto < 0 ? WS_SUB_JSON : (uint8_t)hs->subproto;
    hs->res.subproto_offered = hs->subproto >= 0;
  }
  return 2; /* stop here whatever the verdict: llhttp reports HPE_PAUSED_UPGRADE */
}

/* Shared by every parser and never written, so no init call is needed. */
static const llhttp_settings_t hs_settings = {
  .on_url = on_url,
  .on_url_complete = on_url_complete,
  .on_header_field = on_header_field,
  .on_header_field_complete = on_header_field_complete,
  .on_header_value = on_header_value,
  .on_header_value_complete = on_header_value_complete,
  .on_headers_complete = on_headers_complete,
};

ws_handshake *ws_hs_new(const char *path) {
  size_t plen = path ? strlen(path) : 0;
  ws_handshake *hs = malloc(sizeof *hs + plen + 1);
  if (!hs)
    return NULL;
  memset(hs, 0, sizeof *hs);
  llhttp_init(&hs->parser, HTTP_REQUEST, &hs_settings);
  hs->parser.data = hs;
  hs->status = WS_HS_MORE;
  hs->subproto = -1;
  hs->any_path = path == NULL;
  if (path)
    memcpy(hs->path, path, plen);
  hs->path[plen] = '\0';
  return hs;
}

void ws_hs_free(ws_handshake *hs) {
  if (!hs)
    return;
  free(hs->buf);
  free(hs);
}

int ws_hs_feed(ws_handshake *hs, const uint8_t *p, size_t n, ws_hs_result *res) {
  if (hs->status != WS_HS_MORE) {
    *res = hs->res;
    res->consumed = 0;
    return hs->status;
  }
  if (n == 0)
    return WS_HS_MORE;
  /* Never hand llhttp more than the size limit allows in total. */
  size_t take = n < WS_HS_MAX_REQUEST - hs->fed ? n : WS_HS_MAX_REQUEST - hs->fed;
  llhttp_errno_t err = llhttp_execute(&hs->parser, (const char *)p, take);
  if (err == HPE_OK) {
    hs->fed += take;
    if (hs->fed < WS_HS_MAX_REQUEST)
      return WS_HS_MORE;
    fail(hs, 431, "request headers too large");
  } else if (err == HPE_PAUSED_UPGRADE && hs->status != WS_HS_MORE) {
    size_t used = (size_t)(llhttp_get_error_pos(&hs->parser) - (const char *)p);
    hs->fed += used;
    if (hs->status == WS_HS_DONE)
      hs->res.consumed = used;
  } else if (hs->oom) {
    fail(hs, 503, "out of memory");
  } else {
    fail(hs, 400, "malformed HTTP request");
  }
  *res = hs->res;
  return hs->status;
}

int ws_hs_accept_key(const char *key, size_t key_len, char out[29]) {
  unsigned char input[WS_KEY_MAX + WS_GUID_LEN];
  unsigned char digest[20];
  if (key_len > WS_KEY_MAX)
    return -1;
  memcpy(input, key, key_len);
  memcpy(input + key_len, WS_GUID, WS_GUID_LEN);
  if (mbedtls_sha1_ret(input, key_len + WS_GUID_LEN, digest) != 0)
    return -1;
  b64_encode(digest, sizeof digest, out, false);
  return 0;
}

static size_t snprintf_len(int n) { return n < 0 ? 0 : (size_t)n; }

size_t ws_hs_accept_response(const ws_hs_result *res, char *out, size_t cap) {
  writer w = {out, cap, 0};
  put_str(&w, "HTTP/1.1 101 Switching Protocols\r\n"
              "Upgrade: websocket\r\n"
              "Connection: Upgrade\r\n"
              "Sec-WebSocket-Accept: ");
  put_str(&w, res->accept);
  if (res->subproto_offered) {
    put_str(&w, "\r\nSec-WebSocket-Protocol: ");
    put_str(&w, res->subproto == WS_SUB_BIN ? "imp.bin" : "imp.json");
  }
  put_str(&w, "\r\n\r\n");
  return put_end(&w);
}

static const char *reason_phrase(int http_status) {
  switch (http_status) {
  case 400: return "Bad Request";
  case 403: return "Forbidden";
  case 404: return "Not Found";
  case 405: return "Method Not Allowed";
  case 426: return "Upgrade Required";
  case 431: return "Request Header Fields Too Large";
  case 500: return "Internal Server Error";
  case 503: return "Service Unavailable";
  default: return "Error";
  }
}

size_t ws_hs_error_response(int http_status, const char *reason, char *out, size_t cap) {
  const char *phrase = reason_phrase(http_status);
  const char *body = reason ? reason : phrase;
  const char *extra = http_status == 426   ? "Sec-WebSocket-Version: 13\r\n"
                      : http_status == 405 ? "Allow: GET\r\n"
                                           : "";
  int n = snprintf(out, cap,
                   "HTTP/1.1 %d %s\r\n"
                   "Content-Type: text/plain\r\n"
                   "Content-Length: %zu\r\n"
                   "Connection: close\r\n"
                   "%s"
                   "\r\n"
                   "%s\n",
                   http_status, phrase, strlen(body) + 1, extra, body);
  return snprintf_len(n);
}

/* ---- client side -------------------------------------------------------- */

int ws_hs_client_key(const uint8_t nonce[16], char key[25]) {
  b64_encode(nonce, 16, key, false);
  return 0;
}

size_t ws_hs_client_request(const char *host, const char *target, const char *key,
                            const char *protocol, char *out, size_t cap) {
  int n = snprintf(out, cap,
                   "GET %s HTTP/1.1\r\n"
                   "Host: %s\r\n"
                   "Upgrade: websocket\r\n"
                   "Connection: Upgrade\r\n"
                   "Sec-WebSocket-Key: %s\r\n"
                   "%s%s%s"
                   "Sec-WebSocket-Version: 13\r\n"
                   "\r\n",
                   target, host, key, protocol ? "Sec-WebSocket-Protocol: " : "",
                   protocol ? protocol : "", protocol ? "\r\n" : "");
  return snprintf_len(n);
}

static long reply_fail(ws_hs_reply *r, int status, const char *reason) {
  r->http_status = status;
  r->reason = reason;
  return WS_HS_FAIL;
}

long ws_hs_client_response(const char *p, size_t n, const char *key, ws_hs_reply *r) {
  memset(r, 0, sizeof *r);
  int status = 0;
  long head = http_resp_head(p, n, WS_HS_MAX_REQUEST, &status);
  if (head == 0)
    return WS_HS_MORE;
  if (head < 0)
    return reply_fail(r, 0, "malformed upgrade response");
  if (status != 101)
    return reply_fail(r, status, "upgrade refused");
  char want[29];
  if (ws_hs_accept_key(key, strlen(key), want) != 0)
    return reply_fail(r, 101, "bad Sec-WebSocket-Key");
  bool upgrade = false, conn = false, accept = false, proto_bad = false;
  const char *cur = p;
  http_hdr h;
  while (http_resp_next_header(&cur, p, (size_t)head, &h)) {
    const char *ve = h.value + h.value_len;
    if (http_name_is(h.name, h.name_len, "upgrade"))
      upgrade = upgrade || list_has(h.value, ve, "websocket");
    else if (http_name_is(h.name, h.name_len, "connection"))
      conn = conn || list_has(h.value, ve, "upgrade");
    else if (http_name_is(h.name, h.name_len, "sec-websocket-accept"))
      accept = h.value_len == 28 && memcmp(h.value, want, 28) == 0;
    else if (http_name_is(h.name, h.name_len, "sec-websocket-protocol")) {
      if (h.value_len == 8 && memcmp(h.value, "imp.json", 8) == 0)
        r->subproto = WS_SUB_JSON;
      else if (h.value_len == 7 && memcmp(h.value, "imp.bin", 7) == 0)
        r->subproto = WS_SUB_BIN;
      else
        proto_bad = true;
      r->subproto_set = true;
    }
  }
  if (!upgrade || !conn)
    return reply_fail(r, 101, "missing Upgrade/Connection in the 101");
  if (!accept)
    return reply_fail(r, 101, "Sec-WebSocket-Accept does not match the key");
  if (proto_bad)
    return reply_fail(r, 101, "server chose a subprotocol we did not offer");
  r->http_status = 101;
  return head;
}
