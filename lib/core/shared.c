/* Limits shared by the engines of one process (include/libim/im_shared.h).
 *
 * One atomic counter of open connections; uid -> record (connections, rate
 * bucket) in 64 keyed hashes, each behind its own mutex, a uid's stripe
 * chosen by the map's keyed hash (so clients cannot pile their uids onto
 * one lock on purpose); the guard, which locks itself (guard.c). A record
 * lives while the uid has a counted connection: engines keep a pointer to
 * it in their own user record and charge msgs to it with a
 * compare-and-swap, without the lock. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "core/engine.h"
#include "core/shared.h"

#define STRIPES 64

struct shared_user {
  strmap_node node;
  uint32_t conns;                /* under its stripe's lock */
  _Atomic uint64_t tat;          /* GCRA theoretical arrival time, driver us */
  char uid[];
};

typedef struct stripe {
  pthread_mutex_t lock;
  strmap users;
} stripe;

struct im_shared {
  atomic_size_t refs;
  atomic_size_t conns;
  struct im_guard *guard;
  stripe s[STRIPES];
};

im_shared *im_shared_new(void) {
  im_shared *sh = calloc(1, sizeof *sh);
  if (!sh || !(sh->guard = guard_new_shared())) {
    free(sh);
    return NULL;
  }
  for (unsigned i = 0; i < STRIPES; i++)
    if (strmap_init(&sh->s[i].users, 16) < 0) {
      while (i--) strmap_free(&sh->s[i].users);
      guard_destroy(sh->guard);
      free(sh);
      return NULL;
    }
  for (unsigned i = 0; i < STRIPES; i++) pthread_mutex_init(&sh->s[i].lock, NULL);
  atomic_init(&sh->refs, 1);
  atomic_init(&sh->conns, 0);
  return sh;
}

void shared_ref(im_shared *sh) { atomic_fetch_add(&sh->refs, 1); }

void im_shared_release(im_shared *sh) {
  if (!sh || atomic_fetch_sub(&sh->refs, 1) != 1) return;
  guard_destroy(sh->guard);
  for (unsigned i = 0; i < STRIPES; i++) {
    strmap *m = &sh->s[i].users;
    for (uint32_t b = 0; m->buckets && b <= m->mask; b++)
      for (strmap_node *n = m->buckets[b], *next; n; n = next) {
        next = n->next;
        free(n);
      }
    strmap_free(m);
    pthread_mutex_destroy(&sh->s[i].lock);
  }
  free(sh);
}

struct im_guard *shared_guard(im_shared *sh) { return sh->guard; }

/* ---- connections ------------------------------------------------------------------ */

bool shared_conn_take(im_shared *sh, uint32_t max) {
  size_t n = atomic_load_explicit(&sh->conns, memory_order_relaxed);
  do {
    if (max && n >= max) return false;
  } while (!atomic_compare_exchange_weak(&sh->conns, &n, n + 1));
  return true;
}

void shared_conn_put(im_shared *sh) { atomic_fetch_sub(&sh->conns, 1); }

size_t im_shared_conns(const im_shared *sh) {
  return atomic_load(&((im_shared *)sh)->conns);
}

/* ---- users ------------------------------------------------------------------------ */

static stripe *stripe_of(im_shared *sh, const char *uid, size_t len) {
  return &sh->s[strmap_hash(uid, len) % STRIPES];
}

int shared_user_take(im_shared *sh, const char *uid, size_t len, uint32_t max, shared_user **out) {
  stripe *st = stripe_of(sh, uid, len);
  int rc = 0;
  pthread_mutex_lock(&st->lock);
  shared_user *e = (shared_user *)strmap_get(&st->users, uid, len);
  if (!e) {
    e = malloc(sizeof *e + len + 1);
    if (e) {
      memcpy(e->uid, uid, len);
      e->uid[len] = '\0';
      e->node.key = e->uid;
      e->node.klen = (uint32_t)len;
      e->conns = 0;
      atomic_init(&e->tat, 0);
      strmap_put(&st->users, &e->node);
    } else {
      rc = IM_ENOMEM;
    }
  } else if (max && e->conns >= max) {
    rc = IM_ELIMIT;
  }
  if (rc == 0) {
    e->conns++;
    *out = e;
  }
  pthread_mutex_unlock(&st->lock);
  return rc;
}

void shared_user_put(im_shared *sh, shared_user *e) {
  stripe *st = stripe_of(sh, e->uid, e->node.klen);
  pthread_mutex_lock(&st->lock);
  if (--e->conns == 0) {
    strmap_del(&st->users, &e->node);
    free(e);
  }
  pthread_mutex_unlock(&st->lock);
}

size_t im_shared_user_conns(im_shared *sh, const char *uid) {
  size_t len = strlen(uid), n = 0;
  stripe *st = stripe_of(sh, uid, len);
  pthread_mutex_lock(&st->lock);
  shared_user *e = (shared_user *)strmap_get(&st->users, uid, len);
  if (e) n = e->conns;
  pthread_mutex_unlock(&st->lock);
  return n;
}

bool gcra_fits(uint64_t tat, uint64_t now_us, uint32_t rate, uint64_t *next) {
  uint64_t t = 1000000u / rate;
  if (!t) t = 1;
  uint64_t x = tat > now_us ? tat : now_us;
  if (x - now_us > t * (2 * (uint64_t)rate - 1)) return false;
  *next = x + t;
  return true;
}

bool shared_user_charge(shared_user *e, uint64_t now_us, uint32_t rate) {
  uint64_t tat = atomic_load_explicit(&e->tat, memory_order_relaxed), next;
  do {
    if (!gcra_fits(tat, now_us, rate, &next)) return false;
  } while (!atomic_compare_exchange_weak(&e->tat, &tat, next));
  return true;
}

/* ---- attaching an engine ------------------------------------------------------------ */

int im_server_set_shared(im_server *s, im_shared *sh) {
  if (s->shared == sh) return 0;
  if (s->st.conns || s->dead) return IM_ESTATE;
  if (sh)
    guard_share(s, sh);
  else
    guard_free(s);
  if (s->shared) im_shared_release(s->shared);
  if (sh) shared_ref(sh);
  s->shared = sh;
  return 0;
}
