"""restore's --memory: parsed like backup's, and its default is RestoreOptions' own."""

from __future__ import annotations

from agent.cli.main import build_parser
from agent.cli.restore_cmd import DEFAULT_MEMORY
from agent.restore import RestoreOptions


def test_default_memory_is_the_engines() -> None:
    assert RestoreOptions().memory == DEFAULT_MEMORY
    args = build_parser().parse_args(["restore", "x.arc", "--to-dir", "out"])
    assert args.memory == DEFAULT_MEMORY


def test_memory_takes_sizes() -> None:
    args = build_parser().parse_args(["restore", "-", "--to-dir", "out", "--memory", "4K"])
    assert args.memory == 4096
