"""A set of disjoint byte ranges, for checking that records cover a device exactly once.

Records arrive in any order, but mostly in ascending runs (one per connection),
so adjacent ranges are merged on insertion and the set stays small: its size is
about the number of holes not yet filled, not the number of records.

An archive chooses its order, though, and a set kept in one sorted list cost a
shift of the whole list per insertion when ranges came in descending order with
gaps (200,000 records: 36 s, against well under a second ascending). The ranges
are therefore kept in a B+ tree: sorted leaves of at most :data:`FANOUT` ranges
under inner nodes of at most :data:`FANOUT` children. Every operation walks one
path from the root (depth about log(n) / log(FANOUT / 2)) and shifts at most
FANOUT entries per node on it: O(log n) per range, whatever the order. A small
set is a single leaf, searched as the sorted list was.

::

    inner   keys:  [ 0        | 5000       | 9000      ]   keys[i] = first start in kids[i]
    leaves:   [0,10) [20,30) | [5000,5100) | [9000,9010) [9050,9100)
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

#: Entries per node at most; a node that grows past it splits in two halves.
FANOUT = 128


class Overlap(Exception):
    def __init__(self, start: int, end: int) -> None:
        super().__init__(f"{start}..{end}")
        self.start = start
        self.end = end


class _Node:
    """A leaf (``kids`` is None): ranges [keys[i], ends[i]), sorted and disjoint. Or an
    inner node: ``keys[i]`` is the smallest start under ``kids[i]``."""

    __slots__ = ("ends", "keys", "kids")

    def __init__(self, keys: list[int], ends: list[int] | None = None,
                 kids: list[_Node] | None = None) -> None:
        self.keys = keys
        self.ends = ends if ends is not None else []
        self.kids = kids


# The way from the root to a node: (inner node, index of the child taken) at each level.
_Path = list[tuple[_Node, int]]


class IntervalSet:
    def __init__(self) -> None:
        self._root = _Node([])
        self._count = 0  # ranges held
        self.total = 0

    # -- the tree ------------------------------------------------------------------------

    def _find(self, pos: int) -> tuple[_Path, _Node, int]:
        """The path to the leaf where ``pos`` belongs, the leaf, and the index in it of
        the range that starts at or before ``pos`` (-1: none does, in the whole set)."""
        path: _Path = []
        node = self._root
        while node.kids is not None:
            i = max(bisect.bisect_right(node.keys, pos) - 1, 0)
            path.append((node, i))
            node = node.kids[i]
        return path, node, bisect.bisect_right(node.keys, pos) - 1

    @staticmethod
    def _next_leaf(path: _Path) -> _Node | None:
        """Move ``path`` on to the next leaf and return it (None after the last)."""
        while path:
            node, i = path.pop()
            kids = node.kids or []
            if i + 1 < len(kids):
                path.append((node, i + 1))
                leaf = kids[i + 1]
                while leaf.kids is not None:
                    path.append((leaf, 0))
                    leaf = leaf.kids[0]
                return leaf
        return None

    @staticmethod
    def _first_changed(path: _Path, start: int) -> None:
        """The first start of the node at the end of ``path`` is now ``start``: so is the
        key of every ancestor whose first entry that is."""
        for node, i in reversed(path):
            node.keys[i] = start
            if i:
                break

    def _split(self, path: _Path, node: _Node) -> None:
        """Split ``node`` (at the end of ``path``) and its ancestors while over FANOUT."""
        while len(node.keys) > FANOUT:
            half = len(node.keys) // 2
            if node.kids is None:
                right = _Node(node.keys[half:], node.ends[half:])
                del node.ends[half:]
            else:
                right = _Node(node.keys[half:], kids=node.kids[half:])
                del node.kids[half:]
            del node.keys[half:]
            if not path:  # the root: the tree grows one level
                self._root = _Node([node.keys[0], right.keys[0]], kids=[node, right])
                return
            parent, i = path.pop()
            parent.keys.insert(i + 1, right.keys[0])
            (parent.kids or []).insert(i + 1, right)
            node = parent

    def _remove(self, path: _Path, leaf: _Node, j: int) -> None:
        """Remove range ``j`` of ``leaf``; unhook nodes left empty. Nodes are not
        rebalanced: the depth stays within that of the most ranges the set ever held."""
        del leaf.keys[j], leaf.ends[j]
        self._count -= 1
        node, level = leaf, len(path)
        while not node.keys and level:
            level -= 1
            parent, j = path[level]
            del parent.keys[j], (parent.kids or [])[j]
            node = parent
        if not node.keys:  # the set is empty
            self._root = _Node([])
            return
        if j == 0:
            self._first_changed(path[:level], node.keys[0])
        while self._root.kids is not None and len(self._root.kids) == 1:
            self._root = self._root.kids[0]

    def _ranges_from(self, pos: int) -> Iterator[tuple[int, int]]:
        """Every range in order, from the one holding or before ``pos`` (the set must not
        change while this runs)."""
        path, leaf, j = self._find(pos)
        node: _Node | None = leaf
        j = max(j, 0)
        while node is not None:
            for k in range(j, len(node.keys)):
                yield node.keys[k], node.ends[k]
            node, j = self._next_leaf(path), 0

    # -- the set -------------------------------------------------------------------------

    def add(self, start: int, end: int) -> None:
        """Add [start, end); raises :class:`Overlap` if any byte is already present."""
        if end <= start:
            raise ValueError("empty range")
        path, leaf, j = self._find(start)
        # Range j starts at or before `start`; the next one (in this leaf or the next)
        # starts after it.
        if j >= 0 and leaf.ends[j] > start:
            raise Overlap(start, min(end, leaf.ends[j]))
        nxt_path, nxt, k = path, leaf, j + 1
        if k == len(leaf.keys):
            nxt_path = list(path)
            found = self._next_leaf(nxt_path)
            nxt, k = (found, 0) if found is not None else (leaf, k)
        has_next = k < len(nxt.keys)
        if has_next and nxt.keys[k] < end:
            raise Overlap(nxt.keys[k], min(end, nxt.ends[k]))
        self.total += end - start
        join_left = j >= 0 and leaf.ends[j] == start
        join_right = has_next and nxt.keys[k] == end
        if join_left and join_right:
            leaf.ends[j] = nxt.ends[k]
            self._remove(nxt_path, nxt, k)
        elif join_left:
            leaf.ends[j] = end
        elif join_right:
            nxt.keys[k] = start
            if k == 0:
                self._first_changed(nxt_path, start)
        else:
            leaf.keys.insert(j + 1, start)
            leaf.ends.insert(j + 1, end)
            self._count += 1
            if j + 1 == 0:
                self._first_changed(path, start)
            self._split(path, leaf)

    def missing(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of [start, end) not in the set."""
        out: list[tuple[int, int]] = []
        pos = start
        for s, e in self._ranges_from(start):
            if pos >= end or s >= end:
                break
            if e <= pos:
                continue
            if s > pos:
                out.append((pos, s))
            pos = max(pos, e)
        if pos < end:
            out.append((pos, end))
        return out

    def claim(self, start: int, end: int) -> list[tuple[int, int]]:
        """Add whatever part of [start, end) is not in the set yet; return those parts.

        A live backup claims each range before reading it, from the sweep and from the
        copies the target pushed alike, so no byte is read (or recorded) twice."""
        new = self.missing(start, end)
        for s, e in new:
            self.add(s, e)
        return new

    def run_containing(self, pos: int) -> tuple[int, int] | None:
        """The merged range holding byte ``pos``, if any."""
        _, leaf, j = self._find(pos)
        if j >= 0 and leaf.ends[j] > pos:
            return leaf.keys[j], leaf.ends[j]
        return None

    def gaps(self, size: int) -> list[tuple[int, int]]:
        """The ranges of [0, size) not in the set."""
        return self.missing(0, size)

    def __len__(self) -> int:
        return self._count

    def _audit(self) -> int:
        """Check the tree's invariants (for the tests); return its depth."""
        def walk(node: _Node, lo: int, depth: int) -> tuple[int, int, int]:
            if not node.keys or len(node.keys) > FANOUT:
                raise AssertionError("a node is empty or over FANOUT")
            if node.kids is None:
                if node.keys[0] < lo or any(
                        e <= s for s, e in zip(node.keys, node.ends, strict=True)):
                    raise AssertionError("a leaf is out of order")
                for a, b in zip(node.ends, node.keys[1:], strict=False):
                    if b <= a:  # touching ranges would have been merged
                        raise AssertionError("ranges in a leaf overlap or touch")
                return node.keys[0], node.ends[-1], depth
            last, depths = lo, set()
            for i, (key, kid) in enumerate(zip(node.keys, node.kids, strict=True)):
                got_first, got_last, d = walk(kid, last, depth + 1)
                if got_first != key or (i and got_first <= last):
                    raise AssertionError("an inner node's key or order is wrong")
                last = got_last
                depths.add(d)
            if len(depths) != 1:
                raise AssertionError("leaves at different depths")
            return node.keys[0], last, depths.pop()

        if not self._root.keys:
            return 1
        return walk(self._root, -1, 1)[2]
