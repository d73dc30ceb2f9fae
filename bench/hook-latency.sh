#!/usr/bin/env bash
# Latency the message hook adds to a 1:1 message (docs/HOOKS.md): the same
# `im-bench chat` load (PAIRS pairs, RATE msgs/s, open loop, 3 s warm-up, SECONDS
# measured) against imd without hooks, then with --hook-message on asking a
# local back end (bench/hook-backend.py: asyncio, keep-alive, answers 200 {}).
# imd is pinned to core 0, the client and the back end to core 1. Prints both
# RESULT lines, the added one-way / ack latency at p50 and p99, and imd's own
# imd_hook_latency_seconds (POST to answer) from /metrics. RUNS alternate the two
# servers; ADDED lines compare medians over the runs (a shared host is noisy at p99).
#   bench/hook-latency.sh BUILD_DIR [RATE] [SECONDS] [PAIRS] [RUNS]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
build=${1:?usage: bench/hook-latency.sh BUILD_DIR [RATE] [SECONDS] [PAIRS] [RUNS]}
rate=${2:-1000}; secs=${3:-10}; pairs=${4:-20}; runs=${5:-1}
imd=${IMD:-$build/daemon/imd}
key=hook-bench-api-key-0123456789
tmp=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT

port_of() { # FILE KIND
  for _ in $(seq 100); do grep -q "$2 port" "$1" && break; sleep 0.1; done
  grep "$2 port" "$1" | head -1 | grep -o 'port [0-9]*' | awk '{print $2}'
}

taskset -c 1 /usr/bin/python3 "$here/hook-backend.py" 0 >"$tmp/backend" 2>&1 &
pids+=($!)
bport=$(port_of "$tmp/backend" backend)

run_one() { # NAME IMD-ARGS...
  local name=$1; shift
  rm -rf "$tmp/data"
  taskset -c 0 "$imd" --conn-rate 0 --rate-msgs 0 --rate-user-msgs 0 --rate-receiver 0 --data "$tmp/data" --ws 127.0.0.1:0 --tcp off --http 127.0.0.1:0 \
    --api-key "$key" --fsync off "$@" >"$tmp/$name.srv" 2>&1 &
  local srv=$!
  pids+=($srv)
  local ws http
  ws=$(port_of "$tmp/$name.srv" "ws listening on 127.0.0.1:0")
  http=$(port_of "$tmp/$name.srv" "http listening on 127.0.0.1:0")
  taskset -c 1 "$build/bench/im-bench" chat --url "ws://127.0.0.1:$ws/ws" --pairs "$pairs" \
    --rate "$rate" -d "$secs" --secret-file "$tmp/data/secret" --server-pid "$srv" \
    2>"$tmp/err" | sed "s/^RESULT mode=chat /RESULT target=$name mode=chat /" \
    | tee -a "$tmp/results" || { cat "$tmp/err" >&2; exit 1; }
  curl -s -H "Authorization: Bearer $key" "http://127.0.0.1:$http/metrics" \
    | grep '^imd_hook_' >"$tmp/$name.metrics" || true
  kill "$srv"; wait "$srv" 2>/dev/null || true
}

for _ in $(seq "$runs"); do
  run_one plain
  run_one hooked --hook-url "http://127.0.0.1:$bport/hooks" --hook-message on --hook-presence off
done

get() { # TARGET KEY: the median over the runs
  grep "target=$1 " "$tmp/results" | grep -o " $2=[0-9.]*" | cut -d= -f2 | sort -g \
    | awk '{v[NR] = $1} END {print NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'
}
echo "medians over $runs run(s), rate $rate/s, $pairs pairs, $secs s measured:"
for k in p50_us p99_us ack_p50_us ack_p99_us; do
  echo "ADDED $k = $(awk -v a="$(get plain "$k")" -v b="$(get hooked "$k")" \
    'BEGIN {printf "%.0f us (%.0f -> %.0f)", b - a, a, b}')"
done
echo "imd_hook_latency_seconds (POST to answer) of the last hooked run:"
sed 's/^/  /' "$tmp/hooked.metrics"
