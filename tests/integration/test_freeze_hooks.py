"""The freeze's ways out with --freeze-command/--thaw-command hooks (agent/live/freeze.py):
real hook processes and the real watchdog process, no VM (test_freeze.py has the guest)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.live.freeze import FreezeError, FreezeOptions, Freezer

pytestmark = [pytest.mark.integration]


def hooks(tmp_path: Path, freeze: str = "", thaw: str = "") -> tuple[str, str]:
    """Commands that append "freeze" / "thaw" to tmp_path/log (then run ``freeze``/``thaw``)."""
    log = tmp_path / "log"
    return (f"sh -c 'echo freeze >>{log}; {freeze or 'true'}'",
            f"sh -c 'echo thaw >>{log}; {thaw or 'true'}'")


def log_of(tmp_path: Path) -> list[str]:
    p = tmp_path / "log"
    return p.read_text().split() if p.exists() else []


def test_freeze_then_thaw_and_the_result(tmp_path: Path) -> None:
    fc, tc = hooks(tmp_path)
    with Freezer(FreezeOptions(mode="required", freeze_command=fc, thaw_command=tc)) as fz:
        fz.prepare()
        with fz.frozen():
            assert log_of(tmp_path) == ["freeze"]
    assert log_of(tmp_path) == ["freeze", "thaw"]
    assert fz.result.consistency == "application" and fz.result.frozen_seconds is not None


def test_an_error_inside_thaws_and_goes_on(tmp_path: Path) -> None:
    fc, tc = hooks(tmp_path)
    with Freezer(FreezeOptions(freeze_command=fc, thaw_command=tc)) as fz:
        fz.prepare()
        with pytest.raises(KeyboardInterrupt), fz.frozen():
            raise KeyboardInterrupt
    assert log_of(tmp_path) == ["freeze", "thaw"]


def test_a_failing_freeze_thaws_then_required_fails_and_auto_goes_on(tmp_path: Path) -> None:
    fc, tc = hooks(tmp_path, freeze="echo no such domain >&2; exit 3")
    with Freezer(FreezeOptions(mode="required", freeze_command=fc, thaw_command=tc)) as fz:
        fz.prepare()
        with pytest.raises(FreezeError, match=r"cannot freeze the guest \(--fs-freeze "
                           r"required\): --freeze-command sh failed \(exit 3\): no such domain; "
                           "the guest was thawed"), fz.frozen():
            pytest.fail("the backup must not go on")
    assert log_of(tmp_path) == ["freeze", "thaw"]

    ran = []
    with Freezer(FreezeOptions(mode="auto", freeze_command=fc, thaw_command=tc)) as fz:
        fz.prepare()
        with fz.frozen():
            ran.append(True)
    assert ran and fz.result.consistency == "crash"
    assert "could not be frozen" in fz.result.note


@pytest.mark.slow
def test_a_freeze_command_that_hangs_times_out_and_thaws(tmp_path: Path) -> None:
    fc, tc = hooks(tmp_path, freeze="sleep 30; true")  # sleep: a grandchild
    with Freezer(FreezeOptions(mode="required", freeze_command=fc, thaw_command=tc,
                               timeout=1)) as fz:
        fz.prepare()
        with pytest.raises(FreezeError, match="did not finish within 1 s"), fz.frozen():
            pass
    assert log_of(tmp_path) == ["freeze", "thaw"]


def test_a_failing_thaw_is_an_error_and_the_watchdog_retries_it(tmp_path: Path) -> None:
    # The thaw fails the first time, then works: the agent says so, the watchdog thaws.
    marker = tmp_path / "failed-once"
    fc, tc = hooks(tmp_path, thaw=f"test -e {marker} || {{ touch {marker}; exit 1; }}")
    with Freezer(FreezeOptions(freeze_command=fc, thaw_command=tc)) as fz:
        fz.prepare()
        with pytest.raises(FreezeError, match=r"cannot thaw the guest: .* the watchdog keeps "
                           "trying"), fz.frozen():
            pass
    deadline = time.monotonic() + 60
    while log_of(tmp_path).count("thaw") < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert log_of(tmp_path) == ["freeze", "thaw", "thaw"]


KILLED = """
import os, signal, sys
from agent.live.freeze import Freezer, FreezeOptions
fz = Freezer(FreezeOptions(freeze_command=sys.argv[1], thaw_command=sys.argv[2]))
fz.prepare()
with fz.frozen():
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_sigkill_while_frozen_the_watchdog_thaws(tmp_path: Path) -> None:
    fc, tc = hooks(tmp_path)
    done = subprocess.run([sys.executable, "-c", KILLED, fc, tc], capture_output=True,
                          timeout=120, check=False)
    assert done.returncode == -9
    # (capture_output waited for the watchdog too: it holds the same stderr)
    assert log_of(tmp_path) == ["freeze", "thaw"]
    assert b"the agent went away while the guest was frozen; ran the thaw command" in done.stderr
