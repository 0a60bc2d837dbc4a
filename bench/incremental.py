#!/usr/bin/env python3
"""Incremental backup time against full backup time, side by side in one run.

A VM (TCG, no guest code) has an 8 GiB qcow2 disk: half data (of that, half random and half
text-like), half holes, as in bench/run.py. Each round makes a full live backup, then changes
1% of the disk's 64 KiB clusters (random ones, random data) through an NBD export of the
disk's node (the bitmaps see every write to the node, as they see the guest's), then makes
an incremental live backup. Both stream, compressed by default, into a pipe read by
``cat >/dev/null``, and both are timed as the whole command (QMP, plugin start, snapshot,
copy, teardown). Target: incremental time <= 5% of full backup time.

    .venv/bin/python bench/incremental.py [--runs 3] [--size-gib 8]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import SMOKE_NOTE, add_smoke_flag, make_half_data  # noqa: E402
from tests.integration.vm import Disk, Vm, VmFactory  # noqa: E402

AGENT = str(Path(sys.executable).parent / "backup-agent")
MiB = 1024 * 1024
GiB = 1024 * MiB
CLUSTER = 64 * 1024
TARGET = 0.05


def backup(vm: Vm, mode: str) -> tuple[float, dict[str, object]]:
    """Time one ``backup --qmp ... -o - | cat >/dev/null``; the archive's info comes from a
    second, untimed read of the stream's summary on stderr."""
    cmd = (f"{AGENT} backup --qmp {vm.agent_qmp} --mode {mode} --progress none -o - "
           "| cat >/dev/null")
    t0 = time.monotonic()
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True,
                          text=True, check=False)
    secs = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{mode} backup failed: {proc.stderr.strip()}")
    line = next(ln for ln in proc.stderr.splitlines() if "backed up" in ln)
    return secs, {"summary": line.split(": ", 1)[1]}


def change(vm: Vm, sock: str, fraction: float, size: int, rng: random.Random) -> int:
    """Write random data over ``fraction`` of the disk's clusters; returns bytes written."""
    mon = vm.qmp
    mon.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    mon.execute("block-export-add", {"type": "nbd", "id": "bench", "node-name": "vda-fmt",
                                     "name": "bench", "writable": True})
    try:
        h = nbd.NBD()
        h.connect_uri(f"nbd+unix:///bench?socket={sock}")
        clusters = rng.sample(range(size // CLUSTER), int(size // CLUSTER * fraction))
        block = os.urandom(CLUSTER)
        for c in clusters:
            h.pwrite(block, c * CLUSTER)
        h.flush()
        h.shutdown()
    finally:
        mon.execute("block-export-del", {"id": "bench", "mode": "hard"})
        while mon.execute("query-block-exports"):
            time.sleep(0.02)
        mon.execute("nbd-server-stop")
    return len(clusters) * CLUSTER


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size-gib", type=int, default=8)
    ap.add_argument("--fraction", type=float, default=0.01)
    add_smoke_flag(ap)
    args = ap.parse_args()
    if args.smoke:
        args.runs = 1
    size = 256 * MiB if args.smoke else args.size_gib * GiB
    work = Path(tempfile.mkdtemp(prefix="ba-inc-", dir=ROOT / "bench"))
    rng = random.Random(7)
    try:
        raw = work / "disk.raw"
        print(f"building a {size / GiB:g} GiB half-data qcow2 image...", file=sys.stderr)
        make_half_data(raw, size)
        image = work / "disk.qcow2"
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(image)],
                       check=True)
        raw.unlink()
        os.sync()
        fulls: list[float] = []
        incs: list[float] = []
        with VmFactory(Path(tempfile.mkdtemp(prefix="ba-"))) as vms:
            # share-rw: our NBD export writes beside the device (the "guest" here)
            qemu_args = Disk(image, "qcow2", "vda").qemu_args()
            qemu_args[-1] += ",share-rw=on"
            vm = vms.start(extra_args=qemu_args)
            for i in range(args.runs):
                f, finfo = backup(vm, "full")
                changed = change(vm, str(vms.sock_dir / "bench.sock"), args.fraction, size,
                                 rng)
                n, ninfo = backup(vm, "incremental")
                fulls.append(f)
                incs.append(n)
                print(f"run {i + 1}: full {f:.2f} s ({finfo['summary']}); changed "
                      f"{changed / MiB:.0f} MiB; incremental {n:.2f} s "
                      f"({ninfo['summary']})", file=sys.stderr)
            shutil.rmtree(vms.sock_dir, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    full_s, inc_s = statistics.median(fulls), statistics.median(incs)
    ratio = inc_s / full_s
    ok = ratio <= TARGET
    print(json.dumps({"runs": args.runs, "size_gib": size / GiB, "fraction": args.fraction,
                      "full_s": fulls, "incremental_s": incs}))
    print()
    print("| case | median s | vs full | target | met |")
    print("|---|---:|---:|---|---|")
    print(f"| full live backup, {size / GiB:g} GiB half data, pipe | {full_s:.2f} | 1.00x "
          "| | |")
    print(f"| incremental, {args.fraction:.0%} of clusters changed | {inc_s:.2f} | "
          f"{ratio:.3f}x | <= {TARGET}x | {'yes' if ok else 'NO'} |")
    if args.smoke:
        print(SMOKE_NOTE)
    return 0 if ok or args.smoke else 1


if __name__ == "__main__":
    sys.exit(main())
