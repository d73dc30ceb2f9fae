#!/usr/bin/env bash
# Idle authenticated connections across an imd cluster on one Redis: the
# user-space RSS of each imd and of redis-server per connection.
#   bench/rss-cluster.sh BUILD_DIR [CONNS] [NODES]
# Starts a redis-server (free port, temp dir, AOF, appendfsync always) and
# NODES imd nodes with --redis, warms each node up with 100 connections,
# reads every VmRSS, then opens CONNS WebSocket connections spread evenly
# over the nodes, one `im-bench hold` process per node (authenticated in the
# upgrade query with real tokens, source addresses 127.0.0.2.. two per
# process), and reads every VmRSS again once all are settled. Each process
# may hold at most `ulimit -n` files (raised here to the hard limit), so a
# node takes at most that minus imd's reserve of 128.
# IMD=PATH runs that imd binary; im-bench comes from BUILD_DIR.
set -euo pipefail
build=${1:?usage: bench/rss-cluster.sh BUILD_DIR [CONNS] [NODES]}
conns=${2:-100000}; nodes=${3:-6}
imd=${IMD:-$build/daemon/imd}
ulimit -Sn "$(ulimit -Hn)"
tmp=$(mktemp -d)
pids=() holds=()
cleanup() {
  local p
  for p in "${holds[@]}" "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${holds[@]}" "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT

rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
port_of() {
  for _ in $(seq 100); do grep -q "$2 listening" "$1" 2>/dev/null && break; sleep 0.1; done
  grep "$2 listening" "$1" | grep -o 'port [0-9]*' | awk '{print $2}'
}

echo "start: $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg);" \
     "open files: soft $(ulimit -Sn), hard $(ulimit -Hn)"
head -c 24 /dev/urandom | base64 >"$tmp/secret"
rport=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir "$tmp/redis"
redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly yes --appendfsync always \
  --dir "$tmp/redis" --logfile "$tmp/redis/log" &
pids+=($!)
for _ in $(seq 100); do redis-cli -p "$rport" PING 2>/dev/null | grep -q PONG && break; sleep 0.05; done

urls=()
for i in $(seq "$nodes"); do
  "$imd" --conn-rate 0 --rate-msgs 0 --rate-user-msgs 0 --rate-receiver 0 --data "$tmp/n$i" --ws 127.0.0.1:0 --tcp off --http 127.0.0.1:0 --secret-file "$tmp/secret" \
    --redis "127.0.0.1:$rport" --node "n$i" --heartbeat 300 >"$tmp/n$i.out" 2>&1 &
  pids+=($!)
  ws=$(port_of "$tmp/n$i.out" ws); http=$(port_of "$tmp/n$i.out" http)
  if [ -z "$ws" ] || [ -z "$http" ]; then cat "$tmp/n$i.out" >&2; exit 1; fi
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$http/healthz" >/dev/null && break; sleep 0.1; done
  urls+=("ws://127.0.0.1:$ws/ws")
done
grep -h 'at most' "$tmp"/n*.out | sort | uniq -c

# warm up allocator arenas and lazily-touched pages with a few connections
for i in $(seq "$nodes"); do
  "$build/bench/im-bench" hold --url "${urls[$((i - 1))]}" -n 100 --hold-seconds 1 \
    --secret-file "$tmp/secret" --uid-prefix "w$i-" >/dev/null &
  holds+=($!)
done
for p in "${holds[@]}"; do wait "$p"; done
holds=()
sleep 2
before=()
for p in "${pids[@]}"; do before+=("$(rss "$p")"); done
mem0=$(redis-cli -p "$rport" INFO memory | tr -d '\r' | sed -n 's/^used_memory:\([0-9]*\)/\1/p')

t0=$(date +%s)
for i in $(seq "$nodes"); do
  n=$((conns / nodes)); [ "$i" -le $((conns % nodes)) ] && n=$((n + 1))
  "$build/bench/im-bench" hold --url "${urls[$((i - 1))]}" -n "$n" --hold-seconds 600 \
    --src "127.0.0.$((2 * i)),127.0.0.$((2 * i + 1))" --secret-file "$tmp/secret" \
    --uid-prefix "n$i-" >"$tmp/b$i" 2>&1 &
  holds+=($!)
done
for i in $(seq "$nodes"); do
  for _ in $(seq 3000); do grep -q '^connected' "$tmp/b$i" && break; sleep 0.1; done
done
t1=$(date +%s)
sleep 2
after=()
for p in "${pids[@]}"; do after+=("$(rss "$p")"); done
mem1=$(redis-cli -p "$rport" INFO memory | tr -d '\r' | sed -n 's/^used_memory:\([0-9]*\)/\1/p')
authed=0
for i in $(seq "$nodes"); do
  line=$(grep '^connected' "$tmp/b$i" || echo "connected 0 authed 0 failed ?")
  echo "node n$i: $line$(grep -m1 'first failure' "$tmp/b$i" | sed 's/^/; /')"
  authed=$((authed + $(echo "$line" | awk '{print $4}')))
done
echo "settled in $((t1 - t0)) s; load average $(cut -d' ' -f1-3 /proc/loadavg)"
total_imd=0
for i in $(seq "$nodes"); do
  n=$(grep '^connected' "$tmp/b$i" | awk '{print $4}')
  d=$(( ${after[$i]} - ${before[$i]} ))
  total_imd=$((total_imd + d))
  echo "RESULT proc=n$i conns=${n:-0} rss_before_kib=${before[$i]} rss_after_kib=${after[$i]}" \
       "bytes_per_conn=$(( ${n:-0} > 0 ? d * 1024 / n : 0 ))"
done
echo "RESULT proc=redis conns=$authed rss_before_kib=${before[0]} rss_after_kib=${after[0]}" \
     "bytes_per_conn=$(( authed > 0 ? (after[0] - before[0]) * 1024 / authed : 0 ))" \
     "used_memory_per_conn=$(( authed > 0 ? (mem1 - mem0) / authed : 0 ))" \
     "keys=$(redis-cli -p "$rport" DBSIZE)"
echo "RESULT proc=all-imd conns=$authed bytes_per_conn=$(( authed > 0 ? total_imd * 1024 / authed : 0 ))"
