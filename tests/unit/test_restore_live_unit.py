"""Pure parts of ``restore --live``: the reopen options, names, the server record, --drive,
and the usage errors of the command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.errors import AgentError, InvalidArgument
from agent.qemu import names
from agent.qemu.stream import MIN_POLL, POLL, JobState, next_look, reopen_options
from agent.restore_live import parse_drive
from agent.serve.detached import ServerRecord

AGENT = str(Path(sys.executable).parent / "backup-agent")


def test_reopen_keeps_what_qmp_tells_and_sets_the_backing() -> None:
    node = {"drv": "qcow2", "node-name": "vda-fmt", "ro": False, "detect_zeroes": "unmap",
            "cache": {"writeback": True, "direct": True, "no-flush": False}}
    assert reopen_options(node, "vda-file", "ba-t-vda-src") == {
        "driver": "qcow2", "node-name": "vda-fmt", "file": "vda-file",
        "backing": "ba-t-vda-src", "read-only": False, "detect-zeroes": "unmap",
        "discard": "unmap", "cache": {"direct": True, "no-flush": False}}


def test_reopen_with_defaults_gives_no_options_qemu_would_not_need() -> None:
    node = {"drv": "qcow2", "node-name": "n", "ro": False, "detect_zeroes": "off",
            "cache": {"writeback": True, "direct": False, "no-flush": False}}
    assert reopen_options(node, "f", None) == {"driver": "qcow2", "node-name": "n",
                                               "file": "f", "backing": None,
                                               "read-only": False}


def test_the_next_look_comes_sooner_as_the_slowest_stream_nears_its_end() -> None:
    def job(i: str, done: int, status: str = "running") -> JobState:
        return JobState(i, status, done, 1000, None)

    first = {"a": (10.0, 0), "b": (10.0, 0)}
    # No rate yet: nothing moved since the first look.
    assert next_look([job("a", 0)], first, 10.0) == POLL
    assert next_look([job("a", 0)], first, 11.0) == POLL
    # a: 100 a second, 500 left, 5 s: the longest pause.
    assert next_look([job("a", 500)], first, 15.0) == POLL
    # a: 100 a second, 10 left: half of 0.1 s.
    assert next_look([job("a", 990)], first, 19.9) == pytest.approx(0.05)
    # The slowest of the running jobs counts; one that ended does not.
    assert next_look([job("a", 990), job("b", 500)], first, 19.9) == POLL
    assert next_look([job("a", 990), job("b", 1000, "concluded")], first, 19.9) \
        == pytest.approx(0.05)
    # Never below MIN_POLL, and never above POLL.
    assert next_look([job("a", 999)], {"a": (0.0, 0)}, 0.999) == MIN_POLL
    assert next_look([job("a", 1)], {"a": (0.0, 0)}, 1000.0) == POLL


def test_stream_names_fit_qemu_and_fall_back_to_the_index() -> None:
    n = names.stream_names("1a2b3c4d", "vda", 0)
    assert (n.source, n.job) == ("ba-1a2b3c4d-vda-src", "ba-1a2b3c4d-vda-stream")
    long = names.stream_names("1a2b3c4d", "virtio-disk-number-one", 3)
    assert (long.source, long.job) == ("ba-1a2b3c4d-d3-src", "ba-1a2b3c4d-d3-stream")
    assert len(names.live_marker("1a2b3c4d")) <= names.MAX_NAME
    assert all(names.is_ours(x, "1a2b3c4d") for x in (n.source, n.job, long.job))


def test_server_record_round_trips_and_refuses_what_is_not_one() -> None:
    rec = ServerRecord(1234, 5678, "/tmp/ba-live-abc", "/tmp/ba-live-abc/nbd.sock")
    assert ServerRecord.from_json(rec.to_json()) == rec
    for bad in ("", "{}", '{"pid": "x"}', ServerRecord(1, 2, "/tmp/a", "/tmp/a/s").to_json(),
                ServerRecord(99, 2, "/etc", "/etc/s").to_json()):
        with pytest.raises(AgentError):
            ServerRecord.from_json(bad)


def test_drive_is_id_equals_target() -> None:
    d = parse_drive("vda=/var/lib/vm/vda.qcow2")
    assert (d.id, d.target) == ("vda", "/var/lib/vm/vda.qcow2")
    for bad in ("vda", "=x.qcow2", "vda="):
        with pytest.raises(InvalidArgument):
            parse_drive(bad)


@pytest.mark.parametrize(("args", "words"), [
    (["--live", "--drive", "vda=x.qcow2"], "--qmp"),
    (["--live", "--qmp", "q.sock"], "--drive"),
    (["--live", "--qmp", "q.sock", "--drive", "vda=x", "--device", "vda"], "--device"),
    (["--live", "--qmp", "host:4444", "--drive", "vda=x"], "Unix socket"),
    (["--to-dir", "out", "--qmp", "q.sock"], "for --live"),
    (["--live", "--to-dir", "out"], "not allowed"),
])
def test_live_usage_errors(tmp_path: Path, args: list[str], words: str) -> None:
    proc = subprocess.run([AGENT, "restore", str(tmp_path / "vm.arc"), *args],
                          capture_output=True, text=True, cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    assert words in proc.stderr.splitlines()[-1], proc.stderr
    assert list(tmp_path.iterdir()) == []
