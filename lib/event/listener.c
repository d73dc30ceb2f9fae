/* Addresses and listeners shared by libim's driver and embedders' servers
 * (imd's HTTP API): one parser, so every listener takes the same
 * "HOST:PORT" / "[V6]:PORT" syntax, and one accept path. */
#include <errno.h>
#include <fcntl.h>
#include <event2/event.h>
#include <event2/util.h>
#include <libim/im_net.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "proto/writer.h"

/* While accept() fails for lack of descriptors or memory, stop listening for
 * this long instead of spinning on a listener that stays readable. */
#define ACCEPT_PAUSE_MS 100

struct im_listener {
  int fd;         /* the listening socket */
  struct event *ev;
  struct event *retry;
  im_accept_fn fn;
  void *arg;
  int port;
  bool enabled;   /* as the owner wants it */
  uint64_t last_log_ms;
  int spare;      /* a descriptor held in reserve for the fd limit (-1: none) */
  int8_t nodelay; /* accepted sockets inherit TCP_NODELAY: 1, do not: 0, not known yet: -1 */
};

int im_addr_parse(const char *addr, struct sockaddr_storage *ss, socklen_t *len) {
  const char *colon = addr ? strrchr(addr, ':') : NULL;
  if (!colon) return IM_EADDR;
  const char *h = addr, *hend = colon;
  bool v6 = *h == '[';
  if (v6) {
    if (hend - h < 2 || hend[-1] != ']') return IM_EADDR;
    h++;
    hend--;
  }
  char host[INET6_ADDRSTRLEN];
  if ((size_t)(hend - h) >= sizeof host) return IM_EADDR;
  memcpy(host, h, (size_t)(hend - h));
  host[hend - h] = '\0';
  char *end;
  errno = 0;
  long port = strtol(colon + 1, &end, 10);
  if (*end || end == colon + 1 || errno || port < 0 || port > 65535) return IM_EADDR;
  memset(ss, 0, sizeof *ss);
  struct sockaddr_in *in = (struct sockaddr_in *)ss;
  struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)ss;
  if (!v6 && evutil_inet_pton(AF_INET, host, &in->sin_addr) == 1) {
    in->sin_family = AF_INET;
    in->sin_port = htons((uint16_t)port);
    *len = (socklen_t)sizeof *in;
  } else if (v6 && evutil_inet_pton(AF_INET6, host, &in6->sin6_addr) == 1) {
    in6->sin6_family = AF_INET6;
    in6->sin6_port = htons((uint16_t)port);
    *len = (socklen_t)sizeof *in6;
  } else {
    return IM_EADDR;
  }
  return 0;
}

/* Runs for every accepted connection: IPv4 without printf. */
void im_addr_format(const struct sockaddr *sa, char *out, size_t cap) {
  writer w = {out, cap, 0};
  if (sa->sa_family == AF_INET) {
    const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
    const uint8_t *a = (const uint8_t *)&in->sin_addr;
    for (int i = 0; i < 4; i++) {
      put_uint(&w, a[i]);
      put(&w, i < 3 ? "." : ":", 1);
    }
    put_uint(&w, ntohs(in->sin_port));
  } else if (sa->sa_family == AF_INET6) {
    const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
    char host[INET6_ADDRSTRLEN] = "?";
    evutil_inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host);
    put(&w, "[", 1);
    put_str(&w, host);
    put(&w, "]:", 2);
    put_uint(&w, ntohs(in6->sin6_port));
  } else {
    put(&w, "?", 1);
  }
  put_end(&w);
}

static uint64_t mono_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* Accepting is under a process-wide lock, shared (read) by every
 * listener's accepts and taken alone (write) for the fd-limit dance below:
 * with listeners on several threads, another thread's accept must not take
 * the descriptor the dance frees for a moment (the dancer would lose its
 * reserve for good and leave its backlog waiting). */
static pthread_rwlock_t accept_lock = PTHREAD_RWLOCK_INITIALIZER;

/* Accepted connections handed over per wake-up at most (fairness). */
#define ACCEPTS_PER_WAKE 64

/* Small frames and responses must not wait for Nagle. The listening socket
 * has TCP_NODELAY, which Linux copies to the sockets it accepts: the first
 * one accepted says whether it did, and only where not is it set on each
 * (a system call per connection). */
static void take(im_listener *l, int fd, const struct sockaddr *sa) {
  int one = 1;
  if (l->nodelay < 0) {
    int on = 0;
    socklen_t len = sizeof on;
    l->nodelay = getsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, &len) == 0 && on ? 1 : 0;
  }
  if (!l->nodelay) setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  char peer[INET6_ADDRSTRLEN + 8];
  im_addr_format(sa, peer, sizeof peer);
  l->fn(fd, peer, l->arg);
}

static void retry_cb(evutil_socket_t fd, short what, void *arg) {
  (void)fd;
  (void)what;
  im_listener *l = arg;
  if (l->enabled) event_add(l->ev, NULL);
}

/* accept() failed for lack of descriptors or memory: out of descriptors,
 * the reserve one makes room to take the client at the head of the backlog
 * and close it at once (it sees a clean close and can try another node,
 * instead of waiting in the backlog); then the listener rests instead of
 * spinning on the same error. */
static void accept_failed(im_listener *l, int err) {
  uint64_t now = mono_ms();
  if (now - l->last_log_ms > 1000) {
    fprintf(stderr, "libim: accept: %s (pausing the listener)\n", evutil_socket_error_to_string(err));
    l->last_log_ms = now;
  }
  if ((err == EMFILE || err == ENFILE) && l->spare >= 0) {
    pthread_rwlock_wrlock(&accept_lock);
    close(l->spare);
    int fd = accept(l->fd, NULL, NULL);
    if (fd >= 0) close(fd);
    l->spare = open("/dev/null", O_RDONLY | O_CLOEXEC);
    pthread_rwlock_unlock(&accept_lock);
  }
  event_del(l->ev);
  struct timeval tv = {0, ACCEPT_PAUSE_MS * 1000};
  evtimer_add(l->retry, &tv);
}

static void readable_cb(evutil_socket_t lfd, short what, void *arg) {
  (void)what;
  im_listener *l = arg;
  for (int i = 0; i < ACCEPTS_PER_WAKE; i++) {
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    pthread_rwlock_rdlock(&accept_lock);
    int fd = accept4(lfd, (struct sockaddr *)&ss, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
    int err = fd < 0 ? errno : 0;
    pthread_rwlock_unlock(&accept_lock);
    if (fd >= 0) {
      take(l, fd, (struct sockaddr *)&ss);
      if (!l->enabled) return; /* fn turned it off */
      continue;
    }
    if (err == EINTR || err == ECONNABORTED || err == EPROTO) continue;
    if (err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM) accept_failed(l, err);
    return; /* EAGAIN: the backlog is empty */
  }
}

static im_listener *listener_new(struct event_base *base, const char *addr, int backlog,
                                 bool reuseport, im_accept_fn fn, void *arg) {
  struct sockaddr_storage ss;
  socklen_t len;
  if (!base || !fn || im_addr_parse(addr, &ss, &len) < 0) {
    errno = EINVAL;
    return NULL;
  }
  im_listener *l = calloc(1, sizeof *l);
  if (!l) return NULL;
  l->fn = fn;
  l->arg = arg;
  l->enabled = true;
  l->port = -1;
  l->spare = open("/dev/null", O_RDONLY | O_CLOEXEC);
  l->fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  int one = 1, err = 0;
  if (l->fd < 0 || setsockopt(l->fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 ||
      (reuseport && setsockopt(l->fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) < 0) ||
      bind(l->fd, (struct sockaddr *)&ss, len) < 0 || listen(l->fd, backlog) < 0)
    err = errno;
  l->nodelay = !err && setsockopt(l->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) == 0 ? -1 : 0;
  l->retry = err ? NULL : evtimer_new(base, retry_cb, l);
  l->ev = l->retry ? event_new(base, l->fd, EV_READ | EV_PERSIST, readable_cb, l) : NULL;
  if (!l->ev || event_add(l->ev, NULL) < 0) {
    err = err ? err : ENOMEM;
    im_listener_free(l);
    errno = err;
    return NULL;
  }
  struct sockaddr_storage bound;
  socklen_t bl = sizeof bound;
  if (getsockname(l->fd, (struct sockaddr *)&bound, &bl) == 0)
    l->port = ntohs(bound.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&bound)->sin6_port
                                                : ((struct sockaddr_in *)&bound)->sin_port);
  return l;
}

im_listener *im_listener_new(struct event_base *base, const char *addr, int backlog,
                             im_accept_fn fn, void *arg) {
  return listener_new(base, addr, backlog, false, fn, arg);
}

im_listener *im_listener_new_shared(struct event_base *base, const char *addr, int backlog,
                                    im_accept_fn fn, void *arg) {
  return listener_new(base, addr, backlog, true, fn, arg);
}

int im_listener_port(const im_listener *l) { return l ? l->port : -1; }

void im_listener_enable(im_listener *l, int on) {
  l->enabled = on != 0;
  if (on) {
    event_add(l->ev, NULL);
  } else {
    event_del(l->ev);
    evtimer_del(l->retry);
  }
}

void im_listener_free(im_listener *l) {
  if (!l) return;
  if (l->ev) event_free(l->ev);
  if (l->retry) event_free(l->retry);
  if (l->fd >= 0) close(l->fd);
  if (l->spare >= 0) close(l->spare);
  free(l);
}
