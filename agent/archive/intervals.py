"""A set of disjoint byte ranges, for checking that records cover a device exactly once.

Records arrive in any order, but mostly in ascending runs (one per connection),
so adjacent ranges are merged on insertion and the set stays small: its size is
about the number of holes not yet filled, not the number of records.
"""

from __future__ import annotations

import bisect


class Overlap(Exception):
    def __init__(self, start: int, end: int) -> None:
        super().__init__(f"{start}..{end}")
        self.start = start
        self.end = end


class IntervalSet:
    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self.total = 0

    def add(self, start: int, end: int) -> None:
        """Add [start, end); raises :class:`Overlap` if any byte is already present."""
        if end <= start:
            raise ValueError("empty range")
        i = bisect.bisect_right(self._starts, start)
        # The range before i starts at or before `start`; the one at i starts after it.
        if i > 0 and self._ends[i - 1] > start:
            raise Overlap(max(start, self._starts[i - 1]), min(end, self._ends[i - 1]))
        if i < len(self._starts) and self._starts[i] < end:
            raise Overlap(self._starts[i], min(end, self._ends[i]))
        self.total += end - start
        join_left = i > 0 and self._ends[i - 1] == start
        join_right = i < len(self._starts) and self._starts[i] == end
        if join_left and join_right:
            self._ends[i - 1] = self._ends[i]
            del self._starts[i], self._ends[i]
        elif join_left:
            self._ends[i - 1] = end
        elif join_right:
            self._starts[i] = start
        else:
            self._starts.insert(i, start)
            self._ends.insert(i, end)

    def missing(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of [start, end) not in the set."""
        out: list[tuple[int, int]] = []
        pos = start
        i = max(0, bisect.bisect_right(self._starts, start) - 1)
        while pos < end and i < len(self._starts):
            s, e = self._starts[i], self._ends[i]
            i += 1
            if e <= pos:
                continue
            if s >= end:
                break
            if s > pos:
                out.append((pos, s))
            pos = max(pos, e)
        if pos < end:
            out.append((pos, end))
        return out

    def claim(self, start: int, end: int) -> list[tuple[int, int]]:
        """Add whatever part of [start, end) is not in the set yet; return those parts.

        A live backup claims each range before reading it, from the sweep and from the
        copy-before-write events alike, so no byte is read (or recorded) twice."""
        new = self.missing(start, end)
        for s, e in new:
            self.add(s, e)
        return new

    def run_containing(self, pos: int) -> tuple[int, int] | None:
        """The merged range holding byte ``pos``, if any."""
        i = bisect.bisect_right(self._starts, pos) - 1
        if i >= 0 and self._ends[i] > pos:
            return self._starts[i], self._ends[i]
        return None

    def gaps(self, size: int) -> list[tuple[int, int]]:
        """The ranges of [0, size) not in the set."""
        return self.missing(0, size)

    def __len__(self) -> int:
        return len(self._starts)
