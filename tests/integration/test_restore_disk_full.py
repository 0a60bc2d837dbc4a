"""A file system that fills up under a restore or a backup: exit 1, one line naming the file
the user asked for (never the agent's own qemu-nbd socket), and no file left behind, whole
or temporary.

The full file system is a 2 MiB tmpfs mounted for each test (root only) and unmounted at
teardown whatever happened.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.archive.format import Compression
from agent.archive.writer import ArchiveWriter
from tests.integration.cli_util import (
    MiB,
    agent,
    agent_from_file,
    assert_error,
    partials_of,
    write_random,
)
from tests.unit.archive_util import write_archive

pytestmark = [pytest.mark.integration, pytest.mark.root("mounts a tmpfs")]

SMALL_FS = 2 * MiB
DISK = 8 * MiB  # four times what fits
NOSPACE = os.strerror(28)  # ENOSPC: "No space left on device"


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """An empty 2 MiB tmpfs, unmounted at teardown."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SMALL_FS},mode=0755", "tmpfs",
                    str(mnt)], check=True, capture_output=True)
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], check=False).returncode != 0:
            # Something still holds a file there (a failed test): never leave it mounted.
            subprocess.run(["umount", "--lazy", str(mnt)], check=True)


def _files(directory: Path) -> list[str]:
    """Everything in ``directory``, hidden temporary files too ([] if it does not exist)."""
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    """An archive of one device, vda, with DISK bytes of random data (it does not fit)."""
    data = os.urandom(MiB)

    def build(w: ArchiveWriter) -> None:
        w.add_device("vda", DISK)
        for off in range(0, DISK, MiB):
            w.write_data(0, off, MiB, Compression.NONE, data)

    arc = tmp_path / "a.arc"
    arc.write_bytes(write_archive(build))
    return arc


@pytest.mark.parametrize("via", ["file", "pipe"])
def test_restore_raw_onto_a_full_file_system(small_fs: Path, archive: Path, via: str) -> None:
    out = small_fs / "out"
    args = ("restore", "-" if via == "pipe" else archive, "--to-dir", out)
    proc = agent_from_file(archive, *args) if via == "pipe" else agent(*args)
    msg = assert_error(proc, f"{out / 'vda.raw'} (device 'vda')", NOSPACE)
    assert "internal error" not in msg
    assert _files(out) == []


def test_restore_qcow2_onto_a_full_file_system(small_fs: Path, archive: Path) -> None:
    out = small_fs / "out"
    proc = agent("restore", archive, "--to-dir", out, "--format", "qcow2")
    msg = assert_error(proc, f"{out / 'vda.qcow2'} (device 'vda')", NOSPACE)
    # The agent's own qemu-nbd serves the new image: its socket is nobody's business.
    assert "socket=" not in msg and "ba-nbd-" not in msg, msg
    assert _files(out) == []


def test_restore_into_a_file_on_a_full_file_system(small_fs: Path, archive: Path) -> None:
    target = small_fs / "t.raw"
    with open(target, "wb") as f:
        f.truncate(DISK)  # sparse: it fits until the restore fills it
    proc = agent("restore", archive, "--device", "vda", "--to", target)
    assert_error(proc, NOSPACE, f"{target} was partly written and is not a complete restore")


def test_backup_onto_a_full_file_system(small_fs: Path, tmp_path: Path) -> None:
    disk = write_random(tmp_path / "d.raw", DISK)
    arc = small_fs / "a.arc"
    proc = agent("backup", "--image", f"vda={disk}", "--compress", "none", "-o", arc)
    msg = assert_error(proc, NOSPACE)
    assert "internal error" not in msg
    assert not arc.exists() and partials_of(arc) == []
    assert _files(small_fs) == []
