/* Calls across the worker threads of one imd (--threads; workers.c makes
 * them): the lock over what they share, a call run on every other
 * worker's loop, and results gathered from every worker's loop back onto
 * the asking one (only with workers: its callers check d->workers). */
#include <libim/im_router.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "imd.h"
#include "log.h"
#include "workers.h"

static pthread_mutex_t shared_lock = PTHREAD_MUTEX_INITIALIZER;

void imd_shared_lock(void) { pthread_mutex_lock(&shared_lock); }
void imd_shared_unlock(void) { pthread_mutex_unlock(&shared_lock); }

/* ---- calls onto another worker's loop ------------------------------------------------ */

typedef struct call {
  void (*fn)(imd *w, const char *s, uint32_t n);
  uint32_t n;
  char s[];
} call;

static void run_call(im_server *srv, void *arg) {
  call *c = arg;
  c->fn(im_server_user(srv), c->s, c->n);
  free(c);
}

void imd_workers_broadcast(imd *d, void (*fn)(imd *w, const char *s, uint32_t n), const char *s,
                           uint32_t n) {
  if (!d->workers) return;
  size_t len = s ? strlen(s) + 1 : 1;
  for (unsigned i = 0; i < d->workers->n; i++) {
    imd *w = d->workers->w[i];
    if (w == d || !w->mb) continue;
    call *c = malloc(sizeof *c + len);
    if (!c) continue;
    c->fn = fn;
    c->n = n;
    memcpy(c->s, s ? s : "", len);
    if (im_mailbox_call(w->mb, run_call, c) < 0) free(c);
  }
}

/* ---- gathering from every worker ----------------------------------------------------- */

typedef struct gather {
  imd *origin;
  int (*fn)(imd *w, void *arg);
  void (*done)(imd *d, long sum, int err, void *arg);
  void *arg;
  pthread_mutex_t lock;
  unsigned left;
  long sum;
  int err;
} gather;

static void gather_done(im_server *srv, void *p) {
  (void)srv;
  gather *g = p;
  g->done(g->origin, g->sum, g->err, g->arg);
  pthread_mutex_destroy(&g->lock);
  free(g);
}

/* One worker's result is in (r < 0: its error); the last hands the sum to
 * the origin's loop. */
static void gather_add(gather *g, int r) {
  pthread_mutex_lock(&g->lock);
  if (r < 0 && !g->err) g->err = r;
  if (r > 0) g->sum += r;
  bool last = --g->left == 0;
  pthread_mutex_unlock(&g->lock);
  if (last && im_mailbox_call(g->origin->mb, gather_done, g) < 0)
    log_error("workers: cannot hand a result back");
}

static void gather_one(im_server *srv, void *p) {
  gather *g = p;
  gather_add(g, g->fn(im_server_user(srv), g->arg));
}

int imd_workers_gather(imd *d, int (*fn)(imd *w, void *arg),
                       void (*done)(imd *d, long sum, int err, void *arg), void *arg) {
  gather *g = calloc(1, sizeof *g);
  if (!g) return -1;
  *g = (gather){.origin = d, .fn = fn, .done = done, .arg = arg, .left = d->workers->n};
  pthread_mutex_init(&g->lock, NULL);
  for (unsigned i = 0; i < d->workers->n; i++)
    if (im_mailbox_call(d->workers->w[i]->mb, gather_one, g) < 0)
      gather_add(g, IM_ENOMEM); /* that worker is missing */
  return 0;
}
