"""Mutation fuzzing of the reader: whatever is done to a valid archive, reading it either
gives exactly the original content or raises ArchiveError. Never another exception, never
a hang, never different content.

The only mutations that can leave the content intact are ones confined to the trailing
zero padding, so every other mutation must raise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from agent.archive import codec
from agent.archive.codec import CompressionSpec
from agent.archive.format import Compression
from agent.archive.writer import ArchiveWriter
from agent.errors import ArchiveError
from tests.unit.archive_util import Contents, read_archive, write_archive

PADDING = 64  # trailing zero bytes, as a tape drive would add


def _build(w: ArchiveWriter) -> None:
    vda = w.add_device("vda", 3 * 512)
    vdb = w.add_device("vdb", 512, {"bus": "virtio"})
    w.add_config("vm.conf", b"cpus=1\n", CompressionSpec.parse("none"))
    comp, payload = codec.compress(b"abcd" * 128, CompressionSpec())
    assert comp == Compression.ZSTD
    w.write_data(vda.id, 512, 512, comp, payload)
    w.write_data(vdb.id, 0, 512, Compression.NONE, bytes(range(256)) * 2)
    w.write_zero(vda.id, 0, 512)
    w.write_data(vda.id, 1024, 512, Compression.NONE, b"\xa5" * 512)


BASE = write_archive(_build) + bytes(PADDING)
ORIGINAL: Contents = read_archive(BASE)


@dataclass(frozen=True)
class Mutation:
    kind: str  # flip, insert, delete, truncate, duplicate
    at: int  # taken modulo the current length
    size: int
    data: bytes

    def apply(self, buf: bytearray) -> None:
        n = len(buf)
        if n == 0:
            if self.kind == "insert":
                buf[:] = self.data
            return
        at = self.at % n
        if self.kind == "flip":
            buf[at] ^= (self.size % 255) + 1  # never a no-op
        elif self.kind == "insert":
            buf[at:at] = self.data
        elif self.kind == "delete":
            del buf[at : at + self.size]
        elif self.kind == "truncate":
            del buf[at:]
        elif self.kind == "duplicate":
            buf[at:at] = buf[at : at + self.size]
        else:  # pragma: no cover
            raise AssertionError(self.kind)


mutations = st.builds(
    Mutation,
    kind=st.sampled_from(["flip", "flip", "insert", "delete", "truncate", "duplicate"]),
    # Anywhere, or near the end (END, footer, padding), which uniform draws rarely reach.
    at=st.one_of(st.integers(min_value=0, max_value=len(BASE)),
                 st.integers(min_value=len(BASE) - 400, max_value=len(BASE))),
    size=st.integers(min_value=1, max_value=300),
    data=st.binary(min_size=1, max_size=64),
)


def _read(data: bytes) -> Contents | ArchiveError:
    """The content, or the ArchiveError the reader refused the archive with.

    Any other exception propagates and fails the test."""
    try:
        return read_archive(data)
    except ArchiveError as e:
        assert str(e), "an ArchiveError must carry a message"
        return e


def test_the_base_archive_reads() -> None:
    assert ORIGINAL.image("vda") == bytes(512) + b"abcd" * 128 + b"\xa5" * 512
    assert isinstance(_read(BASE[: -PADDING - 1]), ArchiveError)


@pytest.mark.timeout(120)
@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.lists(mutations, min_size=1, max_size=4))
def test_mutated_archive_is_refused_or_unchanged(muts: list[Mutation]) -> None:
    buf = bytearray(BASE)
    for m in muts:
        m.apply(buf)
    data = bytes(buf)
    got = _read(data)
    if isinstance(got, ArchiveError):
        # For --hypothesis-show-statistics: which checks the mutations ran into.
        event(f"refused: {type(got).__name__}: " + re.sub(r"\d+", "N", str(got))[:60])
    else:
        event("read")
        assert got == ORIGINAL, f"a mutated archive was read with different content: {muts}"
        # Only the padding may have changed.
        core = len(BASE) - PADDING
        assert data[:core] == BASE[:core], muts
        assert data[core:].count(0) == len(data) - core, muts


@pytest.mark.parametrize("cut", range(len(BASE) - PADDING, len(BASE) + 1, 16))
def test_padding_may_be_cut_anywhere(cut: int) -> None:
    assert _read(BASE[:cut]) == ORIGINAL
