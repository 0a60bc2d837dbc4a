"""``backup-agent verify``: read a whole archive and check every byte of it."""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING

from agent.cli import common, key_cmd
from agent.cli.render import ProgressRenderer, device_text, summary_line
from agent.options import RestoreOptions

if TYPE_CHECKING:
    from agent.archive.format import Device
    from agent.targets.base import Sink

log = logging.getLogger("backup-agent")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("verify", parents=[parent], help="check an archive completely",
                       description="Check every record's digest, decompress every record, "
                       "check the seal and that every device is covered. PATH may be -.")
    p.add_argument("path", metavar="PATH")
    key_cmd.add_key_options(p)
    common.add_progress(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # here, not at the top: a backup need not pay for this command's imports
    from agent.archive.reader import open_stream
    from agent.restore import restore, to_null
    renderer = ProgressRenderer(common.progress_mode(args.progress, args.quiet))
    opts = RestoreOptions(keys=key_cmd.keys_from(args))
    null = to_null()

    def checked(dev: Device) -> Sink | None:
        log.debug("%s: checking every record", device_text(dev))
        return null(dev)

    log.debug("reading archive %s", common.archive_label(args.path))
    with open_stream(args.path) as stream:
        try:
            result = restore(stream, checked, opts, renderer.callback())
        finally:
            renderer.close()
    what = f"verified {len(result.devices)} device(s)"
    log.info("%s", summary_line(result.progress, what, result.archive_bytes, writes=False))
    renderer.summary(result.progress, what, result.archive_bytes, writes=False)
    log.info("archive OK")
    return 0
