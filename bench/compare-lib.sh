# shellcheck shell=bash disable=SC2154  # which, runs, imd, tmp: set by the sourcing script
# Sourced by chat-latency.sh, http-push.sh and run-peers.sh: runs that alternate which of
# imd and the peer goes first, and medians over the RESULT lines they append
# to $tmp/results. The sourcing script defines run_one TARGET RUN and sets
# $which (both|imd|peer), $runs, $imd and $tmp.

# port_of FILE KIND: the port of imd's "KIND listening ... port N" line in
# FILE, waiting up to 10 s for it.
port_of() {
  for _ in $(seq 100); do grep -q "$2 listening" "$1" && break; sleep 0.1; done
  grep "$2 listening" "$1" | grep -o 'port [0-9]*' | awk '{print $2}'
}

# cleanup: stops the server $srv (if any) and removes $tmp; for trap EXIT.
cleanup() {
  if [ -n "${srv:-}" ]; then kill "$srv" 2>/dev/null || true; wait "$srv" 2>/dev/null || true; fi
  rm -rf "$tmp"
}

# run_all: every run, both targets (or the one in $which); sets targets.
run_all() {
  targets=(imd peer)
  [ "$which" = both ] || targets=("$which")
  echo "start: $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "imd: $imd"
  local run order t
  for run in $(seq "$runs"); do
    order=("${targets[@]}")
    if [ "${#targets[@]}" = 2 ] && [ $((run % 2)) = 0 ]; then order=(peer imd); fi
    for t in "${order[@]}"; do run_one "$t" "$run"; done
  done
  echo "end: load average $(cut -d' ' -f1-3 /proc/loadavg)"
}

# median TARGET KEY [DECIMALS]: median of KEY=value over the RESULT lines of
# TARGET (the mean of the middle two, with DECIMALS places, default 1).
median() {
  grep "^RESULT target=$1 " "$tmp/results" | grep -o " $2=[-0-9.]*" | cut -d= -f2 | sort -g \
    | awk -v d="${3:-1}" '{v[NR] = $1} END {if (NR == 0) print "-"; else if (NR % 2) print v[(NR + 1) / 2];
           else printf("%." d "f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2)}'
}
