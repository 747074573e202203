#!/usr/bin/env bash
# TCP throughput over virtio-net with iperf3 (Debian's), for the TAP and
# the passt backend, guest → host and host → guest (iperf3 -R).
#
# The default guest is busybox only, so the script builds an ext4 root
# image holding Debian's iperf3 and the shared libraries it needs (copied
# from this host after `apt-get install iperf3`, found with ldd) with
# `locald-vmm mkrootfs`, and boots it with --rootfs.
#
# Everything runs in a private network namespace (root needed; no traffic
# leaves it): TAP: ldbt0 (10.78.0.1/24) ↔ guest 10.78.0.2, the host-side
# `iperf3 -s` listens on 10.78.0.1; passt: a veth whose far end forwards
# nothing is passt's template interface (10.234.0.2/24, gateway
# 10.234.0.1), the server listens on the namespace's loopback and the
# guest reaches it through the gateway address (passt's --map-gw).
#
# Usage: scripts/bench-net-tcp.sh [SECONDS] (default 10)
#   LOCALD_VMM=path/to/locald-vmm   binary (default $CARGO_TARGET_DIR/release)
#   BENCH_BACKENDS="tap passt"      which backends
#   BENCH_DIRECTIONS="tx rx"        tx: guest → host, rx: host → guest
set -euo pipefail
SECS=${1:-10}
BIN=${LOCALD_VMM:-${CARGO_TARGET_DIR:-target}/release/locald-vmm}
BACKENDS=${BENCH_BACKENDS:-tap passt}
DIRECTIONS=${BENCH_DIRECTIONS:-tx rx}
[ -x "$BIN" ] || { echo "no locald-vmm at $BIN (cargo build --release -p locald-vmm-cli, or set LOCALD_VMM)" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || { echo "bench-net-tcp: needs root (network namespace, TAP)" >&2; exit 1; }

# What the script needs, installed like scripts/setup-host.sh does.
pkgs=(iperf3 passt iproute2 e2fsprogs)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bench-net-tcp: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

NS=ldbench-$$
WORK=$(mktemp -d /tmp/ldbench.XXXXXX)
cleanup() {
  ip netns pids "$NS" 2>/dev/null | xargs -r kill 2>/dev/null || true
  ip netns del "$NS" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# The guest's root: iperf3, its libraries and the dynamic loader.
ROOT=$WORK/root
mkdir -p "$ROOT"/{tmp,proc,sys,dev,run,etc}
IPERF=$(command -v iperf3)
for f in "$IPERF" $(ldd "$IPERF" | grep -o '/[^ ]*'); do
  cp -L --parents "$f" "$ROOT/"
done
"$BIN" mkrootfs --from "$ROOT" --size 64M "$WORK/root.img" >/dev/null

ip netns add "$NS"
ip -n "$NS" link set lo up
ip -n "$NS" tuntap add ldbt0 mode tap
ip -n "$NS" addr add 10.78.0.1/24 dev ldbt0
ip -n "$NS" link set ldbt0 up
ip -n "$NS" link add ldv0 type veth peer name ldv1
ip -n "$NS" addr add 10.234.0.2/24 dev ldv0
ip -n "$NS" link set ldv0 up
ip -n "$NS" link set ldv1 up
ip -n "$NS" route add default via 10.234.0.1 dev ldv0

run() { # NAME NETSPEC SERVER_ADDR GUEST_DEST — one boot, both directions
  local name=$1 net=$2 server=$3 dest=$4
  local cmd="" dir
  for dir in $DIRECTIONS; do
    cmd+="echo @$dir; /usr/bin/iperf3 -c $dest -p 5201 -t $SECS -f K $([ "$dir" = rx ] && echo -R || true); "
  done
  ip netns exec "$NS" iperf3 -s -B "$server" -p 5201 >"$WORK/server.log" 2>&1 &
  local sp=$!
  sleep 0.5
  local t0=$SECONDS
  ip netns exec "$NS" "$BIN" run --rootfs "$WORK/root.img" --net "$net" \
    --agent-timeout 300 --timeout $((SECS * 12 + 600)) -- sh -c "$cmd" >"$WORK/client.log" 2>&1 ||
    echo "$name: the VM failed after $((SECONDS - t0)) s"
  kill "$sp" 2>/dev/null || true
  wait "$sp" 2>/dev/null || true
  for dir in $DIRECTIONS; do
    echo "$name $dir ($([ "$dir" = tx ] && echo "guest → host" || echo "host → guest")):"
    # The client's lines between its @dir marker and the next one.
    awk -v d="@$dir" '/^@/ { on = ($0 == d); next } on' "$WORK/client.log" |
      grep -E "(sender|receiver)$|error" | sed 's/^\[ *[0-9]*\] *//' | tr -s ' ' | sed 's/^/  /' ||
      echo "  no result: $(tail -3 "$WORK/client.log" | tr '\n' ' ')"
  done
}
for b in $BACKENDS; do
  case $b in
  tap) run tap "tap=ldbt0,ip=10.78.0.2/24,gw=10.78.0.1" 10.78.0.1 10.78.0.1 ;;
  passt) run passt "user,host-loopback=on" 127.0.0.1 10.234.0.1 ;;
  *) echo "unknown backend $b" >&2 ;;
  esac
done
