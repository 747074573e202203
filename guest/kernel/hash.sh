#!/usr/bin/env bash
# Print the cache key of the default guest kernel.
#
# Rule (the Rust side computes the same thing itself):
#   key = first 16 hex chars of
#         sha256( bytes of build-kernel.sh
#                 ++ bytes of microvm.config
#                 ++ bytes of every patches/*.patch, sorted by file name
#                    byte-wise (C locale) )
# Plain concatenation of the file contents: no names, separators or lengths.
set -euo pipefail

dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export LC_ALL=C

files=("$dir/build-kernel.sh" "$dir/microvm.config")
shopt -s nullglob
for p in "$dir"/patches/*.patch; do   # C-locale glob order == byte order
    files+=("$p")
done

cat -- "${files[@]}" | sha256sum | cut -c1-16
