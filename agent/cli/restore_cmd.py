"""``backup-agent restore``: an archive (file or pipe) back into disks."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from pathlib import Path

from agent.cli import common
from agent.cli.render import ProgressRenderer, summary_line
from agent.errors import InvalidArgument, TargetError

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
    p.add_argument("--device", metavar="NAME", action="append",
                   help="restore only this device (repeatable)")
    p.add_argument("--format", choices=["raw", "qcow2"], default="raw",
                   help="file format with --to-dir (raw: sparse files)")
    p.add_argument("--connections", type=common.positive, default=4,
                   help="NBD connections per target (4)")
    common.add_progress(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # here, not at the top: a backup need not pay for this command's imports
    from agent.archive.reader import open_stream
    from agent.restore import RestoreOptions, SinkFactory, restore_chain, to_dir, to_target
    opts = RestoreOptions(connections=args.connections, workers=max(2, os.cpu_count() or 2))
    factory: SinkFactory
    if args.to is not None:
        if not args.device or len(args.device) != 1:
            raise InvalidArgument("--to needs exactly one --device NAME")
        factory = to_target(args.device[0], args.to, opts)
    else:
        if not args.to_dir.is_dir():
            try:
                args.to_dir.mkdir(parents=True)
            except OSError as e:
                raise TargetError(f"cannot create {args.to_dir}: {e.strerror}") from e
        names = set(args.device) if args.device else None
        factory = to_dir(args.to_dir, args.format, names, opts)
    if args.paths.count("-") > 1:
        raise InvalidArgument("only one archive of a chain can come from standard input (-)")
    renderer = ProgressRenderer(common.progress_mode(args.progress, args.quiet))
    with contextlib.ExitStack() as stack:
        streams = [(stack.enter_context(open_stream(p)), "standard input" if p == "-" else p)
                   for p in args.paths]
        try:
            result = restore_chain(streams, factory, opts, renderer.callback(),
                                   wanted=args.device)
        finally:
            renderer.close()
    for name, where in zip(result.devices, result.outputs, strict=True):
        log.info("restored %s -> %s", name, where)
    log.info("%s", summary_line(result.progress, f"restored {len(result.devices)} device(s)"))
    return 0
