/* Replay driver: runs a libFuzzer harness (LLVMFuzzerTestOneInput) over
 * every file named on the command line or found (recursively) in the named
 * directories, without libFuzzer. Used by `meson test --suite fuzz` to
 * replay the seed corpora, and by hand to reproduce a crash:
 *   replay_fuzz_ws fuzz/crashes/fuzz_ws-xyz
 * Exits non-zero when an argument cannot be read or nothing was replayed;
 * a harness invariant failure aborts. */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int run_file(const char *path, unsigned long *count) {
  FILE *f = fopen(path, "rb");
  if (!f) {
    perror(path);
    return -1;
  }
  size_t cap = 4096, n = 0;
  uint8_t *buf = malloc(cap);
  for (;;) {
    if (!buf) {
      fclose(f);
      return -1;
    }
    n += fread(buf + n, 1, cap - n, f);
    if (n < cap) break;
    cap *= 2;
    buf = realloc(buf, cap);
  }
  int err = ferror(f);
  fclose(f);
  if (err) {
    fprintf(stderr, "%s: read error\n", path);
    free(buf);
    return -1;
  }
  /* an exact-size copy, so sanitizers see the input's true bounds */
  uint8_t *data = malloc(n ? n : 1);
  if (!data) {
    free(buf);
    return -1;
  }
  memcpy(data, buf, n);
  free(buf);
  LLVMFuzzerTestOneInput(data, n);
  free(data);
  (*count)++;
  return 0;
}

static int run_path(const char *path, unsigned long *count) {
  struct stat st;
  if (stat(path, &st) != 0) {
    perror(path);
    return -1;
  }
  if (!S_ISDIR(st.st_mode)) return run_file(path, count);
  struct dirent **names;
  int k = scandir(path, &names, NULL, alphasort);
  if (k < 0) {
    perror(path);
    return -1;
  }
  int rc = 0;
  for (int i = 0; i < k; i++) {
    const char *name = names[i]->d_name;
    if (name[0] != '.') {
      size_t len = strlen(path) + strlen(name) + 2;
      char *full = malloc(len);
      if (!full) return -1;
      snprintf(full, len, "%s/%s", path, name);
      if (run_path(full, count) != 0) rc = -1;
      free(full);
    }
    free(names[i]);
  }
  free(names);
  return rc;
}

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: %s FILE|DIR...\n", argv[0]);
    return 2;
  }
  unsigned long count = 0;
  int rc = 0;
  for (int i = 1; i < argc; i++)
    if (run_path(argv[i], &count) != 0) rc = 1;
  printf("%s: replayed %lu inputs\n", argv[0], count);
  if (count == 0) {
    fprintf(stderr, "no inputs found\n");
    rc = 1;
  }
  return rc;
}
