"""deploy/ and scheduled backups: the systemd units as systemd reads them, the install
script, ``job check``, ``job run`` against real VMs (into a directory and through a command)
and ``prune`` on real archives. Real processes throughout: systemd-analyze, bash, QEMU.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from agent.archive.format import Compression, Header, Kind
from agent.archive.output import SequentialOutput
from agent.archive.writer import ArchiveWriter
from agent.jobs import catalog
from tests.integration.cli_util import (
    AGENT,
    ERROR_PREFIX,
    MiB,
    agent,
    assert_error,
    assert_ok,
    assert_usage_error,
    describe,
    info_json,
    processes_mentioning,
    running,
    wait_for,
    wait_gone,
)
from tests.integration.conftest import make_image, qemu_img_compare
from tests.integration.vm import Disk, Vm, VmFactory

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
SYSTEMD = DEPLOY / "systemd"
UNITS = sorted(p for p in SYSTEMD.iterdir() if p.suffix in (".service", ".timer"))
DROPINS = sorted(SYSTEMD.glob("*.conf"))
INSTALLED = "/usr/local/bin/backup-agent"  # where the units expect the program
INSTANCES = {"backup-agent@": "vm1", "backup-agent-prune@": "srv-backup-vmhost1"}


def _files(directory: Path) -> list[str]:
    """What a directory holds, without the lock file a job run or a prune leaves."""
    return sorted(set(os.listdir(directory)) - {catalog.LOCK})


# -- systemd units --------------------------------------------------------------------------

def _stage(dest: Path) -> list[str]:
    """The units in ``dest`` exactly as written, except where the program lives: verify
    insists that ExecStart's program exists, and on a test machine it is the venv's.
    Returns the instance names to verify."""
    names = []
    for unit in UNITS:
        text = unit.read_text()
        execs = re.findall(r"^ExecStart=(\S+)", text, re.MULTILINE)
        assert execs in ([], [INSTALLED]), f"{unit.name}: ExecStart runs {execs}"
        (dest / unit.name).write_text(text.replace(f"ExecStart={INSTALLED}",
                                                   f"ExecStart={AGENT}"))
        prefix = unit.name.split("@")[0] + "@"
        names.append(f"{prefix}{INSTANCES[prefix]}{unit.suffix}")
    return names


def _verify(where: Path, names: list[str]) -> None:
    """``systemd-analyze verify``: exit 0 and not one complaint about our units (unknown
    keys, bad values and missing programs are only warnings there: exit 0 is not enough)."""
    proc = subprocess.run(["systemd-analyze", "verify", *names], cwd=where,
                          capture_output=True, text=True, timeout=60)
    ours = [line for line in (proc.stdout + proc.stderr).splitlines()
            if "backup-agent" in line]
    assert proc.returncode == 0 and not ours, f"exit {proc.returncode}\n{proc.stderr}"


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    assert {u.name for u in UNITS} >= {"backup-agent@.service", "backup-agent@.timer",
                                       "backup-agent-prune@.service",
                                       "backup-agent-prune@.timer"}
    _verify(tmp_path, _stage(tmp_path))


@pytest.mark.parametrize("dropin", DROPINS, ids=lambda p: p.name)
def test_dropins_pass_systemd_analyze_verify(tmp_path: Path, dropin: Path) -> None:
    _stage(tmp_path)
    (tmp_path / "backup-agent@.service.d").mkdir()
    shutil.copy(dropin, tmp_path / "backup-agent@.service.d" / dropin.name)
    _verify(tmp_path, ["backup-agent@vm1.service"])


@pytest.mark.parametrize(("unit", "most"), [("backup-agent@vm1.service", 2.0),
                                            ("backup-agent-prune@srv-backup-x.service", 1.0)])
def test_units_stay_hardened(tmp_path: Path, unit: str, most: float) -> None:
    """systemd's own exposure score (0 safe .. 10 exposed) must not creep up unnoticed."""
    _stage(tmp_path)
    proc = subprocess.run(["systemd-analyze", "security", "--offline=true", unit],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d)", proc.stdout)
    assert m is not None, proc.stdout + proc.stderr
    assert float(m.group(1)) <= most, proc.stdout


@pytest.mark.root("systemd-tmpfiles --create makes files owned by the service user")
def test_install_script(tmp_path: Path) -> None:
    root = tmp_path / "root"
    install = [str(DEPLOY / "install.sh"), "--root", str(root)]
    units = root / "etc/systemd/system"
    dropins = units / "backup-agent@.service.d"

    subprocess.run([*install, "--user", "root"], check=True, capture_output=True)
    for name in ("backup-agent@.service", "backup-agent@.timer"):
        assert (units / name).read_text() == (SYSTEMD / name).read_text()
    assert sorted(os.listdir(dropins)) == ["proxmox.conf"]  # QEMU runs as root
    assert os.readlink(root / "usr/local/bin/backup-agent") == AGENT
    jobs = root / "etc/backup-agent/jobs.toml"
    assert jobs.read_text() == (DEPLOY / "jobs.toml").read_text()
    tmpfiles = root / "etc/tmpfiles.d/backup-agent.conf"
    assert "d /run/backup-agent         0750 root - -" in tmpfiles.read_text()
    # what systemd-tmpfiles makes of it at boot
    subprocess.run(["systemd-tmpfiles", f"--root={root}", "--create", str(tmpfiles)],
                   check=True, capture_output=True)
    assert (root / "run/backup-agent").stat().st_mode & 0o777 == 0o750
    assert (root / "var/spool/backup-agent").stat().st_mode & 0o777 == 0o700

    jobs.write_text("# mine\n")
    subprocess.run([*install, "--user", "libvirt-qemu"], check=True, capture_output=True)
    assert jobs.read_text() == "# mine\n"  # never overwritten
    assert os.listdir(dropins) == []  # the unit's own User=libvirt-qemu; old drop-in gone
    assert "0750 libvirt-qemu - -" in tmpfiles.read_text()
    subprocess.run([*install, "--user", "qemu"], check=True, capture_output=True)
    assert (dropins / "user.conf").read_text().endswith("[Service]\nUser=qemu\n")

    bad = subprocess.run([*install, "--user", "a b"], capture_output=True, text=True)
    assert bad.returncode == 2 and "bad user name" in bad.stderr


def test_sysusers_entry(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    subprocess.run(["systemd-sysusers", f"--root={tmp_path}",
                    str(DEPLOY / "sysusers.d/backup-agent.conf")], check=True,
                   capture_output=True)
    assert re.search(r"^backup-agent:x:\d+:\d+:", (tmp_path / "etc/passwd").read_text(),
                     re.MULTILINE)


# -- job check ------------------------------------------------------------------------------

def test_job_check_the_example() -> None:
    proc = agent("job", "check", "--config", DEPLOY / "jobs.toml")
    assert_ok(proc)
    lines = proc.stdout.decode().splitlines()
    assert lines[0] == f"{DEPLOY / 'jobs.toml'}: 3 job(s)"
    assert [line.split(":")[0].strip() for line in lines[1:]] == ["vm1", "vm2", "vm3"]
    # what would fail now is said, as warnings: here the VMs do not exist
    assert (b'warning: job "vm1": no monitor socket at /run/backup-agent/vm1/qmp.sock'
            in proc.stderr)
    # the network job's credentials are read and checked: here they do not exist
    assert b'warning: job "vm3": ' in proc.stderr and b"/etc/backup-agent/tls/hv2" in proc.stderr


@pytest.mark.parametrize(("text", "words"), [
    ('[jobs.vm1]\nqmp = "/run/vm1.qmp"\ndir = "/srv/x"\nkeep_chains = "x"\n',
     ['job "vm1": keep_chains must be a positive integer, got "x"']),
    ('[jobs.vm1]\nqmp = "/run/vm1.qmp"\ndir = "/srv/x"\nkeep_chain = 3\n',
     ['job "vm1": unknown key "keep_chain"', 'known keys: cbw_listen, cbw_memory']),
    ('[jobs.vm1]\nqmp = "/run/vm1.qmp"\n', ['job "vm1": give exactly one destination']),
    ('[jobs.vm1\n', ["not valid TOML", "line 1"]),
])
def test_job_check_a_bad_file(tmp_path: Path, text: str, words: list[str]) -> None:
    path = tmp_path / "jobs.toml"
    path.write_text(text)
    message = assert_error(agent("job", "check", "--config", path), *words)
    assert message.startswith(f"{path}: ")


def test_job_usage_errors(tmp_path: Path) -> None:
    assert "cannot read" in assert_error(agent("job", "check", "--config", tmp_path / "x"))
    assert_usage_error(agent("job"))
    assert_usage_error(agent("job", "frobnicate"))
    assert_usage_error(agent("prune", tmp_path))  # --keep-chains is required
    assert_usage_error(agent("prune", tmp_path, "--keep-chains", "0"))


# -- prune ----------------------------------------------------------------------------------

def _incremental(path: Path, parent: str) -> str:
    """An incremental archive (one changed cluster) on archive ``parent``; its uuid."""
    header = Header(uuid=uuid.uuid4(), created_ns=time.time_ns(), tool_version="test",
                    kind=Kind.INCREMENTAL, parent_uuid=uuid.UUID(parent))
    with open(path, "wb") as f:
        w = ArchiveWriter(SequentialOutput(f.fileno(), str(path)), header)
        w.add_device("disk", 4 * MiB)
        w.write_data(0, 0, 65536, Compression.NONE, b"\x42" * 65536)
        w.finish()
    return str(header.uuid)


def test_prune_real_archives(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.raw", "raw", 4 * MiB, [("write", 0x11, 0, MiB)])
    backups = tmp_path / "backups"
    backups.mkdir()

    def full(n: int) -> str:  # a full archive made by the real command; its uuid
        arc = backups / f"vm-{n}-full.arc"
        assert_ok(agent("backup", "--image", f"disk={image}", "-o", arc))
        return str(info_json(arc)["uuid"])

    # three chains, oldest first: full 0 and two incrementals, full 1, full 2 and one
    _incremental(backups / "vm-0b.arc", _incremental(backups / "vm-0a.arc", full(0)))
    full(1)
    _incremental(backups / "vm-2a.arc", full(2))
    _incremental(backups / "stray.arc", str(uuid.uuid4()))  # its full is somewhere else
    (backups / "notes.arc").write_text("not an archive\n")
    before = _files(backups)

    dry = agent("prune", backups, "--keep-chains", "2", "--dry-run")
    assert_ok(dry)
    assert _files(backups) == before
    out = dry.stdout.decode()
    assert re.findall(r"^would delete\s+(\S+)", out, re.MULTILINE) == [
        str(backups / n) for n in ("vm-0-full.arc", "vm-0a.arc", "vm-0b.arc")]
    assert b"nothing deleted" in dry.stderr

    with catalog.locked(str(backups)):  # a job run holds the directory
        assert "in use" in assert_error(agent("prune", backups, "--keep-chains", "2"))

    done = agent("prune", backups, "--keep-chains", "2")
    assert_ok(done)
    assert _files(backups) == sorted(
        set(before) - {"vm-0-full.arc", "vm-0a.arc", "vm-0b.arc"})
    out = done.stdout.decode()
    assert re.search(rf"^keep\s+{backups / 'stray.arc'}\s+\(no full archive", out, re.M)
    assert re.search(rf"^keep\s+{backups / 'notes.arc'}\s+\(not readable", out, re.M)

    assert_ok(agent("prune", backups, "--keep-chains", "1"))
    assert _files(backups) == ["notes.arc", "stray.arc", "vm-2-full.arc",
                                           "vm-2a.arc"]
    assert "cannot read directory" in assert_error(
        agent("prune", tmp_path / "nope", "--keep-chains", "1", "--dry-run"))


# -- job run --------------------------------------------------------------------------------

@pytest.fixture
def vm(vms: VmFactory, tmp_path: Path) -> tuple[Vm, Path]:
    """A running VM with one qcow2 disk, and a copy of the disk as it was at the start."""
    disk = make_image(tmp_path / "vda.qcow2", "qcow2", 16 * MiB, [
        ("write", 0x5A, 0, 3 * MiB), ("write", 0xA5, 9 * MiB, MiB)])
    before = tmp_path / "before.qcow2"
    shutil.copy(disk, before)
    machine = vms.start([Disk(disk, "qcow2", "vda")])
    machine.monitor.execute("cont")
    return machine, before


def _jobs(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


@pytest.mark.qemu  # a live backup: run on QEMU 10 too (make test)
def test_job_run_into_a_directory(vm: tuple[Vm, Path], tmp_path: Path) -> None:
    machine, before = vm
    dest = tmp_path / "backups"
    dest.mkdir()
    jobs = _jobs(tmp_path / "jobs.toml", f"""
[jobs.vm1]
qmp = "{machine.agent_qmp}"
dir = "{dest}"
mode = "full"
keep_chains = 1
spool_dir = "{tmp_path}"
""")
    first = agent("job", "run", "--config", jobs, "vm1")
    assert_ok(first)
    [name] = _files(dest)
    assert re.fullmatch(r"vm1-\d{8}T\d{6}Z-full\.arc", name), name
    restored = tmp_path / "restored"
    assert_ok(agent("restore", dest / name, "--to-dir", restored))
    assert qemu_img_compare(before, "qcow2", restored / "vda.raw", "raw")
    assert f"full archive {dest / name}".encode() in first.stderr

    second = agent("job", "run", "--config", jobs)  # no names: every job
    assert_ok(second)
    [newer] = _files(dest)  # keep_chains = 1: the first chain is gone, nothing hidden left
    assert newer != name and newer > name
    assert f"deleted {dest / name}".encode() in second.stderr


def _expect(before: Path, dest: Path, writes: list[tuple[int, int, int]]) -> Path:
    """``before`` with the guest's ``writes`` (pattern, offset, length) applied: the disk
    as a backup taken after them must restore it."""
    shutil.copy(before, dest)
    argv = ["qemu-io", "-f", "qcow2"]
    for pattern, offset, length in writes:
        argv += ["-c", f"write -P {pattern:#x} {offset} {length}"]
    subprocess.run([*argv, str(dest)], check=True, capture_output=True)
    return dest


def _kind(name: str) -> str:
    """The kind in an archive's file name: JOB-STAMP-KIND.arc, or JOB-STAMP-KIND_N.arc when
    backups of one job finish within the same second (they do here, a few ms apart)."""
    m = re.fullmatch(r".+-\d{8}T\d{6}Z-([a-z]+)(?:_\d+)?\.arc", name)
    assert m is not None, name
    return m.group(1)


@pytest.mark.qemu  # a live backup: run on QEMU 10 too (make test)
@pytest.mark.slow
def test_job_run_auto_builds_chains_and_starts_new_ones(vm: tuple[Vm, Path],
                                                         tmp_path: Path) -> None:
    """mode auto (the default): a full, then incrementals on it; a full again when the
    archive the next incremental would build on is not in the directory, and when the newest
    full is older than full_every; retention deletes whole chains."""
    machine, before = vm
    dest = tmp_path / "backups"
    dest.mkdir()
    jobs = _jobs(tmp_path / "jobs.toml", f"""
[jobs.vm1]
qmp = "{machine.agent_qmp}"
dir = "{dest}"
""")

    def run() -> tuple[str, bytes]:
        known = set(_files(dest))
        proc = agent("job", "run", "--config", jobs, "vm1")
        assert_ok(proc)
        [new] = set(_files(dest)) - known
        return new, proc.stderr

    full, _ = run()
    assert _kind(full) == "full", full
    machine.guest_write("vda", 0x77, MiB, 64 * 1024)
    inc, _ = run()
    assert _kind(inc) == "incremental", inc
    assert info_json(dest / inc)["parent_uuid"] == info_json(dest / full)["uuid"]
    assert_ok(agent("restore", dest / full, dest / inc, "--to-dir", tmp_path / "r"))
    assert qemu_img_compare(_expect(before, tmp_path / "e.qcow2", [(0x77, MiB, 65536)]),
                            "qcow2", tmp_path / "r" / "vda.raw", "raw")

    # The incremental the VM's checkpoint points at is gone: a new chain starts.
    (dest / inc).unlink()
    again, err = run()
    assert _kind(again) == "full" and b"would build on" in err, err.decode()

    # full_every: the newest full is older than that: a new chain, and with keep_chains = 1
    # the older chains go, whole.
    jobs.write_text(jobs.read_text() + 'full_every = "1s"\nkeep_chains = 1\n')
    time.sleep(1.1)
    last, err = run()
    assert _kind(last) == "full" and b"(full_every)" in err, err.decode()
    assert _files(dest) == [last]


@pytest.mark.qemu  # a live backup: run on QEMU 10 too (make test)
def test_job_run_through_a_command(vm: tuple[Vm, Path], tmp_path: Path) -> None:
    machine, before = vm
    dest = tmp_path / "remote"
    dest.mkdir()
    # what deploy/ssh/backup-receive does on a backup host: put under a hidden name, then
    # commit (rename) only after the whole archive arrived
    jobs = _jobs(tmp_path / "jobs.toml", f"""
[jobs.vm1]
qmp = "{machine.agent_qmp}"
mode = "full"
compression = "none"
command = "cat > {dest}/.{{name}}.partial"
commit_command = "mv {dest}/.{{name}}.partial {dest}/{{name}}"
""")
    assert_ok(agent("job", "run", "--config", jobs, "vm1"))
    [name] = _files(dest)
    assert re.fullmatch(r"vm1-\d{8}T\d{6}Z-full\.arc", name), name
    assert_ok(agent("verify", dest / name))
    assert_ok(agent("restore", dest / name, "--to-dir", tmp_path / "r"))
    assert qemu_img_compare(before, "qcow2", tmp_path / "r" / "vda.raw", "raw")


@pytest.mark.qemu  # a live backup: run on QEMU 10 too (make test)
def test_a_failing_command_fails_the_job(vm: tuple[Vm, Path], tmp_path: Path) -> None:
    machine, _ = vm
    marker = tmp_path / "committed"
    jobs = _jobs(tmp_path / "jobs.toml", f"""
[jobs.vm1]
qmp = "{machine.agent_qmp}"
mode = "full"
compression = "none"
# reads a little, then fails the way a full disk on a backup host would
command = "head -c 65536 > /dev/null; echo 'backup host: No space left on device' >&2; exit 3"
commit_command = "touch {marker}"
""")
    message = assert_error(agent("job", "run", "--config", jobs))
    assert message == ('job "vm1": the command failed (exit status 3): backup host: No space '
                       'left on device'), message
    assert not marker.exists()
    # a pipeline fails if any part of it does (bash -o pipefail; /bin/sh, dash, has none)
    jobs.write_text(f"""
[jobs.vm1]
qmp = "{machine.agent_qmp}"
mode = "full"
compression = "none"
command = "sh -c 'head -c 65536 > /dev/null; exit 4' | cat > /dev/null"
commit_command = "touch {marker}"
""")
    message = assert_error(agent("job", "run", "--config", jobs))
    assert message.startswith('job "vm1": the command failed (exit status 4)'), message
    assert not marker.exists()


def test_a_failed_backup_stops_the_command_before_it_sees_the_end(
        tmp_path: Path) -> None:
    """With an end of file, `cat > x && touch done` would finish a truncated archive as if
    whole: the command is stopped instead, so `done` never appears."""
    done = tmp_path / "done"
    jobs = _jobs(tmp_path / "jobs.toml", f"""
[jobs.vm1]
qmp = "{tmp_path}/no-such.qmp"
command = "cat > {tmp_path}/{{name}} && touch {done}"
""")
    message = assert_error(agent("job", "run", "--config", jobs))
    assert message.startswith('job "vm1": ') and "no-such.qmp" in message, message
    time.sleep(0.5)  # had the command got an end of file, it would be done by now
    assert not done.exists()


@pytest.mark.qemu  # a live backup: run on QEMU 10 too (make test)
def test_sigterm_stops_the_backup_and_the_command(vm: tuple[Vm, Path],
                                                  tmp_path: Path) -> None:
    """systemd stops a job with SIGTERM: the agent stops, and takes the command (its whole
    pipeline) with it before the command sees an end of file."""
    machine, _ = vm
    done = tmp_path / "done"
    token = f"{os.getpid()}.{time.monotonic_ns() % 1000}"  # names this test's sleep
    jobs = _jobs(tmp_path / "jobs.toml", f"""
[jobs.vm1]
qmp = "{machine.agent_qmp}"
mode = "full"
compression = "none"
command = "sleep 6{token}; cat > {tmp_path}/{{name}} && touch {done}"
""")
    with running([AGENT, "job", "run", "--config", jobs], stdin=subprocess.DEVNULL,
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        wait_for(lambda: processes_mentioning(f"6{token}"), "the command", proc)
        sleeper = processes_mentioning(f"6{token}")
        time.sleep(0.5)  # the archive is on its way into the pipe by now
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert_error((proc.returncode, err), "SIGTERM")
    assert wait_gone(sleeper) == []
    assert not done.exists()


@pytest.mark.qemu  # a live backup: run on QEMU 10 too (make test)
def test_every_failed_job_is_one_line_and_the_others_still_run(
        vm: tuple[Vm, Path], tmp_path: Path) -> None:
    machine, _ = vm
    (tmp_path / "ok").mkdir()
    (tmp_path / "far").mkdir()  # so that the credentials are what fails
    jobs = _jobs(tmp_path / "jobs.toml", f"""
[jobs.gone]
qmp = "{tmp_path}/gone.qmp"
dir = "{tmp_path}"
[jobs.vm1]
qmp = "{machine.agent_qmp}"
dir = "{tmp_path}/ok"
mode = "full"
[jobs.nodir]
qmp = "{machine.agent_qmp}"
dir = "{tmp_path}/missing"
[jobs.far]
qmp = "192.0.2.1:4444"
dir = "{tmp_path}/far"
[jobs.far.tls]
creds_dir = "{tmp_path}/no-tls"
""")
    proc = agent("job", "run", "--config", jobs)
    assert proc.returncode == 1, describe(proc)
    errors = [line for line in proc.stderr.decode().splitlines()
              if line.startswith(ERROR_PREFIX)]
    assert [e.split(":")[2].strip() for e in errors] == ['job "gone"', 'job "nodir"',
                                                         'job "far"'], describe(proc)
    assert "gone.qmp" in errors[0]
    assert f"{tmp_path}/missing is not a directory" in errors[1]
    assert f"{tmp_path}/no-tls" in errors[2]  # the credentials are checked before connecting
    assert len(_files(tmp_path / "ok")) == 1  # vm1 ran between the failures
    # naming an unknown job runs nothing
    assert 'no job "vm9"' in assert_error(agent("job", "run", "--config", jobs, "vm1", "vm9"))
    assert len(_files(tmp_path / "ok")) == 1
