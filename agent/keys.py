"""Archive keys: X25519 key pairs as one-line texts, and private key files.

A public key is ``bapub1:`` and the 32 raw bytes in unpadded url-safe base64; that text is
what ``--encrypt-to`` takes, directly or in a file. A private key file holds one line::

    bakey1:<base64 of the 32-byte private key>
    bakey1-scrypt:<salt>:<log2 N>:<r>:<p>:<base64 of AES-256-GCM(scrypt key, 0, private key)>

the second protected by a passphrase (scrypt, then AES-256-GCM with the key file's
label as associated data). Lines starting with ``#`` are comments: ``key generate``
writes the public key there too. A private key file must not be open to other users
(the rule of :func:`agent.tls.check_private`).
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from agent.archive.crypto import KEY_SIZE, fingerprint, raw_public
from agent.errors import AgentError, InvalidArgument
from agent.tls import check_private

PUBLIC_PREFIX = "bapub1:"
PRIVATE_PREFIX = "bakey1:"
SCRYPT_PREFIX = "bakey1-scrypt:"
#: scrypt's cost: 2^15 x 8 x 128 bytes = 32 MiB and ~0.1 s, as age and OpenSSL's defaults.
SCRYPT_LOG_N = 15
SCRYPT_R = 8
SCRYPT_P = 1
_MAX_LOG_N = 22  # a file cannot make us spend more than 4 GiB
_AD = b"backup-agent private key v1"
#: Environment variable holding the passphrase, for scripts and jobs (or --passphrase-file).
PASSPHRASE_ENV = "BACKUP_AGENT_PASSPHRASE"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _unb64(text: str, what: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError as e:
        raise InvalidArgument(f"{what}: not valid base64") from e


def format_public(public: bytes) -> str:
    return PUBLIC_PREFIX + _b64(public)


def parse_public(text: str, what: str = "public key") -> bytes:
    """The 32 bytes of a ``bapub1:`` text; a clear error for anything else."""
    text = text.strip()
    if not text.startswith(PUBLIC_PREFIX):
        raise InvalidArgument(f"{what} {text[:40]!r} is not a backup-agent public key "
                              f"({PUBLIC_PREFIX}..., as `backup-agent key public` prints)")
    raw = _unb64(text[len(PUBLIC_PREFIX):], what)
    if len(raw) != KEY_SIZE:
        raise InvalidArgument(f"{what}: {len(raw)} bytes, expected {KEY_SIZE}")
    return raw


def public_from_arg(arg: str) -> bytes:
    """``--encrypt-to``'s value: a public key, or a file holding one (its first key line)."""
    if arg.strip().startswith(PUBLIC_PREFIX):
        return parse_public(arg)
    try:
        with open(arg, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else "not text"
        raise InvalidArgument(f"--encrypt-to {arg}: neither a public key ({PUBLIC_PREFIX}...) "
                              f"nor a readable file holding one ({why})") from e
    if lines and lines[0].startswith(("bakey1", SCRYPT_PREFIX)):
        raise InvalidArgument(f"--encrypt-to {arg}: this is a private key file; give its "
                              "public key (`backup-agent key public FILE` prints it)")
    if not lines:
        raise InvalidArgument(f"--encrypt-to {arg}: the file holds no public key")
    return parse_public(lines[0], f"public key in {arg}")


@dataclass(frozen=True)
class KeyPair:
    private: X25519PrivateKey
    public: bytes

    @property
    def public_text(self) -> str:
        return format_public(self.public)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public).hex()


def generate(rng: Callable[[int], bytes] = os.urandom) -> KeyPair:
    priv = X25519PrivateKey.from_private_bytes(rng(KEY_SIZE))
    return KeyPair(priv, raw_public(priv))


def raw_private(key: X25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
    )

    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def _scrypt(passphrase: bytes, salt: bytes, log_n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=KEY_SIZE, n=1 << log_n, r=r, p=p).derive(passphrase)


def encode_private(pair: KeyPair, passphrase: bytes | None = None,
                   rng: Callable[[int], bytes] = os.urandom, log_n: int = SCRYPT_LOG_N) -> str:
    """The key file's text: a comment with the public key, then the key line."""
    raw = raw_private(pair.private)
    if passphrase is None:
        line = PRIVATE_PREFIX + _b64(raw)
    else:
        salt = rng(16)
        sealed = AESGCM(_scrypt(passphrase, salt, log_n, SCRYPT_R, SCRYPT_P)).encrypt(
            bytes(12), raw, _AD)
        line = (f"{SCRYPT_PREFIX}{_b64(salt)}:{log_n}:{SCRYPT_R}:{SCRYPT_P}:{_b64(sealed)}")
    return (f"# backup-agent private key: keep it secret, keep it safe\n"
            f"# public key: {pair.public_text}\n{line}\n")


def decode_private(text: str, what: str, passphrase: Callable[[], bytes | None]) -> KeyPair:
    """A key pair from a key file's text; ``passphrase`` is asked only if it needs one."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    if len(lines) != 1:
        raise InvalidArgument(f"{what}: expected one key line ({PRIVATE_PREFIX}...), "
                              f"found {len(lines)}")
    line = lines[0]
    if line.startswith(PRIVATE_PREFIX):
        raw = _unb64(line[len(PRIVATE_PREFIX):], what)
    elif line.startswith(SCRYPT_PREFIX):
        raw = _open_scrypt(line[len(SCRYPT_PREFIX):], what, passphrase)
    else:
        raise InvalidArgument(f"{what} is not a backup-agent private key "
                              "(`backup-agent key generate -o FILE` makes one)")
    if len(raw) != KEY_SIZE:
        raise InvalidArgument(f"{what}: the key has {len(raw)} bytes, expected {KEY_SIZE}")
    priv = X25519PrivateKey.from_private_bytes(raw)
    return KeyPair(priv, raw_public(priv))


def _open_scrypt(fields: str, what: str, passphrase: Callable[[], bytes | None]) -> bytes:
    parts = fields.split(":")
    try:
        salt_t, log_n_t, r_t, p_t, sealed_t = parts
        log_n, r, p = int(log_n_t), int(r_t), int(p_t)
    except ValueError:
        raise InvalidArgument(f"{what}: a damaged passphrase-protected key line") from None
    if not (1 <= log_n <= _MAX_LOG_N and 1 <= r <= 32 and 1 <= p <= 16):
        raise InvalidArgument(f"{what}: scrypt parameters out of range")
    secret = passphrase()
    if secret is None:
        raise InvalidArgument(f"{what} is protected by a passphrase: give --passphrase-file "
                              f"FILE or set {PASSPHRASE_ENV}")
    kek = _scrypt(secret, _unb64(salt_t, what), log_n, r, p)
    try:
        return AESGCM(kek).decrypt(bytes(12), _unb64(sealed_t, what), _AD)
    except InvalidTag:
        raise InvalidArgument(f"{what}: wrong passphrase (or a damaged key file)") from None


def passphrase_source(passphrase_file: str | None) -> Callable[[], bytes | None]:
    """Where a passphrase comes from: ``--passphrase-file`` (its first line), else the
    environment variable, else nowhere. Read only when a key needs it."""

    def get() -> bytes | None:
        if passphrase_file is not None:
            try:
                with open(passphrase_file, "rb") as f:
                    first = f.readline().rstrip(b"\r\n")
            except OSError as e:
                raise InvalidArgument(f"passphrase file {passphrase_file}: "
                                      f"{e.strerror or e}") from e
            if not first:
                raise InvalidArgument(f"passphrase file {passphrase_file} is empty")
            return first
        env = os.environ.get(PASSPHRASE_ENV)
        return env.encode("utf-8") if env else None

    return get


def load_private(path: str, passphrase: Callable[[], bytes | None]) -> KeyPair:
    """A private key file, refused if other users may read it."""
    check_private(path, "private key file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(64 * 1024)
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"private key file {path}: "
                              f"{e.strerror if isinstance(e, OSError) else 'not text'}") from e
    return decode_private(text, f"private key file {path}", passphrase)


def write_private(path: str, text: str) -> None:
    """Create ``path`` with mode 0600 and the key; refuse to replace an existing file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise InvalidArgument(f"{path} exists: a key file is never overwritten (a backup "
                              "encrypted to the old key could not be read any more)") from None
    except OSError as e:
        raise AgentError(f"cannot create {path}: {e.strerror or e}") from e
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        os.unlink(path)
        raise AgentError(f"cannot write {path}: {e.strerror or e}") from e
