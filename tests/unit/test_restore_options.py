"""restore's --memory: parsed like backup's, and its defaults are RestoreOptions' own."""

from __future__ import annotations

from agent.cli.main import build_parser
from agent.options import RestoreOptions


def test_defaults_are_the_restores() -> None:
    args = build_parser().parse_args(["restore", "x.arc", "--to-dir", "out"])
    assert args.memory == RestoreOptions().memory
    assert args.connections == RestoreOptions().connections


def test_memory_takes_sizes() -> None:
    args = build_parser().parse_args(["restore", "-", "--to-dir", "out", "--memory", "4K"])
    assert args.memory == 4096
