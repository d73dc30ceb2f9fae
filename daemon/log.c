/* imd's structured log (log.h). */
#include "log.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

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

int imd_log_reopen(void) {
  if (!out || !path_copy) return 0;
  FILE *f = fopen(path_copy, "a");
  if (!f) {
    log_error("cannot reopen the log %s: %s", path_copy, strerror(errno));
    return -1;
  }
  setvbuf(f, NULL, _IOLBF, 0);
  fclose(out);
  out = f;
  log_info("log reopened");
  return 0;
}

void imd_log_close(void) {
  if (out) fclose(out);
  out = NULL;
  free(path_copy);
  path_copy = NULL;
}

/* s as the body of a JSON string. */
static void put_json(FILE *f, const char *s) {
  for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
    if (*p == '"' || *p == '\\')
      fprintf(f, "\\%c", *p);
    else if (*p < 0x20)
      fprintf(f, "\\u%04x", *p);
    else
      fputc(*p, f);
  }
}

void imd_log_(enum imd_log_level level, const char *file, int line, const char *const *fields,
              const char *fmt, ...) {
  FILE *f = out ? out : stderr;
  char msg[1024], ts[40];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  struct timeval tv;
  gettimeofday(&tv, NULL);
  struct tm tm;
  gmtime_r(&tv.tv_sec, &tm);
  strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%S", &tm);
  const char *base = strrchr(file, '/');
  flockfile(f);
  fprintf(f, "{\"ts\":\"%s.%03ldZ\",\"level\":\"%s\",\"src\":\"%s:%d\",\"msg\":\"", ts,
          (long)(tv.tv_usec / 1000), names[level], base ? base + 1 : file, line);
  put_json(f, msg);
  fputc('"', f);
  for (int i = 0; fields && fields[i] && fields[i + 1]; i += 2) {
    fputs(",\"", f);
    put_json(f, fields[i]);
    fputs("\":\"", f);
    put_json(f, fields[i + 1]);
    fputc('"', f);
  }
  fputs("}\n", f);
  funlockfile(f);
}
