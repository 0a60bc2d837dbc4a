"""Encrypted archives from the command line: ``key generate``/``key public``, ``backup
--encrypt-to``, and ``--key`` on restore, verify, info and config, through real pipes; the
errors a user meets (no key, not a recipient, wrong passphrase, a key file open to others,
a tampered archive), each one line, with nothing restored left behind."""

from __future__ import annotations

import io
import json
import os
import random
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.archive.format import Compression, Header, Kind
from agent.archive.output import SequentialOutput
from agent.archive.reader import ArchiveReader
from agent.archive.writer import ArchiveWriter
from tests.integration.cli_util import (
    MiB,
    agent,
    agent_from_file,
    assert_error,
    assert_ok,
)

pytestmark = pytest.mark.integration

PATTERN = b"ENCRYPTION-TEST-PATTERN:0xC0FFEE;"
SECRET_CONFIG = b"<domain><name>distinctive-secret-vm-4f2a</name></domain>\n"


@dataclass
class Setup:
    dir: Path
    disk: Path
    config: Path
    key1: Path  # plain key file
    key2: Path  # passphrase-protected
    passphrase: Path
    pub1: str
    pub2_file: Path  # key 2's public key, in a file
    archive: bytes  # backed up to both, written to standard output


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    d = tmp_path_factory.mktemp("enc")
    disk = d / "disk.img"
    rnd = random.Random(5).randbytes(1 * MiB)
    disk.write_bytes((PATTERN * (MiB // len(PATTERN) + 1))[:MiB] + bytes(2 * MiB) + rnd)
    config = d / "vm.xml"
    config.write_bytes(SECRET_CONFIG)
    gen1 = agent("key", "generate", "-o", d / "k1")
    assert_ok(gen1)
    pub1 = gen1.stdout.decode().strip()
    passphrase = d / "pw"
    passphrase.write_text("correct horse battery staple\n")
    gen2 = agent("key", "generate", "-o", d / "k2", "--passphrase-file", passphrase)
    assert_ok(gen2)
    pub2_file = d / "k2.pub"
    pub2_file.write_bytes(gen2.stdout)
    backup = agent("backup", "--image", f"vda={disk}", "--config", f"vm.xml={config}",
                   "--encrypt-to", pub1, "--encrypt-to", pub2_file, "-o", "-")
    assert_ok(backup)
    return Setup(d, disk, config, d / "k1", d / "k2", passphrase, pub1, pub2_file,
                 backup.stdout)


def _archive(setup: Setup) -> Path:
    path = setup.dir / "both.arc"
    if not path.exists():
        path.write_bytes(setup.archive)
    return path


def test_key_generate_and_public(setup: Setup) -> None:
    assert os.stat(setup.key1).st_mode & 0o777 == 0o600
    assert setup.pub1.startswith("bapub1:")
    again = agent("key", "public", setup.key1)
    assert_ok(again)
    assert again.stdout.decode().strip() == setup.pub1
    # A protected key needs its passphrase for that.
    assert_error(agent("key", "public", setup.key2), "passphrase", "--passphrase-file")
    shown = agent("key", "public", setup.key2, "--passphrase-file", setup.passphrase)
    assert_ok(shown)
    assert shown.stdout == setup.pub2_file.read_bytes()
    before = setup.key1.read_bytes()
    assert_error(agent("key", "generate", "-o", setup.key1), "exists", "never overwritten")
    assert setup.key1.read_bytes() == before


def test_no_plaintext_in_the_archive(setup: Setup) -> None:
    data = setup.archive
    for needle in (PATTERN, PATTERN[:12], SECRET_CONFIG[:24], b"distinctive-secret",
                   b"vm.xml"):
        assert needle not in data


@pytest.mark.parametrize("which", ["key1", "key2"])
def test_restore_from_a_pipe_with_either_key(setup: Setup, which: str, tmp_path: Path) -> None:
    extra = ["--passphrase-file", str(setup.passphrase)] if which == "key2" else []
    out = tmp_path / "out"
    proc = agent_from_file(_archive(setup), "restore", "-", "--to-dir", out,
                           "--key", getattr(setup, which), *extra)
    assert_ok(proc)
    assert (out / "vda.raw").read_bytes() == setup.disk.read_bytes()


def test_passphrase_from_the_environment(setup: Setup) -> None:
    env = {**os.environ, "BACKUP_AGENT_PASSPHRASE": "correct horse battery staple"}
    import subprocess

    from tests.integration.cli_util import AGENT

    proc = subprocess.run([AGENT, "verify", str(_archive(setup)), "--key", str(setup.key2)],
                          capture_output=True, env=env, timeout=120, check=False)
    assert_ok(proc)


def test_verify_config_and_info(setup: Setup) -> None:
    arc = _archive(setup)
    assert_ok(agent("verify", arc, "--key", setup.key1))
    cfg = agent_from_file(arc, "config", "-", "vm.xml", "--key", setup.key1)
    assert_ok(cfg)
    assert cfg.stdout == SECRET_CONFIG
    full = agent("info", arc, "--json", "--key", setup.key1)
    assert_ok(full)
    info = json.loads(full.stdout)
    assert info["devices"][0]["name"] == "vda"
    assert info["configs"] == [{"name": "vm.xml", "size": len(SECRET_CONFIG)}]
    assert len(info["encrypted_to"]) == 2


@pytest.mark.parametrize("source", ["file", "pipe"])
def test_info_without_a_key_shows_only_the_clear_fields(setup: Setup, source: str) -> None:
    arc = _archive(setup)
    proc = (agent("info", arc, "--json") if source == "file"
            else agent_from_file(arc, "info", "-", "--json"))
    assert_ok(proc)
    info = json.loads(proc.stdout)
    assert set(info) == {"format", "uuid", "created", "kind", "parent_uuid", "encrypted_to",
                         "locked"}  # format: ours or VMA, known before any key
    assert info["kind"] == "full" and info["locked"] is True
    human = agent("info", arc)
    assert_ok(human)
    text = human.stdout.decode()
    assert "everything else (devices, configs, data, totals) is encrypted" in text
    assert "vda" not in text


def test_errors(setup: Setup, tmp_path: Path) -> None:
    arc = _archive(setup)
    out = tmp_path / "out"
    assert_error(agent("restore", arc, "--to-dir", out), "is encrypted", "--key KEYFILE")
    other = tmp_path / "other"
    assert_ok(agent("key", "generate", "-o", other))
    assert_error(agent("restore", arc, "--to-dir", out, "--key", other),
                 "encrypted for other keys")
    wrong = tmp_path / "wrong-pw"
    wrong.write_text("battery staple\n")
    assert_error(agent("verify", arc, "--key", setup.key2, "--passphrase-file", wrong),
                 "wrong passphrase")
    loose = tmp_path / "loose"
    loose.write_bytes(setup.key1.read_bytes())
    loose.chmod(0o644)
    msg = assert_error(agent("verify", arc, "--key", loose), "open to other users")
    assert f"chmod 600 {loose}" in msg
    assert_error(agent("backup", "--image", f"vda={setup.disk}", "--encrypt-to", "bapub1:xyz",
                       "-o", tmp_path / "x.arc"), "public key")
    assert not (tmp_path / "x.arc").exists()
    assert not out.exists() or not any(out.iterdir())


def test_a_tampered_archive_restores_nothing(setup: Setup, tmp_path: Path) -> None:
    data = bytearray(setup.archive)
    data[len(data) // 2] ^= 0x20  # inside the data records
    bad = tmp_path / "bad.arc"
    bad.write_bytes(bytes(data))
    out = tmp_path / "out"
    assert_error(agent("restore", bad, "--to-dir", out, "--key", setup.key1),
                 "fails its checksum")
    assert not out.exists() or not any(out.iterdir())


# --- a chain mixing encrypted and plain archives -----------------------------------------


def _write(path: Path, header: Header, blocks: dict[int, bytes], size: int,
           recipients: list[bytes]) -> None:
    with open(path, "wb") as f:
        w = ArchiveWriter(SequentialOutput(f.fileno(), str(path)), header,
                          encrypt_to=recipients)
        w.add_device("vda", size)
        covered = 0
        for off in sorted(blocks):
            w.write_data(0, off, len(blocks[off]), Compression.NONE, blocks[off])
            covered += len(blocks[off])
        if header.kind == Kind.FULL and covered < size:
            w.write_zero(0, covered, size - covered)
        w.finish()


def test_chain_mixing_encrypted_and_plain_archives(setup: Setup, tmp_path: Path) -> None:
    from agent.keys import parse_public

    size = 64 * 1024
    a, b, c = (uuid.UUID(int=n) for n in (1, 2, 3))
    full = tmp_path / "full.arc"
    inc1 = tmp_path / "inc1.arc"
    inc2 = tmp_path / "inc2.arc"
    _write(full, Header(a, 1, "t"), {0: b"F" * size}, size, [parse_public(setup.pub1)])
    _write(inc1, Header(b, 2, "t", Kind.INCREMENTAL, a), {4096: b"1" * 4096}, size, [])
    pub2 = parse_public(setup.pub2_file.read_text())
    _write(inc2, Header(c, 3, "t", Kind.INCREMENTAL, b), {8192: b"2" * 4096}, size, [pub2])
    out = tmp_path / "out"
    # Chain checks read only clear fields: the order is checked without any key...
    assert_error(agent("restore", full, inc2, inc1, "--to-dir", out, "--key", setup.key1,
                       "--key", setup.key2, "--passphrase-file", setup.passphrase),
                 "wrong order")
    # ... and each archive opens with whichever key is its recipient's.
    assert_error(agent("restore", full, inc1, inc2, "--to-dir", out, "--key", setup.key1),
                 "inc2.arc is encrypted for other keys")
    assert not out.exists() or not any(out.iterdir())
    proc = agent("restore", full, inc1, inc2, "--to-dir", out, "--key", setup.key1,
                 "--key", setup.key2, "--passphrase-file", setup.passphrase)
    assert_ok(proc)
    want = bytearray(b"F" * size)
    want[4096:8192] = b"1" * 4096
    want[8192:12288] = b"2" * 4096
    assert (out / "vda.raw").read_bytes() == bytes(want)


def test_round_trip_through_the_reader_api(setup: Setup) -> None:
    """Configs and headers through the library, for code that reads archives itself."""
    from agent import keys

    pair = keys.load_private(str(setup.key1), lambda: None)
    r = ArchiveReader(io.BytesIO(setup.archive), keys=[pair.private])
    assert [d.name for d in r.devices] == ["vda"]
    assert r.config("vm.xml") == SECRET_CONFIG


def test_key_generate_refuses_an_empty_passphrase(tmp_path: Path) -> None:
    import subprocess

    from tests.integration.cli_util import AGENT

    env = {**os.environ, "BACKUP_AGENT_PASSPHRASE": ""}
    proc = subprocess.run([AGENT, "key", "generate", "-o", str(tmp_path / "k")],
                          capture_output=True, env=env, timeout=120, check=False)
    assert_error(proc, "BACKUP_AGENT_PASSPHRASE is set but empty")
    assert not (tmp_path / "k").exists()
