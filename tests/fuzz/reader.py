"""Fuzz the archive readers for as long as you like.

    .venv/bin/python -m tests.fuzz.reader --minutes 120          # coverage-guided (atheris)
    .venv/bin/python -m tests.fuzz.reader --engine random --cases 3000 --seed 1
    .venv/bin/python -m tests.fuzz.reader --replay .fuzz/crashes/crash-*

Every case is an archive made from the seeds (tests/fuzz/seeds.py) by the structure-aware
mutator (tests/fuzz/mutate.py) and checked against every property of tests/fuzz/target.py.
A case that breaks one, runs longer than ``--timeout`` or needs more than ``--memory-mb``
is saved under ``--artifacts`` and named on the output; the run goes on.

Engines:

* ``atheris`` (the default when installed): libFuzzer through atheris, guided by the
  coverage of agent/ and driven by the structure-aware mutator; the corpus it grows is kept
  in ``--corpus`` (``.fuzz/corpus``), so the next run starts where this one stopped. Runs in
  child processes that libFuzzer bounds (``-timeout``, ``-rss_limit_mb``); after a crash the
  supervisor saves it and starts the next child.
* ``random``: the same mutator without coverage feedback, in one process with a time limit
  per case (an interval timer, and a watchdog thread for a hang inside C code), its peak
  RSS checked after each case and its address space bounded (RLIMIT_AS). Reproducible
  from ``--seed``; CI runs it briefly (tests/unit/test_fuzz_reader.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import resource
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DIR = ROOT / ".fuzz"


class CaseTimeout(BaseException):
    """A case ran past --timeout."""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.fuzz.reader", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, help="run this long (default: 1)")
    p.add_argument("--cases", type=int, help="run this many cases (instead of --minutes)")
    p.add_argument("--engine", choices=["auto", "atheris", "random"], default="auto")
    p.add_argument("--seed", type=int, default=None, help="random engine: the run's seed")
    p.add_argument("--corpus", type=Path, default=DEFAULT_DIR / "corpus")
    p.add_argument("--artifacts", type=Path, default=DEFAULT_DIR / "crashes")
    p.add_argument("--timeout", type=int, default=10, help="seconds per case (default 10)")
    p.add_argument("--memory-mb", type=int, default=1024,
                   help="peak RSS a case may reach, in MiB (default 1024: a reader needs "
                   "one record, at most 32 MiB, and its decompressed data)")
    p.add_argument("--max-len", type=int, default=1 << 20, help="largest case in bytes")
    p.add_argument("--engine-every", type=int, default=8,
                   help="run the restore engine (threads) on every Nth case (default 8)")
    p.add_argument("--report-every", type=float, default=60.0, help="seconds between reports")
    p.add_argument("--replay", nargs="+", type=Path, metavar="FILE",
                   help="check these saved cases and say what each does")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args(argv)
    if args.child:
        return _atheris_child(args, rest)
    if args.replay:
        return _replay(args.replay)
    engine = args.engine
    if engine == "auto":
        engine = "atheris" if _have_atheris() else "random"
    if args.minutes is None and args.cases is None:
        args.minutes = 1.0
    args.artifacts.mkdir(parents=True, exist_ok=True)
    print(f"fuzz: engine {engine}, " + (f"{args.cases} cases" if args.cases
          else f"{args.minutes:g} minutes") + f", crashes go to {args.artifacts}", flush=True)
    if engine == "atheris":
        return _atheris_supervisor(args)
    return _random(args)


def _have_atheris() -> bool:
    try:
        import atheris  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        return False
    return True


def _save(artifacts: Path, data: bytes, why: str, prefix: str = "crash") -> Path:
    name = f"{prefix}-{hashlib.sha1(data).hexdigest()[:16]}"
    path = artifacts / name
    path.write_bytes(data)
    (artifacts / f"{name}.txt").write_text(why)
    return path


def _summary(cases: int, seconds: float, outcomes: Counter[str], found: int) -> str:
    read = sum(v for k, v in outcomes.items() if k.startswith("read"))
    known = sum(v for k, v in outcomes.items() if "known issue" in k)
    told = sum(outcomes.values())
    rate = cases / seconds if seconds else 0.0
    pct = 100 * read / told if told else 0.0
    return (f"fuzz: {cases} cases in {seconds:.0f} s ({rate:.0f} cases/s), {pct:.0f}% read "
            f"as valid, {known} on known issues, {found} failing case(s) saved")


# --- random engine ---------------------------------------------------------------------------


def _random(args: argparse.Namespace) -> int:
    from tests.fuzz import target
    from tests.fuzz.mutate import crossover, mutate
    from tests.fuzz.seeds import SEEDS

    # The peak RSS is checked after each case; the address space is bounded too, so that a
    # case that would take the machine's memory fails with MemoryError first.
    limit = (args.memory_mb + 2048) << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    rng = random.Random(seed)
    print(f"fuzz: random engine, seed {seed}", flush=True)
    pool = list(SEEDS.values())
    deadline = time.monotonic() + args.minutes * 60 if args.minutes else None
    started = last = time.monotonic()
    outcomes: Counter[str] = Counter()
    found = 0
    current: list[bytes | float] = [b"", 0.0]  # the case running and when it started
    _watchdog(current, args)

    def alarm(_sig: int, _frame: object) -> None:
        raise CaseTimeout

    signal.signal(signal.SIGALRM, alarm)
    n = 0
    while (args.cases is None or n < args.cases) and (deadline is None
                                                      or time.monotonic() < deadline):
        a, b = rng.choice(pool), rng.choice(pool)
        data = crossover(rng, a, b, args.max_len) if rng.random() < 0.1 else mutate(
            rng, a, b, args.max_len)
        current[:] = [data, time.monotonic()]
        signal.setitimer(signal.ITIMER_REAL, args.timeout)
        try:
            label = target.check(data, engine=n % args.engine_every == 0)
        except CaseTimeout:
            label = "timeout"
            path = _save(args.artifacts, data, f"ran over {args.timeout} s", "timeout")
        except (target.Violation, MemoryError) as e:
            label = "violation"
            why = "".join(traceback.format_exception(e))
            path = _save(args.artifacts, data, why)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            current[1] = 0.0
        n += 1
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
        if peak_mb > args.memory_mb and label != "violation":
            label = "memory"
            path = _save(args.artifacts, data, f"peak RSS {peak_mb} MiB", "memory")
        outcomes[label] += 1
        if label in ("timeout", "violation", "memory"):
            found += 1
            print(f"fuzz: case {n} FAILS ({label}), saved as {path}", flush=True)
            if label == "memory":
                break  # the peak stays: later cases could not be told apart
        elif label.startswith("read") and len(pool) < 2000:
            pool.append(data)  # a valid mutant: a good parent for more
        now = time.monotonic()
        if now - last >= args.report_every:
            last = now
            print(_summary(n, now - started, outcomes, found), flush=True)
    target.cleanup()
    print(_summary(n, time.monotonic() - started, outcomes, found), flush=True)
    print(f"fuzz: outcomes: {dict(outcomes.most_common())}", flush=True)
    return 1 if found else 0


def _watchdog(current: list[bytes | float], args: argparse.Namespace) -> None:
    """A case stuck where the interval timer cannot interrupt it (inside C code) is saved,
    and the process ends."""

    def watch() -> None:
        while True:
            time.sleep(1)
            began = current[1]
            assert isinstance(began, float)
            if began and time.monotonic() - began > 3 * args.timeout:
                data = current[0]
                assert isinstance(data, bytes)
                path = _save(args.artifacts, data, "hung (inside C code?)", "hang")
                print(f"fuzz: a case hangs, saved as {path}", flush=True)
                os._exit(3)

    threading.Thread(target=watch, daemon=True, name="fuzz-watchdog").start()


# --- atheris ------------------------------------------------------------------------------


def _atheris_supervisor(args: argparse.Namespace) -> int:
    """Children run libFuzzer until the time is up; one that dies on a failing case is
    followed by the next, which starts from the corpus the earlier ones grew."""
    from tests.fuzz.seeds import SEEDS

    args.corpus.mkdir(parents=True, exist_ok=True)
    for name, data in SEEDS.items():
        seed_file = args.corpus / f"seed-{name}"
        if not seed_file.exists():
            seed_file.write_bytes(data)
    logs = args.artifacts.parent / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    deadline = started + args.minutes * 60 if args.minutes else None
    cases = 0
    found = 0
    child_no = 0
    outcomes: Counter[str] = Counter()  # of the cases children told about (most of them)
    while True:
        left = None if deadline is None else int(deadline - time.monotonic())
        if (left is not None and left < 5) or (args.cases is not None and cases >= args.cases):
            break
        child_no += 1
        flags = [f"-timeout={args.timeout}", f"-rss_limit_mb={args.memory_mb}",
                 f"-max_len={args.max_len}", f"-artifact_prefix={args.artifacts}/",
                 "-print_final_stats=1", f"-seed={random.randrange(1, 1 << 31)}",
                 "-print_pcs=0", "-reduce_inputs=1", "-mutate_depth=2"]
        flags.append(f"-max_total_time={left}" if left is not None
                     else f"-runs={args.cases - cases}")
        cmd = [sys.executable, "-m", "tests.fuzz.reader", "--child",
               f"--engine-every={args.engine_every}", str(args.corpus), *flags]
        log_path = logs / f"child-{os.getpid()}-{child_no}.log"
        ran, crash = _run_child(cmd, log_path, args.report_every, started, cases, found,
                                outcomes)
        cases += ran
        if crash is not None:
            found += 1
            print(f"fuzz: child {child_no} stopped on a failing case, saved as {crash} "
                  f"(its log: {log_path})", flush=True)
        elif ran == 0:
            print(f"fuzz: child {child_no} ran nothing; see {log_path}", flush=True)
            return 2
    print(_summary(cases, time.monotonic() - started, outcomes, found), flush=True)
    print(f"fuzz: outcomes: {dict(outcomes.most_common())}", flush=True)
    return 1 if found else 0


_OUTCOMES = "fuzz-outcomes: "
_EXEC = re.compile(r"^#(\d+)\s")
_DONE = re.compile(r"^(?:Done (\d+) runs|stat::number_of_executed_units: (\d+))")
_UNIT = re.compile(r"Test unit written to (\S+)")


@dataclass
class _ChildState:
    """What a libFuzzer child said so far."""

    ran: int = 0  # cases
    outcomes: Counter[str] = field(default_factory=Counter)  # as the child last told them
    crash: str | None = None  # the failing case it saved
    cov: str = ""  # its coverage and corpus, for the report


def _run_child(cmd: list[str], log_path: Path, every: float, started: float, before: int,
               found: int, totals: Counter[str]) -> tuple[int, str | None]:
    """Run one libFuzzer child; return the cases it ran and the failing case it saved.
    Reports every ``every`` seconds from what the child last printed."""
    state = _ChildState()

    def follow(stream: IO[str], log: IO[str]) -> None:
        for line in stream:
            log.write(line)
            m = _EXEC.match(line) or _DONE.match(line)
            if m:
                state.ran = max(state.ran, int(next(g for g in m.groups() if g)))
            m2 = _UNIT.search(line)
            if m2:
                state.crash = m2.group(1)
            if line.startswith(_OUTCOMES):
                state.outcomes = Counter(json.loads(line[len(_OUTCOMES):]))
            cov = re.search(r"cov: (\d+) ft: (\d+) corp: (\S+)", line)
            if cov:
                state.cov = f", coverage {cov.group(1)} edges, corpus {cov.group(3)}"

    with open(log_path, "w") as log, subprocess.Popen(
            cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, errors="replace") as child:
        assert child.stdout is not None
        reader = threading.Thread(target=follow, args=(child.stdout, log), daemon=True)
        reader.start()
        while True:
            reader.join(every)
            if not reader.is_alive():
                break
            print(_summary(before + state.ran, time.monotonic() - started,
                           totals + state.outcomes, found) + state.cov, flush=True)
        child.wait()
    totals.update(state.outcomes)
    return state.ran, state.crash


def _atheris_child(args: argparse.Namespace, rest: list[str]) -> int:
    import atheris

    with atheris.instrument_imports(include=["agent"]):
        from tests.fuzz import target
    from tests.fuzz.mutate import crossover, mutate, repair
    from tests.fuzz.seeds import SEEDS

    donors = list(SEEDS.values())
    count = [0]
    outcomes: Counter[str] = Counter()
    told = [time.monotonic()]

    def one(data: bytes) -> None:
        count[0] += 1
        outcomes[target.check(data, engine=count[0] % args.engine_every == 0)] += 1
        if count[0] % 256 == 0 and time.monotonic() - told[0] > 10:
            told[0] = time.monotonic()
            print(f"{_OUTCOMES}{json.dumps(outcomes)}", file=sys.stderr, flush=True)

    def mutator(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        if rng.random() < 0.25:  # libFuzzer's own byte-level mutations, often made whole again
            out = bytes(atheris.Mutate(data, max_size))
            return repair(out)[:max_size] if rng.random() < 0.5 else out
        # The corpus fills with damaged archives (their refusals are new coverage): go back
        # to a valid archive now and then, so deep checks keep being reached.
        pick = rng.random()
        if pick < 0.25:
            data = rng.choice(donors)
        elif pick < 0.45:
            data = repair(data)
        return mutate(rng, data, rng.choice(donors), max_size)

    def cross(a: bytes, b: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        if rng.random() < 0.5:  # splices of two archives are mostly refused at once
            return mutate(rng, a, b, max_size)
        return crossover(rng, a, b, max_size)

    atheris.Setup([sys.argv[0], *rest], one, custom_mutator=mutator, custom_crossover=cross)
    try:
        atheris.Fuzz()
    finally:
        target.cleanup()
    return 0


# --- replay -------------------------------------------------------------------------------


def _replay(paths: list[Path]) -> int:
    from tests.fuzz import target

    bad = 0
    for path in paths:
        if path.suffix == ".txt":
            continue
        try:
            print(f"{path}: {target.check(path.read_bytes())}")
        except target.Violation as e:
            bad += 1
            print(f"{path}: VIOLATION: {e}")
    target.cleanup()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
