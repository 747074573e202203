#!/usr/bin/env bash
# Build locald-vmm's default guest kernel.
#
#   guest/kernel/build-kernel.sh [--arch x86_64|aarch64] OUT_DIR
#
# x86_64 (the default):
#   Debian's linux-source-6.1 + patches/*.patch + `make tinyconfig` +
#   microvm.config  ->  OUT_DIR/{vmlinux,System.map,.config,build-info}
# aarch64 (cross-built with Debian's gcc-aarch64-linux-gnu on an x86_64 host,
# natively on an arm64 host):
#   the same source + the patches that are not x86-only (no `-x86-` in the
#   name) + `make ARCH=arm64 tinyconfig` + microvm-aarch64.config
#   ->  OUT_DIR/{Image,System.map,.config,build-info}
#
# Everything else lives under ${LOCALD_VMM_CACHE:-$HOME/.cache/locald-vmm}:
#   downloads/linux-source-6.1_*.deb   the Debian source package (reused)
#   build/linux-<key>/                 x86_64: patched tree + build log, one per key
#   build/linux-aarch64-<key>/         the same for aarch64
# <key> is printed by `hash.sh [ARCH]` (sha256 over this script, the arch's
# config fragment and the arch's patches). Safe to rerun: finished steps are skipped, the kernel build
# is incremental, OUT_DIR is replaced only after everything succeeded.
#
# Environment:
#   LOCALD_VMM_CACHE          cache root (default ~/.cache/locald-vmm)
#   LOCALD_VMM_KERNEL_JOBS    make -j value (default: nproc)
set -euo pipefail

die() { printf 'build-kernel: error: %s\n' "$*" >&2; exit 1; }
stage() { printf 'build-kernel: [%s] %s\n' "$1" "$2"; }
info() { printf 'build-kernel:       %s\n' "$*"; }

ARCH_NAME=x86_64
if [[ ${1:-} == --arch ]]; then
    [[ $# -ge 2 ]] || die "usage: $0 [--arch x86_64|aarch64] OUT_DIR"
    ARCH_NAME=$2
    shift 2
fi
[[ $# -eq 1 && -n $1 ]] || die "usage: $0 [--arch x86_64|aarch64] OUT_DIR"
OUT_DIR=$1
OUT_DIR=${OUT_DIR%/}
[[ -n $OUT_DIR ]] || die "OUT_DIR must not be /"

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PATCH_DIR=$HERE/patches
HOST_ARCH=$(uname -m)
case $ARCH_NAME in
    x86_64)
        FRAGMENT=$HERE/microvm.config
        KARCH=x86_64 CROSS='' TARGET=vmlinux IMAGE=vmlinux WORK_PREFIX=linux-
        [[ $HOST_ARCH == x86_64 ]] || die "the x86_64 kernel must be built on an x86_64 host (got $HOST_ARCH)"
        ;;
    aarch64)
        FRAGMENT=$HERE/microvm-aarch64.config
        KARCH=arm64 TARGET=Image IMAGE=arch/arm64/boot/Image WORK_PREFIX=linux-aarch64-
        case $HOST_ARCH in
            x86_64) CROSS=aarch64-linux-gnu- ;;
            aarch64) CROSS='' ;;
            *) die "the aarch64 kernel is built on an x86_64 (cross) or aarch64 host (got $HOST_ARCH)" ;;
        esac
        ;;
    *) die "unknown --arch '$ARCH_NAME' (x86_64 or aarch64)" ;;
esac
# The patches this arch gets: all of them for x86_64; for aarch64 those
# without `-x86-` in the name (the others change only arch/x86 files).
arch_patches() {
    local p
    shopt -s nullglob
    for p in "$PATCH_DIR"/*.patch; do
        [[ $ARCH_NAME == x86_64 || $(basename "$p") != *-x86-* ]] && printf '%s\n' "$p"
    done
    shopt -u nullglob
}
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
[[ -n $CROSS ]] && DEPS[gcc-aarch64-linux-gnu]=${CROSS}gcc
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

KEY=$("$HERE/hash.sh" "$ARCH_NAME")
WORK=$CACHE/build/$WORK_PREFIX$KEY
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
    mapfile -t patches < <(arch_patches)
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
stage 5/7 "configuring: ARCH=$KARCH tinyconfig + $(basename "$FRAGMENT")"
LOG=$WORK/build.log
: >"$LOG"
kmake() { make -C "$SRC" ARCH="$KARCH" ${CROSS:+CROSS_COMPILE=$CROSS} "$@"; }
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
stage 6/7 "building $TARGET (make -j$JOBS; log: $LOG)"
build_start=$SECONDS
kmake -j"$JOBS" "$TARGET" >>"$LOG" 2>&1 &
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
((make_rc == 0)) || fail_log "make $TARGET failed (exit $make_rc)"
info "$TARGET built in $((SECONDS - build_start)) s ($(grep -cE '^  (CC|AS)  ' "$LOG" || true) objects compiled this run)"

BUILT=$SRC/$IMAGE
[[ -f $BUILT && -f $SRC/System.map ]] || fail_log "$IMAGE or System.map missing after build"
if [[ $ARCH_NAME == x86_64 ]]; then
    # Must be an ELF with the PVH entry note: owner "Xen", type 0x12
    # (XEN_ELFNOTE_PHYS32_ENTRY).
    notes=$(readelf -n "$BUILT" 2>/dev/null || true)
    if ! grep -Eq '^[[:space:]]*Xen[[:space:]].*(0x00000012|PHYS32_ENTRY)' <<<"$notes"; then
        die "$BUILT has no PVH entry note (Xen, type 0x12 / XEN_ELFNOTE_PHYS32_ENTRY); is CONFIG_PVH=y?"
    fi
else
    # The arm64 boot protocol: magic "ARM\x64" at offset 56 of the Image header.
    magic=$(od -An -c -j56 -N4 "$BUILT" | tr -d ' ')
    [[ $magic == 'ARMd' ]] || die "$BUILT has no arm64 Image header magic at offset 56 (got '$magic')"
fi
RELEASE=$(kmake -s --no-print-directory kernelrelease 2>/dev/null || echo unknown)

# ---------------------------------------------------------------------------
stage 7/7 "installing into $OUT_DIR"
mkdir -p "$(dirname "$OUT_DIR")"
TMP_OUT=$OUT_DIR.tmp
rm -rf "$TMP_OUT"
mkdir "$TMP_OUT"
cp "$BUILT" "$TMP_OUT/$TARGET"
cp "$SRC/System.map" "$TMP_OUT/System.map"
cp "$SRC/.config" "$TMP_OUT/.config"
cat >"$TMP_OUT/build-info" <<EOF
cache_key=$KEY
arch=$ARCH_NAME
kernel_release=$RELEASE
source_package=$SOURCE_PKG $DEB_VERSION
patches=$(arch_patches | xargs -r -n1 basename | tr '\n' ' ' | sed 's/ $//')
EOF
sync -f "$TMP_OUT/$TARGET" 2>/dev/null || true
if [[ -e $OUT_DIR ]]; then
    rm -rf "$OUT_DIR.old"
    mv -T "$OUT_DIR" "$OUT_DIR.old"
fi
mv -T "$TMP_OUT" "$OUT_DIR"
rm -rf "$OUT_DIR.old"

# Drop work trees of other keys of this arch (~1.5 GB each) unless another
# build holds them. x86_64 trees are linux-<16 hex>, aarch64 ones
# linux-aarch64-<16 hex>.
for d in "$CACHE"/build/"$WORK_PREFIX"????????????????; do
    [[ -d $d && $d != "$WORK" ]] || continue
    (
        exec 8>"$d.lock"
        flock -n 8 || exit 0
        rm -rf "$d"
        rm -f "$d.lock"
    ) || true
done

size=$(stat -c %s "$OUT_DIR/$TARGET")
stage done "$OUT_DIR/$TARGET ($RELEASE, $((size / 1024)) KiB, key $KEY) in $((SECONDS - START)) s"
