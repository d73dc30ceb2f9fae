/* imd: the reference daemon on libim.
 *   imd [--ws ADDR] [--tcp ADDR] [--http ADDR] [--secret S] [--api-key K]
 *       [--data DIR] [--config FILE] [limits, delivery and retention flags:
 *       see usage() / imd(8)]
 *   imd token (--secret S | --secret-file FILE | --data DIR) --uid U [--device D]
 *             [--ttl SECONDS]
 * Flags beat environment variables (IMD_WS, ...), which beat the config
 * file, which beats the defaults. */
#include <errno.h>
#include <event2/event.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <libim/im_guard.h>

#include "hook_client.h"
#include "hooks.h"
#include "imd.h"
#include "log.h"
#include "token.h"

typedef struct option_def {
  const char *flag;     /* --ws */
  const char *env;      /* IMD_WS */
  const char *file_key; /* ws */
  const char *help;
} option_def;

enum { O_WS, O_TCP, O_HTTP, O_SECRET, O_API_KEY, O_DATA, O_CONFIG, O_MAX_MESSAGE, O_HEARTBEAT,
       O_AUTH_TIMEOUT, O_MAX_CONNS, O_ACK_TIMEOUT, O_ACK_RETRIES, O_INBOX_MAX, O_INBOX_DAYS,
       O_DURABLE, O_REDIS, O_NODE, O_REDIS_PREFIX, O_LEASE_TTL, O_ADV_WS, O_ADV_TCP, O_DRAIN_RATE,
       O_MAX_ROOMS, O_MAX_CONNS_USER, O_SECRET_FILE, O_API_KEY_FILE, O_TLS_CERT, O_TLS_KEY,
       O_TLS_PLAIN, O_CONN_RATE, O_CONN_BURST, O_MAX_CONNS_IP, O_BAN, O_BAN_TIME, O_PUSH_RATE,
       O_STATIC, O_HOOK_URL, O_HOOK_SECRET, O_HOOK_CONNECT, O_HOOK_MESSAGE, O_HOOK_PRESENCE,
       O_HOOK_TIMEOUT, O_HOOK_FAIL, O_HOOK_CONNS, O_HOOK_QUEUE, O_MAX_TOKEN_TTL,
       O_RATE_MSGS, O_RATE_USER_MSGS, O_RATE_STRIKES, O_RATE_RECEIVER, O_ROOMS, O_LOG_LEVEL,
       O_LOG_FILE, O_THREADS, O_COMMIT_DELAY, O_COALESCE, O_N };

static const option_def options[O_N] = {
    [O_WS] = {"--ws", "IMD_WS", "ws", "WebSocket listener (path /ws)   [127.0.0.1:8080]"},
    [O_TCP] = {"--tcp", "IMD_TCP", "tcp", "raw TCP listener                [127.0.0.1:8081]"},
    [O_HTTP] = {"--http", "IMD_HTTP", "http", "HTTP API listener               [127.0.0.1:8082]"},
    [O_SECRET] = {"--secret", "IMD_SECRET", "secret",
                  "token HMAC secret, >= 16 bytes  [generated into DATA/secret]"},
    [O_API_KEY] = {"--api-key", "IMD_API_KEY", "api_key",
                   "HTTP API bearer key             [generated into DATA/api-key]"},
    [O_DATA] = {"--data", "IMD_DATA", "data", "data directory                  [./imd-data]"},
    [O_CONFIG] = {"--config", "IMD_CONFIG", NULL, "config file of key = value lines"},
    [O_MAX_MESSAGE] = {"--max-message", "IMD_MAX_MESSAGE", "max_message",
                       "largest client message, bytes  [65536]"},
    [O_HEARTBEAT] = {"--heartbeat", "IMD_HEARTBEAT", "heartbeat",
                     "heartbeat interval advertised, s [30]"},
    [O_AUTH_TIMEOUT] = {"--auth-timeout", "IMD_AUTH_TIMEOUT", "auth_timeout",
                        "ms to authenticate              [10000]"},
    [O_MAX_CONNS] = {"--max-connections", "IMD_MAX_CONNECTIONS", "max_connections",
                     "0 = unlimited; auto: from the open-file limit [auto]"},
    [O_ACK_TIMEOUT] = {"--ack-timeout", "IMD_ACK_TIMEOUT", "ack_timeout",
                       "ms before an unACKed push is resent [18000]"},
    [O_ACK_RETRIES] = {"--ack-retries", "IMD_ACK_RETRIES", "ack_retries",
                       "resends before the connection is closed (4408) [3]"},
    [O_INBOX_MAX] = {"--inbox-max", "IMD_INBOX_MAX", "inbox_max",
                     "messages kept per user, 0 = no limit [10000]"},
    [O_INBOX_DAYS] = {"--inbox-days", "IMD_INBOX_DAYS", "inbox_days",
                      "days messages are kept, 0 = forever [30]"},
    [O_DURABLE] = {"--fsync", "IMD_FSYNC", "fsync",
                 "on: fsync every commit; off: survive crashes, not power loss [on]"},
    [O_COMMIT_DELAY] = {"--commit-delay", "IMD_COMMIT_DELAY", "commit_delay",
                        "us a store commit right after another waits for more [100]"},
    [O_COALESCE] = {"--coalesce", "IMD_COALESCE", "coalesce",
                    "us a loop waits after a wake-up for few connections, 0 = off [100]"},
    [O_REDIS] = {"--redis", "IMD_REDIS", "redis",
                 "HOST:PORT of Redis: run as a cluster node      [off]"},
    [O_NODE] = {"--node", "IMD_NODE", "node", "node name, unique in the cluster [HOSTNAME-WSPORT]"},
    [O_REDIS_PREFIX] = {"--redis-prefix", "IMD_REDIS_PREFIX", "redis_prefix",
                        "prefix of every Redis key         [im:]"},
    [O_LEASE_TTL] = {"--lease-ttl", "IMD_LEASE_TTL", "lease_ttl",
                     "node lease TTL, s (renewed every third) [10]"},
    [O_ADV_WS] = {"--advertise-ws", "IMD_ADVERTISE_WS", "advertise_ws",
                  "WebSocket URL in gateway lists    [ws://WSADDR/ws]"},
    [O_ADV_TCP] = {"--advertise-tcp", "IMD_ADVERTISE_TCP", "advertise_tcp",
                   "raw TCP HOST:PORT in gateway lists [TCPADDR]"},
    [O_DRAIN_RATE] = {"--drain-rate", "IMD_DRAIN_RATE", "drain_rate",
                      "connections closed per second when draining [1000]"},
    [O_MAX_ROOMS] = {"--max-rooms", "IMD_MAX_ROOMS", "max_rooms",
                     "rooms one connection may be in, 0 = unlimited [64]"},
    [O_MAX_CONNS_USER] = {"--max-conns-per-user", "IMD_MAX_CONNS_PER_USER", "max_conns_per_user",
                          "connections of one uid, 0 = unlimited [32]"},
    [O_SECRET_FILE] = {"--secret-file", "IMD_SECRET_FILE", "secret_file",
                       "read the token secret from FILE (first line)"},
    [O_API_KEY_FILE] = {"--api-key-file", "IMD_API_KEY_FILE", "api_key_file",
                        "read the API key from FILE (first line, >= 16 bytes)"},
    [O_TLS_CERT] = {"--tls-cert", "IMD_TLS_CERT", "tls_cert",
                    "PEM certificate (chain): TLS on every listener [off]"},
    [O_TLS_KEY] = {"--tls-key", "IMD_TLS_KEY", "tls_key", "PEM private key of --tls-cert"},
    [O_CONN_RATE] = {"--conn-rate", "IMD_CONN_RATE", "conn_rate",
                     "new connections/s per source IP, 0 = off [100]"},
    [O_CONN_BURST] = {"--conn-burst", "IMD_CONN_BURST", "conn_burst",
                      "burst of --conn-rate (and refusals before a ban) [1000]"},
    [O_MAX_CONNS_IP] = {"--max-conns-per-ip", "IMD_MAX_CONNS_PER_IP", "max_conns_per_ip",
                        "open connections per source IP, 0 = no cap [0]"},
    [O_PUSH_RATE] = {"--push-rate", "IMD_PUSH_RATE", "push_rate",
                     "room messages/s to one connection, 0 = no cap [200]"},
    [O_BAN_TIME] = {"--ban-time", "IMD_BAN_TIME", "ban_time",
                    "first automatic ban, s (x6 per repeat, <= 1 h) [10]"},
    [O_BAN] = {"--ban", "IMD_BAN", "ban",
               "permanent bans: ADDR[/BITS],uid:NAME,...  [none]"},
    [O_TLS_PLAIN] = {"--tls-plain", "IMD_TLS_PLAIN", "tls_plain",
                     "listeners kept plain with TLS on: ws,tcp,http [none]"},
    [O_STATIC] = {"--static", "IMD_STATIC", "static",
                  "serve the files of DIR at / of the HTTP listener [off]"},
    [O_HOOK_URL] = {"--hook-url", "IMD_HOOK_URL", "hook_url",
                    "http:// URL of the back end's hooks (docs/HOOKS.md) [off]"},
    [O_HOOK_SECRET] = {"--hook-secret", "IMD_HOOK_SECRET", "hook_secret",
                       "key of the X-Imd-Signature HMAC of hook bodies [unsigned]"},
    [O_HOOK_CONNECT] = {"--hook-connect", "IMD_HOOK_CONNECT", "hook_connect",
                        "off | instead (of tokens) | also (after tokens) [off]"},
    [O_HOOK_MESSAGE] = {"--hook-message", "IMD_HOOK_MESSAGE", "hook_message",
                        "on: the back end vets 1:1/group messages [off]"},
    [O_HOOK_PRESENCE] = {"--hook-presence", "IMD_HOOK_PRESENCE", "hook_presence",
                         "online/offline events to --hook-url [on]"},
    [O_HOOK_TIMEOUT] = {"--hook-timeout", "IMD_HOOK_TIMEOUT", "hook_timeout",
                        "ms a hook answer may take       [2000]"},
    [O_HOOK_FAIL] = {"--hook-fail", "IMD_HOOK_FAIL", "hook_fail",
                     "open | closed: a failed ask allows or refuses [closed]"},
    [O_HOOK_CONNS] = {"--hook-connections", "IMD_HOOK_CONNECTIONS", "hook_connections",
                      "HTTP connections to the back end [16]"},
    [O_HOOK_QUEUE] = {"--hook-queue", "IMD_HOOK_QUEUE", "hook_queue",
                      "hook requests waiting / events held [4096]"},
    [O_MAX_TOKEN_TTL] = {"--max-token-ttl", "IMD_MAX_TOKEN_TTL", "max_token_ttl",
                         "refuse tokens expiring later than now + this, s [2592000]"},
    [O_RATE_MSGS] = {"--rate-msgs", "IMD_RATE_MSGS", "rate_msgs",
                     "msgs/s per connection (bursts 2x), 0 = no limit [100]"},
    [O_RATE_USER_MSGS] = {"--rate-user-msgs", "IMD_RATE_USER_MSGS", "rate_user_msgs",
                          "msgs/s per uid on this node (bursts 2x), 0 = none [200]"},
    [O_RATE_STRIKES] = {"--rate-strikes", "IMD_RATE_STRIKES", "rate_strikes",
                        "refusals in 10 s before closing (4290), 0 = never [200]"},
    [O_RATE_RECEIVER] = {"--rate-receiver", "IMD_RATE_RECEIVER", "rate_receiver",
                         "msgs per minute one sender may store for one receiver or group, "
                         "0 = no quota [600]"},
    [O_ROOMS] = {"--rooms", "IMD_ROOMS", "rooms",
                 "open: any room; members: only rooms that are groups one is in [open]"},
    [O_LOG_LEVEL] = {"--log-level", "IMD_LOG_LEVEL", "log_level",
                     "debug, info, warn or error      [info]"},
    [O_LOG_FILE] = {"--log-file", "IMD_LOG_FILE", "log_file",
                    "JSON lines to FILE (reopened on SIGHUP) [stderr]"},
    [O_THREADS] = {"--threads", "IMD_THREADS", "threads",
                   "worker threads, each with its own listeners; auto: one per core [auto]"},
};

static const char *defaults[O_N] = {
    [O_WS] = "127.0.0.1:8080", [O_TCP] = "127.0.0.1:8081", [O_HTTP] = "127.0.0.1:8082",
    [O_DATA] = "./imd-data",   [O_MAX_MESSAGE] = "65536",  [O_HEARTBEAT] = "30",
    [O_AUTH_TIMEOUT] = "10000", [O_ACK_TIMEOUT] = "18000",
    [O_ACK_RETRIES] = "3",      [O_INBOX_MAX] = "10000", [O_INBOX_DAYS] = "30",
    [O_DURABLE] = "on",        [O_MAX_ROOMS] = "64",     [O_MAX_CONNS_USER] = "32",
    [O_MAX_CONNS] = "auto",     [O_CONN_RATE] = "100",   [O_CONN_BURST] = "1000",
    [O_LOG_LEVEL] = "info",     [O_MAX_CONNS_IP] = "0",     [O_BAN_TIME] = "10",     [O_PUSH_RATE] = "200",     [O_REDIS_PREFIX] = "im:", [O_LEASE_TTL] = "10",
    [O_DRAIN_RATE] = "1000",
    [O_HOOK_CONNECT] = "off",  [O_HOOK_MESSAGE] = "off", [O_HOOK_PRESENCE] = "on",
    [O_HOOK_TIMEOUT] = "2000", [O_HOOK_FAIL] = "closed", [O_HOOK_CONNS] = "16",
    [O_HOOK_QUEUE] = "4096",
    [O_MAX_TOKEN_TTL] = "2592000", [O_RATE_MSGS] = "100", [O_RATE_USER_MSGS] = "200",
    [O_RATE_STRIKES] = "200",  [O_RATE_RECEIVER] = "600", [O_ROOMS] = "open",
    [O_THREADS] = "auto",      [O_COMMIT_DELAY] = "100",
    [O_COALESCE] = "100",
};

/* Bound of --commit-delay (us): past it the delay is latency, not batching. */
#define IMD_COMMIT_DELAY_MAX 100000u

/* Bounds of --max-token-ttl: a minute to ten years. */
#define IMD_TOKEN_TTL_MIN 60u
#define IMD_TOKEN_TTL_MAX 315360000u

static void usage(FILE *f) {
  fprintf(f, "usage: imd [options]\n"
             "       imd token (--secret S | --secret-file FILE | --data DIR) --uid U [--device D]\n"
             "                 [--ttl SECONDS]\n"
             "         mint a token; the secret comes from --secret, IMD_SECRET, the first line of\n"
             "         --secret-file FILE, or DIR/secret of the data dir --data DIR\n\n"
             "options (each also read from the environment variable shown, or the config file key):\n");
  for (int i = 0; i < O_N; i++)
    fprintf(f, "  %-20s %-22s %s\n", options[i].flag, options[i].env, options[i].help);
  fprintf(f, "  %-20s %-22s %s\n", "--help", "", "this text");
  fprintf(f, "  %-20s %-22s %s\n", "--version", "", "the version, then exit");
  fprintf(f, "\nA listener set to \"off\" is not opened. See imd(8).\n");
}

static char *trim(char *s) {
  while (*s == ' ' || *s == '\t') s++;
  char *e = s + strlen(s);
  while (e > s && (e[-1] == ' ' || e[-1] == '\t' || e[-1] == '\n' || e[-1] == '\r')) *--e = '\0';
  return s;
}

/* Values read from the config file live until exit (options point at them). */
static char *config_values[O_N];

static void free_config_values(void) {
  for (int i = 0; i < O_N; i++) free(config_values[i]);
}

/* Read "key = value" lines; '#' starts a comment. */
static int read_config(const char *path, const char *vals[O_N]) {
  FILE *f = fopen(path, "r");
  if (!f) {
    fprintf(stderr, "imd: cannot read config %s: %s\n", path, strerror(errno));
    return -1;
  }
  char line[1024];
  int lineno = 0, rc = 0;
  while (fgets(line, sizeof line, f)) {
    lineno++;
    char *s = trim(line);
    if (!*s || *s == '#') continue;
    char *eq = strchr(s, '=');
    if (!eq) {
      fprintf(stderr, "imd: %s:%d: expected key = value\n", path, lineno);
      rc = -1;
      break;
    }
    *eq = '\0';
    char *k = trim(s), *v = trim(eq + 1);
    int i = 0;
    while (i < O_N && (!options[i].file_key || strcmp(options[i].file_key, k))) i++;
    if (i == O_N) {
      fprintf(stderr, "imd: %s:%d: unknown key '%s'\n", path, lineno, k);
      rc = -1;
      break;
    }
    if (!vals[i] && !config_values[i]) vals[i] = config_values[i] = strdup(v);
  }
  fclose(f);
  return rc;
}

static int parse_u32(const char *name, const char *v, uint32_t *out) {
  char *end;
  errno = 0;
  unsigned long n = strtoul(v, &end, 10);
  if (errno || *end || !*v || n > UINT32_MAX) {
    fprintf(stderr, "imd: %s: '%s' is not a number\n", name, v);
    return -1;
  }
  *out = (uint32_t)n;
  return 0;
}

/* Cap of "auto" max-connections, whatever the open-file limit. */
#define IMD_AUTO_CONNS_MAX 100000u
/* Descriptors kept back from client connections: listeners, the store,
 * HTTP API clients, the config and secret files. */
#define IMD_FD_RESERVE 128u

/* "auto": every client costs a descriptor, so fit the open-file limit
 * (minus a reserve), at most IMD_AUTO_CONNS_MAX. Beyond it, accept(2) would
 * fail with EMFILE for clients and the API alike; at the limit the engine
 * closes a new connection at once instead. */
static int parse_max_conns(const char *v, uint32_t *out) {
  if (strcmp(v, "auto") != 0) return parse_u32("max-connections", v, out);
  struct rlimit rl;
  uint64_t n = IMD_AUTO_CONNS_MAX;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY)
    n = rl.rlim_cur > 2 * IMD_FD_RESERVE ? rl.rlim_cur - IMD_FD_RESERVE : rl.rlim_cur / 2;
  if (n > IMD_AUTO_CONNS_MAX) n = IMD_AUTO_CONNS_MAX;
  *out = n ? (uint32_t)n : 1;
  return 0;
}

/* Read a small file holding one line; returns 0 and fills out. */
static int read_line_file(const char *path, char *out, size_t cap) {
  FILE *f = fopen(path, "r");
  if (!f) return -1;
  char *ok = fgets(out, (int)cap, f);
  fclose(f);
  if (!ok) return -1;
  char *t = trim(out);
  memmove(out, t, strlen(t) + 1);
  return *out ? 0 : -1;
}

/* Warn when path (a directory or a secret file) can be read by others. */
static void warn_loose_mode(const char *path, const char *what) {
  struct stat st;
  if (stat(path, &st) == 0 && (st.st_mode & 077))
    fprintf(stderr, "imd: warning: %s %s has mode %04o: group and others can reach it; "
                    "chmod %s it\n",
            what, path, (unsigned)(st.st_mode & 07777), S_ISDIR(st.st_mode) ? "700" : "600");
}

/* A credential given as a file: its first line, trimmed. */
static int read_credential(const char *flag, const char *path, char *out, size_t cap) {
  errno = 0;
  if (read_line_file(path, out, cap) < 0) {
    fprintf(stderr, "imd: %s: cannot read a value from %s: %s\n", flag, path,
            errno ? strerror(errno) : "empty file");
    return -1;
  }
  warn_loose_mode(path, "secret file");
  return 0;
}

/* Use DATA/name if present, else generate a new secret into it (0600). */
static int load_or_make(const char *dir, const char *name, char *out, size_t cap) {
  char path[4096];
  snprintf(path, sizeof path, "%s/%s", dir, name);
  if (read_line_file(path, out, cap) == 0) {
    warn_loose_mode(path, "secret file");
    printf("imd: %s read from %s\n", name, path);
    return 0;
  }
  if (imd_secret_generate(out, cap) < 0) return -1;
  int fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0600);
  if (fd < 0 || write(fd, out, strlen(out)) < 0 || write(fd, "\n", 1) < 0 || close(fd) < 0) {
    fprintf(stderr, "imd: cannot write %s: %s\n", path, strerror(errno));
    return -1;
  }
  printf("imd: generated a new %s in %s\n", name, path);
  return 0;
}

static int cmd_token(int argc, char **argv) {
  const char *secret = getenv("IMD_SECRET"), *uid = NULL, *device = NULL, *ttl = "86400";
  const char *data = NULL, *secret_file = NULL;
  for (int i = 2; i < argc; i++) {
    const char *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (!strcmp(argv[i], "--help")) {
      usage(stdout);
      return 0;
    }
    if (!v) {
      fprintf(stderr, "imd token: %s needs a value\n", argv[i]);
      return 2;
    }
    if (!strcmp(argv[i], "--secret")) secret = v;
    else if (!strcmp(argv[i], "--uid")) uid = v;
    else if (!strcmp(argv[i], "--device")) device = v;
    else if (!strcmp(argv[i], "--ttl")) ttl = v;
    else if (!strcmp(argv[i], "--data")) data = v;
    else if (!strcmp(argv[i], "--secret-file")) secret_file = v;
    else {
      fprintf(stderr, "imd token: unknown option '%s'\n", argv[i]);
      return 2;
    }
    i++;
  }
  static char from_file[256];
  if (secret_file) {
    if (read_credential("token --secret-file", secret_file, from_file, sizeof from_file) < 0)
      return 2;
    secret = from_file;
  } else if (!secret && data) {
    char path[4096];
    snprintf(path, sizeof path, "%s/secret", data);
    if (read_line_file(path, from_file, sizeof from_file) == 0) secret = from_file;
  }
  uint32_t ttl_s, max_ttl_s;
  if (!secret || !uid || parse_u32("--ttl", ttl, &ttl_s) < 0) {
    fprintf(stderr, "imd token: needs --secret, --secret-file FILE or --data DIR, and --uid\n");
    return 2;
  }
  /* a token imd would refuse is no use: stay within the default lifetime */
  if (parse_u32("max-token-ttl", defaults[O_MAX_TOKEN_TTL], &max_ttl_s) < 0 || ttl_s < 1 ||
      ttl_s > max_ttl_s) {
    fprintf(stderr, "imd token: --ttl: 1 to %u seconds (imd's default --max-token-ttl)\n",
            max_ttl_s);
    return 2;
  }
  uint8_t key[256];
  int kl = imd_secret_parse(secret, key, sizeof key);
  if (kl < 0) {
    fprintf(stderr, "imd token: the secret must be at least 16 bytes\n");
    return 2;
  }
  char tok[IMD_TOKEN_MAX];
  uint64_t now_ms = imd_wall_ms();
  if (imd_token_mint_v2(key, (size_t)kl, uid, device, (int64_t)now_ms,
                        (int64_t)(now_ms / 1000) + ttl_s, tok, sizeof tok) < 0) {
    fprintf(stderr, "imd token: cannot mint a token for that uid/device\n");
    return 2;
  }
  printf("%s\n", tok);
  return 0;
}

/* Largest --max-message: the engine keeps message and frame lengths in
 * 32-bit counters and the HTTP body limit is 4 x max_message + 4096; 16 MiB
 * keeps every such sum far from overflow (and is more than any chat
 * message needs). */
#define IMD_MAX_MESSAGE_MAX (16u << 20)
#define IMD_API_KEY_MIN 16

/* store_opts.keep_age_s counts seconds in 32 bits: 100 years fit */
#define IMD_INBOX_DAYS_MAX 36500u

static bool enabled(const char *addr) { return addr && *addr && strcmp(addr, "off") != 0; }

/* The cores this process may run on: its CPU affinity (taskset, a cpuset
 * cgroup), else the online ones. */
static long usable_cores(void) {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
  return sysconf(_SC_NPROCESSORS_ONLN);
}

/* --threads: auto is the number of usable cores. */
static int parse_threads(const char *v, unsigned *out) {
  uint32_t n;
  if (!strcmp(v, "auto")) {
    long cores = usable_cores();
    n = cores < 1 ? 1 : cores > IM_GROUP_MAX ? IM_GROUP_MAX : (uint32_t)cores;
  } else if (parse_u32("threads", v, &n) < 0) {
    return -1;
  } else if (n < 1 || n > IM_GROUP_MAX) {
    fprintf(stderr, "imd: threads: 1 to %d, or auto\n", IM_GROUP_MAX);
    return -1;
  }
  *out = n;
  return 0;
}

/* One of two words: 0 for `no`, 1 for `yes`, -1 (and a message) for neither. */
static int parse_choice(const char *name, const char *v, const char *no, const char *yes) {
  if (!strcmp(v, no)) return 0;
  if (!strcmp(v, yes)) return 1;
  fprintf(stderr, "imd: %s: '%s' or '%s', not '%s'\n", name, no, yes, v);
  return -1;
}

/* The --hook-* options (docs/HOOKS.md). */
static int parse_hooks(const char *vals[O_N], imd_hooks_config *h) {
  memset(h, 0, sizeof *h);
  h->url = enabled(vals[O_HOOK_URL]) ? vals[O_HOOK_URL] : NULL;
  h->secret = vals[O_HOOK_SECRET] && *vals[O_HOOK_SECRET] ? vals[O_HOOK_SECRET] : NULL;
  const char *cm = vals[O_HOOK_CONNECT];
  h->connect = !strcmp(cm, "off")       ? IMD_HOOK_CONNECT_OFF
               : !strcmp(cm, "instead") ? IMD_HOOK_CONNECT_INSTEAD
               : !strcmp(cm, "also")    ? IMD_HOOK_CONNECT_ALSO
                                        : -1;
  if (h->connect < 0) {
    fprintf(stderr, "imd: hook-connect: 'off', 'instead' or 'also', not '%s'\n", cm);
    return -1;
  }
  int msg = parse_choice("hook-message", vals[O_HOOK_MESSAGE], "off", "on");
  int pres = parse_choice("hook-presence", vals[O_HOOK_PRESENCE], "off", "on");
  int open = parse_choice("hook-fail", vals[O_HOOK_FAIL], "closed", "open");
  if (msg < 0 || pres < 0 || open < 0 ||
      parse_u32("hook-timeout", vals[O_HOOK_TIMEOUT], &h->timeout_ms) < 0 ||
      parse_u32("hook-connections", vals[O_HOOK_CONNS], &h->max_conns) < 0 ||
      parse_u32("hook-queue", vals[O_HOOK_QUEUE], &h->max_queue) < 0)
    return -1;
  h->message = msg;
  h->presence = pres;
  h->fail_open = open;
  if (h->timeout_ms < 1 || h->timeout_ms > 600000 || h->max_conns < 1 ||
      h->max_conns > 1024 || h->max_queue < 1) {
    fprintf(stderr, "imd: hook-timeout: 1 to 600000 ms, hook-connections: 1 to 1024, "
                    "hook-queue: at least 1\n");
    return -1;
  }
  if (!h->url && (h->connect || h->message)) {
    fprintf(stderr, "imd: --hook-connect and --hook-message need --hook-url\n");
    return -1;
  }
  if (h->url && strncmp(h->url, "http://", 7)) {
    fprintf(stderr, "imd: hook-url: only http:// URLs are supported (https:// is not: put a "
                    "local TLS proxy in front of the back end), not '%s'\n", h->url);
    return -1;
  }
  if (!h->url) h->presence = false;
  return 0;
}

int main(int argc, char **argv) {
  if (argc > 1 && !strcmp(argv[1], "token")) return cmd_token(argc, argv);
  const char *vals[O_N] = {0};
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--version")) {
      printf("imd %s (libim)\n", IMD_VERSION);
      return 0;
    }
    if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
      usage(stdout);
      return 0;
    }
    int k = 0;
    while (k < O_N && strcmp(options[k].flag, argv[i])) k++;
    if (k == O_N || i + 1 >= argc) {
      fprintf(stderr, k == O_N ? "imd: unknown option '%s'\n" : "imd: %s needs a value\n", argv[i]);
      usage(stderr);
      return 2;
    }
    vals[k] = argv[++i];
    if (k == O_SECRET || k == O_API_KEY)
      fprintf(stderr, "imd: warning: %s on the command line is visible to every local user "
                      "(/proc/PID/cmdline); prefer %s-file\n", options[k].flag, options[k].flag);
  }
  for (int k = 0; k < O_N; k++)
    if (!vals[k]) vals[k] = getenv(options[k].env);
  atexit(free_config_values);
  if (vals[O_CONFIG] && read_config(vals[O_CONFIG], vals) < 0) return 2;
  for (int k = 0; k < O_N; k++)
    if (!vals[k]) vals[k] = defaults[k];

  static imd d;
  d.main = &d;
  d.cfg.ws_addr = vals[O_WS];
  d.cfg.tcp_addr = vals[O_TCP];
  d.cfg.http_addr = vals[O_HTTP];
  d.cfg.data_dir = vals[O_DATA];
  im_config icfg;
  im_config_init(&icfg);
  imd_store_opts store_opts = {0};
  uint32_t inbox_days;
  if (parse_u32("max-message", vals[O_MAX_MESSAGE], &icfg.max_message) < 0 ||
      parse_u32("heartbeat", vals[O_HEARTBEAT], &icfg.heartbeat_s) < 0 ||
      parse_u32("auth-timeout", vals[O_AUTH_TIMEOUT], &icfg.auth_timeout_ms) < 0 ||
      parse_max_conns(vals[O_MAX_CONNS], &icfg.max_connections) < 0 ||
      parse_u32("ack-timeout", vals[O_ACK_TIMEOUT], &icfg.ack_timeout_ms) < 0 ||
      parse_u32("ack-retries", vals[O_ACK_RETRIES], &icfg.ack_retries) < 0 ||
      parse_u32("inbox-max", vals[O_INBOX_MAX], &store_opts.keep_count) < 0 ||
      parse_u32("inbox-days", vals[O_INBOX_DAYS], &inbox_days) < 0 ||
      parse_u32("max-rooms", vals[O_MAX_ROOMS], &icfg.max_rooms) < 0 ||
      parse_u32("max-conns-per-user", vals[O_MAX_CONNS_USER], &icfg.max_conns_per_user) < 0 ||
      parse_u32("push-rate", vals[O_PUSH_RATE], &icfg.max_push_rate) < 0 ||
      parse_u32("max-token-ttl", vals[O_MAX_TOKEN_TTL], &d.cfg.max_token_ttl_s) < 0 ||
      parse_u32("rate-msgs", vals[O_RATE_MSGS], &icfg.max_msg_rate) < 0 ||
      parse_u32("rate-user-msgs", vals[O_RATE_USER_MSGS], &icfg.max_user_msg_rate) < 0 ||
      parse_u32("rate-strikes", vals[O_RATE_STRIKES], &icfg.max_rate_strikes) < 0 ||
      parse_u32("rate-receiver", vals[O_RATE_RECEIVER], &d.cfg.rate_receiver) < 0)
    return 2;
  if (d.cfg.max_token_ttl_s < IMD_TOKEN_TTL_MIN || d.cfg.max_token_ttl_s > IMD_TOKEN_TTL_MAX) {
    fprintf(stderr, "imd: max-token-ttl: %u to %u seconds\n", IMD_TOKEN_TTL_MIN,
            IMD_TOKEN_TTL_MAX);
    return 2;
  }
  if (icfg.max_msg_rate > 1000000 || icfg.max_user_msg_rate > 1000000) {
    fprintf(stderr, "imd: rate-msgs, rate-user-msgs: at most 1000000\n");
    return 2;
  }
  if (strcmp(vals[O_ROOMS], "open") && strcmp(vals[O_ROOMS], "members")) {
    fprintf(stderr, "imd: rooms: 'open' or 'members', not '%s'\n", vals[O_ROOMS]);
    return 2;
  }
  d.cfg.rooms_members = !strcmp(vals[O_ROOMS], "members");
  if (icfg.max_message < 16 || icfg.max_message > IMD_MAX_MESSAGE_MAX) {
    fprintf(stderr, "imd: max-message: between 16 and %u bytes\n", IMD_MAX_MESSAGE_MAX);
    return 2;
  }
  if ((vals[O_SECRET] && vals[O_SECRET_FILE]) || (vals[O_API_KEY] && vals[O_API_KEY_FILE])) {
    fprintf(stderr, "imd: give %s or %s-file, not both\n",
            vals[O_SECRET] && vals[O_SECRET_FILE] ? "--secret" : "--api-key",
            vals[O_SECRET] && vals[O_SECRET_FILE] ? "--secret" : "--api-key");
    return 2;
  }
  if (icfg.ack_timeout_ms < 100 || inbox_days > IMD_INBOX_DAYS_MAX) {
    fprintf(stderr, "imd: %s\n", inbox_days > IMD_INBOX_DAYS_MAX ? "inbox-days: at most 36500"
                                                       : "ack-timeout: at least 100 ms");
    return 2;
  }
  store_opts.keep_age_s = inbox_days * 86400u;
  d.cfg.max_connections = icfg.max_connections; /* for /metrics */
  if (strcmp(vals[O_DURABLE], "on") && strcmp(vals[O_DURABLE], "off")) {
    fprintf(stderr, "imd: fsync: 'on' or 'off', not '%s'\n", vals[O_DURABLE]);
    return 2;
  }
  store_opts.no_fsync = !strcmp(vals[O_DURABLE], "off");
  if (parse_u32("commit-delay", vals[O_COMMIT_DELAY], &store_opts.commit_delay_us) < 0) return 2;
  if (store_opts.commit_delay_us > IMD_COMMIT_DELAY_MAX) {
    fprintf(stderr, "imd: commit-delay: at most %u microseconds\n", IMD_COMMIT_DELAY_MAX);
    return 2;
  }
  if (parse_u32("coalesce", vals[O_COALESCE], &d.cfg.coalesce_us) < 0) return 2;
  if (d.cfg.coalesce_us > IM_EVENT_COALESCE_MAX) {
    fprintf(stderr, "imd: coalesce: at most %u microseconds\n", IM_EVENT_COALESCE_MAX);
    return 2;
  }
  if (parse_u32("lease-ttl", vals[O_LEASE_TTL], &d.cfg.lease_ttl_s) < 0 ||
      parse_u32("drain-rate", vals[O_DRAIN_RATE], &d.cfg.drain_rate) < 0)
    return 2;
  if (d.cfg.lease_ttl_s < 1 || d.cfg.lease_ttl_s > 3600 || d.cfg.drain_rate < 1) {
    fprintf(stderr, "imd: %s\n", d.cfg.drain_rate < 1 ? "drain-rate: at least 1"
                                                      : "lease-ttl: 1 to 3600 seconds");
    return 2;
  }
  d.cfg.redis_addr = enabled(vals[O_REDIS]) ? vals[O_REDIS] : NULL;
  d.cfg.node = vals[O_NODE];
  d.cfg.redis_prefix = vals[O_REDIS_PREFIX];
  d.cfg.advertise_ws = vals[O_ADV_WS];
  d.cfg.advertise_tcp = vals[O_ADV_TCP];
  d.cfg.static_dir = enabled(vals[O_STATIC]) ? vals[O_STATIC] : NULL;
  struct stat static_st;
  if (d.cfg.static_dir && (stat(d.cfg.static_dir, &static_st) < 0 || !S_ISDIR(static_st.st_mode))) {
    fprintf(stderr, "imd: static: %s is not a directory\n", d.cfg.static_dir);
    return 2;
  }
  imd_hooks_config hooks;
  if (parse_hooks(vals, &hooks) < 0) return 2;
  unsigned threads;
  if (parse_threads(vals[O_THREADS], &threads) < 0)
    return 2;
  /* the connection limit (the fd budget) is the process's: the workers count
   * it together (im_shared, as every engine limit); so are the hooks' back
   * end connections and queue (a budget of their clients) */
  if (threads > 1 && hooks.url && !(hooks.budget = hook_budget_new(hooks.max_conns, hooks.max_queue))) {
    fprintf(stderr, "imd: out of memory\n");
    return 1;
  }
  /* everything imd creates (the data dir, secret, api-key, groups.json,
   * the store) is for its own user only */
  umask(077);
  if (imd_log_open(vals[O_LOG_FILE], vals[O_LOG_LEVEL]) < 0) return 2;
  atexit(imd_log_close);
  if (mkdir(d.cfg.data_dir, 0700) < 0 && errno != EEXIST) {
    fprintf(stderr, "imd: cannot create data dir %s: %s\n", d.cfg.data_dir, strerror(errno));
    return 1;
  }
  warn_loose_mode(d.cfg.data_dir, "data dir");
  char secret_text[256], key_text[256];
  const char *secret = vals[O_SECRET];
  if (!secret && vals[O_SECRET_FILE]) {
    if (read_credential("secret-file", vals[O_SECRET_FILE], secret_text, sizeof secret_text) < 0)
      return 2;
    secret = secret_text;
  }
  if (!secret) {
    if (load_or_make(d.cfg.data_dir, "secret", secret_text, sizeof secret_text) < 0) return 1;
    secret = secret_text;
  }
  int sl = imd_secret_parse(secret, d.secret, sizeof d.secret);
  if (sl < 0) {
    fprintf(stderr, "imd: the secret must be at least 16 bytes\n");
    return 2;
  }
  d.secret_len = (size_t)sl;
  const char *api_key = vals[O_API_KEY];
  if (!api_key && vals[O_API_KEY_FILE]) {
    if (read_credential("api-key-file", vals[O_API_KEY_FILE], key_text, sizeof key_text) < 0)
      return 2;
    api_key = key_text;
  }
  if (!api_key) {
    if (load_or_make(d.cfg.data_dir, "api-key", key_text, sizeof key_text) < 0) return 1;
    api_key = key_text;
  }
  if (strlen(api_key) < IMD_API_KEY_MIN) {
    fprintf(stderr, "imd: the API key must be at least %d bytes\n", IMD_API_KEY_MIN);
    return 2;
  }
  snprintf(d.api_key, sizeof d.api_key, "%s", api_key);

  char revoked_path[4096], err[512];
  snprintf(revoked_path, sizeof revoked_path, "%s/revoked", d.cfg.data_dir);
  if (!(d.revoked = imd_revoke_open(revoked_path, err, sizeof err))) {
    fprintf(stderr, "imd: cannot read revocations: %s\n", err);
    return 1;
  }
  if (d.cfg.rate_receiver && !(d.quota = imd_quota_new(d.cfg.rate_receiver))) {
    fprintf(stderr, "imd: out of memory\n");
    imd_revoke_free(d.revoked);
    return 1;
  }

  im_callbacks cb;
  imd_chat_callbacks(&cb);
  signal(SIGPIPE, SIG_IGN);
  /* SIGHUP reloads the TLS certificate (tls.c catches it then); without TLS
   * it must not end the daemon (logrotate and terminals send it) */
  signal(SIGHUP, SIG_IGN);
  d.base = event_base_new();
  d.srv = d.base ? im_server_new(&icfg, &cb, &d) : NULL;
  d.ev = d.srv ? im_event_new(d.base, d.srv) : NULL;
  if (d.srv) imd_metrics_start(&d);
  if (!d.ev) {
    fprintf(stderr, "imd: cannot start the engine (bad configuration or no memory)\n");
    return 1;
  }
  d.start_wall_ms = imd_wall_ms();
  im_guard_config guard;
  im_guard_config_init(&guard);
  if (parse_u32("conn-rate", vals[O_CONN_RATE], &guard.conn_rate) < 0 ||
      parse_u32("conn-burst", vals[O_CONN_BURST], &guard.conn_burst) < 0 ||
      parse_u32("max-conns-per-ip", vals[O_MAX_CONNS_IP], &guard.max_conns_per_source) < 0 ||
      parse_u32("ban-time", vals[O_BAN_TIME], &guard.ban_first_s) < 0)
    return 2;
  if ((guard.conn_rate && !guard.conn_burst) || im_server_set_guard(d.srv, &guard) < 0) {
    fprintf(stderr, "imd: conn-burst: at least 1 with a conn-rate\n");
    return 2;
  }
  im_event_set_coalesce(d.ev, d.cfg.coalesce_us); /* checked above */
  if (imd_bans_init(&d, vals[O_BAN]) < 0) return 2;
  if (imd_tls_init(&d, vals[O_TLS_CERT], vals[O_TLS_KEY], vals[O_TLS_PLAIN],
                   icfg.auth_timeout_ms) < 0)
    return 2;
  /* signals first: a supervisor may stop us as soon as it sees the ports */
  im_event_handle_signals(d.ev, 3000);
  im_event_set_reuseport(d.ev, threads > 1); /* the other workers listen on the same ports */
  int rc = 0, n = 0;
  const char *addrs[2] = {d.cfg.ws_addr, d.cfg.tcp_addr};
  const enum im_transport kinds[2] = {IM_TRANSPORT_WS, IM_TRANSPORT_TCP};
  for (int i = 0; i < 2 && rc == 0; i++) {
    if (!enabled(addrs[i])) continue;
    im_tls *tls = imd_tls_for(&d, i ? "tcp" : "ws");
    if (im_event_listen_tls(d.ev, kinds[i], addrs[i], tls) < 0) {
      fprintf(stderr, "imd: cannot listen on %s: %s\n", addrs[i], strerror(errno));
      rc = 1;
      break;
    }
    d.ports[i] = im_event_port(d.ev, n++);
    printf("imd: %s listening on %s port %d%s\n", i ? "tcp" : "ws", addrs[i], d.ports[i],
           tls ? " (tls)" : "");
  }
  if (rc == 0 && enabled(d.cfg.http_addr)) {
    http_limits lim = {.max_body = (size_t)icfg.max_message * 4 + 4096, .admit = imd_api_admit,
                       .reuseport = threads > 1};
    d.http = http_server_new_tls(d.base, d.cfg.http_addr, &lim, imd_tls_for(&d, "http"),
                                 imd_api_handle, &d);
    if (!d.http) {
      fprintf(stderr, "imd: cannot listen on %s: %s\n", d.cfg.http_addr, strerror(errno));
      rc = 1;
    } else {
      http_server_set_done(d.http, imd_api_done);
      printf("imd: http listening on %s port %d%s\n", d.cfg.http_addr, http_server_port(d.http),
             imd_tls_for(&d, "http") ? " (tls)" : "");
    }
  }
  /* the node (cluster link, drain) once the ports are known: they are
   * what it advertises; with workers, after the group it serves */
  if (rc == 0 && ((threads > 1 && imd_workers_group(&d, threads) < 0) || imd_node_start(&d) < 0 ||
                  imd_delivery_init(&d, &store_opts) < 0 ||
                  imd_hooks_start(&d, &hooks) < 0 ||
                  (threads > 1 && imd_workers_start(&d, threads, &guard, &hooks) < 0)))
    rc = 1;
  if (rc == 0) {
    printf("imd: data in %s\n", d.cfg.data_dir);
    printf("imd: at most %u connections (0: no limit), %u per user\n", icfg.max_connections,
           icfg.max_conns_per_user);
    fflush(stdout);
    event_base_dispatch(d.base);
  }
  imd_workers_stop(&d);  /* the other workers' loops end too */
  imd_hooks_stop(&d);    /* drops unanswered asks: their clients resend */
  imd_delivery_free(&d); /* completes what is outstanding */
  imd_workers_free(&d);  /* after the store: the workers' views of it */
  imd_node_stop(&d);
  http_server_free(d.http);
  im_event_free(d.ev);
  imd_tls_free(&d); /* after every listener that used it */
  imd_bans_free(&d);
  im_server_free(d.srv);
  event_base_free(d.base);
  imd_quota_free(d.quota);
  imd_revoke_free(d.revoked);
  hook_budget_free(hooks.budget); /* after every worker's hooks */
  return rc;
}
