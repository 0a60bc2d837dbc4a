"""Application-consistent live backups: the guest's file systems frozen around the
snapshot's set-up only (``--fs-freeze``), through the QEMU guest agent or the user's hooks.

::

    freezer = Freezer(opts)          # nothing touched yet
    freezer.prepare()                # required: fails here, before the VM is changed
    with freezer.frozen():           # freeze ─▶ (the snapshot's transaction) ─▶ thaw
        ...
    freezer.close()                  # tells the watchdog all is well

A frozen guest is an outage, so the thaw runs on every way out of :meth:`Freezer.frozen`
(errors, Ctrl-C, SIGTERM: those arrive as exceptions, agent/interrupts.py; the thaw itself
runs with signals held off), and a freeze that does not finish within ``timeout`` is
answered with a thaw at once (qemu-ga handles requests in turn: the thaw runs as soon as the
freeze ends). For the ways out no code of ours sees — SIGKILL, a crash — a watchdog process
(agent/live/watchdog.py, in its own session) holds a pipe from the agent: when the pipe
closes while the guest is frozen, it connects to the guest agent's channel (free again once
the agent's socket is gone) or runs the thaw command, until the guest is thawed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from agent import interrupts
from agent.errors import AgentError, InvalidArgument
from agent.qemu.qga import AgentTimeout, CommandFailed, GuestAgent, GuestAgentError

log = logging.getLogger("backup-agent")

FS_FREEZE_MODES = ("auto", "required", "off")
#: Default longest wait for the guest to freeze (Windows VSS allows 10 s).
DEFAULT_TIMEOUT = 10.0
#: Seconds ``auto`` waits for a guest agent to answer before backing up crash-consistent.
PROBE_TIMEOUT = 5.0


class FreezeError(AgentError):
    """The guest could not be frozen (with ``--fs-freeze required``) or thawed."""


@dataclass(frozen=True)
class FreezeOptions:
    mode: str = "auto"  # auto | required | off
    qga: str | None = None  # host end of the guest agent's channel (Unix socket)
    mountpoints: list[str] = field(default_factory=list)  # []: every file system
    timeout: float = DEFAULT_TIMEOUT
    freeze_command: str | None = None  # hooks for a channel a manager holds (libvirt)
    thaw_command: str | None = None

    def check(self) -> None:
        if self.mode not in FS_FREEZE_MODES:
            raise InvalidArgument(f"--fs-freeze must be one of {', '.join(FS_FREEZE_MODES)}")
        if bool(self.freeze_command) != bool(self.thaw_command):
            raise InvalidArgument("--freeze-command and --thaw-command go together")
        if self.freeze_command and self.qga:
            raise InvalidArgument("give either --qga or --freeze-command/--thaw-command")
        if self.mountpoints and not self.qga:
            raise InvalidArgument("--freeze-mountpoint needs --qga")
        if self.mode == "required" and not (self.qga or self.freeze_command):
            raise InvalidArgument("--fs-freeze required needs the guest agent's channel "
                                  "(--qga SOCKET) or --freeze-command/--thaw-command")
        if self.timeout <= 0:
            raise InvalidArgument("--freeze-timeout must be positive")


@dataclass(frozen=True)
class FreezeResult:
    """What the archive and the summary say about consistency."""

    consistency: str = "crash"  # application | crash
    frozen_seconds: float | None = None  # freeze asked .. thaw confirmed
    mountpoints: tuple[str, ...] = ()  # what was frozen, when known
    filesystems: int | None = None  # how many qemu-ga froze
    note: str = ""  # why crash-consistent, when freezing was wanted

    def header_props(self) -> dict[str, str]:
        props = {"consistency": self.consistency}
        if self.consistency == "application" and self.mountpoints:
            props["frozen-mountpoints"] = "\n".join(self.mountpoints)
        return props


class Freezer:
    """Freezes and thaws one guest, for one backup (see the module docstring)."""

    def __init__(self, opts: FreezeOptions) -> None:
        opts.check()
        self.opts = opts
        self.result = FreezeResult()
        self._ga: GuestAgent | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._mountpoints: tuple[str, ...] = tuple(opts.mountpoints)
        self._active = opts.mode != "off" and bool(opts.qga or opts.freeze_command)
        if opts.mode == "off":
            self.result = FreezeResult(note="--fs-freeze off")
        elif not self._active:
            self.result = FreezeResult(note="no --qga or --freeze-command given")

    # -- before the VM is touched ---------------------------------------------------------

    def prepare(self) -> None:
        """Reach the guest agent (required: or fail) and start the watchdog."""
        if not self._active:
            return
        if self.opts.qga:
            try:
                self._ga = self._connect()
            except GuestAgentError as e:
                self._give_up(f"{e}")
                return
        self._start_watchdog()

    def _connect(self) -> GuestAgent:
        assert self.opts.qga is not None  # (checked by the caller)
        ga = GuestAgent(self.opts.qga, timeout=self.opts.timeout)
        probe = min(PROBE_TIMEOUT, self.opts.timeout) if self.opts.mode == "auto" \
            else self.opts.timeout
        try:
            ga.connect(sync_timeout=probe)
        except AgentTimeout as e:
            raise GuestAgentError(
                f"no guest agent answered on {self.opts.qga} within {probe:g} s (is qemu-ga "
                "running in the guest? another client may also hold the channel)") from e
        try:
            if ga.fsfreeze_status() == "frozen":
                # Someone else's freeze (or a leftover): thawing it is not ours to decide.
                raise GuestAgentError("the guest's file systems are already frozen by "
                                      "someone else (guest-fsfreeze-status: frozen)")
            if not self._mountpoints:
                try:
                    self._mountpoints = tuple(ga.fs_mountpoints())
                except CommandFailed as e:  # only for the record
                    log.debug("guest-get-fsinfo: %s", e)
        except BaseException:
            ga.close()
            raise
        return ga

    def _give_up(self, why: str) -> None:
        if self.opts.mode == "required":
            raise FreezeError(f"cannot freeze the guest (--fs-freeze required): {why}; "
                              "nothing was changed on the VM")
        log.warning("the backup will be crash-consistent: %s", why)
        self._active = False
        self.result = FreezeResult(note=why)

    # -- the freeze -----------------------------------------------------------------------

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Freeze, run the block, thaw (on every way out). ``auto``: a failed freeze thaws
        and goes on crash-consistent; ``required``: it raises."""
        if not self._active:
            yield
            return
        self._tell("frozen")  # before the freeze: a SIGKILL in it must be answered too
        start = time.monotonic()
        count: int | None = None
        failure: AgentError | None = None
        try:
            count = self._freeze()
        except (GuestAgentError, FreezeError) as e:
            failure = e
        except BaseException:  # Ctrl-C, SIGTERM while the guest freezes
            with interrupts.held():
                self._thaw_after_failed_freeze()
            raise
        if failure is not None:
            with interrupts.held():
                thawed = self._thaw_after_failed_freeze()
            if not thawed:
                raise FreezeError(f"the guest could not be frozen ({failure}) and its thaw "
                                  "was not confirmed: the watchdog keeps trying") from failure
            if self.opts.mode == "required":
                raise FreezeError(f"cannot freeze the guest (--fs-freeze required): "
                                  f"{failure}; the guest was thawed") from failure
            why = f"the guest could not be frozen: {failure}"
            log.warning("the backup will be crash-consistent: %s (the guest was thawed)", why)
            self._active = False
            self.result = FreezeResult(note=why)
            self.close()
            yield
            return
        froze = time.monotonic() - start
        failed = True
        try:
            yield
            failed = False
        finally:
            with interrupts.held():
                self._thaw(raise_errors=not failed)
        total = time.monotonic() - start
        log.debug("guest frozen in %.3f s, thawed %.3f s after the freeze began", froze, total)
        self.result = FreezeResult("application", total, self._mountpoints, count)
        # Thawed: let go of the channel (others may use it during the long copy) and of
        # the watchdog.
        self.close()

    def _freeze(self) -> int | None:
        if self._ga is not None:
            mps = list(self.opts.mountpoints) or None
            return self._ga.fsfreeze_freeze(mps, timeout=self.opts.timeout)
        assert self.opts.freeze_command is not None
        _run_hook(self.opts.freeze_command, "--freeze-command", self.opts.timeout)
        return None

    def _thaw(self, raise_errors: bool) -> None:
        try:
            if self._ga is not None:
                self._ga.fsfreeze_thaw(timeout=self.opts.timeout)
                status = self._ga.fsfreeze_status(timeout=self.opts.timeout)
                if status != "thawed":
                    raise FreezeError(f"guest-fsfreeze-status says {status!r} after the thaw")
            else:
                assert self.opts.thaw_command is not None
                _run_hook(self.opts.thaw_command, "--thaw-command", self.opts.timeout)
        except (GuestAgentError, FreezeError) as e:
            self._hand_over()
            msg = f"cannot thaw the guest: {e}; the watchdog keeps trying"
            if raise_errors:
                raise FreezeError(msg) from e
            log.error("%s", msg)
            return
        self._tell("thawed")

    def _thaw_after_failed_freeze(self) -> bool:
        """After a freeze that failed or timed out: thaw; True once it is confirmed. qemu-ga
        thaws by itself when a freeze fails part-way, but a timed-out freeze may still be
        running: the thaw is queued behind it, confirmed within twice the timeout."""
        try:
            if self._ga is not None:
                self._ga.send_only("guest-fsfreeze-thaw")
                # The sync is answered after the freeze and the thaw queued ahead of it; it
                # drops their replies (a late freeze's, the thaw's).
                self._ga.sync(2 * self.opts.timeout)
                status = self._ga.fsfreeze_status()
                if status != "thawed":
                    raise FreezeError(f"guest-fsfreeze-status says {status!r} after the thaw")
            else:
                assert self.opts.thaw_command is not None
                _run_hook(self.opts.thaw_command, "--thaw-command", self.opts.timeout)
        except (GuestAgentError, FreezeError) as e:
            log.error("cannot confirm the thaw after the failed freeze: %s", e)
            self._hand_over()
            return False
        self._tell("thawed")
        return True

    # -- the watchdog ---------------------------------------------------------------------

    def _start_watchdog(self) -> None:
        cmd = [sys.executable, "-m", "agent.live.watchdog"]
        if self.opts.qga:
            cmd += ["--qga", self.opts.qga]
        else:
            assert self.opts.thaw_command is not None
            cmd += ["--thaw-command", self.opts.thaw_command]
        repo = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH")) if p)
        try:
            # Its own session: Ctrl-C at the terminal must not stop it with us.
            self._watchdog = subprocess.Popen(cmd, stdin=subprocess.PIPE, env=env,
                                              start_new_session=True)
        except OSError as e:
            raise FreezeError(f"cannot start the thaw watchdog: {e}") from e

    def _tell(self, state: str) -> None:
        w = self._watchdog
        if w is None or w.stdin is None or w.stdin.closed:
            return
        try:
            w.stdin.write(state.encode() + b"\n")
            w.stdin.flush()
        except OSError:
            log.warning("the thaw watchdog is gone (%s)", state)

    def _hand_over(self) -> None:
        """Let the watchdog thaw: free the channel (it serves one client), close its pipe
        while it believes the guest frozen."""
        if self._ga is not None:
            self._ga.close()
            self._ga = None
        if self._watchdog is not None and self._watchdog.stdin is not None:
            with contextlib.suppress(OSError):
                self._watchdog.stdin.close()
        self._watchdog = None  # it runs on by itself

    def close(self) -> None:
        """All done (the guest is thawed): the watchdog exits."""
        if self._ga is not None:
            self._ga.close()
            self._ga = None
        w = self._watchdog
        self._watchdog = None
        if w is None:
            return
        self._tell_to(w, "done")
        with contextlib.suppress(OSError):
            if w.stdin is not None:
                w.stdin.close()
        try:
            w.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.debug("the thaw watchdog (pid %d) is still busy", w.pid)

    @staticmethod
    def _tell_to(w: subprocess.Popen[bytes], state: str) -> None:
        if w.stdin is not None and not w.stdin.closed:
            with contextlib.suppress(OSError):
                w.stdin.write(state.encode() + b"\n")
                w.stdin.flush()

    def __enter__(self) -> Freezer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _run_hook(command: str, option: str, timeout: float) -> None:
    """Run a --freeze-command / --thaw-command (split like a shell line, not run by one)."""
    try:
        argv = shlex.split(command)
    except ValueError as e:
        raise FreezeError(f"{option}: {e}") from e
    if not argv:
        raise FreezeError(f"{option} is empty")
    try:
        # In a group of its own: on a timeout its children go too (and let go of the pipes).
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
    except OSError as e:
        raise FreezeError(f"{option}: cannot run {argv[0]}: {e.strerror or e}") from e
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except BaseException as e:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        if isinstance(e, subprocess.TimeoutExpired):
            raise FreezeError(f"{option} {argv[0]} did not finish within {timeout:g} s") from e
        raise
    if proc.returncode != 0:
        err = stderr.decode(errors="replace").strip().splitlines()
        raise FreezeError(f"{option} {argv[0]} failed (exit {proc.returncode})"
                          + (f": {err[-1]}" if err else ""))
