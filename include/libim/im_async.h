/* Handing work to an event loop from any thread.
 *
 * An im_server is used by one thread, the one running its loop (im.h). A
 * program with other threads (game simulation, workers, a second server's
 * loop) hands work over with these two tools, like libuv's uv_async_send():
 *
 *  - im_async: a queue of opaque items drained on the loop thread. Any
 *    thread may post; the loop is woken once per batch (one eventfd write
 *    when the queue goes from empty to non-empty), and the callback runs
 *    once per item, in post order.
 *  - im_mailbox: an im_async bound to one server, with ready-made sends:
 *    post a message to a user, a connection or a room, or close a
 *    connection, from any thread; the copy is sent on the loop thread.
 *
 * Only the *_post / im_mailbox_* calls named "any thread" are thread-safe;
 * new and free run on the loop thread.
 */
#ifndef LIBIM_IM_ASYNC_H
#define LIBIM_IM_ASYNC_H

#include <libim/im.h>

#ifdef __cplusplus
extern "C" {
#endif

struct event_base;
typedef struct im_async im_async;

/* Runs on the loop thread for each posted item, in post order. */
typedef void (*im_async_fn)(void *item, void *arg);

/* A queue drained on base's loop by fn(item, arg). Returns NULL when
 * memory or file descriptors ran out. Loop thread. */
IM_EXTERN im_async *im_async_new(struct event_base *base, im_async_fn fn, void *arg);
/* Queue item (ownership stays with the caller's protocol: fn gets the same
 * pointer). Any thread. Returns 0 (fn will run), IM_ENOMEM, or IM_ECLOSED
 * once im_async_free() has begun (fn will not run). */
IM_EXTERN int im_async_post(im_async *a, void *item);
/* Run fn now for every item queued so far (instead of waiting for the
 * wake-up), e.g. so that what another thread sent earlier goes out before
 * a send this thread is about to make. Loop thread. Returns the number
 * run. */
IM_EXTERN size_t im_async_run(im_async *a);
/* Items queued so far and loop wake-ups caused (for tests and metrics). */
IM_EXTERN void im_async_counts(im_async *a, uint64_t *posted, uint64_t *wakeups);
/* Run fn for what is still queued, then free. Loop thread; no post may
 * race with it (stop the posting threads first). NULL is a no-op. */
IM_EXTERN void im_async_free(im_async *a);

typedef struct im_mailbox im_mailbox;

/* A mailbox for srv, whose loop runs on base. Returns NULL on failure. */
IM_EXTERN im_mailbox *im_mailbox_new(struct event_base *base, im_server *srv);
/* Send m (copied now: every pointer is borrowed for the call) to every
 * connection of uid / to connection c / to a room, on the loop thread.
 * Any thread. Returns 0 (queued), IM_EINVAL (NULL uid/room/m, or m->struct_size
 * below the oldest layout), IM_ENOMEM,
 * IM_ECLOSED (the mailbox is being freed). The send's own result (e.g.
 * IM_ENOENT for a connection that is gone) is not reported. */
IM_EXTERN int im_mailbox_send_user(im_mailbox *mb, const char *uid, const im_msg *m);
IM_EXTERN int im_mailbox_send_conn(im_mailbox *mb, im_conn_id c, const im_msg *m);
IM_EXTERN int im_mailbox_room_send(im_mailbox *mb, const char *room, const im_msg *m);
/* Close c with code/reason on the loop thread. Any thread. Same returns. */
IM_EXTERN int im_mailbox_close(im_mailbox *mb, im_conn_id c, int code, const char *reason);
/* Run fn(srv, arg) on the loop thread. Any thread. Same returns. */
IM_EXTERN int im_mailbox_call(im_mailbox *mb, void (*fn)(im_server *srv, void *arg), void *arg);
/* The mailbox's queue (for im_async_counts). */
IM_EXTERN im_async *im_mailbox_async(im_mailbox *mb);
/* Deliver what is queued, then free. Loop thread. NULL is a no-op. */
IM_EXTERN void im_mailbox_free(im_mailbox *mb);

#ifdef __cplusplus
}
#endif
#endif
