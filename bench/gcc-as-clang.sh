#!/bin/sh
# tinygrad's CPU compiler (CC) for machines with gcc and no clang: takes clang's command line and C, drops --target,
# turns clang's ext_vector_type into gcc's vector_size and __builtin_bit_cast into a memcpy, and writes the object
# through a file (gcc's assembler cannot write to stdout; the last two arguments are "-o -").  CC=bench/gcc-as-clang.sh
o=$(mktemp)
n=$#; i=0
for a; do i=$((i+1)); shift; case "$a" in --target=*) continue;; esac; [ $i -eq $n ] && a=$o; set -- "$@" "$a"; done
sed -e '1i #define __builtin_bit_cast(T, x) ({ __typeof__(x) _s = (x); T _r; __builtin_memcpy(&_r, &_s, sizeof(_r)); _r; })' -e 's/typedef \(.*\) \([A-Za-z0-9_]*\) __attribute__((aligned(\([0-9]*\)),ext_vector_type(\([0-9]*\))));/typedef \1 \2 __attribute__((aligned(\3),vector_size(\4*sizeof(\1))));/' |
  gcc "$@" && cat "$o"; rc=$?; rm -f "$o"; exit $rc
