#!/usr/bin/env bash
# Server RSS per idle authenticated connection, plain ws:// next to wss://
# (TLS 1.2, ECDHE-ECDSA P-256 certificate), both on im-echo, both opened by
# the same Python client (bench/tls-hold.py).
#   bench/tls-rss-per-conn.sh BUILD_DIR [CONNS]
set -euo pipefail
build=${1:?build dir}
conns=${2:-3000}
here=$(cd "$(dirname "$0")" && pwd)
out=$(mktemp -d)
srv=
trap '[ -n "$srv" ] && kill $srv 2>/dev/null; rm -rf "$out"' EXIT
ulimit -n 20000
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$out/key.pem" \
  -out "$out/cert.pem" -days 1 -subj /CN=localhost 2>/dev/null
rss() { awk '/VmRSS/ {print $2}' "/proc/$srv/status"; }
measure() { # $1 = ws|wss
  local scheme=$1 tls=()
  [ "$scheme" = wss ] && tls=(--tls-cert "$out/cert.pem" --tls-key "$out/key.pem")
  "$build/examples/im-echo" --ws 127.0.0.1:0 --heartbeat 300 --auth-timeout 60000 "${tls[@]}" \
    >"$out/srv" 2>&1 &
  srv=$!
  for _ in $(seq 50); do grep -q 'port' "$out/srv" && break; sleep 0.1; done
  local port url
  port=$(grep -o 'port [0-9]*' "$out/srv" | head -1 | awk '{print $2}')
  url="$scheme://127.0.0.1:$port/ws"
  # warm up allocator arenas and lazily-touched pages with a few connections
  mkfifo "$out/w" "$out/h"
  /usr/bin/python3 "$here/tls-hold.py" "$url" 100 "$out/cert.pem" <"$out/w" >"$out/wo" &
  exec 7>"$out/w"
  for _ in $(seq 600); do grep -q '^connected' "$out/wo" && break; sleep 0.1; done
  exec 7>&-
  wait $!
  local before after
  before=$(rss)
  /usr/bin/python3 "$here/tls-hold.py" "$url" "$conns" "$out/cert.pem" <"$out/h" >"$out/ho" &
  local holder=$!
  exec 8>"$out/h"
  for _ in $(seq 1200); do grep -q '^connected' "$out/ho" && break; sleep 0.1; done
  sleep 1
  after=$(rss)
  exec 8>&-
  wait $holder
  kill $srv
  wait $srv 2>/dev/null || true
  srv=
  rm -f "$out/w" "$out/h"
  echo "$scheme conns=$conns rss_before_kib=$before rss_after_kib=$after" \
       "bytes_per_conn=$(( (after - before) * 1024 / conns ))"
}
measure ws
measure wss
