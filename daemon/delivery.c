/* Store, then deliver: the path of every stored message (1:1 or group,
 * from a client or the HTTP API) between its producer and the store.
 *
 * A message is parked here (one copy) and appended to every receiver's inbox
 * through the asynchronous store (store.h). When the store answers that it
 * is durable, the parked message is pushed to the receivers' connections,
 * local or elsewhere through libim's router, as reliable sends carrying each
 * receiver's seq, and the producer learns the outcome through its
 * completion callback (chat.c acks the sender, api.c answers HTTP). So
 * nothing is acknowledged that is not durable, and no seq is pushed before
 * every smaller seq of that user is stored: a client that sees seq N can
 * always fetch 1..N by sync.
 */
#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libim/im_router.h>

#include "imd.h"
#include "log.h"
#include "store_redis.h"

/* One message waiting for the store. The strings and arrays live in the
 * same allocation, after the struct. */
typedef struct parked {
  imd *d;
  im_conn_id except;        /* sender's connection: skipped in delivery; 0 = none */
  imd_delivered_cb cb;
  uint64_t tag;
  size_t n;                 /* receivers */
  const char **uids;
  uint64_t *seqs;
  size_t sender;            /* index of the sender in uids, or n */
  imd_store_msg m;          /* strings point into this allocation */
  char id[IM_ID_MAX];
} parked;

static parked *park_new(const imd_store_msg *m, const char *const *uids, size_t n) {
  const char *strs[] = {m->from, m->device, m->cid, m->to, m->group}, *out[5];
  size_t len = sizeof(parked) + n * (sizeof(char *) + sizeof(uint64_t)) +
               imd_strs_size(uids, n) + imd_strs_size(strs, 5) + m->data_len + 1;
  parked *p = malloc(len);
  if (!p) return NULL;
  memset(p, 0, sizeof *p);
  p->seqs = (uint64_t *)(p + 1);
  p->uids = (const char **)(p->seqs + n);
  char *at = (char *)(p->uids + n);
  p->n = n;
  p->sender = n;
  imd_strs_copy(&at, uids, p->uids, n);
  for (size_t i = 0; i < n; i++)
    if (m->from && !strcmp(uids[i], m->from)) p->sender = i;
  imd_strs_copy(&at, strs, out, 5);
  p->m.from = out[0];
  p->m.device = out[1];
  p->m.cid = out[2];
  p->m.to = out[3];
  p->m.group = out[4];
  memcpy(at, m->data, m->data_len);
  at[m->data_len] = '\0';
  p->m.data = at;
  p->m.data_len = m->data_len;
  p->m.ts = m->ts;
  size_t il = strnlen(m->id, sizeof p->id - 1); /* ids are at most 23 bytes (store.h) */
  memcpy(p->id, m->id, il);
  p->id[il] = '\0';
  p->m.id = p->id;
  return p;
}

/* A stored message as it is pushed to connections (seq: the receiver's). */
static im_msg push_msg(const imd_store_msg *m) {
  return (im_msg){.id = m->id, .from = m->from, .to = m->to, .group = m->group, .ts = m->ts,
                  .data = m->data, .data_len = m->data_len, .flags = IM_SEND_RELIABLE};
}

/* The store answered for p: push it (when new and durable), then report.
 * IMD_STORE_PUSHED: the store's script pushed it to the other nodes
 * already, so only this node's connections are left. */
static void on_appended(void *arg, int status, const uint64_t *seqs, const char *id) {
  parked *p = arg;
  imd *d = p->d;
  imd_delivery res = {.status = status == IMD_STORE_PUSHED ? IMD_STORE_OK : status,
                      .id = p->id, .cid = p->m.cid};
  if (status == IMD_STORE_OK || status == IMD_STORE_PUSHED) {
    memcpy(p->seqs, seqs, p->n * sizeof *seqs);
    im_msg out = push_msg(&p->m);
    imd_catch_up(d); /* what other workers pushed earlier goes out first */
    for (size_t i = 0; i < p->n; i++) {
      out.seq = p->seqs[i];
      int r = status == IMD_STORE_PUSHED /* the other nodes have it: this process's workers */
                  ? im_group_local_send_users(d->group, d->srv, &p->uids[i], 1, &out, p->except)
                  : im_send_user(d->srv, p->uids[i], &out, p->except);
      if (r > 0) res.reached += r;
    }
    res.stored = p->n;
    res.sender_seq = p->sender < p->n ? p->seqs[p->sender] : 0;
    d->m.stored++;
  } else if (status == IMD_STORE_DUP) {
    snprintf(p->id, sizeof p->id, "%s", id); /* the first append's id */
    d->m.duplicates++;
  } else {
    d->m.store_errors++;
  }
  d->m.batched++;
  p->cb(d, p->tag, &res);
  free(p);
}

int imd_deliver(imd *d, const imd_store_msg *m, const char *const *uids, size_t n,
                im_conn_id except, imd_delivered_cb cb, uint64_t tag) {
  parked *p = park_new(m, uids, n);
  if (!p) return IMD_STORE_EIO;
  p->d = d;
  p->except = except;
  p->cb = cb;
  p->tag = tag;
  int rc = imd_store_append(d->store, &p->m, p->uids, p->n, on_appended, p);
  if (rc < 0) {
    free(p);
    d->m.store_errors++;
    log_warn("store append failed: %s", d->store->ops->error(d->store));
  }
  return rc;
}

void imd_mark_delivered(imd *d, const char *uid, const char *device, uint64_t seq) {
  imd_store_mark(d->store, uid, device, seq);
}

/* ---- sync ------------------------------------------------------------------ */

typedef struct sync_req {
  imd *d;
  im_conn_id c;
  uint64_t since;
} sync_req;

static void on_synced(void *arg, int status, const imd_stored *msgs, size_t n,
                      const imd_sync_info *info) {
  sync_req *x = arg;
  imd *d = x->d;
  if (status < 0) {
    d->m.store_errors++;
    im_reply_error(d->srv, x->c, status == IMD_STORE_EDOWN ? 503 : 500,
                   status == IMD_STORE_EDOWN ? "store unavailable" : "sync failed", NULL);
    free(x);
    return;
  }
  for (size_t i = 0; i < n; i++) {
    const imd_store_msg *m = &msgs[i].m;
    im_msg out = {.id = m->id, .from = m->from, .to = m->to, .group = m->group,
                  .seq = msgs[i].seq, .ts = m->ts, .data = m->data, .data_len = m->data_len};
    int rc = im_send_conn(d->srv, x->c, &out);
    if (rc != 0 && rc != IM_ETOOBIG) break; /* the connection is gone */
  }
  /* a client ahead of the inbox (restored from a backup, or a since it
   * made up) is told where the inbox really ends: last < its since */
  im_sync_end(d->srv, x->c, x->since > info->last ? info->last : info->upto, info->more, info->gap);
  free(x);
}

void imd_sync(imd *d, im_conn_id c, const char *uid, uint64_t since, uint32_t limit) {
  if (limit == 0) limit = IMD_SYNC_DEFAULT;
  if (limit > IMD_SYNC_MAX) limit = IMD_SYNC_MAX;
  d->m.syncs++;
  sync_req *x = malloc(sizeof *x);
  if (x) *x = (sync_req){d, c, since};
  /* a sync answer is cut at a byte budget well under the output bound, so
   * that no answer can shed the client that asked for it */
  size_t budget = im_server_config(d->srv)->max_output / 4;
  int rc = x ? imd_store_sync(d->store, uid, since, limit, budget, on_synced, x) : IMD_STORE_EIO;
  if (rc < 0) {
    free(x);
    d->m.store_errors++;
    im_reply_error(d->srv, c, rc == IMD_STORE_EDOWN ? 503 : 500,
                   rc == IMD_STORE_EDOWN ? "store unavailable" : "sync failed", NULL);
  }
}

/* ---- repair ------------------------------------------------------------------- */

typedef struct repair_req {
  imd *d;
  im_conn_id c;
  char uid[];
} repair_req;

static void repair_push(void *arg, int status, const imd_stored *msgs, size_t n,
                        const imd_sync_info *info) {
  (void)info;
  repair_req *q = arg;
  for (size_t i = 0; status == 0 && i < n; i++) {
    const imd_store_msg *m = &msgs[i].m;
    im_msg out = {.id = m->id, .from = m->from, .to = m->to, .group = m->group,
                  .seq = msgs[i].seq, .ts = m->ts, .data = m->data, .data_len = m->data_len,
                  .flags = IM_SEND_RELIABLE};
    if (im_send_conn(q->d->srv, q->c, &out) == IM_ENOENT) break;
  }
  free(q);
}

static void repair_from_mark(void *arg, int status, uint64_t last, uint64_t trimmed,
                             const imd_device_mark *devs, size_t n) {
  (void)trimmed;
  repair_req *q = arg;
  im_conn_info info = {IM_STRUCT_SIZE(im_conn_info)};
  if (status < 0 || im_conn_get_info(q->d->srv, q->c, &info) < 0 || !info.uid) {
    free(q);
    return;
  }
  uint64_t mark = 0;
  for (size_t i = 0; i < n; i++)
    if (!strcmp(devs[i].device, info.device)) mark = devs[i].delivered;
  size_t budget = im_server_config(q->d->srv)->max_output / 4;
  if (mark >= last ||
      imd_store_sync(q->d->store, q->uid, mark, IMD_SYNC_MAX, budget, repair_push, q) < 0)
    free(q);
}

void imd_repair(imd *d, im_conn_id c) {
  im_conn_info info = {IM_STRUCT_SIZE(im_conn_info)};
  if (im_conn_get_info(d->srv, c, &info) < 0 || !info.uid) return;
  size_t n = strlen(info.uid) + 1;
  repair_req *q = malloc(sizeof *q + n);
  if (!q) return;
  q->d = d;
  q->c = c;
  memcpy(q->uid, info.uid, n);
  if (d->store->ops->user_state(d->store, q->uid, repair_from_mark, q) < 0) free(q);
}

/* ---- lifecycle --------------------------------------------------------------- */

/* The Redis store's commands go over the cluster module's connection, in
 * order with its route writes. */
static int redis_command(void *ctx, int argc, const char **argv, const size_t *argvlen,
                         imd_redis_reply_fn fn, void *arg) {
  return im_redis_command(ctx, argc, argv, argvlen, fn, arg) == 0 ? 0 : -1;
}

/* The arguments of the store script's push (im_redis.h): this node, the
 * prefix, the streams' MAXLEN, and m encoded as pushed. */
static int redis_push_args(void *ctx, const imd_store_msg *m, const char *args[4],
                           size_t lens[4], void **owned) {
  im_msg out = push_msg(m);
  void *head;
  size_t len;
  if (im_redis_push_argv(ctx, args) != 0 || im_redis_encode_head(&out, &head, &len) != 0)
    return -1;
  for (int i = 0; i < 3; i++) lens[i] = strlen(args[i]);
  args[3] = head;
  lens[3] = len;
  *owned = head;
  return 0;
}

static void on_store_tick(evutil_socket_t fd, short what, void *arg) {
  (void)fd;
  (void)what;
  imd *d = arg;
  /* the retention is the store's, not the worker's: worker 0 runs it */
  imd_store_redis_tick(d->store, imd_wall_ms(), d->worker == 0);
  if (d->worker != 0) return; /* the process's tables: worker 0 polls for all */
  imd_revoke_poll(d); /* revocations made through other nodes */
  imd_bans_poll(d);   /* and bans */
}

void imd_delivery_reconnected(imd *d) {
  if (d->redis && d->store) imd_store_redis_load_scripts(d->store);
}

/* A Redis store on d's cluster link (worker 0's, or a worker's handle: its
 * own connection), ticked each second. */
static int redis_store(imd *d, const imd_store_opts *o) {
  char err[512];
  imd_redis_io io = {redis_command, d->redis, im_redis_push_lua(), redis_push_args};
  d->store = imd_store_redis_new(&io, d->cfg.redis_prefix, o, err, sizeof err);
  d->trim_ev = d->store ? event_new(d->base, -1, EV_PERSIST, on_store_tick, d) : NULL;
  struct timeval every = {1, 0};
  if (!d->store || !d->trim_ev || event_add(d->trim_ev, &every) < 0) {
    fprintf(stderr, "imd: cannot start the Redis store: %s\n", d->store ? "no memory" : err);
    return -1;
  }
  return 0;
}

int imd_delivery_worker(imd *w, imd *d) {
  if (w->redis) return redis_store(w, &d->store_opts);
  w->store = imd_store_sqlite_view(d->store, w->base);
  if (!w->store) fprintf(stderr, "imd: worker %u: out of memory\n", w->worker);
  return w->store ? 0 : -1;
}

int imd_delivery_init(imd *d, const imd_store_opts *o) {
  char path[4096], groups[4096], err[512];
  d->store_opts = *o;
  if (d->redis) {
    if (redis_store(d, o) < 0) return -1;
    imd_revoke_poll(d); /* the cluster's revocations, before the first tick if Redis is up */
    return 0;
  }
  snprintf(path, sizeof path, "%s/imd.db", d->cfg.data_dir);
  snprintf(groups, sizeof groups, "%s/groups.json", d->cfg.data_dir);
  d->store = imd_store_sqlite_start(d->base, path, o, IMD_TRIM_INTERVAL_S, groups, err, sizeof err);
  if (!d->store) {
    fprintf(stderr, "imd: cannot open the store %s: %s\n", path, err);
    return -1;
  }
  return 0;
}

void imd_delivery_free(imd *d) {
  if (d->trim_ev) event_free(d->trim_ev);
  d->trim_ev = NULL;
  if (d->store) d->store->ops->close(d->store); /* completes what is outstanding */
  d->store = NULL;
}
