#!/usr/bin/env bash
# Warm starts against cold boots, side by side in one run:
#  1. `locald-vmm run -- true` restoring the default guest's warm snapshot
#     against `run --cold -- true`, alternately, RUNS times each: medians
#     and their ratio;
#  2. N concurrent warm runs from the one snapshot: each must succeed;
#     the wall time of the whole batch and the median of each run;
#  3. the restore cost inside the VMM for 128 MiB and 2 GiB of guest
#     memory, and the RSS it adds (locald-restore-bench).
#
# Usage: scripts/bench-warm.sh [RUNS] (default 5)
#   LOCALD_VMM=path/to/locald-vmm   binary (default $CARGO_TARGET_DIR/release)
#   BENCH_CONCURRENT=10             warm runs started at once
set -euo pipefail
RUNS=${1:-5}
DIR=${CARGO_TARGET_DIR:-target}/release
BIN=${LOCALD_VMM:-$DIR/locald-vmm}
N=${BENCH_CONCURRENT:-10}
[ -x "$BIN" ] || { echo "no locald-vmm at $BIN (cargo build --release -p locald-vmm-cli -p locald-bench)" >&2; exit 1; }
"$BIN" prepare --snapshot >/dev/null
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
median() { sort -g | awk '{v[NR]=$1} END{ if (NR==0) print "-"; else if (NR%2) print v[(NR+1)/2]; else printf "%.3f\n", (v[NR/2]+v[NR/2+1])/2 }'; }
one() { # $1 = label, rest = run flags
  local label=$1; shift
  local t0 t1
  t0=$(date +%s.%N)
  if ! "$BIN" run "$@" -- true >"$tmp/out" 2>"$tmp/err"; then
    echo "$label run failed:" >&2; cat "$tmp/err" >&2; exit 1
  fi
  t1=$(date +%s.%N)
  echo "$t1 - $t0" | bc
}
for i in $(seq "$RUNS"); do
  w=$(one warm); echo "$w" >>"$tmp/warm"
  c=$(one cold --cold); echo "$c" >>"$tmp/cold"
  printf 'round %d: warm %6.2f s, cold %6.2f s\n' "$i" "$w" "$c"
done
mw=$(median <"$tmp/warm"); mc=$(median <"$tmp/cold")
echo "run -- true, medians of $RUNS: warm $mw s, cold $mc s, warm/cold $(echo "scale=3; $mw / $mc" | bc)"

t0=$(date +%s.%N)
for i in $(seq "$N"); do
  ( s=$(date +%s.%N)
    if "$BIN" run -- sh -c "head -c 8 /dev/urandom | od -An -tx1" >"$tmp/c$i.out" 2>"$tmp/c$i.err"; then
      echo "$(date +%s.%N) - $s" | bc >"$tmp/c$i.time"
    else
      echo failed >"$tmp/c$i.time"
    fi ) &
done
wait
t1=$(date +%s.%N)
fails=$( { grep -l failed "$tmp"/c*.time || true; } | wc -l)
distinct=$(cat "$tmp"/c*.out | sort -u | wc -l)
echo "$N concurrent warm runs: $((N - fails)) succeeded, $distinct distinct random outputs, batch wall $(echo "$t1 - $t0" | bc) s, median per run $( { grep -hv failed "$tmp"/c*.time || true; } | median) s"
[ "$fails" -eq 0 ] || { cat "$tmp"/c*.err >&2; exit 1; }

"$DIR/locald-restore-bench" --runs "$RUNS"
