"""A live backup of a running QEMU VM written as VMA (backup --qmp --format vma): clusters
copied before guest writes go into the VMA stream in completion order, as VMA was made
for, and the restore is each disk exactly as it was when the backup started."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.cli_util import (
    agent,
    agent_from_file,
    assert_usage_error,
    describe,
)
from tests.integration.conftest import qemu_img_compare
from tests.integration.live_util import backup_racing_guest_writes
from tests.integration.vm import Vm

pytestmark = [pytest.mark.integration, pytest.mark.qemu]

KiB = 1024
MiB = 1024 * KiB


@pytest.mark.slow
def test_live_backup_as_vma_racing_guest_writes(patterned_vm: tuple[Vm, dict[str, Path]],
                                                 short_tmp: Path) -> None:
    vm, before = patterned_vm
    writes = [("vda", 0xA1, 0, 64 * KiB), ("vda", 0xA2, 30 * MiB + 4 * KiB, 4 * KiB),
              ("vda", 0xA3, 40 * MiB, 2 * MiB), ("vdb", 0xB1, 8 * MiB, 4608),
              ("vdb", 0xB2, 4 * MiB, 1 * MiB)]
    data, err = backup_racing_guest_writes(
        vm, ["--format", "vma", "--connections", "1", "--memory", "4M", "--request-size", "1M"],
        b"VMA\0", writes)
    arc = short_tmp / "live.vma"
    arc.write_bytes(data)
    out = short_tmp / "restored"
    done = agent_from_file(arc, "restore", "-", "--to-dir", out)
    assert done.returncode == 0, describe(done)
    assert qemu_img_compare(before["vda"], "qcow2", out / "vda.raw", "raw", strict=False)
    assert qemu_img_compare(before["vdb"], "raw", out / "vdb.raw", "raw", strict=True)
    for dev, pattern, off, length in writes:
        vm.guest_verify(dev, pattern, off, length)
    copied = int(err.split(b"guest writes: ")[1].split(b" ")[0])
    assert copied > 0, err.decode()  # the writes really raced the backup
    vma = pytest.importorskip("dissect.archive.vma")
    with open(arc, "rb") as f:  # an independent reader agrees
        disks = {d.name: d.open().read() for d in vma.VMA(f).devices()}
    assert disks["vdb"] == (out / "vdb.raw").read_bytes()


def test_live_incremental_as_vma_is_refused(patterned_vm: tuple[Vm, dict[str, Path]],
                                            short_tmp: Path) -> None:
    vm, _ = patterned_vm
    made = agent("backup", "--qmp", vm.agent_qmp, "--format", "vma", "--mode",
                 "incremental", "-o", short_tmp / "x.vma")
    assert_usage_error(made, "full")
    assert not (short_tmp / "x.vma").exists()
