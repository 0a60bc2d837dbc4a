"""``backup-agent cleanup``: remove what a killed agent left in a VM's block graph."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger("backup-agent")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("cleanup", parents=[parent], help="undo what a killed backup left in QEMU",
                       description="Remove every export, node and filter a live backup added "
                       "to the VM (all carry names starting with ba-) and put its disks back.")
    p.add_argument("--qmp", metavar="SOCKET|HOST:PORT", required=True,
                   help="the VM's QMP monitor for the agent (a Unix socket or HOST:PORT)")
    p.add_argument("--tls-creds", metavar="DIR",
                   help="x509 credentials for QMP over TCP (ca-cert.pem, client-cert.pem, "
                   "client-key.pem; see docs/NETWORK.md)")
    p.add_argument("--insecure-plaintext", action="store_true",
                   help="allow QMP over TCP without TLS")
    p.add_argument("--qga", metavar="SOCKET",
                   help="the VM's guest-agent channel: also thaw the guest's file systems if "
                   "they are frozen (a killed backup's watchdog normally did)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # here, not at the top: a backup need not pay for this command's imports
    from agent.address import is_tcp
    from agent.errors import InvalidArgument
    from agent.qemu.graph import cleanup
    from agent.qemu.qmp import Monitor
    from agent.tls import TlsCreds, require_tls
    tls = None
    if is_tcp(args.qmp):
        creds = require_tls("the QMP monitor", args.qmp, TlsCreds.load(args.tls_creds, None),
                            args.insecure_plaintext)
        tls = creds.qmp_context() if creds else None
    elif args.tls_creds or args.insecure_plaintext:
        raise InvalidArgument("--tls-creds and --insecure-plaintext are for --qmp HOST:PORT")
    removed = []
    thaw_error = None
    if args.qga:  # first: a frozen guest is an outage; its failure stops no graph clean-up
        from agent.qemu.qga import GuestAgent, GuestAgentError
        try:
            with GuestAgent(args.qga) as ga:
                if ga.fsfreeze_status() == "frozen":
                    n = ga.fsfreeze_thaw()
                    removed.append(f"the guest's freeze (thawed {n} file system(s))")
        except GuestAgentError as e:
            thaw_error = e
    with Monitor(args.qmp, tls=tls) as mon:
        removed += cleanup(mon)
    for what in removed:
        log.info("removed %s", what)
    log.info("nothing to clean up" if not removed else f"cleaned up {len(removed)} item(s)")
    if thaw_error is not None:
        raise thaw_error
    return 0
