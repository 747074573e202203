#!/usr/bin/env bash
# Guest → host TCP throughput over virtio-net, for the TAP and the passt
# backend. Everything runs in a private network namespace (root needed):
# TAP: ldbt0 (10.78.0.1/24) ↔ guest 10.78.0.2; passt: a veth whose far
# end forwards nothing is passt's template interface, the guest reaches
# the namespace's loopback through the gateway 10.234.0.1.
# The default guest is busybox only (no iperf3 inside), so the guest
# sends `dd if=/dev/zero | nc` and a host-side sink (python3) times the
# bytes from first to last.
# Usage: scripts/bench-net-tcp.sh [MiB] (default 64)
set -euo pipefail
MIB=${1:-64}
BIN=${LOCALD_VMM:-${CARGO_TARGET_DIR:-target}/release/locald-vmm}
[ -x "$BIN" ] || { echo "no locald-vmm at $BIN (cargo build --release -p locald-vmm-cli, or set LOCALD_VMM)" >&2; exit 1; }
NS=ldbench-$$
cleanup() { ip netns del "$NS" 2>/dev/null || true; }
trap cleanup EXIT
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

sink() { # ADDR PORT → prints MiB/s once the sender closes
  ip netns exec "$NS" python3 -c '
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); s.settimeout(600)
c, _ = s.accept(); n = 0; t0 = None
while True:
    b = c.recv(1 << 20)
    if not b: break
    if t0 is None: t0 = time.monotonic()
    n += len(b)
dt = time.monotonic() - t0
print(f"{n/1048576:.1f} MiB in {dt:.2f} s = {n/1048576/dt:.1f} MiB/s ({n*8/dt/1e6:.0f} Mbit/s)")
' "$1" "$2"
}

run() { # NAME NETSPEC DEST_ADDR SINK_ADDR
  sink "$4" 5201 > "/tmp/$NS.$1" &
  local sp=$!
  sleep 0.5
  if ! ip netns exec "$NS" "$BIN" run --net "$2" --timeout 600 -- \
    sh -c "dd if=/dev/zero bs=64k count=$((MIB * 16)) 2>/dev/null | nc $3 5201" >/dev/null; then
    kill "$sp" 2>/dev/null || true
  fi
  wait "$sp" || true
  echo "$1: $(cat "/tmp/$NS.$1")"
  rm -f "/tmp/$NS.$1"
}
run tap "tap=ldbt0,ip=10.78.0.2/24,gw=10.78.0.1" 10.78.0.1 10.78.0.1
run passt "user" 10.234.0.1 127.0.0.1
