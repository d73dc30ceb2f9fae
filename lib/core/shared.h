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

/* One more authenticated connection of uid (len bytes): *out is its
 * record, valid while the connection is counted. Returns 0, IM_ELIMIT
 * (max, when not 0, are open already) or IM_ENOMEM. */
int shared_user_take(im_shared *sh, const char *uid, size_t len, uint32_t max, shared_user **out);
/* That connection is gone (the record is freed with the uid's last). */
void shared_user_put(im_shared *sh, shared_user *e);

/* GCRA at rate msgs/s (bursts of up to twice the rate) with theoretical
 * arrival time tat: does one more msg at now_us fit? When it does, *next
 * is the new tat. */
bool gcra_fits(uint64_t tat, uint64_t now_us, uint32_t rate, uint64_t *next);
/* Charge one msg to the uid's rate bucket (gcra_fits; now_us on the
 * process-wide driver clock): false when over the rate, then nothing is
 * charged. */
bool shared_user_charge(shared_user *e, uint64_t now_us, uint32_t rate);

/* The shared guard (guard.c makes it: guard_new_shared). */
struct im_guard *shared_guard(im_shared *sh);

/* A reference for an attached engine. */
void shared_ref(im_shared *sh);

#endif
