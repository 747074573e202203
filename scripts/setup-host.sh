#!/usr/bin/env bash
# Installs what locald-vmm's build and tests need on a fresh Debian 12 host:
# kernel build tools (for the default guest kernel), cpio, busybox-static
# (the default guest's userland), QEMU (benchmark peer and test oracle),
# binutils (tiny test guests), and for the aarch64 default guest the arm64
# cross toolchain (kernel + guest init), the arm64 architecture in dpkg (for
# Debian's busybox-static:arm64), the Rust target aarch64-unknown-linux-gnu
# and qemu-system-aarch64 (its test). Idempotent; does nothing if all are
# present.
set -euo pipefail
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
# arm64 package lists, so `apt-get download busybox-static:arm64` works.
need_update=0
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  echo "setup-host: dpkg --add-architecture arm64"
  $SUDO dpkg --add-architecture arm64
  need_update=1
fi
pkgs=(flex bison bc libelf-dev libssl-dev cpio busybox-static qemu-system-x86 binutils e2fsprogs xz-utils make gcc libc6-dev)
# virtio-net: passt (--net user), iperf3 (throughput), iproute2 (test namespaces).
pkgs+=(passt iperf3 iproute2)
pkgs+=(git python3 tar)  # virtio-fs host-side tests (crates/locald-vmm/tests/virtio_fs_host.rs)
# aarch64 default guest: cross compiler + arm64 glibc (kernel, static init),
# QEMU for its test (crates/locald-vmm/tests/linux_aarch64.rs).
pkgs+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-system-arm)
# OCI images: a real registry on loopback and the tool that pushes test images to it
# (crates/image/tests/registry_real.rs).
pkgs+=(docker-registry skopeo)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup-host: all packages present"
  [ "$need_update" = 0 ] || $SUDO apt-get update -qq
else
  echo "setup-host: installing ${missing[*]}"
  $SUDO apt-get update -qq
  # A QEMU package already installed from another release (seen: a machine
  # image with qemu-utils from bookworm-backports, whose Breaks rule out
  # bookworm's qemu-system-*) makes the install unsolvable: every installed
  # qemu-* package is then moved to the version of qemu-system-x86 that the
  # configured sources offer.
  qemu_ver=$(apt-cache policy qemu-system-x86 | sed -n 's/^ *Candidate: //p')
  align=()
  for p in $(dpkg-query -W -f='${Package} ${Status}\n' 'qemu-*' 2>/dev/null | awk '/install ok installed/ {print $1}'); do
    v=$(dpkg-query -W -f='${Version}' "$p")
    if [ -n "$qemu_ver" ] && [ "$v" != "$qemu_ver" ] && apt-cache madison "$p" | grep -qF "| $qemu_ver |"; then
      align+=("$p=$qemu_ver")
    fi
  done
  if [ ${#align[@]} -gt 0 ]; then
    echo "setup-host: aligning installed QEMU packages with qemu-system-x86 $qemu_ver: ${align[*]}"
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --allow-downgrades \
    "${missing[@]}" ${align[@]+"${align[@]}"}
fi
# The Rust target of the aarch64 guest init (cross-built by locald-vmm's
# build.rs when present).
if command -v rustup >/dev/null 2>&1; then
  if ! rustup target list --installed | grep -qx aarch64-unknown-linux-gnu; then
    echo "setup-host: rustup target add aarch64-unknown-linux-gnu"
    rustup target add aarch64-unknown-linux-gnu
  fi
else
  echo "setup-host: no rustup; the aarch64 guest init needs the Rust target aarch64-unknown-linux-gnu" >&2
fi
# pjdfstest (crates.io), the POSIX conformance suite run against the
# virtio-fs server's host mount (virtio_fs_host::pjdfstest_conformance).
"$(dirname "$0")/install-fs-conformance.sh"
