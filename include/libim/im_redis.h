/* libim cluster module on Redis: many im_servers on many machines behave
 * like one. Built when hiredis is found; links hiredis and libevent.
 *
 * im_redis_new() installs a router (<libim/im_router.h>) on the server and
 * keeps three connections to one Redis: commands, the node's delivery
 * stream (XREAD) and room channels (SUBSCRIBE). It provides:
 *  - a node lease: <prefix>node:{NAME} (a hash of the advertised addresses,
 *    connection count, draining flag, epoch and node id) with a TTL,
 *    renewed every third of it. The epoch (INCR <prefix>epoch) fences what
 *    the node writes; the 10-bit node id (for message ids) is leased with it
 *    from <prefix>nodeids, so two live nodes never mint the same ids.
 *  - owned routes: <prefix>route:{UID}, a hash with one field per
 *    connection ("NODE/CONN") whose value is
 *    "NODE|EPOCH|PLATFORM|DEVICE|PEER|SINCE_MS|TRANSPORT". Written and
 *    deleted by Lua scripts that compare the epoch, so a stale node can
 *    neither overwrite nor delete what a newer epoch wrote; survivors purge
 *    the routes of a lapsed lease (exactly its epoch) within one renew
 *    interval after the lapse.
 *  - cross-node delivery: one Redis Stream per node,
 *    <prefix>deliver:{NODE}; the sends of an event-loop pass go to Redis as
 *    one script call that finds the receivers' nodes and appends one entry
 *    per node, fanned out locally by the receiving node with one encoding.
 *    Kicks travel the same way.
 *  - rooms: a node subscribes to <prefix>room:{ROOM} while it has local
 *    members; one PUBLISH per room message.
 *  - presence from the routes, gateway assignment, drain flag.
 * docs/CLUSTER.md explains the design, the failure cases and the numbers.
 *
 * Every function runs on the loop thread of the server. Callbacks are never
 * called before the function that takes them returned. A process whose
 * engines form a thread group (<libim/im_group.h>) is one node: start it
 * with im_redis_new_group and give each other member a handle
 * (im_redis_join).
 */
#ifndef LIBIM_IM_REDIS_H
#define LIBIM_IM_REDIS_H

#include <libim/im.h>

#ifdef __cplusplus
extern "C" {
#endif

struct event_base;
struct im_group;
struct redisReply;
typedef struct im_redis im_redis;

/* What happened to the cluster link (im_redis_config.on_event). */
enum im_redis_event {
  IM_REDIS_UP = 1,       /* connected and leased: routes and rooms were (re)announced */
  IM_REDIS_DOWN = 2,     /* the command connection is gone; it reconnects with backoff */
  IM_REDIS_RESYNC = 3,   /* cross-node notifications may have been missed (a link came
                            back): the application should repair its local connections
                            from its store (imd syncs them) */
  IM_REDIS_LEASE_LOST = 4 /* the lease lapsed (the process was paused, Redis lost it):
                             a new epoch was taken and routes are being rewritten */
};

typedef struct im_redis_config {
  const char *host;          /* "127.0.0.1" */
  int port;                  /* 6379 */
  const char *prefix;        /* key prefix, at most 64 bytes. "im:" */
  const char *node;          /* this node's unique name (required; 1-128 bytes, no '|' or '/') */
  uint32_t lease_ttl_ms;     /* lease TTL. 10000 (renewed every third) */
  const char *advertise_ws;  /* "ws://HOST:PORT/ws" for gateway lists; NULL: none */
  const char *advertise_tcp; /* "HOST:PORT"; NULL: none */
  uint32_t stream_max;       /* entries a delivery stream keeps. 100000 */
  void (*on_event)(im_redis *r, enum im_redis_event ev, void *ud);
  void *ud;
} im_redis_config;

/* Fill cfg with the defaults above (node NULL). */
IM_EXTERN void im_redis_config_init(im_redis_config *cfg);

/* Start the cluster module for srv on base: connects (asynchronously,
 * retrying with backoff while Redis is unreachable), leases the node name,
 * installs the router. Strings of cfg are copied. Returns NULL on a bad
 * cfg (no node name) or when memory ran out. */
IM_EXTERN im_redis *im_redis_new(struct event_base *base, im_server *srv,
                                 const im_redis_config *cfg);
/* Remove the router, give the lease back (best effort: the routes of this
 * node are deleted), close the connections and free. NULL is a no-op. */
IM_EXTERN void im_redis_free(im_redis *r);

/* The same for a thread group g (<libim/im_group.h>) whose members are
 * this node: srv is one member (its thread keeps the lease, the delivery
 * stream and the room subscriptions), and the module is chained after the
 * group (im_group_set_outer) instead of being srv's router; each other
 * member gets a handle from im_redis_join. What arrives from other nodes
 * reaches every member (im_group_local_*). g NULL: im_redis_new. Returns
 * NULL also when srv is not a member of g. */
IM_EXTERN im_redis *im_redis_new_group(struct event_base *base, im_server *srv,
                                       struct im_group *g, const im_redis_config *cfg);

/* The part of a thread group's other member srv (whose loop runs on base):
 * a command connection of its own, on srv's thread, for srv's connections'
 * routes, its cross-node sends and kicks, presence, gateway lists and
 * im_redis_command; the lease (epoch, node id, up or not) is home's. home
 * is the instance im_redis_new_group made. Call it on srv's
 * loop thread or before that loop runs, before srv accepts connections.
 * The handle is used on srv's thread only; free every handle (on its
 * thread, or once its loop stopped) before home. On a handle,
 * im_redis_up/epoch/node/dropped report the node's (home's) lease and
 * counts; im_redis_set_draining is home's only (IM_EINVAL). Returns NULL
 * (home is not a group's, bad argument, no memory). */
IM_EXTERN im_redis *im_redis_join(im_redis *home, struct event_base *base, im_server *srv);

/* 1 while the command connection is up and the lease is held, else 0. */
IM_EXTERN int im_redis_up(const im_redis *r);
/* The lease's epoch and node id (0 before the first lease). */
IM_EXTERN uint64_t im_redis_epoch(const im_redis *r);
IM_EXTERN const char *im_redis_node(const im_redis *r);
/* Cross-node sends and room publishes given up (memory bound reached, Redis
 * away for a room message, an error answer); a count since im_redis_new. */
IM_EXTERN uint64_t im_redis_dropped(const im_redis *r);

/* Mark the node draining (gone from gateway lists at once; written now
 * and with every renewal). Returns 0, IM_ECLOSED (Redis down: the flag
 * is written when it comes back) or IM_EINVAL (r is a member's handle). */
IM_EXTERN int im_redis_set_draining(im_redis *r, int draining);

/* Reply of a command: NULL when the connection failed before the answer
 * (the command may or may not have run). Valid during the callback only. */
typedef void (*im_redis_reply_cb)(void *arg, const struct redisReply *reply);

/* Run a command on the module's command connection (ordered with the
 * module's own writes: a route written before a command is visible to it).
 * argv/argvlen are copied. Returns 0 (cb is called exactly once, later) or
 * IM_ECLOSED when the connection is down (cb is not called) or IM_ENOMEM. */
IM_EXTERN int im_redis_command(im_redis *r, int argc, const char **argv, const size_t *argvlen,
                               im_redis_reply_cb cb, void *arg);

/* ---- pushing from the application's own script --------------------------------
 * An application that keeps its messages in the same Redis (imd's Redis
 * store) can have the script that stores a message also push it to the
 * receivers' other nodes: one round trip and one AOF fsync per message
 * instead of the store's call and then the router's. The script is the
 * application's; libim gives it the Lua functions and their arguments:
 *   1. Put im_redis_push_lua() in front of the script's source. It defines
 *      local functions im_nodes(key, self) and
 *      im_push(self, prefix, maxlen, head, uids, seqs).
 *   2. Per message, pass the script im_redis_push_argv()'s three strings
 *      (self, prefix, maxlen) and im_redis_encode_head()'s head, and call
 *      im_push(self, prefix, maxlen, head, uids, seqs) after storing, with
 *      uids the receivers (Lua strings) and seqs the seq each one got (Lua
 *      numbers below 2^53; each receiver's copy carries its own).
 *   3. Once the script answered, deliver to this node's connections only:
 *      im_local_send_users() with the same message and seq per receiver. Do
 *      not also call im_send_users(): the other nodes have it already.
 * Records pushed this way are read and applied by the receiving nodes as
 * the router's own (reliable when m's flags say so, repaired the same way
 * after a lost notification: docs/CLUSTER.md). */

/* The Lua source defining im_nodes() and im_push() (static storage). */
IM_EXTERN const char *im_redis_push_lua(void);
/* The three arguments im_push() takes before head: this node's name, the
 * key prefix and the delivery streams' MAXLEN, as strings valid until
 * im_redis_free. Returns 0, or IM_ECLOSED when the node holds
 * no lease or the connection is down right now (send the ordinary way:
 * im_send_users after storing). */
IM_EXTERN int im_redis_push_argv(im_redis *r, const char *argv[3]);
/* Encode m as the record head im_push() takes: *head (malloc'd, the
 * caller frees it) of *len bytes; m->seq is a placeholder the script
 * overwrites per receiver. Returns 0, IM_EINVAL (NULL argument) or
 * IM_ENOMEM. */
IM_EXTERN int im_redis_encode_head(const im_msg *m, void **head, size_t *len);

/* One live, not draining node, as gateway assignment lists it. */
typedef struct im_gateway {
  const char *node;
  const char *ws;            /* "" when the node advertises none */
  const char *tcp;
  uint64_t conns;
} im_gateway;
/* The live, not-draining nodes, least loaded first, ties broken by a hash
 * of uid (so one user's devices tend to one node). status 0, or IM_ECLOSED
 * when Redis could not be asked. */
typedef void (*im_gateways_cb)(void *arg, int status, const im_gateway *gw, size_t n);
IM_EXTERN int im_redis_gateways(im_redis *r, const char *uid, im_gateways_cb cb, void *arg);

#ifdef __cplusplus
}
#endif
#endif
