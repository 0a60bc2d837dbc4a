"""What the sequential reader holds the INDEX records to: the entries an honest writer
would have written for the DATA and ZERO records it read, entry for entry.

The index comes after every record it describes, and a stream cannot be read twice, so
the entries are not kept: both sides are hashed as they go by (BLAKE3, 32 bytes an entry)
and the two digests compared at END. Memory stays a few hundred bytes whatever the
archive; a lie anywhere in the index (a type, compression, device, offset, length or
position that is not the record's) changes the digest. The reserved field of an entry is
left out, as readers ignore reserved fields (docs/FORMAT.md, "Versioning").
"""

from __future__ import annotations

import blake3

from agent.archive.format import INDEX_ENTRY

_FLUSH = 1 << 20  # expected entries hashed a MiB at a time: one call, not one per record


class IndexCheck:
    """The two digests: of the records read, and of the INDEX records' entries."""

    def __init__(self) -> None:
        self._want = blake3.blake3()
        self._have = blake3.blake3()
        self._pending = bytearray()
        self.records = 0  # DATA and ZERO records read
        self.entries = 0  # entries in the INDEX records read

    def record(self, rtype: int, compression: int, device: int, offset: int, length: int,
               pos: int) -> None:
        """A DATA or ZERO record read at byte ``pos``: the entry that must describe it."""
        self._pending += INDEX_ENTRY.pack(rtype & 0xFF, compression, 0, device, offset,
                                          length, pos)
        self.records += 1
        if len(self._pending) >= _FLUSH:
            self._want.update(self._pending)
            self._pending.clear()

    def index(self, body: memoryview) -> None:
        """The body of an INDEX record (a whole number of entries, digest checked)."""
        n = len(body) // INDEX_ENTRY.size
        entries = bytearray(body)
        entries[2 :: INDEX_ENTRY.size] = bytes(n)  # the reserved u16, ignored
        entries[3 :: INDEX_ENTRY.size] = bytes(n)
        self._have.update(entries)
        self.entries += n

    def matches(self) -> bool:
        """Whether the entries read are exactly those of the records read, in order."""
        self._want.update(self._pending)
        self._pending.clear()
        return self._want.digest() == self._have.digest()
