"""Pushed copies in the agent: the tracker's claims and releases, the engine's entry point."""

from __future__ import annotations

from concurrent.futures import Future
from types import SimpleNamespace
from typing import Any, cast

from agent.archive.codec import CompressionSpec
from agent.archive.format import Device
from agent.archive.writer import ArchiveWriter
from agent.engine import BackupEngine, EngineOptions, _Data, _Gather, _pack, _Read, _Zero
from agent.nbd.source import NbdSource
from agent.tracker import DeviceTracker

C = 64 * 1024
MiB = 1024 * 1024


def tracker(size: int, partial_tail: bool = True) -> tuple[DeviceTracker, list[tuple[int, int]]]:
    released: list[tuple[int, int]] = []
    t = DeviceTracker(size, C, lambda off, n: released.append((off, n)),
                      partial_tail=partial_tail)
    return t, released


def test_a_pushed_cluster_is_claimed_and_never_trimmed() -> None:
    t, released = tracker(16 * C)
    assert t.pushed(4 * C, C) == [(4 * C, 5 * C)]
    assert t.claim(0, 8 * C) == [(0, 4 * C), (5 * C, 8 * C)]  # the sweep reads around it
    t.written(4 * C, C)
    assert released == []
    t.written(0, 4 * C)
    t.written(5 * C, 3 * C)
    assert released == [(0, 4 * C), (5 * C, 3 * C)]  # the copy is left out of the trims
    assert (t.released_bytes, t.pushed_bytes, t.copied_bytes) == (7 * C, C, C)


def test_a_cluster_pushed_in_part_is_trimmed_when_the_sweep_has_written_the_rest() -> None:
    t, released = tracker(16 * C)
    t.claim(0, 2 * C + 4096)  # the sweep's read, in flight through QEMU: not pushed
    assert t.pushed(0, 4 * C) == [(2 * C + 4096, 4 * C)]
    t.written(2 * C + 4096, 2 * C - 4096)  # the pushed part: cluster 3 whole, 2 in part
    assert released == []
    t.written(0, 2 * C + 4096)  # the sweep's: clusters 0, 1 and now 2 are complete
    assert released == [(0, 3 * C)]
    assert t.pushed_bytes == 2 * C - 4096 and t.copied_bytes == 4 * C


def test_a_pushed_partial_last_cluster_needs_no_trim() -> None:
    size = 3 * C + 4608
    t, released = tracker(size, partial_tail=False)  # QEMU 10 cannot trim it
    assert t.pushed(3 * C, C) == [(3 * C, size)]  # clipped to the disk
    t.written(3 * C, 4608)
    t.written(0, 3 * C)
    assert released == [(0, 3 * C)]
    assert t.pushed_bytes == 4608


def test_pack_moves_owned_parts_to_the_front() -> None:
    dev = Device(0, "vda", 64 * MiB)
    buf = bytearray(b"".join(bytes([i]) * C for i in range(4)))
    assert _pack(dev, [(0, 4 * C, 0)], buf) == _Read(dev, 0, 4 * C)
    item = _pack(dev, [(MiB + C, MiB + 2 * C, C), (5 * MiB, 5 * MiB + C, 3 * C)], buf)
    assert item == _Gather(dev, ((MiB + C, C), (5 * MiB, C)))
    assert buf[:2 * C] == bytes([1]) * C + bytes([3]) * C


def engine(size: int = 64 * MiB) -> tuple[BackupEngine, DeviceTracker]:
    dev = Device(0, "vda", size)
    t = DeviceTracker(size, C, lambda off, n: None)
    writer = cast(ArchiveWriter, SimpleNamespace(wants_digest=True))  # the workers ask it
    e = BackupEngine(writer, [(dev, cast(NbdSource, None))],
                     EngineOptions(compression=CompressionSpec.parse("none"),
                                   request_size=MiB, memory=2 * MiB), trackers={0: t})
    return e, t


def queued(e: BackupEngine) -> list[Any]:
    out: list[Any] = []
    while not e._q.empty():
        got = e._q.get()
        if isinstance(got, Future):
            prepared = got.result()
            assert prepared.pool is e.push_buffers  # its buffer goes back where it came from
            out += prepared.records
        else:
            out.append(got)
    return out


def test_engine_push_queues_the_owned_parts_and_returns_them() -> None:
    e, t = engine()
    t.claim(C, 2 * C)  # the sweep's
    buf = e.push_buffer(4 * C)
    assert buf is not None
    buf[:4 * C] = b"".join(bytes([i + 1]) * C for i in range(4))
    # two runs in one buffer, the sweep's cluster in the first one
    assert e.push(0, [(0, 3 * C), (6 * C, C)], buf) == [(0, C), (2 * C, 3 * C), (6 * C, 7 * C)]
    assert e.push(0, [(8 * MiB, 2 * C)], None) == [(8 * MiB, 8 * MiB + 2 * C)]
    e._workers.shutdown(wait=True)
    records = queued(e)
    data = sorted((r.offset, r.length, bytes(r.payload)) for r in records
                  if isinstance(r, _Data))
    assert data == [(0, C, bytes([1]) * C), (2 * C, C, bytes([3]) * C),
                    (6 * C, C, bytes([4]) * C)]
    assert [(r.offset, r.length) for r in records if isinstance(r, _Zero)] == [
        (8 * MiB, 2 * C)]


def test_engine_push_after_the_end_owns_nothing_and_returns_the_buffer() -> None:
    e, _ = engine()
    e._pushes_closed = True  # as run() does once every reader is done
    buf = e.push_buffer(C)
    assert e.push(0, [(0, C)], buf) == []
    assert e.push_buffers._out == 0 and e._q.empty()
    e._workers.shutdown(wait=True)
