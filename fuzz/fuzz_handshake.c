/* libFuzzer harness: the WebSocket upgrade request parser
 * (lib/proto/ws_handshake.h), fed in fuzzer-chosen pieces.
 *
 * Input: see fuzz_common.h; mode & 1 requires the path "/ws" (else any).
 * Checks: a DONE verdict yields a well-formed 101 response and sane result
 * fields, a FAIL verdict a documented status and a well-formed error
 * response, the verdict sticks, and it does not depend on how the request
 * was split: feeding it in one piece gives the same verdict at the same
 * byte offset. */
#include "fuzz_common.h"
#include "proto/ws_handshake.h"

typedef struct verdict {
  int status;
  ws_hs_result res;
  size_t end;   /* stream offset just past the request (DONE) */
  char *str[5]; /* copies of uid, token, device, platform, path (DONE) */
} verdict;

static char *dup_str(const char *s) { return s ? (char *)fz_dup(s, strlen(s) + 1) : NULL; }

static bool same_str(const char *a, const char *b) {
  return (!a && !b) || (a && b && strcmp(a, b) == 0);
}

static bool b64_char(char c) {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
         c == '+' || c == '/';
}

static void check_done(const ws_hs_result *r, const char *path) {
  FZ_CHECK(r->http_status == 101);
  FZ_CHECK(strlen(r->accept) == 28 && r->accept[27] == '=');
  for (int i = 0; i < 27; i++) FZ_CHECK(b64_char(r->accept[i]));
  FZ_CHECK(r->subproto == WS_SUB_JSON || r->subproto == WS_SUB_BIN);
  FZ_CHECK(r->subproto_offered || r->subproto == WS_SUB_JSON);
  FZ_CHECK(r->path && r->path[0] == '/' && !strchr(r->path, '?'));
  if (path) FZ_CHECK(strcmp(r->path, path) == 0);
  const char *q[4] = {r->uid, r->token, r->device, r->platform};
  for (int i = 0; i < 4; i++)
    if (q[i]) (void)strlen(q[i]);

  size_t need = ws_hs_accept_response(r, NULL, 0);
  char *out = malloc(need + 1);
  FZ_CHECK(out && ws_hs_accept_response(r, out, need + 1) == need);
  static const char line[] = "HTTP/1.1 101 Switching Protocols\r\n";
  FZ_CHECK(need > sizeof line && memcmp(out, line, sizeof line - 1) == 0);
  FZ_CHECK(memcmp(out + need - 4, "\r\n\r\n", 4) == 0);
  char acc[64];
  snprintf(acc, sizeof acc, "\r\nSec-WebSocket-Accept: %s\r\n", r->accept);
  FZ_CHECK(fz_memmem((const uint8_t *)out, need, acc));
  const uint8_t *proto = fz_memmem((const uint8_t *)out, need, "Sec-WebSocket-Protocol: ");
  FZ_CHECK((proto != NULL) == r->subproto_offered);
  free(out);
}

static void check_fail(const ws_hs_result *r) {
  int st = r->http_status;
  FZ_CHECK(st == 400 || st == 403 || st == 404 || st == 405 || st == 426 || st == 431 ||
           st == 503);
  FZ_CHECK(r->reason && strlen(r->reason) > 0);
  size_t need = ws_hs_error_response(st, r->reason, NULL, 0);
  char *out = malloc(need + 1);
  FZ_CHECK(out && ws_hs_error_response(st, r->reason, out, need + 1) == need);
  char line[32];
  snprintf(line, sizeof line, "HTTP/1.1 %d ", st);
  FZ_CHECK(memcmp(out, line, strlen(line)) == 0);
  const uint8_t *end = fz_memmem((const uint8_t *)out, need, "\r\n\r\n");
  FZ_CHECK(end);
  size_t body = need - (size_t)(end + 4 - (const uint8_t *)out);
  char cl[48];
  snprintf(cl, sizeof cl, "\r\nContent-Length: %zu\r\n", body);
  FZ_CHECK(fz_memmem((const uint8_t *)out, need, cl));
  free(out);
}

/* Feed the stream to a fresh parser, split per `in` (or whole when in is NULL). */
static verdict run(fz_input *in, const uint8_t *s, size_t len, const char *path) {
  verdict v;
  memset(&v, 0, sizeof v);
  v.status = WS_HS_MORE;
  ws_handshake *hs = ws_hs_new(path);
  FZ_CHECK(hs != NULL);
  size_t off = 0, n;
  uint8_t c;
  fz_input whole = {0};
  if (!in) in = &whole;
  while ((n = fz_next_chunk(in, len, &off, &c)) > 0) {
    uint8_t *piece = fz_dup(s + off, n);
    ws_hs_result r;
    memset(&r, 0xa5, sizeof r);
    int st = ws_hs_feed(hs, piece, n, &r);
    FZ_CHECK(st == WS_HS_MORE || st == WS_HS_DONE || st == WS_HS_FAIL);
    if (st == WS_HS_DONE) {
      FZ_CHECK(r.consumed <= n);
      FZ_CHECK(off + r.consumed <= WS_HS_MAX_REQUEST);
      check_done(&r, path);
      v.end = off + r.consumed;
    } else if (st == WS_HS_FAIL) {
      check_fail(&r);
    }
    off += n;
    free(piece);
    if (st != WS_HS_MORE) {
      /* the verdict sticks */
      ws_hs_result again;
      FZ_CHECK(ws_hs_feed(hs, (const uint8_t *)"x", 1, &again) == st);
      FZ_CHECK(again.http_status == r.http_status && again.consumed == 0);
      v.status = st;
      v.res = r;
      if (st == WS_HS_DONE) {
        FZ_CHECK(strcmp(again.path, r.path) == 0);
        const char *q[5] = {r.uid, r.token, r.device, r.platform, r.path};
        for (int i = 0; i < 5; i++) v.str[i] = dup_str(q[i]);
      }
      break;
    }
  }
  ws_hs_free(hs);
  v.res.uid = v.res.token = v.res.device = v.res.platform = v.res.path = NULL;
  return v;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  fz_input in;
  if (!fz_input_init(&in, data, size)) return 0;
  const char *path = (in.mode & 1) ? "/ws" : NULL;
  verdict split = run(&in, in.stream, in.stream_len, path);
  verdict one = run(NULL, in.stream, in.stream_len, path);
  FZ_CHECK(split.status == one.status);
  if (split.status != WS_HS_MORE) FZ_CHECK(split.res.http_status == one.res.http_status);
  if (split.status == WS_HS_DONE) {
    FZ_CHECK(split.end == one.end);
    FZ_CHECK(strcmp(split.res.accept, one.res.accept) == 0);
    FZ_CHECK(split.res.subproto == one.res.subproto);
    FZ_CHECK(split.res.subproto_offered == one.res.subproto_offered);
    for (int i = 0; i < 5; i++) FZ_CHECK(same_str(split.str[i], one.str[i]));
  }
  for (int i = 0; i < 5; i++) {
    free(split.str[i]);
    free(one.str[i]);
  }
  return 0;
}
