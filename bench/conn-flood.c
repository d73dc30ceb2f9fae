/* A connection flooder for the abuse-protection benchmark: from one source
 * address, open RATE TCP connections a second for SECONDS to HOST:PORT and
 * close each as soon as its fate is known. A connection the server closes
 * within 200 ms (EOF or reset) counts as refused; one still open then
 * counts as admitted. Loopback or the machine's own namespaces only.
 *   conn-flood SRC_IP DST_IP PORT RATE SECONDS */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_OPEN 4096
#define VERDICT_MS 200

static uint64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

typedef struct slot {
  int fd;
  uint64_t born;
} slot;

int main(int argc, char **argv) {
  if (argc != 6) {
    fprintf(stderr, "usage: conn-flood SRC_IP DST_IP PORT RATE SECONDS\n");
    return 2;
  }
  struct sockaddr_in src = {.sin_family = AF_INET}, dst = {.sin_family = AF_INET};
  if (inet_pton(AF_INET, argv[1], &src.sin_addr) != 1 ||
      inet_pton(AF_INET, argv[2], &dst.sin_addr) != 1) {
    fprintf(stderr, "conn-flood: bad address\n");
    return 2;
  }
  dst.sin_port = htons((uint16_t)atoi(argv[3]));
  long rate = atol(argv[4]), secs = atol(argv[5]);
  int ep = epoll_create1(0);
  static slot slots[MAX_OPEN];
  int nopen = 0;
  long attempts = 0, refused = 0, admitted = 0, failed = 0;
  uint64_t t0 = now_ms(), end = t0 + (uint64_t)secs * 1000u;
  while (now_ms() < end || nopen > 0) {
    uint64_t now = now_ms();
    /* paced: as many attempts as the elapsed time allows */
    long due = now < end ? (long)((now - t0) * (uint64_t)rate / 1000u) : attempts;
    while (attempts < due && nopen < MAX_OPEN) {
      attempts++;
      int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
      int one = 1;
      setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
      if (fd < 0 || bind(fd, (struct sockaddr *)&src, sizeof src) < 0 ||
          (connect(fd, (struct sockaddr *)&dst, sizeof dst) < 0 && errno != EINPROGRESS)) {
        failed++;
        if (fd >= 0) close(fd);
        continue;
      }
      int k = 0;
      while (slots[k].fd) k++;
      slots[k] = (slot){fd, now};
      struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.u32 = (uint32_t)k};
      epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
      nopen++;
    }
    struct epoll_event evs[256];
    int n = epoll_wait(ep, evs, 256, 1);
    for (int i = 0; i < n; i++) { /* EOF or reset: refused */
      slot *s = &slots[evs[i].data.u32];
      if (!s->fd) continue;
      close(s->fd);
      s->fd = 0;
      nopen--;
      refused++;
    }
    now = now_ms();
    for (int k = 0; k < MAX_OPEN && nopen; k++)
      if (slots[k].fd && now - slots[k].born >= VERDICT_MS) {
        close(slots[k].fd);
        slots[k].fd = 0;
        nopen--;
        admitted++;
      }
  }
  printf("RESULT mode=flood attempts=%ld refused=%ld admitted=%ld failed=%ld seconds=%ld\n",
         attempts, refused, admitted, failed, secs);
  return 0;
}
