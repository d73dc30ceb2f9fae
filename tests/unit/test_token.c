#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <string.h>

#include <mbedtls/md.h>

#include "token.h"

#define SECRET "0123456789abcdef0123456789abcdef"
#define EXP 2000000000
#define NOW 1700000000

/* Computed independently with Python's hmac/hashlib/base64 (and checked
 * against `openssl dgst -mac HMAC`), not with the code under test. */
#define KAT_DEVICE "1.2000000000.d.nWYijPbBCXOLeBCsFGQCqqdNNEFKndCwCp59-NNkUFg"
#define KAT_ANY "1.2000000000.*.ypyOwxedXv7M0367gMfu7LID_QU_6tqq0c21ZYHMnII"

static const uint8_t *secret = (const uint8_t *)SECRET;
static const size_t secret_len = sizeof SECRET - 1;

static void mint_ok(const char *uid, const char *device, int64_t exp,
                    char out[IMD_TOKEN_MAX])
{
  int n = imd_token_mint(secret, secret_len, uid, device, exp, out,
                         IMD_TOKEN_MAX);
  assert_true(n > 0);
  assert_int_equal((size_t)n, strlen(out));
}

static int verify(const char *uid, const char *device, const char *token,
                  int64_t now)
{
  return imd_token_verify(secret, secret_len, uid, device, token, now);
}

/* Signs arbitrary EXP text with mbedTLS directly, so that malformed tokens
 * carry a correct signature and only the parser can reject them. */
static void forge_with(const uint8_t *key, size_t key_len, const char *version,
                       const char *exp, const char *scope, const char *uid,
                       const char *dev, char out[256])
{
  static const char alphabet[] =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
  char msg[256];
  unsigned char mac[32];
  char sig[44];
  int len = snprintf(msg, sizeof msg, "imd-token-v1\n%s\n%s\n%s", uid, dev,
                     exp);
  assert_true(len > 0 && (size_t)len < sizeof msg);
  assert_int_equal(mbedtls_md_hmac(mbedtls_md_info_from_type(MBEDTLS_MD_SHA256),
                                   key, key_len,
                                   (const unsigned char *)msg, (size_t)len,
                                   mac),
                   0);
  /* base64url of 32 bytes: 10 full groups, then 2 bytes into 3 characters */
  size_t o = 0;
  for (size_t i = 0; i < 30; i += 3) {
    uint32_t v = (uint32_t)mac[i] << 16 | (uint32_t)mac[i + 1] << 8 | mac[i + 2];
    sig[o++] = alphabet[v >> 18 & 63];
    sig[o++] = alphabet[v >> 12 & 63];
    sig[o++] = alphabet[v >> 6 & 63];
    sig[o++] = alphabet[v & 63];
  }
  uint32_t v = (uint32_t)mac[30] << 16 | (uint32_t)mac[31] << 8;
  sig[o++] = alphabet[v >> 18 & 63];
  sig[o++] = alphabet[v >> 12 & 63];
  sig[o++] = alphabet[v >> 6 & 63];
  sig[o] = '\0';
  assert_int_equal(o, 43);
  len = snprintf(out, 256, "%s.%s.%s.%s", version, exp, scope, sig);
  assert_true(len > 0 && len < 256);
}

static void forge(const char *version, const char *exp, const char *scope,
                  const char *uid, const char *dev, char out[256])
{
  forge_with(secret, secret_len, version, exp, scope, uid, dev, out);
}

/* v2: the issue time is part of the token and of the signed message
 * (Python hmac and openssl dgst -mac HMAC agree on these). */
#define KAT_V2_DEVICE \
  "2.1999999000123.2000000000.d.s6n26BExNkvFIQO1IRQpJgEQ7NdI1TcXBR0dvgxewQ8"
#define KAT_V2_ANY \
  "2.1999999000123.2000000000.*.iJ8qp8_gbkfPdYgNLSVrRwCuYS6ozAwA1tU5BkFVP9c"

static void test_v2_known_answer_and_claims(void **state)
{
  (void)state;
  char tok[IMD_TOKEN_MAX];
  imd_token_claims cl;
  assert_int_equal(imd_token_mint_v2(secret, secret_len, "alice", "d1",
                                     INT64_C(1999999000123), EXP, tok,
                                     sizeof tok),
                   (int)strlen(KAT_V2_DEVICE));
  assert_string_equal(tok, KAT_V2_DEVICE);
  assert_int_equal(imd_token_mint_v2(secret, secret_len, "alice", NULL,
                                     INT64_C(1999999000123), EXP, tok,
                                     sizeof tok),
                   (int)strlen(KAT_V2_ANY));
  assert_string_equal(tok, KAT_V2_ANY);
  assert_int_equal(imd_token_check(secret, secret_len, "alice", "d1",
                                   KAT_V2_DEVICE, NOW, &cl),
                   IMD_TOKEN_OK);
  assert_int_equal(cl.version, 2);
  assert_true(cl.issued_ms == INT64_C(1999999000123));
  assert_true(cl.expiry == EXP);
  assert_int_equal(verify("alice", "phone", KAT_V2_ANY, NOW), IMD_TOKEN_OK);
  assert_int_equal(verify("alice", "d1", KAT_V2_DEVICE, EXP), IMD_TOKEN_EXPIRED);
  /* v1 tokens still verify; they report no issue time */
  assert_int_equal(imd_token_check(secret, secret_len, "alice", "d1",
                                   KAT_DEVICE, NOW, &cl),
                   IMD_TOKEN_OK);
  assert_int_equal(cl.version, 1);
  assert_true(cl.issued_ms == 0 && cl.expiry == EXP);
  /* the issue time is signed: changing it breaks the token, and a v2
   * signature does not pass as v1 (other domain) */
  assert_int_equal(verify("alice", "d1",
      "2.1999999000124.2000000000.d.s6n26BExNkvFIQO1IRQpJgEQ7NdI1TcXBR0dvgxewQ8",
      NOW), IMD_TOKEN_INVALID);
  assert_int_equal(verify("alice", "d1",
      "1.2000000000.d.s6n26BExNkvFIQO1IRQpJgEQ7NdI1TcXBR0dvgxewQ8", NOW),
      IMD_TOKEN_INVALID);
  /* strict IAT syntax: no leading zero, at most 15 digits, not absent */
  assert_int_equal(verify("alice", "d1",
      "2.01999999000123.2000000000.d.s6n26BExNkvFIQO1IRQpJgEQ7NdI1TcXBR0dvgxewQ8",
      NOW), IMD_TOKEN_INVALID);
  assert_int_equal(verify("alice", "d1",
      "2.1234567890123456.2000000000.d.s6n26BExNkvFIQO1IRQpJgEQ7NdI1TcXBR0dvgxewQ8",
      NOW), IMD_TOKEN_INVALID);
  assert_int_equal(verify("alice", "d1",
      "2.2000000000.d.s6n26BExNkvFIQO1IRQpJgEQ7NdI1TcXBR0dvgxewQ8", NOW),
      IMD_TOKEN_INVALID);
  /* a forged token fills no claims */
  assert_int_equal(imd_token_check(secret, secret_len, "bob", "d1",
                                   KAT_V2_DEVICE, NOW, &cl),
                   IMD_TOKEN_INVALID);
  assert_int_equal(cl.version, 0);
  assert_int_equal(imd_token_mint_v2(secret, secret_len, "alice", "d1", 0, EXP,
                                     tok, sizeof tok),
                   IMD_TOKEN_EINVAL);
  assert_int_equal(imd_token_mint_v2(secret, secret_len, "alice", "d1",
                                     IMD_TOKEN_IAT_MAX + 1, EXP, tok,
                                     sizeof tok),
                   IMD_TOKEN_EINVAL);
}

static void test_known_answer(void **state)
{
  (void)state;
  char tok[IMD_TOKEN_MAX];

  mint_ok("alice", "d1", EXP, tok);
  assert_string_equal(tok, KAT_DEVICE);
  assert_int_equal(verify("alice", "d1", KAT_DEVICE, NOW), IMD_TOKEN_OK);

  mint_ok("alice", NULL, EXP, tok);
  assert_string_equal(tok, KAT_ANY);
  mint_ok("alice", "", EXP, tok);
  assert_string_equal(tok, KAT_ANY);
  assert_int_equal(verify("alice", "d1", KAT_ANY, NOW), IMD_TOKEN_OK);
}

static void test_forge_helper_matches(void **state)
{
  (void)state;
  char tok[256];

  forge("1", "2000000000", "d", "alice", "d1", tok);
  assert_string_equal(tok, KAT_DEVICE);
  forge("1", "2000000000", "*", "alice", "*", tok);
  assert_string_equal(tok, KAT_ANY);
}

static void test_roundtrip_device(void **state)
{
  (void)state;
  char tok[IMD_TOKEN_MAX];

  mint_ok("bob", "phone-1", NOW + 60, tok);
  assert_int_equal(verify("bob", "phone-1", tok, NOW), IMD_TOKEN_OK);
  assert_int_equal(verify("bob", "phone-1", tok, NOW + 59), IMD_TOKEN_OK);
  assert_true(strlen(tok) < IMD_TOKEN_MAX);
}

static void test_roundtrip_any(void **state)
{
  (void)state;
  char tok[IMD_TOKEN_MAX];

  mint_ok("bob", NULL, NOW + 60, tok);
  assert_int_equal(verify("bob", "phone-1", tok, NOW), IMD_TOKEN_OK);
  assert_int_equal(verify("bob", "tablet", tok, NOW), IMD_TOKEN_OK);
  assert_int_equal(verify("bob", "", tok, NOW), IMD_TOKEN_OK);
  assert_int_equal(verify("bob", NULL, tok, NOW), IMD_TOKEN_OK);
  assert_int_equal(verify("bob", "*", tok, NOW), IMD_TOKEN_OK);
}

static void test_longest_token_fits(void **state)
{
  (void)state;
  char tok[IMD_TOKEN_MAX];

  mint_ok("u", "d", IMD_TOKEN_EXP_MAX, tok);
  assert_int_equal(strlen(tok), 60);
  assert_int_equal(verify("u", "d", tok, NOW), IMD_TOKEN_OK);
  mint_ok("u", "d", 1, tok);
  assert_memory_equal(tok, "1.1.d.", 6);
  assert_int_equal(strlen(tok), 49);
}

static void test_wrong_uid_device_secret(void **state)
{
  (void)state;
  static const char other[] = "0123456789abcdef0123456789abcdeF";

  assert_int_equal(verify("alicf", "d1", KAT_DEVICE, NOW), IMD_TOKEN_INVALID);
  assert_int_equal(verify("alice ", "d1", KAT_DEVICE, NOW), IMD_TOKEN_INVALID);
  assert_int_equal(verify("Alice", "d1", KAT_DEVICE, NOW), IMD_TOKEN_INVALID);
  assert_int_equal(verify("alice", "d2", KAT_DEVICE, NOW), IMD_TOKEN_INVALID);
  assert_int_equal(verify("alice", "d", KAT_DEVICE, NOW), IMD_TOKEN_INVALID);
  assert_int_equal(verify("alice", "d1 ", KAT_DEVICE, NOW), IMD_TOKEN_INVALID);
  assert_int_equal(verify("bob", "*", KAT_ANY, NOW), IMD_TOKEN_INVALID);
  assert_int_equal(imd_token_verify((const uint8_t *)other, sizeof other - 1,
                                    "alice", "d1", KAT_DEVICE, NOW),
                   IMD_TOKEN_INVALID);
  /* a prefix of the right secret is a different key */
  assert_int_equal(imd_token_verify(secret, secret_len - 1, "alice", "d1",
                                    KAT_DEVICE, NOW),
                   IMD_TOKEN_INVALID);
}

/* Secrets of every size class (the HMAC block is 64 bytes; a thread keeps
 * the keyed state of secrets up to 256 bytes), checked against mbedTLS's
 * own HMAC, alternating with the test secret: each verification uses the
 * secret it is given, whichever one came before. */
static void test_secret_sizes_and_changes(void **state)
{
  (void)state;
  static const size_t lens[] = {16, 32, 63, 64, 65, 256, 257, 300}; /* 32: as SECRET */
  uint8_t key[300];
  for (size_t i = 0; i < sizeof key; i++)
    key[i] = (uint8_t)('a' + i % 26);
  for (size_t k = 0; k < sizeof lens / sizeof lens[0]; k++) {
    char tok[256];
    forge_with(key, lens[k], "1", "2000000000", "d", "alice", "d1", tok);
    for (int round = 0; round < 2; round++) {
      assert_int_equal(imd_token_verify(key, lens[k], "alice", "d1", tok, NOW), IMD_TOKEN_OK);
      assert_int_equal(verify("alice", "d1", tok, NOW), IMD_TOKEN_INVALID);
      assert_int_equal(verify("alice", "d1", KAT_DEVICE, NOW), IMD_TOKEN_OK);
      assert_int_equal(imd_token_verify(key, lens[k], "alice", "d1", KAT_DEVICE, NOW),
                       IMD_TOKEN_INVALID);
    }
    /* one byte more or less of the same bytes is another key */
    assert_int_equal(imd_token_verify(key, lens[k] - 1, "alice", "d1", tok, NOW),
                     IMD_TOKEN_INVALID);
    if (lens[k] < sizeof key)
      assert_int_equal(imd_token_verify(key, lens[k] + 1, "alice", "d1", tok, NOW),
                       IMD_TOKEN_INVALID);
    /* what imd mints with that secret is what mbedTLS signs */
    char minted[IMD_TOKEN_MAX];
    assert_true(imd_token_mint(key, lens[k], "alice", "d1", 2000000000, minted,
                               sizeof minted) > 0);
    assert_string_equal(minted, tok);
  }
}

static void test_empty_device_against_bound(void **state)
{
  (void)state;

  assert_int_equal(verify("alice", "", KAT_DEVICE, NOW), IMD_TOKEN_INVALID);
  assert_int_equal(verify("alice", NULL, KAT_DEVICE, NOW), IMD_TOKEN_INVALID);
}

/* Flipping the scope character must not turn one kind into the other. */
static void test_scope_swap(void **state)
{
  (void)state;
  char tok[IMD_TOKEN_MAX];

  strcpy(tok, KAT_ANY);
  tok[13] = 'd';
  assert_int_equal(verify("alice", "*", tok, NOW), IMD_TOKEN_INVALID);
  assert_int_equal(verify("alice", "d1", tok, NOW), IMD_TOKEN_INVALID);

  strcpy(tok, KAT_DEVICE);
  tok[13] = '*';
  assert_int_equal(verify("alice", "d1", tok, NOW), IMD_TOKEN_INVALID);
  assert_int_equal(verify("alice", "d2", tok, NOW), IMD_TOKEN_INVALID);
}

static void test_tampered_exp(void **state)
{
  (void)state;
  static const char *const bad[] = {
    "1.2000000001.d.nWYijPbBCXOLeBCsFGQCqqdNNEFKndCwCp59-NNkUFg",
    "1.3000000000.d.nWYijPbBCXOLeBCsFGQCqqdNNEFKndCwCp59-NNkUFg",
    "1.20000000000.d.nWYijPbBCXOLeBCsFGQCqqdNNEFKndCwCp59-NNkUFg",
    "1.200000000.d.nWYijPbBCXOLeBCsFGQCqqdNNEFKndCwCp59-NNkUFg",
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
    assert_int_equal(verify("alice", "d1", bad[i], NOW), IMD_TOKEN_INVALID);
}

/* Every bit of every character, flipped, makes the token invalid. */
static void test_every_position_flipped(void **state)
{
  (void)state;
  char tok[IMD_TOKEN_MAX];
  size_t len = strlen(KAT_DEVICE);

  for (size_t i = 0; i < len; i++) {
    for (int bit = 0; bit < 8; bit++) {
      strcpy(tok, KAT_DEVICE);
      tok[i] = (char)(tok[i] ^ (1 << bit));
      assert_int_equal(verify("alice", "d1", tok, NOW), IMD_TOKEN_INVALID);
      /* an any-device check of the same bytes must not pass either */
      assert_int_not_equal(verify("alice", "*", tok, NOW), IMD_TOKEN_OK);
    }
  }
}

/* Replacing any SIG character by each other base64url character. */
static void test_sig_substitutions(void **state)
{
  (void)state;
  static const char alphabet[] =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
  char tok[IMD_TOKEN_MAX];
  size_t sig_at = strlen(KAT_DEVICE) - 43;

  for (size_t i = sig_at; i < strlen(KAT_DEVICE); i++) {
    for (size_t a = 0; a < sizeof alphabet - 1; a++) {
      if (KAT_DEVICE[i] == alphabet[a])
        continue;
      strcpy(tok, KAT_DEVICE);
      tok[i] = alphabet[a];
      assert_int_equal(verify("alice", "d1", tok, NOW), IMD_TOKEN_INVALID);
    }
  }
}

/* The last character of 43 carries 4 bits; others with the same 4 leading
 * bits decode to the same bytes but are not the canonical encoding. */
static void test_noncanonical_last_char(void **state)
{
  (void)state;
  char tok[IMD_TOKEN_MAX];
  size_t last = strlen(KAT_DEVICE) - 1;

  assert_int_equal(KAT_DEVICE[last], 'g'); /* index 32 = 0b100000 */
  for (char c = 'h'; c <= 'j'; c++) {      /* 33..35: same high 4 bits */
    strcpy(tok, KAT_DEVICE);
    tok[last] = c;
    assert_int_equal(verify("alice", "d1", tok, NOW), IMD_TOKEN_INVALID);
  }
}

static void test_truncated(void **state)
{
  (void)state;
  char tok[IMD_TOKEN_MAX];
  size_t len = strlen(KAT_DEVICE);

  for (size_t n = 0; n < len; n++) {
    memcpy(tok, KAT_DEVICE, n);
    tok[n] = '\0';
    assert_int_equal(verify("alice", "d1", tok, NOW), IMD_TOKEN_INVALID);
  }
}

static void test_extra_characters(void **state)
{
  (void)state;
  static const char *const suffix[] = {
    "A", "=", "==", ".", " ", "\n", "\r\n", "\t", ".x", "g",
  };
  static const char *const prefix[] = { " ", "\n", ".", "01." };
  char tok[IMD_TOKEN_MAX];

  for (size_t i = 0; i < sizeof suffix / sizeof suffix[0]; i++) {
    snprintf(tok, sizeof tok, "%s%s", KAT_DEVICE, suffix[i]);
    assert_int_equal(verify("alice", "d1", tok, NOW), IMD_TOKEN_INVALID);
  }
  for (size_t i = 0; i < sizeof prefix / sizeof prefix[0]; i++) {
    snprintf(tok, sizeof tok, "%s%s", prefix[i], KAT_DEVICE);
    assert_int_equal(verify("alice", "d1", tok, NOW), IMD_TOKEN_INVALID);
  }
  /* separators doubled */
  assert_int_equal(
      verify("alice", "d1",
             "1..2000000000.d.nWYijPbBCXOLeBCsFGQCqqdNNEFKndCwCp59-NNkUFg", NOW),
      IMD_TOKEN_INVALID);
  assert_int_equal(
      verify("alice", "d1",
             "1.2000000000.d..nWYijPbBCXOLeBCsFGQCqqdNNEFKndCwCp59-NNkUFg", NOW),
      IMD_TOKEN_INVALID);
}

static void test_bad_base64url(void **state)
{
  (void)state;
  char tok[IMD_TOKEN_MAX];
  size_t dash = (size_t)(strchr(KAT_DEVICE, '-') - KAT_DEVICE);
  static const char bad[] = { '+', '/', '=', '!', '.', ' ', '*', '\x80', '~' };

  assert_true(dash > strlen(KAT_DEVICE) - 43);
  for (size_t i = 0; i < sizeof bad; i++) {
    strcpy(tok, KAT_DEVICE);
    tok[dash] = bad[i];
    assert_int_equal(verify("alice", "d1", tok, NOW), IMD_TOKEN_INVALID);
  }
  /* standard base64 of the same bytes */
  strcpy(tok, KAT_DEVICE);
  tok[dash] = '+';
  strcat(tok, "=");
  assert_int_equal(verify("alice", "d1", tok, NOW), IMD_TOKEN_INVALID);
}

/* Correctly signed but malformed: only strict parsing rejects these. */
static void test_malformed_but_signed(void **state)
{
  (void)state;
  char tok[256];

  forge("1", "02000000000", "d", "alice", "d1", tok); /* leading zero */
  assert_int_equal(verify("alice", "d1", tok, NOW), IMD_TOKEN_INVALID);
  forge("1", "0", "d", "alice", "d1", tok);
  assert_int_equal(verify("alice", "d1", tok, NOW), IMD_TOKEN_INVALID);
  forge("1", "+2000000000", "d", "alice", "d1", tok); /* sign */
  assert_int_equal(verify("alice", "d1", tok, NOW), IMD_TOKEN_INVALID);
  forge("1", "-5", "d", "alice", "d1", tok);
  assert_int_equal(verify("alice", "d1", tok, -10), IMD_TOKEN_INVALID);
  forge("1", "1000000000000", "d", "alice", "d1", tok); /* 13 digits */
  assert_int_equal(verify("alice", "d1", tok, NOW), IMD_TOKEN_INVALID);
  forge("1", " 2000000000", "d", "alice", "d1", tok);
  assert_int_equal(verify("alice", "d1", tok, NOW), IMD_TOKEN_INVALID);
  forge("1", "2e9", "d", "alice", "d1", tok);
  assert_int_equal(verify("alice", "d1", tok, NOW), IMD_TOKEN_INVALID);
  forge("1", "", "d", "alice", "d1", tok);
  assert_int_equal(verify("alice", "d1", tok, NOW), IMD_TOKEN_INVALID);

  forge("1", "999999999999", "d", "alice", "d1", tok); /* 12 digits: fine */
  assert_int_equal(verify("alice", "d1", tok, NOW), IMD_TOKEN_OK);

  /* scope other than "d" or "*" */
  forge("1", "2000000000", "D", "alice", "d1", tok);
  assert_int_equal(verify("alice", "d1", tok, NOW), IMD_TOKEN_INVALID);
  forge("1", "2000000000", "", "alice", "d1", tok);
  assert_int_equal(verify("alice", "d1", tok, NOW), IMD_TOKEN_INVALID);
  forge("1", "2000000000", "**", "alice", "*", tok);
  assert_int_equal(verify("alice", "d1", tok, NOW), IMD_TOKEN_INVALID);
}

static void test_wrong_version(void **state)
{
  (void)state;
  static const char *const versions[] = { "2", "0", "", "01", "11", "v1", "1 " };
  char tok[256];

  for (size_t i = 0; i < sizeof versions / sizeof versions[0]; i++) {
    forge(versions[i], "2000000000", "d", "alice", "d1", tok);
    assert_int_equal(verify("alice", "d1", tok, NOW), IMD_TOKEN_INVALID);
  }
}

static void test_expired(void **state)
{
  (void)state;

  assert_int_equal(verify("alice", "d1", KAT_DEVICE, EXP - 1), IMD_TOKEN_OK);
  assert_int_equal(verify("alice", "d1", KAT_DEVICE, EXP), IMD_TOKEN_EXPIRED);
  assert_int_equal(verify("alice", "d1", KAT_DEVICE, EXP + 1),
                   IMD_TOKEN_EXPIRED);
  assert_int_equal(verify("alice", "x", KAT_ANY, INT64_MAX), IMD_TOKEN_EXPIRED);
}

/* The signature is checked first: a forgery never reports EXPIRED. */
static void test_expired_forgery_is_invalid(void **state)
{
  (void)state;
  char tok[IMD_TOKEN_MAX];

  strcpy(tok, KAT_DEVICE);
  tok[strlen(tok) - 5] ^= 1;
  assert_int_equal(verify("alice", "d1", tok, EXP + 1), IMD_TOKEN_INVALID);
  assert_int_equal(verify("alice", "d2", KAT_DEVICE, EXP + 1),
                   IMD_TOKEN_INVALID);
  assert_int_equal(verify("mallory", "d1", KAT_DEVICE, EXP + 1),
                   IMD_TOKEN_INVALID);
  assert_int_equal(imd_token_verify((const uint8_t *)"another secret key", 18,
                                    "alice", "d1", KAT_DEVICE, EXP + 1),
                   IMD_TOKEN_INVALID);
}

static void test_verify_bad_arguments(void **state)
{
  (void)state;

  assert_int_equal(verify("", "d1", KAT_DEVICE, NOW), IMD_TOKEN_INVALID);
  assert_int_equal(verify(NULL, "d1", KAT_DEVICE, NOW), IMD_TOKEN_INVALID);
  assert_int_equal(verify("alice", "d1", NULL, NOW), IMD_TOKEN_INVALID);
  assert_int_equal(verify("alice\n", "d1", KAT_DEVICE, NOW), IMD_TOKEN_INVALID);
  assert_int_equal(verify("alice", "d1\n", KAT_DEVICE, NOW), IMD_TOKEN_INVALID);
  assert_int_equal(verify("alice", "\n", KAT_ANY, NOW), IMD_TOKEN_INVALID);
  assert_int_equal(imd_token_verify(NULL, 0, "alice", "d1", KAT_DEVICE, NOW),
                   IMD_TOKEN_INVALID);
  assert_int_equal(imd_token_verify(secret, IMD_SECRET_MIN - 1, "alice", "d1",
                                    KAT_DEVICE, NOW),
                   IMD_TOKEN_INVALID);
}

/* uid "a\nb" with device "c" would sign the same bytes as uid "a" with
 * device "b\nc"; neither side accepts a newline, nor a device of "*". */
static void test_mint_bad_arguments(void **state)
{
  (void)state;
  char tok[IMD_TOKEN_MAX];

  assert_int_equal(imd_token_mint(secret, secret_len, "a\nb", "c", EXP, tok,
                                  sizeof tok),
                   IMD_TOKEN_EINVAL);
  assert_string_equal(tok, "");
  assert_int_equal(imd_token_mint(secret, secret_len, "alice\n", NULL, EXP,
                                  tok, sizeof tok),
                   IMD_TOKEN_EINVAL);
  assert_int_equal(imd_token_mint(secret, secret_len, "", "d1", EXP, tok,
                                  sizeof tok),
                   IMD_TOKEN_EINVAL);
  assert_int_equal(imd_token_mint(secret, secret_len, NULL, "d1", EXP, tok,
                                  sizeof tok),
                   IMD_TOKEN_EINVAL);
  assert_int_equal(imd_token_mint(secret, secret_len, "a", "b\nc", EXP, tok,
                                  sizeof tok),
                   IMD_TOKEN_EINVAL);
  assert_int_equal(imd_token_mint(secret, secret_len, "alice", "*", EXP, tok,
                                  sizeof tok),
                   IMD_TOKEN_EINVAL);
  assert_int_equal(imd_token_mint(secret, secret_len, "alice", "d1", 0, tok,
                                  sizeof tok),
                   IMD_TOKEN_EINVAL);
  assert_int_equal(imd_token_mint(secret, secret_len, "alice", "d1", -1, tok,
                                  sizeof tok),
                   IMD_TOKEN_EINVAL);
  assert_int_equal(imd_token_mint(secret, secret_len, "alice", "d1",
                                  IMD_TOKEN_EXP_MAX + 1, tok, sizeof tok),
                   IMD_TOKEN_EINVAL);
  assert_int_equal(imd_token_mint(NULL, 0, "alice", "d1", EXP, tok,
                                  sizeof tok),
                   IMD_TOKEN_EINVAL);
  assert_int_equal(imd_token_mint(secret, IMD_SECRET_MIN - 1, "alice", "d1",
                                  EXP, tok, sizeof tok),
                   IMD_TOKEN_EINVAL);
  assert_int_equal(imd_token_mint(secret, secret_len, "alice", "d1", EXP, NULL,
                                  0),
                   IMD_TOKEN_EINVAL);
}

static void test_mint_capacity(void **state)
{
  (void)state;
  char tok[IMD_TOKEN_MAX];
  size_t len = strlen(KAT_DEVICE);

  memset(tok, 'x', sizeof tok);
  assert_int_equal(imd_token_mint(secret, secret_len, "alice", "d1", EXP, tok,
                                  len),
                   IMD_TOKEN_EINVAL);
  assert_int_equal(tok[0], '\0');
  assert_int_equal(tok[1], 'x'); /* nothing partial written */
  assert_int_equal(imd_token_mint(secret, secret_len, "alice", "d1", EXP, tok,
                                  0),
                   IMD_TOKEN_EINVAL);
  assert_int_equal(imd_token_mint(secret, secret_len, "alice", "d1", EXP, tok,
                                  len + 1),
                   (int)len);
  assert_string_equal(tok, KAT_DEVICE);
}

static int is_lower_hex(const char *s, size_t n)
{
  for (size_t i = 0; i < n; i++)
    if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
      return 0;
  return 1;
}

static void test_secret_generate(void **state)
{
  (void)state;
  char a[IMD_SECRET_HEX_LEN + 1], b[IMD_SECRET_HEX_LEN + 1];
  uint8_t key[IMD_SECRET_HEX_LEN];
  char tok[IMD_TOKEN_MAX];

  assert_int_equal(imd_secret_generate(a, sizeof a), 64);
  assert_int_equal(strlen(a), 64);
  assert_true(is_lower_hex(a, 64));
  assert_int_equal(imd_secret_generate(b, sizeof b), 64);
  assert_true(is_lower_hex(b, 64));
  assert_string_not_equal(a, b);

  assert_int_equal(imd_secret_generate(b, 64), -1);
  assert_string_equal(b, "");
  assert_int_equal(imd_secret_generate(NULL, 65), -1);

  /* a generated secret is usable as a key: its 64 characters */
  assert_int_equal(imd_secret_parse(a, key, sizeof key), 64);
  assert_memory_equal(key, a, 64);
  assert_true(imd_token_mint(key, 64, "u", "d", EXP, tok, sizeof tok) > 0);
  assert_int_equal(imd_token_verify(key, 64, "u", "d", tok, NOW),
                   IMD_TOKEN_OK);
}

static void test_secret_parse(void **state)
{
  (void)state;
  uint8_t key[64];

  assert_int_equal(imd_secret_parse(SECRET, key, sizeof key), 32);
  assert_memory_equal(key, SECRET, 32);
  assert_int_equal(imd_secret_parse("0123456789abcdef", key, sizeof key), 16);
  assert_int_equal(imd_secret_parse("0123456789abcde", key, sizeof key), -1);
  assert_int_equal(imd_secret_parse("", key, sizeof key), -1);
  assert_int_equal(imd_secret_parse(NULL, key, sizeof key), -1);
  assert_int_equal(imd_secret_parse(SECRET, NULL, 64), -1);
  assert_int_equal(imd_secret_parse(SECRET, key, 31), -1);
  assert_int_equal(imd_secret_parse(SECRET, key, 32), 32);
  /* UTF-8 counts in bytes: 8 two-byte characters */
  assert_int_equal(imd_secret_parse("\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9"
                                    "\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9",
                                    key, sizeof key),
                   16);
}

int main(void)
{
  const struct CMUnitTest tests[] = {
    cmocka_unit_test(test_known_answer),
    cmocka_unit_test(test_v2_known_answer_and_claims),
    cmocka_unit_test(test_forge_helper_matches),
    cmocka_unit_test(test_roundtrip_device),
    cmocka_unit_test(test_roundtrip_any),
    cmocka_unit_test(test_longest_token_fits),
    cmocka_unit_test(test_wrong_uid_device_secret),
    cmocka_unit_test(test_secret_sizes_and_changes),
    cmocka_unit_test(test_empty_device_against_bound),
    cmocka_unit_test(test_scope_swap),
    cmocka_unit_test(test_tampered_exp),
    cmocka_unit_test(test_every_position_flipped),
    cmocka_unit_test(test_sig_substitutions),
    cmocka_unit_test(test_noncanonical_last_char),
    cmocka_unit_test(test_truncated),
    cmocka_unit_test(test_extra_characters),
    cmocka_unit_test(test_bad_base64url),
    cmocka_unit_test(test_malformed_but_signed),
    cmocka_unit_test(test_wrong_version),
    cmocka_unit_test(test_expired),
    cmocka_unit_test(test_expired_forgery_is_invalid),
    cmocka_unit_test(test_verify_bad_arguments),
    cmocka_unit_test(test_mint_bad_arguments),
    cmocka_unit_test(test_mint_capacity),
    cmocka_unit_test(test_secret_generate),
    cmocka_unit_test(test_secret_parse),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
