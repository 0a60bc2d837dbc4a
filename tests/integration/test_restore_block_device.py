"""restore --to a block device: a loop device over a file stands in for a disk.

Zero ranges must become zeros on the device (BLKZEROOUT, or written zeros where the
device cannot), data must land at its offsets, and nothing past the device's end.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.cli_util import MiB, agent, agent_from_file, describe
from tests.integration.conftest import make_image, qemu_img_compare

pytestmark = [pytest.mark.integration, pytest.mark.root("loop devices (losetup)")]


@pytest.fixture
def loop_device(short_tmp: Path) -> Iterator[tuple[str, Path]]:
    """A loop device over a 16 MiB file filled with 0xff; detached at teardown."""
    backing = short_tmp / "loop.img"
    backing.write_bytes(b"\xff" * (16 * MiB))
    dev = subprocess.run(["losetup", "--find", "--show", str(backing)], check=True,
                         capture_output=True, text=True).stdout.strip()
    try:
        yield dev, backing
    finally:
        subprocess.run(["losetup", "--detach", dev], check=True)


@pytest.mark.slow
def test_restore_into_block_device(short_tmp: Path, loop_device: tuple[str, Path]) -> None:
    dev, backing = loop_device
    src = make_image(short_tmp / "src.raw", "raw", 16 * MiB, [
        ("write", 0x5A, 0, 3 * MiB),
        ("zero", 3 * MiB, 5 * MiB),
        ("write", 0xC3, 9 * MiB + 4096, 65536),
    ])
    arc = short_tmp / "a.arc"
    made = agent("backup", "--image", f"vda={src}", "-o", arc)
    assert made.returncode == 0, describe(made)

    done = agent_from_file(arc, "restore", "-", "--device", "vda", "--to", dev)
    assert done.returncode == 0, describe(done)
    subprocess.run(["sync"], check=True)
    # Every 0xff byte outside the data must have become zero, through the device.
    assert qemu_img_compare(src, "raw", backing, "raw", strict=True)


def test_block_device_too_small(short_tmp: Path, loop_device: tuple[str, Path]) -> None:
    dev, backing = loop_device
    src = make_image(short_tmp / "big.raw", "raw", 32 * MiB, [("write", 0x11, 0, MiB)])
    arc = short_tmp / "b.arc"
    assert agent("backup", "--image", f"vda={src}", "-o", arc).returncode == 0
    done = agent("restore", arc, "--device", "vda", "--to", dev)
    assert done.returncode == 1, describe(done)
    assert "needs" in done.stderr.decode()
    assert backing.read_bytes() == b"\xff" * (16 * MiB)  # untouched
