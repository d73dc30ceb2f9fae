/* The struct_size rule of the public structs (im.h, "Conventions"): which
 * sizes are accepted, and reading or filling a caller's struct laid out by
 * another release. The only place that knows the oldest layouts. */
#ifndef IM_CORE_ABI_H
#define IM_CORE_ABI_H

#include <libim/im.h>
#include <stddef.h>

/* Bytes up to the end of field f of struct type t. */
#define IM__END(t, f) (offsetof(t, f) + sizeof(((t *)0)->f))

/* The oldest layouts accepted: struct_size followed by the fields of libim
 * 0.2.0 (soname 1, the first release that later ones only append to).
 * A shorter struct_size (other than 0) is refused: IM_EINVAL / NULL. */
#define IM__CONFIG_SIZE_MIN IM__END(im_config, max_conns_per_user)
#define IM__CALLBACKS_SIZE_MIN IM__END(im_callbacks, on_close)
#define IM__MSG_SIZE_MIN IM__END(im_msg, flags)
#define IM__CONN_INFO_SIZE_MIN IM__END(im_conn_info, secure)
#define IM__STATS_SIZE_MIN IM__END(im_stats, dups)

/* A struct the library reads (its first member is struct_size), in this
 * release's layout of cur bytes: `in` itself when its struct_size is 0 or
 * at least cur; else tmp, holding in's first struct_size bytes over what
 * tmp held (defaults: the caller fills tmp first when they are not zeros,
 * tmp_zero 0) with struct_size cur; NULL when struct_size is below min. */
const void *im__struct_in(const void *in, size_t min, size_t cur, void *tmp, int tmp_zero);

/* Copy full (this release's layout, cur bytes) into dst, a caller's struct
 * of dst->struct_size bytes (0: cur) without a byte past it; dst's
 * struct_size becomes the bytes written. Returns 0, or IM_EINVAL when
 * struct_size is below min (dst left alone). */
int im__struct_out(void *dst, size_t min, const void *full, size_t cur);

/* im_config_init_size's part: dst is the caller's config of size bytes;
 * zeroed, then as much of def (this release's defaults) as fits, and
 * struct_size = size. Returns 0, or IM_EINVAL below the oldest layout. */
int im__config_out(im_config *dst, size_t size, const im_config *def);

/* The reading side, typed. cfg_tmp must hold the defaults (im_config_init). */
static inline const im_config *im__config_in(const im_config *cfg, im_config *cfg_tmp) {
  return (const im_config *)im__struct_in(cfg, IM__CONFIG_SIZE_MIN, sizeof(*cfg), cfg_tmp, 0);
}
static inline const im_callbacks *im__callbacks_in(const im_callbacks *cb, im_callbacks *tmp) {
  return (const im_callbacks *)im__struct_in(cb, IM__CALLBACKS_SIZE_MIN, sizeof(*cb), tmp, 1);
}
static inline const im_msg *im__msg_in(const im_msg *m, im_msg *tmp) {
  return (const im_msg *)im__struct_in(m, IM__MSG_SIZE_MIN, sizeof(*m), tmp, 1);
}

#endif
