"""Chains of archives: a full backup and the incrementals or differential built on it.

A restore applies the archives of a chain in order, each over the last, so the chain must be
complete and in order; this module checks that from the archives' headers alone, before any
byte is written::

    FULL F ◀─parent─ INCREMENTAL I1 ◀─parent─ INCREMENTAL I2       restore F I1 I2
    FULL F ◀─parent─ DIFFERENTIAL D ◀─parent─ INCREMENTAL I3       restore F D I3
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from agent.archive.format import Device, Header, Kind
from agent.errors import InvalidArgument


@dataclass(frozen=True)
class Link:
    """One archive of a chain as the restore command got it."""

    label: str  # how the user named it (a path, or "standard input")
    header: Header
    devices: Sequence[Device]


def check_chain(links: Sequence[Link], wanted: Collection[str] | None = None,
                verb: str = "restore") -> None:
    """Refuse, with a message that says what is wrong and how to fix it, a chain that does not
    start with a full backup, has archives out of order or missing, or whose archives disagree
    on the devices to restore (``wanted``, or all of the full backup's). ``verb`` is what the
    command does with the chain (``restore``, ``serve``), for the messages."""
    if not links:
        raise InvalidArgument(f"no archive to {verb}")
    first = links[0]
    if first.header.kind != Kind.FULL:
        raise InvalidArgument(
            f"{first.label} is {_kind(first)} backup (of archive {first.header.parent_uuid}): "
            "give the chain in order, starting with the full backup it builds on")
    position = {link.header.uuid: i for i, link in enumerate(links)}
    if len(position) != len(links):
        raise InvalidArgument("the same archive is given twice")
    for i in range(1, len(links)):
        prev, cur = links[i - 1], links[i]
        parent = cur.header.parent_uuid
        if cur.header.kind == Kind.FULL:
            raise InvalidArgument(f"{cur.label} is a full backup: a chain holds one full backup, "
                                  f"first; {verb} it on its own")
        if parent == prev.header.uuid:
            continue
        if parent in position and position[parent] > i:
            raise InvalidArgument(
                f"wrong order: {cur.label} builds on {links[position[parent]].label}, which is "
                "given after it (give the archives oldest first)")
        if parent in position:
            raise InvalidArgument(
                f"{cur.label} builds on {links[position[parent]].label}, not on {prev.label} "
                "before it: an archive is out of place (a differential follows the full backup "
                "directly)")
        raise InvalidArgument(
            f"missing link: {cur.label} builds on archive {parent}, which is not given (an "
            f"archive between {prev.label} and {cur.label} is missing, or {cur.label} belongs "
            "to another VM's backups)")
    names = set(wanted) if wanted is not None else {d.name for d in first.devices}
    sizes = {d.name: d.size for d in first.devices}
    for link in links[1:]:
        theirs = {d.name: d.size for d in link.devices}
        for name in sorted(names):
            if name not in theirs:
                raise InvalidArgument(
                    f"device {name!r} is not in {link.label}, so the chain does not say what "
                    f"changed on it ({verb} it with --device from a chain that has it)")
            if name in sizes and theirs[name] != sizes[name]:
                raise InvalidArgument(
                    f"device {name!r} has {sizes[name]} bytes in {first.label} and "
                    f"{theirs[name]} in {link.label}: the disk was resized; {verb} a chain "
                    "from a full backup made after that")


def _kind(link: Link) -> str:
    return "an incremental" if link.header.kind == Kind.INCREMENTAL else "a differential"
