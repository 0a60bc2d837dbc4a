"""Fixtures and helpers for integration tests that run real QEMU, nbdkit and libnbd processes.

Nothing here is mocked: images are made with ``qemu-img``/``qemu-io``, served by ``qemu-nbd`` or
``nbdkit`` over Unix sockets in a short temporary directory, and compared with
``qemu-img compare``. Every server started by a test is stopped by its own PID at teardown.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.process import accepts
from tests.integration.vm import (
    Disk,
    Guest,
    Vm,
    VmError,
    VmFactory,
    build_guest,
    qemu_version,
    select_qemu,
)
from tests.procs import OwnedProcess
from tests.s3util import Weed, start_weed

StrPath = str | os.PathLike[str]
ImageOp = tuple[str, int, int] | tuple[str, int, int, int]

#: Seconds to wait for a freshly started server to accept connections.
SERVER_START_TIMEOUT = 10.0
#: Seconds to wait for a server to exit after SIGTERM before sending SIGKILL.
SERVER_STOP_TIMEOUT = 5.0
#: Longest usable Unix socket path (sun_path is 108 bytes including the final NUL).
MAX_SOCKET_PATH = 107


class CommandError(RuntimeError):
    """A helper command failed; the message carries the command line, exit code and stderr."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        super().__init__(
            f"command {self.argv!r} exited with {returncode}:\n{stderr.strip() or '(no stderr)'}"
        )


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` to completion, raising :class:`CommandError` on a non-zero exit."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stderr + proc.stdout)
    return proc


def _qemu_io_command(op: ImageOp) -> str:
    """Translate one ``make_image`` operation tuple into a ``qemu-io -c`` command string."""
    kind = op[0]
    if kind == "write" and len(op) == 4:
        _, pattern, offset, length = op
        if not 0 <= pattern <= 0xFF:
            raise ValueError(f"write pattern must be a byte value, got {pattern!r}")
        return f"write -P {pattern:#x} {offset} {length}"
    if kind == "zero" and len(op) == 3:
        _, offset, length = op
        return f"write -z {offset} {length}"
    if kind == "discard" and len(op) == 3:
        _, offset, length = op
        return f"discard {offset} {length}"
    raise ValueError(
        f"bad image op {op!r}: expected ('write', pattern, offset, length), "
        "('zero', offset, length) or ('discard', offset, length)"
    )


def make_image(path: StrPath, fmt: str, size: int | str, ops: Sequence[ImageOp] = ()) -> Path:
    """Create a disk image and fill it, returning its path.

    Runs ``qemu-img create -f FMT PATH SIZE``, then applies ``ops`` in order with a single
    ``qemu-io -f FMT`` call. Each op is one of:

    - ``("write", pattern, offset, length)``: ``write -P pattern`` (pattern is a byte value);
    - ``("zero", offset, length)``: ``write -z`` (write-zeroes);
    - ``("discard", offset, length)``: ``discard``.

    Raises :class:`CommandError` (with the tool's stderr) if either command fails.
    """
    image = Path(path)
    _run(["qemu-img", "create", "-q", "-f", fmt, str(image), str(size)])
    if ops:
        argv = ["qemu-io", "-f", fmt]
        for op in ops:
            argv += ["-c", _qemu_io_command(op)]
        argv.append(str(image))
        _run(argv)
    return image


def qemu_img_compare(a: StrPath, fmt_a: str, b: StrPath, fmt_b: str, strict: bool = False) -> bool:
    """Compare the guest-visible contents of two images with ``qemu-img compare``.

    Returns True when identical (exit 0), False when they differ (exit 1); any other exit
    (missing file, bad format...) raises :class:`CommandError` with qemu-img's stderr. With
    ``strict`` (``-s``), a size mismatch or allocated-vs-unallocated difference also counts.
    """
    argv = ["qemu-img", "compare", "-f", fmt_a, "-F", fmt_b]
    if strict:
        argv.append("-s")
    argv += [str(a), str(b)]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode == 0:
        return True
    if proc.returncode == 1:
        return False
    raise CommandError(argv, proc.returncode, proc.stderr + proc.stdout)


def nbdcopy_to_file(uri: str, path: StrPath) -> Path:
    """Copy a whole NBD export to a local (raw) file with ``nbdcopy URI PATH``; returns the path."""
    dest = Path(path)
    _run(["nbdcopy", uri, str(dest)])
    return dest


@dataclass
class Server(OwnedProcess):
    """One running NBD server process (qemu-nbd or nbdkit) listening on a Unix socket."""

    uri: str
    """libnbd URI of the export, ``nbd+unix:///?socket=/path``."""
    socket: str
    """Path of the server's Unix socket."""
    pid: int
    """PID of the server process (it runs in the foreground: this is the server itself)."""
    proc: subprocess.Popen[bytes]
    """The process handle; use :meth:`stop`, never kill servers by name."""
    log: Path = field(repr=False)
    """File that receives the server's stdout and stderr."""

    def stop(self, timeout: float = SERVER_STOP_TIMEOUT) -> int:
        """Stop this server by its own PID: SIGTERM, wait up to ``timeout``, then SIGKILL.

        Idempotent. Removes the socket file. Returns the process's exit status.
        """
        code = super().stop(timeout)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)
        return code


class NbdServerFactory:
    """Starts NBD servers for one test and stops all of them at teardown.

    Obtained through the ``nbd_server`` fixture. Sockets and server logs go in ``sock_dir``,
    which must be short enough for Unix socket paths.
    """

    def __init__(self, sock_dir: Path) -> None:
        self.sock_dir = sock_dir
        self.servers: list[Server] = []
        self._count = 0

    def qemu_nbd(
        self,
        image: StrPath,
        fmt: str,
        readonly: bool = True,
        shared: int = 8,
        extra_args: Sequence[str] = (),
    ) -> Server:
        """Serve ``image`` with ``qemu-nbd`` in the foreground and wait until it accepts clients.

        Command: ``qemu-nbd -f FMT --socket=SOCK --persistent --shared=N [-r] [EXTRA] IMAGE``.
        ``shared`` > 1 makes qemu-nbd advertise multi-conn.
        """
        sock = self._new_socket("qemu-nbd")
        argv = ["qemu-nbd", "-f", fmt, f"--socket={sock}", "--persistent", f"--shared={shared}"]
        if readonly:
            argv.append("-r")
        argv += [*extra_args, str(Path(image).resolve())]
        return self._start(argv, sock)

    def nbdkit(
        self,
        args: Sequence[str],
        filters: Sequence[str] = (),
        readonly: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> Server:
        """Run ``nbdkit`` in the foreground on a Unix socket and wait until it accepts clients.

        Command: ``nbdkit --foreground -U SOCK [-r] [--filter=F ...] ARGS``, where ``args`` is
        the plugin and its parameters, e.g. ``["memory", "size=64M"]`` or
        ``["file", "disk.raw", "error-pread-rate=100%"]`` with ``filters=["error"]``
        (``filters`` are bare names; ``--filter=...`` options may also lead ``args``).
        ``env`` is added to the inherited environment (e.g. PYTHONPATH for the Python plugin).
        """
        sock = self._new_socket("nbdkit")
        argv = ["nbdkit", "--foreground", "-U", sock]
        if readonly:
            argv.append("-r")
        argv += [f"--filter={name}" for name in filters]
        argv += list(args)
        full_env = None if env is None else {**os.environ, **env}
        return self._start(argv, sock, full_env)

    def close(self) -> None:
        """Stop every server this factory started (each by its own PID). Idempotent."""
        # nbdkit 1.32 does not exit on SIGTERM while a client is still connected; a test's
        # libnbd handles can outlive it in a reference cycle (an exception's traceback and
        # its frames) until the next garbage collection, and stop() would wait out its
        # timeout: collect them now so their connections close first.
        gc.collect()
        errors: list[BaseException] = []
        for server in self.servers:
            try:
                server.stop()
            except Exception as exc:  # keep stopping the others
                errors.append(exc)
        if errors:
            raise errors[0]

    def _new_socket(self, kind: str) -> str:
        """A fresh socket path in ``sock_dir``; checks the Unix socket length limit."""
        self._count += 1
        sock = str(self.sock_dir / f"{kind}-{self._count}.sock")
        if len(os.fsencode(sock)) > MAX_SOCKET_PATH:
            raise ValueError(f"socket path too long for AF_UNIX ({len(sock)} bytes): {sock}")
        return sock

    def _start(self, argv: list[str], sock: str, env: Mapping[str, str] | None = None) -> Server:
        """Start ``argv`` with output to a log file, register it, and wait for its socket."""
        log = Path(sock).with_suffix(".log")
        with open(log, "wb") as log_file:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=env
            )
        server = Server(
            uri=f"nbd+unix:///?socket={sock}", socket=sock, pid=proc.pid, proc=proc, log=log
        )
        self.servers.append(server)
        try:
            _wait_until_accepting(server, argv)
        except BaseException:
            server.stop()
            raise
        return server


def _wait_until_accepting(server: Server, argv: Sequence[str]) -> None:
    """Poll until the server on ``server.socket`` sends its NBD greeting, or fail the test.

    Fails early, with the server's output, if the process exits first.
    """
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while True:
        status = server.proc.poll()
        if status is not None:
            pytest.fail(
                f"{argv[0]} exited with {status} before accepting connections\n"
                f"command: {argv!r}\n{server.log_text()}",
                pytrace=False,
            )
        if accepts(server.socket, timeout=0.5):  # the NBD greeting, not just a connect
            return
        if time.monotonic() >= deadline:
            pytest.fail(
                f"{argv[0]} did not accept connections on {server.socket} within "
                f"{SERVER_START_TIMEOUT:.0f} s\ncommand: {argv!r}\n{server.log_text()}",
                pytrace=False,
            )
        time.sleep(0.02)


@pytest.fixture
def nbd_server(short_tmp: Path) -> Iterator[NbdServerFactory]:
    """Factory for real NBD servers: ``nbd_server.qemu_nbd(...)`` and ``nbd_server.nbdkit(...)``.

    Every server it started is terminated by its own PID at teardown (before ``short_tmp``,
    which holds the sockets and logs, is removed).
    """
    factory = NbdServerFactory(short_tmp)
    try:
        yield factory
    finally:
        factory.close()


# -- virtual machines (tests/integration/vm.py) -------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    """Select the QEMU under test (``BA_QEMU_DIR``) before any test starts a QEMU program."""
    try:
        select_qemu()
    except VmError as e:
        raise pytest.UsageError(str(e)) from e


def pytest_report_header(config: pytest.Config) -> str:
    return f"QEMU under test: {qemu_version()} ({shutil.which('qemu-system-x86_64')})"


@pytest.fixture
def vms(short_tmp: Path) -> Iterator[VmFactory]:
    """Factory for real VMs: ``vms.start([Disk(...)])``; each is stopped by its pid at the end."""
    with VmFactory(short_tmp) as factory:
        yield factory


#: A VM and copies of its disks made before it started: {"vda": copy, "vdb": copy}.
TwoDisks = tuple[Vm, dict[str, Path]]
_MiB = 1 << 20


class TwoDiskVms:
    """Starts the live-backup tests' VM: a qcow2 disk ``vda`` and a raw disk ``vdb`` full of
    patterns, running (``cont``), with copies of both taken before it started: the point in
    time a backup must reproduce. Obtained through the ``two_disk_vm`` fixture."""

    def __init__(self, vms: VmFactory, directory: Path) -> None:
        self.vms = vms
        self.directory = directory

    def start(self, vda_size: int, vda_ops: Sequence[ImageOp], vdb_size: int, *,
              netns: str | None = None, extra_args: Sequence[str] = ()) -> TwoDisks:
        """``vda``: ``vda_size`` bytes written by ``vda_ops`` (see :func:`make_image`);
        ``vdb``: ``vdb_size`` bytes of 0x33 (a size that need not be a multiple of 4 KiB).
        ``netns`` and ``extra_args`` go to :meth:`VmFactory.start`."""
        d = self.directory
        vda = make_image(d / "vda.qcow2", "qcow2", vda_size, vda_ops)
        vdb = make_image(d / "vdb.raw", "raw", vdb_size, [("write", 0x33, 0, vdb_size)])
        before = {"vda": d / "before-vda.qcow2", "vdb": d / "before-vdb.raw"}
        shutil.copy(vda, before["vda"])
        shutil.copy(vdb, before["vdb"])
        vm = self.vms.start([Disk(vda, "qcow2", "vda"), Disk(vdb, "raw", "vdb")],
                            netns=netns, extra_args=extra_args)
        vm.qmp.execute("cont")
        return vm, before


@pytest.fixture
def two_disk_vm(vms: VmFactory, tmp_path: Path) -> TwoDiskVms:
    """``two_disk_vm.start(...)``: a running VM with two disks and their copies from before
    (:class:`TwoDiskVms`); stopped by its pid at teardown, as every VM of ``vms``."""
    return TwoDiskVms(vms, tmp_path)


@pytest.fixture
def patterned_vm(two_disk_vm: TwoDiskVms) -> TwoDisks:
    """The live-backup tests' usual VM: a 48 MiB qcow2 vda (data, a hole, data, zeros) and
    an 8 MiB + 4608 byte raw vdb."""
    return two_disk_vm.start(48 * _MiB, [("write", 0x11, 0, 20 * _MiB),
                                         ("write", 0x22, 24 * _MiB, 20 * _MiB),
                                         ("zero", 44 * _MiB, _MiB)], 8 * _MiB + 4608)


@pytest.fixture(scope="session")
def guest() -> Guest:
    """The tiny test guest, built by scripts/build-guest.sh on first use (downloads Debian's
    cloud kernel: give it time on a fresh machine)."""
    return build_guest()


# -- a real S3 server (tests/s3util.py: SeaweedFS's weed mini on the loopback) --------------


@pytest.fixture(scope="module")
def s3_server() -> Iterator[Weed]:
    """One ``weed mini`` for a test module (it takes seconds to start): free ports on
    127.0.0.1, its own short temporary directory, one identity (``Weed.env()`` gives the
    agent its credentials and endpoint). Stopped by its pid at teardown. Tests share it
    through :func:`s3_bucket`, a fresh bucket each."""
    directory = Path(tempfile.mkdtemp(prefix="weed-"))
    server = None
    try:
        server = start_weed(directory, buckets=())
        yield server
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def s3_bucket(s3_server: Weed, request: pytest.FixtureRequest) -> str:
    """A new, empty bucket on :func:`s3_server`, named after the test."""
    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40]
    name = f"{name.rstrip('-')}-{os.getpid() % 10000}-{next(_BUCKETS)}"
    s3_server.client().create_bucket(Bucket=name)
    return name


_BUCKETS = itertools.count()


@pytest.fixture
def s3_servers(short_tmp: Path) -> Iterator[Callable[[Path], Weed]]:
    """Start ``weed mini`` servers of the test's own (``s3_servers(directory)``; the same
    directory again restarts one on its data); each stopped by its pid at teardown."""
    started: list[Weed] = []

    def start(directory: Path) -> Weed:
        server = start_weed(directory, buckets=("backups",))
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()
