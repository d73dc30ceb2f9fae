/* IMP name and kind tables: the one place that maps op bytes and field keys
 * to their JSON names, so both codecs and docs/PROTOCOL.md agree. */
#include "proto/imp.h"

#include <string.h>

typedef struct imp_name {
  const char *s;
  uint8_t n;
} imp_name;

#define NAME(lit) {lit, (uint8_t)(sizeof lit - 1)}

static const imp_name op_names[IMP_OP_MAX_] = {
    [IMP_OP_AUTH] = NAME("auth"),   [IMP_OP_AUTH_OK] = NAME("auth_ok"),
    [IMP_OP_MSG] = NAME("msg"),     [IMP_OP_ACK] = NAME("ack"),
    [IMP_OP_SYNC] = NAME("sync"),   [IMP_OP_SYNC_END] = NAME("sync_end"),
    [IMP_OP_PING] = NAME("ping"),   [IMP_OP_PONG] = NAME("pong"),
    [IMP_OP_JOIN] = NAME("join"),   [IMP_OP_LEAVE] = NAME("leave"),
    [IMP_OP_ERROR] = NAME("error"), [IMP_OP_GOAWAY] = NAME("goaway"),
};

static const imp_name key_names[IMP_K_MAX_] = {
    [IMP_K_UID] = NAME("uid"),       [IMP_K_TOKEN] = NAME("token"),
    [IMP_K_DEVICE] = NAME("device"), [IMP_K_PLATFORM] = NAME("platform"),
    [IMP_K_CONN] = NAME("conn"),     [IMP_K_HB] = NAME("hb"),
    [IMP_K_CID] = NAME("cid"),       [IMP_K_ID] = NAME("id"),
    [IMP_K_FROM] = NAME("from"),     [IMP_K_TO] = NAME("to"),
    [IMP_K_GROUP] = NAME("group"),   [IMP_K_ROOM] = NAME("room"),
    [IMP_K_TS] = NAME("ts"),         [IMP_K_SEQ] = NAME("seq"),
    [IMP_K_DATA] = NAME("data"),     [IMP_K_CODE] = NAME("code"),
    [IMP_K_REASON] = NAME("reason"), [IMP_K_SINCE] = NAME("since"),
    [IMP_K_LIMIT] = NAME("limit"),   [IMP_K_LAST] = NAME("last"),
    [IMP_K_MORE] = NAME("more"),     [IMP_K_GAP] = NAME("gap"),
    [IMP_K_RECONNECT_MS] = NAME("reconnect_ms"),
};

static const char key_kinds[IMP_K_MAX_] = {
    [IMP_K_UID] = 'S',    [IMP_K_TOKEN] = 'S',  [IMP_K_DEVICE] = 'S', [IMP_K_PLATFORM] = 'S',
    [IMP_K_CONN] = 'S',   [IMP_K_HB] = 'U',     [IMP_K_CID] = 'S',    [IMP_K_ID] = 'S',
    [IMP_K_FROM] = 'S',   [IMP_K_TO] = 'S',     [IMP_K_GROUP] = 'S',  [IMP_K_ROOM] = 'S',
    [IMP_K_TS] = 'U',     [IMP_K_SEQ] = 'U',    [IMP_K_DATA] = 'J',   [IMP_K_CODE] = 'U',
    [IMP_K_REASON] = 'S', [IMP_K_SINCE] = 'U',  [IMP_K_LIMIT] = 'U',  [IMP_K_LAST] = 'U',
    [IMP_K_MORE] = 'B',   [IMP_K_GAP] = 'B',    [IMP_K_RECONNECT_MS] = 'U',
};

char imp_key_kind(unsigned key) {
  return key < IMP_K_MAX_ ? key_kinds[key] : 0;
}

const char *imp_key_name(unsigned key) {
  return key < IMP_K_MAX_ ? key_names[key].s : NULL;
}

const char *imp_op_name(unsigned op) {
  return op < IMP_OP_MAX_ ? op_names[op].s : NULL;
}

/* Linear scans: 12 and 23 short names, compared by length and first byte
 * before memcmp, are cheaper than hashing a name seen once per packet. */
static unsigned find_name(const imp_name *t, unsigned count, const char *s, size_t n) {
  if (n == 0)
    return 0;
  for (unsigned i = 1; i < count; i++)
    if (t[i].n == n && t[i].s[0] == s[0] && memcmp(t[i].s, s, n) == 0)
      return i;
  return 0;
}

uint8_t imp_op_from_name(const char *s, size_t n) {
  return (uint8_t)find_name(op_names, IMP_OP_MAX_, s, n);
}

unsigned imp_key_from_name(const char *s, size_t n) {
  return find_name(key_names, IMP_K_MAX_, s, n);
}
