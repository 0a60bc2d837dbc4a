"""``backup-agent restore --live``: the options and the run (agent/restore_live.py)."""

from __future__ import annotations

import argparse
import logging
import time

from agent.cli import common, key_cmd
from agent.cli.common import UsageError
from agent.cli.render import ProgressRenderer, size

log = logging.getLogger("backup-agent")

#: agent.serve.archives.DEFAULT_CACHE (not imported here: a plain restore need not pay)
DEFAULT_CACHE = 64 << 20


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("live restore (--live): the VM runs from the backup at once, "
                             "QEMU copies it into the target images meanwhile (docs/SERVE.md)")
    g.add_argument("--qmp", metavar="SOCKET",
                   help="the paused VM's QMP monitor for the agent (a Unix socket)")
    g.add_argument("--drive", metavar="ID=TARGET", action="append",
                   help="the VM's device ID (also the backup's device) and the empty qcow2 "
                   "image the VM opened for it (repeatable)")
    g.add_argument("--max-rate", type=common.byte_size, default=0, metavar="RATE",
                   help="limit QEMU's copy to RATE bytes per second (default: no limit)")
    g.add_argument("--cache", type=common.byte_size, default=DEFAULT_CACHE, metavar="SIZE",
                   help="decompressed records the server keeps in memory (64M)")


def check_usage(args: argparse.Namespace) -> None:
    """Flags that --live needs, and those that do not go with it."""
    if not args.live:
        if args.qmp or args.drive or args.max_rate:
            raise UsageError("--qmp, --drive and --max-rate are for --live")
        return
    if not args.qmp or not args.drive:
        raise UsageError("--live needs --qmp SOCKET and at least one --drive ID=TARGET.qcow2")
    if args.device or args.format:
        raise UsageError("--device and --format do not apply to --live: --drive ID=TARGET "
                         "names each device and its qcow2 image")
    from agent.address import is_tcp

    if is_tcp(args.qmp):
        raise UsageError("--live runs on the VM's host (QEMU reads the backup from a Unix "
                         "socket of this host): give --qmp a Unix socket")


def run(args: argparse.Namespace) -> int:
    start = time.monotonic()
    from agent.restore_live import live_restore, parse_drive

    drives = [parse_drive(d) for d in args.drive]
    renderer = ProgressRenderer(common.progress_mode(args.progress, args.quiet))
    try:
        result = live_restore(args.paths, drives, args.qmp, cache=args.cache,
                              speed=args.max_rate, progress=renderer.callback(), start=start,
                              keys=key_cmd.keys_from(args))
    finally:
        renderer.close()
    log.info("live-restored %d device(s): %s streamed in %.2f s; the VM ran %.2f s after the "
             "start; the images stand alone", len(result.devices), size(result.bytes),
             result.elapsed, result.running_after)
    return 0
