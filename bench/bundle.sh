#!/usr/bin/env bash
# A self-contained copy of the benchmark programs, to run bench/ on another
# Linux machine that lacks the Debian packages (a larger lent machine):
# imd, im-bench, room-fanout, im-echo, wrk, redis-server, redis-cli and curl
# with every shared library they load and this machine's dynamic loader, each
# started through a wrapper that runs it with that loader on those
# libraries. OUT is laid out as a build directory (OUT/daemon/imd,
# OUT/bench/im-bench, ...), with the peers in OUT/bin:
#   bench/bundle.sh BUILD_DIR OUT
#   (there) PATH=$PWD/OUT/bin:$PATH bench/chat-latency.sh OUT 10000 20 100 3 imd
# bench/device-run.sh runs the set of benchmarks this was made for.
set -euo pipefail
build=${1:?usage: bench/bundle.sh BUILD_DIR OUT}
out=${2:?usage: bench/bundle.sh BUILD_DIR OUT}
rm -rf "$out"
mkdir -p "$out/lib" "$out/real" "$out/bin" "$out/daemon" "$out/bench" "$out/examples"
bins=("$build/daemon/imd" "$build/bench/im-bench" "$build/bench/room-fanout"
      "$build/examples/im-echo")
for b in wrk redis-server redis-cli curl; do
  p=$(command -v "$b") || { echo "bundle: $b is not installed" >&2; exit 1; }
  bins+=("$p")
done
for b in "${bins[@]}"; do
  cp -L "$b" "$out/real/"
  ldd "$b" | awk '/=> \// {print $3}' | while read -r l; do cp -Ln "$l" "$out/lib/"; done
done
cp -L /lib64/ld-linux-x86-64.so.2 "$out/lib/"
# wrap NAME DEST UP: DEST runs real/NAME through the bundled loader; UP is
# the way from DEST's directory to OUT
wrap() {
  cat >"$2" <<W
#!/bin/sh
B=\$(cd "\$(dirname "\$0")/$3" && pwd)
exec "\$B/lib/ld-linux-x86-64.so.2" --library-path "\$B/lib" "\$B/real/$1" "\$@"
W
  chmod +x "$2"
}
for n in wrk redis-server redis-cli curl; do wrap "$n" "$out/bin/$n" ..; done
wrap imd "$out/daemon/imd" ..
wrap im-bench "$out/bench/im-bench" ..
wrap room-fanout "$out/bench/room-fanout" ..
wrap im-echo "$out/examples/im-echo" ..
du -sh "$out"
