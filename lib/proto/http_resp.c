/* HTTP/1.x response heads for the client side. */
#include "proto/http_resp.h"

#include <string.h>

bool http_name_eq(const char *s, size_t len, const char *lower, size_t lower_len) {
  if (len != lower_len)
    return false;
  for (size_t i = 0; i < len; i++) {
    char c = s[i];
    if (c >= 'A' && c <= 'Z')
      c = (char)(c - 'A' + 'a');
    if (c != lower[i])
      return false;
  }
  return true;
}

static const char *find_blank_line(const char *p, size_t n) {
  for (size_t i = 0; i + 3 < n; i++)
    if (p[i] == '\r' && p[i + 1] == '\n' && p[i + 2] == '\r' && p[i + 3] == '\n')
      return p + i + 4;
  return NULL;
}

long http_resp_head(const char *p, size_t n, size_t max, int *status) {
  size_t look = n < max ? n : max;
  const char *end = find_blank_line(p, look);
  if (!end)
    return n >= max ? -1 : 0;
  /* "HTTP/1.x NNN" */
  if (end - p < 12 || memcmp(p, "HTTP/1.", 7) != 0 || p[8] != ' ')
    return -1;
  int s = 0;
  for (int i = 9; i < 12; i++) {
    if (p[i] < '0' || p[i] > '9')
      return -1;
    s = s * 10 + (p[i] - '0');
  }
  if (p[12] != ' ' && p[12] != '\r')
    return -1;
  *status = s;
  return (long)(end - p);
}

bool http_resp_next_header(const char **cur, const char *p, size_t head_len, http_hdr *h) {
  const char *end = p + head_len;
  const char *line = *cur;
  if (line == p) { /* skip the status line */
    const char *nl = memchr(line, '\n', (size_t)(end - line));
    line = nl ? nl + 1 : end;
  }
  while (line < end) {
    const char *nl = memchr(line, '\n', (size_t)(end - line));
    const char *next = nl ? nl + 1 : end;
    const char *le = nl && nl > line && nl[-1] == '\r' ? nl - 1 : (nl ? nl : end);
    const char *colon = memchr(line, ':', (size_t)(le - line));
    if (colon) {
      const char *v = colon + 1, *ve = le;
      while (v < ve && (*v == ' ' || *v == '\t'))
        v++;
      while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t'))
        ve--;
      h->name = line;
      h->name_len = (size_t)(colon - line);
      h->value = v;
      h->value_len = (size_t)(ve - v);
      *cur = next;
      return true;
    }
    line = next;
  }
  *cur = end;
  return false;
}
