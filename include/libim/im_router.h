/* libim routing seam: how an engine reaches connections it does not own.
 *
 * One im_server owns the connections accepted on it. Every send path of the
 * engine (im_send_user(s), im_room_send, im_kick_user, im_presence) first
 * serves the local connections and then hands the same operation to the
 * server's router, whose job is to reach the connections held elsewhere: on
 * another thread's server, or on another machine (<libim/im_redis.h> is the
 * Redis implementation imd uses). Without a router (the default) the engine
 * is a single island and those calls are purely local.
 *
 * The other direction: a router that receives an operation from elsewhere
 * applies it to this server with the im_local_* functions, which never call
 * the router again (so a forwarded message cannot loop).
 *
 * Hooks run on the server's thread, inside the engine call that caused them.
 * They may call any function of <libim/im.h> (closing connections included:
 * the engine defers releases), but must not free the server. Every pointer
 * passed to a hook is borrowed for that call only: a router that keeps a
 * message (to batch it) copies what it needs.
 */
#ifndef LIBIM_IM_ROUTER_H
#define LIBIM_IM_ROUTER_H

#include <libim/im.h>

#ifdef __cplusplus
extern "C" {
#endif

/* One connection of a user as a router knows it (presence). Strings are
 * NUL-terminated and valid only during the callback they are passed to. */
typedef struct im_route {
  const char *node;      /* node holding it; NULL for this server */
  const char *conn;      /* connection id, hex (as in auth_ok's "conn") */
  const char *device;    /* "" when none */
  const char *platform;  /* "" when none */
  const char *peer;      /* remote address of the client */
  enum im_transport transport;
  uint64_t since_ms;     /* wall-clock ms the connection was accepted */
} im_route;

/* Answer of im_presence(): every known connection of uid, this server's
 * first. status is 0, or a negative IM_E* code when the remote part could
 * not be asked (routes then holds the local connections only). */
typedef void (*im_presence_cb)(im_server *srv, const char *uid, const im_route *routes, size_t n,
                               int status, void *arg);

typedef struct im_router {
  /* A connection authenticated (before on_open) / an authenticated
   * connection is gone (before on_close). im_conn_get_info() works in both. */
  void (*conn_open)(im_server *srv, im_conn_id c, void *ud);
  void (*conn_close)(im_server *srv, im_conn_id c, void *ud);
  /* The first local member joined a room / the last one left it. */
  void (*room_open)(im_server *srv, const char *room, void *ud);
  void (*room_close)(im_server *srv, const char *room, void *ud);
  /* After im_send_users() served the local connections: reach the users'
   * connections elsewhere (m->id is always set). Returns the number of
   * connections elsewhere it is queued for when it knows (added to
   * im_send_users' count; 0 when it cannot tell, as im_redis), or a
   * negative IM_E* code, which im_send_users() returns in turn. */
  int (*send_users)(im_server *srv, const char *const *uids, size_t n, const im_msg *m, void *ud);
  /* After im_room_send() served the local members: reach the other
   * members (m->id is always set). Returns the number of other members
   * when it knows (added to im_room_send's count), 0 when it cannot tell,
   * or a negative IM_E* code. */
  int (*room_send)(im_server *srv, const char *room, const im_msg *m, void *ud);
  /* After im_kick_user() closed the local connections: close the others.
   * Returns how many it is closing when it knows now (added to
   * im_kick_user's count; 0 when it cannot tell), or a negative IM_E*. */
  int (*kick_user)(im_server *srv, const char *uid, int code, const char *reason, void *ud);
  /* im_presence(): find uid's connections elsewhere and call
   * cb(srv, uid, routes, n, status, arg) once with the local ones
   * (`local`, n_local) followed by the remote ones, now or later. Returns 0
   * (cb will be called) or a negative code (cb will not be called). */
  int (*presence)(im_server *srv, const char *uid, const im_route *local, size_t n_local,
                  im_presence_cb cb, void *arg, void *ud);
  void *ud;
} im_router;

/* Install a router (copied; NULL fields are skipped, NULL r removes it).
 * Connections and rooms that exist already are announced to the new router
 * through conn_open and room_open before this returns. Returns 0. */
IM_EXTERN int im_server_set_router(im_server *srv, const im_router *r);

/* Re-announce every authenticated connection (conn_open) and every room
 * (room_open) to the installed router, e.g. after it lost its state (a
 * lease expired, the backend restarted). Returns the number of
 * connections announced. */
IM_EXTERN size_t im_server_announce(im_server *srv);

/* Close every connection of uid, here and (through the router) elsewhere,
 * with code/reason (as im_conn_close). Returns the number of local
 * connections closed plus the router's count of the others it is closing
 * (>= 0; the Redis router cannot tell and adds 0, the thread group adds
 * them), or IM_EINVAL (code), or the router's error. */
IM_EXTERN int im_kick_user(im_server *srv, const char *uid, int code, const char *reason);

/* Every connection of uid, local and (through the router) remote: cb is
 * called exactly once, possibly before this returns. Returns 0, or a
 * negative code when the router refused (cb is then not called). */
IM_EXTERN int im_presence(im_server *srv, const char *uid, im_presence_cb cb, void *arg);

/* The local halves, for routers applying what arrived from elsewhere: like
 * im_send_users / im_room_send / im_kick_user, but this server's
 * connections only, never calling the router. Same return values. */
IM_EXTERN int im_local_send_users(im_server *srv, const char *const *uids, size_t n,
                                  const im_msg *m, im_conn_id except);
IM_EXTERN int im_local_room_send(im_server *srv, const char *room, const im_msg *m,
                                 im_conn_id except);
IM_EXTERN int im_local_kick_user(im_server *srv, const char *uid, int code, const char *reason);

/* Every local connection that is authenticated and open: fn(c, arg) for
 * each (fn may close c). Returns the number visited. */
IM_EXTERN size_t im_server_each_conn(im_server *srv, void (*fn)(im_server *srv, im_conn_id c,
                                                                void *arg),
                                     void *arg);

/* Rooms with local members: fn(room, members, arg) for each. */
IM_EXTERN void im_server_rooms(const im_server *srv,
                               void (*fn)(const char *room, size_t members, void *arg), void *arg);

/* Change the node id in generated message ids (0..1023; a cluster module
 * takes it from its lease so that two live nodes never mint the same id).
 * Returns 0 or IM_EINVAL. */
IM_EXTERN int im_server_set_node_id(im_server *srv, uint16_t node_id);

/* Let this server mint only ids whose counter part (12 bits: 4096 per ms)
 * is shard modulo shards, so that engines sharing a node id (the workers
 * of one process, <libim/im_group.h>) never mint the same id; each one then
 * mints 4096/shards ids per ms before borrowing the next ms (ids still
 * grow). With 2 to 64 shards the shard also tags the server's connection
 * ids (6 high bits), so that the members of a group never hand out the
 * same connection id (a slot's generation then wraps after 2^26 reuses).
 * Call it before the first accept. shard < shards <= 4096. Returns 0 or
 * IM_EINVAL. Default: 0 of 1. */
IM_EXTERN int im_server_set_id_shard(im_server *srv, uint32_t shard, uint32_t shards);

/* Share an id clock with the other servers of this process (the members
 * of a group, which im_group_join sets up): clock holds the highest id any
 * of them minted (start it at 0; it must outlive them; it is read and
 * written with atomic operations from their threads). Then an id minted
 * after another one by any of them — an HTTP push answered on one thread,
 * the next one handled on another — is greater, although each server's
 * clock is its own last tick; uniqueness needs distinct shards
 * (im_server_set_id_shard). NULL stops sharing. */
IM_EXTERN void im_server_set_id_clock(im_server *srv, uint64_t *clock);

/* The server's wall-clock base: a connection's im_conn_info.since_ms plus
 * this is the wall-clock ms it was accepted. */
IM_EXTERN uint64_t im_server_wall_base(const im_server *srv);

#ifdef __cplusplus
}
#endif
#endif
