/* The worker threads of one imd process (--threads, workers.c): made and
 * ended by workers.c, reached by worker_calls.c. */
#ifndef IMD_WORKERS_H
#define IMD_WORKERS_H

#include <libim/im_router.h>
#include <pthread.h>
#include <stdbool.h>

#include "imd.h"

typedef struct imd_workers {
  unsigned n;
  imd *w[IM_GROUP_MAX];     /* w[0]: the main thread's */
  pthread_t th[IM_GROUP_MAX];
  bool started[IM_GROUP_MAX];
} imd_workers;

#endif
