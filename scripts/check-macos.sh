#!/usr/bin/env bash
# Type-checks and lints the macOS build (the Virtualization.framework
# backend and the CLI) for both Apple targets. Linking and running need a
# Mac; this host can only check. Adds the Rust targets if missing.
# Usage: scripts/check-macos.sh
set -euo pipefail
cd "$(dirname "$0")/.."
targets=(aarch64-apple-darwin x86_64-apple-darwin)
installed=$(rustup target list --installed)
for t in "${targets[@]}"; do
  grep -qx "$t" <<<"$installed" || rustup target add "$t"
done
for t in "${targets[@]}"; do
  echo "check-macos: $t"
  cargo check --target "$t" -p locald-vmm -p locald-vmm-cli
  cargo clippy --target "$t" -p locald-vmm -p locald-vmm-cli -- -D warnings
done
