"""The hostile-archive builder (tests/hostile/builder.py): each attack builds an archive that
``verify`` accepts, or that it refuses exactly on the check the attack is about, never on a
checksum, so the per-attack tests that use the builder test what they mean to."""

from __future__ import annotations

import io
from collections.abc import Callable

import pytest

from agent.archive.format import MAX_DEVICE_SIZE, MAX_NAME, Kind
from agent.archive.reader import ArchiveReader
from agent.archive_info import archive_info
from agent.errors import ArchiveError
from agent.restore import RestoreOptions, RestoreResult, restore, to_null
from tests.hostile import builder as hb
from tests.unit.archive_util import read_archive, split


def verify(data: bytes) -> RestoreResult:
    """What ``backup-agent verify`` does, without the command line."""
    return restore(io.BytesIO(data), to_null(), RestoreOptions(workers=2))


def test_seal_makes_what_the_writer_makes() -> None:
    arc = hb.seal([hb.Record(hb.T.HEADER, hb.header()),
                   hb.Record(hb.T.DEVICE, hb.device(0, 4096, "vda")),
                   hb.Record(hb.T.DATA, hb.data(0, 0, b"x" * 1024)),
                   hb.Record(hb.T.ZERO, hb.zero(0, 1024, 3072))], padding=100)
    got = read_archive(arc)
    assert got.image("vda") == b"x" * 1024 + bytes(3072)
    assert got.end.records == 5  # HEADER, DEVICE, DATA, ZERO, INDEX
    assert [r.pos for r in split(arc).records][-2:] != [-1, -1]


def test_many_tiny_records() -> None:
    arc = hb.many_tiny_records(2000)
    r = verify(arc)
    assert r.progress.zero_bytes == 2000
    assert read_archive(hb.many_tiny_records(200, data_records=True)).image("tiny") == bytes(
        i % 251 + 1 for i in range(200))


def test_huge_devices() -> None:
    r = verify(hb.huge_device(devices=2))
    assert r.progress.zero_bytes == 2 * MAX_DEVICE_SIZE
    with pytest.raises(ArchiveError, match="claims a size of"):
        verify(hb.huge_device(MAX_DEVICE_SIZE + 1))


@pytest.mark.parametrize("name", [
    "a\x1b[2Jb", "new\nline", "tab\tname", "a/b", "..", ".hidden", "-rf", "sp ace", "é",
    "x" * (MAX_NAME + 1), b"\xff\xfe", ""])
@pytest.mark.parametrize("where", ["device", "config"])
def test_odd_names_are_refused_on_the_name(name: str | bytes, where: str) -> None:
    arc = hb.odd_name(name, where=where)
    with pytest.raises(ArchiveError, match=r"not allowed|limit 255|not UTF-8") as e:
        read_archive(arc)
    assert "checksum" not in str(e.value)


def test_the_longest_name_is_accepted() -> None:
    arc = hb.long_name()
    assert list(read_archive(arc).devices) == ["d" * 255]
    assert verify(arc).devices == ["d" * 255]


def test_descending_ranges_with_gaps() -> None:
    arc = hb.descending_ranges(300)
    got = read_archive(arc)
    assert got.header.kind == Kind.INCREMENTAL
    assert len(got.data["vda"]) == 300
    assert [off for off, _ in got.data["vda"]][:2] == [0, 8192]
    verify(arc)
    with pytest.raises(ArchiveError, match="missing from this full backup"):
        verify(hb.descending_ranges(10, kind=Kind.FULL))
    verify(hb.descending_ranges(10, kind=Kind.FULL, gap=0))


@pytest.mark.slow
def test_large_index(tmp_path: object) -> None:
    arc = hb.large_index(70_000)  # two INDEX records: 65,536 entries and the rest
    indexes = [r for r in split(arc).records if r.rtype == hb.T.INDEX]
    assert [len(r.body) // 32 for r in indexes] == [65_536, 70_000 - 65_536]
    assert verify(arc).progress.zero_bytes == 70_000 * 4096
    path = f"{tmp_path}/index.arc"
    with open(path, "wb") as f:
        f.write(arc)
    assert archive_info(path).end.records == 1 + 1 + 70_000 + 2


def test_config_bomb_is_valid_and_small() -> None:
    arc = hb.config_bomb(chunks=3)
    assert len(arc) < 64 * 1024
    verify(arc)  # keeps no config
    r = ArchiveReader(io.BytesIO(arc), verify_data=False, keep_configs=False)
    assert [(c.name, c.size) for c in r.configs] == [("bomb.xml", 3 * 32 * 1024 * 1024)]


def test_data_bomb_is_valid_and_small() -> None:
    arc = hb.data_bomb(3)
    assert len(arc) < 64 * 1024
    assert verify(arc).progress.data_bytes == 3 * 32 * 1024 * 1024


@pytest.mark.parametrize("compressed", [False, True])
def test_zero_filled_data(compressed: bool) -> None:
    arc = hb.zero_filled_data(8, compressed=compressed)
    r = verify(arc)
    assert (r.progress.data_bytes, r.progress.zero_bytes) == (8 * 65536, 0)


@pytest.mark.parametrize("field", ["tool_version", "checkpoint", "prop_value", "prop_key",
                                   "device_prop"])
@pytest.mark.parametrize("kind", sorted(hb.FORGED))
def test_forged_strings_are_valid(field: str, kind: str) -> None:
    arc = hb.forged_strings(hb.FORGED[kind], field=field)
    verify(arc)
    head = read_archive(arc)
    text = {"tool_version": head.header.tool_version, "checkpoint": head.header.checkpoint,
            "prop_value": head.header.props.get("vm"),
            "prop_key": next(iter(head.header.props), None)}.get(field)
    if field != "device_prop":
        assert text == hb.FORGED[kind]


def test_forged_bytes_that_are_not_utf8_are_refused() -> None:
    with pytest.raises(ArchiveError, match="not UTF-8"):
        read_archive(hb.forged_strings(b"\xc3\x28", field="tool_version"))


BUILDERS: dict[str, Callable[[], bytes]] = {
    "many_tiny_records": lambda: hb.many_tiny_records(1000), "huge_device": hb.huge_device,
    "long_name": hb.long_name, "descending_ranges": hb.descending_ranges,
    "large_index": lambda: hb.large_index(1000), "zero_filled_data": hb.zero_filled_data,
    "config_bomb": lambda: hb.config_bomb(1), "data_bomb": lambda: hb.data_bomb(1),
    "forged_strings": hb.forged_strings}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_every_attack_gets_past_every_checksum(name: str) -> None:
    """split() asserts every digest; the seal is checked by the reader above."""
    recs = split(BUILDERS[name]()).records
    assert recs[0].rtype == hb.T.HEADER and recs[-1].rtype == hb.T.END


def test_many_devices() -> None:
    arc = hb.many_devices(30, size=1000, rounds=3, empty=2)
    got = read_archive(arc)
    assert len(got.devices) == 32 and got.devices["e1"] == 0
    assert got.data["d7"] == [(0, hb.device_content(7, 1000)[:334]),
                              (334, hb.device_content(7, 1000)[334:668]),
                              (668, hb.device_content(7, 1000)[668:])]
