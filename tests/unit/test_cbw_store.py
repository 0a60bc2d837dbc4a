"""The copy-before-write cluster store: memory, spool, full, trim, extents, subscribers, threads."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cbw.control import ControlClient, ControlServer
from agent.cbw.plugin import CbwTarget, parse_size
from agent.cbw.store import ClusterStore, Extent, Misaligned, NotStored, StoreError, StoreFull
from agent.errors import AgentError, InvalidArgument

K = 64 * 1024
MiB = 1024 * 1024


def pat(byte: int, n: int = 1) -> bytes:
    return bytes([byte]) * (K * n)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ClusterStore]:
    s = ClusterStore(2 * K, str(tmp_path), 2 * K, size=64 * MiB)
    yield s
    s.close()


def test_memory_then_spool_then_full(store: ClusterStore, tmp_path: Path) -> None:
    store.write(0, pat(1, 2))
    assert store.stats().memory_used == 2 * K and store.stats().spool_used == 0
    store.write(4 * K, pat(2))
    store.write(8 * K, pat(3))
    st = store.stats()
    assert (st.memory_used, st.spool_used, st.bytes_spilled) == (2 * K, 2 * K, 2 * K)
    with pytest.raises(StoreFull, match="store is full"):
        store.write(16 * K, pat(4))
    assert store.stats().full_errors == 1
    assert store.read(0, 2 * K) == pat(1, 2)
    assert store.read(4 * K, K) == pat(2)
    assert store.read(8 * K, K) == pat(3)
    assert os.listdir(tmp_path) == []  # the spool file is unlinked from the start


def test_full_write_of_several_clusters_stores_nothing(store: ClusterStore) -> None:
    store.write(0, pat(1, 3))
    with pytest.raises(StoreFull):
        store.write(MiB, pat(2, 2))
    assert store.stats().clusters_stored == 3
    assert store.extents(MiB, 2 * K) == [Extent(MiB, 2 * K, False, False)]


def test_trim_frees_and_reuses_spool_slots(store: ClusterStore) -> None:
    store.write(0, pat(1, 4))  # 2 in memory, 2 spilled
    assert store.trim(2 * K, 2 * K) == 2  # the spilled ones
    assert store.stats().spool_used == 0
    store.write(10 * K, pat(5, 2))  # spool slots again
    assert store.read(10 * K, 2 * K) == pat(5, 2)
    assert store.trim(K, K) == 1  # a memory cluster
    store.write(20 * K, pat(6))  # memory again
    st = store.stats()
    assert (st.memory_used, st.spool_used, st.clusters_trimmed) == (2 * K, 2 * K, 3)
    with pytest.raises(NotStored):
        store.read(K, 10)


def test_trim_rounds_inward(store: ClusterStore) -> None:
    store.write(0, pat(1, 3))
    assert store.trim(1, 3 * K - 2) == 1  # only the middle cluster lies wholly inside
    assert store.read(0, K) == pat(1)
    assert store.read(2 * K, K) == pat(1)
    with pytest.raises(NotStored, match=f"offset {K}"):
        store.read(0, 3 * K)
    assert store.trim(0, 1 << 40) == 2  # huge ranges walk the stored clusters, not the range


def test_read_unstored_and_partial_reads(store: ClusterStore) -> None:
    with pytest.raises(NotStored, match="no data stored at offset 0"):
        store.read(0, 512)
    store.write(K, pat(7) + pat(8))
    assert store.read(K + 100, K) == pat(7)[100:] + pat(8)[:100]


@pytest.mark.parametrize(
    ("offset", "length"), [(512, K), (0, K - 512), (K, K + 4096), (-K, K), (64 * MiB, K)]
)
def test_unaligned_writes_rejected(store: ClusterStore, offset: int, length: int) -> None:
    with pytest.raises(Misaligned, match="copy-before-write target: write"):
        store.write(offset, bytes(length) if length > 0 else b"")
    assert store.stats().clusters_stored == 0


def test_short_last_cluster(tmp_path: Path) -> None:
    size = 10 * K + 4096
    s = ClusterStore(MiB, None, 0, size=size)
    s.write(10 * K, b"\x09" * 4096)
    assert s.read(10 * K, 4096) == b"\x09" * 4096
    with pytest.raises(Misaligned):
        s.write(9 * K, b"\x09" * 4096)
    with pytest.raises(NotStored):
        s.read(10 * K, 4097)
    assert s.extents(9 * K, K + 4096) == [
        Extent(9 * K, K, False, False), Extent(10 * K, 4096, True, False)
    ]
    assert s.trim(10 * K, 4096) == 1  # up to the end covers the short cluster whole
    assert s.stats().memory_used == 0


def test_zero_clusters_cost_no_memory(store: ClusterStore) -> None:
    store.write(0, bytes(K) + pat(3) + bytes(K))
    store.write_zeroes(MiB, MiB)
    st = store.stats()
    assert st.memory_used == K and st.zero_clusters_copied == 18 and st.clusters_copied == 19
    assert store.read(MiB + 5, 100) == bytes(100)
    assert store.extents(0, 3 * K) == [
        Extent(0, K, True, True), Extent(K, K, True, False), Extent(2 * K, K, True, True)
    ]


def test_extents(store: ClusterStore) -> None:
    store.write(2 * K, pat(1, 2))
    store.write(6 * K, pat(2))
    assert store.extents(0, 8 * K) == [
        Extent(0, 2 * K, False, False),
        Extent(2 * K, 2 * K, True, False),
        Extent(4 * K, 2 * K, False, False),
        Extent(6 * K, K, True, False),
        Extent(7 * K, K, False, False),
    ]
    assert store.extents(2 * K + 10, 100) == [Extent(2 * K + 10, 100, True, False)]
    # a whole-disk query with few clusters stored
    whole = store.extents(0, 64 * MiB)
    assert sum(e.length for e in whole) == 64 * MiB and len(whole) == 5


def test_bad_spool_dir_and_closed(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"spool directory .*missing"):
        ClusterStore(K, str(tmp_path / "missing"), K)
    s = ClusterStore(K, None, 0)
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.write(0, pat(1))


def test_subscription_backlog_then_live_filtered_by_trim(store: ClusterStore) -> None:
    store.write(0, pat(1, 2))
    sub = store.subscribe()
    assert sub.get(0) == [(0, 2 * K)]
    store.write(MiB, pat(2))
    store.write(2 * MiB, pat(3))
    store.trim(MiB, K)  # trimmed before delivery: not announced
    assert sub.get(0) == [(2 * MiB, K)]
    assert sub.get(0.01) == []
    sub.close()
    assert sub.get(0) is None
    store.write(3 * MiB, pat(4))
    assert not store._journal  # nothing journaled without subscribers


def test_concurrent_writers_readers_trimmers(tmp_path: Path) -> None:
    s = ClusterStore(32 * K, str(tmp_path), 64 * K, size=1024 * MiB)
    sub = s.subscribe()
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(200):
                off = (n * 1000 + i) * K
                s.write(off, pat((n + i) % 255 + 1))
                assert s.read(off, K) == pat((n + i) % 255 + 1)
                assert s.trim(off, K) == 1
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    st = s.stats()
    assert (st.clusters_copied, st.clusters_trimmed, st.clusters_stored) == (1600, 1600, 0)
    assert st.memory_used == 0 and st.spool_used == 0
    assert sub.get(0) == []  # all trimmed before delivery
    sub.close()
    s.close()


def test_control_socket_stats_and_an_unknown_command(short_tmp: Path) -> None:
    s = ClusterStore(2 * MiB, None, 0)
    s.write(0, pat(1))
    s.write(MiB, pat(2, 16))
    server = ControlServer(str(short_tmp / "ctl"), s)
    server.start()
    try:
        with ControlClient(str(short_tmp / "ctl")) as client:
            assert client.stats()["clusters_copied"] == 17
        with socket.socket(socket.AF_UNIX) as sock:  # the old read-back protocol is gone
            sock.connect(str(short_tmp / "ctl"))
            sock.sendall(b"events\n")
            assert sock.makefile("rb").readline() == b"E unknown command 'events'\n"
    finally:
        server.close()
        s.close()
    assert not (short_tmp / "ctl").exists()


def test_control_client_without_server(short_tmp: Path) -> None:
    with pytest.raises(AgentError, match="is the plugin running"):
        ControlClient(str(short_tmp / "nothing")).stats()


def test_plugin_config() -> None:
    assert parse_size("size", "64M") == 64 * MiB
    assert parse_size("size", "2GiB") == 2 << 30
    assert parse_size("size", " 4 kb ") == 4 << 10
    assert parse_size("size", "512") == 512
    assert parse_size("size", "1T") == 1 << 40
    for bad in ("lots", "", "M", "1.5G", "12x", "-1", "64 MM"):
        with pytest.raises(InvalidArgument, match="is not a size"):
            parse_size("memory", bad)
    with pytest.raises(InvalidArgument, match="memory='lots' is not a size"):
        parse_size("memory", "lots")
    t = CbwTarget()
    with pytest.raises(InvalidArgument, match="unknown parameter 'colour'"):
        t.set("colour", "red")
    with pytest.raises(InvalidArgument, match="size=SIZE is required"):
        t.complete()
    t.set("size", "1M")
    t.set("memory", "128K")
    t.complete()
    t.pwrite(0, bytearray(pat(9)))
    assert t.pread(0, K) == pat(9)
    t.stop()
