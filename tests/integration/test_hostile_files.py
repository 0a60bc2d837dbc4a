"""Hostile neighbours in the directories the agent writes to (issue 13, items 6-9).

Whatever another user plants beside an output — a symbolic link, a file of their own, a
name that appears while a restore runs — the agent never writes through it, never adopts
it, never replaces it; what it creates is its owner's alone (0600). Every test runs the real
``backup-agent`` (backups through its own qemu-nbd, restores through real pipes), with the
umask most systems have (022), so a file left to the umask would show as 0644.

The same holds for a job's archive directory (its hidden name, its lock file) and for
deploy/ssh/backup-receive on a backup host; what killed runs left is removed, and only that.

A restore is held mid-way, as in test_restore_signals.py, by feeding its archive through a
pipe and stopping half-way: the temporary file exists and the final name does not yet.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.archive.format import Compression
from agent.archive.writer import ArchiveWriter
from agent.errors import AgentError
from agent.jobs import catalog
from tests.integration.cli_util import (
    AGENT,
    DATA,
    MiB,
    agent,
    assert_error,
    assert_ok,
    describe,
    leftovers,
    records,
    running,
    wait_for,
    write_random,
)
from tests.integration.conftest import make_image
from tests.integration.vm import REPO, Disk, VmFactory
from tests.unit.archive_util import write_archive

pytestmark = pytest.mark.integration

SIZE = 16 * MiB
#: Someone else: the uid of "nobody" (a test runs as root and can chown to it).
OTHER_UID = 65534


@pytest.fixture(autouse=True)
def usual_umask() -> Iterator[None]:
    """Umask 022, inherited by the agent: files it leaves to the umask come out 0644."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _archive(fill: int, names: tuple[str, ...] = ("d",), size: int = SIZE) -> bytes:
    """An archive of devices ``names``, each ``size`` bytes of byte ``fill``, in 1 MiB
    uncompressed records (so a restore fed half of it is half-way through)."""
    def build(w: ArchiveWriter) -> None:
        for dev in [w.add_device(name, size) for name in names]:
            for offset in range(0, size, MiB):
                w.write_data(dev.id, offset, MiB, Compression.NONE, bytes([fill]) * MiB)
    return write_archive(build)


def _temps(directory: Path) -> list[Path]:
    return sorted(directory.glob(".*.partial")) if directory.is_dir() else []


def _temp_blocks(directory: Path) -> int:
    sizes = [0]
    for p in _temps(directory):
        with contextlib.suppress(FileNotFoundError):
            sizes.append(p.stat().st_blocks)
    return max(sizes)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


class HeldRestore:
    """``restore - --to-dir OUT`` fed the first half of ``archive``, then held."""

    def __init__(self, proc: subprocess.Popen[bytes], archive: bytes) -> None:
        self.proc = proc
        self.archive = archive

    def finish(self) -> tuple[int, bytes]:
        """Feed the rest; the exit status and stderr."""
        assert self.proc.stdin is not None and self.proc.stderr is not None
        self.proc.stdin.write(self.archive[len(self.archive) // 2:])
        self.proc.stdin.close()
        err = self.proc.stderr.read()
        return self.proc.wait(timeout=120), err


@contextlib.contextmanager
def held_restore(archive: bytes, out: Path, *options: str) -> Iterator[HeldRestore]:
    """A restore into ``out`` with its first records written to a temporary file."""
    before = _temps(out)
    with running([AGENT, "restore", "-", "--to-dir", out, "--quiet", *options],
                 stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                 stderr=subprocess.PIPE) as proc:
        assert proc.stdin is not None
        proc.stdin.write(archive[:len(archive) // 2])
        proc.stdin.flush()
        wait_for(lambda: any(p not in before and p.stat().st_size > 0 for p in _temps(out)),
                 "the restore's temporary file", proc)
        wait_for(lambda: _temp_blocks(out) > 0, "the first write", proc)
        yield HeldRestore(proc, archive)


# -- backup -o PATH: its temporary file ---------------------------------------------------

@pytest.fixture
def disk(short_tmp: Path) -> Path:
    return write_random(short_tmp / "disk.raw", 4 * MiB)


def test_backup_never_writes_through_a_planted_symlink(short_tmp: Path, disk: Path) -> None:
    """A symbolic link at ``.PATH.partial`` (the name backups used to write to) pointing
    at a victim file: the victim keeps its bytes, the link stays a link, the archive is
    whole and a regular file."""
    victim = short_tmp / "victim"
    victim.write_bytes(b"precious")
    arc = short_tmp / "x.arc"
    planted = short_tmp / ".x.arc.partial"
    planted.symlink_to(victim)
    assert_ok(agent("backup", "--image", f"d={disk}", "--quiet", "-o", arc))
    assert victim.read_bytes() == b"precious"
    assert planted.is_symlink() and os.readlink(planted) == str(victim)
    assert stat.S_ISREG(os.lstat(arc).st_mode) and _mode(arc) == 0o600
    assert_ok(agent("verify", arc))


@pytest.mark.root("chown to another user")
def test_backup_never_adopts_another_users_file(short_tmp: Path, disk: Path) -> None:
    """A file someone else made at ``.PATH.partial``, writable by all: the archive is not
    written into it (it would end up as the archive, owned and writable by them)."""
    arc = short_tmp / "x.arc"
    planted = short_tmp / ".x.arc.partial"
    planted.write_bytes(b"theirs")
    os.chown(planted, OTHER_UID, OTHER_UID)
    planted.chmod(0o666)
    assert_ok(agent("backup", "--image", f"d={disk}", "--quiet", "-o", arc))
    st = os.lstat(arc)
    assert (st.st_uid, _mode(arc)) == (os.geteuid(), 0o600)
    assert planted.read_bytes() == b"theirs" and planted.stat().st_uid == OTHER_UID
    assert_ok(agent("verify", arc))


def test_backup_to_the_longest_file_name(short_tmp: Path, disk: Path) -> None:
    """``-o`` a 255-byte name: its temporary name must fit in a directory entry too."""
    arc = short_tmp / ("a" * 251 + ".arc")
    assert_ok(agent("backup", "--image", f"d={disk}", "--quiet", "-o", arc))
    assert_ok(agent("verify", arc))
    assert [p for p in short_tmp.iterdir() if p.name.startswith(".")] == []


# -- what killed runs left --------------------------------------------------------------------

@contextlib.contextmanager
def leftover_temps(directory: Path, label: str) -> Iterator[dict[str, Path]]:
    """Files at temporary names of ``label`` (``.LABEL.RANDOM.partial``): one a killed run
    left an hour ago (``stale``), and ones a later run must not touch: written just now,
    locked by a live run, another user's, a symbolic link, a FIFO."""
    hour_ago = time.time() - 3600
    made = {k: directory / f".{label}.{k[:8].ljust(8, 'x')}.partial"
            for k in ("stale", "fresh", "lockedxx", "theirsxx", "linkxxxx", "fifoxxxx")}
    for key in ("stale", "fresh", "lockedxx", "theirsxx"):
        made[key].write_bytes(b"old")
    os.chown(made["theirsxx"], OTHER_UID, OTHER_UID)
    made["linkxxxx"].symlink_to(directory / "nowhere")
    os.mkfifo(made["fifoxxxx"])
    for key in ("stale", "lockedxx", "theirsxx", "fifoxxxx"):
        os.utime(made[key], (hour_ago, hour_ago))
    with open(made["lockedxx"], "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # as a backup still running holds it
        yield made


def _assert_only_stale_removed(made: dict[str, Path]) -> None:
    assert not made["stale"].exists()
    assert all(os.path.lexists(p) for k, p in made.items() if k != "stale")


@pytest.mark.root("chown to another user")
def test_backup_removes_only_what_killed_backups_left(short_tmp: Path, disk: Path) -> None:
    arc = short_tmp / "x.arc"
    with leftover_temps(short_tmp, "x.arc") as made:
        assert_ok(agent("backup", "--image", f"d={disk}", "--quiet", "-o", arc))
        _assert_only_stale_removed(made)
    assert_ok(agent("verify", arc))


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.root("chown to another user")
def test_restore_removes_only_what_killed_restores_left(short_tmp: Path, fmt: str) -> None:
    out = short_tmp / "out"
    out.mkdir()
    arc = short_tmp / "x.arc"
    arc.write_bytes(_archive(6, size=2 * MiB))
    with leftover_temps(out, f"d.{fmt}") as made:
        assert_ok(agent("restore", arc, "--to-dir", out, "--format", fmt, "--quiet"))
        _assert_only_stale_removed(made)
    assert (out / f"d.{fmt}").exists()


@pytest.mark.slow
def test_a_held_restore_keeps_its_file_locked(short_tmp: Path) -> None:
    """A qcow2 restore stalled on its input for longer than STALE_AFTER still holds its
    temporary file: a second restore of the same device does not remove it."""
    out = short_tmp / "out"
    with held_restore(_archive(8), out, "--format", "qcow2") as held:
        (temp,) = _temps(out)
        old = time.time_ns() - 3600 * 10**9

        def waited_an_hour() -> bool:
            """Once what it got is all written, its file looks an hour old, and stays so."""
            os.utime(temp, ns=(old, old))
            time.sleep(0.5)
            return temp.stat().st_mtime_ns == old

        wait_for(waited_an_hour, "the restore to write all it got", held.proc)
        arc = short_tmp / "other.arc"
        arc.write_bytes(_archive(8, size=2 * MiB))
        second = agent("restore", arc, "--to-dir", short_tmp / "out", "--format", "qcow2")
        assert_ok(second)  # into its own temporary file, then d.qcow2
        assert temp.exists()
        code, err = held.finish()
    assert_error((code, err), "appeared")  # d.qcow2 was made meanwhile by the second one
    assert sorted(p.name for p in out.iterdir()) == ["d.qcow2"]


# -- restore --to-dir: modes ---------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_restored_files_are_private(short_tmp: Path, fmt: str) -> None:
    arc = short_tmp / "x.arc"
    arc.write_bytes(_archive(7, size=2 * MiB))
    out = short_tmp / "out"
    assert_ok(agent("restore", arc, "--to-dir", out, "--format", fmt, "--quiet"))
    assert _mode(out / f"d.{fmt}") == 0o600


def test_qcow2_is_private_while_written(short_tmp: Path) -> None:
    """Not only once renamed: the image is 0600 from before its first byte of data."""
    out = short_tmp / "out"
    with held_restore(_archive(9), out, "--format", "qcow2") as held:
        (temp,) = _temps(out)
        assert _mode(temp) == 0o600
        code, err = held.finish()
    assert code == 0, err.decode()


# -- restore --to-dir: names that appear meanwhile -----------------------------------------

@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_restore_never_replaces_a_name_that_appeared(short_tmp: Path, fmt: str) -> None:
    """A dangling symbolic link made at the final name while the restore runs: it stays
    as it is, nothing is created where it points, the restore says so, and its temporary
    file is gone."""
    out = short_tmp / "out"
    pointed = short_tmp / "elsewhere"
    with held_restore(_archive(3), out, "--format", fmt) as held:
        (out / f"d.{fmt}").symlink_to(pointed)
        code, err = held.finish()
    assert_error((code, err), f"d.{fmt}", "appeared")
    assert os.readlink(out / f"d.{fmt}") == str(pointed)
    assert not os.path.lexists(pointed)
    assert sorted(p.name for p in out.iterdir()) == [f"d.{fmt}"]


def test_restore_refuses_a_dangling_symlink_at_the_start(short_tmp: Path) -> None:
    out = short_tmp / "out"
    out.mkdir()
    (out / "d.raw").symlink_to(short_tmp / "elsewhere")
    arc = short_tmp / "x.arc"
    arc.write_bytes(_archive(5, size=2 * MiB))
    assert_error(agent("restore", arc, "--to-dir", out), "already exists")
    assert (out / "d.raw").is_symlink() and not (short_tmp / "elsewhere").exists()
    assert sorted(p.name for p in out.iterdir()) == ["d.raw"]


def test_two_restores_into_one_directory(short_tmp: Path) -> None:
    """Two restores of a device ``d`` into one directory at once (the archives differ):
    neither touches the other's temporary file; the first to finish gets ``d.raw`` with
    its own data, the second fails clearly and leaves nothing."""
    out = short_tmp / "out"
    with held_restore(_archive(0xA1), out) as first, held_restore(_archive(0xB2), out) as second:
        assert len(_temps(out)) == 2
        code, err = first.finish()
        assert code == 0, err.decode()
        code, err = second.finish()
    assert_error((code, err), "d.raw", "appeared")
    assert sorted(p.name for p in out.iterdir()) == ["d.raw"]
    with open(out / "d.raw", "rb") as f:
        while chunk := f.read(MiB):
            assert chunk == bytes([0xA1]) * len(chunk)


# -- restore --to-dir: every name verify accepts --------------------------------------------

LONG = ("a" * 250, "b" * 255, "c" * 250 + "x" * 5, "c" * 250 + "y" * 5)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_longest_names_restore(short_tmp: Path, fmt: str) -> None:
    """Device names of 250 and 255 bytes (the longest the format allows): each restores
    to a file of its own, named after it (cut short with a hash where NAME.FORMAT would not
    fit in a directory entry)."""
    names = LONG if fmt == "raw" else LONG[:2]  # a qemu-nbd each: two are enough
    arc = short_tmp / "x.arc"
    arc.write_bytes(_archive(0x5C, names, size=1 * MiB))
    assert_ok(agent("verify", arc))
    out = short_tmp / "out"
    done = agent("restore", arc, "--to-dir", out, "--format", fmt)
    assert_ok(done)
    files = sorted(p.name for p in out.iterdir())
    assert len(files) == len(names), files
    said = dict(line.split(": restored ", 1)[1].split(" -> ", 1)
                for line in done.stderr.decode().splitlines() if ": restored " in line
                and " -> " in line)
    assert sorted(said) == sorted(names), describe(done)
    for name in names:
        got = Path(said[name])
        assert got.parent == out and got.name in files
        if len(f"{name}.{fmt}") <= 255:
            assert got.name == f"{name}.{fmt}"
        else:  # cut short, and marked so (no device name has a ~)
            assert got.name.startswith(name[:200]) and "~" in got.name
            assert got.name.endswith(f".{fmt}") and len(got.name) == 255
    if fmt == "raw":
        assert (out / f"{'a' * 250}.raw").read_bytes() == bytes([0x5C]) * MiB


# -- restore --to-dir: a damaged archive -----------------------------------------------------

def _damaged() -> bytes:
    """An archive whose 9th data record fails its checksum: found after the header."""
    arc = bytearray(_archive(4))
    rec = [r for r in records(bytes(arc)) if r.type == DATA][8]
    arc[rec.body + rec.body_len // 2] ^= 0xFF
    return bytes(arc)


def test_damaged_archive_leaves_no_directory(short_tmp: Path) -> None:
    out = short_tmp / "new" / "out"
    assert_error(agent("restore", "-", "--to-dir", out, input=_damaged()), "checksum")
    assert not (short_tmp / "new").exists()


def test_damaged_archive_keeps_a_directory_it_did_not_make(short_tmp: Path) -> None:
    mine = short_tmp / "mine"
    mine.mkdir()
    (mine / "keep").write_bytes(b"x")
    empty = short_tmp / "empty"
    empty.mkdir()
    for out in (mine, empty, mine / "sub"):
        assert_error(agent("restore", "-", "--to-dir", out, input=_damaged()), "checksum")
    assert sorted(p.name for p in mine.iterdir()) == ["keep"]
    assert empty.is_dir() and list(empty.iterdir()) == []
    assert leftovers(mine) == []


# -- job run into a directory -----------------------------------------------------------------

def test_job_run_never_writes_through_a_planted_link(vms: VmFactory, tmp_path: Path,
                                                     short_tmp: Path) -> None:
    """A job wrote to ``.JOB-STAMP.arc`` before renaming it, and the output layer writes
    straight into a device or FIFO found at its path: links planted at that name for every
    second of the run, pointing at /dev/null, would swallow the archive. The hidden name
    is random now: the job succeeds and the links are left alone."""
    disk = make_image(tmp_path / "vda.qcow2", "qcow2", 4 * MiB, [("write", 0x5A, 0, MiB)])
    machine = vms.start([Disk(disk, "qcow2", "vda")])
    machine.monitor.execute("cont")
    dest = short_tmp / "backups"
    dest.mkdir()
    now = int(time.time())
    planted = [dest / f".vm1-{catalog.stamp(t)}{catalog.SUFFIX}" for t in range(now - 2, now + 60)]
    for link in planted:
        link.symlink_to("/dev/null")
    jobs = tmp_path / "jobs.toml"
    jobs.write_text(f"""
[jobs.vm1]
qmp = "{machine.agent_qmp}"
dir = "{dest}"
mode = "full"
spool_dir = "{tmp_path}"
""")
    assert_ok(agent("job", "run", "--config", jobs, "vm1"))
    archives = [p for p in dest.iterdir() if not p.name.startswith(".")]
    assert len(archives) == 1 and archives[0].name.endswith("-full.arc"), archives
    assert_ok(agent("verify", archives[0]))
    assert all(os.readlink(link) == "/dev/null" for link in planted)
    hidden = {p.name for p in dest.iterdir() if p.name.startswith(".")}
    assert hidden == {p.name for p in planted} | {catalog.LOCK}


def test_directory_lock_never_follows_a_link(short_tmp: Path) -> None:
    """A symbolic link planted at the lock's name: no file is created where it points."""
    (short_tmp / catalog.LOCK).symlink_to(short_tmp / "elsewhere")
    with pytest.raises(AgentError, match="cannot use directory"), catalog.locked(str(short_tmp)):
        pass
    assert not (short_tmp / "elsewhere").exists()


# -- deploy/ssh/backup-receive on the backup host ---------------------------------------------

RECEIVE = REPO / "deploy" / "ssh" / "backup-receive"


def _receive(store_dir: Path, request: str,
             data: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """The forced command as sshd runs it: the client's request in SSH_ORIGINAL_COMMAND."""
    env = {**os.environ, "SSH_ORIGINAL_COMMAND": request}
    return subprocess.run(["sh", str(RECEIVE), str(store_dir)], input=data, env=env,
                          capture_output=True, timeout=30, check=False)


def test_backup_receive_put_never_writes_through_a_link(short_tmp: Path) -> None:
    victim = short_tmp / "victim"
    victim.write_bytes(b"precious")
    store_dir = short_tmp / "store"
    store_dir.mkdir()
    (store_dir / ".vm1.arc.partial").symlink_to(victim)
    put = _receive(store_dir, "put vm1.arc", b"archive bytes")
    assert put.returncode == 0, put
    assert victim.read_bytes() == b"precious"
    part = store_dir / ".vm1.arc.partial"
    assert not part.is_symlink() and part.read_bytes() == b"archive bytes"
    assert _mode(part) == 0o600
    assert _receive(store_dir, "commit vm1.arc").returncode == 0
    assert (store_dir / "vm1.arc").read_bytes() == b"archive bytes"


def test_backup_receive_commits_no_link(short_tmp: Path) -> None:
    store_dir = short_tmp / "store"
    store_dir.mkdir()
    (short_tmp / "other").write_bytes(b"not an upload")
    (store_dir / ".vm1.arc.partial").symlink_to(short_tmp / "other")
    done = _receive(store_dir, "commit vm1.arc")
    assert done.returncode == 2 and done.stderr.startswith(b"backup-receive: "), done
    assert not (store_dir / "vm1.arc").exists()


def test_backup_receive_longest_name(short_tmp: Path) -> None:
    """The longest name it accepts must work (.NAME.partial has to fit in 255 bytes), and a
    longer one is refused as such, not left to fail half-way."""
    store_dir = short_tmp / "store"
    store_dir.mkdir()
    name = "v" * 246
    assert _receive(store_dir, f"put {name}", b"data").returncode == 0
    assert _receive(store_dir, f"commit {name}").returncode == 0
    assert (store_dir / name).read_bytes() == b"data"
    refused = _receive(store_dir, f"put {name}x", b"data")
    assert refused.returncode == 2, refused
    assert refused.stderr.startswith(b"backup-receive: archive name too long"), refused
