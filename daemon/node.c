/* This imd process as a node: the cluster link (libim's Redis module does
 * the routing; imd only configures it and reacts to its events), graceful
 * drain (R23), gateway lists (R22) and health. */
#include <errno.h>
#include <event2/event.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <libim/im_router.h>

#include "imd.h"
#include "log.h"

#define DRAIN_TICK_MS 100
#define GOAWAY_SPREAD_MS 2000  /* clients reconnect within this, spread out */

/* ---- cluster events -------------------------------------------------------------- */

static void repair_one(im_server *srv, im_conn_id c, void *arg) {
  (void)srv;
  imd_repair(arg, c);
}

/* notifications sent to this node may be lost: push every connection
 * (on each worker, by its own loop) what it has not ACKed (clients drop
 * duplicates by id) */
static void repair_here(imd *w, const char *s, uint32_t n) {
  (void)s;
  (void)n;
  im_server_each_conn(w->srv, repair_one, w);
}

/* Redis may have restarted: each worker's store loads its scripts again */
static void reconnected_here(imd *w, const char *s, uint32_t n) {
  (void)s;
  (void)n;
  imd_delivery_reconnected(w);
}

static void on_cluster_event(im_redis *r, enum im_redis_event ev, void *ud) {
  (void)r;
  imd *d = ud;
  switch (ev) {
  case IM_REDIS_UP:
    imd_delivery_reconnected(d);
    imd_workers_broadcast(d, reconnected_here, NULL, 0);
    imd_bans_reconnected(d);
    char epoch[24];
    snprintf(epoch, sizeof epoch, "%llu", (unsigned long long)im_redis_epoch(d->redis));
    imd_log(IMD_LOG_INFO, IMD_FIELDS("node", d->node_name, "epoch", epoch), "cluster link up");
    break;
  case IM_REDIS_DOWN:
    log_warn("cluster link down; stored sends fail with 503 until it is back");
    break;
  case IM_REDIS_RESYNC:
    repair_here(d, NULL, 0);
    imd_workers_broadcast(d, repair_here, NULL, 0);
    break;
  case IM_REDIS_LEASE_LOST:
    break;
  }
}

/* ---- drain ------------------------------------------------------------------------ */

typedef struct drain_pass {
  imd *d;
  uint32_t budget;
} drain_pass;

static void close_some(im_server *srv, im_conn_id c, void *arg) {
  drain_pass *p = arg;
  if (p->budget == 0) return;
  if (im_conn_close(srv, c, IM_CLOSE_GOING_AWAY, "node draining") == 0) p->budget--;
}

static void on_drain_tick(evutil_socket_t fd, short what, void *arg) {
  (void)fd;
  (void)what;
  imd *d = arg;
  im_stats st = {IM_STRUCT_SIZE(im_stats)};
  im_server_stats(d->srv, &st);
  if (st.conns_authed == 0) {
    /* the rest (unauthenticated, closing) goes with the listeners */
    event_del(d->drain_ev);
    log_info("drained; exiting");
    if (d->ev) im_event_shutdown(d->ev, 3000);
    return;
  }
  /* --drain-rate is the process's: each of n workers closes its share,
   * in thousandths of a connection carried from tick to tick (so a rate
   * under one per tick and worker is kept too) */
  unsigned n = d->group ? im_group_size(d->group) : 1;
  d->drain_credit += (uint64_t)d->cfg.drain_rate * DRAIN_TICK_MS / (n ? n : 1);
  drain_pass p = {d, (uint32_t)(d->drain_credit / 1000)};
  d->drain_credit %= 1000;
  if (p.budget) im_server_each_conn(d->srv, close_some, &p);
}

static void send_goaway(im_server *srv, im_conn_id c, void *arg) {
  (void)arg;
  im_conn_goaway(srv, c, (uint32_t)(random() % GOAWAY_SPREAD_MS), "node draining");
}

static void drain_here(imd *d, const char *s, uint32_t n);

size_t imd_drain(imd *d) {
  im_stats st = {IM_STRUCT_SIZE(im_stats)};
  im_server_stats(d->srv, &st);
  if (d->draining) return st.conns_authed;
  imd_workers_broadcast(d, drain_here, NULL, 0); /* every worker drains its own */
  d->draining = true;
  log_info("draining %llu connections at %u/s", (unsigned long long)st.conns_authed,
           d->cfg.drain_rate);
  if (d->redis && d->worker == 0) im_redis_set_draining(d->redis, 1); /* the lease's */
  im_server_each_conn(d->srv, send_goaway, d);
  /* the clients get a moment to leave by themselves before the closing starts */
  struct timeval tv = {0, DRAIN_TICK_MS * 1000};
  event_add(d->drain_ev, &tv);
  return st.conns_authed;
}

static void drain_here(imd *d, const char *s, uint32_t n) {
  (void)s;
  (void)n;
  imd_drain(d);
}

/* SIGHUP: logrotate moved the log (tls.c reloads the certificate on the
 * same signal). */
static void on_hup(evutil_socket_t fd, short what, void *arg) {
  (void)fd;
  (void)what;
  (void)arg;
  imd_log_reopen();
}

static void on_usr1(evutil_socket_t fd, short what, void *arg) {
  (void)fd;
  (void)what;
  imd_drain(arg);
}

/* A client that arrives at a draining node is sent on at once. */
void imd_node_opened(imd *d, im_conn_id c) {
  if (d->draining) im_conn_goaway(d->srv, c, 0, "node draining");
}

/* ---- gateways ---------------------------------------------------------------------- */

/* A single node lists itself with its conns, unless it is draining. */
static void gateway_self(imd *d, uint64_t conns, imd_gateways_cb cb, void *arg) {
  char ws[300], tcp[300];
  snprintf(ws, sizeof ws, "%s", d->cfg.advertise_ws ? d->cfg.advertise_ws : "");
  snprintf(tcp, sizeof tcp, "%s", d->cfg.advertise_tcp ? d->cfg.advertise_tcp : "");
  im_gateway g = {d->node_name, ws, tcp, conns};
  cb(arg, 0, &g, d->draining ? 0 : 1);
}

static uint64_t authed(imd *d) {
  im_stats st = {IM_STRUCT_SIZE(im_stats)};
  im_server_stats(d->srv, &st);
  return st.conns_authed;
}

/* With worker threads the conns are every worker's (counted on each one's loop). */
typedef struct gateways_req {
  imd_gateways_cb cb;
  void *arg;
} gateways_req;

static int authed_here(imd *w, void *arg) {
  (void)arg;
  return (int)authed(w);
}

static void authed_counted(imd *d, long sum, int err, void *arg) {
  (void)err; /* a worker that could not be asked is missing from the sum */
  gateways_req *q = arg;
  gateway_self(d, (uint64_t)sum, q->cb, q->arg);
  free(q);
}

int imd_gateways(imd *d, const char *uid, imd_gateways_cb cb, void *arg) {
  if (d->redis) return im_redis_gateways(d->redis, uid, cb, arg);
  if (!d->workers) {
    gateway_self(d, authed(d), cb, arg);
    return 0;
  }
  gateways_req *q = malloc(sizeof *q);
  if (!q) return -1;
  *q = (gateways_req){cb, arg};
  if (imd_workers_gather(d, authed_here, authed_counted, q) < 0) {
    free(q);
    return -1;
  }
  return 0;
}

const char *imd_redis_state(const imd *d) {
  if (!d->redis) return NULL;
  return im_redis_up(d->redis) ? "up" : "down";
}

/* ---- lifecycle ----------------------------------------------------------------------- */

/* "HOST:PORT" of a listener as clients reach it: a wildcard host is no
 * address to give out, so the machine's name stands in. */
static void listener_addr(char *out, size_t cap, const char *addr, int port) {
  char host[256];
  const char *colon = strrchr(addr, ':');
  size_t hl = colon ? (size_t)(colon - addr) : strlen(addr);
  snprintf(host, sizeof host, "%.*s", (int)hl, addr);
  if (!*host || !strcmp(host, "0.0.0.0") || !strcmp(host, "[::]")) gethostname(host, sizeof host);
  snprintf(out, cap, "%s:%d", host, port);
}

int imd_node_start(imd *d) {
  static char adv_ws[320], adv_tcp[320];
  if (!d->cfg.advertise_ws && d->ports[0] > 0) {
    char a[300];
    listener_addr(a, sizeof a, d->cfg.ws_addr, d->ports[0]);
    snprintf(adv_ws, sizeof adv_ws, "ws://%s/ws", a);
    d->cfg.advertise_ws = adv_ws;
  }
  if (!d->cfg.advertise_tcp && d->ports[1] > 0) {
    listener_addr(adv_tcp, sizeof adv_tcp, d->cfg.tcp_addr, d->ports[1]);
    d->cfg.advertise_tcp = adv_tcp;
  }
  if (d->cfg.node) {
    snprintf(d->node_name, sizeof d->node_name, "%s", d->cfg.node);
  } else {
    char host[128] = "imd";
    gethostname(host, sizeof host);
    snprintf(d->node_name, sizeof d->node_name, "%s-%d", host, d->ports[0]);
  }
  d->drain_ev = event_new(d->base, -1, EV_PERSIST, on_drain_tick, d);
  d->usr1_ev = evsignal_new(d->base, SIGUSR1, on_usr1, d);
  d->hup_ev = evsignal_new(d->base, SIGHUP, on_hup, d);
  if (!d->drain_ev || !d->usr1_ev || !d->hup_ev || event_add(d->usr1_ev, NULL) < 0 ||
      event_add(d->hup_ev, NULL) < 0) {
    fprintf(stderr, "imd: out of memory\n");
    return -1;
  }
  if (!d->cfg.redis_addr) return 0;
  char host[256];
  const char *colon = strrchr(d->cfg.redis_addr, ':');
  long port = colon ? strtol(colon + 1, NULL, 10) : 0;
  if (!colon || port <= 0 || port > 65535) {
    fprintf(stderr, "imd: redis: HOST:PORT expected, not '%s'\n", d->cfg.redis_addr);
    return -1;
  }
  snprintf(host, sizeof host, "%.*s", (int)(colon - d->cfg.redis_addr), d->cfg.redis_addr);
  im_redis_config rc;
  im_redis_config_init(&rc);
  rc.host = host;
  rc.port = (int)port;
  rc.prefix = d->cfg.redis_prefix;
  rc.node = d->node_name;
  rc.lease_ttl_ms = d->cfg.lease_ttl_s * 1000u;
  rc.advertise_ws = d->cfg.advertise_ws;
  rc.advertise_tcp = d->cfg.advertise_tcp;
  rc.on_event = on_cluster_event;
  rc.ud = d;
  d->redis = im_redis_new_group(d->base, d->srv, d->group, &rc); /* group NULL: one thread */
  if (!d->redis) {
    fprintf(stderr, "imd: cannot start the cluster link (node name '%s')\n", d->node_name);
    return -1;
  }
  printf("imd: cluster node %s on redis %s\n", d->node_name, d->cfg.redis_addr);
  return 0;
}

int imd_node_worker(imd *w, imd *d) {
  w->drain_ev = event_new(w->base, -1, EV_PERSIST, on_drain_tick, w);
  if (!w->drain_ev) {
    fprintf(stderr, "imd: worker %u: out of memory\n", w->worker);
    return -1;
  }
  if (d->redis && !(w->redis = im_redis_join(d->redis, w->base, w->srv))) {
    fprintf(stderr, "imd: worker %u: cannot join the cluster link\n", w->worker);
    return -1;
  }
  return 0;
}

void imd_node_stop(imd *d) {
  im_redis_free(d->redis);
  d->redis = NULL;
  if (d->drain_ev) event_free(d->drain_ev);
  if (d->usr1_ev) event_free(d->usr1_ev);
  if (d->hup_ev) event_free(d->hup_ev);
  d->drain_ev = d->usr1_ev = d->hup_ev = NULL;
}
