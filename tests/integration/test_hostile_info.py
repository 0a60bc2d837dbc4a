"""The real ``backup-agent`` on hostile archives (issue 13): what ``info`` prints cannot be
forged or reach the terminal as control sequences, its errors are one line, and ``prune``
shows hostile file names escaped."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from agent.archive.format import Compression, Header, Kind, RecordType
from agent.archive.writer import ArchiveWriter
from tests.integration.cli_util import ERROR_PREFIX, agent
from tests.unit.archive_util import assemble, renumber, split, write_archive

SEAL = "seal      " + "0" * 64
HEADER = Header(
    uuid=uuid.UUID(int=0xAB),
    created_ns=1_700_000_000 * 10**9,
    tool_version=f"1.0\n{SEAL}\r\x1b[2J\u202e",
    kind=Kind.INCREMENTAL,
    parent_uuid=uuid.UUID(int=0xAA),
    checkpoint="ba-\x1b]0;owned\x07",
)


def _hostile(path: Path) -> bytes:
    def build(w: ArchiveWriter) -> None:
        w.add_device("vda", 4096, {"host\nseal": "x\r\x1b[2Jy", "vm": "\u202eevil\\n"})
        w.write_data(0, 0, 4096, Compression.NONE, bytes(4096))

    data = write_archive(build, HEADER)
    path.write_bytes(data)
    return data


def test_info_escapes_what_the_archive_wrote(tmp_path: Path) -> None:
    arc = tmp_path / "hostile.arc"
    _hostile(arc)
    done = agent("info", arc)
    assert done.returncode == 0, done.stderr
    out = done.stdout.decode()
    seal = [line for line in out.splitlines() if line.startswith("seal")]
    assert len(seal) == 1 and seal[0] != SEAL
    assert out.splitlines()[:9] == [
        f"archive   {HEADER.uuid}",
        "kind      incremental",
        f"parent    {HEADER.parent_uuid}",
        "starts    checkpoint ba-\\x1b]0;owned\\x07",
        "created   2023-11-14 22:13:20 UTC",
        f"tool      backup-agent 1.0\\n{SEAL}\\r\\x1b[2J\\u202e",
        seal[0],
        "",
        f"{'DEVICE':<20} {'SIZE':>12}  PROPERTIES",
    ]
    assert out.splitlines()[9] == (f"{'vda':<20} {'4.0 KiB':>12}  "
                                   "host\\nseal=x\\r\\x1b[2Jy vm=\\u202eevil\\\\n")
    assert len(out.splitlines()) == 13
    assert out.isprintable() or set(out) - set(filter(str.isprintable, out)) == {"\n"}


def test_info_json_keeps_the_strings_and_stays_ascii(tmp_path: Path) -> None:
    arc = tmp_path / "hostile.arc"
    _hostile(arc)
    done = agent("info", arc, "--json")
    assert done.returncode == 0, done.stderr
    assert done.stdout.isascii() and b"\x1b" not in done.stdout
    info = json.loads(done.stdout)
    assert info["tool_version"] == HEADER.tool_version
    assert info["checkpoint"] == HEADER.checkpoint
    assert info["devices"][0]["properties"] == {"host\nseal": "x\r\x1b[2Jy",
                                                "vm": "\u202eevil\\n"}


def test_debug_log_lines_are_escaped(tmp_path: Path) -> None:
    arc = tmp_path / "hostile.arc"
    _hostile(arc)
    for command in (["info"], ["verify"]):
        done = agent(*command, arc, "--debug")
        assert done.returncode == 0, done.stderr
        err = done.stderr.decode()
        assert "\x1b" not in err and "\r" not in err and "\u202e" not in err
        assert all(line.startswith("backup-agent: ") for line in err.splitlines()), err
        assert "host\\nseal=x\\r\\x1b[2Jy" in err  # the device's properties
    assert "tool backup-agent 1.0\\nseal      " in agent("info", arc, "--debug").stderr.decode()


def test_a_bad_index_is_one_error_line(tmp_path: Path) -> None:
    parts = split(_hostile(tmp_path / "good.arc"))
    i = parts.find(RecordType.INDEX)
    parts.records[i].body = parts.records[i].body[:-32]  # verify: the index lists 0 of 1
    arc = tmp_path / "bad.arc"
    arc.write_bytes(assemble(renumber(parts.records), keep_index=True))
    for command in ("info", "verify"):
        done = agent(command, arc)
        assert done.returncode == 1
        lines = done.stderr.decode().splitlines()
        assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), lines
    assert b"its index and its seal count other data" in agent("info", arc).stderr


def test_prune_shows_hostile_file_names_escaped(tmp_path: Path) -> None:
    (tmp_path / "x\nkeep  evil\x1b[2J.arc").write_bytes(b"not an archive")
    (tmp_path / b"vm\xff.arc".decode("utf-8", "surrogateescape")).write_bytes(b"")
    done = agent("prune", tmp_path, "--keep-chains", "1", "--dry-run")
    assert done.returncode == 0, done.stderr
    out = done.stdout.decode()
    assert "\x1b" not in out
    lines = out.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"keep          {tmp_path}/vm\\udcff.arc  (not readable")
    assert lines[1].startswith(f"keep          {tmp_path}/x\\nkeep  evil\\x1b[2J.arc  (not")
