#!/usr/bin/env bash
# OCI image costs, side by side in one run:
#   1. cold `pull --rootfs` (registry pull + unpack + ext4 root build) of a
#      small image (static busybox) and a mid-sized one (busybox + the
#      host's Python standard library, ~50 MB in ~5000 files), each from an
#      empty cache entry, from a docker-registry on 127.0.0.1;
#   2. the warm image stage: `pull --rootfs` of the cached image (what
#      `run --image` adds before booting), against `images` (the same
#      process start and cache open, no image stage);
#   3. `run --image REF -- true` against `run --rootfs THE_SAME_EXT4,ro --
#      true`, paired boots.
# Medians of RUNS (default 5). Needs docker-registry and skopeo
# (scripts/setup-host.sh). Unpack throughput against `tar -x`:
# `cargo run --release -p locald-image --example unpack_bench`.
#
# Usage: scripts/bench-image.sh [RUNS]
set -euo pipefail
RUNS=${1:-5}
BIN=${LOCALD_VMM:-${CARGO_TARGET_DIR:-target}/release/locald-vmm}
[ -x "$BIN" ] || { echo "no locald-vmm at $BIN (cargo build --release -p locald-vmm-cli)" >&2; exit 1; }
tmp=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$tmp/registry.yml" <<YML
version: 0.1
log: {level: error, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $tmp/storage}}
http: {addr: 127.0.0.1:$port}
YML
docker-registry serve "$tmp/registry.yml" >/dev/null 2>&1 &
reg=$!
trap 'kill $reg 2>/dev/null; rm -rf "$tmp"' EXIT
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done

# An OCI layout with one gzip layer holding busybox (+ DIR under /extra).
make_layout() { # OUT [DIR]
  python3 - "$@" <<'PY'
import gzip, hashlib, io, json, os, sys, tarfile
out = sys.argv[1]; extra = sys.argv[2] if len(sys.argv) > 2 else None
os.makedirs(f"{out}/blobs/sha256", exist_ok=True)
def blob(data):
    h = hashlib.sha256(data).hexdigest()
    open(f"{out}/blobs/sha256/{h}", "wb").write(data)
    return {"digest": "sha256:" + h, "size": len(data)}
raw = io.BytesIO()
with tarfile.open(fileobj=raw, mode="w") as t:
    t.add("/bin/busybox", arcname="bin/sh")
    ti = tarfile.TarInfo("bin/true"); ti.type = tarfile.SYMTYPE; ti.linkname = "sh"; t.addfile(ti)
    if extra:
        t.add(extra, arcname="extra")
layer = gzip.compress(raw.getvalue(), 6)
l = blob(layer); l["mediaType"] = "application/vnd.oci.image.layer.v1.tar+gzip"
cfg = {"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/true"]},
       "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(raw.getvalue()).hexdigest()]}}
c = blob(json.dumps(cfg).encode()); c["mediaType"] = "application/vnd.oci.image.config.v1+json"
m = blob(json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                     "config": c, "layers": [l]}).encode())
m["mediaType"] = "application/vnd.oci.image.manifest.v1+json"
m["annotations"] = {"org.opencontainers.image.ref.name": "v1"}
json.dump({"schemaVersion": 2, "manifests": [m]}, open(f"{out}/index.json", "w"))
json.dump({"imageLayoutVersion": "1.0.0"}, open(f"{out}/oci-layout", "w"))
print(f"{len(layer)} bytes compressed, {len(raw.getvalue())} uncompressed")
PY
}
median() { sort -g | awk '{v[NR]=$1} END{ if (NR%2) print v[(NR+1)/2]; else printf "%.3f\n", (v[NR/2]+v[NR/2+1])/2 }'; }
secs() { local t0; t0=$(date +%s.%N); "$@" >/dev/null 2>"$tmp/err" || { cat "$tmp/err" >&2; exit 1; }; echo "$(date +%s.%N) - $t0" | bc; }

declare -A ref
for kind in small mid; do
  if [ $kind = small ]; then size=$(make_layout "$tmp/$kind"); else size=$(make_layout "$tmp/$kind" /usr/lib/python3.11); fi
  echo "$kind image: $size"
  ref[$kind]="127.0.0.1:$port/bench/$kind-$$:v1"
  skopeo --insecure-policy copy --quiet --dest-tls-verify=false "oci:$tmp/$kind:v1" "docker://${ref[$kind]}"
done

echo
echo "== cold pull + unpack + ext4 root, median of $RUNS"
for kind in small mid; do
  for i in $(seq "$RUNS"); do
    "$BIN" image rm "${ref[$kind]}" >/dev/null 2>&1 || true
    "$BIN" image prune >/dev/null
    secs "$BIN" pull --rootfs "${ref[$kind]}"
  done | median | xargs printf "%-5s %s s\n" "$kind"
done

echo
echo "== warm image stage (cached image and root disk), median of $RUNS"
for i in $(seq "$RUNS"); do secs "$BIN" pull --rootfs "${ref[mid]}"; done | median | xargs printf "pull --rootfs (cached) %s s\n"
for i in $(seq "$RUNS"); do secs "$BIN" images; done | median | xargs printf "images (baseline)      %s s\n"

echo
echo "== boots: run --image vs run --rootfs of the same ext4, median of $RUNS"
root=$("$BIN" pull --rootfs "${ref[small]}" | awk '{print $3}')
for i in $(seq "$RUNS"); do
  echo "image $(secs "$BIN" run --image "${ref[small]}" -- /bin/true)"
  echo "rootfs $(secs "$BIN" run --rootfs "$root,ro" -- /bin/true)"
done >"$tmp/boots"
for k in image rootfs; do grep "^$k " "$tmp/boots" | awk '{print $2}' | median | xargs printf "%-6s %s s\n" "$k"; done
for kind in small mid; do "$BIN" image rm "${ref[$kind]}" >/dev/null; done
"$BIN" image prune >/dev/null
