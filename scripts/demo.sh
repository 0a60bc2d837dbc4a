#!/usr/bin/env bash
# End-to-end demo of backup-agent, run by `make demo` (which runs scripts/setup.sh first).
#
# Makes two sample disk images (a sparse qcow2 and a raw file) and a config file, backs them
# up into one archive written through a pipe, shows and verifies the archive, restores it
# read from a pipe, and checks that the restored disks and config are identical to the
# originals. Exits non-zero as soon as anything fails.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

OUT=demo-out
AGENT=.venv/bin/backup-agent
LOG=$OUT/demo.log

current_step="starting"
step() {
    current_step=$1
    printf '\n==> %s\n' "$1"
}
# Run a command with its output kept in $LOG; show that output only if it fails.
quietly() {
    if ! "$@" >>"$LOG" 2>&1; then
        echo "demo: command failed: $*" >&2
        tail -n 20 "$LOG" >&2
        return 1
    fi
}
on_exit() {
    local rc=$?
    if ((rc != 0)); then
        printf '\ndemo: FAILED (exit %d) during: %s\n' "$rc" "$current_step" >&2
    fi
}
trap on_exit EXIT

size() { numfmt --to=iec-i --suffix=B "$(stat -c %s "$1")"; }                # apparent size
used() { numfmt --to=iec-i --suffix=B "$(($(stat -c %b "$1") * $(stat -c %B "$1")))"; } # on disk

if [[ ! -x $AGENT ]]; then
    echo "demo: $AGENT not found: run 'make demo' (it sets up .venv first)" >&2
    exit 1
fi
for tool in qemu-img qemu-io; do
    command -v "$tool" >/dev/null || { echo "demo: $tool not found: run 'make setup'" >&2; exit 1; }
done

# ---------------------------------------------------------------------------------------
step "Preparing $OUT/ with sample disks and a config file"
rm -rf "$OUT"
mkdir -p "$OUT"
: >"$LOG"

# disk0: 256 MiB qcow2 with a few patterns, an explicit zeroed range, and holes elsewhere.
quietly qemu-img create -f qcow2 "$OUT/disk0.qcow2" 256M
quietly qemu-io -f qcow2 \
    -c 'write -P 0xab 0 8M' \
    -c 'write -z 50M 10M' \
    -c 'write -P 0x5a 100M 4M' \
    -c 'write -P 0xcd 200M 64k' \
    -c 'write -P 0x11 255M 1M' \
    "$OUT/disk0.qcow2"

# disk1: 64 MiB raw (sparse) with a pattern and 2 MiB of incompressible data.
quietly qemu-img create -f raw "$OUT/disk1.raw" 64M
quietly qemu-io -f raw -c 'write -P 0x42 1M 3M' -c 'write -P 0xff 60M 512k' "$OUT/disk1.raw"
head -c 2M /dev/urandom | dd of="$OUT/disk1.raw" bs=1M seek=20 conv=notrunc status=none

cat >"$OUT/vm.conf" <<'EOF'
# Sample VM configuration (made up for the demo; stored in the archive as-is)
name: demo-vm
memory: 2048
cores: 2
disk0: disk0.qcow2,virtio,256M
disk1: disk1.raw,virtio,64M
net0: virtio,bridge=br0
EOF

echo "disk0.qcow2: virtual 256MiB, qcow2 file $(size "$OUT/disk0.qcow2")"
echo "disk1.raw:   virtual $(size "$OUT/disk1.raw"), allocated $(used "$OUT/disk1.raw")"
echo "vm.conf:     $(size "$OUT/vm.conf")"

# ---------------------------------------------------------------------------------------
step "Backing up disk0, disk1 and vm.conf; the archive goes to stdout, through a pipe"
set -o pipefail   # (already on above) a failing backup must fail the pipeline, not just cat
"$AGENT" backup \
    --image disk0="$OUT/disk0.qcow2" \
    --image disk1="$OUT/disk1.raw" \
    --config vm.conf="$OUT/vm.conf" \
    -o - | cat >"$OUT/vm.arc"
echo "archive $OUT/vm.arc: $(size "$OUT/vm.arc")"

# ---------------------------------------------------------------------------------------
step "Archive contents (backup-agent info)"
"$AGENT" info "$OUT/vm.arc"

# ---------------------------------------------------------------------------------------
step "Verifying every record digest (backup-agent verify)"
"$AGENT" verify "$OUT/vm.arc"

# ---------------------------------------------------------------------------------------
step "Restoring all disks, reading the archive from a pipe"
# shellcheck disable=SC2002  # the pipe is the point: restore must not need a seekable file
cat "$OUT/vm.arc" | "$AGENT" restore - --to-dir "$OUT/restored"
for f in "$OUT"/restored/*; do
    echo "$(basename "$f"): size $(size "$f"), allocated $(used "$f")"
done

# ---------------------------------------------------------------------------------------
step "Comparing restored disks with the originals (qemu-img compare)"
qemu-img compare -f qcow2 -F raw "$OUT/disk0.qcow2" "$OUT/restored/disk0.raw"
qemu-img compare -f raw -F raw "$OUT/disk1.raw" "$OUT/restored/disk1.raw"

# ---------------------------------------------------------------------------------------
step "Comparing the config stored in the archive with the original"
"$AGENT" config "$OUT/vm.arc" vm.conf | cmp - "$OUT/vm.conf"
echo "vm.conf is identical"

current_step="summary"
cat <<EOF

==> Summary
  sources:  disk0 (qcow2, 256MiB virtual), disk1 (raw, 64MiB), vm.conf
  archive:  $OUT/vm.arc, $(size "$OUT/vm.arc"), written and read back through pipes
  verify:   ok
  restore:  $OUT/restored/ (disk0.raw $(used "$OUT/restored/disk0.raw") allocated, disk1.raw $(used "$OUT/restored/disk1.raw") allocated)
  result:   restored disks are identical; vm.conf is identical
EOF
