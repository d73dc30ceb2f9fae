/* client-poll: the client core driven from a hand-written poll() loop, no
 * libevent (docs/CLIENT.md, "Driving it from your own loop").
 *
 *   client-poll HOST PORT UID TOKEN TO TEXT
 *
 * Connects over raw TCP, sends {"t":"TEXT"} to TO, prints every message
 * received ("<from>: <data>") until its own message is acknowledged, then
 * prints "acked <id>" and exits 0. Exits 1 if the server refuses the token. */
#include <arpa/inet.h>
#include <errno.h>
#include <libim/im_client.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

typedef struct loop {
  int fd;
  bool connecting; /* a connect() is in progress on fd */
  bool done, refused;
} loop;

static uint64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* ---- the hooks: open, note, close; outcomes are reported from the loop */

static int on_connect(im_client *cl, const im_client_addr *a, void *u) {
  (void)cl;
  loop *l = u;
  struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(a->port)};
  if (inet_pton(AF_INET, a->host, &sa.sin_addr) != 1)
    return -1;
  l->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
  if (l->fd < 0)
    return -1;
  if (connect(l->fd, (struct sockaddr *)&sa, sizeof sa) != 0 && errno != EINPROGRESS) {
    close(l->fd);
    l->fd = -1;
    return -1;
  }
  l->connecting = true;
  return 0;
}

static void on_want_write(im_client *cl, void *u) {
  (void)cl;
  (void)u; /* the loop asks im_client_pending() before every poll */
}

static void on_close_io(im_client *cl, void *u) {
  loop *l = u;
  struct iovec iov[4];
  int n = im_client_pending(cl, iov, 4);
  if (n > 0 && l->fd >= 0 && writev(l->fd, iov, n) < 0) {
    /* best effort: the socket is closed anyway */
  }
  if (l->fd >= 0)
    close(l->fd);
  l->fd = -1;
  l->connecting = false;
}

/* ---- what the application hears */

static void on_message(im_client *cl, const im_client_msg *m, void *u) {
  (void)cl;
  (void)u;
  printf("%s: %s\n", m->from, m->data);
}

static void on_ack(im_client *cl, const char *cid, const char *id, uint64_t seq, void *u) {
  (void)cl;
  (void)cid;
  (void)seq;
  printf("acked %s\n", id);
  ((loop *)u)->done = true;
}

static void on_close(im_client *cl, unsigned code, const char *reason, void *u) {
  loop *l = u;
  if (l->done)
    return; /* our own im_client_stop() */
  fprintf(stderr, "client-poll: closed %u %s\n", code, reason);
  if (im_client_state(cl) == IM_CLIENT_STOPPED)
    l->refused = true;
}

/* One pass: wait for the socket or the core's next deadline, then move
 * bytes and time. */
static void step(im_client *cl, loop *l) {
  struct iovec iov[4];
  im_client_tick(cl, now_ms());
  long timeout = im_client_timeout(cl, now_ms());
  bool want_out = l->connecting || im_client_pending(cl, iov, 4) > 0;
  struct pollfd p = {.fd = l->fd, .events = (short)(POLLIN | (want_out ? POLLOUT : 0))};
  int r = poll(&p, l->fd >= 0 ? 1 : 0, timeout < 0 ? 1000 : (int)timeout);
  im_client_tick(cl, now_ms());
  if (r <= 0 || l->fd < 0)
    return;
  if (l->connecting) {
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(l->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    l->connecting = false;
    if (err != 0) {
      close(l->fd);
      l->fd = -1;
      im_client_disconnected(cl);
    } else {
      im_client_connected(cl);
    }
    return;
  }
  if (p.revents & POLLOUT) {
    int n = im_client_pending(cl, iov, 4);
    ssize_t w = n > 0 ? writev(l->fd, iov, n) : 0;
    if (w > 0)
      im_client_sent(cl, (size_t)w);
  }
  if (p.revents & (POLLIN | POLLHUP | POLLERR)) {
    char buf[65536];
    ssize_t n = read(l->fd, buf, sizeof buf);
    if (n > 0) {
      im_client_feed(cl, buf, (size_t)n);
    } else if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
      close(l->fd);
      l->fd = -1;
      im_client_disconnected(cl);
    }
  }
}

int main(int argc, char **argv) {
  if (argc != 7) {
    fprintf(stderr, "usage: client-poll HOST PORT UID TOKEN TO TEXT\n");
    return 2;
  }
  char url[300], data[1100];
  snprintf(url, sizeof url, "tcp://%s:%s", argv[1], argv[2]);
  /* TEXT is put in a JSON string as is: keep it free of quotes and backslashes */
  snprintf(data, sizeof data, "{\"t\":\"%.1000s\"}", argv[6]);
  const char *urls[] = {url};
  im_client_config cfg;
  im_client_config_init(&cfg);
  cfg.uid = argv[3];
  cfg.token = argv[4];
  cfg.device = "poll";
  cfg.urls = urls;
  cfg.n_urls = 1;
  setvbuf(stdout, NULL, _IOLBF, 0);

  loop l = {.fd = -1};
  im_client_callbacks cb = {.on_message = on_message, .on_ack = on_ack, .on_close = on_close};
  im_client *cl = im_client_new(&cfg, &cb, &l);
  if (!cl) {
    fprintf(stderr, "client-poll: bad arguments\n");
    return 2;
  }
  im_client_io io = {.connect = on_connect, .want_write = on_want_write, .close = on_close_io};
  im_client_set_io(cl, &io, &l);
  int rc = im_client_send(cl, IM_CLIENT_TO_USER, argv[5], data, strlen(data), NULL);
  if (rc != 0) {
    fprintf(stderr, "client-poll: %s\n", im_strerror(rc));
    im_client_free(cl);
    return 2;
  }
  im_client_start(cl, now_ms());
  while (!l.done && !l.refused)
    step(cl, &l);
  im_client_stop(cl);
  im_client_free(cl);
  return l.refused ? 1 : 0;
}
