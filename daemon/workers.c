/* --threads N: worker threads.
 *
 * Worker 0 is the main thread's imd, set up by main.c as with one thread.
 * Workers 1..N-1 are copies of it, each with its own event loop, libim
 * engine, WebSocket/TCP listeners and HTTP server on the same ports
 * (SO_REUSEPORT: the kernel spreads new connections), hooks client,
 * metrics and a view of the one SQLite store whose completions come back
 * to the worker's own loop. They share (read-only) the configuration,
 * secret and API key, and (under one lock) the uid bans, revocations and
 * per-receiver quota. The engines are joined in a libim thread group
 * (im_group.h): sends, kicks and presence reach every worker through it. A
 * worker's mailbox runs calls on its loop (IP bans, drain, metrics;
 * worker_calls.c). */
#include <event2/event.h>
#include <libim/im_router.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hooks.h"
#include "imd.h"
#include "log.h"
#include "workers.h"

/* ---- lifecycle ---------------------------------------------------------------------- */

static void *worker_main(void *arg) {
  imd *w = arg;
  event_base_dispatch(w->base);
  return NULL;
}

/* "HOST:PORT" of addr with the port worker 0 got (port 0 picks one). */
static void same_port(char *out, size_t cap, const char *addr, int port) {
  const char *colon = strrchr(addr, ':');
  snprintf(out, cap, "%.*s:%d", (int)(colon ? colon - addr : 0), addr, port);
}

/* Worker i: a copy of d with a loop, engine, listeners, HTTP server, hooks
 * and store view of its own. */
static imd *worker_new(imd *d, unsigned i, const im_guard_config *guard,
                       const imd_hooks_config *hooks) {
  imd *w = malloc(sizeof *w);
  if (!w) return NULL;
  *w = *d;
  memset(&w->m, 0, sizeof w->m);
  memset(&w->uid_bans, 0, sizeof w->uid_bans); /* d->main's are used */
  w->worker = i;
  /* none of worker 0's own parts: a failure below must free only w's */
  w->workers = NULL; /* set once w is complete */
  w->base = NULL;
  w->srv = NULL;
  w->ev = NULL;
  w->http = NULL;
  w->hooks = NULL;
  w->store = NULL;
  w->mb = NULL;
  w->redis = NULL; /* its own handle (node.c), made below */
  w->drain_ev = w->usr1_ev = w->hup_ev = w->trim_ev = NULL;
  if (imd_tls_worker(w) < 0) return w;
  im_callbacks cb;
  imd_chat_callbacks(&cb);
  w->base = event_base_new();
  w->srv = w->base ? im_server_new(im_server_config(d->srv), &cb, w) : NULL;
  w->ev = w->srv ? im_event_new(w->base, w->srv) : NULL;
  if (w->srv) imd_metrics_start(w); /* ACK round trips on the same clock as worker 0's */
  /* the guard and its --ban addresses are worker 0's: the group's (im_shared) */
  if (!w->ev || im_server_set_guard(w->srv, guard) < 0) return w;
  im_event_set_reuseport(w->ev, 1);
  im_event_set_coalesce(w->ev, d->cfg.coalesce_us); /* checked on worker 0's */
  const char *addrs[2] = {d->cfg.ws_addr, d->cfg.tcp_addr};
  const enum im_transport kinds[2] = {IM_TRANSPORT_WS, IM_TRANSPORT_TCP};
  char addr[300];
  for (int k = 0; k < 2; k++) {
    if (d->ports[k] <= 0) continue;
    same_port(addr, sizeof addr, addrs[k], d->ports[k]);
    if (im_event_listen_tls(w->ev, kinds[k], addr, imd_tls_for(w, k ? "tcp" : "ws")) < 0) {
      fprintf(stderr, "imd: worker %u: cannot listen on %s\n", i, addr);
      return w;
    }
  }
  if (d->http) {
    same_port(addr, sizeof addr, d->cfg.http_addr, http_server_port(d->http));
    http_limits lim = {.max_body = (size_t)im_server_config(d->srv)->max_message * 4 + 4096,
                       .admit = imd_api_admit, .reuseport = true};
    w->http = http_server_new_tls(w->base, addr, &lim, imd_tls_for(w, "http"), imd_api_handle, w);
    if (!w->http) {
      fprintf(stderr, "imd: worker %u: cannot listen on %s\n", i, addr);
      return w;
    }
    http_server_set_done(w->http, imd_api_done);
  }
  /* a member of the group before the cluster handle (it chains after the
   * group) and the store (a Redis one runs on that handle) */
  if (im_group_join(d->group, w->base, w->srv) != (int)i) {
    fprintf(stderr, "imd: worker %u: cannot join the group\n", i);
    return w;
  }
  w->mb = im_mailbox_new(w->base, w->srv);
  if (w->mb && imd_node_worker(w, d) == 0 && imd_delivery_worker(w, d) == 0 &&
      imd_hooks_start(w, hooks) == 0)
    w->workers = d->workers; /* complete */
  return w;
}

int imd_workers_group(imd *d, unsigned n) {
  d->group = im_group_new(n, 0);
  d->mb = im_mailbox_new(d->base, d->srv);
  if (!d->group || !d->mb || im_group_join(d->group, d->base, d->srv) != 0) {
    fprintf(stderr, "imd: cannot start %u workers: out of memory\n", n);
    return -1;
  }
  return 0;
}

int imd_workers_start(imd *d, unsigned n, const im_guard_config *guard,
                      const imd_hooks_config *hooks) {
  imd_workers *ws = calloc(1, sizeof *ws);
  if (!ws) {
    fprintf(stderr, "imd: cannot start %u workers: out of memory\n", n);
    return -1;
  }
  d->workers = ws;
  ws->n = 1;
  ws->w[0] = d;
  for (unsigned i = 1; i < n; i++) {
    imd *w = worker_new(d, i, guard, hooks);
    if (!w) {
      fprintf(stderr, "imd: cannot start worker %u: out of memory\n", i);
      return -1;
    }
    ws->w[ws->n++] = w;
    if (w->workers != ws) {
      fprintf(stderr, "imd: cannot start worker %u\n", i);
      return -1;
    }
    if (pthread_create(&ws->th[i], NULL, worker_main, w) != 0) {
      fprintf(stderr, "imd: cannot start worker %u: out of resources\n", i);
      return -1;
    }
    ws->started[i] = true;
  }
  printf("imd: %u worker threads\n", n);
  return 0;
}

static void shut_down(imd *w, const char *s, uint32_t n) {
  (void)s;
  (void)n;
  if (w->ev && !w->draining) im_event_shutdown(w->ev, 3000);
}

void imd_workers_stop(imd *d) {
  imd_workers *ws = d->workers;
  if (!ws) return;
  imd_workers_broadcast(d, shut_down, NULL, 0);
  for (unsigned i = 1; i < ws->n; i++)
    if (ws->started[i]) pthread_join(ws->th[i], NULL);
}

void imd_workers_free(imd *d) {
  imd_workers *ws = d->workers;
  if (!ws) {
    if (d->group) imd_node_stop(d); /* chained after the group */
    im_group_free(d->group);
    im_mailbox_free(d->mb);
    return;
  }
  /* the loops have stopped: run what is still queued in the mailboxes
   * (calls that post to other mailboxes, answers to HTTP requests) while
   * every worker's parts exist, until nothing is left */
  for (size_t ran = 1; ran;) {
    ran = 0;
    for (unsigned i = 0; i < ws->n; i++)
      if (ws->w[i]->mb) ran += im_async_run(im_mailbox_async(ws->w[i]->mb));
  }
  /* worker 0's store is closed: the views may close (their completions run) */
  for (unsigned i = 1; i < ws->n; i++) {
    imd *w = ws->w[i];
    imd_hooks_stop(w);
    imd_delivery_free(w);
    http_server_free(w->http);
    imd_node_stop(w); /* its cluster handle, before worker 0's link */
  }
  imd_node_stop(d); /* the cluster link is chained after the group: before it goes */
  for (unsigned i = 0; i < ws->n; i++)
    if (ws->w[i]->srv) im_server_set_router(ws->w[i]->srv, NULL);
  im_group_free(d->group);
  d->group = NULL;
  for (unsigned i = 0; i < ws->n; i++) {
    imd *w = ws->w[i];
    im_mailbox_free(w->mb);
    w->mb = NULL;
    if (i == 0) continue; /* main.c frees the rest of worker 0 */
    im_event_free(w->ev);
    imd_tls_free(w); /* after every listener that used it */
    im_server_free(w->srv);
    if (w->base) event_base_free(w->base);
    free(w);
  }
  d->workers = NULL;
  free(ws);
}
