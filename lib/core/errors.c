/* im_strerror: one line of English per IM_E* code. */
#include <libim/im.h>

const char *im_strerror(int err) {
  switch (err) {
    case IM_OK: return "success";
    case IM_EINVAL: return "invalid argument";
    case IM_ENOENT: return "no such connection, user or room";
    case IM_ECLOSED: return "connection is closing or closed";
    case IM_EFULL: return "output queue bound exceeded; connection shed";
    case IM_ETOOBIG: return "message larger than the configured maximum";
    case IM_ESTATE: return "not valid in the connection's state";
    case IM_EPROTO: return "protocol violation by the peer";
    case IM_ELIMIT: return "configured limit reached";
    case IM_EADDR: return "address cannot be parsed or bound";
    case IM_ESYS: return "system call failed";
    case IM_EFATAL: return "fatal engine error";
    case IM_ENOMEM: return "out of memory";
    default: return "unknown error";
  }
}
