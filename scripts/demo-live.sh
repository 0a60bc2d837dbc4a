#!/usr/bin/env bash
# Live backup demo, run by `make demo` after scripts/demo.sh (setup runs first).
#
# Boots a throwaway VM (the tiny test guest from scripts/build-guest.sh, under TCG) with a
# 128 MiB qcow2 disk "vda". Its guest writes numbered 64 KiB blocks to the disk, in order,
# each on the disk before the next starts. While it writes, backup-agent backs the running
# VM up through its own QMP monitor, the archive going through a pipe (as ssh would carry
# it); then the archive is restored from a pipe and checked: the restored disk must be the
# disk at one point in time, i.e. blocks 0..k-1 new and everything from block k on as before
# the guest started. An incremental backup follows at once (the guest still writing), and
# the chain full + incremental must restore to a later point in time. The VM is stopped by its pid on every way out. Exits non-zero as soon as
# anything fails.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

OUT=demo-out
DIR=$PWD/$OUT/live            # absolute: QEMU gets file and socket paths from it
AGENT=.venv/bin/backup-agent
PY=.venv/bin/python
LOG=$DIR/demo.log
GUEST=.cache/guest
BS=65536                       # one block of the guest's sequence (= the copy cluster size)
BLOCKS=1536                    # 96 MiB of the 128 MiB disk; the rest must stay as it was
LEAD=100                       # blocks the guest writes before the backup starts

current_step="starting"
step() {
    current_step=$1
    printf '\n==> %s\n' "$1"
}
quietly() {
    if ! "$@" >>"$LOG" 2>&1; then
        echo "demo-live: command failed: $*" >&2
        tail -n 20 "$LOG" >&2
        return 1
    fi
}
die() {
    echo "demo-live: $*" >&2
    exit 1
}

qemu_pid=""
stop_vm() {
    [[ -n $qemu_pid ]] || return 0
    if kill -0 "$qemu_pid" 2>/dev/null; then
        kill -TERM "$qemu_pid" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$qemu_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$qemu_pid" 2>/dev/null || true
    fi
    wait "$qemu_pid" 2>/dev/null || true
    qemu_pid=""
}
on_exit() {
    local rc=$?
    stop_vm
    if ((rc != 0)); then
        printf '\ndemo-live: FAILED (exit %d) during: %s\n' "$rc" "$current_step" >&2
        if [[ -s $DIR/console.log ]]; then
            echo "demo-live: last lines of the guest console:" >&2
            tail -n 5 "$DIR/console.log" >&2
        fi
    fi
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The highest block the guest has reported written (-1: none yet).
last_block() {
    local n
    n=$(grep -o 'BA-GUEST: seq block=[0-9]*' "$DIR/console.log" 2>/dev/null | tail -n 1) || true
    if [[ -n $n ]]; then echo "${n##*=}"; else echo -1; fi
}
# Wait until the guest console shows $1 (a fixed string), failing if QEMU exits first.
wait_console() {
    local what=$1 limit=$2 waited=0
    until grep -qF -- "$what" "$DIR/console.log" 2>/dev/null; do
        if ! kill -0 "$qemu_pid" 2>/dev/null; then
            grep -qF -- "$what" "$DIR/console.log" 2>/dev/null && return 0
            die "the VM exited before its console showed '$what' (see $DIR/qemu.log)"
        fi
        ((waited++ < limit * 10)) || die "no '$what' on the guest console within ${limit}s"
        sleep 0.1
    done
}

[[ -x $AGENT ]] || die "$AGENT not found: run 'make demo' (it sets up .venv first)"
for tool in qemu-system-x86_64 qemu-img qemu-io base64; do
    command -v "$tool" >/dev/null || die "$tool not found: run 'make setup'"
done

# ---------------------------------------------------------------------------------------
step "Building the tiny guest (scripts/build-guest.sh; downloads a kernel the first time)"
rm -rf "$DIR" "$OUT/live.arc" "$OUT/live-inc.arc"
mkdir -p "$DIR"
: >"$LOG"
quietly bash scripts/build-guest.sh "$GUEST"
echo "guest: $GUEST/vmlinuz, kernel $(cat "$GUEST/kernel-version")"

# ---------------------------------------------------------------------------------------
step "Making the VM's disk: 128 MiB qcow2, full of old data where the guest will write"
quietly qemu-img create -f qcow2 "$DIR/vda.qcow2" 128M
quietly qemu-io -f qcow2 -c 'write -P 0x11 0 96M' -c 'write -P 0x5a 120M 4M' "$DIR/vda.qcow2"
quietly qemu-img convert -f qcow2 -O raw "$DIR/vda.qcow2" "$DIR/before.raw"
echo "vda.qcow2: 0x11 over 0..96MiB, 0x5a over 120..124MiB, the rest unallocated"
echo "(a raw copy of it, $OUT/live/before.raw, is what 'old' means in the check below)"

# The guest's job (busybox sh, run by its /init from ba.cmd64): write blocks 0..BLOCKS-1 in
# order, each synced before the next; every 512-byte sector of block i reads "BA-SEQ block i".
writer=$(cat <<EOF
n=$BLOCKS
i=0
while [ \$i -lt \$n ]; do
    awk -v i=\$i 'BEGIN { s = sprintf("%-511s\n", "BA-SEQ block " i);
                         for (j = 0; j < 128; j++) printf "%s", s }' >/tmp/blk \\
        || { echo "BA-GUEST: error: cannot make block \$i"; exit 1; }
    if ! dd if=/tmp/blk of=/dev/vda bs=$BS seek=\$i count=1 conv=notrunc,fsync 2>/tmp/dd.err
    then
        echo "BA-GUEST: error: dd of block \$i failed: \$(cat /tmp/dd.err)"; exit 1
    fi
    echo "BA-GUEST: seq block=\$i"
    i=\$((i + 1))
done
if dmesg | grep -i 'i/o error'; then echo "BA-GUEST: error: I/O error in the kernel log"; exit 1; fi
echo "BA-GUEST: seq done blocks=\$n, no I/O error"
EOF
)

# ---------------------------------------------------------------------------------------
step "Booting the VM (TCG); its guest writes blocks 0..$((BLOCKS - 1)) to /dev/vda"
# Two QMP monitors, as on a managed host: one for the manager (libvirt...), one for the agent.
qemu-system-x86_64 -accel tcg -nodefaults -display none -m 256M -name demo-live -no-reboot \
    -kernel "$GUEST/vmlinuz" -initrd "$GUEST/initrd.img" \
    -append "console=ttyS0 panic=-1 quiet ba.cmd64=$(printf '%s' "$writer" | base64 -w0)" \
    -serial "file:$DIR/console.log" \
    -qmp "unix:$DIR/manager.qmp,server=on,wait=off" \
    -qmp "unix:$DIR/agent.qmp,server=on,wait=off" \
    -blockdev "driver=file,node-name=vda-file,filename=$DIR/vda.qcow2" \
    -blockdev "driver=qcow2,node-name=vda-fmt,file=vda-file" \
    -device "virtio-blk-pci,drive=vda-fmt,id=vda" \
    </dev/null >"$DIR/qemu.log" 2>&1 &
qemu_pid=$!
echo "qemu-system-x86_64 pid $qemu_pid; agent's monitor $OUT/live/agent.qmp"
wait_console "BA-GUEST: ready" 60
wait_console "BA-GUEST: seq block=$LEAD" 60
echo "guest is up and writing: block $(last_block) done"

# ---------------------------------------------------------------------------------------
step "Backing up the running VM through a pipe while its guest writes"
before_backup=$(last_block)
started=$EPOCHREALTIME
# Small requests on one connection: the sweep takes long enough to race many guest writes.
"$AGENT" backup --qmp "$DIR/agent.qmp" --request-size 64K --connections 1 -o - \
    2>"$DIR/backup.err" | cat >"$OUT/live.arc" \
    || { cat "$DIR/backup.err" >&2; die "the backup failed"; }
after_backup=$(last_block)
sed 's/^/  agent: /' "$DIR/backup.err"
copied=$(sed -n 's/.*guest writes: \([0-9]*\) cluster(s) copied before write.*/\1/p' \
    "$DIR/backup.err")
[[ -n $copied ]] || die "the agent printed no 'guest writes:' summary"
printf 'backup took %.1fs; the guest had written block %d when it started, %d when it ended\n' \
    "$(awk "BEGIN { print $EPOCHREALTIME - $started }")" \
    "$before_backup" "$after_backup"
echo "$copied cluster(s) of 64KiB were copied out of the guest's way before it overwrote them"
((after_backup > before_backup)) || die "the guest wrote nothing during the backup"

# ---------------------------------------------------------------------------------------
step "An incremental backup right after it, the guest still writing"
# The full backup started a checkpoint (a persistent dirty bitmap in vda.qcow2): this one
# copies only the clusters the guest wrote since, and its archive names the full as parent.
before_inc=$(last_block)
"$AGENT" backup --qmp "$DIR/agent.qmp" --mode incremental -o - \
    2>"$DIR/backup-inc.err" | cat >"$OUT/live-inc.arc" \
    || { cat "$DIR/backup-inc.err" >&2; die "the incremental backup failed"; }
after_inc=$(last_block)
sed 's/^/  agent: /' "$DIR/backup-inc.err"
echo "the guest had written block $before_inc when it started, $after_inc when it ended"

# ---------------------------------------------------------------------------------------
step "Letting the guest finish its $BLOCKS blocks (it powers the VM off)"
wait_console "BA-GUEST: poweroff" 120
grep -q "BA-GUEST: error" "$DIR/console.log" && die "the guest reported an error"
grep -qF "BA-GUEST: seq done blocks=$BLOCKS, no I/O error" "$DIR/console.log" \
    || die "the guest did not finish its sequence"
grep -F "BA-GUEST: seq done" "$DIR/console.log" | sed 's/^/  guest: /'
for _ in $(seq 100); do kill -0 "$qemu_pid" 2>/dev/null || break; sleep 0.1; done
wait "$qemu_pid" || die "QEMU exited with status $?"
qemu_pid=""
echo "the VM powered off; every guest write succeeded"

# ---------------------------------------------------------------------------------------
step "Archive contents (backup-agent info)"
"$AGENT" info "$OUT/live.arc"
echo
"$AGENT" info "$OUT/live-inc.arc"

# ---------------------------------------------------------------------------------------
step "Restoring from a pipe"
# shellcheck disable=SC2002  # the pipe is the point: restore must not need a seekable file
cat "$OUT/live.arc" | "$AGENT" restore - --to-dir "$DIR/restored"
ls -ls "$DIR/restored"

# ---------------------------------------------------------------------------------------
step "Is the restored disk the disk at one point in time?"
verdict=$("$PY" scripts/check_prefix.py "$DIR/restored/vda.raw" "$DIR/before.raw" \
    --blocks "$BLOCKS" --block-size "$BS") || { echo "$verdict"; die "the restored disk is not"; }
echo "restored disk: $verdict"
k=$(sed -n 's/.*consistent at block \([0-9]*\) of.*/\1/p' <<<"$verdict")
((k > before_backup && k <= after_backup + 1)) \
    || die "block $k is outside the backup's window ($before_backup..$after_backup)"
((k > 0 && k < BLOCKS)) || die "the backup did not fall inside the guest's writes"
quietly qemu-img convert -f qcow2 -O raw "$DIR/vda.qcow2" "$DIR/after.raw"
final=$("$PY" scripts/check_prefix.py "$DIR/after.raw" "$DIR/before.raw" \
    --blocks "$BLOCKS" --block-size "$BS" --expect "$BLOCKS") \
    || { echo "$final"; die "the VM's own disk lacks some of the guest's writes"; }
echo "VM's disk now: $final"

# ---------------------------------------------------------------------------------------
step "Restoring the chain (the full backup from a pipe, then the incremental)"
# shellcheck disable=SC2002
cat "$OUT/live.arc" | "$AGENT" restore - "$OUT/live-inc.arc" --to-dir "$DIR/restored-chain"
verdict2=$("$PY" scripts/check_prefix.py "$DIR/restored-chain/vda.raw" "$DIR/before.raw" \
    --blocks "$BLOCKS" --block-size "$BS") \
    || { echo "$verdict2"; die "the restored chain is not the disk at one point in time"; }
echo "restored chain: $verdict2"
k2=$(sed -n 's/.*consistent at block \([0-9]*\) of.*/\1/p' <<<"$verdict2")
((k2 > before_inc && k2 <= after_inc + 1)) \
    || die "block $k2 is outside the incremental's window ($before_inc..$after_inc)"
inc_size=$(stat -c %s "$OUT/live-inc.arc")
full_size=$(stat -c %s "$OUT/live.arc")

current_step="summary"
cat <<EOF

==> Summary
  VM:       TCG guest writing $BLOCKS numbered 64KiB blocks in order to a 128MiB qcow2 disk
  backup:   live, through the agent's own QMP monitor, archive through a pipe:
            $OUT/live.arc, $(numfmt --to=iec-i --suffix=B "$(stat -c %s "$OUT/live.arc")")
  during:   the guest wrote blocks $((before_backup + 1))..$after_backup while the backup ran;
            $copied cluster(s) copied before being overwritten
  restore:  from a pipe, $OUT/live/restored/vda.raw
  result:   the restored disk is exactly the disk at the backup's point in time: blocks
            0..$((k - 1)) new, $k.. as before (consistent at block $k of $BLOCKS); the VM's
            own disk holds all $BLOCKS blocks
  chain:    an incremental right after, $OUT/live-inc.arc, holds only what the guest
            wrote since ($(numfmt --to=iec-i --suffix=B "$inc_size"); the full: $(numfmt --to=iec-i --suffix=B "$full_size")); full + incremental
            restore to the disk at the incremental's point in time (consistent at block $k2)
EOF
