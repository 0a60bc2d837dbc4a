"""Live backup of a running QEMU VM (backup --qmp): real QEMU, real nbdkit plugin.

The archive must hold each disk exactly as it was when the backup started, whatever the
guest writes while the backup runs; the running disks must hold every guest write; and the
VM's block graph must be exactly as before, on success and on failure.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from agent.archive.codec import CompressionSpec
from agent.cbw.control import ControlClient
from agent.engine import EngineOptions
from agent.live.job import LiveJob
from agent.live.run import run_live_backup
from agent.qemu.qmp import Monitor
from agent.writing import BackupSummary
from tests.integration.cli_util import (
    AGENT,
    agent,
    agent_from_file,
    assert_error,
    children,
    cmdline,
    describe,
    running,
)
from tests.integration.conftest import qemu_img_compare
from tests.integration.live_util import backup_racing_guest_writes
from tests.integration.vm import Vm

pytestmark = [pytest.mark.integration, pytest.mark.qemu]  # qemu: run on QEMU 10 too

KiB = 1024
MiB = 1024 * KiB



def _graph(vm: Vm) -> tuple[list[str], list[object]]:
    nodes = sorted(n["node-name"] for n in vm.monitor.execute("query-named-block-nodes"))
    return nodes, vm.monitor.execute("query-block-exports")


@pytest.mark.slow
def test_guest_writes_during_backup_do_not_reach_the_archive(
    patterned_vm: tuple[Vm, dict[str, Path]], short_tmp: Path
) -> None:
    _backup_racing_guest_writes(*patterned_vm, short_tmp)


def test_larger_copy_clusters(patterned_vm: tuple[Vm, dict[str, Path]], short_tmp: Path) -> None:
    """--cbw-cluster-size: QEMU 9.2 and later copy in larger clusters, and the archive is
    still the point in time; an older QEMU is refused in one line, its graph untouched."""
    vm, before = patterned_vm
    if vm.qemu_version >= (9, 2):
        _backup_racing_guest_writes(vm, before, short_tmp, "--cbw-cluster-size", "256K")
        return
    graph_before = _graph(vm)
    arc = short_tmp / "x.arc"
    made = agent("backup", "--qmp", vm.agent_qmp, "--cbw-cluster-size", "256K", "-o", arc)
    assert_error(made, "larger clusters", "min-cluster-size", "9.2")
    assert not arc.exists()
    assert _graph(vm) == graph_before


def _backup_racing_guest_writes(vm: Vm, before: dict[str, Path], short_tmp: Path,
                                *extra: str) -> None:
    graph_before = _graph(vm)
    writes = [("vda", 0xA1, 0, 64 * KiB), ("vda", 0xA2, 30 * MiB + 4 * KiB, 4 * KiB),
              ("vda", 0xA3, 40 * MiB, 2 * MiB), ("vda", 0xA4, 44 * MiB, 64 * KiB),
              ("vdb", 0xB1, 8 * MiB, 4608), ("vdb", 0xB2, 4 * MiB, 1 * MiB)]
    data, err = backup_racing_guest_writes(
        vm, ["--compress", "none", "--connections", "1", "--memory", "4M",
             "--request-size", "1M", *extra], b"\x89BAGENT\n", writes)
    arc = short_tmp / "live.arc"
    arc.write_bytes(data)
    out = short_tmp / "restored"
    done = agent_from_file(arc, "restore", "-", "--to-dir", out)
    assert done.returncode == 0, describe(done)
    assert qemu_img_compare(before["vda"], "qcow2", out / "vda.raw", "raw", strict=False)
    assert qemu_img_compare(before["vdb"], "raw", out / "vdb.raw", "raw", strict=True)
    for dev, pattern, off, length in writes:
        vm.guest_verify(dev, pattern, off, length)  # the running disks have every write
    assert _graph(vm) == graph_before
    copied = int(err.split(b"guest writes: ")[1].split(b" ")[0])
    assert copied > 0, err.decode()  # the writes really raced the backup


def test_one_drive_only(patterned_vm: tuple[Vm, dict[str, Path]], short_tmp: Path) -> None:
    vm, before = patterned_vm
    arc = short_tmp / "vdb.arc"
    made = agent("backup", "--qmp", vm.agent_qmp, "--drive", "vdb", "-o", arc)
    assert made.returncode == 0, describe(made)
    done = agent("restore", arc, "--to-dir", short_tmp / "r")
    assert done.returncode == 0, describe(done)
    assert sorted(p.name for p in (short_tmp / "r").iterdir()) == ["vdb.raw"]
    assert qemu_img_compare(before["vdb"], "raw", short_tmp / "r" / "vdb.raw", "raw",
                            strict=True)


@pytest.mark.slow
def test_unknown_drive_and_busy_monitor(patterned_vm: tuple[Vm, dict[str, Path]],
                                        short_tmp: Path) -> None:
    vm, _ = patterned_vm
    graph_before = _graph(vm)
    bad = agent("backup", "--qmp", vm.agent_qmp, "--drive", "vdz", "-o", short_tmp / "x.arc")
    assert "vdz" in assert_error(bad)
    with Monitor(str(vm.agent_qmp)):  # somebody else holds the agent's monitor
        busy = agent("backup", "--qmp", vm.agent_qmp, "-o", short_tmp / "y.arc")
    assert "busy" in assert_error(busy)
    assert not (short_tmp / "x.arc").exists() and not (short_tmp / "y.arc").exists()
    assert _graph(vm) == graph_before


def test_output_closed_early_leaves_the_graph_as_before(
    patterned_vm: tuple[Vm, dict[str, Path]]
) -> None:
    vm, _ = patterned_vm
    graph_before = _graph(vm)
    with running([AGENT, "backup", "--qmp", str(vm.agent_qmp), "--compress", "none", "-o", "-"],
                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.read(1000)
        proc.stdout.close()  # the reader goes away
        err = proc.stderr.read()
        assert proc.wait(60) == 1
    assert "closed the pipe" in assert_error((1, err))
    assert _graph(vm) == graph_before
    vm.guest_write("vda", 0x5C, 0, 64 * KiB)  # the guest is unharmed
    vm.guest_verify("vda", 0x5C, 0, 64 * KiB)


def test_cleanup_after_a_killed_agent(patterned_vm: tuple[Vm, dict[str, Path]]) -> None:
    vm, _ = patterned_vm
    graph_before = _graph(vm)
    with running([AGENT, "backup", "--qmp", str(vm.agent_qmp), "--compress", "none", "-o", "-"],
                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                 stderr=subprocess.DEVNULL) as proc:
        assert proc.stdout is not None
        proc.stdout.read(1000)  # the snapshot exists; the backup now stalls on the pipe
        proc.kill()
    assert _graph(vm) != graph_before  # what the agent left behind
    vm.guest_write("vda", 0x6D, 8 * MiB, 64 * KiB)  # the guest still writes (break-snapshot)
    vm.guest_verify("vda", 0x6D, 8 * MiB, 64 * KiB)
    done = agent("cleanup", "--qmp", vm.agent_qmp)
    assert done.returncode == 0, describe(done)
    assert _graph(vm) == graph_before
    again = agent("cleanup", "--qmp", vm.agent_qmp)
    assert again.returncode == 0 and b"nothing to clean up" in again.stderr


@pytest.mark.slow
def test_block_status_skips_ranges_already_released(
    patterned_vm: tuple[Vm, dict[str, Path]], short_tmp: Path
) -> None:
    """Clusters QEMU copied are read ahead of the sweep and released (trimmed on the
    snapshot view); QEMU then refuses any request touching them, block status included.
    A later block-status window must ask only about ranges nobody claimed. (Found with
    random writes over a 2 GiB disk: the second 1 GiB window failed with EINVAL.)"""
    vm, before = patterned_vm
    fifo = short_tmp / "w.arc"  # a named pipe: the agent writes into it directly
    os.mkfifo(fifo)
    job = LiveJob(qmp=str(vm.agent_qmp), output=str(fifo), drives=["vda"],
                  engine=EngineOptions(compression=CompressionSpec.parse("none"),
                                       connections=1, request_size=64 * KiB,
                                       memory=256 * KiB, status_window=4 * MiB))
    outcome: list[BaseException | None] = []

    def backup() -> None:
        try:
            run_live_backup(job)
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    worker = threading.Thread(target=backup)
    worker.start()
    data = bytearray()
    with open(fifo, "rb") as pipe:
        data += pipe.read(4096)  # the snapshot exists; the sweep is held at window 1
        for off in range(24 * MiB, 40 * MiB, MiB):  # copied, read first, released
            vm.guest_write("vda", 0xE7, off, 64 * KiB)
        time.sleep(1)  # let the copies' events arrive before the sweep moves on
        while chunk := pipe.read(1 << 20):
            data += chunk
    worker.join(120)
    assert outcome == [None], outcome
    arc = short_tmp / "w-got.arc"
    arc.write_bytes(bytes(data))
    out = short_tmp / "r"
    done = agent_from_file(arc, "restore", "-", "--to-dir", out)
    assert done.returncode == 0, describe(done)
    assert qemu_img_compare(before["vda"], "qcow2", out / "vda.raw", "raw")


def _plugin_control(parent: int) -> str:
    """The control socket of the copy-before-write plugin that process ``parent`` started."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for pid in children(parent):
            args = cmdline(pid)
            if any("cbw_target.py" in a for a in args):
                return next(a.split("=", 1)[1] for a in args if a.startswith("control="))
        time.sleep(0.05)
    raise AssertionError("no copy-before-write plugin was started")


def test_copies_reach_the_archive_without_a_read_back_through_qemu(
    patterned_vm: tuple[Vm, dict[str, Path]], short_tmp: Path
) -> None:
    """The plugin sends each cluster QEMU copies to the agent on its control socket: the
    agent never reads a copy back through QEMU's snapshot view (which would make QEMU read
    it from the plugin), never trims one there, and the archive is still the disk at its
    point in time. Copied zeros travel as zeros."""
    vm, before = patterned_vm
    fifo = short_tmp / "p.arc"
    os.mkfifo(fifo)
    job = LiveJob(qmp=str(vm.agent_qmp), output=str(fifo), drives=["vda"],
                  engine=EngineOptions(compression=CompressionSpec.parse("none"),
                                       connections=1, request_size=64 * KiB,
                                       memory=8 * MiB, status_window=4 * MiB))
    outcome: list[BackupSummary | BaseException] = []

    def backup() -> None:
        try:
            outcome.append(run_live_backup(job))
        except BaseException as e:
            outcome.append(e)

    worker = threading.Thread(target=backup)
    worker.start()
    data = bytearray()
    with open(fifo, "rb") as pipe:
        data += pipe.read(4096)  # the snapshot exists; the sweep is held within its first 10 MiB
        control = ControlClient(_plugin_control(os.getpid()))
        writes = [(off, 64 * KiB) for off in range(24 * MiB, 40 * MiB, MiB)]
        writes.append((41 * MiB, 2 * MiB))  # one copy of 32 clusters
        for i, (off, length) in enumerate(writes):
            vm.guest_write("vda", 0xC0 + i, off, length)
        vm.guest_zero("vda", 44 * MiB, 128 * KiB)  # over zeros: two zero clusters copied
        copies = 16 + 32 + 2
        deadline = time.monotonic() + 60
        while control.stats()["clusters_taken"] < copies:  # the agent has them all
            assert time.monotonic() < deadline, str(control.stats())
            time.sleep(0.05)
        stats = control.stats()
        while chunk := pipe.read(1 << 20):
            data += chunk
    worker.join(120)
    assert len(outcome) == 1 and isinstance(outcome[0], BackupSummary), outcome
    summary = outcome[0]
    assert stats["clusters_copied"] == copies and stats["clusters_stored"] == 0
    assert stats["bytes_fed"] == (copies - 2) * 64 * KiB  # zeros went as zeros
    assert summary.live is not None
    assert summary.live.copies_read_back == 0  # no read reached the plugin
    assert summary.live.pushed_bytes == copies * 64 * KiB
    # every byte of the disk trimmed through QEMU, except what was pushed
    assert summary.live.released_bytes == 48 * MiB - copies * 64 * KiB
    arc = short_tmp / "p-got.arc"
    arc.write_bytes(bytes(data))
    out = short_tmp / "r"
    done = agent_from_file(arc, "restore", "-", "--to-dir", out)
    assert done.returncode == 0, describe(done)
    assert qemu_img_compare(before["vda"], "qcow2", out / "vda.raw", "raw")
    for i, (off, length) in enumerate(writes):
        vm.guest_verify("vda", 0xC0 + i, off, length)
