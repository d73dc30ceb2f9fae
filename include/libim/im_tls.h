/* libim's TLS server contexts (mbedTLS): a certificate, its key and the
 * settings every TLS connection of a listener is made with.
 *
 * One im_tls serves any number of listeners (im_event_listen_tls(), or an
 * im_stream of <libim/im_net.h> in an embedder's own server). Settings:
 * TLS 1.2 only (the newest mbedTLS 2.28 speaks), ECDHE key exchange with
 * AES-GCM or ChaCha20-Poly1305, no renegotiation, no client certificates.
 *
 * im_tls_reload() swaps in a new certificate and key while connections are
 * open: connections already established keep the settings they were made
 * with (each holds a reference on them), new handshakes get the new ones.
 *
 * Not thread-safe: use an im_tls from one thread (the event loop's). A
 * server with one event loop per thread gives each loop an im_tls of its
 * own and makes them share their session ticket key
 * (im_tls_share_tickets), so a client resumes its session whichever
 * thread its next connection lands on.
 */
#ifndef LIBIM_IM_TLS_H
#define LIBIM_IM_TLS_H

#include <libim/im.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct im_tls im_tls;

typedef struct im_tls_opts {
  const char *cert_file;   /* PEM: the certificate, then its chain (required) */
  const char *key_file;    /* PEM: the private key, RSA or EC, unencrypted (required) */
  const char *alpn;        /* ALPN protocol offered, e.g. "http/1.1"; NULL: no ALPN. A client
                              offering only other protocols is refused. Copied */
  unsigned handshake_timeout_ms; /* a handshake not done after this long costs its connection;
                                    0 = 10000 */
} im_tls_opts;

/* Load cert and key and make a context. opts and its strings are copied.
 * On failure returns NULL and, when err is not NULL, writes a one-line
 * reason (NUL-terminated, cut to errlen) into err: a file that cannot be
 * read or parsed, a key that does not match the certificate, or no
 * memory. */
IM_EXTERN im_tls *im_tls_new(const im_tls_opts *opts, char *err, size_t errlen);

/* Load cert_file and key_file again (the paths given to im_tls_new) and
 * use them for every handshake from now on. Live connections are not
 * touched. Returns 0, or IM_EINVAL with a reason in err (as im_tls_new);
 * the old certificate then stays in use. */
IM_EXTERN int im_tls_reload(im_tls *tls, char *err, size_t errlen);

/* From now on tls issues and accepts the session tickets of `from` (one
 * ticket key for both, used behind mbedTLS's own lock, so tls and from may
 * be used on different threads; the key is kept across im_tls_reload of
 * either, and mbedTLS still rotates it every 6 hours). Call it before tls
 * serves its first connection, on the thread that created tls while
 * `from` is not in use elsewhere (at startup). Any number of contexts may
 * share one from. */
IM_EXTERN void im_tls_share_tickets(im_tls *tls, im_tls *from);

/* The handshake timeout in force (ms). */
IM_EXTERN unsigned im_tls_handshake_timeout(const im_tls *tls);

/* Number of times the certificate was loaded (1 after im_tls_new, +1 per
 * successful reload): a cheap way to tell that a reload took effect. */
IM_EXTERN unsigned im_tls_generation(const im_tls *tls);

/* Drop the application's reference. Connections still using the context
 * keep their settings alive until they close; listeners given this im_tls
 * must be freed before (im_event_free, or the embedder's own). NULL is a
 * no-op. */
IM_EXTERN void im_tls_free(im_tls *tls);

#ifdef __cplusplus
}
#endif
#endif
