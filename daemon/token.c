#include "token.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <sys/random.h>
#include <sys/types.h>

#include <mbedtls/platform_util.h>
#include <mbedtls/sha256.h>

#include "proto/base64.h"

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

/* The value of a base64url character, or -1 for any other. */
static int b64url_value(char c)
{
  return c >= 'A' && c <= 'Z' ? c - 'A' : c >= 'a' && c <= 'z' ? c - 'a' + 26
       : c >= '0' && c <= '9' ? c - '0' + 52 : c == '-' ? 62 : c == '_' ? 63 : -1;
}

/* HMAC-SHA256 (RFC 2104) keyed states: SHA-256 after the key block XOR
 * ipad (inner) and XOR opad (outer). They depend on the secret only, so
 * each thread keeps those of the last secret it used: a token then costs
 * the blocks of its message and of the outer hash, not the two key blocks
 * as well (and no allocation, which mbedtls_md_setup makes). A secret
 * longer than KEY_CACHE_MAX is keyed anew each time. The cache holds a copy
 * of the secret, which the process holds anyway, to tell a changed one. */
#define HMAC_BLOCK 64
#define KEY_CACHE_MAX 256

typedef struct hmac_keyed {
  mbedtls_sha256_context inner, outer;
} hmac_keyed;

typedef struct key_cache {
  uint8_t key[KEY_CACHE_MAX];
  size_t len; /* 0: empty */
  hmac_keyed hk;
} key_cache;

static _Thread_local key_cache cache;

static int hmac_key(const uint8_t *secret, size_t secret_len, hmac_keyed *hk)
{
  uint8_t k[HMAC_BLOCK] = {0}, pad[HMAC_BLOCK];
  int rc = -1;

  if (secret_len > HMAC_BLOCK) {
    if (mbedtls_sha256_ret(secret, secret_len, k, 0) != 0)
      goto out;
  } else {
    memcpy(k, secret, secret_len);
  }
  mbedtls_sha256_init(&hk->inner);
  mbedtls_sha256_init(&hk->outer);
  for (size_t i = 0; i < HMAC_BLOCK; i++)
    pad[i] = k[i] ^ 0x36;
  if (mbedtls_sha256_starts_ret(&hk->inner, 0) != 0 ||
      mbedtls_sha256_update_ret(&hk->inner, pad, HMAC_BLOCK) != 0)
    goto out;
  for (size_t i = 0; i < HMAC_BLOCK; i++)
    pad[i] = k[i] ^ 0x5c;
  if (mbedtls_sha256_starts_ret(&hk->outer, 0) != 0 ||
      mbedtls_sha256_update_ret(&hk->outer, pad, HMAC_BLOCK) != 0)
    goto out;
  rc = 0;
out:
  mbedtls_platform_zeroize(k, sizeof k);
  mbedtls_platform_zeroize(pad, sizeof pad);
  return rc;
}

/* The keyed states of secret: this thread's cached ones, or *spare. */
static const hmac_keyed *keyed(const uint8_t *secret, size_t secret_len, hmac_keyed *spare)
{
  if (secret_len > KEY_CACHE_MAX)
    return hmac_key(secret, secret_len, spare) == 0 ? spare : NULL;
  if (cache.len == secret_len && memcmp(cache.key, secret, secret_len) == 0)
    return &cache.hk;
  cache.len = 0;
  if (hmac_key(secret, secret_len, &cache.hk) != 0)
    return NULL;
  memcpy(cache.key, secret, secret_len);
  cache.len = secret_len;
  return &cache.hk;
}

static int hash_str(mbedtls_sha256_context *c, const char *p, size_t n)
{
  return mbedtls_sha256_update_ret(c, (const unsigned char *)p, n) != 0 ||
         mbedtls_sha256_update_ret(c, (const unsigned char *)"\n", 1) != 0;
}

/* The MAC of a token: streams the message through HMAC so uid and device
 * need no joined copy of unbounded size. */
static int sign(const uint8_t *secret, size_t secret_len, const char *uid,
                const char *dev, const char *iat, size_t iat_len,
                const char *exp, size_t exp_len, uint8_t mac[SIG_RAW_LEN])
{
  hmac_keyed spare;
  const hmac_keyed *hk = keyed(secret, secret_len, &spare);
  mbedtls_sha256_context c;
  uint8_t inner[SIG_RAW_LEN];
  int rc = -1;

  if (hk == NULL)
    return -1;
  mbedtls_sha256_init(&c);
  mbedtls_sha256_clone(&c, &hk->inner);
  if (mbedtls_sha256_update_ret(&c, (const unsigned char *)(iat ? sign_domain2 : sign_domain),
                                (iat ? sizeof sign_domain2 : sizeof sign_domain) - 1) != 0 ||
      hash_str(&c, uid, strlen(uid)) != 0 || hash_str(&c, dev, strlen(dev)) != 0 ||
      (iat && hash_str(&c, iat, iat_len) != 0) ||
      mbedtls_sha256_update_ret(&c, (const unsigned char *)exp, exp_len) != 0 ||
      mbedtls_sha256_finish_ret(&c, inner) != 0)
    goto out;
  mbedtls_sha256_clone(&c, &hk->outer);
  if (mbedtls_sha256_update_ret(&c, inner, sizeof inner) != 0 ||
      mbedtls_sha256_finish_ret(&c, mac) != 0)
    goto out;
  rc = 0;
out:
  mbedtls_sha256_free(&c);
  if (hk == &spare) {
    mbedtls_sha256_free(&spare.inner);
    mbedtls_sha256_free(&spare.outer);
  }
  mbedtls_platform_zeroize(inner, sizeof inner);
  return rc;
}

/* The 32 bytes of a token's 43 base64url characters (parse() checked the
 * alphabet). -1 when the last character's two spare bits are not zero: one
 * MAC has exactly one spelling, so a token cannot be varied and stay
 * valid. The signature is the client's, not secret: plain lookups. */
static int sig_decode(const char *sig, uint8_t mac[SIG_RAW_LEN])
{
  size_t o = 0;
  for (size_t i = 0; i < SIG_B64_LEN; i += 4) {
    uint32_t v = 0;
    size_t n = SIG_B64_LEN - i < 4 ? SIG_B64_LEN - i : 4;
    for (size_t k = 0; k < 4; k++) {
      int x = k < n ? b64url_value(sig[i + k]) : 0;
      if (x < 0)
        return -1;
      v = v << 6 | (uint32_t)x;
    }
    for (int k = 0; k < 3 && o < SIG_RAW_LEN; k++)
      mac[o++] = (uint8_t)(v >> (16 - 8 * k));
    if (n < 4 && (v & 0xff) != 0) /* the last group: 3 characters, 16 bits */
      return -1;
  }
  return 0;
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
    if (b64url_value(t[i]) < 0) /* also stops at the NUL */
      return -1;
  return t[SIG_B64_LEN] == '\0' ? 0 : -1;
}

/* Always looks at all n bytes; the volatile accumulator keeps the compiler
 * from turning the loop into an early-exit memcmp. */
static int equal_ct(const uint8_t *a, const uint8_t *b, size_t n)
{
  volatile uint8_t diff = 0;
  for (size_t i = 0; i < n; i++)
    diff |= (uint8_t)(a[i] ^ b[i]);
  return diff == 0;
}

/* Mints a v1 token (issued_ms 0) or a v2 token carrying issued_ms. */
static int mint(const uint8_t *secret, size_t secret_len, const char *uid,
                const char *device, int64_t issued_ms, int64_t expiry_unix,
                char *out, size_t cap)
{
  char exp[EXP_DIGITS_MAX + 1], iat[IAT_DIGITS_MAX + 1];
  char sig[SIG_B64_LEN + 1];
  uint8_t mac[SIG_RAW_LEN];
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
           mac) != 0)
    return IMD_TOKEN_EINVAL;
  b64_encode(mac, sizeof mac, sig, true);
  mbedtls_platform_zeroize(mac, sizeof mac);
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
  uint8_t expected[SIG_RAW_LEN], given[SIG_RAW_LEN];
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

  if (sig_decode(f.sig, given) != 0 ||
      sign(secret, secret_len, uid, dev, f.iat, f.iat_len, f.exp, f.exp_len,
           expected) != 0)
    return IMD_TOKEN_INVALID;
  same = equal_ct(expected, given, SIG_RAW_LEN);
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
