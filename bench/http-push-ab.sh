#!/usr/bin/env bash
# Two imd binaries on the same HTTP push load, in the same run: for each of
# RUNS rounds, bench/http-push.sh (imd only, one run) with IMD=A, then IMD=B
# (the order alternates between rounds), then the medians of each. For
# before/after numbers of a change: A built from the commit before it, B
# from the change. IMD_ARGS (e.g. "--fsync off") goes to both.
#   bench/http-push-ab.sh BUILD_DIR IMD_A IMD_B [SECONDS] [CONNS] [RUNS]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
build=${1:?usage: bench/http-push-ab.sh BUILD_DIR IMD_A IMD_B [SECONDS] [CONNS] [RUNS]}
a=${2:?IMD_A}; b=${3:?IMD_B}
secs=${4:-8}; conns=${5:-32}; runs=${6:-3}
results=$(mktemp)
trap 'rm -f "$results"' EXIT
echo "start: load average $(cut -d' ' -f1-3 /proc/loadavg); IMD_ARGS=${IMD_ARGS:-}"
for run in $(seq "$runs"); do
  order=(A B)
  [ $((run % 2)) = 0 ] && order=(B A)
  for t in "${order[@]}"; do
    bin=$a; [ "$t" = B ] && bin=$b
    IMD=$bin "$here/http-push.sh" "$build" "$secs" "$conns" 1 imd | grep '^RESULT target=imd' \
      | sed "s/target=imd/target=$t/" | tee -a "$results"
  done
done
echo "end: load average $(cut -d' ' -f1-3 /proc/loadavg)"
median() { # TARGET KEY
  grep "^RESULT target=$1 " "$results" | grep -o " $2=[-0-9.]*" | cut -d= -f2 | sort -g \
    | awk '{v[NR] = $1} END {if (NR == 0) print "-"; else if (NR % 2) print v[(NR + 1) / 2];
           else printf("%.1f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2)}'
}
for t in A B; do
  echo "MEDIAN target=$t rps=$(median $t rps) p50_us=$(median $t p50_us) p99_us=$(median $t p99_us)" \
       "srv_cpu_pct=$(median $t srv_cpu_pct) per_core=$(median $t per_core)" \
       "mismatches=$(grep "^RESULT target=$t " "$results" | grep -c MISMATCH || true)"
done
