#!/usr/bin/env python3
"""``backup-agent serve`` against qemu-nbd serving the restored raw image, in one run.

1. Sequential read of the whole served disk with ``nbdcopy URI null:`` (4 connections, as
   nbdcopy opens when the server allows multi-conn): the served archive (zstd) vs qemu-nbd
   on the restored raw image. Target: the archive at >= 0.7x qemu-nbd's throughput.
2. Random 4 KiB reads at queue depth 16 (fio's nbd engine, one connection) over a 64 MiB
   working set, the table showing seconds per GiB read: with the set in the record cache
   (warm) vs qemu-nbd, target >= 0.5x; for information, 256 KiB records instead of 2 MiB
   (``backup --request-size``), a cache that keeps nothing (every read reads, checks and
   decompresses its whole record: the cold cost) and one half the set.
   Also: the sequential read of the same disk archived without compression, and over one
   connection (``nbdcopy --connections=1``: a client that waits for each read, whom the
   server reads ahead for).
3. A 1 TiB sparse archive: time from starting ``serve`` to the first 4 KiB read answered
   (target < 1 s), and the peak RSS of the serving nbdkit (target < 128 MiB).
4. ``restore --live`` of the same archive into a paused QEMU (TCG, no guest code beyond the
   firmware) with an empty qcow2 target made as docs/SERVE.md says (256 KiB clusters): time
   from starting the command until it ends (the stream complete, everything removed) vs a
   plain ``restore --to-dir --format qcow2`` (target <= 1.3x); for information the same into
   a target of qemu-img's default 64 KiB clusters; and from starting the command until QEMU
   reports the VM running (target < 2 s; polled on a monitor of the bench's own).
   ``--live-only`` runs this part alone.

The disk is half data (half random, half text) and half holes, in 32 MiB stripes, as in
bench/run.py. Only ratios measured in one run mean anything on these shared machines.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nbd

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
    qemu_img_create,
    qemu_nbd,
    settle,
    sh,
)

DEPTH = 16


@contextmanager
def served(archive: Path, *args: str) -> Iterator[tuple[str, subprocess.Popen[bytes], float]]:
    """``backup-agent serve ARCHIVE``: (first URI, the process, seconds until it printed it)."""
    d = tempfile.mkdtemp(prefix="ba-bench-")
    t = time.perf_counter()
    proc = subprocess.Popen([AGENT, "serve", "-q", str(archive), "--socket", f"{d}/s", *args],
                            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        line = proc.stdout.readline().decode().strip() if ready else ""
        if not line:
            raise SystemExit("serve did not start")
        yield line, proc, time.perf_counter() - t
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        shutil.rmtree(d, ignore_errors=True)


def nbdkit_hwm(proc: subprocess.Popen[bytes]) -> int:
    """Peak RSS (VmHWM) of the nbdkit the serve process started (its child)."""
    kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    for line in Path(f"/proc/{kids[0]}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise SystemExit("no VmHWM")


def fio_randread(uri: str, size: int, runtime: int) -> float:
    """MiB/s of 4 KiB random reads at depth 16 over the first ``size`` bytes."""
    proc = subprocess.run(["fio", "--name=serve", "--ioengine=nbd", f"--uri={uri}",
                           "--rw=randread", "--bs=4k", f"--iodepth={DEPTH}", f"--size={size}",
                           "--time_based", f"--runtime={runtime}", "--output-format=json",
                           "--norandommap", "--randrepeat=0"],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"fio failed: {proc.stderr.strip() or proc.stdout[-500:]}")
    job = json.loads(proc.stdout[proc.stdout.index("{"):])["jobs"][0]["read"]
    return float(job["bw_bytes"]) / MiB


def bench_sequential(work: Path, size: int, runs: int) -> tuple[list[Row], Path, Path]:
    img = work / "half.raw"
    make_half_data(img, size)
    arc = work / "half.arc"
    sh(f"{AGENT} backup -q --image disk={img} -o {arc}")
    restored = work / "restored"
    sh(f"{AGENT} restore -q {arc} --to-dir {restored}")
    img.unlink()
    raw = restored / "disk.raw"
    stored = work / "stored.arc"
    sh(f"{AGENT} backup -q --image disk={raw} --compress none -o {stored}")
    ours, plain, peers, ours1, peers1 = [], [], [], [], []
    with served(arc) as (uri, _, _), served(stored) as (uri_plain, _, _), \
            qemu_nbd(raw, "raw") as peer:
        for _ in range(runs):  # interleaved: noise hits all alike
            settle()
            ours.append(sh(f"nbdcopy '{uri}' null:"))
            settle()
            plain.append(sh(f"nbdcopy '{uri_plain}' null:"))
            settle()
            peers.append(sh(f"nbdcopy '{peer}' null:"))
            settle()
            ours1.append(sh(f"nbdcopy --connections=1 '{uri}' null:"))
            settle()
            peers1.append(sh(f"nbdcopy --connections=1 '{peer}' null:"))
    stored.unlink()
    a, b, p = statistics.median(ours), statistics.median(plain), statistics.median(peers)
    a1, p1 = statistics.median(ours1), statistics.median(peers1)
    rows = [Row(f"sequential read, {size / GiB:g} GiB half data, zstd", a, p,
                "qemu-nbd on restored raw", "throughput >= 0.7x", p / a >= 0.7,
                f"throughput {p / a:.2f}x: {size / MiB / a:.0f} vs {size / MiB / p:.0f} "
                f"MiB/s; archive {arc.stat().st_size / MiB:.0f} MiB"),
            Row("same, --compress none archive", b, p, "qemu-nbd on restored raw", "-", None,
                f"throughput {p / b:.2f}x: what decompression costs"),
            Row("same (zstd), one connection, read ahead", a1, p1,
                "qemu-nbd on restored raw", "-", None, f"throughput {p1 / a1:.2f}x")]
    return rows, arc, raw


def bench_random(work: Path, arc: Path, raw: Path, img_size: int, runtime: int,
                 set_size: int) -> list[Row]:
    """Each case measured right after qemu-nbd (interleaved: the machine's noise moves
    both alike), on a fresh server; "warm" runs once before it is measured."""
    img = work / "half256.raw"
    make_half_data(img, img_size)
    arc256 = work / "half256.arc"
    sh(f"{AGENT} backup -q --image disk={img} --request-size 256K -o {arc256}")
    img.unlink()
    ws = f"{set_size // MiB} MiB working set"
    cases = [  # label, archive, --cache, warm first, target
        (f"random 4K QD16, warm cache, {ws}", arc, "256M", True, 0.5),
        ("same, 256 KiB records", arc256, "256M", True, None),
        ("same, cache missed: every read decompresses", arc, "1M", False, None),
        ("same, 256 KiB records, cache missed", arc256, "128K", False, None),
        ("same, --cache 32M (half the set)", arc, "32M", True, None),
    ]
    rows = []
    with qemu_nbd(raw, "raw") as peer:
        fio_randread(peer, set_size, 1)  # page cache warm, as the archive's will be
        for label, archive, cache, warm, target in cases:
            peer_mib = fio_randread(peer, set_size, runtime)
            with served(archive, "--cache", cache) as (uri, _, _):
                if warm:
                    fio_randread(uri, set_size, runtime)
                mib = fio_randread(uri, set_size, runtime)
            ratio = mib / peer_mib
            # The table is in seconds: those to read 1 GiB this way (ratio: lower is better)
            rows.append(Row(label, 1024 / mib, 1024 / peer_mib, "qemu-nbd on restored raw",
                            f"throughput >= {target}x" if target else "-",
                            ratio >= target if target else None,
                            f"throughput {ratio:.2f}x: {mib:.1f} vs {peer_mib:.1f} MiB/s; "
                            f"--cache {cache}"))
    arc256.unlink()
    return rows


def bench_terabyte(work: Path) -> list[Row]:
    img = work / "tb.raw"
    qemu_img_create(img, 1 << 40)
    with open(img, "r+b") as f:  # a little data at both ends, the rest a hole
        f.write(os.urandom(MiB))
        f.seek((1 << 40) - MiB)
        f.write(os.urandom(MiB))
    arc = work / "tb.arc"
    sh(f"{AGENT} backup -q --image disk={img} -o {arc}")
    img.unlink()
    os.sync()
    t = time.perf_counter()
    with served(arc) as (uri, proc, _):
        h = nbd.NBD()
        h.connect_uri(uri)
        h.pread(4096, 0)
        first = time.perf_counter() - t
        h.pread(4096, (1 << 40) - 4096)
        h.pread(MiB, 1 << 39)  # a hole, in the middle
        h.shutdown()
        rss = nbdkit_hwm(proc)
    return [Row("1 TiB sparse archive, serve to first byte", first, None, "-", "< 1 s",
                first < 1.0, f"archive {arc.stat().st_size} bytes"),
            Row("1 TiB sparse archive, nbdkit peak RSS", first, None, "-", "RSS < 128 MiB",
                rss < 128 * MiB, f"peak RSS {rss / MiB:.0f} MiB")]


def _live_once(arc: Path, target: Path, size: int, cluster: str | None) -> tuple[float, float]:
    """One ``restore --live`` into a fresh target: (seconds until it ended, until the VM
    ran). ``cluster``: the target's cluster size (None: qemu-img's default)."""
    from agent.qemu.qmp import Monitor

    opts = ["-o", f"cluster_size={cluster}"] if cluster else []
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *opts, str(target), str(size)],
                   check=True)
    sock = Path(tempfile.mkdtemp(prefix="ba-", dir="/tmp"))
    bench_qmp, agent_qmp = sock / "b.qmp", sock / "a.qmp"
    vm = subprocess.Popen(
        ["qemu-system-x86_64", "-nodefaults", "-display", "none", "-accel", "tcg", "-S",
         "-m", "64M", "-qmp", f"unix:{bench_qmp},server=on,wait=off",
         "-qmp", f"unix:{agent_qmp},server=on,wait=off",
         "-blockdev", json.dumps({"driver": "file", "node-name": "f",
                                  "filename": str(target)}),
         "-blockdev", json.dumps({"driver": "qcow2", "node-name": "q", "file": "f"}),
         "-device", "virtio-blk-pci,drive=q,id=disk"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not agent_qmp.exists():
            time.sleep(0.01)
        with Monitor(str(bench_qmp)) as mon:
            settle()
            t = time.perf_counter()
            proc = subprocess.Popen([AGENT, "restore", "-q", str(arc), "--live", "--qmp",
                                     str(agent_qmp), "--drive", f"disk={target}"],
                                    stdin=subprocess.DEVNULL)
            while not mon.execute("query-status")["running"]:
                assert proc.poll() is None, "restore --live failed"
                time.sleep(0.005)
            running = time.perf_counter() - t
            assert proc.wait() == 0, "restore --live failed"
            return time.perf_counter() - t, running
    finally:
        vm.terminate()
        vm.wait()
        shutil.rmtree(sock, ignore_errors=True)
        target.unlink(missing_ok=True)


def bench_live(work: Path, arc: Path, size: int, runs: int) -> list[Row]:
    """Interleaved: the plain restore, the live one into a target made as docs/SERVE.md
    says (256 KiB clusters), and into one of qemu-img's default 64 KiB clusters."""
    from agent.restore_live import TARGET_CLUSTER

    plain, live, live64, running = [], [], [], []
    for i in range(runs):
        out = work / f"plain{i}"
        settle()
        plain.append(sh(f"{AGENT} restore -q {arc} --to-dir {out} --format qcow2"))
        shutil.rmtree(out)
        done, ran = _live_once(arc, work / f"live{i}.qcow2", size, TARGET_CLUSTER)
        live.append(done)
        running.append(ran)
        live64.append(_live_once(arc, work / f"live64-{i}.qcow2", size, None)[0])
    a, p, r = statistics.median(live), statistics.median(plain), statistics.median(running)
    a64 = statistics.median(live64)
    return [Row(f"live restore, {size / GiB:g} GiB, until streamed", a, p,
                "restore to qcow2", "time <= 1.3x", a / p <= 1.3,
                f"{a / p:.2f}x the plain restore's time; target with "
                f"cluster_size={TARGET_CLUSTER}"),
            Row("same, 64 KiB clusters (qemu-img default)", a64, p,
                "restore to qcow2", "-", None, f"{a64 / p:.2f}x the plain restore's time"),
            Row("live restore, until the VM runs", r, None, "-", "< 2 s", r < 2.0,
                "from the command's start")]


def live_archive(work: Path, size: int) -> Path:
    """The half-data archive alone (``--live-only``: no other part of the bench)."""
    img = work / "half.raw"
    make_half_data(img, size)
    arc = work / "half.arc"
    sh(f"{AGENT} backup -q --image disk={img} -o {arc}")
    img.unlink()
    return arc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size-gib", type=float, default=2)
    ap.add_argument("--runtime", type=int, default=10, help="seconds per fio run (10)")
    ap.add_argument("--live-only", action="store_true",
                    help="only the live-restore rows (part 4)")
    add_smoke_flag(ap)
    args = ap.parse_args()
    size = 64 * MiB if args.smoke else int(args.size_gib * GiB)
    runs = 1 if args.smoke else args.runs
    runtime = 1 if args.smoke else args.runtime
    work = Path(tempfile.mkdtemp(prefix="ba-serve-", dir=Path(__file__).resolve().parent))
    rows: list[Row] = []
    try:
        if args.live_only:
            arc = live_archive(work, size)
        else:
            seq, arc, raw = bench_sequential(work, size, runs)
            rows += seq
            rows += bench_random(work, arc, raw, size, runtime, min(size, 64 * MiB))
            rows += bench_terabyte(work)
        rows += bench_live(work, arc, size, runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(rows)
    if args.smoke:
        print(SMOKE_NOTE)
    return 0 if args.smoke or all(r.ok is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
