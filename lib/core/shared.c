/* Limits shared by the engines of one process (include/libim/im_shared.h).
 *
 * One atomic counter of open connections; uid -> record (connections on
 * each engine, rate bucket) in 64 keyed hashes, each behind its own mutex,
 * a uid's stripe chosen by the map's keyed hash (so clients cannot pile
 * their uids onto one lock on purpose); the guard, which locks itself
 * (guard.c). A record lives while the uid has a counted connection: engines
 * keep a pointer to it in their own user record and charge msgs to it with
 * a compare-and-swap, without the lock.
 *
 * An engine counts its connections in its slot of the record (slot 0
 * unless shared_set_slot gave it another): an im_group gives each member
 * its own, so the same record tells the group which members hold a uid, and
 * the process keeps one entry per online user, not one here and one in the
 * group. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "core/engine.h"
#include "core/shared.h"

#define STRIPES 64

struct shared_user {
  strmap_node node;
  _Atomic uint64_t tat;          /* GCRA theoretical arrival time, driver us */
  uint32_t n[];                  /* connections per slot, under its stripe's lock;
                                  * the uid follows the im_shared's `slots` of them */
};

typedef struct stripe {
  pthread_mutex_t lock;
  strmap users;
} stripe;

struct im_shared {
  atomic_size_t refs;
  atomic_size_t conns;
  atomic_size_t authed;     /* connections holding a uid record's count */
  unsigned slots;                /* of each shared_user's n[] */
  struct im_guard *guard;
  stripe s[STRIPES];
};

im_shared *im_shared_new(void) { return shared_new_slots(1); }

im_shared *shared_new_slots(unsigned slots) {
  if (slots < 1 || slots > SHARED_SLOTS_MAX) return NULL;
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
  atomic_init(&sh->authed, 0);
  sh->slots = slots;
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

/* ---- connections ------------------------------------------------------------------ */

bool shared_conn_take(im_shared *sh, uint32_t max) {
  size_t n = atomic_load_explicit(&sh->conns, memory_order_relaxed);
  do {
    if (max && n >= max) return false;
  } while (!atomic_compare_exchange_weak(&sh->conns, &n, n + 1));
  return true;
}

void shared_conn_put(im_shared *sh) { atomic_fetch_sub(&sh->conns, 1); }

size_t im_shared_authed(const im_shared *sh) {
  return atomic_load(&((im_shared *)sh)->authed);
}

size_t im_shared_conns(const im_shared *sh) {
  return atomic_load(&((im_shared *)sh)->conns);
}

/* ---- users ------------------------------------------------------------------------ */

static stripe *stripe_of(im_shared *sh, const char *uid, size_t len) {
  return &sh->s[strmap_hash(uid, len) % STRIPES];
}

static uint32_t user_total(const im_shared *sh, const shared_user *e) {
  uint32_t n = 0;
  for (unsigned i = 0; i < sh->slots; i++) n += e->n[i];
  return n;
}

int shared_user_take(im_shared *sh, const char *uid, size_t len, uint32_t max, unsigned slot,
                     shared_user **out) {
  stripe *st = stripe_of(sh, uid, len);
  int rc = 0;
  pthread_mutex_lock(&st->lock);
  shared_user *e = (shared_user *)strmap_get(&st->users, uid, len);
  if (!e) {
    size_t counts = sizeof(uint32_t) * sh->slots;
    e = calloc(1, sizeof *e + counts + len + 1);
    if (e) {
      char *key = (char *)e->n + counts;
      memcpy(key, uid, len);
      e->node.key = key;
      e->node.klen = (uint32_t)len;
      atomic_init(&e->tat, 0);
      strmap_put(&st->users, &e->node);
    } else {
      rc = IM_ENOMEM;
    }
  } else if (max && user_total(sh, e) >= max) {
    rc = IM_ELIMIT;
  }
  if (rc == 0) {
    e->n[slot]++;
    *out = e;
    atomic_fetch_add(&sh->authed, 1);
  }
  pthread_mutex_unlock(&st->lock);
  return rc;
}

void shared_user_put(im_shared *sh, shared_user *e, unsigned slot) {
  stripe *st = stripe_of(sh, e->node.key, e->node.klen);
  pthread_mutex_lock(&st->lock);
  if (e->n[slot] > 0) {
    e->n[slot]--;
    atomic_fetch_sub(&sh->authed, 1);
  }
  if (user_total(sh, e) == 0) {
    strmap_del(&st->users, &e->node);
    free(e);
  }
  pthread_mutex_unlock(&st->lock);
}

uint64_t shared_user_spread(im_shared *sh, const char *uid, size_t len, unsigned except,
                            uint32_t *counts) {
  stripe *st = stripe_of(sh, uid, len);
  uint64_t mask = 0;
  pthread_mutex_lock(&st->lock);
  const shared_user *e = (const shared_user *)strmap_get(&st->users, uid, len);
  for (unsigned i = 0; e && i < sh->slots; i++) {
    if (i == except || e->n[i] == 0) continue;
    mask |= 1ull << i;
    if (counts) counts[i] = e->n[i];
  }
  pthread_mutex_unlock(&st->lock);
  return mask;
}

size_t shared_users(im_shared *sh) {
  size_t n = 0;
  for (unsigned i = 0; i < STRIPES; i++) {
    pthread_mutex_lock(&sh->s[i].lock);
    n += sh->s[i].users.count;
    pthread_mutex_unlock(&sh->s[i].lock);
  }
  return n;
}

size_t im_shared_user_conns(im_shared *sh, const char *uid) {
  size_t len = strlen(uid), n = 0;
  stripe *st = stripe_of(sh, uid, len);
  pthread_mutex_lock(&st->lock);
  shared_user *e = (shared_user *)strmap_get(&st->users, uid, len);
  if (e) n = user_total(sh, e);
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
    guard_share(s, sh->guard);
  else
    guard_free(s);
  if (s->shared) im_shared_release(s->shared);
  if (sh) shared_ref(sh);
  s->shared = sh;
  s->shared_slot = 0;
  return 0;
}

int shared_set_slot(im_server *s, unsigned slot) {
  if (!s->shared || slot >= s->shared->slots) return IM_EINVAL;
  if (s->st.conns || s->dead) return IM_ESTATE;
  s->shared_slot = slot;
  return 0;
}
