"""Encryption at rest: the data key wrapped for each recipient, and each record sealed.

docs/FORMAT.md ("Encryption") is the specification; this module mirrors it::

    data key (32 random bytes, one per archive)
      ├─ wrapped for each recipient: X25519(ephemeral, recipient) ─HKDF-SHA256─▶ KEK,
      │                              AES-256-GCM(KEK, nonce 0, data key)   in HEADER
      └─ HKDF-SHA256(data key, info = label ‖ SHA-256(HEADER body)) ─▶ record key
            every record after HEADER: body = AES-256-GCM(record key,
                nonce = seq ‖ 0000, associated data = uuid ‖ seq ‖ type ‖ flags, plain body)

The record key depends on the whole clear HEADER body, so changing any clear field (parent,
kind, creation time, a recipient) makes every record fail to open. Nonces never repeat under
one key: a record key belongs to one archive (a fresh random data key), and within an
archive the nonce is the record's sequence number, which the writer uses once.

Pure functions over bytes, apart from the random source (``rng``), which tests replace to
make archives reproducible.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from uuid import UUID

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.archive.format import Encryption, Header
from agent.errors import ArchiveError, InvalidArgument

Rng = Callable[[int], bytes]

KEY_SIZE = 32
TAG_SIZE = 16  # AES-GCM's tag: what sealing adds to every body
FINGERPRINT_SIZE = 16
_STANZA = struct.Struct("<16s32s48s")  # fingerprint, ephemeral public key, wrapped data key
_COUNT = struct.Struct("<H")
_AD = struct.Struct("<16sQHH")  # uuid, seq, type, flags
_NONCE = struct.Struct("<Q4x")  # seq, then 4 zero bytes
_WRAP_INFO = b"backup-agent v1 key wrap"
_RECORD_INFO = b"backup-agent v1 records"
MAX_RECIPIENTS = 1024  # a HEADER stays far below MAX_BODY


def fingerprint(public: bytes) -> bytes:
    """A recipient's identity in the clear header: SHA-256 of its public key, 128 bits."""
    return hashlib.sha256(public).digest()[:FINGERPRINT_SIZE]


def _hkdf(ikm: bytes, salt: bytes | None, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=salt, info=info).derive(ikm)


def _kek(shared: bytes, ephemeral: bytes, recipient: bytes, uuid: UUID) -> bytes:
    if shared == bytes(KEY_SIZE):  # a low-order public key: no secret at all
        raise InvalidArgument("the recipient's public key is not a usable X25519 key")
    return _hkdf(shared, ephemeral + recipient, _WRAP_INFO + uuid.bytes)


def _exchange(private: X25519PrivateKey, public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as e:  # OpenSSL refuses a low-order point
        raise InvalidArgument("the recipient's public key is not a usable X25519 key") from e


@dataclass(frozen=True)
class Stanza:
    """The data key wrapped for one recipient."""

    fingerprint: bytes
    ephemeral: bytes
    wrapped: bytes


def wrap(data_key: bytes, recipients: Sequence[bytes], uuid: UUID, rng: Rng) -> bytes:
    """The HEADER's ``encryption_params``: the data key wrapped for each public key."""
    if not 1 <= len(recipients) <= MAX_RECIPIENTS:
        raise InvalidArgument(f"give 1 to {MAX_RECIPIENTS} recipients, not {len(recipients)}")
    if len({fingerprint(r) for r in recipients}) != len(recipients):
        raise InvalidArgument("the same recipient is given twice")
    out = [_COUNT.pack(len(recipients))]
    for pub in recipients:
        eph = X25519PrivateKey.from_private_bytes(rng(KEY_SIZE))
        eph_pub = raw_public(eph)
        kek = _kek(_exchange(eph, pub), eph_pub, pub, uuid)
        out.append(_STANZA.pack(fingerprint(pub), eph_pub,
                                AESGCM(kek).encrypt(bytes(12), data_key, None)))
    return b"".join(out)


def raw_public(private: X25519PrivateKey) -> bytes:
    """The 32 bytes of a private key's public half."""
    return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def stanzas(params: bytes | memoryview) -> list[Stanza]:
    """Decode ``encryption_params``; refuses what is not a list of whole stanzas."""
    raw = bytes(params)
    if len(raw) < _COUNT.size:
        raise ArchiveError("archive header: encryption parameters are too short")
    (n,) = _COUNT.unpack_from(raw)
    if n == 0 or len(raw) != _COUNT.size + n * _STANZA.size:
        raise ArchiveError("archive header: encryption parameters do not hold "
                           f"{n} recipient(s)")
    return [Stanza(*_STANZA.unpack_from(raw, _COUNT.size + i * _STANZA.size))
            for i in range(n)]


def unwrap(params: bytes | memoryview, keys: Sequence[X25519PrivateKey], uuid: UUID,
           label: str) -> bytes:
    """The data key, from the stanza of the first key that is a recipient."""
    found = stanzas(params)
    by_fp = {s.fingerprint: s for s in found}
    for key in keys:
        pub = raw_public(key)
        s = by_fp.get(fingerprint(pub))
        if s is None:
            continue
        kek = _kek(_exchange(key, s.ephemeral), s.ephemeral, pub, uuid)
        try:
            return AESGCM(kek).decrypt(bytes(12), s.wrapped, None)
        except InvalidTag:
            raise ArchiveError(f"{label}: the data key wrapped for key {fingerprint(pub).hex()} "
                               "does not authenticate: the archive's header was altered") from None
    fps = ", ".join(s.fingerprint.hex() for s in found)
    given = ", ".join(fingerprint(raw_public(k)).hex() for k in keys)
    raise InvalidArgument(f"{label} is encrypted for other keys (recipients {fps}), not for "
                          f"the key given ({given})")


Buf = bytes | bytearray | memoryview
#: What :meth:`RecordSealer.open` needs beyond the plain body in the buffer it is given:
#: OpenSSL's update may write up to a block less one past the bytes it was given.
OPEN_SLACK = 15


class RecordSealer:
    """Seals and opens the records of one archive with its record key: AES-256-GCM (the
    same as :class:`AESGCM`, whose ``encrypt``/``decrypt`` it would be), through the
    streaming interface, which writes into buffers it is given. cryptography 38's AESGCM
    allocates (and zeroes) a new output for every call and copies it once more: decrypting
    2 MiB records ran at 0.6-0.7 GB/s that way, at 3.1 GB/s so (one core, this machine)."""

    TAG = TAG_SIZE  # what sealing adds to a body (for readers that do not import this)

    def __init__(self, data_key: bytes, header_body: bytes, uuid: UUID) -> None:
        info = _RECORD_INFO + hashlib.sha256(header_body).digest()
        self._key = _hkdf(data_key, None, info)
        self._uuid = uuid.bytes

    def seal(self, rtype: int, flags: int, seq: int, parts: Sequence[Buf]) -> memoryview:
        """The sealed body of the plain body ``parts`` (joined), ciphertext then tag."""
        enc = Cipher(algorithms.AES(self._key), modes.GCM(_NONCE.pack(seq))).encryptor()
        enc.authenticate_additional_data(_AD.pack(self._uuid, seq, rtype, flags))
        total = sum(len(p) for p in parts)
        out = bytearray(total + TAG_SIZE + OPEN_SLACK)
        view = memoryview(out)
        at = 0
        for p in parts:
            at += enc.update_into(p, view[at:])  # type: ignore[arg-type]  # (stubs: bytes only)
        enc.finalize()
        view[total:total + TAG_SIZE] = enc.tag
        return view[:total + TAG_SIZE]

    def open(self, rtype: int, flags: int, seq: int, sealed: Buf, pos: int,
             into: bytearray | None = None) -> memoryview:
        """The plain body, only once it authenticated; decrypted into ``into`` (at least
        ``len(sealed) - TAG_SIZE + OPEN_SLACK`` bytes) when given."""
        n = len(sealed) - TAG_SIZE
        if n < 0:
            raise ArchiveError(f"record {seq} at byte {pos} is too short to be sealed")
        src = memoryview(sealed)
        dec = Cipher(algorithms.AES(self._key),
                     modes.GCM(_NONCE.pack(seq), bytes(src[n:]))).decryptor()
        dec.authenticate_additional_data(_AD.pack(self._uuid, seq, rtype, flags))
        buf = into if into is not None else bytearray(n + OPEN_SLACK)
        got = dec.update_into(src[:n], buf) if n else 0  # type: ignore[arg-type]
        try:
            dec.finalize()  # checks the tag: until then ``buf`` is handed to no one
        except InvalidTag:
            raise ArchiveError(
                f"record {seq} at byte {pos} does not authenticate: the archive was altered "
                "(or records were moved between archives)") from None
        if got != n:
            raise ArchiveError(f"record {seq} at byte {pos}: decrypted {got} of {n} bytes")
        return memoryview(buf)[:n]


def new_data_key(rng: Rng = os.urandom) -> bytes:
    return rng(KEY_SIZE)


def begin(header: Header, recipients: Sequence[bytes],
          rng: Rng = os.urandom) -> tuple[Header, RecordSealer]:
    """The clear HEADER of an encrypted archive (the data key wrapped for ``recipients``
    in its parameters) and the sealer of every record after it."""
    data_key = new_data_key(rng)
    params = wrap(data_key, recipients, header.uuid, rng)
    clear = dataclasses.replace(header, encryption=Encryption.X25519_AES256GCM,
                                encryption_params=params).clear()
    return clear, RecordSealer(data_key, clear.encode(), header.uuid)


def opener(header: Header, header_body: bytes | memoryview,
           keys: Sequence[X25519PrivateKey], label: str) -> RecordSealer:
    """The sealer that opens the records of an encrypted archive whose HEADER is
    ``header_body``, with the first of ``keys`` that is a recipient."""
    data_key = unwrap(header.encryption_params, keys, header.uuid, label)
    return RecordSealer(data_key, bytes(header_body), header.uuid)


class KeyRequired(InvalidArgument):
    """The archive is encrypted and no key was given: what is in the clear is in
    ``header`` (``info`` shows it)."""

    def __init__(self, header: Header, label: str) -> None:
        fps = ", ".join(s.fingerprint.hex() for s in stanzas(header.encryption_params))
        super().__init__(f"{label} is encrypted (recipient keys {fps}): give --key KEYFILE")
        self.header = header
