"""``backup --max-rate`` and the job file's ``max_rate``: parsed into the engine's pace, bad
values refused with one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.cli.main import main
from agent.errors import InvalidArgument
from agent.jobs.config import load_jobs
from agent.jobs.runner import _live_job
from agent.modes import Mode
from agent.pace import PaceSpec

MiB = 1024 * 1024

VM1 = """
[jobs.vm1]
qmp = "/run/backup-agent/vm1.qmp"
dir = "/srv/backups/vm1"
"""


def _jobs(tmp_path: Path, text: str) -> dict[str, PaceSpec | None]:
    path = tmp_path / "jobs.toml"
    path.write_text(text)
    return {name: job.max_rate for name, job in load_jobs(str(path)).jobs.items()}


def test_job_file_max_rate(tmp_path: Path) -> None:
    rates = _jobs(tmp_path, '[defaults]\nmax_rate = "auto"\n' + VM1 + """
[jobs.vm2]
qmp = "/run/backup-agent/vm2.qmp"
dir = "/srv/backups/vm2"
max_rate = "40M"
[jobs.vm3]
qmp = "/run/backup-agent/vm3.qmp"
dir = "/srv/backups/vm3"
max_rate = 1048576
""")
    assert rates == {"vm1": PaceSpec(adaptive=True), "vm2": PaceSpec(40 * MiB),
                     "vm3": PaceSpec(MiB)}


def test_job_file_max_rate_reaches_the_engine(tmp_path: Path) -> None:
    path = tmp_path / "jobs.toml"
    path.write_text(VM1 + 'max_rate = "auto:100M"\n')
    job = load_jobs(str(path)).jobs["vm1"]
    assert _live_job(job, "out", Mode.FULL).engine.pace == PaceSpec(100 * MiB, adaptive=True)
    path.write_text(VM1)
    assert _live_job(load_jobs(str(path)).jobs["vm1"], "out", Mode.FULL).engine.pace == \
        PaceSpec()


@pytest.mark.parametrize("value", ['"fast"', '"10"', "true", "[1]"])
def test_job_file_bad_max_rate(tmp_path: Path, value: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        _jobs(tmp_path, VM1 + f"max_rate = {value}\n")
    message = str(e.value)
    assert "\n" not in message
    assert 'job "vm1": max_rate' in message and "rate" in message


def test_cli_bad_max_rate(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["backup", "--source", "a=nbd://x", "--max-rate", "fast", "-o", "-"])
    assert e.value.code == 2
    assert "--max-rate: not a rate: 'fast'" in capsys.readouterr().err


def test_cli_auto_needs_a_live_backup(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["backup", "--source", "a=nbd://x", "--max-rate", "auto", "-o", "-"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--max-rate auto follows the copy-before-write copies" in err
    assert err.strip().splitlines()[-1].startswith("backup-agent backup: error: --max-rate")
