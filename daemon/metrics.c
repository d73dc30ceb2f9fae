/* Operator metrics in the Prometheus text format (R28). */
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libim/im_guard.h>

#include "hooks.h"
#include "http_server.h"
#include "imd.h"

/* Platforms are client-chosen strings: up to IMD_MAX_PLATFORMS of them
 * get a series each, the rest are counted as "other" so a client cannot
 * grow the metrics without bound. A platform with no connection left keeps
 * its series (at 0) only until a new platform needs the slot, so platforms
 * that came and went (a client cycling through made-up names) cannot hold
 * the slots for good; only open connections hold them. The sum of the
 * series is always the number of authenticated connections. */
static int platform_slot(imd *d, const char *platform, bool add) {
  int free_slot = -1, idle_slot = -1;
  if (!platform || !*platform) platform = "unknown";
  for (int i = 0; i < IMD_MAX_PLATFORMS; i++) {
    if (!d->m.platform[i][0]) {
      if (free_slot < 0) free_slot = i;
    } else if (strncmp(d->m.platform[i], platform, sizeof d->m.platform[i] - 1) == 0) {
      return i;
    } else if (d->m.platform_conns[i] == 0 && idle_slot < 0) {
      idle_slot = i;
    }
  }
  if (free_slot < 0) free_slot = idle_slot;
  if (!add || free_slot < 0) return -1;
  snprintf(d->m.platform[free_slot], sizeof d->m.platform[free_slot], "%s", platform);
  return free_slot;
}

/* The platform series are one table for all worker threads: the main
 * thread's, under the shared lock. */
void imd_metrics_open(imd *w, const char *platform) {
  imd *d = imd_worker0(w);
  imd_shared_lock();
  int i = platform_slot(d, platform, true);
  if (i >= 0)
    d->m.platform_conns[i]++;
  else
    d->m.other_platform_conns++;
  imd_shared_unlock();
}

void imd_metrics_close(imd *w, const char *platform) {
  imd *d = imd_worker0(w);
  imd_shared_lock();
  int i = platform_slot(d, platform, false);
  if (i >= 0 && d->m.platform_conns[i]) {
    d->m.platform_conns[i]--;
  } else if (d->m.other_platform_conns) {
    /* opened while every slot was taken */
    d->m.other_platform_conns--;
  }
  imd_shared_unlock();
}

/* ACK latency bounds, microseconds: LAN to a phone on a bad network, up to
 * the retransmits of the default --ack-timeout (18 s, 3 retries). */
static const uint64_t ack_bounds[] = {1000,    2500,    5000,    10000,   25000,
                                      50000,   100000,  250000,  500000,  1000000,
                                      2500000, 5000000, 10000000, 30000000, 60000000};
#define ACK_N (sizeof ack_bounds / sizeof ack_bounds[0])

static uint64_t engine_clock(void *ud) {
  (void)ud;
  return imd_mono_us();
}

void imd_metrics_start(imd *d) { im_server_set_clock(d->srv, engine_clock, NULL); }

void imd_metrics_ack(imd *d, int64_t rtt_us) {
  if (rtt_us >= 0) imd_hist_observe(&d->m.ack_latency, ack_bounds, ACK_N, (uint64_t)rtt_us);
}

typedef struct sbuf {
  char *p;
  size_t len, cap;
} sbuf;

static void sb_printf(sbuf *b, const char *fmt, ...) {
  for (;;) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(b->p ? b->p + b->len : NULL, b->p ? b->cap - b->len : 0, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if (b->p && b->len + (size_t)n < b->cap) {
      b->len += (size_t)n;
      return;
    }
    size_t cap = (b->cap ? b->cap * 2 : 4096) + (size_t)n;
    char *q = realloc(b->p, cap);
    if (!q) return;
    b->p = q;
    b->cap = cap;
  }
}

/* Label values are client-chosen: escape per the exposition format. */
static void sb_label(sbuf *b, const char *v) {
  for (; *v; v++) {
    if (*v == '\\' || *v == '"')
      sb_printf(b, "\\%c", *v);
    else if (*v == '\n')
      sb_printf(b, "\\n");
    else
      sb_printf(b, "%c", *v);
  }
}

static void counter(sbuf *b, const char *name, const char *help, uint64_t v) {
  sb_printf(b, "# HELP %s %s\n# TYPE %s counter\n%s %llu\n", name, help, name, name,
            (unsigned long long)v);
}

static void gauge(sbuf *b, const char *name, const char *help, uint64_t v) {
  sb_printf(b, "# HELP %s %s\n# TYPE %s gauge\n%s %llu\n", name, help, name, name,
            (unsigned long long)v);
}

void imd_metrics_tally(imd *d, imd_tally *t) {
  memset(t, 0, sizeof *t);
  im_server_stats(d->srv, &t->st);
  if (d->worker == 0) im_guard_get_stats(d->srv, &t->gs); /* the workers share one guard */
  imd_shared_lock(); /* the platform series (worker 0's) */
  t->m = d->m;
  imd_shared_unlock();
  if (d->main && d->main != d) { /* another worker's: counted with worker 0's */
    memset(t->m.platform, 0, sizeof t->m.platform);
    memset(t->m.platform_conns, 0, sizeof t->m.platform_conns);
    t->m.other_platform_conns = 0;
  }
  if (d->ev) im_event_counts(d->ev, &t->loop_wakeups, &t->loop_naps);
  t->workers = 1;
  t->worker_conns[d->worker % 64] = t->st.conns_authed;
  t->links_up = d->redis && im_redis_up(d->redis);
  /* one SQLite store for all workers (counted once); a Redis store each */
  if (d->store && (d->redis || d->worker == 0)) d->store->ops->stats(d->store, &t->ss);
}

#define ADD(f) sum->f += t->f

void imd_metrics_add(imd_tally *sum, const imd_tally *t) {
  /* im_stats: struct_size, then uint64_t counters only */
  for (size_t off = offsetof(im_stats, conns); off + sizeof(uint64_t) <= sizeof t->st;
       off += sizeof(uint64_t))
    *(uint64_t *)((char *)&sum->st + off) += *(const uint64_t *)((const char *)&t->st + off);
  imd_hist_add(&sum->m.ack_latency, &t->m.ack_latency);
  ADD(gs.refused_rate), ADD(gs.refused_banned), ADD(gs.refused_cap), ADD(gs.bans);
  ADD(gs.sources);
  ADD(m.other_platform_conns), ADD(m.msgs_1to1), ADD(m.msgs_group), ADD(m.msgs_room);
  ADD(m.msgs_http), ADD(m.msg_errors), ADD(m.http_requests), ADD(m.auth_expired);
  ADD(m.auth_invalid), ADD(m.auth_banned), ADD(m.stored), ADD(m.duplicates), ADD(m.batched);
  ADD(m.store_errors), ADD(m.syncs), ADD(m.auth_revoked), ADD(m.auth_too_long);
  ADD(m.quota_refused), ADD(m.revocations), ADD(m.rooms_refused);
  for (int i = 0; i < 6; i++) ADD(m.http_status[i]);
  for (int i = 0; i < 64; i++) ADD(worker_conns[i]);
  ADD(loop_wakeups), ADD(loop_naps), ADD(links_up);
  ADD(ss.commits), ADD(ss.commit_us), ADD(ss.trimmed), ADD(ss.errors), ADD(ss.wal_waits);
  ADD(ss.ckpt_cut), ADD(ss.trim_steps), ADD(ss.trim_us), ADD(ss.marks_pending);
  if (t->ss.trim_max_us > sum->ss.trim_max_us) sum->ss.trim_max_us = t->ss.trim_max_us;
  sum->workers += t->workers;
  /* platforms by name: a name no slot of sum has takes a free one, or
   * counts as other */
  for (int i = 0; i < IMD_MAX_PLATFORMS; i++) {
    if (!t->m.platform[i][0]) continue;
    int k = -1, free_slot = -1;
    for (int j = 0; j < IMD_MAX_PLATFORMS && k < 0; j++) {
      if (!strcmp(sum->m.platform[j], t->m.platform[i])) k = j;
      if (!sum->m.platform[j][0] && free_slot < 0) free_slot = j;
    }
    if (k < 0 && free_slot >= 0) {
      k = free_slot;
      memcpy(sum->m.platform[k], t->m.platform[i], sizeof sum->m.platform[k]);
    }
    if (k >= 0)
      sum->m.platform_conns[k] += t->m.platform_conns[i];
    else
      sum->m.other_platform_conns += t->m.platform_conns[i];
  }
}

char *imd_metrics_render(imd *d, size_t *len) {
  imd_tally t;
  imd_metrics_tally(d, &t);
  return imd_metrics_render_tally(d, &t, NULL, len);
}

char *imd_metrics_render_tally(imd *d, const imd_tally *t, const imd_hook_counts *hc,
                               size_t *len) {
  const im_stats st = t->st;
  const imd_metrics *m = &t->m;
  const imd_store_stats ss = t->ss;
  sbuf b = {0};
  gauge(&b, "imd_connections", "Open client connections (authenticated or not)", st.conns);
  gauge(&b, "imd_connections_max", "The process's connection limit (--max-connections); 0 = none",
        d->cfg.max_connections);
  sb_printf(&b, "# HELP imd_connections_by_platform Authenticated connections by platform\n"
                "# TYPE imd_connections_by_platform gauge\n");
  for (int i = 0; i < IMD_MAX_PLATFORMS; i++) {
    if (!m->platform[i][0]) continue;
    sb_printf(&b, "imd_connections_by_platform{platform=\"");
    sb_label(&b, m->platform[i]);
    sb_printf(&b, "\"} %llu\n", (unsigned long long)m->platform_conns[i]);
  }
  sb_printf(&b, "imd_connections_by_platform{platform=\"other\"} %llu\n",
            (unsigned long long)m->other_platform_conns);
  gauge(&b, "imd_users_online", "Distinct users with at least one connection", st.users);
  gauge(&b, "imd_rooms", "Rooms with at least one member", st.rooms);
  gauge(&b, "imd_output_queued_bytes", "Bytes queued for slow readers", st.out_queued);
  sb_printf(&b, "# HELP imd_messages_in_total Upstream messages by kind\n"
                "# TYPE imd_messages_in_total counter\n"
                "imd_messages_in_total{kind=\"direct\"} %llu\n"
                "imd_messages_in_total{kind=\"group\"} %llu\n"
                "imd_messages_in_total{kind=\"room\"} %llu\n"
                "imd_messages_in_total{kind=\"http\"} %llu\n",
            (unsigned long long)m->msgs_1to1, (unsigned long long)m->msgs_group,
            (unsigned long long)m->msgs_room, (unsigned long long)m->msgs_http);
  counter(&b, "imd_messages_out_total", "Downstream messages queued to connections", st.msgs_out);
  counter(&b, "imd_bytes_in_total", "Bytes read from clients", st.bytes_in);
  counter(&b, "imd_bytes_out_total", "Bytes queued to clients", st.bytes_out);
  counter(&b, "imd_messages_stored_total", "Messages stored in receivers' inboxes", m->stored);
  counter(&b, "imd_messages_duplicate_total",
          "Resent messages answered with their stored id, not delivered again", m->duplicates);
  counter(&b, "imd_store_commits_total", "Durable store writes (SQLite group commits, one fsync each)",
          ss.commits);
  counter(&b, "imd_store_commit_messages_total", "Messages the store answered for",
          m->batched);
  counter(&b, "imd_store_commit_microseconds_total", "Time spent committing", ss.commit_us);
  counter(&b, "imd_store_errors_total", "Store requests that failed", ss.errors);
  counter(&b, "imd_store_wal_waits_total",
          "Commits that waited for a checkpoint at the WAL's bound (disk slower than the messages)",
          ss.wal_waits);
  counter(&b, "imd_store_checkpoints_cut_total",
          "Of those waits, the ones cut short: the checkpoint was stopped and the commit copied the WAL",
          ss.ckpt_cut);
  counter(&b, "imd_store_retention_steps_total",
          "Retention transactions (a pass's start, then bounded steps; commits wait meanwhile)",
          ss.trim_steps);
  counter(&b, "imd_store_retention_microseconds_total", "Time retention held the store",
          ss.trim_us);
  gauge(&b, "imd_store_retention_longest_microseconds",
        "The longest retention transaction since start", ss.trim_max_us);
  gauge(&b, "imd_store_marks_pending", "Delivered marks waiting in memory to be written",
        ss.marks_pending);
  counter(&b, "imd_loop_wakeups_total",
          "Event loop wake-ups that found client connections to read", t->loop_wakeups);
  counter(&b, "imd_loop_coalesce_waits_total", "Waits of --coalesce for more input",
          t->loop_naps);
  counter(&b, "imd_syncs_total", "Sync requests answered", m->syncs);
  const im_guard_stats gs = t->gs;
  sb_printf(&b, "# HELP imd_connections_refused_total Connections refused at the door\n"
                "# TYPE imd_connections_refused_total counter\n"
                "imd_connections_refused_total{reason=\"rate\"} %llu\n"
                "imd_connections_refused_total{reason=\"banned\"} %llu\n"
                "imd_connections_refused_total{reason=\"per_ip_cap\"} %llu\n",
            (unsigned long long)gs.refused_rate, (unsigned long long)gs.refused_banned,
            (unsigned long long)gs.refused_cap);
  if (d->redis) {
    counter(&b, "imd_cluster_dropped_total",
            "Cross-node sends and room publishes the cluster link gave up", im_redis_dropped(d->redis));
    gauge(&b, "imd_cluster_links_up",
          "Workers whose Redis connection is up under the node's lease (all of them when healthy)",
          t->links_up);
  }
  counter(&b, "imd_push_dropped_total",
          "Room messages not sent to a connection over --push-rate", st.push_dropped);
  counter(&b, "imd_bans_total", "Automatic bans of sources that kept over their rate", gs.bans);
  imd_shared_lock(); /* the table is worker 0's (bans.c) */
  uint64_t uid_bans = imd_worker0(d)->uid_bans.count;
  imd_shared_unlock();
  gauge(&b, "imd_uid_bans", "Uid bans in force (POST /v1/bans)", uid_bans);
  gauge(&b, "imd_guard_sources", "Source addresses the rate limit tracks", gs.sources);
  counter(&b, "imd_inbox_trimmed_total", "Inbox entries removed by retention", ss.trimmed);
  gauge(&b, "imd_inflight", "Pushed messages not yet ACKed by their connection", st.inflight);
  counter(&b, "imd_retransmits_total", "Pushes resent after the ACK timeout", st.retransmits);
  counter(&b, "imd_ack_timeouts_total", "Connections closed (4408) after the last resend",
          st.ack_timeouts);
  char hist[IMD_HIST_TEXT_MAX];
  imd_hist_format(&m->ack_latency, ack_bounds, ACK_N, "imd_ack_latency_seconds",
                  "Time from a reliable push being queued to a connection to its ACK", hist,
                  sizeof hist);
  sb_printf(&b, "%s", hist);
  counter(&b, "imd_undelivered_total", "Pushes whose connection closed before the ACK (kept for sync)",
          st.undelivered);
  counter(&b, "imd_client_retransmits_dropped_total",
          "Client resends of a cid dropped by the connection's window", st.dups);
  sb_printf(&b, "# HELP imd_rate_limited_total Msgs refused with 429 by limit\n"
                "# TYPE imd_rate_limited_total counter\n"
                "imd_rate_limited_total{limit=\"rate\"} %llu\n"
                "imd_rate_limited_total{limit=\"receiver_quota\"} %llu\n",
            (unsigned long long)st.rate_limited, (unsigned long long)m->quota_refused);
  counter(&b, "imd_rate_closed_total", "Connections closed (4290) for persistent excess",
          st.rate_closed);
  counter(&b, "imd_revocations_total", "Users revoked through the HTTP API", m->revocations);
  counter(&b, "imd_room_joins_refused_total", "Joins refused by --rooms members",
          m->rooms_refused);
  sb_printf(&b, "# HELP imd_errors_total Errors by kind\n# TYPE imd_errors_total counter\n");
  const struct {
    const char *kind;
    uint64_t v;
  } errs[] = {
      {"protocol", st.proto_errors},   {"auth", st.auth_failures},
      {"auth_expired", m->auth_expired}, {"auth_invalid", m->auth_invalid},
      {"auth_revoked", m->auth_revoked}, {"auth_lifetime", m->auth_too_long},
      {"auth_banned", m->auth_banned},
      {"timeout", st.timeouts},        {"shed", st.shed},
      {"message_refused", m->msg_errors}, {"store", m->store_errors},
  };
  for (size_t i = 0; i < sizeof errs / sizeof errs[0]; i++)
    sb_printf(&b, "imd_errors_total{kind=\"%s\"} %llu\n", errs[i].kind,
              (unsigned long long)errs[i].v);
  sb_printf(&b, "# HELP imd_http_requests_total HTTP API requests by status class\n"
                "# TYPE imd_http_requests_total counter\n");
  for (int i = 1; i <= 5; i++)
    sb_printf(&b, "imd_http_requests_total{code=\"%dxx\"} %llu\n", i,
              (unsigned long long)m->http_status[i]);
  if (t->workers > 1) {
    sb_printf(&b, "# HELP imd_worker_connections Authenticated connections by worker thread\n"
                  "# TYPE imd_worker_connections gauge\n");
    for (unsigned i = 0; i < t->workers && i < 64; i++)
      sb_printf(&b, "imd_worker_connections{worker=\"%u\"} %llu\n", i,
                (unsigned long long)t->worker_conns[i]);
  }
  size_t hl;
  char *hooks = hc ? imd_hooks_metrics_of(hc, &hl) : imd_hooks_metrics(d, &hl);
  if (hooks) sb_printf(&b, "%.*s", (int)hl, hooks);
  free(hooks);
  *len = b.len;
  return b.p;
}

/* ---- GET /metrics with workers: every worker adds its numbers on its own loop ---------- */

typedef struct metrics_req {
  uint64_t ticket;
  pthread_mutex_t lock;
  imd_tally sum;
  imd_hook_counts hooks;
} metrics_req;

static int tally_add(imd *w, void *arg) {
  metrics_req *q = arg;
  imd_tally t;
  imd_metrics_tally(w, &t);
  pthread_mutex_lock(&q->lock);
  imd_metrics_add(&q->sum, &t);
  imd_hooks_count(w, &q->hooks);
  pthread_mutex_unlock(&q->lock);
  return 0;
}

static void metrics_done(imd *d, long sum, int err, void *arg) {
  (void)sum;
  (void)err; /* a worker that could not be asked is missing from the sums */
  metrics_req *q = arg;
  size_t users, rooms; /* distinct over workers: a user or room on two counts once */
  im_group_totals(d->group, &users, &rooms);
  q->sum.st.users = users;
  q->sum.st.rooms = rooms;
  size_t len;
  char *body = imd_metrics_render_tally(d, &q->sum, &q->hooks, &len);
  http_server_respond(d->http, q->ticket, body ? 200 : 500, "text/plain; version=0.0.4", body,
                      body ? len : 0);
  pthread_mutex_destroy(&q->lock);
  free(q);
}

void imd_metrics_respond(imd *d, uint64_t ticket) {
  metrics_req *q = calloc(1, sizeof *q);
  if (q) {
    q->ticket = ticket;
    pthread_mutex_init(&q->lock, NULL);
  }
  if (!q || imd_workers_gather(d, tally_add, metrics_done, q) < 0) {
    if (q) pthread_mutex_destroy(&q->lock);
    free(q);
    http_server_respond(d->http, ticket, 503, NULL, NULL, 0);
  }
}
