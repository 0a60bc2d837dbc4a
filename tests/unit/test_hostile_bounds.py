"""Hostile archives (issue #13): what reading and restoring an archive costs is bounded by
the options, whatever the archive says. Each test builds a valid archive made to cost as
much as possible and checks the bound by counting, never by the clock."""

from __future__ import annotations

import io
import os
import sys
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from types import FrameType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.archive import codec
from agent.archive.format import CHUNK_FIXED, MAX_DATA_LENGTH, Compression, Device, Kind
from agent.archive.reader import (
    RECORD_OVERHEAD,
    ArchiveReader,
    DataRecord,
    SpareBuffers,
    size_class,
)
from agent.archive.writer import ArchiveWriter
from agent.restore import (
    RestoreEngine,
    RestoreOptions,
    is_zero,
    restore,
    restore_chain,
    to_dir,
)
from agent.targets.base import ZEROS, Sink
from agent.targets.null import NullTarget
from tests.unit.archive_util import (
    HEADER,
    tiny_records,
    write_archive,
    write_archive_to,
    zero_data,
)

KiB = 1024


# --- what a record is charged -------------------------------------------------------------


@given(st.integers(1, 40 * 1024 * KiB))
def test_a_size_class_wastes_at_most_an_eighth(n: int) -> None:
    c = size_class(n)
    assert c >= n
    assert c <= max(256, n + n // 8)


def test_a_64_kib_cluster_record_is_charged_about_its_size() -> None:
    """A 64 KiB record stored as it is (a body 24 bytes longer) took a 128 KiB buffer."""
    body = 64 * KiB + CHUNK_FIXED
    assert size_class(body) < 80 * KiB


@settings(max_examples=200)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 300 * KiB)), max_size=60),
       st.integers(64 * KiB, 1024 * KiB))
def test_spares_and_buffers_out_stay_within_the_limit(
        steps: list[tuple[bool, int]], limit: int) -> None:
    """While the buffers a consumer holds are within the limit (its budget sees to that),
    those and the spares kept for reuse are too, but for two buffers of slack."""
    spares = SpareBuffers(limit)
    out: list[bytearray] = []
    largest = 0
    for take, n in steps:
        if take and sum(map(len, out)) + size_class(n) <= limit:
            out.append(spares.take(n))
            assert len(out[-1]) >= n
            largest = max(largest, size_class(n))
        elif out:
            spares.give(out.pop(n % len(out)))
        # The slack: the record a reader reads ahead of its budget.
        assert spares.kept + sum(map(len, out)) <= limit + 2 * largest


# --- the restore's budget holds with the smallest records ---------------------------------


class _GateTarget:
    """A restore target whose first request waits until the reading thread can read no
    further (or read the whole archive): how far it got is what the budget allowed."""

    def __init__(self, device: Device, stalled: Callable[[], bool]) -> None:
        self.name = device.name
        self.size = device.size
        self.fresh = False
        self._stalled = stalled
        self._open = threading.Event()

    def _gate(self) -> None:
        if not self._open.is_set():
            for _ in range(600):  # at most 60 s: a budget that never fills fails the test
                if self._stalled():
                    break
                self._open.wait(0.1)
            self._open.set()

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._gate()

    def writev(self, offset: int, parts: Sequence[bytes | bytearray | memoryview]) -> None:
        self._gate()

    def zero(self, offset: int, length: int) -> None:
        self._gate()

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def stop_when(self, stopped: Callable[[], bool]) -> None:
        pass


def _records_read_while_the_target_waits(path: Path, memory: int) -> tuple[int, int]:
    """Restore ``path`` onto a target that stalls; return how many 1-byte records the
    reader had read when it could go no further, and how many there are."""
    with open(path, "rb", buffering=0) as f:
        reader = ArchiveReader(f, keep_configs=False, spares=SpareBuffers(memory))
        end = len(path.read_bytes())
        seen: list[int] = []
        engine: RestoreEngine | None = None

        def stalled() -> bool:
            # The reader waits for memory once the budget has no room for another record.
            assert engine is not None
            if reader.position >= end or engine.budget.used + 2 * RECORD_OVERHEAD > memory:
                seen.append(reader.position)
                return True
            return False

        opts = RestoreOptions(memory=memory, workers=2)
        engine = RestoreEngine(
            [reader], lambda dev: Sink(dev, _GateTarget(dev, stalled)), opts)
        engine.run()
        assert seen
        return seen[0], end


@pytest.mark.parametrize("kind", ["data", "zstd", "zero"])
def test_a_stalled_target_stops_the_reader_within_the_budget(tmp_path: Path, kind: str) -> None:
    """Records of 1 byte, each in its own buffer and Python objects: the reader stops
    after memory / (what one costs) records, not after memory / (its length). ZERO
    records cost their objects too: charged nothing, they queued without limit."""
    n, memory = 20_000, 256 * KiB
    path = tmp_path / "tiny.arc"
    write_archive_to(path, tiny_records(n, gap=1 if kind == "zero" else 2,
                                        zstd=kind == "zstd", zero=kind == "zero"))
    stopped_at, end = _records_read_while_the_target_waits(path, memory)
    per_record = end / n  # archive bytes per 1-byte record (and its gap)
    read = stopped_at / per_record
    # Each record costs at least RECORD_OVERHEAD: the budget holds this many, plus the
    # batch the reader had not handed on yet and the record read ahead.
    assert read <= memory / RECORD_OVERHEAD + 64 + 2, (read, n)


def test_records_of_a_device_not_restored_give_their_buffers_back(tmp_path: Path) -> None:
    """Records skipped (another device) return their buffers: else the spares count them
    as held forever and soon keep none for reuse."""

    def build(w: ArchiveWriter) -> None:
        a = w.add_device("a", 64 * KiB).id
        b = w.add_device("b", 4096 * KiB).id
        for off in range(0, 4096 * KiB, 64 * KiB):
            w.write_data(b, off, 64 * KiB, Compression.NONE, os.urandom(64 * KiB))
        w.write_data(a, 0, 64 * KiB, Compression.NONE, os.urandom(64 * KiB))

    path = tmp_path / "two.arc"
    write_archive_to(path, build)
    spares = SpareBuffers(1024 * KiB)
    with open(path, "rb", buffering=0) as f:
        reader = ArchiveReader(f, keep_configs=False, spares=spares)
        opts = RestoreOptions(memory=1024 * KiB, workers=1)
        RestoreEngine([reader], lambda d: Sink(d, NullTarget(d)) if d.name == "a" else None,
                      opts).run()
    # Every buffer came back, so the last one (device a's) is kept for reuse; had b's
    # records kept theirs (4 MiB), the spares would think the limit spent and keep none.
    assert spares.kept >= 64 * KiB


def test_reserve_counts_both_buffers_as_allocated() -> None:
    data = bytes(range(256)) * 256  # 64 KiB that compresses

    def build(w: ArchiveWriter) -> None:
        dev = w.add_device("d", len(data)).id
        comp, payload = codec.compress(data, codec.CompressionSpec())
        assert comp == Compression.ZSTD
        w.write_data(dev, 0, len(data), comp, payload)

    reader = ArchiveReader(io.BytesIO(write_archive(build)))
    (rec,) = list(reader.records())
    assert isinstance(rec, DataRecord)
    held = rec.reserve()
    body = rec.raw.body.obj
    assert isinstance(body, bytearray)
    assert held == RECORD_OVERHEAD + len(body) + size_class(len(data))
    assert rec.reserve() == held  # reserved once
    assert bytes(rec.data()) == data


# --- zeros stored as data -----------------------------------------------------------------


def test_is_zero_tells_zeros_from_data_at_every_length_a_record_has() -> None:
    assert len(ZEROS) >= MAX_DATA_LENGTH  # a record of zeros is never too long to tell
    for n in (1, 4096, 64 * KiB + 1, MAX_DATA_LENGTH):
        buf = bytearray(n)
        assert is_zero(buf) and is_zero(memoryview(buf))
        buf[-1] = 1
        assert not is_zero(memoryview(buf))
        buf[-1], buf[0] = 0, 0x80
        assert not is_zero(buf)


def _zero_data_over_data(size: int) -> tuple[bytes, bytes]:
    """A full backup of one device full of b"A", and an incremental over it that stores
    zeros as DATA records."""
    full_header = replace(HEADER, uuid=uuid.UUID(int=0xF))
    inc_header = replace(HEADER, uuid=uuid.UUID(int=0x1), kind=Kind.INCREMENTAL,
                         parent_uuid=full_header.uuid)

    def full(w: ArchiveWriter) -> None:
        dev = w.add_device("zeros", size).id
        w.write_data(dev, 0, size, *codec.compress(b"A" * size, codec.CompressionSpec()))

    return write_archive(full, full_header), write_archive(zero_data(size, 64 * KiB),
                                                           inc_header)


def test_zeros_stored_as_data_are_written_over_an_earlier_archive(tmp_path: Path) -> None:
    """Only a new target reads as zeros: in a chain, zeros over an earlier archive's data
    must land."""
    size = 1024 * KiB
    full, inc = _zero_data_over_data(size)
    opts = RestoreOptions(memory=1024 * KiB, workers=2)
    restore_chain([(io.BytesIO(full), "full"), (io.BytesIO(inc), "inc")],
                  to_dir(tmp_path, "raw", None, opts), opts)
    assert (tmp_path / "zeros.raw").read_bytes() == bytes(size)


def test_zeros_stored_as_data_are_not_written_onto_a_new_file(tmp_path: Path) -> None:
    size = 8 * 1024 * KiB
    opts = RestoreOptions(memory=4 * 1024 * KiB, workers=2)
    result = restore(io.BytesIO(write_archive(zero_data(size))),
                     to_dir(tmp_path, "raw", None, opts), opts)
    out = tmp_path / "zeros.raw"
    assert out.stat().st_size == size and out.stat().st_blocks == 0
    assert result.progress.data_bytes == size  # still counted as the archive stores them


# --- work that grew faster than the input -------------------------------------------------


def _lines_run_reading(devices: int, configs: int) -> int:
    """Python lines run while a reader reads the metadata of an archive with this many
    devices and configs: a count of work that no clock or load changes."""

    def build(w: ArchiveWriter) -> None:
        for i in range(devices):
            w.add_device(f"d{i}", 4096)
        for i in range(configs):
            w.add_config(f"c{i}", b"x", codec.CompressionSpec.parse("none"))

    data = write_archive(build)
    lines = 0

    def trace(frame: FrameType, event: str, arg: object) -> Callable[..., object] | None:
        nonlocal lines
        if event == "line":
            lines += 1
        return trace

    sys.settrace(trace)
    try:
        ArchiveReader(io.BytesIO(data), keep_configs=False)
    finally:
        sys.settrace(None)
    return lines


@pytest.mark.parametrize(("devices", "configs"), [(1500, 0), (0, 1500)])
def test_reading_names_costs_linear_work(devices: int, configs: int) -> None:
    """Each new name was compared with every earlier one: 40,000 devices took two
    minutes to verify. Twice the names must cost about twice the work, not four times."""
    once = _lines_run_reading(devices, configs)
    twice = _lines_run_reading(2 * devices, 2 * configs)
    assert twice <= 2.3 * once, (once, twice)
