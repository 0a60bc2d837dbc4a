"""A restore opens a device's target when its first record arrives, and keeps at most
``RestoreOptions.open_targets`` open (issue 13): an archive of 40,000 devices once opened
40,000 files (or started 40,000 qemu-nbd processes, tests/integration/
test_hostile_many_devices.py) before reading a single record. Counted here: the
descriptors this process has open whenever a target is opened, or opened again."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from agent.archive.format import Device
from agent.errors import ArchiveError, TargetError
from agent.restore import RestoreOptions, restore, to_dir
from agent.targets.base import Sink
from tests.fsprobe import plant
from tests.hostile import builder as hb

SIZE = 512


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class _Counting:
    """A sink factory that notes the open descriptors each time a target opens."""

    def __init__(self, directory: Path, opts: RestoreOptions) -> None:
        self.factory = to_dir(directory, "raw", None, opts)
        self.peak = 0
        self.made = 0
        self.reopened = 0

    def __call__(self, dev: Device) -> Sink | None:
        sink = self.factory(dev)
        self.made += 1
        self.peak = max(self.peak, _fds())
        if sink is not None and sink.reopen is not None:
            reopen = sink.reopen

            def counted() -> object:
                got = reopen()
                self.reopened += 1
                self.peak = max(self.peak, _fds())
                return got

            sink.reopen = counted  # type: ignore[assignment]
        return sink


@pytest.mark.parametrize(("devices", "rounds", "open_targets"), [(2000, 1, 64), (300, 3, 16)])
def test_restore_of_many_devices_opens_only_so_many_files(
        tmp_path: Path, devices: int, rounds: int, open_targets: int) -> None:
    arc = hb.many_devices(devices, size=SIZE, rounds=rounds, empty=3)
    out = tmp_path / "out"
    opts = RestoreOptions(memory=1 << 20, workers=2, open_targets=open_targets)
    sinks = _Counting(out, opts)
    base = _fds()
    result = restore(io.BytesIO(arc), sinks, opts)
    # Each target is a file: a descriptor each, besides the restore's own (the workers'
    # threads hold none; the archive is in memory here).
    assert sinks.peak - base <= open_targets + 4, (base, sinks.peak)
    assert sinks.made == devices + 3
    if rounds > 1:
        assert sinks.reopened >= devices  # each device's later records found it closed
    assert _fds() == base  # and every one closed again
    assert result.devices[:2] == ["d0", "d1"] and result.devices[-1] == "e2"  # device order
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"d{i}.raw" for i in range(devices)] + ["e0.raw", "e1.raw",
                                                                      "e2.raw"])
    for i in (0, 1, devices // 2, devices - 1):
        assert (out / f"d{i}.raw").read_bytes() == hb.device_content(i, SIZE)
    assert (out / "e2.raw").stat().st_size == 0  # no record: made empty, of its size


def test_a_failed_restore_leaves_no_file_of_a_closed_target(tmp_path: Path) -> None:
    """Cut before its seal: the targets closed to make room are removed as the open ones."""
    arc = hb.many_devices(100, size=SIZE, rounds=2)
    cut = arc[: arc.rindex(b"BREC")]  # the END record and the footer gone
    out = tmp_path / "out"
    opts = RestoreOptions(memory=1 << 20, workers=2, open_targets=8)
    base = _fds()
    with pytest.raises(ArchiveError, match="incomplete"):
        restore(io.BytesIO(cut), to_dir(out, "raw", None, opts), opts)
    assert not out.exists()  # its files, temporary ones included, and the directory it made
    assert _fds() == base


@pytest.mark.parametrize("planted", ["symlink", "file"])
def test_a_target_replaced_while_closed_fails_the_restore(tmp_path: Path, planted: str) -> None:
    """A suspended target's file is opened again only if it is still the file the restore
    made: a symbolic link or another file put at its name is never written to."""
    arc = hb.many_devices(4, size=SIZE, rounds=2)
    out = tmp_path / "out"
    victim = tmp_path / "victim"
    victim.write_bytes(b"x" * SIZE)
    opts = RestoreOptions(memory=1 << 20, workers=2, open_targets=1)
    factory = to_dir(out, "raw", None, opts)

    def make(dev: Device) -> Sink | None:
        sink = factory(dev)
        if dev.name == "d3":  # d0's file is closed by now: put something in its place
            (temp,) = out.glob(".d0.raw.*.partial")
            plant(temp, planted, victim, b"someone else's")
        return sink

    with pytest.raises(TargetError, match=r"d0\.raw.*temporary file .* was replaced while "
                       r"the restore ran"):
        restore(io.BytesIO(arc), make, opts)
    assert victim.read_bytes() == b"x" * SIZE
    assert not list(out.glob("d*.raw"))
    # What was planted at the temporary name is someone else's: left where it was.
    (planted_at,) = out.glob(".d0.raw.*.partial")
    if planted == "symlink":
        assert planted_at.is_symlink() and planted_at.readlink() == victim
    else:
        assert planted_at.read_bytes() == b"someone else's"
