/* Limits shared by the engines of one process (include/libim/im_shared.h):
 * what the engine calls on accept, auth, close and every msg when it is
 * attached to an im_shared. */
#ifndef IM_CORE_SHARED_H
#define IM_CORE_SHARED_H

#include <libim/im_shared.h>
#include <stdbool.h>
#include <stdint.h>

typedef struct shared_user shared_user;

/* One more open connection, unless max (0: none) are open already. */
bool shared_conn_take(im_shared *sh, uint32_t max);
void shared_conn_put(im_shared *sh);

#define SHARED_SLOTS_MAX 64

/* An im_shared whose user records count connections in `slots` slots (1 to
 * SHARED_SLOTS_MAX; im_shared_new() makes one), NULL when out of memory. */
im_shared *shared_new_slots(unsigned slots);

/* srv (attached to an im_shared with more than `slot` slots, no connection
 * yet) counts its users' connections in that slot. 0, IM_EINVAL or
 * IM_ESTATE. */
int shared_set_slot(im_server *s, unsigned slot);

/* One more authenticated connection of uid (len bytes), counted in `slot`,
 * unless max (0: no limit) are open already in all slots: *out is its
 * record, valid while the connection is counted. Returns 0, IM_ELIMIT or
 * IM_ENOMEM. */
int shared_user_take(im_shared *sh, const char *uid, size_t len, uint32_t max, unsigned slot,
                     shared_user **out);
/* That connection is gone: one fewer in `slot`; the record is freed with the uid's last connection. */
void shared_user_put(im_shared *sh, shared_user *e, unsigned slot);

/* The slots other than `except` that hold connections of uid, as a bit
 * mask; counts (when not NULL) gets each such slot's count. */
uint64_t shared_user_spread(im_shared *sh, const char *uid, size_t len, unsigned except,
                            uint32_t *counts);

/* GCRA at rate msgs/s (bursts of up to twice the rate) with theoretical
 * arrival time tat: does one more msg at now_us fit? When it does, *next
 * is the new tat. */
bool gcra_fits(uint64_t tat, uint64_t now_us, uint32_t rate, uint64_t *next);
/* Charge one msg to the uid's rate bucket (gcra_fits; now_us on the
 * process-wide driver clock): false when over the rate, then nothing is
 * charged. */
bool shared_user_charge(shared_user *e, uint64_t now_us, uint32_t rate);

/* The uids with a counted connection. */
size_t shared_users(im_shared *sh);

/* A reference for an attached engine. */
void shared_ref(im_shared *sh);

#endif
