"""Proves the integration fixtures work: real images, real servers, real libnbd clients."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import nbd
import pytest

from tests.integration.conftest import (
    CommandError,
    NbdServerFactory,
    Server,
    make_image,
    nbdcopy_to_file,
    qemu_img_compare,
)

pytestmark = pytest.mark.integration

KiB = 1024
MiB = 1024 * KiB

# A 4 MiB qcow2 image: two patterned extents, a write-zeroes range, a discarded range and an
# untouched hole at the end.
IMAGE_SIZE = 4 * MiB
IMAGE_OPS = [
    ("write", 0xAB, 0, 64 * KiB),
    ("write", 0xCD, 1 * MiB, 128 * KiB),
    ("write", 0x11, 2 * MiB, 128 * KiB),
    ("zero", 2 * MiB, 64 * KiB),
    ("discard", 2 * MiB + 64 * KiB, 64 * KiB),
]


def _connect(uri: str) -> nbd.NBD:
    """A libnbd handle connected to ``uri`` (libnbd 1.14 has no context manager)."""
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    return h


def _process_gone(pid: int) -> bool:
    """True if no process with ``pid`` exists (the fixture reaps its children)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _allocation_map(h: nbd.NBD, size: int) -> list[tuple[int, int, int]]:
    """The export's ``base:allocation`` extents as ``(offset, length, flags)``."""
    extents: list[tuple[int, int, int]] = []
    reply: list[int] = []

    def collect(metacontext: str, off: int, entries: list[int], err: object) -> int:
        if metacontext == nbd.CONTEXT_BASE_ALLOCATION:
            reply.extend(entries)
        return 0

    offset = 0
    while offset < size:
        reply.clear()
        h.block_status(size - offset, offset, collect)
        for i in range(0, len(reply), 2):
            length, flags = reply[i], reply[i + 1]
            extents.append((offset, length, flags))
            offset += length
    return extents


def test_qcow2_served_by_qemu_nbd(short_tmp: Path, nbd_server: NbdServerFactory) -> None:
    image = make_image(short_tmp / "disk.qcow2", "qcow2", IMAGE_SIZE, IMAGE_OPS)
    server = nbd_server.qemu_nbd(image, "qcow2", readonly=True, shared=8)
    assert isinstance(server, Server)
    assert server.uri == f"nbd+unix:///?socket={server.socket}"
    assert len(server.socket) < 108
    assert server.running()

    h = _connect(server.uri)
    try:
        assert h.get_size() == IMAGE_SIZE
        assert h.can_multi_conn()
        assert h.is_read_only()
        assert h.pread(64 * KiB, 0) == b"\xab" * (64 * KiB)
        assert h.pread(128 * KiB, 1 * MiB) == b"\xcd" * (128 * KiB)
        # Write-zeroes and discard both read back as zeros; the hole too.
        assert h.pread(128 * KiB, 2 * MiB) == bytes(128 * KiB)
        assert h.pread(1 * MiB, 3 * MiB) == bytes(1 * MiB)
        # The untouched tail is reported as a hole (that reads as zeros), the head as data.
        extents = _allocation_map(h, IMAGE_SIZE)
        assert sum(length for _, length, _ in extents) == IMAGE_SIZE
        tail = [flags for off, length, flags in extents if off + length > 3 * MiB]
        hole_zero = nbd.STATE_HOLE | nbd.STATE_ZERO
        assert tail and all(flags & hole_zero == hole_zero for flags in tail)
        assert extents[0][0] == 0 and extents[0][2] == 0
    finally:
        h.shutdown()
        del h


def test_qemu_nbd_without_shared_has_no_multi_conn(
    short_tmp: Path, nbd_server: NbdServerFactory
) -> None:
    image = make_image(short_tmp / "one.raw", "raw", 1 * MiB, [("write", 0x5A, 0, 4 * KiB)])
    server = nbd_server.qemu_nbd(image, "raw", readonly=False, shared=1)
    h = _connect(server.uri)
    try:
        assert not h.can_multi_conn()
        assert not h.is_read_only()
        h.pwrite(b"\x77" * 512, 4 * KiB)
        h.flush()
    finally:
        h.shutdown()
        del h
    server.stop()
    expected = make_image(
        short_tmp / "expected.raw",
        "raw",
        1 * MiB,
        [("write", 0x5A, 0, 4 * KiB), ("write", 0x77, 4 * KiB, 512)],
    )
    assert qemu_img_compare(image, "raw", expected, "raw")


def test_nbdcopy_and_compare(short_tmp: Path, nbd_server: NbdServerFactory) -> None:
    image = make_image(short_tmp / "src.qcow2", "qcow2", IMAGE_SIZE, IMAGE_OPS)
    server = nbd_server.qemu_nbd(image, "qcow2")
    copy = nbdcopy_to_file(server.uri, short_tmp / "copy.raw")
    assert copy.stat().st_size == IMAGE_SIZE
    assert qemu_img_compare(image, "qcow2", copy, "raw")

    different = make_image(
        short_tmp / "other.qcow2", "qcow2", IMAGE_SIZE, [*IMAGE_OPS, ("write", 1, 3 * MiB, 512)]
    )
    assert not qemu_img_compare(different, "qcow2", copy, "raw")


def test_qemu_img_compare_error_raises(short_tmp: Path) -> None:
    image = make_image(short_tmp / "a.raw", "raw", 64 * KiB)
    with pytest.raises(CommandError, match=r"missing\.raw"):
        qemu_img_compare(image, "raw", short_tmp / "missing.raw", "raw")


def test_make_image_rejects_bad_op(short_tmp: Path) -> None:
    with pytest.raises(ValueError, match="bad image op"):
        make_image(short_tmp / "bad.raw", "raw", 64 * KiB, [("trim", 0, 512)])


def test_make_image_reports_qemu_io_failure(short_tmp: Path) -> None:
    # A write beyond the end of the image fails inside qemu-io.
    with pytest.raises(CommandError, match="qemu-io"):
        make_image(short_tmp / "small.raw", "raw", 64 * KiB, [("write", 1, 1 * MiB, 512)])


def test_nbdkit_memory(nbd_server: NbdServerFactory) -> None:
    server = nbd_server.nbdkit(["memory", "size=64M"])
    h = _connect(server.uri)
    try:
        assert h.get_size() == 64 * MiB
        assert not h.is_read_only()
        h.pwrite(b"\x42" * (64 * KiB), 8 * MiB)
        assert h.pread(64 * KiB, 8 * MiB) == b"\x42" * (64 * KiB)
        assert h.pread(4 * KiB, 0) == bytes(4 * KiB)
    finally:
        h.shutdown()
        del h


def test_nbdkit_error_filter(short_tmp: Path, nbd_server: NbdServerFactory) -> None:
    image = make_image(short_tmp / "err.raw", "raw", 1 * MiB, [("write", 0xEE, 0, 1 * MiB)])
    server = nbd_server.nbdkit(
        ["file", str(image), "error=EIO", "error-pread-rate=100%"],
        filters=["error"],
        readonly=True,
    )
    h = _connect(server.uri)
    try:
        assert h.is_read_only()
        with pytest.raises(nbd.Error) as excinfo:
            h.pread(4 * KiB, 0)
        assert excinfo.value.errnum == errno.EIO
    finally:
        h.shutdown()
        del h


def test_factory_close_stops_processes_by_pid(nbd_server: NbdServerFactory) -> None:
    first = nbd_server.nbdkit(["memory", "size=1M"])
    second = nbd_server.nbdkit(["memory", "size=1M"])
    assert first.pid != second.pid and first.socket != second.socket
    assert not _process_gone(first.pid) and not _process_gone(second.pid)

    nbd_server.close()
    for server in (first, second):
        assert _process_gone(server.pid)
        assert not server.running()
        assert not os.path.exists(server.socket)
    nbd_server.close()  # idempotent; the fixture's own teardown calls it again too


def test_nested_factory_teardown(short_tmp: Path) -> None:
    # What the nbd_server fixture does at teardown, run by hand.
    image = make_image(short_tmp / "n.raw", "raw", 1 * MiB)
    factory = NbdServerFactory(short_tmp)
    try:
        server = factory.qemu_nbd(image, "raw")
        assert os.path.exists(server.socket)
        assert not _process_gone(server.pid)
    finally:
        factory.close()
    assert _process_gone(server.pid)
    assert server.proc.returncode is not None
    assert not os.path.exists(server.socket)


def test_server_start_failure_reports_stderr(short_tmp: Path) -> None:
    factory = NbdServerFactory(short_tmp)
    try:
        with pytest.raises(pytest.fail.Exception, match="qemu-nbd exited") as excinfo:
            factory.qemu_nbd(short_tmp / "does-not-exist.qcow2", "qcow2")
        assert "does-not-exist.qcow2" in str(excinfo.value)
        assert all(not s.running() for s in factory.servers)
    finally:
        factory.close()
