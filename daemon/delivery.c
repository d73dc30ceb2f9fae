/* Store, then deliver: the group-commit pipeline between the chat handlers
 * (and the HTTP API) and the message store.
 *
 * A stored message (1:1 or group, from a client or the HTTP API) is
 * appended to every receiver's inbox inside the open batch and parked here.
 * Once per event-loop pass (an event made active on the first append) the
 * batch is committed with one fsync; only then are the parked messages
 * pushed to the receivers' connections (as reliable sends carrying each
 * receiver's seq) and acknowledged to their senders. So nothing is acked
 * that is not durable, and no seq is pushed before every smaller seq of that
 * user is stored: a client that sees seq N can always fetch 1..N by sync.
 */
#include <cjson/cJSON.h>
#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "imd.h"

/* One message waiting for the commit of its batch. The strings and arrays
 * live in the same allocation, after the struct. */
typedef struct parked {
  struct parked *next;
  im_conn_id conn;          /* sender's connection: acked, skipped in delivery; 0 = none */
  uint64_t ticket;          /* HTTP request to answer; 0 = none */
  bool dup;                 /* already stored earlier: ack with `id` only */
  size_t n;                 /* receivers */
  const char **uids;
  uint64_t *seqs;
  size_t sender;            /* index of the sender in uids, or n */
  imd_store_msg m;          /* strings point into this allocation */
  char id[IM_ID_MAX];
} parked;

static char *copy_into(char **at, const char *s, size_t n) {
  if (!s) return NULL;
  char *d = *at;
  memcpy(d, s, n);
  d[n] = '\0';
  *at += n + 1;
  return d;
}

static parked *park_new(const imd_store_msg *m, const char *const *uids, size_t n) {
  const char *strs[] = {m->from, m->device, m->cid, m->to, m->group};
  size_t len = sizeof(parked) + n * (sizeof(char *) + sizeof(uint64_t)) + m->data_len + 1;
  for (size_t i = 0; i < sizeof strs / sizeof strs[0]; i++)
    if (strs[i]) len += strlen(strs[i]) + 1;
  for (size_t i = 0; i < n; i++) len += strlen(uids[i]) + 1;
  parked *p = malloc(len);
  if (!p) return NULL;
  memset(p, 0, sizeof *p);
  p->seqs = (uint64_t *)(p + 1);
  p->uids = (const char **)(p->seqs + n);
  char *at = (char *)(p->uids + n);
  p->n = n;
  p->sender = n;
  for (size_t i = 0; i < n; i++) {
    p->uids[i] = copy_into(&at, uids[i], strlen(uids[i]));
    if (m->from && !strcmp(uids[i], m->from)) p->sender = i;
  }
  p->m.from = copy_into(&at, m->from, m->from ? strlen(m->from) : 0);
  p->m.device = copy_into(&at, m->device, m->device ? strlen(m->device) : 0);
  p->m.cid = copy_into(&at, m->cid, m->cid ? strlen(m->cid) : 0);
  p->m.to = copy_into(&at, m->to, m->to ? strlen(m->to) : 0);
  p->m.group = copy_into(&at, m->group, m->group ? strlen(m->group) : 0);
  p->m.data = copy_into(&at, m->data, m->data_len);
  p->m.data_len = m->data_len;
  p->m.ts = m->ts;
  snprintf(p->id, sizeof p->id, "%s", m->id);
  p->m.id = p->id;
  return p;
}

/* The batch of p is durable (ok) or lost: tell everyone concerned. */
static void settle(imd *d, parked *p, bool ok) {
  if (!ok) {
    d->m.store_errors++;
    if (p->conn) im_reply_error(d->srv, p->conn, 500, "store failed", p->m.cid);
    if (p->ticket) imd_http_respond(d, p->ticket, 500, imd_error_body("store failed"));
    return;
  }
  int reached = 0;
  if (!p->dup) {
    im_msg out = {.id = p->id, .from = p->m.from, .to = p->m.to, .group = p->m.group,
                  .ts = p->m.ts, .data = p->m.data, .data_len = p->m.data_len,
                  .flags = IM_SEND_RELIABLE};
    for (size_t i = 0; i < p->n; i++) {
      out.seq = p->seqs[i];
      int r = im_send_user(d->srv, p->uids[i], &out, p->conn);
      if (r > 0) reached += r;
    }
    d->m.stored++;
  }
  if (p->conn)
    im_ack(d->srv, p->conn, p->m.cid, p->id, p->sender < p->n && !p->dup ? p->seqs[p->sender] : 0);
  if (p->ticket) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "id", p->id);
    cJSON_AddNumberToObject(o, "delivered", reached);
    cJSON_AddNumberToObject(o, "stored", p->dup ? 0 : (double)p->n);
    if (p->dup) cJSON_AddBoolToObject(o, "duplicate", 1);
    imd_http_respond(d, p->ticket, 200, cJSON_PrintUnformatted(o));
    cJSON_Delete(o);
  }
}

void imd_flush(imd *d) {
  if (!imd_store_in_batch(d->store) && !d->parked) return;
  uint64_t t0 = imd_mono_us();
  int rc = imd_store_commit(d->store);
  d->m.commit_us += imd_mono_us() - t0;
  d->m.commits++;
  if (rc < 0) fprintf(stderr, "imd: store commit failed: %s\n", imd_store_error(d->store));
  /* detach first: settling may park new messages (from callbacks) */
  parked *p = d->parked;
  d->parked = d->parked_tail = NULL;
  while (p) {
    parked *next = p->next;
    d->m.batched++;
    settle(d, p, rc == 0);
    free(p);
    p = next;
  }
}

static void on_flush(evutil_socket_t fd, short what, void *arg) {
  (void)fd;
  (void)what;
  imd_flush(arg);
}

/* Commit at the end of this loop pass: libevent runs an activated event
 * after the I/O callbacks already due, and activating it again is a no-op. */
static void schedule_flush(imd *d) { event_active(d->flush_ev, EV_TIMEOUT, 0); }

int imd_store_and_deliver(imd *d, const imd_store_msg *m, const char *const *uids, size_t n,
                          im_conn_id conn, uint64_t ticket) {
  parked *p = park_new(m, uids, n);
  if (!p) return 500;
  /* the seqs land in the parked copy; a duplicate's stored id replaces p->id */
  int rc = imd_store_append(d->store, m, uids, n, p->seqs, p->id);
  if (rc < 0) {
    free(p);
    d->m.store_errors++;
    fprintf(stderr, "imd: store append failed: %s\n", imd_store_error(d->store));
    return rc == IMD_STORE_EINVAL ? 400 : 500;
  }
  p->conn = conn;
  p->ticket = ticket;
  if (rc == IMD_STORE_DUP) {
    p->dup = true;
    d->m.duplicates++;
  }
  if (d->parked_tail)
    d->parked_tail->next = p;
  else
    d->parked = p;
  d->parked_tail = p;
  schedule_flush(d);
  return 0;
}

void imd_mark_delivered(imd *d, const char *uid, const char *device, uint64_t seq) {
  if (imd_store_mark_delivered(d->store, uid, device, seq) == 0) schedule_flush(d);
}

/* ---- sync ------------------------------------------------------------------ */

typedef struct sync_ctx {
  imd *d;
  im_conn_id c;
} sync_ctx;

static int sync_one(void *arg, uint64_t seq, const imd_store_msg *m) {
  sync_ctx *x = arg;
  im_msg out = {.id = m->id, .from = m->from, .to = m->to, .group = m->group, .seq = seq,
                .ts = m->ts, .data = m->data, .data_len = m->data_len};
  int rc = im_send_conn(x->d->srv, x->c, &out);
  return rc == 0 || rc == IM_ETOOBIG ? 0 : 1; /* stop when the connection is gone */
}

void imd_sync(imd *d, im_conn_id c, const char *uid, uint64_t since, uint32_t limit) {
  if (limit == 0) limit = IMD_SYNC_DEFAULT;
  if (limit > IMD_SYNC_MAX) limit = IMD_SYNC_MAX;
  imd_flush(d); /* sync reads only what is durable, and everything that is */
  sync_ctx x = {d, c};
  imd_sync_info info;
  int rc = imd_store_sync(d->store, uid, since, limit, sync_one, &x, &info);
  d->m.syncs++;
  if (rc < 0) {
    d->m.store_errors++;
    im_reply_error(d->srv, c, 500, "sync failed", NULL);
    return;
  }
  /* a client ahead of the inbox (restored from a backup, or a since it
   * made up) is told where the inbox really ends: last < its since */
  im_sync_end(d->srv, c, since > info.last ? info.last : info.upto, info.more, info.gap);
}

/* ---- lifecycle --------------------------------------------------------------- */

static void on_trim(evutil_socket_t fd, short what, void *arg) {
  (void)fd;
  (void)what;
  imd *d = arg;
  imd_flush(d);
  long n = imd_store_trim(d->store, imd_wall_ms());
  if (n > 0) d->m.trimmed += (uint64_t)n;
  if (n < 0) fprintf(stderr, "imd: retention trim failed: %s\n", imd_store_error(d->store));
}

int imd_delivery_init(imd *d, const imd_store_opts *o) {
  char path[4096], err[256];
  snprintf(path, sizeof path, "%s/imd.db", d->cfg.data_dir);
  d->store = imd_store_open(path, o, err, sizeof err);
  if (!d->store) {
    fprintf(stderr, "imd: cannot open the store %s: %s\n", path, err);
    return -1;
  }
  d->flush_ev = event_new(d->base, -1, 0, on_flush, d);
  d->trim_ev = event_new(d->base, -1, EV_PERSIST, on_trim, d);
  if (!d->flush_ev || !d->trim_ev) {
    fprintf(stderr, "imd: out of memory\n");
    return -1;
  }
  struct timeval every = {IMD_TRIM_INTERVAL_S, 0};
  event_add(d->trim_ev, &every);
  on_trim(-1, 0, d); /* apply retention at start */
  return 0;
}

void imd_delivery_free(imd *d) {
  if (d->store) imd_flush(d);
  while (d->parked) { /* only if the final flush could not run */
    parked *p = d->parked;
    d->parked = p->next;
    free(p);
  }
  if (d->flush_ev) event_free(d->flush_ev);
  if (d->trim_ev) event_free(d->trim_ev);
  imd_store_close(d->store);
  d->store = NULL;
}
