/* Shared helpers of the libim fuzz harnesses (header-only, static).
 *
 * Input layout of the split-driven harnesses:
 *   byte 0        mode (harness-specific: which valid prefix to send first)
 *   byte 1        n = number of control bytes at the END of the input
 *   bytes 2..     the stream fed to the code under test
 *   last n bytes  control bytes, used cyclically, one per chunk
 * A control byte c gives the chunk size (fz_chunk_size) and harness flags in
 * its high bits. With n == 0 the whole stream is fed at once. */
#ifndef LIBIM_FUZZ_COMMON_H
#define LIBIM_FUZZ_COMMON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* An invariant of the code under test: abort (the fuzzer reports a crash). */
#define FZ_CHECK(cond)                                                              \
  do {                                                                              \
    if (!(cond)) {                                                                  \
      fprintf(stderr, "fuzz invariant failed at %s:%d: %s\n", __FILE__, __LINE__, #cond); \
      abort();                                                                      \
    }                                                                               \
  } while (0)

typedef struct fz_input {
  uint8_t mode;
  const uint8_t *stream;
  size_t stream_len;
  const uint8_t *ctl;
  size_t nctl;
  size_t ci;   /* next control byte */
  size_t off;  /* bytes of the stream handed out */
} fz_input;

/* Returns false when the input is too short to hold the two header bytes. */
static inline bool fz_input_init(fz_input *in, const uint8_t *data, size_t size) {
  memset(in, 0, sizeof *in);
  if (size < 2) return false;
  in->mode = data[0];
  size_t rest = size - 2;
  in->nctl = data[1] < rest ? data[1] : rest;
  in->stream = data + 2;
  in->stream_len = rest - in->nctl;
  in->ctl = data + 2 + in->stream_len;
  return true;
}

/* Chunk size for a control byte's low 5 bits: 0 = all that is left,
 * 1..24 bytes, or 128..896 bytes. */
static inline size_t fz_chunk_size(uint8_t c) {
  unsigned s = c & 0x1fu;
  if (s == 0) return SIZE_MAX;
  return s <= 24 ? s : (size_t)(s - 24) * 128u;
}

/* Next chunk of `stream` (of length len, position *off): sets *ctl to the
 * control byte used (0 when there are none) and returns the chunk length,
 * 0 when the stream is exhausted. */
static inline size_t fz_next_chunk(fz_input *in, size_t len, size_t *off, uint8_t *ctl) {
  if (*off >= len) return 0;
  uint8_t c = 0;
  size_t n = SIZE_MAX;
  if (in->nctl) {
    c = in->ctl[in->ci++ % in->nctl];
    n = fz_chunk_size(c);
  }
  if (n > len - *off) n = len - *off;
  *ctl = c;
  return n;
}

/* An exact-size heap copy, so that AddressSanitizer catches any access
 * past the bytes handed to the library. */
static inline uint8_t *fz_dup(const void *p, size_t n) {
  uint8_t *d = malloc(n ? n : 1);
  if (!d) abort();
  if (n) memcpy(d, p, n);
  return d;
}

/* A growable byte buffer. */
typedef struct fz_buf {
  uint8_t *p;
  size_t n, cap;
} fz_buf;

static inline void fz_buf_add(fz_buf *b, const void *p, size_t n) {
  if (b->n + n > b->cap) {
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->n + n) cap *= 2;
    uint8_t *q = realloc(b->p, cap);
    if (!q) abort();
    b->p = q;
    b->cap = cap;
  }
  if (n) memcpy(b->p + b->n, p, n);
  b->n += n;
}

static inline void fz_buf_drop(fz_buf *b, size_t n) {
  memmove(b->p, b->p + n, b->n - n);
  b->n -= n;
}

static inline void fz_buf_free(fz_buf *b) {
  free(b->p);
  memset(b, 0, sizeof *b);
}

static inline const uint8_t *fz_memmem(const uint8_t *h, size_t hn, const char *needle) {
  size_t nn = strlen(needle);
  if (nn > hn) return NULL;
  for (size_t i = 0; i + nn <= hn; i++)
    if (memcmp(h + i, needle, nn) == 0) return h + i;
  return NULL;
}

#endif
