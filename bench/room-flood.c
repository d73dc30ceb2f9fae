/* room-flood: the hash-flooding reproduction. Crafts 32,768 room names that
 * all had the same 32-bit hash under libim's former unkeyed string hash
 * (so they shared one bucket of the room table at every size) and has 512
 * connections join 64 of them each, through the public API only, then
 * looks every room up once and closes everything. Prints the wall time of
 * each phase.
 *
 *   room-flood [ROOMS]        (default 32768; a multiple of 64)
 *
 * It uses only <libim/im.h>, so one binary measures any build of the
 * library: LD_LIBRARY_PATH=/path/to/old/lib ./room-flood gives "before".
 * Not installed. */
#include <libim/im.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ws_upgrade.h"

/* The former hash (lib/core/strmap.c before SipHash): constants and the
 * inversion below solve for names it maps to 0. */
#define OLD_MUL1 UINT64_C(0x9e3779b97f4a7c15)
#define OLD_MUL2 UINT64_C(0xc2b2ae3d27d4eb4f)

static uint64_t rotl(uint64_t x, unsigned r) { return (x << r) | (x >> (64 - r)); }

static uint64_t inv64(uint64_t a) {
  uint64_t x = a;
  for (int i = 0; i < 6; i++) x *= 2 - a * x;
  return x;
}

/* inverse of the old finalizer (xor-shift 32, *MUL2, xor-shift 29, *MUL1, xor-shift 32) */
static uint64_t unmix(uint64_t x) {
  x ^= x >> 32;
  x *= inv64(OLD_MUL1);
  x ^= (x >> 29) ^ (x >> 58);
  x *= inv64(OLD_MUL2);
  x ^= x >> 32;
  return x;
}

/* 16 printable bytes: "flood-00" + 8 bytes solved from a final state x:x. */
static void craft(char (*names)[17], size_t n) {
  uint64_t w, h1 = OLD_MUL1 ^ (16 * OLD_MUL2);
  memcpy(&w, "flood-00", 8);
  h1 = rotl(h1 ^ (w * OLD_MUL2), 27) * OLD_MUL1;
  size_t found = 0;
  for (uint64_t x = 1; found < n; x++) {
    uint64_t t = unmix(x << 32 | x) * inv64(OLD_MUL1);
    w = ((t >> 27) | (t << 37)) ^ h1;
    w *= inv64(OLD_MUL2);
    unsigned char b[8];
    memcpy(b, &w, 8);
    int ok = 1;
    for (int i = 0; i < 8 && ok; i++) ok = b[i] > 0x20 && b[i] < 0x7f && b[i] != '"' && b[i] != '\\';
    if (!ok) continue;
    memcpy(names[found], "flood-00", 8);
    memcpy(names[found] + 8, b, 8);
    names[found][16] = '\0';
    found++;
  }
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
  size_t rooms = argc > 1 ? strtoul(argv[1], NULL, 10) : 32768;
  enum { PER_CONN = 64 };
  if (rooms == 0 || rooms % PER_CONN) {
    fprintf(stderr, "usage: room-flood [ROOMS, a multiple of %d]\n", PER_CONN);
    return 2;
  }
  size_t nconns = rooms / PER_CONN;
  char (*names)[17] = malloc(rooms * sizeof *names);
  im_conn_id *conns = malloc(nconns * sizeof *conns);
  im_server *srv = im_server_new(NULL, NULL, NULL); /* defaults: any uid/token accepted */
  if (!names || !conns || !srv) return 1;
  double t0 = now_s();
  craft(names, rooms);
  double t1 = now_s();
  for (size_t i = 0; i < nconns; i++)
    if (!(conns[i] = bench_ws_open(srv, i, NULL))) return 1;
  double t2 = now_s();
  for (size_t i = 0; i < rooms; i++)
    if (im_room_join(srv, conns[i / PER_CONN], names[i]) != 0) {
      fprintf(stderr, "join %zu failed\n", i);
      return 1;
    }
  double t3 = now_s();
  size_t members = 0;
  for (size_t i = 0; i < rooms; i++) members += im_room_size(srv, names[i]);
  double t4 = now_s();
  for (size_t i = 0; i < nconns; i++) im_server_hangup(srv, conns[i]);
  double t5 = now_s();
  if (members != rooms) {
    fprintf(stderr, "expected %zu members, found %zu\n", rooms, members);
    return 1;
  }
  printf("rooms %zu, connections %zu: craft %.3f s, accept+auth %.3f s, join %.3f s, "
         "lookup %.3f s, hangup %.3f s; join+lookup+hangup %.3f s\n",
         rooms, nconns, t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t5 - t2);
  im_server_free(srv);
  free(names);
  free(conns);
  return 0;
}
