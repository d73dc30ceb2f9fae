/* The HTTP API for business back ends (R4): push, presence, kick, group
 * membership, health and metrics. Every error is a JSON {"error": ...}. */
#include <cjson/cJSON.h>
#include <inttypes.h>
#include <llhttp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "imd.h"
#include "proto/json_scan.h"

#define MAX_TARGETS 10000
#define PATH_MAX_SEGS 6

static void reply_json(http_response *r, int status, cJSON *body) {
  r->status = status;
  r->content_type = "application/json";
  r->body = cJSON_PrintUnformatted(body);
  r->body_len = r->body ? strlen(r->body) : 0;
  cJSON_Delete(body);
}

static cJSON *json_error(const char *msg) {
  cJSON *o = cJSON_CreateObject();
  cJSON_AddStringToObject(o, "error", msg);
  return o;
}

char *imd_error_body(const char *msg) {
  cJSON *o = json_error(msg);
  char *s = cJSON_PrintUnformatted(o);
  cJSON_Delete(o);
  return s;
}

static void reply_error(http_response *r, int status, const char *msg) {
  reply_json(r, status, json_error(msg));
}

/* Compare the whole length whatever the contents, so timing says nothing
 * about how much of a guessed key was right. */
static bool key_equal(const char *a, size_t an, const char *b, size_t bn) {
  unsigned char diff = an != bn;
  for (size_t i = 0; i < an; i++) diff |= (unsigned char)(a[i] ^ (i < bn ? b[i] : 0));
  return diff == 0;
}

static bool authorized(const imd *d, const http_request *req) {
  const char *h = req->authorization;
  if (!h || strncmp(h, "Bearer ", 7) != 0) return false;
  return key_equal(h + 7, strlen(h + 7), d->api_key, strlen(d->api_key));
}

bool imd_api_admit(void *user, const char *authorization) {
  const imd *d = user;
  http_request req = {.authorization = authorization};
  return authorized(d, &req);
}

/* Split the path into percent-decoded segments (in place in buf). */
static int split_path(const char *p, size_t n, char *buf, size_t cap, char **seg) {
  if (n + 1 > cap) return -1;
  int k = 0;
  size_t o = 0;
  for (size_t i = 0; i < n; i++) {
    if (p[i] == '/') {
      buf[o++] = '\0';
      if (k == PATH_MAX_SEGS) return -1;
      seg[k++] = buf + o;
      continue;
    }
    if (k == 0) return -1; /* must start with '/' */
    if (p[i] == '%' && i + 2 < n) {
      char hex[3] = {p[i + 1], p[i + 2], 0};
      char *end;
      long v = strtol(hex, &end, 16);
      if (*end || v <= 0) return -1;
      buf[o++] = (char)v;
      i += 2;
    } else {
      buf[o++] = p[i];
    }
  }
  buf[o] = '\0';
  return k;
}

/* The raw JSON text of body member `name`, so data passes byte for byte
 * (cJSON would round big integers through double). */
static bool raw_member(const char *body, size_t len, const char *name, json_tok *out) {
  json_obj_iter it;
  json_tok k, v;
  size_t nl = strlen(name);
  if (json_scan_obj_open(&it, body, len) < 0) return false;
  bool found = false;
  int r;
  while ((r = json_scan_obj_next(&it, &k, &v)) == 1)
    if (k.n == nl + 2 && memcmp(k.p + 1, name, nl) == 0) {
      *out = v;
      found = true; /* last one wins, as in the IMP decoder */
    }
  return r == 0 && found;
}

/* Collect string members of a JSON array (or a single string) into v. */
static int string_list(const cJSON *j, const char **v, size_t max) {
  if (cJSON_IsString(j)) {
    v[0] = j->valuestring;
    return *j->valuestring ? 1 : -1;
  }
  if (!cJSON_IsArray(j)) return -1;
  int n = 0;
  const cJSON *e;
  cJSON_ArrayForEach(e, j) {
    if (!cJSON_IsString(e) || !*e->valuestring || (size_t)n == max) return -1;
    v[n++] = e->valuestring;
  }
  return n;
}

static int cmp_str(const void *a, const void *b);

/* Sort v and drop repeated strings; returns the new count. */
static size_t unique_strings(const char **v, size_t n) {
  qsort(v, n, sizeof *v, cmp_str);
  size_t k = 0;
  for (size_t i = 0; i < n; i++)
    if (k == 0 || strcmp(v[k - 1], v[i])) v[k++] = v[i];
  return k;
}

static void post_message(imd *d, const http_request *req, http_response *r) {
  cJSON *b = cJSON_ParseWithLength(req->body, req->body_len);
  if (!cJSON_IsObject(b)) {
    cJSON_Delete(b);
    reply_error(r, 400, "body must be a JSON object");
    return;
  }
  json_tok data = {0};
  const cJSON *from = cJSON_GetObjectItemCaseSensitive(b, "from");
  const cJSON *to = cJSON_GetObjectItemCaseSensitive(b, "to");
  const cJSON *group = cJSON_GetObjectItemCaseSensitive(b, "group");
  const cJSON *room = cJSON_GetObjectItemCaseSensitive(b, "room");
  const cJSON *cid = cJSON_GetObjectItemCaseSensitive(b, "cid");
  int targets = (to != NULL) + (group != NULL) + (room != NULL);
  const char *err = NULL;
  if (!raw_member(req->body, req->body_len, "data", &data))
    err = "missing data";
  else if (from && !cJSON_IsString(from))
    err = "from must be a string";
  else if (targets != 1)
    err = "give exactly one of to, group, room";
  else if ((group && !cJSON_IsString(group)) || (room && !cJSON_IsString(room)))
    err = "group and room must be strings";
  else if (cid && (!cJSON_IsString(cid) || !*cid->valuestring))
    err = "cid must be a non-empty string";
  else if (room && cid)
    err = "room messages are not stored: no cid";
  if (err) {
    cJSON_Delete(b);
    reply_error(r, 400, err);
    return;
  }
  if (data.n > im_server_config(d->srv)->max_message) {
    cJSON_Delete(b);
    reply_error(r, 413, "data over the message size limit");
    return;
  }
  char id[IM_ID_MAX];
  im_new_id(d->srv, id);
  const char *sender = from ? from->valuestring : "system";
  if (!room) {
    /* stored: answered after the commit (deferred), like a client's ack */
    const char **uids = NULL;
    size_t k = 0;
    imd_store_msg sm = {.id = id, .from = sender, .device = "", .ts = imd_wall_ms(),
                        .cid = cid ? cid->valuestring : NULL, .data = data.p,
                        .data_len = data.n};
    if (to) {
      uids = malloc(MAX_TARGETS * sizeof(*uids));
      int nk = uids ? string_list(to, uids, MAX_TARGETS) : -1;
      k = nk > 0 ? unique_strings(uids, (size_t)nk) : 0;
      if (k == 1) sm.to = uids[0];
      err = nk <= 0 ? "to must be a non-empty uid or array of uids" : NULL;
    } else {
      imd_group *g = imd_group_find(d, group->valuestring);
      uids = g ? imd_group_members(g, &k) : NULL;
      sm.group = group->valuestring;
      err = g ? (k ? NULL : "the group has no members") : "no such group";
    }
    int code = err ? (to ? 400 : 404) : 0;
    uint64_t ticket = err ? 0 : http_response_defer(r);
    if (!err && !ticket) code = 503, err = "out of memory";
    if (!err && (code = imd_store_and_deliver(d, &sm, uids, k, 0, ticket)) != 0) {
      imd_http_respond(d, ticket, code, imd_error_body("store failed"));
    } else if (!err) {
      d->m.msgs_http++;
    }
    free((void *)uids);
    cJSON_Delete(b);
    if (err) reply_error(r, code, err);
    return;
  }
  im_msg m = {.id = id, .from = sender, .room = room->valuestring, .ts = imd_wall_ms(),
              .data = data.p, .data_len = data.n};
  int n = im_room_send(d->srv, room->valuestring, &m, 0);
  cJSON_Delete(b);
  if (n < 0) {
    reply_error(r, n == IM_ETOOBIG ? 413 : 500, im_strerror(n));
    return;
  }
  d->m.msgs_http++;
  cJSON *o = cJSON_CreateObject();
  cJSON_AddStringToObject(o, "id", id);
  cJSON_AddNumberToObject(o, "delivered", n);
  reply_json(r, 200, o);
}

static void get_presence(imd *d, const char *uid, http_response *r) {
  im_conn_id ids[256];
  size_t total = im_user_conns(d->srv, uid, ids, 256);
  cJSON *o = cJSON_CreateObject();
  cJSON_AddStringToObject(o, "uid", uid);
  cJSON_AddBoolToObject(o, "online", total > 0);
  cJSON *arr = cJSON_AddArrayToObject(o, "connections");
  for (size_t i = 0; i < total && i < 256; i++) {
    im_conn_info info;
    if (im_conn_get_info(d->srv, ids[i], &info) < 0) continue;
    char cid[24];
    snprintf(cid, sizeof cid, "%" PRIx64, ids[i]);
    cJSON *c = cJSON_CreateObject();
    cJSON_AddStringToObject(c, "conn", cid);
    cJSON_AddStringToObject(c, "device", info.device);
    cJSON_AddStringToObject(c, "platform", info.platform);
    cJSON_AddStringToObject(c, "address", info.peer);
    cJSON_AddStringToObject(c, "transport", info.transport == IM_TRANSPORT_TCP ? "tcp" : "ws");
    cJSON_AddNumberToObject(c, "since", (double)(d->start_wall_ms + info.since_ms));
    cJSON_AddItemToArray(arr, c);
  }
  cJSON_AddNumberToObject(o, "count", (double)total);
  reply_json(r, 200, o);
}

static void add_device(void *arr, const char *device, uint64_t seq) {
  cJSON *o = cJSON_CreateObject();
  cJSON_AddStringToObject(o, "device", device);
  cJSON_AddNumberToObject(o, "delivered", (double)seq);
  cJSON_AddItemToArray(arr, o);
}

/* The user's inbox position: last seq, what retention trimmed, and how far
 * each device has ACKed. */
static void get_inbox(imd *d, const char *uid, http_response *r) {
  imd_flush(d);
  uint64_t last = 0, trimmed = 0;
  cJSON *o = cJSON_CreateObject();
  cJSON_AddStringToObject(o, "uid", uid);
  cJSON *devs = cJSON_CreateArray();
  if (imd_store_user_state(d->store, uid, &last, &trimmed, add_device, devs) < 0) {
    cJSON_Delete(devs);
    cJSON_Delete(o);
    reply_error(r, 500, "store failed");
    return;
  }
  cJSON_AddNumberToObject(o, "last", (double)last);
  cJSON_AddNumberToObject(o, "trimmed", (double)trimmed);
  cJSON_AddItemToObject(o, "devices", devs);
  reply_json(r, 200, o);
}

static void post_kick(imd *d, const char *uid, http_response *r) {
  im_conn_id ids[256];
  size_t total, kicked = 0;
  /* closing removes nothing from the registry until the close completes,
   * so one pass over a snapshot is enough */
  total = im_user_conns(d->srv, uid, ids, 256);
  for (size_t i = 0; i < total && i < 256; i++)
    if (im_conn_close(d->srv, ids[i], IM_CLOSE_KICKED, "kicked") == 0) kicked++;
  cJSON *o = cJSON_CreateObject();
  cJSON_AddStringToObject(o, "uid", uid);
  cJSON_AddNumberToObject(o, "kicked", (double)kicked);
  reply_json(r, 200, o);
}

static int cmp_str(const void *a, const void *b) {
  return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static void reply_members(imd *d, const char *gid, http_response *r) {
  imd_group *g = imd_group_find(d, gid);
  size_t n = 0;
  const char **v = g ? imd_group_members(g, &n) : NULL;
  cJSON *o = cJSON_CreateObject();
  cJSON_AddStringToObject(o, "gid", gid);
  cJSON *arr = cJSON_AddArrayToObject(o, "members");
  if (v) {
    qsort(v, n, sizeof(*v), cmp_str);
    for (size_t i = 0; i < n; i++) cJSON_AddItemToArray(arr, cJSON_CreateString(v[i]));
  }
  free((void *)v);
  reply_json(r, 200, o);
}

static void put_members(imd *d, const char *gid, const http_request *req, http_response *r) {
  cJSON *b = cJSON_ParseWithLength(req->body, req->body_len);
  const cJSON *add = cJSON_GetObjectItemCaseSensitive(b, "add");
  const cJSON *rm = cJSON_GetObjectItemCaseSensitive(b, "remove");
  const char **va = malloc(MAX_TARGETS * sizeof(*va)), **vr = malloc(MAX_TARGETS * sizeof(*vr));
  int na = add ? string_list(add, va, MAX_TARGETS) : 0;
  int nr = rm ? string_list(rm, vr, MAX_TARGETS) : 0;
  const char *err = NULL;
  if (!cJSON_IsObject(b))
    err = "body must be a JSON object";
  else if (!add && !rm)
    err = "give add and/or remove";
  else if (na < 0 || nr < 0 || cJSON_IsString(add) || cJSON_IsString(rm))
    err = "add and remove must be arrays of non-empty uids";
  if (err) {
    reply_error(r, 400, err);
  } else if (imd_group_update(d, gid, va, (size_t)na, vr, (size_t)nr) < 0) {
    reply_error(r, 500, "cannot store the group");
  } else {
    reply_members(d, gid, r);
  }
  free(va);
  free(vr);
  cJSON_Delete(b);
}

static void route(imd *d, const http_request *req, http_response *r) {
  char buf[1024], *seg[PATH_MAX_SEGS];
  int n = split_path(req->path, req->path_len, buf, sizeof buf, seg);
  if (n < 0) {
    reply_error(r, n == -1 && req->path_len >= sizeof buf ? 414 : 400, "bad path");
    return;
  }
  bool get = req->method == HTTP_GET, post = req->method == HTTP_POST, put = req->method == HTTP_PUT;
  if (n == 1 && !strcmp(seg[0], "healthz")) {
    if (!get) goto method;
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "status", "ok");
    reply_json(r, 200, o);
    return;
  }
  if (!authorized(d, req)) {
    reply_error(r, 401, "missing or bad API key");
    return;
  }
  if (n == 1 && !strcmp(seg[0], "metrics")) {
    if (!get) goto method;
    r->status = 200;
    r->content_type = "text/plain; version=0.0.4";
    r->body = imd_metrics_render(d, &r->body_len);
    return;
  }
  if (n < 2 || strcmp(seg[0], "v1")) goto not_found;
  if (n == 2 && !strcmp(seg[1], "messages")) {
    if (!post) goto method;
    post_message(d, req, r);
    return;
  }
  if (n == 4 && !strcmp(seg[1], "users") && *seg[2]) {
    if (!strcmp(seg[3], "presence")) {
      if (!get) goto method;
      get_presence(d, seg[2], r);
      return;
    }
    if (!strcmp(seg[3], "inbox")) {
      if (!get) goto method;
      get_inbox(d, seg[2], r);
      return;
    }
    if (!strcmp(seg[3], "kick")) {
      if (!post) goto method;
      post_kick(d, seg[2], r);
      return;
    }
  }
  if (n == 4 && !strcmp(seg[1], "groups") && *seg[2] && !strcmp(seg[3], "members")) {
    if (put)
      put_members(d, seg[2], req, r);
    else if (get)
      reply_members(d, seg[2], r);
    else
      goto method;
    return;
  }
not_found:
  reply_error(r, 404, "no such route");
  return;
method:
  reply_error(r, 405, "method not allowed");
}

static void count_status(imd *d, int status) {
  if (status >= 100 && status < 600) d->m.http_status[status / 100]++;
}

void imd_http_respond(imd *d, uint64_t ticket, int status, char *body) {
  if (!body) status = 500;
  count_status(d, status);
  http_server_respond(d->http, ticket, status, NULL, body, body ? strlen(body) : 0);
}

void imd_api_handle(void *user, const http_request *req, http_response *resp) {
  imd *d = user;
  route(d, req, resp);
  d->m.http_requests++;
  count_status(d, resp->status); /* a deferred answer counts when it is given */
}
