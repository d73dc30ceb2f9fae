#!/usr/bin/env bash
# imd links libim through its public API only: it loads the shared libim
# (NEEDED libim.so.N), every libim symbol it refers to is one that
# libim.so exports (IM_EXTERN, im_*), and it carries none of libim's
# objects itself but the string map, JSON scanner and base64 of lib/meson.build's
# im_util.
#   imd_public_api.sh IMD LIBIM_SO LIBIM_INTERNAL_A LIBIM_UTIL_A
set -euo pipefail
imd=$1 so=$2 internal=$3 util=$4
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
syms() { awk 'NF >= 3 {print $3}' | sort -u; }
nm -D --defined-only "$so" | syms >"$tmp/exported"
nm -g --defined-only "$internal" 2>/dev/null | syms >"$tmp/internal"
nm -g --defined-only "$util" 2>/dev/null | syms >"$tmp/util"
nm -u "$imd" | awk '{print $2}' | sed 's/@.*//' | sort -u >"$tmp/undef"
nm -g --defined-only "$imd" | syms >"$tmp/defined"
fail=0
soname=$(readelf -d "$so" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')
if readelf -d "$imd" | grep -q "(NEEDED).*\[$soname\]"; then
  echo "ok - imd needs $soname"
else
  echo "not ok - imd does not load $soname"; fail=1
fi
# libim symbols imd refers to: all exported, all im_*
comm -12 "$tmp/undef" "$tmp/internal" >"$tmp/used"
bad=$(comm -23 "$tmp/used" "$tmp/exported"; grep -v '^im_' "$tmp/used" || true)
if [ -n "$bad" ]; then
  echo "not ok - imd refers to internal libim symbols:"; echo "$bad" | sort -u | head; fail=1
elif [ ! -s "$tmp/used" ]; then
  echo "not ok - imd refers to no libim symbol (the check saw nothing)"; fail=1
else
  echo "ok - imd uses $(wc -l <"$tmp/used") libim symbols, all exported im_* ones"
fi
# no libim object linked into imd but im_util's
own=$(comm -12 "$tmp/defined" "$tmp/internal" | comm -23 - "$tmp/util")
if [ -n "$own" ]; then
  echo "not ok - imd contains libim's own code:"; echo "$own" | head; fail=1
else
  echo "ok - imd contains no libim object but im_util ($(wc -l <"$tmp/util") symbols)"
fi
exit "$fail"
