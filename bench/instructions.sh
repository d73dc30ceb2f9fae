#!/usr/bin/env bash
# User-space instructions imd executes per connection or per message,
# counted by valgrind's callgrind: deterministic, unlike time on a shared VM,
# so a change of a few percent in imd's own code shows. imd runs under
# callgrind twice, with a smaller and a larger load, and the difference of
# the two totals over the difference of the loads is the cost of one unit,
# startup and exit cancelled out. Kernel work (the TCP handshake, reads,
# writes, fsync) is not counted: measure it with perf, as
# docs/BENCHMARKS.md does.
#   bench/instructions.sh BUILD_DIR connect [N1] [N2]
#       N1 and N2 WebSocket connections of `im-bench hold` (real tokens, the
#       auth message of libim's client); default 500 and 2500
#   bench/instructions.sh BUILD_DIR chat [S1] [S2] [RATE]
#       1:1 stored chat, 10 pairs of `im-bench chat` at RATE msgs/s (default
#       200) for S1 and S2 seconds (default 2 and 6), fsync on; a message
#       costs more here than at thousands a second, where group commit
#       shares a transaction between many
#   bench/instructions.sh BUILD_DIR push [S1] [S2] [CONNS]
#       HTTP pushes (stored, each to one of 4 online receivers that ack it):
#       wrk with CONNS keep-alive connections (default 16) for S1 and S2
#       seconds (default 3 and 9); the cost of one push is the difference of
#       the instructions over the difference of the 200 answers. imd runs
#       slowly under callgrind, so CONNS requests are always waiting: a
#       commit takes many, as at full load
# IMD=PATH measures that imd binary instead of BUILD_DIR/daemon/imd (im-bench
# always comes from BUILD_DIR). KEEP=DIR keeps the larger run's callgrind
# profile as DIR/callgrind.out (callgrind_annotate reads it). Needs valgrind.
set -euo pipefail
build=${1:?usage: bench/instructions.sh BUILD_DIR connect|chat [A] [B] [RATE]}
mode=${2:?usage: bench/instructions.sh BUILD_DIR connect|chat [A] [B] [RATE]}
imd=${IMD:-$build/daemon/imd}
case $mode in
  connect) a=${3:-500}; b=${4:-2500} ;;
  chat) a=${3:-2}; b=${4:-6}; rate=${5:-200} ;;
  push) a=${3:-3}; b=${4:-9}; conns=${5:-16} ;;
  *) echo "bench/instructions.sh: mode connect, chat or push, not '$mode'" >&2; exit 2 ;;
esac

# wrk's POST of a push to receiver r(i % 4), with the API key in $1/api-key
push_lua() {
  cat <<LUA
local n = 0
request = function()
  n = n + 1
  return wrk.format("POST", "/v1/messages",
    {["Content-Type"] = "application/json", ["Authorization"] = "Bearer $(cat "$1/api-key")"},
    '{"from":"system","to":"r' .. (n % 4) .. '","data":{"kind":"push","text":"abcdefghijklmnop"}}')
end
LUA
}

total() { # LOAD: the instructions of one imd run under that load (push: and the 200s)
  local load=$1 d srv ws http=off hp rp
  d=$(mktemp -d)
  [ "$mode" = push ] && http=127.0.0.1:0
  valgrind --tool=callgrind --callgrind-out-file="$d/cg.out" "$imd" --data "$d/data" \
    --ws 127.0.0.1:0 --tcp off --http "$http" --conn-rate 0 --max-connections 0 --threads 1 \
    --rate-msgs 0 --rate-user-msgs 0 --rate-receiver 0 >"$d/out" 2>&1 &
  srv=$!
  for _ in $(seq 300); do grep -q "ws listening" "$d/out" && break; sleep 0.1; done
  ws=$(grep "ws listening" "$d/out" | grep -o 'port [0-9]*' | awk '{print $2}')
  [ -n "$ws" ] || { cat "$d/out" >&2; exit 1; }
  if [ "$mode" = push ]; then
    for _ in $(seq 300); do grep -q "http listening" "$d/out" && break; sleep 0.1; done
    hp=$(grep "http listening" "$d/out" | grep -o 'port [0-9]*' | awk '{print $2}')
    "$build/bench/im-bench" recv --url "ws://127.0.0.1:$ws/ws" -n 4 --uid-prefix r \
      --secret-file "$d/data/secret" --idle-exit 3 --hold-seconds $((load + 60)) \
      >"$d/recv" 2>&1 &
    rp=$!
    for _ in $(seq 300); do grep -q '^connected' "$d/recv" && break; sleep 0.1; done
    push_lua "$d/data" >"$d/p.lua"
    ${WRK:-wrk} -t1 -c"$conns" -d"${load}s" -s "$d/p.lua" "http://127.0.0.1:$hp" >"$d/wrk" 2>&1
    wait "$rp" || true
    ok=$(awk '/requests in/ {print $1}' "$d/wrk")
    [ -n "$ok" ] && ! grep -q "Non-2xx" "$d/wrk" || { cat "$d/wrk" >&2; exit 1; }
  elif [ "$mode" = connect ]; then
    "$build/bench/im-bench" hold --url "ws://127.0.0.1:$ws/ws" -n "$load" --window 100 \
      --secret-file "$d/data/secret" --hold-seconds 0 --uid-prefix pu --src 127.0.0.2 \
      >"$d/load" 2>&1
    grep -q "^connected $load authed $load " "$d/load" || { cat "$d/load" >&2; exit 1; }
  else
    "$build/bench/im-bench" chat --url "ws://127.0.0.1:$ws/ws" --pairs 10 --rate "$rate" \
      -d "$load" --warmup 1 --secret-file "$d/data/secret" >"$d/load" 2>&1
    grep -q " lost=0 " "$d/load" || { cat "$d/load" >&2; exit 1; }
  fi
  kill "$srv"; wait "$srv" 2>/dev/null || true
  if [ -n "${KEEP:-}" ] && [ "$load" = "$b" ]; then cp "$d/cg.out" "$KEEP/callgrind.out"; fi
  callgrind_annotate "$d/cg.out" 2>/dev/null | grep -m1 "PROGRAM TOTALS" |
    awk -v ok="${ok:-}" '{gsub(",", "", $1); print $1, ok}'
  rm -rf "$d"
}

read -r ia ra < <(total "$a")
read -r ib rb < <(total "$b")
if [ "$mode" = push ]; then
  echo "RESULT mode=push instructions_per_push=$(( (ib - ia) / (rb - ra) )) s1=$a s2=$b" \
       "conns=$conns pushes1=$ra pushes2=$rb"
elif [ "$mode" = connect ]; then
  echo "RESULT mode=connect instructions_per_connect=$(( (ib - ia) / (b - a) )) n1=$a n2=$b"
else
  echo "RESULT mode=chat instructions_per_message=$(( (ib - ia) / ((b - a) * rate) ))" \
       "s1=$a s2=$b rate=$rate"
fi
