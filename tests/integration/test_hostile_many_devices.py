"""An archive of many devices into qcow2 images (issue 13): each image is served by a
qemu-nbd of the agent's own, and a restore once started one per device before reading a
record (40,000 devices: 40,000 processes). Now at most ``RestoreOptions.open_targets`` run
at once. Counted: this process's qemu-nbd children whenever a target opens."""

from __future__ import annotations

import io
import os
import resource
import subprocess
from pathlib import Path

import pytest

from agent.archive.format import Device
from agent.restore import RestoreOptions, restore, to_dir
from agent.targets.base import Sink
from tests.hostile import builder as hb
from tests.integration.cli_util import AGENT, TIMEOUT

pytestmark = pytest.mark.integration

SIZE = 64 * 1024


def _qemu_nbd_children() -> int:
    me = str(os.getpid())
    n = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        comm, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :]
        if comm == "qemu-nbd" and rest.split()[1] == me:
            n += 1
    return n


def test_qcow2_restore_of_many_devices_runs_only_so_many_qemu_nbd(tmp_path: Path) -> None:
    devices, open_targets = 12, 3
    arc = hb.many_devices(devices, size=SIZE, rounds=2, empty=1)
    out = tmp_path / "out"
    opts = RestoreOptions(memory=4 << 20, workers=2, connections=1, open_targets=open_targets)
    factory = to_dir(out, "qcow2", None, opts)
    counts: list[int] = []

    def make(dev: Device) -> Sink | None:
        sink = factory(dev)
        counts.append(_qemu_nbd_children())
        if sink is not None and sink.reopen is not None:
            reopen = sink.reopen

            def counted() -> object:
                got = reopen()
                counts.append(_qemu_nbd_children())
                return got

            sink.reopen = counted  # type: ignore[assignment]
        return sink

    result = restore(io.BytesIO(arc), make, opts)
    assert len(result.devices) == devices + 1
    assert max(counts) == open_targets, counts  # before: one per device, 13
    assert len(counts) > 2 * devices  # opened again for the second round, and to commit
    assert _qemu_nbd_children() == 0
    for i in (0, 5, devices - 1):
        raw = tmp_path / f"d{i}.raw"
        subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw",
                        str(out / f"d{i}.qcow2"), str(raw)], check=True, timeout=60)
        assert raw.read_bytes() == hb.device_content(i, SIZE)
    assert (out / "e0.qcow2").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"d{i}.qcow2" for i in range(devices)] + ["e0.qcow2"])


def _nofile(limit: int) -> None:
    """preexec_fn: soft and hard limits of open files both ``limit`` (no raising it)."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


def test_restore_of_1000_devices_within_200_open_files(tmp_path: Path) -> None:
    """Through the command line, with a hard limit of 200 open files: before, the restore
    opened a file per device up front and failed on the 190th or so."""
    devices = 1000
    arc = tmp_path / "many.arc"
    arc.write_bytes(hb.many_devices(devices, size=4096, rounds=2, empty=2))
    out = tmp_path / "out"
    done = subprocess.run([AGENT, "restore", str(arc), "--to-dir", str(out), "--progress",
                           "none"], capture_output=True, timeout=TIMEOUT,
                          preexec_fn=lambda: _nofile(200), check=False)
    assert done.returncode == 0, done.stderr.decode()
    assert len(list(out.iterdir())) == devices + 2
    for i in (0, 499, devices - 1):
        assert (out / f"d{i}.raw").read_bytes() == hb.device_content(i, 4096)
    assert (out / "e1.raw").stat().st_size == 0


def test_open_targets_flag_bounds_the_files_open_at_once(tmp_path: Path) -> None:
    """``--open-targets 8`` under a limit of 40 open files, which the default (64) exceeds."""
    devices = 100
    arc = tmp_path / "many.arc"
    arc.write_bytes(hb.many_devices(devices, size=4096, rounds=2, empty=0))

    def restore_with(extra: list[str], out: Path) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([AGENT, "restore", str(arc), "--to-dir", str(out), "--progress",
                               "none", *extra], capture_output=True, timeout=TIMEOUT,
                              preexec_fn=lambda: _nofile(40), check=False)

    refused = restore_with([], tmp_path / "default")
    assert refused.returncode == 1, refused.stderr.decode()
    assert refused.stderr.decode().strip().endswith(
        "Too many open files (restore fewer at once: --open-targets N)")
    assert not (tmp_path / "default").exists() or not any((tmp_path / "default").iterdir())
    done = restore_with(["--open-targets", "8"], tmp_path / "out")
    assert done.returncode == 0, done.stderr.decode()
    assert len(list((tmp_path / "out").iterdir())) == devices
    for i in (0, 50, devices - 1):
        assert (tmp_path / "out" / f"d{i}.raw").read_bytes() == hb.device_content(i, 4096)
