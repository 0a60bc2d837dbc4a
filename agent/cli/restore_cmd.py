"""``backup-agent restore``: an archive (file or pipe) back into disks."""

from __future__ import annotations

import argparse
import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from agent.cli import common, key_cmd, restore_live_cmd
from agent.cli.common import UsageError
from agent.cli.render import ProgressRenderer, device_text, summary_line
from agent.errors import InvalidArgument
from agent.options import RestoreOptions
from agent.units import MiB

if TYPE_CHECKING:
    from agent.archive.format import Device
    from agent.targets.base import Sink, SinkFactory

log = logging.getLogger("backup-agent")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("restore", parents=[parent], help="restore disks from an archive",
                       description="Restore devices from an archive, or from a chain of archives "
                       "(a full backup and the incrementals after it); a PATH may be - (a "
                       "pipe).")
    p.add_argument("paths", metavar="PATH", nargs="+",
                   help="the archive, or a chain: the full backup, then each incremental or "
                   "differential built on it, oldest first; one of them may be - (standard "
                   "input)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--to-dir", metavar="DIR", type=Path,
                       help="write every device as DIR/NAME.raw (or .qcow2)")
    where.add_argument("--to", metavar="TARGET",
                       help="an existing file, block device or nbd:// URI (needs one --device)")
    where.add_argument("--live", action="store_true",
                       help="into a paused VM that runs from the backup at once (--qmp, "
                       "--drive)")
    p.add_argument("--device", metavar="NAME", action="append",
                   help="restore only this device (repeatable)")
    # No default: given with --to, it is refused rather than silently ignored.
    p.add_argument("--format", choices=["raw", "qcow2"],
                   help="file format with --to-dir (raw, the default: sparse files)")
    p.add_argument("--connections", type=common.positive, default=RestoreOptions.connections,
                   help="NBD connections per target (%(default)s)")
    p.add_argument("--memory", type=common.byte_size, default=RestoreOptions.memory,
                   metavar="SIZE", help="cap on archive records read but not yet written "
                   f"({RestoreOptions.memory // MiB}M; a record larger than SIZE still goes, "
                   "alone)")
    p.add_argument("--open-targets", type=common.positive, metavar="N",
                   default=RestoreOptions.open_targets,
                   help="devices whose target is open at once (%(default)s): a file each, or "
                   "a qemu-nbd for qcow2; others are closed and reopened as their records come")
    key_cmd.add_key_options(p)
    p.add_argument("--insecure-plaintext", action="store_true",
                   help="allow --to nbd://HOST on another host: NBD over TCP in clear text, "
                   "readable by anyone on the way (otherwise refused: use nbds:// with TLS)")
    restore_live_cmd.add_arguments(p)
    common.add_progress(p)
    p.set_defaults(run=run)


def _check_usage(args: argparse.Namespace) -> None:
    """Flag combinations argparse cannot refuse, before anything is opened or created."""
    restore_live_cmd.check_usage(args)
    if args.to is None:
        return
    if not args.device or len(args.device) != 1:
        raise UsageError("--to needs exactly one --device NAME")
    if args.format is not None:
        raise UsageError("--format applies only to --to-dir (the files it creates): --to "
                         "writes the device's bytes into TARGET as it is")
    if "://" in args.to:
        # The same rule as backup --source: a disk crosses no network in clear text
        # unless the user says so in so many words.
        from agent.tls import check_nbd_uri

        check_nbd_uri(args.to, args.insecure_plaintext)


def run(args: argparse.Namespace) -> int:
    _check_usage(args)
    if args.live:
        return restore_live_cmd.run(args)
    # here, not at the top: a backup need not pay for this command's imports
    from agent.archive.reader import open_stream
    from agent.restore import restore_chain, to_dir, to_target
    if args.paths.count("-") > 1:  # before --to-dir's DIR is created
        raise InvalidArgument("only one archive of a chain can come from standard input (-)")
    opts = RestoreOptions(memory=args.memory, connections=args.connections,
                          open_targets=args.open_targets, keys=key_cmd.keys_from(args))
    factory: SinkFactory
    if args.to is not None:
        log.debug("restore device %r into %s, %d connection(s) per NBD target, %d worker(s), "
                  "%d bytes in flight", args.device[0], args.to, opts.connections, opts.workers,
                  opts.memory)
        factory = to_target(args.device[0], args.to, opts)
    else:
        fmt = args.format or "raw"
        log.debug("restore to directory %s as %s, connections %d per NBD target, "
                  "%d worker(s)", args.to_dir, fmt, opts.connections, opts.workers)
        names = set(args.device) if args.device else None
        factory = to_dir(args.to_dir, fmt, names, opts)
    renderer = ProgressRenderer(common.progress_mode(args.progress, args.quiet))
    with contextlib.ExitStack() as stack:
        streams = []
        for p in args.paths:
            log.debug("reading archive %s", common.archive_label(p))
            streams.append((stack.enter_context(open_stream(p)), common.archive_label(p)))
        try:
            result = restore_chain(streams, logged_sinks(factory), opts,
                                   renderer.callback(), wanted=args.device)
        finally:
            renderer.close()
    for name, where in zip(result.devices, result.outputs, strict=True):
        log.info("restored %s -> %s", name, where)
    what = f"restored {len(result.devices)} device(s)"
    log.info("%s", summary_line(result.progress, what, result.archive_bytes))
    renderer.summary(result.progress, what, result.archive_bytes)
    return 0


def logged_sinks(factory: SinkFactory) -> SinkFactory:
    """``factory``, saying (with ``--debug``) where each device is written."""

    def make(dev: Device) -> Sink | None:
        sink = factory(dev)
        if sink is None:
            log.debug("%s: not restored (not asked for)", device_text(dev))
        elif sink.temp is not None and sink.final is not None:
            log.debug("%s: writing %s, renamed to %s once the archive checked out",
                      device_text(dev), sink.temp, sink.final)
        else:
            log.debug("%s: writing %s in place", device_text(dev), sink.where)
        return sink

    return make
