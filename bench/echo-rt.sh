#!/usr/bin/env bash
# Echo round trips/s and latency with C connections, server pinned to core 0
# and the load client to core 1.
#   bench/echo-rt.sh BUILD_DIR [CONNS] [SECONDS] [echo|peer|tcp]
set -euo pipefail
build=${1:?build dir}; conns=${2:-1000}; secs=${3:-10}; target=${4:-echo}
out=$(mktemp)
if [ "$target" = peer ]; then
  taskset -c 0 node "$(dirname "$0")/peer-echo.js" 0 >"$out" 2>&1 &
else
  taskset -c 0 "$build/examples/im-echo" --ws 127.0.0.1:0 --tcp 127.0.0.1:0 >"$out" 2>&1 &
fi
srv=$!
trap 'kill $srv 2>/dev/null; rm -f "$out"' EXIT
for _ in $(seq 50); do grep -q 'port' "$out" && break; sleep 0.1; done
ws=$(grep 'ws listening' "$out" | grep -o 'port [0-9]*' | awk '{print $2}')
extra=()
if [ "$target" = tcp ]; then
  tcp=$(grep 'tcp listening' "$out" | grep -o 'port [0-9]*' | awk '{print $2}')
  extra=(--tcp "127.0.0.1:$tcp")
fi
taskset -c 1 "$build/bench/im-bench" echo --url "ws://127.0.0.1:$ws/ws" -c "$conns" -d "$secs" "${extra[@]}" 2>&1 | grep RESULT | sed "s/^/target=$target /"
