"""The copies' feed: the store's side (take, data runs, one wake per batch), the control
socket's ``feed`` protocol, and the agent's CopyFeed with the tracker's claims."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cbw.control import ControlServer
from agent.cbw.feed import CopyFeed, FeedClient
from agent.cbw.store import ClusterStore, Extent
from agent.errors import AgentError
from agent.tracker import DeviceTracker

K = 64 * 1024
MiB = 1024 * 1024


def pat(byte: int, n: int = 1) -> bytes:
    return bytes([byte]) * (K * n)


def wait_for(cond: object, what: str) -> None:
    deadline = time.monotonic() + 10
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


# -- the store ----------------------------------------------------------------------------


def test_take_frees_whole_clusters_and_keeps_them_allocated(tmp_path: Path) -> None:
    s = ClusterStore(2 * K, str(tmp_path), 4 * K, size=64 * MiB)
    s.write(0, pat(1, 4))  # two in memory, two spilled
    s.write(8 * K, pat(2))
    assert s.take(K // 2, 2 * K) == 1  # rounded inward: cluster 1 only
    assert s.take(2 * K, 2 * K) == 2  # the spilled ones
    st = s.stats()
    assert (st.clusters_taken, st.clusters_trimmed, st.clusters_stored) == (3, 0, 2)
    assert (st.memory_used, st.spool_used) == (K, K)
    assert s.trim(8 * K, K) == 1
    # Taken clusters stay allocated for block status (QEMU asserts a copied cluster is
    # there); a trimmed one is a hole again.
    assert s.extents(0, 9 * K) == [Extent(0, 4 * K, True, False),
                                   Extent(4 * K, 5 * K, False, False)]
    s.close()


def test_data_runs_skip_gaps_split_zeros_and_respect_the_limit() -> None:
    s = ClusterStore(64 * MiB, None, 0, size=64 * MiB)
    s.write(0, pat(1, 3) + bytes(2 * K) + pat(2))
    s.trim(K, K)
    runs = s.data_runs(0, 10 * K, 2 * K)
    assert [(o, n, None if c is None else b"".join(c)) for o, n, c in runs] == [
        (0, K, pat(1)), (2 * K, K, pat(1)), (3 * K, 2 * K, None), (5 * K, K, pat(2))]
    s.write(MiB, pat(3, 5))
    assert [(o, n) for o, n, _ in s.data_runs(MiB, 5 * K, 2 * K)] == [
        (MiB, 2 * K), (MiB + 2 * K, 2 * K), (MiB + 4 * K, K)]
    assert s.stats().bytes_fed == 3 * K + 5 * K  # zeros are not data
    s.close()


def test_the_last_short_cluster_is_fed_whole() -> None:
    s = ClusterStore(MiB, None, 0, size=2 * K + 4608)
    s.write(2 * K, b"\x07" * 4608)
    assert [(o, n, b"".join(c or [])) for o, n, c in s.data_runs(0, 2 * K + 4608, MiB)] == [
        (2 * K, 4608, b"\x07" * 4608)]
    s.close()


def test_a_burst_of_writes_wakes_subscribers_once() -> None:
    s = ClusterStore(64 * MiB, None, 0, size=64 * MiB)
    sub = s.subscribe()
    wakes = 0
    notify = s._changed.notify_all

    def counted() -> None:
        nonlocal wakes
        wakes += 1
        notify()

    s._changed.notify_all = counted  # type: ignore[method-assign]
    got: list[tuple[int, int]] = []
    waiting = threading.Thread(target=lambda: got.extend(sub.get(10) or []))
    waiting.start()
    wait_for(lambda: s._changed._waiters, "the subscriber waits")  # type: ignore[attr-defined]
    for i in range(50):
        s.write(i * K, pat(i + 1))
    waiting.join(10)
    assert wakes == 1
    assert got[0] == (0, K)  # woken by the first write; the others come in the next batch
    rest = sub.get(0) or []
    assert len(got) + len(rest) == 50
    s.write(10 * MiB, pat(9))  # nobody waits: no wake is needed, and a later wait sees it
    assert sub.get(0) == [(10 * MiB, K)]
    sub.close()
    s.close()


# -- the feed protocol --------------------------------------------------------------------


@pytest.fixture
def served(short_tmp: Path) -> Iterator[tuple[ClusterStore, str]]:
    s = ClusterStore(64 * MiB, None, 0, size=64 * MiB)
    server = ControlServer(str(short_tmp / "ctl"), s)
    server.start()
    yield s, str(short_tmp / "ctl")
    server.close()
    s.close()


def receive(client: FeedClient) -> tuple[bytes, int, int, bytes]:
    header = client.next()
    assert header is not None
    kind, offset, length = header
    data = b""
    if kind == b"D":
        buf = bytearray(length)
        client.read_into(memoryview(buf))
        data = bytes(buf)
    return kind, offset, length, data


def test_feed_sends_stored_data_once_and_frees_what_is_acknowledged(
    served: tuple[ClusterStore, str]
) -> None:
    s, path = served
    s.write(0, pat(1, 2))  # before the client: the backlog
    client = FeedClient(path)
    try:
        assert receive(client) == (b"D", 0, 2 * K, pat(1, 2))
        s.write(MiB, pat(2, 20))  # 20 clusters: runs of at most 1 MiB
        s.write_zeroes(4 * MiB, 3 * K)
        assert receive(client) == (b"D", MiB, 16 * K, pat(2, 16))
        assert receive(client) == (b"D", MiB + 16 * K, 4 * K, pat(2, 4))
        assert receive(client)[:3] == (b"Z", 4 * MiB, 3 * K)
        client.ack([(0, K + 100), (MiB, MiB + 20 * K)])  # a part of cluster 1: kept
        client.flush()
        wait_for(lambda: s.stats().clusters_taken == 21, "the acknowledgements arrive")
        assert s.read(K, K) == pat(1)
        assert s.stats().clusters_stored == 1 + 3
    finally:
        client.close()


def test_feed_leaves_out_what_was_trimmed_before_it_was_sent(
    served: tuple[ClusterStore, str]
) -> None:
    s, path = served
    s.write(0, pat(1, 3))
    s.trim(K, K)
    client = FeedClient(path)
    try:
        assert receive(client) == (b"D", 0, K, pat(1))
        assert receive(client) == (b"D", 2 * K, K, pat(1))
    finally:
        client.close()


def test_feed_ends_when_the_plugin_goes(short_tmp: Path) -> None:
    s = ClusterStore(MiB, None, 0, size=MiB)
    server = ControlServer(str(short_tmp / "ctl"), s)
    server.start()
    client = FeedClient(str(short_tmp / "ctl"))
    server.close()
    s.close()
    assert client.next() is None
    client.close()
    with pytest.raises(AgentError, match="is the plugin running"):
        FeedClient(str(short_tmp / "ctl"))


# -- the agent's side: claims, acknowledgements, back-pressure ----------------------------


class Sink:
    """The engine's push interface over a real tracker, records kept in memory; at most
    ``budget`` buffers out until the test returns them."""

    def __init__(self, size: int, budget: int = 1000) -> None:
        self.tracker = DeviceTracker(size, K, lambda off, n: None)
        self.records: dict[int, bytes] = {}
        self.batches: list[int] = []  # runs per push
        self.budget = threading.Semaphore(budget)

    def push_buffer(self, n: int, block: bool = True) -> bytearray | None:
        return bytearray(n) if self.budget.acquire(blocking=block) else None

    def push(self, device_id: int, parts: list[tuple[int, int]], buf: bytearray | None
             ) -> list[tuple[int, int]]:
        owned: list[tuple[int, int]] = []
        pos = 0
        for offset, length in parts:
            for a, b in self.tracker.pushed(offset, length):
                at = pos + a - offset
                self.records[a] = bytes(b - a) if buf is None else bytes(buf[at:at + b - a])
                owned.append((a, b))
            pos += length
        self.batches.append(len(parts))
        return owned


def test_copy_feed_acknowledges_only_what_it_claimed(served: tuple[ClusterStore, str]) -> None:
    s, path = served
    sink = Sink(64 * MiB)
    sink.tracker.claim(K + 4096, 3 * K)  # the sweep read these first, through QEMU
    failed: list[BaseException] = []
    feed = CopyFeed(sink, {0: path}, 2 * MiB, failed.append)
    try:
        s.write(0, pat(1, 4))
        s.write_zeroes(MiB, K)
        wait_for(lambda: s.stats().clusters_taken == 3, "clusters 0, 3 and the zero go")
    finally:
        feed.close()
    assert failed == []
    assert sink.records == {0: pat(1, 2)[:K + 4096], 3 * K: pat(1), MiB: bytes(K)}
    # Clusters 1 and 2 stay for the sweep's reads through QEMU (1 is only partly pushed:
    # its first 4 KiB went to the archive from the feed, the rest comes from the sweep).
    assert s.stats().clusters_stored == 2
    assert s.read(K, 2 * K) == pat(1, 2)


def test_a_slow_agent_holds_the_feed_back_and_acknowledges_what_it_has(
    served: tuple[ClusterStore, str]
) -> None:
    s, path = served
    sink = Sink(64 * MiB, budget=3)
    failed: list[BaseException] = []
    feed = CopyFeed(sink, {0: path}, K, failed.append)  # one cluster per buffer
    try:
        for i in range(10):
            s.write(i * MiB, pat(i + 1))  # QEMU's copies never wait for the agent
        # Three pushed, and acknowledged before the feed waits for a fourth buffer.
        wait_for(lambda: s.stats().clusters_taken == 3, "three are taken")
        assert s.stats().clusters_stored == 7
        for _ in range(7):
            sink.budget.release()
        wait_for(lambda: s.stats().clusters_taken == 10, "the rest follow")
    finally:
        feed.close()
    assert failed == []
    assert sorted(sink.records) == [i * MiB for i in range(10)]


def test_copy_feed_reports_a_plugin_that_goes_away(short_tmp: Path) -> None:
    s = ClusterStore(MiB, None, 0, size=MiB)
    server = ControlServer(str(short_tmp / "ctl"), s)
    server.start()
    failed: list[BaseException] = []
    feed = CopyFeed(Sink(MiB), {0: str(short_tmp / "ctl")}, K, failed.append)
    server.close()
    s.close()
    wait_for(lambda: failed, "the feed fails")
    feed.close()
    assert "the plugin closed the stream" in str(failed[0])


def test_copy_feed_hands_runs_that_arrive_together_over_in_one_push(
    served: tuple[ClusterStore, str]
) -> None:
    s, path = served
    for i in range(40):
        s.write(i * MiB, pat(i + 1))  # before the feed starts: all in its first batch
    sink = Sink(64 * MiB)
    failed: list[BaseException] = []
    feed = CopyFeed(sink, {0: path}, 2 * MiB, failed.append)
    try:
        wait_for(lambda: s.stats().clusters_taken == 40, "all are taken")
    finally:
        feed.close()
    assert failed == []
    assert sorted(sink.records) == [i * MiB for i in range(40)]
    assert sink.records[7 * MiB] == pat(8)
    assert sum(sink.batches) == 40 and len(sink.batches) < 40  # 2 MiB buffers: 32 a push
