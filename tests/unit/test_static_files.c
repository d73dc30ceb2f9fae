/* static_files: the request path checks, the root prefix check and the
 * Content-Type table (the serving itself is tested over real HTTP in
 * tests/integration/test_static.py). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <string.h>

#include "static_files.h"

static int path_of(const char *raw, char *out, size_t cap) {
  return imd_static_path(raw, strlen(raw), out, cap);
}

static void test_accepted(void **state) {
  (void)state;
  static const char *const cases[][2] = {
      {"/", "index.html"},
      {"/index.html", "index.html"},
      {"/chat.js", "chat.js"},
      {"/sub/", "sub/index.html"},
      {"/sub/deep/x.css", "sub/deep/x.css"},
      {"/with%20space.txt", "with space.txt"},
      {"/%41%62c", "Abc"},
      {"/a.b.c", "a.b.c"},
      {"/a..b", "a..b"},          /* dots inside a name are no traversal */
      {"/x/y.", "x/y."},
      {"/%c3%a9t%C3%A9.txt", "\xc3\xa9t\xc3\xa9.txt"},
  };
  char out[IMD_STATIC_PATH_MAX];
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    assert_int_equal(path_of(cases[i][0], out, sizeof out), 0);
    assert_string_equal(out, cases[i][1]);
  }
}

static void test_refused(void **state) {
  (void)state;
  static const char *const bad[] = {
      "", "index.html", "x/y",                        /* not from the root */
      "/..", "/../x", "/a/../b", "/a/..", "/.", "/./a", "/a/./b",
      "//", "//etc/passwd", "/a//b",                   /* empty segments */
      "/.hidden", "/a/.git/config", "/.well-known/x", /* hidden names */
      "/%2e%2e/x", "/%2E%2E/x", "/.%2e/x", "/%2e./x", "/%2e", "/a%2fb", "/a%2F..%2Fb",
      "/%5c", "/a\\b", "/..\\x",                        /* encoded dots, slashes, backslashes */
      "/%00", "/a%00.html", "/a%0ab", "/a%7f", "/a\tb", "/a\x7f", /* control bytes */
      "/%", "/%2", "/a%g0", "/a%0g", "/%%41",          /* malformed escapes */
  };
  char out[IMD_STATIC_PATH_MAX];
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    int rc = path_of(bad[i], out, sizeof out);
    if (rc != -1) fail_msg("accepted \"%s\" (rc %d)", bad[i], rc);
  }
  /* a NUL in the raw path (not NUL-terminated input) */
  assert_int_equal(imd_static_path("/a\0b", 4, out, sizeof out), -1);
}

static void test_capacity(void **state) {
  (void)state;
  char out[16];
  assert_int_equal(path_of("/0123456789abcde", out, sizeof out), 0); /* 15 + NUL */
  assert_int_equal(path_of("/0123456789abcdef", out, sizeof out), -2);
  assert_int_equal(path_of("/abc/", out, 8), -2);                  /* no room for the index */
  assert_int_equal(path_of("/abc/", out, sizeof out), 0);
  assert_string_equal(out, "abc/index.html");
  char big[IMD_STATIC_PATH_MAX + 8];
  big[0] = '/';
  memset(big + 1, 'a', sizeof big - 2);
  big[sizeof big - 1] = '\0';
  char out2[IMD_STATIC_PATH_MAX];
  assert_int_equal(path_of(big, out2, sizeof out2), -2);
}

static void test_inside(void **state) {
  (void)state;
  assert_true(imd_static_inside("/srv/www", "/srv/www"));
  assert_true(imd_static_inside("/srv/www", "/srv/www/a"));
  assert_true(imd_static_inside("/srv/www", "/srv/www/a/b.js"));
  assert_false(imd_static_inside("/srv/www", "/srv/www2/a"));   /* a prefix is not a parent */
  assert_false(imd_static_inside("/srv/www", "/srv/ww"));
  assert_false(imd_static_inside("/srv/www", "/srv"));
  assert_false(imd_static_inside("/srv/www", "/etc/passwd"));
  assert_true(imd_static_inside("/", "/etc/passwd"));
}

static void test_types(void **state) {
  (void)state;
  assert_string_equal(imd_static_type("a/index.html"), "text/html; charset=utf-8");
  assert_string_equal(imd_static_type("X.HTML"), "text/html; charset=utf-8");
  assert_string_equal(imd_static_type("imclient.js"), "text/javascript; charset=utf-8");
  assert_string_equal(imd_static_type("m.mjs"), "text/javascript; charset=utf-8");
  assert_string_equal(imd_static_type("chat.css"), "text/css; charset=utf-8");
  assert_string_equal(imd_static_type("d.json"), "application/json");
  assert_string_equal(imd_static_type("p.png"), "image/png");
  assert_string_equal(imd_static_type("s.svg"), "image/svg+xml");
  assert_string_equal(imd_static_type("favicon.ico"), "image/x-icon");
  assert_string_equal(imd_static_type("r.txt"), "text/plain; charset=utf-8");
  assert_string_equal(imd_static_type("x.tar.gz"), "application/octet-stream");
  assert_string_equal(imd_static_type("noext"), "application/octet-stream");
  assert_string_equal(imd_static_type("dir.js/file"), "application/octet-stream");
  assert_string_equal(imd_static_type("html"), "application/octet-stream");
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_accepted), cmocka_unit_test(test_refused),
      cmocka_unit_test(test_capacity), cmocka_unit_test(test_inside),
      cmocka_unit_test(test_types),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
