"""What disks a running QEMU has: its block devices and the root node of each one's graph.

A disk attached as ``-blockdev '{"driver":"file","node-name":"vda-file",...}'
-blockdev '{"driver":"qcow2","node-name":"vda-fmt","file":"vda-file"}'
-device virtio-blk-pci,drive=vda-fmt,id=vda`` appears in ``query-block`` as::

    {"device": "",                                      # no legacy -drive name
     "qdev": "/machine/peripheral/vda/virtio-backend",   # QOM path of the device's backend
     "inserted": {"node-name": "vda-fmt", "drv": "qcow2", "image": {"virtual-size": ...}}}

and becomes ``BlockDevice(id="vda", node_name="vda-fmt", format="qcow2", ...)``. The root
node's details come from ``query-named-block-nodes`` (``flat``), which also names nodes QEMU
created itself (``#block123``), e.g. for a legacy ``-drive``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.qemu.qmp import Monitor, QmpError

#: Where QEMU puts devices created with ``-device ...,id=ID`` (or ``device_add``).
PERIPHERAL = "/machine/peripheral/"
#: Child through which virtio devices attach their block backend.
VIRTIO_BACKEND = "/virtio-backend"


@dataclass(frozen=True)
class BlockDevice:
    """One guest disk with a medium in it, as QEMU sees it."""

    id: str
    """The device's id (``vda`` from ``-device ...,id=vda``); for a device without an id, its
    legacy drive name (``-drive ...,id=drive0``) or else its QOM path."""
    qdev: str | None
    """QEMU's ``qdev``: the device's id or the QOM path of its backend
    (``/machine/peripheral/vda/virtio-backend``); None for a drive with no device."""
    device: str
    """Legacy BlockBackend name (``-drive ...,id=NAME``); empty for ``-blockdev`` disks."""
    node_name: str
    """Root node of the disk's block graph: the node the device reads and writes."""
    format: str
    """Driver of the root node: ``qcow2``, ``raw``, or a filter (``copy-before-write``...)."""
    virtual_size: int
    """Size in bytes the guest sees."""
    filename: str
    """QEMU's file name of the root node (a path, or a ``json:{...}`` description)."""
    read_only: bool

    @property
    def qom_path(self) -> str | None:
        """QOM path of the device itself (for ``qom-set ... drive``), or None if unknown."""
        if self.qdev is None:
            return None
        if not self.qdev.startswith("/"):
            return PERIPHERAL + self.qdev
        return self.qdev.removesuffix(VIRTIO_BACKEND)


def query_block_devices(mon: Monitor) -> list[BlockDevice]:
    """Every block device with a medium inserted, in QEMU's order."""
    blocks = mon.execute("query-block")
    nodes = mon.execute("query-named-block-nodes", {"flat": True})
    return block_devices_from(blocks, nodes)


def block_devices_from(blocks: Any, nodes: Any) -> list[BlockDevice]:
    """Build the device list from the replies to ``query-block`` and
    ``query-named-block-nodes`` (a pure function; the replies are checked, not trusted)."""
    by_name: dict[str, Mapping[str, Any]] = {}
    for node in _list(nodes, "query-named-block-nodes"):
        name = node.get("node-name")
        if isinstance(name, str):
            by_name[name] = node
    devices = []
    for block in _list(blocks, "query-block"):
        inserted = block.get("inserted")
        if not isinstance(inserted, Mapping):
            continue  # an empty drive (CD-ROM without a disc)
        node_name = _field(inserted, "node-name", str, "query-block")
        root = by_name.get(node_name, inserted)
        image = _field(root, "image", Mapping, "query-named-block-nodes")
        qdev = block.get("qdev")
        device = block.get("device", "")
        devices.append(BlockDevice(
            id=device_id(qdev if isinstance(qdev, str) else None, str(device)),
            qdev=qdev if isinstance(qdev, str) else None,
            device=str(device),
            node_name=node_name,
            format=_field(root, "drv", str, "query-named-block-nodes"),
            virtual_size=_field(image, "virtual-size", int, "query-named-block-nodes"),
            filename=_field(root, "file", str, "query-named-block-nodes"),
            read_only=bool(root.get("ro", False)),
        ))
    return devices


def device_id(qdev: str | None, device: str) -> str:
    """The id a user knows a disk by (see :attr:`BlockDevice.id`)."""
    if qdev and not qdev.startswith("/"):
        return qdev  # QEMU reports a device's id itself when the backend hangs on the device
    if qdev and qdev.startswith(PERIPHERAL):
        return qdev[len(PERIPHERAL):].split("/", 1)[0]
    return device or qdev or ""


def _list(reply: Any, command: str) -> list[Mapping[str, Any]]:
    if not isinstance(reply, list) or not all(isinstance(x, Mapping) for x in reply):
        raise QmpError(f"QMP command '{command}' gave an unexpected reply: {reply!r:.200}")
    return reply


def _field(obj: Mapping[str, Any], key: str, kind: type[Any], command: str) -> Any:
    value = obj.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise QmpError(
            f"QMP command '{command}' gave an unexpected reply: no {kind.__name__} {key!r} in "
            f"{dict(obj)!r:.200}"
        )
    return value
