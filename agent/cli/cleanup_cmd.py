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
    p.add_argument("--qmp", metavar="SOCKET", required=True,
                   help="the VM's QMP monitor for the agent (a Unix socket or HOST:PORT)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # here, not at the top: a backup need not pay for this command's imports
    from agent.qemu.graph import cleanup
    from agent.qemu.qmp import Monitor
    with Monitor(args.qmp) as mon:
        removed = cleanup(mon)
    for what in removed:
        log.info("removed %s", what)
    log.info("nothing to clean up" if not removed else f"cleaned up {len(removed)} item(s)")
    return 0
