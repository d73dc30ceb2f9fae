/* imd's log: leveled, one JSON object per line ({"ts","level","src","msg"}
 * plus fields), to stderr or a file that SIGHUP reopens (logrotate). Cheap
 * when a level is off: the arguments are not even formatted. */
#ifndef IMD_LOG_H
#define IMD_LOG_H

#include <stdbool.h>

enum imd_log_level { IMD_LOG_DEBUG, IMD_LOG_INFO, IMD_LOG_WARN, IMD_LOG_ERROR };

/* Start logging at `level` ("debug", "info", "warn", "error") to `path`
 * (NULL: stderr). Returns 0, or -1 with a reason on stderr (bad level, the
 * file cannot be opened). */
int imd_log_open(const char *path, const char *level);
/* Open the file again (after logrotate moved it). Returns 0 or -1 (the old
 * file is kept). A no-op for stderr. */
int imd_log_reopen(void);
void imd_log_close(void);
bool imd_log_on(enum imd_log_level level);

/* Log msg (printf-style) with fields: after the format's arguments, pairs
 * of "key", "value" strings ended by NULL. Use the macros below. */
void imd_log_(enum imd_log_level level, const char *file, int line, const char *const *fields,
              const char *fmt, ...) __attribute__((format(printf, 5, 6)));

#define IMD_FIELDS(...) ((const char *const[]){__VA_ARGS__, NULL})
#define imd_log(level, fields, ...)                                          \
  do {                                                                       \
    if (imd_log_on(level)) imd_log_(level, __FILE__, __LINE__, fields, __VA_ARGS__); \
  } while (0)
#define log_debug(...) imd_log(IMD_LOG_DEBUG, NULL, __VA_ARGS__)
#define log_info(...) imd_log(IMD_LOG_INFO, NULL, __VA_ARGS__)
#define log_warn(...) imd_log(IMD_LOG_WARN, NULL, __VA_ARGS__)
#define log_error(...) imd_log(IMD_LOG_ERROR, NULL, __VA_ARGS__)

#endif
