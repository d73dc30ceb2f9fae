/* imd's structured log (log.h). */
#include "log.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static FILE *out;               /* NULL: stderr */
static char *path_copy;
static enum imd_log_level min_level = IMD_LOG_INFO;

static const char *const names[] = {"debug", "info", "warn", "error"};

bool imd_log_on(enum imd_log_level level) { return level >= min_level; }

int imd_log_open(const char *path, const char *level) {
  int lv = -1;
  for (int i = 0; i < 4; i++)
    if (level && !strcmp(level, names[i])) lv = i;
  if (lv < 0) {
    fprintf(stderr, "imd: log-level: debug, info, warn or error, not '%s'\n", level ? level : "");
    return -1;
  }
  min_level = (enum imd_log_level)lv;
  if (!path || !*path || !strcmp(path, "-")) return 0;
  FILE *f = fopen(path, "a");
  if (!f) {
    fprintf(stderr, "imd: cannot open the log %s: %s\n", path, strerror(errno));
    return -1;
  }
  setvbuf(f, NULL, _IOLBF, 0);
  imd_log_close();
  out = f;
  path_copy = strdup(path);
  return 0;
}

/* The FILE stays the same one: the new file's descriptor is put under it
 * with dup2(), which is atomic, so worker threads writing a line meanwhile
 * (each line is one fwrite, which holds the FILE's lock) land whole in the
 * old file or the new one, and none writes through a closed FILE. */
int imd_log_reopen(void) {
  if (!out || !path_copy) return 0;
  int fd = open(path_copy, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
  if (fd < 0) {
    log_error("cannot reopen the log %s: %s", path_copy, strerror(errno));
    return -1;
  }
  fflush(out);
  int rc = dup2(fd, fileno(out));
  close(fd);
  if (rc < 0) {
    log_error("cannot reopen the log %s: %s", path_copy, strerror(errno));
    return -1;
  }
  log_info("log reopened");
  return 0;
}

void imd_log_close(void) {
  if (out) fclose(out);
  out = NULL;
  free(path_copy);
  path_copy = NULL;
}

/* One log line, built in memory and written with one fwrite(): stderr is
 * unbuffered, and writing it piece by piece cost a write(2) per byte. It
 * starts on the stack and moves to the heap only when it outgrows that. */
typedef struct line {
  char *p;
  size_t n, cap;
  bool full; /* out of memory: the rest is dropped */
  char stack[2048];
} line;

static void put(line *l, const char *s, size_t n) {
  if (l->full) return;
  if (l->cap - l->n < n) {
    size_t cap = l->cap * 2 > l->n + n ? l->cap * 2 : l->n + n;
    char *p = l->p == l->stack ? malloc(cap) : realloc(l->p, cap);
    if (!p) {
      l->full = true;
      return;
    }
    if (l->p == l->stack) memcpy(p, l->stack, l->n);
    l->p = p;
    l->cap = cap;
  }
  memcpy(l->p + l->n, s, n);
  l->n += n;
}

static void puts_(line *l, const char *s) { put(l, s, strlen(s)); }

/* s as the body of a JSON string. */
static void put_json(line *l, const char *s) {
  static const char hex[] = "0123456789abcdef";
  for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
    const unsigned char *run = p;
    while (*p && *p != '"' && *p != '\\' && *p >= 0x20) p++;
    put(l, (const char *)run, (size_t)(p - run));
    if (!*p) break;
    if (*p == '"' || *p == '\\') {
      char e[2] = {'\\', (char)*p};
      put(l, e, 2);
    } else {
      char e[6] = {'\\', 'u', '0', '0', hex[*p >> 4], hex[*p & 15]};
      put(l, e, 6);
    }
  }
}

void imd_log_(enum imd_log_level level, const char *file, int line_no, const char *const *fields,
              const char *fmt, ...) {
  FILE *f = out ? out : stderr;
  char msg[1024], head[160];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  struct timeval tv;
  gettimeofday(&tv, NULL);
  struct tm tm;
  gmtime_r(&tv.tv_sec, &tm);
  char ts[40];
  strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%S", &tm);
  const char *base = strrchr(file, '/');
  line l = {.cap = sizeof l.stack};
  l.p = l.stack;
  int hn = snprintf(head, sizeof head, "{\"ts\":\"%s.%03ldZ\",\"level\":\"%s\",\"src\":\"", ts,
                    (long)(tv.tv_usec / 1000), names[level]);
  put(&l, head, hn > 0 && (size_t)hn < sizeof head ? (size_t)hn : 0);
  put_json(&l, base ? base + 1 : file);
  hn = snprintf(head, sizeof head, ":%d\",\"msg\":\"", line_no);
  put(&l, head, hn > 0 && (size_t)hn < sizeof head ? (size_t)hn : 0);
  put_json(&l, msg);
  puts_(&l, "\"");
  for (int i = 0; fields && fields[i] && fields[i + 1]; i += 2) {
    puts_(&l, ",\"");
    put_json(&l, fields[i]);
    puts_(&l, "\":\"");
    put_json(&l, fields[i + 1]);
    puts_(&l, "\"");
  }
  puts_(&l, "}\n");
  if (!l.full) fwrite(l.p, 1, l.n, f);
  if (l.p != l.stack) free(l.p);
}
