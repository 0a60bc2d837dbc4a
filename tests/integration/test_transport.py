"""Archives carried over ssh and written onto "tape", through real shells and pipes.

A real OpenSSH server runs on 127.0.0.1 (tests/integration/sshd.py); every pipeline is a
``bash -c 'set -o pipefail; ...'`` command line of the installed ``backup-agent``, ``ssh``,
``dd`` and ``mbuffer``, as docs/REMOTE.md tells users to write them. A tape is simulated by
a file written in fixed 256 KiB blocks. Restored disks are checked with ``qemu-img compare``,
tape files byte for byte against the archive they should hold.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.cli_util import (
    AGENT,
    KiB,
    MiB,
    agent,
    assert_error,
    assert_ok,
    info_json,
    write_random,
)
from tests.integration.conftest import qemu_img_compare
from tests.integration.sshd import SshServer

pytestmark = [pytest.mark.integration, pytest.mark.network]  # sshd on 127.0.0.1

REPO = Path(__file__).resolve().parents[2]
RECEIVE = REPO / "deploy" / "ssh" / "backup-receive"
AUTHORIZED_KEYS_EXAMPLE = REPO / "deploy" / "ssh" / "authorized_keys.example"

BLOCK = 256 * KiB
#: Writing a tape: whole 256 KiB blocks; only the last one is padded, with zeros.
DD_WRITE = "dd of={tape} bs=256k iflag=fullblock conv=sync status=none"
#: Reading a tape back.
DD_READ = "dd if={tape} bs=256k status=none"
#: A 16 MiB memory buffer in 256 KiB blocks; -v 1 drops the "no controlling terminal and no
#: autoloader" warning about multi-volume tapes.
MBUFFER = "mbuffer -q -v 1 -s 256k -m 16M"

#: A source that hands the archive over in chunks of N bytes and waits until the reader has
#: taken every byte before the next one (FIONREAD on the pipe says 0): every read the reader
#: makes at a chunk boundary comes back short. This is what ssh or a network socket does
#: with a slow link, made deterministic.
TRICKLE = r"""
import fcntl, os, struct, sys, termios, time
data = open(sys.argv[1], "rb").read()
step = int(sys.argv[2])
for i in range(0, len(data), step):
    os.write(1, data[i:i + step])
    while struct.unpack("i", fcntl.ioctl(1, termios.FIONREAD, b"\0" * 4))[0]:
        time.sleep(0.0002)
"""

IMAGE_SIZE = 6 * MiB


def q(value: str | os.PathLike[str]) -> str:
    return shlex.quote(str(value))


AG = q(AGENT)


@dataclass
class Run:
    rc: int
    """The pipeline's status under ``set -o pipefail`` (the last command's, for a list)."""
    status: list[int]
    """``PIPESTATUS`` of the last pipeline: every stage's exit code, left to right."""
    stderr: str

    def __str__(self) -> str:
        return f"exit {self.rc}, stages {self.status}\nstderr:\n{self.stderr}"


def sh(script: str, timeout: float = 60.0) -> Run:
    """Run ``script`` with ``bash -c`` under ``set -o pipefail``."""
    full = (f"set -o pipefail\n{script}\n"
            'rc=$? ps="${PIPESTATUS[*]}"\necho "PIPESTATUS $ps" >&2\nexit $rc\n')
    proc = subprocess.run(["bash", "-c", full], stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=timeout, check=False)
    lines = proc.stderr.decode(errors="replace").splitlines()
    assert lines and lines[-1].startswith("PIPESTATUS "), lines
    status = [int(x) for x in lines[-1].split()[1:]]
    return Run(proc.returncode, status, "\n".join(lines[:-1]))


def trickle(path: Path, step: int) -> str:
    return f"{q(sys.executable)} -c {q(TRICKLE)} {q(path)} {step}"


def padded(archive: bytes) -> bytes:
    """The archive as a tape written in BLOCK blocks holds it: the last block zero-filled."""
    return archive + bytes(-len(archive) % BLOCK)


def stage(run: Run, index: int, stderr: Path) -> tuple[int, bytes]:
    """(exit code, stderr) of one pipeline stage whose stderr went to a file, for
    :func:`assert_error`."""
    return run.status[index], stderr.read_bytes()


def assert_reader_refused(run: Run) -> None:
    """``dd ... | backup-agent verify|restore -`` where the agent refuses the archive: it exits
    1, and dd either finished or was killed by SIGPIPE (141) when the agent stopped reading."""
    assert run.rc == 1 and len(run.status) == 2, run
    assert run.status[0] in (0, 128 + 13) and run.status[1] == 1, run


def first_nonzero(data: bytes, start: int) -> int:
    tail = data[start:]
    return start + len(tail) - len(tail.lstrip(b"\0"))


# -- fixtures ------------------------------------------------------------------------------


@dataclass
class Sample:
    image: Path
    """A raw disk image: random data (incompressible), a 0x5a pattern, zeros, a hole."""
    archive: Path
    """``backup-agent backup --image d=IMAGE -o ARCHIVE`` (several tape blocks long)."""
    big_image: Path
    """16 MiB of random data: its archive is much larger than every pipe and ssh buffer."""
    big_archive: Path


@pytest.fixture(scope="module")
def sample() -> Iterator[Sample]:
    directory = Path(tempfile.mkdtemp(prefix="ba-tr-"))
    try:
        image = write_random(directory / "d.img", IMAGE_SIZE, [(0, 2 * MiB), (5 * MiB, 300000)])
        subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P 0x5a {2 * MiB} {1 * MiB}",
                        "-c", f"write -z {2 * MiB + 4 * KiB} {64 * KiB}", str(image)],
                       check=True, capture_output=True)
        archive = directory / "d.arc"
        assert_ok(agent("backup", "--image", f"d={image}", "-o", archive))
        assert len(archive.read_bytes()) > 4 * BLOCK
        assert len(archive.read_bytes()) % BLOCK, "the last tape block must need padding"
        big_image = write_random(directory / "big.img", 16 * MiB)
        big_archive = directory / "big.arc"
        assert_ok(agent("backup", "--image", f"d={big_image}", "-o", big_archive))
        yield Sample(image, archive, big_image, big_archive)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def sshd() -> Iterator[SshServer]:
    """One real sshd for the module, stopped by its own pid at the end."""
    directory = Path(tempfile.mkdtemp(prefix="ba-ssh-"))
    try:
        with SshServer.start(directory) as server:
            yield server
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def remote(sshd: SshServer) -> Iterator[Path]:
    """A fresh directory "on the backup host" (the same machine, reached through sshd)."""
    path = Path(tempfile.mkdtemp(prefix="remote-", dir=sshd.directory))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def assert_restores(script: str, out: Path, image: Path) -> None:
    """``script`` ends in ``restore - --to-dir OUT``; the restored disk equals ``image``."""
    run = sh(script)
    assert run.rc == 0 and set(run.status) == {0}, run
    restored = out / "d.raw"
    assert restored.stat().st_size == image.stat().st_size
    assert qemu_img_compare(image, "raw", restored, "raw"), f"{restored} differs from {image}"


# -- ssh -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_backup_over_ssh_and_restore_from_ssh(
    sshd: SshServer, remote: Path, sample: Sample, short_tmp: Path
) -> None:
    ssh, arc = sshd.command(), remote / "vm.arc"
    run = sh(f"{AG} backup --image d={q(sample.image)} -o - | {ssh} {q(f'cat > {q(arc)}')}")
    assert run.rc == 0 and run.status == [0, 0], run
    assert arc.stat().st_size > 2 * MiB  # the random data crossed, compressed or not

    run = sh(f"{ssh} {q(f'cat {q(arc)}')} | {AG} verify -")
    assert run.rc == 0 and run.status == [0, 0], run
    assert "archive OK" in run.stderr

    out = short_tmp / "out"
    assert_restores(f"{ssh} {q(f'cat {q(arc)}')} | {AG} restore - --to-dir {q(out)}",
                    out, sample.image)


@pytest.mark.parametrize(("remote_command", "ssh_status", "arrives"), [
    # The remote side stops reading and exits 0: ssh itself reports success, only the
    # backup's own exit status (and pipefail) tells that the archive is incomplete.
    ("head -c 100000 > {arc}", 0, 100000),
    # The connection dies: the remote session is killed after 100000 bytes.
    ("head -c 100000 > {arc}; kill -9 $PPID", 255, 100000),
    # The remote command fails before reading anything.
    ("exit 1", 1, None),
], ids=["remote-stops-reading", "connection-killed", "remote-fails"])
def test_ssh_dying_mid_stream_fails_the_backup(
    sshd: SshServer, remote: Path, sample: Sample, short_tmp: Path,
    remote_command: str, ssh_status: int, arrives: int | None,
) -> None:
    ssh, arc, err = sshd.command(), remote / "vm.arc", short_tmp / "agent.err"
    command = remote_command.format(arc=q(arc))
    run = sh(f"{AG} backup --image d={q(sample.big_image)} -o - 2> {q(err)} "
             f"| {ssh} {q(command)} 2> /dev/null")
    assert run.status == [1, ssh_status], run
    assert run.rc == (ssh_status or 1), run  # pipefail: the last stage that failed
    assert_error(stage(run, 0, err), "standard output", "closed the pipe")

    if arrives is None:
        assert not arc.exists()
        return
    assert arc.stat().st_size == arrives
    err2 = short_tmp / "verify.err"
    run = sh(f"{ssh} {q(f'cat {q(arc)}')} | {AG} verify - 2> {q(err2)}")
    assert run.status == [0, 1], run
    assert_error(stage(run, 1, err2), "truncated at byte 100000", "incomplete")


def example_options(store: Path) -> str:
    """The options of deploy/ssh/authorized_keys.example, pointed at this test's sshd."""
    line = next(ln for ln in AUTHORIZED_KEYS_EXAMPLE.read_text().splitlines()
                if ln and not ln.startswith("#"))
    options = line.split(" ssh-ed25519 ")[0]
    assert options.startswith("restrict,") and 'command="' in options, line
    return (options.replace('from="192.0.2.10"', 'from="127.0.0.1"')
            .replace("/usr/local/bin/backup-receive /srv/backup/vmhost1",
                     f"sh {RECEIVE} {store}"))


@pytest.mark.slow
def test_forced_command_key_puts_commits_and_gets(
    sshd: SshServer, remote: Path, sample: Sample, short_tmp: Path
) -> None:
    """The restricted key of deploy/ssh: put, then commit only after a good backup; get."""
    key = sshd.authorize("backup", example_options(remote))
    ssh = sshd.command(key)
    arc = remote / "vm1.arc"
    backup = (f"{AG} backup --image d={{image}} -o - 2> {q(short_tmp / 'agent.err')} "
              f"| {ssh} put vm1.arc && {ssh} commit vm1.arc")

    run = sh(backup.format(image=q(sample.image)))
    assert run.rc == 0, run
    assert sorted(p.name for p in remote.iterdir()) == ["vm1.arc"]
    good = arc.read_bytes()

    # A failed backup leaves the committed archive alone: pipefail stops the commit.
    run = sh(backup.format(image=q(short_tmp / "missing.img")))
    assert run.rc == 1 and run.status == [1, 0], run
    assert arc.read_bytes() == good
    assert (remote / ".vm1.arc.partial").stat().st_size == 0

    out = short_tmp / "out"
    assert_restores(f"{ssh} get vm1.arc | {AG} restore - --to-dir {q(out)}", out, sample.image)

    for request in ["", "cat /etc/passwd", "get ../vm1.arc", "get .vm1.arc.partial",
                    "rm vm1.arc", "put x; rm -rf /", "get", "get nothing.arc"]:
        proc = subprocess.run([*sshd.argv(key), request], stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=30, check=False)
        assert proc.returncode == 2, (request, proc)
        assert proc.stderr.startswith(b"backup-receive: "), (request, proc)
        assert not proc.stdout, request
    assert arc.read_bytes() == good


# -- tape ----------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["cat", "trickle-1000", "trickle-100000"])
def test_dd_fullblock_writes_whole_blocks_padding_only_the_last(
    sample: Sample, short_tmp: Path, source: str
) -> None:
    """Short reads from the pipe (at most 64 KiB each from cat; odd chunks from a slow
    source) are gathered into whole blocks: the tape is the archive, then zeros."""
    tape = short_tmp / "tape"
    feed = (f"cat {q(sample.archive)}" if source == "cat"
            else trickle(sample.archive, int(source.split("-")[1])))
    run = sh(f"{feed} | {DD_WRITE.format(tape=q(tape))}")
    assert run.rc == 0, run
    data = tape.read_bytes()
    assert len(data) % BLOCK == 0
    assert data == padded(sample.archive.read_bytes())

    assert_ok(agent("verify", tape))
    out = short_tmp / "out"
    assert_restores(f"{DD_READ.format(tape=q(tape))} | {AG} restore - --to-dir {q(out)}",
                    out, sample.image)


@pytest.mark.parametrize(("writer", "reader"), [
    (DD_WRITE, DD_READ),
    (f"{MBUFFER} | {DD_WRITE}", f"{MBUFFER} -i {{tape}}"),
], ids=["dd", "mbuffer"])
def test_backup_onto_tape_and_back(
    sample: Sample, short_tmp: Path, writer: str, reader: str
) -> None:
    """The commands of docs/REMOTE.md, end to end, with the real backup as the source."""
    tape, out = short_tmp / "tape", short_tmp / "out"
    run = sh(f"{AG} backup --image d={q(sample.image)} -o - | {writer.format(tape=q(tape))}")
    assert run.rc == 0 and set(run.status) == {0}, run
    size = tape.stat().st_size
    assert size % BLOCK == 0 and size > 4 * BLOCK

    assert_ok(agent("verify", tape))  # a file: zero padding after the end is accepted
    info = info_json(tape)  # the seekable reader finds the footer before the padding
    assert [d["name"] for d in info["devices"]] == ["d"]
    assert info["totals"]["device_bytes"] == IMAGE_SIZE
    assert_restores(f"{reader.format(tape=q(tape))} | {AG} restore - --to-dir {q(out)}",
                    out, sample.image)


def test_mbuffer_alone_writes_the_archive_unpadded(sample: Sample, short_tmp: Path) -> None:
    """mbuffer has no option to pad the last block: its output is the bare archive, fine
    for a variable-block drive; for fixed blocks, pipe it into dd (previous test)."""
    tape = short_tmp / "tape"
    run = sh(f"cat {q(sample.archive)} | {MBUFFER} -o {q(tape)}")
    assert run.rc == 0, run
    assert tape.read_bytes() == sample.archive.read_bytes()
    assert tape.stat().st_size % BLOCK != 0

    run = sh(f"cat {q(sample.archive)} | {MBUFFER} | {DD_WRITE.format(tape=q(short_tmp / 't2'))}")
    assert run.rc == 0, run
    assert (short_tmp / "t2").read_bytes() == padded(sample.archive.read_bytes())


@pytest.mark.parametrize(("source", "dd"), [
    # bs= without iflag=fullblock: one read per block, and a pipe gives at most 64 KiB per
    # read, so conv=sync pads *every* block: zeros in the middle of the archive.
    ("cat", "dd of={tape} bs=256k conv=sync status=none"),
    # obs= with the default ibs=512: conv=sync pads every short 512-byte input block, which
    # happens whenever the source delivers a chunk that is not a multiple of 512.
    ("trickle-1000", "dd of={tape} obs=256k conv=sync status=none"),
], ids=["bs-without-fullblock", "obs-with-sync"])
def test_dd_without_fullblock_corrupts_and_verify_refuses(
    sample: Sample, short_tmp: Path, source: str, dd: str
) -> None:
    tape, out, err = short_tmp / "tape", short_tmp / "out", short_tmp / "restore.err"
    feed = (f"cat {q(sample.archive)}" if source == "cat"
            else trickle(sample.archive, int(source.split("-")[1])))
    run = sh(f"{feed} | {dd.format(tape=q(tape))}")
    assert run.rc == 0, run  # dd reports success: nothing but the archive's checks tell
    data, archive = tape.read_bytes(), sample.archive.read_bytes()
    assert data != padded(archive)
    assert data[:512] == archive[:512]  # the start is intact, the damage comes later

    assert_error(agent("verify", tape), "record")
    run = sh(f"{DD_READ.format(tape=q(tape))} | {AG} restore - --to-dir {q(out)} 2> {q(err)}")
    assert_reader_refused(run)
    assert_error(stage(run, 1, err), "record")
    assert not out.exists() or not list(out.iterdir())  # nothing restored, nothing left


def old_archive_underneath(sample: Sample, tape: Path) -> None:
    """A tape file holding a longer, older archive, overwritten in place (not truncated)
    with the new one: the old archive's tail follows the new one's padding."""
    run = sh(f"cat {q(sample.big_archive)} | {DD_WRITE.format(tape=q(tape))}")
    assert run.rc == 0, run
    run = sh(f"cat {q(sample.archive)} | "
             f"{DD_WRITE.replace('conv=sync', 'conv=sync,notrunc').format(tape=q(tape))}")
    assert run.rc == 0, run


@pytest.mark.parametrize("case", ["old-archive-underneath", "junk-after-padding",
                                  "junk-right-after-footer"])
def test_bytes_after_the_end_other_than_zeros_are_refused(
    sample: Sample, short_tmp: Path, case: str
) -> None:
    tape, out, err = short_tmp / "tape", short_tmp / "out", short_tmp / "restore.err"
    archive = sample.archive.read_bytes()
    if case == "old-archive-underneath":
        old_archive_underneath(sample, tape)
    elif case == "junk-after-padding":
        tape.write_bytes(padded(archive) + bytes(1000) + b"old data")
    else:
        tape.write_bytes(archive + b"\x01")
    data = tape.read_bytes()
    assert data.startswith(archive) and data != padded(archive)
    junk_at = first_nonzero(data, len(archive))
    where = f"unexpected data after the end of the archive at byte {junk_at}"

    assert_error(agent("verify", tape), where)
    run = sh(f"{DD_READ.format(tape=q(tape))} | {AG} verify - 2> {q(err)}")
    assert_reader_refused(run)
    assert_error(stage(run, 1, err), where)

    run = sh(f"{DD_READ.format(tape=q(tape))} | {AG} restore - --to-dir {q(out)} 2> {q(err)}")
    assert_reader_refused(run)
    assert_error(stage(run, 1, err), where)
    assert not out.exists() or not list(out.iterdir())  # refused as a whole: nothing left


def test_info_on_a_tape_file_with_an_older_archive_underneath(
    sample: Sample, short_tmp: Path
) -> None:
    tape = short_tmp / "tape"
    old_archive_underneath(sample, tape)
    proc = agent("info", tape, "--json")
    # info reads the two ends of the file; they belong to different archives: refused
    # (info once mixed the new header with the old seal and totals and said nothing).
    assert_error(proc, "does not belong to the archive at its start", "verify")
