"""``backup-agent serve``: the devices of an archive (or chain) as NBD exports."""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING

from agent import interrupts
from agent.cli import common
from agent.cli.common import UsageError
from agent.cli.key_cmd import add_key_options, keys_from
from agent.errors import AgentError, Interrupted

if TYPE_CHECKING:
    from agent.tls import TlsCreds

log = logging.getLogger("backup-agent")

#: agent.serve.archives.DEFAULT_CACHE (not imported here: other commands need not pay for it)
DEFAULT_CACHE = 64 << 20


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("serve", parents=[parent], help="serve an archive's disks over NBD",
                       description="Serve every device of an archive, or of a chain (the full "
                       "backup, then each incremental or differential on it, oldest first), "
                       "as an NBD export named after the device, until Ctrl-C or SIGTERM. "
                       "Prints one URI per device once serving. Only archive files with "
                       "their trailing index can be served.")
    p.add_argument("paths", metavar="ARCHIVE", nargs="+",
                   help="the archive, or a chain oldest first")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", metavar="PATH",
                       help="the Unix socket to serve on (must not exist)")
    where.add_argument("--listen", metavar="[HOST]:PORT",
                       help="serve on TCP (port 10809 if only HOST is given; :0 any free "
                       "port; no HOST: every address), under TLS")
    p.add_argument("--device", metavar="NAME", action="append",
                   help="serve only this device (repeatable)")
    p.add_argument("--cache", type=common.byte_size, default=DEFAULT_CACHE, metavar="SIZE",
                   help="decompressed records kept in memory (64M)")
    p.add_argument("--writable", action="store_true",
                   help="accept writes into a temporary overlay in $TMPDIR, discarded at "
                   "exit (the archive is never written); one device per server")
    add_key_options(p)
    net = p.add_argument_group("TCP (--listen): TLS as for live backups, docs/NETWORK.md")
    net.add_argument("--tls-creds", metavar="DIR",
                     help="x509: ca-cert.pem, server-cert.pem, server-key.pem; clients must "
                     "present a certificate signed by that CA")
    net.add_argument("--tls-psk", metavar="FILE",
                     help="a pre-shared key file (USER:HEXKEY lines) instead of x509")
    net.add_argument("--insecure-plaintext", action="store_true",
                     help="serve TCP in clear text, readable and reachable by anyone on the "
                     "network (otherwise refused)")
    p.set_defaults(run=run)


def _listen(args: argparse.Namespace) -> tuple[tuple[str, int] | None, TlsCreds | None]:
    """Where on TCP and with which credentials, or (None, None) for the Unix socket."""
    from agent.address import NBD_PORT, host_port
    from agent.tls import TlsCreds, require_tls

    if args.listen is None:
        if args.tls_creds or args.tls_psk or args.insecure_plaintext:
            raise UsageError("--tls-creds, --tls-psk and --insecure-plaintext apply to "
                             "--listen only: a Unix socket is reached by this host alone")
        return None, None
    text = args.listen
    if text.startswith(":"):  # no HOST: every address
        host, port = "", host_port("any" + text, NBD_PORT, "--listen")[1]
    else:
        host, port = host_port(text, NBD_PORT, "--listen")
    creds = TlsCreds.load(args.tls_creds, args.tls_psk)
    return (host, port), require_tls("the NBD server", text, creds, args.insecure_plaintext)


def run(args: argparse.Namespace) -> int:
    # here, not at the top: other commands need not pay for these imports
    from agent.serve.archives import ServedArchives
    from agent.serve.server import ArchiveServer, check_socket_path
    from agent.vma.detect import refuse_to_serve

    refuse_to_serve(args.paths)  # VMA: no index to serve from
    listen, tls = _listen(args)
    socket = check_socket_path(args.socket) if args.socket is not None else None
    keys = keys_from(args)
    # The archives' ends and the chain checked here first, so that what is wrong is one
    # clear line; nbdkit's plugin opens them again, walks and checks their indexes as it
    # builds the tables (a damaged index stops it with its line: "could not serve: ...").
    served = ServedArchives(args.paths, args.device, args.cache, tables=False, keys=keys)
    devices = served.names
    served.close()
    server = None
    try:
        with interrupts.held():  # it starts a thread (agent/interrupts.py)
            server = ArchiveServer(args.paths, devices, socket, cache=args.cache,
                                   writable=args.writable, listen=listen, tls=tls,
                                   insecure=args.insecure_plaintext, keys=keys)
        common.write_stdout("".join(u + "\n" for u in server.uris()))
        log.info("serving %d device(s) on %s%s; Ctrl-C or SIGTERM stops", len(devices),
                 server.where, " (writable, changes discarded at exit)" if args.writable else "")
        while True:
            status = server.wait(interrupts.STEP)
            if status is not None:
                raise AgentError(f"nbdkit stopped serving (exit status {status})")
    except (KeyboardInterrupt, Interrupted):
        log.info("stopped serving")
        return 0
    finally:
        if server is not None:
            server.close()
