"""CI's short run of the reader fuzzer (tests/fuzz/, docs/FUZZING.md), and checks that its
mutator makes what the fuzzer needs: valid seeds, archives that get past the checksums,
the same case from the same seed.

The run goes through the very command a developer runs for hours, in a child process (its
address space is bounded with RLIMIT_AS, which must not bound pytest's), with a fixed seed
and a fixed number of cases, so that CI always checks the same cases.
"""

from __future__ import annotations

import importlib.util
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from agent.errors import ArchiveError
from tests.fuzz import target
from tests.fuzz.mutate import crossover, mutate, parse, repair
from tests.fuzz.seeds import SEEDS
from tests.unit.archive_util import read_archive

ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path: Path, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.fuzz.reader", "--artifacts", str(tmp_path / "crashes"),
         "--corpus", str(tmp_path / "corpus"), *args],
        cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    saved = sorted((tmp_path / "crashes").glob("*.txt"))
    detail = "\n\n".join(p.read_text()[-3000:] for p in saved[:3])
    assert proc.returncode == 0, f"the fuzzer failed:\n{out}\n{detail}"
    return out


@pytest.mark.timeout(240)
@pytest.mark.slow
def test_short_fuzz_run_finds_nothing(tmp_path: Path) -> None:
    out = _run(tmp_path, "--engine", "random", "--cases", "2500", "--seed", "1")
    assert "fuzz: 2500 cases" in out, out
    assert " 0 failing case(s)" in out, out


@pytest.mark.timeout(120)
@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris not installed")
@pytest.mark.slow
def test_the_coverage_guided_engine_runs(tmp_path: Path) -> None:
    """The long-run engine (atheris) starts, runs cases through the mutator and ends."""
    out = _run(tmp_path, "--engine", "atheris", "--cases", "300")
    assert "fuzz: 300 cases" in out, out
    assert len(list((tmp_path / "corpus").iterdir())) > len(SEEDS)  # it grew the corpus


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_every_seed_is_valid_and_keeps_every_property(name: str) -> None:
    read_archive(SEEDS[name])
    assert target.check(SEEDS[name]).startswith("read")
    assert repair(SEEDS[name]) == SEEDS[name].rstrip(b"\0") + (
        b"" if name != "full-padded" else bytes(100))


def test_mutants_are_reproducible_and_reach_past_the_checksums() -> None:
    seeds = list(SEEDS.values())

    def mutants(seed: int) -> list[bytes]:
        rng = random.Random(seed)
        return [mutate(rng, rng.choice(seeds), rng.choice(seeds)) for _ in range(300)]

    first = mutants(5)
    assert first == mutants(5)
    outcomes: Counter[str] = Counter()
    for data in first:
        try:
            read_archive(data)
            outcomes["read"] += 1
        except ArchiveError as e:
            checksum = "checksum" in str(e) or "CRC" in str(e) or "does not seal" in str(e)
            outcomes["checksum" if checksum else "past the checksums"] += 1
    # Most refusals come from the checks behind the checksums, and some mutants are valid
    # archives with other content: a new parent for more mutants.
    assert outcomes["past the checksums"] > 2 * outcomes["checksum"], outcomes
    assert outcomes["read"] > 10, outcomes


def test_crossover_splices_records_of_two_archives() -> None:
    rng = random.Random(3)
    out = crossover(rng, SEEDS["full"], SEEDS["stored"])
    parts = parse(out)
    assert parts is not None and parts.records
