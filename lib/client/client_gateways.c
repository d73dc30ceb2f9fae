/* Gateway addresses: URL parsing, and the list answered by
 * GET /v1/gateways ({"gateways":[{"ws":"ws://…","tcp":"HOST:PORT"},…]}). */
#include <stdlib.h>
#include <string.h>

#include "client/client.h"
#include "proto/json_scan.h"

#define URL_MAX 1024

static bool has_prefix(const char *s, size_t n, const char *pre) {
  size_t k = strlen(pre);
  return n >= k && memcmp(s, pre, k) == 0;
}

int gw_parse_url(const char *url, size_t len, gw_addr *out) {
  memset(out, 0, sizeof *out);
  if (len == 0 || len > URL_MAX || memchr(url, '\0', len))
    return -1;
  enum im_transport t = IM_TRANSPORT_TCP;
  const char *p = url, *end = url + len;
  if (has_prefix(p, len, "ws://")) {
    t = IM_TRANSPORT_WS;
    p += 5;
  } else if (has_prefix(p, len, "tcp://")) {
    p += 6;
  }
  const char *slash = memchr(p, '/', (size_t)(end - p));
  const char *hp_end = slash ? slash : end;
  if (t == IM_TRANSPORT_TCP && slash)
    return -1;
  /* host: "[v6]" or up to the last ':' */
  const char *host, *host_end, *colon;
  if (p < hp_end && *p == '[') {
    host = p + 1;
    host_end = memchr(p, ']', (size_t)(hp_end - p));
    if (!host_end)
      return -1;
    colon = host_end + 1 < hp_end && host_end[1] == ':' ? host_end + 1 : NULL;
    if (!colon && host_end + 1 != hp_end)
      return -1;
  } else {
    host = p;
    colon = NULL;
    for (const char *q = p; q < hp_end; q++)
      if (*q == ':')
        colon = q;
    host_end = colon ? colon : hp_end;
  }
  if (host_end == host)
    return -1;
  unsigned long port = t == IM_TRANSPORT_WS ? 80 : 0;
  if (colon) {
    if (colon + 1 == hp_end || hp_end - colon > 6)
      return -1;
    port = 0;
    for (const char *q = colon + 1; q < hp_end; q++) {
      if (*q < '0' || *q > '9')
        return -1;
      port = port * 10 + (unsigned long)(*q - '0');
    }
  }
  if (port == 0 || port > 65535)
    return -1;
  size_t hn = (size_t)(host_end - host);
  size_t pn = slash ? (size_t)(end - slash) : (t == IM_TRANSPORT_WS ? 1 : 0);
  out->mem = malloc(hn + pn + 2);
  if (!out->mem)
    return -1;
  memcpy(out->mem, host, hn);
  out->mem[hn] = '\0';
  char *path = out->mem + hn + 1;
  if (slash)
    memcpy(path, slash, pn);
  else if (pn)
    path[0] = '/';
  path[pn] = '\0';
  out->a.transport = t;
  out->a.host = out->mem;
  out->a.port = (uint16_t)port;
  out->a.path = path;
  return 0;
}

void gw_list_clear(gw_list *l) {
  for (size_t i = 0; i < l->n; i++)
    free(l->v[i].mem);
  free(l->v);
  l->v = NULL;
  l->n = 0;
}

int gw_list_add(gw_list *l, const char *url, size_t len) {
  gw_addr a;
  if (gw_parse_url(url, len, &a) != 0)
    return -1;
  gw_addr *nv = realloc(l->v, (l->n + 1) * sizeof *nv);
  if (!nv) {
    free(a.mem);
    return -1;
  }
  l->v = nv;
  l->v[l->n++] = a;
  return 0;
}

/* A string member's value, unescaped into buf; 0 when it is not a string
 * or does not fit. */
static size_t str_value(const json_tok *v, char *buf, size_t cap) {
  if (v->kind != JSON_STRING)
    return 0;
  size_t n = json_scan_unescape(v->p + 1, v->n - 2, buf, cap);
  return n == SIZE_MAX ? 0 : n;
}

static void take_entry(gw_list *l, const json_tok *obj, bool prefer_tcp) {
  json_obj_iter it;
  json_tok k, v;
  char ws[URL_MAX], tcp[URL_MAX];
  size_t ws_n = 0, tcp_n = 0;
  if (json_scan_obj_open(&it, obj->p, obj->n) != 0)
    return;
  while (json_scan_obj_next(&it, &k, &v) == 1) {
    if (k.n == 4 && memcmp(k.p, "\"ws\"", 4) == 0)
      ws_n = str_value(&v, ws, sizeof ws);
    else if (k.n == 5 && memcmp(k.p, "\"tcp\"", 5) == 0)
      tcp_n = str_value(&v, tcp, sizeof tcp);
  }
  if (prefer_tcp && tcp_n && gw_list_add(l, tcp, tcp_n) == 0)
    return;
  if (ws_n && gw_list_add(l, ws, ws_n) == 0)
    return;
  if (tcp_n)
    gw_list_add(l, tcp, tcp_n);
}

size_t gw_list_from_json(gw_list *l, const char *body, size_t len, bool prefer_tcp) {
  gw_list_clear(l);
  json_obj_iter it;
  json_tok k, v;
  if (!body || json_scan_obj_open(&it, body, len) != 0)
    return 0;
  int r;
  while ((r = json_scan_obj_next(&it, &k, &v)) == 1) {
    if (!(k.n == 10 && memcmp(k.p, "\"gateways\"", 10) == 0) || v.kind != JSON_ARRAY)
      continue;
    const char *p = v.p + 1, *end = v.p + v.n - 1;
    while ((p = json_scan_ws(p, end)) < end) {
      json_tok e;
      p = json_scan_value(p, end, &e);
      if (!p)
        break;
      if (e.kind == JSON_OBJECT)
        take_entry(l, &e, prefer_tcp);
      p = json_scan_ws(p, end);
      if (p < end && *p == ',')
        p++;
    }
  }
  if (r < 0)
    gw_list_clear(l);
  return l->n;
}
