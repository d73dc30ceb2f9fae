#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/strmap.h"

/* A value owning its key, as the map's users embed strmap_node. */
typedef struct item {
  strmap_node node;
  char key[32];
  int value;
} item;

#define ITEM_OF(np) ((item *)((char *)(np) - offsetof(item, node)))

static void item_set(item *it, const char *key, size_t len, int value)
{
  memset(it, 0, sizeof *it);
  memcpy(it->key, key, len);
  it->node.key = it->key;
  it->node.klen = (uint32_t)len;
  it->value = value;
}

static void item_set_str(item *it, const char *key, int value)
{
  item_set(it, key, strlen(key), value);
}

static strmap_node *get_str(const strmap *m, const char *key)
{
  return strmap_get(m, key, strlen(key));
}

/* Every node sits in the bucket its hash selects, and the chains hold count nodes. */
static void check_structure(const strmap *m)
{
  size_t total = 0;

  for (uint32_t b = 0; b <= m->mask; b++) {
    for (const strmap_node *n = m->buckets[b]; n != NULL; n = n->next) {
      assert_int_equal(n->hash & m->mask, b);
      assert_int_equal(n->hash, strmap_hash(n->key, n->klen));
      total++;
    }
  }
  assert_int_equal(total, m->count);
}

static void test_init_rounds_up(void **state)
{
  strmap m;
  (void)state;

  assert_int_equal(strmap_init(&m, 100), 0);
  assert_int_equal(m.mask, 127);
  assert_int_equal(m.count, 0);
  for (uint32_t b = 0; b <= m.mask; b++)
    assert_null(m.buckets[b]);
  strmap_free(&m);
  assert_null(m.buckets);
  assert_int_equal(strmap_init(&m, 0), 0);
  assert_int_equal(m.mask, 0);
  strmap_free(&m);
}

static void test_hash_properties(void **state)
{
  const char zeros[16] = {0};
  uint32_t seen[17];
  (void)state;

  assert_int_equal(strmap_hash("alice", 5), strmap_hash("alice", 5));
  assert_int_not_equal(strmap_hash("alice", 5), strmap_hash("alicf", 5));
  assert_int_not_equal(strmap_hash("alice", 5), strmap_hash("alice", 4));
  /* Runs of zero bytes differ only by length; each must hash differently. */
  for (size_t len = 0; len <= 16; len++) {
    seen[len] = strmap_hash(zeros, len);
    for (size_t j = 0; j < len; j++)
      assert_int_not_equal(seen[j], seen[len]);
  }
  /* Only the bytes inside the length count. */
  assert_int_equal(strmap_hash("abcdefghijk", 9), strmap_hash("abcdefghiXY", 9));
}

static void test_hash_distribution(void **state)
{
  enum { KEYS = 100000, BUCKETS = 1024 };
  unsigned *counts = calloc(BUCKETS, sizeof *counts);
  unsigned *low = calloc(BUCKETS, sizeof *low);
  char key[32];
  double chi = 0, chi_low = 0, expect = (double)KEYS / BUCKETS;
  (void)state;

  assert_non_null(counts);
  assert_non_null(low);
  /* Sequential ids, as uids often are: both the low bits (bucket choice) and
   * the high bits must spread evenly. */
  for (int i = 0; i < KEYS; i++) {
    int len = snprintf(key, sizeof key, "user:%d", i);
    uint32_t h = strmap_hash(key, (size_t)len);
    low[h & (BUCKETS - 1)]++;
    counts[h >> 22]++;
  }
  for (int b = 0; b < BUCKETS; b++) {
    chi += (counts[b] - expect) * (counts[b] - expect) / expect;
    chi_low += (low[b] - expect) * (low[b] - expect) / expect;
  }
  /* 1023 degrees of freedom: mean 1023, sd ~45; 1300 is over six sd out. */
  assert_true(chi < 1300);
  assert_true(chi_low < 1300);
  free(counts);
  free(low);
}

static void test_put_get_del(void **state)
{
  strmap m;
  item a, b, c, empty, nul;
  (void)state;

  assert_int_equal(strmap_init(&m, 8), 0);
  item_set_str(&a, "alice", 1);
  item_set_str(&b, "bob", 2);
  item_set_str(&c, "alic", 3);
  item_set(&empty, "", 0, 4);
  item_set(&nul, "bob\0x", 5, 5);
  assert_int_equal(strmap_put(&m, &a.node), 0);
  assert_int_equal(strmap_put(&m, &b.node), 0);
  assert_int_equal(strmap_put(&m, &c.node), 0);
  assert_int_equal(strmap_put(&m, &empty.node), 0);
  assert_int_equal(strmap_put(&m, &nul.node), 0);
  assert_int_equal(m.count, 5);

  assert_ptr_equal(get_str(&m, "alice"), &a.node);
  assert_ptr_equal(get_str(&m, "bob"), &b.node);
  assert_ptr_equal(get_str(&m, "alic"), &c.node);
  assert_ptr_equal(strmap_get(&m, "", 0), &empty.node);
  assert_ptr_equal(strmap_get(&m, "bob\0x", 5), &nul.node);
  assert_int_equal(ITEM_OF(get_str(&m, "alice"))->value, 1);
  /* Prefixes and extensions of stored keys are different keys. */
  assert_null(get_str(&m, "ali"));
  assert_null(get_str(&m, "alicea"));
  assert_null(strmap_get(&m, "bob\0", 4));
  assert_null(get_str(&m, "carol"));
  /* The lookup key need not be the stored pointer, nor NUL-terminated. */
  assert_ptr_equal(strmap_get(&m, "alice!!", 5), &a.node);

  strmap_del(&m, &b.node);
  assert_int_equal(m.count, 4);
  assert_null(get_str(&m, "bob"));
  assert_ptr_equal(strmap_get(&m, "bob\0x", 5), &nul.node);
  strmap_del(&m, &empty.node);
  assert_null(strmap_get(&m, "", 0));
  /* A deleted node can be inserted again. */
  assert_int_equal(strmap_put(&m, &b.node), 0);
  assert_ptr_equal(get_str(&m, "bob"), &b.node);
  check_structure(&m);
  strmap_free(&m);
}

static void test_collisions_in_one_bucket(void **state)
{
  enum { N = 16 };
  strmap m;
  item its[N];
  int found = 0;
  char key[32];
  size_t chain = 0;
  (void)state;

  /* Pick keys that all land in bucket 0 of a 16-bucket table; 16 nodes do not
   * exceed the load factor, so they stay chained in that one bucket. */
  for (int i = 0; found < N; i++) {
    int len = snprintf(key, sizeof key, "conn-%d", i);
    if ((strmap_hash(key, (size_t)len) & (N - 1)) == 0) {
      item_set(&its[found], key, (size_t)len, found);
      found++;
    }
  }
  assert_int_equal(strmap_init(&m, N), 0);
  for (int i = 0; i < N; i++)
    assert_int_equal(strmap_put(&m, &its[i].node), 0);
  assert_int_equal(m.mask, N - 1);
  for (const strmap_node *n = m.buckets[0]; n != NULL; n = n->next)
    chain++;
  assert_int_equal(chain, N);
  for (int i = 0; i < N; i++)
    assert_ptr_equal(get_str(&m, its[i].key), &its[i].node);

  /* Remove from the chain's head (last inserted), tail (first) and middle. */
  strmap_del(&m, &its[N - 1].node);
  strmap_del(&m, &its[0].node);
  strmap_del(&m, &its[7].node);
  assert_int_equal(m.count, N - 3);
  for (int i = 0; i < N; i++) {
    if (i == 0 || i == 7 || i == N - 1)
      assert_null(get_str(&m, its[i].key));
    else
      assert_ptr_equal(get_str(&m, its[i].key), &its[i].node);
  }
  check_structure(&m);
  strmap_free(&m);
}

typedef struct hash_idx {
  uint32_t hash;
  uint32_t idx;
} hash_idx;

static int cmp_hash_idx(const void *a, const void *b)
{
  const hash_idx *x = a, *y = b;

  if (x->hash != y->hash)
    return x->hash < y->hash ? -1 : 1;
  return x->idx < y->idx ? -1 : x->idx > y->idx;
}

static void test_full_hash_collision(void **state)
{
  enum { N = 400000 };
  hash_idx *hs = calloc(N, sizeof *hs);
  char key[32];
  item a, b;
  strmap m;
  int pair = -1;
  (void)state;

  /* 400k keys in a 32-bit space make ~18 equal-hash pairs (birthday bound):
   * such keys share a bucket at every size and only the key compare tells
   * them apart. */
  assert_non_null(hs);
  for (uint32_t i = 0; i < N; i++) {
    int len = snprintf(key, sizeof key, "c%u", (unsigned)i);
    hs[i].hash = strmap_hash(key, (size_t)len);
    hs[i].idx = i;
  }
  qsort(hs, N, sizeof *hs, cmp_hash_idx);
  for (int i = 0; i + 1 < N && pair < 0; i++)
    if (hs[i].hash == hs[i + 1].hash)
      pair = i;
  assert_true(pair >= 0);

  snprintf(key, sizeof key, "c%u", (unsigned)hs[pair].idx);
  item_set_str(&a, key, 1);
  snprintf(key, sizeof key, "c%u", (unsigned)hs[pair + 1].idx);
  item_set_str(&b, key, 2);
  assert_int_equal(strmap_init(&m, 2), 0);
  assert_int_equal(strmap_put(&m, &a.node), 0);
  assert_null(get_str(&m, b.key));
  assert_int_equal(strmap_put(&m, &b.node), 0);
  assert_int_equal(a.node.hash, b.node.hash);
  assert_ptr_equal(get_str(&m, a.key), &a.node);
  assert_ptr_equal(get_str(&m, b.key), &b.node);
  strmap_del(&m, &b.node);
  assert_ptr_equal(get_str(&m, a.key), &a.node);
  assert_null(get_str(&m, b.key));
  strmap_free(&m);
  free(hs);
}

static void test_growth_preserves_entries(void **state)
{
  enum { N = 20000 };
  strmap m;
  item *its = calloc(N, sizeof *its);
  char key[32];
  uint32_t last_mask = 0;
  (void)state;

  assert_non_null(its);
  assert_int_equal(strmap_init(&m, 1), 0);
  for (int i = 0; i < N; i++) {
    int len = snprintf(key, sizeof key, "k%d", i);
    item_set(&its[i], key, (size_t)len, i);
    assert_int_equal(strmap_put(&m, &its[i].node), 0);
    /* Load factor at most 1, and growth is by doubling. */
    assert_true(m.count <= (size_t)m.mask + 1);
    assert_true(m.mask == last_mask || m.mask == last_mask * 2 + 1);
    last_mask = m.mask;
  }
  assert_int_equal(m.count, N);
  assert_int_equal(m.mask, 32767);
  check_structure(&m);
  for (int i = 0; i < N; i++) {
    strmap_node *n = get_str(&m, its[i].key);
    assert_ptr_equal(n, &its[i].node);
    assert_int_equal(ITEM_OF(n)->value, i);
  }
  strmap_free(&m);
  free(its);
}

/* Random puts, gets and deletes over a fixed key space, checked against a
 * plain presence array; keys are random bytes of random length, NULs included. */
enum { RND_KEYS = 5000, RND_OPS = 100000 };

static uint64_t rnd_next(uint64_t *s)
{
  *s ^= *s >> 12;
  *s ^= *s << 25;
  *s ^= *s >> 27;
  return *s * UINT64_C(2685821657736338717);
}

static void test_random_vs_model(void **state)
{
  strmap m;
  item *its = calloc(RND_KEYS, sizeof *its);
  unsigned char *present = calloc(RND_KEYS, 1);
  size_t count = 0;
  uint64_t rng = UINT64_C(0x9e3779b97f4a7c15);
  (void)state;

  assert_non_null(its);
  assert_non_null(present);
  for (int i = 0; i < RND_KEYS; i++) {
    char key[24];
    size_t len = 1 + rnd_next(&rng) % 20;
    for (size_t j = 0; j < len; j++)
      key[j] = (char)(rnd_next(&rng) % 4); /* tiny alphabet: many near-equal keys */
    /* Keep keys unique so the reference's meaning of "present" is simple. */
    snprintf(key + len, sizeof key - len, "%d", i);
    item_set(&its[i], key, len + strlen(key + len), i);
  }
  assert_int_equal(strmap_init(&m, 4), 0);

  for (int op = 0; op < RND_OPS; op++) {
    int i = (int)(rnd_next(&rng) % RND_KEYS);
    unsigned r = (unsigned)(rnd_next(&rng) % 3);
    strmap_node *n = strmap_get(&m, its[i].key, its[i].node.klen);

    if (present[i])
      assert_ptr_equal(n, &its[i].node);
    else
      assert_null(n);
    if (r == 0 && !present[i]) {
      assert_int_equal(strmap_put(&m, &its[i].node), 0);
      present[i] = 1;
      count++;
    } else if (r == 1 && present[i]) {
      strmap_del(&m, &its[i].node);
      present[i] = 0;
      count--;
    }
    assert_int_equal(m.count, count);
  }
  check_structure(&m);
  for (int i = 0; i < RND_KEYS; i++) {
    strmap_node *n = strmap_get(&m, its[i].key, its[i].node.klen);
    if (present[i])
      assert_ptr_equal(n, &its[i].node);
    else
      assert_null(n);
  }
  strmap_free(&m);
  free(its);
  free(present);
}

/* SipHash-2-4 reference values from the paper (key 00 01 .. 0f): the
 * 15-byte message 00 01 .. 0e of its appendix A, and the empty message. */
static void test_siphash_reference_vectors(void **state)
{
  uint8_t key[16], msg[15];
  (void)state;

  for (int i = 0; i < 16; i++)
    key[i] = (uint8_t)i;
  for (int i = 0; i < 15; i++)
    msg[i] = (uint8_t)i;
  assert_true(strmap_siphash(key, msg, 15, 2, 4) == UINT64_C(0xa129ca6149be45e5));
  assert_true(strmap_siphash(key, msg, 0, 2, 4) == UINT64_C(0x726fdb47dd0e0e31));
  /* the rounds matter: 1-3 is a different function */
  assert_true(strmap_siphash(key, msg, 15, 1, 3) != UINT64_C(0xa129ca6149be45e5));
}

/* The map's former unkeyed hash (before SipHash), kept here to craft keys
 * that all collided under it: the reproduction of the hash-flooding report. */
#define OLD_MUL1 UINT64_C(0x9e3779b97f4a7c15)
#define OLD_MUL2 UINT64_C(0xc2b2ae3d27d4eb4f)

static uint64_t old_rotl(uint64_t x, unsigned r) { return (x << r) | (x >> (64 - r)); }

static uint64_t old_mix(uint64_t x)
{
  x ^= x >> 32;
  x *= OLD_MUL2;
  x ^= x >> 29;
  x *= OLD_MUL1;
  x ^= x >> 32;
  return x;
}

static uint32_t old_hash(const char *key, size_t len)
{
  const unsigned char *p = (const unsigned char *)key;
  uint64_t h = OLD_MUL1 ^ ((uint64_t)len * OLD_MUL2), w;

  for (; len >= 8; p += 8, len -= 8) {
    memcpy(&w, p, 8);
    h = old_rotl(h ^ (w * OLD_MUL2), 27) * OLD_MUL1;
  }
  if (len > 0) {
    w = 0;
    memcpy(&w, p, len);
    h = old_rotl(h ^ (w * OLD_MUL2), 27) * OLD_MUL1;
  }
  h = old_mix(h);
  return (uint32_t)(h ^ (h >> 32));
}

static uint64_t inv64(uint64_t a) /* a odd: Newton's iteration for a^-1 mod 2^64 */
{
  uint64_t x = a;
  for (int i = 0; i < 6; i++)
    x *= 2 - a * x;
  return x;
}

static uint64_t old_unmix(uint64_t x)
{
  x ^= x >> 32;
  x *= inv64(OLD_MUL1);
  x ^= (x >> 29) ^ (x >> 58);
  x *= inv64(OLD_MUL2);
  x ^= x >> 32;
  return x;
}

/* Craft n distinct 16-byte printable keys whose old hash is 0 (so they
 * shared bucket 0 at every table size): "flood-00" then 8 bytes solved
 * backwards from a final state H = x:x, whose 32-bit fold is 0. */
static void craft_old_collisions(char (*keys)[17], size_t n)
{
  uint64_t h1 = OLD_MUL1 ^ (16 * OLD_MUL2), w;
  const char *prefix = "flood-00";
  size_t found = 0;

  memcpy(&w, prefix, 8);
  h1 = old_rotl(h1 ^ (w * OLD_MUL2), 27) * OLD_MUL1;
  for (uint64_t x = 1; found < n; x++) {
    uint64_t h2 = old_unmix(x << 32 | x);
    uint64_t t = h2 * inv64(OLD_MUL1);
    t = (t >> 27) | (t << 37);
    w = (t ^ h1) * inv64(OLD_MUL2);
    unsigned char b[8];
    memcpy(b, &w, 8);
    int ok = 1;
    for (int i = 0; i < 8 && ok; i++)
      ok = b[i] > 0x20 && b[i] < 0x7f && b[i] != '"' && b[i] != '\\';
    if (!ok)
      continue;
    memcpy(keys[found], prefix, 8);
    memcpy(keys[found] + 8, b, 8);
    keys[found][16] = '\0';
    found++;
  }
}

/* Keys crafted to collide under the old hash spread like any keys now: the
 * longest chain stays short (4096 random keys in 4096 buckets: the expected
 * longest chain is about 6; 16 would be a one in ~10^9 event). */
static void test_crafted_keys_do_not_flood(void **state)
{
  enum { N = 4096 };
  char (*keys)[17] = calloc(N, sizeof *keys);
  item *its = calloc(N, sizeof *its);
  strmap m;
  size_t longest = 0;
  (void)state;

  assert_non_null(keys);
  assert_non_null(its);
  craft_old_collisions(keys, N);
  for (int i = 0; i < N; i++) {
    assert_int_equal(old_hash(keys[i], 16), 0); /* the reproduction holds */
    if (i)
      assert_memory_not_equal(keys[i], keys[i - 1], 16);
  }
  assert_int_equal(strmap_init(&m, 16), 0);
  for (int i = 0; i < N; i++) {
    item_set(&its[i], keys[i], 16, i);
    assert_int_equal(strmap_put(&m, &its[i].node), 0);
  }
  assert_int_equal(m.mask + 1, N);
  for (uint32_t b = 0; b <= m.mask; b++) {
    size_t len = 0;
    for (const strmap_node *n = m.buckets[b]; n != NULL; n = n->next)
      len++;
    if (len > longest)
      longest = len;
  }
  print_message("longest chain of %d crafted keys in %u buckets: %zu\n", N, m.mask + 1, longest);
  assert_true(longest <= 16);
  for (int i = 0; i < N; i++)
    assert_ptr_equal(strmap_get(&m, keys[i], 16), &its[i].node);
  check_structure(&m);
  strmap_free(&m);
  free(its);
  free(keys);
}

int main(void)
{
  const struct CMUnitTest tests[] = {
    cmocka_unit_test(test_init_rounds_up),
    cmocka_unit_test(test_hash_properties),
    cmocka_unit_test(test_hash_distribution),
    cmocka_unit_test(test_put_get_del),
    cmocka_unit_test(test_collisions_in_one_bucket),
    cmocka_unit_test(test_full_hash_collision),
    cmocka_unit_test(test_growth_preserves_entries),
    cmocka_unit_test(test_random_vs_model),
    cmocka_unit_test(test_siphash_reference_vectors),
    cmocka_unit_test(test_crafted_keys_do_not_flood),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
