/* libFuzzer harness: imd's signed tokens (daemon/token.c).
 *
 * Input: byte 0 flags, bytes 1..5 a clock (40 bits, Unix seconds), then
 * "uid\0device\0token" (missing parts are ""). The token is verified as a
 * client would present it, and a token is minted for the uid and device and
 * checked against the verifier.
 *
 * Invariants:
 *  - imd_token_verify returns OK, INVALID or EXPIRED, and nothing but the
 *    one canonical token verifies: whatever it accepts is byte for byte the
 *    token imd_token_mint makes for that uid, device (or any device) and
 *    expiry, so a signature cannot be re-encoded, padded or extended;
 *  - a minted token has the documented shape and length, verifies as OK
 *    before its expiry and EXPIRED from it on, is INVALID for another uid or
 *    (bound) another device, and INVALID with any one character changed;
 *  - mint refuses exactly the documented bad arguments. */
#include <inttypes.h>

#include "fuzz_common.h"
#include "token.h"

static const uint8_t SECRET[] = "fuzz-token-secret-0123456789abcdef";
#define SECRET_LEN (sizeof SECRET - 1)

static const char *next_part(const char **p, const char *end) {
  const char *s = *p;
  const char *z = s < end ? memchr(s, '\0', (size_t)(end - s)) : NULL;
  *p = z ? z + 1 : end;
  return s;
}

static bool canonical_shape(const char *t, size_t n) {
  /* "1." EXP "." SCOPE "." SIG: EXP 1..12 digits without a leading 0, SIG 43
   * base64url characters */
  if (n < 2 + 1 + 3 + 43 || t[0] != '1' || t[1] != '.' || t[2] < '1' || t[2] > '9') return false;
  size_t i = 2;
  while (i < n && t[i] >= '0' && t[i] <= '9') i++;
  if (i - 2 > 12 || i + 3 + 43 != n || t[i] != '.' || (t[i + 1] != 'd' && t[i + 1] != '*') ||
      t[i + 2] != '.')
    return false;
  for (i += 3; i < n; i++) {
    char c = t[i];
    if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
          c == '-' || c == '_'))
      return false;
  }
  return true;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 6) return 0;
  uint8_t flags = data[0];
  int64_t now = 0;
  for (int i = 1; i <= 5; i++) now = now << 8 | data[i];
  /* NUL-terminated copy of the rest, so every part is a C string */
  size_t n = size - 6;
  char *buf = malloc(n + 1);
  FZ_CHECK(buf != NULL);
  memcpy(buf, data + 6, n);
  buf[n] = '\0';
  const char *p = buf, *end = buf + n;
  const char *uid = next_part(&p, end);
  const char *device = next_part(&p, end);
  const char *token = p < end ? p : "";

  /* 1. the client's token */
  int v = imd_token_verify(SECRET, SECRET_LEN, uid, device, token, now);
  FZ_CHECK(v == IMD_TOKEN_OK || v == IMD_TOKEN_INVALID || v == IMD_TOKEN_EXPIRED);
  if (v != IMD_TOKEN_INVALID) {
    size_t tl = strlen(token);
    FZ_CHECK(canonical_shape(token, tl));
    int64_t exp = strtoll(token + 2, NULL, 10);
    FZ_CHECK((v == IMD_TOKEN_OK) == (exp > now));
    bool bound = strchr(token + 2, '.')[1] == 'd';
    char again[IMD_TOKEN_MAX];
    int len = imd_token_mint(SECRET, SECRET_LEN, uid, bound ? device : NULL, exp, again,
                             sizeof again);
    FZ_CHECK(len > 0 && (size_t)len == tl && memcmp(again, token, tl) == 0);
  }
  /* the verifier never accepts with a short secret or a NULL argument */
  FZ_CHECK(imd_token_verify(SECRET, IMD_SECRET_MIN - 1, uid, device, token, now) ==
           IMD_TOKEN_INVALID);
  FZ_CHECK(imd_token_verify(SECRET, SECRET_LEN, uid, device, NULL, now) == IMD_TOKEN_INVALID);

  /* 2. a token minted for this uid and device */
  int64_t exp = now % INT64_C(999999999999) + 1;
  const char *mdev = (flags & 1) ? NULL : device;
  char tok[IMD_TOKEN_MAX];
  int len = imd_token_mint(SECRET, SECRET_LEN, uid, mdev, exp, tok, sizeof tok);
  bool bad_args = !*uid || strchr(uid, '\n') || (mdev && (strchr(mdev, '\n') || !strcmp(mdev, "*")));
  if (bad_args) {
    FZ_CHECK(len == IMD_TOKEN_EINVAL && tok[0] == '\0');
  } else {
    FZ_CHECK(len > 0 && len < 61 && (size_t)len == strlen(tok));
    FZ_CHECK(canonical_shape(tok, (size_t)len));
    bool bound = mdev && *mdev;
    const char *as = bound ? mdev : ((flags & 2) ? "any-device" : "");
    FZ_CHECK(imd_token_verify(SECRET, SECRET_LEN, uid, as, tok, exp - 1) == IMD_TOKEN_OK);
    FZ_CHECK(imd_token_verify(SECRET, SECRET_LEN, uid, as, tok, exp) == IMD_TOKEN_EXPIRED);
    /* too small a buffer: refused, nothing written past it */
    char small[8];
    FZ_CHECK(imd_token_mint(SECRET, SECRET_LEN, uid, mdev, exp, small, sizeof small) ==
             IMD_TOKEN_EINVAL);
    /* another uid (one byte longer) or, when bound, another device */
    size_t ul = strlen(uid);
    char *other = malloc(ul + 2);
    FZ_CHECK(other != NULL);
    memcpy(other, uid, ul);
    other[ul] = 'x';
    other[ul + 1] = '\0';
    FZ_CHECK(imd_token_verify(SECRET, SECRET_LEN, other, as, tok, exp - 1) == IMD_TOKEN_INVALID);
    if (bound) {
      size_t dl = strlen(mdev);
      char *od = malloc(dl + 2);
      FZ_CHECK(od != NULL);
      memcpy(od, mdev, dl);
      od[dl] = 'x';
      od[dl + 1] = '\0';
      FZ_CHECK(imd_token_verify(SECRET, SECRET_LEN, uid, od, tok, exp - 1) == IMD_TOKEN_INVALID);
      FZ_CHECK(imd_token_verify(SECRET, SECRET_LEN, uid, "", tok, exp - 1) == IMD_TOKEN_INVALID);
      free(od);
    }
    free(other);
    /* any one character changed: invalid (the flags pick which and to what) */
    size_t at = ((size_t)flags * 7u) % (size_t)len;
    char was = tok[at];
    static const char repl[] = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_.*d";
    char to = repl[(size_t)(flags >> 2) % (sizeof repl - 1)];
    if (to == was) to = was == 'A' ? 'B' : 'A';
    tok[at] = to;
    FZ_CHECK(imd_token_verify(SECRET, SECRET_LEN, uid, as, tok, exp - 1) == IMD_TOKEN_INVALID);
    tok[at] = was;
    /* and with bytes appended */
    char longer[IMD_TOKEN_MAX + 2];
    snprintf(longer, sizeof longer, "%s=", tok);
    FZ_CHECK(imd_token_verify(SECRET, SECRET_LEN, uid, as, longer, exp - 1) == IMD_TOKEN_INVALID);
  }
  free(buf);
  return 0;
}
