"""Faults during a live backup (backup --qmp): real TCG VMs, real nbdkit plugin.

Whatever goes wrong — the copy-before-write target full or stalled, QEMU gone, the agent
stopped — the backup must end with one clear error line (exit 1, no traceback), the guest
must keep writing unharmed (during the fault and after), and, where QEMU still runs, its block
graph must be exactly as before. No nbdkit child of the agent may outlive it, and no output
file may remain.

How a backup is held mid-way: ``-o FIFO``, a named pipe made beforehand, which the agent
writes to directly (as to a tape). It writes into a 64 KiB pipe buffer the test does not
read, and stalls after the header. (A FIFO planted at the name of its temporary file, as
these tests once did, no longer receives anything: agent/files.py.) With ``--memory 4M
--request-size 1M --connections 1`` the sweep then holds at most a few MiB past the start of
a 64 MiB disk, so writes at 40 MiB and beyond hit clusters not yet backed up.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.integration.cli_util import (
    AGENT,
    assert_error,
    children,
    cmdline,
    leftovers,
    wait_gone,
)
from tests.integration.conftest import make_image
from tests.integration.vm import Disk, Vm, VmFactory

pytestmark = [pytest.mark.integration, pytest.mark.qemu]  # qemu: run on QEMU 10 too

KiB = 1024
MiB = 1024 * KiB
MAGIC = b"\x89BAGENT\n"
#: Hang guard: the agent must end well within this once the pipe is drained.
HANG = 60.0
#: Options that keep the sweep a few MiB into the disk while the output is not read.
SLOW = ["--compress", "none", "--connections", "1", "--memory", "4M", "--request-size", "1M"]



@pytest.fixture
def vm(vms: VmFactory, tmp_path: Path) -> Vm:
    """A running VM (no guest code) with one 64 MiB raw disk ``vda`` full of data: every copy
    before write costs the target real memory (all-zero clusters would cost nothing)."""
    vda = make_image(tmp_path / "vda.raw", "raw", 64 * MiB, [("write", 0x11, 0, 64 * MiB)])
    machine = vms.start([Disk(vda, "raw", "vda")])
    machine.monitor.execute("cont")
    return machine


def _graph(vm: Vm) -> tuple[list[str], list[object]]:
    nodes = sorted(n["node-name"] for n in vm.qmp.execute("query-named-block-nodes"))
    return nodes, vm.qmp.execute("query-block-exports")


@dataclass
class Stalled:
    """A live backup into ``out`` held after its header (see the module docstring)."""

    proc: subprocess.Popen[bytes]
    out: Path
    fifo_fd: int
    kids: list[int] = field(default_factory=list)  # the agent's children while it ran
    nbdkit: int = 0  # the one among them serving the copy-before-write target

    def drain(self) -> tuple[int, bytes]:
        """Read the rest of the archive and stderr; the agent's exit status and stderr."""
        def read_all() -> None:
            while os.read(self.fifo_fd, 1 << 20):
                pass

        reader = threading.Thread(target=read_all, daemon=True)
        reader.start()
        try:
            _, err = self.proc.communicate(timeout=HANG)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the agent still runs {HANG:g} s after its output was drained")
        reader.join(10)
        return self.proc.returncode, err

    def assert_clean(self) -> None:
        """No child of the agent left running, no output file left behind."""
        left = wait_gone(self.kids)
        assert not left, f"children outlived the agent: {[cmdline(p) for p in left]}"
        assert stat.S_ISFIFO(os.lstat(self.out).st_mode), self.out  # not replaced by a file
        assert leftovers(self.out.parent) == []


@pytest.fixture
def stall(vm: Vm, short_tmp: Path) -> Iterator[Callable[..., Stalled]]:
    """``stall(*options)`` starts ``backup --qmp`` on ``vm`` and holds it after the archive
    header; whatever is still running at teardown is killed by its own pid."""
    started: list[Stalled] = []

    def start(*options: str) -> Stalled:
        out = short_tmp / f"vm{len(started)}.arc"
        os.mkfifo(out)
        # Non-blocking until the agent has opened it: a FIFO without a writer reads as EOF.
        fd = os.open(out, os.O_RDONLY | os.O_NONBLOCK)
        proc = subprocess.Popen(
            [AGENT, "backup", "--qmp", str(vm.agent_qmp), *SLOW, *options, "-o", str(out)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        held = Stalled(proc, out, fd)
        started.append(held)
        head = b""
        deadline = time.monotonic() + HANG
        while len(head) < len(MAGIC) and proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(BlockingIOError):
                head += os.read(fd, len(MAGIC) - len(head))
            time.sleep(0.01)
        if head != MAGIC:
            proc.kill()
            _, err = proc.communicate(timeout=HANG)
            pytest.fail(f"no archive header: {head!r}; agent stderr:\n{err.decode()}")
        os.set_blocking(fd, True)  # the writer is there: EOF now means it closed
        held.kids = children(proc.pid)
        targets = [p for p in held.kids if any("cbw_target.py" in a for a in cmdline(p))]
        assert len(targets) == 1, [cmdline(p) for p in held.kids]
        held.nbdkit = targets[0]
        return held

    yield start
    for held in started:
        if held.proc.poll() is None:
            held.proc.kill()
        held.proc.communicate(timeout=HANG)
        os.close(held.fifo_fd)


def _guest_unharmed(vm: Vm, pattern: int, offset: int) -> None:
    vm.guest_write("vda", pattern, offset, 64 * KiB)
    vm.guest_verify("vda", pattern, offset, 64 * KiB)


def _note(message: str) -> None:
    """Show the agent's message in ``pytest -rA`` / ``-s`` output (for the report)."""
    print(f"agent said: {message}")


def test_copy_before_write_target_full(vm: Vm, stall: Callable[..., Stalled]) -> None:
    before = _graph(vm)
    # The smallest sizes that leave a margin: the CLI takes 4K and up.
    stalled = stall("--cbw-memory", "1M", "--spool-limit", "1M")
    # 8 MiB of guest writes to clusters not backed up yet: the agent takes 4 MiB from the
    # target (its --memory for copies; its output is stalled), the target keeps 1 MiB in
    # memory and 1 MiB in its spool, then refuses (ENOSPC) and QEMU breaks the snapshot.
    # Every write succeeds all the same.
    for i in range(8):
        vm.guest_write("vda", 0xA0 + i, 24 * MiB + i * MiB, MiB)
    code, err = stalled.drain()
    assert _graph(vm) == before
    stalled.assert_clean()
    for i in range(8):
        vm.guest_verify("vda", 0xA0 + i, 24 * MiB + i * MiB, MiB)
    _guest_unharmed(vm, 0x5A, 48 * MiB)
    message = assert_error((code, err), "vda", "copy-before-write target ran out of room",
                           "--cbw-memory", "--spool-limit", "guest was not affected")
    _note(message)


@pytest.mark.slow
def test_copy_before_write_target_stalled(vm: Vm, stall: Callable[..., Stalled]) -> None:
    before = _graph(vm)
    stalled = stall("--cbw-timeout", "1")
    target = stalled.nbdkit
    os.kill(target, signal.SIGSTOP)
    try:
        # The copy cannot reach the target: after cbw-timeout (1 s) QEMU gives up on it,
        # breaks the snapshot and lets the guest write go through.
        vm.guest_write("vda", 0xB1, 44 * MiB, 64 * KiB)
    finally:
        os.kill(target, signal.SIGCONT)
    code, err = stalled.drain()
    assert _graph(vm) == before
    stalled.assert_clean()
    vm.guest_verify("vda", 0xB1, 44 * MiB, 64 * KiB)
    _guest_unharmed(vm, 0x5B, 48 * MiB)
    message = assert_error((code, err), "snapshot broke", "--cbw-timeout (1 s)",
                           "guest was not affected", "vda")
    _note(message)


def test_qemu_exits_mid_backup(vm: Vm, stall: Callable[..., Stalled]) -> None:
    stalled = stall()
    os.kill(vm.pid, signal.SIGKILL)
    vm.proc.wait(10)
    code, err = stalled.drain()  # bounded: fails the test if the agent hangs
    stalled.assert_clean()
    message = assert_error((code, err))
    _note(message)
    # The cause, not a consequence (such as a failed trim on QEMU's vanished NBD socket).
    assert "QEMU" in message and "exit" in message.lower(), message


def test_sigterm_mid_backup(vm: Vm, stall: Callable[..., Stalled]) -> None:
    before = _graph(vm)
    stalled = stall()
    stalled.proc.send_signal(signal.SIGTERM)
    vm.guest_write("vda", 0xC1, 40 * MiB, 64 * KiB)  # the guest writes on meanwhile
    code, err = stalled.drain()
    assert _graph(vm) == before
    stalled.assert_clean()
    vm.guest_verify("vda", 0xC1, 40 * MiB, 64 * KiB)
    _guest_unharmed(vm, 0x5C, 48 * MiB)
    message = assert_error((code, err), "SIGTERM")
    _note(message)
