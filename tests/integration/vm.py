"""Real QEMU virtual machines for integration tests.

A :class:`Vm` is ``qemu-system-x86_64 -nodefaults -display none -accel tcg`` with

- disks given as :class:`Disk` (a qcow2 or raw file): ``-blockdev`` file node ``<id>-file``,
  format node ``<id>-fmt``, and ``-device virtio-blk-pci,drive=<id>-fmt,id=<id>``;
- two QMP monitors, because a monitor serves one client at a time: :attr:`Vm.monitor` is the
  test's (connected), :attr:`Vm.agent_qmp` the socket path left for the code under test;
- optionally, a network namespace to run in (``netns``; tests/integration/netns.py);
- QEMU's stdout and stderr in :attr:`Vm.log` (HMP ``qemu-io`` prints there, not into the QMP
  reply), the guest's serial console in :attr:`Vm.serial`;
- either no guest code (``-S``: paused before the first instruction, the default) or a
  :class:`Guest` kernel and initramfs (see scripts/build-guest.sh), booted with ``-no-reboot``
  so that the guest's poweroff or a kernel panic ends QEMU.

Which QEMU runs is PATH's choice: ``BA_QEMU_DIR`` (a directory made by
scripts/fetch-qemu.sh) puts its wrappers first on PATH, for every QEMU program a test or the
agent starts (:func:`select_qemu`, called by conftest.py before any test runs).

Guest writes without a guest OS go through HMP ``qemu-io`` on the device's backend, as QEMU's
own tests do (:meth:`Vm.guest_write`). Every VM is stopped by its own pid: ``quit`` over QMP,
then SIGTERM, then SIGKILL, each with a timeout (:meth:`Vm.stop`, :class:`VmFactory`).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from agent.qemu.qmp import Monitor, QmpError

#: Seconds to wait for QEMU to create its monitor sockets.
START_TIMEOUT = 15.0
#: Seconds to wait for each step of stopping a VM (quit, SIGTERM) before the next one.
STOP_TIMEOUT = 5.0
#: Seconds to wait for the output of an HMP ``qemu-io`` command to reach the log.
QEMU_IO_TIMEOUT = 5.0
#: Longest usable Unix socket path (sun_path is 108 bytes including the final NUL).
MAX_SOCKET_PATH = 107

REPO = Path(__file__).resolve().parents[2]
BUILD_GUEST = REPO / "scripts" / "build-guest.sh"
#: Environment variable naming the QEMU under test: a directory made by scripts/fetch-qemu.sh
#: (``BA_QEMU_DIR=$(scripts/fetch-qemu.sh) pytest -m qemu``); unset: the system's QEMU.
QEMU_DIR_ENV = "BA_QEMU_DIR"
#: The programs a QEMU directory must hold (in its ``bin/``).
QEMU_PROGRAMS = ("qemu-system-x86_64", "qemu-img", "qemu-io", "qemu-nbd", "qemu-storage-daemon")


class VmError(RuntimeError):
    """A VM helper failed; the message says what and includes QEMU's output."""


def select_qemu(environ: dict[str, str] | None = None) -> str | None:
    """Put the QEMU that ``BA_QEMU_DIR`` names first on PATH; return its ``bin`` directory
    (None: the system's QEMU). Raises :class:`VmError` if the directory lacks a program."""
    env = os.environ if environ is None else environ
    root = env.get(QEMU_DIR_ENV)
    if not root:
        return None
    bin_dir = Path(root).resolve() / "bin"
    missing = [p for p in QEMU_PROGRAMS if not os.access(bin_dir / p, os.X_OK)]
    if missing:
        raise VmError(f"{QEMU_DIR_ENV}={root}: no {', '.join(missing)} in {bin_dir} "
                      "(make it with scripts/fetch-qemu.sh)")
    path = env.get("PATH", "").split(os.pathsep)
    if str(bin_dir) not in path[:1]:
        env["PATH"] = os.pathsep.join([str(bin_dir), *path])
    return str(bin_dir)


def qemu_version() -> str:
    """First line of ``qemu-system-x86_64 --version`` of the QEMU on PATH."""
    proc = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True,
                          check=False)
    return (proc.stdout.splitlines() or [proc.stderr.strip()])[0]


@dataclass(frozen=True)
class Disk:
    """One guest disk: an image file attached as a virtio-blk device with id ``id``."""

    path: Path
    fmt: str
    """``qcow2`` or ``raw`` (any QEMU format driver)."""
    id: str
    read_only: bool = False

    @property
    def file_node(self) -> str:
        return f"{self.id}-file"

    @property
    def node_name(self) -> str:
        """The format node: the disk's root node, which the device uses."""
        return f"{self.id}-fmt"

    def qemu_args(self) -> list[str]:
        """``-blockdev`` (JSON, so any file name works) and ``-device`` options."""
        ro = self.read_only
        file_node = {"driver": "file", "node-name": self.file_node,
                     "filename": str(Path(self.path).resolve()), "read-only": ro}
        fmt_node = {"driver": self.fmt, "node-name": self.node_name, "file": self.file_node,
                    "read-only": ro}
        return [
            "-blockdev", json.dumps(file_node),
            "-blockdev", json.dumps(fmt_node),
            "-device", f"virtio-blk-pci,drive={self.node_name},id={self.id}",
        ]


@dataclass(frozen=True)
class Guest:
    """A kernel and initramfs to boot (scripts/build-guest.sh makes them)."""

    kernel: Path
    initrd: Path
    append: str = ""
    """Kernel command line after ``console=ttyS0 panic=-1 quiet``: e.g. ``ba.passes=1``."""


def build_guest(out_dir: Path | None = None, timeout: float = 900) -> Guest:
    """Run scripts/build-guest.sh (it returns at once when the guest is up to date)."""
    argv = [str(BUILD_GUEST)] + ([str(out_dir)] if out_dir is not None else [])
    proc = subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise VmError(f"{BUILD_GUEST.name} failed ({proc.returncode}):\n{proc.stderr}")
    out = out_dir if out_dir is not None else REPO / ".cache" / "guest"
    return Guest(kernel=out / "vmlinuz", initrd=out / "initrd.img")


class Vm:
    """One running qemu-system-x86_64; see the module docstring. Use :meth:`stop` (or a
    :class:`VmFactory`) to end it: never kill QEMU by name."""

    def __init__(
        self,
        sock_dir: Path,
        name: str,
        disks: Sequence[Disk] = (),
        *,
        guest: Guest | None = None,
        paused: bool | None = None,
        memory: str = "256M",
        extra_args: Sequence[str] = (),
        netns: str | None = None,
    ) -> None:
        self.name = name
        self.disks = {d.id: d for d in disks}
        self.test_qmp = _socket_path(sock_dir, f"{name}-test.qmp")
        self.agent_qmp = _socket_path(sock_dir, f"{name}-agent.qmp")
        self.log = sock_dir / f"{name}.log"
        self.serial = sock_dir / f"{name}.serial"
        if paused is None:
            paused = guest is None
        argv = [
            "qemu-system-x86_64", "-nodefaults", "-display", "none", "-accel", "tcg",
            "-m", memory, "-name", name,
            "-qmp", f"unix:{self.test_qmp},server=on,wait=off",
            "-qmp", f"unix:{self.agent_qmp},server=on,wait=off",
            "-serial", f"file:{self.serial}",
        ]
        if paused:
            argv.append("-S")
        if guest is not None:
            append = f"console=ttyS0 panic=-1 quiet {guest.append}".strip()
            argv += ["-kernel", str(guest.kernel), "-initrd", str(guest.initrd),
                     "-append", append, "-no-reboot"]
        for disk in disks:
            argv += disk.qemu_args()
        argv += list(extra_args)
        if netns is not None:
            # `ip netns exec` enters the namespace and execs QEMU: the pid stays QEMU's.
            argv = ["ip", "netns", "exec", netns, *argv]
        self.argv = argv
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        self.pid = self.proc.pid
        self.monitor: Monitor | None = None
        try:
            self._wait_sockets()
            self.monitor = Monitor(str(self.test_qmp))
        except BaseException:
            self.stop()
            raise

    def _wait_sockets(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not (self.test_qmp.exists() and self.agent_qmp.exists()):
            if self.proc.poll() is not None:
                raise VmError(
                    f"QEMU exited with {self.proc.returncode} at start\n"
                    f"command: {self.argv!r}\n{self.log_text()}"
                )
            if time.monotonic() > deadline:
                raise VmError(f"QEMU made no QMP sockets within {START_TIMEOUT:g} s\n"
                              f"{self.log_text()}")
            time.sleep(0.02)

    @property
    def qmp(self) -> Monitor:
        """The test's monitor (connected while the VM runs)."""
        if self.monitor is None or self.monitor.closed:
            raise VmError(f"VM {self.name}: the test monitor is closed")
        return self.monitor

    def running(self) -> bool:
        return self.proc.poll() is None

    @property
    def qemu_version(self) -> tuple[int, int]:
        """QEMU's (major, minor) version (``query-version``): what tests check the agent's
        capability detection against."""
        v = self.qmp.execute("query-version")["qemu"]
        return int(v["major"]), int(v["minor"])

    def log_text(self) -> str:
        """QEMU's stdout and stderr so far."""
        return _read_text(self.log)

    def serial_text(self) -> str:
        """The guest's serial console so far."""
        return _read_text(self.serial)

    def wait_serial(self, marker: str, timeout: float = 60.0) -> str:
        """Wait until the serial console shows ``marker``; return the console text."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.serial_text()
            if marker in text:
                return text
            if self.proc.poll() is not None:
                text = self.serial_text()
                if marker in text:
                    return text
                raise VmError(f"VM {self.name} exited ({self.proc.returncode}) before "
                              f"{marker!r} on its console:\n{text}\n{self.log_text()}")
            if time.monotonic() > deadline:
                raise VmError(f"VM {self.name}: no {marker!r} on the console within "
                              f"{timeout:g} s:\n{text}")
            time.sleep(0.05)

    def wait_exit(self, timeout: float = 60.0) -> int:
        """Wait for QEMU to exit by itself (e.g. the guest powered off); its exit status."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired as e:
            raise VmError(f"VM {self.name} still runs after {timeout:g} s:\n"
                          f"{self.serial_text()}") from e

    def guest_write(self, dev_id: str, pattern: int, offset: int, length: int) -> None:
        """Write ``length`` bytes of byte ``pattern`` at ``offset`` of disk ``dev_id`` as the
        guest would: through the device (HMP ``qemu-io`` on its virtio backend)."""
        if not 0 <= pattern <= 0xFF:
            raise ValueError(f"pattern must be a byte value, got {pattern!r}")
        self._qemu_io(dev_id, f"write -P {pattern:#x} {offset} {length}",
                      f"wrote {length}/{length} bytes at offset {offset}")

    def guest_zero(self, dev_id: str, offset: int, length: int) -> None:
        """Write zeroes as the guest would (``write -z``: a write-zeroes request)."""
        self._qemu_io(dev_id, f"write -z {offset} {length}",
                      f"wrote {length}/{length} bytes at offset {offset}")

    def guest_verify(self, dev_id: str, pattern: int, offset: int, length: int) -> None:
        """Check through the device that ``length`` bytes at ``offset`` are all ``pattern``."""
        self._qemu_io(dev_id, f"read -P {pattern:#x} {offset} {length}",
                      f"read {length}/{length} bytes at offset {offset}")

    def _qemu_io(self, dev_id: str, command: str, expect: str) -> None:
        start = self.log.stat().st_size
        hmp = f'qemu-io -d /machine/peripheral/{dev_id}/virtio-backend "{command}"'
        reply = self.qmp.execute("human-monitor-command", {"command-line": hmp})
        if str(reply).strip():  # HMP errors ("no block device backend") come in the reply
            raise VmError(f"HMP {hmp}: {str(reply).strip()}")
        deadline = time.monotonic() + QEMU_IO_TIMEOUT
        while True:
            with open(self.log, "rb") as f:
                f.seek(start)
                out = f.read().decode(errors="replace")
            # "Pattern verification failed ..." comes with "read N/N bytes...": check it first.
            bad = "failed" in out or "not found" in out
            if expect in out and not bad:
                return
            if bad or time.monotonic() > deadline:
                raise VmError(f"HMP {hmp} did not print {expect!r} alone; QEMU printed:\n{out}")
            time.sleep(0.02)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """Stop QEMU by its own pid: QMP ``quit``, then SIGTERM, then SIGKILL. Idempotent;
        returns QEMU's exit status."""
        monitor, self.monitor = self.monitor, None
        try:
            if monitor is not None and not monitor.closed and self.proc.poll() is None:
                with contextlib.suppress(QmpError):
                    monitor.execute("quit", timeout=timeout)
        finally:
            if monitor is not None:
                monitor.close()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        return self.proc.returncode


class VmFactory:
    """Starts VMs for one test and stops all of them (each by its own pid) at the end.

    Sockets and logs go in ``sock_dir``, which must be short enough for Unix socket paths
    (the ``short_tmp`` fixture).
    """

    def __init__(self, sock_dir: Path) -> None:
        self.sock_dir = sock_dir
        self.vms: list[Vm] = []

    def start(
        self,
        disks: Sequence[Disk] = (),
        *,
        guest: Guest | None = None,
        paused: bool | None = None,
        memory: str = "256M",
        extra_args: Sequence[str] = (),
        netns: str | None = None,
    ) -> Vm:
        """Start a VM (see :class:`Vm`); it is named ``vm1``, ``vm2``... in this factory.
        ``netns``: run QEMU in that network namespace (its Unix sockets stay reachable)."""
        vm = Vm(self.sock_dir, f"vm{len(self.vms) + 1}", disks, guest=guest, paused=paused,
                memory=memory, extra_args=extra_args, netns=netns)
        self.vms.append(vm)
        return vm

    def close(self) -> None:
        """Stop every VM; the first error (if any) is raised after all were stopped."""
        errors: list[BaseException] = []
        for vm in self.vms:
            try:
                vm.stop()
            except Exception as e:  # keep stopping the others
                errors.append(e)
        if errors:
            raise errors[0]

    def __enter__(self) -> VmFactory:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _socket_path(sock_dir: Path, name: str) -> Path:
    path = sock_dir / name
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ValueError(f"socket path too long for AF_UNIX ({len(str(path))} bytes): {path}")
    return path


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""

