"""s3:// names and the multipart upload's part sizes (agent/s3/): pure logic, no server."""

from __future__ import annotations

import pytest

from agent.errors import InvalidArgument, OutputError
from agent.s3.names import S3Name, parse_object, parse_prefix
from agent.s3.upload import (
    CAPACITY,
    MAX_PART,
    MAX_PARTS,
    MIN_PART,
    PART_SIZE,
    capacity,
    first_part_for,
    part_size,
    settings,
)
from agent.units import GiB, MiB, TiB


def test_names() -> None:
    assert parse_object("s3://backups/vm1/2026/full.arc") == S3Name("backups", "vm1/2026/full.arc")
    assert parse_prefix("s3://backups") == S3Name("backups", "")
    assert parse_prefix("s3://backups/vm1") == S3Name("backups", "vm1/")
    assert str(parse_prefix("s3://backups/vm1/").child("a.arc")) == "s3://backups/vm1/a.arc"
    for bad in ("s3://backups", "s3://backups/", "s3://backups/vm1/", "s3://B/x",
                "s3:///x", "s3://backups//x", "/tmp/x"):
        with pytest.raises(InvalidArgument):
            parse_object(bad)


def test_parts_grow_every_thousand() -> None:
    assert [part_size(8 * MiB, n) for n in (1, 1000, 1001, 2001, 10_000)] == [
        8 * MiB, 8 * MiB, 16 * MiB, 24 * MiB, 80 * MiB]
    assert CAPACITY == 55_000
    assert capacity(PART_SIZE) == 55_000 * 8 * MiB  # 430 GiB at the default
    assert part_size(GiB, MAX_PARTS) == MAX_PART  # never past S3's largest part


@pytest.mark.parametrize("devices", [0, 1, GiB, 100 * GiB, 430 * GiB, 2 * TiB, 4 * TiB])
def test_the_first_part_fits_the_devices(devices: int) -> None:
    first = first_part_for(devices, PART_SIZE)
    assert MIN_PART <= first <= MAX_PART and first % MiB == 0
    assert capacity(first) >= devices * 1.25  # the archive fits with room for framing
    if devices <= 300 * GiB:
        assert first == PART_SIZE  # small disks keep small parts (memory)
    if devices == 2 * TiB:
        assert first <= 48 * MiB


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKUP_AGENT_S3_PART_SIZE", "64M")
    monkeypatch.setenv("BACKUP_AGENT_S3_UPLOADS", "8")
    assert settings() == (64 * MiB, 8)
    for name, value in (("BACKUP_AGENT_S3_PART_SIZE", "4M"), ("BACKUP_AGENT_S3_PART_SIZE", "6G"),
                        ("BACKUP_AGENT_S3_UPLOADS", "0"), ("BACKUP_AGENT_S3_UPLOADS", "x")):
        monkeypatch.setenv(name, value)
        with pytest.raises(InvalidArgument):
            settings()
        monkeypatch.delenv(name)


def test_memory_bounds_the_parts_in_flight() -> None:
    from agent.s3.upload import MEMORY, UPLOADS, S3Output

    out = S3Output.__new__(S3Output)  # _slots is pure: no server needed
    out.uploads = UPLOADS
    assert out._slots(8 * MiB) == UPLOADS
    assert (out._slots(64 * MiB) + 1) * 64 * MiB <= MEMORY
    assert out._slots(432 * MiB) == 1  # two parts: one sent, one filled


def test_the_ten_thousandth_part_may_be_the_last() -> None:
    from agent.s3.upload import S3Output

    out = S3Output.__new__(S3Output)  # write() without a server: parts are sent by _send
    out.name = out._what = "s3://b/k.arc"
    out.position, out.first_part, out._number, out._fill = 0, 5 * MiB, MAX_PARTS, 0
    out._buf = bytearray(part_size(out.first_part, MAX_PARTS))
    sent: list[int] = []

    def send() -> None:
        sent.append(out._number)
        out._number += 1
        out._fill = 0

    out._send = send  # type: ignore[method-assign]
    out.write([bytes(len(out._buf))])  # fills part 10,000 exactly: fine
    assert sent == [MAX_PARTS]
    with pytest.raises(OutputError, match="outgrew 10,000 parts"):
        out.write([b"x"])
