"""``backup-agent backup``: NBD exports and disk images into one archive stream."""

from __future__ import annotations

import argparse
import logging
import os

from agent.archive.codec import CompressionSpec
from agent.archive.format import MAX_DATA_LENGTH
from agent.backup import BackupJob, run_backup
from agent.cli import common
from agent.cli.render import ProgressRenderer, size, summary_line
from agent.engine import EngineOptions
from agent.errors import InvalidArgument

log = logging.getLogger("backup-agent")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("backup", parents=[parent], help="back up disks into an archive",
                       description="Back up NBD exports and disk images into one archive, "
                       "written strictly sequentially (a pipe, ssh, a tape or a file).")
    p.add_argument("--source", metavar="NAME=NBD_URI", type=common.name_value, action="append",
                   default=[], help="an NBD export (nbd://, nbd+unix://, nbds://...)")
    p.add_argument("--image", metavar="NAME=FILE", type=common.name_value, action="append",
                   default=[], help="a disk image file (raw, qcow2, anything qemu-img reads)")
    p.add_argument("--config", metavar="NAME=FILE", type=common.name_value, action="append",
                   default=[], help="a file to store in the archive (VM configuration...)")
    p.add_argument("--compress", metavar="zstd[:LEVEL]|none", type=common.compression,
                   default=CompressionSpec(), help="per-record compression (default zstd:1)")
    p.add_argument("-o", "--output", metavar="PATH", required=True,
                   help="where the archive goes; - for standard output")
    p.add_argument("--connections", type=common.positive,
                   default=EngineOptions().connections,
                   help="NBD connections per source when the server allows multi-conn "
                   "(default: the number of cores, at most 4)")
    p.add_argument("--memory", type=common.byte_size, default=32 * 1024 * 1024,
                   metavar="SIZE", help="cap on read buffers between read and write (32M)")
    p.add_argument("--request-size", type=common.byte_size, default=2 * 1024 * 1024,
                   metavar="SIZE", help="bytes per NBD read and at most per record (2M, max 32M)")
    common.add_progress(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.request_size > MAX_DATA_LENGTH:
        raise InvalidArgument(f"--request-size is at most {MAX_DATA_LENGTH // 2**20}M")
    opts = EngineOptions(compression=args.compress, connections=args.connections,
                         memory=args.memory, request_size=args.request_size,
                         workers=max(2, os.cpu_count() or 2))
    job = BackupJob(output=args.output, sources=args.source, images=args.image,
                    configs=args.config, engine=opts)
    renderer = ProgressRenderer(common.progress_mode(args.progress, args.quiet))
    try:
        result = run_backup(job, renderer.callback())
    finally:
        renderer.close()
    log.info("%s", summary_line(result.progress, f"backed up {len(result.devices)} device(s)"))
    log.info("archive %s: %s written, %s of buffer at peak", result.uuid,
             size(result.archive_bytes), size(result.peak_buffer))
    return 0
