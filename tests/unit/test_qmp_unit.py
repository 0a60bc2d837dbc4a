"""The QMP client's pure parts (addresses, replies -> block devices) and its connection
failures against plain sockets that are not QEMU (a silent listener, a foreign greeting)."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.address import parse_address
from agent.errors import AgentError
from agent.qemu.block import BlockDevice, block_devices_from, device_id
from agent.qemu.qmp import Monitor, MonitorBusy, QmpError


@pytest.mark.parametrize(("address", "expected"), [
    ("/run/vm1/qmp.sock", "/run/vm1/qmp.sock"),
    ("qmp.sock", "qmp.sock"),
    ("./mon:4444", "./mon:4444"),
    ("localhost:4444", ("localhost", 4444)),
    ("127.0.0.1:4444", ("127.0.0.1", 4444)),
    ("[::1]:4444", ("::1", 4444)),
    ("host:port", "host:port"),
    (":4444", ":4444"),
])
def test_parse_address(address: str, expected: str | tuple[str, int]) -> None:
    assert parse_address(address) == expected


@pytest.mark.parametrize(("qdev", "device", "expected"), [
    ("/machine/peripheral/vda/virtio-backend", "", "vda"),
    ("scsi0-0-0", "", "scsi0-0-0"),
    ("/machine/peripheral-anon/device[0]/virtio-backend", "drive0", "drive0"),
    ("/machine/peripheral-anon/device[0]/virtio-backend", "",
     "/machine/peripheral-anon/device[0]/virtio-backend"),
    (None, "drive1", "drive1"),
])
def test_device_id(qdev: str | None, device: str, expected: str) -> None:
    assert device_id(qdev, device) == expected


def _node(name: str, drv: str, size: int, filename: str, ro: bool = False) -> dict[str, Any]:
    return {"node-name": name, "drv": drv, "ro": ro, "file": filename,
            "image": {"virtual-size": size, "filename": filename, "format": drv}}


def test_block_devices_from_replies() -> None:
    blocks = [
        {"device": "", "qdev": "/machine/peripheral/vda/virtio-backend",
         "inserted": _node("vda-fmt", "qcow2", 1 << 30, "/img/a.qcow2")},
        {"device": "cd0", "qdev": "/machine/peripheral/cd0", "removable": True},  # no medium
        {"device": "drive0", "qdev": "/machine/peripheral-anon/device[1]/virtio-backend",
         "inserted": _node("#block123", "raw", 1 << 20, "/img/b.raw")},
    ]
    nodes = [
        _node("vda-fmt", "copy-before-write", 1 << 30, "/img/a.qcow2"),  # what the device uses
        _node("vda-file", "file", 123456, "/img/a.qcow2"),
        _node("#block123", "raw", 1 << 20, "/img/b.raw", ro=True),
    ]
    assert block_devices_from(blocks, nodes) == [
        BlockDevice(id="vda", qdev="/machine/peripheral/vda/virtio-backend", device="",
                    node_name="vda-fmt", format="copy-before-write", virtual_size=1 << 30,
                    filename="/img/a.qcow2", read_only=False),
        BlockDevice(id="drive0", qdev="/machine/peripheral-anon/device[1]/virtio-backend",
                    device="drive0", node_name="#block123", format="raw", virtual_size=1 << 20,
                    filename="/img/b.raw", read_only=True),
    ]


@pytest.mark.parametrize(("blocks", "nodes", "message"), [
    ({"return": []}, [], "QMP command 'query-block' gave an unexpected reply"),
    ([], "nope", "QMP command 'query-named-block-nodes' gave an unexpected reply"),
    ([{"inserted": {"drv": "raw"}}], [], "no str 'node-name'"),
    ([{"inserted": {"node-name": "n"}}], [{"node-name": "n", "drv": "raw", "file": "f",
                                           "image": {"virtual-size": True}}],
     "no int 'virtual-size'"),
])
def test_block_devices_from_bad_replies(blocks: Any, nodes: Any, message: str) -> None:
    with pytest.raises(QmpError, match=message):
        block_devices_from(blocks, nodes)


def test_errors_are_agent_errors() -> None:
    assert issubclass(MonitorBusy, QmpError)
    assert issubclass(QmpError, AgentError)


@pytest.fixture
def listener(short_tmp: Path) -> Iterator[socket.socket]:
    """A Unix socket that listens and never accepts: like a QEMU monitor that has a client."""
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(short_tmp / "silent.sock"))
        s.listen(4)
        yield s


def test_silent_monitor_is_busy(listener: socket.socket, caplog: pytest.LogCaptureFixture) -> None:
    path = listener.getsockname()
    caplog.set_level(logging.DEBUG)
    with pytest.raises(MonitorBusy, match=f"^the QMP monitor at {path} is busy: another client"):
        Monitor(path, timeout=0.2)
    # The library's own error records are demoted: our exception is what the user reads.
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [t for t in threading.enumerate() if t.name.startswith("qmp ")]  # loop ended


def _serve_once(server: socket.socket, reply: bytes) -> threading.Thread:
    def run() -> None:
        conn, _ = server.accept()
        with conn:
            conn.sendall(reply)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_not_a_qmp_monitor(listener: socket.socket) -> None:
    thread = _serve_once(listener, b"QEMU 7.2.0 monitor - type 'help' for more information\r\n")
    path = listener.getsockname()
    with pytest.raises(QmpError, match=f"^{path} is not a QMP monitor"):
        Monitor(path, timeout=5)
    thread.join(5)


def test_monitor_hangs_up_before_greeting(listener: socket.socket) -> None:
    thread = _serve_once(listener, b"")
    path = listener.getsockname()
    with pytest.raises(QmpError, match="closed the connection before the session began"):
        Monitor(path, timeout=5)
    thread.join(5)


def test_archive_name_falls_back_to_the_node_name() -> None:
    from agent.live.run import archive_name
    from agent.qemu.block import BlockDevice

    def dev(id_: str) -> BlockDevice:
        return BlockDevice(id=id_, qdev="", device="", node_name="disk0-fmt", format="qcow2",
                           virtual_size=1 << 20, filename="/x.qcow2", read_only=False)

    assert archive_name(dev("vda")) == "vda"
    assert archive_name(dev("/machine/peripheral-anon/device[0]/virtio-backend")) == "disk0-fmt"
