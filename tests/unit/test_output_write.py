"""SequentialOutput.write: every byte of every part, in order, across short writes."""

from __future__ import annotations

import os
import threading

from agent.archive.output import SequentialOutput


def _drain(fd: int, into: bytearray) -> None:
    while chunk := os.read(fd, 777):  # odd sizes: writev returns mid-part
        into.extend(chunk)


def test_many_small_parts_through_a_pipe_arrive_whole_and_in_order() -> None:
    parts = [bytes([i % 251]) * (1 + i % 7) for i in range(30_000)] + [b"", b"tail" * 50_000]
    r, w = os.pipe()
    got = bytearray()
    reader = threading.Thread(target=_drain, args=(r, got))
    reader.start()
    try:
        out = SequentialOutput(w, "pipe")
        out.write(parts)
        out.write([memoryview(b"x" * 3)])
    finally:
        os.close(w)
        reader.join(10)
        os.close(r)
    want = b"".join(parts) + b"xxx"
    assert out.position == len(want)
    assert bytes(got) == want
