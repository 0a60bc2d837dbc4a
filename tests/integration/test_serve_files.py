"""Getting files back from a served backup, as docs/SERVE.md says ("Getting files back"):
``serve``, then ``nbdfuse`` turns the export into a file, which ``debugfs`` reads without
mounting, or which mounts read-only on a loop device with journal replay off. The disk is an
ext4 file system made on the host (``mkfs.ext4 -d``), backed up with ``backup --image``."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.integration.cli_util import agent, assert_ok
from tests.integration.test_serve import serving

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.root("FUSE (nbdfuse) and loop mounts")]

HOSTNAME = b"restored-host\n"


def ext4_backup(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_bytes(HOSTNAME)
    (root / "etc" / "motd").write_bytes(b"x" * 300_000)
    disk = tmp_path / "disk.raw"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(root), str(disk), "32M"], check=True)
    arc = tmp_path / "vm.arc"
    assert_ok(agent("backup", "--image", f"vda={disk}", "-o", arc))
    return arc


@contextmanager
def nbdfuse(uri: str, directory: Path) -> Iterator[Path]:
    """``nbdfuse DIR URI`` until the block ends (stopped by its pid: it unmounts itself)."""
    directory.mkdir()
    proc = subprocess.Popen(["nbdfuse", str(directory), uri], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not (directory / "nbd").exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
            assert time.monotonic() < deadline, "nbdfuse made no file"
            time.sleep(0.05)
        yield directory / "nbd"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        if proc.stderr is not None:
            proc.stderr.close()
    mounts = Path("/proc/mounts").read_text()
    assert str(directory) not in mounts


def test_files_are_listed_and_copied_out_without_mounting(tmp_path: Path,
                                                          short_tmp: Path) -> None:
    arc = ext4_backup(tmp_path)
    with serving([arc], short_tmp / "s.sock", devices=1) as s, \
            nbdfuse(s.uri("vda"), short_tmp / "fuse") as image:
        ls = subprocess.run(["debugfs", "-R", "ls -l /etc", str(image)], capture_output=True,
                            text=True, check=True)
        assert "hostname" in ls.stdout and "motd" in ls.stdout
        out = tmp_path / "hostname"
        subprocess.run(["debugfs", "-R", f"dump /etc/hostname {out}", str(image)],
                       capture_output=True, check=True)
        assert out.read_bytes() == HOSTNAME


def test_files_are_copied_out_of_a_read_only_loop_mount(tmp_path: Path,
                                                        short_tmp: Path) -> None:
    arc = ext4_backup(tmp_path)
    mnt = short_tmp / "mnt"
    mnt.mkdir()
    with serving([arc], short_tmp / "s.sock", devices=1) as s, \
            nbdfuse(s.uri("vda"), short_tmp / "fuse") as image:
        subprocess.run(["mount", "-o", "ro,loop,noload", str(image), str(mnt)], check=True)
        try:
            assert sorted(os.listdir(mnt / "etc")) == ["hostname", "motd"]
            assert (mnt / "etc" / "hostname").read_bytes() == HOSTNAME
            assert (mnt / "etc" / "motd").read_bytes() == b"x" * 300_000
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
