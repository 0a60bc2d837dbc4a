"""Restore targets: a file or block device, or an NBD export.

Writes come from several worker threads at once and in any order. Zero ranges
never become written zeros: a freshly created sparse file already reads as zeros,
an existing file gets holes punched, a block device BLKZEROOUT, an NBD export
write-zeroes with trim allowed.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from typing import Protocol

import nbd

from agent.errors import TargetError

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_BLKGETSIZE64 = 0x80081272
_BLKZEROOUT = 0x127F
_ZERO_CHUNK = 8 * 1024 * 1024  # zeros written into a file per write
# Shared by every target (a restore of 1,024 devices opens 1,024 of them at once), and
# never written to: its pages stay the kernel's shared zero page, costing no memory.
_ZEROS = bytes(32 * 1024 * 1024)

_SYNC_FILE_RANGE_WAIT_BEFORE = 1
_SYNC_FILE_RANGE_WRITE = 2
_SYNC_FILE_RANGE_WAIT_AFTER = 4
_SETTLE = _SYNC_FILE_RANGE_WAIT_BEFORE | _SYNC_FILE_RANGE_WRITE | _SYNC_FILE_RANGE_WAIT_AFTER
WRITEBACK_WINDOW = 32 * 1024 * 1024
_NOT_SUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ESPIPE)

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_sync_file_range = _libc.sync_file_range
_sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


class Target(Protocol):
    name: str
    size: int
    fresh: bool  # reads as zeros everywhere: zero ranges need no request

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...
    def zero(self, offset: int, length: int) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...
    # Once stopped() is true (the restore was interrupted), no wait for a server lasts.
    def stop_when(self, stopped: Callable[[], bool]) -> None: ...


def coalesce(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(offset, length) ranges sorted, with touching and overlapping ones merged."""
    out: list[tuple[int, int]] = []
    for off, n in sorted(ranges):
        if out and off <= out[-1][0] + out[-1][1]:
            last_off, last_n = out[-1]
            out[-1] = (last_off, max(last_n, off + n - last_off))
        else:
            out.append((off, n))
    return out


class WritebackWindows:
    """Which written ranges to settle: the window before the one being filled.

    Writes start their writeback at once; once a window's worth has been written
    since, the previous window's pages are waited for and dropped from the page
    cache. A restore then cycles through two windows of page cache instead of
    filling it with the whole disk, and leaves the host's cache to its guests.
    Measured here (docs/PERFORMANCE.md): 2 GiB restored in 1.66 s without this,
    0.8 s with 32 MiB windows; 64 and 128 MiB were slower and more variable (the
    kernel's copy into fresh page-cache pages costs more than into recycled ones).
    Thread-safe: the caller that fills a window settles the one before.
    """

    def __init__(self, window: int = WRITEBACK_WINDOW) -> None:
        self._window = window
        self._lock = threading.Lock()
        self._filling: list[tuple[int, int]] = []
        self._filled = 0
        self._previous: list[tuple[int, int]] = []

    def add(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Record a write; return the ranges now due to be settled (often none)."""
        with self._lock:
            self._filling.append((offset, length))
            self._filled += length
            if self._filled < self._window:
                return []
            due, self._previous = self._previous, self._filling
            self._filling, self._filled = [], 0
        return coalesce(due)


class FileTarget:
    """A regular file or a block device, written with pwrite."""

    def __init__(self, path: str, size: int | None = None, *, fresh: bool = False,
                 label: str | None = None) -> None:
        self.name = label or path  # what messages call it: the user's name, not a temp file's
        self.fresh = fresh  # a new sparse file: zero ranges are already holes
        flags = os.O_WRONLY | os.O_CLOEXEC | (os.O_CREAT | os.O_EXCL if fresh else 0)
        try:
            self.fd = os.open(path, flags, 0o600)
        except OSError as e:
            raise TargetError(f"cannot open {self.name}: {e.strerror}") from e
        try:
            self.block_device, self.size = self._size(size)
        except BaseException:
            self.close()
            raise
        self._writeback = WritebackWindows()

    def _size(self, size: int | None) -> tuple[bool, int]:
        """Whether the fd is a block device, and its size (a fresh file is made ``size``)."""
        try:
            st = os.fstat(self.fd)
            if stat.S_ISBLK(st.st_mode):
                buf = fcntl.ioctl(self.fd, _BLKGETSIZE64, b"\0" * 8)
                return True, int(struct.unpack("<Q", buf)[0])
            if self.fresh and size is not None:
                os.ftruncate(self.fd, size)
                return False, size
            return False, st.st_size
        except OSError as e:
            # A valid device can still be too large for the file system (2^63-1 bytes
            # on ext4: EFBIG).
            making = self.fresh and size is not None
            what = f"make a file of {size} bytes" if making else "find its size"
            raise TargetError(f"{self.name}: cannot {what}: {e.strerror}") from e

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        start, length = offset, len(view)
        try:
            while view:
                n = os.pwrite(self.fd, view, offset)
                view, offset = view[n:], offset + n
        except OSError as e:
            raise TargetError(f"{self.name}: write at offset {offset} failed: {e.strerror}") from e
        # Start writeback now, as nbdcopy does: the final fsync then finds little left
        # to write instead of the whole disk. Block devices too (a 2 GiB restore onto a
        # loop device: 3.1 s -> 1.5 s).
        _sync_file_range(self.fd, start, length, _SYNC_FILE_RANGE_WRITE)
        for off, n in self._writeback.add(start, length):
            self._settle(off, n)

    def _settle(self, offset: int, length: int) -> None:
        """Wait for a range's writeback, then drop its pages from the page cache."""
        if _sync_file_range(self.fd, offset, length, _SETTLE) != 0:
            err = ctypes.get_errno()
            if err in _NOT_SUPPORTED:
                return  # a file system (or sandbox) without it: the final fsync does it all
            # Writeback errors surface here: a later fsync may no longer report them.
            raise TargetError(f"{self.name}: writing back offset {offset} failed: "
                              f"{os.strerror(err)}")
        os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_DONTNEED)

    def zero(self, offset: int, length: int) -> None:
        if self.fresh:
            return
        if self.block_device:
            try:
                fcntl.ioctl(self.fd, _BLKZEROOUT, struct.pack("<QQ", offset, length))
                return
            except OSError:
                pass  # not supported by this device: write zeros below
        elif _fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
            return
        elif ctypes.get_errno() not in (errno.EOPNOTSUPP, errno.ENOSYS):
            err = ctypes.get_errno()
            raise TargetError(f"{self.name}: punching a hole at {offset} failed: "
                              f"{os.strerror(err)}")
        for off in range(offset, offset + length, _ZERO_CHUNK):
            self.write(off, memoryview(_ZEROS)[: min(_ZERO_CHUNK, offset + length - off)])

    def flush(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as e:
            raise TargetError(f"{self.name}: flush failed: {e.strerror}") from e

    def stop_when(self, stopped: Callable[[], bool]) -> None:
        pass  # its writes do not wait on anyone that could stall

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# Write requests (data pieces, and zeros written where the server cannot write-zeroes)
# are at most this long, or the server's advertised maximum: servers refuse larger ones
# ("request too large: maximum request size is 67108864"; qemu-nbd's limit is 32 MiB).
_MAX_WRITE = 32 * 1024 * 1024
# How often the watcher looks at the restores' stop flags.
_WATCH_INTERVAL = 0.2
# Longest a polite disconnect may take before the connection is simply dropped.
_DISCONNECT_TIMEOUT = 2.0
_POLL_MS = 200  # one wait of that disconnect


class _Conn:
    """One NBD connection, its socket, and the lock of the thread using it."""

    def __init__(self, h: nbd.NBD) -> None:
        self.h = h
        self.fd = h.aio_get_fd()  # taken now: a blocked call holds the handle's lock
        self.lock = threading.Lock()


class _Watcher:
    """One thread for the process that cuts the connections of stopped targets.

    The requests themselves are libnbd's blocking calls, which loop in C without the
    GIL (the asynchronous calls driven from Python made a restore into qcow2 14% slower:
    every socket wake-up came back to the interpreter). A blocking call waits for its
    server for ever, though, holding the handle's lock; so once a restore stops, this
    thread shuts the target's sockets down under it, and the call fails at once.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._targets: dict[int, tuple[NbdTarget, Callable[[], bool]]] = {}
        self._thread: threading.Thread | None = None

    def watch(self, target: NbdTarget, stopped: Callable[[], bool]) -> None:
        with self._lock:
            self._targets[id(target)] = (target, stopped)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ba-nbd-watch",
                                                daemon=True)
                self._thread.start()

    def forget(self, target: NbdTarget) -> None:
        with self._lock:
            self._targets.pop(id(target), None)

    def _run(self) -> None:
        while True:
            time.sleep(_WATCH_INTERVAL)
            with self._lock:
                due = [t for t, stopped in self._targets.values() if stopped()]
            for t in due:
                self.forget(t)
                t.cut()


_watcher = _Watcher()


class NbdTarget:
    """A writable NBD export; each worker thread uses its own connection when allowed.

    Once the restore stops (:meth:`stop_when`), a request waiting on a stalled server
    fails within a fraction of a second (see :class:`_Watcher`) instead of when, or if,
    the server answers.
    """

    def __init__(self, uri: str, connections: int = 4, *, fresh: bool = False,
                 label: str | None = None) -> None:
        self.uri = uri
        # What messages call it: the file a restore makes, not the agent's own qemu-nbd.
        self.name = label or uri
        self.fresh = fresh
        self._stopped: Callable[[], bool] = lambda: False
        self._cut = False  # sockets shut down: no polite goodbye
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: list[_Conn] = []
        first = self._connect()
        try:
            if first.h.is_read_only():
                raise TargetError(f"{self.name}: the NBD export is read-only")
            self.size: int = first.h.get_size()
            self._max = max(1, connections) if first.h.can_multi_conn() else 1
            self._can_zero = bool(first.h.can_zero())
            advertised = first.h.get_block_size(nbd.SIZE_MAXIMUM)  # 0: none advertised
            self._max_write = min(_MAX_WRITE, advertised) if advertised > 0 else _MAX_WRITE
        except nbd.Error as e:
            self.close()
            raise TargetError(f"{self.name}: {e.string}") from e
        except BaseException:
            self.close()
            raise

    def stop_when(self, stopped: Callable[[], bool]) -> None:
        """Cut the connections (failing any request in progress) once ``stopped()``."""
        self._stopped = stopped
        _watcher.watch(self, stopped)

    def cut(self) -> None:
        """Shut every connection's socket down: blocked requests fail at once. The
        handles stay open (their owners may be inside a call) until :meth:`close`."""
        self._cut = True
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError), socket.socket(fileno=os.dup(conn.fd)) as sock:
                sock.shutdown(socket.SHUT_RDWR)  # the socket itself, not just this fd

    def _connect(self) -> _Conn:
        h = nbd.NBD()
        try:
            # The URI is the user's own (a command-line argument or job file): let it
            # name its TLS key or certificates (tls-psk-file=, tls-certificates=).
            h.set_uri_allow_local_file(True)
            h.connect_uri(self.uri)
        except nbd.Error as e:
            raise TargetError(f"cannot connect to {self.name}: {e.string}") from e
        conn = _Conn(h)
        self._conns.append(conn)
        return conn

    def _conn(self) -> _Conn:
        conn: _Conn | None = getattr(self._local, "conn", None)
        if conn is None:
            with self._lock:
                if len(self._conns) < self._max:
                    conn = self._connect()
                else:
                    conn = self._conns[threading.get_ident() % len(self._conns)]
            self._local.conn = conn
        return conn

    def _call(self, what: str, request: Callable[..., object], *args: object,
              conn: _Conn | None = None) -> None:
        """``request(handle, *args)``, a blocking libnbd call, on this thread's connection;
        TargetError if it fails, or if the restore stopped (the watcher then cut the
        connection under it)."""
        conn = conn or self._conn()
        if self._cut:
            raise TargetError(f"{self.name}: {what}: stopped")
        try:
            with conn.lock:  # threads sharing a connection take turns, as libnbd would
                request(conn.h, *args)
        except nbd.Error as e:
            if self._cut:
                raise TargetError(f"{self.name}: {what}: stopped before the server "
                                  "answered") from e
            raise TargetError(f"{self.name}: {what} failed: {e.string}") from e

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        step = self._max_write
        for pos in range(0, len(view), step):
            self._call(f"write at offset {offset + pos}", nbd.NBD.pwrite,
                       view[pos:pos + step], offset + pos)

    def zero(self, offset: int, length: int) -> None:
        if self.fresh:
            return
        end = offset + length
        if self._can_zero:
            step = 1 << 30  # servers may refuse 4 GiB and over in one request
            for off in range(offset, end, step):
                n = min(step, end - off)
                # Without NO_HOLE the server may trim.
                self._call(f"zeroing at offset {off}", nbd.NBD.zero, n, off)
            return
        # Zeros written from one shared buffer, in requests the server accepts.
        zeros = memoryview(_ZEROS)
        step = self._max_write
        for off in range(offset, end, step):
            self._call(f"zeroing at offset {off}", nbd.NBD.pwrite,
                       zeros[:min(step, end - off)], off)

    def flush(self) -> None:
        for conn in list(self._conns):
            self._call("flush", nbd.NBD.flush, conn=conn)

    def close(self) -> None:
        """Disconnect politely unless the connections were cut or the restore stopped
        (a polite disconnect waits for a server that may never answer)."""
        _watcher.forget(self)
        with self._lock:  # cut() must not reach a socket whose handle is gone
            conns, self._conns = self._conns, []
        self._local = threading.local()  # the last references: libnbd closes the sockets
        for conn in conns:
            with contextlib.suppress(nbd.Error):
                # Blocking calls leave nothing in flight unless cut or stopped.
                if not self._cut and not self._stopped():
                    self._disconnect(conn.h)

    @staticmethod
    def _disconnect(h: nbd.NBD) -> None:
        h.aio_disconnect()
        deadline = time.monotonic() + _DISCONNECT_TIMEOUT
        while not (h.aio_is_closed() or h.aio_is_dead()) and time.monotonic() < deadline:
            h.poll(_POLL_MS)
