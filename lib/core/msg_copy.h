/* Deep copies of an im_msg into memory the caller allocates: used by the
 * cross-thread queues (im_async.h mailboxes, im_group.h), which copy a
 * message once into the same allocation as the operation carrying it. */
#ifndef IM_CORE_MSG_COPY_H
#define IM_CORE_MSG_COPY_H

#include <libim/im.h>

/* Bytes msgcopy_put() writes for m (its strings and data, each
 * NUL-terminated). */
size_t msgcopy_size(const im_msg *m);
/* Copy s (NUL-terminated; NULL stays NULL) to *at and move *at past it. */
const char *msgcopy_str(char **at, const char *s);
/* *dst = *m with every string and the data copied to *at (sized with
 * msgcopy_size); *at moves past them. */
void msgcopy_put(im_msg *dst, char **at, const im_msg *m);

#endif
