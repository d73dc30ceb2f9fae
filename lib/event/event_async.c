/* Cross-thread hand-off to a libevent loop (include/libim/im_async.h).
 *
 * The queue is a mutex-protected list. A post appends; only the post that
 * finds the queue empty (and no drain scheduled) writes the eventfd, so a
 * burst of posts costs one wake-up. The loop takes the whole list at once
 * and runs the callback outside the lock, so posting threads never wait for
 * the callbacks. */
#include <libim/im_async.h>

#include <errno.h>
#include <event2/event.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "core/abi.h"
#include "core/msg_copy.h"

typedef struct async_node {
  struct async_node *next;
  void *item;
} async_node;

struct im_async {
  pthread_mutex_t lock;
  async_node *head, *tail;
  bool signalled;           /* an eventfd write is pending a drain */
  bool closing;
  int efd;
  struct event *ev;
  im_async_fn fn;
  void *arg;
  uint64_t posted, wakeups;
};

/* Run fn for what is queued now. woken: the eventfd was just read, so the
 * next post must write it again. */
static size_t drain(im_async *a, bool woken) {
  pthread_mutex_lock(&a->lock);
  async_node *n = a->head;
  a->head = a->tail = NULL;
  if (woken) a->signalled = false;
  pthread_mutex_unlock(&a->lock);
  size_t k = 0;
  while (n) {
    async_node *next = n->next;
    a->fn(n->item, a->arg);
    free(n);
    n = next;
    k++;
  }
  return k;
}

static void on_wake(evutil_socket_t fd, short what, void *arg) {
  (void)what;
  uint64_t v;
  while (read(fd, &v, sizeof v) < 0 && errno == EINTR) {
  }
  drain(arg, true);
}

im_async *im_async_new(struct event_base *base, im_async_fn fn, void *arg) {
  if (!base || !fn) return NULL;
  im_async *a = calloc(1, sizeof *a);
  if (!a) return NULL;
  a->fn = fn;
  a->arg = arg;
  a->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  pthread_mutex_init(&a->lock, NULL);
  a->ev = a->efd >= 0 ? event_new(base, a->efd, EV_READ | EV_PERSIST, on_wake, a) : NULL;
  if (!a->ev || event_add(a->ev, NULL) < 0) {
    im_async_free(a);
    return NULL;
  }
  return a;
}

int im_async_post(im_async *a, void *item) {
  async_node *n = malloc(sizeof *n);
  if (!n) return IM_ENOMEM;
  n->next = NULL;
  n->item = item;
  pthread_mutex_lock(&a->lock);
  if (a->closing) {
    pthread_mutex_unlock(&a->lock);
    free(n);
    return IM_ECLOSED;
  }
  if (a->tail)
    a->tail->next = n;
  else
    a->head = n;
  a->tail = n;
  a->posted++;
  bool wake = !a->signalled;
  a->signalled = true;
  if (wake) a->wakeups++;
  pthread_mutex_unlock(&a->lock);
  if (wake) {
    uint64_t one = 1;
    /* EAGAIN only when the counter is near overflow: the loop is awake anyway */
    while (write(a->efd, &one, sizeof one) < 0 && errno == EINTR) {
    }
  }
  return 0;
}

size_t im_async_run(im_async *a) { return drain(a, false); }

void im_async_counts(im_async *a, uint64_t *posted, uint64_t *wakeups) {
  pthread_mutex_lock(&a->lock);
  if (posted) *posted = a->posted;
  if (wakeups) *wakeups = a->wakeups;
  pthread_mutex_unlock(&a->lock);
}

void im_async_free(im_async *a) {
  if (!a) return;
  pthread_mutex_lock(&a->lock);
  a->closing = true;
  pthread_mutex_unlock(&a->lock);
  drain(a, false);
  if (a->ev) event_free(a->ev);
  if (a->efd >= 0) close(a->efd);
  pthread_mutex_destroy(&a->lock);
  free(a);
}

/* ---- the mailbox of a server ------------------------------------------------- */

enum mb_kind { MB_USER, MB_CONN, MB_ROOM, MB_CLOSE, MB_CALL };

/* One posted operation; strings and data live after the struct. */
typedef struct mb_op {
  enum mb_kind kind;
  im_conn_id conn;
  int code;
  const char *target;       /* uid or room */
  const char *reason;
  void (*fn)(im_server *srv, void *arg);
  void *arg;
  im_msg m;
  char buf[];
} mb_op;

struct im_mailbox {
  im_server *srv;
  im_async *q;
};

static void mb_run(void *item, void *arg) {
  mb_op *op = item;
  im_mailbox *mb = arg;
  switch (op->kind) {
  case MB_USER:
    im_send_user(mb->srv, op->target, &op->m, 0);
    break;
  case MB_CONN:
    im_send_conn(mb->srv, op->conn, &op->m);
    break;
  case MB_ROOM:
    im_room_send(mb->srv, op->target, &op->m, 0);
    break;
  case MB_CLOSE:
    im_conn_close(mb->srv, op->conn, op->code, op->reason);
    break;
  case MB_CALL:
    op->fn(mb->srv, op->arg);
    break;
  }
  free(op);
}

static size_t slen(const char *s) { return s ? strlen(s) + 1 : 0; }

/* A copy of m (and of target/reason) in one allocation. */
static mb_op *op_new(enum mb_kind kind, const char *target, const im_msg *m, const char *reason) {
  im_msg tmp;
  if (m) m = im__msg_in(m, &tmp); /* NULL-checked by the callers (mb_msg_ok) */
  size_t len = sizeof(mb_op) + slen(target) + slen(reason) + (m ? msgcopy_size(m) : 0);
  mb_op *op = calloc(1, len);
  if (!op) return NULL;
  op->kind = kind;
  char *at = op->buf;
  op->target = msgcopy_str(&at, target);
  op->reason = msgcopy_str(&at, reason);
  if (m) msgcopy_put(&op->m, &at, m);
  return op;
}

static int submit(im_mailbox *mb, mb_op *op) {
  if (!op) return IM_ENOMEM;
  int rc = im_async_post(mb->q, op);
  if (rc < 0) free(op);
  return rc;
}

im_mailbox *im_mailbox_new(struct event_base *base, im_server *srv) {
  im_mailbox *mb = calloc(1, sizeof *mb);
  if (!mb) return NULL;
  mb->srv = srv;
  mb->q = im_async_new(base, mb_run, mb);
  if (!mb->q) {
    free(mb);
    return NULL;
  }
  return mb;
}

/* m is there and not below the oldest layout (abi.h). */
static bool mb_msg_ok(const im_msg *m) {
  im_msg tmp;
  return m && im__msg_in(m, &tmp);
}

int im_mailbox_send_user(im_mailbox *mb, const char *uid, const im_msg *m) {
  if (!uid || !mb_msg_ok(m)) return IM_EINVAL;
  return submit(mb, op_new(MB_USER, uid, m, NULL));
}

int im_mailbox_send_conn(im_mailbox *mb, im_conn_id c, const im_msg *m) {
  if (!mb_msg_ok(m)) return IM_EINVAL;
  mb_op *op = op_new(MB_CONN, NULL, m, NULL);
  if (op) op->conn = c;
  return submit(mb, op);
}

int im_mailbox_room_send(im_mailbox *mb, const char *room, const im_msg *m) {
  if (!room || !mb_msg_ok(m)) return IM_EINVAL;
  return submit(mb, op_new(MB_ROOM, room, m, NULL));
}

int im_mailbox_close(im_mailbox *mb, im_conn_id c, int code, const char *reason) {
  mb_op *op = op_new(MB_CLOSE, NULL, NULL, reason ? reason : "");
  if (op) {
    op->conn = c;
    op->code = code;
  }
  return submit(mb, op);
}

int im_mailbox_call(im_mailbox *mb, void (*fn)(im_server *srv, void *arg), void *arg) {
  if (!fn) return IM_EINVAL;
  mb_op *op = op_new(MB_CALL, NULL, NULL, NULL);
  if (op) {
    op->fn = fn;
    op->arg = arg;
  }
  return submit(mb, op);
}

im_async *im_mailbox_async(im_mailbox *mb) { return mb->q; }

void im_mailbox_free(im_mailbox *mb) {
  if (!mb) return;
  im_async_free(mb->q);
  free(mb);
}
