"""agent/files.py: private temporary files, renames that never replace, names that fit."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import files
from agent.files import (
    NAME_MAX,
    create_private,
    make_dirs,
    remove_made_dirs,
    rename_noreplace,
    short_name,
    temp_name,
)


@pytest.fixture(params=["renameat2", "link"])
def rename_way(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Both ways rename_noreplace works: renameat2, and link+unlink where a file system (or
    an old C library) has no RENAME_NOREPLACE."""
    if request.param == "link":
        monkeypatch.setattr(files, "_renameat2", None)
    elif files._renameat2 is None:
        pytest.skip("this C library has no renameat2")
    yield request.param


@pytest.mark.parametrize("there", ["file", "dangling link", "directory"])
def test_rename_noreplace_never_replaces(tmp_path: Path, rename_way: str, there: str) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(b"new")
    if there == "file":
        dst.write_bytes(b"old")
    elif there == "dangling link":
        dst.symlink_to(tmp_path / "nowhere")
    else:
        dst.mkdir()
    with pytest.raises(FileExistsError):
        rename_noreplace(src, dst)
    assert src.read_bytes() == b"new"
    assert not (tmp_path / "nowhere").exists()
    if there == "file":
        assert dst.read_bytes() == b"old"


def test_rename_noreplace_renames(tmp_path: Path, rename_way: str) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(b"new")
    rename_noreplace(src, dst)
    assert dst.read_bytes() == b"new" and not src.exists()


@pytest.mark.parametrize("n", [1, 200, 240, 250, 251, 252, 255])
@pytest.mark.parametrize("suffix", [".raw", ".qcow2"])
def test_short_name_fits_and_keeps_names_apart(n: int, suffix: str) -> None:
    stem = "a" * n
    name = short_name(stem, suffix)
    assert len(name) <= NAME_MAX and name.endswith(suffix)
    if n + len(suffix) <= NAME_MAX:
        assert name == stem + suffix
    else:
        assert len(name) == NAME_MAX and "~" in name
        assert short_name(stem, suffix) == name  # the same device, the same file
        assert short_name(stem[:-1] + "b", suffix) != name


def test_names_in_bytes_not_characters() -> None:
    label = "é" * 200  # 400 bytes in UTF-8
    assert len(os.fsencode(temp_name(label))) <= NAME_MAX
    assert len(os.fsencode(short_name(label, ".arc"))) <= NAME_MAX


@pytest.mark.parametrize("n", [1, 100, 237, 238, 255])
def test_temp_name(n: int) -> None:
    name = temp_name("x" * n)
    assert len(name) <= NAME_MAX
    assert re.fullmatch(r"\.x+\.[a-z0-9]{8}\.partial", name), name


def test_create_private(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        fd, path = create_private(tmp_path, "vm.arc")
    finally:
        os.umask(old)
    try:
        st = os.lstat(path)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert (st.st_dev, st.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino)
        assert path.parent == tmp_path and path.name.startswith(".vm.arc.")
    finally:
        os.close(fd)


def test_make_dirs_reports_what_it_made(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    made = make_dirs(tmp_path / "a" / "b" / "c")
    assert made == [tmp_path / "a" / "b", tmp_path / "a" / "b" / "c"]
    assert make_dirs(tmp_path / "a" / "b" / "c") == []
    (tmp_path / "a" / "b" / "keep").write_bytes(b"")
    remove_made_dirs(made)  # c goes; b is not empty and stays
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["keep"]
    (tmp_path / "a" / "b" / "keep").unlink()
    remove_made_dirs(made)
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # never one it did not make


def test_make_dirs_refuses_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        make_dirs(tmp_path / "f")
