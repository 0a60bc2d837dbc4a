"""``backup-agent serve``: the devices of an archive (or chain) as NBD exports."""

from __future__ import annotations

import argparse
import logging

from agent import interrupts
from agent.cli import common
from agent.errors import AgentError, Interrupted

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
    p.add_argument("--socket", metavar="PATH", required=True,
                   help="the Unix socket to serve on (must not exist)")
    p.add_argument("--device", metavar="NAME", action="append",
                   help="serve only this device (repeatable)")
    p.add_argument("--cache", type=common.byte_size, default=DEFAULT_CACHE, metavar="SIZE",
                   help="decompressed records kept in memory (64M)")
    p.add_argument("--writable", action="store_true",
                   help="accept writes into a temporary overlay in $TMPDIR, discarded at "
                   "exit (the archive is never written); one device per server")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # here, not at the top: other commands need not pay for these imports
    from agent.serve.archives import ServedArchives
    from agent.serve.server import ArchiveServer, check_socket_path

    socket = check_socket_path(args.socket)
    # Everything checked here first, so that a bad archive or chain is one clear line; the
    # plugin opens the archives again in nbdkit.
    served = ServedArchives(args.paths, args.device, args.cache)
    try:
        devices = list(served.devices)
        for name, image in served.devices.items():
            log.debug("device %r: %d bytes in %d segment(s)", name, image.size,
                      len(image.segments))
    finally:
        served.close()
    try:
        with interrupts.held():
            server = ArchiveServer(args.paths, devices, socket, cache=args.cache,
                                   writable=args.writable)
    except Interrupted:
        return 0
    try:
        common.write_stdout("".join(u + "\n" for u in server.uris()))
        log.info("serving %d device(s) on %s%s; Ctrl-C or SIGTERM stops", len(devices),
                 socket, " (writable, changes discarded at exit)" if args.writable else "")
        while True:
            status = server.wait(interrupts.STEP)
            if status is not None:
                raise AgentError(f"nbdkit stopped serving (exit status {status})")
    except (KeyboardInterrupt, Interrupted):
        log.info("stopped serving")
        return 0
    finally:
        server.close()
