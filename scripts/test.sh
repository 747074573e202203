#!/usr/bin/env bash
# The whole test suite: host setup, lint, the default guest (built and
# cached on first use), then all three tiers:
#   1. unit tests (no KVM)
#   2. tiny freestanding guests on the real KVM API
#   3. the real Linux default guest
# Tests that need /dev/kvm skip only when it is absent, and say so loudly.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-host.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo build --workspace --release
# Build the default guest kernel (~6 min on 2 cores, once per machine) and
# initramfs before the tests, with visible progress.
"${CARGO_TARGET_DIR:-target}/release/locald-vmm" prepare
# Real-Linux boots are CPU-bound on a 2-core host: the CLI crate's tests
# (which hold the real-Linux tier) run one at a time.
rc=0
cargo test --workspace --exclude locald-vmm-cli --no-fail-fast -- --include-ignored "$@" || rc=1
cargo test -p locald-vmm-cli --no-fail-fast -- --include-ignored --test-threads 1 "$@" || rc=1
exit $rc
