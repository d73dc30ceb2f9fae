#!/usr/bin/env bash
# User-space instructions imd executes per WebSocket connect + auth, counted
# by valgrind's callgrind (deterministic, unlike time on a shared VM): imd
# runs under callgrind twice, with N1 and N2 connections of `im-bench hold`
# (real tokens, the auth message of libim's client), and the difference of
# the two totals over N2 - N1 is the cost of one connection, startup and
# exit cancelled out. Kernel work (accept, the TCP handshake, reads and
# writes) is not counted: measure it with perf, as docs/BENCHMARKS.md does.
#   bench/connect-instructions.sh BUILD_DIR [N1] [N2]
# IMD=PATH measures that imd binary instead of BUILD_DIR/daemon/imd (im-bench
# always comes from BUILD_DIR). Needs valgrind.
set -euo pipefail
build=${1:?usage: bench/connect-instructions.sh BUILD_DIR [N1] [N2]}
n1=${2:-500}; n2=${3:-2500}
imd=${IMD:-$build/daemon/imd}

total() { # N: the instructions of one imd run that takes N connections
  local n=$1 d srv ws
  d=$(mktemp -d)
  valgrind --tool=callgrind --callgrind-out-file="$d/cg.out" "$imd" --data "$d/data" \
    --ws 127.0.0.1:0 --tcp off --http off --conn-rate 0 --max-connections 0 --threads 1 \
    >"$d/out" 2>&1 &
  srv=$!
  for _ in $(seq 300); do grep -q "ws listening" "$d/out" && break; sleep 0.1; done
  ws=$(grep "ws listening" "$d/out" | grep -o 'port [0-9]*' | awk '{print $2}')
  [ -n "$ws" ] || { cat "$d/out" >&2; exit 1; }
  "$build/bench/im-bench" hold --url "ws://127.0.0.1:$ws/ws" -n "$n" --window 100 \
    --secret-file "$d/data/secret" --hold-seconds 0 --uid-prefix pu --src 127.0.0.2 >"$d/hold" 2>&1
  grep -q "^connected $n authed $n " "$d/hold" || { cat "$d/hold" >&2; exit 1; }
  kill "$srv"; wait "$srv" 2>/dev/null || true
  callgrind_annotate "$d/cg.out" 2>/dev/null | grep -m1 "PROGRAM TOTALS" |
    awk '{gsub(",", "", $1); print $1}'
  rm -rf "$d"
}

a=$(total "$n1")
b=$(total "$n2")
echo "RESULT instructions_per_connect=$(( (b - a) / (n2 - n1) )) n1=$n1 n2=$n2"
