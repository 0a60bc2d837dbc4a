"""agent/cli/main.py: however a message is made (subprocess stderr, a library's text), the
user reads exactly one line ``backup-agent: error: ...``, and usage mistakes exit 2."""

from __future__ import annotations

import argparse

import pytest

from agent.cli.common import UsageError
from agent.cli.main import _fail, build_parser, error_line, run_command
from agent.errors import AgentError, SourceError

PREFIX = "backup-agent: error: "


@pytest.mark.parametrize("msg", [
    "image d.qcow2: qemu-img: Could not open 'd.qcow2':\n  Permission denied\n",
    "first\r\nsecond\rthird",
    "\nstarts with a newline",
    "ends with newlines\n\n",
    "form\x0cfeed, vertical\x0btab, file\x1cseparator, next\x85line",
    "unicode\u2028line\u2029separators",
])
def test_error_line_is_one_line(msg: str) -> None:
    line = error_line(SourceError(msg))
    assert line.startswith(PREFIX)
    assert len(line.splitlines()) == 1, line
    assert line.strip() == line


def test_error_line_keeps_the_words_in_order() -> None:
    e = AgentError("image d.qcow2: qemu-img: Could not open 'd.qcow2':\n  Permission denied\n")
    assert error_line(e) == PREFIX + "image d.qcow2: qemu-img: Could not open 'd.qcow2': " \
        "Permission denied"


def test_error_line_of_a_one_line_message_is_unchanged() -> None:
    msg = "device 'vda': record at byte 4096 fails its checksum  (two spaces kept)"
    assert error_line(AgentError(msg)) == PREFIX + msg


def test_error_line_without_a_message_names_the_error() -> None:
    assert error_line(AgentError("")) == PREFIX + "AgentError"
    assert error_line(AgentError("\n \n")) == PREFIX + "AgentError"


def test_internal_error_line() -> None:
    line = error_line(ValueError("Invalid\nIPv6 URL"), internal=True)
    assert line == PREFIX + ("internal error: ValueError: Invalid IPv6 URL "
                             "(run with --debug for details)")


def test_fail_writes_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code = _fail(argparse.Namespace(debug=False), AgentError("cannot write:\nbroken pipe\n"))
    assert code == 1
    err = capsys.readouterr().err
    assert err == PREFIX + "cannot write: broken pipe\n"


def _run(capsys: pytest.CaptureFixture[str], args: argparse.Namespace) -> tuple[int, list[str]]:
    code = run_command(args)
    return code, capsys.readouterr().err.splitlines()


def test_usage_error_from_a_command_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    # --to without --device: found by the command, not by argparse; reported like argparse
    args = build_parser().parse_args(["restore", "x.arc", "--to", "t"])
    code, lines = _run(capsys, args)
    assert code == 2
    assert lines[0].startswith("usage: backup-agent restore ")
    assert lines[-1].startswith("backup-agent restore: error: ")
    assert "--device" in lines[-1]


def test_usage_error_message_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["verify", "x.arc"])

    def bad(_: argparse.Namespace) -> int:
        raise UsageError("two\nlines")

    args.run = bad
    code, lines = _run(capsys, args)
    assert code == 2
    assert lines[-1] == "backup-agent verify: error: two lines"
