"""Hostile archives (issue #13), through the real command line: a valid archive made to cost
as much as possible cannot take a restore's memory past ``--memory``, nor its disk space
past the data it really holds. Peak memory is the child's own ``ru_maxrss`` (from
``wait4``), compared with the same command on a small archive."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from agent.archive.codec import CompressionSpec
from agent.archive.writer import ArchiveWriter
from tests.integration.cli_util import AGENT, MiB, agent, running
from tests.unit.archive_util import tiny_records, write_archive_to, zero_data


def _peak_rss(*args: str | os.PathLike[str]) -> tuple[int, bytes]:
    """Run ``backup-agent ARGS``; its exit code must be 0. Return its peak resident
    memory in bytes (its own, from wait4: not that of other children of this process)
    and its stderr."""
    with running([AGENT, *map(str, args)], stdin=subprocess.DEVNULL,
                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as proc:
        assert proc.stderr is not None
        err = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, err.decode()
    return usage.ru_maxrss * 1024, err


@pytest.mark.timeout(120)
@pytest.mark.parametrize("zstd", [False, True], ids=["stored", "zstd"])
@pytest.mark.slow
def test_restore_of_tiny_records_stays_within_memory(tmp_path: Path, zstd: bool) -> None:
    """40,000 records of 1 byte (2.6 MB of archive): each once took a 64 KiB buffer
    while --memory counted 25 bytes for it, and this restore peaked 77 MB above the
    small archive's (100,000 records: 830 MB)."""
    memory = 1 * MiB
    small, hostile = tmp_path / "small.arc", tmp_path / "hostile.arc"
    write_archive_to(small, tiny_records(16, zstd=zstd))
    write_archive_to(hostile, tiny_records(40_000, zstd=zstd))
    base, _ = _peak_rss("restore", small, "--to-dir", tmp_path / "a", "--memory", "1M",
                        "--progress", "none", "--quiet")
    peak, _ = _peak_rss("restore", hostile, "--to-dir", tmp_path / "b", "--memory", "1M",
                        "--progress", "none", "--quiet")
    # Records in flight (--memory) and the spare buffers kept for reuse (within the same
    # bound), the read-ahead buffer and the workers' decompression contexts; the rest is
    # the allocator's slack.
    assert peak - base <= 2 * memory + 24 * MiB, (base, peak)
    data = (tmp_path / "b" / "tiny.raw").read_bytes()
    assert data.count(b"x") == 40_000 and data[::4096] == b"x" * 40_000


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_zeros_stored_as_data_take_no_space_on_a_new_target(tmp_path: Path, fmt: str) -> None:
    """256 MiB of zeros stored as compressed DATA records (a few KB of archive) once
    became 256 MiB of written, allocated zeros."""
    size = 256 * MiB
    arc = tmp_path / "zeros.arc"
    write_archive_to(arc, zero_data(size))
    assert arc.stat().st_size < 64 * 1024
    out = tmp_path / "out"
    r = agent("restore", arc, "--to-dir", out, "--format", fmt, "--progress", "none")
    assert r.returncode == 0, r.stderr.decode()
    image = out / f"zeros.{fmt}"
    assert image.stat().st_blocks * 512 < 4 * MiB  # the data of a qcow2's own metadata
    zeros = json.dumps({"driver": "null-co", "size": size, "read-zeroes": True})
    check = subprocess.run(["qemu-img", "compare", "-f", fmt, str(image), f"json:{zeros}"],
                           capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.timeout(120)
def test_config_keeps_only_the_config_asked_for(tmp_path: Path) -> None:
    """Every config of the archive was held in memory: a small archive whose other config
    decompresses to 512 MiB cost 560 MiB for a one-line config."""
    big = 128 * MiB

    def with_big(w: ArchiveWriter) -> None:
        w.add_config("vm.conf", b"memory: 2G\n", CompressionSpec())
        w.add_config("huge", bytes(big), CompressionSpec())

    def without(w: ArchiveWriter) -> None:
        w.add_config("vm.conf", b"memory: 2G\n", CompressionSpec())

    hostile, small = tmp_path / "hostile.arc", tmp_path / "small.arc"
    write_archive_to(hostile, with_big)
    write_archive_to(small, without)
    assert hostile.stat().st_size < 1 * MiB
    base, _ = _peak_rss("config", small, "vm.conf")
    peak, _ = _peak_rss("config", hostile, "vm.conf")
    # One piece of the other config at a time (4 MiB as the writer cuts them, at most
    # 32 MiB as a reader accepts them).
    assert peak - base <= 24 * MiB, (base, peak)
    r = agent("config", hostile, "vm.conf")
    assert r.returncode == 0 and r.stdout == b"memory: 2G\n", r.stderr
    # The large one itself goes out as it is read.
    out = tmp_path / "huge"
    with open(out, "wb") as f:
        proc = subprocess.run([AGENT, "config", str(hostile), "huge"], stdout=f,
                              stderr=subprocess.PIPE, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size == big
    with open(out, "rb") as f:
        while chunk := f.read(8 * MiB):
            assert chunk.count(0) == len(chunk)
