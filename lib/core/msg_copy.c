/* Deep copies of an im_msg (msg_copy.h). */
#include "core/msg_copy.h"

#include <string.h>

static size_t slen(const char *s) { return s ? strlen(s) + 1 : 0; }

size_t msgcopy_size(const im_msg *m) {
  return slen(m->id) + slen(m->cid) + slen(m->from) + slen(m->to) + slen(m->group) +
         slen(m->room) + m->data_len + 1;
}

const char *msgcopy_str(char **at, const char *s) {
  if (!s) return NULL;
  size_t n = strlen(s) + 1;
  char *d = memcpy(*at, s, n);
  *at += n;
  return d;
}

void msgcopy_put(im_msg *dst, char **at, const im_msg *m) {
  *dst = *m;
  dst->id = msgcopy_str(at, m->id);
  dst->cid = msgcopy_str(at, m->cid);
  dst->from = msgcopy_str(at, m->from);
  dst->to = msgcopy_str(at, m->to);
  dst->group = msgcopy_str(at, m->group);
  dst->room = msgcopy_str(at, m->room);
  char *data = *at;
  if (m->data) memcpy(data, m->data, m->data_len);
  data[m->data_len] = '\0';
  *at += m->data_len + 1;
  dst->data = m->data ? data : NULL;
}
