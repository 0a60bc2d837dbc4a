"""NBD over TLS named entirely by its URI: ``nbds+unix://USER@/?socket=S&tls-psk-file=F``,
the form the agent itself advises for a remote export. The URI names a local key file, which
libnbd refuses unless asked; backup reads such a source and restore writes such a target.

nbdkit serves a qemu-img image with ``--tls=require --tls-psk``: it refuses clear text.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from tests.integration.cli_util import KiB, MiB, agent, assert_error, assert_ok
from tests.integration.conftest import (
    ImageOp,
    NbdServerFactory,
    Server,
    make_image,
    qemu_img_compare,
)

pytestmark = pytest.mark.integration

USER = "alice"
SIZE = 4 * MiB + 4096
OPS: list[ImageOp] = [
    ("write", 0x3C, 0, 300 * KiB),
    ("zero", 1 * MiB, 512 * KiB),
    ("write", 0xA5, 2 * MiB + 512, 65536),
    ("write", 0x77, SIZE - 4096, 4096),  # the last block
]


def _psk_file(directory: Path) -> Path:
    """A PSK file as nbdkit and libnbd read it: ``USER:hexkey``, readable by its owner."""
    path = directory / "keys.psk"
    path.write_text(f"{USER}:{secrets.token_hex(32)}\n")
    path.chmod(0o600)
    return path


def _tls_server(nbd_server: NbdServerFactory, image: Path, psk: Path,
                readonly: bool) -> Server:
    return nbd_server.nbdkit(["--tls=require", f"--tls-psk={psk}", "file", str(image)],
                             readonly=readonly)


def _tls_uri(server: Server, psk: Path) -> str:
    return f"nbds+unix://{USER}@/?socket={server.socket}&tls-psk-file={psk}"


def test_backup_from_a_tls_source(short_tmp: Path, nbd_server: NbdServerFactory) -> None:
    psk = _psk_file(short_tmp)
    image = make_image(short_tmp / "src.raw", "raw", SIZE, OPS)
    server = _tls_server(nbd_server, image, psk, readonly=True)
    arc = short_tmp / "a.arc"
    # Clear text is refused: whatever works below went over TLS.
    assert_error(agent("backup", "--source", f"d={server.uri}", "-o", arc))
    assert_ok(agent("backup", "--source", f"d={_tls_uri(server, psk)}", "-o", arc))
    out = short_tmp / "out"
    assert_ok(agent("restore", arc, "--to-dir", out))
    assert qemu_img_compare(image, "raw", out / "d.raw", "raw")


def test_restore_to_a_tls_target(short_tmp: Path, nbd_server: NbdServerFactory) -> None:
    psk = _psk_file(short_tmp)
    image = make_image(short_tmp / "src.raw", "raw", SIZE, OPS)
    arc = short_tmp / "a.arc"
    assert_ok(agent("backup", "--image", f"d={image}", "-o", arc))
    target = make_image(short_tmp / "t.raw", "raw", SIZE, [("write", 0xFF, 0, SIZE)])
    server = _tls_server(nbd_server, target, psk, readonly=False)
    assert_ok(agent("restore", arc, "--device", "d", "--to", _tls_uri(server, psk)))
    server.stop()
    assert qemu_img_compare(image, "raw", target, "raw")
