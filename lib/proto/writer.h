/* Output cursor with snprintf semantics for the IMP encoders: counts every
 * byte asked for, stores only what fits in cap. */
#ifndef IM_PROTO_WRITER_H
#define IM_PROTO_WRITER_H

#include <stddef.h>
#include <string.h>

typedef struct writer {
  void *out;
  size_t cap;
  size_t n;
} writer;

static inline void put(writer *w, const void *p, size_t n) {
  if (n > 0 && w->n < w->cap) {
    size_t room = w->cap - w->n;
    memcpy((char *)w->out + w->n, p, n < room ? n : room);
  }
  w->n += n;
}

#endif
