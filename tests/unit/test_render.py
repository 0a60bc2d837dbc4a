"""The final summary of a backup or restore: every number the issue names, by name, with
known values (agent/cli/render.py)."""

from __future__ import annotations

import io
import json

from agent.cli.render import ProgressRenderer, summary_fields, summary_line
from agent.pipeline import Progress

MiB = 1024 * 1024

#: 256 MiB of devices in 2 s: 200 MiB data stored as 100 MiB, 56 MiB zero.
BACKUP = Progress("backup", done=256 * MiB, total=256 * MiB, data_bytes=200 * MiB,
                  zero_bytes=56 * MiB, stored_bytes=100 * MiB, elapsed=2.0)
RESTORE = Progress("restore", done=256 * MiB, total=256 * MiB, data_bytes=200 * MiB,
                   zero_bytes=56 * MiB, stored_bytes=100 * MiB, elapsed=4.0)
ARCHIVE = 101 * MiB + 512 * 1024


def test_backup_line_names_every_number() -> None:
    assert summary_line(BACKUP, "backed up 1 device(s)", ARCHIVE) == (
        "backed up 1 device(s): 256.0 MiB in 2.00 s (128.0 MiB/s): read 200.0 MiB, "
        "skipped 56.0 MiB as zero, wrote 101.5 MiB (compression 2.00x)")


def test_backup_line_without_archive_size_says_what_it_wrote() -> None:
    assert summary_line(BACKUP, "b") == (
        "b: 256.0 MiB in 2.00 s (128.0 MiB/s): read 200.0 MiB, skipped 56.0 MiB as zero, "
        "wrote 100.0 MiB of record payload (compression 2.00x)")


def test_restore_line_reads_the_archive_and_writes_the_data() -> None:
    assert summary_line(RESTORE, "restored 1 device(s)", ARCHIVE) == (
        "restored 1 device(s): 256.0 MiB in 4.00 s (64.0 MiB/s): read 101.5 MiB, "
        "skipped 56.0 MiB as zero, wrote 200.0 MiB (compression 2.00x)")


def test_restore_line_without_archive_size_says_what_it_read() -> None:
    assert summary_line(RESTORE, "r") == (
        "r: 256.0 MiB in 4.00 s (64.0 MiB/s): read 100.0 MiB of record payload, "
        "skipped 56.0 MiB as zero, wrote 200.0 MiB (compression 2.00x)")


def test_restore_chain_phase_is_a_restore() -> None:
    p = Progress("restore 2/3", 3 * MiB, 0, 2 * MiB, 1 * MiB, 1 * MiB, 1.0)
    assert summary_fields(p, 5 * MiB)["phase"] == "restore"
    assert summary_fields(p, 5 * MiB)["read_bytes"] == 5 * MiB
    assert summary_fields(p, 5 * MiB)["written_bytes"] == 2 * MiB


def test_verify_line_writes_nothing() -> None:
    line = summary_line(RESTORE, "verified 1 device(s)", ARCHIVE, writes=False)
    assert line.endswith("read 101.5 MiB, skipped 56.0 MiB as zero, checked 200.0 MiB of "
                         "data (compression 2.00x)"), line
    assert "wrote" not in line
    assert summary_fields(RESTORE, ARCHIVE, writes=False)["written_bytes"] is None


def test_no_data_has_no_ratio() -> None:
    empty = Progress("backup", 8 * 2**40, 8 * 2**40, 0, 8 * 2**40, 0, 0.5)
    line = summary_line(empty, "b", 4096)
    assert line == ("b: 8.0 TiB in 0.50 s (16.0 TiB/s): read 0 B, skipped 8.0 TiB as zero, "
                    "wrote 4.0 KiB (compression n/a)")
    assert summary_fields(empty, 4096)["compression_ratio"] is None


def test_nothing_at_all() -> None:
    """A backup of empty devices: no division by zero anywhere."""
    p = Progress("backup", 0, 0, 0, 0, 0, 0.0)
    assert summary_line(p, "b", 100) == (
        "b: 0 B in 0.00 s (0 B/s): read 0 B, skipped 0 B as zero, wrote 100 B "
        "(compression n/a)")


def test_fields() -> None:
    assert summary_fields(BACKUP, ARCHIVE) == {
        "phase": "backup", "device_bytes": 256 * MiB,
        "read_bytes": 200 * MiB, "read_what": "device",
        "zero_bytes": 56 * MiB,
        "written_bytes": ARCHIVE, "written_what": "archive",
        "data_bytes": 200 * MiB, "stored_bytes": 100 * MiB, "archive_bytes": ARCHIVE,
        "compression_ratio": 2.0, "elapsed": 2.0, "bytes_per_second": 128 * MiB,
    }
    f = summary_fields(RESTORE, ARCHIVE)
    assert (f["read_bytes"], f["read_what"]) == (ARCHIVE, "archive")
    assert (f["written_bytes"], f["written_what"]) == (200 * MiB, "device")
    f = summary_fields(RESTORE)
    assert (f["read_bytes"], f["read_what"]) == (100 * MiB, "payload")
    assert f["archive_bytes"] is None


def test_json_mode_ends_with_a_summary_object() -> None:
    out = io.StringIO()
    r = ProgressRenderer("json", out)
    r.update(BACKUP)
    r.close()
    r.summary(BACKUP, "backed up 1 device(s)", ARCHIVE)
    lines = [json.loads(ln) for ln in out.getvalue().splitlines()]
    assert [e["event"] for e in lines] == ["progress", "summary"]
    assert lines[1] == {"event": "summary", "what": "backed up 1 device(s)",
                        **summary_fields(BACKUP, ARCHIVE)}
    assert lines[1]["read_bytes"] == 200 * MiB
    assert lines[1]["written_bytes"] == ARCHIVE


def test_other_modes_print_no_summary_object() -> None:
    for mode in ("none", "bar"):
        out = io.StringIO()
        ProgressRenderer(mode, out).summary(BACKUP, "b", ARCHIVE)
        assert out.getvalue() == ""
