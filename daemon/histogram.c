/* Latency histograms (histogram.h). */
#include "histogram.h"

#include <stdio.h>

void imd_hist_observe(imd_hist *h, const uint64_t *bounds, size_t n, uint64_t us) {
  h->count++;
  h->sum_us += us;
  for (size_t i = 0; i < n && i < IMD_HIST_MAX; i++)
    if (us <= bounds[i]) h->le[i]++;
}

int imd_hist_format(const imd_hist *h, const uint64_t *bounds, size_t n, const char *name,
                    const char *help, char *out, size_t cap) {
  size_t len = 0;
  int k = snprintf(out, cap, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
  for (size_t i = 0; k >= 0 && i <= n && i <= IMD_HIST_MAX; i++) {
    len += (size_t)k;
    char *at = len < cap ? out + len : NULL;
    size_t room = len < cap ? cap - len : 0;
    if (i < n && i < IMD_HIST_MAX)
      k = snprintf(at, room, "%s_bucket{le=\"%g\"} %llu\n", name, (double)bounds[i] / 1e6,
                   (unsigned long long)h->le[i]);
    else
      k = snprintf(at, room, "%s_bucket{le=\"+Inf\"} %llu\n%s_sum %.6f\n%s_count %llu\n", name,
                   (unsigned long long)h->count, name, (double)h->sum_us / 1e6, name,
                   (unsigned long long)h->count);
  }
  return k < 0 ? k : (int)(len + (size_t)k);
}

void imd_hist_add(imd_hist *sum, const imd_hist *h) {
  sum->count += h->count;
  sum->sum_us += h->sum_us;
  for (size_t i = 0; i < IMD_HIST_MAX; i++) sum->le[i] += h->le[i];
}
