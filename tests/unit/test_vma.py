"""Proxmox VMA: the hand-built fixture, writer-to-reader round trips, an independent
reader (dissect.archive) on what we write, and every kind of bad input."""

from __future__ import annotations

import gzip
import io
import random
from collections.abc import Sequence
from uuid import UUID

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.archive.format import Compression, Header
from agent.archive.output import Buf, SequentialOutput
from agent.archive.reader import ArchiveReader, DataRecord
from agent.errors import ArchiveError, InvalidArgument
from agent.vma.detect import open_reader, sniff
from agent.vma.format import (
    CLUSTER_SIZE,
    VmaDevice,
    build_extent_header,
    build_header,
    pack_blockinfo,
)
from agent.vma.reader import VmaReader
from agent.vma.writer import VmaWriter
from tests.data.vma import make_tiny

UUID1 = UUID(bytes=make_tiny.UUID)


def tiny() -> bytes:
    return make_tiny.from_hex((make_tiny.HERE / "tiny.vma.hex").read_text())


def read_all(data: bytes) -> tuple[VmaReader, dict[str, bytearray]]:
    reader = open_reader(io.BytesIO(data))
    assert isinstance(reader, VmaReader)
    disks = {d.name: bytearray(d.size) for d in reader.devices}
    for rec in reader.records():
        if isinstance(rec, DataRecord):
            disks[rec.device.name][rec.offset : rec.offset + rec.length] = rec.data()
            rec.release()
    return reader, disks


def drain(data: bytes) -> None:
    """Read ``data`` to its end, keeping nothing (device sizes may be hostile)."""
    reader = open_reader(io.BytesIO(data))
    for rec in reader.records():
        if isinstance(rec, DataRecord):
            bytes(rec.data())
            rec.release()


# -- the hand-built fixture ------------------------------------------------------------


def test_fixture_file_is_what_its_script_builds() -> None:
    assert tiny() == make_tiny.archive()


def test_fixture_reads_as_the_spec_says() -> None:
    reader, disks = read_all(tiny())
    assert [(d.name, d.size) for d in reader.devices] == [("drive-scsi0", make_tiny.SIZE)]
    assert reader.config("qemu-server.conf") == make_tiny.CONFIG
    assert reader.header.uuid == UUID1
    assert reader.header.created_ns == make_tiny.CTIME * 10**9
    assert disks["drive-scsi0"] == make_tiny.expected_disk()
    assert reader.end is not None and reader.end.records == 2
    assert reader.data_bytes == 3 * 4096
    assert reader.archive_len == len(tiny())


def test_our_header_builder_lays_out_the_fixture_byte_for_byte() -> None:
    built = build_header(UUID1, make_tiny.CTIME, [VmaDevice(1, "drive-scsi0", make_tiny.SIZE)],
                         [("qemu-server.conf", make_tiny.CONFIG)])
    assert built == make_tiny.header()


def test_independent_reader_agrees_on_the_fixture() -> None:
    vma = pytest.importorskip("dissect.archive.vma")
    v = vma.VMA(io.BytesIO(tiny()))
    assert v.configs() == {"qemu-server.conf": make_tiny.CONFIG}
    (dev,) = v.devices()
    assert dev.open().read() == make_tiny.expected_disk()


# -- writer to reader ------------------------------------------------------------------


class _Mem(SequentialOutput):
    def __init__(self) -> None:  # no descriptor: memory
        super().__init__(-1, "memory")
        self.buf = bytearray()

    def write(self, parts: Sequence[Buf]) -> None:
        for p in parts:
            self.buf += p
        self.position = len(self.buf)


def _disk(size: int, rng: random.Random) -> bytes:
    """Random data with holes: whole zero clusters, zero 4 KiB blocks, a short tail."""
    disk = bytearray(size)
    for off in range(0, size, 4096):
        if rng.random() < 0.5 and off // CLUSTER_SIZE % 3:
            disk[off : off + 4096] = rng.randbytes(min(4096, size - off))
    return bytes(disk)


def write_vma(disks: dict[str, bytes], configs: dict[str, bytes], seed: int = 1,
              piece: int = 12288) -> bytes:
    """What the engine does: records of any length, in a shuffled order, zeros as ZERO."""
    rng = random.Random(seed)
    out = _Mem()
    w = VmaWriter(out, Header(uuid=UUID1, created_ns=make_tiny.CTIME * 10**9,
                              tool_version="t"))
    for name, data in disks.items():
        w.add_device(name, len(data))
    for name, data in configs.items():
        w.add_config(name, data, None)  # type: ignore[arg-type]
    records = []
    for dev_id, data in enumerate(disks.values()):
        off = 0
        while off < len(data):
            n = min(rng.choice([4096, piece, CLUSTER_SIZE, 3 * CLUSTER_SIZE]), len(data) - off)
            records.append((dev_id, off, n))
            off += n
    rng.shuffle(records)
    while records:
        k = rng.randint(1, 5)
        group, records = records[:k], records[k:]
        bufs = []
        with w.batch():  # as the engine writes: its buffers are reused after the batch
            for dev_id, off, n in group:
                chunk = bytearray(list(disks.values())[dev_id][off : off + n])
                bufs.append(chunk)
                if any(chunk):
                    w.write_data(dev_id, off, n, Compression.NONE, chunk)
                else:
                    w.write_zero(dev_id, off, n)
        for buf in bufs:
            buf[:] = b"\xdd" * len(buf)  # reused: the archive must not see this
    w.finish()
    return bytes(out.buf)


def test_round_trip_several_disks_odd_sizes_holes_any_order() -> None:
    rng = random.Random(7)
    disks = {"drive-scsi0": _disk(5 * CLUSTER_SIZE + 12345, rng),
             "drive-virtio1": _disk(200 * CLUSTER_SIZE, rng),
             "tiny": _disk(1, rng) or b"\x07"}
    configs = {"qemu-server.conf": b"memory: 1024\n", "qemu-server.fw": b"[OPTIONS]\n"}
    data = write_vma(disks, configs)
    reader, got = read_all(data)
    assert {k: bytes(v) for k, v in got.items()} == disks
    assert {c.name: reader.config(c.name) for c in reader.configs} == configs
    # VMA leaves zero blocks out: the archive is about the data's size, not the disks'.
    nonzero = sum(sum(1 for o in range(0, len(d), 4096) if any(d[o:o + 4096]))
                  for d in disks.values())
    assert reader.data_bytes <= nonzero * 4096


def test_independent_reader_reads_what_we_write() -> None:
    vma = pytest.importorskip("dissect.archive.vma")
    rng = random.Random(3)
    disks = {"drive-scsi0": _disk(9 * CLUSTER_SIZE, rng), "drive-scsi1": _disk(70 * 4096, rng)}
    v = vma.VMA(io.BytesIO(write_vma(disks, {"qemu-server.conf": b"cores: 2\n"})))
    assert v.configs() == {"qemu-server.conf": b"cores: 2\n"}
    assert {d.name: d.open().read() for d in v.devices()} == disks


def test_writer_refuses_what_vma_cannot_hold() -> None:
    w = VmaWriter(_Mem(), Header(uuid=UUID1, created_ns=1, tool_version="t"))
    with pytest.raises(InvalidArgument, match="at most 65535"):
        w.add_config("qemu-server.conf", bytes(70000), None)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="reserved"):
        w.add_device("vmstate", 4096)
    with pytest.raises(InvalidArgument, match="cannot be stored"):
        w.add_device("empty", 0)
    for i in range(255):
        w.add_device(f"d{i}", 4096)
    with pytest.raises(InvalidArgument, match="at most 255 devices"):
        w.add_device("one-more", 4096)


def test_writer_refuses_to_finish_with_clusters_missing() -> None:
    w = VmaWriter(_Mem(), Header(uuid=UUID1, created_ns=1, tool_version="t"))
    w.add_device("a", 3 * CLUSTER_SIZE)
    w.write_zero(0, 0, CLUSTER_SIZE + 4096)
    with pytest.raises(ArchiveError, match="only partly backed up"):
        w.finish()


# -- compressed streams ----------------------------------------------------------------


@pytest.mark.parametrize("pack", [
    lambda b: zstandard.ZstdCompressor().compress(b[:9000]) + zstandard.ZstdCompressor()
    .compress(b[9000:]),  # two frames, as zstd writes a concatenation
    gzip.compress,
])
def test_compressed_vma_streams_are_read(pack) -> None:  # type: ignore[no-untyped-def]
    _, disks = read_all(pack(tiny()))
    assert disks["drive-scsi0"] == make_tiny.expected_disk()


def test_lzo_stream_says_to_pipe_through_lzop() -> None:
    with pytest.raises(ArchiveError, match="lzop -dc"):
        sniff(io.BytesIO(b"\x89LZO\0\r\n\x1a\n" + bytes(100)))


def test_truncated_zstd_stream_is_one_clear_error() -> None:
    packed = zstandard.ZstdCompressor().compress(tiny())
    with pytest.raises(ArchiveError):
        read_all(packed[: len(packed) // 2])


def test_our_own_format_still_goes_to_our_reader() -> None:
    from tests.data.make_tiny import TINY_PATH

    with open(TINY_PATH, "rb") as f:
        assert isinstance(open_reader(f), ArchiveReader)


# -- bad input ---------------------------------------------------------------------------


def _header(devices: list[tuple[int, str, int]] | None = None) -> bytes:
    devs = [VmaDevice(i, n, s) for i, n, s in (devices or [(1, "drive-scsi0", 3 * CLUSTER_SIZE)])]
    return build_header(UUID1, 1, devs, [("qemu-server.conf", b"x\n")])


def _extent(infos: list[tuple[int, int, int]], uuid: UUID = UUID1) -> bytes:
    """``(dev_id, cluster, mask)`` each, blocks of 0x5a for every mask bit."""
    words = [pack_blockinfo(d, c, m) for d, c, m in infos]
    blocks = sum(m.bit_count() for _, _, m in infos)
    return bytes(build_extent_header(uuid, words, blocks)) + b"\x5a" * 4096 * blocks


def _full(dev: int = 1, clusters: int = 3) -> bytes:
    return _extent([(dev, c, 0xFFFF) for c in range(clusters)])


def _error(data: bytes) -> str:
    with pytest.raises(ArchiveError) as e:
        read_all(data)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_good_hand_built_archive_reads() -> None:
    read_all(_header() + _full())


def test_wrong_magic_in_the_header() -> None:
    data = bytearray(_header() + _full())
    data[3] = 1  # VMA\1: not VMA, so not ours either
    with pytest.raises(ArchiveError, match=r"not a backup-agent archive|magic"):
        read_all(bytes(data))
    with pytest.raises(ArchiveError, match="wrong magic"):
        VmaReader(io.BytesIO(bytes(data)))


def test_bad_header_md5() -> None:
    data = bytearray(_header() + _full())
    data[12288 + 30] ^= 1  # inside the blob buffer
    assert "fails its MD5" in _error(bytes(data))


def test_header_size_out_of_range() -> None:
    data = bytearray(_header())
    data[56:60] = (1 << 31).to_bytes(4, "big")
    assert "header size" in _error(bytes(data))


def test_extent_md5_mismatch() -> None:
    data = bytearray(_header() + _full())
    data[len(_header()) + 45] ^= 1  # a blockinfo byte
    assert "fails its MD5" in _error(bytes(data))


def test_extent_of_another_archive() -> None:
    other = UUID(int=5)
    msg = _error(_header() + _extent([(1, c, 0xFFFF) for c in range(3)], other))
    assert "another archive" in msg


def test_truncated_extent() -> None:
    data = _header() + _full()
    assert "truncated" in _error(data[:-1000])
    assert "truncated" in _error(data[: len(_header()) + 300])  # inside its header


def test_cluster_for_an_undeclared_device() -> None:
    msg = _error(_header() + _full() + _extent([(7, 0, 1)]))
    assert "device 7" in msg and "does not declare" in msg


def test_device_with_no_data() -> None:
    head = _header([(1, "drive-scsi0", 3 * CLUSTER_SIZE), (2, "drive-scsi1", 4096)])
    msg = _error(head + _full())
    assert "'drive-scsi1' has no data" in msg


def test_missing_cluster() -> None:
    msg = _error(_header() + _extent([(1, 0, 0xFFFF), (1, 2, 0)]))
    assert "missing cluster 1 (1 of 3 missing in all)" in msg


def test_duplicate_cluster() -> None:
    assert "appears twice" in _error(_header() + _full() + _extent([(1, 1, 0)]))


def test_cluster_past_the_device_end() -> None:
    assert "past its end" in _error(_header() + _full() + _extent([(1, 3, 0)]))


def test_blocks_past_the_device_end() -> None:
    head = _header([(1, "drive-scsi0", 8192)])
    assert "past its end" in _error(head + _extent([(1, 0, 0b111)]))


def test_zero_padding_after_the_end_is_tape_padding() -> None:
    reader, _ = read_all(_header() + _full() + bytes(10000))
    assert reader.archive_len == len(_header() + _full())


def test_data_after_the_end() -> None:
    msg = _error(_header() + _full() + bytes(600) + b"\1")
    assert "after the end" in msg and str(len(_header() + _full()) + 600) in msg


def test_garbage_in_place_of_an_extent() -> None:
    assert "wrong magic" in _error(_header() + _full() + b"\1" * 512)


# -- hostile input: any damage is an ArchiveError, never another exception -----------------


@pytest.mark.slow
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 26111), st.integers(0, 255)), min_size=1,
                max_size=8),
       st.integers(0, 26112))
def test_damaged_fixture_is_read_or_refused_cleanly(flips: list[tuple[int, int]],
                                                    cut: int) -> None:
    data = bytearray(tiny())
    for pos, value in flips:
        data[pos] = value
    try:
        drain(bytes(data[:cut]))
    except ArchiveError as e:
        assert "\n" not in str(e)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=2048))
def test_random_extents_after_a_good_header(tail: bytes) -> None:
    try:
        drain(_header() + tail)
    except ArchiveError as e:
        assert "\n" not in str(e)


def _reseal(data: bytearray) -> None:
    """Recompute the fixture's MD5s after damage, so that the checks behind them run."""
    import hashlib

    for at, size, md5_at in ((0, 12800, 32), (0x3200, 512, 24), (0x5400, 512, 24)):
        if len(data) >= at + size:
            data[at + md5_at : at + md5_at + 16] = bytes(16)
            data[at + md5_at : at + md5_at + 16] = hashlib.md5(data[at : at + size]).digest()


@pytest.mark.slow
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from([*range(0, 64), *range(0x7FC, 0x800),
                                           *range(0xBFC, 0xC00), *range(0x1020, 0x1030),
                                           *range(0x3000, 0x3060), *range(0x3200, 0x3240),
                                           *range(0x5400, 0x5430)]),
                          st.integers(0, 255)), min_size=1, max_size=4),
       st.integers(0, 26112 + 600))
def test_damage_behind_valid_md5s_is_read_or_refused_cleanly(flips: list[tuple[int, int]],
                                                             cut: int) -> None:
    data = bytearray(tiny()) + bytearray(600)
    for pos, value in flips:
        data[pos] = value
    _reseal(data)
    try:
        drain(bytes(data[:cut]))
    except ArchiveError as e:
        assert "\n" not in str(e)


def test_device_name_that_would_escape_the_restore_directory() -> None:
    head = _header([(1, "../../etc/passwd", 3 * CLUSTER_SIZE)])
    assert "not allowed as a file name" in _error(head + _full())


@pytest.mark.slow
def test_scattered_clusters_of_a_huge_device_cost_little_memory() -> None:
    """Every other cluster of a 256 TiB device: a bitmap whose pages the kernel supplies as
    they are touched, not Python objects per cluster (a set of ranges took 86 bytes for each
    of these 29,500 clusters, 2.5 MB, on top of the reader's 1.6 MB of buffers)."""
    import tracemalloc

    head = _header([(1, "big", 1 << 48)])  # 2^32 clusters
    data = head + b"".join(_extent([(1, 2 * (59 * e + i), 0) for i in range(59)])
                           for e in range(500))
    tracemalloc.start()
    try:
        reader = VmaReader(io.BytesIO(data))
        with pytest.raises(ArchiveError) as e:
            for _ in reader.records():
                pass
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "missing cluster 1 " in str(e.value)
    assert peak < 2.5 * 1024 * 1024
