#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "proto/base64.h"
#include "proto/ws_handshake.h"

#define KEY "dGhlIHNhbXBsZSBub25jZQ=="
#define ACCEPT "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="

/* A valid request for /ws with `extra` header lines (each ending in CRLF)
 * inserted before the blank line. */
static size_t make_req(char *out, size_t cap, const char *target, const char *extra) {
  int n = snprintf(out, cap,
                   "GET %s HTTP/1.1\r\n"
                   "Host: example.com\r\n"
                   "Upgrade: websocket\r\n"
                   "Connection: Upgrade\r\n"
                   "Sec-WebSocket-Key: " KEY "\r\n"
                   "Sec-WebSocket-Version: 13\r\n"
                   "%s\r\n",
                   target, extra);
  assert_true(n > 0 && (size_t)n < cap);
  return (size_t)n;
}

/* The result's strings point into the handshake, so the last one is kept
 * alive until the next call (or the end of the test group). */
static ws_handshake *last_hs;

static int feed_str(const char *path, const char *req, size_t len, ws_hs_result *res) {
  ws_hs_free(last_hs);
  last_hs = ws_hs_new(path);
  assert_non_null(last_hs);
  return ws_hs_feed(last_hs, (const uint8_t *)req, len, res);
}

static int free_last(void **state) {
  (void)state;
  ws_hs_free(last_hs);
  last_hs = NULL;
  return 0;
}

/* Status for a raw request fed in one piece to a parser for "/ws". */
static int status_of(const char *req) {
  ws_hs_result res;
  int st = feed_str("/ws", req, strlen(req), &res);
  return st == WS_HS_FAIL ? res.http_status : st == WS_HS_DONE ? 101 : 0;
}

/* Status for the standard request with extra header lines. */
static int status_with(const char *target, const char *extra) {
  char req[1024];
  make_req(req, sizeof req, target, extra);
  return status_of(req);
}

static void test_rfc_sample_accept_key(void **state) {
  (void)state;
  char out[29];
  assert_int_equal(ws_hs_accept_key(KEY, strlen(KEY), out), 0);
  assert_string_equal(out, ACCEPT);
  char long_key[200];
  memset(long_key, 'A', sizeof long_key);
  assert_int_equal(ws_hs_accept_key(long_key, sizeof long_key, out), -1);
}

static void test_valid_request(void **state) {
  (void)state;
  char req[1024];
  size_t n = make_req(req, sizeof req, "/ws", "");
  ws_hs_result res;
  ws_handshake *hs = ws_hs_new("/ws");
  assert_int_equal(ws_hs_feed(hs, (const uint8_t *)req, 0, &res), WS_HS_MORE);
  assert_int_equal(ws_hs_feed(hs, (const uint8_t *)req, n, &res), WS_HS_DONE);
  assert_int_equal(res.http_status, 101);
  assert_string_equal(res.accept, ACCEPT);
  assert_string_equal(res.path, "/ws");
  assert_int_equal(res.subproto, WS_SUB_JSON);
  assert_false(res.subproto_offered);
  assert_null(res.uid);
  assert_null(res.token);
  assert_null(res.device);
  assert_null(res.platform);
  assert_int_equal(res.consumed, n);

  /* A finished handshake repeats its verdict and consumes nothing more. */
  ws_hs_result again;
  assert_int_equal(ws_hs_feed(hs, (const uint8_t *)"x", 1, &again), WS_HS_DONE);
  assert_int_equal(again.consumed, 0);
  assert_string_equal(again.accept, ACCEPT);
  ws_hs_free(hs);
}

static void assert_same_str(const char *a, const char *b) {
  if (!a || !b)
    assert_ptr_equal(a, b);
  else
    assert_string_equal(a, b);
}

static void assert_same_result(const ws_hs_result *a, const ws_hs_result *b) {
  assert_int_equal(a->http_status, b->http_status);
  assert_string_equal(a->accept, b->accept);
  assert_int_equal(a->subproto, b->subproto);
  assert_int_equal(a->subproto_offered, b->subproto_offered);
  assert_same_str(a->uid, b->uid);
  assert_same_str(a->token, b->token);
  assert_same_str(a->device, b->device);
  assert_same_str(a->platform, b->platform);
  assert_same_str(a->path, b->path);
}

static void test_one_byte_at_a_time(void **state) {
  (void)state;
  char req[1024];
  size_t n = make_req(req, sizeof req, "/ws?uid=u%201&token=t+k&device=d&platform=ios",
                      "Sec-WebSocket-Protocol: x, imp.bin\r\nUser-Agent: test\r\n");
  ws_hs_result whole, res;
  ws_handshake *a = ws_hs_new("/ws");
  assert_int_equal(ws_hs_feed(a, (const uint8_t *)req, n, &whole), WS_HS_DONE);

  ws_handshake *b = ws_hs_new("/ws");
  for (size_t i = 0; i + 1 < n; i++)
    assert_int_equal(ws_hs_feed(b, (const uint8_t *)req + i, 1, &res), WS_HS_MORE);
  assert_int_equal(ws_hs_feed(b, (const uint8_t *)req + n - 1, 1, &res), WS_HS_DONE);
  assert_int_equal(res.consumed, 1);
  assert_same_result(&whole, &res);
  assert_string_equal(res.uid, "u 1");
  assert_string_equal(res.token, "t k");
  assert_int_equal(res.subproto, WS_SUB_BIN);
  ws_hs_free(a);
  ws_hs_free(b);
}

static void test_split_in_two_with_pipelined_frames(void **state) {
  (void)state;
  static const char frame[] = "\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58";
  char req[1024];
  size_t n = make_req(req, sizeof req, "/ws?uid=42", "");
  memcpy(req + n, frame, sizeof frame - 1);
  size_t total = n + sizeof frame - 1;
  ws_hs_result whole;
  ws_handshake *first = ws_hs_new("/ws");
  assert_int_equal(ws_hs_feed(first, (const uint8_t *)req, total, &whole), WS_HS_DONE);
  assert_int_equal(whole.consumed, n);
  for (size_t cut = 1; cut < total; cut++) {
    ws_handshake *hs = ws_hs_new("/ws");
    ws_hs_result res;
    int st = ws_hs_feed(hs, (const uint8_t *)req, cut, &res);
    if (cut < n) {
      assert_int_equal(st, WS_HS_MORE);
      st = ws_hs_feed(hs, (const uint8_t *)req + cut, total - cut, &res);
      assert_int_equal(st, WS_HS_DONE);
      assert_int_equal(res.consumed, n - cut);
    } else {
      assert_int_equal(st, WS_HS_DONE);
      assert_int_equal(res.consumed, n);
    }
    assert_same_result(&whole, &res);
    ws_hs_free(hs);
  }
  ws_hs_free(first);
}

static void test_header_names_case_insensitive(void **state) {
  (void)state;
  static const char req[] = "GET /ws HTTP/1.1\r\n"
                            "HOST: a\r\n"
                            "uPgRaDe: WebSocket\r\n"
                            "connection: UPGRADE\r\n"
                            "sec-websocket-key: " KEY "\r\n"
                            "SEC-WEBSOCKET-VERSION: 13\r\n\r\n";
  assert_int_equal(status_of(req), 101);
}

static void test_connection_is_a_token_list(void **state) {
  (void)state;
  static const char base[] = "GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n"
                             "Sec-WebSocket-Key: " KEY "\r\nSec-WebSocket-Version: 13\r\n";
  char req[512];
  snprintf(req, sizeof req, "%sConnection: keep-alive, Upgrade\r\n\r\n", base);
  assert_int_equal(status_of(req), 101);
  snprintf(req, sizeof req, "%sConnection: keep-alive,upgrade ,close\r\n\r\n", base);
  assert_int_equal(status_of(req), 101);
  snprintf(req, sizeof req, "%sConnection: keep-alive\r\nConnection: Upgrade\r\n\r\n", base);
  assert_int_equal(status_of(req), 101);
  snprintf(req, sizeof req, "%sConnection: keep-alive\r\n\r\n", base);
  assert_int_equal(status_of(req), 400);
  snprintf(req, sizeof req, "%sConnection: upgrader\r\n\r\n", base);
  assert_int_equal(status_of(req), 400);
  snprintf(req, sizeof req, "%s\r\n", base);
  assert_int_equal(status_of(req), 400);
}

static void test_upgrade_header(void **state) {
  (void)state;
  static const char base[] = "GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n"
                             "Sec-WebSocket-Key: " KEY "\r\nSec-WebSocket-Version: 13\r\n";
  char req[512];
  snprintf(req, sizeof req, "%sUpgrade: WEBSOCKET\r\n\r\n", base);
  assert_int_equal(status_of(req), 101);
  snprintf(req, sizeof req, "%sUpgrade: websocket2\r\n\r\n", base);
  assert_int_equal(status_of(req), 400);
  snprintf(req, sizeof req, "%sUpgrade: h2c\r\n\r\n", base);
  assert_int_equal(status_of(req), 400);
  snprintf(req, sizeof req, "%s\r\n", base);
  assert_int_equal(status_of(req), 400);
}

static void test_key_validation(void **state) {
  (void)state;
  static const char base[] = "GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n"
                             "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n";
  static const char *const bad[] = {
      "",                                      /* missing */
      "Sec-WebSocket-Key: \r\n",               /* empty */
      "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25j\r\n",     /* 15 bytes */
      "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZSE=\r\n", /* 17 bytes */
      "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZSEh\r\n", /* 18 bytes, no padding */
      "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25j*Q==\r\n", /* bad character */
      "Sec-WebSocket-Key: dGhlIHNhbXBs ZSBub25jZQ=\r\n", /* inner space */
      "Sec-WebSocket-Key: " KEY "\r\nSec-WebSocket-Key: " KEY "\r\n", /* repeated */
  };
  char req[512];
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    snprintf(req, sizeof req, "%s%s\r\n", base, bad[i]);
    assert_int_equal(status_of(req), 400);
  }
  snprintf(req, sizeof req, "%sSec-WebSocket-Key:   " KEY "  \r\n\r\n", base);
  ws_hs_result res;
  assert_int_equal(feed_str("/ws", req, strlen(req), &res), WS_HS_DONE);
  assert_string_equal(res.accept, ACCEPT);
}

static void test_version_must_be_13(void **state) {
  (void)state;
  static const char base[] = "GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n"
                             "Connection: Upgrade\r\nSec-WebSocket-Key: " KEY "\r\n";
  static const char *const bad[] = {
      "",
      "Sec-WebSocket-Version: 8\r\n",
      "Sec-WebSocket-Version: 130\r\n",
      "Sec-WebSocket-Version: 13, 8\r\n",
      "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Version: 13\r\n",
  };
  char req[512];
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    snprintf(req, sizeof req, "%s%s\r\n", base, bad[i]);
    assert_int_equal(status_of(req), 426);
  }
  char out[512];
  size_t n = ws_hs_error_response(426, NULL, out, sizeof out);
  assert_int_equal(n, strlen(out));
  assert_non_null(strstr(out, "\r\nSec-WebSocket-Version: 13\r\n"));
  assert_true(strncmp(out, "HTTP/1.1 426 Upgrade Required\r\n", 31) == 0);
}

static void check_subproto(const char *extra, int want, bool offered) {
  char req[1024];
  size_t n = make_req(req, sizeof req, "/ws", extra);
  ws_hs_result res;
  assert_int_equal(feed_str("/ws", req, n, &res), WS_HS_DONE);
  assert_int_equal(res.subproto, want);
  assert_int_equal(res.subproto_offered, offered);
}

static void test_subprotocol_choice(void **state) {
  (void)state;
  check_subproto("", WS_SUB_JSON, false);
  check_subproto("Sec-WebSocket-Protocol: imp.bin\r\n", WS_SUB_BIN, true);
  check_subproto("Sec-WebSocket-Protocol: imp.json\r\n", WS_SUB_JSON, true);
  check_subproto("Sec-WebSocket-Protocol: imp.json, imp.bin\r\n", WS_SUB_JSON, true);
  check_subproto("Sec-WebSocket-Protocol: imp.bin,imp.json\r\n", WS_SUB_BIN, true);
  check_subproto("Sec-WebSocket-Protocol: chat, imp.bin\r\n", WS_SUB_BIN, true);
  check_subproto("Sec-WebSocket-Protocol: chat\r\nsec-websocket-protocol: x, imp.bin\r\n",
                 WS_SUB_BIN, true);
  check_subproto("Sec-WebSocket-Protocol: imp.bin\r\nSec-WebSocket-Protocol: imp.json\r\n",
                 WS_SUB_BIN, true);
  check_subproto("Sec-WebSocket-Protocol: chat, superchat\r\n", WS_SUB_JSON, false);
  check_subproto("Sec-WebSocket-Protocol: IMP.BIN, imp.binx\r\n", WS_SUB_JSON, false);
}

/* The base64 the handshake (and imd's tokens, and im-bench) use: RFC 4648's
 * test vectors, padded and as base64url without padding. */
static void test_base64(void **state) {
  (void)state;
  static const char *const in[] = {"", "f", "fo", "foo", "foob", "fooba", "foobar"};
  static const char *const std[] = {"", "Zg==", "Zm8=", "Zm9v", "Zm9vYg==", "Zm9vYmE=", "Zm9vYmFy"};
  static const char *const url[] = {"", "Zg", "Zm8", "Zm9v", "Zm9vYg", "Zm9vYmE", "Zm9vYmFy"};
  char out[16];
  for (size_t i = 0; i < sizeof in / sizeof in[0]; i++) {
    size_t n = strlen(in[i]);
    assert_int_equal(b64_encode((const uint8_t *)in[i], n, out, false), strlen(std[i]));
    assert_string_equal(out, std[i]);
    assert_int_equal(b64_encode((const uint8_t *)in[i], n, out, true), strlen(url[i]));
    assert_string_equal(out, url[i]);
  }
  static const uint8_t high[] = {0xfb, 0xff, 0xbf};
  b64_encode(high, sizeof high, out, false);
  assert_string_equal(out, "+/+/");
  b64_encode(high, sizeof high, out, true);
  assert_string_equal(out, "-_-_");
}

static void test_accept_response(void **state) {
  (void)state;
  ws_hs_result res;
  memset(&res, 0, sizeof res);
  strcpy(res.accept, ACCEPT);
  char out[512];
  size_t n = ws_hs_accept_response(&res, out, sizeof out);
  static const char plain[] = "HTTP/1.1 101 Switching Protocols\r\n"
                              "Upgrade: websocket\r\n"
                              "Connection: Upgrade\r\n"
                              "Sec-WebSocket-Accept: " ACCEPT "\r\n\r\n";
  assert_int_equal(n, sizeof plain - 1);
  assert_string_equal(out, plain);

  res.subproto_offered = true;
  res.subproto = WS_SUB_BIN;
  ws_hs_accept_response(&res, out, sizeof out);
  assert_string_equal(out, "HTTP/1.1 101 Switching Protocols\r\n"
                           "Upgrade: websocket\r\n"
                           "Connection: Upgrade\r\n"
                           "Sec-WebSocket-Accept: " ACCEPT "\r\n"
                           "Sec-WebSocket-Protocol: imp.bin\r\n\r\n");
  res.subproto = WS_SUB_JSON;
  ws_hs_accept_response(&res, out, sizeof out);
  assert_non_null(strstr(out, "\r\nSec-WebSocket-Protocol: imp.json\r\n\r\n"));

  /* Like snprintf: reports the full length and truncates safely. */
  char small[16];
  size_t need = ws_hs_accept_response(&res, small, sizeof small);
  assert_int_equal(need, strlen(out));
  assert_int_equal(strlen(small), sizeof small - 1);
  assert_int_equal(ws_hs_accept_response(&res, NULL, 0), need);
}

static void test_error_response(void **state) {
  (void)state;
  char out[512];
  size_t n = ws_hs_error_response(400, "bad Sec-WebSocket-Key", out, sizeof out);
  static const char want[] = "HTTP/1.1 400 Bad Request\r\n"
                             "Content-Type: text/plain\r\n"
                             "Content-Length: 22\r\n"
                             "Connection: close\r\n"
                             "\r\n"
                             "bad Sec-WebSocket-Key\n";
  assert_int_equal(n, sizeof want - 1);
  assert_string_equal(out, want);

  static const struct {
    int status;
    const char *line;
  } lines[] = {
      {403, "HTTP/1.1 403 Forbidden\r\n"},
      {404, "HTTP/1.1 404 Not Found\r\n"},
      {405, "HTTP/1.1 405 Method Not Allowed\r\n"},
      {431, "HTTP/1.1 431 Request Header Fields Too Large\r\n"},
      {503, "HTTP/1.1 503 Service Unavailable\r\n"},
  };
  for (size_t i = 0; i < sizeof lines / sizeof lines[0]; i++) {
    ws_hs_error_response(lines[i].status, "r", out, sizeof out);
    assert_true(strncmp(out, lines[i].line, strlen(lines[i].line)) == 0);
    assert_null(strstr(out, "Sec-WebSocket-Version"));
    assert_non_null(strstr(out, "\r\nContent-Length: 2\r\n"));
  }
  ws_hs_error_response(405, NULL, out, sizeof out);
  assert_non_null(strstr(out, "\r\nAllow: GET\r\n"));
  assert_non_null(strstr(out, "\r\n\r\nMethod Not Allowed\n"));

  assert_int_equal(ws_hs_error_response(400, "x", NULL, 0), strlen("HTTP/1.1 400 Bad Request\r\n"
                                                                    "Content-Type: text/plain\r\n"
                                                                    "Content-Length: 2\r\n"
                                                                    "Connection: close\r\n\r\nx\n"));
}

static void test_query_parameters(void **state) {
  (void)state;
  char req[1024];
  size_t n = make_req(req, sizeof req,
                      "/ws?x=1&uid=%E7%8E%8B+1&&token=a%2Bb%3D%3d&device=&platform&u%69d2=z", "");
  ws_hs_result res;
  ws_handshake *hs = ws_hs_new("/ws");
  assert_int_equal(ws_hs_feed(hs, (const uint8_t *)req, n, &res), WS_HS_DONE);
  assert_string_equal(res.uid, "\xe7\x8e\x8b 1");
  assert_string_equal(res.token, "a+b==");
  assert_string_equal(res.device, "");
  assert_string_equal(res.platform, "");
  assert_string_equal(res.path, "/ws");
  ws_hs_free(hs);

  n = make_req(req, sizeof req, "/ws?token=abc==&uid=%75", "");
  assert_int_equal(feed_str("/ws", req, n, &res), WS_HS_DONE);
  assert_string_equal(res.token, "abc==");
  assert_string_equal(res.uid, "u");
}

static void test_bad_query_rejected(void **state) {
  (void)state;
  static const char *const bad[] = {
      "/ws?uid=%", "/ws?uid=%4", "/ws?uid=%zz", "/ws?uid=%4g", "/ws?uid=a%00b",
      "/ws?uid=1&uid=2", "/ws?token=a&x=%G0", "/ws?%=1",
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
    assert_int_equal(status_with(bad[i], ""), 400);
}

static void test_path_matching(void **state) {
  (void)state;
  assert_int_equal(status_with("/ws", ""), 101);
  assert_int_equal(status_with("/ws?uid=1", ""), 101);
  assert_int_equal(status_with("/ws/", ""), 404);
  assert_int_equal(status_with("/wsx", ""), 404);
  assert_int_equal(status_with("/WS", ""), 404);
  assert_int_equal(status_with("/", ""), 404);
  assert_int_equal(status_with("/w?s", ""), 404);

  char req[512];
  size_t n = make_req(req, sizeof req, "/any/where?uid=7", "");
  ws_hs_result res;
  assert_int_equal(feed_str(NULL, req, n, &res), WS_HS_DONE);
  assert_string_equal(res.path, "/any/where");
  assert_string_equal(res.uid, "7");
}

static void test_method_and_version(void **state) {
  (void)state;
  static const char tail[] = "Host: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                             "Sec-WebSocket-Key: " KEY "\r\nSec-WebSocket-Version: 13\r\n\r\n";
  char req[512];
  snprintf(req, sizeof req, "POST /ws HTTP/1.1\r\n%s", tail);
  assert_int_equal(status_of(req), 405);
  snprintf(req, sizeof req, "HEAD /ws HTTP/1.1\r\n%s", tail);
  assert_int_equal(status_of(req), 405);
  snprintf(req, sizeof req, "GET /ws HTTP/1.0\r\n%s", tail);
  assert_int_equal(status_of(req), 400);
  snprintf(req, sizeof req, "G@T /ws HTTP/1.1\r\n%s", tail);
  assert_int_equal(status_of(req), 400);
  snprintf(req, sizeof req, "GET * HTTP/1.1\r\n%s", tail);
  assert_int_equal(status_of(req), 400);
}

static void test_body_rejected(void **state) {
  (void)state;
  assert_int_equal(status_with("/ws", "Content-Length: 5\r\n"), 400);
  assert_int_equal(status_with("/ws", "Transfer-Encoding: chunked\r\n"), 400);
  assert_int_equal(status_with("/ws", "Content-Length: 0\r\n"), 101);
}

static void test_host_required_once(void **state) {
  (void)state;
  static const char no_host[] = "GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                                "Sec-WebSocket-Key: " KEY "\r\nSec-WebSocket-Version: 13\r\n\r\n";
  assert_int_equal(status_of(no_host), 400);
  assert_int_equal(status_with("/ws", "Host: b\r\n"), 400);
}

static void test_malformed_http(void **state) {
  (void)state;
  assert_int_equal(status_of("GET /ws HTTP/1.1\r\nHost a\r\n\r\n"), 400);
  assert_int_equal(status_of("GET /ws HTTP/9\r\n\r\n"), 400);
  assert_int_equal(status_of("\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"), 400);

  ws_hs_result res;
  ws_handshake *hs = ws_hs_new("/ws");
  assert_int_equal(ws_hs_feed(hs, (const uint8_t *)"BAD\r\n", 5, &res), WS_HS_FAIL);
  assert_int_equal(ws_hs_feed(hs, (const uint8_t *)"GET", 3, &res), WS_HS_FAIL);
  assert_int_equal(res.http_status, 400);
  assert_non_null(res.reason);
  ws_hs_free(hs);
}

/* A request padded with a filler header to exactly `size` bytes. */
static size_t padded_req(char *out, size_t size) {
  char probe[512];
  size_t base = make_req(probe, sizeof probe, "/ws", "X-Pad: \r\n");
  assert_true(size >= base);
  size_t pad = size - base;
  char *extra = malloc(pad + 16);
  assert_non_null(extra);
  memcpy(extra, "X-Pad: ", 7);
  memset(extra + 7, 'p', pad);
  memcpy(extra + 7 + pad, "\r\n", 3);
  size_t n = make_req(out, size + 1, "/ws", extra);
  free(extra);
  assert_int_equal(n, size);
  return n;
}

static void test_size_limit(void **state) {
  (void)state;
  static char req[WS_HS_MAX_REQUEST + 2];
  ws_hs_result res;
  size_t n = padded_req(req, WS_HS_MAX_REQUEST);
  assert_int_equal(feed_str("/ws", req, n, &res), WS_HS_DONE);
  assert_int_equal(res.consumed, WS_HS_MAX_REQUEST);

  n = padded_req(req, WS_HS_MAX_REQUEST + 1);
  assert_int_equal(feed_str("/ws", req, n, &res), WS_HS_FAIL);
  assert_int_equal(res.http_status, 431);

  /* Fed in pieces, the limit trips as soon as it is crossed. */
  ws_handshake *hs = ws_hs_new("/ws");
  size_t off = 0;
  int st = WS_HS_MORE;
  while (st == WS_HS_MORE && off < n) {
    size_t piece = n - off < 1000 ? n - off : 1000;
    st = ws_hs_feed(hs, (const uint8_t *)req + off, piece, &res);
    off += piece;
  }
  assert_int_equal(st, WS_HS_FAIL);
  assert_int_equal(res.http_status, 431);
  assert_true(off <= WS_HS_MAX_REQUEST + 1000);
  ws_hs_free(hs);

  /* Endless headers never complete: 431, not unbounded buffering. */
  hs = ws_hs_new("/ws");
  static const char start[] = "GET /ws HTTP/1.1\r\n";
  assert_int_equal(ws_hs_feed(hs, (const uint8_t *)start, sizeof start - 1, &res), WS_HS_MORE);
  static const char line[] = "Upgrade: websocket, websocket, websocket\r\n";
  st = WS_HS_MORE;
  for (int i = 0; i < 1000 && st == WS_HS_MORE; i++)
    st = ws_hs_feed(hs, (const uint8_t *)line, sizeof line - 1, &res);
  assert_int_equal(st, WS_HS_FAIL);
  assert_int_equal(res.http_status, 431);
  ws_hs_free(hs);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_rfc_sample_accept_key),
      cmocka_unit_test(test_valid_request),
      cmocka_unit_test(test_one_byte_at_a_time),
      cmocka_unit_test(test_split_in_two_with_pipelined_frames),
      cmocka_unit_test(test_header_names_case_insensitive),
      cmocka_unit_test(test_connection_is_a_token_list),
      cmocka_unit_test(test_upgrade_header),
      cmocka_unit_test(test_key_validation),
      cmocka_unit_test(test_version_must_be_13),
      cmocka_unit_test(test_subprotocol_choice),
      cmocka_unit_test(test_base64),
      cmocka_unit_test(test_accept_response),
      cmocka_unit_test(test_error_response),
      cmocka_unit_test(test_query_parameters),
      cmocka_unit_test(test_bad_query_rejected),
      cmocka_unit_test(test_path_matching),
      cmocka_unit_test(test_method_and_version),
      cmocka_unit_test(test_body_rejected),
      cmocka_unit_test(test_host_required_once),
      cmocka_unit_test(test_malformed_http),
      cmocka_unit_test(test_size_limit),
  };
  return cmocka_run_group_tests(tests, NULL, free_last);
}
