"""Text from archives reaches terminals and logs escaped (issue 13): agent/cli/render.py's
printable(), the log formatter and the error line."""

from __future__ import annotations

import io
import logging

import pytest

from agent.cli.common import error_text
from agent.cli.render import PrintableFormatter, printable

HOSTILE = ["a\nb", "a\rb", "\x1b[2J", "a\u202eb", "x\u2028y", "\x00\x7f\x85", "\t", "\U000e0001"]


@pytest.mark.parametrize("text", HOSTILE)
def test_nothing_a_terminal_acts_on_is_left(text: str) -> None:
    shown = printable(text)
    assert shown.isprintable()
    assert shown == repr(text)[1:-1]  # the escapes Python's repr uses, and no others


def test_plain_text_is_left_alone() -> None:
    for text in ["vda", "backup-agent 1.2 (git abc)", "ümlaut ok", "a\\nb", ""]:
        assert printable(text) == text


def test_backslashes_can_be_made_unambiguous() -> None:
    assert printable("a\\nb", backslash=True) == "a\\\\nb"
    assert printable("a\nb", backslash=True) == "a\\nb"
    assert printable("a\\nb", backslash=True) != printable("a\nb", backslash=True)


def test_surrogates_of_undecodable_file_names_are_shown() -> None:
    name = b"vm\xff.arc".decode("utf-8", "surrogateescape")  # what os.listdir returns
    assert printable(name) == "vm\\udcff.arc"
    printable(name).encode("utf-8")  # printing it cannot fail


def _log(message: str, *args: object, exc: BaseException | None = None) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(PrintableFormatter("backup-agent: %(message)s"))
    logger = logging.getLogger("test-hostile-text")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        if exc is None:
            logger.warning(message, *args)
        else:
            logger.error(message, *args, exc_info=exc)
    finally:
        logger.removeHandler(handler)
    return stream.getvalue()


def test_a_log_line_stays_one_harmless_line() -> None:
    out = _log("device %s: restored", "vda\nbackup-agent: archive OK\x1b[2J")
    assert out == "backup-agent: device vda\\nbackup-agent: archive OK\\x1b[2J: restored\n"


def test_tracebacks_keep_their_lines_but_escape_the_rest() -> None:
    try:
        raise ValueError("bad \x1b[31mred\x1b[0m\u202e")
    except ValueError as e:
        out = _log("failed", exc=e)
    assert "\x1b" not in out and "\u202e" not in out
    assert out.splitlines()[0] == "backup-agent: failed"
    assert out.splitlines()[-1] == "ValueError: bad \\x1b[31mred\\x1b[0m\\u202e"


def test_an_error_is_one_escaped_line() -> None:
    line = error_text("config 'x': \x1b]0;pwned\x07 seal\r\nseal      00")
    assert line == "backup-agent: error: config 'x': \\x1b]0;pwned\\x07 seal seal      00"
