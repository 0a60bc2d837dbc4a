"""Releasing backed-up ranges of a live backup off the writer's path.

A release is a trim on QEMU's snapshot export: a round trip to QEMU, which also updates the
copy-before-write filter's bitmaps. Done by the archive writer itself, every record waited
for one, and an incremental of scattered clusters (one record, one release each) spent half
its time there. A :class:`Releaser` takes the ranges from the writer and trims them in a
thread of its own, merging ranges that touch.
"""

from __future__ import annotations

import queue
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable

from agent import interrupts
from agent.tracker import ReleaseFn


class Releaser:
    """``releaser.for_device("vda")`` is the :data:`ReleaseFn` a tracker calls; the ranges are
    passed on to ``release(device, offset, length)`` in a background thread, from
    :meth:`start` on. The first error goes to ``failed`` and stops the releases (the backup
    fails anyway). :meth:`close` drops what is still queued: it comes after the last record,
    when the snapshot's teardown is about to free everything at once."""

    def __init__(self, release: Callable[[str, int, int], None]) -> None:
        self._release = release
        self._failed: Callable[[BaseException], None] = lambda e: None
        self._q: queue.SimpleQueue[tuple[str, int, int] | None] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="ba-release", daemon=True)

    def start(self, failed: Callable[[BaseException], None]) -> None:
        """Start releasing; ``failed`` is where the first error goes (the engine's control:
        the engine is made after the trackers, which need :meth:`for_device` first)."""
        self._failed = failed
        with interrupts.held():  # see agent.interrupts
            self._thread.start()

    def for_device(self, device: str) -> ReleaseFn:
        return lambda offset, length: self._q.put((device, offset, length))

    def close(self) -> None:
        """Stop after the release in progress, if any; drop the rest. Idempotent."""
        self._closing = True
        if self._thread.is_alive():
            self._q.put(None)
            interrupts.join(self._thread)

    def _run(self) -> None:
        while True:
            batch = [self._q.get()]
            while True:  # everything queued meanwhile, merged below
                try:
                    batch.append(self._q.get_nowait())
                except queue.Empty:
                    break
            stop = None in batch
            if self._error is None:
                try:
                    for device, ranges in _merge(x for x in batch if x is not None).items():
                        for offset, length in ranges:
                            if self._closing:
                                break
                            self._release(device, offset, length)
                except Exception as e:  # the backup fails; later ranges are not released
                    self._error = e
                    self._failed(e)
            if stop:
                return


def _merge(items: Iterable[tuple[str, int, int]]) -> dict[str, list[tuple[int, int]]]:
    """Per device, the ranges sorted and merged where they touch or overlap."""
    by_dev: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for device, offset, length in items:
        by_dev[device].append((offset, offset + length))
    out: dict[str, list[tuple[int, int]]] = {}
    for device, spans in by_dev.items():
        spans.sort()
        merged = [spans[0]]
        for start, end in spans[1:]:
            if start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
            else:
                merged.append((start, end))
        out[device] = [(s, e - s) for s, e in merged]
    return out
