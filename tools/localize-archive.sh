#!/bin/sh
# Make a static archive that exposes only libim's public API: link all its
# objects into one relocatable object and turn every hidden symbol (all but
# the IM_EXTERN ones: the sources are compiled with -fvisibility=hidden)
# into a local one, so internal names such as buf_new or utf8_validate
# cannot clash with a program that links libim.a.
#   localize-archive.sh IN.a OUT.a
set -eu
in=$1 out=$2
tmp="$out.d"
rm -rf "$tmp" "$out"
mkdir "$tmp"
ld -r --whole-archive "$in" -o "$tmp/libim.o"
objcopy --localize-hidden "$tmp/libim.o"
ar rcs "$out" "$tmp/libim.o"
rm -rf "$tmp"
