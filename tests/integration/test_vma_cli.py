"""VMA through the command line: ours -> VMA -> ours byte for byte, from pipes, with real
qemu-nbd serving the images; what VMA cannot do refused in one line; a damaged VMA leaves
nothing behind."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.integration.cli_util import (
    AGENT,
    TIMEOUT,
    MiB,
    agent,
    agent_from_file,
    assert_error,
    assert_ok,
    assert_usage_error,
    info_json,
)
from tests.integration.conftest import make_image

pytestmark = pytest.mark.integration

CONF = b"boot: order=scsi0\nmemory: 512\nscsi0: local-lvm:vm-100-disk-0,size=3M\n"


def backup_into_restore(backup: list[str], restore: list[str]) -> None:
    """``backup-agent BACKUP -o - | backup-agent RESTORE -``: a real pipe between them."""
    b = subprocess.Popen([AGENT, *backup, "-o", "-", "-q"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    try:
        assert b.stdout is not None
        r = subprocess.run([AGENT, "restore", "-", *restore, "-q"], stdin=b.stdout,
                           capture_output=True, timeout=TIMEOUT, check=False)
        b.stdout.close()
        b.wait(timeout=TIMEOUT)
    finally:
        if b.poll() is None:
            b.kill()
            b.wait()
    assert b.returncode == 0, b.stderr.read().decode() if b.stderr else ""
    assert_ok(r)


@pytest.fixture
def disks(tmp_path: Path) -> dict[str, Path]:
    """Two disks: a raw one of an odd size (whole sectors, as qemu-nbd serves them) with
    data across cluster edges and a hole; a qcow2 one with scattered writes."""
    a = make_image(tmp_path / "a.raw", "raw", 3 * MiB + 7 * 512, [
        ("write", 0x11, 0, 4096), ("write", 0x22, 65536 - 512, 1024),
        ("write", 0x33, 2 * MiB + 4096 * 3, 3 * 4096), ("write", 0x44, 3 * MiB, 7 * 512)])
    b = make_image(tmp_path / "b.qcow2", "qcow2", 2 * MiB, [
        ("write", 0x55, 64 * 1024 * 5 + 4096, 4096), ("write", 0x66, MiB, 300 * 1024)])
    return {"drive-scsi0": a, "drive-virtio1": b}


@pytest.mark.slow
def test_ours_to_vma_to_ours_byte_for_byte(tmp_path: Path, disks: dict[str, Path]) -> None:
    conf = tmp_path / "qemu-server.conf"
    conf.write_bytes(CONF)
    images = [x for n, p in disks.items() for x in ("--image", f"{n}={p}")]
    configs = ["--config", f"qemu-server.conf={conf}"]
    first = tmp_path / "first"
    # ours -> files
    assert_ok(agent("backup", *images, *configs, "-o", tmp_path / "native.arc", "-q"))
    assert_ok(agent("restore", tmp_path / "native.arc", "--to-dir", first, "-q"))
    # files -> VMA, through a pipe into a restore; and a VMA file for the other checks
    as_raw = [x for n in disks for x in ("--image", f"{n}={first / (n + '.raw')}")]
    backup_into_restore(["backup", *as_raw, *configs, "--format", "vma"],
                        ["--to-dir", str(tmp_path / "from-vma")])
    vma = tmp_path / "vm.vma"
    assert_ok(agent("backup", *as_raw, *configs, "--format", "vma", "-o", vma, "-q"))
    # VMA (from a pipe) -> ours -> files
    backup_into_restore(["backup", *[x for n in disks for x in
                                     ("--image", f"{n}={tmp_path / 'from-vma' / (n + '.raw')}")],
                         *configs], ["--to-dir", str(tmp_path / "last")])
    for name in disks:
        want = (first / f"{name}.raw").read_bytes()
        assert (tmp_path / "from-vma" / f"{name}.raw").read_bytes() == want
        assert (tmp_path / "last" / f"{name}.raw").read_bytes() == want
    # the restore is sparse: zero clusters and zero blocks are never written
    restored = tmp_path / "from-vma" / "drive-virtio1.raw"
    assert restored.stat().st_blocks * 512 <= 400 * 1024
    # reading commands on the VMA, from a file and from a pipe
    info = info_json(vma)
    assert info["format"] == "vma"
    assert [(d["name"], d["size"]) for d in info["devices"]] == [
        (n, (first / f"{n}.raw").stat().st_size) for n in disks]
    assert [c["name"] for c in info["configs"]] == ["qemu-server.conf"]
    piped = agent_from_file(vma, "info", "-", "--json")
    assert_ok(piped)
    assert b'"format": "vma"' in piped.stdout
    got = agent_from_file(vma, "config", "-", "qemu-server.conf")
    assert_ok(got)
    assert got.stdout == CONF
    assert_ok(agent_from_file(vma, "verify", "-", "-q"))


def test_vma_refusals(tmp_path: Path, disks: dict[str, Path]) -> None:
    proc = agent("backup", "--image", f"a={disks['drive-scsi0']}", "--format", "vma",
                 "--compress", "zstd", "-o", tmp_path / "x.vma")
    assert_usage_error(proc, "--compress", "vma")
    assert not list(tmp_path.glob("*x.vma*"))
    proc = agent("backup", "--image", "vmstate=" + str(disks["drive-scsi0"]), "--format",
                 "vma", "-o", tmp_path / "y.vma")
    assert_error(proc, "reserved")
    assert not list(tmp_path.glob("*y.vma*"))


def test_damaged_vma_leaves_nothing_behind(tmp_path: Path, disks: dict[str, Path]) -> None:
    vma = tmp_path / "vm.vma"
    assert_ok(agent("backup", "--image", f"drive-scsi0={disks['drive-scsi0']}", "--format",
                    "vma", "-o", vma, "-q"))
    whole = vma.read_bytes()
    cut = tmp_path / "cut.vma"
    cut.write_bytes(whole[: len(whole) - 5000])
    out = tmp_path / "out"
    assert_error(agent_from_file(cut, "restore", "-", "--to-dir", out), "truncated")
    assert not out.exists() or not list(out.iterdir())
    assert_error(agent("verify", cut), "truncated")
    assert_error(agent("serve", vma, "--socket", tmp_path / "s"), "VMA", "restore it first")


def test_restore_vma_into_an_existing_file_zeroes_what_the_masks_leave_out(
        tmp_path: Path, disks: dict[str, Path]) -> None:
    """--to an existing target full of old data: zero clusters and left-out 4 KiB blocks
    must read as zeros afterwards (written as zeros there, never skipped)."""
    vma = tmp_path / "vm.vma"
    assert_ok(agent("backup", "--image", f"drive-scsi0={disks['drive-scsi0']}", "--format",
                    "vma", "-o", vma, "-q"))
    target = tmp_path / "old.raw"
    size = disks["drive-scsi0"].stat().st_size
    target.write_bytes(b"\xee" * size)
    assert_ok(agent_from_file(vma, "restore", "-", "--device", "drive-scsi0", "--to", target,
                              "-q"))
    assert target.read_bytes() == disks["drive-scsi0"].read_bytes()
