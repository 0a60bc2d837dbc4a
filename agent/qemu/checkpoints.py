"""Checkpoints: the persistent dirty bitmaps that make incremental and differential backups.

Every disk of a VM that backup-agent backs up with checkpoints carries, in its qcow2 image::

    ba-inc-<uuid>     records every guest write since backup <uuid>, the last successful
                      backup of any kind: an incremental copies what it marks
    ba-full-<uuid>    records every guest write since full backup <uuid>: a differential
                      copies what it marks

The uuid in the name is the archive's, so a new archive's parent is known from the bitmap
it copies. A backup never clears nor disables an existing checkpoint. At its point in time,
with the VM paused, one QMP ``transaction`` adds the new checkpoint(s) and a frozen copy of
the changes to back up (``ba-<tag>-chg``, not persistent); only after the archive is
complete are the old checkpoints removed (:func:`retire`). Whatever fails before that, the old
checkpoints still hold every write since their backup, so no change is ever lost: the new
checkpoints are removed again (or, after a killed agent, ignored: :func:`choose` takes the
oldest valid checkpoint, which has seen the most, and the next successful backup retires
the rest). Archive uuids are time-ordered (UUIDv7), so "oldest" is the smallest uuid.

Bitmaps persist only in qcow2 images: raw disks get full backups, with a note saying why.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from agent.archive.format import Kind
from agent.errors import AgentError
from agent.modes import Mode
from agent.qemu import names
from agent.qemu.block import BlockDevice
from agent.qemu.qmp import Monitor, QmpError

log = logging.getLogger(__name__)

INC = "ba-inc-"
FULL = "ba-full-"
#: Bitmap granularity: the copy-before-write cluster, whatever the image's cluster size.
GRANULARITY = 64 * 1024
_CHECKPOINT = re.compile(
    r"(ba-inc-|ba-full-)([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})")
#: Image formats whose bitmaps survive a restart of QEMU.
PERSISTENT_FORMATS = frozenset({"qcow2"})


class CheckpointError(AgentError):
    """The backup asked for cannot be made from the checkpoints the disks have."""


@dataclass(frozen=True)
class Bitmap:
    name: str
    recording: bool
    persistent: bool
    inconsistent: bool
    busy: bool
    count: int  # dirty bytes


@dataclass(frozen=True)
class DiskCheckpoints:
    """What one disk offers: its format and the dirty bitmaps on its root node."""

    device: BlockDevice
    bitmaps: tuple[Bitmap, ...]

    @property
    def persistent(self) -> bool:
        return self.device.format in PERSISTENT_FORMATS


@dataclass(frozen=True)
class Plan:
    """What a backup will be."""

    kind: Kind
    parent: UUID | None = None
    """The archive this one builds on (incremental, differential)."""
    base: str | None = None
    """The checkpoint bitmap (same name on every disk) whose changes this backup copies."""
    checkpoints: bool = False
    """Whether the backup starts checkpoints (every disk can keep them)."""
    note: str = ""
    """Why the kind differs from the one asked for, or why no checkpoint is started."""


def read(mon: Monitor, devices: Sequence[BlockDevice]) -> list[DiskCheckpoints]:
    """The named dirty bitmaps on each device's root node."""
    nodes = {n.get("node-name"): n for n in mon.execute("query-named-block-nodes",
                                                        {"flat": True})}
    return [DiskCheckpoints(d, parse_bitmaps(nodes.get(d.node_name, {}).get("dirty-bitmaps")))
            for d in devices]


def parse_bitmaps(reply: Any) -> tuple[Bitmap, ...]:
    """Named bitmaps from a node's ``dirty-bitmaps`` (anonymous ones belong to QEMU's own
    block jobs and filters)."""
    out = []
    for b in reply or ():
        if not isinstance(b, Mapping) or not isinstance(b.get("name"), str):
            continue
        out.append(Bitmap(name=b["name"], recording=bool(b.get("recording")),
                          persistent=bool(b.get("persistent")),
                          inconsistent=bool(b.get("inconsistent")), busy=bool(b.get("busy")),
                          count=int(b.get("count", 0))))
    return tuple(out)


def checkpoint_uuid(name: str, prefix: str) -> UUID | None:
    """The archive uuid in a checkpoint name with ``prefix`` (INC or FULL), else None."""
    m = _CHECKPOINT.fullmatch(name)
    return UUID(m.group(2)) if m and m.group(1) == prefix else None


def _usable(disk: DiskCheckpoints, prefix: str) -> tuple[UUID | None, str]:
    """The disk's oldest usable checkpoint with ``prefix``, or None and the reason."""
    name = disk.device.id
    if not disk.persistent:
        return None, (f"disk {name!r} is {disk.device.format}: dirty bitmaps persist only in "
                      "qcow2 images")
    found = sorted((u, b) for b in disk.bitmaps
                   if (u := checkpoint_uuid(b.name, prefix)) is not None)
    if not found:
        return None, (f"disk {name!r} has no checkpoint of an earlier "
                      f"{'full ' if prefix == FULL else ''}backup (none was made, its bitmap "
                      "was deleted, or the disk was replaced)")
    uuid, b = found[0]
    if b.inconsistent:
        return None, (f"disk {name!r}: checkpoint {b.name} is inconsistent (QEMU did not "
                      "close the image cleanly) and cannot be trusted")
    if not b.recording:
        return None, f"disk {name!r}: checkpoint {b.name} is disabled and missed writes"
    if not b.persistent:
        return None, f"disk {name!r}: checkpoint {b.name} is not persistent (not ours)"
    if b.busy:
        return None, f"disk {name!r}: checkpoint {b.name} is in use by another job"
    return uuid, ""


def choose(mode: Mode, disks: Sequence[DiskCheckpoints]) -> Plan:
    """The backup to make for ``mode`` (a pure function of what the disks offer).

    ``incremental`` and ``differential`` raise :class:`CheckpointError` when some disk lacks
    a usable checkpoint, or the disks disagree; ``auto`` then falls back to a full backup and
    says why in :attr:`Plan.note`.
    """
    can_keep = all(d.persistent for d in disks)
    no_keep = "" if can_keep else next(
        f"disk {d.device.id!r} is {d.device.format}: dirty bitmaps persist only in qcow2 "
        "images, so no checkpoint was started and the next backup must be full"
        for d in disks if not d.persistent)
    full = Plan(Kind.FULL, checkpoints=can_keep, note=no_keep)
    if mode is Mode.FULL:
        return full
    prefix = FULL if mode is Mode.DIFFERENTIAL else INC
    kind = Kind.DIFFERENTIAL if mode is Mode.DIFFERENTIAL else Kind.INCREMENTAL
    problem = ""
    parents: dict[UUID, list[str]] = {}
    # A raw disk first: it is the reason that lasts.
    for d in sorted(disks, key=lambda d: d.persistent):
        uuid, why = _usable(d, prefix)
        if uuid is None:
            problem = why
            break
        parents.setdefault(uuid, []).append(d.device.id)
    if not problem and len(parents) > 1:
        problem = "the disks were last backed up at different times (" + "; ".join(
            f"{', '.join(ids)}: backup {u}" for u, ids in parents.items()) + ")"
    if problem:
        if mode is Mode.AUTO:
            return Plan(Kind.FULL, checkpoints=can_keep,
                        note=f"full backup instead of incremental: {problem}")
        raise CheckpointError(f"cannot make a{'n' if kind is Kind.INCREMENTAL else ''} "
                              f"{kind.name.lower()} backup: {problem}; make a full backup "
                              "first (--mode full or auto)")
    (parent,) = parents
    return Plan(kind, parent=parent, base=f"{prefix}{parent}", checkpoints=True)


def new_checkpoints(plan: Plan, archive: UUID) -> list[str]:
    """Bitmaps a backup adds to every disk: the next incremental's base, and after a full
    also the next differential's."""
    if not plan.checkpoints:
        return []
    names = [f"{INC}{archive}"]
    if plan.kind is Kind.FULL:
        names.append(f"{FULL}{archive}")
    return names


def transaction(plan: Plan, archive: UUID, tag: str,
                devices: Sequence[BlockDevice]) -> list[dict[str, Any]]:
    """The ``transaction`` actions for the point in time: new checkpoints, and for an
    incremental or differential the frozen copy of the changes since ``plan.base``."""
    actions: list[dict[str, Any]] = []
    for d in devices:
        for name in new_checkpoints(plan, archive):
            actions.append(_add(d.node_name, name, persistent=True))
        if plan.base is not None:
            chg = names.changes_bitmap(tag)
            actions.append(_add(d.node_name, chg, persistent=False, disabled=True))
            actions.append({"type": "block-dirty-bitmap-merge", "data": {
                "node": d.node_name, "target": chg, "bitmaps": [plan.base]}})
    return actions


def _add(node: str, name: str, *, persistent: bool, disabled: bool = False) -> dict[str, Any]:
    return {"type": "block-dirty-bitmap-add", "data": {
        "node": node, "name": name, "persistent": persistent, "disabled": disabled,
        "granularity": GRANULARITY}}


def retire(mon: Monitor, plan: Plan, archive: UUID, devices: Sequence[BlockDevice]) -> None:
    """After a complete backup: remove every older checkpoint it supersedes (all ``ba-inc-``
    ones; after a full also all ``ba-full-`` ones). A failure is logged, not raised: an old
    checkpoint left behind only makes the next incremental larger, never wrong."""
    keep = set(new_checkpoints(plan, archive))
    if not keep:
        return
    prefixes = (INC, FULL) if plan.kind is Kind.FULL else (INC,)
    for disk in read(mon, devices):
        for b in disk.bitmaps:
            if b.name in keep or all(checkpoint_uuid(b.name, p) is None for p in prefixes):
                continue
            try:
                mon.execute("block-dirty-bitmap-remove",
                            {"node": disk.device.node_name, "name": b.name})
            except QmpError as e:
                log.warning("disk %r: cannot remove the old checkpoint %s (harmless; the next "
                            "backup retries): %s", disk.device.id, b.name, e)
