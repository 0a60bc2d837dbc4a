#!/usr/bin/env python3
"""What a live backup costs a guest writer, side by side in one run.

Writes are 64 KiB at queue depth 16, issued by fio over NBD (libnbd's engine), which
reports throughput and completion-latency percentiles.

1. Worst case: every write hits a cluster not yet copied (``rw=write:64k``, 1 GiB). A
   qemu-storage-daemon holds a 1 GiB raw disk; the writes go to an NBD export of the
   disk itself (no backup) or of a copy-before-write filter whose target is a local raw
   scratch file (classic fleecing) or our nbdkit plugin. Target: plugin >= 0.9x scratch.
2. Random writes over the whole disk during a backup: a VM (TCG, no guest code) with a
   2 GiB disk of random data; the writes go through an NBD export of the node the VM's
   device writes to (the copy-before-write filter during a backup: the same path as a
   guest's writes). The archive goes into a pipe read at 100 MiB/s (as an ssh link
   would) while the guest writes, as fast as it comes afterwards. Settings, interleaved:
   no backup; QEMU's own fleecing (a copy-before-write filter into a local qcow2 scratch
   image, its snapshot-access node exported over NBD and read by ``backup-agent backup
   --source``: the same sweep); our live backup (``backup --qmp``) with the sweep
   unlimited, at several ``--max-rate`` values, ``--max-rate auto``, and all but stopped
   (4K/s: copies only), and with the archive all but unread (the copies stay in the
   plugin: what QEMU's copying into our target costs by itself). Targets: the live
   backup >= 0.95x QEMU's fleecing; ``auto`` >= 0.9x the sweep stopped, and the backup
   finishes.
3. Where the CPU goes while the guest writes: cores used by fio, QEMU's main loop (which
   serves every NBD request and makes every copy), its I/O worker threads, nbdkit with
   our plugin, the agent, and everything else on the machine (/proc, per thread).

    .venv/bin/python bench/guest_cost.py [--runs 3] [--runtime 8] [--qemu-dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
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
from tests.integration.vm import Vm, VmFactory  # noqa: E402

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


def fio_argv(uri: str, rw: str, *, size: str = "1G", runtime: int | None = None) -> list[str]:
    """fio with libnbd's engine: 64 KiB writes at depth 16."""
    args = ["fio", "--name=guest", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}",
            "--bs=64k", f"--iodepth={DEPTH}", f"--size={size}", "--output-format=json",
            "--norandommap", "--randrepeat=0"]
    if runtime:
        args += ["--time_based", f"--runtime={runtime}"]
    return args


def fio_result(code: int, stdout: str, stderr: str) -> Fio:
    if code != 0:
        raise SystemExit(f"fio failed: {stderr.strip() or stdout[-500:]}")
    job = json.loads(stdout[stdout.index("{"):])["jobs"][0]["write"]
    pct = job["clat_ns"]["percentile"]
    return Fio(job["bw_bytes"] / MiB, pct["50.000000"] / 1e6, pct["99.000000"] / 1e6,
               pct["99.900000"] / 1e6)


def fio(uri: str, rw: str, *, size: str = "1G", runtime: int | None = None) -> Fio:
    proc = subprocess.run(fio_argv(uri, rw, size=size, runtime=runtime), capture_output=True,
                          text=True)
    return fio_result(proc.returncode, proc.stdout, proc.stderr)


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
def storage_daemon(work: Path, target: dict[str, str] | None, size: int) -> Iterator[str]:
    """A qemu-storage-daemon exporting a disk, through a CBW filter if ``target``."""
    disk = work / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(size)
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


def worst_case(config: str, work: Path, size: int = GiB) -> Fio:
    with ExitStack() as stack:
        target: dict[str, str] | None = None
        if config == "plugin":
            plugin = stack.enter_context(CbwTargetServer(
                size, memory=2 * size, spool_dir=None, spool_limit=0, label="bench"))
            plugin.wait_ready()
            target = {"driver": "nbd", "node-name": "tgt", "server.type": "unix",
                      "server.path": plugin.socket, "export": plugin.export}
        elif config == "scratch":
            scratch = work / "scratch.raw"
            with open(scratch, "wb") as f:
                f.truncate(size)
            stack.callback(scratch.unlink)
            target = {"driver": "file", "node-name": "tgt", "filename": str(scratch)}
        uri = stack.enter_context(storage_daemon(work, target, size))
        # 64 KiB writes 64 KiB apart, each on a cluster of its own: 8192 in 1 GiB
        return fio(uri, "write:64k", size=str(size))


# -- where the CPU goes -----------------------------------------------------------------

TICK = os.sysconf("SC_CLK_TCK")


def _stat(path: str) -> tuple[str, int, int] | None:
    """(comm, ppid, CPU ticks) from a /proc stat file; None if the task is gone."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    comm = text[text.index("(") + 1:text.rindex(")")]
    fields = text[text.rindex(")") + 2:].split()
    return comm, int(fields[1]), int(fields[11]) + int(fields[12])  # ppid, utime + stime


def _descendants(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(f"/proc/{entry}/stat")) is not None:
            parents[int(entry)] = st[1]
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += [p for p, pp in parents.items() if pp == pid]
    return found


def _threads(pid: int) -> dict[int, tuple[str, int, int]]:
    """tid -> (thread name, CPU ticks, ns spent runnable but waiting for a core) of every
    thread of ``pid``."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return {}
    for tid in tids:
        st = _stat(f"/proc/{pid}/task/{tid}/stat")
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                delay = int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            delay = 0
        if st is not None:
            out[int(tid)] = (st[0], st[2], delay)
    return out


def _machine() -> tuple[int, int]:
    """(busy, idle) ticks of the whole machine."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]  # idle, iowait
    return sum(v[:8]) - idle, idle


CPU_ROLES = ("fio", "qemu main loop", "qemu I/O workers", "qemu other", "nbdkit (plugin)",
             "agent", "other processes", "idle")
WAIT_ROLES = ("qemu main loop", "qemu I/O workers", "nbdkit (plugin)", "agent")


def cpu_sample(qemu: int, agent: int | None) -> dict[str, float]:
    """CPU ticks so far by role (see CPU_ROLES): QEMU by thread (it names them with
    ``-name ...,debug-threads=on``), our processes whole, fio as the reaped children; and
    as "wait ROLE" the ticks they spent runnable, waiting for a core (schedstat)."""
    out = dict.fromkeys(CPU_ROLES, 0.0) | {f"wait {r}": 0.0 for r in WAIT_ROLES}
    for tid, (name, ticks, delay) in _threads(qemu).items():
        role = ("qemu main loop" if tid == qemu else
                "qemu I/O workers" if name == "worker" else "qemu other")
        out[role] += ticks
        if role in WAIT_ROLES:
            out[f"wait {role}"] += delay * TICK / 1e9
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # fio, once it has been waited for
    out["fio"] = (kids.ru_utime + kids.ru_stime) * TICK
    if agent is not None:
        for pid in _descendants(agent):
            st = _stat(f"/proc/{pid}/stat")
            role = "nbdkit (plugin)" if st is not None and st[0] == "nbdkit" else "agent"
            threads = _threads(pid).values()
            out[role] += sum(t for _, t, _ in threads)
            out[f"wait {role}"] += sum(d for _, _, d in threads) * TICK / 1e9
    busy, idle = _machine()
    ours = sum(out[r] for r in CPU_ROLES)
    out["other processes"] = busy - ours
    out["idle"] = idle
    return out


def cores_used(a: dict[str, float], b: dict[str, float], seconds: float) -> dict[str, float]:
    return {k: max(0.0, (b[k] - a[k]) / TICK / seconds) for k in a}


# -- workload 2: random writes during a backup, at several paces of its sweep -----------

RATE = 100 * MiB  # the archive pipe's reader: about an ssh link's pace


def _drain(stream: object, fast: threading.Event, rate: int = RATE) -> None:
    """Read the archive at ``rate`` until ``fast`` is set, then as fast as it comes."""
    start, got = time.monotonic(), 0
    read = stream.read  # type: ignore[attr-defined]
    while chunk := read(MiB):
        got += len(chunk)
        if not fast.is_set():
            ahead = got / rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)


@dataclass(frozen=True)
class Setting:
    key: str
    label: str
    kind: str  # "none", "fleece" (QEMU's own fleecing, our sweep) or "live" (ours)
    rate: str | None = None  # the sweep's --max-rate
    finish: bool = True  # let the backup end (else stop it once the guest's run is measured)
    drain: int = RATE  # bytes/s the archive is read at while the guest writes


SETTINGS = [
    Setting("none", "no backup", "none"),
    Setting("fleece", "QEMU fleecing, qcow2 scratch", "fleece"),
    Setting("live", "during a live backup", "live"),
    Setting("50M", "live, --max-rate 50M", "live", "50M", finish=False),
    Setting("20M", "live, --max-rate 20M", "live", "20M", finish=False),
    Setting("8M", "live, --max-rate 8M", "live", "8M", finish=False),
    Setting("auto", "live, --max-rate auto", "live", "auto"),
    Setting("stopped", "live, sweep stopped (4K/s)", "live", "4K", finish=False),
    # The copies alone, as QEMU makes them: the archive is all but unread, so the agent
    # takes the first --memory (32M) of them off the plugin's feed and then stops; the rest
    # stay in the plugin, unsent.
    Setting("held", "live, copies held in the plugin", "live", "4K", finish=False,
            drain=64 * 1024),
]
SMOKE_SETTINGS = ("none", "fleece", "live", "auto", "stopped")


@dataclass(frozen=True)
class Outcome:
    fio: Fio
    swept: float | None  # MiB/s of the disk backed up while the guest wrote
    took: float | None  # seconds from the agent's start to its end (settings that finish)
    copies: int | None  # clusters copied before guest writes (settings that finish)
    cpu: dict[str, float]  # cores used by role while the guest wrote


class _Agent:
    """A backup-agent backup whose archive is read at RATE and whose progress is followed."""

    def __init__(self, argv: list[str], drain: int = RATE) -> None:
        self.start = time.monotonic()
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.fast = threading.Event()
        self.events: list[tuple[float, int]] = []  # (when, device bytes done)
        self.lines: list[str] = []
        self._out = threading.Thread(target=_drain, args=(self.proc.stdout, self.fast, drain),
                                     daemon=True)
        self._err = threading.Thread(target=self._follow, daemon=True)
        self._out.start()
        self._err.start()

    def _follow(self) -> None:
        for raw in self.proc.stderr:  # type: ignore[union-attr]
            line = raw.decode(errors="replace").strip()
            if line.startswith('{"event": "progress"'):
                self.events.append((time.monotonic(), json.loads(line)["done"]))
            else:
                self.lines.append(line)

    def done_at(self, t: float) -> int:
        return max((d for when, d in self.events if when <= t), default=0)

    def wait_started(self) -> None:
        for _ in range(1500):
            if self.events:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.01)
        self.proc.kill()
        self.proc.wait()
        raise SystemExit("the backup never started: " + " / ".join(self.lines[-3:]))

    def finish(self) -> tuple[float, int | None]:
        """Let it run to its end; (seconds it took, clusters copied)."""
        self.fast.set()
        code = self.proc.wait(900)
        took = time.monotonic() - self.start
        self._err.join(30)
        self._out.join(30)
        if code != 0:
            raise SystemExit("the backup failed: " + " / ".join(self.lines[-3:]))
        text = "\n".join(self.lines)
        m = re.search(r"guest writes: (\d+) cluster", text)
        return took, int(m.group(1)) if m else None

    def stop(self) -> None:
        self.fast.set()
        if self.proc.poll() is None:
            self.proc.terminate()  # our own child, by its pid
        self.proc.wait(120)
        self._err.join(30)
        self._out.join(30)


class GuestBench:
    """One VM (TCG, no guest code) with a disk of random data; the guest's writes come from
    fio through an NBD export of the node the VM's device writes to."""

    def __init__(self, vm: Vm, work: Path, disk_size: int, runtime: int) -> None:
        if vm.monitor is None:
            raise SystemExit("the VM has no monitor")
        self.vm = vm
        self.mon = vm.monitor
        self.work = work
        self.size = disk_size
        self.runtime = runtime
        self.nbd_sock = str(work / "bench-nbd.sock")
        self.mon.execute("nbd-server-start",
                         {"addr": {"type": "unix", "data": {"path": self.nbd_sock}}})
        self.uri = f"nbd+unix:///bench?socket={self.nbd_sock}"

    def _export(self, node: str, name: str = "bench", writable: bool = True) -> None:
        self.mon.execute("block-export-add", {"type": "nbd", "id": name, "node-name": node,
                                              "name": name, "writable": writable})

    def _unexport(self, name: str = "bench") -> None:
        self.mon.execute("block-export-del", {"id": name, "mode": "hard"})
        while any(e["id"] == name for e in self.mon.execute("query-block-exports")):
            time.sleep(0.05)

    def _guest(self, node: str, agent: _Agent | None) -> tuple[Fio, float | None,
                                                              dict[str, float]]:
        self._export(node)
        fio_args = fio_argv(self.uri, "randwrite", size=str(self.size), runtime=self.runtime)
        proc = subprocess.Popen(fio_args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        pid = agent.proc.pid if agent else None
        t0, c0 = time.monotonic(), cpu_sample(self.vm.pid, pid)
        out, err = proc.communicate()
        t1, c1 = time.monotonic(), cpu_sample(self.vm.pid, pid)
        self._unexport()
        result = fio_result(proc.returncode, out, err)
        swept = None
        if agent is not None:
            swept = (agent.done_at(t1) - agent.done_at(t0)) / MiB / (t1 - t0)
        return result, swept, cores_used(c0, c1, t1 - t0)

    def run(self, s: Setting) -> Outcome:
        if s.kind == "none":
            fio_r, _, cpu = self._guest("vda-fmt", None)
            return Outcome(fio_r, None, None, None, cpu)
        pace = ["--max-rate", s.rate] if s.rate else []
        if s.kind == "fleece":
            self._fleece_up()
            argv = [AGENT, "backup", "--source",
                    f"vda=nbd+unix:///fl-snap?socket={self.nbd_sock}"]
            node = "fl-cbw"
        else:
            argv = [AGENT, "backup", "--qmp", str(self.vm.agent_qmp),
                    "--qemu-nbd-socket", self.nbd_sock,
                    # room for every cluster: random writes over the whole disk outrun
                    # a 100 MiB/s output
                    "--cbw-memory", "2G" if s.key == "held" else "512M",  # held: all of it
                    "--spool-limit", "4G"]
            node = ""
        agent = _Agent([*argv, "--compress", "none", "--progress", "json", *pace, "-o", "-"],
                       s.drain)
        try:
            agent.wait_started()
            if s.kind == "live":
                names = [n["node-name"] for n in self.mon.execute("query-named-block-nodes")]
                node = next((n for n in names if n.startswith("ba-") and n.endswith("-cbw")),
                            "")
                if not node:
                    raise SystemExit("the agent's copy-before-write filter is not there")
            fio_r, swept, cpu = self._guest(node, agent)
            if agent.proc.poll() is not None:
                raise SystemExit("the backup ended before the measurement did: lower "
                                 "--runtime")
            took: float | None = None
            copies: int | None = None
            if s.finish:
                took, copies = agent.finish()
        finally:
            agent.stop()
            if s.kind == "fleece":
                self._fleece_down()
        return Outcome(fio_r, swept, took, copies, cpu)

    # QEMU's own fleecing, the classic way: a copy-before-write filter whose target is a
    # local qcow2 scratch image, and a snapshot-access node on it, exported over NBD.

    def _fleece_up(self) -> None:
        scratch = self.work / "scratch.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(scratch),
                        str(self.size)], check=True)
        m = self.mon
        m.execute("blockdev-add", {"driver": "qcow2", "node-name": "fl-tgt",
                                   "file": {"driver": "file", "filename": str(scratch)}})
        m.execute("blockdev-add", {"driver": "copy-before-write", "node-name": "fl-cbw",
                                   "file": "vda-fmt", "target": "fl-tgt",
                                   "on-cbw-error": "break-snapshot", "cbw-timeout": 5})
        m.execute("qom-set", {"path": "/machine/peripheral/vda", "property": "drive",
                              "value": "fl-cbw"})
        m.execute("blockdev-add", {"driver": "snapshot-access", "node-name": "fl-snap",
                                   "file": "fl-cbw"})
        self._export("fl-snap", "fl-snap", writable=False)

    def _fleece_down(self) -> None:
        m = self.mon
        with contextlib.suppress(Exception):
            self._unexport("fl-snap")
        with contextlib.suppress(Exception):
            m.execute("blockdev-del", {"node-name": "fl-snap"})
        with contextlib.suppress(Exception):
            m.execute("qom-set", {"path": "/machine/peripheral/vda", "property": "drive",
                                  "value": "vda-fmt"})
        for node in ("fl-cbw", "fl-tgt"):
            with contextlib.suppress(Exception):
                m.execute("blockdev-del", {"node-name": node})
        (self.work / "scratch.qcow2").unlink(missing_ok=True)

    def close(self) -> None:
        self.mon.execute("nbd-server-stop")


def during_backup(work: Path, settings: list[Setting], runs: int, runtime: int,
                  disk_size: int) -> dict[str, list[Outcome]]:
    disk = work / "vm.raw"
    with open(disk, "wb") as f:
        block = os.urandom(16 * MiB)
        for _ in range(disk_size // len(block)):
            f.write(block)
    os.sync()
    results: dict[str, list[Outcome]] = {s.key: [] for s in settings}
    with VmFactory(work) as vms:
        # share-rw: the device lets our NBD export write beside it (the "guest" here)
        vm = vms.start(extra_args=[
            "-blockdev", json.dumps({"driver": "file", "node-name": "vda-file",
                                     "filename": str(disk)}),
            "-blockdev", json.dumps({"driver": "raw", "node-name": "vda-fmt",
                                     "file": "vda-file"}),
            "-device", "virtio-blk-pci,drive=vda-fmt,id=vda,share-rw=on",
            "-name", "bench,debug-threads=on"])  # QEMU's threads by name in /proc
        bench = GuestBench(vm, work, disk_size, runtime)
        for _ in range(runs):  # interleaved: the machine's mood hits every setting alike
            for s in settings:
                results[s.key].append(bench.run(s))
        bench.close()
    disk.unlink()
    return results


# -- the report -------------------------------------------------------------------------

def _med(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def _fmt(v: float | None, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width}{spec}}"


def med_fio(runs: list[Fio]) -> Fio:
    return Fio(*(statistics.median(getattr(r, f) for r in runs)
                 for f in ("mib_s", "p50_ms", "p99_ms", "p999_ms")))


def report_worst(results: dict[str, list[Fio]]) -> bool:
    print("1. worst case: every write hits a cluster not yet copied\n")
    print(f"| {'target':<28} | {'MiB/s':>6} | {'vs none':>7} | {'vs scratch':>10} | "
          f"{'p50 ms':>6} | {'p99 ms':>6} | {'p99.9 ms':>8} |")
    print(f"|{'-' * 30}|{'-' * 8}|{'-' * 9}|{'-' * 12}|{'-' * 8}|{'-' * 8}|{'-' * 10}|")
    names = {"none": "no backup", "scratch": "local raw scratch file",
             "plugin": "our nbdkit plugin (memory)"}
    m = {c: med_fio(results[c]) for c in results}
    for c, r in m.items():
        print(f"| {names[c]:<28} | {r.mib_s:>6.0f} | {r.mib_s / m['none'].mib_s:>6.2f}x | "
              f"{r.mib_s / m['scratch'].mib_s:>9.2f}x | {r.p50_ms:>6.2f} | {r.p99_ms:>6.2f} | "
              f"{r.p999_ms:>8.2f} |")
    ok = m["plugin"].mib_s >= 0.9 * m["scratch"].mib_s
    print(f"\ntarget: plugin >= 0.9x scratch file: {'met' if ok else 'NOT met'}\n")
    return ok


def report_curve(settings: list[Setting], results: dict[str, list[Outcome]],
                 disk_size: int, runtime: int) -> tuple[bool, bool]:
    gib = disk_size / GiB
    print(f"2. random writes over a {gib:g} GiB disk: without a backup, during a backup with "
          "QEMU's own fleecing,\n   and during our live backup at several paces of its "
          "sweep\n")
    print(f"| {'setting':<30} | {'MiB/s':>6} | {'vs none':>7} | {'vs stopped':>10} | "
          f"{'p50 ms':>6} | {'p99.9 ms':>8} | {'backed up MiB/s':>15} | "
          f"{'whole disk s':>12} | {'took s':>6} | {'copies':>7} |")
    print(f"|{'-' * 32}|{'-' * 8}|{'-' * 9}|{'-' * 12}|{'-' * 8}|{'-' * 10}|{'-' * 17}|"
          f"{'-' * 14}|{'-' * 8}|{'-' * 9}|")
    f = {s.key: med_fio([o.fio for o in results[s.key]]) for s in settings}
    none, stopped = f["none"].mib_s, f["stopped"].mib_s
    for s in settings:
        r, outs = f[s.key], results[s.key]
        swept = _med([o.swept for o in outs])
        whole = disk_size / MiB / swept if swept else None
        copies = _med([o.copies for o in outs])
        print(f"| {s.label:<30} | {r.mib_s:>6.0f} | {r.mib_s / none:>6.2f}x | "
              f"{r.mib_s / stopped:>9.2f}x | {r.p50_ms:>6.2f} | {r.p999_ms:>8.2f} | "
              f"{_fmt(swept, '.1f', 15)} | {_fmt(whole, '.0f', 12)} | "
              f"{_fmt(_med([o.took for o in outs]), '.1f', 6)} | "
              f"{_fmt(copies, '.0f', 7)} |")
    print("\nbacked up MiB/s: the disk's bytes in the archive per second while the guest "
          "wrote (copies and sweep);\nwhole disk s: the disk at that pace; took s: the "
          "whole backup, the guest writing for the first "
          f"{runtime} s of it; copies: clusters copied before guest writes.")
    ok_ref = f["live"].mib_s >= 0.95 * f["fleece"].mib_s
    auto_outs = results["auto"]
    finished = all(o.took is not None for o in auto_outs)
    ok_auto = f["auto"].mib_s >= 0.9 * stopped and finished
    ref = f["live"].mib_s / f["fleece"].mib_s
    print(f"\ntarget: live backup >= 0.95x QEMU fleecing ({ref:.2f}x): "
          f"{'met' if ok_ref else 'NOT met'}")
    print(f"target: --max-rate auto >= 0.9x sweep stopped ({f['auto'].mib_s / stopped:.2f}x), "
          f"and the disk backed up: {'met' if ok_auto else 'NOT met'}\n")
    return ok_ref, ok_auto


def report_cpu(settings: list[Setting], results: dict[str, list[Outcome]]) -> None:
    print("3. where the CPU went while the guest wrote: cores used (CPU-s per s), medians\n")
    short = {"fio": "fio", "qemu main loop": "QEMU main", "qemu I/O workers": "QEMU wrk",
             "qemu other": "QEMU oth", "nbdkit (plugin)": "nbdkit", "agent": "agent",
             "other processes": "others", "idle": "idle"}
    print(f"| {'setting':<30} | " + " | ".join(f"{short[r]:>9}" for r in CPU_ROLES) + " |")
    print(f"|{'-' * 32}|" + "|".join("-" * 11 for _ in CPU_ROLES) + "|")
    for s in settings:
        cpu = {r: statistics.median(o.cpu[r] for o in results[s.key]) for r in CPU_ROLES}
        print(f"| {s.label:<30} | " + " | ".join(f"{cpu[r]:>9.2f}" for r in CPU_ROLES) + " |")
    print("\n   and the time they were runnable but waited for a core (s per s, all threads)\n")
    print(f"| {'setting':<30} | " + " | ".join(f"{short[r]:>9}" for r in WAIT_ROLES) + " |")
    print(f"|{'-' * 32}|" + "|".join("-" * 11 for _ in WAIT_ROLES) + "|")
    for s in settings:
        wait = {r: statistics.median(o.cpu[f"wait {r}"] for o in results[s.key])
                for r in WAIT_ROLES}
        print(f"| {s.label:<30} | " + " | ".join(f"{wait[r]:>9.2f}" for r in WAIT_ROLES)
              + " |")
    print()

def use_qemu(root: str | None) -> str:
    """Put the QEMU in ``root`` (a directory made by scripts/fetch-qemu.sh: bin/ holds
    wrappers of qemu-system-x86_64, qemu-img, qemu-nbd, qemu-storage-daemon) first on PATH
    for everything this script and the agent start; return its version line."""
    if root:
        bin_dir = Path(root).resolve() / "bin"
        progs = ("qemu-system-x86_64", "qemu-img", "qemu-nbd", "qemu-storage-daemon")
        missing = [p for p in progs if not os.access(bin_dir / p, os.X_OK)]
        if missing:
            raise SystemExit(f"--qemu-dir {root}: no {', '.join(missing)} in {bin_dir}")
        os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    out = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True)
    return (out.stdout.splitlines() or ["unknown QEMU"])[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=8,
                    help="seconds the guest writes during each backup of workload 2 (8)")
    ap.add_argument("--qemu-dir", metavar="DIR",
                    help="run this QEMU (scripts/fetch-qemu.sh's directory) instead of the "
                    "system's")
    ap.add_argument("--only", choices=["worst", "curve"],
                    help="run one workload only")
    ap.add_argument("--settings", metavar="KEY,...",
                    help="workload 2's settings to run (none, stopped and the ones its targets "
                    "compare are always run): " + ", ".join(s.key for s in SETTINGS))
    add_smoke_flag(ap)
    args = ap.parse_args()
    disk_size, worst_size = 2 * GiB, GiB
    settings = SETTINGS
    if args.smoke:
        args.runs, args.runtime, disk_size, worst_size = 1, 1, 512 * MiB, 256 * MiB
        settings = [s for s in SETTINGS if s.key in SMOKE_SETTINGS]
    if args.settings:
        keys = {*args.settings.split(","), *SMOKE_SETTINGS}
        settings = [s for s in SETTINGS if s.key in keys]
    version = use_qemu(args.qemu_dir)
    load = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="ba-gc-"))
    configs = ["none", "scratch", "plugin"]
    worst: dict[str, list[Fio]] = {c: [] for c in configs}
    curve: dict[str, list[Outcome]] = {}
    try:
        if args.only != "curve":
            for _ in range(args.runs):
                for c in configs:
                    worst[c].append(worst_case(c, work, worst_size))
        if args.only != "worst":
            curve = during_backup(work, settings, args.runs, args.runtime, disk_size)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    end_load = os.getloadavg()

    print(f"\nwhat a backup costs a guest: {version}; {os.cpu_count()} cores, load average "
          f"{load[0]:.2f} at the start, {end_load[0]:.2f} at the end; 64 KiB writes at depth "
          f"{DEPTH}, fio over NBD, medians of {args.runs} runs\n")
    ok = True
    if worst["none"]:
        ok = report_worst(worst) and ok
    if curve:
        ok_ref, ok_auto = report_curve(settings, curve, disk_size, args.runtime)
        report_cpu(settings, curve)
        ok = ok and ok_ref and ok_auto
    if args.smoke:
        print(SMOKE_NOTE)
    return 0 if ok or args.smoke else 1


if __name__ == "__main__":
    sys.exit(main())
