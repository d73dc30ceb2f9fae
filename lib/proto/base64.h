/* base64 encoding (RFC 4648): standard with padding (WebSocket keys and
 * accept values), or base64url without padding (imd's token signatures).
 * Plain table lookups: for public data and for values handed out anyway,
 * not for secrets kept secret. Part of im_util (lib/meson.build): libim,
 * imd and im-bench share it. */
#ifndef IM_PROTO_BASE64_H
#define IM_PROTO_BASE64_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Writes the encoding of in[0..n) and a NUL to out, which must hold
 * 4 * ceil(n / 3) + 1 bytes (url: ceil(n * 4 / 3) + 1). url: base64url
 * without padding; otherwise standard base64 with '=' padding. Returns the
 * length. */
size_t b64_encode(const uint8_t *in, size_t n, char *out, bool url);

#endif
