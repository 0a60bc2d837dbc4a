"""write_archive (agent/writing.py), the one path from an output name to a complete archive:
committed only after the engine ran and the archive was sealed; any other way out leaves
nothing a reader could take for an archive."""

from __future__ import annotations

from pathlib import Path
from uuid import UUID

import pytest

from agent.archive.format import Kind
from agent.engine import EngineOptions
from agent.writing import write_archive
from tests.unit.archive_util import read_archive

PARENT = UUID(int=7)


def test_a_complete_archive_carries_the_header_fields_given(tmp_path: Path) -> None:
    out = tmp_path / "a.arc"
    with write_archive(str(out), EngineOptions(), kind=Kind.INCREMENTAL, parent=PARENT,
                       checkpoint="ba-1") as arc:
        arc.add_config("vm.xml", b"<domain/>")
        summary = arc.run()
    assert (summary.kind, summary.parent, summary.archive_bytes) == \
        (Kind.INCREMENTAL, PARENT, out.stat().st_size)
    got = read_archive(out.read_bytes())
    assert (got.header.uuid, got.header.kind, got.header.parent_uuid) == \
        (summary.uuid, Kind.INCREMENTAL, PARENT)
    assert got.header.checkpoint == "ba-1"
    assert got.configs == {"vm.xml": b"<domain/>"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.arc"]


def test_a_failure_inside_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), \
            write_archive(str(tmp_path / "a.arc"), EngineOptions()) as arc:
        arc.add_config("vm.xml", b"<domain/>")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_leaving_without_running_leaves_nothing(tmp_path: Path) -> None:
    with write_archive(str(tmp_path / "a.arc"), EngineOptions()) as arc:
        arc.add_config("vm.xml", b"<domain/>")
    assert list(tmp_path.iterdir()) == []
