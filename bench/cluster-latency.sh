#!/usr/bin/env bash
# 1:1 chat latency through an imd cluster on one Redis, and the Redis commands
# each message costs. Per run: a fresh redis-server (free port, temp dir, AOF
# with the case's appendfsync), imd nodes A (and B) with --redis, then
# `im-bench chat` with real tokens, RATE msgs/s in all from PAIRS senders on
# node A to PAIRS receivers on node B (--recv-url), a 3 s warm-up, SECONDS
# measured. Cases (CASES, space-separated, default all four):
#   cross-always    sender on A, receiver on B, appendfsync always
#   cross-everysec  the same with appendfsync everysec
#   single-always   sender and receiver on A alone (still the Redis store)
#   rooms-always    no chat: bench/room-relay.py sends ROOM_MSGS (2000) room
#                   messages from A to 10 members on A and 10 on B
# Commands: INFO commandstats and the deliver streams' entries-added, read
# once all connections are up and again after im-bench has exited, divided
# by every message sent (warm-up included), and redis_us_per_msg: the time
# Redis spent in those commands per message (commandstats usec of the commands
# the nodes send; a script's usec includes its inner calls; each such command
# is listed with its calls and mean time per call). Also the CPU share of redis,
# A and B over that window. Pinning (taskset): PIN_IMD (A and B), PIN_REDIS,
# PIN_CLIENT; defaults 0, 1, 1. PERF_DIR=DIR also records `perf record -g` of
# redis, A and B for PERF_S (default 5) seconds of each run's measured part,
# into DIR/CASE-RUN.data (see `perf report -i`). REDIS_ARGS: more
# redis-server options (e.g. '--auto-aof-rewrite-percentage 0'). DUMP_DIR=DIR
# keeps each chat run's per-message latencies (im-bench --dump) as
# DIR/CASE-RUN.txt.
#   bench/cluster-latency.sh BUILD_DIR [RATE] [SECONDS] [PAIRS] [RUNS]
# IMD=PATH runs that imd binary; im-bench comes from BUILD_DIR. IMD_ARGS adds
# options to both nodes (e.g. "--threads 2" with PIN_IMD=0,1).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
build=${1:?usage: bench/cluster-latency.sh BUILD_DIR [RATE] [SECONDS] [PAIRS] [RUNS]}
rate=${2:-5000}; secs=${3:-20}; pairs=${4:-100}; runs=${5:-1}
cases=${CASES:-cross-always cross-everysec single-always rooms-always}
imd=${IMD:-$build/daemon/imd}
pin_imd=${PIN_IMD:-0}; pin_redis=${PIN_REDIS:-1}; pin_client=${PIN_CLIENT:-1}
warmup=3
tmp=$(mktemp -d)
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT
stop_all() { # the processes of one run; redis last, so the nodes leave cleanly
  local p
  for p in "${pids[@]:1}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  kill "${pids[0]}" 2>/dev/null || true; wait "${pids[0]}" 2>/dev/null || true
  pids=()
}

free_port() {
  if command -v python3 >/dev/null; then
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
    return
  fi
  local p # without Python: a random high port that nothing answers on
  while :; do
    p=$(( 20000 + RANDOM % 40000 ))
    (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return; }
  done
}
# port_of FILE KIND: the port of the "KIND listening ... port N" line
port_of() {
  for _ in $(seq 100); do grep -q "$2 listening" "$1" 2>/dev/null && break; sleep 0.1; done
  grep "$2 listening" "$1" | grep -o 'port [0-9]*' | awk '{print $2}'
}
ticks() { awk '{sub(/.*\) /, ""); print $12 + $13}' "/proc/$1/stat"; }
# snapshot FILE: every command's calls, and the deliver streams' entries-added
snapshot() {
  redis-cli -p "$rport" INFO commandstats | tr -d '\r' \
    | sed -n 's/^cmdstat_\([^:]*\):calls=\([0-9]*\),usec=\([0-9]*\),.*/\1 \2 \3/p' >"$1"
  local n
  for n in A B; do
    echo "deliver:$n $(redis-cli -p "$rport" XINFO STREAM "im:deliver:{$n}" 2>/dev/null \
      | tr -d '\r' | awk 'p {print; exit} $0 == "entries-added" {p = 1}')" >>"$1"
  done
}

# start_node NAME: an imd cluster node on kernel-picked ports; sets wsport
start_node() {
  local out=$tmp/$1.out
  taskset -c "$pin_imd" "$imd" --conn-rate 0 --rate-msgs 0 --rate-user-msgs 0 --rate-receiver 0 --data "$tmp/$1" --ws 127.0.0.1:0 --tcp off --http 127.0.0.1:0 \
    --secret-file "$tmp/secret" --redis "127.0.0.1:$rport" --node "$1" --lease-ttl 10 \
    ${IMD_ARGS:-} >"$out" 2>&1 &
  pids+=($!)
  wsport=$(port_of "$out" ws)
  local http
  http=$(port_of "$out" http)
  if [ -z "$wsport" ] || [ -z "$http" ]; then cat "$out" >&2; exit 1; fi
  for _ in $(seq 100); do
    curl -fs "http://127.0.0.1:$http/healthz" >/dev/null && return
    sleep 0.1
  done
  echo "node $1 not healthy:" >&2; cat "$out" >&2; exit 1
}

run_one() { # CASE RUN
  local case=$1 run=$2 fsync=${1#*-} bench_out=$tmp/bench.out bench_pid dump=()
  [ -n "${DUMP_DIR:-}" ] && dump=(--dump "$DUMP_DIR/$case-$run.txt")
  rm -rf "$tmp/redis" "$tmp/A" "$tmp/B"
  mkdir -p "$tmp/redis"
  rport=$(free_port)
  # shellcheck disable=SC2086 # REDIS_ARGS: options, split on purpose
  taskset -c "$pin_redis" redis-server --port "$rport" --bind 127.0.0.1 --save '' \
    --appendonly yes --appendfsync "$fsync" --dir "$tmp/redis" --logfile "$tmp/redis/log" \
    --latency-monitor-threshold 5 ${REDIS_ARGS:-} &
  pids=($!)
  for _ in $(seq 100); do redis-cli -p "$rport" PING 2>/dev/null | grep -q PONG && break; sleep 0.05; done
  start_node A
  local url_a="ws://127.0.0.1:$wsport/ws" url_b
  url_b=$url_a
  if [ "${case%%-*}" != single ]; then
    start_node B
    url_b="ws://127.0.0.1:$wsport/ws"
  fi
  local msgs=$(( rate * (secs + warmup) ))
  if [ "${case%%-*}" = rooms ]; then
    msgs=${ROOM_MSGS:-2000}
    taskset -c "$pin_client" /usr/bin/python3 "$here/room-relay.py" "$url_a" "$url_b" \
      "$tmp/secret" "$msgs" >"$bench_out" 2>"$tmp/err" &
  else
    taskset -c "$pin_client" "$build/bench/im-bench" chat --url "$url_a" --recv-url "$url_b" \
      --pairs "$pairs" --rate "$rate" -d "$secs" --warmup "$warmup" --secret-file "$tmp/secret" \
      --server-pid "${pids[1]}" "${dump[@]}" >"$bench_out" 2>"$tmp/err" &
  fi
  bench_pid=$!
  for _ in $(seq 600); do grep -q '^connected' "$bench_out" && break; sleep 0.05; done
  snapshot "$tmp/before"
  if [ -n "${PERF_DIR:-}" ]; then
    mkdir -p "$PERF_DIR"
    (sleep "$warmup"; perf record -q -g -o "$PERF_DIR/$case-$run.data" \
       -p "$(IFS=,; echo "${pids[*]}")" -- sleep "${PERF_S:-5}" >/dev/null 2>&1) &
    perf_pid=$!
  fi
  local t0 c0=() p
  t0=$(date +%s%N)
  for p in "${pids[@]}"; do c0+=("$(ticks "$p")"); done
  wait "$bench_pid" || { cat "$tmp/err" >&2; exit 1; }
  if [ -n "${perf_pid:-}" ]; then wait "$perf_pid" || true; perf_pid=; fi
  sleep 1.5 # the nodes' next tick sends the coalesced delivered marks
  local cpu="" i=0 names=(redis A B) t1
  t1=$(date +%s%N)
  for p in "${pids[@]}"; do
    cpu="$cpu cpu_${names[$i]}=$(awk -v a="${c0[$i]}" -v b="$(ticks "$p")" -v t="$((t1 - t0))" \
      -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%.1f", 100 * (b - a) / hz / (t / 1e9)}')"
    i=$((i + 1))
  done
  snapshot "$tmp/after"
  # Redis's own stalls of 5 ms or more (event, last ms, max ms), if any
  redis-cli -p "$rport" LATENCY LATEST | paste -sd' ' \
    | awk -v c="$case" -v r="$run" 'NF {print "[" c " " r "] redis stalls >= 5 ms: " $0}'
  redis-cli -p "$rport" SLOWLOG GET 3 | tr -d '\r' | paste -sd' ' | cut -c1-400 \
    | awk -v c="$case" -v r="$run" 'NF {print "[" c " " r "] slowlog: " $0}'
  sed "s/^/[$case $run] /" "$bench_out"
  grep -v '^\[' "$tmp/err" | sed "s/^/[$case $run] stderr: /" >&2 || true
  # Commands per message. Inside the scripts: what the store's and the
  # cluster's Lua scripts call (every XADD now: the store's inbox appends and
  # the cluster's ROUTE_PUSH, which appends to the delivery streams).
  awk -v msgs="$msgs" -v tag="target=$case" -v cpu="$cpu" '
    FNR == NR {a[$1] = $2; ua[$1] = $3; next}
    {b[$1] = $2; ub[$1] = $3}
    END {
      split("get set hget hset hincrby hmget hgetall hvals hdel sadd srem smembers zadd zrem " \
            "zrangebyscore xrange xtrim pexpire del time", s, " ")
      for (i in s) inner[s[i]] = 1
      for (k in b) {
        if (k ~ /^deliver:/ || k == "info" || k == "xinfo" || k == "ping") continue
        d = b[k] - a[k]
        if (d == 0) continue
        if (k == "xadd") { ins += d; all = all " xadd(script)=" d; continue }
        if (k in inner) { ins += d; all = all " " k "=" d; continue }
        cli += d; us += ub[k] - ua[k]
        all = all sprintf(" %s=%d(%.1fus)", k, d, (ub[k] - ua[k]) / d)
      }
      printf "CMDS %s msgs=%d client_per_msg=%.3f script_per_msg=%.3f total_per_msg=%.3f" \
             " redis_us_per_msg=%.1f%s\n", tag, msgs, cli / msgs, ins / msgs, (cli + ins) / msgs,
             us / msgs, all
      printf "CPU %s%s\n", tag, cpu
    }' "$tmp/before" "$tmp/after" | tee -a "$tmp/results" | sed "s/^/[$case $run] /"
  sed -n "s/^RESULT mode=chat /RESULT target=$case mode=chat /p" "$bench_out" >>"$tmp/results"
  stop_all
}

head -c 24 /dev/urandom | base64 >"$tmp/secret"
echo "start: $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "imd: $imd; $(redis-server --version | cut -d' ' -f1-3)"
echo "pinned: imd nodes on CPU $pin_imd, redis-server on $pin_redis, im-bench on $pin_client"
for run in $(seq "$runs"); do
  for c in $cases; do run_one "$c" "$run"; done
done
echo "end: load average $(cut -d' ' -f1-3 /proc/loadavg)"

# shellcheck source=bench/compare-lib.sh
. "$here/compare-lib.sh"
keys="p50_us p90_us p99_us max_us ack_p50_us ack_p99_us w_p50_us lag_p50_us recv_rate lost errors"
med() { median "$@" 2>/dev/null | head -1 || true; }
echo "medians over $runs run(s), rate $rate/s, $pairs pairs, $secs s measured:"
for c in $cases; do
  line="MEDIAN target=$c"
  if [ "${c%%-*}" != rooms ]; then
    for k in $keys; do line="$line $k=$(med "$c" "$k")"; done
  fi
  sed -i "s/^CMDS target=$c /RESULT target=$c cmds /; s/^CPU target=$c /RESULT target=$c cpu /" \
    "$tmp/results"
  for k in client_per_msg script_per_msg total_per_msg redis_us_per_msg; do line="$line $k=$(med "$c" "$k" 3)"; done
  for k in cpu_redis cpu_A cpu_B; do line="$line $k=$(med "$c" "$k")"; done
  echo "$line"
done
