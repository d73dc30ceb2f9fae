#!/usr/bin/env bash
# Abuse protection under a connection flood (issue 11 §6): imd with its
# default guard (100 new connections/s per source, burst 1000, bans from
# 10 s escalating x6). PAIRS normal chat pairs at RATE msgs/s are measured
# for SECONDS without a flood, then again while one source (127.0.0.2)
# opens FLOOD connections a second. Prints both chat RESULT lines, the
# flooder's RESULT, imd's refusal counters and the bans it holds.
#   bench/flood.sh BUILD_DIR [FLOOD] [SECONDS] [PAIRS] [RATE]
set -euo pipefail
build=${1:?usage: bench/flood.sh BUILD_DIR [FLOOD] [SECONDS] [PAIRS] [RATE]}
flood=${2:-5000}; secs=${3:-10}; pairs=${4:-100}; rate=${5:-1000}
tmp=$(mktemp -d)
srv=
cleanup() {
  if [ -n "$srv" ]; then kill "$srv" 2>/dev/null || true; wait "$srv" 2>/dev/null || true; fi
  rm -rf "$tmp"
}
trap cleanup EXIT
key=flood-bench-api-key-0123456789
taskset -c 0 "$build/daemon/imd" --data "$tmp/data" --ws 127.0.0.1:0 --tcp off \
  --http 127.0.0.1:0 --api-key-file <(echo "$key") >"$tmp/out" 2>&1 &
srv=$!
for _ in $(seq 100); do grep -q "http listening" "$tmp/out" && break; sleep 0.1; done
ws=$(grep "ws listening" "$tmp/out" | grep -o 'port [0-9]*' | awk '{print $2}')
http=$(grep "http listening" "$tmp/out" | grep -o 'port [0-9]*' | awk '{print $2}')
chat() {
  taskset -c 1 "$build/bench/im-bench" chat --url "ws://127.0.0.1:$ws/ws" --pairs "$pairs" \
    --rate "$rate" -d "$secs" --warmup 2 --secret-file "$tmp/data/secret" 2>/dev/null |
    sed "s/^RESULT mode=chat /RESULT phase=$1 mode=chat /"
}
metrics() {
  curl -s -H "Authorization: Bearer $key" "http://127.0.0.1:$http/metrics" |
    grep -E '^imd_(connections_refused_total|bans_total|guard_sources)'
}
chat before
# the flood starts with the measured part of the second run (after its warm-up)
( sleep 2; taskset -c 1 "$build/bench/conn-flood" 127.0.0.2 127.0.0.1 "$ws" "$flood" "$secs" ) \
  >"$tmp/flood" &
fl=$!
chat during
wait "$fl"
cat "$tmp/flood"
metrics
echo "bans:"
curl -s -H "Authorization: Bearer $key" "http://127.0.0.1:$http/v1/bans"; echo
