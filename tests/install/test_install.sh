#!/usr/bin/env bash
# Install libim into a temporary prefix and build the examples the way a
# user does, with nothing but `pkg-config --cflags --libs libim` (shared) and
# `--static` (libim.a), then run each one (its usage text proves it loaded).
#   test_install.sh BUILD_DIR SOURCE_DIR CC [SANITIZE]
# A sanitized build (SANITIZE not "none") is skipped (77): its library needs
# the sanitizer runtime that a plain user program does not link.
set -euo pipefail
build=$1 src=$2 cc=${3:-cc}
if [ "${4:-none}" != none ]; then echo "SKIP: sanitized build"; exit 77; fi
dest=$(mktemp -d)
trap 'rm -rf "$dest"' EXIT
meson install -C "$build" --destdir "$dest" --no-rebuild --quiet >/dev/null
pc=$(dirname "$(find "$dest" -name libim.pc | head -1)")
[ -n "$pc" ] || { echo "not ok - no libim.pc installed"; exit 1; }
prefix=$dest$(sed -n 's/^prefix=//p' "$pc/libim.pc")
libdir=$(PKG_CONFIG_PATH=$pc pkg-config --define-variable=prefix="$prefix" --variable=libdir libim)
pcf() { PKG_CONFIG_PATH=$pc pkg-config --define-variable=prefix="$prefix" "$@"; }
fail=0
# libim.a shows only the public API: every global symbol it defines is im_*
leaked=$(nm -g --defined-only "$libdir/libim.a" | awk '$2 ~ /[TDBRVW]/ && $3 !~ /^im_/ {print $3}')
if [ -n "$leaked" ]; then
  echo "not ok - libim.a exports internal symbols:"; echo "$leaked" | head; fail=1
else
  echo "ok - libim.a defines only im_* globals"
fi
build_one() { # NAME MODE EXTRA_LIBS...
  local name=$1 mode=$2 out="$dest/$1.$2" libs; shift 2
  if [ "$mode" = shared ]; then
    libs=$(pcf --libs libim)
  else
    libs="$libdir/libim.a $(pcf --static --libs libim | sed 's/-lim\b//')"
  fi
  # shellcheck disable=SC2086
  local arg=--help
  [ "$name" = epoll-echo ] && arg= # it prints its usage when given nothing
  if "$cc" -std=c11 -Wall -Wextra -Werror "$src/examples/$name.c" $(pcf --cflags libim) \
       $libs "$@" -o "$out" 2>"$out.err" &&
     { LD_LIBRARY_PATH=$libdir timeout 5 "$out" $arg >"$out.run" 2>&1 || true; } &&
     grep -qi usage "$out.run"; then
    echo "ok - $name ($mode)"
  else
    echo "not ok - $name ($mode)"; cat "$out.err"; fail=1
  fi
}
for mode in shared static; do
  build_one im-echo "$mode"
  build_one epoll-echo "$mode"
  build_one im-chat "$mode" $(pkg-config --libs libcjson)
done
# the installed imd starts with the installed libim (its soname)
bindir=$(dirname "$(find "$dest" -type f -name imd | head -1)")
if LD_LIBRARY_PATH=$libdir "$bindir/imd" --version 2>&1 | grep -q "^imd $(pcf --modversion libim) "; then
  echo "ok - installed imd runs"
else
  echo "not ok - installed imd"; LD_LIBRARY_PATH=$libdir "$bindir/imd" --version; fail=1
fi
# the headers stand alone: each compiles on its own
for h in "$prefix"/include/libim/*.h; do
  if echo "#include <libim/$(basename "$h")>" | "$cc" -std=c11 -Wall -Werror -fsyntax-only \
       $(pcf --cflags libim) -x c - 2>"$dest/h.err"; then :; else
    echo "not ok - $(basename "$h") alone"; cat "$dest/h.err"; fail=1
  fi
done
[ "$fail" = 0 ] && echo "all installed examples built and ran"
exit "$fail"
