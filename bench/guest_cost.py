#!/usr/bin/env python3
"""What copy-before-write costs a guest writer, side by side in one run.

The worst case of issue 4: every write hits a cluster not yet copied. A
qemu-storage-daemon holds a 1 GiB raw disk; ``qemu-img bench -w -c 8192 -d 16 -s 64k
-S 128k`` writes through an NBD export of either the disk itself (no backup), or a
copy-before-write filter whose target is

- our nbdkit plugin (agent/cbw, memory store, no spill), or
- a local raw scratch file (classic fleecing).

Each configuration runs ``--runs`` times, interleaved; medians, ratios against the
scratch file and the no-backup figure, and the mean latency that queue depth and
throughput imply (Little's law: qemu-img bench reports no percentiles).

    .venv/bin/python bench/guest_cost.py [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.cbw.server import CbwTargetServer

MiB = 1024 * 1024
GiB = 1024 * MiB
COUNT, DEPTH, SIZE, STEP = 8192, 16, 64 * 1024, 128 * 1024


@contextmanager
def storage_daemon(work: Path, target: dict[str, str] | None) -> Iterator[str]:
    """A qemu-storage-daemon exporting the disk, through a CBW filter if ``target``."""
    disk = work / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(GiB)
    sock = str(work / "qsd.sock")
    args = ["qemu-storage-daemon",
            "--blockdev", f"file,node-name=disk-file,filename={disk}",
            "--blockdev", "raw,node-name=disk,file=disk-file"]
    node = "disk"
    if target is not None:
        args += ["--blockdev", ",".join(f"{k}={v}" for k, v in target.items()),
                 "--blockdev", "copy-before-write,node-name=cbw,file=disk,target=tgt,"
                 "on-cbw-error=break-snapshot,cbw-timeout=5"]
        node = "cbw"
    args += ["--nbd-server", f"addr.type=unix,addr.path={sock}",
             "--export", f"nbd,id=e0,node-name={node},name=disk,writable=on"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(1000):  # until it accepts connections (the file comes first)
            if proc.poll() is not None:
                break
            with socket.socket(socket.AF_UNIX) as probe:
                try:
                    probe.connect(sock)
                    break
                except OSError:
                    time.sleep(0.01)
        if proc.poll() is not None:
            raise SystemExit(f"qemu-storage-daemon failed: {proc.stderr.read().decode()}")  # type: ignore[union-attr]
        yield f"nbd+unix:///disk?socket={sock}"
    finally:
        proc.terminate()
        proc.wait()
        disk.unlink()


def bench_once(uri: str) -> float:
    """MiB/s of one qemu-img bench run."""
    proc = subprocess.run(["qemu-img", "bench", "-w", "-c", str(COUNT), "-d", str(DEPTH),
                           "-s", str(SIZE), "-S", str(STEP), "-f", "raw", uri],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"qemu-img bench failed: {proc.stderr.strip()}")
    out = proc.stdout
    m = re.search(r"Run completed in ([\d.]+) seconds", out)
    if not m:
        raise SystemExit(f"unexpected qemu-img bench output: {out}")
    return COUNT * SIZE / MiB / float(m.group(1))


def run(config: str, work: Path) -> float:
    with ExitStack() as stack:
        target: dict[str, str] | None = None
        if config == "plugin":
            plugin = stack.enter_context(CbwTargetServer(
                GiB, memory=2 * GiB, spool_dir=None, spool_limit=0, label="bench"))
            target = {"driver": "nbd", "node-name": "tgt", "server.type": "unix",
                      "server.path": plugin.socket}
        elif config == "scratch":
            scratch = work / "scratch.raw"
            with open(scratch, "wb") as f:
                f.truncate(GiB)
            stack.callback(scratch.unlink)
            target = {"driver": "file", "node-name": "tgt", "filename": str(scratch)}
        uri = stack.enter_context(storage_daemon(work, target))
        return bench_once(uri)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ba-gc-"))
    configs = ["none", "scratch", "plugin"]
    results: dict[str, list[float]] = {c: [] for c in configs}
    try:
        for _ in range(args.runs):
            for c in configs:
                results[c].append(run(c, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {c: statistics.median(v) for c, v in results.items()}
    print(f"\nguest write cost of copy-before-write: {os.cpu_count()} cores, 64 KiB writes "
          f"at depth {DEPTH}, every write on a cluster not yet copied, {args.runs} runs\n")
    print(f"| {'target':<28} | {'MiB/s':>7} | {'vs none':>7} | {'vs scratch':>10} | "
          f"{'mean latency':>12} |")
    print(f"|{'-' * 30}|{'-' * 9}|{'-' * 9}|{'-' * 12}|{'-' * 14}|")
    names = {"none": "no backup", "scratch": "local raw scratch file",
             "plugin": "our nbdkit plugin (memory)"}
    for c in configs:
        lat_ms = DEPTH * SIZE / MiB / med[c] * 1000
        print(f"| {names[c]:<28} | {med[c]:>7.0f} | {med[c] / med['none']:>6.2f}x | "
              f"{med[c] / med['scratch']:>9.2f}x | {lat_ms:>9.2f} ms |")
    ok = med["plugin"] >= 0.9 * med["scratch"]
    print(f"\ntarget: plugin >= 0.9x scratch file: {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
