#!/usr/bin/env python3
"""``s3://`` archives against a local SeaweedFS (``weed mini`` on the loopback), in one run.

1. Backup of the half-data image (bench/run.py's: 2 GiB, 1 GiB of data, half random, half
   text) to ``s3://`` vs the same backup into ``/dev/null``. Target <= 1.2x.
2. The same backup to ``s3://`` vs boto3's own ``upload_fileobj`` of the same archive bytes
   from a pipe (``cat ARCHIVE | python -c ...upload_fileobj(sys.stdin.buffer, ...)``, its
   defaults: 8 MiB parts, 10 threads). Target: at least 0.9x its throughput, so at most
   1.11x its time.
3. Peak RSS of a backup of an 8 GiB fully written disk to ``s3://``. Target < 256 MiB.
4. Restore of the archive from ``s3://`` vs from a local file, into raw files. Target
   <= 1.2x.

The server runs on the same 2 cores as the agent: both sides of each comparison pay it.
Only ratios measured in one run mean anything on these shared machines.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
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
    max_rss_of,
    print_table,
    qemu_img_create,
    qemu_nbd,
    sh,
    side_by_side,
)
from tests.s3util import start_weed

BUCKET = "bench"
_names = itertools.count()

UPLOAD = ("import sys, boto3; boto3.client('s3').upload_fileobj(sys.stdin.buffer, "
          f"'{BUCKET}', sys.argv[1])")


def fresh(stem: str) -> str:
    """A new object name (the agent never replaces one): a shell word for side_by_side."""
    return f"s3://{BUCKET}/{stem}-$(date +%s%N).arc"


def bench_backup_restore(out: Path, runs: int, size: int) -> list[Row]:
    img = out / "half.raw"
    make_half_data(img, size)
    arc = out / "half.arc"
    rows = []
    os.sync()
    with qemu_nbd(img, "raw") as uri:
        src = f"--source disk='{uri}'"
        a, p = side_by_side(f"{AGENT} backup -q {src} -o {fresh('half')}",
                            f"{AGENT} backup -q {src} -o /dev/null", runs)
        rows.append(Row(f"{size / GiB:g} GiB half data, backup to s3://", a, p,
                        "same into /dev/null", "<= 1.2x", a <= 1.2 * p))
        sh(f"{AGENT} backup -q {src} -o {arc}")  # the bytes the peer uploads
        a, p = side_by_side(f"{AGENT} backup -q {src} -o {fresh('half')}",
                            f"cat {arc} | {sys.executable} -c \"{UPLOAD}\" "
                            "peer-$(date +%s%N).arc", runs)
        rows.append(Row("same, vs boto3 upload_fileobj of its bytes", a, p,
                        "cat ARC | upload_fileobj", "<= 1.11x (>= 0.9x rate)",
                        a <= p / 0.9, f"archive {arc.stat().st_size / MiB:.0f} MiB"))
    key = f"s3://{BUCKET}/restore-{next(_names)}.arc"
    sh(f"{AGENT} backup -q --image disk={img} -o {key}")
    r1, r2 = out / "r1", out / "r2"
    a, p = side_by_side(f"{AGENT} restore -q {key} --to-dir {r1}",
                        f"{AGENT} restore -q {arc} --to-dir {r2}", runs,
                        before_agent=f"rm -rf {r1}", before_peer=f"rm -rf {r2}")
    rows.append(Row("restore from s3:// to raw", a, p, "same from a local file",
                    "<= 1.2x", a <= 1.2 * p))
    if (r1 / "disk.raw").read_bytes() != img.read_bytes():
        raise SystemExit("the restore from s3:// differs from the disk")
    for f in (img, arc):
        f.unlink()
    shutil.rmtree(r1)
    shutil.rmtree(r2)
    return rows


def bench_rss(out: Path, size: int) -> list[Row]:
    img = out / "full.raw"
    qemu_img_create(img, size)
    with open(img, "r+b") as f:
        block = os.urandom(16 * MiB)
        for _ in range(size // len(block)):
            f.write(block)
    os.sync()
    with qemu_nbd(img, "raw") as uri:
        t, rss = max_rss_of([AGENT, "backup", "-q", "--source", f"disk={uri}", "-o",
                             f"s3://{BUCKET}/rss-{next(_names)}.arc"])
    img.unlink()
    return [Row(f"{size / GiB:g} GiB fully written raw to s3://, peak RSS", t, None, "-",
                "RSS < 256 MiB", rss < 256 * MiB, f"peak RSS {rss / MiB:.0f} MiB")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    add_smoke_flag(ap)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size", type=float, default=2.0, help="GiB of the half-data image")
    ap.add_argument("--rss-size", type=float, default=8.0, help="GiB of the RSS case's disk")
    args = ap.parse_args()
    runs = 1 if args.smoke else args.runs
    size = 64 * MiB if args.smoke else int(args.size * GiB)
    rss_size = 256 * MiB if args.smoke else int(args.rss_size * GiB)
    out = Path(tempfile.mkdtemp(prefix="ba-bench-s3-"))
    weed = None
    try:
        weed = start_weed(out / "weed", buckets=(BUCKET,))
        os.environ.update(weed.env())
        rows = bench_backup_restore(out, runs, size) + bench_rss(out, rss_size)
    finally:
        if weed is not None:
            weed.stop()
        shutil.rmtree(out, ignore_errors=True)
    print_table(rows)
    if args.smoke:
        print(SMOKE_NOTE)
    return 0 if args.smoke or all(r.ok is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
