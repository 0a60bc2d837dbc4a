"""The QMP client against real QEMU 7.2 (TCG): sessions, errors, block devices, guest I/O, a
booting guest."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import nbd
import pytest

from agent.qemu.block import BlockDevice, query_block_devices
from agent.qemu.qmp import Monitor, MonitorBusy, QmpError
from tests.integration.conftest import make_image
from tests.integration.vm import Disk, Guest, Vm, VmError, VmFactory

pytestmark = [pytest.mark.integration, pytest.mark.qemu]  # qemu: run on QEMU 10 too

KiB = 1024
MiB = 1024 * KiB




@pytest.fixture
def vm(vms: VmFactory, tmp_path: Path) -> Vm:
    """A paused VM with a 64 MiB qcow2 disk ``vda`` and an 8 MiB raw disk ``vdb``."""
    vda = make_image(tmp_path / "vda.qcow2", "qcow2", 64 * MiB, [("write", 0x11, 0, 2 * MiB)])
    vdb = make_image(tmp_path / "vdb.raw", "raw", 8 * MiB)
    return vms.start([Disk(vda, "qcow2", "vda"), Disk(vdb, "raw", "vdb")])


def test_connect_and_query_status(vm: Vm) -> None:
    with Monitor(str(vm.agent_qmp)) as mon:
        status = mon.execute("query-status")
    assert status["status"] == "prelaunch"
    assert status["running"] is False


@pytest.mark.network
def test_tcp_address(vms: VmFactory) -> None:
    with socket.socket() as probe:  # a free port (the VM takes it a moment later)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    vms.start(extra_args=["-qmp", f"tcp:127.0.0.1:{port},server=on,wait=off"])
    with Monitor(f"127.0.0.1:{port}") as mon:
        assert mon.execute("query-status")["status"] == "prelaunch"


def test_query_block_devices(vm: Vm, tmp_path: Path) -> None:
    with Monitor(str(vm.agent_qmp)) as mon:
        devices = query_block_devices(mon)
    assert devices == [
        BlockDevice(
            id="vda", qdev="/machine/peripheral/vda/virtio-backend", device="",
            node_name="vda-fmt", format="qcow2", virtual_size=64 * MiB,
            filename=str(tmp_path / "vda.qcow2"), read_only=False,
        ),
        BlockDevice(
            id="vdb", qdev="/machine/peripheral/vdb/virtio-backend", device="",
            node_name="vdb-fmt", format="raw", virtual_size=8 * MiB,
            filename=str(tmp_path / "vdb.raw"), read_only=False,
        ),
    ]
    assert devices[0].qom_path == "/machine/peripheral/vda"


@pytest.mark.slow
def test_second_client_is_busy(vm: Vm) -> None:
    with Monitor(str(vm.agent_qmp)) as first:
        with pytest.raises(MonitorBusy) as info:
            Monitor(str(vm.agent_qmp), timeout=2)
        assert str(info.value) == (
            f"the QMP monitor at {vm.agent_qmp} is busy: another client holds it (no QMP "
            "greeting within 2 s); give the agent a monitor of its own "
            "(-qmp unix:PATH,server=on,wait=off)"
        )
        assert first.execute("query-status")["status"] == "prelaunch"  # undisturbed
    with Monitor(str(vm.agent_qmp), timeout=5) as again:  # free once the first one left
        assert again.execute("query-status")["status"] == "prelaunch"


def test_failing_command_names_qemu_error_class(vm: Vm) -> None:
    with Monitor(str(vm.agent_qmp)) as mon:
        with pytest.raises(QmpError) as info:
            mon.execute("blockdev-add", {"driver": "raw", "node-name": "vda-fmt",
                                         "file": "vda-file"})
        assert str(info.value) == (
            "QMP command 'blockdev-add' failed: GenericError: "
            "Duplicate nodes with node-name='vda-fmt'"
        )
        assert (info.value.command, info.value.error_class) == ("blockdev-add", "GenericError")

        with pytest.raises(QmpError, match=r"^QMP command 'no-such' failed: CommandNotFound: "):
            mon.execute("no-such")
        with pytest.raises(QmpError, match=r"^QMP command 'query-block' failed: GenericError: "):
            mon.execute("query-block", {"bogus": 1})
        assert mon.execute("query-status")["running"] is False  # the session goes on


def test_unreachable_monitor(short_tmp: Path) -> None:
    missing = short_tmp / "none.qmp"
    with pytest.raises(QmpError, match=f"^no QMP monitor at {missing}: no such socket$"):
        Monitor(str(missing), timeout=2)

    stale = short_tmp / "stale.qmp"  # a socket file nobody listens on (QEMU was killed)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))
    with pytest.raises(QmpError, match="connection refused"):
        Monitor(str(stale), timeout=2)


def test_command_after_qemu_quit(vm: Vm) -> None:
    with Monitor(str(vm.agent_qmp)) as mon:
        vm.qmp.execute("quit")
        vm.wait_exit(10)
        with pytest.raises(QmpError, match=r"^QMP command 'query-status' (got no reply|not se)"):
            mon.execute("query-status")


def test_guest_write_lands(vm: Vm, short_tmp: Path, tmp_path: Path) -> None:
    vm.guest_write("vda", 0xAB, 1 * MiB, 64 * KiB)
    vm.guest_write("vdb", 0xCD, 0, 4 * KiB)
    vm.guest_verify("vda", 0xAB, 1 * MiB, 64 * KiB)
    with pytest.raises(VmError, match="Pattern verification failed"):
        vm.guest_verify("vda", 0xAB, 0, 64 * KiB)
    with pytest.raises(VmError, match="no-such"):
        vm.guest_write("no-such", 0xAB, 0, 512)

    # Read it back live, through a read-only NBD export of the disk's root node.
    sock = short_tmp / "export.sock"
    # nbd-server-start takes the legacy SocketAddress: {"type": ..., "data": {...}}.
    vm.qmp.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}})
    vm.qmp.execute("block-export-add", {"type": "nbd", "id": "exp-vda", "node-name": "vda-fmt",
                                        "name": "vda", "writable": False})
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///vda?socket={sock}")
    try:
        assert h.get_size() == 64 * MiB
        assert h.pread(64 * KiB, 1 * MiB) == b"\xab" * (64 * KiB)
        assert h.pread(64 * KiB, 1 * MiB - 64 * KiB) == b"\x11" * (64 * KiB)
        assert h.pread(64 * KiB, 2 * MiB) == bytes(64 * KiB)
    finally:
        h.shutdown()
    vm.qmp.execute("block-export-del", {"id": "exp-vda"})
    vm.qmp.execute("nbd-server-stop")

    # And on the image files, once QEMU has quit.
    assert vm.stop() == 0
    for image, fmt, cmd in [
        (tmp_path / "vda.qcow2", "qcow2", f"read -P 0xab {1 * MiB} {64 * KiB}"),
        (tmp_path / "vda.qcow2", "qcow2", f"read -P 0x11 0 {1 * MiB}"),
        (tmp_path / "vdb.raw", "raw", f"read -P 0xcd 0 {4 * KiB}"),
    ]:
        out = subprocess.run(["qemu-io", "-f", fmt, "-c", cmd, str(image)],
                             capture_output=True, text=True, check=True).stdout
        assert "Pattern verification failed" not in out, out
        assert "read " in out, out


@pytest.mark.timeout(900)  # the first run builds the guest: a 27 MB download
@pytest.mark.slow
def test_guest_boots_and_writes(vms: VmFactory, guest: Guest, tmp_path: Path) -> None:
    disk = make_image(tmp_path / "disk.raw", "raw", 1 * MiB)
    booting = Guest(guest.kernel, guest.initrd, "ba.pattern=0xcd ba.count=4 ba.passes=1")
    vm = vms.start([Disk(disk, "raw", "vda")], guest=booting)
    with Monitor(str(vm.agent_qmp)) as mon:
        assert mon.execute("query-status")["status"] == "running"
        assert [d.id for d in query_block_devices(mon)] == ["vda"]
    vm.wait_serial(f"BA-GUEST: ready vda={1 * MiB}", timeout=60)
    console = vm.wait_serial("BA-GUEST: poweroff", timeout=60)
    assert "BA-GUEST: wrote pass=1 block=3" in console
    assert "BA-GUEST: pass 1 done" in console
    assert "error" not in console.split("BA-GUEST: ready", 1)[1]
    assert vm.wait_exit(30) == 0
    out = subprocess.run(
        ["qemu-io", "-f", "raw", "-c", f"read -P 0xcd 0 {256 * KiB}",
         "-c", f"read -P 0 {256 * KiB} {768 * KiB}", str(disk)],
        capture_output=True, text=True, check=True,
    ).stdout
    assert "Pattern verification failed" not in out, out
