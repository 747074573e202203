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
# Some dependencies build C for the target (ring for TLS, zstd): there is
# no Apple SDK here, and a type-check links nothing, so their build scripts
# get a compiler and archiver that only create empty outputs.
shims=$(mktemp -d)
trap 'rm -rf "$shims"' EXIT
cat >"$shims/cc" <<'SH'
#!/bin/sh
# Type-check stand-in for an Apple C compiler: writes an empty -o file.
while [ $# -gt 0 ]; do
  if [ "$1" = "-o" ]; then : >"$2"; shift; fi
  shift
done
exit 0
SH
cat >"$shims/ar" <<'SH'
#!/bin/sh
# Type-check stand-in for an Apple archiver: an empty archive.
for a in "$@"; do
  case "$a" in *.a) printf '!<arch>\n' >"$a" ;; esac
done
exit 0
SH
chmod +x "$shims/cc" "$shims/ar"
for t in "${targets[@]}"; do
  echo "check-macos: $t"
  u=${t//-/_}
  export "CC_$u=$shims/cc" "AR_$u=$shims/ar"
  cargo check --target "$t" -p locald-vmm -p locald-vmm-cli
  cargo clippy --target "$t" -p locald-vmm -p locald-vmm-cli -- -D warnings
done
