"""``backup-agent cleanup``: remove what a killed agent left in a VM's block graph."""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from agent.cli import common

if TYPE_CHECKING:
    from agent.qemu.stream import JobState

log = logging.getLogger("backup-agent")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("cleanup", parents=[parent], help="undo what a killed backup left in QEMU",
                       description="Remove every export, node and filter a live backup added "
                       "to the VM (all carry names starting with ba-) and put its disks back; "
                       "finish a live restore whose agent was stopped: wait for its streams "
                       "(starting again one that failed), then remove its nodes and stop its "
                       "server.")
    p.add_argument("--qmp", metavar="SOCKET|HOST:PORT", required=True,
                   help="the VM's QMP monitor for the agent (a Unix socket or HOST:PORT)")
    p.add_argument("--tls-creds", metavar="DIR",
                   help="x509 credentials for QMP over TCP (ca-cert.pem, client-cert.pem, "
                   "client-key.pem; see docs/NETWORK.md)")
    p.add_argument("--insecure-plaintext", action="store_true",
                   help="allow QMP over TCP without TLS")
    common.add_progress(p)
    p.add_argument("--qga", metavar="SOCKET",
                   help="the VM's guest-agent channel: also thaw the guest's file systems if "
                   "they are frozen (a killed backup's watchdog normally did)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # here, not at the top: a backup need not pay for this command's imports
    from agent.address import is_tcp
    from agent.errors import AgentError, InvalidArgument
    from agent.qemu.graph import cleanup
    from agent.qemu.qmp import Monitor
    from agent.qemu.stream import finish_leftovers
    from agent.tls import TlsCreds, require_tls
    tls = None
    if is_tcp(args.qmp):
        creds = require_tls("the QMP monitor", args.qmp, TlsCreds.load(args.tls_creds, None),
                            args.insecure_plaintext)
        tls = creds.qmp_context() if creds else None
    elif args.tls_creds or args.insecure_plaintext:
        raise InvalidArgument("--tls-creds and --insecure-plaintext are for --qmp HOST:PORT")
    thawed: list[str] = []
    thaw_error = None
    if args.qga:  # first: a frozen guest is an outage; its failure stops no graph clean-up
        from agent.qemu.qga import GuestAgent, GuestAgentError
        try:
            with GuestAgent(args.qga) as ga:
                if ga.fsfreeze_status() == "frozen":
                    n = ga.fsfreeze_thaw()
                    thawed.append(f"the guest's freeze (thawed {n} file system(s))")
        except GuestAgentError as e:
            thaw_error = e
    live_error: AgentError | None = None
    with Monitor(args.qmp, tls=tls) as mon:
        # A live restore first: its streams must end before its nodes can go. A stream
        # that cannot finish leaves its restore in place; a backup's leftovers still go.
        try:
            removed = finish_leftovers(mon, progress=_stream_progress(args))
        except AgentError as e:
            live_error, removed = e, []
        removed += cleanup(mon)
    removed = thawed + removed
    for what in removed:
        log.info("removed %s", what)
    log.info("nothing to clean up" if not removed else f"cleaned up {len(removed)} item(s)")
    if thaw_error is not None:
        raise thaw_error
    if live_error is not None:
        raise live_error
    return 0


def _stream_progress(args: argparse.Namespace) -> Callable[[list[JobState]], None]:
    """Progress of the streams a live restore left, drawn as a restore's."""
    from agent.cli.render import ProgressRenderer
    from agent.pipeline import Progress

    renderer = ProgressRenderer(common.progress_mode(args.progress, args.quiet))
    start = time.monotonic()
    said: list[bool] = []

    def show(states: list[JobState]) -> None:
        if not said:
            said.append(True)
            log.info("waiting for the stream(s) of a live restore: %s",
                     ", ".join(s.id for s in states))
        done = sum(s.done for s in states)
        if renderer.mode != "none":
            renderer.update(Progress("restore", done, sum(s.total for s in states), done, 0, 0,
                                     time.monotonic() - start))
        if all(s.finished for s in states):
            renderer.close()

    return show
