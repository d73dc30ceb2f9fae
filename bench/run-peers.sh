#!/usr/bin/env bash
# Room fan-out, imd and the peer nchan (nginx + libnginx-mod-nchan, one
# worker) under the same load from the same client in the same run:
# `im-bench room`, SUBS WebSocket subscribers of one room (imd: IMP clients
# that join it; nchan: its websocket subscriber location) spread over
# processes of at most 5,000 and over the source addresses 127.0.0.1-4, and
# a publisher POSTing RATE msgs/s over HTTP (imd: its room push
# POST /v1/messages {"room":..}; nchan: its publisher location) with the
# send time in each payload; 3 s warm-up, then SECONDS measured. Every
# subscriber counts every message: "lost" is deliveries expected (messages the
# server took x subscribers) minus deliveries seen. The server is pinned to
# core 0, the clients to core 1; runs alternate which server goes first; each
# server is started fresh for each run and stopped after it. The end is a
# table of medians with ratios.
#   bench/run-peers.sh BUILD_DIR [SUBS[,SUBS...]] [RATE] [SECONDS] [RUNS] [both|imd|peer]
# Defaults: 1000,5000,10000 subscribers, 10 msgs/s, 10 s, 3 runs, both.
# Needs nginx and its nchan module (Debian: apt-get install nginx
# libnginx-mod-nchan); exits 77 (skip) without them, unless only imd runs.
# nginx runs as the current user from a temporary prefix on a free port: no
# root needed. IMD=PATH runs that imd binary instead of BUILD_DIR/daemon/imd.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
usage="usage: bench/run-peers.sh BUILD_DIR [SUBS[,SUBS...]] [RATE] [SECONDS] [RUNS] [both|imd|peer]"
build=${1:?$usage}
sizes=${2:-1000,5000,10000}; rate=${3:-10}; secs=${4:-10}; runs=${5:-3}; which=${6:-both}
imd=${IMD:-$build/daemon/imd}
nginx=${NGINX:-$(command -v nginx || echo /usr/sbin/nginx)}
nchan_so=${NCHAN_MODULE:-/usr/lib/nginx/modules/ngx_nchan_module.so}
per_proc=5000
src=127.0.0.1,127.0.0.2,127.0.0.3,127.0.0.4
pin_srv=(taskset -c 0); pin_cli=(taskset -c 1)
if ! taskset -c 0,1 true 2>/dev/null; then
  pin_srv=(); pin_cli=(); echo "run-peers: cores 0 and 1 are not both usable here: nothing pinned"
fi

if [ "$which" != imd ] && { [ ! -x "$nginx" ] || [ ! -f "$nchan_so" ]; }; then
  echo "run-peers: the peer needs nginx and its nchan module ($nginx, $nchan_so):" >&2
  echo "  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y nginx libnginx-mod-nchan" >&2
  exit 77
fi
# shellcheck source=bench/compare-lib.sh
. "$here/compare-lib.sh"
tmp=$(mktemp -d)
srv=
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# nginx from its own prefix: one worker, nchan's subscriber and publisher
# locations for any channel; as root it keeps root as the worker's user
# (the current user), as anyone else the user directive does not apply.
write_nginx_conf() { # PORT
  local user=
  [ "$(id -u)" = 0 ] && user="user $(id -un);"
  mkdir -p "$tmp/nginx/logs"
  cat >"$tmp/nginx/nginx.conf" <<CONF
load_module $nchan_so;
$user
worker_processes 1;
worker_rlimit_nofile $(ulimit -Hn);
daemon off;
pid $tmp/nginx/nginx.pid;
error_log $tmp/nginx/logs/error.log warn;
events { worker_connections 19000; }
http {
  access_log off;
  client_body_temp_path $tmp/nginx/body;
  proxy_temp_path $tmp/nginx/proxy;
  fastcgi_temp_path $tmp/nginx/fastcgi;
  uwsgi_temp_path $tmp/nginx/uwsgi;
  scgi_temp_path $tmp/nginx/scgi;
  server {
    listen 127.0.0.1:$1;
    location ~ ^/sub/(\w+)$ {
      nchan_subscriber websocket;
      nchan_channel_id \$1;
      nchan_subscriber_first_message newest;
    }
    location ~ ^/pub/(\w+)$ {
      nchan_publisher;
      nchan_channel_id \$1;
    }
  }
}
CONF
}

run_one() { # TARGET RUN (SUBS in $subs)
  local target=$1 run=$2 out=$tmp/$1.srv pid ws http port args=()
  if [ "$target" = imd ]; then
    rm -rf "$tmp/data"
    "${pin_srv[@]}" "$imd" --data "$tmp/data" --ws 127.0.0.1:0 --tcp off --http 127.0.0.1:0 \
      --fsync off --conn-rate 0 --push-rate 0 --rate-msgs 0 --rate-user-msgs 0 \
      --rate-receiver 0 >"$out" 2>&1 &
    srv=$!; pid=$srv
    ws=$(port_of "$out" ws); http=$(port_of "$out" http)
    if [ -z "$ws" ] || [ -z "$http" ]; then cat "$out" >&2; exit 1; fi
    args=(--url "ws://127.0.0.1:$ws/ws" --publish "http://127.0.0.1:$http/v1/messages"
          --api-key-file "$tmp/data/api-key" --secret-file "$tmp/data/secret")
  else
    port=$(free_port)
    write_nginx_conf "$port"
    "${pin_srv[@]}" "$nginx" -p "$tmp/nginx" -c "$tmp/nginx/nginx.conf" -e stderr >"$out" 2>&1 &
    srv=$!
    pid=
    for _ in $(seq 100); do
      pid=$(pgrep -P "$srv" | head -n1 || true)
      [ -n "$pid" ] && break; sleep 0.1
    done
    if [ -z "$pid" ]; then cat "$out" "$tmp/nginx/logs/error.log" >&2; exit 1; fi
    args=(--peer nchan --url "ws://127.0.0.1:$port/sub/bench"
          --publish "http://127.0.0.1:$port/pub/bench")
  fi
  "${pin_cli[@]}" "$build/bench/im-bench" room "${args[@]}" -n "$subs" \
    --procs $(((subs + per_proc - 1) / per_proc)) --src "$src" --rate "$rate" -d "$secs" \
    --server-pid "$pid" 2>"$tmp/err" | sed "s/^/[$target $subs $run] /" | tee -a "$tmp/log" \
    || { cat "$tmp/err" >&2; exit 1; }
  grep -v '^\[' "$tmp/err" | sed "s/^/[$target $subs $run] stderr: /" >&2 || true
  grep "^\[$target $subs $run\] RESULT " "$tmp/log" | sed "s/^\[[^]]*\] RESULT /RESULT target=$target /" \
    >>"$tmp/results"
  kill "$srv"; wait "$srv" 2>/dev/null || true; srv=
}

keys="deliveries_per_s p50_us p99_us max_us lost delivered expected srv_cpu_pct sub_cpu_s"
table=$tmp/table
for subs in ${sizes//,/ }; do
  : >"$tmp/results"
  echo "== $subs subscribers, $rate msgs/s, $secs s measured, $runs run(s)"
  run_all
  for t in "${targets[@]}"; do
    line="MEDIAN subs=$subs target=$t"
    for k in $keys; do line="$line $k=$(median "$t" "$k" 2)"; done
    echo "$line" | tee -a "$table"
  done
done

# The table: medians, and imd/nchan ratios when both ran.
echo
echo "medians of $runs run(s), $rate msgs/s, $secs s measured (ratio: imd / nchan; deliveries/s: higher is better, latency and CPU: lower)"
val() { grep "^MEDIAN subs=$1 target=$2 " "$table" | grep -o " $3=[-0-9.]*" | cut -d= -f2; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0 && a != "-") printf "%.2f", a / b; else printf "-"}'; }
if [ "${#targets[@]}" = 2 ]; then
  echo "| subscribers | server | deliveries/s | p50 ms | p99 ms | delivered / expected | lost | server CPU % | subscribers' CPU s |"
  echo "|---|---|---|---|---|---|---|---|---|"
  for subs in ${sizes//,/ }; do
    for t in imd peer; do
      name=$t; [ "$t" = peer ] && name=nchan
      echo "| $subs | $name | $(val "$subs" "$t" deliveries_per_s) | $(awk -v v="$(val "$subs" "$t" p50_us)" 'BEGIN {printf "%.2f", v / 1000}')" \
           "| $(awk -v v="$(val "$subs" "$t" p99_us)" 'BEGIN {printf "%.2f", v / 1000}')" \
           "| $(val "$subs" "$t" delivered) / $(val "$subs" "$t" expected) | $(val "$subs" "$t" lost)" \
           "| $(val "$subs" "$t" srv_cpu_pct) | $(val "$subs" "$t" sub_cpu_s) |"
    done
    echo "| $subs | imd / nchan | $(ratio "$(val "$subs" imd deliveries_per_s)" "$(val "$subs" peer deliveries_per_s)")" \
         "| $(ratio "$(val "$subs" imd p50_us)" "$(val "$subs" peer p50_us)")" \
         "| $(ratio "$(val "$subs" imd p99_us)" "$(val "$subs" peer p99_us)") | | |" \
         "$(ratio "$(val "$subs" imd srv_cpu_pct)" "$(val "$subs" peer srv_cpu_pct)") | |"
  done
else
  cat "$table"
fi
