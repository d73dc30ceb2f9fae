/* The client core: connection state machine, framing (WebSocket client or
 * raw TCP), IMP packets, delivery rules (ACK, de-duplication, in-order
 * delivery with sync paging), the outbox, heartbeats and reconnects.
 * No I/O and no clock: see <libim/im_client.h>. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/types.h>
#include <time.h>

#include "client/client.h"
#include "proto/imp.h"
#include "proto/tcp_frame.h"
#include "proto/ws_frame.h"
#include "proto/ws_handshake.h"

#define ENVELOPE_MAX 4096u      /* a downstream msg's fields beyond its data */
#define OWN_MAX 64              /* own seqs (from acks) held above contiguous */
#define RETRY_5XX_MS 1000u      /* resend delay after a 5xx for an outbox message */
#define DEFAULT_HB_S 30u
#define TARGET_MAX 128u
#define MAX_WAIT_S 3600u        /* caps a server's hb and goaway reconnect_ms */

struct im_client {
  im_client_config cfg;       /* strings below are our copies */
  char *fetch_url;            /* gateways_url with ?uid=, or NULL */
  im_client_callbacks cb;
  void *user;
  im_client_io io;
  void *io_user;

  gw_list conf, fetched;
  bool fetched_valid, fetch_tried, fetch_pending, refetch;
  uint64_t fetched_at;
  size_t gw_idx;
  unsigned fail_round;        /* failed attempts in a row, for the refetch */
  const gw_addr *cur;

  enum im_client_state state;
  uint64_t now, deadline;
  uint64_t authed_at;         /* auth_ok of the current connection */
  unsigned attempt;           /* backoff exponent */
  unsigned gen;               /* bumped when a connection ends */
  bool stopping, auth_refused, background;

  /* the current connection */
  enum im_transport transport;
  bool bin;                   /* send binary IMP */
  char ws_key[25];
  uint8_t *in;
  size_t in_len, in_cap, in_limit;
  uint8_t *frag;              /* WebSocket message being reassembled */
  size_t frag_len;
  uint8_t frag_op;
  uint8_t *out;
  size_t out_off, out_len, out_cap;
  uint64_t last_rx, last_tx;
  bool ping_out;
  unsigned hb_s;
  unsigned close_code;
  char close_reason[124];
  bool goaway;
  uint64_t goaway_at;

  /* delivery */
  uint64_t contiguous;
  uint64_t own[OWN_MAX];
  unsigned own_n;
  id_window ids;
  bool sync_running, page_msgs;
  uint64_t sync_since, jump_seen, page_first_jump;

  outbox ob;
  char **rooms;               /* joined (im_client_join), joined again after every auth_ok */
  size_t n_rooms, cap_rooms;
  uint64_t cid_counter;
  char cid_prefix[17];

  uint8_t *enc;               /* encoded packet */
  size_t enc_cap;
  char *scratch;              /* JSON unescape scratch, in_limit bytes */
  char *arena;                /* NUL-terminated copies for callbacks */
  size_t arena_len, arena_cap;
};

/* ---- small helpers ------------------------------------------------------ */

static uint32_t sys_rand(void *u) {
  (void)u;
  uint32_t v;
  if (getrandom(&v, sizeof v, 0) == (ssize_t)sizeof v)
    return v;
  /* No entropy source: still unpredictable enough for jitter and masks. */
  static uint64_t x;
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  x ^= (uint64_t)ts.tv_nsec * 0x9e3779b97f4a7c15ull + (uint64_t)ts.tv_sec;
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  return (uint32_t)(x >> 16);
}

static uint32_t rnd(im_client *cl) { return cl->cfg.rand(cl->cfg.rand_user); }

uint64_t client_backoff_ms(unsigned base, unsigned cap, unsigned attempt, uint32_t r) {
  uint64_t d = (uint64_t)base << (attempt < 32 ? attempt : 32);
  if (d > cap || attempt >= 32)
    d = cap;
  return ((uint64_t)r * (d + 1)) >> 32;
}

static char *dup_str(const char *s) {
  if (!s)
    return NULL;
  size_t n = strlen(s) + 1;
  char *c = malloc(n);
  if (c)
    memcpy(c, s, n);
  return c;
}

const char *im_client_state_name(enum im_client_state s) {
  static const char *const names[] = {"stopped", "waiting", "resolving", "connecting",
                                      "handshake", "authenticating", "syncing", "open"};
  return (unsigned)s < sizeof names / sizeof names[0] ? names[s] : "?";
}

static void set_state(im_client *cl, enum im_client_state s) {
  enum im_client_state old = cl->state;
  if (old == s)
    return;
  cl->state = s;
  if (cl->cb.on_state)
    cl->cb.on_state(cl, old, s, cl->user);
}

static bool connected_state(const im_client *cl) { return cl->state >= IM_CLIENT_HANDSHAKE; }
static bool authed(const im_client *cl) { return cl->state >= IM_CLIENT_SYNCING; }

/* A NUL-terminated copy of a decoded span, valid until the next packet. The
 * arena holds in_limit + one byte per key, more than any packet needs. */
static const char *cstr(im_client *cl, const imp_packet *p, unsigned key) {
  if (!IMP_HAS(p, key))
    return "";
  size_t n = p->str[key].n;
  if (cl->arena_len + n + 1 > cl->arena_cap)
    return "";
  char *s = cl->arena + cl->arena_len;
  memcpy(s, p->str[key].p, n);
  s[n] = '\0';
  cl->arena_len += n + 1;
  return s;
}

/* ---- output --------------------------------------------------------------- */

static int out_reserve(im_client *cl, size_t n) {
  if (cl->out_off == cl->out_len)
    cl->out_off = cl->out_len = 0;
  if (cl->out_cap - cl->out_len >= n)
    return 0;
  if (cl->out_off > 0) {
    memmove(cl->out, cl->out + cl->out_off, cl->out_len - cl->out_off);
    cl->out_len -= cl->out_off;
    cl->out_off = 0;
    if (cl->out_cap - cl->out_len >= n)
      return 0;
  }
  size_t cap = cl->out_cap ? cl->out_cap : 4096;
  while (cap - cl->out_len < n)
    cap *= 2;
  uint8_t *nb = realloc(cl->out, cap);
  if (!nb)
    return -1;
  cl->out = nb;
  cl->out_cap = cap;
  return 0;
}

/* Queue one frame: a masked WebSocket frame (fresh random key) or a TCP
 * length prefix, then the payload. */
static int put_frame(im_client *cl, uint8_t ws_op, const void *payload, size_t len) {
  bool was_empty = cl->out_off == cl->out_len;
  if (out_reserve(cl, len + 14) != 0)
    return IM_ENOMEM;
  uint8_t *w = cl->out + cl->out_len;
  if (cl->transport == IM_TRANSPORT_WS) {
    uint32_t mask = rnd(cl);
    size_t h = ws_frame_encode_masked_header(w, ws_op, true, len, mask);
    memcpy(w + h, payload, len);
    ws_unmask(w + h, len, mask, 0);
    cl->out_len += h + len;
  } else {
    tcp_frame_encode_header(w, (uint32_t)len);
    memcpy(w + TCP_FRAME_HDR, payload, len);
    cl->out_len += TCP_FRAME_HDR + len;
  }
  cl->last_tx = cl->now;
  if (was_empty && cl->io.want_write)
    cl->io.want_write(cl, cl->io_user);
  return 0;
}

static int send_packet(im_client *cl, const imp_packet *p) {
  size_t need = cl->bin ? imp_bin_encode(p, NULL, 0) : imp_json_encode(p, NULL, 0);
  if (need == 0)
    return IM_EINVAL;
  if (need > cl->enc_cap) {
    uint8_t *nb = realloc(cl->enc, need);
    if (!nb)
      return IM_ENOMEM;
    cl->enc = nb;
    cl->enc_cap = need;
  }
  if (cl->bin)
    imp_bin_encode(p, cl->enc, need);
  else
    imp_json_encode(p, (char *)cl->enc, need);
  return put_frame(cl, cl->bin ? WS_OP_BINARY : WS_OP_TEXT, cl->enc, need);
}

static void send_ws_close(im_client *cl, unsigned code) {
  if (cl->transport != IM_TRANSPORT_WS || cl->state < IM_CLIENT_AUTHENTICATING)
    return;
  uint8_t b[2] = {(uint8_t)(code >> 8), (uint8_t)code};
  put_frame(cl, WS_OP_CLOSE, b, 2);
}

static void send_ack(im_client *cl, const char *id, uint64_t seq) {
  imp_packet p = {.op = IMP_OP_ACK};
  imp_set_str(&p, IMP_K_ID, id, strlen(id));
  if (seq)
    imp_set_num(&p, IMP_K_SEQ, seq);
  send_packet(cl, &p);
}

static void send_auth(im_client *cl) {
  imp_packet p = {.op = IMP_OP_AUTH};
  imp_set_str(&p, IMP_K_UID, cl->cfg.uid, strlen(cl->cfg.uid));
  imp_set_str(&p, IMP_K_TOKEN, cl->cfg.token, strlen(cl->cfg.token));
  if (cl->cfg.device)
    imp_set_str(&p, IMP_K_DEVICE, cl->cfg.device, strlen(cl->cfg.device));
  if (cl->cfg.platform)
    imp_set_str(&p, IMP_K_PLATFORM, cl->cfg.platform, strlen(cl->cfg.platform));
  if (!cl->cfg.no_sync) {
    /* The sync answer follows auth_ok in the same round trip (§15.5). */
    imp_set_num(&p, IMP_K_SINCE, cl->contiguous);
    cl->sync_running = true;
    cl->sync_since = cl->contiguous;
    cl->page_msgs = false;
    cl->page_first_jump = cl->jump_seen = 0;
  }
  send_packet(cl, &p);
}

static void start_sync(im_client *cl, uint64_t since) {
  if (cl->sync_running || !authed(cl))
    return;
  imp_packet p = {.op = IMP_OP_SYNC};
  imp_set_num(&p, IMP_K_SINCE, since);
  if (cl->cfg.sync_limit)
    imp_set_num(&p, IMP_K_LIMIT, cl->cfg.sync_limit);
  cl->sync_running = true;
  cl->sync_since = since;
  cl->page_msgs = false;
  cl->page_first_jump = cl->jump_seen = 0;
  send_packet(cl, &p);
}

static const unsigned target_key[] = {
    [IM_CLIENT_TO_USER] = IMP_K_TO, [IM_CLIENT_TO_GROUP] = IMP_K_GROUP,
    [IM_CLIENT_TO_ROOM] = IMP_K_ROOM};

static void send_entry(im_client *cl, ob_entry *e) {
  imp_packet p = {.op = IMP_OP_MSG};
  imp_set_str(&p, IMP_K_CID, e->cid, strlen(e->cid));
  imp_set_str(&p, target_key[e->kind], e->bytes, e->target_len);
  imp_set_str(&p, IMP_K_DATA, ob_data(e), e->data_len);
  if (send_packet(cl, &p) == 0)
    e->sent = true;
}

static void send_room_op(im_client *cl, enum imp_op op, const char *room) {
  imp_packet p = {.op = op};
  imp_set_str(&p, IMP_K_ROOM, room, strlen(room));
  send_packet(cl, &p);
}

static void rejoin_rooms(im_client *cl) {
  unsigned gen = cl->gen;
  for (size_t i = 0; i < cl->n_rooms && cl->gen == gen; i++)
    send_room_op(cl, IMP_OP_JOIN, cl->rooms[i]);
}

static void flush_outbox(im_client *cl) {
  unsigned gen = cl->gen;
  for (ob_entry *e = cl->ob.head; e && cl->gen == gen; e = e->next)
    if (!e->sent && e->retry_at <= cl->now)
      send_entry(cl, e);
}

/* ---- connecting and reconnecting ------------------------------------------ */

static const gw_list *cur_list(const im_client *cl) {
  return cl->fetched_valid && cl->fetched.n ? &cl->fetched : &cl->conf;
}

static void conn_reset(im_client *cl) {
  cl->in_len = cl->frag_len = 0;
  cl->frag_op = 0;
  cl->out_off = cl->out_len = 0;
  cl->ping_out = false;
  cl->close_code = 0;
  cl->close_reason[0] = '\0';
  cl->auth_refused = false;
  cl->sync_running = false;
  cl->hb_s = DEFAULT_HB_S;
}

static void schedule_reconnect(im_client *cl, bool failed);

static void begin_connect(im_client *cl) {
  if (cl->fetch_url && cl->io.fetch_gateways &&
      (!cl->fetch_tried || cl->refetch ||
       (cl->fetched_valid && cl->now - cl->fetched_at >= cl->cfg.gateways_ttl_ms))) {
    cl->fetch_tried = true;
    cl->refetch = false;
    cl->fetch_pending = true;
    cl->deadline = cl->now + cl->cfg.connect_timeout_ms;
    set_state(cl, IM_CLIENT_RESOLVING);
    if (cl->state == IM_CLIENT_RESOLVING)
      cl->io.fetch_gateways(cl, cl->fetch_url, cl->cfg.api_key, cl->io_user);
    return;
  }
  const gw_list *l = cur_list(cl);
  if (l->n == 0) {
    schedule_reconnect(cl, true);
    return;
  }
  if (cl->gw_idx >= l->n)
    cl->gw_idx = 0;
  cl->cur = &l->v[cl->gw_idx];
  conn_reset(cl);
  cl->transport = cl->cur->a.transport;
  cl->bin = cl->transport == IM_TRANSPORT_TCP || cl->cfg.binary;
  cl->deadline = cl->now + cl->cfg.connect_timeout_ms;
  set_state(cl, IM_CLIENT_CONNECTING);
  if (cl->state != IM_CLIENT_CONNECTING)
    return;
  if (!cl->io.connect || cl->io.connect(cl, &cl->cur->a, cl->io_user) < 0)
    schedule_reconnect(cl, true);
}

/* failed: the attempt did not reach auth_ok, so rotate to the next gateway
 * and grow the backoff. */
static void schedule_reconnect(im_client *cl, bool failed) {
  uint64_t delay;
  if (cl->goaway) {
    /* The server asked us to go elsewhere after its delay. */
    cl->goaway = false;
    cl->gw_idx++;
    delay = cl->goaway_at > cl->now ? cl->goaway_at - cl->now : 0;
  } else {
    if (failed) {
      cl->gw_idx++;
      if (++cl->fail_round >= (cur_list(cl)->n ? cur_list(cl)->n : 1)) {
        /* a whole round failed: the cached list may be stale */
        cl->fail_round = 0;
        cl->refetch = cl->fetch_url != NULL;
        cl->fetched_valid = false;
      }
    }
    delay = client_backoff_ms(cl->cfg.backoff_base_ms, cl->cfg.backoff_cap_ms, cl->attempt, rnd(cl));
    if (cl->attempt < 32)
      cl->attempt++;
  }
  cl->deadline = cl->now + delay;
  set_state(cl, IM_CLIENT_WAITING);
}

/* The connection is over (the transport died, or we end it: then io.close
 * is called first, so a queued close frame can still be written). */
static void conn_lost(im_client *cl, unsigned code, const char *reason, bool we_close) {
  if (cl->state < IM_CLIENT_CONNECTING)
    return;
  bool reached_auth = authed(cl);
  /* The backoff starts over only after a connection that stayed up: a
   * server that accepts and drops at once still gets growing delays. */
  if (reached_auth && cl->now - cl->authed_at >= cl->cfg.connect_timeout_ms)
    cl->attempt = 0;
  if (we_close && cl->io.close)
    cl->io.close(cl, cl->io_user);
  cl->gen++;
  char why[sizeof cl->close_reason];
  snprintf(why, sizeof why, "%s", reason);
  bool refused = cl->auth_refused || code == IM_CLOSE_AUTH_FAILED;
  conn_reset(cl);
  if (cl->stopping || refused) {
    cl->stopping = false;
    cl->goaway = false;
    set_state(cl, IM_CLIENT_STOPPED);
  } else {
    schedule_reconnect(cl, !reached_auth);
  }
  if (cl->cb.on_close)
    cl->cb.on_close(cl, code, why, cl->user);
}

static int proto_fail(im_client *cl, unsigned code, const char *reason) {
  send_ws_close(cl, code);
  conn_lost(cl, code, reason, true);
  return IM_EPROTO;
}

/* ---- delivery --------------------------------------------------------------- */

static void absorb_own(im_client *cl) {
  bool moved = true;
  while (moved) {
    moved = false;
    for (unsigned i = 0; i < cl->own_n; i++) {
      if (cl->own[i] <= cl->contiguous + 1) {
        if (cl->own[i] == cl->contiguous + 1) {
          cl->contiguous++;
          moved = true;
        }
        cl->own[i] = cl->own[--cl->own_n];
        i--;
      }
    }
  }
}

/* Our own message got `seq` in our inbox: the sending connection gets no
 * copy, so count it as received (PROTOCOL §17 step 5). */
static void own_seq(im_client *cl, uint64_t seq) {
  if (seq <= cl->contiguous)
    return;
  if (seq == cl->contiguous + 1) {
    cl->contiguous = seq;
    absorb_own(cl);
  } else if (cl->own_n < OWN_MAX) {
    cl->own[cl->own_n++] = seq;
  }
}

static void deliver(im_client *cl, const imp_packet *p, const char *id) {
  im_client_msg m = {
      .id = id,
      .from = cstr(cl, p, IMP_K_FROM),
      .to = cstr(cl, p, IMP_K_TO),
      .group = cstr(cl, p, IMP_K_GROUP),
      .room = cstr(cl, p, IMP_K_ROOM),
      .ts = IMP_HAS(p, IMP_K_TS) ? p->num[IMP_K_TS] : 0,
      .seq = IMP_HAS(p, IMP_K_SEQ) ? p->num[IMP_K_SEQ] : 0,
      .data = cstr(cl, p, IMP_K_DATA),
      .data_len = IMP_HAS(p, IMP_K_DATA) ? p->str[IMP_K_DATA].n : 0,
  };
  if (cl->cb.on_message)
    cl->cb.on_message(cl, &m, cl->user);
}

static void on_msg(im_client *cl, const imp_packet *p) {
  const char *id = cstr(cl, p, IMP_K_ID);
  size_t idn = strlen(id);
  uint64_t seq = IMP_HAS(p, IMP_K_SEQ) ? p->num[IMP_K_SEQ] : 0;
  unsigned gen = cl->gen;
  if (cl->sync_running)
    cl->page_msgs = true;
  if (seq) {
    if (seq <= cl->contiguous) {
      send_ack(cl, id, seq); /* a duplicate: ACK again, show nothing */
      return;
    }
    if (seq != cl->contiguous + 1) {
      /* A jump: not shown out of order and not ACKed; the sync brings it
       * (and what is missing before it) in order. */
      if (cl->sync_running && !cl->page_first_jump)
        cl->page_first_jump = seq;
      if (seq > cl->jump_seen)
        cl->jump_seen = seq;
      start_sync(cl, cl->contiguous);
      return;
    }
    cl->contiguous = seq;
  }
  bool dup = idn && idw_has(&cl->ids, id, idn);
  if (!dup) {
    if (idn)
      idw_add(&cl->ids, id, idn);
    deliver(cl, p, id); /* contiguous == seq during the callback */
  }
  if (seq)
    absorb_own(cl);
  if (cl->gen == gen && (seq || !cl->cfg.no_room_acks || !IMP_HAS(p, IMP_K_ROOM)))
    send_ack(cl, id, seq);
}

static void on_sync_end(im_client *cl, const imp_packet *p) {
  if (!cl->sync_running)
    return;
  uint64_t last = IMP_HAS(p, IMP_K_LAST) ? p->num[IMP_K_LAST] : cl->sync_since;
  bool more = IMP_HAS(p, IMP_K_MORE) && p->num[IMP_K_MORE];
  bool gap = IMP_HAS(p, IMP_K_GAP) && p->num[IMP_K_GAP];
  uint64_t since = cl->sync_since;
  bool resync = false;
  cl->sync_running = false;
  if (gap) {
    /* Retention removed what lies below the first message of the answer
     * (or up to last when it had none): those will not come. */
    if (cl->page_first_jump) {
      if (cl->page_first_jump - 1 > cl->contiguous)
        cl->contiguous = cl->page_first_jump - 1;
      resync = true;
    } else if (!cl->page_msgs && last > cl->contiguous) {
      cl->contiguous = last;
    }
    absorb_own(cl);
  }
  if (last < since) {
    /* The server's inbox ends before our position (restored store). */
    cl->contiguous = last;
    cl->own_n = 0;
  }
  uint64_t from = cl->contiguous;
  if (more) {
    resync = true;
    if (from <= since && last > since)
      from = last; /* no progress from contiguous: follow the server */
  } else if (cl->jump_seen > cl->contiguous) {
    resync = true; /* a live message came past the answer's end */
  }
  if (resync) {
    start_sync(cl, from);
    return;
  }
  if (cl->state == IM_CLIENT_SYNCING)
    set_state(cl, IM_CLIENT_OPEN);
}

static void on_ack(im_client *cl, const imp_packet *p) {
  if (!IMP_HAS(p, IMP_K_CID))
    return;
  ob_entry *e = ob_take(&cl->ob, p->str[IMP_K_CID].p, p->str[IMP_K_CID].n);
  if (!e)
    return; /* a join/leave ack, or a repeat */
  uint64_t seq = IMP_HAS(p, IMP_K_SEQ) ? p->num[IMP_K_SEQ] : 0;
  if (seq)
    own_seq(cl, seq);
  if (cl->cb.on_ack)
    cl->cb.on_ack(cl, e->cid, cstr(cl, p, IMP_K_ID), seq, cl->user);
  free(e);
}

static void on_error(im_client *cl, const imp_packet *p) {
  unsigned code = IMP_HAS(p, IMP_K_CODE) ? (unsigned)p->num[IMP_K_CODE] : 0;
  const char *reason = cstr(cl, p, IMP_K_REASON);
  const char *cid = NULL;
  if (IMP_HAS(p, IMP_K_CID)) {
    cid = cstr(cl, p, IMP_K_CID);
    ob_entry *e = ob_find(&cl->ob, cid, strlen(cid));
    if (e && code >= 500 && code < 600) {
      e->sent = false;
      e->retry_at = cl->now + RETRY_5XX_MS;
    } else if (e) {
      free(ob_take(&cl->ob, cid, strlen(cid)));
    }
  } else if (code >= 1000) {
    /* TCP: the close code comes as the last error op before FIN. */
    cl->close_code = code;
    snprintf(cl->close_reason, sizeof cl->close_reason, "%s", reason);
  } else if (cl->state == IM_CLIENT_AUTHENTICATING) {
    cl->auth_refused = true;
  } else if (cl->sync_running && code >= 500) {
    /* 501 sync not supported, 500 sync failed: no sync_end follows */
    cl->sync_running = false;
    if (cl->state == IM_CLIENT_SYNCING)
      set_state(cl, IM_CLIENT_OPEN);
  }
  if (cl->cb.on_error)
    cl->cb.on_error(cl, code, reason, cid, cl->user);
}

static void on_auth_ok(im_client *cl, const imp_packet *p) {
  if (cl->state != IM_CLIENT_AUTHENTICATING)
    return;
  unsigned gen = cl->gen;
  uint64_t hb = IMP_HAS(p, IMP_K_HB) ? p->num[IMP_K_HB] : 0;
  cl->hb_s = hb == 0 ? DEFAULT_HB_S : hb > MAX_WAIT_S ? MAX_WAIT_S : (unsigned)hb;
  cl->authed_at = cl->now;
  cl->fail_round = 0;
  set_state(cl, cl->sync_running ? IM_CLIENT_SYNCING : IM_CLIENT_OPEN);
  if (cl->gen != gen)
    return;
  if (cl->cb.on_auth_ok)
    cl->cb.on_auth_ok(cl, cstr(cl, p, IMP_K_CONN), cl->hb_s, cl->user);
  if (cl->gen != gen)
    return;
  rejoin_rooms(cl);
  if (cl->gen != gen)
    return;
  ob_reset_sent(&cl->ob);
  flush_outbox(cl);
}

static void on_packet(im_client *cl, const imp_packet *p) {
  cl->arena_len = 0;
  switch (p->op) {
  case IMP_OP_AUTH_OK:
    on_auth_ok(cl, p);
    break;
  case IMP_OP_MSG:
    if (authed(cl))
      on_msg(cl, p);
    break;
  case IMP_OP_ACK:
    on_ack(cl, p);
    break;
  case IMP_OP_SYNC_END:
    on_sync_end(cl, p);
    break;
  case IMP_OP_ERROR:
    on_error(cl, p);
    break;
  case IMP_OP_GOAWAY: {
    /* Keep the connection until the delay ends (or the server closes it),
     * then connect to the next gateway. */
    cl->goaway = true;
    uint64_t ms = IMP_HAS(p, IMP_K_RECONNECT_MS)
                      ? p->num[IMP_K_RECONNECT_MS]
                      : client_backoff_ms(cl->cfg.backoff_base_ms, cl->cfg.backoff_cap_ms, 0,
                                          rnd(cl));
    cl->goaway_at = cl->now + (ms > MAX_WAIT_S * 1000u ? MAX_WAIT_S * 1000u : ms);
    break;
  }
  default: /* pong; ops of later versions */
    break;
  }
}

/* ---- input ------------------------------------------------------------------ */

static int on_payload(im_client *cl, uint8_t ws_op, const uint8_t *b, size_t n) {
  imp_packet p;
  int r = ws_op == WS_OP_TEXT ? imp_json_decode((const char *)b, n, &p, cl->scratch, cl->in_limit)
                              : imp_bin_decode(b, n, &p);
  if (r == IMP_E_OP)
    return 0; /* an op of a later version: skip it */
  if (r != IMP_OK)
    return proto_fail(cl, WS_CLOSE_PROTOCOL, "malformed packet from the server");
  on_packet(cl, &p);
  return 0;
}

static int on_ws_frame(im_client *cl, const ws_frame_hdr *h, const uint8_t *b) {
  size_t n = (size_t)h->len;
  switch (h->opcode) {
  case WS_OP_PING:
    put_frame(cl, WS_OP_PONG, b, n);
    return 0;
  case WS_OP_PONG:
    return 0;
  case WS_OP_CLOSE: {
    unsigned code = n >= 2 ? (unsigned)b[0] << 8 | b[1] : WS_CLOSE_NO_STATUS;
    char reason[124];
    size_t rn = n > 2 ? n - 2 : 0;
    if (rn >= sizeof reason)
      rn = sizeof reason - 1;
    if (rn)
      memcpy(reason, b + 2, rn);
    reason[rn] = '\0';
    send_ws_close(cl, code == WS_CLOSE_NO_STATUS ? WS_CLOSE_NORMAL : code);
    conn_lost(cl, code, reason, true);
    return 0;
  }
  case WS_OP_CONT:
    if (!cl->frag_op)
      return proto_fail(cl, WS_CLOSE_PROTOCOL, "continuation without start");
    if (cl->frag_len + n > cl->in_limit)
      return proto_fail(cl, WS_CLOSE_TOO_BIG, "message too big");
    memcpy(cl->frag + cl->frag_len, b, n);
    cl->frag_len += n;
    if (!h->fin)
      return 0;
    uint8_t op = cl->frag_op;
    cl->frag_op = 0;
    return on_payload(cl, op, cl->frag, cl->frag_len);
  default:
    if (cl->frag_op)
      return proto_fail(cl, WS_CLOSE_PROTOCOL, "expected continuation");
    if (h->fin)
      return on_payload(cl, h->opcode, b, n);
    cl->frag_op = h->opcode;
    memcpy(cl->frag, b, n);
    cl->frag_len = n;
    return 0;
  }
}

/* One unit of input at in[off..in_len): returns the bytes it used, 0 when
 * incomplete, or -1 when the connection was failed. */
static long take_unit(im_client *cl, size_t off) {
  const uint8_t *p = cl->in + off;
  size_t n = cl->in_len - off;
  if (cl->state == IM_CLIENT_HANDSHAKE) {
    ws_hs_reply r;
    long h = ws_hs_client_response((const char *)p, n, cl->ws_key, &r);
    if (h == WS_HS_MORE)
      return 0;
    if (h < 0) {
      /* No WebSocket yet: the code only reports what happened. */
      char why[124];
      snprintf(why, sizeof why, "handshake failed: %s (HTTP %d)", r.reason, r.http_status);
      if (r.http_status == 401 || r.http_status == 403)
        cl->auth_refused = true;
      conn_lost(cl, WS_CLOSE_ABNORMAL, why, true);
      return -1;
    }
    set_state(cl, IM_CLIENT_AUTHENTICATING);
    send_auth(cl);
    return h;
  }
  if (cl->transport == IM_TRANSPORT_TCP) {
    const uint8_t *body;
    uint32_t blen;
    long t = tcp_frame_parse(p, n, (uint32_t)cl->in_limit, &body, &blen);
    if (t < 0) {
      proto_fail(cl, WS_CLOSE_PROTOCOL, "bad TCP frame from the server");
      return -1;
    }
    if (t > 0 && on_payload(cl, WS_OP_BINARY, body, blen) != 0)
      return -1;
    return t;
  }
  ws_frame_hdr h;
  int hl = ws_frame_parse_header(p, n, false, &h);
  if (hl < 0 || (hl > 0 && h.masked)) {
    proto_fail(cl, WS_CLOSE_PROTOCOL, "bad frame header");
    return -1;
  }
  if (hl == 0)
    return 0;
  if (h.len > cl->in_limit) {
    proto_fail(cl, WS_CLOSE_TOO_BIG, "message too big");
    return -1;
  }
  if (n - (size_t)hl < h.len)
    return 0;
  if (on_ws_frame(cl, &h, p + hl) != 0)
    return -1;
  return hl + (long)h.len;
}

int im_client_feed(im_client *cl, const void *data, size_t len) {
  if (!connected_state(cl))
    return IM_ESTATE;
  cl->last_rx = cl->now;
  cl->ping_out = false;
  /* One frame (or handshake head) at most is ever kept, so the buffer is
   * bounded by in_limit plus a frame header. */
  size_t room_max = cl->in_limit + 14 + WS_HS_MAX_REQUEST;
  unsigned gen = cl->gen;
  const uint8_t *src = data;
  while (len > 0 && cl->gen == gen) {
    size_t take = room_max - cl->in_len;
    if (take > len)
      take = len;
    if (take == 0)
      return proto_fail(cl, WS_CLOSE_TOO_BIG, "input over limit");
    if (cl->in_cap < cl->in_len + take) {
      size_t cap = cl->in_cap ? cl->in_cap : 4096;
      while (cap < cl->in_len + take)
        cap *= 2;
      uint8_t *nb = realloc(cl->in, cap);
      if (!nb) {
        conn_lost(cl, WS_CLOSE_ABNORMAL, "out of memory", true);
        return IM_ENOMEM;
      }
      cl->in = nb;
      cl->in_cap = cap;
    }
    memcpy(cl->in + cl->in_len, src, take);
    cl->in_len += take;
    src += take;
    len -= take;
    size_t off = 0;
    for (;;) {
      long used = take_unit(cl, off);
      if (cl->gen != gen)
        return used < 0 ? IM_EPROTO : 0;
      if (used <= 0)
        break;
      off += (size_t)used;
    }
    memmove(cl->in, cl->in + off, cl->in_len - off);
    cl->in_len -= off;
  }
  return 0;
}

/* ---- driver side -------------------------------------------------------------- */

int im_client_connected(im_client *cl) {
  if (cl->state != IM_CLIENT_CONNECTING)
    return IM_ESTATE;
  cl->last_rx = cl->last_tx = cl->now;
  if (cl->transport == IM_TRANSPORT_TCP) {
    set_state(cl, IM_CLIENT_AUTHENTICATING);
    if (cl->state == IM_CLIENT_AUTHENTICATING)
      send_auth(cl);
    return 0;
  }
  uint8_t nonce[16];
  for (int i = 0; i < 16; i += 4) {
    uint32_t r = rnd(cl);
    memcpy(nonce + i, &r, 4);
  }
  ws_hs_client_key(nonce, cl->ws_key);
  const im_client_addr *a = &cl->cur->a;
  char host[300];
  snprintf(host, sizeof host, strchr(a->host, ':') ? "[%s]:%u" : "%s:%u", a->host,
           (unsigned)a->port);
  const char *proto = cl->cfg.binary ? "imp.bin" : "imp.json";
  size_t need = ws_hs_client_request(host, a->path, cl->ws_key, proto, NULL, 0);
  bool was_empty = cl->out_off == cl->out_len;
  if (out_reserve(cl, need + 1) != 0) {
    conn_lost(cl, WS_CLOSE_ABNORMAL, "out of memory", true);
    return IM_ENOMEM;
  }
  ws_hs_client_request(host, a->path, cl->ws_key, proto, (char *)cl->out + cl->out_len, need + 1);
  cl->out_len += need;
  set_state(cl, IM_CLIENT_HANDSHAKE);
  if (was_empty && cl->io.want_write && cl->state == IM_CLIENT_HANDSHAKE)
    cl->io.want_write(cl, cl->io_user);
  return 0;
}

int im_client_disconnected(im_client *cl) {
  if (cl->state < IM_CLIENT_CONNECTING)
    return IM_ESTATE;
  unsigned code = cl->close_code ? cl->close_code : WS_CLOSE_ABNORMAL;
  char reason[sizeof cl->close_reason];
  snprintf(reason, sizeof reason, "%s",
           cl->close_code ? cl->close_reason
                          : cl->state == IM_CLIENT_CONNECTING ? "connect failed"
                                                              : "connection lost");
  conn_lost(cl, code, reason, false);
  return 0;
}

int im_client_pending(im_client *cl, struct iovec *iov, int max) {
  if (max < 1 || cl->out_off == cl->out_len)
    return 0;
  iov[0].iov_base = cl->out + cl->out_off;
  iov[0].iov_len = cl->out_len - cl->out_off;
  return 1;
}

void im_client_sent(im_client *cl, size_t n) {
  size_t left = cl->out_len - cl->out_off;
  cl->out_off += n < left ? n : left;
  if (cl->out_off == cl->out_len)
    cl->out_off = cl->out_len = 0;
}

static unsigned ping_interval(const im_client *cl) {
  if (cl->background)
    return cl->cfg.ping_bg_ms ? cl->cfg.ping_bg_ms : 2000u * cl->hb_s;
  return cl->cfg.ping_ms ? cl->cfg.ping_ms : 1000u * cl->hb_s;
}

void im_client_tick(im_client *cl, uint64_t now_ms) {
  if (now_ms > cl->now)
    cl->now = now_ms;
  uint64_t now = cl->now;
  switch (cl->state) {
  case IM_CLIENT_WAITING:
    if (now >= cl->deadline)
      begin_connect(cl);
    return;
  case IM_CLIENT_RESOLVING:
    if (now >= cl->deadline)
      im_client_gateways_result(cl, 0, NULL, 0);
    return;
  case IM_CLIENT_CONNECTING:
  case IM_CLIENT_HANDSHAKE:
  case IM_CLIENT_AUTHENTICATING:
    if (now >= cl->deadline)
      conn_lost(cl, WS_CLOSE_ABNORMAL, "connect timeout", true);
    return;
  case IM_CLIENT_SYNCING:
  case IM_CLIENT_OPEN:
    break;
  default:
    return;
  }
  if (cl->goaway && now >= cl->goaway_at) {
    send_ws_close(cl, WS_CLOSE_GOING_AWAY);
    conn_lost(cl, WS_CLOSE_GOING_AWAY, "goaway", true);
    return;
  }
  unsigned iv = ping_interval(cl);
  if (now - cl->last_rx >= (uint64_t)iv + cl->cfg.pong_timeout_ms) {
    conn_lost(cl, WS_CLOSE_ABNORMAL, "read idle timeout", true);
    return;
  }
  if (now - cl->last_tx >= iv || (!cl->ping_out && now - cl->last_rx >= iv)) {
    imp_packet p = {.op = IMP_OP_PING};
    send_packet(cl, &p);
    cl->ping_out = true;
  }
  flush_outbox(cl);
}

long im_client_timeout(const im_client *cl, uint64_t now_ms) {
  uint64_t d;
  switch (cl->state) {
  case IM_CLIENT_WAITING:
  case IM_CLIENT_RESOLVING:
  case IM_CLIENT_CONNECTING:
  case IM_CLIENT_HANDSHAKE:
  case IM_CLIENT_AUTHENTICATING:
    d = cl->deadline;
    break;
  case IM_CLIENT_SYNCING:
  case IM_CLIENT_OPEN: {
    unsigned iv = ping_interval(cl);
    d = cl->last_tx + iv;
    uint64_t idle = cl->last_rx + iv + (cl->ping_out ? cl->cfg.pong_timeout_ms : 0);
    if (idle < d)
      d = idle;
    if (cl->goaway && cl->goaway_at < d)
      d = cl->goaway_at;
    for (const ob_entry *e = cl->ob.head; e; e = e->next)
      if (!e->sent && e->retry_at < d)
        d = e->retry_at;
    break;
  }
  default:
    return -1;
  }
  return d > now_ms ? (long)(d - now_ms) : 0;
}

int im_client_gateways_result(im_client *cl, int http_status, const char *body, size_t len) {
  if (cl->state != IM_CLIENT_RESOLVING || !cl->fetch_pending)
    return IM_ESTATE;
  cl->fetch_pending = false;
  int rc = IM_EINVAL;
  cl->cur = NULL; /* it may point into the list being replaced */
  if (http_status == 200 && gw_list_from_json(&cl->fetched, body, len, cl->cfg.prefer_tcp) > 0) {
    cl->fetched_valid = true;
    cl->fetched_at = cl->now;
    cl->gw_idx = 0;
    rc = 0;
  } else {
    cl->cur = NULL;
    gw_list_clear(&cl->fetched);
    cl->fetched_valid = false; /* fall back to the configured URLs */
  }
  begin_connect(cl);
  return rc;
}

/* ---- application side -------------------------------------------------------- */

void im_client_config_init(im_client_config *cfg) {
  memset(cfg, 0, sizeof *cfg);
  cfg->gateways_ttl_ms = 300000;
  cfg->backoff_base_ms = 500;
  cfg->backoff_cap_ms = 30000;
  cfg->connect_timeout_ms = 10000;
  cfg->pong_timeout_ms = 10000;
  cfg->dedupe_window = 1024;
  cfg->outbox_max = 1024;
  cfg->outbox_max_bytes = 4u << 20;
  cfg->max_message = 65536;
}

static void free_strings(im_client *cl) {
  free((char *)cl->cfg.uid);
  free((char *)cl->cfg.token);
  free((char *)cl->cfg.device);
  free((char *)cl->cfg.platform);
  free((char *)cl->cfg.gateways_url);
  free((char *)cl->cfg.api_key);
  free(cl->fetch_url);
}

static int copy_strings(im_client *cl, const im_client_config *c) {
  cl->cfg.uid = dup_str(c->uid);
  cl->cfg.token = dup_str(c->token);
  cl->cfg.device = dup_str(c->device);
  cl->cfg.platform = dup_str(c->platform);
  cl->cfg.gateways_url = dup_str(c->gateways_url);
  cl->cfg.api_key = dup_str(c->api_key);
  if (!cl->cfg.uid || !cl->cfg.token || (c->device && !cl->cfg.device) ||
      (c->platform && !cl->cfg.platform) || (c->gateways_url && !cl->cfg.gateways_url) ||
      (c->api_key && !cl->cfg.api_key))
    return -1;
  if (c->gateways_url) {
    /* ?uid=<uid>, percent-encoded, unless the URL has a query already */
    size_t n = strlen(c->gateways_url), u = strlen(c->uid);
    cl->fetch_url = malloc(n + 5 + 3 * u + 1);
    if (!cl->fetch_url)
      return -1;
    char *w = cl->fetch_url + snprintf(cl->fetch_url, n + 6, "%s%s", c->gateways_url,
                                       strchr(c->gateways_url, '?') ? "" : "?uid=");
    for (size_t i = 0; i < u && !strchr(c->gateways_url, '?'); i++) {
      unsigned char ch = (unsigned char)c->uid[i];
      bool plain = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
                   (ch >= '0' && ch <= '9') || strchr("-._~", ch);
      w += plain ? sprintf(w, "%c", ch) : sprintf(w, "%%%02X", ch);
    }
    *w = '\0';
  }
  return 0;
}

im_client *im_client_new(const im_client_config *c, const im_client_callbacks *cb, void *user) {
  if (!c || !c->uid || !c->uid[0] || strlen(c->uid) > TARGET_MAX || !c->token ||
      (c->n_urls == 0 && !c->gateways_url) || c->max_message == 0 ||
      c->max_message > (64u << 20))
    return NULL;
  im_client *cl = calloc(1, sizeof *cl);
  if (!cl)
    return NULL;
  cl->cfg = *c;
  cl->cfg.uid = cl->cfg.token = cl->cfg.device = cl->cfg.platform = NULL;
  cl->cfg.gateways_url = cl->cfg.api_key = NULL;
  cl->cfg.urls = NULL;
  cl->cfg.n_urls = 0;
  if (!cl->cfg.rand)
    cl->cfg.rand = sys_rand;
  if (cb)
    cl->cb = *cb;
  cl->user = user;
  cl->hb_s = DEFAULT_HB_S;
  cl->contiguous = c->since;
  cl->in_limit = c->max_message + ENVELOPE_MAX;
  cl->arena_cap = cl->in_limit + IMP_K_MAX_ + 1;
  bool ok = copy_strings(cl, c) == 0 && idw_init(&cl->ids, c->dedupe_window) == 0;
  for (size_t i = 0; ok && i < c->n_urls; i++)
    ok = c->urls[i] && gw_list_add(&cl->conf, c->urls[i], strlen(c->urls[i])) == 0;
  if (ok) {
    cl->scratch = malloc(cl->in_limit);
    cl->arena = malloc(cl->arena_cap);
    cl->frag = malloc(cl->in_limit);
    ok = cl->scratch && cl->arena && cl->frag;
  }
  if (!ok) {
    im_client_free(cl);
    return NULL;
  }
  snprintf(cl->cid_prefix, sizeof cl->cid_prefix, "%08x%08x", (unsigned)rnd(cl),
           (unsigned)rnd(cl));
  return cl;
}

void im_client_free(im_client *cl) {
  if (!cl)
    return;
  free_strings(cl);
  gw_list_clear(&cl->conf);
  gw_list_clear(&cl->fetched);
  idw_free(&cl->ids);
  ob_clear(&cl->ob);
  for (size_t i = 0; i < cl->n_rooms; i++)
    free(cl->rooms[i]);
  free(cl->rooms);
  free(cl->in);
  free(cl->out);
  free(cl->frag);
  free(cl->enc);
  free(cl->scratch);
  free(cl->arena);
  free(cl);
}

void im_client_set_io(im_client *cl, const im_client_io *io, void *io_user) {
  cl->io = *io;
  cl->io_user = io_user;
}

int im_client_start(im_client *cl, uint64_t now_ms) {
  if (cl->state != IM_CLIENT_STOPPED)
    return IM_ESTATE;
  if (now_ms > cl->now)
    cl->now = now_ms;
  cl->stopping = false;
  cl->attempt = 0;
  begin_connect(cl);
  return 0;
}

int im_client_stop(im_client *cl) {
  if (cl->state >= IM_CLIENT_CONNECTING) {
    cl->stopping = true;
    send_ws_close(cl, WS_CLOSE_NORMAL);
    conn_lost(cl, WS_CLOSE_NORMAL, "stopped", true);
  }
  cl->fetch_pending = false;
  cl->goaway = false;
  set_state(cl, IM_CLIENT_STOPPED);
  return 0;
}

int im_client_set_token(im_client *cl, const char *token) {
  char *t = dup_str(token);
  if (!t)
    return IM_ENOMEM;
  free((char *)cl->cfg.token);
  cl->cfg.token = t;
  return 0;
}

int im_client_send(im_client *cl, enum im_client_target kind, const char *target,
                   const char *data, size_t data_len, char cid_out[IM_CLIENT_CID_MAX]) {
  if (kind < IM_CLIENT_TO_USER || kind > IM_CLIENT_TO_ROOM || !target || !data)
    return IM_EINVAL;
  size_t tn = strlen(target);
  if (tn == 0 || tn > TARGET_MAX || !imp_json_valid(data, data_len))
    return IM_EINVAL;
  if (data_len > cl->cfg.max_message)
    return IM_ETOOBIG;
  if (cl->ob.count >= cl->cfg.outbox_max ||
      cl->ob.bytes + tn + data_len > cl->cfg.outbox_max_bytes)
    return IM_EFULL;
  char cid[IM_CLIENT_CID_MAX];
  snprintf(cid, sizeof cid, "%s-%llu", cl->cid_prefix,
           (unsigned long long)++cl->cid_counter);
  ob_entry *e = ob_push(&cl->ob, cid, (uint8_t)kind, target, tn, data, data_len);
  if (!e)
    return IM_ENOMEM;
  if (cid_out)
    memcpy(cid_out, cid, sizeof cid);
  if (authed(cl))
    send_entry(cl, e);
  return 0;
}

static size_t room_index(const im_client *cl, const char *room) {
  size_t i = 0;
  while (i < cl->n_rooms && strcmp(cl->rooms[i], room) != 0)
    i++;
  return i;
}

int im_client_join(im_client *cl, const char *room) {
  size_t n = room ? strlen(room) : 0;
  if (n == 0 || n > TARGET_MAX)
    return IM_EINVAL;
  if (room_index(cl, room) < cl->n_rooms)
    return 0;
  if (cl->n_rooms == cl->cap_rooms) {
    size_t cap = cl->cap_rooms ? 2 * cl->cap_rooms : 4;
    char **v = realloc(cl->rooms, cap * sizeof *v);
    if (!v)
      return IM_ENOMEM;
    cl->rooms = v;
    cl->cap_rooms = cap;
  }
  char *copy = dup_str(room);
  if (!copy)
    return IM_ENOMEM;
  cl->rooms[cl->n_rooms++] = copy;
  if (authed(cl))
    send_room_op(cl, IMP_OP_JOIN, room);
  return 0;
}

int im_client_leave(im_client *cl, const char *room) {
  size_t i = room ? room_index(cl, room) : cl->n_rooms;
  if (i == cl->n_rooms)
    return IM_ENOENT;
  if (authed(cl))
    send_room_op(cl, IMP_OP_LEAVE, room);
  free(cl->rooms[i]);
  cl->rooms[i] = cl->rooms[--cl->n_rooms];
  return 0;
}

void im_client_set_background(im_client *cl, int on) { cl->background = on != 0; }

enum im_client_state im_client_state(const im_client *cl) { return cl->state; }

uint64_t im_client_contiguous(const im_client *cl) { return cl->contiguous; }

size_t im_client_outbox_count(const im_client *cl) { return cl->ob.count; }

const im_client_addr *im_client_address(const im_client *cl) {
  return cl->cur ? &cl->cur->a : NULL;
}
