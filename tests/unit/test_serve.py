"""The logic of ``serve`` without nbdkit: resolving chains into segment tables, block
status, the record cache, and refusing what cannot be served (agent/serve/)."""

from __future__ import annotations

import itertools
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from agent import keys
from agent.archive import crypto
from agent.archive.format import DIGEST_SIZE, FRAME, Kind, digest, unpack_frame
from agent.errors import ArchiveError, InvalidArgument
from agent.serve.archives import ServedArchives
from agent.serve.cache import RecordCache
from agent.serve.image import DamagedRecord, DeviceImage, Source, load_record
from agent.serve.segments import ZERO, Segments, overlay
from tests.serve_util import KiB, MiB, build_chain, sparse_full
from tests.unit.archive_util import flip

# --- segment tables -------------------------------------------------------------------------


def _table(spec: list[tuple[int, int, str]], layer: int) -> Segments:
    """(start, length, 'd' data | 'z' zero) -> a table whose data pos is its start."""
    t = Segments()
    for start, length, kind in spec:
        if kind == "z":
            t.add(start, length, ZERO, 0, 0)
        else:
            t.add(start, length, 1000 * layer + start, start, layer)
    return t


def _bytes_of(t: Segments, size: int) -> list[tuple[int, int] | None]:
    """What each byte resolves to: (layer, byte within the record) or None for zeros."""
    out: list[tuple[int, int] | None] = [None] * size
    for s in t:
        for b in range(s.start, s.end):
            out[b] = None if s.pos == ZERO else (s.layer, s.pos - 1000 * s.layer + b - s.rec_off)
    return out


def test_overlay_draws_as_in_the_module_docstring() -> None:
    full = _table([(0, 8, "d"), (8, 8, "d"), (16, 20, "z"), (36, 8, "d")], 0)
    inc = _table([(8, 4, "d"), (20, 6, "z")], 1)
    got = [(s.start, s.length, s.layer, s.rec_off, s.pos == ZERO) for s in overlay(full, inc)]
    assert got == [(0, 8, 0, 0, False), (8, 4, 1, 8, False), (12, 4, 0, 8, False),
                   (16, 20, 0, 0, True), (36, 8, 0, 36, False)]  # zeros merged across layers


@pytest.mark.parametrize("seed", range(40))
def test_overlay_resolves_every_byte_to_the_newest_record(seed: int) -> None:
    rng = random.Random(seed)
    size = 200
    layers = []
    for layer in range(rng.randint(2, 4)):
        spec, off = [], 0
        while off < size:
            n = min(size - off, rng.randint(1, 30))
            if layer == 0 or rng.random() < 0.4:
                spec.append((off, n, rng.choice("ddz")))
            off += n
        layers.append(_table(spec, layer))
    resolved = layers[0]
    expected = _bytes_of(layers[0], size)
    for top in layers[1:]:
        resolved = overlay(resolved, top)
        for b, v in enumerate(_bytes_of(top, size)):
            covered = any(s.start <= b < s.end for s in top)
            if covered:
                expected[b] = v
    assert _bytes_of(resolved, size) == expected
    starts = list(resolved.starts)
    assert starts == sorted(starts)


def test_overlapping_ranges_in_one_index_are_refused() -> None:
    t = Segments()
    t.add(0, 10, 5, 0, 0)
    with pytest.raises(ArchiveError, match="overlapping"):
        t.add(9, 10, 50, 9, 0)


# --- serving a chain -----------------------------------------------------------------------


@pytest.mark.parametrize("kinds", [
    [Kind.FULL],
    [Kind.FULL, Kind.INCREMENTAL, Kind.INCREMENTAL],
    [Kind.FULL, Kind.DIFFERENTIAL, Kind.INCREMENTAL],
], ids=["full", "full+inc+inc", "full+diff+inc"])
@pytest.mark.parametrize("compress", [True, False], ids=["zstd", "stored"])
def test_a_chain_reads_as_the_newest_point_in_time(tmp_path: Path, kinds: list[Kind],
                                                   compress: bool) -> None:
    chain = build_chain(tmp_path, kinds, compress=compress)
    served = ServedArchives([str(p) for p in chain.paths], cache=1 * MiB)
    try:
        rng = random.Random(7)
        for name, image in served.devices.items():
            want = chain.expected[name]
            assert bytes(image.read(0, image.size)) == want
            for _ in range(200):  # unaligned, tiny and large, across record boundaries
                off = rng.randrange(image.size)
                n = rng.choice([1, 7, 4095, 65537, 1 * MiB + 3])
                n = min(n, image.size - off)
                assert bytes(image.read(off, n)) == want[off : off + n]
        assert served.cache.bytes <= 1 * MiB + 1 * MiB + 7  # bound + at most one record
    finally:
        served.close()


def test_block_status_answers_zero_ranges_as_holes(tmp_path: Path) -> None:
    chain = build_chain(tmp_path, [Kind.FULL, Kind.INCREMENTAL])
    served = ServedArchives([str(p) for p in chain.paths])
    try:
        for name, image in served.devices.items():
            ext = image.extents(0, image.size)
            assert ext[0][0] == 0 and sum(n for _, n, _ in ext) == image.size
            for (o1, n1, z1), (o2, _, z2) in itertools.pairwise(ext):
                assert o1 + n1 == o2 and z1 != z2  # contiguous, neighbours merged
            for off, n, zero in ext:
                if zero:
                    assert chain.expected[name][off : off + n] == bytes(n)
            # from an offset inside an extent, limited: still starts at the offset
            assert image.extents(5, 100, limit=1)[0][0] == 5
    finally:
        served.close()


@pytest.mark.parametrize("seed", range(30))
def test_block_status_matches_what_each_byte_reads(seed: int) -> None:
    """Block status (from merged runs of zeros) against a byte-by-byte model: data and zero
    segments in any order, gaps between them and after the last, any window and limit."""
    rng = random.Random(seed)
    size, spec, off = 300, [], 0
    while off < size - 20:
        off += rng.choice([0, 0, 0, rng.randint(1, 9)])  # sometimes a gap
        n = rng.randint(1, 25)
        if off + n > size - 5:
            break
        spec.append((off, n, rng.choice("dzz")))
        off += n
    image = DeviceImage("vda", size, _table(spec, 0), [], RecordCache(0))
    zero = [True] * size  # what no segment covers reads as zeros
    for start, n, kind in spec:
        zero[start : start + n] = [kind == "z"] * n
    for _ in range(40):
        offset = rng.randrange(size)
        length, limit = rng.randint(1, size), rng.randint(1, 6)
        runs = image.extents(offset, length, limit)
        assert runs and runs[0][0] == offset and len(runs) <= limit
        cur = offset
        for o, n, z in runs:
            assert o == cur and n > 0 and o + n <= size
            assert zero[o : o + n] == [z] * n  # one kind all through
            cur = o + n
        for (_, _, z1), (_, _, z2) in itertools.pairwise(runs):
            assert z1 != z2  # neighbours merged
        if len(runs) < limit:  # not cut by the limit: it covers the window
            assert cur == min(offset + length, size)
        elif cur < min(offset + length, size):
            assert zero[cur] != runs[-1][2]  # a run ends only where the kind changes


def test_a_sparse_terabyte_is_a_handful_of_segments(tmp_path: Path) -> None:
    arc = tmp_path / "tb.arc"
    data = sparse_full(arc, 1 << 40, data_at=(0, 1 << 39))
    served = ServedArchives([str(arc)])
    try:
        image = served.devices["vda"]
        # 1 GiB ZERO records as a backup writes them, merged: 2 data segments, 2 zero runs
        assert len(image.segments) == 4 and image.segments.nbytes < 1024
        assert image.read(1 << 39, 64 * KiB) == data
        assert image.read(1 << 30, 1 * MiB) == bytes(1 * MiB)
        assert [z for _, _, z in image.extents(0, 1 << 40)] == [False, True, False, True]
    finally:
        served.close()


# --- what cannot be served ------------------------------------------------------------------


def _one_data_record(chain_records: list[tuple[int, str, int, int, bool]]) -> tuple[str, int, int]:
    # not the first or last record written: opening checks those two (IndexedArchive)
    for _, name, off, n, is_data in chain_records[1:-1]:
        if is_data and n > 4 * KiB:
            return name, off, n
    raise AssertionError("no data record")


def test_a_damaged_record_fails_its_reads_and_no_other(tmp_path: Path) -> None:
    chain = build_chain(tmp_path, [Kind.FULL], compress=False)
    path = chain.paths[0]
    name, off, n = _one_data_record(chain.records)
    served = ServedArchives([str(path)])
    image = served.devices[name]
    seg = image.segments[image.segments.first_at(off)]
    served.close()
    # flip one payload byte: the frame and the index are intact, the digest is not
    path.write_bytes(flip(path.read_bytes(), seg.pos + 24 + 24 + n // 2))
    served = ServedArchives([str(path)])
    try:
        image = served.devices[name]
        for _ in range(2):  # a failure is not cached as data
            with pytest.raises(DamagedRecord, match=rf"device '{name}': reads of bytes "
                               rf"{off}\.\.{off + n} fail: .*data record at byte {seg.pos}: "
                               "it fails its checksum"):
                image.read(off + 1, 10)
        want = chain.expected[name]
        if off >= 4096:
            assert image.read(off - 4096, 4096) == want[off - 4096 : off]
        if off + n + 4096 <= image.size:
            assert image.read(off + n, 4096) == want[off + n : off + n + 4096]
    finally:
        served.close()


def test_a_pipe_a_fifo_and_a_truncated_archive_are_refused(tmp_path: Path) -> None:
    chain = build_chain(tmp_path, [Kind.FULL])
    with pytest.raises(InvalidArgument, match=r"cannot serve standard input.*save it to a "
                       r"file first"):
        ServedArchives(["-"])
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(InvalidArgument, match=f"{fifo} is a pipe: .*save it to a file first"):
        ServedArchives([str(fifo)])
    cut = tmp_path / "cut.arc"
    cut.write_bytes(chain.paths[0].read_bytes()[:-100])
    with pytest.raises(ArchiveError, match=f"^{cut}: .*incomplete"):
        ServedArchives([str(cut)])


def test_an_archive_without_index_is_refused(tmp_path: Path) -> None:
    from tests.hostile import builder as hb

    arc = tmp_path / "noindex.arc"
    arc.write_bytes(hb.seal([hb.Record(hb.T.HEADER, hb.header()),
                             hb.Record(hb.T.DEVICE, hb.device(0, 1 << 20, "vda")),
                             hb.Record(hb.T.ZERO, hb.zero(0, 0, 1 << 20))], index=False))
    with pytest.raises(ArchiveError, match="has no index, so it cannot be served"):
        ServedArchives([str(arc)])


def test_a_wrong_chain_is_refused_as_restore_refuses_it(tmp_path: Path) -> None:
    chain = build_chain(tmp_path, [Kind.FULL, Kind.INCREMENTAL, Kind.INCREMENTAL])
    f, i1, i2 = (str(p) for p in chain.paths)
    with pytest.raises(InvalidArgument, match="wrong order"):
        ServedArchives([f, i2, i1])
    with pytest.raises(InvalidArgument, match="missing link"):
        ServedArchives([f, i2])
    with pytest.raises(InvalidArgument, match="give the chain in order"):
        ServedArchives([i1, i2])
    with pytest.raises(InvalidArgument, match="no device named 'sda'"):
        ServedArchives([f], ["sda"])


@pytest.mark.slow
def test_what_is_served_is_the_file_that_was_checked(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Each archive is opened once: another file renamed over its path once its checks
    passed (by a neighbour who may write the directory) is never read."""
    import agent.serve.archives as archives

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    mine = build_chain(tmp_path / "a", [Kind.FULL], seed=1)
    other = build_chain(tmp_path / "b", [Kind.FULL], seed=2)
    path = mine.paths[0]
    real_link = archives.Link

    def link_then_swap(*args: object) -> object:
        os.replace(other.paths[0], path)  # the checks of ``path`` are done by now
        return real_link(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(archives, "Link", link_then_swap)
    served = ServedArchives([str(path)])
    try:
        for name, want in mine.expected.items():
            assert bytes(served.devices[name].read(0, len(want))) == want
    finally:
        served.close()


# --- the cache ------------------------------------------------------------------------------


def test_the_cache_keeps_to_its_budget_least_recently_used_out() -> None:
    cache = RecordCache(100)
    for k in range(5):
        cache.get(k, lambda k=k: bytes([k]) * 40)
    assert cache.bytes == 80 and cache.stats.loads == 5 and cache.stats.evictions == 3
    cache.get(3, lambda: b"never")  # hit: 3 becomes the most recent
    cache.get(9, lambda: b"n" * 40)  # evicts 4, not 3
    assert cache.get(3, lambda: b"x") == bytes([3]) * 40
    assert cache.get(9, lambda: b"x") == b"n" * 40
    assert cache.get(7, lambda: b"b" * 500) == b"b" * 500  # larger than the budget: not kept
    assert cache.bytes <= 100 and cache.stats.peak_bytes <= 100


def test_threads_asking_for_one_record_load_it_once() -> None:
    cache = RecordCache(1 << 20)
    calls = []

    def load() -> bytes:
        calls.append(1)
        time.sleep(0.05)  # long enough for every thread to ask meanwhile
        return b"r" * 1000

    threads = [threading.Thread(target=lambda: cache.get("k", load)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and cache.stats.loads == 1


def test_a_failed_load_is_not_remembered() -> None:
    cache = RecordCache(1 << 20)

    def bad() -> bytes:
        raise DamagedRecord("bad")

    for _ in range(2):
        with pytest.raises(DamagedRecord):
            cache.get("k", bad)
    assert cache.get("k", lambda: b"ok") == b"ok"


def test_an_index_that_names_the_wrong_record_fails_the_read_not_the_data(
        tmp_path: Path) -> None:
    """Two entries of the index trade their offsets (everything else checks out: digests,
    seal, totals, the first and last entry): a read of either range finds a record that
    holds another range and fails, instead of serving that other range's bytes."""
    from agent.archive.format import INDEX_ENTRY, RecordType
    from tests.hostile import builder as hb
    from tests.unit.archive_util import assemble, split

    blocks = [bytes([0x41 + k]) * (64 * KiB) for k in range(4)]
    arc = hb.seal([hb.Record(hb.T.HEADER, hb.header()),
                   hb.Record(hb.T.DEVICE, hb.device(0, 4 * 64 * KiB, "vda")),
                   *(hb.Record(hb.T.DATA, hb.data(0, k * 64 * KiB, b))
                     for k, b in enumerate(blocks))])
    parts = split(arc)
    i = parts.find(RecordType.INDEX)
    entries = [list(e) for e in INDEX_ENTRY.iter_unpack(parts.records[i].body)]
    entries[1][4], entries[2][4] = entries[2][4], entries[1][4]  # the offsets
    parts.records[i].body = b"".join(INDEX_ENTRY.pack(*e) for e in entries)
    path = tmp_path / "swapped.arc"
    path.write_bytes(assemble(parts.records, keep_index=True))
    served = ServedArchives([str(path)])
    try:
        image = served.devices["vda"]
        assert image.read(0, 64 * KiB) == blocks[0]
        assert image.read(3 * 64 * KiB, 64 * KiB) == blocks[3]
        for k in (1, 2):
            with pytest.raises(DamagedRecord, match="not the record the index names"):
                image.read(k * 64 * KiB + 10, 100)
    finally:
        served.close()


def test_a_damaged_compressed_record_fails_its_reads(tmp_path: Path) -> None:
    chain = build_chain(tmp_path, [Kind.FULL], compress=True, seed=3)
    path = chain.paths[0]
    served = ServedArchives([str(path)])
    image = served.devices["vda"]
    segs = image.segments
    # a compressed record in the middle of the archive (opening checks the first and last)
    data = [s for s in segs if s.pos != ZERO]
    target = sorted(data, key=lambda s: s.pos)[len(data) // 2]
    served.close()
    path.write_bytes(flip(path.read_bytes(), target.pos + 24 + 24 + 5))
    served = ServedArchives([str(path)])
    try:
        with pytest.raises(DamagedRecord, match=f"data record at byte {target.pos}"):
            served.devices["vda"].read(target.start, 1)
    finally:
        served.close()


def test_bytes_after_the_zstd_frame_fail_the_read_as_restore_refuses_them(
        tmp_path: Path) -> None:
    import zstandard

    from tests.hostile import builder as hb

    block = b"0123456789abcdef" * 4096
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(block)
    arc = tmp_path / "tail.arc"
    arc.write_bytes(hb.seal([
        hb.Record(hb.T.HEADER, hb.header()),
        hb.Record(hb.T.DEVICE, hb.device(0, 3 * len(block), "vda")),
        hb.Record(hb.T.DATA, hb.data(0, 0, block)),
        hb.Record(hb.T.DATA, hb.data(0, len(block), frame + b"more", length=len(block),
                                     compression=hb.Compression.ZSTD)),
        hb.Record(hb.T.DATA, hb.data(0, 2 * len(block), block))]))
    served = ServedArchives([str(arc)])
    try:
        image = served.devices["vda"]
        assert image.read(0, 10) == block[:10]
        with pytest.raises(DamagedRecord, match="data record at byte"):
            image.read(len(block), 10)
    finally:
        served.close()


# --- encrypted archives, and how records are read --------------------------------------------


def _keypair(seed: int) -> keys.KeyPair:
    return keys.generate(random.Random(seed).randbytes)


K1, K2 = _keypair(11), _keypair(12)


def test_an_encrypted_chain_is_served_with_its_keys(tmp_path: Path) -> None:
    """A chain whose full backup and second incremental are encrypted to different keys,
    the first incremental not at all: served with both keys, it reads as the chain."""
    chain = build_chain(tmp_path, [Kind.FULL, Kind.INCREMENTAL, Kind.INCREMENTAL],
                        encrypt_to={0: [K1.public], 2: [K2.public]})
    paths = [str(p) for p in chain.paths]
    served = ServedArchives(paths, keys=[K1.private, K2.private])
    try:
        assert [lay.sealer is not None for lay in served.devices["vda"].layers] == [
            True, False, True]
        rng = random.Random(3)
        for name, image in served.devices.items():
            want = chain.expected[name]
            assert bytes(image.read(0, image.size)) == want
            for _ in range(100):
                off = rng.randrange(image.size)
                n = min(rng.choice([1, 4095, 65537, 1 * MiB + 3]), image.size - off)
                assert bytes(image.read(off, n)) == want[off : off + n]
    finally:
        served.close()
    with pytest.raises(crypto.KeyRequired, match=rf"{paths[0]} is encrypted .*give --key"):
        ServedArchives(paths)
    with pytest.raises(InvalidArgument, match=rf"{paths[2]} is encrypted for other keys"):
        ServedArchives(paths, keys=[K1.private])


def _reseal_digest(data: bytearray, pos: int) -> None:
    """Recompute the digest of the record at ``pos`` (digests are not keyed: anyone can)."""
    fr = unpack_frame(bytes(data[pos : pos + FRAME.size]), pos)
    body = data[pos + FRAME.size : pos + FRAME.size + fr.body_len]
    end = pos + FRAME.size + fr.body_len
    data[end : end + DIGEST_SIZE] = digest(body)


def test_an_altered_encrypted_record_fails_its_reads_and_no_other(tmp_path: Path) -> None:
    chain = build_chain(tmp_path, [Kind.FULL], compress=False, encrypt_to={0: [K1.public]})
    path = chain.paths[0]
    name, off, _n = _one_data_record(chain.records)
    served = ServedArchives([str(path)], keys=[K1.private])
    seg = served.devices[name].segments[served.devices[name].segments.first_at(off)]
    served.close()
    data = bytearray(path.read_bytes())
    data[seg.pos + FRAME.size + 40] ^= 0x20  # in the sealed body, its digest made to match
    _reseal_digest(data, seg.pos)
    path.write_bytes(bytes(data))
    served = ServedArchives([str(path)], keys=[K1.private])
    try:
        image = served.devices[name]
        with pytest.raises(DamagedRecord, match=rf"data record at byte {seg.pos}: record "
                           r"\d+ at byte \d+ does not authenticate"):
            image.read(off + 1, 10)
        want = chain.expected[name]
        if off >= 4096:
            assert image.read(off - 4096, 4096) == want[off - 4096 : off]
    finally:
        served.close()


class _CountingSource:
    def __init__(self, inner: Source) -> None:
        self.inner = inner
        self.calls = 0

    def pread(self, n: int, pos: int) -> bytes:
        self.calls += 1
        return self.inner.pread(n, pos)

    def close(self) -> None:
        self.inner.close()


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_a_record_is_read_in_one_request(tmp_path: Path, encrypted: bool) -> None:
    """The index's next entry says how long each record is at most, so frame, body and
    digest come in one read (one ranged GET from a bucket); without it, two."""
    chain = build_chain(tmp_path, [Kind.FULL], encrypt_to={0: [K1.public]} if encrypted
                        else None)
    served = ServedArchives([str(chain.paths[0])], cache=0, keys=[K1.private])
    try:
        image = served.devices["vda"]
        counter = _CountingSource(image.layers[0].source)
        layer = replace(image.layers[0], source=counter)
        image.layers[0] = layer
        records = [s for s in image.segments if s.pos != ZERO]
        assert records and all(s.room > 0 for s in records)
        for s in records:
            assert bytes(image.read(s.start, s.length)) == chain.expected["vda"][
                s.start : s.end]
        assert counter.calls == len(records)
        s = records[0]  # the same record, its room unknown: the frame first, then the rest
        assert bytes(load_record(layer, s.pos, s.rec_off, 0)) == bytes(
            load_record(layer, s.pos, s.rec_off, s.room))
        assert counter.calls == len(records) + 3
    finally:
        served.close()


# --- reading ahead of a stream (agent/serve/readahead.py) ------------------------------------


def _streamed(tmp_path: Path) -> tuple[ServedArchives, bytes]:
    """Six stored 1 MiB records, back to back; served with the default cache."""
    path = tmp_path / "stream.arc"
    data = sparse_full(path, 6 * MiB, data_at=tuple(range(0, 6 * MiB, MiB)), record=MiB)
    return ServedArchives([str(path)]), data


def _key(served: ServedArchives, offset: int) -> tuple[str, int]:
    image = served.devices["vda"]
    return image.layers[0].path, image.segments[image.segments.first_at(offset)].pos


def _asked(served: ServedArchives, offset: int) -> bool:
    """Whether the record at ``offset`` was asked for (queued, loading or cached)."""
    ra, key = served.readahead, _key(served, offset)
    assert ra is not None
    return key in ra._queued or served.cache.has(key)


def _until(predicate: Callable[[], bool], what: str) -> None:
    """Wait for a background thread's work (a bound on hangs, not a timing assertion)."""
    for _ in range(6000):
        if predicate():
            return
        time.sleep(0.005)
    raise AssertionError(f"never {what}")


def test_a_large_read_has_the_records_after_it_loaded_ahead(tmp_path: Path) -> None:
    served, data = _streamed(tmp_path)
    try:
        image, stats = served.devices["vda"], served.cache.stats
        assert bytes(image.read(0, 128 * KiB)) == data[: 128 * KiB]
        # The record read, and those within 2 MiB after the read: 1 MiB and 2 MiB.
        _until(lambda: stats.loads == 3, "loaded the two records ahead")
        assert not _asked(served, 3 * MiB)
        hits = stats.hits
        assert bytes(image.read(MiB, 128 * KiB)) == data[: 128 * KiB]
        assert stats.hits > hits  # found loaded
        _until(lambda: stats.loads == 4, "loaded the record at 3 MiB")
        thread = served.readahead._thread if served.readahead else None
    finally:
        served.close()
    assert thread is not None and not thread.is_alive()  # close() stops it


def test_small_reads_and_tiny_caches_read_nothing_ahead(tmp_path: Path) -> None:
    served, data = _streamed(tmp_path)
    try:
        assert bytes(served.devices["vda"].read(0, 4 * KiB)) == data[: 4 * KiB]
        assert not _asked(served, MiB)  # a booting guest's scattered reads: no stream
    finally:
        served.close()
    tiny = ServedArchives([str(tmp_path / "stream.arc")], cache=4 * MiB)
    try:
        assert tiny.readahead is None  # no room for records ahead of the reader's own
    finally:
        tiny.close()


def test_readers_on_several_connections_load_their_own_records(tmp_path: Path) -> None:
    """Several connections (threads) reading at once already load in parallel: nothing is
    read ahead for them (it cost nbdcopy's four connections a fifth of their speed)."""
    served, _ = _streamed(tmp_path)
    image = served.devices["vda"]
    try:
        image.read(0, 128 * KiB)  # one reader so far: records ahead asked for
        _until(lambda: served.cache.stats.loads == 3, "loaded ahead")
        other = threading.Thread(target=image.read, args=(3 * MiB, 128 * KiB))
        other.start()  # a second connection, at once
        other.join()
        image.read(3 * MiB + 128 * KiB, 128 * KiB)
        assert not _asked(served, 4 * MiB) and not _asked(served, 5 * MiB)
    finally:
        served.close()


def test_a_damaged_record_ahead_fails_only_its_own_reads(tmp_path: Path) -> None:
    served, data = _streamed(tmp_path)
    path, pos = _key(served, MiB)
    served.close()
    Path(path).write_bytes(flip(Path(path).read_bytes(), pos + FRAME.size + 100))
    served = ServedArchives([path])
    try:
        image = served.devices["vda"]
        assert bytes(image.read(0, 128 * KiB)) == data[: 128 * KiB]
        _until(lambda: served.cache.stats.loads == 2, "loaded ahead")  # 2 MiB; 1 MiB fails
        _until(lambda: not served.readahead or not served.readahead._queued, "done")
        assert not served.cache.has((path, pos))
        with pytest.raises(DamagedRecord, match=rf"record at byte {pos}: it fails its "
                           "checksum"):
            image.read(MiB, 128 * KiB)
        assert bytes(image.read(2 * MiB, 4 * KiB)) == data[: 4 * KiB]
    finally:
        served.close()


def test_reading_ahead_works_in_a_process_forked_after_opening(tmp_path: Path) -> None:
    """A daemonized nbdkit forks after its configuration (where the archives are opened):
    the thread that reads ahead must be the child's."""
    served, _ = _streamed(tmp_path)
    try:
        pid = os.fork()
        if pid == 0:  # the child: only os._exit leaves it
            code = 1
            try:
                served.devices["vda"].read(0, 128 * KiB)
                _until(lambda: served.cache.stats.loads == 3, "loaded ahead in the child")
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        served.close()
