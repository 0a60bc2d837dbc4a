"""Encrypted archives (docs/FORMAT.md, "Encryption"): round trips, what stays in the clear,
and every way of altering one refused; key files and passphrases (agent/keys.py)."""

from __future__ import annotations

import io
import os
import random
import tempfile
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace

import pytest

from agent import keys
from agent.archive import crypto
from agent.archive.codec import CompressionSpec
from agent.archive.format import (
    VERSION_MINOR_ENCRYPTED,
    Compression,
    Encryption,
    Header,
    Kind,
    RecordType,
)
from agent.archive.output import SequentialOutput
from agent.archive.reader import ArchiveReader, DataRecord
from agent.archive.writer import ArchiveWriter
from agent.errors import AgentError, ArchiveError, InvalidArgument
from tests.unit.archive_util import HEADER, assemble, flip, read_archive, renumber, split

PATTERN = b"DISTINCTIVE-DISK-PATTERN-0123456789"
CONFIG = b"<domain><name>distinctive-config-string-7f3a</name></domain>"
K1 = keys.generate(random.Random(1).randbytes)
K2 = keys.generate(random.Random(2).randbytes)
OTHER = keys.generate(random.Random(3).randbytes)
FULL_HEADER = replace(HEADER, checkpoint="cp-1", props={"vm": "distinctive-vm-name"})


def _build(w: ArchiveWriter) -> None:
    w.add_device("vda", 3 * 4096)
    w.add_config("vm.xml", CONFIG, CompressionSpec.parse("zstd"))
    block = (PATTERN * 200)[:4096]
    w.write_data(0, 0, 4096, Compression.NONE, block)
    w.write_zero(0, 4096, 4096)
    w.write_data(0, 8192, 4096, Compression.NONE, block[::-1])


def write(recipients: Sequence[bytes] = (K1.public,), header: Header = FULL_HEADER,
          build: Callable[[ArchiveWriter], None] = _build, seed: int = 7) -> bytes:
    with tempfile.TemporaryFile() as f:
        w = ArchiveWriter(SequentialOutput(f.fileno(), "test"), header, encrypt_to=recipients,
                          rng=random.Random(seed).randbytes)
        build(w)
        w.finish()
        f.seek(0)
        return f.read()


SMALL = write()


def read(data: bytes, *with_keys: keys.KeyPair) -> list[tuple[int, bytes]]:
    r = ArchiveReader(io.BytesIO(data), keys=[k.private for k in with_keys])
    out = []
    for rec in r.records():
        if isinstance(rec, DataRecord):
            out.append((rec.offset, bytes(rec.data())))
    return out


def test_round_trip_with_each_of_two_recipients() -> None:
    data = write([K1.public, K2.public])
    plain = read_archive(write_plain())
    for k in (K1, K2):
        r = ArchiveReader(io.BytesIO(data), keys=[k.private])
        assert r.header == replace(FULL_HEADER, encryption=Encryption.X25519_AES256GCM,
                                   encryption_params=r.header.encryption_params)
        assert [d.name for d in r.devices] == ["vda"]
        assert r.config("vm.xml") == CONFIG
        assert read(data, k) == plain.data["vda"]
    # Either key among others will do.
    assert read(data, OTHER, K2) == plain.data["vda"]


def write_plain() -> bytes:
    with tempfile.TemporaryFile() as f:
        w = ArchiveWriter(SequentialOutput(f.fileno(), "test"), FULL_HEADER)
        _build(w)
        w.finish()
        f.seek(0)
        return f.read()


def test_nothing_but_the_clear_fields_is_readable() -> None:
    for needle in (PATTERN[:16], PATTERN[-16:], CONFIG[10:30], b"distinctive", b"vda",
                   b"vm.xml", b"cp-1", b"unit-test"):
        assert needle not in SMALL
    assert SMALL[10:12] == VERSION_MINOR_ENCRYPTED.to_bytes(2, "little")
    with pytest.raises(crypto.KeyRequired) as e:
        ArchiveReader(io.BytesIO(SMALL))
    clear = e.value.header
    assert (clear.uuid, clear.kind, clear.created_ns, clear.parent_uuid) == (
        HEADER.uuid, Kind.FULL, HEADER.created_ns, None)
    assert (clear.tool_version, clear.checkpoint, dict(clear.props)) == ("", "", {})
    assert [s.fingerprint for s in crypto.stanzas(clear.encryption_params)] == [
        crypto.fingerprint(K1.public)]
    assert str(e.value) == (f"the archive is encrypted (recipient keys {K1.fingerprint}): "
                            "give --key KEYFILE")


def test_plain_archives_do_not_change() -> None:
    assert write_plain()[10:12] == b"\0\0"
    assert b"distinctive-vm-name" in write_plain()


def test_a_key_that_is_not_a_recipient() -> None:
    with pytest.raises(InvalidArgument, match=f"the archive is encrypted for other keys "
                       f"\\(recipients {K1.fingerprint}\\), not for the key given "
                       f"\\({OTHER.fingerprint}\\)"):
        read(SMALL, OTHER)


def test_same_rng_same_archive_and_a_fresh_key_per_archive() -> None:
    assert write() == SMALL
    again = write(seed=8)
    assert len(again) == len(SMALL) and again != SMALL
    # Same plain records, a different data key: no sealed body is shared.
    a, b = split(SMALL).records, split(again).records
    assert all(x.body != y.body for x, y in zip(a[1:], b[1:], strict=True))


@pytest.mark.slow
def test_any_single_bit_flip_is_caught() -> None:
    for i in range(len(SMALL)):
        with pytest.raises(ArchiveError):
            read(flip(SMALL, i, 1 << (i % 8)), K1)


# Alterations by someone who can recompute every digest, CRC and footer (they are not
# keyed), but holds no private key: only the seals stand in the way.

def _data_positions(recs: list) -> list[int]:  # type: ignore[type-arg]
    return [i for i, r in enumerate(recs) if r.rtype == RecordType.DATA]


def _refused(recs: list, match: str = "does not authenticate") -> None:  # type: ignore[type-arg]
    with pytest.raises(ArchiveError, match=match):
        read(assemble(recs, seal=False), K1)


def test_records_reordered() -> None:
    recs = split(SMALL).records
    a, b = _data_positions(recs)
    recs[a], recs[b] = recs[b], recs[a]
    _refused(renumber(recs))
    _refused(recs, "sequence number")  # with their own numbers: out of order


def test_record_dropped() -> None:
    recs = split(SMALL).records
    del recs[_data_positions(recs)[0]]
    _refused(renumber(recs))


def test_record_duplicated() -> None:
    recs = split(SMALL).records
    a = _data_positions(recs)[0]
    recs.insert(a, recs[a])
    _refused(renumber(recs))


def test_record_spliced_from_another_archive_with_the_same_key() -> None:
    mine, theirs = split(SMALL).records, split(write(seed=9)).records
    a = _data_positions(mine)[0]
    mine[a] = theirs[a]  # the same place, the same seq, another archive
    _refused(mine)


def test_clear_header_fields_altered() -> None:
    recs = split(SMALL).records
    body = bytearray(recs[0].body)
    body[16:32] = uuid.UUID(int=99).bytes  # claim a parent
    body[40] = Kind.INCREMENTAL
    recs[0] = replace(recs[0], body=bytes(body))
    _refused(recs, "record 1 at byte .* does not authenticate")


def test_end_dropped_or_replaced_by_a_forged_plain_one() -> None:
    recs = split(SMALL).records
    with pytest.raises(ArchiveError, match="incomplete"):
        read(assemble(recs[:-1], seal=False, footer=False), K1)
    _refused([*recs[:-1], replace(recs[-1], body=bytes(88))])


def test_wrapped_key_altered() -> None:
    recs = split(SMALL).records
    body = bytearray(recs[0].body)
    body[-3] ^= 1  # in the wrapped data key, before the props count
    recs[0] = replace(recs[0], body=bytes(body))
    with pytest.raises(ArchiveError, match="does not authenticate: the archive's header was "
                                           "altered"):
        read(assemble(recs, seal=False), K1)


# --- keys -------------------------------------------------------------------------------


def test_public_key_text_round_trip_and_errors() -> None:
    text = K1.public_text
    assert text.startswith("bapub1:") and len(text) == 7 + 43
    assert keys.parse_public(text) == K1.public
    with pytest.raises(InvalidArgument, match="not a backup-agent public key"):
        keys.parse_public("age1xyz")
    with pytest.raises(InvalidArgument, match="31 bytes, expected 32"):
        keys.parse_public(keys.format_public(K1.public[:31]))


def test_private_key_file_plain_and_protected(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "k")
    keys.write_private(path, keys.encode_private(K1))
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert keys.load_private(path, lambda: None).public == K1.public
    with pytest.raises(InvalidArgument, match="exists: a key file is never overwritten"):
        keys.write_private(path, "x")
    os.chmod(path, 0o644)
    with pytest.raises(InvalidArgument, match=f"open to other users \\(mode 0644\\): run "
                                              f"chmod 600 {path}"):
        keys.load_private(path, lambda: None)

    locked = os.path.join(tmp_path, "locked")
    keys.write_private(locked, keys.encode_private(K2, b"correct horse", log_n=10))
    with open(locked, "rb") as f:
        assert b"bakey1-scrypt:" in f.read()
    assert keys.load_private(locked, lambda: b"correct horse").public == K2.public
    with pytest.raises(InvalidArgument, match="wrong passphrase"):
        keys.load_private(locked, lambda: b"battery staple")
    with pytest.raises(InvalidArgument, match="protected by a passphrase: give "
                                              "--passphrase-file FILE or set "
                                              "BACKUP_AGENT_PASSPHRASE"):
        keys.load_private(locked, lambda: None)


def test_passphrase_sources(tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch) -> None:
    f = os.path.join(tmp_path, "pw")
    with open(f, "wb") as out:
        out.write(b"s3cret\nignored\n")
    monkeypatch.setenv(keys.PASSPHRASE_ENV, "from-env")
    assert keys.passphrase_source(f)() == b"s3cret"
    assert keys.passphrase_source(None)() == b"from-env"
    monkeypatch.delenv(keys.PASSPHRASE_ENV)
    assert keys.passphrase_source(None)() is None


def test_encrypt_to_takes_a_key_or_a_file(tmp_path: os.PathLike[str]) -> None:
    assert keys.public_from_arg(K1.public_text) == K1.public
    pub = os.path.join(tmp_path, "pub")
    with open(pub, "w") as out:
        out.write(f"# a comment\n{K1.public_text}\n")
    assert keys.public_from_arg(pub) == K1.public
    priv = os.path.join(tmp_path, "priv")
    keys.write_private(priv, keys.encode_private(K1))
    with pytest.raises(InvalidArgument, match="this is a private key file"):
        keys.public_from_arg(priv)
    with pytest.raises(InvalidArgument, match="neither a public key"):
        keys.public_from_arg(os.path.join(tmp_path, "missing"))


def test_a_recipient_given_twice_or_a_low_order_key() -> None:
    with pytest.raises(InvalidArgument, match="the same recipient is given twice"):
        write([K1.public, K1.public])
    with pytest.raises(AgentError, match="not a usable X25519 key"):
        write([bytes(32)])


# --- the worked example of docs/FORMAT.md ----------------------------------------------


def test_tiny_encrypted_is_what_its_generator_builds() -> None:
    from tests.data import make_tiny_encrypted as m

    assert m.ARC_PATH.read_bytes() == m.build(), (
        "tests/data/tiny-encrypted.arc is stale: run tests/data/make_tiny_encrypted.py and "
        "update docs/FORMAT.md")
    assert m.KEY_PATH.read_text() == m.key_file()


def test_tiny_encrypted_holds_what_tiny_holds() -> None:
    from tests.data import make_tiny
    from tests.data import make_tiny_encrypted as m

    pair = keys.decode_private(m.KEY_PATH.read_text(), "key", lambda: None)
    plain = read_archive(make_tiny.TINY_PATH.read_bytes())
    r = ArchiveReader(io.BytesIO(m.ARC_PATH.read_bytes()), keys=[pair.private])
    assert replace(r.header, encryption=Encryption.NONE, encryption_params=b"") == plain.header
    assert r.config(make_tiny.CONFIG_NAME) == make_tiny.CONFIG
    got = [(rec.offset, bytes(rec.data())) if isinstance(rec, DataRecord) else rec.length
           for rec in r.records()]
    assert got == [(0, make_tiny.DATA), make_tiny.ZERO_LENGTH]
    assert replace(r.end, chain=b"", stored_bytes=0) == replace(plain.end, chain=b"",
                                                                 records=8, stored_bytes=0)


def test_tiny_encrypted_values_are_the_ones_format_md_shows() -> None:
    import hashlib
    from pathlib import Path

    from cryptography.hazmat.primitives.asymmetric.x25519 import (
        X25519PrivateKey,
        X25519PublicKey,
    )

    from tests.data import make_tiny
    from tests.data import make_tiny_encrypted as m

    doc = (Path(__file__).parents[2] / "docs" / "FORMAT.md").read_text()
    pub = m.key_pair().public
    eph = X25519PrivateKey.from_private_bytes(m.EPHEMERAL_PRIVATE)
    eph_pub = crypto.raw_public(eph)
    shared = eph.exchange(X25519PublicKey.from_public_bytes(pub))
    header_body = split(m.ARC_PATH.read_bytes()).records[0].body
    kek = crypto._hkdf(shared, eph_pub + pub, b"backup-agent v1 key wrap"
                       + make_tiny.UUID.bytes)
    record_key = crypto._hkdf(m.DATA_KEY, None, b"backup-agent v1 records"
                              + hashlib.sha256(header_body).digest())
    for value in (pub.hex(), m.key_pair().public_text, crypto.fingerprint(pub).hex(),
                  eph_pub.hex(), shared.hex(), kek.hex(),
                  hashlib.sha256(header_body).hexdigest(), record_key.hex()):
        assert value in doc
    # The DEVICE record, sealed by hand as the document says, is the one in the file.
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    device_plain = split(make_tiny.TINY_PATH.read_bytes()).records[1].body
    ad = make_tiny.UUID.bytes + (2).to_bytes(8, "little") + b"\x02\x00\x00\x00"
    sealed = AESGCM(record_key).encrypt((2).to_bytes(12, "little"), device_plain, ad)
    assert split(m.ARC_PATH.read_bytes()).records[2].body == sealed


def test_format_md_hexdump_of_the_clear_header_matches() -> None:
    from tests.data import make_tiny_encrypted as m
    from tests.unit.test_format import FORMAT_MD, _bytes_from_hexdump

    text = FORMAT_MD.read_text(encoding="utf-8")
    section = text[text.index("### Example: `tests/data/tiny-encrypted.arc`"):
                   text.index("## Limits")]
    shown = _bytes_from_hexdump(section)
    data = m.ARC_PATH.read_bytes()
    assert sorted(shown) == list(range(0xd4))
    assert bytes(shown[p] for p in range(0xd4)) == data[:0xd4]


# --- what reads archive files without a key ---------------------------------------------


def test_retention_sees_an_encrypted_archive_complete_without_a_key(tmp_path: os.PathLike[str]
                                                                    ) -> None:
    from agent.archive.indexed import IndexedArchive, seal_of
    from agent.jobs.catalog import read_desc

    path = os.path.join(tmp_path, "a.arc")
    with open(path, "wb") as f:
        f.write(SMALL)
    seal = seal_of(path)
    assert seal.end is None and seal.footer.archive_len == len(SMALL)
    desc = read_desc(path)
    assert (desc.uuid, desc.kind, desc.complete) == (HEADER.uuid, Kind.FULL, True)
    with open(path, "wb") as f:
        f.write(SMALL[:-60])  # cut inside END and the footer
    assert read_desc(path).complete is False
    with open(path, "wb") as f:
        f.write(SMALL)
    with pytest.raises(crypto.KeyRequired, match=r"is encrypted .*give --key"):
        IndexedArchive(path)


def test_plain_archives_do_not_import_cryptography() -> None:
    import subprocess
    import sys

    code = ("import sys, io; from tests.unit.test_encryption import write_plain; "
            "from agent.archive.reader import ArchiveReader; "
            "list(ArchiveReader(io.BytesIO(write_plain())).records()); "
            "print('cryptography' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code.replace(
        "from tests.unit.test_encryption import write_plain; ", _PLAIN_WRITER)],
        capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


_PLAIN_WRITER = ("import tempfile, uuid; from agent.archive.format import Header; "
                 "from agent.archive.output import SequentialOutput; "
                 "from agent.archive.writer import ArchiveWriter\n"
                 "def write_plain():\n"
                 "    with tempfile.TemporaryFile() as f:\n"
                 "        w = ArchiveWriter(SequentialOutput(f.fileno(), 't'), "
                 "Header(uuid=uuid.UUID(int=1), created_ns=0, tool_version='t'))\n"
                 "        w.add_device('vda', 0); w.finish(); f.seek(0); return f.read()\n")


# --- random access with a key (info, serve) ---------------------------------------------


def _expected_disk() -> bytes:
    block = (PATTERN * 200)[:4096]
    return block + bytes(4096) + block[::-1]


def test_random_access_with_a_key_reads_what_the_stream_reads(tmp_path: os.PathLike[str]
                                                               ) -> None:
    from agent.archive.indexed import IndexedArchive

    path = os.path.join(tmp_path, "a.arc")
    with open(path, "wb") as f:
        f.write(write([K1.public, K2.public]))
    for key in (K1, K2):
        with IndexedArchive(path, [OTHER.private, key.private]) as arc:
            assert arc.header.checkpoint == "cp-1"  # from DETAILS: opened with the key
            assert arc.header.props == {"vm": "distinctive-vm-name"}
            assert [(d.name, d.size) for d in arc.devices] == [("vda", 3 * 4096)]
            assert arc.end.data_bytes == 8192 and arc.end.zero_bytes == 4096
            assert arc.index is not None and arc.index.entries == 3
            assert arc.read("vda", 0, 3 * 4096) == _expected_disk()
            assert arc.read("vda", 4000, 200) == _expected_disk()[4000:4200]
    with pytest.raises(InvalidArgument, match="is encrypted for other keys"):
        IndexedArchive(path, [OTHER.private])


@pytest.mark.slow
def test_random_access_never_returns_altered_data(tmp_path: os.PathLike[str]) -> None:
    """Every single-bit flip of a small encrypted archive: opening it with the key and
    reading its whole device either fails, or reads exactly the original (a flip in a part
    random access does not read, such as a ZERO record between two others: only ``verify``
    reads everything)."""
    from agent.archive.indexed import IndexedArchive

    path = os.path.join(tmp_path, "a.arc")
    refused = 0
    for i in range(len(SMALL)):
        with open(path, "wb") as f:
            f.write(flip(SMALL, i, 1 << (i % 8)))
        try:
            with IndexedArchive(path, [K1.private]) as arc:
                got = arc.read("vda", 0, 3 * 4096)
        except (ArchiveError, InvalidArgument):
            refused += 1
            continue
        assert got == _expected_disk(), f"byte {i} flipped: other data read"
    assert refused >= len(SMALL) * 9 // 10, (refused, len(SMALL))
