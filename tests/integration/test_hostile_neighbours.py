"""One VM's QEMU cannot reach the sockets of another VM's backup.

On a hypervisor each VM's QEMU runs confined to what is its own: with libvirt, by AppArmor
rules in the VM's own profile (docs/DEPLOY.md), or by a user per VM. AppArmor cannot run
here, so this test gives each "VM" a user of its own, as libvirt's per-domain DAC labels do:
user A runs VM 1's QEMU and its backup agent (the agent runs as its VM's QEMU user,
docs/DEPLOY.md), user B stands for VM 2's QEMU. Both users are made with ``useradd`` for the
test and removed after it.

During a live backup of VM 1 (stalled on its output pipe, so every socket is in use), every
socket of VM 1's — its QMP monitor in its own directory, the copy-before-write target's NBD
and control sockets, QEMU's NBD server of the snapshot — refuses user B's connect() with
EACCES, while user A connects. The agent's directories sit in a ``$TMPDIR`` every user may
write to (sticky, like /tmp): the protection is the agent's own 0700 directories. A
``$TMPDIR`` or ``--spool-dir`` that another user could tamper with is refused before the VM
is touched.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.qemu.qmp import Monitor
from tests.integration.cli_util import (
    AGENT,
    agent_from_file,
    assert_error,
    describe,
    finish_streaming,
    running,
)
from tests.integration.conftest import make_image, qemu_img_compare
from tests.integration.vm import Disk

pytestmark = [pytest.mark.integration, pytest.mark.root("useradd, setuid")]

MiB = 1024 * 1024
TIMEOUT = 120

PROBE = """
import errno, socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
try:
    s.connect(sys.argv[1])
    print("connected")
except OSError as e:
    print(errno.errorcode.get(e.errno, str(e)))
"""


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int

    def become(self) -> Callable[[], None]:
        """A preexec_fn that turns the child into this user (groups, gid, then uid)."""
        def run() -> None:
            os.setgroups([])
            os.setgid(self.gid)
            os.setuid(self.uid)
        return run

    def connect(self, path: Path) -> str:
        """connect() to Unix socket ``path`` as this user: ``connected`` or the errno name."""
        done = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True,
                              text=True, timeout=30, preexec_fn=self.become(), check=False,
                              env={"PATH": os.environ["PATH"]})
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()


@pytest.fixture
def users() -> Iterator[tuple[User, User]]:
    """Two throwaway system users (each with its own group), removed at teardown."""
    tag = secrets.token_hex(3)
    made: list[User] = []
    try:
        for who in ("a", "b"):
            name = f"ba{tag}{who}"
            subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                            "--shell", "/usr/sbin/nologin", name], check=True,
                           capture_output=True, timeout=30)
            ids = subprocess.run(["id", "-u", name], check=True, capture_output=True,
                                 text=True).stdout.strip()
            gid = subprocess.run(["id", "-g", name], check=True, capture_output=True,
                                 text=True).stdout.strip()
            made.append(User(name, int(ids), int(gid)))
        yield made[0], made[1]
    finally:
        for user in made:
            subprocess.run(["userdel", user.name], capture_output=True, timeout=30,
                           check=False)


@dataclass
class Vm1:
    """VM 1, run by user A: its directory (0700, A's) holds its disk and monitors."""

    dir: Path
    tmp: Path  # the agent's TMPDIR: mode 1777, like /tmp
    qmp: Path  # the agent's monitor
    before: Path  # the disk as it was
    monitor: Monitor  # the test's monitor


@pytest.fixture
def vm1(users: tuple[User, User]) -> Iterator[Vm1]:
    a, _ = users
    # In /tmp itself: the users need to reach it, and $TMPDIR may be private to this user.
    base = Path(tempfile.mkdtemp(prefix="ba-hn-", dir="/tmp"))
    proc: subprocess.Popen[bytes] | None = None
    monitor: Monitor | None = None
    try:
        base.chmod(0o755)
        vmdir, tmp = base / "vm1", base / "tmp"
        vmdir.mkdir(mode=0o700)
        tmp.mkdir()
        tmp.chmod(0o1777)
        disk = make_image(vmdir / "vda.qcow2", "qcow2", 16 * MiB,
                          [("write", 0x11, 0, 6 * MiB), ("write", 0x22, 10 * MiB, 4 * MiB)])
        before = base / "before.qcow2"
        shutil.copy(disk, before)
        for p in (vmdir, disk):
            os.chown(p, a.uid, a.gid)
        qmp, test_qmp = vmdir / "qmp.sock", vmdir / "test.qmp"
        with open(base / "qemu.log", "wb") as log:
            proc = subprocess.Popen(
                ["qemu-system-x86_64", "-nodefaults", "-display", "none", "-accel", "tcg",
                 "-m", "128M", "-S", "-qmp", f"unix:{test_qmp},server=on,wait=off",
                 "-qmp", f"unix:{qmp},server=on,wait=off",
                 *Disk(disk, "qcow2", "vda").qemu_args()],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=a.become())
        deadline = time.monotonic() + 15
        while not (qmp.exists() and test_qmp.exists()):
            assert proc.poll() is None, (base / "qemu.log").read_text()
            assert time.monotonic() < deadline, "QEMU made no monitors"
            time.sleep(0.02)
        monitor = Monitor(str(test_qmp))
        yield Vm1(vmdir, tmp, qmp, before, monitor)
    finally:
        if monitor is not None:
            monitor.close()
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(base, ignore_errors=True)


def _agent_as(user: User, vm: Vm1, *args: str | Path, tmp: Path | None = None,
              stdout: int = subprocess.PIPE) -> AbstractContextManager[subprocess.Popen[bytes]]:
    """``backup-agent backup`` as ``user``, killed by its pid if still running at the end."""
    return running(
        [AGENT, "backup", "--qmp", str(vm.qmp), *map(str, args)],
        stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.PIPE,
        preexec_fn=user.become(),
        env={"PATH": os.environ["PATH"], "TMPDIR": str(tmp or vm.tmp)})


def test_another_vms_qemu_cannot_reach_a_backups_sockets(
    users: tuple[User, User], vm1: Vm1, tmp_path: Path
) -> None:
    a, b = users
    with _agent_as(a, vm1, "--compress", "none", "--connections", "1", "--memory", "4M",
                   "--request-size", "1M", "-o", "-") as proc:
        assert proc.stdout is not None and proc.stderr is not None
        head = proc.stdout.read(4096)  # the snapshot exists; the backup stalls on the pipe
        assert head.startswith(b"\x89BAGENT\n"), proc.stderr.read().decode()
        dirs = sorted(vm1.tmp.iterdir())
        assert sorted(d.name.split("-")[1] for d in dirs) == ["cbw", "live"], dirs
        for d in dirs:  # the agent's own: private to A
            st = d.stat()
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (a.uid, 0o700), d
        sockets = [vm1.qmp, *sorted(vm1.tmp.glob("*/*.sock"))]
        names = sorted(s.name for s in sockets)
        assert names == ["ctl.sock", "nbd.sock", "qemu-nbd.sock", "qmp.sock"], names
        for sock in sockets:
            assert b.connect(sock) == "EACCES", sock
            assert a.connect(sock) == "connected", sock
        rest, err, status = finish_streaming(proc, TIMEOUT)
        assert status == 0, err.decode()
    arc = tmp_path / "vm1.arc"
    arc.write_bytes(head + rest)
    out = tmp_path / "r"
    done = agent_from_file(arc, "restore", "-", "--to-dir", out)
    assert done.returncode == 0, describe(done)
    assert qemu_img_compare(vm1.before, "qcow2", out / "vda.raw", "raw")
    assert list(vm1.tmp.iterdir()) == []  # nothing of the agent's left behind


def _run_agent_as(user: User, vm: Vm1, *args: str | Path,
                  tmp: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    with _agent_as(user, vm, *args, tmp=tmp, stdout=subprocess.DEVNULL) as proc:
        _, err = proc.communicate(timeout=TIMEOUT)
    return subprocess.CompletedProcess(proc.args, proc.returncode, b"", err)


def _untouched(vm: Vm1) -> None:
    nodes = [n["node-name"] for n in vm.monitor.execute("query-named-block-nodes")]
    assert not [n for n in nodes if n.startswith("ba-")], nodes
    assert vm.monitor.execute("query-block-exports") == []


def test_a_directory_others_can_tamper_with_is_refused(
    users: tuple[User, User], vm1: Vm1, tmp_path: Path
) -> None:
    """In a directory everyone may write to without the sticky bit, or one of another
    user's, that user could move the agent's private directories aside and put sockets of
    their own in their place: refused, naming the fix, before the VM is touched."""
    a, b = users
    base = vm1.tmp.parent
    open_tmp = base / "open"
    open_tmp.mkdir()
    open_tmp.chmod(0o777)
    done = _run_agent_as(a, vm1, "-o", os.devnull, tmp=open_tmp)
    assert_error(done, f"TMPDIR {open_tmp}", "no sticky bit", f"chmod +t {open_tmp}")
    done = _run_agent_as(a, vm1, "--spool-dir", open_tmp, "-o", os.devnull)
    assert_error(done, f"--spool-dir {open_tmp}", "no sticky bit")
    theirs = base / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, b.uid, b.gid)
    done = _run_agent_as(a, vm1, "--spool-dir", theirs, "-o", os.devnull)
    assert_error(done, f"--spool-dir {theirs} belongs to {b.name}")
    _untouched(vm1)
