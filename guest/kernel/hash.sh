#!/usr/bin/env bash
# Print the cache key of the default guest kernel of one architecture.
#
#   hash.sh [x86_64|aarch64]     (default x86_64)
#
# Rule (the Rust side computes the same thing itself):
#   key = first 16 hex chars of
#         sha256( bytes of build-kernel.sh
#                 ++ bytes of the arch's fragment (x86_64: microvm.config,
#                    aarch64: microvm-aarch64.config)
#                 ++ bytes of the arch's patches/*.patch, sorted by file name
#                    byte-wise (C locale); aarch64 skips names containing
#                    `-x86-` )
# Plain concatenation of the file contents: no names, separators or lengths.
set -euo pipefail

dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export LC_ALL=C

arch=${1:-x86_64}
case $arch in
    x86_64) files=("$dir/build-kernel.sh" "$dir/microvm.config") ;;
    aarch64) files=("$dir/build-kernel.sh" "$dir/microvm-aarch64.config") ;;
    *) echo "hash.sh: unknown arch '$arch' (x86_64 or aarch64)" >&2; exit 2 ;;
esac
shopt -s nullglob
for p in "$dir"/patches/*.patch; do   # C-locale glob order == byte order
    [[ $arch == aarch64 && $(basename "$p") == *-x86-* ]] && continue
    files+=("$p")
done

cat -- "${files[@]}" | sha256sum | cut -c1-16
