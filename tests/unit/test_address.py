"""Addresses (agent/address.py): a monitor's (Unix socket or HOST:PORT) and HOST[:PORT]."""

from __future__ import annotations

import pytest

from agent.address import format_address, host_port, is_tcp, parse_address
from agent.errors import InvalidArgument


@pytest.mark.parametrize(("text", "parsed"), [
    ("/run/vm1.qmp", "/run/vm1.qmp"), ("vm1.qmp", "vm1.qmp"), ("./name:1234", "./name:1234"),
    ("host:4444", ("host", 4444)), ("10.0.0.1:4444", ("10.0.0.1", 4444)),
    ("[::1]:4444", ("::1", 4444)), (":4444", ":4444"), ("host:", "host:"),
    ("host:x", "host:x"), ("host:\u00b2", "host:\u00b2"),  # a superscript: isdigit, no int
])
def test_parse_address(text: str, parsed: str | tuple[str, int]) -> None:
    assert parse_address(text) == parsed
    assert is_tcp(text) == isinstance(parsed, tuple)


@pytest.mark.parametrize(("host", "port"), [("h", 1), ("10.0.0.1", 4444), ("::1", 99)])
def test_format_address_is_the_inverse(host: str, port: int) -> None:
    assert parse_address(format_address(host, port)) == (host, port)


@pytest.mark.parametrize(("text", "expected"), [
    ("10.0.0.1", ("10.0.0.1", 7)), ("10.0.0.1:99", ("10.0.0.1", 99)),
    ("host.example", ("host.example", 7)), ("[::1]", ("::1", 7)), ("[::1]:99", ("::1", 99)),
    ("h:0", ("h", 0)), ("h:65535", ("h", 65535)),
])
def test_host_port(text: str, expected: tuple[str, int]) -> None:
    assert host_port(text, 7, "--x") == expected


@pytest.mark.parametrize("text", ["h:x", "h:70000", "[::1", "[::1]x", ":5", "", "h:\u00b2"])
def test_bad_host_port(text: str) -> None:
    with pytest.raises(InvalidArgument, match=r"^--x "):
        host_port(text, 7, "--x")
