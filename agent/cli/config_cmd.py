"""``backup-agent config``: one stored config blob, to standard output."""

from __future__ import annotations

import argparse
import logging

from agent.cli import common
from agent.cli.render import log_contents

log = logging.getLogger("backup-agent")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("config", parents=[parent], help="print a stored config file",
                       description="Write one config blob stored in the archive to stdout. "
                       "Configs sit at the start of the archive: a pipe is not read further.")
    p.add_argument("path", metavar="PATH")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # here, not at the top: a backup need not pay for this command's imports
    from agent.archive.reader import ArchiveReader, open_stream
    log.debug("reading archive %s", common.archive_label(args.path))
    with open_stream(args.path) as stream:
        reader = ArchiveReader(stream, verify_data=False)
        log_contents(log, reader.header, reader.devices)
        data = reader.config(args.name)
    log.debug("config %r: %d bytes, writing it to standard output", args.name, len(data))
    common.write_stdout(data)
    return 0
