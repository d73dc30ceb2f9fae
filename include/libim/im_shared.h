/* Limits shared by the engines of one process.
 *
 * A program that runs several im_server engines as one server (one per
 * thread, see <libim/im_group.h>) wants its limits to hold for the process,
 * not for each engine: with N engines a per-engine limit allows N times as
 * much. An im_shared holds that state once for every engine attached to it
 * (im_server_set_shared):
 *
 *  - the guard (<libim/im_guard.h>): one table of sources, so the per-source
 *    connection rate, its automatic bans and max_conns_per_source count the
 *    connections of all engines, and one blacklist: an address banned
 *    through any engine (im_guard_ban) is refused by all. im_server_set_guard,
 *    im_guard_ban/unban, im_guard_bans and im_guard_get_stats of any
 *    attached engine act on the shared guard (the stats are the process's).
 *    im_guard_kick still closes the calling engine's connections only.
 *  - max_connections: the open connections of all attached engines are
 *    counted together (one atomic counter) against each engine's
 *    im_config.max_connections, which is then the process's limit (give
 *    every engine the same value).
 *  - max_conns_per_user and max_user_msg_rate: one record per uid with an
 *    authenticated connection on any attached engine (keyed hashes behind
 *    64 striped locks, taken on auth and close only): the newest connection
 *    over max_conns_per_user is refused whichever engine holds the others,
 *    and the msgs of a uid's connections on all engines draw on one rate
 *    bucket (an atomic compare-and-swap per msg, no lock).
 *
 * im_group_join attaches every member of a thread group to the group's
 * im_shared, so a program using im_group gets all of this without calling
 * anything here.
 *
 * Threads: every call here may be made from any thread; the state is
 * locked inside. An attached engine is still used on its own thread only.
 */
#ifndef LIBIM_IM_SHARED_H
#define LIBIM_IM_SHARED_H

#include <libim/im.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct im_shared im_shared;

/* A new shared state (guard off, no bans, no connections) with one
 * reference, the caller's. Its memory comes from the C library (it is
 * used by several threads), whatever an engine's im_allocator is.
 * Returns NULL when out of memory. */
IM_EXTERN im_shared *im_shared_new(void);

/* Attach srv to sh (sh may be NULL: detach). srv takes a reference to sh,
 * dropped when srv is detached or freed, so the caller may release its own
 * reference (im_shared_release) at once. srv must have no connections
 * (attach before the first accept). The guard srv had before is merged
 * into sh's: its configuration is used when sh's guard is not yet on, and
 * its blacklist entries are added; srv's own guard is then dropped (its
 * automatic bans with it). Detaching leaves srv without a guard.
 * Returns 0, IM_ESTATE (srv has connections), IM_ENOMEM. */
IM_EXTERN int im_server_set_shared(im_server *srv, im_shared *sh);

/* Drop one reference; the last frees sh. NULL is a no-op. */
IM_EXTERN void im_shared_release(im_shared *sh);

/* Open connections of every attached engine together (accepted, not yet
 * released). Any thread. */
IM_EXTERN size_t im_shared_conns(const im_shared *sh);

/* Authenticated connections of every attached engine together (counted
 * when a connection takes its place in its uid's record, before on_open,
 * until it leaves it, before on_close). Any thread. */
IM_EXTERN size_t im_shared_authed(const im_shared *sh);

/* Authenticated connections of uid on every attached engine together.
 * Any thread. */
IM_EXTERN size_t im_shared_user_conns(im_shared *sh, const char *uid);

#ifdef __cplusplus
}
#endif
#endif
