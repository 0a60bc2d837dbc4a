"""The archive writer: appends records strictly sequentially, in any device order.

One thread owns a writer. It keeps the running seal (record count, totals, the
chained digest) and a compact index of 32 bytes per DATA/ZERO record, written as
INDEX records before the END record so a reader of a seekable file can find any
device byte without scanning. The index moves to a temporary file once it grows
(agent/archive/spill.py), so the writer's memory does not grow with the disks.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import blake3

from agent.archive import codec
from agent.archive.format import (
    FLAG_OPTIONAL,
    INDEX_ENTRIES_PER_RECORD,
    INDEX_ENTRY,
    MAX_DATA_LENGTH,
    NO_INDEX,
    VERSION_MINOR,
    VERSION_MINOR_ENCRYPTED,
    Chain,
    Chunk,
    Compression,
    Config,
    Details,
    Device,
    End,
    Footer,
    Header,
    RecordType,
    Zero,
    check_name,
    digest,
    pack_frame,
    pack_preamble,
)
from agent.archive.output import Buf, SequentialOutput
from agent.archive.spill import SPILL_AT, SpillingBuffer
from agent.errors import ArchiveError, InvalidArgument

if TYPE_CHECKING:
    from agent.archive import crypto

CONFIG_CHUNK = 4 * 1024 * 1024


@dataclass
class Totals:
    records: int = 0
    data_bytes: int = 0  # device bytes stored as DATA (before compression)
    zero_bytes: int = 0  # device bytes recorded as ZERO
    stored_bytes: int = 0  # payload bytes of DATA records as stored (after compression)


class ArchiveWriter:
    """Writes one archive to ``out``; call :meth:`finish` to seal it.

    With ``encrypt_to`` (raw X25519 public keys) the archive is encrypted for them: the
    HEADER keeps only its clear fields, DETAILS carries the rest, and every record after
    HEADER is sealed (docs/FORMAT.md, "Encryption"). ``rng``: tests make it reproducible."""

    def __init__(self, out: SequentialOutput, header: Header, *,
                 index_in_memory: int = SPILL_AT, encrypt_to: Sequence[bytes] = (),
                 rng: crypto.Rng | None = None) -> None:
        self.out = out
        self.header = header
        self.totals = Totals()
        self.devices: list[Device] = []
        self.configs: list[Config] = []
        self._names: set[str] = set()
        self._config_names: set[str] = set()
        self._sealer: crypto.RecordSealer | None = None
        clear = header
        if encrypt_to:
            from agent.archive import crypto  # here: cryptography costs plain backups 65 ms

            clear, self._sealer = crypto.begin(header, encrypt_to, rng or os.urandom)
        preamble = pack_preamble(VERSION_MINOR_ENCRYPTED if encrypt_to else VERSION_MINOR)
        self._chain = Chain(preamble)
        self._seq = 0
        self._index = SpillingBuffer(index_in_memory)
        self._finished = False
        self._batch: list[Buf] | None = None  # records held back by batch()
        self._batch_len = 0
        out.write([preamble])
        self._record(RecordType.HEADER, [clear.encode()])
        if self._sealer is not None:
            self._record(RecordType.DETAILS,
                         [Details(header.tool_version, header.checkpoint, header.props).encode()])

    @property
    def wants_digest(self) -> bool:
        """Whether :meth:`write_data` uses a body digest computed beforehand (not when
        records are sealed: the digest is then of the sealed body, known only here)."""
        return self._sealer is None

    # -- low level ---------------------------------------------------------------------

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Records appended inside reach the output in one ``writev`` when the block ends:
        an incremental's scattered 64 KiB records then cost one system call (and one
        wake-up of the pipe's reader) per batch instead of one each. The payloads must
        stay valid until then. On an exception nothing of the batch is written (the
        archive is incomplete anyway: whoever raised stops writing it)."""
        if self._batch is not None:
            raise RuntimeError("batches do not nest")
        self._batch, self._batch_len = [], 0
        try:
            yield
            parts = self._batch
        finally:
            self._batch, self._batch_len = None, 0
        self.out.write(parts)

    def _record(
        self, rtype: RecordType, body: list[Buf], body_digest: bytes | None = None, flags: int = 0
    ) -> int:
        """Append one record; returns the byte position of its frame header."""
        pos = self.out.position + self._batch_len
        if self._sealer is not None and rtype != RecordType.HEADER:
            # Compressed before, sealed here: the nonce is the sequence number, known only
            # now, in the order records are written.
            body = [self._sealer.seal(rtype, flags, self._seq, body)]
            body_digest = None
        body_len = sum(len(b) for b in body)
        frame = pack_frame(rtype, flags, self._seq, body_len)
        if body_digest is None:
            body_digest = digest(b"".join(body)) if len(body) > 1 else digest(body[0])
        if self._batch is None:
            self.out.write([frame, *body, body_digest])
        else:
            self._batch += (frame, *body, body_digest)
            self._batch_len += len(frame) + body_len + len(body_digest)
        self._chain.add(frame, body_digest)
        self._seq += 1
        self.totals.records += 1
        return pos

    def _index_add(
        self, rtype: RecordType, comp: int, dev: int, off: int, ln: int, pos: int
    ) -> None:
        self._index.append(INDEX_ENTRY.pack(rtype & 0xFF, comp, 0, dev, off, ln, pos))

    # -- metadata ----------------------------------------------------------------------

    def add_device(self, name: str, size: int, props: Mapping[str, str] | None = None) -> Device:
        try:
            check_name(name, "device")
        except ArchiveError as e:
            raise InvalidArgument(str(e)) from None
        if name in self._names:
            raise InvalidArgument(f"device name {name!r} is given twice")
        dev = Device(len(self.devices), name, size, dict(props or {}))
        self._names.add(name)
        self.devices.append(dev)
        self._record(RecordType.DEVICE, [dev.encode()])
        return dev

    def add_config(self, name: str, data: bytes, spec: codec.CompressionSpec) -> Config:
        try:
            check_name(name, "config")
        except ArchiveError as e:
            raise InvalidArgument(str(e)) from None
        if name in self._config_names:
            raise InvalidArgument(f"config name {name!r} is given twice")
        cfg = Config(len(self.configs), name, len(data))
        self._config_names.add(name)
        self.configs.append(cfg)
        self._record(RecordType.CONFIG, [cfg.encode()])
        view = memoryview(data)
        for off in range(0, len(data), CONFIG_CHUNK):
            piece = view[off : off + CONFIG_CHUNK]
            comp, payload = codec.compress(piece, spec)
            fixed = Chunk(cfg.id, comp, off, len(piece)).encode()
            self._record(RecordType.CONFIG_DATA, [fixed, payload])
        return cfg

    # -- device data -------------------------------------------------------------------

    def write_data(
        self,
        device: int,
        offset: int,
        length: int,
        comp: Compression,
        payload: Buf,
        body_digest: bytes | None = None,
    ) -> None:
        """Append one DATA record. ``body_digest``, when given, must be
        ``digest(Chunk(...).encode() + payload)``: worker threads compute it in parallel."""
        if not 0 < length <= MAX_DATA_LENGTH:
            raise ValueError(f"data record length {length} out of range")
        fixed = Chunk(device, comp, offset, length).encode()
        pos = self._record(RecordType.DATA, [fixed, payload], body_digest)
        self.totals.data_bytes += length
        self.totals.stored_bytes += len(payload)
        self._index_add(RecordType.DATA, comp, device, offset, length, pos)

    def write_zero(self, device: int, offset: int, length: int) -> None:
        pos = self._record(RecordType.ZERO, [Zero(device, offset, length).encode()])
        self.totals.zero_bytes += length
        self._index_add(RecordType.ZERO, 0, device, offset, length, pos)

    # -- the end -----------------------------------------------------------------------

    def finish(self) -> End:
        """Write the index, the END seal and the footer. The output is not committed here."""
        if self._finished:
            raise RuntimeError("archive already finished")
        self._finished = True
        index_pos = NO_INDEX
        step = INDEX_ENTRIES_PER_RECORD * INDEX_ENTRY.size
        try:
            for entries in self._index.chunks(step):
                pos = self._record(RecordType.INDEX, [entries], flags=FLAG_OPTIONAL)
                if index_pos == NO_INDEX:
                    index_pos = pos
        except OSError as e:  # reading the spilled index back: the output is fine
            raise ArchiveError(f"cannot read back the archive's index: {e}") from e
        finally:
            self._index.close()
        end = End(
            records=self.totals.records,
            data_bytes=self.totals.data_bytes,
            zero_bytes=self.totals.zero_bytes,
            stored_bytes=self.totals.stored_bytes,
            devices=len(self.devices),
            configs=len(self.configs),
            chain=self._chain.value(),
        )
        end_pos = self._record(RecordType.END, [end.encode()])
        footer_len = 48
        self.out.write([Footer(index_pos, end_pos, self.out.position + footer_len).encode()])
        return end


def data_body_digest(
    device: int, offset: int, length: int, comp: Compression, payload: Buf
) -> bytes:
    """The digest :meth:`ArchiveWriter.write_data` would compute, for worker threads."""

    h = blake3.blake3(Chunk(device, comp, offset, length).encode())
    h.update(payload)
    return bytes(h.digest(16))
