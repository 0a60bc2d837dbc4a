"""The writer's index, kept on disk once it grows: memory stays bounded whatever the disk.

An archive's index has 32 bytes per DATA/ZERO record and is written only at the end. An
8 TiB disk in 2 MiB records is 128 MiB of index, a fragmented one far more; past a few
MiB the entries go to an unlinked temporary file (nothing to clean up, whatever happens)
and are read back, in order, when the index is written.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import BinaryIO

log = logging.getLogger(__name__)

SPILL_AT = 4 * 1024 * 1024


class SpillingBuffer:
    """Append-only bytes, in memory up to ``spill_at``, then in a temporary file."""

    def __init__(self, spill_at: int = SPILL_AT) -> None:
        self._spill_at = spill_at
        self._mem = bytearray()
        self._file: BinaryIO | None = None
        self._spilled = 0
        self._in_memory_only = False  # the temporary file could not be written

    def __len__(self) -> int:
        return self._spilled + len(self._mem)

    def append(self, data: bytes) -> None:
        self._mem += data
        if len(self._mem) >= self._spill_at and not self._in_memory_only:
            self._spill()

    def _spill(self) -> None:
        try:
            if self._file is None:
                # Closed by close(), or with the process: unlinked from the start.
                import tempfile  # only once the index outgrows memory (start-up cost)

                self._file = tempfile.TemporaryFile(prefix="backup-agent-index-")  # noqa: SIM115
            self._file.write(self._mem)
        except OSError as e:
            # A full or read-only TMPDIR must not fail the backup: the index then stays
            # in memory, as it did before it could spill.
            log.warning("cannot spill the archive index to TMPDIR (%s): keeping it in "
                        "memory", e.strerror or e)
            self._in_memory_only = True
            return
        self._spilled += len(self._mem)
        self._mem = bytearray()

    def chunks(self, size: int) -> Iterator[bytes | memoryview]:
        """Everything appended, in order, in pieces of ``size`` bytes (the last shorter)."""
        pending = bytearray()
        if self._file is not None:
            self._file.flush()
            self._file.seek(0)
            left = self._spilled
            while left:
                piece = self._file.read(min(size - len(pending), left))
                if not piece:
                    raise OSError("the spilled index ended early")
                left -= len(piece)
                pending += piece
                if len(pending) == size:
                    yield bytes(pending)
                    pending.clear()
        view = memoryview(self._mem)
        if pending:  # complete the partial piece from memory first
            take = size - len(pending)
            pending += view[:take]
            view = view[take:]
            yield bytes(pending)
        for off in range(0, len(view), size):
            yield view[off : off + size]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._mem = bytearray()
