"""restore that cannot succeed, through the command line: exit 1, one line naming what is
wrong and where, and nothing left that looks like a restore — no file in ``--to-dir``, not
even the directory when the archive cannot be read, and a target written in place
(``--to``) is said to be incomplete.

The archives are made by the archive writer (tests/unit/archive_util.py), hostile ones by
re-framing its records, so each has exactly the defect a test is about.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from agent.archive.format import Compression, Device, RecordType, Zero
from agent.archive.writer import ArchiveWriter
from tests.fsprobe import takes_file_of
from tests.integration.cli_util import (
    AGENT,
    MiB,
    agent,
    agent_from_file,
    assert_error,
    assert_ok,
    running,
    wait_for,
)
from tests.unit.archive_util import assemble, split, write_archive

pytestmark = pytest.mark.integration

A = bytes(range(256)) * 4096  # 1 MiB
HUGE = 2**63 - 1  # the largest device the format allows


def _restore(arc: Path, via: str, *args: str | os.PathLike[str],
             ) -> subprocess.CompletedProcess[bytes]:
    """``restore ARC ARGS`` from the file, or ``cat ARC | restore - ARGS``."""
    if via == "pipe":
        return agent_from_file(arc, "restore", "-", *args)
    return agent("restore", arc, *args)


def _files(directory: Path) -> list[str]:
    """Everything in ``directory`` (hidden temporary files too); [] if it does not exist."""
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def _save(path: Path, build: Callable[[ArchiveWriter], None]) -> Path:
    path.write_bytes(write_archive(build))
    return path


# -- a device too large for the file system ----------------------------------------------

def _small_and_huge(w: ArchiveWriter) -> None:
    small = w.add_device("small", 2 * MiB)
    big = w.add_device("big", HUGE)
    w.write_data(small.id, 0, MiB, Compression.NONE, A)
    w.write_zero(small.id, MiB, MiB)
    w.write_zero(big.id, 0, HUGE)


@pytest.mark.parametrize("via", ["file", "pipe"])
def test_device_too_large_for_the_file_system(short_tmp: Path, via: str) -> None:
    if takes_file_of(short_tmp, HUGE):
        pytest.skip(f"the file system of {short_tmp} takes files of {HUGE} bytes")
    arc = _save(short_tmp / "huge.arc", _small_and_huge)
    out = short_tmp / "out"
    msg = assert_error(_restore(arc, via, "--to-dir", out), "big.raw", "'big'", str(HUGE))
    assert "internal error" not in msg
    assert _files(out) == []  # neither small.raw nor a temporary file of either
    # The device that fits is restored on its own.
    assert_ok(_restore(arc, via, "--to-dir", out, "--device", "small"))
    assert _files(out) == ["small.raw"]
    assert (out / "small.raw").read_bytes() == A + bytes(MiB)


def test_device_too_large_for_qcow2(short_tmp: Path) -> None:
    arc = _save(short_tmp / "huge.arc", _small_and_huge)
    out = short_tmp / "out"
    msg = assert_error(agent("restore", arc, "--to-dir", out, "--format", "qcow2"),
                       "big.qcow2", "'big'")
    assert "internal error" not in msg
    assert _files(out) == []


# -- the directory appears only once the archive could be read ---------------------------

def test_missing_archive_creates_no_directory(short_tmp: Path) -> None:
    out = short_tmp / "new" / "out"
    assert_error(agent("restore", short_tmp / "missing.arc", "--to-dir", out), "missing.arc")
    assert not (short_tmp / "new").exists()


@pytest.mark.parametrize("via", ["file", "pipe"])
@pytest.mark.parametrize("content", ["empty", "random", "cut-in-header"])
def test_unreadable_archive_creates_no_directory(short_tmp: Path, via: str,
                                                 content: str) -> None:
    good = write_archive(lambda w: None)
    arc = short_tmp / "bad.arc"
    arc.write_bytes({"empty": b"", "random": os.urandom(4096), "cut-in-header": good[:40]}
                    [content])
    out = short_tmp / "new" / "out"
    assert_error(_restore(arc, via, "--to-dir", out))
    assert not (short_tmp / "new").exists()


def test_directory_is_made_with_its_parents(short_tmp: Path) -> None:
    arc = _save(short_tmp / "a.arc", _one_device)
    out = short_tmp / "new" / "out"
    assert_ok(agent_from_file(arc, "restore", "-", "--to-dir", out))
    assert _files(out) == ["vda.raw"]


# -- hostile archives ---------------------------------------------------------------------

def _one_device(w: ArchiveWriter) -> None:
    """vda, 4 MiB: data, data, then one zero range; records 2, 3 and 4."""
    w.add_device("vda", 4 * MiB)
    w.write_data(0, 0, MiB, Compression.NONE, A)
    w.write_data(0, MiB, MiB, Compression.NONE, A)
    w.write_zero(0, 2 * MiB, 2 * MiB)


def _unknown_device(w: ArchiveWriter) -> None:
    w.add_device("vda", 4 * MiB)
    w.write_data(0, 0, MiB, Compression.NONE, A)
    w.write_data(3, 0, MiB, Compression.NONE, A)  # record 3: there is no device 3
    w.write_data(0, MiB, MiB, Compression.NONE, A)
    w.write_zero(0, 2 * MiB, 2 * MiB)


def _overlap(w: ArchiveWriter) -> None:
    w.add_device("vda", 4 * MiB)
    w.write_data(0, 0, MiB, Compression.NONE, A)
    w.write_data(0, MiB, MiB, Compression.NONE, A)
    w.write_data(0, MiB + 4096, MiB, Compression.NONE, A)  # record 4, over record 3
    w.write_zero(0, 2 * MiB, 2 * MiB)


def _with_body(data: bytes, index: int, body: bytes) -> tuple[bytes, int]:
    """``data`` with record ``index``'s body replaced (framed and sealed as a writer
    would), and that record's byte position."""
    parts = split(data)
    recs = list(parts.records)
    recs[index] = replace(recs[index], body=body, digest=None)
    return assemble(recs), parts.records[index].pos


def _hostile(kind: str) -> tuple[bytes, list[str]]:
    """A hostile archive and what its error message must say."""
    good = write_archive(_one_device)
    if kind == "zero-length-2^63":
        data, pos = _with_body(good, 4, Zero(0, 2 * MiB, 2**63).encode())
        return data, [f"zero record at byte {pos}", "'vda'", "past the device's end"]
    if kind == "device-size-2^63":
        data, _ = _with_body(good, 1, Device(0, "vda", 2**63).encode())
        return data, ["'vda'", str(2**63)]
    if kind == "unknown-device":
        data = write_archive(_unknown_device)
        pos = split(data).records[3].pos
        return data, [f"data record at byte {pos}", "names device 3"]
    assert kind == "overlap"
    data = write_archive(_overlap)
    pos = split(data).records[4].pos
    assert split(data).records[4].rtype == RecordType.DATA
    return data, [f"data record at byte {pos}", "'vda'", "overlaps",
                  f"device offset {MiB + 4096}"]


@pytest.mark.parametrize("via", ["file", "pipe"])
@pytest.mark.parametrize("kind", ["zero-length-2^63", "device-size-2^63", "unknown-device",
                                  "overlap"])
def test_hostile_archive(short_tmp: Path, kind: str, via: str) -> None:
    data, words = _hostile(kind)
    arc = short_tmp / "hostile.arc"
    arc.write_bytes(data)
    out = short_tmp / "out"
    assert_error(_restore(arc, via, "--to-dir", out), *words)
    assert _files(out) == []


# -- a target written in place ------------------------------------------------------------

def test_failed_restore_into_a_file_says_it_is_incomplete(short_tmp: Path) -> None:
    data = write_archive(_one_device)
    cut = split(data).records[3].pos + MiB // 2  # inside the second data record
    target = short_tmp / "t.raw"
    target.write_bytes(b"\xff" * (4 * MiB))
    with running([AGENT, "restore", "-", "--device", "vda", "--to", str(target)],
                 stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                 stderr=subprocess.PIPE) as proc:
        assert proc.stdin is not None
        proc.stdin.write(data[:cut])
        proc.stdin.flush()

        def first_record_written() -> bool:
            with open(target, "rb") as f:
                return f.read(4096) == A[:4096]

        wait_for(first_record_written, "the first data record is on the target", proc)
        proc.stdin.close()  # the archive ends here: truncated
        assert proc.stderr is not None
        err = proc.stderr.read()
        code = proc.wait(timeout=60)
    assert_error((code, err), "truncated at byte",
                 f"{target} was partly written and is not a complete restore")
    assert target.read_bytes()[:MiB] == A  # it was: the first record is there
