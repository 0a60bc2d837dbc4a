"""Chains of archives with known contents, for the serve tests (unit and integration).

The archives are written by the real ArchiveWriter, records in a shuffled order (as live
backups write them), DATA compressed or stored, ZERO for zero ranges; each incremental
or differential covers scattered ranges and leaves gaps (unchanged since its parent).
``expected`` is each device at the newest archive's point in time, computed by applying
the layers in order, byte by byte, independently of the code under test.
"""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

from agent.archive.format import Compression, Header, Kind
from agent.archive.output import SequentialOutput
from agent.archive.writer import ArchiveWriter

KiB = 1024
MiB = 1024 * KiB


@dataclass
class Chain:
    paths: list[Path] = field(default_factory=list)
    expected: dict[str, bytearray] = field(default_factory=dict)
    # (archive index, device, offset, length, is_data) of every record written
    records: list[tuple[int, str, int, int, bool]] = field(default_factory=list)


def _payload(rng: random.Random, n: int) -> bytes:
    """Compressible but not constant: text with random numbers, or random bytes."""
    if rng.random() < 0.3:
        return rng.randbytes(n)
    words = b" ".join(b"w%d" % rng.randrange(1000) for _ in range(n // 3 + 1))
    return (words * (n // len(words) + 1))[:n]


def _ranges(rng: random.Random, size: int, full: bool) -> list[tuple[int, int]]:
    out, off = [], 0
    while off < size:
        n = min(size - off, rng.choice([4 * KiB, 60 * KiB, 200 * KiB, 1 * MiB + 7]))
        if full or rng.random() < 0.4:
            out.append((off, n))
        off += n
    return out


def build_chain(folder: Path, kinds: list[Kind], *, seed: int = 1,
                sizes: dict[str, int] | None = None, compress: bool = True,
                encrypt_to: dict[int, Sequence[bytes]] | None = None) -> Chain:
    """Archives ``folder/0.arc``... of the given kinds (the first FULL), each the parent of
    the next, over devices ``sizes`` (name -> bytes). ``encrypt_to``: the recipients'
    public keys of the archives (by position in the chain) to encrypt."""
    rng = random.Random(seed)
    sizes = sizes or {"vda": 5 * MiB + 3 * KiB, "vdb": 2 * MiB}
    chain = Chain(expected={n: bytearray(s) for n, s in sizes.items()})
    zc = zstandard.ZstdCompressor(write_content_size=True)
    parent: uuid.UUID | None = None
    for i, kind in enumerate(kinds):
        me = uuid.UUID(int=rng.getrandbits(128))
        header = Header(uuid=me, created_ns=1_000 + i, tool_version="serve-test", kind=kind,
                        parent_uuid=parent)
        path = folder / f"{i}.arc"
        plan = []
        for name, size in sizes.items():
            for off, n in _ranges(rng, size, kind == Kind.FULL):
                plan.append((name, off, n, rng.random() < 0.75))
        rng.shuffle(plan)
        with open(path, "wb") as f:
            w = ArchiveWriter(SequentialOutput(f.fileno(), "test"), header,
                              encrypt_to=(encrypt_to or {}).get(i, ()))
            ids = {name: w.add_device(name, size).id for name, size in sizes.items()}
            for name, off, n, is_data in plan:
                if is_data:
                    data = _payload(rng, n)
                    packed = zc.compress(data)
                    if compress and len(packed) < n:
                        w.write_data(ids[name], off, n, Compression.ZSTD, packed)
                    else:
                        w.write_data(ids[name], off, n, Compression.NONE, data)
                    chain.expected[name][off : off + n] = data
                else:
                    w.write_zero(ids[name], off, n)
                    chain.expected[name][off : off + n] = bytes(n)
                chain.records.append((i, name, off, n, is_data))
            w.finish()
        chain.paths.append(path)
        parent = me
    return chain


def sparse_full(path: Path, size: int, *, data_at: tuple[int, ...] = (0,),
                record: int = 64 * KiB, zero_record: int = 1 << 30) -> bytes:
    """A FULL archive of one device ``vda`` of ``size`` bytes: ``record`` bytes of data at
    each offset in ``data_at``, zeros elsewhere in ZERO records of at most ``zero_record``
    (as a backup stores holes, one status window at a time). Returns the data."""
    data = os.urandom(record)
    header = Header(uuid=uuid.uuid4(), created_ns=1, tool_version="serve-test")
    with open(path, "wb") as f:
        w = ArchiveWriter(SequentialOutput(f.fileno(), "test"), header)
        dev = w.add_device("vda", size).id
        off = 0
        for at in sorted(data_at):
            while off < at:
                n = min(zero_record, at - off)
                w.write_zero(dev, off, n)
                off += n
            w.write_data(dev, at, record, Compression.NONE, data)
            off = at + record
        while off < size:
            n = min(zero_record, size - off)
            w.write_zero(dev, off, n)
            off += n
        w.finish()
    return data
