#!/usr/bin/env bash
# HTTP push throughput, imd and the Node peer (bench/peer-chat.js) measured by
# the same load generator in the same run: wrk POSTs
#   {"from":"system","to":"r0","data":{...}}
# to /v1/messages with the Bearer API key (CONNS keep-alive connections, one
# wrk thread, SECONDS), while one WebSocket receiver r0 (`im-bench recv`) is
# online, drains, acks and counts every message. The check: the receiver got
# at least as many messages as wrk saw 200 answers, and each answer said
# "delivered":1 (requests still in flight when wrk stops may be delivered
# without wrk counting their answer). The server is pinned to core 0, wrk and
# the receiver to core 1. Runs alternate the order of the two servers; the
# last lines are medians over the runs.
#   bench/http-push.sh BUILD_DIR [SECONDS] [CONNS] [RUNS] [both|imd|peer]
# IMD=PATH runs that imd binary instead of BUILD_DIR/daemon/imd (e.g. one built
# from a given commit); im-bench always comes from BUILD_DIR. WRK_THREADS (default
# 1) sets wrk's threads. IMD_ARGS adds
# options to imd (e.g. "--threads 2"); SRV_CPUS / CLIENT_CPUS change the
# pinning (default 0 / 1; bench/threads.sh gives imd two cores). RECEIVERS=N
# (default 1) spreads the pushes over N online receivers r0..rN-1 (round robin
# per wrk thread): one WebSocket connection that acks every message cannot
# take more than some tens of thousands a second, and pushes it cannot take
# yet are stored for its sync with "delivered":0, which the check counts as a
# mismatch.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
build=${1:?usage: bench/http-push.sh BUILD_DIR [SECONDS] [CONNS] [RUNS] [both|imd|peer]}
secs=${2:-10}; conns=${3:-32}; runs=${4:-1}; which=${5:-both}
wrk=${WRK:-wrk}
imd=${IMD:-$build/daemon/imd}
srv_cpus=${SRV_CPUS:-0}; client_cpus=${CLIENT_CPUS:-1}
tmp=$(mktemp -d)
srv=; rcv=
cleanup() {
  for p in $rcv $srv; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT

# utime + stime in clock ticks: of a process, and of this shell's finished children (wrk)
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
cpu_self() { awk '{print $16 + $17}' "/proc/$$/stat"; }
# wrk prints latencies as 256.00us, 1.55ms or 1.02s
to_us='function to_us(v) { if (v ~ /us$/) return v + 0; if (v ~ /ms$/) return v * 1000; return v * 1e6 }'

port_of() { # FILE KIND: the port of the "KIND listening ... port N" line
  for _ in $(seq 100); do grep -q "$2 listening" "$1" && break; sleep 0.1; done
  grep "$2 listening" "$1" | grep -o 'port [0-9]*' | awk '{print $2}'
}

# The wrk script: every thread counts its 200s, the "delivered" they report
# and anything else; done() sums them over the threads.
write_lua() { # KEY FILE
  cat >"$2" <<LUA
wrk.method = "POST"
local receivers = ${RECEIVERS:-1}
local n = 0
function request()
  n = n + 1
  return wrk.format(nil, nil, nil, '{"from":"system","to":"r' .. (n % receivers) ..
    '","data":{"kind":"push","text":"abcdefghijklmnop"}}')
end
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $1"
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) ok = 0; delivered = 0; other = 0 end
function response(status, headers, body)
  if status == 200 then
    ok = ok + 1
    local d = string.match(body, '"delivered":%s*(%d+)')
    if d then delivered = delivered + tonumber(d) end
  else
    other = other + 1
  end
end
function done(summary, latency, requests)
  local o, d, x = 0, 0, 0
  for _, t in ipairs(threads) do
    o = o + t:get("ok"); d = d + t:get("delivered"); x = x + t:get("other")
  end
  io.write(string.format("WRK ok=%d delivered=%d other=%d requests=%d errors=%d\n", o, d, x,
    summary.requests, summary.errors.connect + summary.errors.read + summary.errors.write +
    summary.errors.status + summary.errors.timeout))
end
LUA
}

run_one() { # TARGET RUN
  local target=$1 run=$2 out=$tmp/$1.srv ws http key auth=()
  if [ "$target" = imd ]; then
    rm -rf "$tmp/data"
    # shellcheck disable=SC2086 # IMD_ARGS: words
    taskset -c "$srv_cpus" "$imd" --conn-rate 0 --rate-msgs 0 --rate-user-msgs 0 --rate-receiver 0 --data "$tmp/data" --ws 127.0.0.1:0 --tcp off \
      --http 127.0.0.1:0 ${IMD_ARGS:-} >"$out" 2>&1 &
  else
    taskset -c "$srv_cpus" node "$here/peer-chat.js" 0 0 peer-bench-key >"$out" 2>&1 &
  fi
  srv=$!
  ws=$(port_of "$out" ws); http=$(port_of "$out" http)
  if [ -z "$ws" ] || [ -z "$http" ]; then cat "$out" >&2; exit 1; fi
  if [ "$target" = imd ]; then
    key=$(cat "$tmp/data/api-key"); auth=(--secret-file "$tmp/data/secret")
  else
    key=peer-bench-key
  fi
  write_lua "$key" "$tmp/push.lua"
  taskset -c "$client_cpus" "$build/bench/im-bench" recv --url "ws://127.0.0.1:$ws/ws" -n "${RECEIVERS:-1}" --uid-prefix r \
    "${auth[@]}" --idle-exit 3 --hold-seconds $((secs + 60)) >"$tmp/recv" 2>&1 &
  rcv=$!
  for _ in $(seq 100); do grep -q '^connected' "$tmp/recv" && break; sleep 0.1; done
  grep -q "^connected ${RECEIVERS:-1} authed ${RECEIVERS:-1}" "$tmp/recv" || { cat "$tmp/recv" "$out" >&2; exit 1; }
  local t0 t1 c0 c1 w0 w1
  t0=$(date +%s%N); c0=$(ticks "$srv"); w0=$(cpu_self)
  taskset -c "$client_cpus" "$wrk" -t"${WRK_THREADS:-1}" -c"$conns" -d"${secs}s" --latency -s "$tmp/push.lua" \
    "http://127.0.0.1:$http/v1/messages" >"$tmp/wrk"
  t1=$(date +%s%N); c1=$(ticks "$srv"); w1=$(cpu_self)
  wait "$rcv" || true; rcv=
  kill "$srv"; wait "$srv" 2>/dev/null || true; srv=
  sed "s/^/[$target $run] /" "$tmp/wrk"
  grep '^RESULT' "$tmp/recv" | sed "s/^/[$target $run] /"
  local rps p50 p99 ok delivered other received verdict=ok srv_cpu wrk_cpu per_core
  rps=$(awk '/^Requests\/sec:/ {print $2}' "$tmp/wrk")
  p50=$(awk '$1 == "50%" {print to_us($2)}'"$to_us" "$tmp/wrk")
  p99=$(awk '$1 == "99%" {print to_us($2)}'"$to_us" "$tmp/wrk")
  ok=$(grep -o ' ok=[0-9]*' "$tmp/wrk" | cut -d= -f2)
  srv_cpu=$(awk -v c="$((c1 - c0))" -v t="$((t1 - t0))" -v hz="$(getconf CLK_TCK)" \
    'BEGIN {printf "%.0f", 100 * c / hz / (t / 1e9)}')
  # pushes per second of server CPU: what one saturated core would do, if it scaled
  per_core=$(awk -v c="$((c1 - c0))" -v hz="$(getconf CLK_TCK)" -v ok="$ok" \
    'BEGIN {if (c > 0) printf "%.0f", ok / (c / hz); else print 0}')
  wrk_cpu=$(awk -v c="$((w1 - w0))" -v t="$((t1 - t0))" -v hz="$(getconf CLK_TCK)" \
    'BEGIN {printf "%.0f", 100 * c / hz / (t / 1e9)}')
  delivered=$(grep -o ' delivered=[0-9]*' "$tmp/wrk" | cut -d= -f2)
  other=$(grep -o ' other=[0-9]*' "$tmp/wrk" | cut -d= -f2)
  received=$(grep -o ' received=[0-9]*' "$tmp/recv" | cut -d= -f2)
  if [ -z "$received" ] || [ "$received" -lt "$ok" ] || [ "$delivered" != "$ok" ] || [ "$other" != 0 ]; then
    verdict=MISMATCH
  fi
  echo "RESULT target=$target run=$run rps=$rps p50_us=$p50 p99_us=$p99 srv_cpu_pct=$srv_cpu" \
       "wrk_cpu_pct=$wrk_cpu per_core=$per_core ok200=$ok delivered=$delivered" \
       "non200=$other received=$received in_flight_extra=$((received - ok)) check=$verdict" \
    | tee -a "$tmp/results"
}

# shellcheck source=bench/compare-lib.sh
. "$here/compare-lib.sh"
run_all
echo "medians over $runs run(s), $conns connections, $secs s:"
for t in "${targets[@]}"; do
  echo "MEDIAN target=$t rps=$(median "$t" rps 2) p50_us=$(median "$t" p50_us 2)" \
       "p99_us=$(median "$t" p99_us 2) srv_cpu_pct=$(median "$t" srv_cpu_pct 2)" \
       "wrk_cpu_pct=$(median "$t" wrk_cpu_pct 2) per_core=$(median "$t" per_core 2)" \
       "mismatches=$(grep "^RESULT target=$t " "$tmp/results" | grep -c MISMATCH || true)"
done
if [ "${#targets[@]}" = 2 ]; then
  awk -v a="$(median imd rps 2)" -v b="$(median peer rps 2)" \
    'BEGIN {if (b > 0) printf "RATIO rps imd/peer = %.2f\n", a / b}'
  awk -v a="$(median imd per_core 2)" -v b="$(median peer per_core 2)" \
    'BEGIN {if (b > 0) printf "RATIO per_core imd/peer = %.2f\n", a / b}'
fi
