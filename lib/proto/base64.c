#include "proto/base64.h"

static const char std_table[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
static const char url_table[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

size_t b64_encode(const uint8_t *in, size_t n, char *out, bool url) {
  const char *t = url ? url_table : std_table;
  char *o = out;
  for (size_t i = 0; i < n; i += 3) {
    uint32_t v = (uint32_t)in[i] << 16 | (i + 1 < n ? (uint32_t)in[i + 1] << 8 : 0) |
                 (i + 2 < n ? in[i + 2] : 0);
    *o++ = t[v >> 18];
    *o++ = t[(v >> 12) & 63];
    if (i + 1 < n || !url) *o++ = i + 1 < n ? t[(v >> 6) & 63] : '=';
    if (i + 2 < n || !url) *o++ = i + 2 < n ? t[v & 63] : '=';
  }
  *o = '\0';
  return (size_t)(o - out);
}
