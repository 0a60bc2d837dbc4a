"""Directories that another user could tamper with are refused for the agent's sockets and
spool: world-writable without the sticky bit, or owned by another user."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.errors import InvalidArgument
from agent.safedir import check_shared_dir, check_work_dirs

NOBODY = 65534


def _dir(tmp_path: Path, mode: int, uid: int | None = None) -> Path:
    d = tmp_path / f"d{mode:o}-{uid}"
    d.mkdir()
    d.chmod(mode)
    if uid is not None:
        os.chown(d, uid, -1)
    return d


@pytest.mark.parametrize("mode", [0o700, 0o755, 0o1777, 0o1770])
def test_private_and_sticky_directories_pass(tmp_path: Path, mode: int) -> None:
    check_shared_dir(str(_dir(tmp_path, mode)), "--spool-dir")


def test_world_writable_without_sticky_bit_is_refused(tmp_path: Path) -> None:
    d = _dir(tmp_path, 0o777)
    with pytest.raises(InvalidArgument, match=f"--spool-dir {d} may be written by every user "
                       rf"and has no sticky bit \(mode 0777\).*chmod \+t {d}"):
        check_shared_dir(str(d), f"--spool-dir {d}")


@pytest.mark.root("chown to another user")
def test_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    d = _dir(tmp_path, 0o700, NOBODY)
    with pytest.raises(InvalidArgument, match="belongs to nobody, who could replace"):
        check_shared_dir(str(d), f"--spool-dir {d}")


def test_missing_and_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="no such directory"):
        check_shared_dir(str(tmp_path / "nope"), "--spool-dir")
    (tmp_path / "f").write_text("")
    with pytest.raises(InvalidArgument, match="not a directory"):
        check_shared_dir(str(tmp_path / "f"), "--spool-dir")


def test_tmpdir_is_checked_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    d = _dir(tmp_path, 0o777)
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    with pytest.raises(InvalidArgument, match=f"TMPDIR {d} \\(where the agent's sockets go\\)"):
        check_work_dirs(None)
    monkeypatch.setattr(tempfile, "tempdir", str(_dir(tmp_path, 0o1777)))
    check_work_dirs(str(_dir(tmp_path, 0o700)))
