#!/usr/bin/env bash
# Fetch QEMU 10.0 from Debian bookworm-backports into a private directory, beside the
# system's QEMU 7.2 and without touching the system's apt sources, so that the tests can run
# against the newest QEMU users have (Debian 13, Proxmox VE 9) as well (docs/QEMU.md).
#
#   scripts/fetch-qemu.sh [DIR]      (default: .cache/qemu10; prints DIR's full path)
#
# apt-get gets a source list and state directories of its own (-o Dir::...), downloads the
# four .debs, and dpkg -x unpacks them into DIR: nothing is installed. Every library they
# link is in bookworm. The mirror is the system's own Debian mirror, as apt reports it.
# A stamp makes a second run return at once.
#
# DIR/bin holds one small wrapper per program, which runs the unpacked one with what it
# needs: qemu-system-x86_64 gets -L DIR/usr/share/qemu (its option ROMs) and
# -L /usr/share/seabios (the BIOS, bookworm's seabios); QEMU_MODULE_DIR keeps every program
# off the system's 7.2 modules. Each wrapper execs, so its pid is QEMU's own. Put DIR/bin
# first on PATH and everything that runs QEMU programs by name runs 10.0:
#   PATH=$PWD/.cache/qemu10/bin:$PATH make demo
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

DIR=$(realpath -m "${1:-.cache/qemu10}")
SUITE=bookworm-backports
PACKAGES=(qemu-system-x86 qemu-system-common qemu-system-data qemu-utils)
PROGRAMS=(qemu-system-x86_64 qemu-img qemu-io qemu-nbd qemu-storage-daemon)
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
STAMP="$DIR/.fetched-stamp"

log() { printf 'fetch-qemu: %s\n' "$*" >&2; }
die() { printf 'fetch-qemu: error: %s\n' "$*" >&2; exit 1; }

# The stamp names what was fetched: another package list or suite fetches again.
want="$SUITE: ${PACKAGES[*]} -> ${PROGRAMS[*]}"
if [[ -f $STAMP && "$(cat "$STAMP")" == "$want" ]]; then
    printf '%s\n' "$DIR"
    exit 0
fi

command -v apt-get >/dev/null && command -v dpkg >/dev/null || die "needs apt-get and dpkg (Debian)"
[[ -r $KEYRING ]] || die "$KEYRING is missing (package debian-archive-keyring)"

# The system's Debian mirror: the archive its apt takes bookworm's main component from, as
# apt itself reports it (so sources.list and deb822 .sources files are read alike).
mirror=$(apt-cache policy 2>/dev/null \
    | awk '$3 == "bookworm/main" && $2 ~ /^(https?|file):/ {print $2; exit}')
[[ -n $mirror ]] || die "no Debian bookworm mirror in this system's apt sources (apt-cache policy)"

work="$DIR.partial"
rm -rf "$work"
mkdir -p "$work/lists/partial" "$work/archives/partial" "$work/cache" "$work/root/bin"
printf 'deb [signed-by=%s] %s %s main\n' "$KEYRING" "$mirror" "$SUITE" > "$work/sources.list"
apt_opts=(
    -o "Dir::Etc::sourcelist=$work/sources.list"
    -o "Dir::Etc::sourceparts=/nonexistent"
    -o "Dir::State::Lists=$work/lists"
    -o "Dir::Cache=$work/cache"  # apt's package cache too: nothing of the system's is written
    -o "Dir::Cache::archives=$work/archives"
    -o "Debug::NoLocking=1"  # our own lists: the system's apt lock is not ours to take
)
log "fetching ${PACKAGES[*]} from $SUITE into $DIR"
apt-get -q "${apt_opts[@]}" update </dev/null >&2 || die "apt-get update of $SUITE failed"
# `apt-get download` writes into the current directory.
(cd "$work/archives" && apt-get -q "${apt_opts[@]}" download \
    "${PACKAGES[@]/%//$SUITE}" </dev/null >&2) || die "apt-get download from $SUITE failed"
for deb in "$work"/archives/*.deb; do
    dpkg -x "$deb" "$work/root"
    basename "$deb" >> "$work/root/.debs"
done

for prog in "${PROGRAMS[@]}"; do
    [[ -x $work/root/usr/bin/$prog ]] || die "$prog is missing from the unpacked packages"
    extra=
    if [[ $prog == qemu-system-x86_64 ]]; then
        extra=' -L "$root/usr/share/qemu" -L /usr/share/seabios'
    fi
    {
        echo '#!/bin/sh'
        echo '# QEMU 10 as unpacked by scripts/fetch-qemu.sh (wherever this directory is now).'
        echo 'root=$(dirname "$(dirname "$(readlink -f "$0")")")'
        echo "QEMU_MODULE_DIR=\"\$root/usr/lib/x86_64-linux-gnu/qemu\" exec \"\$root/usr/bin/$prog\"$extra \"\$@\""
    } > "$work/root/bin/$prog"
    chmod +x "$work/root/bin/$prog"
done

rm -rf "$DIR"
mv "$work/root" "$DIR"
rm -rf "$work"
log "ok: $("$DIR/bin/qemu-system-x86_64" --version | head -1)"
printf '%s\n' "$want" > "$STAMP"
printf '%s\n' "$DIR"
