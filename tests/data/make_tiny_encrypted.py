"""Build ``tests/data/tiny-encrypted.arc`` and its key ``tiny-encrypted.key``: the worked
example of docs/FORMAT.md, "Encryption".

The same contents as tiny.arc (make_tiny.py), encrypted to one recipient. Every random
value is fixed so the archive is reproducible; a real writer draws them from os.urandom::

    recipient's private key   40 41 42 ... 5f   (32 bytes counting up from 0x40)
    data key                  00 01 02 ... 1f   (the writer's first draw)
    ephemeral private key     20 21 22 ... 3f   (its second: one per recipient)

Run from the repository root after changing the format, the writer or crypto.py::

    .venv/bin/python tests/data/make_tiny_encrypted.py

tests/unit/test_encryption.py checks the committed files against :func:`build`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from agent import keys
from agent.archive import codec
from agent.archive.format import Compression, Header, Kind
from agent.archive.output import SequentialOutput
from agent.archive.writer import ArchiveWriter
from tests.data import make_tiny

ARC_PATH = Path(__file__).with_name("tiny-encrypted.arc")
KEY_PATH = Path(__file__).with_name("tiny-encrypted.key")
RECIPIENT_PRIVATE = bytes(range(0x40, 0x60))
DATA_KEY = bytes(range(0x00, 0x20))
EPHEMERAL_PRIVATE = bytes(range(0x20, 0x40))


def fixed_rng() -> Callable[[int], bytes]:
    """The writer's draws, in order: the data key, then the recipient's ephemeral key."""
    draws = [DATA_KEY, EPHEMERAL_PRIVATE]

    def rng(n: int) -> bytes:
        value = draws.pop(0)
        if len(value) != n:
            raise RuntimeError(f"the writer drew {n} bytes, expected {len(value)}")
        return value

    return rng


def key_pair() -> keys.KeyPair:
    return keys.generate(lambda n: RECIPIENT_PRIVATE)


def build() -> bytes:
    none = codec.CompressionSpec.parse("none")
    with tempfile.TemporaryFile() as f:
        out = SequentialOutput(f.fileno(), "tiny-encrypted.arc")
        header = Header(uuid=make_tiny.UUID, created_ns=make_tiny.CREATED_NS,
                        tool_version=make_tiny.TOOL_VERSION, kind=Kind.FULL)
        w = ArchiveWriter(out, header, encrypt_to=[key_pair().public], rng=fixed_rng())
        dev = w.add_device(make_tiny.DEVICE_NAME, make_tiny.DEVICE_SIZE)
        w.add_config(make_tiny.CONFIG_NAME, make_tiny.CONFIG, none)
        w.write_data(dev.id, 0, len(make_tiny.DATA), Compression.NONE, make_tiny.DATA)
        w.write_zero(dev.id, make_tiny.ZERO_OFFSET, make_tiny.ZERO_LENGTH)
        w.finish()
        f.seek(0)
        return f.read()


def key_file() -> str:
    return keys.encode_private(key_pair())


def main() -> None:
    for path, data in ((ARC_PATH, build()), (KEY_PATH, key_file().encode())):
        tmp = path.with_name(f".{path.name}.partial")
        tmp.write_bytes(data)
        os.chmod(tmp, 0o600)  # the key must be private to be loaded; the archive may as well
        os.replace(tmp, path)
        print(f"{path}: {len(data)} bytes")


if __name__ == "__main__":
    main()
