"""The ``backup-agent`` command: parse, set up logging, run, map errors to exit codes.

Exit codes: 0 success; 1 failure, with one line ``backup-agent: error: ...`` on
stderr (a traceback only with ``--debug``); 2 bad usage (argparse, or a command's
:class:`~agent.cli.common.UsageError`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from agent import __version__, interrupts
from agent.cli import (
    backup_cmd,
    cleanup_cmd,
    config_cmd,
    info_cmd,
    job_cmd,
    key_cmd,
    prune_cmd,
    restore_cmd,
    serve_cmd,
    verify_cmd,
)
from agent.cli.common import UsageError, error_text, one_line
from agent.cli.render import PrintableFormatter
from agent.errors import AgentError, Interrupted

log = logging.getLogger("backup-agent")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    common.add_argument("--debug", action="store_true", help="full detail, tracebacks included")
    parser = argparse.ArgumentParser(
        prog="backup-agent",
        description="Back up virtual-machine disks over NBD into one sequential stream, "
        "and restore them.",
    )
    parser.add_argument("--version", action="version", version=f"backup-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in (backup_cmd, restore_cmd, verify_cmd, info_cmd, config_cmd, cleanup_cmd, job_cmd,
                prune_cmd, serve_cmd):
        mod.add_parser(sub, common)
    for command in sub.choices.values():
        # a UsageError is reported with the usage of the command that raised it
        command.set_defaults(command_parser=command)
    key_cmd.add_parser(sub, common)  # after: its actions set their own command_parser
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    # Escaped: log lines quote archives' names and properties, which must not reach a
    # terminal as escape sequences or as lines of their own.
    handler.setFormatter(PrintableFormatter("backup-agent: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    interrupts.install()
    return run_command(args)


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed command; what it raises becomes an exit code and one line on stderr."""
    try:
        code: int = args.run(args)
        return code
    except UsageError as e:
        return _usage(args.command_parser, e)
    except KeyboardInterrupt:
        return _fail(args, Interrupted("interrupted"))
    except AgentError as e:
        return _fail(args, e)
    except Exception as e:  # a bug: still one line, the traceback with --debug
        return _fail(args, e, internal=True)


def error_line(e: BaseException, internal: bool = False) -> str:
    """The one line ``backup-agent: error: ...`` that reports ``e`` (without the newline)."""
    msg = one_line(str(e)) or type(e).__name__
    if internal:
        msg = f"internal error: {type(e).__name__}: {msg} (run with --debug for details)"
    return error_text(msg)


def _fail(args: argparse.Namespace, e: BaseException, internal: bool = False) -> int:
    if args.debug:
        log.exception("failed", exc_info=e)
    sys.stderr.write(error_line(e, internal) + "\n")
    sys.stderr.flush()
    return 1


def _usage(parser: argparse.ArgumentParser, e: UsageError) -> int:
    """As argparse reports a usage error: the command's usage, then one error line."""
    parser.print_usage(sys.stderr)
    sys.stderr.write(f"{parser.prog}: error: {one_line(str(e))}\n")
    sys.stderr.flush()
    return 2


def entry() -> None:
    code = main()
    # Skip the interpreter's teardown: freeing the modules of asyncio, ssl and the rest
    # takes 15 ms, a twentieth of a small incremental backup. Everything the agent
    # started or opened is closed by now; only the standard streams hold anything.
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:  # a closed pipe: what was printed is lost, say so by the code
            code = code or 1
    os._exit(code)
