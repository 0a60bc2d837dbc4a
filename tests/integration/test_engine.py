"""The backup engine under concurrency: every backup is restored and compared byte for byte.

Real servers only (qemu-nbd, nbdkit), real libnbd connections, real archives. Each backup
runs in a thread with a generous hang guard, so an engine that stops making progress fails
its test (with every thread's stack) instead of blocking the suite.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

import nbd
import pytest

from agent.archive.reader import ArchiveReader, DataRecord
from agent.backup import BackupJob, run_backup
from agent.engine import EngineOptions
from agent.pipeline import ProgressFn
from agent.restore import RestoreOptions, restore, to_dir
from agent.writing import BackupSummary
from tests.integration.conftest import NbdServerFactory, make_image, qemu_img_compare

pytestmark = pytest.mark.integration

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

#: Seconds a backup or restore may run before the test calls it a hang.
HANG_GUARD = 60.0

T = TypeVar("T")


# -- helpers (also used by test_engine_faults.py) -----------------------------------------


def thread_stacks() -> str:
    """Every live thread's name and stack, for a hang report."""
    names = {t.ident: t.name for t in threading.enumerate()}
    out = []
    for ident, frame in sys._current_frames().items():
        out.append(f"--- thread {names.get(ident, ident)}\n")
        out.extend(traceback.format_stack(frame))
    return "".join(out)


def guarded(what: str, fn: Callable[[], T], timeout: float = HANG_GUARD) -> T:
    """Run ``fn`` in a daemon thread; fail the test if it has not returned in ``timeout``."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=run, name=f"test-{what}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        pytest.fail(f"{what} did not finish within {timeout:.0f} s: it hangs.\n"
                    f"{thread_stacks()}", pytrace=False)
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def backup(
    out: Path,
    sources: Sequence[tuple[str, str]] = (),
    images: Sequence[tuple[str, str]] = (),
    progress: ProgressFn | None = None,
    **engine: object,
) -> BackupSummary:
    """``run_backup`` into the file ``out``, under the hang guard."""
    job = BackupJob(output=str(out), sources=list(sources), images=list(images),
                    engine=EngineOptions(**engine))  # type: ignore[arg-type]
    return guarded("backup", lambda: run_backup(job, progress))


def restore_to(archive: Path, directory: Path) -> Path:
    """Restore every device of ``archive`` as raw files in ``directory`` (created)."""
    directory.mkdir(exist_ok=True)
    opts = RestoreOptions()

    def run() -> None:
        with open(archive, "rb") as f:
            restore(f, to_dir(directory, "raw", None, opts), opts)

    guarded("restore", run)
    return directory


def scan(archive: Path) -> tuple[ArchiveReader, list[tuple[str, bool, int, int]]]:
    """Read an archive to its end (every digest checked): the reader (with its totals) and
    every DATA/ZERO record as ``(device, is_data, offset, length)`` in archive order."""
    with open(archive, "rb") as f:
        reader = ArchiveReader(f)
        recs = [(r.device.name, isinstance(r, DataRecord), r.offset, r.length)
                for r in reader.records()]
    assert reader.end is not None
    return reader, recs


def export_size(uri: str) -> int:
    h = nbd.NBD()
    try:
        h.connect_uri(uri)
        return int(h.get_size())
    finally:
        with contextlib.suppress(nbd.Error):
            h.shutdown()


def allocation(uri: str) -> list[tuple[int, int, int]]:
    """The export's ``base:allocation`` map as ``(offset, length, flags)``, merged runs."""
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    try:
        h.connect_uri(uri)
        size = h.get_size()
        out: list[tuple[int, int, int]] = []
        got: list[int] = []

        def cb(ctx: str, off: int, entries: list[int], err: object) -> int:
            if ctx == nbd.CONTEXT_BASE_ALLOCATION:
                got.extend(entries)
            return 0

        pos = 0
        while pos < size:
            got.clear()
            h.block_status(size - pos, pos, cb)
            for i in range(0, len(got), 2):
                ln, flags = got[i], got[i + 1]
                ln = min(ln, size - pos)
                if out and out[-1][2] == flags and out[-1][0] + out[-1][1] == pos:
                    out[-1] = (out[-1][0], out[-1][1] + ln, flags)
                else:
                    out.append((pos, ln, flags))
                pos += ln
        return out
    finally:
        with contextlib.suppress(nbd.Error):
            h.shutdown()


def sparse_raw(
    path: Path,
    size: int,
    data: Iterable[tuple[int, int]] = (),
    zeros: Iterable[tuple[int, int]] = (),
    seed: int = 1,
) -> Path:
    """A sparse raw file of ``size`` bytes: random bytes written over ``data`` ranges,
    zero bytes *written* (allocated, not holes) over ``zeros`` ranges, holes elsewhere."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, ln in data:
            f.seek(off)
            for p in range(0, ln, 16 * MiB):
                f.write(rng.randbytes(min(16 * MiB, ln - p)))
        for off, ln in zeros:
            f.seek(off)
            f.write(bytes(ln))
    return path


def assert_same_bytes(source: Path, restored: Path, size: int) -> None:
    """``restored`` is exactly ``size`` bytes: ``source``'s bytes, then zeros (a server may
    round a raw file's size up: the tail it adds reads as zeros)."""
    assert restored.stat().st_size == size
    step = 4 * MiB
    with open(source, "rb") as a, open(restored, "rb") as b:
        for off in range(0, size, step):
            want = a.read(step)
            got = b.read(step)
            want += bytes(len(got) - len(want))
            if want != got:
                first = next(i for i in range(len(got)) if want[i] != got[i])
                pytest.fail(f"{restored} differs from {source} at byte {off + first}")


def assert_restored(source: Path, restored: Path, size: int) -> None:
    """Like :func:`assert_same_bytes`; large (sparse) files are compared by qemu-img."""
    if size > 64 * MiB:
        assert restored.stat().st_size == size
        assert qemu_img_compare(source, "raw", restored, "raw")
    else:
        assert_same_bytes(source, restored, size)


def serve_raw(nbd_server: NbdServerFactory, image: Path, connections: int) -> str:
    return nbd_server.qemu_nbd(image, "raw", shared=connections + 1).uri


# -- many connections, multi-conn off ------------------------------------------------------


@pytest.fixture
def mixed_qcow2(tmp_path: Path) -> Path:
    """24 MiB qcow2: patterned data, write-zeroes, a discard, allocated zeros, holes."""
    ops = [("write", 0x10 + i, i * 1536 * KiB, 640 * KiB) for i in range(16)]
    ops += [("zero", 4 * MiB, 1 * MiB), ("discard", 9 * MiB, 512 * KiB),
            ("write", 0, 12 * MiB, 1 * MiB), ("write", 0xEE, 24 * MiB - 4 * KiB, 4 * KiB)]
    return make_image(tmp_path / "mixed.qcow2", "qcow2", 24 * MiB, ops)  # type: ignore[arg-type]


@pytest.mark.parametrize("connections", [1, 2, 8, 16])
def test_many_connections(
    connections: int, mixed_qcow2: Path, tmp_path: Path, nbd_server: NbdServerFactory
) -> None:
    server = nbd_server.qemu_nbd(mixed_qcow2, "qcow2", shared=connections + 1)
    arc = tmp_path / "b.arc"
    summary = backup(arc, [("disk", server.uri)], connections=connections,
                     request_size=256 * KiB, memory=4 * MiB)
    assert summary.progress.done == 24 * MiB
    reader, _ = scan(arc)
    assert reader.data_bytes + reader.zero_bytes == 24 * MiB
    out = restore_to(arc, tmp_path / "r")
    assert qemu_img_compare(mixed_qcow2, "qcow2", out / "disk.raw", "raw")


def test_reads_spread_over_connections_exactly_once(
    tmp_path: Path, nbd_server: NbdServerFactory
) -> None:
    """nbdkit's log filter shows what the agent asked: 8 connections, reads on several of
    them, and every allocated byte read exactly once (holes never read)."""
    size = 24 * MiB
    data = [(0, 5 * MiB), (6 * MiB, 3 * MiB + 64 * KiB), (16 * MiB, 8 * MiB - 4 * KiB)]
    image = sparse_raw(tmp_path / "d.raw", size, data=data)
    log = tmp_path / "nbdkit.log"
    server = nbd_server.nbdkit(["file", str(image), f"logfile={log}"], filters=["log"],
                               readonly=True)
    arc = tmp_path / "b.arc"
    backup(arc, [("d", server.uri)], connections=8, request_size=128 * KiB, memory=4 * MiB)
    server.stop()
    connects: set[str] = set()
    reads: list[tuple[int, int]] = []
    readers: set[str] = set()
    for line in log.read_text().splitlines():
        m = re.search(r"connection=(\d+) (Connect|Read) (.*)", line)
        if m is None:
            continue
        conn, what, rest = m.groups()
        if what == "Connect":
            connects.add(conn)
        else:
            f = dict(kv.split("=", 1) for kv in rest.split() if "=" in kv)
            reads.append((int(f["offset"], 16), int(f["count"], 16)))
            readers.add(conn)
    assert len(connects) == 8
    assert len(readers) >= 2, f"all reads went through connection(s) {readers}"
    reads.sort()
    merged: list[tuple[int, int]] = []
    for off, ln in reads:
        assert not merged or off >= merged[-1][0] + merged[-1][1], f"read twice at {off}"
        if merged and merged[-1][0] + merged[-1][1] == off:
            merged[-1] = (merged[-1][0], merged[-1][1] + ln)
        else:
            merged.append((off, ln))
    assert merged == data
    out = restore_to(arc, tmp_path / "r")
    assert_same_bytes(image, out / "d.raw", size)


def test_server_without_multi_conn(
    mixed_qcow2: Path, tmp_path: Path, nbd_server: NbdServerFactory
) -> None:
    """qemu-nbd --shared=1 takes ONE client and advertises no multi-conn: asked for 8
    connections, the agent must make do with one (a second would never be answered)."""
    server = nbd_server.qemu_nbd(mixed_qcow2, "qcow2", shared=1)
    arc = tmp_path / "b.arc"
    backup(arc, [("disk", server.uri)], connections=8, request_size=256 * KiB)
    out = restore_to(arc, tmp_path / "r")
    assert qemu_img_compare(mixed_qcow2, "qcow2", out / "disk.raw", "raw")
    assert server.running()


def test_multi_conn_off_means_one_connection(
    tmp_path: Path, nbd_server: NbdServerFactory
) -> None:
    """nbdkit with multi-conn turned off (and no client limit): the log shows that the
    agent, asked for 8 connections, opened exactly one."""
    size = 8 * MiB
    image = sparse_raw(tmp_path / "d.raw", size, data=[(0, 3 * MiB), (5 * MiB, 1 * MiB)])
    log = tmp_path / "nbdkit.log"
    server = nbd_server.nbdkit(
        ["file", str(image), "multi-conn-mode=disable", f"logfile={log}"],
        filters=["multi-conn", "log"], readonly=True,
    )
    arc = tmp_path / "b.arc"
    backup(arc, [("d", server.uri)], connections=8, request_size=256 * KiB)
    server.stop()
    connects = [ln for ln in log.read_text().splitlines() if re.search(r" Connect ", ln)]
    assert len(connects) == 1, connects
    out = restore_to(arc, tmp_path / "r")
    assert_same_bytes(image, out / "d.raw", size)


# -- request sizes, memory budget, block-status window --------------------------------------


@pytest.mark.parametrize(
    ("request_size", "memory", "status_window"),
    [
        (4 * KiB, 128 * MiB, 64 * KiB),
        (4 * KiB, 4 * KiB, 64 * KiB),
        (64 * KiB, 4 * KiB, 64 * KiB),
        (64 * KiB, 4 * KiB, 1024 * MiB),
        (32 * MiB, 4 * KiB, 1024 * MiB),
        (32 * MiB, 128 * MiB, 64 * KiB),
        (32 * MiB, 128 * MiB, 1024 * MiB),
    ],
    ids=["4K", "4K-mem4K", "64K-mem4K", "64K-mem4K-bigwindow", "32M-mem4K", "32M-window64K",
         "32M"],
)
def test_request_sizes_and_budget(
    request_size: int, memory: int, status_window: int, tmp_path: Path,
    nbd_server: NbdServerFactory,
) -> None:
    size = 40 * MiB + 12 * KiB
    image = sparse_raw(tmp_path / "d.raw", size,
                       data=[(0, 3 * MiB + 4 * KiB), (5 * MiB - 4 * KiB, 2 * MiB),
                             (34 * MiB, 40 * KiB), (size - 8 * KiB, 8 * KiB)],
                       zeros=[(8 * MiB, 1 * MiB + 4 * KiB)])
    uri = serve_raw(nbd_server, image, 4)
    arc = tmp_path / "b.arc"
    summary = backup(arc, [("d", uri)], connections=4, request_size=request_size,
                     memory=memory, status_window=status_window)
    # The budget may be overshot by one request (one read larger than the budget goes alone).
    assert summary.peak_buffer <= memory + request_size
    reader, recs = scan(arc)
    assert reader.devices[0].size == size
    # No record longer than a request; allocated zeros are recorded as ZERO, never as DATA.
    assert all(ln <= request_size for _, is_data, _, ln in recs if is_data)
    assert reader.data_bytes == 3 * MiB + 4 * KiB + 2 * MiB + 40 * KiB + 8 * KiB
    assert reader.zero_bytes == size - reader.data_bytes
    out = restore_to(arc, tmp_path / "r")
    assert_same_bytes(image, out / "d.raw", size)


def delayed_extents(nbd_server: NbdServerFactory, image: Path) -> str:
    """nbdkit serving ``image`` with every block-status reply held back 20 ms, so the
    replies of reads sent before a block-status request always arrive before its own."""
    return nbd_server.nbdkit(["file", str(image), "delay-extents=20ms"], filters=["delay"],
                             readonly=True).uri


@pytest.mark.parametrize(
    ("request_size", "status_window", "inflight", "workers", "connections"),
    [
        (5000, 4097, 16, 2, 4),  # sizes that are a multiple of nothing
        (4 * KiB, 64 * KiB, 1, 1, 8),  # one read in flight per connection, one worker
        (64 * KiB, 1 * MiB, 64, 8, 2),
    ],
    ids=["req5000-window4097", "inflight1-workers1", "inflight64-workers8"],
)
def test_odd_engine_options(
    request_size: int, status_window: int, inflight: int, workers: int, connections: int,
    tmp_path: Path, nbd_server: NbdServerFactory,
) -> None:
    size = 6 * MiB + 12 * KiB
    data = [(0, 1 * MiB + 4 * KiB), (2 * MiB, 1 * MiB), (4 * MiB + 8 * KiB, 2 * MiB)]
    # Allocated zeros apart from the data (a hole between): a read that straddles data and
    # zeros is stored whole as data, zeros being found at a 64 KiB grain within a read.
    zeros = [(3 * MiB + 256 * KiB, 256 * KiB)]
    image = sparse_raw(tmp_path / "d.raw", size, data=data, zeros=zeros)
    uri = serve_raw(nbd_server, image, connections)
    arc = tmp_path / "b.arc"
    backup(arc, [("d", uri)], connections=connections, request_size=request_size,
           status_window=status_window, inflight_per_connection=inflight, workers=workers,
           memory=1 * MiB)
    reader, recs = scan(arc)
    assert reader.data_bytes == sum(ln for _, ln in data)
    assert reader.zero_bytes == size - reader.data_bytes
    assert all(ln <= request_size for _, is_data, _, ln in recs if is_data)
    out = restore_to(arc, tmp_path / "r")
    assert_same_bytes(image, out / "d.raw", size)


@pytest.mark.parametrize(
    ("server_kind", "size", "status_window"),
    [
        ("nbdkit-delay-extents", 8 * MiB, 1 * MiB),
        ("qemu-nbd", 8 * MiB, 1 * MiB),
        ("qemu-nbd", 2 * GiB, 1024 * MiB),  # the default window; the second GiB is empty
    ],
    ids=["nbdkit-delay-8M-window1M", "qemu-nbd-8M-window1M", "qemu-nbd-2G-default-window"],
)
def test_data_then_empty_window(
    server_kind: str, size: int, status_window: int, tmp_path: Path,
    nbd_server: NbdServerFactory,
) -> None:
    """Reads still in flight when the next block-status window holds no data at all.

    The block-status call on the reader's own connection also collects the replies of
    that connection's reads in flight; the reader must not then wait for replies that
    will never come.
    """
    data = [(status_window - 1 * MiB, 1 * MiB)]
    image = sparse_raw(tmp_path / "d.raw", size, data=data)
    if server_kind == "qemu-nbd":
        uri = serve_raw(nbd_server, image, 1)
    else:
        uri = delayed_extents(nbd_server, image)
    arc = tmp_path / "b.arc"
    backup(arc, [("d", uri)], connections=1, request_size=256 * KiB,
           status_window=status_window)
    reader, _ = scan(arc)
    assert reader.data_bytes == 1 * MiB
    out = restore_to(arc, tmp_path / "r")
    assert_restored(image, out / "d.raw", size)


def test_buffers_full_at_window_edge(tmp_path: Path, nbd_server: NbdServerFactory) -> None:
    """A memory budget of one request and a block-status window of one request: the one
    buffer is held by a read whose reply the block-status call already collected when the
    next read needs a buffer. The reader must retire that read, not wait on the socket."""
    size = 1 * MiB
    image = sparse_raw(tmp_path / "d.raw", size, data=[(0, size)])
    arc = tmp_path / "b.arc"
    backup(arc, [("d", delayed_extents(nbd_server, image))], connections=1,
           request_size=64 * KiB, memory=64 * KiB, status_window=64 * KiB)
    out = restore_to(arc, tmp_path / "r")
    assert_restored(image, out / "d.raw", size)


# -- sizes that are a multiple of nothing -------------------------------------------------


ODD = 7 * MiB + 4097


@pytest.mark.parametrize("server_kind", ["qemu-nbd", "nbdkit"])
@pytest.mark.parametrize("size", [ODD, 1, 0], ids=["7M+4097", "1B", "empty"])
def test_odd_sizes(
    size: int, server_kind: str, tmp_path: Path, nbd_server: NbdServerFactory
) -> None:
    """qemu-nbd serves a raw file rounded up to 512 bytes (7 MiB + 4097 -> 7 MiB + 4608,
    1 -> 512); nbdkit's file plugin serves it at its exact size. Either way the archive's
    device has the export's size and restores to exactly that many bytes."""
    data = ([(0, 2 * MiB + 3), (4 * MiB + 511, size - 4 * MiB - 511)] if size == ODD
            else [(0, size)])
    image = sparse_raw(tmp_path / "odd.raw", size, data=data)
    assert image.stat().st_size == size
    if server_kind == "qemu-nbd":
        uri = nbd_server.qemu_nbd(image, "raw", shared=5).uri
        expected = -(-size // 512) * 512
    else:
        uri = nbd_server.nbdkit(["file", str(image)], readonly=True).uri
        expected = size
    assert export_size(uri) == expected
    arc = tmp_path / "b.arc"
    summary = backup(arc, [("odd", uri)], connections=4, request_size=64 * KiB,
                     status_window=1 * MiB)
    assert summary.devices[0].size == expected
    reader, _ = scan(arc)
    assert reader.devices[0].size == expected
    assert reader.data_bytes + reader.zero_bytes == expected
    out = restore_to(arc, tmp_path / "r")
    assert_same_bytes(image, out / "odd.raw", expected)


def test_odd_size_image_file(tmp_path: Path) -> None:
    """``--image`` on an odd-sized raw file: the agent's own qemu-nbd rounds it like
    qemu-img does (the archive device size is qemu's virtual size)."""
    image = sparse_raw(tmp_path / "odd.raw", ODD, data=[(0, ODD)])
    arc = tmp_path / "b.arc"
    summary = backup(arc, images=[("odd", str(image))], connections=2)
    assert summary.devices[0].size == 7 * MiB + 4608
    out = restore_to(arc, tmp_path / "r")
    assert_same_bytes(image, out / "odd.raw", 7 * MiB + 4608)


# -- extents that change type every block ------------------------------------------------------


def test_raw_alternating_4k_extents(tmp_path: Path, nbd_server: NbdServerFactory) -> None:
    """Every other 4 KiB block is a hole; of the others, every second one is random data
    and every fourth block is zeros written to disk (allocated, so the server calls it
    data): those must be found by reading and recorded as ZERO."""
    size = 8 * MiB
    blk = 4 * KiB
    data = [(o, blk) for o in range(0, size, 4 * blk)]
    zeros = [(o + 2 * blk, blk) for o in range(0, size, 4 * blk)]
    image = sparse_raw(tmp_path / "alt.raw", size, data=data, zeros=zeros)
    uri = serve_raw(nbd_server, image, 4)
    extents = allocation(uri)
    # Precondition: the server reports the type changing at every 4 KiB block.
    assert len(extents) == size // blk
    assert [flags & nbd.STATE_HOLE for _, _, flags in extents[:4]] == [0, 1, 0, 1]
    arc = tmp_path / "b.arc"
    backup(arc, [("alt", uri)], connections=4, request_size=64 * KiB,
           status_window=64 * KiB)
    reader, recs = scan(arc)
    assert reader.data_bytes == len(data) * blk
    assert reader.zero_bytes == size - len(data) * blk
    data_offsets = sorted(off for _, is_data, off, _ in recs if is_data)
    assert data_offsets == [o for o, _ in data]
    out = restore_to(arc, tmp_path / "r")
    assert_same_bytes(image, out / "alt.raw", size)


@pytest.mark.parametrize("request_size", [64 * KiB, 1 * MiB])
def test_qcow2_alternating_64k_clusters(
    request_size: int, tmp_path: Path, nbd_server: NbdServerFactory
) -> None:
    """64 KiB clusters in groups of four: patterned data, zeros written as data (allocated),
    unallocated, write-zeroes. The first two form one 128 KiB data extent: its read is
    split into a DATA and a ZERO record."""
    size = 8 * MiB
    cl = 64 * KiB
    ops: list[tuple[str, int, int] | tuple[str, int, int, int]] = []
    groups = range(0, size, 4 * cl)
    for n, o in enumerate(groups):
        ops.append(("write", 1 + n % 250, o, cl))
        ops.append(("write", 0, o + cl, cl))
        ops.append(("zero", o + 3 * cl, cl))
    image = make_image(tmp_path / "alt.qcow2", "qcow2", size, ops)
    server = nbd_server.qemu_nbd(image, "qcow2", shared=5)
    extents = allocation(server.uri)
    assert extents[0] == (0, 2 * cl, 0)  # precondition: allocated zeros look like data
    arc = tmp_path / "b.arc"
    backup(arc, [("alt", server.uri)], connections=4, request_size=request_size,
           status_window=64 * KiB)
    reader, recs = scan(arc)
    assert reader.data_bytes == len(groups) * cl
    assert reader.zero_bytes == size - len(groups) * cl
    assert sorted(off for _, is_data, off, _ in recs if is_data) == list(groups)
    out = restore_to(arc, tmp_path / "r")
    assert qemu_img_compare(image, "qcow2", out / "alt.raw", "raw")


def test_empty_1g_qcow2_fast_path(tmp_path: Path) -> None:
    image = make_image(tmp_path / "empty.qcow2", "qcow2", "1G")
    arc = tmp_path / "b.arc"
    summary = backup(arc, images=[("empty", str(image))])
    assert summary.devices[0].props["source-format"] == "qcow2"
    assert summary.archive_bytes == arc.stat().st_size
    assert arc.stat().st_size < 64 * KiB
    reader, recs = scan(arc)
    assert reader.zero_bytes == 1 * GiB
    assert reader.data_bytes == 0
    assert not any(is_data for _, is_data, _, _ in recs)
    out = restore_to(arc, tmp_path / "r")
    assert (out / "empty.raw").stat().st_size == 1 * GiB
    assert qemu_img_compare(image, "qcow2", out / "empty.raw", "raw")


# -- completion order, several devices -----------------------------------------------------------


def test_devices_written_in_completion_order(
    tmp_path: Path, nbd_server: NbdServerFactory
) -> None:
    names = ["a", "b", "c"]
    images = {}
    sources = []
    for i, name in enumerate(names):
        size = 16 * MiB + i * 64 * KiB
        images[name] = sparse_raw(tmp_path / f"{name}.raw", size,
                                  data=[(0, 6 * MiB), (8 * MiB, size - 8 * MiB)], seed=i)
        # Device c's server takes one client only: readers 1..7 have no connection to it.
        shared = 1 if name == "c" else 9
        sources.append((name, nbd_server.qemu_nbd(images[name], "raw", shared=shared).uri))
    arc = tmp_path / "b.arc"
    backup(arc, sources, connections=8, request_size=128 * KiB, memory=8 * MiB)
    reader, recs = scan(arc)
    assert [d.name for d in reader.devices] == names
    out_of_order = []
    for name in names:
        offsets = [off for dev, _, off, _ in recs if dev == name]
        if offsets != sorted(offsets):
            out_of_order.append(name)
    assert out_of_order, "every device's records came in offset order: not completion order"
    out = restore_to(arc, tmp_path / "r")
    for name in names:
        assert_same_bytes(images[name], out / f"{name}.raw", images[name].stat().st_size)


# -- memory bound -----------------------------------------------------------------------------


#: Runs argv[1:] as a child and prints its exit code and peak RSS (KiB). The child is forked
#: from this small process: a child forked from pytest itself would carry pytest's resident
#: size into its own ru_maxrss (Linux keeps the high-water mark across fork and exec).
_MAXRSS_LAUNCHER = """
import os, sys, time
pid = os.fork()
if pid == 0:
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    os.execv(sys.argv[1], sys.argv[1:])
deadline = time.monotonic() + float(os.environ["BA_TEST_GUARD"])
while True:
    got, status, usage = os.wait4(pid, os.WNOHANG)
    if got:
        break
    if time.monotonic() > deadline:
        os.kill(pid, 9)
        got, status, usage = os.wait4(pid, 0)
        break
    time.sleep(0.02)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)
"""


def _cli_backup_maxrss(uri: str, out: Path, *args: str) -> int:
    """Run ``backup-agent backup --source d=URI -o OUT ARGS``; its own peak RSS in bytes."""
    agent = Path(sys.executable).parent / "backup-agent"
    argv = [str(agent), "backup", "--source", f"d={uri}", "-o", str(out), "--progress",
            "none", "-q", *args]
    proc = subprocess.run([sys.executable, "-c", _MAXRSS_LAUNCHER, *argv], capture_output=True,
                          text=True, check=False, env={**os.environ, "BA_TEST_GUARD": "60"})
    assert proc.returncode == 0, proc.stderr
    code, rss = map(int, proc.stdout.split())
    assert code == 0, f"{argv} exited with {code}:\n{proc.stderr}"
    return rss * KiB


@pytest.mark.slow
def test_memory_bound(tmp_path: Path, nbd_server: NbdServerFactory) -> None:
    """256 MiB of random data through an 8 MiB budget: the engine's own count of buffers
    stays within the budget, and the process's resident memory does not grow with the
    disk (compared with the same command backing up a nearly empty disk)."""
    size = 256 * MiB
    image = sparse_raw(tmp_path / "big.raw", size, data=[(0, size)], seed=7)
    uri = serve_raw(nbd_server, image, 4)
    arc = tmp_path / "b.arc"
    summary = backup(arc, [("big", uri)], connections=4, request_size=1 * MiB, memory=8 * MiB)
    assert 0 < summary.peak_buffer <= 8 * MiB + 1 * MiB
    assert summary.progress.data_bytes == size
    out = restore_to(arc, tmp_path / "r")
    assert_same_bytes(image, out / "big.raw", size)

    small = sparse_raw(tmp_path / "small.raw", 1 * MiB, data=[(0, 64 * KiB)])
    opts = ("--memory", "8M", "--request-size", "1M", "--connections", "4")
    base = _cli_backup_maxrss(serve_raw(nbd_server, small, 4), tmp_path / "s.arc", *opts)
    peak = _cli_backup_maxrss(uri, tmp_path / "c.arc", *opts)
    assert peak - base < 48 * MiB, (
        f"backing up 256 MiB with --memory 8M took {(peak - base) // MiB} MiB more resident "
        "memory than backing up 1 MiB"
    )
