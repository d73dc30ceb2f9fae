/* Static files under --static DIR (see static_files.h). */
#include "static_files.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <llhttp.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

static int hexval(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

/* Bytes no request path may hold, raw or decoded. */
static bool bad_byte(unsigned char c) { return c < 0x20 || c == 0x7f || c == '\\'; }

int imd_static_path(const char *raw, size_t n, char *out, size_t cap) {
  if (n == 0 || raw[0] != '/') return -1;
  size_t o = 0, seg = 0; /* seg: where the current segment starts in out */
  for (size_t i = 1; i <= n; i++) {
    if (i == n || raw[i] == '/') {
      size_t len = o - seg;
      if (i == n && len == 0) { /* "/" or "dir/": its index */
        static const char index[] = "index.html";
        if (o + sizeof index > cap) return -2;
        memcpy(out + o, index, sizeof index);
        return 0;
      }
      /* "", ".", ".." and hidden names: refused before any lookup */
      if (len == 0 || out[seg] == '.') return -1;
      if (i == n) break;
      if (o + 1 >= cap) return -2;
      out[o++] = '/';
      seg = o;
      continue;
    }
    unsigned char c = (unsigned char)raw[i];
    if (bad_byte(c)) return -1;
    if (c == '%') {
      if (i + 2 >= n) return -1; /* "%" or "%X" at the end */
      int h = hexval(raw[i + 1]), l = hexval(raw[i + 2]);
      if (h < 0 || l < 0) return -1;
      c = (unsigned char)(h * 16 + l);
      /* an encoded separator or dot would dodge the segment checks */
      if (bad_byte(c) || c == '/' || c == '.') return -1;
      i += 2;
    }
    if (o + 1 >= cap) return -2;
    out[o++] = (char)c;
  }
  out[o] = '\0';
  return 0;
}

int imd_static_inside(const char *root, const char *path) {
  size_t rl = strlen(root);
  if (rl == 1 && root[0] == '/') return path[0] == '/';
  return strncmp(root, path, rl) == 0 && (path[rl] == '\0' || path[rl] == '/');
}

const char *imd_static_type(const char *name) {
  static const struct {
    const char *ext, *type;
  } types[] = {
      {"html", "text/html; charset=utf-8"},
      {"htm", "text/html; charset=utf-8"},
      {"js", "text/javascript; charset=utf-8"},
      {"mjs", "text/javascript; charset=utf-8"},
      {"css", "text/css; charset=utf-8"},
      {"json", "application/json"},
      {"png", "image/png"},
      {"svg", "image/svg+xml"},
      {"ico", "image/x-icon"},
      {"txt", "text/plain; charset=utf-8"},
  };
  const char *slash = strrchr(name, '/');
  const char *dot = strrchr(slash ? slash + 1 : name, '.');
  if (dot)
    for (size_t i = 0; i < sizeof types / sizeof types[0]; i++)
      if (!strcasecmp(dot + 1, types[i].ext)) return types[i].type;
  return "application/octet-stream";
}

static void fail(http_response *r, int status, const char *msg) {
  cJSON *o = cJSON_CreateObject();
  cJSON_AddStringToObject(o, "error", msg);
  r->status = status;
  r->content_type = "application/json";
  r->body = cJSON_PrintUnformatted(o);
  r->body_len = r->body ? strlen(r->body) : 0;
  cJSON_Delete(o);
}

/* True when the If-None-Match list names etag (weak or strong) or is "*". */
static bool etag_matches(const char *inm, const char *etag) {
  size_t el = strlen(etag);
  const char *p = inm;
  while (*p) {
    while (*p == ' ' || *p == '\t' || *p == ',') p++;
    const char *e = p;
    while (*e && *e != ',') e++;
    const char *t = e;
    while (t > p && (t[-1] == ' ' || t[-1] == '\t')) t--;
    if (t - p == 1 && *p == '*') return true;
    const char *q = p;
    if (t - q > 2 && q[0] == 'W' && q[1] == '/') q += 2;
    if ((size_t)(t - q) == el && !memcmp(q, etag, el)) return true;
    p = e;
  }
  return false;
}

/* Reads the whole of fd (st.st_size bytes) into a malloc()ed buffer. */
static char *read_all(int fd, size_t size) {
  char *buf = malloc(size ? size : 1);
  if (!buf) return NULL;
  size_t got = 0;
  while (got < size) {
    ssize_t k = read(fd, buf + got, size - got);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) { /* shrank under us, or an I/O error */
      free(buf);
      return NULL;
    }
    got += (size_t)k;
  }
  return buf;
}

void imd_static_serve(const char *dir, const http_request *req, http_response *r) {
  if (req->method != HTTP_GET && req->method != HTTP_HEAD) {
    fail(r, 405, "method not allowed");
    return;
  }
  char rel[IMD_STATIC_PATH_MAX];
  int rc = imd_static_path(req->path, req->path_len, rel, sizeof rel);
  if (rc < 0) {
    fail(r, rc == -2 ? 414 : 400, "bad path");
    return;
  }
  char *root = realpath(dir, NULL);
  if (!root) {
    fail(r, 404, "no such file");
    return;
  }
  size_t need = strlen(root) + 1 + strlen(rel) + 1;
  char *joined = malloc(need);
  char *real = NULL;
  if (joined) {
    snprintf(joined, need, "%s/%s", root, rel);
    real = realpath(joined, NULL); /* follows every symlink: checked below */
  }
  int fd = -1, status = 0;
  const char *why = NULL;
  if (!joined) {
    status = 503;
    why = "out of memory";
  } else if (!real) {
    status = 404;
    why = "no such file";
  } else if (!imd_static_inside(root, real)) {
    status = 403; /* a symlink pointing out of the directory */
    why = "outside the static directory";
  } else {
    /* O_NOFOLLOW: the canonical path has no link, so one there now was put
     * in since realpath: refuse it rather than follow it. O_NONBLOCK: a FIFO
     * must not block the loop (it is refused below). */
    fd = open(real, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
      status = errno == ENOENT ? 404 : 403;
      why = errno == ENOENT ? "no such file" : "cannot open";
    }
  }
  struct stat st;
  if (fd >= 0 && (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode))) {
    status = 404; /* a directory without its trailing '/', a FIFO, a device */
    why = "no such file";
  } else if (fd >= 0 && (uint64_t)st.st_size > IMD_STATIC_MAX_FILE) {
    status = 413;
    why = "file too large";
  }
  if (status) {
    fail(r, status, why);
  } else {
    char etag[64];
    snprintf(etag, sizeof etag, "\"%llx-%llx\"", (unsigned long long)st.st_size,
             (unsigned long long)st.st_mtim.tv_sec * 1000000000ull +
                 (unsigned long long)st.st_mtim.tv_nsec);
    snprintf(r->headers, sizeof r->headers, "ETag: %s\r\nCache-Control: no-cache\r\n", etag);
    r->content_type = imd_static_type(rel); /* the name asked for, not a link target's */
    if (req->if_none_match && etag_matches(req->if_none_match, etag)) {
      r->status = 304;
    } else if ((r->body = read_all(fd, (size_t)st.st_size)) != NULL) {
      r->status = 200;
      r->body_len = (size_t)st.st_size;
    } else {
      r->headers[0] = '\0';
      fail(r, 500, "cannot read the file");
    }
  }
  if (fd >= 0) close(fd);
  free(real);
  free(joined);
  free(root);
}
