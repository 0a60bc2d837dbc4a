"""The one size grammar (agent/units.py): what it reads, that it reads everything each of
the four parsers it replaced read (and nothing more), and that every front end uses it."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from agent.cli.common import byte_size
from agent.errors import InvalidArgument
from agent.jobs.config import load_jobs
from agent.pace import PaceSpec
from agent.units import GiB, KiB, MiB, TiB, parse_size

# -- the parsers this grammar replaced, as they were (the reference for "accepts them all") --

_CLI = re.compile(r"(\d+)([KMGT]?)(i?B)?", re.IGNORECASE)  # agent/cli/common.py
_JOB_FILE = re.compile(r"(\d+)\s*([KMGT]?)(i?B)?", re.IGNORECASE)  # agent/jobs/config.py
_RATE = re.compile(r"(\d+)\s*([KMGT]?)", re.IGNORECASE)  # agent/pace.py


def _by_regex(pattern: re.Pattern[str], text: str) -> int | None:
    m = pattern.fullmatch(text.strip())
    if m is None:
        return None
    n: int = int(m.group(1)) * 1024 ** " KMGT".index((m.group(2) or " ").upper())
    return n


def _by_plugin(text: str) -> int | None:  # agent/cbw/plugin.py, parsed by hand
    suffix = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    s = text.strip()
    digits = s[:len(s) - len(s.lstrip("0123456789"))]
    unit = s[len(digits):].strip().lower()
    unit = unit[:-2] if unit.endswith("ib") else unit[:-1] if unit.endswith("b") else unit
    return int(digits) * suffix[unit] if digits and unit in suffix else None


def _old(text: str) -> set[int]:
    """What the old parsers made of ``text`` (empty: none accepted it)."""
    found = {_by_regex(p, text) for p in (_CLI, _JOB_FILE, _RATE)} | {_by_plugin(text)}
    return {n for n in found if n is not None}


def _new(text: str) -> int | None:
    try:
        return parse_size(text)
    except InvalidArgument:
        return None


# -- the grammar --------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "n"), [
    ("4096", 4096), ("4096B", 4096), ("4096 b", 4096), ("0", 0),
    ("64K", 64 * KiB), ("64k", 64 * KiB), ("64KB", 64 * KiB), ("64kib", 64 * KiB),
    ("64 KiB", 64 * KiB), ("256M", 256 * MiB), ("256 M", 256 * MiB), ("\t256\tMB ", 256 * MiB),
    ("2GiB", 2 * GiB), ("1T", TiB), ("1tb", TiB), ("007m", 7 * MiB),
])
def test_sizes(text: str, n: int) -> None:
    assert parse_size(text) == n


@pytest.mark.parametrize("text", [
    "", " ", "M", "KiB", "1.5M", "-1M", "+1M", "1 000", "1_000", "0x10", "1P", "1MM", "1 M B",
    "1M iB", "1Mi", "1 Mib x", "lots", "1e6", "M1",
])
def test_not_sizes(text: str) -> None:
    with pytest.raises(InvalidArgument, match=r"^not a size: .* \(e\.g\. 4096, 64K, 256M or 1G\)$"):
        parse_size(text)


def test_too_many_digits_is_no_size_not_a_crash() -> None:
    with pytest.raises(InvalidArgument, match="not a size"):
        parse_size("9" * 5000)  # past what int() converts from text


_ALPHABET = "0123456789 \tkKmMgGtTbBiIpx."


@given(st.text(_ALPHABET, max_size=8))
@example("256 M")  # the job file's, not the command line's
@example("50MB")  # the command line's, not --max-rate's
@example("4 kb")  # the plugin's
def test_reads_what_any_old_parser_read_and_nothing_else(text: str) -> None:
    old, new = _old(text), _new(text)
    if old:
        assert new in old
    else:
        assert new is None


# -- every front end reads it --------------------------------------------------------------


def test_the_command_line_reads_the_job_files_sizes() -> None:
    assert byte_size("256 M") == 256 * MiB
    assert byte_size("64 KiB") == 64 * KiB
    with pytest.raises(argparse.ArgumentTypeError, match="not a size: '256 Q'"):
        byte_size("256 Q")
    with pytest.raises(argparse.ArgumentTypeError, match="too small"):
        byte_size("4095")


def test_rates_take_the_byte_suffix_too() -> None:
    assert PaceSpec.parse("50MB") == PaceSpec(50 * MiB)
    assert PaceSpec.parse("auto:1 GiB") == PaceSpec(GiB, adaptive=True)
    with pytest.raises(InvalidArgument, match="not a rate: '50q'"):
        PaceSpec.parse("50Q")


def test_the_job_file_reads_the_same(tmp_path: Path) -> None:
    path = tmp_path / "jobs.toml"
    path.write_text('[jobs.vm1]\nqmp = "/run/vm1.qmp"\ndir = "/srv/vm1"\n'
                    'cbw_memory = "256 MiB"\nspool_limit = 8192\nmax_rate = "50 MB"\n')
    job = load_jobs(str(path)).jobs["vm1"]
    assert (job.cbw_memory, job.spool_limit) == (256 * MiB, 8192)
    assert job.max_rate == PaceSpec(50 * MiB)
