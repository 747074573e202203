#!/usr/bin/env bash
# Boot time of the default guest: N boots of `locald-vmm run --cold -- true` per
# vCPU count, reporting the medians of (a) process start → the init's first
# action (the VMM's "guest marker 1 (userspace reached) at X s" log line)
# and (b) process start → exit. Runs the counts alternately, so a change in
# host load hits every column alike.
#
# Usage: scripts/bench-boot.sh [RUNS] (default 3)
#   LOCALD_VMM=path/to/locald-vmm   binary (default $CARGO_TARGET_DIR/release)
#   BENCH_CPUS="1 2"                vCPU counts to compare
#   BENCH_MEMORY=128M               guest memory
#   BENCH_CMDLINE="..."             extra guest kernel command line (A/B tests)
set -euo pipefail
RUNS=${1:-3}
BIN=${LOCALD_VMM:-${CARGO_TARGET_DIR:-target}/release/locald-vmm}
CPUS=${BENCH_CPUS:-1 2}
MEM=${BENCH_MEMORY:-128M}
EXTRA=()
[ -z "${BENCH_CMDLINE:-}" ] || EXTRA=(--cmdline "$BENCH_CMDLINE")
[ -x "$BIN" ] || { echo "no locald-vmm at $BIN (cargo build --release -p locald-vmm-cli, or set LOCALD_VMM)" >&2; exit 1; }
"$BIN" prepare >/dev/null
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
median() { sort -g | awk '{v[NR]=$1} END{ if (NR==0) print "-"; else if (NR%2) print v[(NR+1)/2]; else printf "%.2f\n", (v[NR/2]+v[NR/2+1])/2 }'; }
for i in $(seq "$RUNS"); do
  for c in $CPUS; do
    t0=$(date +%s.%N)
    if ! LOCALD_VMM_LOG=info "$BIN" run --cold --cpus "$c" --memory "$MEM" --timeout 300 "${EXTRA[@]}" -- true >"$tmp/out" 2>"$tmp/err"; then
      echo "run $i, $c vCPU: failed:" >&2; cat "$tmp/err" >&2; exit 1
    fi
    t1=$(date +%s.%N)
    user=$(grep -o 'userspace reached) at [0-9.]*' "$tmp/err" | grep -o '[0-9.]*$' || true)
    [ -n "$user" ] || { echo "run $i: no userspace marker in the log" >&2; cat "$tmp/err" >&2; exit 1; }
    total=$(echo "$t1 - $t0" | bc)
    echo "$user" >>"$tmp/user-$c"
    echo "$total" >>"$tmp/total-$c"
    printf 'run %d, %d vCPU: userspace %6.2f s, exit %6.2f s\n' "$i" "$c" "$user" "$total"
  done
done
echo "medians of $RUNS ($MEM, $(basename "$BIN")):"
for c in $CPUS; do
  printf '  %d vCPU: userspace %s s, exit %s s\n' "$c" "$(median <"$tmp/user-$c")" "$(median <"$tmp/total-$c")"
done
