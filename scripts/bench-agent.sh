#!/usr/bin/env bash
# Agent/vsock benchmark on one named VM of the default guest:
#   - exec round trip: `locald-vmm exec NAME -- true`, N times, median;
#   - guest -> host throughput: the command writes MiB of zeros to stdout;
#   - host -> guest throughput: our stdin piped into `cat > /dev/null`.
# Usage: scripts/bench-agent.sh [runs] [MiB]   (LOCALD_VMM_BIN overrides the binary)
set -euo pipefail
runs=${1:-11}
mib=${2:-64}
cd "$(dirname "$0")/.."
bin=${LOCALD_VMM_BIN:-${CARGO_TARGET_DIR:-target}/release/locald-vmm}
[ -x "$bin" ] || cargo build --release -p locald-vmm-cli >&2
name=bench-$$
"$bin" start --name "$name" --agent-timeout 600 >/dev/null
trap '"$bin" stop "$name" >/dev/null 2>&1 || true' EXIT

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
now() { date +%s.%N; }

lat=$(for _ in $(seq "$runs"); do
    t0=$(now); "$bin" exec "$name" -- true; t1=$(now)
    awk -v a="$t0" -v b="$t1" 'BEGIN { print (b - a) * 1000 }'
done | median)
printf 'exec -- true round trip: median %.1f ms over %d runs\n' "$lat" "$runs"

out=$(for _ in 1 2 3; do
    t0=$(now)
    "$bin" exec "$name" -- head -c $((mib << 20)) /dev/zero | wc -c >/dev/null
    t1=$(now)
    awk -v m="$mib" -v a="$t0" -v b="$t1" 'BEGIN { print m / (b - a) }'
done | median)
printf 'guest -> host (stdout over vsock): median %.1f MiB/s (%d MiB)\n' "$out" "$mib"

in=$(for _ in 1 2 3; do
    t0=$(now)
    head -c $((mib << 20)) /dev/zero | "$bin" exec "$name" -- sh -c 'cat > /dev/null'
    t1=$(now)
    awk -v m="$mib" -v a="$t0" -v b="$t1" 'BEGIN { print m / (b - a) }'
done | median)
printf 'host -> guest (stdin over vsock): median %.1f MiB/s (%d MiB)\n' "$in" "$mib"
