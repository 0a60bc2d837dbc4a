"""``backup --qmp --max-rate``: the background sweep is paced, the copies QEMU makes before
guest writes are not, and a paced backup is still the disk at its point in time."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.integration.cli_util import AGENT, agent_from_file, assert_error, describe, running
from tests.integration.conftest import make_image, qemu_img_compare
from tests.integration.vm import Disk, Vm, VmFactory

pytestmark = pytest.mark.integration

KiB = 1024
MiB = 1024 * KiB


def _nodes(vm: Vm) -> list[str]:
    return sorted(n["node-name"] for n in vm.monitor.execute("query-named-block-nodes"))


@pytest.fixture
def data_disk(vms: VmFactory, tmp_path: Path) -> tuple[Vm, Path]:
    """A VM with a raw disk that is data throughout (no zeros for the sweep to skip), and
    a copy of it taken before the VM started."""
    vda = make_image(tmp_path / "vda.raw", "raw", 32 * MiB, [
        ("write", 0x11, 0, 16 * MiB), ("write", 0x22, 16 * MiB, 16 * MiB)])
    before = tmp_path / "before.raw"
    shutil.copy(vda, before)
    vm = vms.start([Disk(vda, "raw", "vda")])
    vm.monitor.execute("cont")
    return vm, before


class _Drain:
    """Reads a process's stdout in a thread, keeping every byte."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.chunks: list[bytes] = []
        self.got = 0
        self._proc = proc
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        assert self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        while chunk := os.read(fd, 1 << 16):
            self.chunks.append(chunk)
            self.got += len(chunk)

    def wait_for(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.got < n and time.monotonic() < deadline and self._proc.poll() is None:
            time.sleep(0.02)

    def join(self) -> bytes:
        self._thread.join(60)
        return b"".join(self.chunks)


@pytest.mark.parametrize("rate", ["24M", "auto"])
@pytest.mark.slow
def test_paced_live_backup_restores_the_point_in_time(
    data_disk: tuple[Vm, Path], short_tmp: Path, rate: str
) -> None:
    vm, before = data_disk
    nodes = _nodes(vm)
    with running(
        [AGENT, "backup", "--qmp", str(vm.agent_qmp), "--compress", "none", "-o", "-",
         "--max-rate", rate, "--request-size", "256K"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stderr is not None
        drain = _Drain(proc)
        drain.wait_for(4096)  # the header: the snapshot exists
        # Guest writes race the sweep: each must reach the archive as it was before.
        for pattern, off, length in [(0xA1, 0, 64 * KiB), (0xA2, 20 * MiB, 2 * MiB),
                                     (0xA3, 32 * MiB - 4 * KiB, 4 * KiB)]:
            vm.guest_write("vda", pattern, off, length)
        err = proc.stderr.read()
        assert proc.wait(120) == 0, err.decode()
        archive = drain.join()
    arc = short_tmp / "paced.arc"
    arc.write_bytes(archive)
    out = short_tmp / "restored"
    done = agent_from_file(arc, "restore", "-", "--to-dir", out)
    assert done.returncode == 0, describe(done)
    assert qemu_img_compare(before, "raw", out / "vda.raw", "raw", strict=True)
    vm.guest_verify("vda", 0xA2, 20 * MiB, 2 * MiB)  # the running disk has the writes
    assert _nodes(vm) == nodes


def test_copies_are_read_while_the_sweep_waits(
    data_disk: tuple[Vm, Path], short_tmp: Path
) -> None:
    """At 4 KiB per second the sweep reads one 64 KiB cluster every 16 s; 2 MiB of clusters
    copied before guest writes still reach the archive at once (paced, they would take
    512 s)."""
    vm, _ = data_disk
    nodes = _nodes(vm)
    read = 64 * KiB
    with running(
        [AGENT, "backup", "--qmp", str(vm.agent_qmp), "--compress", "none", "-o", "-",
         "--max-rate", "4K", "--request-size", "64K", "--connections", "1"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stderr is not None
        drain = _Drain(proc)
        drain.wait_for(4096)
        start = time.monotonic()
        vm.guest_write("vda", 0xB1, 8 * MiB, 2 * MiB)
        drain.wait_for(2 * MiB + 4096)
        elapsed = time.monotonic() - start
        got = drain.got
        assert got >= 2 * MiB, f"only {got} bytes of archive: the copies were held back"
        # The sweep's share: what the bucket allows since the start, a read or two of
        # slack, and record headers (far less than one read).
        swept_at_most = 2 * read + 4 * KiB * (elapsed + 5)
        assert got <= 2 * MiB + swept_at_most + read, (got, elapsed)
        proc.send_signal(signal.SIGTERM)
        err = proc.stderr.read()
        code = proc.wait(60)
    assert_error((code, err), "SIGTERM")
    assert _nodes(vm) == nodes  # everything the agent added is gone
    vm.guest_write("vda", 0xB2, 0, 64 * KiB)  # and the guest writes on
