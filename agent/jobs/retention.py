"""Which archives to delete so that the newest N chains remain: pure logic on header fields.

A chain is a full archive and every archive built on it, found by following each archive's
parent uuid (from its header), never by file names::

    F1 ◀─ I ◀─ I          F2 ◀─ D ◀─ I          F3 ◀─ I          keep_chains = 2
    └── deleted ─┘        └──── kept ───┘       └─ kept ─┘

The rules, each one there so that pruning never makes a kept archive useless:

- Whole chains only: an archive goes only together with everything built on it, and the
  files of a chain are deleted children first, so an interrupted prune leaves no archive
  whose parent is gone.
- Chains are ranked by their newest archive and the newest N stay, so a chain that backups
  still extend is never pruned in favour of a younger, idle one; N is at least 1, so the
  newest chain always stays. N counts per group (the caller's: per job, so that one VM's
  chains never push out another's in a directory they share).
- Only chains whose full archive is complete count toward N, and such a chain is never
  deleted: a truncated full (an upload that failed) cannot push the last good chain out.
- Archives whose ancestry does not reach a full archive here (orphans: the full is
  elsewhere, or unreadable) are left alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from uuid import UUID

from agent.archive.format import Kind
from agent.errors import InvalidArgument


@dataclass(frozen=True)
class ArchiveDesc:
    """What retention needs to know of one archive file."""

    path: str
    uuid: UUID
    parent: UUID | None
    kind: Kind
    created_ns: int
    complete: bool = True  # its end record and footer are there: the writer finished it
    size: int = 0  # bytes on disk, for the summary


@dataclass(frozen=True)
class Chain:
    archives: tuple[ArchiveDesc, ...]  # the full archive first, then parents before children

    @property
    def full(self) -> ArchiveDesc:
        return self.archives[0]

    @property
    def newest_ns(self) -> int:
        return max(a.created_ns for a in self.archives)


@dataclass(frozen=True)
class Plan:
    keep: tuple[Chain, ...]  # oldest first
    delete: tuple[Chain, ...]  # oldest first
    incomplete: tuple[Chain, ...]  # their full archive is incomplete: left alone
    orphans: tuple[ArchiveDesc, ...]  # left alone

    def doomed(self) -> list[ArchiveDesc]:
        """The archives to delete, in a safe order: oldest chain first, and within a chain
        every archive before the one it builds on."""
        return [a for chain in self.delete for a in reversed(chain.archives)]


def find_chains(archives: Iterable[ArchiveDesc]) -> tuple[list[Chain], list[ArchiveDesc]]:
    """The chains (in no particular order) and the orphans among ``archives``.

    Copies of one archive (same uuid) belong to the same chain; a loop of parent links, a
    missing parent or a non-full archive without a parent makes an orphan.
    """
    items = list(archives)
    by_uuid: dict[UUID, list[ArchiveDesc]] = {}
    for a in items:
        by_uuid.setdefault(a.uuid, []).append(a)
    members: dict[UUID, list[tuple[int, ArchiveDesc]]] = {}
    orphans = []
    for a in items:
        found = _root(a, by_uuid)
        if found is None:
            orphans.append(a)
        else:
            root, depth = found
            members.setdefault(root, []).append((depth, a))
    chains = [
        Chain(tuple(a for _, a in sorted(m, key=lambda x: (x[0], x[1].created_ns, x[1].path))))
        for m in members.values()
    ]
    return chains, sorted(orphans, key=lambda a: (a.created_ns, a.path))


def _root(a: ArchiveDesc, by_uuid: dict[UUID, list[ArchiveDesc]]) -> tuple[UUID, int] | None:
    """The uuid of the full archive ``a`` builds on, and how many links away it is."""
    seen: set[UUID] = set()
    depth = 0
    while a.kind != Kind.FULL:
        if a.parent is None or a.parent in seen or a.parent not in by_uuid:
            return None
        seen.add(a.uuid)
        a = by_uuid[a.parent][0]
        depth += 1
    return a.uuid, depth


def plan(archives: Iterable[ArchiveDesc], keep_chains: int,
         group: Callable[[ArchiveDesc], str] = lambda a: "") -> Plan:
    """Keep the ``keep_chains`` newest complete chains of each group (``group`` of the
    chain's full archive); delete the older ones."""
    if keep_chains < 1:
        raise InvalidArgument(f"keep_chains must be at least 1, got {keep_chains}")
    chains, orphans = find_chains(archives)
    groups: dict[str, list[Chain]] = {}
    for c in chains:
        if c.full.complete:
            groups.setdefault(group(c.full), []).append(c)
    keep: list[Chain] = []
    delete: list[Chain] = []
    for members in groups.values():
        members.sort(key=_age)
        cut = max(0, len(members) - keep_chains)
        delete += members[:cut]
        keep += members[cut:]
    broken = [c for c in chains if not c.full.complete]
    return Plan(keep=tuple(sorted(keep, key=_age)), delete=tuple(sorted(delete, key=_age)),
                incomplete=tuple(sorted(broken, key=_age)), orphans=tuple(orphans))


def _age(c: Chain) -> tuple[int, int, str]:
    return c.newest_ns, c.full.created_ns, c.full.path
