#!/usr/bin/env bash
# Build a tiny bootable Linux guest for integration tests: Debian's cloud kernel and an
# initramfs holding busybox-static and an /init script. Idempotent: when the guest is built
# and this script has not changed since, it only says so.
#
#   scripts/build-guest.sh [OUT_DIR]        (default: .cache/guest in the repository)
#
# Writes OUT_DIR/vmlinuz, OUT_DIR/initrd.img and OUT_DIR/kernel-version. Boot it with
#
#   qemu-system-x86_64 -accel tcg -m 256M -nodefaults -nographic -serial stdio -no-reboot \
#     -kernel OUT_DIR/vmlinuz -initrd OUT_DIR/initrd.img -append 'console=ttyS0 panic=-1 ...' \
#     -blockdev driver=file,node-name=f0,filename=disk.raw -device virtio-blk-pci,drive=f0,id=vda
#
# (KVM hangs booting guests on these machines: use TCG.) What /init does, after loading the
# virtio modules and printing "BA-GUEST: ready vda=<bytes> ...":
#
#   ba.cmd="shell command"   run it (no double quotes inside), print "BA-GUEST: cmd exit N";
#   ba.cmd64=BASE64          the same, for a command given in base64 (any characters);
#   ba.qga=1                 first start Debian's qemu-ga on the virtio-serial port named
#                            org.qemu.guest_agent.0 (printing "BA-GUEST: qga started"), with
#                            the fsfreeze hook /etc/ba-fsfreeze-hook, which runs /run/ba-hook
#                            FREEZE|THAW when a command made it; ext4 is built in, so a
#                            command can mount an ext4 disk for qemu-ga to freeze;
#   otherwise                write byte ba.pattern (default 0xab) in blocks of ba.bs bytes
#                            (default 65536) over the first ba.count blocks of /dev/ba.dev
#                            (default vda, whole disk), fsync after each block, printing
#                            "BA-GUEST: wrote pass=P block=I" and "BA-GUEST: pass P done";
#                            again and again, or ba.passes times.
#
# Then it prints "BA-GUEST: poweroff" and powers the VM off. Every line it prints starts with
# "BA-GUEST: "; problems print "BA-GUEST: error: ...".
#
# Needs: apt-get (the kernel package is downloaded from Debian's archive), dpkg, cpio, gzip,
# busybox-static (scripts/setup.sh installs them).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
SCRIPT="$PWD/scripts/build-guest.sh"
OUT=${1:-.cache/guest}
META_PACKAGE=linux-image-cloud-amd64
# virtio_console: the guest agent's virtio-serial port (ext4 and its helpers are built into
# the cloud kernel).
MODULES=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk
         virtio_console)
BUSYBOX=/bin/busybox

log() { printf 'build-guest: %s\n' "$*" >&2; }
die() { printf 'build-guest: error: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [[ $EUID -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

mkdir -p "$(dirname "$OUT")"
OUT=$(cd "$(dirname "$OUT")" && pwd)/$(basename "$OUT")

# One build at a time (two test runs may start together).
exec 9>"$OUT.lock"
flock 9

stamp=$(sha256sum "$SCRIPT" | cut -d' ' -f1)
if [[ -f $OUT/vmlinuz && -f $OUT/initrd.img && "$(cat "$OUT/.stamp" 2>/dev/null)" == "$stamp" ]]; then
    log "up to date: $OUT ($(cat "$OUT/kernel-version"))"
    exit 0
fi

for tool in apt-get apt-cache dpkg cpio gzip flock; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found (run scripts/setup.sh)"
done
[[ -x $BUSYBOX ]] || die "$BUSYBOX not found: install busybox-static (scripts/setup.sh)"
if ldd "$BUSYBOX" >/dev/null 2>&1; then
    die "$BUSYBOX is dynamically linked: install busybox-static (scripts/setup.sh)"
fi

work=$(mktemp -d "${OUT}.tmp.XXXXXX")
trap 'rm -rf "$work"' EXIT

# --- 1. The kernel package, by its real versioned name --------------------------------

kernel_package() {
    apt-cache depends "$META_PACKAGE" 2>/dev/null \
        | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }'
}
package=$(kernel_package)
if [[ -z $package ]]; then
    log "apt-cache does not know $META_PACKAGE: running apt-get update"
    as_root apt-get update -q </dev/null >&2
    package=$(kernel_package)
fi
[[ -n $package ]] || die "cannot resolve $META_PACKAGE to a kernel package (apt-cache depends)"

log "downloading $package"
sandbox=()
[[ $EUID -eq 0 ]] && sandbox=(-o APT::Sandbox::User=root)  # no "unsandboxed" warning
(cd "$work" && apt-get download -q "${sandbox[@]}" "$package" </dev/null >&2) \
    || die "apt-get download $package failed"
deb=$(find "$work" -maxdepth 1 -name "${package}_*.deb" | head -n1)
[[ -n $deb ]] || die "apt-get download left no ${package}_*.deb"

dpkg -x "$deb" "$work/pkg"
kver=$(ls "$work/pkg/lib/modules")
[[ -n $kver && -f $work/pkg/boot/vmlinuz-$kver ]] || die "no vmlinuz in $deb"
moddir=$work/pkg/lib/modules/$kver

# --- 2. The initramfs ---------------------------------------------------------------------

root=$work/root
mkdir -p "$root"/{bin,dev,proc,sys,tmp,etc,lib/modules}
cp "$BUSYBOX" "$root/bin/busybox"

: >"$root/etc/ba-modules"
for m in "${MODULES[@]}"; do
    file=$(find "$moddir" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" | head -n1)
    if [[ -z $file ]]; then
        if grep -q "/$m.ko\$" "$moddir/modules.builtin" 2>/dev/null; then
            log "$m is built into $kver"
            continue
        fi
        die "module $m not found in $package"
    fi
    case $file in
        *.xz) xz -dc "$file" >"$root/lib/modules/$m.ko" ;;
        *.zst) zstd -qdc "$file" >"$root/lib/modules/$m.ko" ;;
        *) cp "$file" "$root/lib/modules/$m.ko" ;;
    esac
    echo "$m" >>"$root/etc/ba-modules"
done

# Debian's qemu-ga and the shared libraries it links, taken from this (Debian) system: the
# package is of the same release. No udev in the guest: /init gives it its port.
log "downloading qemu-guest-agent"
(cd "$work" && apt-get download -q "${sandbox[@]}" qemu-guest-agent </dev/null >&2) \
    || die "apt-get download qemu-guest-agent failed"
gadeb=$(find "$work" -maxdepth 1 -name 'qemu-guest-agent_*.deb' | head -n1)
[[ -n $gadeb ]] || die "apt-get download left no qemu-guest-agent_*.deb"
dpkg -x "$gadeb" "$work/ga"
cp "$work/ga/usr/sbin/qemu-ga" "$root/bin/qemu-ga"
if ldd "$root/bin/qemu-ga" | grep -q 'not found'; then
    die "qemu-ga needs libraries this system lacks: $(ldd "$root/bin/qemu-ga" | grep 'not found' | tr -s ' \n' ' ')"
fi
for lib in $(ldd "$root/bin/qemu-ga" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done
mkdir -p "$root/etc/qemu" "$root/run"
cat >"$root/etc/ba-fsfreeze-hook" <<'HOOK'
#!/bin/sh
# qemu-ga runs this with "freeze" before it freezes and "thaw" after it thaws (-F): tests
# put their hook in /run/ba-hook.
[ -x /run/ba-hook ] && exec /run/ba-hook "$@"
exit 0
HOOK
chmod 755 "$root/etc/ba-fsfreeze-hook"

cat >"$root/init" <<'INIT'
#!/bin/busybox sh
# backup-agent test guest (scripts/build-guest.sh): load the virtio modules, then run
# ba.cmd / ba.cmd64 from the kernel command line, or write a pattern to a disk.
/bin/busybox mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys

say() { echo "BA-GUEST: $*"; }
finish() {
    sync
    say "poweroff"
    poweroff -f
    sleep 10
}
# ba.NAME=VALUE (a value without spaces) from the kernel command line.
param() {
    for word in $(cat /proc/cmdline); do
        case $word in "ba.$1="*) echo "${word#ba.$1=}"; return ;; esac
    done
}

for m in $(cat /etc/ba-modules); do
    insmod "/lib/modules/$m.ko" || { say "error: insmod $m failed"; finish; }
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
disks=""
for d in /sys/block/vd*; do
    [ -e "$d" ] && disks="$disks ${d##*/}=$(($(cat "$d/size") * 512))"
done
say "ready${disks:- no disks}"

if [ "$(param qga)" = 1 ]; then
    port=""
    i=0
    while [ -z "$port" ] && [ $i -lt 100 ]; do
        for p in /sys/class/virtio-ports/*; do
            [ "$(cat "$p/name" 2>/dev/null)" = org.qemu.guest_agent.0 ] && [ -c "/dev/${p##*/}" ] \
                && port=/dev/${p##*/}
        done
        [ -n "$port" ] || { sleep 0.1; i=$((i + 1)); }
    done
    if [ -n "$port" ]; then
        mkdir -p /run/qga
        qemu-ga -m virtio-serial -p "$port" -t /run/qga -f /run/qga.pid \
            -F/etc/ba-fsfreeze-hook -l /run/qga.log &
        say "qga started $port"
    else
        say "error: no virtio-serial port org.qemu.guest_agent.0"
    fi
fi

cmd=$(sed -n 's/.*ba\.cmd="\([^"]*\)".*/\1/p' /proc/cmdline)
[ -n "$cmd" ] || cmd=$(param cmd)
b64=$(param cmd64)
[ -n "$b64" ] && cmd=$(echo "$b64" | base64 -d)
if [ -n "$cmd" ]; then
    sh -c "$cmd"
    say "cmd exit $?"
    finish
fi

dev=$(param dev); dev=${dev:-vda}
pattern=$(param pattern); pattern=${pattern:-0xab}
bs=$(param bs); bs=${bs:-65536}
passes=$(param passes)
[ -b "/dev/$dev" ] || { say "error: no /dev/$dev"; finish; }
count=$(param count); count=${count:-$(($(cat "/sys/block/$dev/size") * 512 / bs))}
dd if=/dev/zero bs="$bs" count=1 2>/dev/null | tr '\000' "\\$(printf %03o $((pattern)))" >/tmp/block
p=1
while :; do
    i=0
    while [ $i -lt "$count" ]; do
        dd if=/tmp/block of="/dev/$dev" bs="$bs" seek=$i count=1 conv=notrunc,fsync 2>/dev/null \
            || { say "error: writing block $i of /dev/$dev failed"; finish; }
        say "wrote pass=$p block=$i"
        i=$((i + 1))
    done
    say "pass $p done"
    [ -n "$passes" ] && [ $p -ge "$passes" ] && break
    p=$((p + 1))
done
finish
INIT
chmod 755 "$root/init"

build=$work/out
mkdir -p "$build"
(cd "$root" && find . -print0 | LC_ALL=C sort -z \
    | cpio --null --create --format=newc --owner=0:0 --quiet) | gzip -9n >"$build/initrd.img"
cp "$work/pkg/boot/vmlinuz-$kver" "$build/vmlinuz"
echo "$kver" >"$build/kernel-version"
echo "$stamp" >"$build/.stamp"

rm -rf "$OUT"
mv "$build" "$OUT"
log "built $OUT: kernel $kver, initrd $(du -h "$OUT/initrd.img" | cut -f1)"
