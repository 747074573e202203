#!/bin/sh
# Installs pjdfstest, the third-party POSIX file-system conformance suite
# (its Rust rewrite, from crates.io), for virtio_fs_host::pjdfstest_conformance.
# Idempotent; needs cargo. Installs to /usr/local/bin (root) or ~/.cargo/bin.
set -eu
VERSION=0.2.2
if command -v pjdfstest >/dev/null 2>&1 && pjdfstest --version 2>/dev/null | grep -q "$VERSION"; then
    echo "pjdfstest $VERSION already installed: $(command -v pjdfstest)"
    exit 0
fi
if [ "$(id -u)" = 0 ]; then
    ROOT=/usr/local
else
    ROOT="${CARGO_HOME:-$HOME/.cargo}"
fi
nice -n 10 cargo install pjdfstest --version "$VERSION" --locked --root "$ROOT"
"$ROOT/bin/pjdfstest" --version
