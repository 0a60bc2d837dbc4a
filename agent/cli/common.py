"""Argument types shared by the subcommands."""

from __future__ import annotations

import argparse
import os
import sys

from agent.archive.codec import CompressionSpec
from agent.cli.render import printable
from agent.errors import InvalidArgument, OutputError
from agent.units import parse_size


class UsageError(Exception):
    """A way of calling a command that argparse cannot refuse by itself (a flag that needs
    or excludes another). Raised before anything is opened; reported as argparse reports
    its own: the command's usage line, one error line, exit 2."""


def write_stdout(data: bytes | str) -> None:
    """All of ``data`` to standard output (text as UTF-8), or :class:`OutputError`.

    ``os.write`` in a loop rather than ``sys.stdout.buffer.write``: when the reader of a
    pipe went away mid-write, the buffered writer returned a short count and raised nothing,
    and ``config ARC NAME | head -c 10`` exited 0 with the config cut short."""
    view = memoryview(data.encode() if isinstance(data, str) else data)
    try:
        sys.stdout.flush()  # anything printed before goes first
        while view:
            view = view[os.write(1, view):]
    except BrokenPipeError as e:
        raise OutputError("standard output: the reader closed the pipe") from e
    except OSError as e:
        raise OutputError(f"standard output: write failed: {e.strerror or e}") from e


def one_line(text: str) -> str:
    """``text`` with its line breaks (every one ``str.splitlines`` knows: \\r, \\f, \\x85,
    U+2028...) and the blanks around them made single spaces. Messages may quote a helper's
    stderr (qemu-img, qemu-nbd) or a library's text, which can span lines; the user must
    still read exactly one."""
    return " ".join(stripped for part in text.splitlines() if (stripped := part.strip()))


def error_text(message: str) -> str:
    """The one line ``backup-agent: error: ...`` that reports ``message`` (no newline),
    with whatever else a terminal would act on escaped (a message may quote an archive)."""
    return f"backup-agent: error: {printable(one_line(message))}"


def archive_label(path: str) -> str:
    """How messages name an archive PATH (``-`` is standard input)."""
    return "standard input" if path == "-" else path


def name_value(text: str) -> tuple[str, str]:
    """NAME=VALUE, as in ``--source vda=nbd://...``."""
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def compression(text: str) -> CompressionSpec:
    try:
        return CompressionSpec.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def byte_size(text: str) -> int:
    """256M, 1G, 64K, 4096 (agent/units.py has the grammar); at least 4K."""
    try:
        n = parse_size(text)
    except InvalidArgument:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 256M or 1G)") from None
    if n < 4096:
        raise argparse.ArgumentTypeError(f"{text!r} is too small (at least 4K)")
    return n


def positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", choices=["auto", "bar", "json", "none"], default="auto",
                   help="progress display on stderr (auto: a bar on a terminal, else none)")


def progress_mode(mode: str, quiet: bool) -> str:
    if quiet:
        return "none"
    if mode == "auto":
        return "bar" if os.isatty(2) else "none"
    return mode
