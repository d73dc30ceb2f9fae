/* im-chat: a console chat on the libim client library.
 *
 *   im-chat --url ws://127.0.0.1:8080/ws --uid alice --token T --to bob
 *
 * Each line read from stdin is sent to --to (or --group) as
 * {"t":"<line>"}; each message received is printed once as
 * "<from>: <text>". Lines starting with "* " report what the client does
 * (state changes, acks, closes). The client reconnects by itself and
 * resends what was not acknowledged, so the chat survives a server
 * restart. At the end of stdin it waits until the outbox is empty, then
 * exits. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <event2/event.h>
#include <fcntl.h>
#include <getopt.h>
#include <libim/im_client_event.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_URLS 8
#define LINE_MAX_ 4096

typedef struct chat {
  struct event_base *base;
  im_client *cl;
  const char *uid;
  enum im_client_target kind;
  const char *target;
  bool eof;
  char line[LINE_MAX_];
  size_t line_len;
} chat;

static void maybe_exit(chat *c) {
  if (c->eof && im_client_outbox_count(c->cl) == 0) {
    im_client_stop(c->cl);
    event_base_loopexit(c->base, NULL);
  }
}

static void on_state(im_client *cl, enum im_client_state from, enum im_client_state to, void *u) {
  (void)from;
  (void)u;
  const im_client_addr *a = im_client_address(cl);
  if (to == IM_CLIENT_CONNECTING && a)
    printf("* connecting %s:%u\n", a->host, (unsigned)a->port);
  else
    printf("* state %s\n", im_client_state_name(to));
}

static void on_message(im_client *cl, const im_client_msg *m, void *u) {
  (void)cl;
  chat *c = u;
  if (strcmp(m->from, c->uid) == 0)
    return; /* our own message, seen by another of our devices */
  cJSON *d = cJSON_ParseWithLength(m->data, m->data_len);
  const cJSON *t = cJSON_GetObjectItemCaseSensitive(d, "t");
  const char *where = m->group[0] ? m->group : m->room;
  printf("%s%s%s: %s\n", m->from, where[0] ? "@" : "", where,
         cJSON_IsString(t) ? t->valuestring : m->data);
  cJSON_Delete(d);
}

static void on_ack(im_client *cl, const char *cid, const char *id, uint64_t seq, void *u) {
  (void)cl;
  printf("* acked %s id %s seq %llu\n", cid, id, (unsigned long long)seq);
  maybe_exit(u);
}

static void on_error(im_client *cl, unsigned code, const char *reason, const char *cid, void *u) {
  (void)cl;
  printf("* error %u %s%s%s\n", code, reason, cid ? " for " : "", cid ? cid : "");
  maybe_exit(u);
}

static void on_close(im_client *cl, unsigned code, const char *reason, void *u) {
  chat *c = u;
  printf("* closed %u %s\n", code, reason);
  if (im_client_state(cl) == IM_CLIENT_STOPPED && !c->eof) {
    fprintf(stderr, "im-chat: stopped (%u %s)\n", code, reason);
    event_base_loopexit(c->base, NULL);
  }
}

static void send_line(chat *c, const char *s, size_t n) {
  if (n == 0)
    return;
  cJSON *o = cJSON_CreateObject();
  char *text = strndup(s, n);
  cJSON_AddStringToObject(o, "t", text ? text : "");
  char *data = cJSON_PrintUnformatted(o);
  char cid[IM_CLIENT_CID_MAX];
  int rc = data ? im_client_send(c->cl, c->kind, c->target, data, strlen(data), cid) : IM_ENOMEM;
  if (rc == 0)
    printf("* queued %s\n", cid);
  else
    printf("* not sent: %s\n", im_strerror(rc));
  free(data);
  free(text);
  cJSON_Delete(o);
}

static void stdin_cb(evutil_socket_t fd, short what, void *arg) {
  (void)what;
  chat *c = arg;
  char buf[4096];
  ssize_t n = read(fd, buf, sizeof buf);
  if (n < 0 && (errno == EAGAIN || errno == EINTR))
    return;
  if (n <= 0) {
    send_line(c, c->line, c->line_len);
    c->line_len = 0;
    c->eof = true;
    event_base_loopexit(c->base, NULL); /* leaves the loop to drop the stdin event */
    return;
  }
  for (ssize_t i = 0; i < n; i++) {
    if (buf[i] == '\n') {
      send_line(c, c->line, c->line_len);
      c->line_len = 0;
    } else if (c->line_len < sizeof c->line) {
      c->line[c->line_len++] = buf[i];
    }
  }
}

static void usage(void) {
  fprintf(stderr,
          "usage: im-chat --url URL [--url URL...] --uid UID --token TOKEN (--to UID | --group G)\n"
          "               [--device D] [--platform P] [--binary] [--since SEQ]\n"
          "               [--gateways http://HOST:PORT/v1/gateways --api-key KEY]\n"
          "               [--ping-ms MS] [--pong-timeout-ms MS]\n"
          "  URL: ws://HOST:PORT/ws or tcp://HOST:PORT\n");
  exit(2);
}

int main(int argc, char **argv) {
  static const struct option opts[] = {
      {"url", required_argument, 0, 'u'},      {"uid", required_argument, 0, 'i'},
      {"token", required_argument, 0, 't'},    {"to", required_argument, 0, 'o'},
      {"group", required_argument, 0, 'g'},    {"device", required_argument, 0, 'd'},
      {"platform", required_argument, 0, 'p'}, {"binary", no_argument, 0, 'b'},
      {"since", required_argument, 0, 's'},    {"gateways", required_argument, 0, 'G'},
      {"api-key", required_argument, 0, 'k'},  {"ping-ms", required_argument, 0, 'P'},
      {"pong-timeout-ms", required_argument, 0, 'T'}, {0, 0, 0, 0}};
  const char *urls[MAX_URLS];
  im_client_config cfg;
  im_client_config_init(&cfg);
  cfg.platform = "console";
  cfg.device = "im-chat";
  chat c = {0};
  int o;
  while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
    switch (o) {
    case 'u':
      if (cfg.n_urls == MAX_URLS)
        usage();
      urls[cfg.n_urls++] = optarg;
      break;
    case 'i': cfg.uid = optarg; break;
    case 't': cfg.token = optarg; break;
    case 'o': c.kind = IM_CLIENT_TO_USER; c.target = optarg; break;
    case 'g': c.kind = IM_CLIENT_TO_GROUP; c.target = optarg; break;
    case 'd': cfg.device = optarg; break;
    case 'p': cfg.platform = optarg; break;
    case 'b': cfg.binary = true; break;
    case 's': cfg.since = strtoull(optarg, NULL, 10); break;
    case 'G': cfg.gateways_url = optarg; break;
    case 'k': cfg.api_key = optarg; break;
    case 'P': cfg.ping_ms = (unsigned)strtoul(optarg, NULL, 10); break;
    case 'T': cfg.pong_timeout_ms = (unsigned)strtoul(optarg, NULL, 10); break;
    default: usage();
    }
  }
  if (!cfg.uid || !cfg.token || !c.target || (!cfg.n_urls && !cfg.gateways_url))
    usage();
  cfg.urls = urls;
  setvbuf(stdout, NULL, _IOLBF, 0);
  signal(SIGPIPE, SIG_IGN);

  im_client_callbacks cb = {.on_state = on_state,
                            .on_message = on_message,
                            .on_ack = on_ack,
                            .on_error = on_error,
                            .on_close = on_close};
  c.uid = cfg.uid;
  c.base = event_base_new();
  c.cl = c.base ? im_client_new(&cfg, &cb, &c) : NULL;
  im_client_event *ev = c.cl ? im_client_event_new(c.base, c.cl) : NULL;
  if (!ev) {
    fprintf(stderr, "im-chat: bad configuration (check --url) or out of memory\n");
    return 1;
  }
  fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);
  struct event *in = event_new(c.base, 0, EV_READ | EV_PERSIST, stdin_cb, &c);
  event_add(in, NULL);
  im_client_event_start(ev);
  event_base_dispatch(c.base);
  event_free(in);
  int rc = 0;
  if (c.eof) {
    /* stdin ended: stay until every message is acknowledged */
    printf("* end of input, %zu message(s) to deliver\n", im_client_outbox_count(c.cl));
    maybe_exit(&c);
    if (im_client_outbox_count(c.cl) != 0)
      event_base_dispatch(c.base);
  } else {
    rc = 1;
  }
  im_client_event_free(ev);
  im_client_free(c.cl);
  event_base_free(c.base);
  return rc;
}
