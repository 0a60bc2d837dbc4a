#!/usr/bin/env python3
"""Benchmarks of the pull engine against its peers, side by side in one run.

Run with ``make bench`` (or ``.venv/bin/python bench/run.py [--quick]``). Builds
images with qemu-img under bench/out/ (about 11 GiB of sparse files, removed at
the end), serves them with qemu-nbd over a Unix socket (``--shared`` so
multi-conn is allowed) and prints, for each case, the median of several runs,
the peer's median and the ratio against the target. The machine is shared and
noisy: only ratios measured in the same run mean anything.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
AGENT = str(Path(sys.executable).parent / "backup-agent")
MiB = 1024 * 1024
GiB = 1024 * MiB


@dataclass
class Row:
    case: str
    agent: float
    peer: float | None
    peer_name: str
    target: str
    ok: bool | None  # None: a row for information, with no target
    note: str = ""


def sh(cmd: str) -> float:
    """Run a shell pipeline (pipefail), return its wall time."""
    t = time.perf_counter()
    subprocess.run(["bash", "-o", "pipefail", "-c", cmd], check=True, stdin=subprocess.DEVNULL)
    return time.perf_counter() - t


def settle(before: str | None = None) -> None:
    """Run a reset command, then flush dirty pages so no writeback from set-up (or the
    previous run) competes with the run measured next."""
    if before:
        subprocess.run(["bash", "-c", before], check=True)
    os.sync()


def side_by_side(agent: str, peer: str, runs: int,
                 before_agent: str | None = None, before_peer: str | None = None
                 ) -> tuple[float, float]:
    """Medians of agent and peer, runs interleaved so that noise hits both alike."""
    a, p = [], []
    for _ in range(runs):
        settle(before_agent)
        a.append(sh(agent))
        settle(before_peer)
        p.append(sh(peer))
    return statistics.median(a), statistics.median(p)


def max_rss_of(cmd: list[str]) -> tuple[float, int]:
    """Wall time and peak RSS (bytes) of one child process."""
    t = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os.execvp(cmd[0], cmd)
    _, status, usage = os.wait4(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return time.perf_counter() - t, usage.ru_maxrss * 1024


@contextmanager
def qemu_nbd(image: Path, fmt: str, shared: int = 8) -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="ba-bench-")
    sock = os.path.join(d, "s")
    proc = subprocess.Popen(["qemu-nbd", "-f", fmt, "-r", "--persistent", f"--shared={shared}",
                             f"--socket={sock}", str(image)])
    try:
        for _ in range(500):
            if os.path.exists(sock):
                break
            time.sleep(0.01)
        yield f"nbd+unix:///?socket={sock}"
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(d, ignore_errors=True)


def qemu_img_create(path: Path, size: int) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(path), str(size)], check=True)


def make_half_data(path: Path, size: int) -> None:
    """Half data, half holes, in 32 MiB stripes; of the data, half random, half text-like.

    qemu-img creates the image; the data is written here, since qemu-io's patterns are
    one repeated byte and would make every compressor look brilliant."""
    qemu_img_create(path, size)
    rng = random.Random(42)
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz ") for _ in range(rng.randint(2, 9)))
             for _ in range(2000)]
    text = b" ".join(rng.choice(words) for _ in range(600_000))[: 4 * MiB]
    stripe = 32 * MiB
    with open(path, "r+b") as f:
        for i, off in enumerate(range(0, size, 2 * stripe)):
            f.seek(off)
            for _ in range(stripe // (4 * MiB)):
                f.write(os.urandom(4 * MiB) if i % 2 == 0 else text)


#: What every bench script prints last after a --smoke run.
SMOKE_NOTE = "\nsmoke run at the smallest scale: the figures mean nothing, no target judged"


def add_smoke_flag(ap: argparse.ArgumentParser) -> None:
    """Every bench script's ``--smoke``: the test suite runs each so (test_bench_smoke.py)."""
    ap.add_argument("--smoke", action="store_true",
                    help="smallest scale, one run: checks that the script works (exit 0) "
                         "and judges no target")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="1 run per case, smaller images")
    add_smoke_flag(ap)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out",
                    help="scratch directory, removed at the end (bench/out)")
    ap.add_argument("--only", choices=["stream", "empty", "rss", "encryption"],
                    help="run one group of cases")
    ap.add_argument("--size", type=int, metavar="MiB",
                    help="image size of the stream and encryption cases (a busy machine)")
    args = ap.parse_args()
    small = args.quick or args.smoke
    runs = 1 if small else args.runs
    out = args.out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rows: list[Row] = []
    size = (args.size * MiB if args.size else 64 * MiB if args.smoke else
            512 * MiB if args.quick else 2 * GiB)
    try:
        if args.only in (None, "stream"):
            rows += bench_stream(out, runs, size)
        if args.only in (None, "encryption"):
            rows += bench_encryption(out, runs, size)
        if args.only in (None, "empty"):
            rows += bench_empty(out)
        if args.only in (None, "rss"):
            rows += bench_rss(out, 256 * MiB if args.smoke else 1 * GiB if args.quick
                              else 8 * GiB)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print_table(rows)
    if args.smoke:
        print(SMOKE_NOTE)
    return 0 if args.smoke or all(r.ok is not False for r in rows) else 1


def bench_stream(out: Path, runs: int, size: int) -> list[Row]:
    img = out / "half.raw"
    make_half_data(img, size)
    arc = out / "half.arc"
    rows = []
    os.sync()
    with qemu_nbd(img, "raw") as uri:
        src = f"--source disk='{uri}'"
        a, p = side_by_side(f"{AGENT} backup -q {src} --compress none -o - | cat >/dev/null",
                            f"nbdcopy '{uri}' - | cat >/dev/null", runs)
        rows.append(Row("half-data raw, --compress none, into a pipe", a, p,
                        "nbdcopy URI - | cat", "<= 1.0x", a <= 1.0 * p))
        a, p = side_by_side(f"{AGENT} backup -q {src} -o - | cat >/dev/null",
                            f"nbdcopy '{uri}' - | zstd -q -1 -T2 >/dev/null", runs)
        rows.append(Row("half-data raw, default compression, into a pipe", a, p,
                        "nbdcopy URI - | zstd -1 -T2", "<= 0.7x", a <= 0.7 * p))
        a, p = side_by_side(f"{AGENT} backup -q {src} --compress none -o /dev/null",
                            f"nbdcopy '{uri}' null:", runs)
        rows.append(Row("half-data raw, --compress none, to /dev/null", a, p,
                        "nbdcopy URI null:", "<= 1.5x", a <= 1.5 * p))
        # The same through the qemu-nbd the agent runs itself (--image), whose malloc is
        # told to keep request buffers (agent/nbd/qemu_nbd.py): shows what the shared
        # server's page faults cost. For information; the target is the row above.
        a, p = side_by_side(f"{AGENT} backup -q --image disk={img} --compress none "
                            "-o /dev/null", f"nbdcopy '{uri}' null:", runs)
        rows.append(Row("same, --image (own qemu-nbd), to /dev/null", a, p,
                        "nbdcopy URI null:", "-", None))
        sh(f"{AGENT} backup -q {src} -o {arc}")
        restored = out / "restored"
        peer_file = out / "peer.raw"
        a, p = side_by_side(f"cat {arc} | {AGENT} restore -q - --to-dir {restored}",
                            f"nbdcopy '{uri}' {peer_file}", runs,
                            before_agent=f"rm -rf {restored}",
                            before_peer=f"rm -f {peer_file} && truncate -s {size} {peer_file}")
        rows.append(Row("restore of that archive from a pipe to raw", a, p,
                        "nbdcopy URI file.raw", "<= 1.2x", a <= 1.2 * p,
                        f"archive {arc.stat().st_size / MiB:.0f} MiB, zstd:1"))
    subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(img),
                    str(restored / "disk.raw")], check=True)
    for f in (img, arc, peer_file):
        f.unlink()
    shutil.rmtree(restored)
    return rows


def bench_encryption(out: Path, runs: int, size: int) -> list[Row]:
    """The half-data image backed up into a pipe (zstd) with and without --encrypt-to, and
    both archives restored from a pipe: what encryption costs, in the same run."""
    img = out / "half-enc.raw"
    make_half_data(img, size)
    key = out / "bench.key"
    pub = subprocess.run([AGENT, "key", "generate", "-q", "-o", str(key)], check=True,
                         capture_output=True, text=True).stdout.strip()
    plain, sealed = out / "plain.arc", out / "sealed.arc"
    rows = []
    os.sync()
    with qemu_nbd(img, "raw") as uri:
        src = f"--source disk='{uri}'"
        a, p = side_by_side(f"{AGENT} backup -q {src} --encrypt-to {pub} -o - | cat >/dev/null",
                            f"{AGENT} backup -q {src} -o - | cat >/dev/null", runs)
        rows.append(Row("half-data raw, zstd, encrypted, into a pipe", a, p,
                        "the same unencrypted", "<= 1.15x", a <= 1.15 * p))
        sh(f"{AGENT} backup -q {src} -o {plain}")
        sh(f"{AGENT} backup -q {src} --encrypt-to {pub} -o {sealed}")
    restored = out / "restored-enc"
    a, p = side_by_side(f"cat {sealed} | {AGENT} restore -q - --key {key} --to-dir {restored}",
                        f"cat {plain} | {AGENT} restore -q - --to-dir {restored}", runs,
                        before_agent=f"rm -rf {restored}", before_peer=f"rm -rf {restored}")
    rows.append(Row("restore of the encrypted archive from a pipe", a, p,
                    "the same unencrypted", "<= 1.15x", a <= 1.15 * p,
                    f"archives {plain.stat().st_size / MiB:.0f} / "
                    f"{sealed.stat().st_size / MiB:.0f} MiB"))
    subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(img),
                    str(restored / "disk.raw")], check=True)
    for f in (img, plain, sealed, key):
        f.unlink()
    shutil.rmtree(restored)
    return rows


def bench_empty(out: Path) -> list[Row]:
    img = out / "empty.qcow2"
    arc = out / "empty.arc"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "1T"], check=True)
    os.sync()
    with qemu_nbd(img, "qcow2") as uri:
        t = sh(f"{AGENT} backup -q --source disk='{uri}' -o {arc}")
    n = arc.stat().st_size
    return [Row("1 TiB empty qcow2, full backup", t, None, "-", "< 2 s, archive < 1 MiB",
                t < 2 and n < MiB, f"archive {n} bytes")]


def bench_rss(out: Path, size: int) -> list[Row]:
    img = out / "full.raw"
    qemu_img_create(img, size)
    with open(img, "r+b") as f:
        block = os.urandom(16 * MiB)
        for _ in range(size // len(block)):
            f.write(block)
    os.sync()
    with qemu_nbd(img, "raw") as uri:
        t, rss = max_rss_of([AGENT, "backup", "-q", "--source", f"disk={uri}",
                             "-o", "/dev/null"])
    img.unlink()
    return [Row(f"{size / GiB:g} GiB fully written raw, peak RSS", t, None, "-",
                "RSS < 256 MiB", rss < 256 * MiB, f"peak RSS {rss / MiB:.0f} MiB")]


def print_table(rows: list[Row]) -> None:
    print(f"\nbackup-agent benchmarks: {os.cpu_count()} cores, "
          f"{resource.getpagesize()} B pages, python {sys.version.split()[0]}\n")
    print(f"| {'case':<48} | {'agent s':>8} | {'peer s':>8} | {'ratio':>6} | "
          f"{'target':<22} | {'met':<3} | peer / note")
    print(f"|{'-' * 50}|{'-' * 10}|{'-' * 10}|{'-' * 8}|{'-' * 24}|{'-' * 5}|------------")
    for r in rows:
        ratio = f"{r.agent / r.peer:.2f}x" if r.peer else "-"
        peer = f"{r.peer:.2f}" if r.peer else "-"
        note = "; ".join(x for x in (r.peer_name if r.peer else "", r.note) if x)
        print(f"| {r.case:<48} | {r.agent:>8.2f} | {peer:>8} | {ratio:>6} | {r.target:<22} | "
              f"{'-' if r.ok is None else 'yes' if r.ok else 'NO':<3} | {note}")


if __name__ == "__main__":
    sys.exit(main())
