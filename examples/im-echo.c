/* im-echo: the smallest libim gateway. Accepts any uid with a non-empty
 * token, acks every upstream msg and sends its data back to the sender.
 *
 *   im-echo --ws 127.0.0.1:8080 --tcp 127.0.0.1:8081
 *   im-echo --ws 127.0.0.1:8443 --tls-cert cert.pem --tls-key key.pem   (wss://)
 */
#include <event2/event.h>
#include <libim/im_event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int on_message(im_server *srv, im_conn_id c, const im_msg *m, void *user) {
  (void)user;
  /* ack first so the client sees ack -> echo, then the copy */
  im_ack(srv, c, m->cid, m->id, 0);
  im_msg echo = {IM_STRUCT_SIZE(im_msg), .id = m->id, .data = m->data, .data_len = m->data_len};
  im_send_conn(srv, c, &echo);
  return IM_MSG_DEFER;
}

static void usage(FILE *f) {
  fprintf(f,
          "usage: im-echo [--ws ADDR] [--tcp ADDR] [options]\n"
          "  --ws ADDR            WebSocket listener (path /ws), e.g. 127.0.0.1:8080\n"
          "  --tcp ADDR           raw TCP listener (binary IMP framing)\n"
          "  --max-message BYTES  largest message accepted (default 65536)\n"
          "  --max-output BYTES   per-connection output bound (default 1048576)\n"
          "  --auth-timeout MS    handshake+auth deadline (default 10000)\n"
          "  --heartbeat S        heartbeat interval advertised (default 30)\n"
          "  --idle-timeout MS    close after this long without input (default 2.5 x heartbeat)\n"
          "  --tls-cert FILE      PEM certificate: TLS on both listeners (with --tls-key)\n"
          "  --tls-key FILE       PEM private key of --tls-cert\n"
          "At least one listener is required. SIGINT/SIGTERM close all connections with 1001.\n");
}

static unsigned long num_arg(const char *flag, const char *v) {
  char *end;
  unsigned long n = v ? strtoul(v, &end, 10) : 0;
  if (!v || *end || !*v) {
    fprintf(stderr, "im-echo: %s needs a number\n", flag);
    exit(2);
  }
  return n;
}

int main(int argc, char **argv) {
  const char *ws = NULL, *tcp = NULL, *cert = NULL, *key = NULL;
  im_config cfg;
  im_config_init(&cfg);
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
      usage(stdout);
      return 0;
    } else if (!strcmp(a, "--ws") && v) {
      ws = v;
    } else if (!strcmp(a, "--tcp") && v) {
      tcp = v;
    } else if (!strcmp(a, "--tls-cert") && v) {
      cert = v;
    } else if (!strcmp(a, "--tls-key") && v) {
      key = v;
    } else if (!strcmp(a, "--max-message")) {
      cfg.max_message = (uint32_t)num_arg(a, v);
    } else if (!strcmp(a, "--max-output")) {
      cfg.max_output = (uint32_t)num_arg(a, v);
    } else if (!strcmp(a, "--auth-timeout")) {
      cfg.auth_timeout_ms = (uint32_t)num_arg(a, v);
    } else if (!strcmp(a, "--heartbeat")) {
      cfg.heartbeat_s = (uint32_t)num_arg(a, v);
    } else if (!strcmp(a, "--idle-timeout")) {
      cfg.idle_timeout_ms = (uint32_t)num_arg(a, v);
    } else {
      fprintf(stderr, "im-echo: unknown or incomplete option '%s'\n", a);
      usage(stderr);
      return 2;
    }
    i++;
  }
  if (!ws && !tcp) {
    usage(stderr);
    return 2;
  }
  im_tls *tls = NULL;
  if (cert || key) {
    char err[256];
    im_tls_opts to = {.cert_file = cert, .key_file = key,
                      .handshake_timeout_ms = cfg.auth_timeout_ms};
    if (!(tls = im_tls_new(&to, err, sizeof err))) {
      fprintf(stderr, "im-echo: %s\n", err);
      return 2;
    }
  }
  im_callbacks cb = {IM_STRUCT_SIZE(im_callbacks), .on_message = on_message};
  im_server *srv = im_server_new(&cfg, &cb, NULL);
  struct event_base *base = event_base_new();
  im_event *ev = srv && base ? im_event_new(base, srv) : NULL;
  if (!ev) {
    fprintf(stderr, "im-echo: out of memory or bad configuration\n");
    return 1;
  }
  /* signals first: a supervisor may stop us as soon as it sees the ports */
  im_event_handle_signals(ev, 3000);
  const char *addrs[2] = {ws, tcp};
  const enum im_transport kinds[2] = {IM_TRANSPORT_WS, IM_TRANSPORT_TCP};
  int n = 0;
  for (int i = 0; i < 2; i++) {
    if (!addrs[i]) continue;
    int rc = im_event_listen_tls(ev, kinds[i], addrs[i], tls);
    if (rc < 0) {
      fprintf(stderr, "im-echo: cannot listen on %s: %s\n", addrs[i], im_strerror(rc));
      im_event_free(ev);
      im_tls_free(tls);
      im_server_free(srv);
      event_base_free(base);
      return 1;
    }
    printf("im-echo: %s listening on %s port %d%s\n", i == 0 ? "ws" : "tcp", addrs[i],
           im_event_port(ev, n++), tls ? " (tls)" : "");
  }
  fflush(stdout);
  event_base_dispatch(base);
  im_event_free(ev);
  im_tls_free(tls); /* after the listeners that use it */
  im_server_free(srv);
  event_base_free(base);
  return 0;
}
