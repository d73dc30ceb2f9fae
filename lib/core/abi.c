/* Reading and filling the public structs by their struct_size (abi.h). */
#include "core/abi.h"

#include <stdint.h>
#include <string.h>

/* Every public struct starts with uint32_t struct_size. */
static uint32_t size_of(const void *s) {
  uint32_t n;
  memcpy(&n, s, sizeof(n));
  return n;
}

static void set_size(void *s, uint32_t n) { memcpy(s, &n, sizeof(n)); }

const void *im__struct_in(const void *in, size_t min, size_t cur, void *tmp, int tmp_zero) {
  uint32_t n = size_of(in);
  if (n == 0 || n >= cur) return in;
  if (n < min) return NULL;
  if (tmp_zero) memset(tmp, 0, cur);
  memcpy(tmp, in, n);
  set_size(tmp, (uint32_t)cur);
  return tmp;
}

int im__struct_out(void *dst, size_t min, const void *full, size_t cur) {
  size_t n = size_of(dst);
  if (n == 0 || n > cur) n = cur;
  if (n < min) return IM_EINVAL;
  memcpy(dst, full, n);
  set_size(dst, (uint32_t)n);
  return 0;
}

int im__config_out(im_config *dst, size_t size, const im_config *def) {
  if (size < IM__CONFIG_SIZE_MIN || size > UINT32_MAX) return IM_EINVAL;
  memset(dst, 0, size);
  memcpy(dst, def, size < sizeof(*def) ? size : sizeof(*def));
  dst->struct_size = (uint32_t)size;
  return 0;
}
