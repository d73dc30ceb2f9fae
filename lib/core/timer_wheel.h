/* A hashed timing wheel: O(1) add/remove, intrusive entries (no allocation
 * per timer), one slot walked per tick. Deadlines are in ticks; an entry due
 * further than the wheel size away waits for its round (its slot is visited
 * every `nslots` ticks and skipped until due). */
#ifndef IM_CORE_TIMER_WHEEL_H
#define IM_CORE_TIMER_WHEEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct tw_entry {
  struct tw_entry *next, *prev; /* prev == NULL: not scheduled */
  uint64_t due;                 /* absolute tick */
} tw_entry;

typedef struct tw_wheel {
  tw_entry *slots;   /* nslots sentinel heads (circular lists) */
  uint32_t nslots;   /* power of two */
  uint64_t now;      /* current tick: every entry with due <= now has fired */
  size_t count;
} tw_wheel;

/* nslots is rounded up to a power of two. Returns 0 or -1 on allocation failure. */
int tw_init(tw_wheel *w, uint32_t nslots, uint64_t start_tick);
void tw_free(tw_wheel *w);

/* Schedule e at absolute tick `due` (a due <= now fires on the next advance).
 * If e is already scheduled it is moved. O(1). */
void tw_schedule(tw_wheel *w, tw_entry *e, uint64_t due);
/* Unschedule e if scheduled. O(1). */
void tw_cancel(tw_wheel *w, tw_entry *e);
static inline bool tw_scheduled(const tw_entry *e) { return e->prev != NULL; }
static inline void tw_entry_init(tw_entry *e) { e->next = e->prev = NULL; e->due = 0; }

/* Advance to tick `to`, calling fire(e, arg) for every entry whose due <= to,
 * each unscheduled before its call (fire may reschedule it or schedule/cancel
 * others). Walks at most min(to - now, nslots) slots. Returns the number fired.
 * During fire, w->now is the tick being walked (for a jump longer than the
 * wheel, one of its last nslots ticks), so an entry scheduled from fire with
 * due <= w->now fires on a later tick: later in this walk, or in the next
 * advance. Entries of one slot fire in the order they were scheduled. */
size_t tw_advance(tw_wheel *w, uint64_t to, void (*fire)(tw_entry *e, void *arg), void *arg);

#endif
