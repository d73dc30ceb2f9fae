#!/usr/bin/env bash
# User-space RSS of a gateway per idle authenticated WebSocket connection.
#   bench/rss-per-conn.sh BUILD_DIR [CONNS] [echo|peer|imd]
# echo: examples/im-echo (libim alone); imd: the daemon with its defaults
# (worker threads included; IMD_ARGS adds options), real tokens; peer: the
# Node ws relay.
# Starts the server, measures VmRSS, opens CONNS connections (7,500 per
# bench process, source addresses 127.0.0.2..), measures again once all are
# authenticated, and prints the difference per connection.
set -euo pipefail
build=${1:?build dir}
conns=${2:-15000}
target=${3:-echo}
per=7500
out=$(mktemp -d)
auth=()
if [ "$target" = peer ]; then
  node "$(dirname "$0")/peer-echo.js" 0 >"$out/srv" 2>&1 &
elif [ "$target" = imd ]; then
  # no per-address limits: the bench opens 7,500 connections per source pair
  # shellcheck disable=SC2086
  "$build/daemon/imd" --data "$out/data" --ws 127.0.0.1:0 --tcp off --http off \
    --heartbeat 300 --conn-rate 0 --max-conns-per-ip 0 --max-connections 0 \
    ${IMD_ARGS:-} >"$out/srv" 2>&1 &
  auth=(--secret-file "$out/data/secret")
else
  "$build/examples/im-echo" --ws 127.0.0.1:0 --heartbeat 300 >"$out/srv" 2>&1 &
fi
srv=$!
trap 'kill $srv 2>/dev/null; kill $(jobs -p) 2>/dev/null; rm -rf "$out"' EXIT
for _ in $(seq 50); do grep -q 'port' "$out/srv" && break; sleep 0.1; done
port=$(grep -o 'port [0-9]*' "$out/srv" | head -1 | awk '{print $2}')
rss() { awk '/VmRSS/ {print $2}' "/proc/$srv/status"; }
# warm up allocator arenas and lazily-touched pages with a few connections
"$build/bench/im-bench" hold --url "ws://127.0.0.1:$port/ws" -n 100 --hold-seconds 1 "${auth[@]}" \
  >/dev/null
before=$(rss)
procs=$(( (conns + per - 1) / per ))
for i in $(seq 1 "$procs"); do
  n=$per; left=$((conns - (i - 1) * per)); [ "$left" -lt "$n" ] && n=$left
  "$build/bench/im-bench" hold --url "ws://127.0.0.1:$port/ws" -n "$n" "${auth[@]}" \
    --src "127.0.0.$((2 * i)),127.0.0.$((2 * i + 1))" --hold-seconds 20 >"$out/b$i" 2>&1 &
done
for i in $(seq 1 "$procs"); do
  for _ in $(seq 600); do grep -q '^connected' "$out/b$i" && break; sleep 0.1; done
done
sleep 1
after=$(rss)
cat "$out"/b* | grep '^connected'
echo "target=$target conns=$conns rss_before_kib=$before rss_after_kib=$after" \
     "bytes_per_conn=$(( (after - before) * 1024 / conns ))"
