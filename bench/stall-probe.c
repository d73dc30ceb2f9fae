/* Stalls of the machine itself, to run beside a benchmark: one thread per
 * CPU, pinned to it and real-time (SCHED_FIFO) when allowed, sleeps 1 ms at
 * a time and reports every wake-up that came THRESHOLD_MS or more late. A
 * real-time thread that wakes late was kept off its CPU by the kernel
 * (interrupts, softirqs) or by the hypervisor, not by the benchmark's
 * processes, so such stalls are a floor under any latency measured here.
 *
 *   stall-probe SECONDS [THRESHOLD_MS]
 *
 * Prints a line per stall ("STALL t_s=… cpu=… late_ms=…", t from the start)
 * and at the end "RESULT stalls=N max_ms=M fifo=0|1". */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MAX_CPUS 256

typedef struct probe {
  pthread_t th;
  int cpu;
  int stalls;
  double max_ms;
} probe;

static double secs;
static double threshold_ms = 2.0;
static int fifo = 1;
static struct timespec t0;
static pthread_mutex_t out_lock = PTHREAD_MUTEX_INITIALIZER;

static double since(const struct timespec *a, const struct timespec *b)
{
  return (double)(b->tv_sec - a->tv_sec) + (double)(b->tv_nsec - a->tv_nsec) / 1e9;
}

static void *run(void *arg)
{
  probe *p = arg;
  const struct timespec nap = {0, 1000000};
  struct timespec a, b;

  for (;;) {
    clock_gettime(CLOCK_MONOTONIC, &a);
    nanosleep(&nap, NULL);
    clock_gettime(CLOCK_MONOTONIC, &b);
    double late_ms = since(&a, &b) * 1e3 - 1.0;
    if (late_ms >= threshold_ms) {
      p->stalls++;
      if (late_ms > p->max_ms)
        p->max_ms = late_ms;
      pthread_mutex_lock(&out_lock);
      printf("STALL t_s=%.3f cpu=%d late_ms=%.1f\n", since(&t0, &b), p->cpu, late_ms);
      pthread_mutex_unlock(&out_lock);
    }
    if (since(&t0, &b) >= secs)
      return NULL;
  }
}

int main(int argc, char **argv)
{
  static probe probes[MAX_CPUS];
  cpu_set_t online;
  int n = 0;

  if (argc < 2 || (secs = atof(argv[1])) <= 0) {
    fprintf(stderr, "usage: %s SECONDS [THRESHOLD_MS]\n", argv[0]);
    return 2;
  }
  if (argc > 2)
    threshold_ms = atof(argv[2]);
  setvbuf(stdout, NULL, _IOLBF, 0);
  if (sched_getaffinity(0, sizeof online, &online) != 0) {
    perror("sched_getaffinity");
    return 1;
  }
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (int cpu = 0; cpu < CPU_SETSIZE && n < MAX_CPUS; cpu++) {
    if (!CPU_ISSET(cpu, &online))
      continue;
    pthread_attr_t at;
    cpu_set_t one;
    struct sched_param sp = {.sched_priority = 50};
    probe *p = &probes[n];
    p->cpu = cpu;
    CPU_ZERO(&one);
    CPU_SET(cpu, &one);
    pthread_attr_init(&at);
    pthread_attr_setaffinity_np(&at, sizeof one, &one);
    if (fifo) {
      pthread_attr_setinheritsched(&at, PTHREAD_EXPLICIT_SCHED);
      pthread_attr_setschedpolicy(&at, SCHED_FIFO);
      pthread_attr_setschedparam(&at, &sp);
    }
    int rc = pthread_create(&p->th, &at, run, p);
    if (rc == EPERM && fifo) { /* not allowed real-time: measure at normal priority */
      fifo = 0;
      pthread_attr_setinheritsched(&at, PTHREAD_INHERIT_SCHED);
      rc = pthread_create(&p->th, &at, run, p);
    }
    pthread_attr_destroy(&at);
    if (rc != 0) {
      fprintf(stderr, "pthread_create: %s\n", strerror(rc));
      return 1;
    }
    n++;
  }
  int stalls = 0;
  double max_ms = 0;
  for (int i = 0; i < n; i++) {
    pthread_join(probes[i].th, NULL);
    stalls += probes[i].stalls;
    if (probes[i].max_ms > max_ms)
      max_ms = probes[i].max_ms;
  }
  printf("RESULT stalls=%d max_ms=%.1f fifo=%d cpus=%d threshold_ms=%.1f\n", stalls, max_ms, fifo,
         n, threshold_ms);
  return 0;
}
