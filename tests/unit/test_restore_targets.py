"""Restore targets that cannot be set up: a clear TargetError, no descriptor left open, no
temporary file left behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.archive.format import Device
from agent.errors import TargetError
from agent.restore import RestoreOptions, to_dir
from agent.targets.file import FileTarget
from tests.fsprobe import plant, takes_file_of

HUGE = 2**63 - 1  # a valid device size, larger than ext4 allows a file to be


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _skip_if_huge_files_fit(directory: Path) -> None:
    if takes_file_of(directory, HUGE):
        pytest.skip(f"the file system of {directory} takes files of {HUGE} bytes")


def test_file_too_large_is_a_target_error_and_closes_its_fd(tmp_path: Path) -> None:
    _skip_if_huge_files_fit(tmp_path)
    before = _open_fds()
    with pytest.raises(TargetError) as e:
        FileTarget(str(tmp_path / "f.raw"), HUGE, fresh=True, label="F (device 'd')")
    assert str(e.value) == f"F (device 'd'): cannot make a file of {HUGE} bytes: File too large"
    assert _open_fds() == before


def test_to_dir_removes_its_temporary_file_when_the_target_fails(tmp_path: Path) -> None:
    _skip_if_huge_files_fit(tmp_path)
    make = to_dir(tmp_path / "out", "raw", None, RestoreOptions())
    before = _open_fds()
    with pytest.raises(TargetError, match=r"out/big\.raw \(device 'big'\)"):
        make(Device(0, "big", HUGE))
    assert not (tmp_path / "out").exists()  # nor the directory it made
    assert _open_fds() == before


def test_to_dir_makes_the_directory_only_for_a_device(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b"
    make = to_dir(out, "raw", {"vda"}, RestoreOptions())
    assert not (tmp_path / "a").exists()  # not yet: the archive may still prove unreadable
    assert make(Device(0, "other", 4096)) is None
    assert not (tmp_path / "a").exists()
    sink = make(Device(1, "vda", 4096))
    assert sink is not None
    sink.discard()
    assert not (tmp_path / "a").exists()  # made for the device: gone with it


@pytest.mark.parametrize("planted", ["symlink", "file"])
def test_a_temporary_file_replaced_before_commit_is_never_published(tmp_path: Path,
                                                                    planted: str) -> None:
    """The restored file takes its final name only if its temporary file is still the one
    the restore made: another file (or a link) put at that name is neither renamed into
    place as the restored disk nor removed."""
    out = tmp_path / "out"
    sink = to_dir(out, "raw", None, RestoreOptions())(Device(0, "vda", 4096))
    assert sink is not None and sink.temp is not None
    sink.target.write(0, b"\x01" * 4096)
    temp = sink.temp
    victim = tmp_path / "victim"
    victim.write_bytes(b"theirs")
    plant(temp, planted, victim, b"theirs")
    with pytest.raises(TargetError, match=r"out/vda\.raw: its temporary file .* was replaced "
                       r"while the restore ran: it was left as it is"):
        sink.commit()
    sink.discard()
    assert not (out / "vda.raw").exists()
    assert temp.is_symlink() if planted == "symlink" else temp.read_bytes() == b"theirs"
    assert victim.read_bytes() == b"theirs"


def test_discard_removes_the_temporary_file_it_made(tmp_path: Path) -> None:
    sink = to_dir(tmp_path / "out", "raw", None, RestoreOptions())(Device(0, "vda", 4096))
    assert sink is not None and sink.temp is not None and sink.temp.exists()
    sink.discard()
    assert not (tmp_path / "out").exists()
