#!/usr/bin/env bash
# Server CPU per heartbeat, and per second of idle, as the number of
# connections grows: the read-idle deadlines sit on a timer wheel, so a ping
# (which moves its connection's deadline) and a tick should cost the same at
# 1,000 connections as at 15,000.
#   bench/heartbeat-cost.sh BUILD_DIR [COUNTS] [SECONDS]
# COUNTS: comma-separated (default 1000,5000,10000,15000). For each count:
# imd (one worker, real tokens, --heartbeat 10) on core 0, the connections
# from `im-bench hold` processes (7,500 each, own 127.0.0.x sources) on
# core 1; then two windows of SECONDS (default 10) on imd's CPU time
# (/proc/PID/stat): "idle", the clients not pinging (--ping-seconds 300),
# and "pinging", every client pinging once a second. Prints CPU per second
# idle, and per ping (the pinging window's CPU less the idle one's, over the
# pings sent).
set -euo pipefail
build=${1:?usage: bench/heartbeat-cost.sh BUILD_DIR [COUNTS] [SECONDS]}
counts=${2:-1000,5000,10000,15000}
secs=${3:-10}
per=7500
tmp=$(mktemp -d)
srv=
cleanup() {
  kill $(jobs -p) 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT
ulimit -n 20000 2>/dev/null || true
tck=$(getconf CLK_TCK)
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# hold N PING_SECONDS: N connections in processes of $per; waits until all
# are settled; sets pids
hold() {
  local n=$1 ping=$2 procs i k left
  procs=$(( (n + per - 1) / per ))
  pids=()
  for i in $(seq 1 "$procs"); do
    k=$per; left=$((n - (i - 1) * per)); [ "$left" -lt "$k" ] && k=$left
    taskset -c 1 "$build/bench/im-bench" hold --url "ws://127.0.0.1:$port/ws" -n "$k" \
      --secret-file "$tmp/data/secret" --uid-prefix "p${ping}x${i}u" \
      --src "127.0.0.$((2 * i)),127.0.0.$((2 * i + 1))" --ping-seconds "$ping" \
      --hold-seconds 600 >"$tmp/b$i" 2>&1 &
    pids+=($!)
  done
  for i in $(seq 1 "$procs"); do
    for _ in $(seq 600); do grep -q '^connected' "$tmp/b$i" && break; sleep 0.1; done
    grep -q "failed 0" "$tmp/b$i" || { cat "$tmp/b$i" >&2; exit 1; }
  done
}

# window: imd's CPU ticks over $secs seconds
window() {
  local c0 c1
  c0=$(ticks "$srv"); sleep "$secs"; c1=$(ticks "$srv")
  echo $((c1 - c0))
}

for n in ${counts//,/ }; do
  rm -rf "$tmp/data"
  taskset -c 0 "$build/daemon/imd" --threads 1 --data "$tmp/data" --ws 127.0.0.1:0 --tcp off \
    --http off --heartbeat 10 --conn-rate 0 --max-conns-per-ip 0 --max-connections 0 \
    >"$tmp/srv" 2>&1 &
  srv=$!
  for _ in $(seq 100); do grep -q 'ws listening' "$tmp/srv" && break; sleep 0.1; done
  port=$(grep 'ws listening' "$tmp/srv" | grep -o 'port [0-9]*' | awk '{print $2}')
  hold "$n" 300
  sleep 2 # the setup's last writes and acks
  idle=$(window)
  kill "${pids[@]}"; wait "${pids[@]}" 2>/dev/null || true
  hold "$n" 1
  sleep 2
  busy=$(window)
  kill "${pids[@]}"; wait "${pids[@]}" 2>/dev/null || true
  kill "$srv"; wait "$srv" 2>/dev/null || true
  awk -v n="$n" -v s="$secs" -v i="$idle" -v b="$busy" -v t="$tck" 'BEGIN {
    printf "RESULT conns=%d idle_cpu_ms_per_s=%.2f pinging_cpu_pct=%.1f us_per_ping=%.2f\n",
      n, i * 1000 / t / s, b * 100 / t / s, (b - i) * 1e6 / t / (n * s)
  }'
done
