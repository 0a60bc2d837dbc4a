"""An archive at the format's limits, through the command line: 1,024 small devices (VMA
stops at 255) and one of 2^63-1 bytes, all zero, that no file system here can hold.

``info`` and ``verify`` take all of it, from a file and from a pipe; ``restore`` brings back
every small device at once, with the open-file limit most systems give a process (1,024);
restoring the huge one into a file fails cleanly and leaves nothing behind.
"""

from __future__ import annotations

import resource
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.archive.format import Compression
from agent.archive.writer import ArchiveWriter
from tests.fsprobe import takes_file_of
from tests.integration.cli_util import (
    AGENT,
    TIMEOUT,
    agent,
    agent_from_file,
    assert_error,
    assert_ok,
    info_json,
)
from tests.unit.archive_util import write_archive

pytestmark = pytest.mark.integration

SMALL = 1024  # devices d1 .. d1024
SMALL_SIZE = 4096
HUGE = 2**63 - 1  # d0, all zero
NOFILE = 1024  # the usual soft limit of open files (systemd's default, and a login's)


def _content(i: int) -> bytes:
    return bytes([i % 251]) * (SMALL_SIZE - 4) + i.to_bytes(4, "little")


def _build(w: ArchiveWriter) -> None:
    w.add_device("d0", HUGE, {"source-format": "raw"})
    for i in range(1, SMALL + 1):
        w.add_device(f"d{i}", SMALL_SIZE, {"source-format": "raw"})
    # Records in an order unlike the devices': the huge zero range comes last.
    for i in range(SMALL, 0, -1):
        w.write_data(i, 0, SMALL_SIZE, Compression.NONE, _content(i))
    w.write_zero(0, 0, HUGE)


@pytest.fixture(scope="module")
def archive() -> Iterator[Path]:
    work = Path(tempfile.mkdtemp(prefix="ba-many-"))
    try:
        arc = work / "many.arc"
        arc.write_bytes(write_archive(_build))
        yield arc
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def _with_nofile(limit: int) -> None:
    """preexec_fn: the child starts with ``limit`` as its soft limit of open files."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(limit, hard), hard))


def test_info_from_file_and_pipe(archive: Path) -> None:
    info = info_json(archive)
    sizes = {d["name"]: d["size"] for d in info["devices"]}
    assert len(sizes) == SMALL + 1
    assert sizes["d0"] == HUGE
    assert all(sizes[f"d{i}"] == SMALL_SIZE for i in range(1, SMALL + 1))
    assert info["totals"]["zero_bytes"] == HUGE
    assert info["totals"]["data_bytes"] == SMALL * SMALL_SIZE
    piped = agent_from_file(archive, "info", "-", "--json")
    assert_ok(piped)
    assert piped.stdout.decode().count('"name": "d') == SMALL + 1


def test_verify_from_file_and_pipe(archive: Path) -> None:
    assert_ok(agent("verify", archive))
    assert_ok(agent_from_file(archive, "verify", "-"))


def test_restore_every_small_device_at_once(archive: Path, short_tmp: Path) -> None:
    out = short_tmp / "out"
    devices = [a for i in range(1, SMALL + 1) for a in ("--device", f"d{i}")]
    with open(archive, "rb") as stdin:
        proc = subprocess.run([AGENT, "restore", "-", "--to-dir", str(out), *devices],
                              stdin=stdin, capture_output=True, timeout=TIMEOUT,
                              preexec_fn=lambda: _with_nofile(NOFILE), check=False)
    assert_ok(proc)
    assert _files(out) == sorted(f"d{i}.raw" for i in range(1, SMALL + 1))
    for i in (1, 2, 500, SMALL):
        assert (out / f"d{i}.raw").read_bytes() == _content(i)


def test_restore_one_small_device(archive: Path, short_tmp: Path) -> None:
    out = short_tmp / "out"
    assert_ok(agent("restore", archive, "--to-dir", out, "--device", f"d{SMALL}"))
    assert (out / f"d{SMALL}.raw").read_bytes() == _content(SMALL)


def test_restore_everything_fails_on_the_huge_device(archive: Path, short_tmp: Path) -> None:
    if takes_file_of(short_tmp, HUGE):
        pytest.skip(f"the file system of {short_tmp} takes files of {HUGE} bytes")
    out = short_tmp / "out"
    assert_error(agent("restore", archive, "--to-dir", out), "d0.raw", "'d0'", str(HUGE))
    assert _files(out) == []
