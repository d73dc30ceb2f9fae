/* Latency histograms in the Prometheus text format: cumulative buckets over
 * fixed bounds in microseconds, rendered in seconds (hook and ACK latency). */
#ifndef IMD_HISTOGRAM_H
#define IMD_HISTOGRAM_H

#include <stddef.h>
#include <stdint.h>

#define IMD_HIST_MAX 16          /* bounds a histogram may have (+Inf not counted) */
#define IMD_HIST_TEXT_MAX 4096   /* imd_hist_format's output for names under 64 bytes */

typedef struct imd_hist {
  uint64_t count, sum_us;
  uint64_t le[IMD_HIST_MAX];     /* observations <= bounds[i] (cumulative) */
} imd_hist;

/* Count one observation of us microseconds; bounds (n <= IMD_HIST_MAX,
 * ascending, µs) are the same for every call on h. */
void imd_hist_observe(imd_hist *h, const uint64_t *bounds, size_t n, uint64_t us);

/* Add h's observations to sum (same bounds): worker threads' histograms. */
void imd_hist_add(imd_hist *sum, const imd_hist *h);

/* HELP, TYPE, name_bucket{le=...} lines with +Inf, name_sum (seconds) and
 * name_count into out (cap bytes, NUL-terminated, cut when short). Returns
 * the length it needed, as snprintf. */
int imd_hist_format(const imd_hist *h, const uint64_t *bounds, size_t n, const char *name,
                    const char *help, char *out, size_t cap);

#endif
