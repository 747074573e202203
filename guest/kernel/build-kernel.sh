#!/usr/bin/env bash
# Build locald-vmm's default guest kernel.
#
#   guest/kernel/build-kernel.sh OUT_DIR
#
# Debian's linux-source-6.1 + patches/*.patch + `make tinyconfig` +
# microvm.config  ->  OUT_DIR/{vmlinux,System.map,.config,build-info}
#
# Everything else lives under ${LOCALD_VMM_CACHE:-$HOME/.cache/locald-vmm}:
#   downloads/linux-source-6.1_*.deb   the Debian source package (reused)
#   build/linux-<key>/                 patched tree + build log, one per key
# <key> is printed by hash.sh (sha256 over this script, microvm.config and
# the patches). Safe to rerun: finished steps are skipped, the kernel build
# is incremental, OUT_DIR is replaced only after everything succeeded.
#
# Environment:
#   LOCALD_VMM_CACHE          cache root (default ~/.cache/locald-vmm)
#   LOCALD_VMM_KERNEL_JOBS    make -j value (default: nproc)
set -euo pipefail

die() { printf 'build-kernel: error: %s\n' "$*" >&2; exit 1; }
stage() { printf 'build-kernel: [%s] %s\n' "$1" "$2"; }
info() { printf 'build-kernel:       %s\n' "$*"; }

[[ $# -eq 1 && -n $1 ]] || die "usage: $0 OUT_DIR"
OUT_DIR=$1
OUT_DIR=${OUT_DIR%/}
[[ -n $OUT_DIR ]] || die "OUT_DIR must not be /"

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
FRAGMENT=$HERE/microvm.config
PATCH_DIR=$HERE/patches
SOURCE_PKG=linux-source-6.1
CACHE=${LOCALD_VMM_CACHE:-$HOME/.cache/locald-vmm}
DOWNLOADS=$CACHE/downloads
JOBS=${LOCALD_VMM_KERNEL_JOBS:-$(nproc)}
export LC_ALL=C
# Reproducible-ish identification in `uname -v` / /proc/version.
export KBUILD_BUILD_USER=locald-vmm KBUILD_BUILD_HOST=locald-vmm
# Make sure no make flags from a calling make/cargo leak into the kernel build.
unset MAKEFLAGS MFLAGS MAKELEVEL || true

START=$SECONDS
[[ $(uname -m) == x86_64 ]] || die "must run on an x86_64 host (got $(uname -m))"
[[ -f $FRAGMENT ]] || die "missing $FRAGMENT"

# ---------------------------------------------------------------------------
stage 1/7 "checking build dependencies"
# package -> a command (or file) it provides
declare -A DEPS=(
    [make]=make [gcc]=gcc [libc6-dev]=/usr/include/stdio.h [binutils]=readelf
    [flex]=flex [bison]=bison [bc]=bc [libelf-dev]=/usr/include/libelf.h
    [libssl-dev]=/usr/include/openssl/ssl.h [cpio]=cpio [xz-utils]=xz
    [patch]=patch [perl]=perl [dpkg]=dpkg-deb [apt]=apt-get
    [coreutils]=sha256sum [util-linux]=flock
)
missing=()
for pkg in "${!DEPS[@]}"; do
    want=${DEPS[$pkg]}
    if [[ $want == /* ]]; then [[ -e $want ]] && continue
    else command -v "$want" >/dev/null 2>&1 && continue
    fi
    missing+=("$pkg")
done
if ((${#missing[@]})); then
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort)
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        info "installing: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y --no-install-recommends "${missing[@]}" \
            || { apt-get update && apt-get install -y --no-install-recommends "${missing[@]}"; } \
            || die "apt-get install ${missing[*]} failed"
    else
        die "missing build dependencies: ${missing[*]}
  install them with:  sudo apt-get install -y ${missing[*]}"
    fi
fi

KEY=$("$HERE/hash.sh")
WORK=$CACHE/build/linux-$KEY
mkdir -p "$DOWNLOADS" "$CACHE/build"

# One build per key at a time; a second invocation waits for the first.
exec 9>"$WORK.lock"
if ! flock -n 9; then
    info "another build of $KEY is running; waiting for it"
    flock 9
fi

# ---------------------------------------------------------------------------
stage 2/7 "kernel source package ($SOURCE_PKG)"
find_deb() {
    local d
    d=$(ls -1 "$DOWNLOADS"/${SOURCE_PKG}_*_all.deb 2>/dev/null | sort -V | tail -n 1 || true)
    printf '%s' "$d"
}
DEB=$(find_deb)
if [[ -n $DEB ]] && dpkg-deb --info "$DEB" >/dev/null 2>&1; then
    info "using cached $(basename "$DEB")"
else
    [[ -z $DEB ]] || { info "discarding unreadable $(basename "$DEB")"; rm -f "$DEB"; }
    info "apt-get download $SOURCE_PKG (~140 MB)"
    dl=$(mktemp -d "$DOWNLOADS/.dl.XXXXXX")
    apt_opts=()
    # apt drops privileges to _apt, which cannot write into root's cache dir.
    [[ $(id -u) -eq 0 ]] && apt_opts=(-o APT::Sandbox::User=root)
    if ! (cd "$dl" && apt-get "${apt_opts[@]}" download "$SOURCE_PKG"); then
        if [[ $(id -u) -eq 0 ]]; then
            info "apt-get download failed; running apt-get update and retrying"
            apt-get update -q >/dev/null
            (cd "$dl" && apt-get "${apt_opts[@]}" download "$SOURCE_PKG") \
                || { rm -rf "$dl"; die "apt-get download $SOURCE_PKG failed"; }
        else
            rm -rf "$dl"
            die "apt-get download $SOURCE_PKG failed (is the apt package list up to date? try: sudo apt-get update)"
        fi
    fi
    got=$(ls -1 "$dl"/${SOURCE_PKG}_*_all.deb 2>/dev/null | head -n 1 || true)
    [[ -n $got ]] && dpkg-deb --info "$got" >/dev/null \
        || { rm -rf "$dl"; die "apt-get download produced no usable ${SOURCE_PKG} .deb"; }
    mv -f "$got" "$DOWNLOADS/"
    rm -rf "$dl"
    DEB=$(find_deb)
fi
DEB_NAME=$(basename "$DEB")
DEB_VERSION=$(dpkg-deb -f "$DEB" Version)

# ---------------------------------------------------------------------------
SRC=$WORK/src
STAMP_SRC="$DEB_NAME $KEY"
if [[ -f $WORK/.source-ready && $(cat "$WORK/.source-ready") == "$STAMP_SRC" && -f $SRC/Makefile ]]; then
    stage 3/7 "source tree: reusing $SRC"
    stage 4/7 "patches: already applied"
else
    stage 3/7 "extracting $DEB_NAME into $WORK"
    rm -rf "$WORK"
    mkdir -p "$WORK"
    tmp=$(mktemp -d "$WORK/.x.XXXXXX")
    dpkg -x "$DEB" "$tmp/deb"
    tarball=$(ls -1 "$tmp"/deb/usr/src/linux-source-*.tar.xz 2>/dev/null | head -n 1 || true)
    [[ -n $tarball ]] || die "$DEB_NAME contains no usr/src/linux-source-*.tar.xz"
    mkdir "$tmp/src"
    tar -xf "$tarball" -C "$tmp/src"
    tops=("$tmp"/src/*)
    [[ ${#tops[@]} -eq 1 && -f ${tops[0]}/Makefile ]] \
        || die "unexpected layout in $(basename "$tarball")"
    mv "${tops[0]}" "$SRC"
    rm -rf "$tmp"

    stage 4/7 "applying patches"
    shopt -s nullglob
    patches=("$PATCH_DIR"/*.patch)
    shopt -u nullglob
    for p in "${patches[@]}"; do
        name=$(basename "$p")
        if ! out=$(patch -d "$SRC" -p1 --batch --forward --fuzz=0 --dry-run <"$p" 2>&1); then
            printf '%s\n' "$out" >&2
            die "patch $name does not apply to $DEB_NAME"
        fi
        patch -d "$SRC" -p1 --batch --forward --fuzz=0 --no-backup-if-mismatch --quiet <"$p" \
            || die "patch $name failed to apply"
        info "applied $name"
    done
    printf '%s\n' "$STAMP_SRC" >"$WORK/.source-ready"
fi

# ---------------------------------------------------------------------------
stage 5/7 "configuring: tinyconfig + $(basename "$FRAGMENT")"
LOG=$WORK/build.log
: >"$LOG"
kmake() { make -C "$SRC" ARCH=x86_64 "$@"; }
fail_log() {
    printf '\nbuild-kernel: last lines of %s:\n' "$LOG" >&2
    tail -n 60 "$LOG" >&2
    die "$1 (full log: $LOG)"
}
# Keep the previous .config so an unchanged config does not look newer to make.
[[ -f $SRC/.config ]] && cp -p "$SRC/.config" "$WORK/.config.prev"
{
    kmake tinyconfig &&
    (cd "$SRC" && ./scripts/kconfig/merge_config.sh -m .config "$FRAGMENT") &&
    kmake olddefconfig
} >>"$LOG" 2>&1 || fail_log "kernel configuration failed"
if [[ -f $WORK/.config.prev ]] && cmp -s "$WORK/.config.prev" "$SRC/.config"; then
    touch -r "$WORK/.config.prev" "$SRC/.config"
fi
rm -f "$WORK/.config.prev"

# Every line of the fragment must have stuck. "# CONFIG_X is not set" is also
# satisfied by the symbol being absent (its dependencies are off), but the
# symbol must exist in some Kconfig file (catches typos).
known=$(cd "$SRC" && find . -name 'Kconfig*' -not -path './Documentation/*' -print0 \
    | xargs -0 grep -hoE '^[[:space:]]*(menu)?config[[:space:]]+[A-Za-z0-9_]+' \
    | awk '{print $2}' | sort -u)
bad=()
while IFS= read -r line || [[ -n $line ]]; do
    if [[ $line =~ ^CONFIG_([A-Za-z0-9_]+)=(.*)$ ]]; then
        sym=${BASH_REMATCH[1]}; unset_ok=0
    elif [[ $line =~ ^#\ CONFIG_([A-Za-z0-9_]+)\ is\ not\ set[[:space:]]*$ ]]; then
        sym=${BASH_REMATCH[1]}; unset_ok=1
    else
        continue
    fi
    if ! grep -qxF "$sym" <<<"$known"; then
        bad+=("$line   (no such Kconfig symbol)")
        continue
    fi
    got=$(grep -E "^(# )?CONFIG_${sym}( is not set|=)" "$SRC/.config" | head -n 1 || true)
    if ((unset_ok)); then
        [[ -z $got || $got == "$line" ]] && continue
    else
        [[ $got == "$line" ]] && continue
    fi
    bad+=("$line   (final .config: ${got:-<absent>})")
done <"$FRAGMENT"
if ((${#bad[@]})); then
    printf 'build-kernel: these %s lines did not stick after olddefconfig:\n' "$(basename "$FRAGMENT")" >&2
    printf '  %s\n' "${bad[@]}" >&2
    die "kernel config verification failed"
fi
info "all $(grep -cE '^(CONFIG_|# CONFIG_.* is not set)' "$FRAGMENT") fragment lines verified in .config"

# ---------------------------------------------------------------------------
stage 6/7 "building vmlinux (make -j$JOBS; log: $LOG)"
build_start=$SECONDS
kmake -j"$JOBS" vmlinux >>"$LOG" 2>&1 &
make_pid=$!
# Do not leave make running if we are interrupted.
trap 'kill "$make_pid" 2>/dev/null || true' INT TERM EXIT
last_print=$SECONDS
while kill -0 "$make_pid" 2>/dev/null; do
    sleep 2
    if ((SECONDS - last_print >= 15)); then
        n=$(grep -cE '^  (CC|AS)  ' "$LOG" || true)
        info "compiled $n objects ($((SECONDS - build_start)) s)"
        last_print=$SECONDS
    fi
done
make_rc=0
wait "$make_pid" || make_rc=$?
trap - INT TERM EXIT
((make_rc == 0)) || fail_log "make vmlinux failed (exit $make_rc)"
info "vmlinux built in $((SECONDS - build_start)) s ($(grep -cE '^  (CC|AS)  ' "$LOG" || true) objects compiled this run)"

VMLINUX=$SRC/vmlinux
[[ -f $VMLINUX && -f $SRC/System.map ]] || fail_log "vmlinux or System.map missing after build"
# Must be an ELF with the PVH entry note: owner "Xen", type 0x12
# (XEN_ELFNOTE_PHYS32_ENTRY).
notes=$(readelf -n "$VMLINUX" 2>/dev/null || true)
if ! grep -Eq '^[[:space:]]*Xen[[:space:]].*(0x00000012|PHYS32_ENTRY)' <<<"$notes"; then
    die "$VMLINUX has no PVH entry note (Xen, type 0x12 / XEN_ELFNOTE_PHYS32_ENTRY); is CONFIG_PVH=y?"
fi
RELEASE=$(make -s --no-print-directory -C "$SRC" ARCH=x86_64 kernelrelease 2>/dev/null || echo unknown)

# ---------------------------------------------------------------------------
stage 7/7 "installing into $OUT_DIR"
mkdir -p "$(dirname "$OUT_DIR")"
TMP_OUT=$OUT_DIR.tmp
rm -rf "$TMP_OUT"
mkdir "$TMP_OUT"
cp "$VMLINUX" "$TMP_OUT/vmlinux"
cp "$SRC/System.map" "$TMP_OUT/System.map"
cp "$SRC/.config" "$TMP_OUT/.config"
cat >"$TMP_OUT/build-info" <<EOF
cache_key=$KEY
kernel_release=$RELEASE
source_package=$SOURCE_PKG $DEB_VERSION
patches=$(cd "$PATCH_DIR" 2>/dev/null && ls -1 -- *.patch 2>/dev/null | tr '\n' ' ' | sed 's/ $//')
EOF
sync -f "$TMP_OUT/vmlinux" 2>/dev/null || true
if [[ -e $OUT_DIR ]]; then
    rm -rf "$OUT_DIR.old"
    mv -T "$OUT_DIR" "$OUT_DIR.old"
fi
mv -T "$TMP_OUT" "$OUT_DIR"
rm -rf "$OUT_DIR.old"

# Drop work trees of other keys (~1.5 GB each) unless another build holds them.
for d in "$CACHE"/build/linux-*; do
    [[ -d $d && $d != "$WORK" ]] || continue
    (
        exec 8>"$d.lock"
        flock -n 8 || exit 0
        rm -rf "$d"
        rm -f "$d.lock"
    ) || true
done

size=$(stat -c %s "$OUT_DIR/vmlinux")
stage done "$OUT_DIR/vmlinux ($RELEASE, $((size / 1024)) KiB, key $KEY) in $((SECONDS - START)) s"
