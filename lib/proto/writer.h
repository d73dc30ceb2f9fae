/* Output cursor with snprintf semantics for the IMP encoders and the text
 * made for every connection (the 101 response, the peer address): counts
 * every byte asked for, stores only what fits in cap. No printf: these run
 * per connection and message. */
#ifndef IM_PROTO_WRITER_H
#define IM_PROTO_WRITER_H

#include <stddef.h>
#include <stdint.h>
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

static inline void put_str(writer *w, const char *s) { put(w, s, strlen(s)); }

/* v in decimal. */
static inline void put_u64(writer *w, uint64_t v) {
  char t[20];
  size_t n = sizeof t;
  do {
    t[--n] = (char)('0' + v % 10);
    v /= 10;
  } while (v);
  put(w, t + n, sizeof t - n);
}

static inline void put_uint(writer *w, unsigned v) { put_u64(w, v); }

/* Ends what was put with a NUL where it fits (the last byte of cap when the
 * output was cut, as snprintf). Returns the length asked for. */
static inline size_t put_end(writer *w) {
  if (w->cap > 0) ((char *)w->out)[w->n < w->cap ? w->n : w->cap - 1] = '\0';
  return w->n;
}

#endif
