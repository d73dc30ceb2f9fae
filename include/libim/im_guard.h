/* Abuse protection at the door (R25): per-source connection rate limits with
 * escalating bans, a per-source connection cap, and a blacklist of
 * addresses and CIDR ranges with TTLs.
 *
 * The guard runs inside im_server_accept(): a refused connection gets id 0
 * (the driver closes the socket at once, before any TLS or WebSocket
 * handshake) and costs one keyed-hash lookup. A source is the client's IP
 * address as given in im_server_accept's peer ("1.2.3.4:5", "[::1]:5").
 *
 * Each source has a token bucket of `conn_burst` connections refilled at
 * `conn_rate` per second. A source that is refused `conn_burst` times while
 * over its rate is banned automatically for `ban_first_s` seconds, then for
 * six times longer at each repeat (10 s, 1 min, 6 min, ... up to
 * `ban_max_s`); its record of offences is forgotten after an hour of good
 * behaviour. Everyone else keeps connecting at full speed meanwhile.
 *
 * Engines attached to one im_shared (<libim/im_shared.h>; the members of an
 * im_group are) use one guard: the calls below on any of them act on it
 * (a mutex inside makes that safe from their threads), except
 * im_guard_kick, which closes the calling engine's connections only.
 */
#ifndef LIBIM_IM_GUARD_H
#define LIBIM_IM_GUARD_H

#include <libim/im.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct im_guard_config {
  uint32_t conn_rate;        /* new connections per second per source; 0 = no rate limit. 20 */
  uint32_t conn_burst;       /* bucket size (and refusals before a ban). 40 */
  uint32_t max_conns_per_source; /* open connections per source; 0 = no cap. 0 */
  uint32_t ban_first_s;      /* first automatic ban. 10 */
  uint32_t ban_max_s;        /* longest automatic ban. 3600 */
  uint32_t max_sources;      /* sources tracked at once (memory bound); beyond it new
                                sources are admitted untracked. 65536 */
} im_guard_config;

IM_EXTERN void im_guard_config_init(im_guard_config *g);

/* Turn the guard on (g copied) or off (NULL). Bans and blacklist entries
 * survive a reconfiguration. Returns 0, IM_EINVAL (burst 0 with a rate),
 * IM_ENOMEM. */
IM_EXTERN int im_server_set_guard(im_server *srv, const im_guard_config *g);

/* Refuse connections from an address or range ("10.0.0.0/8", "::1",
 * "2001:db8::/32") for ttl_s seconds (0: until unbanned). An existing entry
 * for the same range gets the new TTL. Connections already open from it
 * are not touched (close them with im_guard_kick). Works with the guard
 * off too. Returns 0, IM_EINVAL (not an address/range), IM_ELIMIT (1024
 * entries), IM_ENOMEM. */
IM_EXTERN int im_guard_ban(im_server *srv, const char *cidr, uint32_t ttl_s);
/* Remove a blacklist entry or lift an automatic ban of that address.
 * Returns 0 or IM_ENOENT. */
IM_EXTERN int im_guard_unban(im_server *srv, const char *cidr);
/* Close the open connections whose source is in cidr with code/reason
 * (as im_conn_close: 1000, 1001 or 3000-4999).
 * Returns the number closed or IM_EINVAL. */
IM_EXTERN int im_guard_kick(im_server *srv, const char *cidr, int code, const char *reason);
/* The canonical spelling of an address or range, as im_guard_bans lists
 * it ("10.1.2.3" -> "10.1.2.3/32", "10.1.2.3/8" -> "10.0.0.0/8",
 * "2001:DB8::1/32" -> "2001:db8::/32"), written to out (NUL-terminated;
 * 64 bytes are always enough). Returns 0, or IM_EINVAL (not an address or
 * range, or cap too small; out is then empty when cap > 0). */
IM_EXTERN int im_guard_canon(const char *cidr, char *out, size_t cap);

typedef struct im_ban {
  const char *cidr;          /* "1.2.3.4/32", ... (valid during the callback) */
  uint64_t until_ms;         /* wall-clock ms it ends; 0 = until unbanned */
  int automatic;             /* 1: issued by the rate limit; 0: im_guard_ban */
  uint32_t level;            /* automatic: how many times this source was banned */
} im_ban;
/* fn(ban, arg) for every active ban and blacklist entry. Returns the count.
 * fn runs under the guard's lock: it must not call the im_guard functions
 * of this server (or of one sharing its guard). */
IM_EXTERN size_t im_guard_bans(im_server *srv, void (*fn)(const im_ban *b, void *arg), void *arg);

typedef struct im_guard_stats {
  uint64_t refused_rate;     /* over the source's rate */
  uint64_t refused_banned;   /* from a banned or blacklisted source */
  uint64_t refused_cap;      /* over max_conns_per_source */
  uint64_t bans;             /* automatic bans issued */
  uint64_t sources;          /* sources tracked now */
} im_guard_stats;
IM_EXTERN void im_guard_get_stats(const im_server *srv, im_guard_stats *st);

#ifdef __cplusplus
}
#endif
#endif
