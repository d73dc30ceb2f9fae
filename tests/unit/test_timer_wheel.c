#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "core/timer_wheel.h"

/* A timer under test: records when (in wheel ticks) and how often it fired,
 * and optionally acts on the wheel from inside its callback. */
typedef struct test_timer {
  tw_entry e;
  int id;
  int fired;
  uint64_t fired_at;               /* w->now seen inside the last fire */
  uint64_t resched_delta;          /* if non-zero, fire reschedules at now + delta */
  struct test_timer *cancel_other; /* fire cancels this entry */
  struct test_timer *move_other;   /* fire moves this entry to now + move_delta */
  uint64_t move_delta;
} test_timer;

typedef struct fire_log {
  tw_wheel *w;
  int order[64];
  int n;
} fire_log;

#define TIMER_OF(ep) ((test_timer *)((char *)(ep) - offsetof(test_timer, e)))

static void on_fire(tw_entry *e, void *arg)
{
  fire_log *log = arg;
  test_timer *t = TIMER_OF(e);

  assert_false(tw_scheduled(e));
  t->fired++;
  t->fired_at = log->w->now;
  if (log->n < (int)(sizeof log->order / sizeof log->order[0]))
    log->order[log->n++] = t->id;
  if (t->resched_delta != 0)
    tw_schedule(log->w, e, log->w->now + t->resched_delta);
  if (t->cancel_other != NULL)
    tw_cancel(log->w, &t->cancel_other->e);
  if (t->move_other != NULL)
    tw_schedule(log->w, &t->move_other->e, log->w->now + t->move_delta);
}

static void timer_init(test_timer *t, int id)
{
  memset(t, 0, sizeof *t);
  tw_entry_init(&t->e);
  t->id = id;
}

static void test_init_rounds_up(void **state)
{
  tw_wheel w;
  (void)state;

  assert_int_equal(tw_init(&w, 100, 7), 0);
  assert_int_equal(w.nslots, 128);
  assert_int_equal(w.now, 7);
  assert_int_equal(w.count, 0);
  tw_free(&w);
  assert_int_equal(tw_init(&w, 0, 0), 0);
  assert_int_equal(w.nslots, 1);
  tw_free(&w);
}

static void test_fires_exactly_at_due(void **state)
{
  tw_wheel w;
  fire_log log = {.w = &w};
  test_timer t;
  (void)state;

  assert_int_equal(tw_init(&w, 8, 100), 0);
  timer_init(&t, 1);
  tw_schedule(&w, &t.e, 105);
  assert_true(tw_scheduled(&t.e));
  assert_int_equal(w.count, 1);
  for (uint64_t tick = 101; tick <= 104; tick++) {
    assert_int_equal(tw_advance(&w, tick, on_fire, &log), 0);
    assert_int_equal(t.fired, 0);
  }
  assert_int_equal(tw_advance(&w, 105, on_fire, &log), 1);
  assert_int_equal(t.fired, 1);
  assert_int_equal(t.fired_at, 105);
  assert_false(tw_scheduled(&t.e));
  assert_int_equal(w.count, 0);
  assert_int_equal(w.now, 105);
  assert_int_equal(tw_advance(&w, 200, on_fire, &log), 0);
  assert_int_equal(t.fired, 1);
  /* Advancing to the present or the past is a no-op. */
  assert_int_equal(tw_advance(&w, 150, on_fire, &log), 0);
  assert_int_equal(w.now, 200);
  tw_free(&w);
}

static void test_fires_within_multi_tick_advance(void **state)
{
  tw_wheel w;
  fire_log log = {.w = &w};
  test_timer a, b;
  (void)state;

  assert_int_equal(tw_init(&w, 16, 0), 0);
  timer_init(&a, 1);
  timer_init(&b, 2);
  tw_schedule(&w, &a.e, 9);
  tw_schedule(&w, &b.e, 3);
  /* One advance covering both: each fires while the walk is at its own tick. */
  assert_int_equal(tw_advance(&w, 10, on_fire, &log), 2);
  assert_int_equal(b.fired_at, 3);
  assert_int_equal(a.fired_at, 9);
  assert_int_equal(log.order[0], 2);
  assert_int_equal(log.order[1], 1);
  tw_free(&w);
}

static void test_due_beyond_one_round(void **state)
{
  tw_wheel w;
  fire_log log = {.w = &w};
  test_timer t, u;
  const uint32_t n = 16;
  const uint64_t due = 5 * n + 3;
  (void)state;

  assert_int_equal(tw_init(&w, n, 0), 0);
  timer_init(&t, 1);
  timer_init(&u, 2);
  tw_schedule(&w, &t.e, due);
  tw_schedule(&w, &u.e, due);
  /* Tick by tick: the slot is visited five times before the due round. */
  for (uint64_t tick = 1; tick < due; tick++) {
    assert_int_equal(tw_advance(&w, tick, on_fire, &log), 0);
  }
  assert_int_equal(t.fired, 0);
  assert_int_equal(tw_advance(&w, due, on_fire, &log), 2);
  assert_int_equal(t.fired_at, due);
  assert_int_equal(u.fired_at, due);
  tw_free(&w);

  /* Same with jumps larger than the wheel landing one tick short, then on it. */
  assert_int_equal(tw_init(&w, n, 0), 0);
  timer_init(&t, 1);
  tw_schedule(&w, &t.e, due);
  assert_int_equal(tw_advance(&w, 3 * n + 1, on_fire, &log), 0);
  assert_int_equal(tw_advance(&w, due - 1, on_fire, &log), 0);
  assert_int_equal(t.fired, 0);
  assert_int_equal(tw_advance(&w, due, on_fire, &log), 1);
  assert_int_equal(t.fired, 1);
  tw_free(&w);
}

static void test_cancel_before_due(void **state)
{
  tw_wheel w;
  fire_log log = {.w = &w};
  test_timer t, keep;
  (void)state;

  assert_int_equal(tw_init(&w, 8, 0), 0);
  timer_init(&t, 1);
  timer_init(&keep, 2);
  tw_cancel(&w, &t.e); /* never scheduled: no-op */
  assert_int_equal(w.count, 0);
  tw_schedule(&w, &t.e, 5);
  tw_schedule(&w, &keep.e, 5);
  assert_int_equal(w.count, 2);
  assert_int_equal(tw_advance(&w, 4, on_fire, &log), 0);
  tw_cancel(&w, &t.e);
  assert_false(tw_scheduled(&t.e));
  assert_int_equal(w.count, 1);
  tw_cancel(&w, &t.e); /* twice: still a no-op */
  assert_int_equal(w.count, 1);
  assert_int_equal(tw_advance(&w, 100, on_fire, &log), 1);
  assert_int_equal(t.fired, 0);
  assert_int_equal(keep.fired, 1);
  assert_int_equal(w.count, 0);
  tw_free(&w);
}

static void test_schedule_moves_entry(void **state)
{
  tw_wheel w;
  fire_log log = {.w = &w};
  test_timer t;
  (void)state;

  assert_int_equal(tw_init(&w, 8, 0), 0);
  timer_init(&t, 1);
  tw_schedule(&w, &t.e, 3);
  tw_schedule(&w, &t.e, 20);
  assert_int_equal(w.count, 1);
  assert_int_equal(tw_advance(&w, 19, on_fire, &log), 0);
  assert_int_equal(tw_advance(&w, 20, on_fire, &log), 1);
  assert_int_equal(t.fired_at, 20);
  tw_free(&w);
}

static void test_overdue_fires_on_next_advance(void **state)
{
  tw_wheel w;
  fire_log log = {.w = &w};
  test_timer t;
  (void)state;

  assert_int_equal(tw_init(&w, 8, 50), 0);
  timer_init(&t, 1);
  tw_schedule(&w, &t.e, 10);
  assert_int_equal(t.e.due, 10);
  assert_int_equal(tw_advance(&w, 50, on_fire, &log), 0);
  assert_int_equal(tw_advance(&w, 51, on_fire, &log), 1);
  assert_int_equal(t.fired_at, 51);
  tw_free(&w);
}

static void test_same_slot_insertion_order(void **state)
{
  tw_wheel w;
  fire_log log = {.w = &w};
  test_timer t[5];
  (void)state;

  assert_int_equal(tw_init(&w, 8, 0), 0);
  for (int i = 0; i < 5; i++)
    timer_init(&t[i], i);
  /* Ids 0, 2, 4 share the slot and the due; 1 and 3 share the slot a round later. */
  tw_schedule(&w, &t[0].e, 4);
  tw_schedule(&w, &t[1].e, 12);
  tw_schedule(&w, &t[2].e, 4);
  tw_schedule(&w, &t[3].e, 12);
  tw_schedule(&w, &t[4].e, 4);
  assert_int_equal(tw_advance(&w, 4, on_fire, &log), 3);
  assert_int_equal(log.n, 3);
  assert_int_equal(log.order[0], 0);
  assert_int_equal(log.order[1], 2);
  assert_int_equal(log.order[2], 4);
  assert_int_equal(w.count, 2);
  assert_int_equal(tw_advance(&w, 12, on_fire, &log), 2);
  assert_int_equal(log.order[3], 1);
  assert_int_equal(log.order[4], 3);
  tw_free(&w);
}

static void test_reschedule_from_fire(void **state)
{
  tw_wheel w;
  fire_log log = {.w = &w};
  test_timer t;
  (void)state;

  /* A periodic timer: every 3 ticks, advanced in uneven steps. */
  assert_int_equal(tw_init(&w, 8, 0), 0);
  timer_init(&t, 1);
  t.resched_delta = 3;
  tw_schedule(&w, &t.e, 3);
  for (uint64_t to = 1; to <= 30; to += 2)
    tw_advance(&w, to, on_fire, &log);
  assert_int_equal(t.fired, 9); /* ticks 3, 6, ..., 27 */
  assert_int_equal(t.fired_at, 27);
  assert_true(tw_scheduled(&t.e));
  assert_int_equal(t.e.due, 30);
  assert_int_equal(w.count, 1);
  for (int i = 0; i < 9; i++)
    assert_int_equal(log.order[i], 1);
  tw_free(&w);
}

static void test_reschedule_into_walked_slot(void **state)
{
  tw_wheel w;
  fire_log log = {.w = &w};
  test_timer t;
  (void)state;

  /* now + nslots maps to the slot being walked: it must wait a full round,
   * neither firing again in this walk nor being lost. */
  assert_int_equal(tw_init(&w, 8, 0), 0);
  timer_init(&t, 1);
  t.resched_delta = 8;
  tw_schedule(&w, &t.e, 2);
  assert_int_equal(tw_advance(&w, 2, on_fire, &log), 1);
  assert_int_equal(t.e.due, 10);
  assert_int_equal(tw_advance(&w, 9, on_fire, &log), 0);
  assert_int_equal(tw_advance(&w, 10, on_fire, &log), 1);
  assert_int_equal(t.fired_at, 10);
  /* Within a walk as long as the wheel it fires again a round later. */
  assert_int_equal(tw_advance(&w, 18, on_fire, &log), 1);
  assert_int_equal(t.fired_at, 18);
  /* A longer jump visits the slot once: missed periods collapse into one fire. */
  assert_int_equal(tw_advance(&w, 42, on_fire, &log), 1);
  assert_int_equal(t.fired, 4);
  assert_int_equal(t.fired_at, 42);
  assert_int_equal(t.e.due, 50);
  tw_free(&w);
}

typedef struct counted_entry {
  tw_entry e;
  int fires;
} counted_entry;

static void resched_now_fire(tw_entry *e, void *arg)
{
  tw_wheel *w = arg;
  counted_entry *c = (counted_entry *)((char *)e - offsetof(counted_entry, e));

  c->fires++;
  tw_schedule(w, e, w->now);
}

static void test_reschedule_overdue_from_fire_terminates(void **state)
{
  tw_wheel w;
  counted_entry c = {.fires = 0};
  (void)state;

  /* Rescheduling at the current tick cannot fire again in the same tick: it
   * moves one tick ahead, so a walk of k ticks fires it at most k times. */
  assert_int_equal(tw_init(&w, 8, 0), 0);
  tw_entry_init(&c.e);
  tw_schedule(&w, &c.e, 1);
  assert_int_equal(tw_advance(&w, 1, resched_now_fire, &w), 1);
  assert_int_equal(c.fires, 1);
  assert_int_equal(tw_advance(&w, 5, resched_now_fire, &w), 4);
  assert_int_equal(c.fires, 5);
  /* A jump far past the wheel walks only ticks 999993..1000000; the entry
   * waits in slot 6 (tick 999998) and then re-fires on each remaining tick. */
  assert_int_equal(tw_advance(&w, 1000000, resched_now_fire, &w), 3);
  assert_int_equal(w.now, 1000000);
  assert_true(tw_scheduled(&c.e));
  assert_int_equal(w.count, 1);
  tw_free(&w);
}

static void test_cancel_other_from_fire(void **state)
{
  tw_wheel w;
  fire_log log = {.w = &w};
  test_timer a, b, c, later;
  (void)state;

  assert_int_equal(tw_init(&w, 8, 0), 0);
  timer_init(&a, 1);
  timer_init(&b, 2);
  timer_init(&c, 3);
  timer_init(&later, 4);
  /* a cancels b, the next entry due in the same slot, and one in a later slot. */
  a.cancel_other = &b;
  tw_schedule(&w, &a.e, 5);
  tw_schedule(&w, &b.e, 5);
  tw_schedule(&w, &c.e, 5);
  tw_schedule(&w, &later.e, 7);
  c.cancel_other = &later;
  assert_int_equal(tw_advance(&w, 20, on_fire, &log), 2);
  assert_int_equal(a.fired, 1);
  assert_int_equal(b.fired, 0);
  assert_int_equal(c.fired, 1);
  assert_int_equal(later.fired, 0);
  assert_false(tw_scheduled(&b.e));
  assert_false(tw_scheduled(&later.e));
  assert_int_equal(w.count, 0);
  tw_free(&w);
}

static void test_move_other_from_fire(void **state)
{
  tw_wheel w;
  fire_log log = {.w = &w};
  test_timer a, b, c;
  (void)state;

  assert_int_equal(tw_init(&w, 8, 0), 0);
  timer_init(&a, 1);
  timer_init(&b, 2);
  timer_init(&c, 3);
  /* a postpones b (same slot, same due) by 4 ticks and c stays put. */
  a.move_other = &b;
  a.move_delta = 4;
  tw_schedule(&w, &a.e, 3);
  tw_schedule(&w, &b.e, 3);
  tw_schedule(&w, &c.e, 3);
  assert_int_equal(tw_advance(&w, 6, on_fire, &log), 2);
  assert_int_equal(b.fired, 0);
  assert_int_equal(c.fired_at, 3);
  assert_int_equal(b.e.due, 7);
  assert_int_equal(tw_advance(&w, 7, on_fire, &log), 1);
  assert_int_equal(b.fired_at, 7);
  assert_int_equal(w.count, 0);

  /* A fire that schedules a fresh entry for a later tick of the same walk. */
  timer_init(&a, 1);
  timer_init(&c, 3);
  a.move_other = &c;
  a.move_delta = 2;
  tw_schedule(&w, &a.e, 8);
  assert_int_equal(tw_advance(&w, 12, on_fire, &log), 2);
  assert_int_equal(c.fired_at, 10);
  tw_free(&w);
}

static void test_big_jump(void **state)
{
  tw_wheel w;
  fire_log log = {.w = &w};
  enum { N = 200 };
  test_timer *t = calloc(N, sizeof *t);
  size_t fired;
  (void)state;

  assert_non_null(t);
  assert_int_equal(tw_init(&w, 64, 1000), 0);
  for (int i = 0; i < N; i++) {
    timer_init(&t[i], i);
    tw_schedule(&w, &t[i].e, 1000 + 1 + (uint64_t)i * 37);
  }
  /* to - now spans many rounds: exactly the entries due <= to fire. */
  fired = tw_advance(&w, 1000 + 100 * 37, on_fire, &log);
  assert_int_equal(fired, 100);
  for (int i = 0; i < N; i++)
    assert_int_equal(t[i].fired, i < 100 ? 1 : 0);
  assert_int_equal(w.count, N - 100);
  /* A jump of 2^40 ticks must walk only the wheel once. */
  fired = tw_advance(&w, UINT64_C(1) << 40, on_fire, &log);
  assert_int_equal(fired, N - 100);
  assert_int_equal(w.count, 0);
  for (int i = 0; i < N; i++)
    assert_int_equal(t[i].fired, 1);
  tw_free(&w);
  free(t);
}

static void test_free_unschedules(void **state)
{
  tw_wheel w;
  test_timer t;
  (void)state;

  assert_int_equal(tw_init(&w, 8, 0), 0);
  timer_init(&t, 1);
  tw_schedule(&w, &t.e, 3);
  tw_free(&w);
  assert_false(tw_scheduled(&t.e));
}

/* Random operations against a reference: per entry a scheduled flag and a due;
 * an advance must fire exactly the scheduled entries with due <= to, each at
 * its due tick when the advance is no longer than the wheel. */
enum { RND_N = 100000, RND_SLOTS = 256 };

typedef struct rnd_model {
  tw_wheel w;
  tw_entry *e;
  uint64_t *due;
  unsigned char *sched;
  unsigned char *fired;
  size_t count;
  uint64_t from, to;
  size_t nfired;
  uint64_t rng;
} rnd_model;

static uint64_t rnd_next(uint64_t *s)
{
  /* xorshift64*: deterministic, reproducible runs. */
  *s ^= *s >> 12;
  *s ^= *s << 25;
  *s ^= *s >> 27;
  return *s * UINT64_C(2685821657736338717);
}

static void rnd_fire(tw_entry *e, void *arg)
{
  rnd_model *m = arg;
  size_t i = (size_t)(e - m->e);

  assert_true(i < RND_N);
  assert_true(m->sched[i]);
  assert_false(m->fired[i]);
  assert_true(m->due[i] <= m->to);
  if (m->to - m->from <= RND_SLOTS) {
    uint64_t expect = m->due[i] > m->from ? m->due[i] : m->from + 1;
    assert_int_equal(m->w.now, expect);
  }
  m->fired[i] = 1;
  m->sched[i] = 0;
  m->count--;
  m->nfired++;
  /* Some timers re-arm themselves beyond this advance, as periodic ones do. */
  if (rnd_next(&m->rng) % 4 == 0) {
    uint64_t due = m->to + 1 + rnd_next(&m->rng) % (3 * RND_SLOTS);
    tw_schedule(&m->w, e, due);
    m->due[i] = due;
    m->sched[i] = 1;
    m->count++;
  }
}

static void test_random_vs_model(void **state)
{
  rnd_model m;
  (void)state;

  memset(&m, 0, sizeof m);
  m.rng = UINT64_C(0x2545f4914f6cdd1d);
  m.e = calloc(RND_N, sizeof *m.e);
  m.due = calloc(RND_N, sizeof *m.due);
  m.sched = calloc(RND_N, 1);
  m.fired = calloc(RND_N, 1);
  assert_true(m.e && m.due && m.sched && m.fired);
  assert_int_equal(tw_init(&m.w, RND_SLOTS, 12345), 0);
  for (size_t i = 0; i < RND_N; i++)
    tw_entry_init(&m.e[i]);

  for (int round = 0; round < 1500; round++) {
    size_t expect = 0;
    uint64_t r;
    for (int k = 0; k < 200; k++) {
      size_t i = rnd_next(&m.rng) % RND_N;
      r = rnd_next(&m.rng) % 100;
      if (r < 70) {
        /* Mostly near future, some several rounds out, a few overdue. */
        uint64_t due = m.w.now + 1 + rnd_next(&m.rng) % (r < 50 ? RND_SLOTS : 8 * RND_SLOTS);
        if (r < 3)
          due = m.w.now - rnd_next(&m.rng) % 50;
        if (!m.sched[i])
          m.count++;
        tw_schedule(&m.w, &m.e[i], due);
        m.due[i] = due;
        m.sched[i] = 1;
      } else {
        if (m.sched[i])
          m.count--;
        tw_cancel(&m.w, &m.e[i]);
        m.sched[i] = 0;
      }
      assert_int_equal(m.w.count, m.count);
      assert_int_equal(tw_scheduled(&m.e[i]), m.sched[i]);
    }

    r = rnd_next(&m.rng) % 100;
    m.from = m.w.now;
    m.to = m.from + (r < 90 ? 1 + rnd_next(&m.rng) % 64 : 1 + rnd_next(&m.rng) % (10 * RND_SLOTS));
    for (size_t i = 0; i < RND_N; i++)
      if (m.sched[i] && m.due[i] <= m.to)
        expect++;
    memset(m.fired, 0, RND_N);
    m.nfired = 0;
    assert_int_equal(tw_advance(&m.w, m.to, rnd_fire, &m), expect);
    assert_int_equal(m.nfired, expect);
    assert_int_equal(m.w.now, m.to);
    assert_int_equal(m.w.count, m.count);
    for (size_t i = 0; i < RND_N; i++)
      if (m.sched[i])
        assert_true(m.due[i] > m.to);
  }

  tw_free(&m.w);
  free(m.e);
  free(m.due);
  free(m.sched);
  free(m.fired);
}

int main(void)
{
  const struct CMUnitTest tests[] = {
    cmocka_unit_test(test_init_rounds_up),
    cmocka_unit_test(test_fires_exactly_at_due),
    cmocka_unit_test(test_fires_within_multi_tick_advance),
    cmocka_unit_test(test_due_beyond_one_round),
    cmocka_unit_test(test_cancel_before_due),
    cmocka_unit_test(test_schedule_moves_entry),
    cmocka_unit_test(test_overdue_fires_on_next_advance),
    cmocka_unit_test(test_same_slot_insertion_order),
    cmocka_unit_test(test_reschedule_from_fire),
    cmocka_unit_test(test_reschedule_into_walked_slot),
    cmocka_unit_test(test_reschedule_overdue_from_fire_terminates),
    cmocka_unit_test(test_cancel_other_from_fire),
    cmocka_unit_test(test_move_other_from_fire),
    cmocka_unit_test(test_big_jump),
    cmocka_unit_test(test_free_unschedules),
    cmocka_unit_test(test_random_vs_model),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
