"""Names of everything backup-agent adds to a QEMU: block nodes, exports, marker objects.

Every name starts with :data:`PREFIX` and the backup's tag, so that a later run (or a person)
can find and remove what a killed agent left behind (:func:`agent.qemu.graph.cleanup`)::

    ba-<tag>-<dev>-tgt       copy-before-write target (old clusters go there)
    ba-<tag>-<dev>-cbw       copy-before-write filter, put between the device and its disk
    ba-<tag>-<dev>-snap      snapshot-access node: the point-in-time view, exported over NBD
    ba-<tag>-<dev>           block export id of the snapshot node (its NBD name is <dev>)
    ba-<tag>-nbd-server      object (a ``secret``): "this backup started the NBD server"
    ba-<tag>-chg             dirty bitmap (not persistent) on each disk's root node: the
                             frozen changes an incremental or differential backup copies

A live restore (``restore --live``, :mod:`agent.qemu.stream`) adds::

    ba-<tag>-<dev>-src       NBD client node: the served backup, backing of the device's image
    ba-<tag>-<dev>-stream    block-stream job id (copies the backup into the image)
    ba-<tag>-live            object (a ``secret``): its data says which nbdkit serves the
                             backup (pid, start time, socket), so cleanup can stop it

(The checkpoints that stay between backups, ``ba-inc-<uuid>`` and ``ba-full-<uuid>``, are named
by :mod:`agent.qemu.checkpoints`; cleanup never touches them.)

QEMU takes node names and ids of at most 31 characters, starting with a letter, made of letters,
digits, ``-``, ``.`` and ``_``. A device id that does not fit (``virtio-disk-with-a-long-id``)
is replaced by its index in the backup: ``ba-<tag>-d0-cbw``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agent.errors import InvalidArgument

#: Start of every name backup-agent gives a node, export or object.
PREFIX = "ba-"
#: Longest node name / id QEMU accepts (``char node_name[32]`` with its NUL).
MAX_NAME = 31
#: Suffix of the marker object that says the NBD server is ours.
NBD_MARKER_SUFFIX = "-nbd-server"
#: Suffix of the frozen-changes bitmap of a backup.
CHANGES_SUFFIX = "-chg"
#: Suffix of a live restore's NBD client node (the served backup).
SOURCE_SUFFIX = "-src"
#: Suffix of a live restore's block-stream job.
STREAM_SUFFIX = "-stream"
#: Suffix of the marker object that records a live restore's server.
LIVE_MARKER_SUFFIX = "-live"

_TAG = re.compile(r"[A-Za-z0-9]{1,12}")
_QEMU_ID = re.compile(r"[A-Za-z][A-Za-z0-9._-]*")


def check_tag(tag: str) -> str:
    """``tag`` if usable in names (1-12 letters or digits); else :class:`InvalidArgument`."""
    if not _TAG.fullmatch(tag):
        raise InvalidArgument(f"bad snapshot tag {tag!r}: use 1 to 12 letters or digits")
    return tag


@dataclass(frozen=True)
class DeviceNames:
    """Names of the nodes and the export backup-agent adds for one device."""

    target: str
    cbw: str
    snap: str
    export_id: str


def device_names(tag: str, dev_id: str, index: int) -> DeviceNames:
    """The names for device ``dev_id``, the ``index``-th device of backup ``tag``."""
    base = f"{PREFIX}{check_tag(tag)}-{dev_id}"
    if not _QEMU_ID.fullmatch(dev_id) or len(base) + len("-snap") > MAX_NAME:
        base = f"{PREFIX}{tag}-d{index}"
    return DeviceNames(target=f"{base}-tgt", cbw=f"{base}-cbw", snap=f"{base}-snap",
                       export_id=base)


@dataclass(frozen=True)
class StreamNames:
    """Names of what a live restore adds for one device."""

    source: str
    job: str


def stream_names(tag: str, dev_id: str, index: int) -> StreamNames:
    """The names for device ``dev_id``, the ``index``-th device of live restore ``tag``."""
    base = f"{PREFIX}{check_tag(tag)}-{dev_id}"
    if not _QEMU_ID.fullmatch(dev_id) or len(base) + len(STREAM_SUFFIX) > MAX_NAME:
        base = f"{PREFIX}{tag}-d{index}"
    return StreamNames(source=base + SOURCE_SUFFIX, job=base + STREAM_SUFFIX)


def live_marker(tag: str) -> str:
    """Id of the object that records the server of live restore ``tag``."""
    return f"{PREFIX}{check_tag(tag)}{LIVE_MARKER_SUFFIX}"


def nbd_marker(tag: str) -> str:
    """Id of the object that marks the NBD server as started by backup ``tag``."""
    return f"{PREFIX}{check_tag(tag)}{NBD_MARKER_SUFFIX}"


def changes_bitmap(tag: str) -> str:
    """Name of the bitmap holding the changes backup ``tag`` copies."""
    return f"{PREFIX}{check_tag(tag)}{CHANGES_SUFFIX}"


def is_ours(name: str, tag: str | None = None) -> bool:
    """True if ``name`` was given by backup-agent (by backup ``tag``, if given)."""
    start = PREFIX if tag is None else f"{PREFIX}{tag}-"
    return name.startswith(start)
