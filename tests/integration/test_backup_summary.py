"""The final summary of a real backup and a real restore: every number the issue names
(bytes read, skipped as zero, written, compression ratio, duration, throughput), by name,
with the values ``info --json`` reports for the archive."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from agent.cli.render import size
from tests.integration.cli_util import KiB, MiB, agent, assert_ok, info_json, write_random
from tests.integration.conftest import make_image

pytestmark = pytest.mark.integration

#: ``WHAT: DEVICE in SECS s (RATE/s): read READ, skipped ZERO as zero, wrote WRITTEN
#: (compression RATIO)``, as logged (``backup-agent: `` first).
SUMMARY = re.compile(
    r"^backup-agent: (?P<what>[^:]+): (?P<device>[\d.]+ \S+) in (?P<secs>\d+\.\d\d) s "
    r"\((?P<rate>[\d.]+ \S+)/s\): read (?P<read>[\d.]+ \S+)(?P<read_note> of record payload)?, "
    r"skipped (?P<zero>[\d.]+ \S+) as zero, wrote (?P<written>[\d.]+ \S+)"
    r"(?P<written_note> of record payload)? \(compression (?P<ratio>n/a|\d+\.\d\dx)\)$")


def _summary(stderr: bytes, what: str) -> re.Match[str]:
    found = [m for ln in stderr.decode().splitlines()
             if (m := SUMMARY.match(ln)) and m["what"].startswith(what)]
    assert len(found) == 1, stderr.decode()
    return found[0]


def _json_summary(stderr: bytes) -> dict[str, Any] | None:
    events = [json.loads(ln) for ln in stderr.decode().splitlines() if ln.startswith("{")]
    summaries = [e for e in events if e["event"] == "summary"]
    assert len(summaries) <= 1, events
    if summaries:
        assert events[-1] is summaries[0], "the summary is not the last JSON object"
    return summaries[0] if summaries else None


@pytest.fixture
def image(short_tmp: Path) -> Path:
    """8 MiB: 1 MiB random, 2 MiB of one byte (compresses well), the rest holes."""
    img = write_random(short_tmp / "d.raw", 8 * MiB, [(512 * KiB, 1 * MiB)])
    with open(img, "r+b") as f:
        f.seek(4 * MiB)
        f.write(b"a" * 2 * MiB)
    return img


@pytest.mark.slow
def test_backup_and_restore_summaries_name_every_number(image: Path, short_tmp: Path) -> None:
    arc = short_tmp / "b.arc"
    proc = agent("backup", "--image", f"d={image}", "--progress", "json", "-o", arc)
    assert_ok(proc)
    totals = info_json(arc)["totals"]
    assert totals["data_bytes"] == 3 * MiB  # preconditions: data, zeros, compression
    assert totals["zero_bytes"] == 5 * MiB
    assert totals["stored_bytes"] < totals["data_bytes"]

    m = _summary(proc.stderr, "backed up 1 device")
    assert m["device"] == size(8 * MiB)
    assert m["read"] == size(totals["data_bytes"]) and not m["read_note"]
    assert m["zero"] == size(totals["zero_bytes"])
    assert m["written"] == size(totals["archive_bytes"]) and not m["written_note"]
    assert m["ratio"] == f"{totals['data_bytes'] / totals['stored_bytes']:.2f}x"
    assert float(m["secs"]) >= 0
    j = _json_summary(proc.stderr)
    assert j is not None, proc.stderr.decode()
    assert j["what"] == "backed up 1 device(s)"
    assert (j["phase"], j["read_what"], j["written_what"]) == ("backup", "device", "archive")
    assert j["device_bytes"] == 8 * MiB
    assert j["read_bytes"] == totals["data_bytes"]
    assert j["zero_bytes"] == totals["zero_bytes"]
    assert j["written_bytes"] == j["archive_bytes"] == totals["archive_bytes"]
    assert j["stored_bytes"] == totals["stored_bytes"]
    assert j["compression_ratio"] == round(totals["data_bytes"] / totals["stored_bytes"], 3)
    assert j["elapsed"] > 0
    assert j["bytes_per_second"] == pytest.approx(8 * MiB / j["elapsed"], rel=0.05)
    assert m["rate"] == size(j["bytes_per_second"])

    proc = agent("restore", arc, "--to-dir", short_tmp / "r", "--progress", "json")
    assert_ok(proc)
    assert (short_tmp / "r" / "d.raw").read_bytes() == image.read_bytes()
    m = _summary(proc.stderr, "restored 1 device")
    assert m["device"] == size(8 * MiB)
    assert m["read"] == size(totals["archive_bytes"]) and not m["read_note"]
    assert m["zero"] == size(totals["zero_bytes"])
    assert m["written"] == size(totals["data_bytes"]) and not m["written_note"]
    assert m["ratio"] == f"{totals['data_bytes'] / totals['stored_bytes']:.2f}x"
    j = _json_summary(proc.stderr)
    assert j is not None
    assert j["phase"] == "restore"
    assert j["read_bytes"] == totals["archive_bytes"]
    assert j["zero_bytes"] == totals["zero_bytes"]
    assert j["written_bytes"] == totals["data_bytes"]


def test_empty_disk_says_no_ratio(short_tmp: Path) -> None:
    """Nothing but zeros: ``compression n/a``, not ``0.00x``."""
    img = make_image(short_tmp / "e.qcow2", "qcow2", "1G")
    arc = short_tmp / "e.arc"
    proc = agent("backup", "--image", f"e={img}", "-o", arc)
    assert_ok(proc)
    m = _summary(proc.stderr, "backed up 1 device")
    totals = info_json(arc)["totals"]
    assert m["read"] == "0 B"
    assert m["zero"] == size(1024 * MiB) == size(totals["zero_bytes"])
    assert m["written"] == size(totals["archive_bytes"])
    assert m["ratio"] == "n/a"
