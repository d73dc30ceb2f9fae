#!/usr/bin/env bash
# TLS handshakes per second that im-echo's one event-loop thread serves, for
# an ECDHE-ECDSA P-256 certificate and an RSA-2048 one (TLS 1.2, mbedTLS
# 2.28): full handshakes (`openssl s_time -new`: one after another, no data),
# and resumed ones with a session ticket (`-reuse`). The client is pinned to
# another core than the server.
# Prints the client's rate and the server's CPU seconds, and their quotient:
# handshakes per server CPU second, the number that stays comparable on a
# shared machine.
#   bench/tls-handshakes.sh BUILD_DIR [SECONDS]
set -euo pipefail
build=${1:?build dir}
secs=${2:-10}
out=$(mktemp -d)
srv=
trap '[ -n "$srv" ] && kill $srv 2>/dev/null; rm -rf "$out"' EXIT
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
run() { # $1 = name, $2 = -new|-reuse, rest = openssl req key options
  local name=$1 mode=$2
  shift 2
  openssl req -x509 "$@" -nodes -keyout "$out/$name.key" -out "$out/$name.crt" -days 1 \
    -subj /CN=localhost 2>/dev/null
  taskset -c 0 "$build/examples/im-echo" --ws 127.0.0.1:0 --tls-cert "$out/$name.crt" \
    --tls-key "$out/$name.key" >"$out/srv" 2>&1 &
  srv=$!
  for _ in $(seq 50); do grep -q 'port' "$out/srv" && break; sleep 0.1; done
  local port t0 t1 hz rate
  port=$(grep -o 'port [0-9]*' "$out/srv" | head -1 | awk '{print $2}')
  t0=$(cpu_ticks $srv)
  taskset -c 1 openssl s_time -connect "127.0.0.1:$port" "$mode" -time "$secs" >"$out/st" 2>&1
  t1=$(cpu_ticks $srv)
  kill $srv
  wait $srv 2>/dev/null || true
  srv=
  hz=$(getconf CLK_TCK)
  rate=$(grep -o '[0-9.]* connections/user sec' "$out/st" | head -1 || true)
  local n
  n=$(grep -o '^[0-9]* connections in [0-9.]*s' "$out/st" | head -1)
  local count=${n%% *}
  local cpu
  cpu=$(awk -v d=$((t1 - t0)) -v hz="$hz" 'BEGIN {printf "%.2f", d / hz}')
  echo "$name $mode: $n; server cpu ${cpu}s;" \
       "$(awk -v c="$count" -v s="$cpu" 'BEGIN {printf "%.0f", c / s}') handshakes per server cpu second" \
       "(client: $rate)"
}
run ecdsa-p256 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256
run rsa-2048 -new -newkey rsa:2048
run ecdsa-p256 -reuse -newkey ec -pkeyopt ec_paramgen_curve:P-256
