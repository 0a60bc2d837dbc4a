"""agent.qemu.caps: copy-before-write options read from a QMP schema (pure logic; the
integration tests read the real schema of QEMU 7.2 and 10.0)."""

from __future__ import annotations

from typing import Any

from agent.qemu.caps import QEMU_7_2, QemuCaps, cbw_options


def schema(cbw_members: list[str]) -> list[dict[str, Any]]:
    """A trimmed ``query-qmp-schema`` reply: type names are opaque numbers, as QEMU's are."""
    return [
        {"name": "blockdev-add", "meta-type": "command", "arg-type": "12", "ret-type": "0"},
        {"name": "12", "meta-type": "object",
         "members": [{"name": "driver", "type": "13"}], "tag": "driver",
         "variants": [{"case": "raw", "type": "14"},
                      {"case": "copy-before-write", "type": "15"}]},
        {"name": "14", "meta-type": "object", "members": [{"name": "offset", "type": "int"}]},
        {"name": "15", "meta-type": "object",
         "members": [{"name": m, "type": "int"} for m in cbw_members]},
    ]


def test_qemu_7_2() -> None:
    options = cbw_options(schema(["file", "target", "bitmap", "on-cbw-error", "cbw-timeout"]))
    caps = QemuCaps(options)
    assert caps == QEMU_7_2
    assert not caps.min_cluster_size and not caps.trims_rounded


def test_qemu_10() -> None:
    caps = QemuCaps(cbw_options(schema(["file", "target", "cbw-timeout", "min-cluster-size"])))
    assert caps.min_cluster_size and caps.trims_rounded


def test_no_copy_before_write_driver() -> None:
    s = schema([])
    s[1]["variants"] = [{"case": "raw", "type": "14"}]
    assert cbw_options(s) == frozenset()
    assert cbw_options([]) == frozenset()
