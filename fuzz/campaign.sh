#!/usr/bin/env bash
# Runs the cargo-fuzz campaign: every target (or those named) for SECONDS
# each, JOBS at a time, at nice 19, and writes a summary table.
#
#   fuzz/campaign.sh [-t SECONDS] [-j JOBS] [-o OUTDIR] [TARGET...]
#
# Defaults: 1800 s per target, 2 jobs, OUTDIR /work/fuzz-campaign/<timestamp>.
# Builds all targets once (cargo +nightly fuzz build, CARGO_TARGET_DIR
# defaults to /work/target-fuzz), then snapshots the binaries into
# OUTDIR/bin so later rebuilds of the tree do not change a running campaign.
# Per target: corpus in fuzz/corpus/TARGET (seeded from fuzz/seeds/TARGET),
# log in OUTDIR/TARGET.log, crashes in OUTDIR/artifacts/TARGET/.
# Summary: OUTDIR/summary.tsv (target, seconds, executions, crashes, status),
# one row appended as each target finishes; OUTDIR/DONE when all have.
set -euo pipefail

secs=1800
jobs=2
out=""
while getopts "t:j:o:h" opt; do
    case $opt in
        t) secs=$OPTARG ;;
        j) jobs=$OPTARG ;;
        o) out=$OPTARG ;;
        *) sed -n '2,15p' "$0"; exit 2 ;;
    esac
done
shift $((OPTIND - 1))

here=$(cd "$(dirname "$0")" && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/target-fuzz}
out=${out:-/work/fuzz-campaign/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out/bin" "$out/artifacts"

if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cd "$here" && cargo +nightly fuzz list)
fi

echo "campaign: ${targets[*]} for ${secs}s each, $jobs at a time, in $out"
(cd "$here" && nice -n 19 cargo +nightly fuzz build) >"$out/build.log" 2>&1 || {
    echo "build failed (see $out/build.log)" >&2
    exit 1
}
triple=$(rustc +nightly -vV | sed -n 's/^host: //p')
for t in "${targets[@]}"; do
    cp "$CARGO_TARGET_DIR/$triple/release/$t" "$out/bin/$t"
done

run_one() {
    local t=$1
    local corpus="$here/corpus/$t"
    local arts="$out/artifacts/$t"
    mkdir -p "$corpus" "$arts"
    if [ -d "$here/seeds/$t" ]; then
        cp -n "$here/seeds/$t"/* "$corpus"/ 2>/dev/null || true
    fi
    local start rc=0 runs=0 left
    start=$(date +%s)
    : >"$out/$t.log"
    # A crash ends a libFuzzer run (the input is saved in $arts); start
    # again for the time left, at most 20 times.
    while :; do
        left=$((secs - ($(date +%s) - start)))
        [ "$left" -ge 5 ] && [ "$runs" -lt 20 ] || break
        runs=$((runs + 1))
        echo "=== run $runs: ${left}s left" >>"$out/$t.log"
        set +e
        nice -n 19 "$out/bin/$t" "$corpus" \
            -max_total_time="$left" -print_final_stats=1 \
            -artifact_prefix="$arts/" -rss_limit_mb=4096 -timeout=60 \
            >>"$out/$t.log" 2>&1
        rc=$?
        set -e
        [ "$rc" -eq 0 ] && break
    done
    local elapsed=$(($(date +%s) - start))
    # One final-stats block per run; sum them.
    local execs
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$out/$t.log" |
        awk '{s += $2} END {print s + 0}')
    local crashes
    crashes=$(find "$arts" -maxdepth 1 -type f \( -name 'crash-*' -o -name 'timeout-*' \
        -o -name 'oom-*' -o -name 'leak-*' \) | wc -l)
    printf '%s\t%s\t%s\t%s\t%s\n' "$t" "$elapsed" "$execs" "$crashes" "runs=$runs,rc=$rc" >>"$out/summary.tsv"
}

printf 'target\tseconds\texecutions\tcrashes\tstatus\n' >"$out/summary.tsv"
running=0
for t in "${targets[@]}"; do
    run_one "$t" &
    running=$((running + 1))
    if [ "$running" -ge "$jobs" ]; then
        wait -n || true
        running=$((running - 1))
    fi
done
wait || true
column -t -s $'\t' "$out/summary.tsv"
date >"$out/DONE"
echo "summary: $out/summary.tsv"
