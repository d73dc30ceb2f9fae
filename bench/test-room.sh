#!/usr/bin/env bash
# meson test (not a timing): bench/run-peers.sh at a tiny size runs end to
# end against TARGET (imd, or peer = nginx + nchan) and every message the
# server took reached every subscriber: delivered = expected > 0, lost 0.
# The peer is skipped (77) with the reason when nginx or nchan is missing.
#   bench/test-room.sh BUILD_DIR imd|peer
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$("$here/run-peers.sh" "$1" 40 20 1 1 "$2" 2>&1)
rc=$?
echo "$out"
[ "$rc" = 77 ] && exit 77
[ "$rc" = 0 ] || { echo "FAIL: run-peers.sh exited $rc"; exit 1; }
line=$(echo "$out" | grep -m1 '^MEDIAN subs=40 ') || { echo "FAIL: no MEDIAN line"; exit 1; }
val() { echo "$line" | grep -o " $1=[-0-9.]*" | cut -d= -f2; }
delivered=$(val delivered); expected=$(val expected); lost=$(val lost)
if [ "$expected" -gt 0 ] && [ "$delivered" = "$expected" ] && [ "$lost" = 0 ]; then
  echo "PASS: $delivered of $expected deliveries"
else
  echo "FAIL: delivered $delivered, expected $expected, lost $lost"
  exit 1
fi
