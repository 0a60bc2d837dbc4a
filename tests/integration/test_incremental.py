"""Incremental and differential live backups, and chain restores: real QEMU, real bitmaps.

The oracle is a model of each disk: a bytearray that receives every write the test makes
through the guest's device. A chain restored up to backup N must equal the model as it was
when backup N started, byte for byte.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.integration.cli_util import (
    AGENT,
    agent,
    assert_error,
    assert_ok,
    info_json,
    running,
)
from tests.integration.conftest import make_image
from tests.integration.vm import Disk, Vm, VmFactory

pytestmark = [pytest.mark.integration, pytest.mark.qemu]  # qemu: run on QEMU 10 too

KiB = 1024
MiB = 1024 * KiB
CLUSTER = 64 * KiB  # bitmap granularity
SIZE = 24 * MiB


@dataclass
class Guest:
    """A VM with one qcow2 disk ``vda``, and the model of that disk."""

    vms: VmFactory
    image: Path
    vm: Vm
    model: bytearray
    dirty: set[int] = field(default_factory=set)  # clusters written since the last backup
    diff_dirty: set[int] = field(default_factory=set)  # ... since the last full backup

    def write(self, pattern: int, offset: int, length: int) -> None:
        self.vm.guest_write("vda", pattern, offset, length)
        self.model[offset:offset + length] = bytes([pattern]) * length
        self._mark(offset, length)

    def zero(self, offset: int, length: int) -> None:
        self.vm.guest_zero("vda", offset, length)
        self.model[offset:offset + length] = bytes(length)
        self._mark(offset, length)

    def _mark(self, offset: int, length: int) -> None:
        clusters = set(range(offset // CLUSTER, -(-(offset + length) // CLUSTER)))
        self.dirty |= clusters
        self.diff_dirty |= clusters

    def backup(self, out: Path, mode: str, *extra: str) -> subprocess.CompletedProcess[bytes]:
        proc = agent("backup", "--qmp", self.vm.agent_qmp, "--mode", mode, "--compress",
                     "none", "-o", out, *extra)
        if proc.returncode == 0:
            self.dirty = set()
            if info_json(out)["kind"] == "full":
                self.diff_dirty = set()
        return proc

    def restart(self, kill: bool = False) -> None:
        """Stop QEMU (``quit``, which writes the bitmaps into the image; or SIGKILL) and
        start a new one on the same disk."""
        if kill:
            self.vm.proc.kill()
            self.vm.proc.wait()
        self.vm.stop()
        self.vm = self.vms.start([Disk(self.image, "qcow2", "vda")])

    def bitmaps(self) -> list[dict[str, Any]]:
        return [b for n in self.vm.qmp.execute("query-named-block-nodes", {"flat": True})
                if n["node-name"] == "vda-fmt" for b in n.get("dirty-bitmaps", [])
                if "name" in b]

    def bitmap_names(self) -> list[str]:
        return sorted(b["name"] for b in self.bitmaps())


def covered(path: Path) -> int:
    t = info_json(path)["totals"]
    return int(t["data_bytes"]) + int(t["zero_bytes"])


def restored(paths: Sequence[Path], out: Path, *, stdin: int | None = None) -> bytes:
    """``backup-agent restore PATHS --to-dir OUT``; the restored vda.raw's bytes. A path
    ``-`` reads the archive ``stdin`` points at."""
    if stdin is None:
        proc = agent("restore", *paths, "--to-dir", out)
    else:
        proc = subprocess.run([AGENT, "restore", *map(str, paths), "--to-dir", str(out)],
                              stdin=stdin, capture_output=True, timeout=120, check=False)
    assert_ok(proc)
    return (out / "vda.raw").read_bytes()


@pytest.fixture
def guest(vms: VmFactory, tmp_path: Path) -> Guest:
    image = make_image(tmp_path / "vda.qcow2", "qcow2", SIZE, [
        ("write", 0x11, 0, 6 * MiB), ("write", 0x22, 10 * MiB, 4 * MiB)])
    model = bytearray(SIZE)
    model[0:6 * MiB] = b"\x11" * (6 * MiB)
    model[10 * MiB:14 * MiB] = b"\x22" * (4 * MiB)
    vm = vms.start([Disk(image, "qcow2", "vda")])
    return Guest(vms, image, vm, model)


@pytest.mark.slow
def test_chain_of_incrementals_restores_each_point_in_time(guest: Guest, tmp_path: Path) -> None:
    full = tmp_path / "0-full.arc"
    proc = guest.backup(full, "auto")
    assert_ok(proc)
    assert b"full backup instead of incremental" in proc.stderr  # auto says what it did
    assert info_json(full)["kind"] == "full"
    at_full = bytes(guest.model)

    guest.write(0x31, 1 * MiB, 4 * KiB)  # inside data
    guest.write(0x32, 20 * MiB + 100, 200 * KiB)  # unaligned, in a hole
    guest.zero(11 * MiB, 1 * MiB)  # zeroes over data
    inc1 = tmp_path / "1-inc.arc"
    changed1 = {c * CLUSTER for c in guest.dirty}
    assert_ok(guest.backup(inc1, "incremental"))
    at_inc1 = bytes(guest.model)

    guest.write(0x41, 1 * MiB, 64 * KiB)  # the same cluster again
    guest.write(0x42, SIZE - 4 * KiB, 4 * KiB)  # the last cluster
    inc2 = tmp_path / "2-inc.arc"
    changed2 = {c * CLUSTER for c in guest.dirty}
    assert_ok(guest.backup(inc2, "auto"))

    i0, i1, i2 = info_json(full), info_json(inc1), info_json(inc2)
    assert (i1["kind"], i1["parent_uuid"]) == ("incremental", i0["uuid"])
    assert (i2["kind"], i2["parent_uuid"]) == ("incremental", i1["uuid"])
    assert i1["checkpoint"] == f"ba-inc-{i1['uuid']}"
    # An incremental holds exactly the changed clusters: nothing more, nothing less.
    assert covered(inc1) == len(changed1) * CLUSTER
    assert covered(inc2) == len(changed2) * CLUSTER
    assert info_json(inc1)["totals"]["zero_bytes"] >= 1 * MiB  # the zeroed range: no data stored
    assert covered(full) == SIZE

    assert restored([full], tmp_path / "r0") == at_full
    assert restored([full, inc1], tmp_path / "r1") == at_inc1
    # Any one archive of the chain may come from a pipe.
    with open(inc1, "rb") as f:
        assert restored([full, Path("-"), inc2], tmp_path / "r2", stdin=f.fileno()) == \
            guest.model
    q = tmp_path / "rq"
    assert_ok(agent("restore", full, inc1, inc2, "--to-dir", q, "--format", "qcow2"))
    conv = tmp_path / "q.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", q / "vda.qcow2", conv], check=True)
    assert conv.read_bytes() == guest.model
    # After each successful backup: its checkpoint alone (plus the full's).
    assert guest.bitmap_names() == [f"ba-full-{i0['uuid']}", f"ba-inc-{i2['uuid']}"]


@pytest.mark.slow
def test_guest_writes_during_an_incremental(guest: Guest, tmp_path: Path) -> None:
    """The snapshot is one point in time: writes while the incremental runs (to changed
    and to unchanged clusters) reach the next incremental, never this one."""
    full = tmp_path / "full.arc"
    assert_ok(guest.backup(full, "full"))
    for i in range(8):
        guest.write(0x50 + i, i * 2 * MiB, 256 * KiB)
    at_start = bytes(guest.model)
    with running(
        [AGENT, "backup", "--qmp", str(guest.vm.agent_qmp), "--mode", "incremental",
         "--compress", "none", "-o", "-", "--connections", "1", "--memory", "1M",
         "--request-size", "64K"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        head = proc.stdout.read(4096)  # the snapshot exists; the rest waits on the pipe
        assert head.startswith(b"\x89BAGENT\n")
        guest.dirty = set()
        for i in range(8):  # over the changed clusters the backup has not read yet
            guest.write(0x60 + i, i * 2 * MiB + 64 * KiB, 64 * KiB)
        guest.write(0x70, 17 * MiB, 64 * KiB)  # an unchanged cluster
        # Not communicate(): it reads the raw pipe and would skip what stdout buffered.
        out: list[bytes] = []
        reader = threading.Thread(target=lambda: out.append(proc.stdout.read()))  # type: ignore[union-attr]
        reader.start()
        err = proc.stderr.read()  # type: ignore[union-attr]
        reader.join(120)
        rest = out[0]
        proc.wait(120)
    assert proc.returncode == 0, err.decode()
    inc = tmp_path / "inc.arc"
    inc.write_bytes(head + rest)
    assert restored([full, inc], tmp_path / "r1") == at_start
    assert covered(inc) == 8 * 256 * KiB
    inc2 = tmp_path / "inc2.arc"
    assert_ok(guest.backup(inc2, "incremental"))
    assert covered(inc2) == 9 * 64 * KiB
    assert restored([full, inc, inc2], tmp_path / "r2") == guest.model


@pytest.mark.slow
def test_failed_incrementals_lose_no_change(guest: Guest, tmp_path: Path) -> None:
    full = tmp_path / "full.arc"
    assert_ok(guest.backup(full, "full"))
    before = guest.bitmap_names()

    guest.write(0x81, 2 * MiB, 1 * MiB)
    # 1. The output is closed early.
    with running(
        [AGENT, "backup", "--qmp", str(guest.vm.agent_qmp), "--mode", "incremental", "-o",
         "-", "--compress", "none", "--memory", "1M", "--request-size", "64K"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.read(1000)
        proc.stdout.close()
        err = proc.stderr.read()
        assert proc.wait(120) == 1
    assert_error((1, err), "closed")
    assert guest.bitmap_names() == before  # the new checkpoint is gone, the old one stays

    guest.write(0x82, 5 * MiB, 1 * MiB)
    # 2. The agent is killed; cleanup removes what it left in QEMU but the bitmaps.
    with running(
        [AGENT, "backup", "--qmp", str(guest.vm.agent_qmp), "--mode", "incremental", "-o",
         "-", "--compress", "none", "--memory", "1M", "--request-size", "64K"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as proc:
        assert proc.stdout is not None
        proc.stdout.read(1000)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert_ok(agent("cleanup", "--qmp", guest.vm.agent_qmp))
    left = guest.bitmap_names()
    assert set(before) < set(left) and len(left) == len(before) + 1  # the dead run's checkpoint
    assert not any(n.endswith("-chg") for n in left)

    guest.write(0x83, 8 * MiB, 1 * MiB)
    inc = tmp_path / "inc.arc"
    assert_ok(guest.backup(inc, "incremental"))
    # the oldest checkpoint: the full's
    assert info_json(inc)["parent_uuid"] == info_json(full)["uuid"]
    assert covered(inc) == 3 * MiB  # every write since the full, through both failures
    assert restored([full, inc], tmp_path / "r") == guest.model
    assert len(guest.bitmap_names()) == 2  # the dead run's checkpoint is retired too


@pytest.mark.slow
def test_checkpoints_survive_a_restart(guest: Guest, tmp_path: Path) -> None:
    full = tmp_path / "full.arc"
    assert_ok(guest.backup(full, "full"))
    guest.write(0x91, 3 * MiB, 128 * KiB)
    guest.restart()
    guest.write(0x92, 15 * MiB, 128 * KiB)
    inc = tmp_path / "inc.arc"
    assert_ok(guest.backup(inc, "incremental"))
    assert info_json(inc)["parent_uuid"] == info_json(full)["uuid"]
    assert covered(inc) == 256 * KiB
    assert restored([full, inc], tmp_path / "r") == guest.model


@pytest.mark.slow
def test_differential_after_two_incrementals(guest: Guest, tmp_path: Path) -> None:
    full = tmp_path / "full.arc"
    assert_ok(guest.backup(full, "full"))
    arcs = []
    for i in range(2):
        guest.write(0xA0 + i, (1 + 4 * i) * MiB, 512 * KiB)
        arcs.append(tmp_path / f"inc{i}.arc")
        assert_ok(guest.backup(arcs[-1], "incremental"))
    guest.write(0xA5, 20 * MiB, 64 * KiB)
    expected = len(guest.diff_dirty) * CLUSTER
    diff = tmp_path / "diff.arc"
    assert_ok(guest.backup(diff, "differential"))
    d = info_json(diff)
    assert (d["kind"], d["parent_uuid"]) == ("differential", info_json(full)["uuid"])
    assert covered(diff) == expected == 1024 * KiB + 64 * KiB  # both incrementals' changes
    assert restored([full, diff], tmp_path / "r") == guest.model
    # The next incremental builds on the differential.
    guest.write(0xA6, 22 * MiB, 64 * KiB)
    inc = tmp_path / "inc-after.arc"
    assert_ok(guest.backup(inc, "incremental"))
    assert info_json(inc)["parent_uuid"] == d["uuid"]
    assert covered(inc) == 64 * KiB
    assert restored([full, diff, inc], tmp_path / "r2") == guest.model


@pytest.mark.slow
def test_chain_errors(guest: Guest, vms: VmFactory, tmp_path: Path) -> None:
    full, inc1, inc2 = (tmp_path / n for n in ("full.arc", "inc1.arc", "inc2.arc"))
    assert_ok(guest.backup(full, "full"))
    guest.write(0xB1, 0, 64 * KiB)
    assert_ok(guest.backup(inc1, "incremental"))
    guest.write(0xB2, 0, 64 * KiB)
    assert_ok(guest.backup(inc2, "incremental"))
    other = Guest(vms, make_image(tmp_path / "o.qcow2", "qcow2", SIZE), guest.vm, bytearray())
    other.vm = vms.start([Disk(other.image, "qcow2", "vda")])
    ofull, oinc = tmp_path / "other-full.arc", tmp_path / "other-inc.arc"
    assert_ok(other.backup(ofull, "full"))
    assert_ok(other.backup(oinc, "incremental"))

    out = tmp_path / "out"
    assert_error(agent("restore", full, inc2, inc1, "--to-dir", out), "wrong order")
    assert_error(agent("restore", full, inc2, "--to-dir", out), "missing link",
                 info_json(inc1)["uuid"])
    assert_error(agent("restore", full, inc1, oinc, "--to-dir", out), "another VM")
    assert_error(agent("restore", inc1, "--to-dir", out), "incremental", "full backup")
    assert_error(agent("restore", full, ofull, "--to-dir", out), "full backup")
    assert_error(agent("restore", "-", "-", "--to-dir", out), "standard input")
    assert not out.exists() or not any(out.iterdir())  # nothing written, not even partly
    # An incremental verifies on its own (it is a complete archive of the changes).
    assert_ok(agent("verify", inc2))


def test_raw_disks_get_full_backups(vms: VmFactory, tmp_path: Path) -> None:
    vda = make_image(tmp_path / "vda.qcow2", "qcow2", 4 * MiB)
    vdb = make_image(tmp_path / "vdb.raw", "raw", 4 * MiB)
    vm = vms.start([Disk(vda, "qcow2", "vda"), Disk(vdb, "raw", "vdb")])
    arc = tmp_path / "a.arc"
    proc = agent("backup", "--qmp", vm.agent_qmp, "--mode", "auto", "-o", arc)
    assert_ok(proc)
    assert b"'vdb' is raw" in proc.stderr and b"qcow2" in proc.stderr
    assert info_json(arc)["kind"] == "full" and info_json(arc)["checkpoint"] is None
    assert_error(agent("backup", "--qmp", vm.agent_qmp, "--mode", "incremental", "-o",
                       tmp_path / "i.arc"), "'vdb' is raw", "qcow2")
    assert not (tmp_path / "i.arc").exists()
    # Just the qcow2 disk: checkpoints work.
    assert_ok(agent("backup", "--qmp", vm.agent_qmp, "--drive", "vda", "-o", tmp_path / "f"))
    assert_ok(agent("backup", "--qmp", vm.agent_qmp, "--drive", "vda", "--mode",
                    "incremental", "-o", tmp_path / "i"))


@pytest.mark.slow
def test_missing_and_inconsistent_checkpoints(guest: Guest, tmp_path: Path) -> None:
    assert_ok(guest.backup(tmp_path / "f1.arc", "full"))
    # Deleted by hand.
    for name in guest.bitmap_names():
        guest.vm.qmp.execute("block-dirty-bitmap-remove", {"node": "vda-fmt", "name": name})
    assert_error(guest.backup(tmp_path / "x.arc", "incremental"), "no checkpoint",
                 "full backup first")
    proc = guest.backup(tmp_path / "f2.arc", "auto")
    assert_ok(proc)
    assert b"full backup instead of incremental: disk 'vda' has no checkpoint" in proc.stderr
    # A bitmap is written into the image when QEMU closes it; QEMU that loaded it and was
    # then killed leaves it marked "in use": QEMU calls it inconsistent.
    guest.restart()
    assert len(guest.bitmap_names()) == 2
    guest.write(0xC1, 0, 64 * KiB)
    guest.restart(kill=True)
    assert any(b.get("inconsistent") for b in guest.bitmaps()), guest.bitmaps()
    assert_error(guest.backup(tmp_path / "x.arc", "incremental"), "inconsistent")
    assert_error(guest.backup(tmp_path / "x.arc", "differential"), "inconsistent")
    f3 = tmp_path / "f3.arc"
    proc = guest.backup(f3, "auto")
    assert_ok(proc)
    assert b"inconsistent" in proc.stderr and info_json(f3)["kind"] == "full"
    assert not any(b.get("inconsistent") for b in guest.bitmaps())  # retired by the full
    guest.write(0xC2, 64 * KiB, 64 * KiB)
    inc = tmp_path / "inc.arc"
    assert_ok(guest.backup(inc, "incremental"))
    assert restored([f3, inc], tmp_path / "r") == guest.model
