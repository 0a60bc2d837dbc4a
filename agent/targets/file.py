"""The restore target for a regular file or a block device, written with pwrite.

Zero ranges never become written zeros: a freshly created sparse file already reads as
zeros, an existing file gets holes punched, a block device BLKZEROOUT.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
import threading
from collections.abc import Callable, Sequence

from agent.errors import TargetError
from agent.targets.base import ZEROS

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_BLKGETSIZE64 = 0x80081272
_BLKZEROOUT = 0x127F
_ZERO_CHUNK = 8 * 1024 * 1024  # zeros written into a file per write

_SYNC_FILE_RANGE_WAIT_BEFORE = 1
_SYNC_FILE_RANGE_WRITE = 2
_SYNC_FILE_RANGE_WAIT_AFTER = 4
_SETTLE = _SYNC_FILE_RANGE_WAIT_BEFORE | _SYNC_FILE_RANGE_WRITE | _SYNC_FILE_RANGE_WAIT_AFTER
WRITEBACK_WINDOW = 4 * 1024 * 1024
_NOT_SUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ESPIPE)

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_sync_file_range = _libc.sync_file_range
_sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


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
    """Which written ranges to write back, and which to settle.

    Once a window's worth of writes is in the page cache, its writeback is started
    (one ``sync_file_range`` for the window's ranges, not one per write: with 64 KiB
    records that was a fifth of a restore's time), and the window before it is
    settled: waited for and dropped from the page cache. A restore then cycles
    through two windows of page cache instead of filling it with the whole disk, and
    leaves the host's cache to its guests. Small windows keep the recycled pages
    hot: the kernel's copy into fresh page-cache pages costs far more than into
    pages just freed (on a VM whose host reclaims freed guest memory, most of all).
    Measured (docs/PERFORMANCE.md, "Restore from a pipe"): from 32 MiB down to
    4 MiB, each smaller window took less CPU time and varied less, onto a file and
    onto a block device; 2 MiB waited on the disk. 4 MiB windows keep 8 MiB in
    flight, as nbdcopy does (it settles 2 MiB behind in each of its 4 threads).
    Thread-safe: the caller whose write fills a window starts and settles.
    """

    def __init__(self, window: int = WRITEBACK_WINDOW) -> None:
        self._window = window
        self._lock = threading.Lock()
        self._filling: list[tuple[int, int]] = []
        self._filled = 0
        self._previous: list[tuple[int, int]] = []

    def add(self, offset: int, length: int) -> tuple[list[tuple[int, int]],
                                                      list[tuple[int, int]]]:
        """Record a write; return the ranges whose writeback is now to start, and those
        now due to be settled (usually neither)."""
        with self._lock:
            self._filling.append((offset, length))
            self._filled += length
            if self._filled < self._window:
                return [], []
            start, due = self._filling, self._previous
            self._previous, self._filling, self._filled = start, [], 0
        return coalesce(start), coalesce(due)


class FileTarget:
    """A regular file or a block device, written with pwrite."""

    def __init__(self, path: str, size: int | None = None, *, fresh: bool = False,
                 label: str | None = None, fd: int | None = None) -> None:
        """``fd``: ``path`` already open for writing (the target takes it over)."""
        self.name = label or path  # what messages call it: the user's name, not a temp file's
        self.fresh = fresh  # a new sparse file: zero ranges are already holes
        flags = os.O_WRONLY | os.O_CLOEXEC
        if fresh:  # made here, then: never a file or symbolic link that was there before
            flags |= os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        try:
            self.fd = os.open(path, flags, 0o600) if fd is None else fd
        except OSError as e:
            raise TargetError(f"cannot open {self.name}: {e.strerror}") from e
        try:
            self.block_device, self.size = self._size(size)
        except BaseException:
            self.close()
            raise
        self._writeback = WritebackWindows()
        self._one_write = threading.Lock()

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
        self.writev(offset, (data,))

    def writev(self, offset: int, parts: Sequence[bytes | bytearray | memoryview]) -> None:
        views = [memoryview(p) for p in parts]
        start, length = offset, sum(len(v) for v in views)
        try:
            # One pwrite at a time: the kernel serializes buffered writes to one inode
            # anyway, and workers waiting for its lock spin on a CPU that decompression
            # needs (a 2 GiB restore: 7% less CPU time, 6% faster with this lock).
            with self._one_write:
                while views:
                    n = os.pwritev(self.fd, views, offset)
                    offset += n
                    while views and n >= len(views[0]):
                        n -= len(views.pop(0))
                    if n:  # a short write: the rest of this part, and the parts after it
                        views[0] = views[0][n:]
        except OSError as e:
            raise TargetError(f"{self.name}: write at offset {offset} failed: {e.strerror}") from e
        # Start writeback early, as nbdcopy does: the final fsync then finds little left
        # to write instead of the whole disk. Block devices too (a 2 GiB restore onto a
        # loop device: 3.1 s -> 1.5 s).
        begin, due = self._writeback.add(start, length)
        for off, n in begin:
            _sync_file_range(self.fd, off, n, _SYNC_FILE_RANGE_WRITE)
        for off, n in due:
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
            self.write(off, memoryview(ZEROS)[: min(_ZERO_CHUNK, offset + length - off)])

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
