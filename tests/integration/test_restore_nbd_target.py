"""restore --to an NBD export, as nbdkit sees it: zero ranges become write-zeroes (or
trims), never written zeros; a server without write-zeroes gets zeros written in requests
it accepts; a tiny --memory still restores every byte.

Archives are made by the archive writer (tests/unit/archive_util.py), so each holds
exactly the zero and data ranges a test is about; nbdkit serves a file pre-filled with
0xFF, so a zero range that is skipped instead of zeroed shows in the comparison.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agent.archive.format import Compression
from agent.archive.writer import ArchiveWriter
from tests.integration.cli_util import MiB, agent, agent_from_file, assert_ok
from tests.integration.conftest import NbdServerFactory
from tests.unit.archive_util import write_archive

pytestmark = pytest.mark.integration

A = bytes(range(256)) * 4096  # 1 MiB of data
BIG_ZERO = 96 * MiB  # larger than nbdkit's largest request (64 MiB)
SIZE = BIG_ZERO + 4 * MiB
# (offset, length) of each zero range in the archive; data everywhere else
ZEROS = [(MiB, BIG_ZERO), (BIG_ZERO + 2 * MiB, MiB)]
DATA = [(0, MiB), (BIG_ZERO + MiB, MiB), (BIG_ZERO + 3 * MiB, MiB)]


def _build(w: ArchiveWriter) -> None:
    dev = w.add_device("d", SIZE)
    for offset, length in DATA:
        w.write_data(dev.id, offset, length, Compression.NONE, A)
    for offset, length in ZEROS:
        w.write_zero(dev.id, offset, length)


def _expected() -> bytearray:
    want = bytearray(SIZE)
    for offset, length in DATA:
        want[offset:offset + length] = A
    return want


def _archive(directory: Path) -> Path:
    arc = directory / "z.arc"
    arc.write_bytes(write_archive(_build))
    return arc


def _garbage(path: Path) -> Path:
    """A file of SIZE bytes of 0xFF: what a zero range fails to zero stays visible."""
    with open(path, "wb") as f:
        for _ in range(SIZE // MiB):
            f.write(b"\xff" * MiB)
    return path


def _requests(log: str, kind: str) -> list[tuple[int, int]]:
    """(offset, count) of every ``kind`` request in an nbdkit log filter's file."""
    pattern = rf"\b{kind} id=\d+ offset=(0x[0-9a-f]+) count=(0x[0-9a-f]+)"
    return [(int(o, 16), int(n, 16)) for o, n in re.findall(pattern, log)]


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[0] + b[1] and b[0] < a[0] + a[1]


def _covered(ranges: list[tuple[int, int]], want: tuple[int, int]) -> bool:
    """Whether ``ranges`` together cover every byte of ``want``."""
    pos, end = want[0], want[0] + want[1]
    for offset, length in sorted(ranges):
        if offset <= pos < offset + length:
            pos = offset + length
    return pos >= end


@pytest.mark.parametrize("via", ["file", "pipe"])
def test_zeros_written_in_requests_the_server_accepts(
        short_tmp: Path, nbd_server: NbdServerFactory, via: str) -> None:
    """A server without write-zeroes: zeros are written, in requests of at most 32 MiB."""
    arc = _archive(short_tmp)
    disk = _garbage(short_tmp / "t.raw")
    log = short_tmp / "nbdkit.log"
    server = nbd_server.nbdkit(["file", str(disk), "zeromode=none", f"logfile={log}"],
                               filters=["log", "nozero"])
    args = ["--device", "d", "--to", server.uri]
    proc = agent_from_file(arc, "restore", "-", *args) if via == "pipe" else \
        agent("restore", arc, *args)
    assert_ok(proc)
    server.stop()
    assert disk.read_bytes() == _expected()
    writes = _requests(log.read_text(), "Write")
    assert writes and max(n for _, n in writes) <= 32 * MiB
    assert _requests(log.read_text(), "Zero") == []  # the server has none to offer


def test_zero_ranges_become_write_zeroes(short_tmp: Path, nbd_server: NbdServerFactory) -> None:
    arc = _archive(short_tmp)
    disk = _garbage(short_tmp / "t.raw")
    log = short_tmp / "nbdkit.log"
    server = nbd_server.nbdkit(["file", str(disk), f"logfile={log}"], filters=["log"])
    assert_ok(agent("restore", arc, "--device", "d", "--to", server.uri))
    server.stop()
    assert disk.read_bytes() == _expected()
    text = log.read_text()
    zeroed = _requests(text, "Zero") + _requests(text, "Trim")
    writes = _requests(text, "Write")
    for zero in ZEROS:
        assert _covered(zeroed, zero), (zero, zeroed)
        assert not any(_overlaps(w, zero) for w in writes), (zero, writes)
    assert sorted(writes) == DATA  # the data, written once each, and nothing else


@pytest.mark.parametrize("target", ["nbd", "dir"])
def test_tiny_memory_restores_every_byte(short_tmp: Path, nbd_server: NbdServerFactory,
                                         target: str) -> None:
    """--memory smaller than one record: records go one at a time, all of them."""
    arc = _archive(short_tmp)
    if target == "nbd":
        disk = _garbage(short_tmp / "t.raw")
        server = nbd_server.nbdkit(["file", str(disk)])
        assert_ok(agent_from_file(arc, "restore", "-", "--memory", "4K", "--device", "d",
                                  "--to", server.uri))
        server.stop()
    else:
        assert_ok(agent_from_file(arc, "restore", "-", "--memory", "4K",
                                  "--to-dir", short_tmp / "out"))
        disk = short_tmp / "out" / "d.raw"
    assert disk.read_bytes() == _expected()
