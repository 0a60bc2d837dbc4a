"""Copy-before-write snapshots (agent.qemu.graph) against real QEMU 7.2 VMs (TCG, no guest OS):
old data through the NBD export, new data on the disk, releases, crash cleanup, failed setups."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nbd
import pytest

from agent.qemu.block import query_block_devices
from agent.qemu.graph import LiveSnapshot, SnapshotError, SnapshotSpec, cleanup, round_inward
from agent.qemu.qmp import Monitor
from tests.integration.conftest import make_image
from tests.integration.vm import Disk, Vm, VmFactory

KiB = 1024
MiB = 1024 * KiB
C = 64 * KiB  # copy cluster

integration = pytest.mark.integration
qemu = pytest.mark.qemu  # run on QEMU 10 too (make test)


@pytest.mark.parametrize(("offset", "length", "cluster", "expected"), [
    (0, C, C, (0, C)),
    (0, C - 1, C, None),
    (1, C, C, None),
    (1, 3 * C, C, (C, 2 * C)),
    (C - 1, C + 2, C, (C, C)),
    (5 * C, 0, C, None),
    (4 * KiB, 200 * KiB, C, (C, 2 * C)),
    (0, 10 * MiB, 2 * MiB, (0, 10 * MiB)),
])
def test_round_inward(offset: int, length: int, cluster: int,
                      expected: tuple[int, int] | None) -> None:
    assert round_inward(offset, length, cluster) == expected
    if expected is not None:
        start, count = expected
        assert start % cluster == 0 and count % cluster == 0
        assert offset <= start and start + count <= offset + length


def test_round_inward_keeps_the_end_of_the_disk() -> None:
    size = 3 * C + 4608
    assert round_inward(3 * C, 4608, C, size) == (3 * C, 4608)
    assert round_inward(100, size - 100, C, size) == (C, size - C)
    assert round_inward(3 * C, 4000, C, size) is None  # short of the end: rounded as usual
    assert round_inward(3 * C + 1, 4607, C, size) is None  # the start is still rounded up


def test_round_inward_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        round_inward(-1, C, C)
    with pytest.raises(ValueError):
        round_inward(0, C, 0)


# -- helpers ------------------------------------------------------------------------------------



def disk(tmp_path: Path, dev_id: str, fmt: str, size: int, pattern: int) -> Disk:
    path = make_image(tmp_path / f"{dev_id}.{fmt}", fmt, size, [("write", pattern, 0, size)])
    return Disk(path, fmt, dev_id)


def specs(mon: Monitor, tmp_path: Path, bad: dict[str, Any] | None = None) -> list[SnapshotSpec]:
    """A qcow2 scratch target per device (``bad`` replaces the last device's target)."""
    out = []
    for dev in query_block_devices(mon):
        scratch = make_image(tmp_path / f"{dev.id}-scratch.qcow2", "qcow2", dev.virtual_size)
        target = {"driver": "qcow2", "file": {"driver": "file", "filename": str(scratch)}}
        out.append(SnapshotSpec(dev, target))
    if bad is not None:
        out[-1] = SnapshotSpec(out[-1].device, bad)
    return out


def graph_state(vm: Vm) -> tuple[list[str], dict[str, str], list[Any], list[str]]:
    """Named nodes, each device's drive, exports, and /objects: what a snapshot may change."""
    mon = vm.qmp
    nodes = sorted(n["node-name"] for n in mon.execute("query-named-block-nodes", {"flat": True})
                   if not n["node-name"].startswith("#"))
    drives = {d: mon.execute("qom-get", {"path": f"/machine/peripheral/{d}",
                                         "property": "drive"}) for d in vm.disks}
    objects = sorted(o["name"] for o in mon.execute("qom-list", {"path": "/objects"}))
    return nodes, drives, mon.execute("query-block-exports"), objects


def nbd_server_running(vm: Vm, sock_dir: Path) -> bool:
    try:
        vm.qmp.execute("nbd-server-start",
                       {"addr": {"type": "unix", "data": {"path": str(sock_dir / "probe")}}})
    except Exception as e:
        assert "already running" in str(e)
        return True
    vm.qmp.execute("nbd-server-stop")
    return False


class Export:
    """A libnbd connection to one snapshot export."""

    def __init__(self, sock: Path, name: str) -> None:
        self.h = nbd.NBD()
        self.h.set_export_name(name)
        self.h.connect_unix(str(sock))

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.h.pread(length, offset))

    def close(self) -> None:
        self.h.shutdown()


def target_copied(vm: Vm, sock: Path, node: str, offset: int, length: int) -> bool:
    """True if the copy-before-write target ``node`` holds copied data (not zeros) in the
    range: read through a read-only export of the node (QEMU keeps qcow2 metadata cached, so
    reading the file itself would miss recent copies)."""
    vm.qmp.execute("block-export-add", {"type": "nbd", "id": "test-tgt", "node-name": node,
                                        "name": "test-tgt", "writable": False})
    try:
        exp = Export(sock, "test-tgt")
        try:
            return any(exp.read(offset, length))
        finally:
            exp.close()
    finally:
        vm.qmp.execute("block-export-del", {"id": "test-tgt", "mode": "hard"})


# -- tests --------------------------------------------------------------------------------------


@integration
@qemu
@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_point_in_time_view(vms: VmFactory, tmp_path: Path, short_tmp: Path, fmt: str) -> None:
    vm = vms.start([disk(tmp_path, "vda", fmt, 8 * MiB, 0x11)], paused=False)  # BIOS runs
    before = graph_state(vm)
    sock = short_tmp / "nbd.sock"
    with Monitor(str(vm.agent_qmp)) as mon:
        snap = LiveSnapshot(mon, specs(mon, tmp_path), tag="t1", nbd_socket=str(sock))
        snap.setup()
        assert vm.qmp.execute("query-status")["status"] == "running"
        assert graph_state(vm)[1] == {"vda": "ba-t1-vda-cbw"}
        assert snap.nbd_server_owned
        vm.guest_write("vda", 0xAB, 1 * MiB, 64 * KiB)
        vm.guest_write("vda", 0xCD, 3 * MiB + 4 * KiB, 4 * KiB)  # copies the whole cluster
        vm.guest_write("vda", 0xEF, 5 * MiB - 32 * KiB, 64 * KiB)  # straddles two clusters
        exp = Export(sock, "vda")
        try:
            assert exp.h.get_size() == 8 * MiB
            assert exp.read(0, 8 * MiB) == b"\x11" * (8 * MiB)
        finally:
            exp.close()
        vm.guest_verify("vda", 0xAB, 1 * MiB, 64 * KiB)
        vm.guest_verify("vda", 0xCD, 3 * MiB + 4 * KiB, 4 * KiB)
        vm.guest_verify("vda", 0x11, 3 * MiB, 4 * KiB)
        vm.guest_verify("vda", 0xEF, 5 * MiB - 32 * KiB, 64 * KiB)
        snap.teardown()
        snap.teardown()  # idempotent
    assert graph_state(vm) == before
    assert not nbd_server_running(vm, short_tmp)
    assert vm.qmp.execute("query-status")["status"] == "running"
    vm.guest_verify("vda", 0xAB, 1 * MiB, 64 * KiB)


@integration
@qemu
def test_release(vms: VmFactory, tmp_path: Path, short_tmp: Path) -> None:
    vm = vms.start([disk(tmp_path, "vda", "qcow2", 8 * MiB, 0x11)])
    sock = short_tmp / "nbd.sock"
    with Monitor(str(vm.agent_qmp)) as mon, \
            LiveSnapshot(mon, specs(mon, tmp_path), tag="t2", nbd_socket=str(sock)) as snap:
        assert snap.cluster_size("vda") == C
        exp = Export(sock, "vda")
        try:
            # Aligned: released clusters are not copied any more and cannot be read.
            snap.release("vda", 1 * MiB, 2 * C)
            vm.guest_write("vda", 0xAB, 1 * MiB, 2 * C)
            assert not target_copied(vm, sock, "ba-t2-vda-tgt", 1 * MiB, 2 * C)
            with pytest.raises(nbd.Error):
                exp.read(1 * MiB, C)
            # Not released: copied.
            vm.guest_write("vda", 0xAB, 2 * MiB, C)
            assert target_copied(vm, sock, "ba-t2-vda-tgt", 2 * MiB, C)
            assert exp.read(2 * MiB, C) == b"\x11" * C

            # Unaligned: rounded inward to [4M+64K, 4M+192K); QEMU survives.
            snap.release("vda", 4 * MiB + 4 * KiB, 200 * KiB)
            snap.release("vda", 6 * MiB + 1, C)  # less than a whole cluster: nothing
            vm.guest_write("vda", 0xCD, 4 * MiB, 4 * C)
            vm.guest_write("vda", 0xCD, 6 * MiB, 2 * C)
            assert vm.running()
            assert vm.qmp.execute("query-status")["status"] == "prelaunch"
            assert exp.read(4 * MiB, C) == b"\x11" * C
            for off in (4 * MiB + C, 4 * MiB + 2 * C):
                with pytest.raises(nbd.Error):
                    exp.read(off, C)
            assert exp.read(4 * MiB + 3 * C, C) == b"\x11" * C
            assert exp.read(6 * MiB, 2 * C) == b"\x11" * (2 * C)
            vm.guest_verify("vda", 0xCD, 4 * MiB, 4 * C)

            with pytest.raises(Exception, match="outside the disk"):
                snap.release("vda", 8 * MiB - C, 2 * C)
        finally:
            exp.close()
    assert vm.running()


@integration
@qemu
def test_two_disks_one_point_in_time(vms: VmFactory, tmp_path: Path, short_tmp: Path) -> None:
    vm = vms.start([disk(tmp_path, "vda", "qcow2", 8 * MiB, 0x11),
                    disk(tmp_path, "vdb", "raw", 4 * MiB, 0x22)])
    # Someone else's NBD server: reused, and left running.
    other = short_tmp / "other.sock"
    vm.qmp.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(other)}}})
    before = graph_state(vm)
    with Monitor(str(vm.agent_qmp)) as mon, \
            LiveSnapshot(mon, specs(mon, tmp_path), tag="t3", nbd_socket=str(other)) as snap:
        assert not snap.nbd_server_owned
        vm.guest_write("vda", 0xAA, 0, 1 * MiB)
        vm.guest_write("vdb", 0xBB, 2 * MiB, 1 * MiB)
        for dev, size, old in (("vda", 8 * MiB, 0x11), ("vdb", 4 * MiB, 0x22)):
            exp = Export(other, dev)
            try:
                assert exp.read(0, size) == bytes([old]) * size
            finally:
                exp.close()
        vm.guest_verify("vda", 0xAA, 0, 1 * MiB)
        vm.guest_verify("vdb", 0xBB, 2 * MiB, 1 * MiB)
    assert graph_state(vm) == before
    assert nbd_server_running(vm, short_tmp)


@integration
@qemu
def test_cleanup_after_crash(vms: VmFactory, tmp_path: Path, short_tmp: Path) -> None:
    vm = vms.start([disk(tmp_path, "vda", "qcow2", 4 * MiB, 0x11),
                    disk(tmp_path, "vdb", "raw", 4 * MiB, 0x22)], paused=False)
    before = graph_state(vm)
    sock = short_tmp / "nbd.sock"
    mon = Monitor(str(vm.agent_qmp))
    snap = LiveSnapshot(mon, specs(mon, tmp_path), tag="t4", nbd_socket=str(sock))
    snap.setup()
    exp = Export(sock, "vdb")  # a client still connected when the agent dies
    mon.close()  # the agent dies: no teardown
    del snap
    assert graph_state(vm) != before

    with Monitor(str(vm.agent_qmp)) as fresh:
        assert cleanup(fresh, tag="other") == []
        removed = cleanup(fresh)
        assert "delete export ba-t4-vda" in removed
        assert "delete node ba-t4-vdb-tgt" in removed
        assert "stop the NBD server" in removed
        assert cleanup(fresh) == []
    exp.close()
    assert graph_state(vm) == before
    assert not nbd_server_running(vm, short_tmp)
    assert vm.qmp.execute("query-status")["status"] == "running"


@integration
@qemu
@pytest.mark.parametrize(("case", "message"), [
    ("bad-target", "cannot add the copy-before-write target for device 'vdb': QMP command "
                   "'blockdev-add' failed: "),
    ("bad-socket", "cannot start QEMU's NBD server on "),
])
def test_failed_setup_leaves_nothing(
    vms: VmFactory, tmp_path: Path, short_tmp: Path, case: str, message: str,
) -> None:
    vm = vms.start([disk(tmp_path, "vda", "qcow2", 4 * MiB, 0x11),
                    disk(tmp_path, "vdb", "raw", 4 * MiB, 0x22)], paused=False)
    before = graph_state(vm)
    bad = {"driver": "no-such-driver"} if case == "bad-target" else None
    sock = short_tmp / ("nbd.sock" if case == "bad-target" else "missing/nbd.sock")
    with Monitor(str(vm.agent_qmp)) as mon:
        snap = LiveSnapshot(mon, specs(mon, tmp_path, bad), tag="t5", nbd_socket=str(sock))
        with pytest.raises(SnapshotError) as info:
            snap.setup()
        assert str(info.value).startswith(message), str(info.value)
        snap.teardown()  # nothing left to undo
    assert graph_state(vm) == before
    assert vm.qmp.execute("query-status")["status"] == "running"


@integration
@qemu
def test_release_of_the_partial_last_cluster(vms: VmFactory, tmp_path: Path,
                                             short_tmp: Path) -> None:
    """A disk whose size is no multiple of the cluster: on QEMU 7.2 its last, partial cluster
    can be released (7.2's bitmaps accept a range that ends at the end of the disk), and QEMU
    then stops copying it. Later QEMUs round snapshot trims inward themselves, so that cluster
    stays in the snapshot: the agent, told so by the QMP schema, does not ask (QEMU would
    ignore it), and a guest write there is copied as usual."""
    size = 4 * MiB + 4608
    vm = vms.start([disk(tmp_path, "vda", "raw", size, 0x11)])
    sock = short_tmp / "nbd.sock"
    tail = 4 * MiB  # the last cluster starts here
    with Monitor(str(vm.agent_qmp)) as mon, \
            LiveSnapshot(mon, specs(mon, tmp_path), tag="t3", nbd_socket=str(sock)) as snap:
        exp = Export(sock, "vda")
        try:
            snap.release("vda", tail, size - tail)
            vm.guest_write("vda", 0xAB, tail, 4608)
            assert vm.running()
            released = snap.releases_partial_tail
            assert released == (vm.qemu_version < (9, 2))  # tested: 7.2 can, 10.0 cannot
            assert target_copied(vm, sock, "ba-t3-vda-tgt", tail, 4608) is not released
            if released:
                with pytest.raises(nbd.Error):
                    exp.read(tail, 4608)
            else:
                assert exp.read(tail, 4608) == b"\x11" * 4608
            assert exp.read(tail - C, C) == b"\x11" * C  # the cluster before: untouched
        finally:
            exp.close()
    assert vm.running()
    vm.guest_verify("vda", 0xAB, tail, 4608)


@integration
@qemu
def test_min_cluster_size(vms: VmFactory, tmp_path: Path, short_tmp: Path) -> None:
    """QEMU 9.2 and later copy in larger clusters when asked (``min-cluster-size``): a 4 KiB
    guest write then copies the whole larger cluster. An older QEMU is told no before anything
    is added to its graph."""
    vm = vms.start([disk(tmp_path, "vda", "raw", 8 * MiB, 0x11)])
    before = graph_state(vm)
    sock = short_tmp / "nbd.sock"
    with Monitor(str(vm.agent_qmp)) as mon:
        snap = LiveSnapshot(mon, specs(mon, tmp_path), tag="t6", nbd_socket=str(sock),
                            min_cluster=4 * C)
        if vm.qemu_version < (9, 2):
            with pytest.raises(SnapshotError, match=r"larger clusters: .* no min-cluster-size"):
                snap.setup()
            assert not snap.caps.min_cluster_size
            assert graph_state(vm) == before
            return
        with snap:
            assert snap.caps.min_cluster_size
            assert snap.cluster_size("vda") == 4 * C
            vm.guest_write("vda", 0xAB, 1 * MiB + 4 * KiB, 4 * KiB)
            assert target_copied(vm, sock, "ba-t6-vda-tgt", 1 * MiB + 3 * C, C)  # whole cluster
            assert not target_copied(vm, sock, "ba-t6-vda-tgt", 1 * MiB + 4 * C, C)
            exp = Export(sock, "vda")
            try:
                assert exp.read(1 * MiB, 4 * C) == b"\x11" * (4 * C)
            finally:
                exp.close()
    assert graph_state(vm) == before
