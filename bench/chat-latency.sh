#!/usr/bin/env bash
# 1:1 chat latency at a paced rate, imd and the Node peer (bench/peer-chat.js)
# measured by the same client in the same run: `im-bench chat`, PAIRS sender ->
# receiver pairs, RATE msgs/s in all on an open-loop schedule, a 3 s warm-up,
# then SECONDS measured. The server is pinned to core 0, the client to core 1
# (PIN_SERVER, PIN_CLIENT: other taskset CPU lists).
# imd runs with a fresh data directory and real HMAC tokens (minted by the
# client from DATA/secret); the peer accepts any token. Runs alternate the
# order of the two servers; the last lines are medians over the runs.
#   bench/chat-latency.sh BUILD_DIR [RATE] [SECONDS] [PAIRS] [RUNS] [both|imd|peer]
# IMD=PATH runs that imd binary instead of BUILD_DIR/daemon/imd (e.g. one built
# from a given commit); im-bench always comes from BUILD_DIR. IMD_ARGS adds
# options to imd's command line (e.g. "--commit-delay 0"), CLIENT_ARGS to
# im-bench's (e.g. "--uid-prefix 3f2a9c1e-5c1d-4e2a-9b7f-" for uids as long
# as UUIDs). DUMP_DIR=DIR
# keeps each run's per-message latencies (im-bench --dump) as
# DIR/TARGET-RUN.txt. PROBE=1 runs bench/stall-probe over the measured part and
# prints how often the machine itself kept a real-time thread off a CPU for
# 2 ms or more.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
build=${1:?usage: bench/chat-latency.sh BUILD_DIR [RATE] [SECONDS] [PAIRS] [RUNS] [both|imd|peer]}
rate=${2:-10000}; secs=${3:-20}; pairs=${4:-100}; runs=${5:-1}; which=${6:-both}
imd=${IMD:-$build/daemon/imd}
pin_srv=${PIN_SERVER:-0}; pin_cli=${PIN_CLIENT:-1}
tmp=$(mktemp -d)
srv=
cleanup() {
  if [ -n "$srv" ]; then kill "$srv" 2>/dev/null || true; wait "$srv" 2>/dev/null || true; fi
  rm -rf "$tmp"
}
trap cleanup EXIT

# port_of FILE KIND: the port of the "KIND listening ... port N" line
port_of() {
  for _ in $(seq 100); do grep -q "$2 listening" "$1" && break; sleep 0.1; done
  grep "$2 listening" "$1" | grep -o 'port [0-9]*' | awk '{print $2}'
}

run_one() { # TARGET RUN
  local target=$1 run=$2 out=$tmp/$1.srv port auth=() dump=()
  [ -n "${DUMP_DIR:-}" ] && dump=(--dump "$DUMP_DIR/$target-$run.txt")
  if [ "$target" = imd ]; then
    rm -rf "$tmp/data"
    # the paced senders go past the default per-receiver quota (600/min per
    # pair): this measures delivery, not policing
    # shellcheck disable=SC2086 # IMD_ARGS: options, split on purpose
    taskset -c "$pin_srv" "$imd" --data "$tmp/data" --ws 127.0.0.1:0 --tcp off --http off \
      --rate-msgs 0 --rate-user-msgs 0 --rate-receiver 0 --conn-rate 0 ${IMD_ARGS:-} >"$out" 2>&1 &
    auth=(--secret-file "$tmp/data/secret")
  else
    taskset -c "$pin_srv" node "$here/peer-chat.js" 0 0 >"$out" 2>&1 &
  fi
  srv=$!
  port=$(port_of "$out" ws)
  if [ -z "$port" ]; then cat "$out" >&2; exit 1; fi
  local probe=
  if [ -n "${PROBE:-}" ]; then # the machine's own stalls over the measured part
    (sleep 3; exec "$build/bench/stall-probe" "$secs" >"$tmp/probe") &
    probe=$!
  fi
  taskset -c "$pin_cli" "$build/bench/im-bench" chat --url "ws://127.0.0.1:$port/ws" --pairs "$pairs" \
    --rate "$rate" -d "$secs" "${auth[@]}" "${dump[@]}" ${CLIENT_ARGS:-} --server-pid "$srv" 2>"$tmp/err" \
    | tee -a "$tmp/results" | sed "s/^/[$target $run] /" || { cat "$tmp/err" >&2; exit 1; }
  if [ -n "$probe" ]; then
    wait "$probe" || true
    sed -n 's/^RESULT /probe: /p' "$tmp/probe" | sed "s/^/[$target $run] /"
  fi
  grep -v '^\[' "$tmp/err" | sed "s/^/[$target $run] stderr: /" >&2 || true
  kill "$srv"; wait "$srv" 2>/dev/null || true; srv=
  sed -i "s/^RESULT mode=chat /RESULT target=$target mode=chat /" "$tmp/results"
}

# shellcheck source=bench/compare-lib.sh
. "$here/compare-lib.sh"
run_all

keys="p50_us p90_us p99_us max_us ack_p50_us ack_p99_us w_p50_us lag_p50_us recv_rate lost errors cpu_pct srv_cpu_pct"
echo "medians over $runs run(s), rate $rate/s, $pairs pairs, $secs s measured:"
for t in "${targets[@]}"; do
  line="MEDIAN target=$t"
  for k in $keys; do line="$line $k=$(median "$t" "$k")"; done
  echo "$line"
done
if [ "${#targets[@]}" = 2 ]; then
  for k in p50_us p99_us ack_p50_us ack_p99_us srv_cpu_pct; do
    awk -v k="$k" -v a="$(median imd "$k")" -v b="$(median peer "$k")" \
      'BEGIN {if (a > 0) printf "RATIO %s peer/imd = %.2f\n", k, b / a}'
  done
fi
