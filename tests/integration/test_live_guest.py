"""Live backup of a VM whose guest OS writes to its disk the whole time (backup --qmp).

The tiny test guest (scripts/build-guest.sh) boots under TCG and writes a sequence of
numbered 64 KiB blocks to /dev/vda, in order, each one on the disk (``dd conv=fsync``) before
the next starts; every 512-byte sector of block ``i`` says ``BA-SEQ block i``. The disk starts
full of an "old" byte. A backup taken while the guest writes must be the disk at one point in
time, so the restored disk must be a *prefix state* of the sequence: for some ``k``, blocks
``0..k-1`` new, blocks ``k..`` old, and nothing else (no torn block, no later block without an
earlier one, nothing beyond the sequence touched).
"""

from __future__ import annotations

import base64
import re
import subprocess
import threading
from pathlib import Path

import pytest

from tests.integration.cli_util import AGENT, agent_from_file, describe, running
from tests.integration.conftest import make_image
from tests.integration.vm import Disk, Guest, Vm, VmFactory

pytestmark = [pytest.mark.integration, pytest.mark.qemu]  # qemu: run on QEMU 10 too

KiB = 1024
MiB = 1024 * KiB

BS = 64 * KiB  # one block of the sequence: the copy-before-write cluster size
DISK_SIZE = 64 * MiB
BLOCKS = 768  # the sequence covers the first 48 MiB; the last 16 MiB must stay old
OLD = 0x11
#: Blocks the guest must have written before the backup starts (so k > 0 for sure).
LEAD = 30
#: Blocks the guest writes while the backup's output is held (the snapshot exists, the sweep
#: is stalled on the pipe): these writes must be copied before they land.
DURING = 150

# The guest's writer (busybox sh, run by /init from ba.cmd64). It stops at the first failed
# dd, says so, and ends with a marker only when every block and the kernel log are clean.
GUEST_WRITER = r"""
n=%(blocks)d
i=0
while [ $i -lt $n ]; do
    awk -v i=$i 'BEGIN { s = sprintf("%%-511s\n", "BA-SEQ block " i);
                         for (j = 0; j < 128; j++) printf "%%s", s }' >/tmp/blk \
        || { echo "BA-GUEST: error: cannot make block $i"; exit 1; }
    if ! dd if=/tmp/blk of=/dev/vda bs=%(bs)d seek=$i count=1 conv=notrunc,fsync 2>/tmp/dd.err
    then
        echo "BA-GUEST: error: dd of block $i failed: $(cat /tmp/dd.err)"; exit 1
    fi
    echo "BA-GUEST: seq block=$i"
    i=$((i + 1))
done
if dmesg | grep -i 'i/o error'; then echo "BA-GUEST: error: I/O error in the kernel log"; exit 1; fi
echo "BA-GUEST: seq done blocks=$n, no I/O error"
"""


def new_block(i: int) -> bytes:
    """What the guest writes as block ``i``."""
    return (f"BA-SEQ block {i}".ljust(511) + "\n").encode() * (BS // 512)


OLD_BLOCK = bytes([OLD]) * BS


def prefix_state(data: bytes, blocks: int) -> int:
    """The ``k`` for which ``data`` is blocks 0..k-1 new and the rest old; AssertionError
    (saying which block is wrong) when it is no prefix state of the sequence."""
    assert len(data) == DISK_SIZE, f"restored disk has {len(data)} bytes, not {DISK_SIZE}"
    k = 0
    while k < blocks and data[k * BS:(k + 1) * BS] == new_block(k):
        k += 1
    for i in range(k, DISK_SIZE // BS):
        got = data[i * BS:(i + 1) * BS]
        if got != OLD_BLOCK:
            head = got[:24]
            raise AssertionError(f"not a prefix state: blocks 0..{k - 1} are new, but block {i} "
                                 f"is neither old nor (if {i} == {k}) new: starts {head!r}")
    return k


def last_block(console: str) -> int:
    """The highest block the guest has reported written (-1: none yet)."""
    found = re.findall(r"BA-GUEST: seq block=(\d+)", console)
    return int(found[-1]) if found else -1


def wait_block(vm: Vm, block: int, timeout: float = 60.0) -> None:
    vm.wait_serial(f"BA-GUEST: seq block={block}\n", timeout=timeout)




@pytest.mark.timeout(900)  # the first run builds the guest: a 27 MB download
@pytest.mark.slow
def test_backup_while_the_guest_writes_restores_a_prefix_state(
    vms: VmFactory, guest: Guest, tmp_path: Path, short_tmp: Path
) -> None:
    disk = make_image(tmp_path / "vda.raw", "raw", DISK_SIZE, [("write", OLD, 0, DISK_SIZE)])
    script = GUEST_WRITER % {"blocks": BLOCKS, "bs": BS}
    b64 = base64.b64encode(script.encode()).decode()
    vm = vms.start([Disk(disk, "raw", "vda")],
                   guest=Guest(guest.kernel, guest.initrd, f"ba.cmd64={b64}"))
    vm.wait_serial(f"BA-GUEST: ready vda={DISK_SIZE}", timeout=60)
    wait_block(vm, LEAD)

    written_before = last_block(vm.serial_text())  # these blocks precede the snapshot
    with running(
        [AGENT, "backup", "--qmp", str(vm.agent_qmp), "-o", "-", "--compress", "none",
         "--request-size", "64K", "--connections", "1", "--memory", "4M", "--progress", "none"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        # The archive's first bytes come after the snapshot exists. Then hold the pipe: the
        # sweep stalls a few MiB in while the guest writes on, ahead of it.
        head = proc.stdout.read(4096)
        assert head.startswith(b"\x89BAGENT\n"), proc.stderr.read().decode()
        at_head = last_block(vm.serial_text())
        assert at_head + DURING < BLOCKS, "the guest wrote too fast: raise BLOCKS"
        wait_block(vm, at_head + DURING)
        rest: list[bytes] = []
        reader = threading.Thread(target=lambda: rest.append(proc.stdout.read()))  # type: ignore[union-attr]
        reader.start()
        err = proc.stderr.read().decode(errors="replace")
        reader.join(120)
        assert proc.wait(120) == 0, err

    # The guest finishes its sequence without an error and powers off by itself.
    console = vm.wait_serial("BA-GUEST: poweroff", timeout=120)
    assert "BA-GUEST: error" not in console, console
    assert f"BA-GUEST: seq done blocks={BLOCKS}, no I/O error" in console, console
    assert "BA-GUEST: cmd exit 0" in console, console
    assert vm.wait_exit(30) == 0
    # ... and every one of its writes is on the live disk.
    assert prefix_state(disk.read_bytes(), BLOCKS) == BLOCKS

    arc = short_tmp / "live.arc"
    arc.write_bytes(head + rest[0])
    out = short_tmp / "restored"
    done = agent_from_file(arc, "restore", "-", "--to-dir", out)
    assert done.returncode == 0, describe(done)
    k = prefix_state((out / "vda.raw").read_bytes(), BLOCKS)

    # The snapshot came after the blocks reported before the agent started, and before the
    # archive's first byte. The console may lag the guest by a few lines: allow some slack.
    assert written_before + 1 <= k <= at_head + 16, (written_before, k, at_head)
    assert 0 < k < BLOCKS
    found = re.search(r"guest writes: (\d+) cluster\(s\) copied before write", err)
    assert found, err
    copied = int(found.group(1))
    assert copied > 0, err  # the guest's writes really raced the backup
    print(f"consistent at block {k} of {BLOCKS} (guest had reported {written_before} before "
          f"the agent started, {at_head} at its first byte); {copied} cluster(s) copied "
          "before write")
