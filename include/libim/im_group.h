/* libim thread group: N engines of one process, each on its own thread and
 * event loop, acting as one server.
 *
 * A multi-threaded program runs one im_server (with its own event_base,
 * im_event listeners on SO_REUSEPORT, connections and timers) per worker
 * thread and joins them in an im_group. The group is an im_router
 * (<libim/im_router.h>): it keeps a process-wide table of which worker
 * holds connections of which uid and members of which room (a keyed hash
 * under a read-write lock), and forwards im_send_users / im_room_send /
 * im_kick_user / im_presence to only the workers that hold receivers,
 * through each worker's im_async queue (<libim/im_async.h>): a copy per
 * receiving worker, one loop wake-up per batch, applied there with the
 * im_local_* calls in the order it was posted (so what one thread sends to
 * a connection arrives in send order). Kick counts and presence answers
 * cover every worker; presence lists another worker's connections with
 * node NULL, like the local ones. A send's count (im_send_users) includes
 * the connections on other workers the copies are for.
 *
 * Each member also mints message ids from its own share of the id
 * counter (im_server_set_id_shard; connection ids carry the member index
 * in their high bits, so no two members hand out the same one), and all
 * share one id clock (im_server_set_id_clock), so an id minted after
 * another one on any worker is greater.
 *
 * The members share their limits (<libim/im_shared.h>): the group's
 * im_shared holds one guard (per-source rate, bans, max_conns_per_source,
 * the blacklist), one count of open connections against max_connections,
 * and one record per uid for max_conns_per_user and max_user_msg_rate, so
 * each limit holds for the process whichever member a connection lands on
 * (give every member the same im_config and guard configuration).
 *
 * A group is the router of each member engine. A cluster module (the
 * Redis one, <libim/im_redis.h>) comes after it: im_group_set_outer
 * chains it behind the group for a member, so that what no member holds is
 * handed on to other processes, and what arrives from them is applied to
 * every member with im_group_local_*. The process is then one cluster node
 * on N threads.
 *
 * Threads: im_group_new / im_group_free on any one thread while no member
 * loop runs; im_group_join on the member's loop thread or before that loop
 * starts; everything a router hook does runs on the thread of the engine
 * that called it; im_group_run on the member's loop thread;
 * im_group_stats, im_group_user_conns, im_group_totals and im_group_size
 * on any thread.
 *
 * To send to a connection from a thread that runs no engine (a game
 * simulation thread), use that engine's im_mailbox (<libim/im_async.h>):
 * a mailbox send to a uid goes through the group like any other send.
 */
#ifndef LIBIM_IM_GROUP_H
#define LIBIM_IM_GROUP_H

#include <libim/im.h>
#include <libim/im_router.h>

#ifdef __cplusplus
extern "C" {
#endif

struct event_base;
typedef struct im_group im_group;

/* The most members a group can have. */
#define IM_GROUP_MAX 64

/* A group of `members` engines (1..IM_GROUP_MAX). max_queued bounds the
 * operations queued for one member and not yet applied (0: 1,000,000); an
 * operation over it is dropped for that member and counted (a stuck
 * worker cannot exhaust memory). Returns NULL (bad count, no memory). */
IM_EXTERN im_group *im_group_new(unsigned members, size_t max_queued);

/* Join srv, whose loop runs on base, as the next member: attaches srv to
 * the group's im_shared (im_server_set_shared: srv's guard configuration
 * and blacklist are merged into the shared guard), installs the group as
 * srv's router, gives srv its id shard (member index of `members`) and the
 * group's id clock. Join before srv accepts its first connection (so its
 * connection ids are tagged and every connection is counted by the shared
 * limits). base and srv are borrowed: they must outlive the group
 * (im_group_free). Returns the member index (0..members-1), IM_ELIMIT
 * (the group is full), IM_ESTATE (srv has connections already), IM_ENOMEM
 * or IM_ESYS (no file descriptor for the queue). */
IM_EXTERN int im_group_join(im_group *g, struct event_base *base, im_server *srv);

/* Apply now what other members queued for member (instead of waiting for
 * its loop's wake-up). A program that needs causal order across workers
 * calls it before a send that must follow one another worker made earlier
 * (e.g. an HTTP push answered on worker 1, then the next push arriving on
 * worker 2). Member's loop thread. Returns the operations applied. */
IM_EXTERN size_t im_group_run(im_group *g, unsigned member);

typedef struct im_group_counters {
  uint64_t posted;   /* operations queued for this member by the others */
  uint64_t wakeups;  /* loop wake-ups those caused (<= posted: batches) */
  uint64_t applied;  /* operations applied on this member */
  uint64_t dropped;  /* operations for this member dropped over max_queued or for memory */
} im_group_counters;

/* Counters of member (zeros for an index not joined). Any thread. */
IM_EXTERN void im_group_stats(im_group *g, unsigned member, im_group_counters *st);

/* Authenticated connections of uid on all members together, as the uid's
 * record in the group's im_shared has them now (a connection is counted
 * there before on_open and no longer before on_close, so in on_open this
 * counts the opening one and in on_close no longer the closing one). Any
 * thread. */
IM_EXTERN size_t im_group_user_conns(im_group *g, const char *uid);

/* Distinct uids with an authenticated connection and distinct rooms with
 * a member, on all members together (a uid or room on two members counts
 * once). NULL pointers are skipped. Any thread. */
IM_EXTERN void im_group_totals(im_group *g, size_t *users, size_t *rooms);

/* Members joined so far. Any thread. */
IM_EXTERN unsigned im_group_size(im_group *g);

/* ---- chaining a cluster module after the group ---------------------------------- */

/* The member index of srv, or IM_ENOENT when srv has not joined. Any
 * thread. */
IM_EXTERN int im_group_member(im_group *g, const im_server *srv);

/* Install outer (copied; NULL removes it) as the router after the group
 * for srv's member. The group calls its hooks on that member's thread,
 * after its own part:
 *  - conn_open / conn_close: for each of srv's authenticated connections
 *    (im_conn_get_info works in them; im_server_announce(srv) tells them
 *    again);
 *  - send_users, room_send, kick_user: for the operations started on srv
 *    (im_send_users, im_room_send, im_kick_user there), not for what the
 *    group applies for other members nor for im_group_local_*; their
 *    counts (or a negative code) are added to the group's;
 *  - presence: once every member answered, with the whole process's
 *    connections as `local` (node NULL); the outer router adds the rest
 *    and calls back. When it fails, the callback gets the process's;
 *  - room_open / room_close: only the outer router of one member has
 *    them (the last one installed with either hook set): called on that
 *    member's thread when the process gains its first member of a room and
 *    when it has lost the last one, paired for each room (rooms that exist
 *    already are not announced: install it before members join rooms).
 * Call it on srv's loop thread, or before that loop runs. Returns 0,
 * IM_ENOENT (srv is not a member) or IM_ENOMEM. */
IM_EXTERN int im_group_set_outer(im_group *g, im_server *srv, const im_router *outer);

/* What an outer router brought in from another process, applied to the
 * whole group: like im_local_send_users / im_local_room_send /
 * im_local_kick_user on srv (a member; srv's thread), and a copy to each
 * other member holding receivers; never handed to an outer router. except
 * is a connection of srv or 0. g NULL: srv alone (exactly the im_local_*
 * call), so a module serving a group or a single server calls these either
 * way. Returns what the local call returns plus the other members'
 * connections the copies are for (as im_send_users counts them; 0 for a
 * room), or a negative IM_E* code (IM_ENOENT: srv is not a member). */
IM_EXTERN int im_group_local_send_users(im_group *g, im_server *srv, const char *const *uids,
                                        size_t n, const im_msg *m, im_conn_id except);
IM_EXTERN int im_group_local_room_send(im_group *g, im_server *srv, const char *room,
                                       const im_msg *m, im_conn_id except);
IM_EXTERN int im_group_local_kick_user(im_group *g, im_server *srv, const char *uid, int code,
                                       const char *reason);

/* Run fn(srv, arg) on member's loop thread (srv: that member's server),
 * after what was queued for it before. Any thread. Returns 0 (fn will run,
 * unless the group is freed first), IM_EINVAL (fn NULL), IM_ENOENT (no
 * such member yet), IM_ECLOSED (the group is being freed) or IM_ENOMEM. */
IM_EXTERN int im_group_call(im_group *g, unsigned member, void (*fn)(im_server *srv, void *arg),
                            void *arg);

/* fn(room, arg) for each room with a member on any member, under the
 * room table's read lock (fn must not call the group nor block; a
 * member's room join or leave waits meanwhile). Any thread. */
IM_EXTERN void im_group_rooms(im_group *g, void (*fn)(const char *room, void *arg), void *arg);

/* Authenticated connections of all members together (im_shared_authed of
 * the group's im_shared). Any thread. */
IM_EXTERN size_t im_group_conns(im_group *g);

/* Free the group: what is still queued is dropped (not applied). Call it
 * after every member loop has stopped, while their event_bases and
 * servers still exist (it frees events of those bases, and removes itself
 * as the servers' router, so that connections closed afterwards, e.g. by
 * im_event_free, reach no hook; an outer router is removed with it). The
 * servers stay usable as single servers. NULL is a no-op. */
IM_EXTERN void im_group_free(im_group *g);

#ifdef __cplusplus
}
#endif
#endif
