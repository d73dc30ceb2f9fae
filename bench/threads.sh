#!/usr/bin/env bash
# Worker threads (docs/THREADS.md): imd --threads 1 against --threads 2 in the
# same run, each pinned to the cores in SRV_CPUS (default 0,1), the load
# generators to CLIENT_CPUS (default 2-N; on a 2-core machine they share the
# server's cores and the numbers say little):
#  - connect+auth: `im-bench hold` opens CONNS WebSocket connections (window
#    500) that authenticate with real tokens; rate = authed / time until all
#    are settled (start of im-bench to its "connected" line); HOLD_PROCS
#    (default 1) im-bench processes share them, each from its own pair of
#    127.0.0.x source addresses, and the rate is until the last is settled;
#  - HTTP push: bench/http-push.sh with IMD_ARGS=--threads T: wrk POSTs stored
#    1:1 messages to one online receiver, which counts and acks them (rps is
#    stored and delivered, checked against the receiver's count).
# RUNS rounds alternate the order of the two settings; MEDIAN lines last.
# IMD_ARGS adds options to imd in both tests (e.g. "--redis HOST:PORT" to
# measure a cluster node: its routes, store and sends on Redis).
#   bench/threads.sh BUILD_DIR [CONNS] [SECONDS] [RUNS]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
build=${1:?usage: bench/threads.sh BUILD_DIR [CONNS] [SECONDS] [RUNS]}
conns=${2:-10000}; secs=${3:-10}; runs=${4:-3}
imd=${IMD:-$build/daemon/imd}
cores=$(nproc)
srv_cpus=${SRV_CPUS:-0,1}
procs=${HOLD_PROCS:-1}
if [ "$cores" -gt 2 ]; then client_cpus=${CLIENT_CPUS:-2-$((cores - 1))}; else client_cpus=${CLIENT_CPUS:-0-1}; fi
tmp=$(mktemp -d)
srv=
cleanup() {
  [ -n "$srv" ] && { kill "$srv" 2>/dev/null || true; wait "$srv" 2>/dev/null || true; }
  rm -rf "$tmp"
}
trap cleanup EXIT
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

port_of() { # FILE KIND
  for _ in $(seq 100); do grep -q "$2 listening" "$1" && break; sleep 0.1; done
  grep "$2 listening" "$1" | grep -o 'port [0-9]*' | awk '{print $2}'
}

connect_rate() { # THREADS RUN
  local t=$1 out=$tmp/imd.out t0 t1 authed=0 pids=() i n
  rm -rf "$tmp/data"
  taskset -c "$srv_cpus" "$imd" --threads "$t" --conn-rate 0 --max-connections 0 \
    --max-conns-per-ip 0 --data "$tmp/data" --ws 127.0.0.1:0 --tcp off --http off ${IMD_ARGS:-} \
    >"$out" 2>&1 &
  srv=$!
  local ws; ws=$(port_of "$out" ws)
  rm -f "$tmp"/hold.*
  t0=$(date +%s%N)
  for i in $(seq "$procs"); do
    n=$(( conns / procs + (i <= conns % procs ? 1 : 0) ))
    taskset -c "$client_cpus" "$build/bench/im-bench" hold --url "ws://127.0.0.1:$ws/ws" \
      -n "$n" --window 500 --secret-file "$tmp/data/secret" --hold-seconds 1 \
      --uid-prefix "p${i}u" --src "127.0.0.$((2 * i)),127.0.0.$((2 * i + 1))" >"$tmp/hold.$i" 2>&1 &
    pids+=($!)
  done
  for i in $(seq "$procs"); do
    until grep -q '^connected' "$tmp/hold.$i"; do
      kill -0 "${pids[$((i - 1))]}" 2>/dev/null || { cat "$tmp/hold.$i" >&2; exit 1; }
      sleep 0.005
    done
  done
  t1=$(date +%s%N)
  wait "${pids[@]}" || true
  kill "$srv"; wait "$srv" 2>/dev/null || true; srv=
  for i in $(seq "$procs"); do
    authed=$(( authed + $(grep '^connected' "$tmp/hold.$i" | awk '{print $4}') ))
  done
  echo "RESULT test=connect threads=$t run=$2 conns=$conns procs=$procs authed=$authed" \
       "secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", (b - a) / 1e9}')" \
       "per_s=$(awk -v n="$authed" -v a="$t0" -v b="$t1" 'BEGIN {printf "%.0f", n / ((b - a) / 1e9)}')" \
    | tee -a "$tmp/results"
}

push_rate() { # THREADS RUN
  local line
  line=$(IMD_ARGS="--threads $1 ${IMD_ARGS:-}" SRV_CPUS=$srv_cpus CLIENT_CPUS=$client_cpus IMD=$imd \
    "$here/http-push.sh" "$build" "$secs" 64 1 imd | grep '^RESULT')
  echo "RESULT test=push threads=$1 run=$2 ${line#RESULT target=imd run=1 }" | tee -a "$tmp/results"
}

for run in $(seq "$runs"); do
  order="1 2"; [ $((run % 2)) = 0 ] && order="2 1"
  for t in $order; do connect_rate "$t" "$run"; done
  for t in $order; do push_rate "$t" "$run"; done
done

median() { # TEST THREADS FIELD
  grep "^RESULT test=$1 threads=$2 " "$tmp/results" | grep -o " $3=[0-9.]*" | cut -d= -f2 |
    sort -n | awk '{v[NR] = $1} END {if (NR) print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2)}'
}
echo "medians over $runs run(s): imd on cpus $srv_cpus, clients on $client_cpus"
for t in 1 2; do
  echo "MEDIAN threads=$t connect_per_s=$(median connect "$t" per_s)" \
       "push_rps=$(median push "$t" rps) push_srv_cpu_pct=$(median push "$t" srv_cpu_pct)" \
       "push_mismatches=$(grep "^RESULT test=push threads=$t " "$tmp/results" | grep -c MISMATCH || true)"
done
