#!/usr/bin/env bash
# The goals this 2-core machine cannot judge (its load generators share the
# server's cores), on a larger machine with imd held to the cores the goals
# name: run from the repository root with a bundle (bench/bundle.sh) in
# BUNDLE (default build-dev); results go to OUT (default /tmp/device-out).
#   bench/bundle.sh build-rel build-dev && bench/device-run.sh
# Needs 16 cores: imd on 0 (and 1), redis-server on 1, clients on 2-15.
set -u
bundle=${BUNDLE:-build-dev}
o=${OUT:-/tmp/device-out}
mkdir -p "$o"
export PATH=$PWD/$bundle/bin:$PATH
ulimit -n 200000 2>/dev/null || ulimit -n "$(ulimit -Hn)"
log() { echo "=== $(date -u +%T) $*"; }
{
  log env; nproc; grep -m1 'model name' /proc/cpuinfo; head -2 /etc/os-release; df -T /tmp .
  "$bundle/daemon/imd" --version
} 2>&1 | tee "$o/env.txt"
if command -v python3 >/dev/null; then
  log floor
  python3 bench/sync-latency.py /tmp 5000 8 1024 group | tail -1 | tee -a "$o/floor.txt"
  python3 bench/sync-latency.py /tmp 10000 8 8192 group | tail -1 | tee -a "$o/floor.txt"
fi
log chat
for rate in 10000 20000; do
  timeout 120 bench/chat-latency.sh "$bundle" "$rate" 10 100 1 imd 2>&1 |
    grep -E 'RESULT|MEDIAN' | tee -a "$o/chat.txt"
done
log cluster
PIN_IMD=0 PIN_REDIS=1 PIN_CLIENT=2 CASES=cross-always timeout 120 \
  bench/cluster-latency.sh "$bundle" 5000 10 100 1 2>&1 | grep -E 'RESULT|MEDIAN' | tee "$o/cluster.txt"
log threads
WRK_THREADS=4 HOLD_PROCS=8 SRV_CPUS=0,1 CLIENT_CPUS=2-15 timeout 200 \
  bench/threads.sh "$bundle" 40000 5 1 2>&1 | grep -E 'RESULT|MEDIAN' | tee "$o/threads.txt"
log cluster-threads
# a cluster node with one and two workers (imd on 0,1), its Redis on a core
# of its own (2), the load on 3-15: the gain this 2-core machine cannot show
rp=6391; rd=$(mktemp -d)
taskset -c 2 redis-server --port "$rp" --bind 127.0.0.1 --save '' --appendonly yes \
  --appendfsync always --dir "$rd" --daemonize yes >/dev/null &&
  sleep 0.5 &&
  IMD_ARGS="--redis 127.0.0.1:$rp" RECEIVERS=16 WRK_THREADS=4 HOLD_PROCS=8 SRV_CPUS=0,1 \
    CLIENT_CPUS=3-15 timeout 300 bench/threads.sh "$bundle" 40000 5 1 2>&1 |
  grep -E 'RESULT|MEDIAN' | tee "$o/cluster-threads.txt"
redis-cli -p "$rp" shutdown nosave >/dev/null 2>&1
rm -rf "$rd"
log fanout
timeout 120 "$bundle/bench/room-fanout" 10000 100 16 tcp 2>&1 | head -3 | tee "$o/fanout.txt"
log done
