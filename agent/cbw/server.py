"""Runs the copy-before-write target: nbdkit with our Python plugin, one per disk.

nbdkit embeds the system Python and does not put the plugin's folder on sys.path, so the
process gets a PYTHONPATH holding this package's root and the site-packages we run from.
``--exit-with-parent`` makes nbdkit die with the agent: QEMU then breaks the snapshot after
``cbw-timeout`` and the guest keeps writing unharmed.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import agent
from agent.cbw.control import ControlClient
from agent.errors import AgentError

PLUGIN = Path(agent.__file__).resolve().parent.parent / "nbd-plugins" / "cbw_target.py"
START_TIMEOUT = 15.0


def _pythonpath() -> str:
    paths = [str(PLUGIN.parent.parent), *site.getsitepackages()]
    paths += [p for p in sys.path if p.endswith("site-packages") and p not in paths]
    return ":".join(paths)


class CbwTargetServer:
    """One nbdkit process serving one disk's copy-before-write target."""

    def __init__(self, size: int, *, memory: int, spool_dir: str | None, spool_limit: int,
                 label: str) -> None:
        if not PLUGIN.exists():
            raise AgentError(f"the copy-before-write plugin is missing: {PLUGIN}")
        self.label = label
        self._dir = tempfile.mkdtemp(prefix="ba-cbw-")
        self.socket = os.path.join(self._dir, "nbd.sock")
        self.control_path = os.path.join(self._dir, "ctl.sock")
        args = ["nbdkit", "--foreground", "--exit-with-parent", "-U", self.socket,
                "python", str(PLUGIN), f"size={size}", f"memory={memory}",
                f"spool-limit={spool_limit}", f"control={self.control_path}"]
        if spool_dir:
            args.append(f"spool-dir={spool_dir}")
        env = {**os.environ, "PYTHONPATH": _pythonpath()}
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())
        self.proc: subprocess.Popen[bytes] | None = None
        try:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self._log,
                                         stderr=self._log, env=env)
            self._wait_ready()
            self.control = ControlClient(self.control_path)
        except FileNotFoundError as e:
            self.close()
            raise AgentError("nbdkit is not installed (Debian packages nbdkit, "
                             "nbdkit-plugin-python)") from e
        except BaseException:
            self.close()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise AgentError(f"device {self.label!r}: the copy-before-write target did "
                                 f"not start: {self.output()}")
            if os.path.exists(self.socket) and os.path.exists(self.control_path):
                return
            time.sleep(0.02)
        raise AgentError(f"device {self.label!r}: the copy-before-write target did not start "
                         f"within {START_TIMEOUT:.0f} s")

    def output(self) -> str:
        self._log.seek(0)
        text = self._log.read().decode(errors="replace").strip()
        return text.splitlines()[-1] if text else "no message"

    def stats(self) -> dict[str, int]:
        """The store's counters (clusters copied, bytes spilled, peaks, full errors)."""
        return self.control.stats()

    def blockdev(self) -> dict[str, object]:
        """QEMU blockdev-add options of an NBD client node reaching this target."""
        return {"driver": "nbd", "server": {"type": "unix", "path": self.socket}}

    def close(self) -> None:
        control = getattr(self, "control", None)
        if control is not None:
            control.close()
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._log.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> CbwTargetServer:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
