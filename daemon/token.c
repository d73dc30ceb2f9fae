#include "token.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <sys/random.h>
#include <sys/types.h>

#include <mbedtls/base64.h>
#include <mbedtls/md.h>
#include <mbedtls/platform_util.h>

#define SIG_RAW_LEN 32
#define SIG_B64_LEN 43 /* ceil(32 * 4 / 3), no padding */
#define EXP_DIGITS_MAX 12
#define SECRET_RAW_LEN 32

#define IAT_DIGITS_MAX 15

static const char sign_domain[] = "imd-token-v1\n";
static const char sign_domain2[] = "imd-token-v2\n";

typedef struct token_fields {
  int version;     /* 1 or 2 */
  const char *iat; /* v2: digits of the issue time (ms), not NUL-terminated */
  size_t iat_len;
  int64_t iat_value;
  const char *exp; /* digits, not NUL-terminated */
  size_t exp_len;
  int64_t exp_value;
  char scope; /* 'd' or '*' */
  const char *sig; /* SIG_B64_LEN base64url characters */
} token_fields;

/* A uid must be non-empty; neither it nor a device may hold the '\n' that
 * separates them in the signed message, or two (uid, device) pairs could
 * sign the same bytes. */
static int has_newline(const char *s)
{
  return strchr(s, '\n') != NULL;
}

static int is_b64url(char c)
{
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
         (c >= '0' && c <= '9') || c == '-' || c == '_';
}

/* Streams the message through HMAC so uid and device need no joined copy of
 * unbounded size. Writes SIG_B64_LEN characters and a NUL to sig. */
static int sign(const uint8_t *secret, size_t secret_len, const char *uid,
                const char *dev, const char *iat, size_t iat_len,
                const char *exp, size_t exp_len, char sig[SIG_B64_LEN + 1])
{
  const mbedtls_md_info_t *info = mbedtls_md_info_from_type(MBEDTLS_MD_SHA256);
  mbedtls_md_context_t ctx;
  unsigned char mac[SIG_RAW_LEN];
  unsigned char b64[SIG_B64_LEN + 2]; /* padded form plus NUL */
  size_t b64_len = 0;
  int rc = -1;

  if (info == NULL || mbedtls_md_get_size(info) != SIG_RAW_LEN)
    return -1;
  mbedtls_md_init(&ctx);
  if (mbedtls_md_setup(&ctx, info, 1) != 0 ||
      mbedtls_md_hmac_starts(&ctx, secret, secret_len) != 0 ||
      mbedtls_md_hmac_update(&ctx, (const unsigned char *)(iat ? sign_domain2 : sign_domain),
                             (iat ? sizeof sign_domain2 : sizeof sign_domain) - 1) != 0 ||
      mbedtls_md_hmac_update(&ctx, (const unsigned char *)uid,
                             strlen(uid)) != 0 ||
      mbedtls_md_hmac_update(&ctx, (const unsigned char *)"\n", 1) != 0 ||
      mbedtls_md_hmac_update(&ctx, (const unsigned char *)dev,
                             strlen(dev)) != 0 ||
      mbedtls_md_hmac_update(&ctx, (const unsigned char *)"\n", 1) != 0 ||
      (iat && (mbedtls_md_hmac_update(&ctx, (const unsigned char *)iat, iat_len) != 0 ||
               mbedtls_md_hmac_update(&ctx, (const unsigned char *)"\n", 1) != 0)) ||
      mbedtls_md_hmac_update(&ctx, (const unsigned char *)exp, exp_len) != 0 ||
      mbedtls_md_hmac_finish(&ctx, mac) != 0)
    goto out;
  if (mbedtls_base64_encode(b64, sizeof b64, &b64_len, mac, sizeof mac) != 0 ||
      b64_len != SIG_B64_LEN + 1 || b64[SIG_B64_LEN] != '=')
    goto out;
  for (size_t i = 0; i < SIG_B64_LEN; i++) {
    char c = (char)b64[i];
    sig[i] = c == '+' ? '-' : c == '/' ? '_' : c;
  }
  sig[SIG_B64_LEN] = '\0';
  rc = 0;
out:
  mbedtls_md_free(&ctx);
  mbedtls_platform_zeroize(mac, sizeof mac);
  mbedtls_platform_zeroize(b64, sizeof b64);
  return rc;
}

/* Reads [1-9][0-9]{0,max-1} at *t into digits/len/value and moves *t past
 * it; -1 on any deviation. */
static int parse_number(const char **t, size_t max, const char **digits, size_t *len,
                        int64_t *value)
{
  const char *p = *t;
  if (*p < '1' || *p > '9')
    return -1;
  *digits = p;
  *value = 0;
  while (*p >= '0' && *p <= '9') {
    if ((size_t)(p - *digits) == max)
      return -1;
    *value = *value * 10 + (*p - '0');
    p++;
  }
  *len = (size_t)(p - *digits);
  *t = p;
  return 0;
}

/* Accepts exactly  "1." EXP "." ("d"|"*") "." [A-Za-z0-9_-]{43}  or
 *                  "2." IAT "." EXP "." ("d"|"*") "." [A-Za-z0-9_-]{43}
 * (EXP [1-9][0-9]{0,11}, IAT [1-9][0-9]{0,14}) and nothing after it. Reads
 * t only up to its first deviation, so an arbitrarily long input costs at
 * most 76 characters of scanning. */
static int parse(const char *t, token_fields *f)
{
  if ((t[0] != '1' && t[0] != '2') || t[1] != '.')
    return -1;
  f->version = t[0] - '0';
  f->iat = NULL;
  f->iat_len = 0;
  f->iat_value = 0;
  t += 2;
  if (f->version == 2) {
    if (parse_number(&t, IAT_DIGITS_MAX, &f->iat, &f->iat_len, &f->iat_value) != 0 ||
        *t != '.')
      return -1;
    t++;
  }
  if (parse_number(&t, EXP_DIGITS_MAX, &f->exp, &f->exp_len, &f->exp_value) != 0)
    return -1;
  if (*t != '.')
    return -1;
  t++;
  if (*t != 'd' && *t != '*')
    return -1;
  f->scope = *t++;
  if (*t != '.')
    return -1;
  t++;
  f->sig = t;
  for (size_t i = 0; i < SIG_B64_LEN; i++)
    if (!is_b64url(t[i])) /* also stops at the NUL */
      return -1;
  return t[SIG_B64_LEN] == '\0' ? 0 : -1;
}

/* Always looks at all n bytes; the volatile accumulator keeps the compiler
 * from turning the loop into an early-exit memcmp. */
static int equal_ct(const char *a, const char *b, size_t n)
{
  volatile unsigned char diff = 0;
  for (size_t i = 0; i < n; i++)
    diff |= (unsigned char)((unsigned char)a[i] ^ (unsigned char)b[i]);
  return diff == 0;
}

/* Mints a v1 token (issued_ms 0) or a v2 token carrying issued_ms. */
static int mint(const uint8_t *secret, size_t secret_len, const char *uid,
                const char *device, int64_t issued_ms, int64_t expiry_unix,
                char *out, size_t cap)
{
  char exp[EXP_DIGITS_MAX + 1], iat[IAT_DIGITS_MAX + 1];
  char sig[SIG_B64_LEN + 1];
  char token[IMD_TOKEN_MAX];
  int exp_len, iat_len = 0, len, bound;

  if (out != NULL && cap > 0)
    out[0] = '\0';
  if (secret == NULL || secret_len < IMD_SECRET_MIN || uid == NULL ||
      out == NULL)
    return IMD_TOKEN_EINVAL;
  if (device == NULL)
    device = "";
  if (uid[0] == '\0' || has_newline(uid) || has_newline(device) ||
      strcmp(device, "*") == 0)
    return IMD_TOKEN_EINVAL;
  if (expiry_unix < 1 || expiry_unix > IMD_TOKEN_EXP_MAX)
    return IMD_TOKEN_EINVAL;
  if (issued_ms < 0 || issued_ms > IMD_TOKEN_IAT_MAX)
    return IMD_TOKEN_EINVAL;

  exp_len = snprintf(exp, sizeof exp, "%" PRId64, expiry_unix);
  if (exp_len < 1 || (size_t)exp_len >= sizeof exp)
    return IMD_TOKEN_EINVAL;
  if (issued_ms > 0) {
    iat_len = snprintf(iat, sizeof iat, "%" PRId64, issued_ms);
    if (iat_len < 1 || (size_t)iat_len >= sizeof iat)
      return IMD_TOKEN_EINVAL;
  }
  bound = device[0] != '\0';
  if (sign(secret, secret_len, uid, bound ? device : "*",
           issued_ms > 0 ? iat : NULL, (size_t)iat_len, exp, (size_t)exp_len,
           sig) != 0)
    return IMD_TOKEN_EINVAL;
  if (issued_ms > 0)
    len = snprintf(token, sizeof token, "2.%s.%s.%c.%s", iat, exp,
                   bound ? 'd' : '*', sig);
  else
    len = snprintf(token, sizeof token, "1.%s.%c.%s", exp, bound ? 'd' : '*',
                   sig);
  if (len < 0 || (size_t)len >= sizeof token || (size_t)len >= cap) {
    len = IMD_TOKEN_EINVAL;
  } else {
    memcpy(out, token, (size_t)len + 1);
  }
  mbedtls_platform_zeroize(token, sizeof token);
  mbedtls_platform_zeroize(sig, sizeof sig);
  return len;
}

int imd_token_mint(const uint8_t *secret, size_t secret_len, const char *uid,
                   const char *device, int64_t expiry_unix, char *out,
                   size_t cap)
{
  return mint(secret, secret_len, uid, device, 0, expiry_unix, out, cap);
}

int imd_token_mint_v2(const uint8_t *secret, size_t secret_len,
                      const char *uid, const char *device, int64_t issued_ms,
                      int64_t expiry_unix, char *out, size_t cap)
{
  if (issued_ms < 1) {
    if (out != NULL && cap > 0)
      out[0] = '\0';
    return IMD_TOKEN_EINVAL;
  }
  return mint(secret, secret_len, uid, device, issued_ms, expiry_unix, out,
              cap);
}

int imd_token_check(const uint8_t *secret, size_t secret_len, const char *uid,
                    const char *device, const char *token, int64_t now_unix,
                    imd_token_claims *claims)
{
  token_fields f;
  char expected[SIG_B64_LEN + 1];
  const char *dev;
  int same;

  if (claims != NULL)
    *claims = (imd_token_claims){0};
  if (secret == NULL || secret_len < IMD_SECRET_MIN || uid == NULL ||
      token == NULL)
    return IMD_TOKEN_INVALID;
  if (device == NULL)
    device = "";
  if (uid[0] == '\0' || has_newline(uid) || has_newline(device))
    return IMD_TOKEN_INVALID;
  if (parse(token, &f) != 0)
    return IMD_TOKEN_INVALID;
  if (f.scope == 'd') {
    /* "*" as a device would sign the any-device message. */
    if (device[0] == '\0' || strcmp(device, "*") == 0)
      return IMD_TOKEN_INVALID;
    dev = device;
  } else {
    dev = "*";
  }

  if (sign(secret, secret_len, uid, dev, f.iat, f.iat_len, f.exp, f.exp_len,
           expected) != 0)
    return IMD_TOKEN_INVALID;
  same = equal_ct(expected, f.sig, SIG_B64_LEN);
  mbedtls_platform_zeroize(expected, sizeof expected);
  if (!same)
    return IMD_TOKEN_INVALID;
  if (claims != NULL) {
    claims->version = f.version;
    claims->issued_ms = f.iat_value;
    claims->expiry = f.exp_value;
  }
  /* Only a genuine token gets its expiry looked at. */
  return f.exp_value <= now_unix ? IMD_TOKEN_EXPIRED : IMD_TOKEN_OK;
}

int imd_token_verify(const uint8_t *secret, size_t secret_len, const char *uid,
                     const char *device, const char *token, int64_t now_unix)
{
  return imd_token_check(secret, secret_len, uid, device, token, now_unix,
                         NULL);
}

int imd_secret_generate(char *out_hex, size_t cap)
{
  static const char hex[] = "0123456789abcdef";
  uint8_t raw[SECRET_RAW_LEN];
  size_t got = 0;

  if (out_hex != NULL && cap > 0)
    out_hex[0] = '\0';
  if (out_hex == NULL || cap < IMD_SECRET_HEX_LEN + 1)
    return -1;
  while (got < sizeof raw) {
    ssize_t n = getrandom(raw + got, sizeof raw - got, 0);
    if (n < 0) {
      if (errno == EINTR)
        continue;
      mbedtls_platform_zeroize(raw, sizeof raw);
      return -1;
    }
    got += (size_t)n;
  }
  for (size_t i = 0; i < sizeof raw; i++) {
    out_hex[2 * i] = hex[raw[i] >> 4];
    out_hex[2 * i + 1] = hex[raw[i] & 0x0f];
  }
  out_hex[IMD_SECRET_HEX_LEN] = '\0';
  mbedtls_platform_zeroize(raw, sizeof raw);
  return IMD_SECRET_HEX_LEN;
}

int imd_secret_parse(const char *text, uint8_t *out, size_t cap)
{
  size_t n;

  if (text == NULL || out == NULL)
    return -1;
  n = strlen(text);
  if (n < IMD_SECRET_MIN || n > cap || n > INT_MAX)
    return -1;
  memcpy(out, text, n);
  return (int)n;
}
