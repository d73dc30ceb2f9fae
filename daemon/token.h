/* Signed bearer tokens that a back end mints and imd verifies offline.
 *
 * A token is  "1." EXP "." SCOPE "." SIG  (v1) or
 * "2." IAT "." EXP "." SCOPE "." SIG  (v2, which also carries its issue time
 * IAT in Unix milliseconds, so that a revocation can tell older tokens from
 * newer ones; its message is "imd-token-v2\n" uid "\n" DEV "\n" IAT "\n" EXP),
 * where EXP is the expiry in decimal
 * Unix seconds, SCOPE is "d" (bound to one device) or "*" (any device of the
 * uid), and SIG is base64url without padding of
 *   HMAC-SHA256(secret, "imd-token-v1\n" uid "\n" DEV "\n" EXP)
 * with DEV the device id for "d" and "*" for "*". docs/TOKENS.md is the full
 * contract, with minting code for other languages.
 *
 * Every pointer argument is borrowed for the duration of the call; nothing is
 * retained and no function allocates memory the caller must free. All
 * functions are thread-safe.
 */
#ifndef IMD_TOKEN_H
#define IMD_TOKEN_H

#include <stddef.h>
#include <stdint.h>

/* Buffer size that always holds a minted token and its NUL (tokens are at
 * most 60 characters). */
#define IMD_TOKEN_MAX 128

/* Shortest secret accepted, in bytes. */
#define IMD_SECRET_MIN 16

/* Largest expiry a token can carry: EXP has at most 12 digits. */
#define IMD_TOKEN_EXP_MAX INT64_C(999999999999)

/* Characters of a generated secret, without the NUL. */
#define IMD_SECRET_HEX_LEN 64

enum {
  IMD_TOKEN_OK = 0,
  IMD_TOKEN_INVALID = -1, /* malformed, forged, or for another uid/device */
  IMD_TOKEN_EXPIRED = -2, /* genuine but EXP <= now */
  IMD_TOKEN_EINVAL = -3,  /* bad arguments to imd_token_mint */
};

/* Largest issue time a v2 token can carry (IAT, Unix milliseconds): at most
 * 15 digits. */
#define IMD_TOKEN_IAT_MAX INT64_C(999999999999999)

/* What a genuine token says besides its signature. */
typedef struct imd_token_claims {
  int version;        /* 1 or 2 (0: not genuine) */
  int64_t issued_ms;  /* v2: issue time, Unix ms; v1: 0 (unknown) */
  int64_t expiry;     /* EXP, Unix seconds */
} imd_token_claims;

/* Mints a (v1) token for uid, valid until expiry_unix (exclusive).
 *
 * secret: secret_len >= IMD_SECRET_MIN bytes.
 * uid: non-empty, no '\n'.
 * device: NULL or "" for a token valid on any device of uid; otherwise the
 *   device id the token is bound to, which must contain no '\n' and must not
 *   be "*" (that would sign the same message as an any-device token).
 * expiry_unix: 1 .. IMD_TOKEN_EXP_MAX.
 * out, cap: receives the NUL-terminated token; IMD_TOKEN_MAX always suffices.
 *
 * Returns:
 *   > 0               the token's length, excluding the NUL.
 *   IMD_TOKEN_EINVAL  an argument breaks the rules above, cap is too small,
 *                     or mbedTLS failed; out is "" when cap > 0.
 */
int imd_token_mint(const uint8_t *secret, size_t secret_len, const char *uid,
                   const char *device, int64_t expiry_unix, char *out,
                   size_t cap);

/* Mints a v2 token: as imd_token_mint, plus issued_ms (1 ..
 * IMD_TOKEN_IAT_MAX, Unix milliseconds), the time imd compares with a
 * revocation of the uid. Same return values (tokens are at most 76
 * characters). */
int imd_token_mint_v2(const uint8_t *secret, size_t secret_len,
                      const char *uid, const char *device, int64_t issued_ms,
                      int64_t expiry_unix, char *out, size_t cap);

/* As imd_token_verify (same return values, v1 and v2 tokens alike), and for
 * a genuine token (OK or EXPIRED) fills *claims (may be NULL) with its
 * version, issue time and expiry; otherwise *claims is zeroed. */
int imd_token_check(const uint8_t *secret, size_t secret_len, const char *uid,
                    const char *device, const char *token, int64_t now_unix,
                    imd_token_claims *claims);

/* Verifies token (v1 or v2) for uid connecting as device at time now_unix.
 *
 * device: the device id the client authenticated with; NULL is taken as "".
 *   A device-bound token needs it non-empty and equal to the one it was
 *   minted for; an any-device token accepts every device.
 *
 * The signature is checked, in constant time, before the expiry, so a forged
 * token is INVALID whatever its EXP and reveals nothing about the clock.
 *
 * Returns:
 *   IMD_TOKEN_OK       genuine, for this uid and device, and EXP > now_unix.
 *   IMD_TOKEN_INVALID  anything else except expiry: a deviation from the
 *                      format, a wrong signature, uid or device, a uid or
 *                      device that is empty/contains '\n' where not allowed,
 *                      a secret shorter than IMD_SECRET_MIN, a NULL argument,
 *                      or an mbedTLS failure (fails closed).
 *   IMD_TOKEN_EXPIRED  genuine, but EXP <= now_unix.
 */
int imd_token_verify(const uint8_t *secret, size_t secret_len, const char *uid,
                     const char *device, const char *token, int64_t now_unix);

/* Generates a new secret: 32 bytes from getrandom(2) written as 64 lowercase
 * hex characters and a NUL. The HMAC key is then these 64 ASCII characters
 * (see imd_secret_parse), not the 32 bytes they encode.
 *
 * Returns:
 *   IMD_SECRET_HEX_LEN  on success.
 *   -1                  out_hex is NULL, cap < IMD_SECRET_HEX_LEN + 1, or
 *                       getrandom failed (errno set); out_hex is "" when
 *                       cap > 0.
 */
int imd_secret_generate(char *out_hex, size_t cap);

/* Turns a secret as given on the command line (or read from the data dir)
 * into key bytes: the key is the string's own bytes, unmodified; no hex
 * decoding and no whitespace trimming.
 *
 * Returns:
 *   the key length (strlen(text)) after copying it to out.
 *   -1  text or out is NULL, text is shorter than IMD_SECRET_MIN bytes, or
 *       longer than cap (or than INT_MAX).
 */
int imd_secret_parse(const char *text, uint8_t *out, size_t cap);

#endif
