/* imd's clustered message store on Redis: store.h's asynchronous contract
 * over Lua scripts (docs/CLUSTER-STORE.md has the schema and the scripts).
 *
 * The backend owns no connection: it sends its commands through an
 * imd_redis_io, so that imd can run them on the connection libim's Redis
 * cluster module keeps (and a test on a hiredis async context of its own).
 * Every command is one EVALSHA of one of the store's scripts; a NOSCRIPT
 * answer (scripts flushed, Redis restarted) resends the command as EVAL
 * and reloads every script, holding new requests back meanwhile so that
 * Redis still runs them in request order.
 *
 * The store needs a single Redis primary (standalone or one primary with
 * replicas, not Redis Cluster): an append touches the keys of the sender
 * and of every receiver in one script. Each user's keys share the hash tag
 * {uid}, so the rest of the schema is ready for a cluster.
 *
 * Durability is Redis's: an append is acked when Redis answered the
 * script, which with appendonly yes + appendfsync always is after the
 * fsync of the AOF.
 *
 * Periodic work is imd's to drive: imd_store_redis_tick() about once a
 * second flushes coalesced delivered marks and runs the age retention.
 * Everything runs on the loop thread that runs the io's callbacks.
 */
#ifndef IMD_STORE_REDIS_H
#define IMD_STORE_REDIS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "store.h"

struct redisReply;

/* The answer to one command: reply is hiredis's (valid only during the
 * call), or NULL when the connection failed or went down (the command may
 * or may not have run). */
typedef void (*imd_redis_reply_fn)(void *arg, const struct redisReply *reply);

typedef struct imd_redis_io {
  /* Send one command (argc arguments, argv[i] of argvlen[i] bytes, borrowed
   * for the call). Returns 0: fn(arg, reply) is called exactly once, later
   * (never inside command()), on the loop thread; or -1: the connection is
   * down right now and fn is never called. Commands must reach Redis in
   * the order they were given (one connection, pipelined): the store's
   * read-after-write and seq order rest on it. */
  int (*command)(void *ctx, int argc, const char **argv, const size_t *argvlen,
                 imd_redis_reply_fn fn, void *arg);
  void *ctx;
  /* Optional (both or neither): appends also push the message to the
   * receivers' other nodes in the same script (libim's
   * im_redis_push_lua(); <libim/im_redis.h>), one round trip instead of
   * two. push_lua is the Lua source put in front of the append script
   * (static storage). push_args fills args[0..4) (self, prefix, maxlen,
   * head) for m, borrowed until *done(owned) is called (right after the
   * command is built); returns 0, or -1 when pushing is not possible now:
   * the append goes without it and completes with IMD_STORE_OK. */
  const char *push_lua;
  int (*push_args)(void *ctx, const imd_store_msg *m, const char *args[4], size_t lens[4],
                   void **owned);
} imd_redis_io;

/* A store on io (copied; io->ctx must outlive the store and the replies to
 * its last commands). Key names begin with prefix (e.g. "im:"; copied; may
 * be "" or NULL). o: retention (keep_count, keep_age_s); no_fsync is
 * ignored (durability is Redis's appendfsync). Sends the scripts to Redis
 * (SCRIPT LOAD) when the io is up; a store made while Redis is down works
 * once it is up. Returns the store, or NULL with a reason in err (errlen
 * bytes). Close it with s->ops->close(s): outstanding requests complete
 * with IMD_STORE_EIO unless their answer came first, pending delivered
 * marks are sent, and the answers still to come are only freed.
 *
 * Request functions return 0, IMD_STORE_EINVAL (bad argument, among them
 * an empty group member), IMD_STORE_EIO (out of memory) or IMD_STORE_EDOWN
 * (io->command returned -1: nothing was sent). A callback gets
 * IMD_STORE_EDOWN when the connection went away before the answer (an
 * append may then be stored or not: a retry with its cid is answered DUP
 * if it was), IMD_STORE_EIO when Redis answered with an error. */
imd_store *imd_store_redis_new(const imd_redis_io *io, const char *prefix,
                               const imd_store_opts *o, char *err, size_t errlen);

/* Send SCRIPT LOAD for every script, e.g. right after a (re)connection
 * and before other commands, so that no request takes the NOSCRIPT
 * detour. Returns 0, or IMD_STORE_EDOWN when the io is down. */
int imd_store_redis_load_scripts(imd_store *s);

/* Call about once a second with the wall clock (ms since the epoch):
 * sends the pending delivered marks (those that found no append to ride
 * along with), and with trim and an age limit one retention step every
 * 60 s (the first at the first call; the next at once while the last step
 * left work). The retention is the whole store's, so one store per
 * process is enough to pass trim (imd: worker 0's); the others' steps
 * would only find less to do. Does nothing for a NULL store. */
void imd_store_redis_tick(imd_store *s, uint64_t now_ms, bool trim);

/* One bounded age-retention step at wall-clock now_ms: for at most 100
 * users whose oldest entry is older than keep_age_s, drop the expired
 * prefix of their inbox (found in the first 128 entries) and raise their
 * trimmed mark. The count limit needs no step: each append applies it.
 * Returns 0 (sent; its result shows in the stats), IMD_STORE_EDOWN, or
 * IMD_STORE_EIO (out of memory). A store without an age limit sends
 * nothing and returns 0. */
int imd_store_redis_trim(imd_store *s, uint64_t now_ms);

#endif
