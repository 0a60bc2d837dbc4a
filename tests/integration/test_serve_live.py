"""``serve`` of chains made by real live backups (QEMU, dirty bitmaps): full +
incrementals, full + differential + incremental. Each chain served reads back, over NBD,
equal to a model of the disk at the newest backup's point in time (the model receives every
write the test makes through the VM's device, as in test_incremental.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.integration.cli_util import agent, assert_ok
from tests.integration.conftest import make_image
from tests.integration.test_serve import serving
from tests.integration.vm import Disk, VmFactory

pytestmark = [pytest.mark.integration]

KiB = 1024
MiB = 1024 * KiB
SIZE = 24 * MiB


@pytest.mark.parametrize("modes", [("incremental", "incremental"),
                                   ("differential", "incremental")],
                         ids=["full+inc+inc", "full+diff+inc"])
def test_a_live_chain_serves_its_newest_point_in_time(vms: VmFactory, tmp_path: Path,
                                                      short_tmp: Path,
                                                      modes: tuple[str, str]) -> None:
    image = make_image(tmp_path / "vda.qcow2", "qcow2", SIZE, [
        ("write", 0x11, 0, 6 * MiB), ("write", 0x22, 10 * MiB, 4 * MiB)])
    model = bytearray(SIZE)
    model[0 : 6 * MiB] = b"\x11" * (6 * MiB)
    model[10 * MiB : 14 * MiB] = b"\x22" * (4 * MiB)
    vm = vms.start([Disk(image, "qcow2", "vda")])

    def write(pattern: int, offset: int, length: int) -> None:
        vm.guest_write("vda", pattern, offset, length)
        model[offset : offset + length] = bytes([pattern]) * length

    def backup(path: Path, mode: str) -> None:
        assert_ok(agent("backup", "--qmp", vm.agent_qmp, "--mode", mode, "-o", path))

    arcs = [tmp_path / "0-full.arc", tmp_path / f"1-{modes[0]}.arc",
            tmp_path / f"2-{modes[1]}.arc"]
    backup(arcs[0], "full")
    write(0x31, 1 * MiB, 4 * KiB)  # inside data
    write(0x32, 20 * MiB + 100, 200 * KiB)  # unaligned, in a hole
    vm.guest_zero("vda", 11 * MiB, 1 * MiB)  # zeroes over data
    model[11 * MiB : 12 * MiB] = bytes(MiB)
    backup(arcs[1], modes[0])
    write(0x41, 1 * MiB, 64 * KiB)  # the same cluster again
    write(0x42, SIZE - 4 * KiB, 4 * KiB)  # the last cluster
    backup(arcs[2], modes[1])
    want = tmp_path / "want.raw"
    want.write_bytes(model)
    with serving(arcs, short_tmp / "s.sock", devices=1) as s:
        proc = subprocess.run(["qemu-img", "compare", "-f", "raw", str(want), s.uri("vda")],
                              capture_output=True, timeout=120, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    with serving(arcs[:2], short_tmp / "s.sock", devices=1) as s:  # an older point in time
        older = subprocess.run(["qemu-img", "compare", "-f", "raw", str(want), s.uri("vda")],
                               capture_output=True, timeout=120, check=False)
        assert older.returncode == 1  # differs: the last backup's writes are not in it
