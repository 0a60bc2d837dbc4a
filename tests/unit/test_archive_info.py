"""info's view of an archive: the same from a file (via the index) and from a pipe."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from agent.archive_info import archive_info

TINY = Path(__file__).resolve().parent.parent / "data" / "tiny.arc"


def _totals(path: str) -> dict[str, int]:
    totals: dict[str, int] = archive_info(path).as_dict()["totals"]
    return totals


def test_totals_of_the_worked_example() -> None:
    # docs/FORMAT.md's tiny.arc: one 8 KiB device, 4 KiB stored uncompressed, one
    # 18-byte config, 4810 bytes in all.
    assert _totals(str(TINY)) == {
        "device_bytes": 8192, "data_bytes": 4096, "zero_bytes": 4096, "stored_bytes": 4096,
        "config_bytes": 18, "archive_bytes": 4810, "records": 7,
    }


def test_a_stream_with_tape_padding_reports_the_archive_without_it(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    data = TINY.read_bytes() + bytes(10_000)  # a tape pads the last block with zeros

    def feed() -> None:
        with open(fifo, "wb") as f:
            f.write(data)

    t = threading.Thread(target=feed)
    t.start()
    try:
        assert _totals(str(fifo)) == _totals(str(TINY))
    finally:
        t.join()
