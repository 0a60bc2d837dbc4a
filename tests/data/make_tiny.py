"""Build ``tests/data/tiny.arc``, the worked example at the end of docs/FORMAT.md.

Run from the repository root after changing the format or the writer::

    .venv/bin/python tests/data/make_tiny.py
    xxd -a tests/data/tiny.arc     # then update the hexdump in docs/FORMAT.md

The archive is fully deterministic (fixed uuid, fixed creation time, no compression),
and tests/unit/test_format.py checks that the committed file is byte-identical to what
:func:`build` produces now and to the hexdump printed in docs/FORMAT.md.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

from agent.archive import codec
from agent.archive.format import Compression, Header, Kind
from agent.archive.output import SequentialOutput
from agent.archive.writer import ArchiveWriter

TINY_PATH = Path(__file__).with_name("tiny.arc")

UUID = uuid.UUID("00112233-4455-6677-8899-aabbccddeeff")
CREATED_NS = 1_700_000_000_000_000_000  # 2023-11-14T22:13:20Z
TOOL_VERSION = "tiny-1"

DEVICE_NAME = "vda"
DEVICE_SIZE = 8192
# The first 4 KiB of the device: a short pattern, then zero bytes up to 4096. It is
# stored as DATA (compression none); bytes 4096..8192 are recorded as one ZERO record.
PATTERN = b"backup-agent tiny.arc: device vda, bytes 0..4096\n"
DATA = PATTERN + bytes(4096 - len(PATTERN))
ZERO_OFFSET = 4096
ZERO_LENGTH = 4096

CONFIG_NAME = "vm.conf"
CONFIG = b"cpus=1\nmemory=64M\n"


def build() -> bytes:
    """The bytes of tiny.arc, written by the real ArchiveWriter to a real descriptor."""
    none = codec.CompressionSpec.parse("none")
    with tempfile.TemporaryFile() as f:
        out = SequentialOutput(f.fileno(), "tiny.arc")
        header = Header(uuid=UUID, created_ns=CREATED_NS, tool_version=TOOL_VERSION,
                        kind=Kind.FULL)
        w = ArchiveWriter(out, header)
        dev = w.add_device(DEVICE_NAME, DEVICE_SIZE)
        w.add_config(CONFIG_NAME, CONFIG, none)
        w.write_data(dev.id, 0, len(DATA), Compression.NONE, DATA)
        w.write_zero(dev.id, ZERO_OFFSET, ZERO_LENGTH)
        w.finish()
        f.seek(0)
        data = f.read()
    if len(data) != out.position:
        raise RuntimeError(f"wrote {out.position} bytes but read back {len(data)}")
    return data


def main() -> None:
    data = build()
    tmp = TINY_PATH.with_name(f".{TINY_PATH.name}.partial")
    tmp.write_bytes(data)
    os.replace(tmp, TINY_PATH)
    print(f"{TINY_PATH}: {len(data)} bytes")


if __name__ == "__main__":
    main()
