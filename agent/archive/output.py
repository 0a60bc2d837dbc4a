"""Where the archive goes: a file descriptor written strictly sequentially.

The output never seeks, so a pipe, a socket, ``ssh``'s stdin and a tape are all
as good as a file. A named output file is written under a temporary name and
renamed into place only when the archive is complete, so a failed backup never
leaves a file that looks like a finished one (and never replaces the last good one).
The temporary file is one the agent made itself (agent/files.py): nothing planted at
its name beforehand, a symbolic link or another user's file, can receive the archive.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from agent.errors import OutputError
from agent.files import create_private, rename_noreplace, sync_dir

Buf = bytes | bytearray | memoryview


_F_SETPIPE_SZ = 1031
_IOV_MAX = 1024  # writev's limit on Linux


def grow_pipe(fd: int) -> None:
    """Make a pipe's buffer as large as the system allows (usually 1 MiB, from 64 KiB):
    a record then crosses in one or two wake-ups instead of dozens. Best effort."""
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return
        with open("/proc/sys/fs/pipe-max-size") as f:
            size = int(f.read())
        fcntl.fcntl(fd, _F_SETPIPE_SZ, size)
    except (OSError, ValueError):
        pass  # an unprivileged limit or an odd system: the default still works


def rename_durably(src: str | Path, dst: str | Path, *, replace: bool = True) -> None:
    """``rename(src, dst)``, then sync the directory so that the new name survives a crash.
    ``replace=False``: never replace what is at ``dst`` (FileExistsError instead).
    Raises OSError."""
    if replace:
        os.rename(src, dst)
    else:
        rename_noreplace(Path(src), Path(dst))
    sync_dir(Path(dst).parent)


class SequentialOutput:
    """Appends buffers to a file descriptor with ``writev``; counts every byte."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name
        self.position = 0

    def write(self, parts: Sequence[Buf]) -> None:
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        # A cursor, not pop(0): a batch of 100k small records cost seconds per call.
        first = 0
        while first < len(views):
            try:
                n = os.writev(self.fd, views[first:first + _IOV_MAX])
            except BrokenPipeError as e:
                raise OutputError(f"{self.name}: the reader closed the pipe") from e
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                raise OutputError(f"{self.name}: write failed: {e.strerror}") from e
            self.position += n
            while n:
                if n >= len(views[first]):
                    n -= len(views[first])
                    first += 1
                else:
                    views[first] = views[first][n:]
                    n = 0

    def expect(self, nbytes: int) -> None:
        """The archive will hold about ``nbytes`` of devices (an upload sizes its parts)."""

    def commit(self) -> None:
        """The archive is complete: make it durable and visible."""

    def abort(self) -> None:
        """The archive failed: remove what a reader could mistake for a backup."""

    def close(self) -> None:
        """Release the descriptor (not stdout's)."""


class StdoutOutput(SequentialOutput):
    def __init__(self) -> None:
        fd = 1
        if os.isatty(fd):
            raise OutputError("refusing to write an archive to a terminal: redirect or pipe it")
        grow_pipe(fd)
        super().__init__(fd, "standard output")


class FileOutput(SequentialOutput):
    """A named file, written as ``.NAME.RANDOM.partial`` beside it and renamed when complete
    (replacing an archive already at NAME: a new backup to the same PATH is the newer one)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp: Path | None = None
        try:
            if path.exists() and not path.is_file():
                # A fifo, a tape or a character device the user named: write to it directly.
                fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            else:
                fd, self.tmp = create_private(path.parent, path.name)
        except OSError as e:
            raise OutputError(f"cannot open output {path}: {e.strerror}") from e
        super().__init__(fd, str(path))

    def commit(self) -> None:
        try:
            if stat.S_ISREG(os.fstat(self.fd).st_mode):
                os.fsync(self.fd)
            if self.tmp is not None:
                rename_durably(self.tmp, self.path)
                self.tmp = None  # renamed: nothing of ours is left to remove
        except OSError as e:
            raise OutputError(f"cannot complete output {self.path}: {e.strerror}") from e

    def abort(self) -> None:
        if self.tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_output(path: str) -> SequentialOutput:
    if path.startswith("s3://"):  # a multipart upload (imported here: boto3 is heavy)
        from agent.s3.upload import S3Output

        return S3Output(path)
    return StdoutOutput() if path == "-" else FileOutput(Path(path))
