"""accepts(): a server is ready when it sends the NBD greeting, not when connect() succeeds."""

from __future__ import annotations

import contextlib
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.process import accepts


@pytest.fixture
def sock_path() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="ba-") as d:
        yield str(Path(d) / "s.sock")


def _serve_once(server: socket.socket, reply: bytes, one_byte_at_a_time: bool = False
                ) -> threading.Thread:
    """Accept one connection on ``server``, send ``reply``, hang up (in a thread)."""
    def answer() -> None:
        conn, _ = server.accept()
        with conn, contextlib.suppress(OSError):  # the client may hang up first
            if one_byte_at_a_time:  # recv may return short reads
                for b in reply:
                    conn.send(bytes([b]))
            else:
                conn.sendall(reply)

    t = threading.Thread(target=answer)
    t.start()
    return t


def test_missing_socket(sock_path: str) -> None:
    assert not accepts(sock_path)


def test_listening_but_silent_is_not_ready(sock_path: str) -> None:
    # What qemu-nbd looks like between listen() and opening its image: the kernel completes
    # the connect, nobody answers. This once let a failing qemu-nbd pass as started.
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(sock_path)
        server.listen(4)
        assert not accepts(sock_path, timeout=0.1)


def _answered(sock_path: str, reply: bytes, one_byte_at_a_time: bool = False) -> bool:
    """What accepts() says of a server that sends ``reply`` and closes."""
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(sock_path)
        server.listen(4)
        t = _serve_once(server, reply, one_byte_at_a_time=one_byte_at_a_time)
        ready = accepts(sock_path, timeout=5)
        t.join()
    return ready


def test_closed_without_greeting_is_not_ready(sock_path: str) -> None:
    assert not _answered(sock_path, b"")


@pytest.mark.parametrize("reply", [b"NBDMAGIC", b"NBDMAGIC\x49\x48\x41\x56\x45\x4f\x50\x54"])
def test_greeting_is_ready(sock_path: str, reply: bytes) -> None:
    assert _answered(sock_path, reply, one_byte_at_a_time=True)


def test_wrong_greeting_is_not_ready(sock_path: str) -> None:
    assert not _answered(sock_path, b"HTTP/1.1")
