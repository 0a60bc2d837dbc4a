#!/usr/bin/env python3
"""Proxmox VMA against our own format, side by side in one run (docs/VMA.md).

1. Restore from a pipe into a sparse raw file: a VMA archive of the disk vs our archive of
   the same disk (default zstd:1; the uncompressed one for information). Target: VMA
   <= 1.2x ours.
2. Backup of the disk (served by qemu-nbd over a Unix socket) into a pipe: ``--format
   vma`` vs ours with ``--compress none``. Target: VMA <= 1.2x ours.

The disk is half data (half random, half text) and half holes, in 32 MiB stripes, as in
bench/run.py: 2 GiB with 1 GiB of data by default. Only ratios measured in one run mean
anything on these shared machines.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.run import (
    AGENT,
    SMOKE_NOTE,
    GiB,
    MiB,
    Row,
    add_smoke_flag,
    make_half_data,
    print_table,
    qemu_nbd,
    settle,
    sh,
    side_by_side,
)


def bench(work: Path, size: int, runs: int) -> list[Row]:
    img = work / "half.raw"
    make_half_data(img, size)
    vma, arc, plain = work / "disk.vma", work / "disk.arc", work / "plain.arc"
    rows = []
    settle()
    with qemu_nbd(img, "raw") as uri:
        src = f"--source disk='{uri}'"
        a, p = side_by_side(f"{AGENT} backup -q {src} --format vma -o - | cat >/dev/null",
                            f"{AGENT} backup -q {src} --compress none -o - | cat >/dev/null",
                            runs)
        rows.append(Row("backup into a pipe: VMA vs ours uncompressed", a, p,
                        "ours --compress none", "<= 1.2x", a <= 1.2 * p))
        sh(f"{AGENT} backup -q {src} --format vma -o {vma}")
        sh(f"{AGENT} backup -q {src} -o {arc}")
        sh(f"{AGENT} backup -q {src} --compress none -o {plain}")
    out_v, out_n = work / "rv", work / "rn"
    a, p = side_by_side(f"cat {vma} | {AGENT} restore -q - --to-dir {out_v}",
                        f"cat {arc} | {AGENT} restore -q - --to-dir {out_n}", runs,
                        before_agent=f"rm -rf {out_v}", before_peer=f"rm -rf {out_n}")
    rows.append(Row("restore from a pipe: VMA vs ours (zstd:1)", a, p, "ours, zstd:1",
                    "<= 1.2x", a <= 1.2 * p,
                    f"VMA {vma.stat().st_size / MiB:.0f} MiB, ours "
                    f"{arc.stat().st_size / MiB:.0f} MiB"))
    a, p = side_by_side(f"cat {vma} | {AGENT} restore -q - --to-dir {out_v}",
                        f"cat {plain} | {AGENT} restore -q - --to-dir {out_n}", runs,
                        before_agent=f"rm -rf {out_v}", before_peer=f"rm -rf {out_n}")
    rows.append(Row("restore from a pipe: VMA vs ours uncompressed", a, p,
                    "ours, --compress none", "-", None))
    for out in (out_v, out_n):
        subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(img),
                        str(out / "disk.raw")], check=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size-gib", type=float, default=2)
    add_smoke_flag(ap)
    args = ap.parse_args()
    size = 64 * MiB if args.smoke else int(args.size_gib * GiB)
    runs = 1 if args.smoke else args.runs
    work = Path(tempfile.mkdtemp(prefix="ba-vma-", dir=Path(__file__).resolve().parent))
    try:
        rows = bench(work, size, runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\ndisk {size / GiB:g} GiB, half data; {runs} run(s) each, medians")
    print_table(rows)
    if args.smoke:
        print(SMOKE_NOTE)
    return 0 if args.smoke or all(r.ok is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
