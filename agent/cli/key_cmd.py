"""``backup-agent key``: make and show the key pairs archives are encrypted to; and the
``--key``/``--passphrase-file`` options of the commands that read archives."""

from __future__ import annotations

import argparse
import logging
import os
from typing import TYPE_CHECKING

from agent.cli import common

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

log = logging.getLogger("backup-agent")

_PASSPHRASE_HELP = ("read the private key's passphrase from the first line of FILE "
                    "(default: the environment variable BACKUP_AGENT_PASSPHRASE)")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("key", parents=[parent], help="make or show encryption keys",
                       description="Archives made with --encrypt-to PUBLIC can be read only "
                       "with the private key: keep it off the hosts that make backups.")
    what = p.add_subparsers(dest="key_command", required=True, metavar="ACTION")
    gen = what.add_parser("generate", parents=[parent], help="make a key pair",
                          description="Write a new private key to KEYFILE (mode 0600, never "
                          "overwritten) and print its public key.")
    gen.add_argument("-o", "--output", metavar="KEYFILE", required=True)
    gen.add_argument("--passphrase-file", metavar="FILE",
                     help="protect the key with the passphrase on the first line of FILE "
                     "(scrypt); or set BACKUP_AGENT_PASSPHRASE")
    gen.set_defaults(run=run_generate)
    pub = what.add_parser("public", parents=[parent], help="print a private key's public key")
    pub.add_argument("keyfile", metavar="KEYFILE")
    pub.add_argument("--passphrase-file", metavar="FILE", help=_PASSPHRASE_HELP)
    pub.set_defaults(run=run_public)
    for command in (gen, pub):
        command.set_defaults(command_parser=command)


def add_key_options(p: argparse.ArgumentParser) -> None:
    """``--key`` (repeatable) and ``--passphrase-file``, for commands that read archives."""
    p.add_argument("--key", metavar="KEYFILE", action="append", default=[],
                   help="private key for encrypted archives (repeatable: a chain's archives "
                   "may be encrypted to different keys)")
    p.add_argument("--passphrase-file", metavar="FILE", help=_PASSPHRASE_HELP)


def keys_from(args: argparse.Namespace) -> tuple[X25519PrivateKey, ...]:
    """The private keys ``--key`` names, loaded and checked before anything is read."""
    if not args.key:
        return ()
    from agent import keys

    ask = keys.passphrase_source(args.passphrase_file)
    loaded = []
    for path in args.key:
        pair = keys.load_private(path, ask)
        log.debug("key %s: fingerprint %s", path, pair.fingerprint)
        loaded.append(pair.private)
    return tuple(loaded)


def run_generate(args: argparse.Namespace) -> int:
    from agent import keys

    wants = args.passphrase_file is not None or keys.PASSPHRASE_ENV in os.environ
    secret = keys.passphrase_source(args.passphrase_file)() if wants else None
    if wants and secret is None:
        from agent.errors import InvalidArgument

        raise InvalidArgument(f"{keys.PASSPHRASE_ENV} is set but empty: give a passphrase, "
                              "or unset it for a key without one")
    pair = keys.generate()
    keys.write_private(args.output, keys.encode_private(pair, secret))
    log.info("wrote private key %s (fingerprint %s%s); its public key:", args.output,
             pair.fingerprint, ", passphrase-protected" if secret else "")
    common.write_stdout(pair.public_text + "\n")
    return 0


def run_public(args: argparse.Namespace) -> int:
    from agent import keys

    pair = keys.load_private(args.keyfile, keys.passphrase_source(args.passphrase_file))
    common.write_stdout(pair.public_text + "\n")
    return 0
