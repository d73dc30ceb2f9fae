/* The HTTP API for business back ends (R4): push, presence, kick, group
 * membership, health and metrics. Every error is a JSON {"error": ...}. */
#include <cjson/cJSON.h>
#include <inttypes.h>
#include <llhttp.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "imd.h"
#include "log.h"
#include "static_files.h"
#include "proto/json_scan.h"
#include <libim/im_guard.h>
#include <libim/im_router.h>

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

static char *error_body(const char *msg) {
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

static int cmp_str(const void *a, const void *b) {
  return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Sort v and drop repeated strings; returns the new count. */
static size_t unique_strings(const char **v, size_t n) {
  qsort(v, n, sizeof *v, cmp_str);
  size_t k = 0;
  for (size_t i = 0; i < n; i++)
    if (k == 0 || strcmp(v[k - 1], v[i])) v[k++] = v[i];
  return k;
}

/* ---- deferred answers ---------------------------------------------------------- */

/* Answer a deferred request (body: malloc'd JSON or NULL for a 500;
 * ownership passes; imd_api_done counts and logs it). */
static void respond(imd *d, uint64_t ticket, int status, char *body) {
  if (!body) status = 500;
  http_server_respond(d->http, ticket, status, NULL, body, body ? strlen(body) : 0);
}

static void respond_json(imd *d, uint64_t ticket, int status, cJSON *o) {
  respond(d, ticket, status, cJSON_PrintUnformatted(o));
  cJSON_Delete(o);
}

static void respond_error(imd *d, uint64_t ticket, int status, const char *msg) {
  respond(d, ticket, status, error_body(msg));
}

/* A store failure as an answer: 503 while the store is unreachable. */
static void respond_store_error(imd *d, uint64_t ticket, int status, const char *what) {
  if (status == IMD_STORE_EDOWN)
    respond_error(d, ticket, 503, "store unavailable");
  else
    respond_error(d, ticket, status == IMD_STORE_EINVAL ? 400 : 500, what);
}

/* Defer r; on failure r is answered 503 and 0 returned. */
static uint64_t defer(http_response *r) {
  uint64_t ticket = http_response_defer(r);
  if (!ticket) reply_error(r, 503, "out of memory");
  return ticket;
}

/* ---- messages ------------------------------------------------------------------ */

/* s as a JSON string (quotes included) at out, which has room for 6 bytes
 * per byte of s plus 2; returns the bytes written. */
static size_t json_quote(char *out, const char *s) {
  static const char hex[] = "0123456789abcdef";
  char *o = out;
  *o++ = '"';
  for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
    if (*p == '"' || *p == '\\') {
      *o++ = '\\';
      *o++ = (char)*p;
    } else if (*p < 0x20) {
      memcpy(o, "\\u00", 4);
      o[4] = hex[*p >> 4];
      o[5] = hex[*p & 15];
      o += 6;
    } else {
      *o++ = (char)*p;
    }
  }
  *o++ = '"';
  return (size_t)(o - out);
}

/* A stored push was answered by the store: answer its request with
 * {"id","delivered","stored"[,"duplicate":true]}, written directly (no
 * tree, no floating-point formatting: this runs once per push). */
static void pushed(imd *d, uint64_t ticket, const imd_delivery *res) {
  if (res->status < 0) {
    respond_store_error(d, ticket, res->status, "store failed");
    return;
  }
  bool dup = res->status == IMD_STORE_DUP;
  char *b = malloc(6 * strlen(res->id) + 128);
  if (!b) {
    respond(d, ticket, 500, NULL);
    return;
  }
  char num[21];
  size_t k = 0;
#define PUT(s) (memcpy(b + k, (s), strlen(s)), k += strlen(s))
  PUT("{\"id\":");
  k += json_quote(b + k, res->id);
  PUT(",\"delivered\":");
  PUT(res->reached < 0 ? "0" : http_fmt_uint(num, (uint64_t)res->reached));
  PUT(",\"stored\":");
  PUT(http_fmt_uint(num, dup ? 0 : (uint64_t)res->stored));
  PUT(dup ? ",\"duplicate\":true}" : "}");
#undef PUT
  http_server_respond(d->http, ticket, 200, NULL, b, k);
}

static void push_stored(imd *d, uint64_t ticket, const imd_store_msg *sm, const char *const *uids,
                        size_t n) {
  int rc = imd_deliver(d, sm, uids, n, 0, pushed, ticket);
  if (rc < 0)
    respond_store_error(d, ticket, rc, "store failed");
  else
    d->m.msgs_http++;
}

/* A group push waits for the group's members: the message is copied here. */
typedef struct group_push {
  imd *d;
  uint64_t ticket;
  imd_store_msg sm;
  char id[IM_ID_MAX];
  char buf[];
} group_push;

static group_push *group_push_new(imd *d, uint64_t ticket, const imd_store_msg *sm) {
  const char *strs[] = {sm->from, sm->group, sm->cid}, *out[3];
  group_push *g = malloc(sizeof *g + imd_strs_size(strs, 3) + sm->data_len + 1);
  if (!g) return NULL;
  g->d = d;
  g->ticket = ticket;
  g->sm = *sm;
  snprintf(g->id, sizeof g->id, "%s", sm->id);
  g->sm.id = g->id;
  char *at = g->buf;
  imd_strs_copy(&at, strs, out, 3);
  g->sm.from = out[0];
  g->sm.group = out[1];
  g->sm.cid = out[2];
  memcpy(at, sm->data, sm->data_len);
  at[sm->data_len] = '\0';
  g->sm.data = at;
  return g;
}

static void group_push_members(void *arg, int status, const char *const *uids, size_t n) {
  group_push *g = arg;
  if (status < 0)
    respond_store_error(g->d, g->ticket, status, "store failed");
  else if (n == 0)
    respond_error(g->d, g->ticket, 404, "no such group");
  else
    push_stored(g->d, g->ticket, &g->sm, uids, n);
  free(g);
}

static cJSON *room_pushed_json(imd *d, const char *id, long n) {
  d->m.msgs_http++;
  cJSON *o = cJSON_CreateObject();
  cJSON_AddStringToObject(o, "id", id);
  cJSON_AddNumberToObject(o, "delivered", (double)n);
  return o;
}

/* With worker threads: every worker sends to its members of the room and
 * the answer counts them all. In a cluster the asking worker sends through
 * the group and the other nodes (im_room_send) and the others count their
 * members. The message is copied after the struct. */
typedef struct room_push {
  uint64_t ticket;
  imd *origin;
  int sent;   /* cluster: the asking worker's im_room_send */
  im_msg m;
  char buf[];
} room_push;

static int room_send_here(imd *w, void *arg) {
  room_push *p = arg;
  if (w->redis) return w == p->origin ? 0 : (int)im_room_size(w->srv, p->m.room);
  return im_local_room_send(w->srv, p->m.room, &p->m, 0);
}

static void room_sent(imd *d, long n, int err, void *arg) {
  room_push *p = arg;
  n += p->sent;
  if (err < 0)
    respond_error(d, p->ticket, err == IM_ETOOBIG ? 413 : 500, im_strerror(err));
  else
    respond_json(d, p->ticket, 200, room_pushed_json(d, p->m.id, n));
  free(p);
}

static void push_room_workers(imd *d, const im_msg *m, http_response *r) {
  const char *strs[] = {m->id, m->from, m->room}, *out[3];
  room_push *p = malloc(sizeof *p + imd_strs_size(strs, 3) + m->data_len + 1);
  uint64_t ticket = p ? defer(r) : 0;
  if (!ticket) {
    if (!p) reply_error(r, 503, "out of memory");
    free(p);
    return;
  }
  p->ticket = ticket;
  p->origin = d;
  p->sent = 0;
  char *at = p->buf;
  imd_strs_copy(&at, strs, out, 3);
  memcpy(at, m->data, m->data_len);
  p->m = (im_msg){.id = out[0], .from = out[1], .room = out[2], .ts = m->ts, .data = at,
                  .data_len = m->data_len};
  if (d->redis && (p->sent = im_room_send(d->srv, p->m.room, &p->m, 0)) < 0) {
    respond_error(d, ticket, p->sent == IM_ETOOBIG ? 413 : 500, im_strerror(p->sent));
    free(p);
    return;
  }
  if (imd_workers_gather(d, room_send_here, room_sent, p) < 0) {
    respond_error(d, ticket, 503, "out of memory");
    free(p);
  }
}

static void push_room(imd *d, const char *room, im_msg *m, http_response *r) {
  if (d->workers) {
    push_room_workers(d, m, r);
    return;
  }
  int n = im_room_send(d->srv, room, m, 0);
  if (n < 0) {
    reply_error(r, n == IM_ETOOBIG ? 413 : 500, im_strerror(n));
    return;
  }
  reply_json(r, 200, room_pushed_json(d, m->id, n));
}

/* The members of a push body that count, read in one pass of the JSON
 * scanner (no tree, no allocation; the last of a repeated member wins, as in
 * IMP). Strings are unescaped into scratch, NUL-terminated: as every string
 * has two quotes in the body, body_len + 1 bytes of scratch always do. A
 * member that is not a string (or holds \u0000) is kept as its token only. */
typedef struct push_body {
  json_tok data, to, from, group, room, cid; /* kind JSON_NONE: absent */
  const char *from_s, *group_s, *room_s, *cid_s; /* NULL: absent or not a string */
  char *at; /* the unused rest of scratch */
} push_body;

/* The unescaped text of string token t, appended to *at; NULL when t is not
 * a string or holds a NUL. */
static const char *scan_str(const json_tok *t, char **at) {
  if (t->kind != JSON_STRING || (t->flags & JSON_F_NUL)) return NULL;
  char *s = *at;
  size_t n = json_scan_unescape(t->p + 1, t->n - 2, s, t->n - 2);
  if (n == SIZE_MAX) return NULL; /* never: unescaping does not grow */
  s[n] = '\0';
  *at = s + n + 1;
  return s;
}

/* Returns false when the body is not one JSON object. */
static bool push_body_scan(const char *body, size_t len, char *scratch, push_body *pb) {
  static const struct {
    const char *name;
    size_t off;
  } keys[] = {{"data", offsetof(push_body, data)}, {"to", offsetof(push_body, to)},
              {"from", offsetof(push_body, from)}, {"group", offsetof(push_body, group)},
              {"room", offsetof(push_body, room)}, {"cid", offsetof(push_body, cid)}};
  json_obj_iter it;
  json_tok k, v;
  int r;
  memset(pb, 0, sizeof *pb);
  if (json_scan_obj_open(&it, body, len) < 0) return false;
  while ((r = json_scan_obj_next(&it, &k, &v)) == 1)
    for (size_t i = 0; i < sizeof keys / sizeof *keys; i++)
      if (k.n == strlen(keys[i].name) + 2 && memcmp(k.p + 1, keys[i].name, k.n - 2) == 0)
        *(json_tok *)((char *)pb + keys[i].off) = v;
  if (r < 0) return false;
  char *at = scratch;
  pb->from_s = scan_str(&pb->from, &at);
  pb->group_s = scan_str(&pb->group, &at);
  pb->room_s = scan_str(&pb->room, &at);
  pb->cid_s = scan_str(&pb->cid, &at);
  pb->at = at;
  return true;
}

/* The uids of `to` (one non-empty string, or a non-empty array of them, at
 * most MAX_TARGETS) into *v, unescaped into *at: one is put in one[0], more
 * in a malloc()ed array the caller frees. Returns the count, -1 when `to` is
 * not that, -2 when out of memory. */
static int to_uids(const json_tok *to, char **at, const char **one, const char ***v) {
  if (to->kind == JSON_STRING) {
    one[0] = scan_str(to, at);
    *v = one;
    return one[0] && *one[0] ? 1 : -1;
  }
  if (to->kind != JSON_ARRAY) return -1;
  /* the scanner checked the array already: count, then collect */
  const char *end = to->p + to->n, *p;
  json_tok e;
  size_t n = 0;
  for (p = json_scan_ws(to->p + 1, end); *p != ']'; p = json_scan_ws(p + 1, end)) {
    p = json_scan_ws(json_scan_value(p, end, &e), end);
    if (++n > MAX_TARGETS) return -1;
    if (*p == ']') break;
  }
  if (n == 0) return -1;
  const char **list = malloc(n * sizeof *list);
  if (!list) return -2;
  *v = list;
  n = 0;
  for (p = json_scan_ws(to->p + 1, end); *p != ']'; p = json_scan_ws(p + 1, end)) {
    p = json_scan_ws(json_scan_value(p, end, &e), end);
    const char *u = scan_str(&e, at);
    if (!u || !*u) return -1;
    list[n++] = u;
    if (*p == ']') break;
  }
  return (int)n;
}

static void post_message(imd *d, const http_request *req, http_response *r) {
  char stack[1024];
  char *scratch = req->body_len < sizeof stack ? stack : malloc(req->body_len + 1);
  push_body b;
  if (!scratch) {
    reply_error(r, 503, "out of memory");
    return;
  }
  const char **uids = NULL, *one[1];
  int nk = 0;
  if (!push_body_scan(req->body, req->body_len, scratch, &b)) {
    reply_error(r, 400, "body must be a JSON object");
    goto out;
  }
  bool to = b.to.kind, group = b.group.kind, room = b.room.kind, cid = b.cid.kind;
  int targets = to + group + room;
  const char *err = NULL;
  if (!b.data.kind)
    err = "missing data";
  else if (b.from.kind && (!b.from_s || !*b.from_s))
    err = "from must be a non-empty string";
  else if (targets != 1)
    err = "give exactly one of to, group, room";
  else if ((group && !b.group_s) || (room && !b.room_s))
    err = "group and room must be strings";
  else if (cid && (!b.cid_s || !*b.cid_s))
    err = "cid must be a non-empty string";
  else if (room && cid)
    err = "room messages are not stored: no cid";
  if (err) {
    reply_error(r, 400, err);
    goto out;
  }
  if (b.data.n > im_server_config(d->srv)->max_message) {
    reply_error(r, 413, "data over the message size limit");
    goto out;
  }
  char id[IM_ID_MAX];
  im_new_id(d->srv, id);
  const char *sender = b.from_s ? b.from_s : "system";
  if (room) {
    im_msg m = {.id = id, .from = sender, .room = b.room_s, .ts = imd_wall_ms(),
                .data = b.data.p, .data_len = b.data.n};
    push_room(d, b.room_s, &m, r);
    goto out;
  }
  /* stored: answered once the store has it (deferred), like a client's ack */
  imd_store_msg sm = {.id = id, .from = sender, .device = "", .ts = imd_wall_ms(),
                      .cid = b.cid_s, .data = b.data.p, .data_len = b.data.n};
  size_t k = 0;
  if (to) {
    nk = to_uids(&b.to, &b.at, one, &uids);
    if (nk == -2) {
      reply_error(r, 503, "out of memory");
      goto out;
    }
    k = nk > 0 ? unique_strings(uids, (size_t)nk) : 0;
    if (k == 1) sm.to = uids[0];
    if (nk <= 0) err = "to must be a non-empty uid or array of uids";
  } else {
    sm.group = b.group_s;
  }
  uint64_t ticket = 0;
  if (err) {
    reply_error(r, 400, err);
  } else if ((ticket = defer(r)) != 0 && to) {
    push_stored(d, ticket, &sm, uids, k);
  } else if (ticket) {
    group_push *g = group_push_new(d, ticket, &sm);
    if (!g || d->store->ops->group_members(d->store, sm.group, group_push_members, g) < 0) {
      free(g);
      respond_error(d, ticket, 500, "store failed");
    }
  }
out:
  if (uids != one) free((void *)uids);
  if (scratch != stack) free(scratch);
}

/* ---- users ---------------------------------------------------------------------- */

/* Every connection of the user on every node (libim asks its router). */
static void presence_known(im_server *srv, const char *uid, const im_route *routes, size_t n,
                           int status, void *arg) {
  imd *d = im_server_user(srv);
  uint64_t ticket = (uint64_t)(uintptr_t)arg;
  cJSON *o = cJSON_CreateObject();
  cJSON_AddStringToObject(o, "uid", uid);
  cJSON_AddBoolToObject(o, "online", n > 0);
  cJSON *arr = cJSON_AddArrayToObject(o, "connections");
  for (size_t i = 0; i < n; i++) {
    cJSON *c = cJSON_CreateObject();
    if (routes[i].node) cJSON_AddStringToObject(c, "node", routes[i].node);
    cJSON_AddStringToObject(c, "conn", routes[i].conn);
    cJSON_AddStringToObject(c, "device", routes[i].device);
    cJSON_AddStringToObject(c, "platform", routes[i].platform);
    cJSON_AddStringToObject(c, "address", routes[i].peer);
    cJSON_AddStringToObject(c, "transport", routes[i].transport == IM_TRANSPORT_TCP ? "tcp" : "ws");
    cJSON_AddNumberToObject(c, "since", (double)routes[i].since_ms);
    cJSON_AddItemToArray(arr, c);
  }
  cJSON_AddNumberToObject(o, "count", (double)n);
  if (status < 0) cJSON_AddBoolToObject(o, "partial", 1); /* other nodes could not be asked */
  respond_json(d, ticket, 200, o);
}

static void get_presence(imd *d, const char *uid, http_response *r) {
  uint64_t ticket = defer(r);
  if (ticket && im_presence(d->srv, uid, presence_known, (void *)(uintptr_t)ticket) < 0)
    respond_error(d, ticket, 503, "presence unavailable");
}

/* A store read on behalf of a deferred request. */
typedef struct api_req {
  imd *d;
  uint64_t ticket;
  char key[];   /* the uid or gid */
} api_req;

static api_req *api_req_new(imd *d, http_response *r, const char *key) {
  uint64_t ticket = defer(r);
  if (!ticket) return NULL;
  size_t n = strlen(key) + 1;
  api_req *q = malloc(sizeof *q + n);
  if (!q) {
    respond_error(d, ticket, 503, "out of memory");
    return NULL;
  }
  q->d = d;
  q->ticket = ticket;
  memcpy(q->key, key, n);
  return q;
}

static void inbox_known(void *arg, int status, uint64_t last, uint64_t trimmed,
                        const imd_device_mark *devs, size_t n) {
  api_req *q = arg;
  if (status < 0) {
    respond_store_error(q->d, q->ticket, status, "store failed");
    free(q);
    return;
  }
  cJSON *o = cJSON_CreateObject();
  cJSON_AddStringToObject(o, "uid", q->key);
  cJSON_AddNumberToObject(o, "last", (double)last);
  cJSON_AddNumberToObject(o, "trimmed", (double)trimmed);
  cJSON *devices = cJSON_AddArrayToObject(o, "devices");
  for (size_t i = 0; i < n; i++) {
    cJSON *e = cJSON_CreateObject();
    cJSON_AddStringToObject(e, "device", devs[i].device);
    cJSON_AddNumberToObject(e, "delivered", (double)devs[i].delivered);
    cJSON_AddItemToArray(devices, e);
  }
  respond_json(q->d, q->ticket, 200, o);
  free(q);
}

/* The user's inbox position: last seq, what retention trimmed, and how far
 * each device has ACKed. */
static void get_inbox(imd *d, const char *uid, http_response *r) {
  api_req *q = api_req_new(d, r, uid);
  if (q && d->store->ops->user_state(d->store, uid, inbox_known, q) < 0) {
    respond_error(d, q->ticket, 500, "store failed");
    free(q);
  }
}

/* Close the user's connections on every node (libim forwards through its
 * router); `kicked` counts this node's. */
static void post_kick(imd *d, const char *uid, http_response *r) {
  int kicked = im_kick_user(d->srv, uid, IM_CLOSE_KICKED, "kicked");
  if (kicked < 0) {
    reply_error(r, 503, im_strerror(kicked));
    return;
  }
  cJSON *o = cJSON_CreateObject();
  cJSON_AddStringToObject(o, "uid", uid);
  cJSON_AddNumberToObject(o, "kicked", (double)kicked);
  reply_json(r, 200, o);
}

/* Revoke uid: its tokens issued until now are refused from now on (kept in
 * DATA/revoked, so across restarts), and its connections on every node are
 * closed with 4411. */
static void post_revoke(imd *d, const char *uid, http_response *r) {
  if (strlen(uid) > IMD_UID_MAX || strchr(uid, '\n')) {
    reply_error(r, 400, "bad uid");
    return;
  }
  int64_t at = (int64_t)imd_wall_ms();
  imd_shared_lock();
  int added = imd_revoke_add(d->revoked, uid, at, d->cfg.max_token_ttl_s);
  imd_shared_unlock();
  if (added < 0) {
    reply_error(r, 500, "cannot record the revocation");
    return;
  }
  d->m.revocations++;
  /* the other nodes learn it through Redis within a second */
  if (imd_revoke_publish(d, uid, at) < 0)
    log_warn("revocation of %s not written to Redis (down?): other nodes still accept its tokens",
             uid);
  int closed = im_kick_user(d->srv, uid, IM_CLOSE_REVOKED, "revoked");
  cJSON *o = cJSON_CreateObject();
  cJSON_AddStringToObject(o, "uid", uid);
  cJSON_AddNumberToObject(o, "revoked_at", (double)at);
  cJSON_AddNumberToObject(o, "closed", closed < 0 ? 0 : (double)closed);
  reply_json(r, 200, o);
}

/* ---- groups ---------------------------------------------------------------------- */

static void members_known(void *arg, int status, const char *const *uids, size_t n) {
  api_req *q = arg;
  if (status < 0) {
    respond_store_error(q->d, q->ticket, status, "store failed");
  } else {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "gid", q->key);
    cJSON *arr = cJSON_AddArrayToObject(o, "members");
    for (size_t i = 0; i < n; i++) cJSON_AddItemToArray(arr, cJSON_CreateString(uids[i]));
    respond_json(q->d, q->ticket, 200, o);
  }
  free(q);
}

static void read_members(api_req *q) {
  if (q->d->store->ops->group_members(q->d->store, q->key, members_known, q) < 0) {
    respond_error(q->d, q->ticket, 500, "store failed");
    free(q);
  }
}

static void get_members(imd *d, const char *gid, http_response *r) {
  api_req *q = api_req_new(d, r, gid);
  if (q) read_members(q);
}

/* The change is durable (or failed, and nothing changed): answer with the
 * members as they are now. */
static void members_updated(void *arg, int status) {
  api_req *q = arg;
  if (status < 0) {
    respond_store_error(q->d, q->ticket, status, "cannot store the group");
    free(q);
    return;
  }
  read_members(q);
}

static void put_members(imd *d, const char *gid, const http_request *req, http_response *r) {
  cJSON *b = cJSON_ParseWithLength(req->body, req->body_len);
  const cJSON *add = cJSON_GetObjectItemCaseSensitive(b, "add");
  const cJSON *rm = cJSON_GetObjectItemCaseSensitive(b, "remove");
  const char **va = malloc(MAX_TARGETS * sizeof(*va)), **vr = malloc(MAX_TARGETS * sizeof(*vr));
  int na = add && va ? string_list(add, va, MAX_TARGETS) : 0;
  int nr = rm && vr ? string_list(rm, vr, MAX_TARGETS) : 0;
  const char *err = NULL;
  if (!cJSON_IsObject(b))
    err = "body must be a JSON object";
  else if (!add && !rm)
    err = "give add and/or remove";
  else if (na < 0 || nr < 0 || cJSON_IsString(add) || cJSON_IsString(rm))
    err = "add and remove must be arrays of non-empty uids";
  api_req *q = NULL;
  if (!va || !vr)
    reply_error(r, 503, "out of memory");
  else if (err)
    reply_error(r, 400, err);
  else if ((q = api_req_new(d, r, gid)) != NULL &&
           d->store->ops->group_update(d->store, gid, va, (size_t)na, vr, (size_t)nr,
                                       members_updated, q) < 0) {
    respond_error(d, q->ticket, 500, "cannot store the group");
    free(q);
  }
  free(va);
  free(vr);
  cJSON_Delete(b);
}

/* ---- bans ------------------------------------------------------------------------- */

static void list_ip_ban(const im_ban *b, void *arg) {
  cJSON *o = cJSON_CreateObject();
  cJSON_AddStringToObject(o, "ip", b->cidr);
  cJSON_AddNumberToObject(o, "until", (double)b->until_ms);
  cJSON_AddBoolToObject(o, "automatic", b->automatic);
  if (b->automatic) cJSON_AddNumberToObject(o, "level", b->level);
  cJSON_AddItemToArray(arg, o);
}

static void list_uid_ban(const char *uid, uint64_t until_ms, void *arg) {
  cJSON *o = cJSON_CreateObject();
  cJSON_AddStringToObject(o, "uid", uid);
  cJSON_AddNumberToObject(o, "until", (double)until_ms);
  cJSON_AddItemToArray(arg, o);
}

static cJSON *ban_list(imd *d) {
  cJSON *o = cJSON_CreateObject();
  cJSON *arr = cJSON_AddArrayToObject(o, "bans");
  im_guard_bans(d->srv, list_ip_ban, arr);
  imd_uid_bans(d, list_uid_ban, arr);
  return o;
}

static cJSON *ban_result(const char *name, bool ip, bool post, uint32_t secs, int closed) {
  cJSON *o = cJSON_CreateObject();
  cJSON_AddStringToObject(o, ip ? "ip" : "uid", name);
  cJSON_AddBoolToObject(o, "banned", post);
  if (post) cJSON_AddNumberToObject(o, "ttl", secs);
  if (post && ip) cJSON_AddNumberToObject(o, "closed", closed);
  return o;
}

/* In a cluster: a ban or lift waits for Redis before it is answered. */
typedef struct ban_answer {
  uint64_t ticket;
  bool ip, post, had; /* had: a lift found the ban on this node */
  uint32_t secs;
  int closed;
  char name[];
} ban_answer;

static void bans_listed(imd *d, void *arg, int status) {
  (void)status; /* Redis away: this node's list, which is the cluster's as last merged */
  respond_json(d, *(uint64_t *)arg, 200, ban_list(d));
  free(arg);
}

static void ban_shared(imd *d, void *arg, int status) {
  ban_answer *a = arg;
  if (status == IMD_BANS_EDOWN)
    respond_error(d, a->ticket, 503, "cluster unreachable: the change may not reach every node");
  else if (status == IMD_BANS_EFULL)
    respond_error(d, a->ticket, 507, "ban list full");
  else if (!a->post && status == IMD_BANS_ENOENT && !a->had)
    respond_error(d, a->ticket, 404, "no such ban");
  else
    respond_json(d, a->ticket, 200, ban_result(a->name, a->ip, a->post, a->secs, a->closed));
  free(a);
}

/* Write a ban or lift (done here already) to Redis and answer ticket once
 * Redis has it. */
static void share_ban(imd *d, uint64_t ticket, const char *uid, const char *cidr,
                      const char *name, bool post, uint32_t secs, int local_rc, int closed) {
  size_t n = strlen(name) + 1;
  ban_answer *a = malloc(sizeof *a + n);
  if (!a) {
    respond_error(d, ticket, 503, "out of memory");
    return;
  }
  *a = (ban_answer){ticket, cidr != NULL, post, local_rc == 0, secs, closed};
  memcpy(a->name, name, n);
  uint64_t until = post && secs ? imd_wall_ms() + (uint64_t)secs * 1000u : 0;
  if (imd_bans_share(d, uid, cidr, until, !post, ban_shared, a) < 0)
    ban_shared(d, a, IMD_BANS_EDOWN);
}

/* With --redis: GET reads the cluster's bans first; POST/DELETE are
 * written to Redis (every node applies them within about a second) and
 * answered when Redis confirmed. Returns false when not in a cluster. */
static bool bans_clustered(imd *d, http_response *r, const char *uid, const char *cidr,
                           const char *name, bool post, uint32_t secs, int local_rc, int closed) {
  if (!d->redis) return false;
  if (!uid && !cidr) { /* GET */
    uint64_t *t = malloc(sizeof *t);
    if (!t) {
      reply_json(r, 200, ban_list(d));
    } else if (!(*t = defer(r))) {
      free(t);
    } else if (imd_bans_refresh(d, bans_listed, t) < 0) {
      bans_listed(d, t, IMD_BANS_EDOWN);
    }
    return true;
  }
  uint64_t ticket = defer(r);
  if (ticket) share_ban(d, ticket, uid, cidr, name, post, secs, local_rc, closed);
  return true;
}

/* An address ban with worker threads: the guard is the workers' one
 * (im_shared), each worker closes its own connections from the address,
 * and "closed" is the sum. */
typedef struct ip_kick {
  uint64_t ticket;
  uint32_t secs;
  char ip[];
} ip_kick;

static int kick_ip_here(imd *w, void *arg) {
  return im_guard_kick(w->srv, ((ip_kick *)arg)->ip, IM_CLOSE_KICKED, "banned");
}

static void ip_kicked(imd *d, long n, int err, void *arg) {
  (void)err; /* a worker that could not be asked is missing from the count */
  ip_kick *k = arg;
  if (d->redis) /* and the other nodes' */
    share_ban(d, k->ticket, NULL, k->ip, k->ip, true, k->secs, 0, (int)n);
  else
    respond_json(d, k->ticket, 200, ban_result(k->ip, true, true, k->secs, (int)n));
  free(k);
}

static void kick_ip_workers(imd *d, const char *ip, uint32_t secs, http_response *r) {
  size_t len = strlen(ip) + 1;
  ip_kick *k = malloc(sizeof *k + len);
  uint64_t ticket = k ? defer(r) : 0;
  if (!ticket) {
    if (!k) reply_error(r, 503, "out of memory");
    free(k);
    return;
  }
  *k = (ip_kick){.ticket = ticket, .secs = secs};
  memcpy(k->ip, ip, len);
  if (imd_workers_gather(d, kick_ip_here, ip_kicked, k) < 0) {
    respond_error(d, ticket, 503, "out of memory");
    free(k);
  }
}

/* /healthz: 200 {"status":"ok"} unless draining or (in a cluster) the
 * Redis link is down: 503 with "draining" or "degraded". */
static cJSON *health_json(imd *d, bool clustered, bool up, int *status) {
  cJSON *o = cJSON_CreateObject();
  cJSON_AddStringToObject(o, "status", d->draining ? "draining" : up ? "ok" : "degraded");
  if (clustered) cJSON_AddStringToObject(o, "redis", up ? "up" : "down");
  *status = up && !d->draining ? 200 : 503;
  return o;
}

static int redis_up_here(imd *w, void *arg) {
  (void)arg;
  return im_redis_up(w->redis) ? 1 : 0;
}

static void health_known(imd *d, long up, int err, void *arg) {
  uint64_t *ticket = arg;
  int status;
  cJSON *o = health_json(d, true, err == 0 && up == (long)im_group_size(d->group), &status);
  respond_json(d, *ticket, status, o);
  free(ticket);
}

/* GET lists; POST {"ip":"10.0.0.0/8"|"uid":"bob","ttl":S} bans (and closes the
 * matching live sessions); DELETE the same body lifts. In a cluster, on
 * every node (bans_clustered). */
static void bans(imd *d, const http_request *req, http_response *r) {
  if (req->method == HTTP_GET) {
    if (!bans_clustered(d, r, NULL, NULL, NULL, false, 0, 0, 0)) reply_json(r, 200, ban_list(d));
    return;
  }
  cJSON *b = cJSON_ParseWithLength(req->body, req->body_len);
  const cJSON *ip = cJSON_GetObjectItemCaseSensitive(b, "ip");
  const cJSON *uid = cJSON_GetObjectItemCaseSensitive(b, "uid");
  const cJSON *ttl = cJSON_GetObjectItemCaseSensitive(b, "ttl");
  bool post = req->method == HTTP_POST;
  const char *err = NULL;
  char cidr[64];
  if (!cJSON_IsObject(b) || (ip != NULL) + (uid != NULL) != 1)
    err = "give one of ip, uid";
  else if ((ip && !cJSON_IsString(ip)) || (uid && (!cJSON_IsString(uid) || !*uid->valuestring)))
    err = "ip and uid must be non-empty strings";
  else if (ttl && (!cJSON_IsNumber(ttl) || ttl->valuedouble < 0 || ttl->valuedouble > 31536000 ||
                   ttl->valuedouble != (double)(uint32_t)ttl->valuedouble))
    err = "ttl must be whole seconds, 0 to 31536000 (0: until lifted)";
  else if (ip && im_guard_canon(ip->valuestring, cidr, sizeof cidr) < 0)
    err = "ip must be an address or ADDR/BITS";
  else if (uid && strlen(uid->valuestring) > IMD_UID_MAX)
    err = "cannot ban";
  uint32_t secs = ttl ? (uint32_t)ttl->valuedouble : 0;
  int rc = 0, closed = 0;
  if (!err && ip) { /* with workers, one guard for all of them (im_shared) */
    rc = post ? im_guard_ban(d->srv, cidr, secs) : im_guard_unban(d->srv, cidr);
    if (rc == 0 && post && d->workers) { /* in a cluster, shared once the workers closed theirs */
      kick_ip_workers(d, cidr, secs, r);
      cJSON_Delete(b);
      return;
    }
    if (rc == 0 && post) closed = im_guard_kick(d->srv, cidr, IM_CLOSE_KICKED, "banned");
  } else if (!err) {
    rc = post ? imd_ban_uid(d, uid->valuestring, secs) : imd_unban_uid(d, uid->valuestring);
  }
  const char *name = ip ? ip->valuestring : uid ? uid->valuestring : "";
  if (err) {
    reply_error(r, 400, err);
  } else if (post && rc < 0) {
    reply_error(r, rc == IM_ELIMIT ? 507 : 400, rc == IM_ELIMIT ? "ban list full" : "cannot ban");
  } else if (bans_clustered(d, r, ip ? NULL : name, ip ? cidr : NULL, name, post, secs, rc,
                            closed)) {
    /* answered when Redis has it */
  } else if (rc < 0) {
    reply_error(r, 404, "no such ban");
  } else {
    reply_json(r, 200, ban_result(name, ip != NULL, post, secs, closed));
  }
  cJSON_Delete(b);
}

/* ---- drain ----------------------------------------------------------------------- */

static cJSON *draining_json(long conns) {
  cJSON *o = cJSON_CreateObject();
  cJSON_AddBoolToObject(o, "draining", 1);
  cJSON_AddNumberToObject(o, "connections", (double)conns);
  return o;
}

/* With worker threads every worker drains and counts its own connections;
 * "connections" is the sum. */
static int drain_here(imd *w, void *arg) {
  (void)arg;
  return (int)imd_drain(w);
}

static void drained(imd *d, long n, int err, void *arg) {
  (void)err; /* a worker that could not be asked is missing from the count */
  uint64_t *ticket = arg;
  respond_json(d, *ticket, 202, draining_json(n));
  free(ticket);
}

static void drain_workers(imd *d, http_response *r) {
  uint64_t *ticket = malloc(sizeof *ticket);
  if (!ticket || !(*ticket = defer(r))) {
    if (!ticket) reply_error(r, 503, "out of memory");
    free(ticket);
    return;
  }
  if (imd_workers_gather(d, drain_here, drained, ticket) < 0) {
    respond_error(d, *ticket, 503, "out of memory");
    free(ticket);
  }
}

/* ---- gateways -------------------------------------------------------------------- */

static void gateways_known(void *arg, int status, const im_gateway *gw, size_t n) {
  api_req *q = arg;
  if (status < 0) {
    respond_error(q->d, q->ticket, 503, "cluster unavailable");
    free(q);
    return;
  }
  cJSON *o = cJSON_CreateObject();
  cJSON *arr = cJSON_AddArrayToObject(o, "gateways");
  for (size_t i = 0; i < n; i++) {
    cJSON *g = cJSON_CreateObject();
    cJSON_AddStringToObject(g, "node", gw[i].node);
    if (gw[i].ws && *gw[i].ws) cJSON_AddStringToObject(g, "ws", gw[i].ws);
    if (gw[i].tcp && *gw[i].tcp) cJSON_AddStringToObject(g, "tcp", gw[i].tcp);
    cJSON_AddNumberToObject(g, "conns", (double)gw[i].conns);
    cJSON_AddItemToArray(arr, g);
  }
  respond_json(q->d, q->ticket, 200, o);
  free(q);
}

/* The uid of "?uid=U" (percent-decoded into out); "" when absent. */
static int query_uid(const http_request *req, char *out, size_t cap) {
  out[0] = '\0';
  if (!req->query) return 0;
  const char *end = req->query + req->query_len;
  for (const char *p = req->query; p < end;) {
    const char *amp = memchr(p, '&', (size_t)(end - p));
    if (!amp) amp = end;
    if (amp - p > 4 && !memcmp(p, "uid=", 4)) {
      size_t o = 0;
      for (const char *c = p + 4; c < amp; c++) {
        if (o + 1 >= cap) return -1;
        if (*c == '%') {
          if (amp - c < 3) return -1;
          char hex[3] = {c[1], c[2], 0}, *e;
          long v = strtol(hex, &e, 16);
          if (*e || v <= 0) return -1;
          out[o++] = (char)v;
          c += 2;
        } else {
          out[o++] = *c == '+' ? ' ' : *c;
        }
      }
      out[o] = '\0';
    }
    p = amp + 1;
  }
  return 0;
}

static void get_gateways(imd *d, const http_request *req, http_response *r) {
  char uid[IMD_UID_MAX + 1];
  if (query_uid(req, uid, sizeof uid) < 0) {
    reply_error(r, 400, "bad uid");
    return;
  }
  api_req *q = api_req_new(d, r, uid);
  if (q && imd_gateways(d, uid, gateways_known, q) < 0) {
    respond_error(d, q->ticket, 503, "cluster unavailable");
    free(q);
  }
}

/* With --static, every path but the API's (/v1/..., /healthz, /metrics)
 * is a file: no API key needed. */
static bool static_path(const imd *d, const http_request *req) {
  if (!d->cfg.static_dir) return false;
  const char *p = req->path;
  size_t n = req->path_len;
  static const char *const api[] = {"/v1", "/healthz", "/metrics"};
  for (size_t i = 0; i < sizeof api / sizeof api[0]; i++) {
    size_t k = strlen(api[i]);
    if (n >= k && !memcmp(p, api[i], k) && (n == k || p[k] == '/' || p[k] == '%')) return false;
  }
  return true;
}

static void route(imd *d, const http_request *req, http_response *r) {
  if (static_path(d, req)) {
    imd_static_serve(d->cfg.static_dir, req, r);
    return;
  }
  char buf[1024], *seg[PATH_MAX_SEGS];
  int n = split_path(req->path, req->path_len, buf, sizeof buf, seg);
  if (n < 0) {
    reply_error(r, n == -1 && req->path_len >= sizeof buf ? 414 : 400, "bad path");
    return;
  }
  bool get = req->method == HTTP_GET, post = req->method == HTTP_POST, put = req->method == HTTP_PUT;
  if (n == 1 && !strcmp(seg[0], "healthz")) {
    if (!get) goto method;
    if (d->redis && d->workers) { /* up when every worker's connection is */
      uint64_t *t = malloc(sizeof *t);
      if (t && (*t = defer(r)) && imd_workers_gather(d, redis_up_here, health_known, t) == 0)
        return;
      if (t && *t) respond_error(d, *t, 503, "out of memory");
      if (!t) reply_error(r, 503, "out of memory");
      free(t);
      return;
    }
    const char *redis = imd_redis_state(d);
    int status;
    cJSON *o = health_json(d, redis != NULL, !redis || !strcmp(redis, "up"), &status);
    reply_json(r, status, o);
    return;
  }
  if (!authorized(d, req)) {
    reply_error(r, 401, "missing or bad API key");
    return;
  }
  if (n == 1 && !strcmp(seg[0], "metrics")) {
    if (!get) goto method;
    if (d->workers) { /* every worker adds its numbers on its own loop */
      uint64_t ticket = defer(r);
      if (ticket) imd_metrics_respond(d, ticket);
      return;
    }
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
    if (!strcmp(seg[3], "revoke")) {
      if (!post) goto method;
      post_revoke(d, seg[2], r);
      return;
    }
  }
  if (n == 2 && !strcmp(seg[1], "bans")) {
    if (!get && !post && req->method != HTTP_DELETE) goto method;
    bans(d, req, r);
    return;
  }
  if (n == 2 && !strcmp(seg[1], "gateways")) {
    if (!get) goto method;
    get_gateways(d, req, r);
    return;
  }
  if (n == 3 && !strcmp(seg[1], "admin") && !strcmp(seg[2], "drain")) {
    if (!post) goto method;
    if (d->workers) {
      drain_workers(d, r);
      return;
    }
    reply_json(r, 202, draining_json((long)imd_drain(d)));
    return;
  }
  if (n == 4 && !strcmp(seg[1], "groups") && *seg[2] && !strcmp(seg[3], "members")) {
    if (put)
      put_members(d, seg[2], req, r);
    else if (get)
      get_members(d, seg[2], r);
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

void imd_api_handle(void *user, const http_request *req, http_response *resp) {
  route(user, req, resp);
}

/* Access log: every request at debug, one in ACCESS_SAMPLE at info (a hot
 * path must not write a line per request). */
#define ACCESS_SAMPLE 100

void imd_api_done(void *user, const http_done *r) {
  imd *d = user;
  enum imd_log_level lv = d->m.http_requests % ACCESS_SAMPLE == 0 ? IMD_LOG_INFO : IMD_LOG_DEBUG;
  d->m.http_requests++;
  if (r->status >= 100 && r->status < 600) d->m.http_status[r->status / 100]++;
  if (!imd_log_on(lv)) return;
  char path[256], code[8];
  snprintf(path, sizeof path, "%.*s", (int)(r->path_len < 255 ? r->path_len : 255), r->path);
  snprintf(code, sizeof code, "%d", r->status);
  imd_log(lv, IMD_FIELDS("method", llhttp_method_name((llhttp_method_t)r->method), "path", path,
                         "status", code, "peer", r->peer ? r->peer : ""),
          "http request");
}
