#include "core/timer_wheel.h"

#include <stdlib.h>

/* Largest power of two a uint32_t slot count can be rounded up to. */
#define TW_MAX_SLOTS (UINT32_C(1) << 31)

static void list_init(tw_entry *head) { head->next = head->prev = head; }

static void list_append(tw_entry *head, tw_entry *e)
{
  e->prev = head->prev;
  e->next = head;
  head->prev->next = e;
  head->prev = e;
}

static void list_unlink(tw_entry *e)
{
  e->prev->next = e->next;
  e->next->prev = e->prev;
}

int tw_init(tw_wheel *w, uint32_t nslots, uint64_t start_tick)
{
  uint32_t n = 1;

  if (nslots > TW_MAX_SLOTS)
    nslots = TW_MAX_SLOTS;
  while (n < nslots)
    n <<= 1;
  w->slots = calloc(n, sizeof *w->slots);
  if (w->slots == NULL)
    return -1;
  for (uint32_t i = 0; i < n; i++)
    list_init(&w->slots[i]);
  w->nslots = n;
  w->now = start_tick;
  w->count = 0;
  return 0;
}

void tw_free(tw_wheel *w)
{
  /* Leave still-scheduled entries unscheduled rather than pointing into
   * freed memory, so a later tw_cancel on them is a harmless no-op. */
  for (uint32_t i = 0; w->slots != NULL && i < w->nslots; i++) {
    tw_entry *head = &w->slots[i];
    for (tw_entry *e = head->next, *next; e != head; e = next) {
      next = e->next;
      e->next = e->prev = NULL;
    }
  }
  free(w->slots);
  w->slots = NULL;
  w->nslots = 0;
  w->count = 0;
}

void tw_schedule(tw_wheel *w, tw_entry *e, uint64_t due)
{
  /* An overdue entry goes to the next tick's slot: that slot is walked by the
   * next advance, and during an advance it is always ahead of the walk. */
  uint64_t tick = due > w->now ? due : w->now + 1;

  if (tw_scheduled(e))
    list_unlink(e);
  else
    w->count++;
  e->due = due;
  list_append(&w->slots[tick & (w->nslots - 1)], e);
}

void tw_cancel(tw_wheel *w, tw_entry *e)
{
  if (!tw_scheduled(e))
    return;
  list_unlink(e);
  e->next = e->prev = NULL;
  w->count--;
}

size_t tw_advance(tw_wheel *w, uint64_t to, void (*fire)(tw_entry *e, void *arg), void *arg)
{
  size_t fired = 0;

  if (to <= w->now)
    return 0;
  /* A jump longer than the wheel visits each slot once: walking only the last
   * nslots ticks before `to` covers every slot, and anything due <= to fires. */
  if (to - w->now > w->nslots)
    w->now = to - w->nslots;

  while (w->now < to) {
    tw_entry *head = &w->slots[++w->now & (w->nslots - 1)];
    tw_entry due_list;

    /* Move the due entries out first: fire may then reschedule into this
     * slot (lands on the slot list, not on due_list, so it cannot loop) or
     * cancel/move any entry still waiting on due_list. Entries stay counted
     * and scheduled while on due_list, so tw_cancel works on them. */
    list_init(&due_list);
    for (tw_entry *e = head->next, *next; e != head; e = next) {
      next = e->next;
      if (e->due <= to) {
        list_unlink(e);
        list_append(&due_list, e);
      }
    }
    while (due_list.next != &due_list) {
      tw_entry *e = due_list.next;
      tw_cancel(w, e);
      fired++;
      fire(e, arg);
    }
  }
  return fired;
}
