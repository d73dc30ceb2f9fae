/* Static files for imd's HTTP listener (--static DIR): the web chat
 * example, say, served from the same origin as the API.
 *
 * GET and HEAD only. A request path is checked before any file system
 * call (imd_static_path) and the file found is opened only if its real
 * path lies inside the real path of DIR, so neither "..", nor encoded dots
 * or slashes, nor a symlink pointing out of DIR reaches another file.
 * Answers carry a Content-Type by extension, an ETag made of size and
 * mtime (If-None-Match gives 304) and Cache-Control: no-cache (the browser
 * revalidates every time, so a changed file is seen at once). Errors are
 * JSON {"error": ...}: 400 bad path, 403 not a regular file inside DIR,
 * 404 missing, 405 other methods, 413 a file over IMD_STATIC_MAX_FILE.
 *
 * Not thread-safe state: there is none; every call stands alone. */
#ifndef IMD_STATIC_FILES_H
#define IMD_STATIC_FILES_H

#include <stddef.h>

#include "http_server.h"

#define IMD_STATIC_MAX_FILE ((size_t)16 << 20) /* bytes; larger files get 413 */
#define IMD_STATIC_PATH_MAX 1024               /* bytes of a decoded request path */

/* Turns the raw request path (as in http_request.path: not decoded, not
 * NUL-terminated) into a relative file path in out: percent escapes
 * decoded, the leading '/' dropped, "index.html" appended to a path ending
 * in '/'. Refused: a path not starting with '/', an empty, "." or ".."
 * segment, a segment starting with '.' (hidden files), a backslash, a
 * control byte (NUL included), a malformed escape, and any escape that
 * decodes to '/', '\\', '.', or a control byte (so nothing encoded can
 * build a path the checks above would refuse).
 *
 * Returns 0 (out holds a NUL-terminated relative path), -1 for a refused
 * path, -2 when the decoded path does not fit in cap bytes. */
int imd_static_path(const char *raw, size_t n, char *out, size_t cap);

/* True when path (NUL-terminated) is root itself or lies below it; both
 * must be canonical (realpath) and root must not end in '/' unless it is
 * "/". */
int imd_static_inside(const char *root, const char *path);

/* The Content-Type for a file name, by its extension (lower or upper case):
 * html, js, mjs, css, json, png, svg, ico, txt, else
 * "application/octet-stream". A string literal. */
const char *imd_static_type(const char *name);

/* Answers req from the files of dir (any path; resolved here on every
 * request, so the directory may change while imd runs). Fills resp: body
 * malloc()ed, ownership to the server, headers in resp->headers. */
void imd_static_serve(const char *dir, const http_request *req, http_response *resp);

#endif
