#!/usr/bin/env bash
# The real-Linux side-by-side: boots the default guest's kernel and
# initramfs under QEMU's microvm machine with KVM, with the same command line
# locald-vmm uses on a software KVM and the CPUID masking QEMU can express
# (`-cpu host,-…`, the list in crates/locald-vmm/src/kvm/cpuid.rs), and
# reports how far each boot gets.
#
# On a software KVM (PVM) QEMU cannot complete the instructions KVM's
# emulator lacks: the boot pauses on a "KVM internal error" (emulation
# failure). For each run this prints the wall time from QEMU's start to that
# error and the guest kernel symbol at RIP (from the kernel's System.map),
# or "reached userspace" if the init printed its first line.
# Run `scripts/bench-boot.sh` for locald-vmm's own figures on the same guest.
#
# Usage: scripts/bench-qemu-linux.sh [RUNS]   (default 3)
#   LOCALD_VMM=path/to/locald-vmm   (default $CARGO_TARGET_DIR/release)
#   QEMU=qemu-system-x86_64  BENCH_CPUS=2  BENCH_MEMORY=128M  BENCH_TIMEOUT=120
set -euo pipefail
RUNS=${1:-3}
BIN=${LOCALD_VMM:-${CARGO_TARGET_DIR:-target}/release/locald-vmm}
QEMU=${QEMU:-qemu-system-x86_64}
CPUS=${BENCH_CPUS:-2}
MEM=${BENCH_MEMORY:-128M}
TIMEOUT=${BENCH_TIMEOUT:-120}
[ -x "$BIN" ] || { echo "no locald-vmm at $BIN (cargo build --release -p locald-vmm-cli, or set LOCALD_VMM)" >&2; exit 1; }
command -v "$QEMU" >/dev/null || { echo "no $QEMU (apt-get install qemu-system-x86, or scripts/setup-host.sh)" >&2; exit 1; }
[ -w /dev/kvm ] || { echo "no writable /dev/kvm" >&2; exit 1; }

info=$("$BIN" prepare)
kernel=$(sed -n 's/^kernel: *//p' <<<"$info")
initrd=$(sed -n 's/^initramfs: *//p' <<<"$info")
cmdline=$(sed -n 's/^cmdline (software KVM): *//p' <<<"$info")
map=$(dirname "$kernel")/System.map
[ -n "$kernel" ] && [ -n "$initrd" ] && [ -n "$cmdline" ] && [ -f "$map" ] \
    || { echo "unexpected 'locald-vmm prepare' output:" >&2; echo "$info" >&2; exit 1; }
# CPUID features locald-vmm hides on a software KVM that QEMU can name
# (osxsave follows xsave). -arch-capabilities: QEMU 7.2 aborts on this host
# without it.
cpu=host,-arch-capabilities
for f in cx16 popcnt xsave avx f16c fma fsgsbase avx2 smep erms invpcid avx512f rdseed smap; do
    cpu+=",-$f"
done

echo "QEMU: $("$QEMU" --version | head -1)"
echo "kernel $kernel, $CPUS vCPU, $MEM, -cpu $cpu"
echo "cmdline: $cmdline"
python3 - "$RUNS" "$QEMU" "$cpu" "$MEM" "$CPUS" "$kernel" "$initrd" "$cmdline" "$map" "$TIMEOUT" <<'EOF'
import bisect, os, re, select, signal, subprocess, sys, time
runs, qemu, cpu, mem, cpus, kernel, initrd, cmdline, smap, timeout = sys.argv[1:]
syms = []
for line in open(smap):
    a, _, n = line.split()[:3]
    syms.append((int(a, 16), n))
syms.sort()
addrs = [a for a, _ in syms]
def symbol(rip):
    i = bisect.bisect_right(addrs, rip) - 1
    return f"{syms[i][1]}+{rip - syms[i][0]:#x}" if i >= 0 else hex(rip)
results = []
for run in range(1, int(runs) + 1):
    cmd = [qemu, "-M", "microvm", "-enable-kvm", "-cpu", cpu, "-m", mem, "-smp", cpus,
           "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-no-reboot",
           "-kernel", kernel, "-initrd", initrd, "-append", cmdline]
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    buf, outcome, when, seen_error = b"", None, None, False
    while outcome is None:
        left = float(timeout) - (time.monotonic() - t0)
        if left <= 0:
            outcome = f"no emulation failure within {timeout} s"
            break
        r, _, _ = select.select([p.stdout], [], [], left)
        if not r:
            continue
        chunk = os.read(p.stdout.fileno(), 65536)
        if not chunk:
            outcome = f"QEMU exited ({p.wait()})"
            when = time.monotonic() - t0
            break
        buf += chunk
        text = buf.decode(errors="replace")
        if not seen_error and "KVM internal error" in text:
            seen_error, when = True, time.monotonic() - t0
        if seen_error:
            m = re.search(r"RIP=([0-9a-f]{16})", text)
            if m:
                outcome = f"emulation failure at {symbol(int(m.group(1), 16))}"
        elif "locald-init" in text:
            when = time.monotonic() - t0
            outcome = "reached userspace"
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    shown = f"{when:6.2f} s" if when is not None else "   -   "
    print(f"run {run}: {shown}  {outcome}")
    if when is not None:
        results.append(when)
if results:
    results.sort()
    print(f"median: {results[len(results) // 2]:.2f} s over {len(results)} runs")
EOF
