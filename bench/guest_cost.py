#!/usr/bin/env python3
"""What a live backup costs a guest writer, side by side in one run.

Writes are 64 KiB at queue depth 16, issued by fio over NBD (libnbd's engine), which
reports throughput and completion-latency percentiles.

1. Worst case: every write hits a cluster not yet copied (``rw=write:64k``, 1 GiB). A
   qemu-storage-daemon holds a 1 GiB raw disk; the writes go to an NBD export of the
   disk itself (no backup) or of a copy-before-write filter whose target is a local raw
   scratch file (classic fleecing) or our nbdkit plugin. Target: plugin >= 0.9x scratch.
2. Random writes over the whole disk while a full live backup runs: a VM (TCG, no guest
   code) with a 2 GiB disk of random data; the writes go through an NBD export of the
   node the VM's device writes to (the filter, during the backup: the same path as a
   guest's writes), first without a backup, then while ``backup-agent backup --qmp``
   streams the disk into a pipe read at 100 MiB/s (as an ssh link would). Target:
   >= 0.7x of no backup.

    .venv/bin/python bench/guest_cost.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.cbw.server import CbwTargetServer  # noqa: E402
from bench.run import SMOKE_NOTE, add_smoke_flag  # noqa: E402
from tests.integration.vm import VmFactory  # noqa: E402

AGENT = str(Path(sys.executable).parent / "backup-agent")
MiB = 1024 * 1024
GiB = 1024 * MiB
DEPTH = 16


@dataclass(frozen=True)
class Fio:
    mib_s: float
    p50_ms: float
    p99_ms: float
    p999_ms: float


def fio(uri: str, rw: str, *, size: str = "1G", runtime: int | None = None) -> Fio:
    """One fio run with libnbd's engine: 64 KiB writes at depth 16."""
    args = ["fio", "--name=guest", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}",
            "--bs=64k", f"--iodepth={DEPTH}", f"--size={size}", "--output-format=json",
            "--norandommap", "--randrepeat=0"]
    if runtime:
        args += ["--time_based", f"--runtime={runtime}"]
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"fio failed: {proc.stderr.strip() or proc.stdout[-500:]}")
    job = json.loads(proc.stdout[proc.stdout.index("{"):])["jobs"][0]["write"]
    pct = job["clat_ns"]["percentile"]
    return Fio(job["bw_bytes"] / MiB, pct["50.000000"] / 1e6, pct["99.000000"] / 1e6,
               pct["99.900000"] / 1e6)


def _wait_listening(path: str, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(1000):  # the socket file appears before the server listens
        if proc.poll() is not None:
            raise SystemExit(f"server failed: {proc.stderr.read().decode()}")  # type: ignore[union-attr]
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(path)
                return
            except OSError:
                time.sleep(0.01)
    raise SystemExit(f"no server at {path}")


@contextmanager
def storage_daemon(work: Path, target: dict[str, str] | None) -> Iterator[str]:
    """A qemu-storage-daemon exporting a 1 GiB disk, through a CBW filter if ``target``."""
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
        _wait_listening(sock, proc)
        yield f"nbd+unix:///disk?socket={sock}"
    finally:
        proc.terminate()
        proc.wait()
        disk.unlink()


def worst_case(config: str, work: Path) -> Fio:
    with ExitStack() as stack:
        target: dict[str, str] | None = None
        if config == "plugin":
            plugin = stack.enter_context(CbwTargetServer(
                GiB, memory=2 * GiB, spool_dir=None, spool_limit=0, label="bench"))
            plugin.wait_ready()
            target = {"driver": "nbd", "node-name": "tgt", "server.type": "unix",
                      "server.path": plugin.socket}
        elif config == "scratch":
            scratch = work / "scratch.raw"
            with open(scratch, "wb") as f:
                f.truncate(GiB)
            stack.callback(scratch.unlink)
            target = {"driver": "file", "node-name": "tgt", "filename": str(scratch)}
        uri = stack.enter_context(storage_daemon(work, target))
        return fio(uri, "write:64k")  # 8192 writes, each on a cluster of its own


# -- workload 2: random writes during a real live backup --------------------------------

RATE = 100 * MiB  # the archive pipe's reader: about an ssh link's pace


def _drain(stream: object, fast: threading.Event) -> None:
    """Read the archive at RATE until ``fast`` is set, then as fast as it comes."""
    start, got = time.monotonic(), 0
    read = stream.read  # type: ignore[attr-defined]
    while chunk := read(MiB):
        got += len(chunk)
        if not fast.is_set():
            ahead = got / RATE - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)


def during_backup(work: Path, runtime: int) -> tuple[Fio, Fio]:
    disk = work / "vm.raw"
    with open(disk, "wb") as f:
        block = os.urandom(16 * MiB)
        for _ in range(2 * GiB // len(block)):
            f.write(block)
    os.sync()
    with VmFactory(work) as vms:
        # share-rw: the device lets our NBD export write beside it (the "guest" here)
        vm = vms.start(extra_args=[
            "-blockdev", json.dumps({"driver": "file", "node-name": "vda-file",
                                     "filename": str(disk)}),
            "-blockdev", json.dumps({"driver": "raw", "node-name": "vda-fmt",
                                     "file": "vda-file"}),
            "-device", "virtio-blk-pci,drive=vda-fmt,id=vda,share-rw=on"])
        mon = vm.monitor
        nbd_sock = str(work / "bench-nbd.sock")
        mon.execute("nbd-server-start",
                    {"addr": {"type": "unix", "data": {"path": nbd_sock}}})
        uri = f"nbd+unix:///bench?socket={nbd_sock}"

        def export(node: str) -> None:
            mon.execute("block-export-add", {"type": "nbd", "id": "bench", "node-name": node,
                                             "name": "bench", "writable": True})

        def unexport() -> None:
            mon.execute("block-export-del", {"id": "bench", "mode": "hard"})
            while any(e["id"] == "bench" for e in mon.execute("query-block-exports")):
                time.sleep(0.05)

        export("vda-fmt")  # the node the device writes to, without a backup
        alone = fio(uri, "randwrite", size="2G", runtime=runtime)
        unexport()

        agent = subprocess.Popen([AGENT, "backup", "-q", "--qmp", str(vm.agent_qmp),
                                  "--qemu-nbd-socket", nbd_sock, "--compress", "none",
                                  # room for every cluster: random writes over the whole
                                  # disk outrun a 100 MiB/s output
                                  "--cbw-memory", "512M", "--spool-limit", "4G",
                                  "-o", "-"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        fast = threading.Event()
        reader = threading.Thread(target=_drain, args=(agent.stdout, fast), daemon=True)
        reader.start()
        try:
            filt = ""
            for _ in range(500):  # the agent's filter node, once it is in place
                names = [n["node-name"] for n in mon.execute("query-named-block-nodes")]
                filt = next((n for n in names if n.startswith("ba-") and
                             n.endswith("-cbw")), "")
                if filt:
                    break
                time.sleep(0.02)
            if not filt:
                agent.kill()
                raise SystemExit("the agent's copy-before-write filter never appeared: "
                                 f"{agent.stderr.read().decode().strip()}")  # type: ignore[union-attr]
            export(filt)  # the guest's path: through the filter
            during = fio(uri, "randwrite", size="2G", runtime=runtime)
            unexport()
            if agent.poll() is not None:
                raise SystemExit("the backup ended before the measurement did: "
                                 "lower --runtime or RATE")
        finally:
            fast.set()
            err = agent.stderr.read()  # type: ignore[union-attr]
            code = agent.wait(300)
            reader.join(60)
        if code != 0:
            raise SystemExit(f"the live backup failed: {err.decode().strip()}")
        mon.execute("nbd-server-stop")
        return alone, during


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=6, help="seconds of workload 2 (6)")
    add_smoke_flag(ap)
    args = ap.parse_args()
    if args.smoke:
        args.runs, args.runtime = 1, 1
    work = Path(tempfile.mkdtemp(prefix="ba-gc-"))
    configs = ["none", "scratch", "plugin"]
    results: dict[str, list[Fio]] = {c: [] for c in configs}
    pairs: list[tuple[Fio, Fio]] = []
    try:
        for _ in range(args.runs):
            for c in configs:
                results[c].append(worst_case(c, work))
        for _ in range(args.runs):
            pairs.append(during_backup(work, args.runtime))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def med(runs: list[Fio]) -> Fio:
        return Fio(*(statistics.median(getattr(r, f) for r in runs)
                     for f in ("mib_s", "p50_ms", "p99_ms", "p999_ms")))

    print(f"\nwhat a live backup costs a guest: {os.cpu_count()} cores, 64 KiB writes at "
          f"depth {DEPTH}, fio over NBD, medians of {args.runs} runs\n")
    print("1. worst case: every write hits a cluster not yet copied\n")
    print(f"| {'target':<28} | {'MiB/s':>6} | {'vs none':>7} | {'vs scratch':>10} | "
          f"{'p50 ms':>6} | {'p99 ms':>6} | {'p99.9 ms':>8} |")
    print(f"|{'-' * 30}|{'-' * 8}|{'-' * 9}|{'-' * 12}|{'-' * 8}|{'-' * 8}|{'-' * 10}|")
    names = {"none": "no backup", "scratch": "local raw scratch file",
             "plugin": "our nbdkit plugin (memory)"}
    m = {c: med(results[c]) for c in configs}
    for c in configs:
        r = m[c]
        print(f"| {names[c]:<28} | {r.mib_s:>6.0f} | {r.mib_s / m['none'].mib_s:>6.2f}x | "
              f"{r.mib_s / m['scratch'].mib_s:>9.2f}x | {r.p50_ms:>6.2f} | {r.p99_ms:>6.2f} | "
              f"{r.p999_ms:>8.2f} |")
    ok1 = m["plugin"].mib_s >= 0.9 * m["scratch"].mib_s
    print(f"\ntarget: plugin >= 0.9x scratch file: {'met' if ok1 else 'NOT met'}\n")
    print("2. random writes over a 2 GiB disk, without and during a full live backup\n")
    alone, during = med([a for a, _ in pairs]), med([d for _, d in pairs])
    print(f"| {'':<28} | {'MiB/s':>6} | {'ratio':>7} | {'p50 ms':>6} | {'p99 ms':>6} | "
          f"{'p99.9 ms':>8} |")
    print(f"|{'-' * 30}|{'-' * 8}|{'-' * 9}|{'-' * 8}|{'-' * 8}|{'-' * 10}|")
    for label, r in (("no backup", alone), ("during a live backup", during)):
        print(f"| {label:<28} | {r.mib_s:>6.0f} | {r.mib_s / alone.mib_s:>6.2f}x | "
              f"{r.p50_ms:>6.2f} | {r.p99_ms:>6.2f} | {r.p999_ms:>8.2f} |")
    ok2 = during.mib_s >= 0.7 * alone.mib_s
    print(f"\ntarget: during >= 0.7x no backup: {'met' if ok2 else 'NOT met'}")
    if args.smoke:
        print(SMOKE_NOTE)
    return 0 if (ok1 and ok2) or args.smoke else 1


if __name__ == "__main__":
    sys.exit(main())
