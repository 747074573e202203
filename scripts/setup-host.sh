#!/usr/bin/env bash
# Installs what locald-vmm's build and tests need on a fresh Debian 12 host:
# kernel build tools (for the default guest kernel), cpio, busybox-static
# (the default guest's userland), QEMU (benchmark peer and test oracle),
# binutils (tiny test guests). Idempotent; does nothing if all are present.
set -euo pipefail
pkgs=(flex bison bc libelf-dev libssl-dev cpio busybox-static qemu-system-x86 binutils e2fsprogs xz-utils make gcc libc6-dev)
# virtio-net: passt (--net user), iperf3 (throughput), iproute2 (test namespaces).
pkgs+=(passt iperf3 iproute2)
pkgs+=(git python3 tar)  # virtio-fs host-side tests (crates/locald-vmm/tests/virtio_fs_host.rs)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup-host: all packages present"
else
  echo "setup-host: installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi
# pjdfstest (crates.io), the POSIX conformance suite run against the
# virtio-fs server's host mount (virtio_fs_host::pjdfstest_conformance).
"$(dirname "$0")/install-fs-conformance.sh"
