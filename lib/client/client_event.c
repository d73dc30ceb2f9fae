/* The client's libevent driver: one socket to the gateway, one timer for
 * the core's deadlines, a deferred flush (the core asks for writes from
 * inside its own calls, so writing there would re-enter it), and the
 * gateway-list fetch (a small HTTP/1.1 GET). */
#include <errno.h>
#include <event2/event.h>
#include <libim/im_client_event.h>
#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "client/client.h"
#include "proto/http_resp.h"

#define READ_BUF (64 * 1024)

/* One read buffer per thread, not per client: im_client_feed() copies what
 * it keeps, so thousands of idle clients cost no 64 KiB each. */
static _Thread_local uint8_t read_buf[READ_BUF];
#define FETCH_MAX (64 * 1024)

struct im_client_event {
  struct event_base *base;
  im_client *cl;
  int fd;
  bool connecting, writing;
  struct event *io;
  struct event *timer;
  struct event *flush;
  /* gateway fetch */
  int ffd;
  struct event *fio;
  struct event *fdone;
  char *freq;
  size_t freq_len, freq_off;
  char *fbuf;
  size_t flen;
  int fstatus; /* result handed over by fdone: HTTP status, 0 = failed */
  struct sockaddr_storage src; /* im_client_event_set_source; ss_family 0: none */
  socklen_t src_len;
};

uint64_t im_client_event_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* After every call into the core: re-arm the timer for its next deadline. */
static void settle(im_client_event *e) {
  long t = im_client_timeout(e->cl, im_client_event_now());
  if (t < 0) {
    evtimer_del(e->timer);
    return;
  }
  struct timeval tv = {t / 1000, (t % 1000) * 1000};
  evtimer_add(e->timer, &tv);
}

static void io_cb(evutil_socket_t fd, short what, void *arg);

static void arm(im_client_event *e, bool writing) {
  if (e->fd < 0)
    return;
  event_del(e->io);
  event_assign(e->io, e->base, e->fd, EV_READ | EV_PERSIST | (writing ? EV_WRITE : 0), io_cb, e);
  event_add(e->io, NULL);
  e->writing = writing;
}

static void sock_close(im_client_event *e) {
  if (e->fd < 0)
    return;
  event_del(e->io);
  close(e->fd);
  e->fd = -1;
  e->connecting = e->writing = false;
}

/* Bind fd to e's source address, if e has one, before its connect. */
static bool bind_source(const im_client_event *e, int fd) {
  if (!e || e->src_len == 0)
    return true;
#ifdef IP_BIND_ADDRESS_NO_PORT
  /* The port is then chosen at connect(), unique per destination rather
   * than per source address. */
  int one = 1;
  setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
#endif
  return bind(fd, (const struct sockaddr *)&e->src, e->src_len) == 0;
}

/* Non-blocking connect to host:port, from e's source address (the gateway
 * connection; NULL for the gateway-list fetch, which may go anywhere);
 * returns the socket or -1. */
static int open_socket(const im_client_event *e, const char *host, uint16_t port,
                       bool *in_progress) {
  struct addrinfo hints = {0}, *res = NULL;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  hints.ai_family = e && e->src_len ? e->src.ss_family : AF_UNSPEC;
  char ps[8];
  snprintf(ps, sizeof ps, "%u", (unsigned)port);
  if (getaddrinfo(host, ps, &hints, &res) != 0 || !res)
    return -1;
  int fd = -1;
  for (struct addrinfo *ai = res; ai && fd < 0; ai = ai->ai_next) {
    fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
      continue;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (!bind_source(e, fd)) {
      close(fd);
      fd = -1;
    } else if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0) {
      *in_progress = false;
    } else if (errno == EINPROGRESS) {
      *in_progress = true;
    } else {
      close(fd);
      fd = -1;
    }
  }
  freeaddrinfo(res);
  return fd;
}

/* Write what the core has queued; false when the connection died. */
static bool write_out(im_client_event *e) {
  struct iovec iov[4];
  while (e->fd >= 0) {
    int n = im_client_pending(e->cl, iov, 4);
    if (n <= 0) {
      if (e->writing)
        arm(e, false);
      return true;
    }
    struct msghdr mh = {0};
    mh.msg_iov = iov;
    mh.msg_iovlen = (size_t)n;
    ssize_t w = sendmsg(e->fd, &mh, MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EINTR)
        continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        if (!e->writing)
          arm(e, true);
        return true;
      }
      sock_close(e);
      im_client_disconnected(e->cl);
      return false;
    }
    im_client_sent(e->cl, (size_t)w);
  }
  return false;
}

static void io_cb(evutil_socket_t fd, short what, void *arg) {
  im_client_event *e = arg;
  im_client_tick(e->cl, im_client_event_now());
  if (e->fd != fd) { /* the tick ended this connection */
    settle(e);
    return;
  }
  if (e->connecting) {
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0 || err != 0) {
      sock_close(e);
      im_client_disconnected(e->cl);
      settle(e);
      return;
    }
    e->connecting = false;
    arm(e, false);
    im_client_connected(e->cl);
    write_out(e);
    settle(e);
    return;
  }
  if ((what & EV_WRITE) && !write_out(e)) {
    settle(e);
    return;
  }
  if ((what & EV_READ) && e->fd >= 0) {
    ssize_t n = recv(fd, read_buf, sizeof read_buf, 0);
    if (n > 0) {
      im_client_feed(e->cl, read_buf, (size_t)n);
    } else if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
      sock_close(e);
      im_client_disconnected(e->cl);
    }
  }
  settle(e);
}

static void flush_cb(evutil_socket_t fd, short what, void *arg) {
  (void)fd;
  (void)what;
  im_client_event *e = arg;
  if (e->fd >= 0 && !e->connecting)
    write_out(e);
  settle(e);
}

static void timer_cb(evutil_socket_t fd, short what, void *arg) {
  (void)fd;
  (void)what;
  im_client_event *e = arg;
  im_client_tick(e->cl, im_client_event_now());
  settle(e);
}

/* ---- the core's hooks ------------------------------------------------------- */

static int hook_connect(im_client *cl, const im_client_addr *a, void *user) {
  (void)cl;
  im_client_event *e = user;
  sock_close(e);
  bool in_progress = false;
  int fd = open_socket(e, a->host, a->port, &in_progress);
  if (fd < 0)
    return -1;
  e->fd = fd;
  e->connecting = true;
  /* Even a connect that finished at once is reported from the loop, never
   * from inside this hook. */
  event_assign(e->io, e->base, fd, EV_WRITE | EV_PERSIST, io_cb, e);
  event_add(e->io, NULL);
  return 0;
}

static void hook_want_write(im_client *cl, void *user) {
  (void)cl;
  im_client_event *e = user;
  event_active(e->flush, EV_WRITE, 0);
}

static void hook_close(im_client *cl, void *user) {
  im_client_event *e = user;
  if (e->fd >= 0 && !e->connecting) {
    /* One try at what is queued (a close frame); never block for it. */
    struct iovec iov[4];
    int n = im_client_pending(cl, iov, 4);
    if (n > 0) {
      struct msghdr mh = {0};
      mh.msg_iov = iov;
      mh.msg_iovlen = (size_t)n;
      if (sendmsg(e->fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT) < 0) {
        /* nothing to do: the socket is closed next */
      }
    }
  }
  sock_close(e);
}

/* ---- gateway fetch ---------------------------------------------------------- */

static void fetch_reset(im_client_event *e) {
  if (e->ffd >= 0) {
    event_del(e->fio);
    close(e->ffd);
    e->ffd = -1;
  }
  free(e->freq);
  free(e->fbuf);
  e->freq = e->fbuf = NULL;
  e->freq_len = e->freq_off = e->flen = 0;
}

/* Hand the result over from the loop, not from inside a hook. */
static void fetch_finish(im_client_event *e, int status) {
  e->fstatus = status;
  if (e->ffd >= 0) {
    event_del(e->fio);
    close(e->ffd);
    e->ffd = -1;
  }
  event_active(e->fdone, EV_TIMEOUT, 0);
}

static void fdone_cb(evutil_socket_t fd, short what, void *arg) {
  (void)fd;
  (void)what;
  im_client_event *e = arg;
  const char *body = NULL;
  size_t blen = 0;
  int status = e->fstatus;
  if (status > 0) {
    int st = 0;
    long head = http_resp_head(e->fbuf, e->flen, FETCH_MAX, &st);
    if (head > 0) {
      body = e->fbuf + head;
      blen = e->flen - (size_t)head;
      status = st;
    } else {
      status = 0;
    }
  }
  im_client_gateways_result(e->cl, status, body, blen);
  fetch_reset(e);
  settle(e);
}

/* The body is complete when Content-Length bytes follow the head. */
static bool fetch_complete(const im_client_event *e) {
  int st;
  long head = http_resp_head(e->fbuf, e->flen, FETCH_MAX, &st);
  if (head <= 0)
    return false;
  const char *cur = e->fbuf;
  http_hdr h;
  while (http_resp_next_header(&cur, e->fbuf, (size_t)head, &h))
    if (http_name_is(h.name, h.name_len, "content-length"))
      return e->flen - (size_t)head >= strtoul(h.value, NULL, 10);
  return false;
}

static void fio_cb(evutil_socket_t fd, short what, void *arg) {
  im_client_event *e = arg;
  if (what & EV_WRITE) {
    ssize_t w = send(fd, e->freq + e->freq_off, e->freq_len - e->freq_off, MSG_NOSIGNAL);
    if (w < 0 && errno != EAGAIN && errno != EINTR && errno != EINPROGRESS) {
      fetch_finish(e, 0);
      return;
    }
    if (w > 0)
      e->freq_off += (size_t)w;
    if (e->freq_off == e->freq_len) {
      event_del(e->fio);
      event_assign(e->fio, e->base, fd, EV_READ | EV_PERSIST, fio_cb, e);
      event_add(e->fio, NULL);
    }
    return;
  }
  if (e->flen == FETCH_MAX) {
    fetch_finish(e, 0);
    return;
  }
  ssize_t n = recv(fd, e->fbuf + e->flen, FETCH_MAX - e->flen, 0);
  if (n < 0 && (errno == EAGAIN || errno == EINTR))
    return;
  if (n > 0)
    e->flen += (size_t)n;
  if (n <= 0 || fetch_complete(e))
    fetch_finish(e, n < 0 ? 0 : 200); /* 200: "read"; fdone takes the real status */
}

static int fetch_request(char *out, size_t cap, const char *target, const char *host,
                         int host_len, const char *api_key) {
  return snprintf(out, cap, "GET %s HTTP/1.1\r\nHost: %.*s\r\n%s%s%sConnection: close\r\n\r\n",
                  target, host_len, host, api_key ? "Authorization: Bearer " : "",
                  api_key ? api_key : "", api_key ? "\r\n" : "");
}

static void hook_fetch(im_client *cl, const char *url, const char *api_key, void *user) {
  (void)cl;
  im_client_event *e = user;
  fetch_reset(e);
  /* http://HOST:PORT/PATH?QUERY, parsed as a tcp:// address plus a target */
  const char *p = strncmp(url, "http://", 7) == 0 ? url + 7 : NULL;
  const char *slash = p ? strchr(p, '/') : NULL;
  gw_addr a;
  if (!slash || gw_parse_url(p, (size_t)(slash - p), &a) != 0) {
    fetch_finish(e, 0);
    return;
  }
  int len = fetch_request(NULL, 0, slash, p, (int)(slash - p), api_key);
  e->freq = malloc((size_t)len + 1);
  e->fbuf = malloc(FETCH_MAX);
  bool in_progress;
  if (e->freq && e->fbuf)
    e->ffd = open_socket(NULL, a.a.host, a.a.port, &in_progress);
  free(a.mem);
  if (e->ffd < 0) {
    fetch_finish(e, 0);
    return;
  }
  fetch_request(e->freq, (size_t)len + 1, slash, p, (int)(slash - p), api_key);
  e->freq_len = (size_t)len;
  event_assign(e->fio, e->base, e->ffd, EV_WRITE | EV_PERSIST, fio_cb, e);
  event_add(e->fio, NULL);
}

/* ---- public --------------------------------------------------------------------- */

im_client_event *im_client_event_new(struct event_base *base, im_client *cl) {
  im_client_event *e = calloc(1, sizeof *e);
  if (!e)
    return NULL;
  e->base = base;
  e->cl = cl;
  e->fd = e->ffd = -1;
  e->io = event_new(base, -1, 0, io_cb, e);
  e->fio = event_new(base, -1, 0, fio_cb, e);
  e->timer = evtimer_new(base, timer_cb, e);
  e->flush = event_new(base, -1, 0, flush_cb, e);
  e->fdone = event_new(base, -1, 0, fdone_cb, e);
  if (!e->io || !e->fio || !e->timer || !e->flush || !e->fdone) {
    im_client_event_free(e);
    return NULL;
  }
  im_client_io io = {.connect = hook_connect,
                     .want_write = hook_want_write,
                     .close = hook_close,
                     .fetch_gateways = hook_fetch};
  im_client_set_io(cl, &io, e);
  return e;
}

int im_client_event_start(im_client_event *e) {
  int rc = im_client_start(e->cl, im_client_event_now());
  settle(e);
  return rc;
}

int im_client_event_set_source(im_client_event *e, const char *ip) {
  if (!ip) {
    e->src_len = 0;
    return 0;
  }
  struct sockaddr_in *v4 = (struct sockaddr_in *)&e->src;
  struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&e->src;
  memset(&e->src, 0, sizeof e->src);
  if (inet_pton(AF_INET, ip, &v4->sin_addr) == 1) {
    v4->sin_family = AF_INET;
    e->src_len = sizeof *v4;
  } else if (inet_pton(AF_INET6, ip, &v6->sin6_addr) == 1) {
    v6->sin6_family = AF_INET6;
    e->src_len = sizeof *v6;
  } else {
    e->src_len = 0;
    return IM_EADDR;
  }
  return 0;
}

void im_client_event_free(im_client_event *e) {
  if (!e)
    return;
  sock_close(e);
  fetch_reset(e);
  if (e->io)
    event_free(e->io);
  if (e->fio)
    event_free(e->fio);
  if (e->timer)
    event_free(e->timer);
  if (e->flush)
    event_free(e->flush);
  if (e->fdone)
    event_free(e->fdone);
  free(e);
}
