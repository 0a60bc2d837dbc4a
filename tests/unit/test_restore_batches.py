"""The restore hands records to its workers in batches, each written in offset order with
one pwritev per run of adjacent records. Whatever the order of the records in the archive,
the devices they interleave, and a memory budget smaller than one batch, every byte lands
where it belongs; and a short pwritev is carried on, not lost."""

from __future__ import annotations

import io
import os
import random
import threading
from pathlib import Path

import pytest

from agent.archive import codec
from agent.archive.reader import ArchiveReader, DataRecord
from agent.archive.writer import ArchiveWriter
from agent.restore import BATCH_BYTES, RestoreOptions, restore, to_dir
from agent.targets import file as target_mod
from agent.targets.file import FileTarget
from tests.unit.archive_util import write_archive

KiB = 1024


def _pieces(rng: random.Random, size: int) -> list[tuple[int, int, bool]]:
    """(offset, length, is_data) covering [0, size): lengths of 4..200 KiB, the last odd."""
    out, pos = [], 0
    while pos < size:
        n = min(size - pos, rng.choice([4, 60, 64, 64, 64, 128, 200]) * KiB)
        out.append((pos, n, rng.random() < 0.8))
        pos += n
    return out


def _archive(rng: random.Random, sizes: dict[str, int]) -> tuple[bytes, dict[str, bytes]]:
    """A full archive of small records of every device, shuffled and interleaved, with
    random and compressible data, some stored uncompressed; and what each device holds."""
    expected = {name: bytearray(size) for name, size in sizes.items()}
    plan = []
    for name, size in sizes.items():
        for off, n, is_data in _pieces(rng, size):
            if is_data:
                data = (rng.randbytes(n) if rng.random() < 0.5
                        else bytes(rng.choice(b"abc ") for _ in range(n)))
                expected[name][off:off + n] = data
                plan.append((name, off, n, data))
            else:
                plan.append((name, off, n, None))
    rng.shuffle(plan)

    def build(w: ArchiveWriter) -> None:
        ids = {name: w.add_device(name, size).id for name, size in sizes.items()}
        for name, off, n, data in plan:
            if data is None:
                w.write_zero(ids[name], off, n)
            else:
                spec = codec.CompressionSpec() if n % 3 else codec.CompressionSpec.parse("none")
                comp, payload = codec.compress(data, spec)
                w.write_data(ids[name], off, n, comp, payload)

    return write_archive(build), {k: bytes(v) for k, v in expected.items()}


@pytest.mark.timeout(60)  # a batch held back while waiting for memory would hang here
@pytest.mark.parametrize("memory", [64 * KiB, BATCH_BYTES // 2, 64 * 1024 * KiB])
@pytest.mark.parametrize("workers", [1, 3])
def test_shuffled_small_records_of_two_devices_restore_exactly(
        tmp_path: Path, memory: int, workers: int) -> None:
    rng = random.Random(memory * 10 + workers)
    arc, expected = _archive(rng, {"a": 3 * 1024 * KiB + 5 * KiB, "b": 2 * 1024 * KiB})
    opts = RestoreOptions(memory=memory, workers=workers)
    result = restore(io.BytesIO(arc), to_dir(tmp_path, "raw", None, opts), opts)
    assert sorted(result.devices) == ["a", "b"]
    for name, data in expected.items():
        assert (tmp_path / f"{name}.raw").read_bytes() == data


def test_a_short_pwritev_is_carried_on_where_it_stopped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.pwritev
    calls = []

    def at_most_5000(fd: int, views: list[memoryview], offset: int) -> int:
        # Cut the request after 5000 bytes, inside a part: what a signal or a full
        # device may do to a real one.
        budget, cut = 5000, []
        for v in views:
            if budget <= 0:
                break
            cut.append(v[:budget])
            budget -= len(cut[-1])
        calls.append(len(cut))
        return real(fd, cut, offset)

    monkeypatch.setattr(target_mod.os, "pwritev", at_most_5000)
    parts = [os.urandom(3000), os.urandom(7000), b"", os.urandom(4096)]
    path = tmp_path / "f.raw"
    t = FileTarget(str(path), 20_000, fresh=True)
    try:
        t.writev(100, parts)
    finally:
        t.close()
    data = path.read_bytes()
    assert data[100:100 + 14096] == b"".join(parts)
    assert data[:100] == bytes(100) and data[100 + 14096:] == bytes(20_000 - 14196)
    assert len(calls) == 3  # 5000 + 5000 + 4096 bytes


def test_the_reader_says_when_it_will_wait_for_a_pipe_and_only_then(tmp_path: Path) -> None:
    """What lets the restore hand on the records it holds back before it waits for input
    (a stalled pipe must not keep written-able records from the target)."""
    arc, _ = _archive(random.Random(7), {"a": 1024 * KiB})
    path = tmp_path / "a.arc"
    path.write_bytes(arc)
    waits: list[int] = []
    with open(path, "rb", buffering=0) as f:
        reader = ArchiveReader(f)
        reader.on_input_wait = lambda: waits.append(reader.position)
        for rec in reader.records():
            if isinstance(rec, DataRecord):
                rec.release()
    assert waits == []  # a regular file never makes it wait

    r_fd, w_fd = os.pipe()
    half = len(arc) // 2
    go_on = threading.Event()

    released: list[bool] = []

    def feed() -> None:
        with open(w_fd, "wb", buffering=0) as w:
            w.write(arc[:half])
            # The rest only once the reader says it waits (else in 10 s, and the test fails).
            released.append(go_on.wait(10))
            w.write(arc[half:])

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        with open(r_fd, "rb", buffering=0) as f:
            reader = ArchiveReader(f)

            def waiting() -> None:
                waits.append(reader.position)
                go_on.set()

            reader.on_input_wait = waiting
            for rec in reader.records():
                if isinstance(rec, DataRecord):
                    rec.release()
    finally:
        go_on.set()
        feeder.join()
    assert released == [True] and waits  # it said so before waiting for the rest


def test_spare_buffers_are_kept_up_to_a_byte_cap_and_reused_smallest_first() -> None:
    from agent.archive import reader as reader_mod

    spares = reader_mod.SpareBuffers()
    mib = 1024 * KiB
    n = reader_mod.DEFAULT_SPARE_BYTES // mib
    given = [bytearray(mib) for _ in range(n + 1)]
    for buf in given:
        spares.give(buf)  # the last one is over the cap: dropped
    small = bytearray(64 * KiB)
    spares.give(small)  # the cap is reached: a small one is dropped too
    taken = [spares.take(mib) for _ in range(n)]
    assert all(any(t is g for g in given[:n]) for t in taken)  # every one a spare
    for t in taken:
        spares.give(t)  # back: room for nothing more
    spares.give(small)
    assert spares.take(1000) is not small  # far larger than its size class: not reused
    fresh = spares.take(3 * mib)
    assert all(fresh is not g for g in given) and len(fresh) == 3 * mib
    spares.give(spares.take(mib))  # one went for the fresh one: a spare is still there
    spares.give(small)  # room again
    assert spares.take(60 * KiB) is small  # in its size class: the small one
