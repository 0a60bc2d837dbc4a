"""The backup engine when something breaks: a server that fails reads or block status part
way through, an output whose reader goes away, a server at its connection limit.

Every failure must be an AgentError naming what failed, must leave no output file behind,
and must stop every thread the backup started.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from pathlib import Path

import nbd
import pytest

from agent.errors import AgentError, OutputError, SourceError
from agent.nbd.source import _connect
from agent.pipeline import Progress
from tests.integration.cli_util import agent, assert_error
from tests.integration.conftest import NbdServerFactory
from tests.integration.test_engine import (
    KiB,
    MiB,
    assert_same_bytes,
    backup,
    restore_to,
    serve_raw,
    sparse_raw,
    thread_stacks,
)

pytestmark = pytest.mark.integration

#: Seconds the threads of a failed backup get to finish after it returned.
THREADS_GONE = 10.0


def assert_threads_stopped(before: set[int]) -> None:
    """Every thread started since ``before`` (a set of thread idents) has ended."""
    deadline = time.monotonic() + THREADS_GONE
    while True:
        left = [t for t in threading.enumerate() if t.ident not in before and t.is_alive()]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not left, (f"threads still running after the backup failed: "
                      f"{[t.name for t in left]}\n{thread_stacks()}")


def assert_no_output(directory: Path) -> None:
    """No archive, finished or partial, in ``directory``."""
    left = sorted(p.name for p in directory.iterdir() if p.name.endswith((".arc", ".partial")))
    assert left == [], f"a failed backup left {left}"


def assert_refused(partial: bytes, directory: Path) -> None:
    """The bytes a failed backup got out, fed to ``verify -`` and ``restore -`` through a
    pipe: both refuse them (exit 1, one line) and restore leaves no file behind."""
    assert partial.startswith(b"\x89BAGENT\n"), partial[:16]  # the archive had started
    assert_error(agent("verify", "-", input=partial))
    target = directory / "from-partial"
    assert_error(agent("restore", "-", "--to-dir", target, input=partial))
    assert not target.exists() or list(target.iterdir()) == []


def assert_backs_up_again(uri: str, image: Path, size: int, directory: Path) -> None:
    """Without the fault, a backup of the same source restores byte for byte."""
    arc = directory / "again.arc"
    backup(arc, [("vda", uri)], connections=4, request_size=1 * MiB, memory=4 * MiB)
    out = restore_to(arc, directory / "again")
    assert_same_bytes(image, out / "vda.raw", size)


class PipeCollector:
    """An anonymous pipe for a backup's output (``/proc/self/fd/N``) and a thread that
    keeps everything that comes through it, optionally closing its end after ``limit``
    bytes."""

    def __init__(self, limit: int | None = None) -> None:
        self.r, self.w = os.pipe()
        self.got = bytearray()
        self.limit = limit
        self.thread = threading.Thread(target=self._read, name="test-collector", daemon=True)
        self.thread.start()

    @property
    def path(self) -> Path:
        return Path(f"/proc/self/fd/{self.w}")

    def _read(self) -> None:
        try:
            while self.limit is None or len(self.got) < self.limit:
                want = 1 << 20 if self.limit is None else self.limit - len(self.got)
                chunk = os.read(self.r, want)
                if not chunk:
                    break
                self.got.extend(chunk)
        finally:
            os.close(self.r)

    def close(self) -> bytes:
        """Close the write end (the reader then sees the end) and return what came."""
        os.close(self.w)
        self.thread.join(10)
        assert not self.thread.is_alive()
        return bytes(self.got)


# -- a server that fails ---------------------------------------------------------------------


@pytest.mark.parametrize("when", ["at-once", "mid-copy"])
@pytest.mark.parametrize("failing", ["pread", "extents"])
def test_server_error(
    failing: str, when: str, tmp_path: Path, short_tmp: Path, nbd_server: NbdServerFactory
) -> None:
    """nbdkit's error filter fails every read (or block status) with EIO, from the start or
    only once the trigger file exists: it is created after the first records are written."""
    size = 48 * MiB
    image = sparse_raw(tmp_path / "d.raw", size, data=[(0, size)])
    trigger = short_tmp / "fail-now"
    args = ["file", str(image), "error=EIO", f"error-{failing}-rate=100%"]
    if when == "mid-copy":
        args.append(f"error-{failing}-file={trigger}")
    uri = nbd_server.nbdkit(args, filters=["error"], readonly=True).uri
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    progressed: list[int] = []

    def progress(p: Progress) -> None:
        if p.done and not progressed:
            progressed.append(p.done)
            trigger.touch()

    before = {t.ident for t in threading.enumerate() if t.ident is not None}
    with pytest.raises(SourceError) as exc:
        backup(out_dir / "b.arc", [("vda", uri)], progress=progress, connections=4,
               request_size=1 * MiB, memory=4 * MiB, status_window=4 * MiB)
    msg = str(exc.value)
    assert "vda" in msg, msg
    assert re.search(r"offset \d+", msg), msg
    if when == "mid-copy":
        assert progressed and progressed[0] < size  # it failed part way, not at once
        offset = int(re.search(r"offset (\d+)", msg).group(1))  # type: ignore[union-attr]
        assert 0 < offset < size, msg
    assert_no_output(out_dir)
    assert_threads_stopped(before)


@pytest.mark.parametrize("failing", ["pread", "extents"])
def test_server_error_stream_is_refused_then_backup_again(
    failing: str, tmp_path: Path, short_tmp: Path, nbd_server: NbdServerFactory
) -> None:
    """The server fails mid-copy while the archive goes into a pipe: what came through is
    refused by verify and restore. Without the fault (a plain nbdkit on the same file), a
    backup restores byte for byte.

    (Not the same server with its trigger file removed: nbdkit 1.32 may abort on
    ``raw_send_socket: Assertion `sock >= 0' failed`` when a client drops its connections
    while replies are on their way, as the agent does when a backup fails.)"""
    size = 48 * MiB
    image = sparse_raw(tmp_path / "d.raw", size, data=[(0, size)])
    trigger = short_tmp / "fail-now"
    uri = nbd_server.nbdkit(["file", str(image), "error=EIO", f"error-{failing}-rate=100%",
                             f"error-{failing}-file={trigger}"], filters=["error"],
                            readonly=True).uri

    def progress(p: Progress) -> None:
        if p.done:
            trigger.touch()

    pipe = PipeCollector()
    try:
        with pytest.raises(SourceError):
            backup(pipe.path, [("vda", uri)], progress=progress, connections=4,
                   request_size=1 * MiB, memory=4 * MiB, status_window=4 * MiB)
    finally:
        partial = pipe.close()
    assert len(partial) > 1 * MiB  # records got through before the failure
    assert_refused(partial, tmp_path)
    plain = nbd_server.nbdkit(["file", str(image)], readonly=True).uri
    assert_backs_up_again(plain, image, size, tmp_path)


def test_source_error_leaves_earlier_archive(
    tmp_path: Path, nbd_server: NbdServerFactory
) -> None:
    """A failed backup never replaces a finished archive of the same name."""
    size = 4 * MiB
    image = sparse_raw(tmp_path / "d.raw", size, data=[(0, size)])
    good = nbd_server.qemu_nbd(image, "raw", shared=3).uri
    bad = nbd_server.nbdkit(["file", str(image), "error=EIO", "error-pread-rate=100%"],
                            filters=["error"], readonly=True).uri
    arc = tmp_path / "b.arc"
    backup(arc, [("d", good)], connections=2)
    first = arc.read_bytes()
    with pytest.raises(SourceError):
        backup(arc, [("d", bad)], connections=2)
    assert arc.read_bytes() == first
    assert list(tmp_path.glob(".b.arc.*.partial")) == []
    out = restore_to(arc, tmp_path / "r")
    assert_same_bytes(image, out / "d.raw", size)


# -- an output that goes away ------------------------------------------------------------------


def test_output_closed_early(
    tmp_path: Path, short_tmp: Path, nbd_server: NbdServerFactory
) -> None:
    """The archive goes into a FIFO whose reader reads 16 KiB and closes it."""
    size = 64 * MiB
    image = sparse_raw(tmp_path / "d.raw", size, data=[(0, size)])
    uri = serve_raw(nbd_server, image, 4)
    fifo = short_tmp / "out.fifo"
    os.mkfifo(fifo)
    got = bytearray()

    def reader() -> None:
        with open(fifo, "rb", buffering=0) as f:
            while len(got) < 16 * KiB:
                chunk = f.read(16 * KiB - len(got))
                if not chunk:
                    break
                got.extend(chunk)

    before = {t.ident for t in threading.enumerate() if t.ident is not None}
    rt = threading.Thread(target=reader, name="test-fifo-reader", daemon=True)
    rt.start()
    try:
        with pytest.raises(OutputError) as exc:
            backup(fifo, [("d", uri)], connections=4, request_size=1 * MiB, memory=8 * MiB)
    finally:
        if rt.is_alive():  # the backup never opened the FIFO: let the reader go
            with contextlib.suppress(OSError), open(fifo, "wb"):
                pass
        rt.join(10)
    assert str(fifo) in str(exc.value)
    assert len(got) == 16 * KiB
    assert fifo.exists()  # a FIFO output is never removed
    assert_threads_stopped(before)
    assert_refused(bytes(got), tmp_path)
    assert_backs_up_again(uri, image, size, tmp_path)


@pytest.mark.slow
def test_output_closed_by_pipe_reader(tmp_path: Path, nbd_server: NbdServerFactory) -> None:
    """The same through an anonymous pipe (``os.pipe``, given as ``/proc/self/fd/N``): the
    read end is closed after 4 KiB."""
    size = 32 * MiB
    image = sparse_raw(tmp_path / "d.raw", size, data=[(0, size)])
    uri = serve_raw(nbd_server, image, 2)
    r, w = os.pipe()
    head = bytearray()

    def read_then_close() -> None:
        try:
            while len(head) < 4 * KiB:
                chunk = os.read(r, 4 * KiB - len(head))
                if not chunk:
                    break
                head.extend(chunk)
        finally:
            os.close(r)

    before = {t.ident for t in threading.enumerate() if t.ident is not None}
    closer = threading.Thread(target=read_then_close, name="test-pipe-reader", daemon=True)
    closer.start()
    try:
        with pytest.raises(OutputError):
            backup(Path(f"/proc/self/fd/{w}"), [("d", uri)], connections=2,
                   request_size=1 * MiB, memory=4 * MiB)
    finally:
        os.close(w)  # also ends the reader if the backup never wrote
        closer.join(10)
    assert len(head) == 4 * KiB  # the archive had started
    assert_threads_stopped(before)
    assert_refused(bytes(head), tmp_path)
    assert_backs_up_again(uri, image, size, tmp_path)


def test_output_closed_after_records_then_backup_again(
    tmp_path: Path, nbd_server: NbdServerFactory
) -> None:
    """The reader of the pipe goes away after 8 MiB, well into the data records: what it
    got is refused by verify and restore; a new backup restores byte for byte."""
    size = 32 * MiB
    image = sparse_raw(tmp_path / "d.raw", size, data=[(0, size)])
    uri = serve_raw(nbd_server, image, 4)
    pipe = PipeCollector(limit=8 * MiB)
    try:
        with pytest.raises(OutputError):
            backup(pipe.path, [("vda", uri)], connections=2, request_size=1 * MiB,
                   memory=4 * MiB)
    finally:
        partial = pipe.close()
    assert len(partial) == 8 * MiB
    assert_refused(partial, tmp_path)
    assert_backs_up_again(uri, image, size, tmp_path)


# -- a server at its connection limit ----------------------------------------------------------


@pytest.mark.slow
def test_connection_limit_reached_is_reported(
    tmp_path: Path, nbd_server: NbdServerFactory
) -> None:
    """qemu-nbd --shared=1 with its one client slot taken: a new client's socket connects
    but the server never says a word. The connect deadline must end in a SourceError that
    says so (the agent's default deadline is 30 s; here 1 s, through the same function)."""
    image = sparse_raw(tmp_path / "d.raw", 1 * MiB, data=[(0, 4 * KiB)])
    server = nbd_server.qemu_nbd(image, "raw", shared=1)
    holder = nbd.NBD()
    holder.connect_uri(server.uri)
    try:
        with pytest.raises(AgentError) as exc:
            _connect(server.uri, "late", meta=True, timeout=1.0)
        assert isinstance(exc.value, SourceError)
        assert "no answer within" in str(exc.value), str(exc.value)
        # The client holding the slot is unaffected.
        assert holder.pread(4 * KiB, 0)[:1] != b"\0"
    finally:
        with contextlib.suppress(nbd.Error):
            holder.shutdown()


# -- a server that goes away ----------------------------------------------------------------------


@pytest.mark.parametrize("server_kind", ["qemu-nbd", "nbdkit"])
def test_server_killed_mid_copy(
    server_kind: str, tmp_path: Path, nbd_server: NbdServerFactory
) -> None:
    """The server process is killed (by its pid) once the first records are written."""
    size = 64 * MiB
    image = sparse_raw(tmp_path / "d.raw", size, data=[(0, size)])
    if server_kind == "qemu-nbd":
        server = nbd_server.qemu_nbd(image, "raw", shared=5)
    else:
        server = nbd_server.nbdkit(["file", str(image)], readonly=True)
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    def progress(p: Progress) -> None:
        if p.done and server.running():
            server.proc.kill()
            server.proc.wait()

    before = {t.ident for t in threading.enumerate() if t.ident is not None}
    with pytest.raises(SourceError) as exc:
        backup(out_dir / "b.arc", [("vda", server.uri)], progress=progress, connections=4,
               request_size=1 * MiB, memory=4 * MiB, status_window=8 * MiB)
    assert "vda" in str(exc.value)
    assert not server.running()
    assert_no_output(out_dir)
    assert_threads_stopped(before)
