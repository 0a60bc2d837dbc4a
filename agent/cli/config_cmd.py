"""``backup-agent config``: one stored config blob, to standard output."""

from __future__ import annotations

import argparse
import logging

from agent.cli import common, key_cmd
from agent.cli.render import log_contents

log = logging.getLogger("backup-agent")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("config", parents=[parent], help="print a stored config file",
                       description="Write one config blob stored in the archive to stdout. "
                       "Configs sit at the start of the archive: a pipe is not read further. "
                       "A config over 4 MiB is written as it is read, the others only once "
                       "complete: check the exit status.")
    p.add_argument("path", metavar="PATH")
    p.add_argument("name", metavar="NAME")
    key_cmd.add_key_options(p)
    p.set_defaults(run=run)


#: A config up to this size is held until it is complete and checked, then written; a
#: larger one goes out as it is read (an archive's configs may be of any size).
HOLD = 4 * 1024 * 1024


def run(args: argparse.Namespace) -> int:
    # here, not at the top: a backup need not pay for this command's imports
    from agent.archive.format import Config
    from agent.archive.reader import open_stream
    from agent.vma.detect import open_reader
    keys = key_cmd.keys_from(args)
    held: list[bytes] = []
    size = 0

    def piece(cfg: Config, data: bytes | bytearray | memoryview) -> None:
        # Only the config asked for is kept, and only up to HOLD: the others are checked
        # and dropped (a 22 KB archive whose other config was 512 MiB took 560 MiB).
        nonlocal size
        if cfg.name != args.name:
            return
        size += len(data)
        if cfg.size <= HOLD:
            held.append(bytes(data))
        else:
            common.write_stdout(bytes(data))

    log.debug("reading archive %s", common.archive_label(args.path))
    with open_stream(args.path) as stream:
        reader = open_reader(stream, verify_data=False, keep_configs=False,
                             on_config_data=piece, keys=keys,
                             label=common.archive_label(args.path))  # ours or VMA
        log_contents(log, reader.header, reader.devices)
        reader.config_info(args.name)  # it is there, and complete
    log.debug("config %r: %d bytes, writing it to standard output", args.name, size)
    common.write_stdout(b"".join(held))
    return 0
