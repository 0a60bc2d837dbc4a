"""The agent's TLS credentials, and the rule that nothing crosses a network in clear text.

A live backup from another host makes three TCP connections, each under TLS::

    agent ──QMP (x509)──────────────▶ QEMU's monitor chardev       (tls-creds on -chardev)
    agent ──NBD (PSK or x509)───────▶ QEMU's NBD server            (nbd-server-start tls-creds)
    QEMU  ──NBD (PSK or x509)───────▶ the agent's nbdkit target    (nbdkit --tls=require)

The credentials are files, named the way QEMU and libnbd name them, so one directory can be
copied between the tools:

- ``--tls-creds DIR`` (x509): ``ca-cert.pem`` (the CA that signed the peers' certificates),
  ``client-cert.pem`` and ``client-key.pem`` (the agent's certificate as a client of QMP and
  of QEMU's NBD server) and, when QEMU reaches the copy-before-write target over x509,
  ``server-cert.pem`` and ``server-key.pem`` (the agent's host as an NBD server; nbdkit's
  names). One certificate with both ``serverAuth`` and ``clientAuth`` may serve as both.
- ``--tls-psk FILE``: ``USER:HEXKEY`` lines (QEMU's and nbdkit's ``keys.psk``). It protects
  the two NBD connections only: Python 3.11's ``ssl`` has no TLS-PSK, so QMP over TCP always
  needs x509 (``--tls-creds``).

Private keys and PSK files must not be open to other users: group read is allowed (a key
shared with a service's group, Debian's ``ssl-cert`` convention), group write and any access
by others are refused with the ``chmod`` to run. The same rule holds for every such file.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.errors import InvalidArgument

if TYPE_CHECKING:
    import ssl

    import nbd

#: x509 file names, as QEMU, libnbd and nbdkit expect them in a credentials directory.
CA_CERT = "ca-cert.pem"
CLIENT_CERT = "client-cert.pem"
CLIENT_KEY = "client-key.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"

#: Permission bits a private key or PSK file must not have: group write, anything for others.
_UNSAFE_BITS = stat.S_IWGRP | stat.S_IRWXO

_PSK_LINE = re.compile(r"([^:\s]+):([0-9a-fA-F]+)")

SETUP_HINT = "see docs/NETWORK.md"


#: Ids of QEMU's TLS credentials objects the agent uses unless told otherwise (created by the
#: VM's administrator: docs/NETWORK.md).
QEMU_TLS_SERVER = "backup-tls"  # endpoint=server: QEMU's NBD server
QEMU_TLS_CLIENT = "backup-tls-client"  # endpoint=client: QEMU's connection to the CBW target

def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (traffic to it never leaves the host)."""
    if host == "localhost":
        return True
    import ipaddress  # here: only a URI naming a host needs it, not every start

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_private(path: str, what: str) -> None:
    """Refuse a key file that other users may read or change, naming the fix."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InvalidArgument(f"{what} {path}: no such file") from None
    except OSError as e:
        raise InvalidArgument(f"{what} {path}: {e.strerror or e}") from e
    if not stat.S_ISREG(st.st_mode):
        raise InvalidArgument(f"{what} {path}: not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & _UNSAFE_BITS:
        raise InvalidArgument(
            f"{what} {path} is open to other users (mode {mode:04o}): run chmod 600 {path}"
        )


def psk_users(path: str) -> list[str]:
    """The identities in a PSK file (``USER:HEXKEY`` lines), checked for format."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise InvalidArgument(f"PSK file {path}: {e.strerror or e}") from e
    users = []
    for n, line in enumerate(lines, 1):
        m = _PSK_LINE.fullmatch(line)
        if m is None:
            raise InvalidArgument(f"PSK file {path}, line {n}: expected USER:HEXKEY (make one "
                                  "with: echo \"backup:$(openssl rand -hex 32)\")")
        users.append(m.group(1))
    if not users:
        raise InvalidArgument(f"PSK file {path} holds no key")
    return users


@dataclass(frozen=True)
class TlsCreds:
    """The agent's credentials: an x509 directory, a PSK file, or both (x509 for QMP, PSK
    for NBD). Build with :meth:`load`, which checks the files."""

    x509_dir: str | None = None
    psk_file: str | None = None
    psk_user: str | None = None

    @classmethod
    def load(cls, x509_dir: str | None, psk_file: str | None,
             psk_user: str | None = None) -> TlsCreds | None:
        """Check what was given; None when neither was."""
        if psk_user is not None and psk_file is None:
            raise InvalidArgument("--tls-username names the identity in a PSK file: it needs "
                                  "--tls-psk FILE")
        if x509_dir is None and psk_file is None:
            return None
        if x509_dir is not None:
            if not os.path.isdir(x509_dir):
                raise InvalidArgument(f"TLS credentials directory {x509_dir}: no such "
                                      "directory")
            ca = os.path.join(x509_dir, CA_CERT)
            if not os.path.isfile(ca):
                raise InvalidArgument(f"TLS credentials directory {x509_dir} has no {CA_CERT} "
                                      "(the CA that signed the other hosts' certificates)")
            for name in (CLIENT_KEY, SERVER_KEY):
                key = os.path.join(x509_dir, name)
                if os.path.exists(key):
                    check_private(key, "private key")
        if psk_file is not None:
            check_private(psk_file, "PSK file")
            users = psk_users(psk_file)
            if psk_user is None:
                psk_user = users[0]
            elif psk_user not in users:
                raise InvalidArgument(f"PSK file {psk_file} has no key for user {psk_user!r} "
                                      f"(it has: {', '.join(users)})")
        return cls(x509_dir, psk_file, psk_user)

    @property
    def nbd_kind(self) -> str:
        """``psk`` or ``x509``: how the NBD connections authenticate."""
        return "psk" if self.psk_file else "x509"

    @property
    def directory(self) -> str:
        """The x509 directory; :class:`InvalidArgument` when only a PSK was given."""
        if self.x509_dir is None:
            raise InvalidArgument("x509 certificates are needed here: give --tls-creds DIR")
        return self.x509_dir

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def qmp_context(self) -> ssl.SSLContext:
        """The client context for QMP over TLS: verify QEMU's certificate (and its name)
        against ``ca-cert.pem``; present ``client-cert.pem`` when there is one (QEMU with
        ``verify-peer=on``, the default, asks for it)."""
        if self.x509_dir is None:
            raise InvalidArgument(
                "QMP over TCP needs x509 certificates: give --tls-creds DIR (ca-cert.pem, "
                "client-cert.pem, client-key.pem); a PSK (--tls-psk) protects only the NBD "
                f"connections, as Python's ssl module has no TLS-PSK ({SETUP_HINT})")
        import ssl  # here: commands that never speak TLS need not load it (7 ms)

        try:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                             cafile=self._path(CA_CERT))
            cert = self._path(CLIENT_CERT)
            if os.path.exists(cert):
                ctx.load_cert_chain(cert, self._path(CLIENT_KEY))
        except (ssl.SSLError, OSError) as e:
            raise InvalidArgument(f"TLS credentials in {self.x509_dir}: {e}") from e
        return ctx

    def nbd_client(self, h: nbd.NBD) -> None:
        """Make a libnbd handle require TLS with these credentials (before it connects)."""
        import nbd  # here: the CLI imports this module, and libnbd costs 10 ms to load

        h.set_tls(nbd.TLS_REQUIRE)
        if self.psk_file is not None:
            h.set_tls_psk_file(self.psk_file)
            # libnbd would fall back to the login name, which fails on many hosts
            h.set_tls_username(self.psk_user or "")
        else:
            h.set_tls_certificates(self.directory)

    def nbdkit_args(self) -> list[str]:
        """nbdkit options to serve only TLS clients holding these credentials."""
        if self.psk_file is not None:
            return ["--tls=require", f"--tls-psk={self.psk_file}"]
        for name in (SERVER_CERT, SERVER_KEY):
            if not os.path.isfile(self._path(name)):
                raise InvalidArgument(
                    f"TLS credentials directory {self.x509_dir} has no {name}: QEMU reaches "
                    "the copy-before-write target on this host over x509, so this host needs "
                    f"a server certificate too (or use --tls-psk FILE; {SETUP_HINT})")
        check_private(self._path(SERVER_KEY), "private key")
        # --tls-verify-peer: only QEMU (a certificate from our CA) may write or read old
        # clusters of the disk.
        return ["--tls=require", f"--tls-certificates={self.directory}",
                "--tls-verify-peer"]


def require_tls(what: str, address: str, creds: TlsCreds | None,
                insecure: bool) -> TlsCreds | None:
    """The credentials for a TCP connection to or from ``address``, or None for clear text,
    which is refused unless ``insecure`` (``--insecure-plaintext``) says so in so many words."""
    if insecure:
        if creds is not None:
            raise InvalidArgument("--insecure-plaintext turns TLS off: do not combine it with "
                                  "--tls-creds or --tls-psk")
        return None
    if creds is None:
        raise InvalidArgument(
            f"{what} at {address} is reached over TCP, and backup-agent sends no disk data or "
            "commands over a network in clear text: set up TLS and give --tls-creds DIR "
            f"(x509) and optionally --tls-psk FILE ({SETUP_HINT}), or accept clear text "
            "with --insecure-plaintext"
        )
    return creds


def check_nbd_uri(uri: str, insecure: bool, device: str | None = None) -> None:
    """Refuse an ``nbd://`` URI (NBD over TCP in clear text) to another host unless
    ``insecure``: the disk would cross the network readable by anyone on the way. Refuse
    a URI that cannot be parsed, naming ``device`` (the NAME of ``--source NAME=URI``)."""
    from urllib.parse import urlsplit  # here: a restore into a file never parses a URI

    try:
        parts = urlsplit(uri)
        hostname = parts.hostname  # checks a bracketed host: nbd://[bad]/ raises here
    except ValueError as e:  # nbd://[bad: "Invalid IPv6 URL"
        what = f"--source {device}" if device is not None else "NBD URI"
        raise InvalidArgument(f"{what}: {uri} is not a valid URI: {e}") from e
    if parts.scheme != "nbd" or insecure:
        return
    host = hostname or "localhost"
    if is_loopback(host):
        return
    raise InvalidArgument(
        f"{uri} is NBD over TCP in clear text: use nbds:// with TLS (add "
        "?tls-psk-file=FILE or ?tls-certificates=DIR to the URI, e.g. "
        f"nbds://{parts.netloc}{parts.path or '/'}?tls-psk-file=/etc/backup-agent/keys.psk), "
        "or accept clear text with --insecure-plaintext"
    )
